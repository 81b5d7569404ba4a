//! [`MapOps`] over the real (pinned) BPF maps, and a reader for the datapath counters.

use std::collections::HashMap as StdHashMap;

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use proxy_common::{
    backend::{BACKENDS4, Backend4, REPLY_FILTER, REPLY_FILTER_SIZE},
    meta::{SVC_META, ServiceMeta},
    service::{FRONTENDS4, Frontend4Key, MAGLEV4, SLOTS, Service4, Slot, SlotKey},
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
    filter: Array<MapData, u32>,
    svc_stats: PerCpuArray<MapData, SvcStats>,
    cpus: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Load(Box<LoadError>),
    #[error("map has an unexpected type or layout: {0}")]
    Map(#[from] MapError),
    #[error("cannot count the possible CPUs ({0}): {1}")]
    Cpus(&'static str, std::io::Error),
}

impl From<LoadError> for OpenError {
    fn from(e: LoadError) -> Self {
        Self::Load(Box::new(e))
    }
}

impl KernelMaps {
    /// Takes the writable maps out of the loaded datapath.
    pub fn take(dp: &mut Datapath) -> Result<Self, OpenError> {
        Ok(Self {
            frontends: HashMap::try_from(dp.take_map(FRONTENDS4)?)?,
            slots: HashMap::try_from(dp.take_map(SLOTS)?)?,
            backends: HashMap::try_from(dp.take_map(BACKENDS4)?)?,
            maglev: HashMap::try_from(dp.take_map(MAGLEV4)?)?,
            meta: HashMap::try_from(dp.take_map(SVC_META)?)?,
            filter: Array::try_from(dp.take_map(REPLY_FILTER)?)?,
            svc_stats: PerCpuArray::try_from(dp.take_map(SVC_STATS)?)?,
            cpus: nr_cpus().map_err(|(what, e)| OpenError::Cpus(what, e))?,
        })
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
    fn put_frontend(&mut self, key: Frontend4Key, value: Service4) -> Result<(), WriteError> {
        self.frontends
            .insert(key, value, 0)
            .map_err(map_err(FRONTENDS4, "insert"))
    }

    fn del_frontend(&mut self, key: Frontend4Key) -> Result<(), WriteError> {
        ignore_missing(self.frontends.remove(&key)).map_err(map_err(FRONTENDS4, "remove"))
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
        let cur = self
            .filter
            .get(&slot, 0)
            .map_err(map_err(REPLY_FILTER, "get"))?;
        let new = cur.saturating_add_signed(delta);
        self.filter
            .set(slot, new, 0)
            .map_err(map_err(REPLY_FILTER, "set"))
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
        for slot in 0..REPLY_FILTER_SIZE {
            let want = counts.get(&slot).copied().unwrap_or(0);
            let have = self
                .filter
                .get(&slot, 0)
                .map_err(map_err(REPLY_FILTER, "get"))?;
            if have != want {
                self.filter
                    .set(slot, want, 0)
                    .map_err(map_err(REPLY_FILTER, "set"))?;
            }
        }
        Ok(())
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
