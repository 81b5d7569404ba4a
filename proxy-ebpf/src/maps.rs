//! The datapath's maps. Sizes here are defaults; the controller overrides them at load time, and
//! the names (shared with `proxy-common`) are what the maps are pinned and found by.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    backend::{Backend4, REPLY_FILTER_SIZE},
    conntrack::{CtEntry4, CtKey4},
    service::{Frontend4Key, Service4, Slot, SlotKey},
    stats::STAT_COUNT,
};

/// Frontend (ClusterIP, port, protocol) -> service id and backend count.
#[btf_map]
pub static FRONTENDS4: HashMap<Frontend4Key, Service4, 65_536> = HashMap::new();

/// (service id, slot) -> backend id.
#[btf_map]
pub static SLOTS: HashMap<SlotKey, Slot, 262_144> = HashMap::new();

/// Backend id -> backend address, port and state.
#[btf_map]
pub static BACKENDS4: HashMap<u32, Backend4, 262_144> = HashMap::new();

/// Per-flow state, two entries per flow (forward and reply). LRU: a full table evicts the
/// oldest flow instead of refusing new ones.
#[btf_map]
pub static CT4: LruHashMap<CtKey4, CtEntry4, 524_288> = LruHashMap::new();

/// Counting filter over backend (address, port): lets packets that cannot be replies skip the
/// reverse conntrack lookup. Array lookups are inlined by the JIT, so this costs a few ns.
#[btf_map]
pub static REPLY_FILTER: Array<u32, { REPLY_FILTER_SIZE as usize }> = Array::new();

/// Per-CPU outcome counters, indexed by `proxy_common::stats::STAT_*`.
#[btf_map]
pub static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
