//! Translation: hits, replies, conntrack state per flow, and IP fragments.

use proxy_common::stats::*;
use svcproxy::desired::Protocol;

use crate::{
    cases::*,
    harness::{Case, Expect, be, fe, svc},
    packet::{ACK, FIN, PSH, RST, SCTP, SYN, TCP, UDP, ip},
};

/// An SCTP DATA chunk header and a few bytes: something after the common header.
const SCTP_CHUNK: [u8; 16] = [0, 3, 0, 16, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];

pub fn cases() -> Vec<Case> {
    let mut all = hits();
    all.extend(replies());
    all.extend(flows());
    all.extend(fragments());
    all
}

fn hits() -> Vec<Case> {
    let syn = ip((CLIENT, 40000), (VIP_A, 80), TCP);
    let query = ip((CLIENT, 40001), (VIP_A, 53), UDP).payload(b"query");
    vec![
        Case {
            name: "tcp syn to a ClusterIP is DNATed to the backend and target port",
            frontends: tcp_svc(),
            steps: vec![rewrites(
                &syn,
                &syn.clone().with_dst(a(B1), 8080),
                STAT_FWD_NEW,
            )],
        },
        Case {
            name: "tcp to a ClusterIP whose target port is its port: only the address rewritten",
            frontends: vec![svc(fe(VIP, 443, Protocol::Tcp), vec![be(B1, 443)])],
            steps: vec![{
                let s = ip((CLIENT, 40000), (VIP_A, 443), TCP);
                rewrites(&s, &s.clone().with_dst(a(B1), 443), STAT_FWD_NEW)
            }],
        },
        Case {
            name: "udp to a ClusterIP is DNATed to the backend and target port",
            frontends: udp_svc(),
            steps: vec![rewrites(
                &query,
                &query.clone().with_dst(a(B1), 5353),
                STAT_FWD_NEW,
            )],
        },
        Case {
            name: "udp to a ClusterIP whose target port is its port: only the address rewritten",
            frontends: vec![svc(fe(VIP, 5000, Protocol::Udp), vec![be(B1, 5000)])],
            steps: vec![{
                let q = ip((CLIENT, 40001), (VIP_A, 5000), UDP).payload(b"query");
                rewrites(&q, &q.clone().with_dst(a(B1), 5000), STAT_FWD_NEW)
            }],
        },
        Case {
            name: "sctp to a ClusterIP gets the address rewritten, port and CRC untouched",
            frontends: sctp_svc(),
            steps: vec![{
                let s = ip((CLIENT, 40000), (VIP_A, 3868), SCTP).payload(&SCTP_CHUNK);
                rewrites(&s, &s.clone().with_dst(a(B1), 3868), STAT_FWD_NEW)
            }],
        },
        Case {
            name: "udp without checksum keeps checksum 0 when translated",
            frontends: udp_svc(),
            steps: vec![{
                let q = ip((CLIENT, 40002), (VIP_A, 53), UDP)
                    .payload(b"q")
                    .no_udp_csum();
                rewrites(&q, &q.clone().with_dst(a(B1), 5353), STAT_FWD_NEW)
            }],
        },
        Case {
            name: "udp whose translated checksum computes to 0 is sent with checksum 0xffff",
            frontends: udp_svc(),
            steps: vec![{
                let out = ip((CLIENT, 40003), (a(B1), 5353), UDP)
                    .payload(b"zero")
                    .udp_csum_computes_to_zero();
                rewrites(&out.clone().with_dst(VIP_A, 53), &out, STAT_FWD_NEW)
            }],
        },
        Case {
            name: "a data segment of an established tcp flow is translated with its payload intact",
            frontends: tcp_svc(),
            steps: vec![
                rewrites(&syn, &syn.clone().with_dst(a(B1), 8080), STAT_FWD_NEW),
                {
                    let data = syn
                        .clone()
                        .flags(ACK | PSH)
                        .seq(1001)
                        .payload(b"GET / HTTP/1.1\r\n\r\n");
                    rewrites(
                        &data,
                        &data.clone().with_dst(a(B1), 8080),
                        STAT_FWD_ESTABLISHED,
                    )
                },
            ],
        },
        Case {
            name: "each port of a multi-port Service goes to its own target port",
            frontends: vec![
                svc(fe(VIP, 80, Protocol::Tcp), vec![be(B1, 8080)]),
                svc(fe(VIP, 443, Protocol::Tcp), vec![be(B2, 8443)]),
            ],
            steps: vec![
                rewrites(&syn, &syn.clone().with_dst(a(B1), 8080), STAT_FWD_NEW),
                {
                    let s = ip((CLIENT, 40001), (VIP_A, 443), TCP);
                    rewrites(&s, &s.clone().with_dst(a(B2), 8443), STAT_FWD_NEW)
                },
            ],
        },
        Case {
            name: "tcp and udp on the same ClusterIP port go to their own backends",
            frontends: vec![
                svc(fe(VIP, 53, Protocol::Tcp), vec![be(B2, 5300)]),
                svc(fe(VIP, 53, Protocol::Udp), vec![be(B1, 5353)]),
            ],
            steps: vec![
                rewrites(&query, &query.clone().with_dst(a(B1), 5353), STAT_FWD_NEW),
                {
                    let s = ip((CLIENT, 40001), (VIP_A, 53), TCP);
                    rewrites(&s, &s.clone().with_dst(a(B2), 5300), STAT_FWD_NEW)
                },
            ],
        },
        Case {
            name: "two Services on different ClusterIPs and the same port do not mix",
            frontends: vec![
                svc(fe(VIP, 80, Protocol::Tcp), vec![be(B1, 8080)]),
                svc(fe(VIP2, 80, Protocol::Tcp), vec![be(B2, 9090)]),
            ],
            steps: vec![
                {
                    let s = ip((CLIENT, 40000), (VIP2_A, 80), TCP);
                    rewrites(&s, &s.clone().with_dst(a(B2), 9090), STAT_FWD_NEW)
                },
                rewrites(&syn, &syn.clone().with_dst(a(B1), 8080), STAT_FWD_NEW),
            ],
        },
        Case {
            name: "a new flow to a frontend with three backends goes to one of them",
            frontends: vec![svc(
                fe(VIP, 80, Protocol::Tcp),
                vec![be(B1, 8080), be(B2, 8080), be(B3, 8080)],
            )],
            steps: vec![step(
                syn.frame(),
                Expect::OneOf(
                    [B1, B2, B3]
                        .iter()
                        .map(|b| syn.clone().with_dst(a(*b), 8080).frame())
                        .collect(),
                ),
                STAT_FWD_NEW,
            )],
        },
        Case {
            name: "ethernet padding after the datagram is kept and left out of the checksums",
            frontends: tcp_svc(),
            steps: vec![step(
                eth_padded(syn.frame()),
                Expect::Rewritten(eth_padded(syn.clone().with_dst(a(B1), 8080).frame())),
                STAT_FWD_NEW,
            )],
        },
        Case {
            name: "a SYN with TCP options is translated with its options intact",
            frontends: tcp_svc(),
            steps: vec![{
                let s = syn.clone().tcp_options(&SYN_TCP_OPTIONS);
                rewrites(&s, &s.clone().with_dst(a(B1), 8080), STAT_FWD_NEW)
            }],
        },
        Case {
            name: "IPv4 options on a tcp hit: L4 found through IHL and rewritten",
            frontends: tcp_svc(),
            steps: vec![{
                let s = syn.clone().options(&OPT_RA);
                rewrites(&s, &s.clone().with_dst(a(B1), 8080), STAT_FWD_NEW)
            }],
        },
        Case {
            name: "IPv4 options on a udp hit: L4 found through IHL and rewritten",
            frontends: udp_svc(),
            steps: vec![{
                let q = query.clone().options(&OPT_RA_PADDED);
                rewrites(&q, &q.clone().with_dst(a(B1), 5353), STAT_FWD_NEW)
            }],
        },
    ]
}

fn replies() -> Vec<Case> {
    let syn = ip((CLIENT, 40000), (VIP_A, 80), TCP);
    let syn_out = syn.clone().with_dst(a(B1), 8080);
    let query = ip((CLIENT, 40003), (VIP_A, 53), UDP).payload(b"q");
    let query_out = query.clone().with_dst(a(B1), 5353);
    vec![
        Case {
            name: "tcp reply from the backend is reverse-translated to the ClusterIP",
            frontends: tcp_svc(),
            steps: vec![
                rewrites(&syn, &syn_out, STAT_FWD_NEW),
                {
                    let synack = ip((a(B1), 8080), (CLIENT, 40000), TCP)
                        .flags(SYN | ACK)
                        .ack(1001);
                    rewrites(&synack, &synack.clone().with_src(VIP_A, 80), STAT_REPLY)
                },
                {
                    let req = syn.clone().flags(ACK).seq(1001).payload(b"GET /");
                    rewrites(
                        &req,
                        &req.clone().with_dst(a(B1), 8080),
                        STAT_FWD_ESTABLISHED,
                    )
                },
            ],
        },
        Case {
            name: "udp reply is reverse-translated to the ClusterIP",
            frontends: udp_svc(),
            steps: vec![rewrites(&query, &query_out, STAT_FWD_NEW), {
                let ans = ip((a(B1), 5353), (CLIENT, 40003), UDP).payload(b"answer");
                rewrites(&ans, &ans.clone().with_src(VIP_A, 53), STAT_REPLY)
            }],
        },
        Case {
            name: "sctp reply gets its source address restored, port and CRC untouched",
            frontends: sctp_svc(),
            steps: vec![
                {
                    let s = ip((CLIENT, 40000), (VIP_A, 3868), SCTP).payload(&SCTP_CHUNK);
                    rewrites(&s, &s.clone().with_dst(a(B1), 3868), STAT_FWD_NEW)
                },
                {
                    let r = ip((a(B1), 3868), (CLIENT, 40000), SCTP).payload(&SCTP_CHUNK);
                    rewrites(&r, &r.clone().with_src(VIP_A, 3868), STAT_REPLY)
                },
            ],
        },
        Case {
            name: "IPv4 options on a tcp reply: the source is restored through IHL",
            frontends: tcp_svc(),
            steps: vec![rewrites(&syn, &syn_out, STAT_FWD_NEW), {
                let r = ip((a(B1), 8080), (CLIENT, 40000), TCP)
                    .flags(SYN | ACK)
                    .options(&OPT_RA_PADDED);
                rewrites(&r, &r.clone().with_src(VIP_A, 80), STAT_REPLY)
            }],
        },
        Case {
            name: "udp reply without checksum keeps checksum 0",
            frontends: udp_svc(),
            steps: vec![rewrites(&query, &query_out, STAT_FWD_NEW), {
                let ans = ip((a(B1), 5353), (CLIENT, 40003), UDP)
                    .payload(b"a")
                    .no_udp_csum();
                rewrites(&ans, &ans.clone().with_src(VIP_A, 53), STAT_REPLY)
            }],
        },
        Case {
            name: "udp reply whose translated checksum computes to 0 is sent with checksum 0xffff",
            frontends: udp_svc(),
            steps: vec![rewrites(&query, &query_out, STAT_FWD_NEW), {
                let out = ip((VIP_A, 53), (CLIENT, 40003), UDP)
                    .payload(b"zero")
                    .udp_csum_computes_to_zero();
                rewrites(&out.clone().with_src(a(B1), 5353), &out, STAT_REPLY)
            }],
        },
        Case {
            name: "a packet from a backend to a client port with no flow passes untouched",
            frontends: tcp_svc(),
            steps: vec![
                rewrites(&syn, &syn_out, STAT_FWD_NEW),
                untouched(
                    ip((a(B1), 8080), (CLIENT, 40999), TCP)
                        .flags(SYN | ACK)
                        .frame(),
                    STAT_PASS_NO_SERVICE,
                ),
            ],
        },
        Case {
            name: "a packet from a backend's other port to a flow's client passes untouched",
            frontends: tcp_svc(),
            steps: vec![
                rewrites(&syn, &syn_out, STAT_FWD_NEW),
                untouched(
                    ip((a(B1), 9999), (CLIENT, 40000), TCP)
                        .flags(SYN | ACK)
                        .frame(),
                    STAT_PASS_NO_SERVICE,
                ),
            ],
        },
        Case {
            name: "a backend's packet to another client on a flow's client port passes untouched",
            frontends: tcp_svc(),
            steps: vec![
                rewrites(&syn, &syn_out, STAT_FWD_NEW),
                untouched(
                    ip((a(B1), 8080), (OTHER, 40000), TCP)
                        .flags(SYN | ACK)
                        .frame(),
                    STAT_PASS_NO_SERVICE,
                ),
            ],
        },
    ]
}

fn flows() -> Vec<Case> {
    let syn = ip((CLIENT, 40000), (VIP_A, 80), TCP);
    let fwd = |p: &crate::packet::Ip, stat| rewrites(p, &p.clone().with_dst(a(B1), 8080), stat);
    vec![
        Case {
            name: "a FIN keeps the flow on its backend",
            frontends: tcp_svc(),
            steps: vec![
                fwd(&syn, STAT_FWD_NEW),
                fwd(
                    &syn.clone().flags(FIN | ACK).seq(1001),
                    STAT_FWD_ESTABLISHED,
                ),
            ],
        },
        Case {
            name: "a bare SYN reusing the tuple of a flow closed by FIN starts a new flow",
            frontends: tcp_svc(),
            steps: vec![
                fwd(&syn, STAT_FWD_NEW),
                fwd(
                    &syn.clone().flags(FIN | ACK).seq(1001),
                    STAT_FWD_ESTABLISHED,
                ),
                // The last ACK of the close still belongs to the old flow.
                fwd(&syn.clone().flags(ACK).seq(1002), STAT_FWD_ESTABLISHED),
                fwd(&syn.clone().seq(5000), STAT_FWD_NEW),
            ],
        },
        Case {
            name: "a bare SYN reusing the tuple of a flow reset by the client starts a new flow",
            frontends: tcp_svc(),
            steps: vec![
                fwd(&syn, STAT_FWD_NEW),
                fwd(&syn.clone().flags(RST).seq(1001), STAT_FWD_ESTABLISHED),
                fwd(&syn.clone().seq(5000), STAT_FWD_NEW),
            ],
        },
        Case {
            name: "a bare SYN reusing the tuple of a flow reset by the backend starts a new flow",
            frontends: tcp_svc(),
            steps: vec![
                fwd(&syn, STAT_FWD_NEW),
                {
                    let rst = ip((a(B1), 8080), (CLIENT, 40000), TCP)
                        .flags(RST | ACK)
                        .seq(0)
                        .ack(1001);
                    rewrites(&rst, &rst.clone().with_src(VIP_A, 80), STAT_REPLY)
                },
                fwd(&syn.clone().seq(5000), STAT_FWD_NEW),
            ],
        },
        Case {
            name: "a retransmitted SYN of a live flow stays on the flow",
            frontends: tcp_svc(),
            steps: vec![fwd(&syn, STAT_FWD_NEW), fwd(&syn, STAT_FWD_ESTABLISHED)],
        },
        Case {
            name: "udp datagrams after the first of a flow are established",
            frontends: udp_svc(),
            steps: {
                let q = ip((CLIENT, 40004), (VIP_A, 53), UDP).payload(b"q");
                let out = q.clone().with_dst(a(B1), 5353);
                vec![
                    rewrites(&q, &out, STAT_FWD_NEW),
                    rewrites(&q, &out, STAT_FWD_ESTABLISHED),
                    rewrites(&q, &out, STAT_FWD_ESTABLISHED),
                ]
            },
        },
    ]
}

fn fragments() -> Vec<Case> {
    // 40 bytes of payload after an 8-byte UDP header, split after 24 bytes: the first
    // fragment carries the header and 16 bytes, the later one the last 24.
    let dgram = ip((CLIENT, 40020), (VIP_A, 53), UDP)
        .id(0x5151)
        .payload(&[0xab; 40]);
    let (f1, f2) = dgram.fragments(24);
    let (t1, t2) = dgram.clone().with_dst(a(B1), 5353).fragments(24);
    vec![
        Case {
            name: "udp first fragment is translated with its ports and the later fragment follows",
            frontends: udp_svc(),
            steps: vec![
                step(f1.clone(), Expect::Rewritten(t1.clone()), STAT_FWD_NEW),
                step(
                    f2.clone(),
                    Expect::Rewritten(t2.clone()),
                    STAT_FRAGMENT_TRANSLATED,
                ),
            ],
        },
        Case {
            name: "tcp first fragment is translated with its ports and the later fragment follows",
            frontends: tcp_svc(),
            steps: {
                let seg = ip((CLIENT, 40021), (VIP_A, 80), TCP)
                    .flags(ACK | PSH)
                    .id(0x5252)
                    .payload(&[0xcd; 40]);
                let (f1, f2) = seg.fragments(24);
                let (t1, t2) = seg.clone().with_dst(a(B1), 8080).fragments(24);
                vec![
                    step(f1, Expect::Rewritten(t1), STAT_FWD_NEW),
                    step(f2, Expect::Rewritten(t2), STAT_FRAGMENT_TRANSLATED),
                ]
            },
        },
        Case {
            name: "fragments of a udp reply get their source restored, the later one by address",
            frontends: udp_svc(),
            steps: {
                let q = ip((CLIENT, 40022), (VIP_A, 53), UDP).payload(b"q");
                let ans = ip((a(B1), 5353), (CLIENT, 40022), UDP)
                    .id(0x6161)
                    .payload(&[0xef; 64]);
                let (r1, r2) = ans.fragments(16);
                let (o1, o2) = ans.clone().with_src(VIP_A, 53).fragments(16);
                vec![
                    rewrites(&q, &q.clone().with_dst(a(B1), 5353), STAT_FWD_NEW),
                    step(r1, Expect::Rewritten(o1), STAT_REPLY),
                    step(r2, Expect::Rewritten(o2), STAT_FRAGMENT_TRANSLATED),
                ]
            },
        },
        Case {
            name: "a later fragment whose first fragment was never seen passes untouched",
            frontends: udp_svc(),
            steps: vec![untouched(f2.clone(), STAT_PASS_FRAGMENT)],
        },
        Case {
            name: "a later fragment before its first passes untouched, the first still translated",
            frontends: udp_svc(),
            steps: vec![
                untouched(f2.clone(), STAT_PASS_FRAGMENT),
                step(f1.clone(), Expect::Rewritten(t1.clone()), STAT_FWD_NEW),
                // A copy arriving after the first fragment follows it.
                step(
                    f2.clone(),
                    Expect::Rewritten(t2.clone()),
                    STAT_FRAGMENT_TRANSLATED,
                ),
            ],
        },
        Case {
            name: "a later fragment of another datagram (IP id) does not follow a first fragment",
            frontends: udp_svc(),
            steps: vec![
                step(f1.clone(), Expect::Rewritten(t1.clone()), STAT_FWD_NEW),
                untouched(dgram.clone().id(0x5152).fragments(24).1, STAT_PASS_FRAGMENT),
            ],
        },
    ]
}
