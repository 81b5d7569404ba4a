//! Per-CPU counters, one per datapath outcome: every packet the programs see is counted once.

/// `PerCpuArray<u64>` indexed by the `STAT_*` constants.
pub const STATS: &str = "STATS";

/// Not IPv4 (ARP, IPv6, VLAN, ...): passed untouched.
pub const STAT_PASS_NOT_IPV4: u32 = 0;
/// IPv4 to an address/port that is no frontend and no reply: passed untouched.
pub const STAT_PASS_NO_SERVICE: u32 = 1;
/// Non-first IPv4 fragment: no L4 header to match, passed to the kernel.
pub const STAT_PASS_FRAGMENT: u32 = 2;
/// A new flow was given a backend and translated.
pub const STAT_FWD_NEW: u32 = 3;
/// A packet of a known flow was translated.
pub const STAT_FWD_ESTABLISHED: u32 = 4;
/// A reply was reverse-translated.
pub const STAT_REPLY: u32 = 5;
/// Frontend has no usable backend: passed untouched (v0; reject comes with the datapath work).
pub const STAT_NO_BACKEND: u32 = 6;
/// Header too short or inconsistent: passed to the kernel, which drops what it must.
pub const STAT_MALFORMED: u32 = 7;
/// A slot pointed at a missing backend (controller bug or a write in flight).
pub const STAT_BAD_SLOT: u32 = 8;
/// Rewriting the packet failed (helper error).
pub const STAT_REWRITE_FAILED: u32 = 9;
/// Conntrack insert failed.
pub const STAT_CT_INSERT_FAILED: u32 = 10;

pub const STAT_COUNT: u32 = 11;

/// Names for metrics and inspection, indexed like the constants.
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "pass_not_ipv4",
    "pass_no_service",
    "pass_fragment",
    "fwd_new",
    "fwd_established",
    "reply",
    "no_backend",
    "malformed",
    "bad_slot",
    "rewrite_failed",
    "ct_insert_failed",
];
