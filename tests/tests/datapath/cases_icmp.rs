//! ICMP errors about translated flows: they quote the packet as the backend saw it (client ->
//! backend) and must reach the client as if about what it sent (client -> frontend): inner
//! destination address and port restored, and the outer source too when the backend itself
//! sent the error. Errors from a router on the path keep the router as their source.

use std::net::Ipv4Addr;

use proxy_common::stats::*;
use svcproxy::desired::Protocol;

use crate::{
    cases::*,
    harness::{Case, be, fe, svc},
    packet::{
        CODE_FRAG_NEEDED, CODE_PORT_UNREACH, ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST,
        ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED, Ip, SCTP, TCP, UDP, icmp, ip,
    },
};

/// An ICMP error sent to the client by `src`.
struct IcmpError {
    src: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
}

impl IcmpError {
    /// The error as sent: quoting `l4_bytes` of `translated`, the packet as the backend (or a
    /// router on the way to it) saw it.
    fn about(&self, translated: &Ip, l4_bytes: usize) -> Ip {
        icmp(self.src, CLIENT, self.icmp_type, self.code)
            .rest(self.rest)
            .ttl(61)
            .payload(&translated.quote(l4_bytes))
    }

    /// The error as the client must receive it: from `src`, quoting what it sent
    /// (`original`).
    fn as_delivered(&self, src: Ipv4Addr, original: &Ip, translated: &Ip, l4_bytes: usize) -> Ip {
        icmp(src, CLIENT, self.icmp_type, self.code)
            .rest(self.rest)
            .ttl(61)
            .payload(&quote_as_sent(original, translated, l4_bytes))
    }
}

pub fn cases() -> Vec<Case> {
    let query = ip((CLIENT, 40010), (VIP_A, 53), UDP).payload(b"query");
    let query_out = query.clone().with_dst(a(B1), 5353);
    let syn = ip((CLIENT, 40011), (VIP_A, 80), TCP).payload(&[0x42; 1200]);
    let syn_out = syn.clone().with_dst(a(B1), 8080);
    let port_unreachable = IcmpError {
        src: a(B1),
        icmp_type: ICMP_DEST_UNREACH,
        code: CODE_PORT_UNREACH,
        rest: [0; 4],
    };
    let frag_needed = IcmpError {
        src: ROUTER,
        icmp_type: ICMP_DEST_UNREACH,
        code: CODE_FRAG_NEEDED,
        rest: [0, 0, 0x04, 0xd8], // next-hop MTU 1240
    };
    let time_exceeded = IcmpError {
        src: ROUTER,
        icmp_type: ICMP_TIME_EXCEEDED,
        code: 0,
        rest: [0; 4],
    };
    let param_problem = IcmpError {
        src: a(B1),
        icmp_type: ICMP_PARAMETER_PROBLEM,
        code: 0,
        rest: [20, 0, 0, 0], // pointer
    };
    let e = &port_unreachable;
    vec![
        Case {
            name: "port unreachable from the backend reaches the client as from and about the VIP",
            frontends: udp_svc(),
            steps: vec![
                rewrites(&query, &query_out, STAT_FWD_NEW),
                rewrites(
                    &e.about(&query_out, 8),
                    &e.as_delivered(VIP_A, &query, &query_out, 8),
                    STAT_ICMP_ERROR_REPLY,
                ),
            ],
        },
        Case {
            name: "fragmentation needed from a router keeps the router as source, quote restored",
            frontends: tcp_svc(),
            steps: vec![
                rewrites(&syn, &syn_out, STAT_FWD_NEW),
                rewrites(
                    &frag_needed.about(&syn_out, 8),
                    &frag_needed.as_delivered(ROUTER, &syn, &syn_out, 8),
                    STAT_ICMP_ERROR_REPLY,
                ),
            ],
        },
        Case {
            name: "time exceeded from a router keeps the router as source, quote restored",
            frontends: udp_svc(),
            steps: vec![
                rewrites(&query, &query_out, STAT_FWD_NEW),
                rewrites(
                    &time_exceeded.about(&query_out.clone().ttl(1), 8),
                    &time_exceeded.as_delivered(
                        ROUTER,
                        &query.clone().ttl(1),
                        &query_out.clone().ttl(1),
                        8,
                    ),
                    STAT_ICMP_ERROR_REPLY,
                ),
            ],
        },
        Case {
            name: "parameter problem from the backend reaches the client from the frontend",
            frontends: tcp_svc(),
            steps: vec![
                rewrites(&syn, &syn_out, STAT_FWD_NEW),
                rewrites(
                    &param_problem.about(&syn_out, 8),
                    &param_problem.as_delivered(VIP_A, &syn, &syn_out, 8),
                    STAT_ICMP_ERROR_REPLY,
                ),
            ],
        },
        Case {
            name: "an ICMP error quoting a packet with IP options is restored via the inner IHL",
            frontends: udp_svc(),
            steps: {
                let q = query.clone().options(&OPT_RA_PADDED);
                let q_out = q.clone().with_dst(a(B1), 5353);
                vec![
                    rewrites(&q, &q_out, STAT_FWD_NEW),
                    rewrites(
                        &e.about(&q_out, 8),
                        &e.as_delivered(VIP_A, &q, &q_out, 8),
                        STAT_ICMP_ERROR_REPLY,
                    ),
                ]
            },
        },
        Case {
            name: "an ICMP error quoting more than 8 bytes is restored, the rest of the quote kept",
            frontends: tcp_svc(),
            steps: vec![
                rewrites(&syn, &syn_out, STAT_FWD_NEW),
                rewrites(
                    &frag_needed.about(&syn_out, 20 + 64),
                    &frag_needed.as_delivered(ROUTER, &syn, &syn_out, 20 + 64),
                    STAT_ICMP_ERROR_REPLY,
                ),
            ],
        },
        Case {
            name: "an ICMP error with IP options of its own is restored via the outer IHL",
            frontends: udp_svc(),
            steps: vec![
                rewrites(&query, &query_out, STAT_FWD_NEW),
                rewrites(
                    &e.about(&query_out, 8).options(&OPT_RA),
                    &e.as_delivered(VIP_A, &query, &query_out, 8)
                        .options(&OPT_RA),
                    STAT_ICMP_ERROR_REPLY,
                ),
            ],
        },
        Case {
            name: "an ICMP error about a flow without a port rewrite restores the address only",
            frontends: vec![svc(fe(VIP, 443, Protocol::Tcp), vec![be(B1, 443)])],
            steps: {
                let s = ip((CLIENT, 40012), (VIP_A, 443), TCP);
                let s_out = s.clone().with_dst(a(B1), 443);
                vec![
                    rewrites(&s, &s_out, STAT_FWD_NEW),
                    rewrites(
                        &e.about(&s_out, 8),
                        &e.as_delivered(VIP_A, &s, &s_out, 8),
                        STAT_ICMP_ERROR_REPLY,
                    ),
                ]
            },
        },
        Case {
            name: "an ICMP error about an sctp flow restores the address",
            frontends: sctp_svc(),
            steps: {
                let s = ip((CLIENT, 40013), (VIP_A, 3868), SCTP).payload(&[0; 16]);
                let s_out = s.clone().with_dst(a(B1), 3868);
                vec![
                    rewrites(&s, &s_out, STAT_FWD_NEW),
                    rewrites(
                        &e.about(&s_out, 8),
                        &e.as_delivered(VIP_A, &s, &s_out, 8),
                        STAT_ICMP_ERROR_REPLY,
                    ),
                ]
            },
        },
        Case {
            name: "an ICMP error about a flow the datapath does not know passes untouched",
            frontends: udp_svc(),
            steps: vec![untouched(
                e.about(&query_out, 8).frame(),
                STAT_PASS_NO_SERVICE,
            )],
        },
        Case {
            name: "an ICMP error quoting an ICMP query passes untouched",
            frontends: udp_svc(),
            steps: vec![
                rewrites(&query, &query_out, STAT_FWD_NEW),
                untouched(
                    e.about(
                        &icmp(CLIENT, a(B1), ICMP_ECHO_REQUEST, 0).rest([0, 1, 0, 1]),
                        8,
                    )
                    .frame(),
                    STAT_PASS_NO_SERVICE,
                ),
            ],
        },
    ]
}
