//! The fixture table.

use std::net::Ipv4Addr;

use proxy_common::stats::*;
use svcproxy::{desired::Protocol, loader::Hook};

use crate::{
    harness::{Case, Expect, Harness, Step, be, fe},
    packet::{ACK, FIN, SCTP, TCP, UDP, ip},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const VIP: [u8; 4] = [10, 96, 0, 10];
const VIP_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const B1: [u8; 4] = [10, 244, 1, 11];
const B2: [u8; 4] = [10, 244, 1, 12];
const B3: [u8; 4] = [10, 244, 1, 13];

fn a(x: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(x)
}

fn step(input: Vec<u8>, expect: Expect, stat: u32) -> Step {
    Step { input, expect, stat }
}

fn cases() -> Vec<Case> {
    let tcp_svc = vec![(fe(VIP, 80, Protocol::Tcp), vec![be(B1, 8080)])];
    let udp_svc = vec![(fe(VIP, 53, Protocol::Udp), vec![be(B1, 5353)])];
    let syn = ip((CLIENT, 40000), (VIP_A, 80), TCP);
    vec![
        Case {
            name: "tcp syn to a ClusterIP is DNATed to the backend and target port",
            frontends: tcp_svc.clone(),
            steps: vec![step(
                syn.frame(),
                Expect::Rewritten(syn.clone().with_dst(a(B1), 8080).frame()),
                STAT_FWD_NEW,
            )],
        },
        Case {
            name: "udp to a ClusterIP is DNATed",
            frontends: udp_svc.clone(),
            steps: vec![step(
                ip((CLIENT, 40001), (VIP_A, 53), UDP).payload(b"query").frame(),
                Expect::Rewritten(
                    ip((CLIENT, 40001), (a(B1), 5353), UDP).payload(b"query").frame(),
                ),
                STAT_FWD_NEW,
            )],
        },
        Case {
            name: "udp without checksum keeps checksum 0",
            frontends: udp_svc.clone(),
            steps: vec![step(
                ip((CLIENT, 40002), (VIP_A, 53), UDP).payload(b"q").no_udp_csum().frame(),
                Expect::Rewritten(
                    ip((CLIENT, 40002), (a(B1), 5353), UDP).payload(b"q").no_udp_csum().frame(),
                ),
                STAT_FWD_NEW,
            )],
        },
        Case {
            name: "tcp reply from the backend is reverse-translated to the ClusterIP",
            frontends: tcp_svc.clone(),
            steps: vec![
                step(
                    syn.frame(),
                    Expect::Rewritten(syn.clone().with_dst(a(B1), 8080).frame()),
                    STAT_FWD_NEW,
                ),
                step(
                    ip((a(B1), 8080), (CLIENT, 40000), TCP).flags(0x12).frame(),
                    Expect::Rewritten(ip((VIP_A, 80), (CLIENT, 40000), TCP).flags(0x12).frame()),
                    STAT_REPLY,
                ),
                step(
                    syn.clone().flags(ACK).payload(b"GET /").frame(),
                    Expect::Rewritten(
                        syn.clone().flags(ACK).payload(b"GET /").with_dst(a(B1), 8080).frame(),
                    ),
                    STAT_FWD_ESTABLISHED,
                ),
            ],
        },
        Case {
            name: "udp reply is reverse-translated",
            frontends: udp_svc.clone(),
            steps: vec![
                step(
                    ip((CLIENT, 40003), (VIP_A, 53), UDP).payload(b"q").frame(),
                    Expect::Rewritten(ip((CLIENT, 40003), (a(B1), 5353), UDP).payload(b"q").frame()),
                    STAT_FWD_NEW,
                ),
                step(
                    ip((a(B1), 5353), (CLIENT, 40003), UDP).payload(b"answer").frame(),
                    Expect::Rewritten(ip((VIP_A, 53), (CLIENT, 40003), UDP).payload(b"answer").frame()),
                    STAT_REPLY,
                ),
            ],
        },
        Case {
            name: "a packet to a non-Service address passes untouched",
            frontends: tcp_svc.clone(),
            steps: vec![step(
                ip((CLIENT, 40000), (a([10, 244, 2, 2]), 80), TCP).frame(),
                Expect::Untouched,
                STAT_PASS_NO_SERVICE,
            )],
        },
        Case {
            name: "the ClusterIP on another port passes untouched",
            frontends: tcp_svc.clone(),
            steps: vec![step(
                ip((CLIENT, 40000), (VIP_A, 81), TCP).frame(),
                Expect::Untouched,
                STAT_PASS_NO_SERVICE,
            )],
        },
        Case {
            name: "an ARP frame passes untouched",
            frontends: tcp_svc.clone(),
            steps: vec![step(
                {
                    let mut f = vec![0xff; 6];
                    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
                    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
                    f.extend_from_slice(&[0; 20]);
                    f
                },
                Expect::Untouched,
                STAT_PASS_NOT_IPV4,
            )],
        },
        Case {
            name: "IPv4 options: L4 found through IHL and rewritten",
            frontends: tcp_svc.clone(),
            steps: vec![step(
                syn.clone().options(&[1, 1, 1, 0]).frame(),
                Expect::Rewritten(syn.clone().options(&[1, 1, 1, 0]).with_dst(a(B1), 8080).frame()),
                STAT_FWD_NEW,
            )],
        },
        Case {
            name: "a truncated TCP header passes untouched and is counted malformed",
            frontends: tcp_svc.clone(),
            steps: vec![step(
                {
                    let mut f = syn.frame();
                    f.truncate(14 + 20 + 10);
                    f[16..18].copy_from_slice(&30u16.to_be_bytes());
                    f
                },
                Expect::Untouched,
                STAT_MALFORMED,
            )],
        },
        Case {
            name: "SCTP frontend: address rewritten, port and CRC untouched",
            frontends: vec![(fe(VIP, 3868, Protocol::Sctp), vec![be(B1, 3868)])],
            steps: vec![step(
                ip((CLIENT, 40000), (VIP_A, 3868), SCTP).frame(),
                Expect::Rewritten(ip((CLIENT, 40000), (a(B1), 3868), SCTP).frame()),
                STAT_FWD_NEW,
            )],
        },
        Case {
            name: "a FIN keeps the flow on its backend",
            frontends: tcp_svc,
            steps: vec![
                step(syn.frame(), Expect::Rewritten(syn.clone().with_dst(a(B1), 8080).frame()), STAT_FWD_NEW),
                step(
                    syn.clone().flags(FIN | ACK).frame(),
                    Expect::Rewritten(syn.clone().flags(FIN | ACK).with_dst(a(B1), 8080).frame()),
                    STAT_FWD_ESTABLISHED,
                ),
            ],
        },
    ]
}

fn run_all(hook: Hook) {
    let mut h = Harness::new(match hook {
        Hook::Tc => "fixtures-tc",
        Hook::Xdp => "fixtures-xdp",
    });
    for case in cases() {
        h.check(hook, &case);
    }
}

#[test]
fn fixtures_tc() {
    run_all(Hook::Tc);
}

#[test]
fn fixtures_xdp() {
    run_all(Hook::Xdp);
}

/// With three backends, every packet of one flow goes where its first packet went, and the
/// flow's two conntrack entries exist.
fn established_flow_is_sticky(hook: Hook) {
    let mut h = Harness::new(match hook {
        Hook::Tc => "sticky-tc",
        Hook::Xdp => "sticky-xdp",
    });
    h.set(&[(fe(VIP, 80, Protocol::Tcp), vec![be(B1, 8080), be(B2, 8080), be(B3, 8080)])]);
    let syn = ip((CLIENT, 42000), (VIP_A, 80), TCP);
    let (_, first) = h.run(hook, &syn.frame());
    let chosen = &first[30..34];
    assert!([B1, B2, B3].iter().any(|b| b == chosen), "first packet went to {chosen:?}");
    for _ in 0..20 {
        let (_, out) = h.run(hook, &syn.clone().flags(ACK).frame());
        assert_eq!(&out[30..34], chosen, "packet of an established flow changed backend");
    }
    assert_eq!(h.ct_len(), 2, "a flow has a forward and a reply entry");
}

#[test]
fn established_flow_is_sticky_tc() {
    established_flow_is_sticky(Hook::Tc);
}

#[test]
fn established_flow_is_sticky_xdp() {
    established_flow_is_sticky(Hook::Xdp);
}

/// New flows spread over all backends.
#[test]
fn new_flows_spread_over_backends() {
    let mut h = Harness::new("spread");
    h.set(&[(fe(VIP, 80, Protocol::Tcp), vec![be(B1, 8080), be(B2, 8080), be(B3, 8080)])]);
    let mut hits = std::collections::HashMap::new();
    for port in 0..300u16 {
        let (_, out) = h.run(Hook::Tc, &ip((CLIENT, 20000 + port), (VIP_A, 80), TCP).frame());
        *hits.entry(out[30..34].to_vec()).or_insert(0) += 1;
    }
    assert_eq!(hits.len(), 3, "all backends chosen: {hits:?}");
    assert!(hits.values().all(|n| *n >= 45), "each backend gets >= 15%: {hits:?}");
}
