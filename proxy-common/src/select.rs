//! How a new flow's backend is picked, as pure functions: the datapath (`proxy-ebpf`'s `lb`)
//! runs them on every new flow, and `svcproxy explain` runs the very same code to say which
//! backend a flow would get, so the two cannot drift apart.

/// The flow's 5-tuple hashed for Maglev: murmur3's finaliser per word. Addresses and ports are
/// as loaded from the packet (network order), exactly the values the datapath holds.
#[inline(always)]
pub const fn maglev_flow_hash(
    saddr_be: u32,
    daddr_be: u32,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let mut h = mix(saddr_be ^ 0x9e37_79b9);
    h = mix(h ^ daddr_be);
    h = mix(h ^ ((sport_be as u32) << 16 | dport_be as u32));
    mix(h ^ proto as u32)
}

#[inline(always)]
const fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The Maglev table index (0-based) of a flow hash, for a table of `table_size` entries.
#[inline(always)]
pub const fn maglev_index(hash: u32, table_size: u32) -> u32 {
    // `max(1)`: a zero size (never set by the loader, which insists on a prime) must not trap.
    hash % if table_size == 0 { 1 } else { table_size }
}

/// The slot (1-based) a random number picks among `backend_count` (> 0) slots. Modulo of a
/// 32-bit random number: uniform enough for counts far below 2^32.
#[inline(always)]
pub const fn random_slot(random: u32, backend_count: u16) -> u32 {
    random % backend_count as u32 + 1
}

/// Whether a client's session-affinity entry, last refreshed at `last_seen_ns`, still holds at
/// `now_ns` (both `bpf_ktime_get_ns`, i.e. `CLOCK_MONOTONIC`).
#[inline(always)]
pub const fn affinity_fresh(now_ns: u64, last_seen_ns: u64, timeout_s: u32) -> bool {
    now_ns.wrapping_sub(last_seen_ns) <= timeout_s as u64 * 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values: a change here changes which backend every Maglev flow lands on, on every
    /// node at once, and must be deliberate.
    #[test]
    fn maglev_flow_hash_is_stable() {
        let h = maglev_flow_hash(
            u32::from_ne_bytes([10, 244, 0, 2]),
            u32::from_ne_bytes([10, 96, 0, 10]),
            40000u16.to_be(),
            80u16.to_be(),
            6,
        );
        // Computed independently (Python, from the murmur3 finaliser's definition).
        assert_eq!(h, 0xbc93_b70e);
        assert_eq!(maglev_index(h, 16_381), 3684);
        assert_eq!(maglev_index(h, 0), 0);
    }

    #[test]
    fn random_slots_run_from_one_to_the_count() {
        assert_eq!(random_slot(0, 3), 1);
        assert_eq!(random_slot(2, 3), 3);
        assert_eq!(random_slot(u32::MAX, 1), 1);
    }

    #[test]
    fn affinity_holds_up_to_its_timeout() {
        let s = 1_000_000_000u64;
        assert!(affinity_fresh(10 * s, 0, 10));
        assert!(!affinity_fresh(10 * s + 1, 0, 10));
    }
}
