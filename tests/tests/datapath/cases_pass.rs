//! Packets that are not ours pass untouched: other addresses, ports and protocols, non-IPv4
//! frames, ICMP queries, and every malformed header shape (counted as such).

use proxy_common::stats::*;
use svcproxy::loader::Hook;

use crate::{
    cases::*,
    harness::Case,
    packet::{
        ICMP, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, SCTP, TCP, UDP, arp_frame, fix_csums, icmp, ip,
        ipv6_udp_frame, vlan_tagged,
    },
};

/// IP protocol number of GRE: IPv4 but neither TCP, UDP, SCTP nor ICMP.
const GRE: u8 = 47;

pub fn cases() -> Vec<Case> {
    let mut all = not_ours();
    all.extend(malformed());
    all
}

fn not_ours() -> Vec<Case> {
    let pass = |name, input: Vec<u8>, stat| Case {
        name,
        frontends: tcp_svc(),
        steps: vec![untouched(input, stat)],
    };
    vec![
        pass(
            "a packet to a non-Service address passes untouched",
            ip((CLIENT, 40000), (OTHER, 80), TCP).frame(),
            STAT_PASS_NO_SERVICE,
        ),
        pass(
            "the ClusterIP on another port passes untouched",
            ip((CLIENT, 40000), (VIP_A, 81), TCP).frame(),
            STAT_PASS_NO_SERVICE,
        ),
        pass(
            "udp to the port of a tcp-only ClusterIP passes untouched",
            ip((CLIENT, 40000), (VIP_A, 80), UDP).payload(b"q").frame(),
            STAT_PASS_NO_SERVICE,
        ),
        pass(
            "sctp to the port of a tcp-only ClusterIP passes untouched",
            ip((CLIENT, 40000), (VIP_A, 80), SCTP).frame(),
            STAT_PASS_NO_SERVICE,
        ),
        pass(
            "IPv4 of another protocol (GRE) to the ClusterIP passes untouched",
            ip((CLIENT, 0), (VIP_A, 0), GRE)
                .payload(&[0x08, 0x00, 0, 0])
                .frame(),
            STAT_PASS_NO_SERVICE,
        ),
        pass(
            "an ICMP echo request to the ClusterIP passes untouched",
            icmp(CLIENT, VIP_A, ICMP_ECHO_REQUEST, 0)
                .rest([0, 7, 0, 1])
                .payload(b"ping")
                .frame(),
            STAT_PASS_NO_SERVICE,
        ),
        pass(
            "an ICMP echo reply from a backend to a client passes untouched",
            icmp(a(B1), CLIENT, ICMP_ECHO_REPLY, 0)
                .rest([0, 7, 0, 1])
                .payload(b"ping")
                .frame(),
            STAT_PASS_NO_SERVICE,
        ),
        pass(
            "an ARP frame passes untouched",
            arp_frame(),
            STAT_PASS_NOT_IPV4,
        ),
        pass(
            "an IPv6 frame passes untouched",
            ipv6_udp_frame(),
            STAT_PASS_NOT_IPV4,
        ),
        pass(
            "a VLAN-tagged frame with IPv4 to the ClusterIP passes untouched",
            vlan_tagged(&ip((CLIENT, 40000), (VIP_A, 80), TCP).frame(), 100),
            STAT_PASS_NOT_IPV4,
        ),
    ]
}

/// `frame` with `edit` applied and its checksums then made consistent again, so the edit is
/// the only defect.
fn broken(frame: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = frame;
    edit(&mut f);
    fix_csums(&mut f);
    f
}

/// Sets the IPv4 total length field.
fn set_tot_len(f: &mut [u8], len: u16) {
    f[16..18].copy_from_slice(&len.to_be_bytes());
}

fn malformed() -> Vec<Case> {
    let syn = ip((CLIENT, 40000), (VIP_A, 80), TCP).frame();
    let query = ip((CLIENT, 40001), (VIP_A, 53), UDP)
        .payload(b"query")
        .frame();
    let sctp = ip((CLIENT, 40000), (VIP_A, 3868), SCTP).frame();
    // Offsets in a frame without IP options.
    const L4: usize = 14 + 20;
    let bad = |name, input: Vec<u8>| Case {
        name,
        frontends: {
            let mut f = tcp_svc();
            f.extend(udp_svc());
            f.extend(sctp_svc());
            f
        },
        steps: vec![untouched(input, STAT_MALFORMED)],
    };
    let xdp_only = |mut case: Case, why| {
        case.steps[0].only_on = Some((Hook::Xdp, why));
        case
    };
    vec![
        xdp_only(
            bad(
                "an IPv4 frame too short for a 20-byte IPv4 header passes untouched as malformed",
                syn[..14 + 19].to_vec(),
            ),
            "tc: BPF_PROG_TEST_RUN (Linux 6.18) refuses an IPv4 frame shorter than an IPv4 \
             header with EINVAL",
        ),
        bad(
            "an IPv4 frame whose header says version 6 passes untouched as malformed",
            broken(syn.clone(), |f| f[14] = 0x65),
        ),
        bad(
            "an IPv4 header with IHL below 5 passes untouched as malformed",
            broken(syn.clone(), |f| f[14] = 0x44),
        ),
        bad(
            "an IPv4 header whose IHL reaches past the frame passes untouched as malformed",
            broken(syn.clone(), |f| {
                f[14] = 0x4f;
                set_tot_len(f, 60);
            }),
        ),
        bad(
            "an IPv4 total length below the header length passes untouched as malformed",
            broken(syn.clone(), |f| set_tot_len(f, 16)),
        ),
        bad(
            "an IPv4 total length past the frame passes untouched as malformed",
            broken(syn.clone(), |f| set_tot_len(f, 1000)),
        ),
        bad(
            "a truncated TCP header passes untouched as malformed",
            broken(syn.clone(), |f| {
                f.truncate(L4 + 10);
                set_tot_len(f, 30);
            }),
        ),
        bad(
            "a truncated UDP header passes untouched as malformed",
            broken(query.clone(), |f| {
                f.truncate(L4 + 4);
                set_tot_len(f, 24);
            }),
        ),
        bad(
            "a truncated SCTP common header passes untouched as malformed",
            broken(sctp.clone(), |f| {
                f.truncate(L4 + 8);
                set_tot_len(f, 28);
            }),
        ),
        bad(
            "a TCP data offset below 5 passes untouched as malformed",
            broken(syn.clone(), |f| f[L4 + 12] = 4 << 4),
        ),
        bad(
            "a TCP data offset past the IPv4 total length passes untouched as malformed",
            broken(syn.clone(), |f| f[L4 + 12] = 15 << 4),
        ),
        bad(
            "a UDP length below 8 passes untouched as malformed",
            broken(query.clone(), |f| {
                f[L4 + 4..L4 + 6].copy_from_slice(&7u16.to_be_bytes())
            }),
        ),
        bad(
            "an ICMP message shorter than its 8-byte header passes untouched as malformed",
            broken(icmp(CLIENT, VIP_A, ICMP_ECHO_REQUEST, 0).frame(), |f| {
                assert_eq!(f[23], ICMP);
                f.truncate(L4 + 4);
                set_tot_len(f, 24);
            }),
        ),
    ]
}
