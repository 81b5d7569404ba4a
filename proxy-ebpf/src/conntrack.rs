//! Flow table: finding a flow's entry, deciding whether it is still alive, and recording new
//! flows. Timeouts are enforced on lookup (an expired entry counts as absent), so no garbage
//! collector has to run for correctness; the LRU evicts the rest.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use proxy_common::conntrack::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, CT_F_SYN_ONLY, CT_REFRESH_NS, CtEntry4, CtKey4,
    ct_is_live,
};

use crate::{
    maps::CT4,
    parse::{Flow4, PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST},
};

/// CLOCK_MONOTONIC at tick resolution: timeouts are seconds and refreshes once a second, and
/// the coarse clock costs half of the precise one (no clocksource read; ~15 vs ~31 ns here).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn forward_key(flow: &Flow4) -> CtKey4 {
    forward_key_of(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
}

#[inline(always)]
pub fn reply_key(flow: &Flow4) -> CtKey4 {
    reply_key_of(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
}

/// The forward key of a packet from `saddr:sport` to `daddr:dport`.
#[inline(always)]
pub fn forward_key_of(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> CtKey4 {
    CtKey4 {
        saddr_be: saddr,
        daddr_be: daddr,
        sport_be: sport,
        dport_be: dport,
        proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    }
}

/// The reply key of a packet from `saddr:sport` to `daddr:dport`.
#[inline(always)]
pub fn reply_key_of(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> CtKey4 {
    CtKey4 {
        dir: CT_DIR_REPLY,
        ..forward_key_of(saddr, daddr, sport, dport, proto)
    }
}

/// Whether `entry` may carry this packet (see [`ct_is_live`]).
#[inline(always)]
pub fn is_live(entry: &CtEntry4, flow: &Flow4, now: u64) -> bool {
    ct_is_live(
        entry.last_seen_ns,
        entry.flags,
        flow.proto,
        flow.tcp_flags,
        now,
    )
}

/// Notes TCP state changes and refreshes the idle clock, writing the entry only when something
/// changed or a second has passed, so established traffic mostly reads.
#[inline(always)]
pub fn touch(entry: *mut CtEntry4, flow: &Flow4, now: u64) {
    // SAFETY: `entry` comes from a successful map lookup; concurrent writers on other CPUs can
    // at worst lose a refresh, which only shortens an idle timeout by a second.
    let e = unsafe { &mut *entry };
    let mut flags = e.flags;
    if flow.proto == PROTO_TCP {
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            flags |= CT_F_CLOSING;
        }
        if flow.tcp_flags & TCP_ACK != 0 {
            flags &= !CT_F_SYN_ONLY;
        }
    }
    if flags != e.flags || now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_NS {
        e.flags = flags;
        e.last_seen_ns = now;
    }
}

/// Initial flags of a new flow's entries.
#[inline(always)]
pub fn initial_flags(flow: &Flow4) -> u16 {
    if flow.proto == PROTO_TCP && flow.tcp_flags & TCP_ACK == 0 {
        CT_F_SYN_ONLY
    } else {
        0
    }
}

#[inline(always)]
pub fn insert(key: &CtKey4, entry: &CtEntry4) -> Result<(), i32> {
    CT4.insert(key, entry, 0)
}
