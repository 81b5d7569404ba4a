//! Frontends without usable backends: REJECT (TCP RST, ICMP port unreachable) when there are
//! no endpoints at all, DROP when endpoints exist but none is usable here.

use proxy_common::stats::*;
use svcproxy::desired::Protocol;

use crate::{
    cases::*,
    harness::{Case, Expect},
    packet::{
        ACK, CODE_PORT_UNREACH, FIN, ICMP_DEST_UNREACH, PSH, RST, SCTP, SYN, TCP, UDP, icmp, ip,
    },
};

pub fn cases() -> Vec<Case> {
    let mut all = tcp_rst();
    all.extend(icmp_port_unreachable());
    all.extend(policy_drop());
    all
}

/// RFC 9293 3.10.7.1: a segment with ACK gets `<SEQ=SEG.ACK><CTL=RST>`; one without gets
/// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`, where SYN and FIN each count one.
fn tcp_rst() -> Vec<Case> {
    let syn = ip((CLIENT, 40000), (VIP_A, 80), TCP);
    let bounced = |input: &crate::packet::Ip, want: crate::packet::Ip| {
        step(
            input.frame(),
            Expect::Bounced(want.frame()),
            STAT_REJECT_NO_BACKEND,
        )
    };
    vec![
        Case {
            name: "a SYN to a frontend without endpoints gets RST+ACK acknowledging the SYN",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![bounced(
                &syn,
                rst_to(40000).flags(RST | ACK).seq(0).ack(1001),
            )],
        },
        Case {
            name: "the RST's IP header is fresh: id 0, DF, TTL 64, TOS 0 whatever the SYN had",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![bounced(
                &syn.clone().id(0xbeef).ttl(3).tos(0xb8).frag(0),
                rst_to(40000).flags(RST | ACK).seq(0).ack(1001),
            )],
        },
        Case {
            name: "an ACK segment to a frontend without endpoints gets a RST with seq = its ack",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![bounced(
                &syn.clone().flags(ACK).seq(1001).ack(777_777),
                rst_to(40000).flags(RST).seq(777_777),
            )],
        },
        Case {
            name: "a data segment with ACK gets a RST with seq = its ack and without the payload",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![bounced(
                &syn.clone()
                    .flags(ACK | PSH)
                    .seq(1001)
                    .ack(5555)
                    .payload(b"GET / HTTP/1.1\r\n\r\n"),
                rst_to(40000).flags(RST).seq(5555),
            )],
        },
        Case {
            name: "a SYN with payload gets RST+ACK acknowledging the payload and the SYN",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![bounced(
                &syn.clone().payload(b"early"),
                rst_to(40000).flags(RST | ACK).seq(0).ack(1000 + 5 + 1),
            )],
        },
        Case {
            name: "a SYN with TCP options gets RST+ACK for the SYN alone (options are no payload)",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![bounced(
                &syn.clone().tcp_options(&SYN_TCP_OPTIONS),
                rst_to(40000).flags(RST | ACK).seq(0).ack(1001),
            )],
        },
        Case {
            name: "a FIN without ACK gets RST+ACK acknowledging its payload and the FIN",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![bounced(
                &syn.clone().flags(FIN).seq(4000).payload(b"bye"),
                rst_to(40000).flags(RST | ACK).seq(0).ack(4000 + 3 + 1),
            )],
        },
        Case {
            name: "a FIN+ACK gets a RST with seq = its ack",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![bounced(
                &syn.clone().flags(FIN | ACK).seq(4000).ack(9000),
                rst_to(40000).flags(RST).seq(9000),
            )],
        },
        Case {
            name: "the RST's ack wraps around 2^32",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![bounced(
                &syn.clone().seq(u32::MAX),
                rst_to(40000).flags(RST | ACK).seq(0).ack(0),
            )],
        },
        Case {
            name: "a SYN with IP options gets a RST that keeps the options",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![bounced(
                &syn.clone().options(&OPT_RA_PADDED),
                rst_to(40000)
                    .options(&OPT_RA_PADDED)
                    .flags(RST | ACK)
                    .seq(0)
                    .ack(1001),
            )],
        },
        Case {
            name: "a SYN in an ethernet-padded frame gets an unpadded RST",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![step(
                eth_padded(syn.frame()),
                Expect::Bounced(rst_to(40000).flags(RST | ACK).seq(0).ack(1001).frame()),
                STAT_REJECT_NO_BACKEND,
            )],
        },
        Case {
            name: "every SYN to a frontend without endpoints is rejected, none remembered",
            frontends: empty_svc(80, Protocol::Tcp),
            steps: vec![
                bounced(&syn, rst_to(40000).flags(RST | ACK).seq(0).ack(1001)),
                bounced(&syn, rst_to(40000).flags(RST | ACK).seq(0).ack(1001)),
            ],
        },
    ]
}

fn icmp_port_unreachable() -> Vec<Case> {
    let query = ip((CLIENT, 40001), (VIP_A, 53), UDP).payload(b"query");
    let bounced = |input: &crate::packet::Ip| {
        step(
            input.frame(),
            Expect::Bounced(port_unreachable_for(input).frame()),
            STAT_REJECT_NO_BACKEND,
        )
    };
    vec![
        Case {
            name: "udp to a frontend without endpoints gets port unreachable from the frontend",
            frontends: empty_svc(53, Protocol::Udp),
            steps: vec![bounced(&query)],
        },
        Case {
            name: "the port unreachable quotes only the IP header and 8 bytes of a long datagram",
            frontends: empty_svc(53, Protocol::Udp),
            steps: vec![bounced(&query.clone().payload(&[0x5a; 200]))],
        },
        Case {
            name: "udp without checksum gets a port unreachable quoting checksum 0",
            frontends: empty_svc(53, Protocol::Udp),
            steps: vec![bounced(&query.clone().no_udp_csum())],
        },
        Case {
            name: "the port unreachable's outer header is fresh, the quote keeps the original",
            frontends: empty_svc(53, Protocol::Udp),
            steps: vec![bounced(&query.clone().id(0xbeef).ttl(3).tos(0xb8))],
        },
        Case {
            name: "sctp to a frontend without endpoints gets ICMP port unreachable",
            frontends: empty_svc(3868, Protocol::Sctp),
            steps: vec![bounced(
                &ip((CLIENT, 40000), (VIP_A, 3868), SCTP).payload(&[0; 16]),
            )],
        },
        Case {
            name: "udp with IP options gets a port unreachable quoting the header with its options",
            frontends: empty_svc(53, Protocol::Udp),
            steps: vec![bounced(&query.clone().options(&OPT_RA_PADDED))],
        },
        Case {
            name: "a udp first fragment is rejected and its later fragment passes untouched",
            frontends: empty_svc(53, Protocol::Udp),
            steps: {
                let dgram = query.clone().id(0x7171).payload(&[0x11; 40]);
                let (f1, f2) = dgram.fragments(24);
                // The quote is of the fragment as received: MF set, its own total length, and
                // the UDP header as sent (length and checksum of the whole datagram).
                let want = icmp(VIP_A, CLIENT, ICMP_DEST_UNREACH, CODE_PORT_UNREACH)
                    .reply_macs()
                    .id(0)
                    .payload(&f1[14..14 + 20 + 8]);
                vec![
                    step(f1, Expect::Bounced(want.frame()), STAT_REJECT_NO_BACKEND),
                    untouched(f2, STAT_PASS_FRAGMENT),
                ]
            },
        },
    ]
}

fn policy_drop() -> Vec<Case> {
    vec![
        Case {
            name: "tcp to a frontend whose endpoints are none usable here is dropped, not rejected",
            frontends: vec![empty_svc(80, Protocol::Tcp).remove(0).drop_when_empty()],
            steps: vec![step(
                ip((CLIENT, 40000), (VIP_A, 80), TCP).flags(SYN).frame(),
                Expect::Dropped,
                STAT_DROP_POLICY,
            )],
        },
        Case {
            name: "udp to a frontend whose endpoints are none usable here is dropped, not rejected",
            frontends: vec![empty_svc(53, Protocol::Udp).remove(0).drop_when_empty()],
            steps: vec![step(
                ip((CLIENT, 40001), (VIP_A, 53), UDP).payload(b"q").frame(),
                Expect::Dropped,
                STAT_DROP_POLICY,
            )],
        },
    ]
}
