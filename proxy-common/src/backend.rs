//! Backends by id, and the reply filter that lets the datapath skip the reverse conntrack lookup
//! for packets that cannot be replies from a backend.

use bytemuck::{Pod, Zeroable};

/// `HashMap<u32, Backend4>`: backend id -> address. Ids are allocated by the controller per
/// (service id, address, port) and stay stable while the backend exists, so live flows keep
/// their backend when others come and go.
pub const BACKENDS4: &str = "BACKENDS4";
/// `Array<u32>` of [`REPLY_FILTER_SIZE`] counters: how many backends hash to each slot.
pub const REPLY_FILTER: &str = "REPLY_FILTER";

pub const DEFAULT_BACKENDS: u32 = 262_144;
/// Power of two; 64k u32 counters = 256 KiB.
pub const REPLY_FILTER_SIZE: u32 = 65_536;

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

/// Slot of [`REPLY_FILTER`] for a backend address and port (network order, as in the packet).
///
/// A cheap multiplicative hash: the filter only has to be the same on both sides and spread pod
/// addresses; collisions merely cost one extra conntrack lookup.
#[inline(always)]
pub const fn reply_filter_slot(addr_be: u32, port_be: u16) -> u32 {
    let h = (addr_be ^ ((port_be as u32) << 16 | port_be as u32)).wrapping_mul(0x9E37_79B1);
    h >> (32 - REPLY_FILTER_SIZE.trailing_zeros())
}
