//! Backends by id, and the reply filter that lets the datapath skip the reverse conntrack lookup
//! for packets that cannot be replies from a backend.

use bytemuck::{Pod, Zeroable};

/// `HashMap<u32, Backend4>`: backend id -> address. Ids are allocated by the controller per
/// (service id, address, port) and stay stable while the backend exists, so live flows keep
/// their backend when others come and go.
pub const BACKENDS4: &str = "BACKENDS4";
/// `Array<u64>` of [`REPLY_FILTER_WORDS`] words: a bitmap of [`REPLY_FILTER_SIZE`] bits, bit
/// [`reply_filter_slot`] set while some backend hashes to it. The controller keeps the counts
/// behind the bits; the datapath only reads bits.
pub const REPLY_FILTER: &str = "REPLY_FILTER";

pub const DEFAULT_BACKENDS: u32 = 262_144;
/// Bits (slots) of the reply filter, a power of two: 4M bits = 512 KiB. A bitmap rather than
/// counters so it can be large enough to stay sparse: 100k backends set ~2.4% of the bits,
/// 655k ~14.5% (the share of non-reply packets that still pay a conntrack lookup).
pub const REPLY_FILTER_SIZE: u32 = 1 << 22;
/// 64-bit words of the reply filter.
pub const REPLY_FILTER_WORDS: u32 = REPLY_FILTER_SIZE / 64;

/// The backend may take new flows.
pub const BACKEND_ACTIVE: u8 = 0;
/// The endpoint is terminating: existing flows continue, no new ones.
pub const BACKEND_TERMINATING: u8 = 1;

/// Value of [`BACKENDS4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend4 {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    /// `BACKEND_ACTIVE` or `BACKEND_TERMINATING`.
    pub state: u8,
    /// Service id this backend belongs to: conntrack re-validation checks it.
    pub svc_id: u32,
}

const _: () = assert!(size_of::<Backend4>() == 12);

crate::impl_user_pod!(Backend4);

/// Slot (bit) of [`REPLY_FILTER`] for a backend address and port (network order, as in the
/// packet).
#[inline(always)]
pub const fn reply_filter_slot(addr_be: u32, port_be: u16) -> u32 {
    filter_slot(addr_be, port_be, REPLY_FILTER_SIZE)
}

/// Slot of an (address, port) pair in a bitmap filter of `size` bits (a power of two).
///
/// A cheap multiplicative hash: a filter only has to be the same on both sides and spread
/// addresses; collisions merely cost the lookup the filter would have saved.
#[inline(always)]
pub const fn filter_slot(addr_be: u32, port_be: u16, size: u32) -> u32 {
    let h = (addr_be ^ ((port_be as u32) << 16 | port_be as u32)).wrapping_mul(0x9E37_79B1);
    h >> (32 - size.trailing_zeros())
}

/// The 64-bit word of a bitmap filter holding `slot`, and the slot's bit in it.
#[inline(always)]
pub const fn filter_word_bit(slot: u32) -> (u32, u64) {
    (slot / 64, 1 << (slot % 64))
}
