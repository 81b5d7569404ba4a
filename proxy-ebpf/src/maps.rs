//! The datapath's maps. Sizes here are defaults; the controller overrides them at load time, and
//! the names (shared with `proxy-common`) are what the maps are pinned and found by.
//!
//! Maps only the controller writes are not preallocated, so their memory follows what is in
//! them rather than their maximum; maps the datapath inserts into are (LRU needs it, and no
//! allocation happens per packet).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    backend::{Backend4, REPLY_FILTER_WORDS},
    conntrack::{AffinityEntry, AffinityKey4, CtEntry4, CtKey4, FragKey4, FragPorts},
    meta::ServiceMeta,
    service::{FRONTEND_FILTER_WORDS, Frontend4Key, Service4, Slot, SlotKey},
    stats::{STAT_COUNT, SvcStats},
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

/// Frontend (ClusterIP, port, protocol) -> service id and backend count.
#[btf_map]
pub static FRONTENDS4: HashMap<Frontend4Key, Service4, 65_536, NO_PREALLOC> = HashMap::new();

/// (service id, slot) -> backend id.
#[btf_map]
pub static SLOTS: HashMap<SlotKey, Slot, 262_144, NO_PREALLOC> = HashMap::new();

/// (service id, Maglev table index) -> backend id, for services using Maglev.
#[btf_map]
pub static MAGLEV4: HashMap<SlotKey, Slot, 1_048_576, NO_PREALLOC> = HashMap::new();

/// (service id, client address) -> backend last given, for `sessionAffinity: ClientIP`.
#[btf_map]
pub static AFFINITY4: LruHashMap<AffinityKey4, AffinityEntry, 65_536> = LruHashMap::new();

/// Ports of fragmented datagrams, learnt from their first fragment.
#[btf_map]
pub static FRAG4: LruHashMap<FragKey4, FragPorts, 8_192> = LruHashMap::new();

/// Backend id -> backend address, port and state.
#[btf_map]
pub static BACKENDS4: HashMap<u32, Backend4, 262_144, NO_PREALLOC> = HashMap::new();

/// Per-flow state, two entries per flow (forward and reply). LRU: a full table evicts the
/// oldest flow instead of refusing new ones.
#[btf_map]
pub static CT4: LruHashMap<CtKey4, CtEntry4, 524_288> = LruHashMap::new();

/// Bitmap filter over backend (address, port): lets packets that cannot be replies skip the
/// reverse conntrack lookup. Array lookups are inlined by the JIT, so this costs a few ns.
#[btf_map]
pub static REPLY_FILTER: Array<u64, { REPLY_FILTER_WORDS as usize }> = Array::new();

/// Bitmap filter over frontend (address, port): packets to no frontend skip every hash lookup,
/// and packets that may be to one try their flow first (see `lb::process`).
#[btf_map]
pub static FRONTEND_FILTER: Array<u64, { FRONTEND_FILTER_WORDS as usize }> = Array::new();

/// Service id -> revision of the frontend holding it (0: none), mirrored from `FRONTENDS4`.
#[btf_map]
pub static SVC_REVISIONS: Array<u32, 65_536> = Array::new();

/// Per-CPU outcome counters, indexed by `proxy_common::stats::STAT_*`.
#[btf_map]
pub static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

/// Per-service traffic counters, indexed by service id.
#[btf_map]
pub static SVC_STATS: PerCpuArray<SvcStats, 65_536> = PerCpuArray::new();

/// Service id -> namespace, name, port name and why the frontend is what it is. Only the
/// controller writes it and only inspection (`svcproxy inspect`, `explain`, `bpftool`) reads it:
/// it is declared here, unread, so that it carries BTF like every other map.
#[btf_map]
pub static SVC_META: HashMap<u32, ServiceMeta, 65_536, NO_PREALLOC> = HashMap::new();

/// Maglev table size (a prime), set by the controller at load time.
#[unsafe(no_mangle)]
pub static MAGLEV_TABLE_SIZE: u32 = proxy_common::service::DEFAULT_MAGLEV_TABLE_SIZE;

/// The layout version of the build that pinned these maps (`proxy_common::LAYOUT`). Only the
/// controller reads and writes it.
#[btf_map]
pub static LAYOUT: Array<u32, 1> = Array::new();
