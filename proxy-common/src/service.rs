//! Frontends (a Service address, port and protocol) and their backend slots.
//!
//! Cilium's `lb4_services` split: the frontend entry holds the backend count and the service id;
//! slot `n` (1..=count) of that id names a backend id. The controller writes backends, then
//! slots, then the frontend, so a packet never sees a count larger than the slots written.

use bytemuck::{Pod, Zeroable};

/// `HashMap<Frontend4Key, Service4>`: every ClusterIP/port/protocol the datapath translates.
pub const FRONTENDS4: &str = "FRONTENDS4";
/// `HashMap<SlotKey, Slot>`: backend id for each slot of each service.
pub const SLOTS: &str = "SLOTS";
/// `HashMap<SlotKey, Slot>`: Maglev lookup table entries of services using Maglev, keyed by
/// (service id, table index).
pub const MAGLEV4: &str = "MAGLEV4";
/// Global variable in the object: the Maglev table size (a prime), set at load time.
pub const MAGLEV_TABLE_SIZE_GLOBAL: &str = "MAGLEV_TABLE_SIZE";
/// Cilium's default: large enough that 100 backends get within ~1% of an equal share.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;
pub const DEFAULT_MAGLEV_ENTRIES: u32 = 1 << 20;

/// New flows pick the backend of their client's affinity entry while it is fresh
/// (`sessionAffinity: ClientIP`).
pub const SVC_F_AFFINITY: u16 = 1;
/// New flows pick their backend from the Maglev table (consistent hashing) instead of at random.
pub const SVC_F_MAGLEV: u16 = 2;
/// With no usable backend, drop instead of reject: endpoints exist, just none usable for
/// traffic arriving here (e.g. `internalTrafficPolicy: Local` and none on this node).
pub const SVC_F_POLICY_DROP: u16 = 4;

/// `Array<u64>` bitmap of [`FRONTEND_FILTER_SIZE`] bits: bit
/// `filter_slot(addr, port, FRONTEND_FILTER_SIZE)` is set while some frontend has that address
/// and port. A clear bit proves a packet is to no frontend without a hash lookup; a set one lets
/// the datapath try the packet's flow before its frontend.
pub const FRONTEND_FILTER: &str = "FRONTEND_FILTER";
/// 2M bits = 256 KiB: 65k frontends set ~3% of them.
pub const FRONTEND_FILTER_SIZE: u32 = 1 << 21;
pub const FRONTEND_FILTER_WORDS: u32 = FRONTEND_FILTER_SIZE / 64;
/// `Array<u32>` indexed by service id: the revision of the frontend holding that id (the same
/// value as its `Service4::revision`), 0 when none does. Lets an established flow check that
/// its entry is still current with an array read instead of a frontend lookup.
pub const SVC_REVISIONS: &str = "SVC_REVISIONS";

/// Default sizes: 64k Services with a few ports each, 256k backends.
pub const DEFAULT_FRONTENDS: u32 = 65_536;
pub const DEFAULT_SLOTS: u32 = 262_144;

/// Key of [`FRONTENDS4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Frontend4Key {
    pub addr_be: u32,
    pub port_be: u16,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub proto: u8,
    /// Reserved for traffic scope (internal/external, for externalTrafficPolicy); 0 today.
    pub scope: u8,
}

/// Value of [`FRONTENDS4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Service4 {
    /// Service id: names the slots of this frontend and is stored in conntrack entries.
    pub svc_id: u32,
    /// Number of slots 1..=backend_count holding usable backends.
    pub backend_count: u16,
    /// `SVC_F_*` bits.
    pub flags: u16,
    /// Bumped by the controller whenever this frontend's backend set changes, so established
    /// flows re-validate their backend once instead of on every packet.
    pub revision: u32,
    /// Session affinity timeout in seconds (with `SVC_F_AFFINITY`).
    pub affinity_timeout_s: u32,
}

/// Key of [`SLOTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SlotKey {
    pub svc_id: u32,
    /// 1-based slot number.
    pub slot: u32,
}

/// Value of [`SLOTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Slot {
    pub backend_id: u32,
}

const _: () = assert!(size_of::<Frontend4Key>() == 8);
const _: () = assert!(size_of::<Service4>() == 16);
const _: () = assert!(size_of::<SlotKey>() == 8);
const _: () = assert!(size_of::<Slot>() == 4);

crate::impl_user_pod!(Frontend4Key, Service4, SlotKey, Slot);
