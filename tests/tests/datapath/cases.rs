//! The fixture table: every case runs on both hooks, each on fresh map contents. The cases
//! live in `cases_*.rs` by theme; this file holds the addresses they share and the runners.

use std::{collections::HashSet, net::Ipv4Addr};

use svcproxy::{desired::Protocol, loader::Hook};

use crate::{
    harness::{Case, Expect, Step, Svc, be, fe, run_cases, svc},
    packet::{CODE_PORT_UNREACH, DF, ICMP_DEST_UNREACH, Ip, TCP, icmp, ip},
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
pub const VIP: [u8; 4] = [10, 96, 0, 10];
pub const VIP_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A second Service address.
pub const VIP2: [u8; 4] = [10, 96, 0, 20];
pub const VIP2_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const B1: [u8; 4] = [10, 244, 1, 11];
pub const B2: [u8; 4] = [10, 244, 1, 12];
pub const B3: [u8; 4] = [10, 244, 1, 13];
/// A router between client and backend (sends ICMP errors about packets in transit).
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// A pod that is no backend of anything.
pub const OTHER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);

/// An IPv4 Router Alert option (RFC 2113): 4 bytes, so it needs no padding.
pub const OPT_RA: [u8; 4] = [0x94, 0x04, 0x00, 0x00];
/// Router Alert followed by NOP, NOP, NOP, End of options: an 8-byte options area.
pub const OPT_RA_PADDED: [u8; 8] = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];

/// The options of a Linux SYN: MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
pub const SYN_TCP_OPTIONS: [u8; 20] = [
    0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x03, 0x03, 0x07,
];

pub fn a(x: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(x)
}

pub fn step(input: Vec<u8>, expect: Expect, stat: u32) -> Step {
    Step {
        input,
        expect,
        stat,
        only_on: None,
    }
}

/// `input` must come out as `output`, counted as `stat`.
pub fn rewrites(input: &Ip, output: &Ip, stat: u32) -> Step {
    step(input.frame(), Expect::Rewritten(output.frame()), stat)
}

pub fn untouched(input: Vec<u8>, stat: u32) -> Step {
    step(input, Expect::Untouched, stat)
}

/// TCP ClusterIP VIP:80 -> B1:8080.
pub fn tcp_svc() -> Vec<Svc> {
    vec![svc(fe(VIP, 80, Protocol::Tcp), vec![be(B1, 8080)])]
}

/// UDP ClusterIP VIP:53 -> B1:5353.
pub fn udp_svc() -> Vec<Svc> {
    vec![svc(fe(VIP, 53, Protocol::Udp), vec![be(B1, 5353)])]
}

/// SCTP ClusterIP VIP:3868 -> B1:3868 (SCTP never gets a port rewrite: its CRC covers ports).
pub fn sctp_svc() -> Vec<Svc> {
    vec![svc(fe(VIP, 3868, Protocol::Sctp), vec![be(B1, 3868)])]
}

/// A frontend with no endpoints at all, for `protocol` on `port`.
pub fn empty_svc(port: u16, protocol: Protocol) -> Vec<Svc> {
    vec![svc(fe(VIP, port, protocol), vec![])]
}

/// The TCP RST the frontend VIP:80 sends back to CLIENT:`cport`, with the fixed header fields
/// of a reject: IP id 0, DF, TTL 64, TOS 0, no payload, window 0. Flags, seq and ack are the
/// caller's.
pub fn rst_to(cport: u16) -> Ip {
    ip((VIP_A, 80), (CLIENT, cport), TCP)
        .reply_macs()
        .id(0)
        .frag(DF)
        .ttl(64)
        .tos(0)
        .window(0)
}

/// The ICMP port unreachable the frontend (the offending packet's destination) sends back to
/// its source, quoting its IPv4 header (options included) and 8 bytes of its payload.
pub fn port_unreachable_for(offending: &Ip) -> Ip {
    icmp(
        offending.dst,
        offending.src,
        ICMP_DEST_UNREACH,
        CODE_PORT_UNREACH,
    )
    .reply_macs()
    .id(0)
    .frag(DF)
    .ttl(64)
    .tos(0)
    .payload(&offending.quote(8))
}

/// What a reverse-translated ICMP error quotes: the packet as the client sent it
/// (`original`: inner addresses, ports and inner IPv4 header checksum), while everything after
/// the ports is left as the backend saw it (`translated`), including an inner UDP checksum,
/// which receivers do not check in a quote.
pub fn quote_as_sent(original: &Ip, translated: &Ip, l4_bytes: usize) -> Vec<u8> {
    let ihl = 20 + original.options.len();
    let mut q = original.quote(l4_bytes)[..ihl + 4].to_vec();
    q.extend_from_slice(&translated.quote(l4_bytes)[ihl + 4..]);
    q
}

/// Pads `frame` with zero bytes after the IP datagram to Ethernet's 60-byte minimum, as a NIC
/// would.
pub fn eth_padded(mut frame: Vec<u8>) -> Vec<u8> {
    frame.resize(frame.len().max(60), 0);
    frame
}

pub fn cases() -> Vec<Case> {
    let mut all = Vec::new();
    all.extend(crate::cases_translate::cases());
    all.extend(crate::cases_reject::cases());
    all.extend(crate::cases_pass::cases());
    all.extend(crate::cases_icmp::cases());
    all
}

#[test]
fn fixture_table_has_at_least_60_uniquely_named_cases() {
    let cases = cases();
    let mut names = HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name), "two cases are named {:?}", c.name);
        assert!(!c.steps.is_empty(), "case {:?} has no steps", c.name);
    }
    assert!(cases.len() >= 60, "only {} fixture cases", cases.len());
}

#[test]
fn fixtures_tc() {
    run_cases(Hook::Tc, "fixtures", &cases());
}

#[test]
fn fixtures_xdp() {
    run_cases(Hook::Xdp, "fixtures", &cases());
}
