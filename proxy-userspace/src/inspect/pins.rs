//! The pinned maps, opened read-only: inspection works whether or not svcproxy runs (the maps
//! stay pinned after it exits), and the kernel itself refuses any write through these handles
//! (`BPF_F_RDONLY`), so inspecting can never disturb the datapath.

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray},
    util::nr_cpus,
};
use proxy_common::{
    backend::{BACKENDS4, Backend4},
    conntrack::{AFFINITY4, AffinityEntry, AffinityKey4, CT4, CtEntry4, CtKey4},
    meta::{SVC_META, ServiceMeta},
    service::{FRONTENDS4, Frontend4Key, MAGLEV4, SLOTS, Service4, Slot, SlotKey},
    stats::{STAT_COUNT, STATS, SVC_STATS, SvcStats},
};

use super::{InspectError, MapView};

/// `BPF_OBJ_GET` and its read-only flag (`include/uapi/linux/bpf.h`).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_F_RDONLY: u32 = 1 << 3;

/// The `BPF_OBJ_*` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Every map inspection reads, opened read-only from the pin directory.
pub struct PinnedMaps {
    frontends: HashMap<MapData, Frontend4Key, Service4>,
    slots: HashMap<MapData, SlotKey, Slot>,
    maglev: HashMap<MapData, SlotKey, Slot>,
    backends: HashMap<MapData, u32, Backend4>,
    meta: HashMap<MapData, u32, ServiceMeta>,
    conntrack: HashMap<MapData, CtKey4, CtEntry4>,
    affinity: HashMap<MapData, AffinityKey4, AffinityEntry>,
    svc_stats: PerCpuArray<MapData, SvcStats>,
    stats: PerCpuArray<MapData, u64>,
}

impl PinnedMaps {
    /// Opens the maps pinned in `dir` by `svcproxy run --pin-path dir`.
    pub fn open(dir: &Path) -> Result<Self, InspectError> {
        if !dir.join(FRONTENDS4).exists() {
            return Err(InspectError::NotPinned {
                dir: dir.to_owned(),
            });
        }
        // Per-CPU reads need the CPU count; checked once, up front.
        nr_cpus().map_err(|(what, e)| InspectError::Cpus(what, e))?;
        Ok(Self {
            frontends: typed(dir, FRONTENDS4, HashMap::try_from)?,
            slots: typed(dir, SLOTS, HashMap::try_from)?,
            maglev: typed(dir, MAGLEV4, HashMap::try_from)?,
            backends: typed(dir, BACKENDS4, HashMap::try_from)?,
            meta: typed(dir, SVC_META, HashMap::try_from)?,
            conntrack: typed(dir, CT4, HashMap::try_from)?,
            affinity: typed(dir, AFFINITY4, HashMap::try_from)?,
            svc_stats: typed(dir, SVC_STATS, PerCpuArray::try_from)?,
            stats: typed(dir, STATS, PerCpuArray::try_from)?,
        })
    }
}

/// Opens `dir/name` read-only as a map of type `T` (which checks key and value sizes against
/// this build's layouts).
fn typed<T>(
    dir: &Path,
    name: &'static str,
    convert: impl FnOnce(Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, InspectError> {
    let path = dir.join(name);
    let fd = open_read_only(&path)?;
    let map_err = |e: aya::maps::MapError| InspectError::Layout {
        path: path.clone(),
        reason: e.to_string(),
    };
    let data = MapData::from_fd(fd).map_err(map_err)?;
    let map = Map::from_map_data(data).map_err(map_err)?;
    convert(map).map_err(map_err)
}

fn open_read_only(path: &Path) -> Result<OwnedFd, InspectError> {
    if !path.exists() {
        return Err(InspectError::MissingMap {
            path: path.to_owned(),
        });
    }
    let open_err = |source: io::Error| InspectError::Open {
        path: path.to_owned(),
        hint: match source.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => {
                " (inspection needs CAP_BPF and access to the pin directory, as root has)"
            }
            _ => "",
        },
        source,
    };
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| open_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        file_flags: BPF_F_RDONLY,
        ..ObjGetAttr::default()
    };
    // SAFETY: BPF_OBJ_GET reads `attr` (which outlives the call, as does the path it points
    // to) and returns a new file descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(open_err(io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor the kernel just gave us, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn read_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> InspectError {
    move |e| InspectError::Read {
        map,
        reason: e.to_string(),
    }
}

/// A lookup where "no such key" is an answer, not an error.
fn found<V>(
    res: Result<V, aya::maps::MapError>,
    map: &'static str,
) -> Result<Option<V>, InspectError> {
    match res {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(read_err(map)(e)),
    }
}

/// Every entry of a hash map. Entries the datapath adds or evicts meanwhile may be missed or
/// seen twice (the kernel's iteration is not a snapshot); callers key by map key.
fn dump<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, InspectError> {
    let mut out = Vec::new();
    for entry in map.iter() {
        match entry {
            Ok(kv) => out.push(kv),
            // Deleted between "next key" and "lookup": it is gone, so it is not listed.
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(read_err(name)(e)),
        }
    }
    Ok(out)
}

impl MapView for PinnedMaps {
    fn frontends(&self) -> Result<Vec<(Frontend4Key, Service4)>, InspectError> {
        dump(&self.frontends, FRONTENDS4)
    }

    fn backends(&self) -> Result<Vec<(u32, Backend4)>, InspectError> {
        dump(&self.backends, BACKENDS4)
    }

    fn flows(&self) -> Result<Vec<(CtKey4, CtEntry4)>, InspectError> {
        dump(&self.conntrack, CT4)
    }

    fn frontend(&self, key: &Frontend4Key) -> Result<Option<Service4>, InspectError> {
        found(self.frontends.get(key, 0), FRONTENDS4)
    }

    fn slot(&self, key: &SlotKey) -> Result<Option<Slot>, InspectError> {
        found(self.slots.get(key, 0), SLOTS)
    }

    fn maglev(&self, key: &SlotKey) -> Result<Option<Slot>, InspectError> {
        found(self.maglev.get(key, 0), MAGLEV4)
    }

    fn backend(&self, id: u32) -> Result<Option<Backend4>, InspectError> {
        found(self.backends.get(&id, 0), BACKENDS4)
    }

    fn meta(&self, svc_id: u32) -> Result<Option<ServiceMeta>, InspectError> {
        found(self.meta.get(&svc_id, 0), SVC_META)
    }

    fn flow(&self, key: &CtKey4) -> Result<Option<CtEntry4>, InspectError> {
        found(self.conntrack.get(key, 0), CT4)
    }

    fn affinity(&self, key: &AffinityKey4) -> Result<Option<AffinityEntry>, InspectError> {
        found(self.affinity.get(key, 0), AFFINITY4)
    }

    fn service_counters(&self, svc_id: u32) -> Result<SvcStats, InspectError> {
        let mut sum = SvcStats::default();
        let Some(per_cpu) = found(self.svc_stats.get(&svc_id, 0), SVC_STATS)? else {
            return Ok(sum);
        };
        for cpu in per_cpu.iter() {
            sum.packets = sum.packets.wrapping_add(cpu.packets);
            sum.bytes = sum.bytes.wrapping_add(cpu.bytes);
            sum.new_flows = sum.new_flows.wrapping_add(cpu.new_flows);
        }
        Ok(sum)
    }

    fn outcomes(&self) -> Result<[u64; STAT_COUNT as usize], InspectError> {
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self.stats.get(&(i as u32), 0).map_err(read_err(STATS))?;
            *slot = per_cpu.iter().fold(0u64, |a, b| a.wrapping_add(*b));
        }
        Ok(out)
    }

    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }
}

/// `bpf_ktime_get_ns()`'s clock (`CLOCK_MONOTONIC`), read from here: conntrack and affinity
/// timestamps are on it.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
