//! Internet checksum arithmetic (RFC 1071 / RFC 1624), shared so the host tests check the very
//! code the datapath runs.
//!
//! Values are taken exactly as they sit in memory (read with native loads from the packet): the
//! one's-complement sum is independent of byte order as long as every operand has the same one,
//! so no swapping is needed on the per-packet path.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eq. 3: the checksum after one 16-bit word of the covered data changed.
#[inline(always)]
pub const fn replace_u16(csum: u16, old: u16, new: u16) -> u16 {
    !fold((!csum) as u32 + (!old) as u32 + new as u32)
}

/// The checksum after one 32-bit word (an IPv4 address) of the covered data changed.
#[inline(always)]
pub const fn replace_u32(csum: u16, old: u32, new: u32) -> u16 {
    let sum = (!csum) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new as u16) as u32
        + ((new >> 16) as u16) as u32;
    !fold(sum)
}

/// UDP's rule: a zero checksum means "none" and must stay zero; a computed zero is sent as
/// 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_fixup(updated: u16) -> u16 {
    if updated == 0 { 0xffff } else { updated }
}

/// One's-complement sum of `data` as big-endian 16-bit words (odd tail padded with zero), added
/// to `initial`. Host-side and for small fixed buffers (ICMP replies); not for per-packet loops.
pub fn sum_be(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// Full IPv4 header checksum (the checksum field itself must be zero in `hdr`), big-endian.
pub fn ipv4_header(hdr: &[u8]) -> u16 {
    !fold(sum_be(hdr, 0))
}

/// Full TCP/UDP checksum over the IPv4 pseudo header and `segment` (checksum field zeroed),
/// big-endian. The caller applies [`udp_fixup`] for UDP.
pub fn l4_ipv4(saddr: [u8; 4], daddr: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&saddr);
    pseudo[4..8].copy_from_slice(&daddr);
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&(segment.len() as u16).to_be_bytes());
    !fold(sum_be(segment, sum_be(&pseudo, 0)))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// A pseudo-random byte stream, so the property is checked over many shapes.
    fn bytes(seed: u32, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn native_u16(b: &[u8]) -> u16 {
        u16::from_ne_bytes([b[0], b[1]])
    }

    fn native_u32(b: &[u8]) -> u32 {
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn ipv4_header_checksum_matches_rfc1071_example() {
        // A well-known header (Wikipedia's IPv4 checksum example): checksum 0xb861.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header(&hdr), 0xb861);
    }

    #[test]
    fn incremental_address_rewrite_equals_full_recompute() {
        for seed in 1..500u32 {
            let mut hdr = bytes(seed, 20);
            hdr[10] = 0;
            hdr[11] = 0;
            let csum = ipv4_header(&hdr).to_be_bytes();
            hdr[10..12].copy_from_slice(&csum);

            let new_addr = bytes(seed + 7919, 4);
            let old = native_u32(&hdr[16..20]);
            let new = native_u32(&new_addr);
            let updated = replace_u32(native_u16(&hdr[10..12]), old, new);
            hdr[16..20].copy_from_slice(&new_addr);
            hdr[10..12].copy_from_slice(&updated.to_ne_bytes());

            let mut zeroed = hdr.clone();
            zeroed[10] = 0;
            zeroed[11] = 0;
            let full = ipv4_header(&zeroed);
            // 0x0000 and 0xffff are the same one's-complement value; RFC 1624 may yield either.
            let got = u16::from_be_bytes([hdr[10], hdr[11]]);
            assert!(
                got == full || (got == 0xffff && full == 0) || (got == 0 && full == 0xffff),
                "seed {seed}: incremental {got:#06x} != full {full:#06x}"
            );
        }
    }

    #[test]
    fn incremental_l4_rewrite_of_address_and_port_equals_full_recompute() {
        for seed in 1..500u32 {
            let len = 20 + (seed as usize % 37);
            let saddr = [10, 0, 0, seed as u8];
            let daddr = [10, 96, (seed >> 8) as u8, 1];
            let mut seg = bytes(seed, len);
            seg[16] = 0;
            seg[17] = 0;
            let csum = l4_ipv4(saddr, daddr, 6, &seg);
            seg[16..18].copy_from_slice(&csum.to_be_bytes());

            let new_daddr = [10, 244, 1, (seed * 3) as u8];
            let new_port = (seed as u16).wrapping_mul(31).to_be_bytes();
            let mut c = native_u16(&seg[16..18]);
            c = replace_u32(c, u32::from_ne_bytes(daddr), u32::from_ne_bytes(new_daddr));
            c = replace_u16(c, native_u16(&seg[2..4]), u16::from_ne_bytes(new_port));
            seg[2..4].copy_from_slice(&new_port);
            seg[16..18].copy_from_slice(&c.to_ne_bytes());

            let mut zeroed = seg.clone();
            zeroed[16] = 0;
            zeroed[17] = 0;
            let full = l4_ipv4(saddr, new_daddr, 6, &zeroed);
            let got = u16::from_be_bytes([seg[16], seg[17]]);
            assert!(
                got == full || (got == 0xffff && full == 0) || (got == 0 && full == 0xffff),
                "seed {seed}: incremental {got:#06x} != full {full:#06x}"
            );
        }
    }

    #[test]
    fn udp_zero_checksum_is_sent_as_all_ones() {
        assert_eq!(udp_fixup(0), 0xffff);
        assert_eq!(udp_fixup(0x1234), 0x1234);
    }
}
