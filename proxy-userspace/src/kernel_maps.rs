//! [`MapOps`] over the real (pinned) BPF maps, and a reader for the datapath counters.

use std::collections::{HashMap as StdHashMap, HashSet};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use proxy_common::{
    backend::{
        BACKENDS4, Backend4, REPLY_FILTER, REPLY_FILTER_WORDS, filter_slot, filter_word_bit,
    },
    meta::{SVC_META, ServiceMeta},
    service::{
        FRONTEND_FILTER, FRONTEND_FILTER_SIZE, FRONTEND_FILTER_WORDS, FRONTENDS4, Frontend4Key,
        MAGLEV4, SLOTS, SVC_REVISIONS, Service4, Slot, SlotKey,
    },
    stats::{STAT_COUNT, STATS, SVC_STATS, SvcStats},
};

use crate::{
    loader::{Datapath, LoadError},
    writer::{MapOps, Snapshot, WriteError},
};

pub struct KernelMaps {
    frontends: HashMap<MapData, Frontend4Key, Service4>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: HashMap<MapData, u32, Backend4>,
    maglev: HashMap<MapData, SlotKey, Slot>,
    meta: HashMap<MapData, u32, ServiceMeta>,
    filter: BitFilter,
    svc_stats: PerCpuArray<MapData, SvcStats>,
    cpus: usize,
    /// Derived from the frontends, kept here so the writer need not know about them: a bitmap
    /// of frontend (address, port) pairs, the frontends it counts, and each service id's
    /// current revision (see `proxy_common::service`).
    frontend_filter: BitFilter,
    frontend_keys: HashSet<Frontend4Key>,
    revisions: Array<MapData, u32>,
}

/// A bitmap filter map and the counts behind its bits: the datapath reads bits, how many
/// entries hash to each slot is kept here.
struct BitFilter {
    name: &'static str,
    map: Array<MapData, u64>,
    counts: StdHashMap<u32, u32>,
    /// The map's words as this process last wrote them.
    words: Vec<u64>,
}

impl BitFilter {
    fn new(name: &'static str, map: Array<MapData, u64>, words: u32) -> Self {
        Self {
            name,
            map,
            counts: StdHashMap::new(),
            words: vec![0; words as usize],
        }
    }

    /// Adds `delta` to the count of `slot`, writing its word when the bit changes. On failure
    /// nothing changed.
    fn add(&mut self, slot: u32, delta: i32) -> Result<(), WriteError> {
        let (index, bit) = filter_word_bit(slot);
        let Some(&word) = self.words.get(index as usize) else {
            return Err(WriteError::Map {
                map: self.name,
                op: "set",
                reason: format!("slot {slot} is out of range"),
            });
        };
        let count = self.counts.get(&slot).copied().unwrap_or(0);
        let new = count.saturating_add_signed(delta);
        let want = if new > 0 { word | bit } else { word & !bit };
        if want != word {
            self.map
                .set(index, want, 0)
                .map_err(map_err(self.name, "set"))?;
            self.words[index as usize] = want;
        }
        if new == 0 {
            self.counts.remove(&slot);
        } else {
            self.counts.insert(slot, new);
        }
        Ok(())
    }

    /// Makes the map hold exactly these counts' bits.
    fn reset(&mut self, counts: StdHashMap<u32, u32>) -> Result<(), WriteError> {
        let mut words = vec![0u64; self.words.len()];
        for (&slot, &n) in &counts {
            let (index, bit) = filter_word_bit(slot);
            if n > 0
                && let Some(w) = words.get_mut(index as usize)
            {
                *w |= bit;
            }
        }
        for (index, &want) in words.iter().enumerate() {
            let have = self
                .map
                .get(&(index as u32), 0)
                .map_err(map_err(self.name, "get"))?;
            if have != want {
                self.map
                    .set(index as u32, want, 0)
                    .map_err(map_err(self.name, "set"))?;
            }
        }
        self.words = words;
        self.counts = counts;
        Ok(())
    }
}

fn frontend_slot(key: &Frontend4Key) -> u32 {
    filter_slot(key.addr_be, key.port_be, FRONTEND_FILTER_SIZE)
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Load(Box<LoadError>),
    #[error("map has an unexpected type or layout: {0}")]
    Map(#[from] MapError),
    #[error("cannot count the possible CPUs ({0}): {1}")]
    Cpus(&'static str, std::io::Error),
    #[error("cannot rebuild the maps derived from the frontends: {0}")]
    Derived(String),
}

impl From<LoadError> for OpenError {
    fn from(e: LoadError) -> Self {
        Self::Load(Box::new(e))
    }
}

impl KernelMaps {
    /// Takes the writable maps out of the loaded datapath.
    /// Takes the writable maps out of the loaded datapath, and brings the maps derived from
    /// the frontends in line with the frontends found (pinned by an earlier svcproxy).
    pub fn take(dp: &mut Datapath) -> Result<Self, OpenError> {
        let mut maps = Self {
            frontends: HashMap::try_from(dp.take_map(FRONTENDS4)?)?,
            slots: HashMap::try_from(dp.take_map(SLOTS)?)?,
            backends: HashMap::try_from(dp.take_map(BACKENDS4)?)?,
            maglev: HashMap::try_from(dp.take_map(MAGLEV4)?)?,
            meta: HashMap::try_from(dp.take_map(SVC_META)?)?,
            filter: BitFilter::new(
                REPLY_FILTER,
                Array::try_from(dp.take_map(REPLY_FILTER)?)?,
                REPLY_FILTER_WORDS,
            ),
            svc_stats: PerCpuArray::try_from(dp.take_map(SVC_STATS)?)?,
            cpus: nr_cpus().map_err(|(what, e)| OpenError::Cpus(what, e))?,
            frontend_filter: BitFilter::new(
                FRONTEND_FILTER,
                Array::try_from(dp.take_map(FRONTEND_FILTER)?)?,
                FRONTEND_FILTER_WORDS,
            ),
            frontend_keys: HashSet::new(),
            revisions: Array::try_from(dp.take_map(SVC_REVISIONS)?)?,
        };
        let frontends: Vec<(Frontend4Key, Service4)> =
            maps.frontends.iter().collect::<Result<_, _>>()?;
        let mut counts = StdHashMap::new();
        for (key, svc) in &frontends {
            *counts.entry(frontend_slot(key)).or_default() += 1;
            maps.frontend_keys.insert(*key);
            maps.revisions.set(svc.svc_id, svc.revision, 0)?;
        }
        maps.frontend_filter
            .reset(counts)
            .map_err(|e| OpenError::Derived(e.to_string()))?;
        Ok(maps)
    }
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> WriteError {
    move |e| WriteError::Map {
        map,
        op,
        reason: e.to_string(),
    }
}

/// Deleting what is already gone is success: a retried removal must converge.
fn ignore_missing(res: Result<(), MapError>) -> Result<(), MapError> {
    match res {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl MapOps for KernelMaps {
    /// A new frontend is in the frontend filter before it exists (a packet to it must not be
    /// taken for a miss); its service id's revision follows the entry.
    fn put_frontend(&mut self, key: Frontend4Key, value: Service4) -> Result<(), WriteError> {
        let new = !self.frontend_keys.contains(&key);
        if new {
            self.frontend_filter.add(frontend_slot(&key), 1)?;
        }
        if let Err(e) = self.frontends.insert(key, value, 0) {
            if new {
                // A failed decrement leaves the bit set: a false positive, never a miss.
                let _ = self.frontend_filter.add(frontend_slot(&key), -1);
            }
            return Err(map_err(FRONTENDS4, "insert")(e));
        }
        self.frontend_keys.insert(key);
        self.revisions
            .set(value.svc_id, value.revision, 0)
            .map_err(map_err(SVC_REVISIONS, "set"))
    }

    /// The service id's revision goes first, so no established flow outlives its frontend on
    /// the datapath's short path; the filter bit last.
    fn del_frontend(&mut self, key: Frontend4Key) -> Result<(), WriteError> {
        match self.frontends.get(&key, 0) {
            Ok(svc) => self
                .revisions
                .set(svc.svc_id, 0, 0)
                .map_err(map_err(SVC_REVISIONS, "set"))?,
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(FRONTENDS4, "get")(e)),
        }
        ignore_missing(self.frontends.remove(&key)).map_err(map_err(FRONTENDS4, "remove"))?;
        if self.frontend_keys.remove(&key)
            && let Err(e) = self.frontend_filter.add(frontend_slot(&key), -1)
        {
            // Counted still: a retried removal decrements again.
            self.frontend_keys.insert(key);
            return Err(e);
        }
        Ok(())
    }

    fn put_slot(&mut self, key: SlotKey, value: Slot) -> Result<(), WriteError> {
        self.slots
            .insert(key, value, 0)
            .map_err(map_err(SLOTS, "insert"))
    }

    fn del_slot(&mut self, key: SlotKey) -> Result<(), WriteError> {
        ignore_missing(self.slots.remove(&key)).map_err(map_err(SLOTS, "remove"))
    }

    fn put_backend(&mut self, id: u32, value: Backend4) -> Result<(), WriteError> {
        self.backends
            .insert(id, value, 0)
            .map_err(map_err(BACKENDS4, "insert"))
    }

    fn del_backend(&mut self, id: u32) -> Result<(), WriteError> {
        ignore_missing(self.backends.remove(&id)).map_err(map_err(BACKENDS4, "remove"))
    }

    fn put_maglev(&mut self, key: SlotKey, value: Slot) -> Result<(), WriteError> {
        self.maglev
            .insert(key, value, 0)
            .map_err(map_err(MAGLEV4, "insert"))
    }

    fn del_maglev(&mut self, key: SlotKey) -> Result<(), WriteError> {
        ignore_missing(self.maglev.remove(&key)).map_err(map_err(MAGLEV4, "remove"))
    }

    fn put_meta(&mut self, svc_id: u32, value: ServiceMeta) -> Result<(), WriteError> {
        self.meta
            .insert(svc_id, value, 0)
            .map_err(map_err(SVC_META, "insert"))
    }

    fn del_meta(&mut self, svc_id: u32) -> Result<(), WriteError> {
        ignore_missing(self.meta.remove(&svc_id)).map_err(map_err(SVC_META, "remove"))
    }

    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<(), WriteError> {
        let zero = PerCpuValues::try_from(vec![SvcStats::default(); self.cpus]).map_err(|e| {
            WriteError::Map {
                map: SVC_STATS,
                op: "set",
                reason: e.to_string(),
            }
        })?;
        self.svc_stats
            .set(svc_id, zero, 0)
            .map_err(map_err(SVC_STATS, "set"))
    }

    fn filter_add(&mut self, slot: u32, delta: i32) -> Result<(), WriteError> {
        self.filter.add(slot, delta)
    }

    fn snapshot(&mut self) -> Result<Snapshot, WriteError> {
        Ok(Snapshot {
            frontends: self
                .frontends
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(FRONTENDS4, "iterate"))?,
            slots: self
                .slots
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(SLOTS, "iterate"))?,
            backends: self
                .backends
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(BACKENDS4, "iterate"))?,
            maglev: self
                .maglev
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(MAGLEV4, "iterate"))?,
            meta: self
                .meta
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(SVC_META, "iterate"))?,
        })
    }

    fn reset_filter(&mut self, counts: &StdHashMap<u32, u32>) -> Result<(), WriteError> {
        self.filter.reset(counts.clone())
    }
}

/// Reads the datapath's per-CPU counters, summed over CPUs: outcomes, and per-Service counters
/// by service id.
pub struct StatsReader {
    stats: PerCpuArray<MapData, u64>,
    /// A second handle on the pinned map the writer also holds (it resets a reused id's
    /// counters): reading needs no coordination with writing, and the writer's handle stays
    /// its own.
    svc_stats: PerCpuArray<MapData, SvcStats>,
}

impl StatsReader {
    pub fn take(dp: &mut Datapath) -> Result<Self, OpenError> {
        let svc_stats = MapData::from_pin(dp.pin_dir().join(SVC_STATS))?;
        Ok(Self {
            stats: PerCpuArray::try_from(dp.take_map(STATS)?)?,
            svc_stats: PerCpuArray::try_from(Map::PerCpuArray(svc_stats))?,
        })
    }

    pub fn read(&self) -> Result<[u64; STAT_COUNT as usize], MapError> {
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// The counters of one service id, summed over CPUs.
    pub fn read_service(&self, svc_id: u32) -> Result<SvcStats, MapError> {
        let mut sum = SvcStats::default();
        for cpu in self.svc_stats.get(&svc_id, 0)?.iter() {
            sum.packets = sum.packets.wrapping_add(cpu.packets);
            sum.bytes = sum.bytes.wrapping_add(cpu.bytes);
            sum.new_flows = sum.new_flows.wrapping_add(cpu.new_flows);
        }
        Ok(sum)
    }
}
