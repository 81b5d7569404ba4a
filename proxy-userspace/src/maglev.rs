//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4): a lookup table of prime size `m` in which every
//! backend owns about `m / n` entries, filled from per-backend permutations so that a change of
//! one backend moves few entries. The datapath indexes it with a hash of the 5-tuple.
//!
//! The table depends only on the set of backends (by address and port), never on history or
//! ids, so every node computes the same table and a flow lands on the same backend wherever it
//! enters.

use std::net::Ipv4Addr;

/// FNV-1a, 64-bit: stable across builds and platforms (std's hasher is not).
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short keys; finish with a 64-bit avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The table: entry `i` holds the index (into `backends`) of the backend owning it. Empty when
/// there are no backends. `m` must be a prime larger than the number of backends.
pub fn table(backends: &[(Ipv4Addr, u16)], m: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 || m < 2 {
        return Vec::new();
    }
    let m64 = m as u64;
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|(addr, port)| {
            let mut name = addr.octets().to_vec();
            name.extend_from_slice(&port.to_be_bytes());
            let offset = fnv1a(0x5eed_0001, &name) % m64;
            let skip = fnv1a(0x5eed_0002, &name) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry = vec![u32::MAX; m as usize];
    let mut filled = 0u32;
    // Each round, every backend claims its next preferred free entry: this is what gives each
    // backend an equal share (within one entry).
    loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = ((offset + next[i] * skip) % m64) as usize;
            while entry[c] != u32::MAX {
                next[i] += 1;
                c = ((offset + next[i] * skip) % m64) as usize;
            }
            entry[c] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return entry;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u8) -> Vec<(Ipv4Addr, u16)> {
        (0..n)
            .map(|i| (Ipv4Addr::new(10, 244, 1, i + 1), 8080))
            .collect()
    }

    /// Entries whose backend (by address) differs between two tables.
    fn moved(a: &[u32], ab: &[(Ipv4Addr, u16)], b: &[u32], bb: &[(Ipv4Addr, u16)]) -> usize {
        a.iter()
            .zip(b)
            .filter(|(x, y)| ab[**x as usize] != bb[**y as usize])
            .count()
    }

    #[test]
    fn every_backend_owns_an_equal_share() {
        let bs = backends(10);
        let t = table(&bs, 16_381);
        let mut counts = [0usize; 10];
        for e in &t {
            counts[*e as usize] += 1;
        }
        // 16381 / 10 = 1638.1: each backend gets 1638 or 1639.
        assert!(
            counts.iter().all(|c| (1638..=1639).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn adding_one_backend_to_ten_moves_about_one_eleventh() {
        let ten = backends(10);
        let eleven = backends(11);
        let m = 16_381;
        let n = moved(&table(&ten, m), &ten, &table(&eleven, m), &eleven);
        // Ideal is 1/11 = 9.1%; Maglev adds a little churn on top.
        assert!(n * 100 / m as usize <= 12, "{n} of {m} entries moved");
    }

    #[test]
    fn removing_one_backend_moves_its_entries_and_few_others() {
        let ten = backends(10);
        let nine: Vec<_> = ten
            .iter()
            .copied()
            .filter(|b| b.0 != Ipv4Addr::new(10, 244, 1, 4))
            .collect();
        let m = 16_381;
        let (before, after) = (table(&ten, m), table(&nine, m));
        let owned_by_removed = before
            .iter()
            .filter(|e| ten[**e as usize] == ten[3])
            .count();
        let others_moved = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| ten[**x as usize] != ten[3] && ten[**x as usize] != nine[**y as usize])
            .count();
        assert!(owned_by_removed > 1500);
        // Maglev trades perfect stability for perfect balance: a small share of the other
        // entries moves too (the paper's figure 11).
        assert!(
            others_moved * 100 / m as usize <= 3,
            "{others_moved} other entries moved"
        );
    }

    /// The writer passes backends sorted by (address, port), so two nodes with the same
    /// EndpointSlices build identical tables.
    #[test]
    fn the_same_backends_give_the_same_table() {
        assert_eq!(table(&backends(7), 251), table(&backends(7), 251));
    }

    #[test]
    fn empty_backend_set_gives_an_empty_table() {
        assert!(table(&[], 16_381).is_empty());
    }
}
