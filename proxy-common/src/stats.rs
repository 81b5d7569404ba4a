//! Per-CPU counters: one per datapath outcome (every packet the programs see is counted exactly
//! once), and per-Service packet, byte and new-flow counters.

use bytemuck::{Pod, Zeroable};

/// `PerCpuArray<u64>` indexed by the `STAT_*` constants.
pub const STATS: &str = "STATS";
/// `PerCpuArray<SvcStats>` indexed by service id (ids are allocated below the frontend limit).
pub const SVC_STATS: &str = "SVC_STATS";

/// Not IPv4 (ARP, IPv6, VLAN, ...): passed untouched.
pub const STAT_PASS_NOT_IPV4: u32 = 0;
/// IPv4 to an address/port that is no frontend and no reply: passed untouched.
pub const STAT_PASS_NO_SERVICE: u32 = 1;
/// Fragment of a datagram we know nothing of (its first fragment was not seen): passed.
pub const STAT_PASS_FRAGMENT: u32 = 2;
/// A new flow was given a backend and translated.
pub const STAT_FWD_NEW: u32 = 3;
/// A packet of a known flow was translated.
pub const STAT_FWD_ESTABLISHED: u32 = 4;
/// A reply was reverse-translated.
pub const STAT_REPLY: u32 = 5;
/// Frontend without endpoints: rejected (TCP RST / ICMP port unreachable sent back).
pub const STAT_REJECT_NO_BACKEND: u32 = 6;
/// Header too short or inconsistent: passed to the kernel, which drops what it must.
pub const STAT_MALFORMED: u32 = 7;
/// A slot pointed at a missing backend (controller bug or a write in flight).
pub const STAT_BAD_SLOT: u32 = 8;
/// Rewriting the packet failed (helper error): dropped, never forwarded half-translated.
pub const STAT_REWRITE_FAILED: u32 = 9;
/// Conntrack insert failed.
pub const STAT_CT_INSERT_FAILED: u32 = 10;
/// Endpoints exist but none is usable for traffic arriving here: dropped.
pub const STAT_DROP_POLICY: u32 = 11;
/// An ICMP error about a translated flow was reverse-translated (outer and inner headers).
pub const STAT_ICMP_ERROR_REPLY: u32 = 12;
/// A non-first fragment followed its first fragment's translation.
pub const STAT_FRAGMENT_TRANSLATED: u32 = 13;
/// Building the reject reply failed: dropped instead.
pub const STAT_REJECT_FAILED: u32 = 14;

pub const STAT_COUNT: u32 = 15;

/// Names for metrics and inspection, indexed like the constants.
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "pass_not_ipv4",
    "pass_no_service",
    "pass_fragment",
    "fwd_new",
    "fwd_established",
    "reply",
    "reject_no_backend",
    "malformed",
    "bad_slot",
    "rewrite_failed",
    "ct_insert_failed",
    "drop_policy",
    "icmp_error_reply",
    "fragment_translated",
    "reject_failed",
];

/// Value of [`SVC_STATS`]: traffic to one frontend (forward direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

const _: () = assert!(size_of::<SvcStats>() == 24);

crate::impl_user_pod!(SvcStats);
