//! The map writer: the only code that changes the datapath maps. It diffs the desired state
//! against what it knows is in the maps and writes only the difference, in an order that never
//! shows a packet a half-written frontend: backends, then slots, then the frontend; removals in
//! reverse.
//!
//! Each frontend's service id also names its metadata record (namespace, name, why its backends
//! are what they are) for inspection: written before the frontend, removed after it.
//!
//! Ids are stable: a frontend keeps its service id and a backend (per service, address, port)
//! keeps its backend id for as long as it exists, so conntrack entries stay valid while other
//! backends come and go.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use proxy_common::{
    backend::{BACKEND_ACTIVE, BACKEND_TERMINATING, Backend4, reply_filter_slot},
    meta::ServiceMeta,
    service::{
        Frontend4Key, SVC_F_AFFINITY, SVC_F_MAGLEV, SVC_F_POLICY_DROP, Service4, Slot, SlotKey,
    },
};
use thiserror::Error;

use crate::{
    desired::{Algorithm, BackendState, Desired, Frontend, FrontendState, Protocol},
    maglev, svc_meta,
};

#[derive(Debug, Error)]
pub enum WriteError {
    #[error("map {map}: {op} failed: {reason}")]
    Map {
        map: &'static str,
        op: &'static str,
        reason: String,
    },
    #[error("frontend {frontend} has {count} usable backends; at most 65535 fit a frontend")]
    TooManyBackends { frontend: Frontend, count: usize },
    #[error(
        "all {max} service ids are in use (one per frontend); raise --max-frontends to serve more"
    )]
    ServiceIdsExhausted { max: u32 },
    #[error("pinned map holds an unknown protocol number {proto} for {addr}:{port}")]
    UnknownProtocol {
        addr: Ipv4Addr,
        port: u16,
        proto: u8,
    },
}

/// What is in the kernel maps, dumped in one go when adopting pinned maps.
#[derive(Default)]
pub struct Snapshot {
    pub frontends: Vec<(Frontend4Key, Service4)>,
    pub slots: Vec<(SlotKey, Slot)>,
    pub backends: Vec<(u32, Backend4)>,
    /// Maglev table entries: (service id, table index) -> backend id.
    pub maglev: Vec<(SlotKey, Slot)>,
    /// Metadata records by service id.
    pub meta: Vec<(u32, ServiceMeta)>,
}

/// Limits the writer works within, fixed when the maps are loaded.
#[derive(Clone, Copy, Debug)]
pub struct WriterConfig {
    /// Service ids run from 1 to this: per-Service counters are an array indexed by them.
    pub max_frontends: u32,
    /// Entries of each Maglev table (a prime).
    pub maglev_table_size: u32,
}

/// Writes to the kernel maps. Implemented over aya maps by `kernel_maps`, and by an in-memory
/// fake in tests.
pub trait MapOps {
    fn put_frontend(&mut self, key: Frontend4Key, value: Service4) -> Result<(), WriteError>;
    fn del_frontend(&mut self, key: Frontend4Key) -> Result<(), WriteError>;
    fn put_slot(&mut self, key: SlotKey, value: Slot) -> Result<(), WriteError>;
    fn del_slot(&mut self, key: SlotKey) -> Result<(), WriteError>;
    fn put_backend(&mut self, id: u32, value: Backend4) -> Result<(), WriteError>;
    fn del_backend(&mut self, id: u32) -> Result<(), WriteError>;
    fn put_maglev(&mut self, key: SlotKey, value: Slot) -> Result<(), WriteError>;
    fn del_maglev(&mut self, key: SlotKey) -> Result<(), WriteError>;
    fn put_meta(&mut self, svc_id: u32, value: ServiceMeta) -> Result<(), WriteError>;
    fn del_meta(&mut self, svc_id: u32) -> Result<(), WriteError>;
    /// Zeroes the per-Service counters of a service id about to be (re)used.
    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<(), WriteError>;
    /// Adds `delta` to reply-filter slot `slot`.
    fn filter_add(&mut self, slot: u32, delta: i32) -> Result<(), WriteError>;
    /// Reads every frontend, slot and backend (for adoption after a restart).
    fn snapshot(&mut self) -> Result<Snapshot, WriteError>;
    /// Overwrites the reply filter with exactly these counts (adoption).
    fn reset_filter(&mut self, counts: &HashMap<u32, u32>) -> Result<(), WriteError>;
}

/// What the writer believes one frontend looks like in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    svc_id: u32,
    revision: u32,
    /// (addr, port) -> (backend id, state).
    backends: BTreeMap<(Ipv4Addr, u16), (u32, BackendState)>,
    /// Slots present in the map: slot n+1 holds `slots[n]`. May run past `count` while a
    /// shrink is being written.
    slots: Vec<u32>,
    /// Backend count in the frontend entry.
    count: u16,
    /// Whether the frontend entry itself exists yet (a first write may fail before it does).
    in_map: bool,
    /// `SVC_F_*` flags and affinity timeout in the frontend entry.
    flags: u16,
    affinity_s: u32,
    /// Maglev table entries present in the map: entry i holds `maglev[i]` (empty: none).
    maglev: Vec<u32>,
    /// Fingerprint of the metadata record in the map, if there is one.
    meta: Option<u64>,
    /// A backend was deleted after the frontend's revision last changed: a flow that
    /// re-validated in between still names it, so the revision must change once more.
    stale_revision: bool,
}

/// Counts of what one `apply` changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub frontends_unchanged: usize,
    pub failed: usize,
}

/// Entries per writer-owned map, see [`MapWriter::usage`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterUsage {
    pub frontends: u64,
    pub slots: u64,
    pub backends: u64,
    pub maglev: u64,
}

pub struct MapWriter<M> {
    maps: M,
    written: BTreeMap<Frontend, Written>,
    next_svc_id: u32,
    /// Ids of removed frontends, reused first so ids stay below `config.max_frontends`.
    free_svc_ids: BTreeSet<u32>,
    next_backend_id: u32,
    next_revision: u32,
    config: WriterConfig,
    /// Reply-filter decrements that failed after their backend was deleted, by filter slot:
    /// retried first thing on the next apply (until then the count is merely too high).
    filter_debt: BTreeMap<u32, i32>,
    /// Frontends whose last write or removal failed: every apply looks at them again, whatever
    /// it is told changed.
    retry: BTreeSet<Frontend>,
    /// The frontends the last apply looked at.
    looked_at: BTreeSet<Frontend>,
}

fn to_key(fe: &Frontend) -> Frontend4Key {
    Frontend4Key {
        addr_be: u32::from_ne_bytes(fe.addr.octets()),
        port_be: fe.port.to_be(),
        proto: fe.protocol.number(),
        scope: 0,
    }
}

fn from_key(key: &Frontend4Key) -> Result<Frontend, WriteError> {
    let addr = Ipv4Addr::from(key.addr_be.to_ne_bytes());
    let port = u16::from_be(key.port_be);
    let protocol = match key.proto {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        132 => Protocol::Sctp,
        proto => return Err(WriteError::UnknownProtocol { addr, port, proto }),
    };
    Ok(Frontend {
        addr,
        port,
        protocol,
    })
}

fn backend_value(
    addr: Ipv4Addr,
    port: u16,
    proto: u8,
    state: BackendState,
    svc_id: u32,
) -> Backend4 {
    Backend4 {
        addr_be: u32::from_ne_bytes(addr.octets()),
        port_be: port.to_be(),
        proto,
        state: match state {
            BackendState::Active => BACKEND_ACTIVE,
            BackendState::Terminating => BACKEND_TERMINATING,
        },
        svc_id,
    }
}

/// The frontend entry for what the writer has decided.
fn service_value(w: &Written) -> Service4 {
    Service4 {
        svc_id: w.svc_id,
        backend_count: w.count,
        flags: w.flags,
        revision: w.revision,
        affinity_timeout_s: w.affinity_s,
    }
}

fn filter_slot(addr: Ipv4Addr, port: u16) -> u32 {
    reply_filter_slot(u32::from_ne_bytes(addr.octets()), port.to_be())
}

impl<M: MapOps> MapWriter<M> {
    /// A writer over maps that are empty or hold what an earlier svcproxy wrote: their contents
    /// are adopted as the starting point, so the first `apply` writes only real changes.
    pub fn adopt(mut maps: M, config: WriterConfig) -> Result<Self, WriteError> {
        let snap = maps.snapshot()?;
        let mut next_svc_id = 1;
        let mut next_backend_id = 1;
        let mut next_revision = 1;
        let mut by_svc: HashMap<u32, Frontend> = HashMap::new();
        let mut written = BTreeMap::new();
        for (key, svc) in &snap.frontends {
            let fe = from_key(key)?;
            by_svc.insert(svc.svc_id, fe);
            next_svc_id = next_svc_id.max(svc.svc_id + 1);
            next_revision = next_revision.max(svc.revision.wrapping_add(1));
            let slots = (1..=svc.backend_count as u32)
                .map(|slot| {
                    snap.slots
                        .iter()
                        .find(|(k, _)| k.svc_id == svc.svc_id && k.slot == slot)
                        .map_or(0, |(_, v)| v.backend_id)
                })
                .collect();
            written.insert(
                fe,
                Written {
                    svc_id: svc.svc_id,
                    revision: svc.revision,
                    backends: BTreeMap::new(),
                    slots,
                    count: svc.backend_count,
                    in_map: true,
                    stale_revision: false,
                    flags: svc.flags,
                    affinity_s: svc.affinity_timeout_s,
                    maglev: Vec::new(),
                    meta: None,
                },
            );
        }
        let mut filter: HashMap<u32, u32> = HashMap::new();
        let mut orphans = Vec::new();
        for (id, b) in &snap.backends {
            next_backend_id = next_backend_id.max(id + 1);
            let addr = Ipv4Addr::from(b.addr_be.to_ne_bytes());
            let port = u16::from_be(b.port_be);
            match by_svc.get(&b.svc_id).and_then(|fe| written.get_mut(fe)) {
                Some(w) => {
                    let state = if b.state == BACKEND_TERMINATING {
                        BackendState::Terminating
                    } else {
                        BackendState::Active
                    };
                    w.backends.insert((addr, port), (*id, state));
                    *filter.entry(filter_slot(addr, port)).or_default() += 1;
                }
                None => orphans.push(*id),
            }
        }
        // Slots of services that no longer have a frontend or past their frontend's count, and
        // backends of none: left by a crash mid-write. Nothing can reach them, and the writer
        // would never delete them later; remove them.
        for (key, _) in &snap.slots {
            let reachable = by_svc
                .get(&key.svc_id)
                .and_then(|fe| written.get(fe))
                .is_some_and(|w| (1..=u32::from(w.count)).contains(&key.slot));
            if !reachable {
                maps.del_slot(*key)?;
            }
        }
        for id in orphans {
            maps.del_backend(id)?;
        }
        // Metadata of no frontend: left by a crash between a frontend's removal and its
        // record's.
        for (svc_id, meta) in &snap.meta {
            match by_svc.get(svc_id).and_then(|fe| written.get_mut(fe)) {
                Some(w) => w.meta = Some(svc_meta::fingerprint(meta)),
                None => maps.del_meta(*svc_id)?,
            }
        }
        // Maglev tables are adopted only when whole: a partial one (a crash mid-write) is
        // rewritten by the next apply, and entries of no Maglev frontend are removed.
        let m = config.maglev_table_size as usize;
        let mut tables: HashMap<u32, Vec<u32>> = HashMap::new();
        for (key, slot) in &snap.maglev {
            let owner = by_svc.get(&key.svc_id).and_then(|fe| written.get(fe));
            if owner.is_some_and(|w| w.flags & SVC_F_MAGLEV != 0) && (key.slot as usize) < m {
                tables.entry(key.svc_id).or_insert_with(|| vec![0; m])[key.slot as usize] =
                    slot.backend_id;
            } else {
                maps.del_maglev(*key)?;
            }
        }
        for (svc_id, table) in tables {
            if let Some(w) = by_svc.get(&svc_id).and_then(|fe| written.get_mut(fe))
                && table
                    .iter()
                    .all(|id| w.backends.values().any(|(b, _)| b == id))
            {
                w.maglev = table;
            }
        }
        maps.reset_filter(&filter)?;
        let used: BTreeSet<u32> = written.values().map(|w| w.svc_id).collect();
        let free_svc_ids = (1..next_svc_id).filter(|id| !used.contains(id)).collect();
        Ok(Self {
            maps,
            written,
            next_svc_id,
            free_svc_ids,
            next_backend_id,
            next_revision,
            config,
            filter_debt: BTreeMap::new(),
            retry: BTreeSet::new(),
            looked_at: BTreeSet::new(),
        })
    }

    /// Number of frontends currently written.
    pub fn frontend_count(&self) -> usize {
        self.written.len()
    }

    /// The service id of every frontend in the maps (per-Service counters are indexed by it).
    pub fn service_ids(&self) -> impl Iterator<Item = (&Frontend, u32)> {
        self.written
            .iter()
            .filter(|(_, w)| w.in_map)
            .map(|(fe, w)| (fe, w.svc_id))
    }

    /// The service id of `fe`, if its entry is in the map.
    pub fn service_id(&self, fe: &Frontend) -> Option<u32> {
        self.written.get(fe).filter(|w| w.in_map).map(|w| w.svc_id)
    }

    /// The frontends the last apply looked at: only these can have changed.
    pub fn looked_at(&self) -> &BTreeSet<Frontend> {
        &self.looked_at
    }

    /// Entries the writer keeps in each map it owns. Counted from its own bookkeeping, which
    /// equals the maps' contents after a successful apply: counting in the kernel would take a
    /// syscall per entry.
    pub fn usage(&self) -> WriterUsage {
        let mut usage = WriterUsage::default();
        for w in self.written.values() {
            usage.frontends += u64::from(w.in_map);
            usage.slots += w.slots.len() as u64;
            usage.backends += w.backends.len() as u64;
            usage.maglev += w.maglev.len() as u64;
        }
        usage
    }

    /// Makes the maps hold `desired`, looking at every frontend (the first sync, and after
    /// adopting pinned maps). A frontend whose write fails is left consistent (its old or new
    /// state, never a mix a packet could trip over), counted in `failed`, and retried on the
    /// next apply.
    pub fn apply(&mut self, desired: &Desired) -> ApplyStats {
        let all: BTreeSet<Frontend> = self
            .written
            .keys()
            .chain(desired.frontends.keys())
            .copied()
            .collect();
        self.apply_changed(desired, &all)
    }

    /// [`apply`](Self::apply) when only the frontends in `changed` (and those whose last
    /// write failed) can differ from what was last applied: with 10,000 Services and one
    /// changed, the other 9,999 are not looked at. `unchanged` counts only what was looked at.
    pub fn apply_changed(&mut self, desired: &Desired, changed: &BTreeSet<Frontend>) -> ApplyStats {
        let mut stats = ApplyStats::default();
        if let Err(e) = self.settle_filter_debt() {
            tracing::error!("settling reply filter counts failed: {e}");
            stats.failed += 1;
        }
        let retry = std::mem::take(&mut self.retry);
        self.looked_at = changed.union(&retry).copied().collect();
        let (gone, wanted): (Vec<Frontend>, Vec<Frontend>) = self
            .looked_at
            .iter()
            .partition(|fe| !desired.frontends.contains_key(*fe));
        // Removals first, so a full map gets room before additions.
        for fe in gone {
            if !self.written.contains_key(&fe) {
                continue;
            }
            match self.remove_frontend(&fe) {
                Ok(()) => stats.frontends_removed += 1,
                Err(e) => {
                    tracing::error!(%fe, "removing frontend failed: {e}");
                    stats.failed += 1;
                    self.retry.insert(fe);
                }
            }
        }
        for fe in wanted {
            let Some(state) = desired.frontends.get(&fe) else {
                continue;
            };
            match self.write_frontend(&fe, state) {
                Ok(true) => stats.frontends_written += 1,
                Ok(false) => stats.frontends_unchanged += 1,
                Err(e) => {
                    tracing::error!(%fe, service = %state.service, "writing frontend failed: {e}");
                    stats.failed += 1;
                    self.retry.insert(fe);
                }
            }
        }
        stats
    }

    /// Writes one frontend if it differs; returns whether anything was written.
    fn write_frontend(&mut self, fe: &Frontend, state: &FrontendState) -> Result<bool, WriteError> {
        let active = state.active().count();
        if active > u16::MAX as usize {
            return Err(WriteError::TooManyBackends {
                frontend: *fe,
                count: active,
            });
        }
        let (svc_id, old) = match self.written.get(fe) {
            Some(w) => (w.svc_id, Some(w.clone())),
            None => (self.alloc_svc_id()?, None),
        };
        let mut cur = old.clone().unwrap_or(Written {
            svc_id,
            revision: 0,
            backends: BTreeMap::new(),
            slots: Vec::new(),
            count: 0,
            in_map: false,
            stale_revision: false,
            flags: 0,
            affinity_s: 0,
            maglev: Vec::new(),
            meta: None,
        });
        let proto = fe.protocol.number();

        // 1. Backends: new ones get fresh ids; existing ones keep theirs. One turning active is
        // marked now, before a slot names it; one turning terminating only in step 4, once no
        // slot within the count names it (new flows pick a slot's backend whatever its state).
        let mut next = BTreeMap::new();
        for b in &state.backends {
            let id = match cur.backends.get(&(b.addr, b.port)).copied() {
                Some((id, st)) if st == b.state || b.state == BackendState::Terminating => id,
                Some((id, _)) => {
                    self.maps
                        .put_backend(id, backend_value(b.addr, b.port, proto, b.state, svc_id))?;
                    cur.backends.insert((b.addr, b.port), (id, b.state));
                    id
                }
                None => {
                    let id = self.next_backend_id;
                    self.next_backend_id += 1;
                    self.add_backend(
                        id,
                        backend_value(b.addr, b.port, proto, b.state, svc_id),
                        filter_slot(b.addr, b.port),
                    )?;
                    cur.backends.insert((b.addr, b.port), (id, b.state));
                    self.written.insert(*fe, cur.clone());
                    id
                }
            };
            next.insert((b.addr, b.port), (id, b.state));
        }
        self.written.insert(*fe, cur.clone());

        // 2. Slots 1..=active.
        let slots: Vec<u32> = state.active().map(|b| next[&(b.addr, b.port)].0).collect();
        let mut slots_changed = false;
        for (i, id) in slots.iter().enumerate() {
            if cur.slots.get(i) != Some(id) {
                let key = SlotKey {
                    svc_id,
                    slot: i as u32 + 1,
                };
                self.maps.put_slot(key, Slot { backend_id: *id })?;
                match cur.slots.get_mut(i) {
                    Some(s) => *s = *id,
                    None => cur.slots.push(*id),
                }
                slots_changed = true;
                self.written.insert(*fe, cur.clone());
            }
        }

        // 2b. The Maglev table, whole, before the frontend says to use it.
        let use_maglev = state.algorithm == Algorithm::Maglev && !slots.is_empty();
        if use_maglev {
            let active: Vec<(Ipv4Addr, u16)> = state.active().map(|b| (b.addr, b.port)).collect();
            let table: Vec<u32> = maglev::table(&active, self.config.maglev_table_size)
                .into_iter()
                .map(|i| slots[i as usize])
                .collect();
            if cur.maglev.len() != table.len() {
                cur.maglev = vec![0; table.len()];
            }
            for (i, id) in table.iter().enumerate() {
                if cur.maglev[i] != *id {
                    let key = SlotKey {
                        svc_id,
                        slot: i as u32,
                    };
                    self.maps.put_maglev(key, Slot { backend_id: *id })?;
                    cur.maglev[i] = *id;
                    slots_changed = true;
                }
            }
            self.written.insert(*fe, cur.clone());
        }

        // 2c. The metadata record, before a frontend names it.
        let meta = svc_meta::encode(state, self.config.maglev_table_size);
        let meta_fp = svc_meta::fingerprint(&meta);
        let meta_changed = cur.meta != Some(meta_fp);
        if meta_changed {
            self.maps.put_meta(svc_id, meta)?;
            cur.meta = Some(meta_fp);
            self.written.insert(*fe, cur.clone());
        }

        // 3. The frontend, with a new revision when its backend set changed so established
        // flows re-validate their backend once.
        let backends_changed = old.as_ref().is_none_or(|w| w.backends != next);
        let revision = if backends_changed {
            let r = self.next_revision;
            self.next_revision = self.next_revision.wrapping_add(1).max(1);
            r
        } else {
            cur.revision
        };
        let count = slots.len() as u16;
        let flags = (if state.affinity_timeout_s.is_some() {
            SVC_F_AFFINITY
        } else {
            0
        }) | (if use_maglev { SVC_F_MAGLEV } else { 0 })
            | (if state.drop_when_empty {
                SVC_F_POLICY_DROP
            } else {
                0
            });
        let affinity_s = state.affinity_timeout_s.unwrap_or(0);
        let changed = !cur.in_map
            || cur.count != count
            || cur.revision != revision
            || cur.flags != flags
            || cur.affinity_s != affinity_s;
        if changed {
            // Deletions so far predate this revision: flows re-validating under it miss them.
            cur.stale_revision &= cur.revision == revision;
            cur.count = count;
            cur.revision = revision;
            cur.flags = flags;
            cur.affinity_s = affinity_s;
            self.maps.put_frontend(to_key(fe), service_value(&cur))?;
            cur.in_map = true;
            self.written.insert(*fe, cur.clone());
        }

        // 4. Slots past the new count, backends turning terminating, then backends no longer
        // wanted.
        while cur.slots.len() > slots.len() {
            self.maps.del_slot(SlotKey {
                svc_id,
                slot: cur.slots.len() as u32,
            })?;
            cur.slots.pop();
            self.written.insert(*fe, cur.clone());
        }
        if !use_maglev {
            self.drop_maglev(fe, &mut cur)?;
        }
        let mut marked = false;
        for (&(addr, port), &(id, st)) in &next {
            if cur
                .backends
                .get(&(addr, port))
                .is_some_and(|&(_, have)| have != st)
            {
                self.maps
                    .put_backend(id, backend_value(addr, port, proto, st, svc_id))?;
                cur.backends.insert((addr, port), (id, st));
                self.written.insert(*fe, cur.clone());
                marked = true;
            }
        }
        let removed: Vec<((Ipv4Addr, u16), u32)> = cur
            .backends
            .iter()
            .filter(|(k, _)| !next.contains_key(*k))
            .map(|(k, (id, _))| (*k, *id))
            .collect();
        for ((addr, port), id) in removed {
            self.maps.del_backend(id)?;
            cur.backends.remove(&(addr, port));
            cur.stale_revision = true;
            self.written.insert(*fe, cur.clone());
            self.filter_sub(filter_slot(addr, port))?;
        }

        // 5. A flow re-validating between steps 3 and 4 found its removed backend still there
        // and took the new revision; a newer one, now that the backend is gone, moves it off.
        let revalidated = cur.stale_revision;
        if revalidated {
            cur.revision = self.next_revision;
            self.next_revision = self.next_revision.wrapping_add(1).max(1);
            self.maps.put_frontend(to_key(fe), service_value(&cur))?;
            cur.stale_revision = false;
            self.written.insert(*fe, cur);
        }
        Ok(changed || slots_changed || backends_changed || marked || revalidated || meta_changed)
    }

    /// Removes a frontend: the frontend first, so no packet finds it, then its slots and
    /// backends, and its metadata record last. Progress is recorded as it goes, so a retry (or the frontend coming back)
    /// neither repeats a filter decrement nor trusts an entry already deleted.
    fn remove_frontend(&mut self, fe: &Frontend) -> Result<(), WriteError> {
        let Some(mut cur) = self.written.get(fe).cloned() else {
            return Ok(());
        };
        self.maps.del_frontend(to_key(fe))?;
        cur.in_map = false;
        self.written.insert(*fe, cur.clone());
        while !cur.slots.is_empty() {
            self.maps.del_slot(SlotKey {
                svc_id: cur.svc_id,
                slot: cur.slots.len() as u32,
            })?;
            cur.slots.pop();
            self.written.insert(*fe, cur.clone());
        }
        self.drop_maglev(fe, &mut cur)?;
        while let Some((&(addr, port), &(id, _))) = cur.backends.first_key_value() {
            self.maps.del_backend(id)?;
            cur.backends.remove(&(addr, port));
            self.written.insert(*fe, cur.clone());
            self.filter_sub(filter_slot(addr, port))?;
        }
        if cur.meta.is_some() {
            self.maps.del_meta(cur.svc_id)?;
        }
        self.written.remove(fe);
        self.free_svc_ids.insert(cur.svc_id);
        Ok(())
    }

    /// Deletes a frontend's Maglev table (after the frontend stopped naming it), recording
    /// progress from the end so a retry resumes.
    fn drop_maglev(&mut self, fe: &Frontend, cur: &mut Written) -> Result<(), WriteError> {
        while !cur.maglev.is_empty() {
            let slot = cur.maglev.len() as u32 - 1;
            self.maps.del_maglev(SlotKey {
                svc_id: cur.svc_id,
                slot,
            })?;
            cur.maglev.pop();
            if cur.maglev.is_empty() || slot.is_multiple_of(1024) {
                self.written.insert(*fe, cur.clone());
            }
        }
        Ok(())
    }

    /// A service id for a new frontend: a freed one first, so ids stay within the per-Service
    /// counter array; its counters start from zero.
    fn alloc_svc_id(&mut self) -> Result<u32, WriteError> {
        let id = match self.free_svc_ids.pop_first() {
            Some(id) => id,
            None if self.next_svc_id <= self.config.max_frontends => {
                self.next_svc_id += 1;
                self.next_svc_id - 1
            }
            None => {
                return Err(WriteError::ServiceIdsExhausted {
                    max: self.config.max_frontends,
                });
            }
        };
        if let Err(e) = self.maps.reset_svc_stats(id) {
            self.free_svc_ids.insert(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Writes a new backend, counted in the reply filter before it exists: a reply from a
    /// backend the filter does not count skips conntrack and reaches the client un-NATed.
    fn add_backend(&mut self, id: u32, value: Backend4, slot: u32) -> Result<(), WriteError> {
        self.maps.filter_add(slot, 1)?;
        if let Err(e) = self.maps.put_backend(id, value) {
            // Not written after all: take the count back (a failure here leaves it owed).
            let _ = self.filter_sub(slot);
            return Err(e);
        }
        Ok(())
    }

    /// Uncounts a backend already deleted. On failure the decrement is owed to the next apply;
    /// meanwhile the count is too high, which costs only a conntrack lookup.
    fn filter_sub(&mut self, slot: u32) -> Result<(), WriteError> {
        self.maps
            .filter_add(slot, -1)
            .inspect_err(|_| *self.filter_debt.entry(slot).or_default() -= 1)
    }

    fn settle_filter_debt(&mut self) -> Result<(), WriteError> {
        while let Some((&slot, &delta)) = self.filter_debt.first_key_value() {
            self.maps.filter_add(slot, delta)?;
            self.filter_debt.remove(&slot);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeSet, HashMap},
        fmt,
        ops::Range,
        sync::Arc,
    };

    use proxy_common::{
        backend::{BACKENDS4, REPLY_FILTER, REPLY_FILTER_SIZE},
        meta::SVC_META,
        service::{FRONTENDS4, MAGLEV4, SLOTS},
        stats::SVC_STATS,
    };

    use super::*;
    use crate::desired::{Backend, ServiceName};

    /// A small prime table keeps the Maglev tests fast.
    const TEST_CONFIG: WriterConfig = WriterConfig {
        max_frontends: 65_536,
        maglev_table_size: 251,
    };

    /// One write, as the fake saw it succeed.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Op {
        PutFrontend(Frontend4Key, Service4),
        DelFrontend(Frontend4Key),
        PutSlot(SlotKey, Slot),
        DelSlot(SlotKey),
        PutBackend(u32, Backend4),
        DelBackend(u32),
        FilterAdd(u32, i32),
        ResetFilter,
        PutMeta(u32),
        DelMeta(u32),
    }

    /// In-memory maps that record every write and, after each one, check what a packet relies
    /// on: every slot within a frontend's count names an existing, active backend of the same
    /// service, and every existing backend is counted in the reply filter.
    #[derive(Clone, Default)]
    struct FakeMaps {
        frontends: BTreeMap<Frontend4Key, Service4>,
        /// (svc id, slot) -> backend id.
        slots: BTreeMap<(u32, u32), u32>,
        backends: BTreeMap<u32, Backend4>,
        /// Non-zero reply filter counters.
        filter: BTreeMap<u32, u32>,
        /// (svc id, table index) -> backend id.
        maglev: BTreeMap<(u32, u32), u32>,
        /// svc id -> metadata record.
        meta: BTreeMap<u32, ServiceMeta>,
        /// Service ids whose counters were reset, in order.
        stats_reset: Vec<u32>,
        /// How many existing backends hash to each reply filter slot: what `filter` must cover.
        hashed: HashMap<u32, u32>,
        /// svc id -> frontends holding it, and backend id -> slots naming it: a write re-checks
        /// only the frontends it can affect, so 10,000 frontends do not make every write
        /// re-check them all.
        by_svc: HashMap<u32, BTreeSet<Frontend4Key>>,
        named_by: HashMap<u32, BTreeSet<(u32, u32)>>,
        ops: Vec<Op>,
        /// Write attempts so far, failed ones included: what `fail` counts in.
        attempts: usize,
        /// Attempts in this range fail as on a full map, changing nothing.
        fail: Option<Range<usize>>,
    }

    fn show(key: &Frontend4Key) -> String {
        from_key(key).map_or_else(|_| format!("{key:?}"), |fe| fe.to_string())
    }

    fn addr_of(b: &Backend4) -> (Ipv4Addr, u16) {
        (
            Ipv4Addr::from(b.addr_be.to_ne_bytes()),
            u16::from_be(b.port_be),
        )
    }

    impl FakeMaps {
        fn attempt(&mut self, map: &'static str, op: &'static str) -> Result<(), WriteError> {
            let n = self.attempts;
            self.attempts += 1;
            if self.fail.as_ref().is_some_and(|r| r.contains(&n)) {
                return Err(WriteError::Map {
                    map,
                    op,
                    reason: format!("injected failure of write attempt {n}"),
                });
            }
            Ok(())
        }

        /// Records a write that changed the maps and checks what it can have broken.
        fn record(&mut self, op: Op) {
            self.ops.push(op);
            match self.ops.last() {
                Some(&Op::PutFrontend(key, _)) => self.check_frontend(&key, "after the last write"),
                Some(&(Op::PutSlot(key, _) | Op::DelSlot(key))) => {
                    self.check_slot_users(key.svc_id, key.slot)
                }
                Some(&(Op::PutBackend(id, _) | Op::DelBackend(id))) => {
                    for &(svc_id, slot) in self.named_by.get(&id).into_iter().flatten() {
                        self.check_slot_users(svc_id, slot);
                    }
                }
                _ => {}
            }
        }

        fn check_slot_users(&self, svc_id: u32, slot: u32) {
            for key in self.by_svc.get(&svc_id).into_iter().flatten() {
                let svc = &self.frontends[key];
                if slot <= u32::from(svc.backend_count) {
                    self.check_slot(key, svc, slot, "after the last write");
                }
            }
        }

        fn last_write(&self) -> String {
            match self.ops.last() {
                Some(op) => format!("write #{} {op:?}", self.ops.len()),
                None => "no write yet".into(),
            }
        }

        fn check_frontend(&self, key: &Frontend4Key, at: &str) {
            let svc = &self.frontends[key];
            for slot in 1..=u32::from(svc.backend_count) {
                self.check_slot(key, svc, slot, at);
            }
        }

        fn check_slot(&self, key: &Frontend4Key, svc: &Service4, slot: u32, at: &str) {
            let (fe, svc_id, count) = (show(key), svc.svc_id, svc.backend_count);
            let last = self.last_write();
            let Some(&id) = self.slots.get(&(svc_id, slot)) else {
                panic!(
                    "{at} ({last}): frontend {fe} (service {svc_id}) counts {count} backends but \
                     slot {slot} is missing: a packet picking it is dropped"
                );
            };
            let Some(b) = self.backends.get(&id) else {
                panic!(
                    "{at} ({last}): frontend {fe} (service {svc_id}) slot {slot} names backend \
                     {id}, which does not exist"
                );
            };
            let (addr, port) = addr_of(b);
            if b.svc_id != svc_id {
                panic!(
                    "{at} ({last}): frontend {fe} (service {svc_id}) slot {slot} names backend \
                     {id} ({addr}:{port}) of service {}",
                    b.svc_id
                );
            }
            if b.state != BACKEND_ACTIVE {
                panic!(
                    "{at} ({last}): frontend {fe} (service {svc_id}) slot {slot} names backend \
                     {id} ({addr}:{port}) in state {}: new flows would go to a backend that \
                     takes none",
                    b.state
                );
            }
        }

        /// A reply from an existing backend must never be waved past the conntrack lookup.
        fn check_counted(&self, slot: u32) {
            let have = self.filter.get(&slot).copied().unwrap_or(0);
            let need = self.hashed.get(&slot).copied().unwrap_or(0);
            if have < need {
                panic!(
                    "after {}: reply filter slot {slot} counts {have} but {need} existing \
                     backends hash there: their replies would skip conntrack",
                    self.last_write()
                );
            }
        }

        /// The whole invariant, and the reply filter: exactly the existing backends when
        /// `exact`, at least them otherwise (a failed write may leave an over-count, which
        /// costs only a lookup, for the next apply to settle).
        fn check_all(&self, at: &str, exact: bool) {
            for key in self.frontends.keys() {
                self.check_frontend(key, at);
            }
            let mut want: BTreeMap<u32, u32> = BTreeMap::new();
            for b in self.backends.values() {
                *want
                    .entry(reply_filter_slot(b.addr_be, b.port_be))
                    .or_default() += 1;
            }
            for slot in want.keys().chain(self.filter.keys()) {
                let have = self.filter.get(slot).copied().unwrap_or(0);
                let need = want.get(slot).copied().unwrap_or(0);
                if have < need || (exact && have != need) {
                    panic!(
                        "{at}: reply filter slot {slot} counts {have}, but {need} existing \
                         backends hash there"
                    );
                }
            }
        }

        fn count_hashed(&mut self, b: &Backend4, delta: i32) {
            let n = self
                .hashed
                .entry(reply_filter_slot(b.addr_be, b.port_be))
                .or_default();
            *n = n
                .checked_add_signed(delta)
                .expect("hashed counts track backends");
        }

        fn service(&self, fe: &Frontend) -> Service4 {
            match self.frontends.get(&to_key(fe)) {
                Some(svc) => *svc,
                None => panic!("frontend {fe} is not in {FRONTENDS4}"),
            }
        }

        /// Backend ids of a frontend's service, by address and port.
        fn backend_ids(&self, fe: &Frontend) -> BTreeMap<(Ipv4Addr, u16), u32> {
            let svc_id = self.service(fe).svc_id;
            self.backends
                .iter()
                .filter(|(_, b)| b.svc_id == svc_id)
                .map(|(id, b)| (addr_of(b), *id))
                .collect()
        }

        fn backend_id(&self, fe: &Frontend, addr: &str, port: u16) -> u32 {
            match self.backend_ids(fe).get(&(ip(addr), port)) {
                Some(id) => *id,
                None => panic!("frontend {fe} has no backend {addr}:{port} in {BACKENDS4}"),
            }
        }

        /// Backend ids in slots 1..=count of a frontend.
        fn slot_ids(&self, fe: &Frontend) -> Vec<u32> {
            let svc = self.service(fe);
            (1..=u32::from(svc.backend_count))
                .map(|slot| self.slots[&(svc.svc_id, slot)])
                .collect()
        }

        /// What the maps hold, ids and revisions aside: what two writers that converged on
        /// the same desired state must agree on.
        fn contents(&self) -> Contents {
            let view = |id: &u32| {
                let b = &self.backends[id];
                let (addr, port) = addr_of(b);
                (addr, port, b.proto, b.state)
            };
            let mut by_svc: BTreeMap<u32, BTreeSet<_>> = BTreeMap::new();
            for (id, b) in &self.backends {
                by_svc.entry(b.svc_id).or_default().insert(view(id));
            }
            let frontends = self
                .frontends
                .iter()
                .map(|(key, svc)| {
                    let slots = (1..=u32::from(svc.backend_count))
                        .map(|slot| view(&self.slots[&(svc.svc_id, slot)]))
                        .collect();
                    let backends = by_svc.remove(&svc.svc_id).unwrap_or_default();
                    (*key, (slots, backends))
                })
                .collect();
            let counts: HashMap<u32, u16> = self
                .frontends
                .values()
                .map(|s| (s.svc_id, s.backend_count))
                .collect();
            Contents {
                frontends,
                stray_slots: self
                    .slots
                    .keys()
                    .filter(|(svc_id, slot)| {
                        counts
                            .get(svc_id)
                            .is_none_or(|count| *slot > u32::from(*count))
                    })
                    .count(),
                stray_backends: by_svc.values().map(BTreeSet::len).sum(),
                filter: self.filter.clone(),
                meta: self
                    .frontends
                    .iter()
                    .filter_map(|(key, svc)| Some((*key, *self.meta.get(&svc.svc_id)?)))
                    .collect(),
                stray_meta: self
                    .meta
                    .keys()
                    .filter(|id| !counts.contains_key(id))
                    .count(),
            }
        }
    }

    type BackendView = (Ipv4Addr, u16, u8, u8);

    /// Map contents without ids or revisions.
    #[derive(Debug, PartialEq, Eq)]
    struct Contents {
        /// Frontend -> (its slots resolved to backends, every backend of its service).
        frontends: BTreeMap<Frontend4Key, (Vec<BackendView>, BTreeSet<BackendView>)>,
        /// Slots and backends no frontend reaches.
        stray_slots: usize,
        stray_backends: usize,
        filter: BTreeMap<u32, u32>,
        /// Each frontend's metadata record, and records no frontend names.
        meta: BTreeMap<Frontend4Key, ServiceMeta>,
        stray_meta: usize,
    }

    impl MapOps for FakeMaps {
        fn put_frontend(&mut self, key: Frontend4Key, value: Service4) -> Result<(), WriteError> {
            self.attempt(FRONTENDS4, "insert")?;
            // A frontend that says "Maglev" must find its whole table naming its active
            // backends the moment it is written.
            if value.flags & SVC_F_MAGLEV != 0 && value.backend_count > 0 {
                for i in 0..TEST_CONFIG.maglev_table_size {
                    let Some(id) = self.maglev.get(&(value.svc_id, i)) else {
                        panic!("{}: Maglev flag set with entry {i} missing", show(&key));
                    };
                    match self.backends.get(id) {
                        Some(b) if b.svc_id == value.svc_id && b.state == BACKEND_ACTIVE => {}
                        other => panic!("{}: Maglev entry {i} names {id}: {other:?}", show(&key)),
                    }
                }
            }
            // Inspection names every frontend it finds: its record must already be there.
            if !self.meta.contains_key(&value.svc_id) {
                panic!(
                    "{}: frontend written before its metadata record (service {})",
                    show(&key),
                    value.svc_id
                );
            }
            if let Some(old) = self.frontends.insert(key, value)
                && let Some(keys) = self.by_svc.get_mut(&old.svc_id)
            {
                keys.remove(&key);
            }
            self.by_svc.entry(value.svc_id).or_default().insert(key);
            self.record(Op::PutFrontend(key, value));
            Ok(())
        }

        fn del_frontend(&mut self, key: Frontend4Key) -> Result<(), WriteError> {
            self.attempt(FRONTENDS4, "remove")?;
            if let Some(old) = self.frontends.remove(&key)
                && let Some(keys) = self.by_svc.get_mut(&old.svc_id)
            {
                keys.remove(&key);
            }
            self.record(Op::DelFrontend(key));
            Ok(())
        }

        fn put_slot(&mut self, key: SlotKey, value: Slot) -> Result<(), WriteError> {
            self.attempt(SLOTS, "insert")?;
            let k = (key.svc_id, key.slot);
            if let Some(old) = self.slots.insert(k, value.backend_id)
                && let Some(named) = self.named_by.get_mut(&old)
            {
                named.remove(&k);
            }
            self.named_by.entry(value.backend_id).or_default().insert(k);
            self.record(Op::PutSlot(key, value));
            Ok(())
        }

        fn del_slot(&mut self, key: SlotKey) -> Result<(), WriteError> {
            self.attempt(SLOTS, "remove")?;
            let k = (key.svc_id, key.slot);
            if let Some(old) = self.slots.remove(&k)
                && let Some(named) = self.named_by.get_mut(&old)
            {
                named.remove(&k);
            }
            self.record(Op::DelSlot(key));
            Ok(())
        }

        fn put_backend(&mut self, id: u32, value: Backend4) -> Result<(), WriteError> {
            self.attempt(BACKENDS4, "insert")?;
            if let Some(old) = self.backends.insert(id, value) {
                self.count_hashed(&old, -1);
            }
            self.count_hashed(&value, 1);
            self.record(Op::PutBackend(id, value));
            self.check_counted(reply_filter_slot(value.addr_be, value.port_be));
            Ok(())
        }

        fn del_backend(&mut self, id: u32) -> Result<(), WriteError> {
            self.attempt(BACKENDS4, "remove")?;
            for ((svc_id, i), named) in &self.maglev {
                let in_use = self
                    .frontends
                    .values()
                    .any(|f| f.svc_id == *svc_id && f.flags & SVC_F_MAGLEV != 0);
                if *named == id && in_use {
                    panic!(
                        "backend {id} deleted while Maglev entry {i} of service {svc_id} names it"
                    );
                }
            }
            if let Some(old) = self.backends.remove(&id) {
                self.count_hashed(&old, -1);
            }
            self.record(Op::DelBackend(id));
            Ok(())
        }

        fn put_maglev(&mut self, key: SlotKey, value: Slot) -> Result<(), WriteError> {
            self.attempt(MAGLEV4, "insert")?;
            self.maglev.insert((key.svc_id, key.slot), value.backend_id);
            Ok(())
        }

        fn del_maglev(&mut self, key: SlotKey) -> Result<(), WriteError> {
            self.attempt(MAGLEV4, "remove")?;
            self.maglev.remove(&(key.svc_id, key.slot));
            Ok(())
        }

        fn put_meta(&mut self, svc_id: u32, value: ServiceMeta) -> Result<(), WriteError> {
            self.attempt(SVC_META, "insert")?;
            self.meta.insert(svc_id, value);
            self.record(Op::PutMeta(svc_id));
            Ok(())
        }

        fn del_meta(&mut self, svc_id: u32) -> Result<(), WriteError> {
            self.attempt(SVC_META, "remove")?;
            if let Some((key, _)) = self.frontends.iter().find(|(_, f)| f.svc_id == svc_id) {
                panic!(
                    "metadata of service {svc_id} removed while frontend {} names it",
                    show(key)
                );
            }
            self.meta.remove(&svc_id);
            self.record(Op::DelMeta(svc_id));
            Ok(())
        }

        fn reset_svc_stats(&mut self, svc_id: u32) -> Result<(), WriteError> {
            self.attempt(SVC_STATS, "set")?;
            self.stats_reset.push(svc_id);
            Ok(())
        }

        fn filter_add(&mut self, slot: u32, delta: i32) -> Result<(), WriteError> {
            self.attempt(REPLY_FILTER, "set")?;
            if slot >= REPLY_FILTER_SIZE {
                panic!("reply filter slot {slot} is out of range ({REPLY_FILTER_SIZE} slots)");
            }
            let have = self.filter.get(&slot).copied().unwrap_or(0);
            let Some(new) = have.checked_add_signed(delta) else {
                panic!(
                    "reply filter slot {slot} holds {have} and is asked to add {delta}: a \
                     backend was uncounted twice (after {})",
                    self.last_write()
                );
            };
            if new == 0 {
                self.filter.remove(&slot);
            } else {
                self.filter.insert(slot, new);
            }
            self.record(Op::FilterAdd(slot, delta));
            self.check_counted(slot);
            Ok(())
        }

        fn snapshot(&mut self) -> Result<Snapshot, WriteError> {
            Ok(Snapshot {
                frontends: self.frontends.iter().map(|(k, v)| (*k, *v)).collect(),
                slots: self
                    .slots
                    .iter()
                    .map(|(&(svc_id, slot), &backend_id)| {
                        (SlotKey { svc_id, slot }, Slot { backend_id })
                    })
                    .collect(),
                backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
                maglev: self
                    .maglev
                    .iter()
                    .map(|(&(svc_id, slot), &backend_id)| {
                        (SlotKey { svc_id, slot }, Slot { backend_id })
                    })
                    .collect(),
                meta: self.meta.iter().map(|(k, v)| (*k, *v)).collect(),
            })
        }

        fn reset_filter(&mut self, counts: &HashMap<u32, u32>) -> Result<(), WriteError> {
            self.attempt(REPLY_FILTER, "set")?;
            self.filter = counts
                .iter()
                .filter(|(_, n)| **n != 0)
                .map(|(s, n)| (*s, *n))
                .collect();
            self.record(Op::ResetFilter);
            for slot in self.hashed.keys() {
                self.check_counted(*slot);
            }
            Ok(())
        }
    }

    impl fmt::Debug for FakeMaps {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("FakeMaps")
                .field("frontends", &self.frontends)
                .field("slots", &self.slots)
                .field("backends", &self.backends)
                .field("filter", &self.filter)
                .finish_non_exhaustive()
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse()
            .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
    }

    fn frontend(addr: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            addr: ip(addr),
            port,
            protocol,
        }
    }

    fn active(addr: &str, port: u16) -> Backend {
        Backend {
            addr: ip(addr),
            port,
            state: BackendState::Active,
        }
    }

    fn terminating(addr: &str, port: u16) -> Backend {
        Backend {
            state: BackendState::Terminating,
            ..active(addr, port)
        }
    }

    fn service(name: &str, backends: &[Backend]) -> FrontendState {
        let mut backends = backends.to_vec();
        // The planner hands the writer backends sorted by address and port.
        backends.sort_by_key(|b| (b.addr, b.port));
        FrontendState {
            service: ServiceName {
                namespace: "default".into(),
                name: name.into(),
            },
            backends,
            ..FrontendState::default()
        }
    }

    fn desired<S: Into<Arc<FrontendState>>>(
        frontends: impl IntoIterator<Item = (Frontend, S)>,
    ) -> Desired {
        Desired {
            frontends: frontends
                .into_iter()
                .map(|(fe, state)| (fe, state.into()))
                .collect(),
            rejections: Vec::new(),
        }
    }

    fn adopt(maps: FakeMaps) -> MapWriter<FakeMaps> {
        let mut w =
            MapWriter::adopt(maps, TEST_CONFIG).unwrap_or_else(|e| panic!("adopt failed: {e}"));
        w.maps.check_all("after adopt", true);
        w.maps.ops.clear();
        w
    }

    fn fresh() -> MapWriter<FakeMaps> {
        adopt(FakeMaps::default())
    }

    /// Applies and checks the maps as a packet would find them once it returns.
    fn apply(w: &mut MapWriter<FakeMaps>, d: &Desired) -> ApplyStats {
        let stats = w.apply(d);
        w.maps.check_all("at the end of apply", stats.failed == 0);
        stats
    }

    fn apply_ok(w: &mut MapWriter<FakeMaps>, d: &Desired) -> ApplyStats {
        let stats = apply(w, d);
        if stats.failed != 0 {
            panic!("apply failed with no failure injected: {stats:?}");
        }
        stats
    }

    /// What a writer that never failed makes of `d`.
    fn contents_of(d: &Desired) -> Contents {
        let mut w = fresh();
        apply_ok(&mut w, d);
        w.maps.contents()
    }

    fn count(ops: &[Op], pred: impl Fn(&Op) -> bool) -> usize {
        ops.iter().filter(|op| pred(op)).count()
    }

    fn web() -> Frontend {
        frontend("10.96.0.1", 80, Protocol::Tcp)
    }

    fn api() -> Frontend {
        frontend("10.96.0.2", 443, Protocol::Tcp)
    }

    fn dns() -> Frontend {
        frontend("10.96.0.10", 53, Protocol::Udp)
    }

    #[test]
    fn first_apply_writes_backends_then_slots_then_frontend_and_a_repeat_writes_nothing() {
        let d = desired([(
            web(),
            service(
                "web",
                &[
                    active("10.244.1.1", 8080),
                    active("10.244.1.2", 8080),
                    active("10.244.1.3", 8080),
                ],
            ),
        )]);
        let mut w = fresh();
        let stats = apply_ok(&mut w, &d);
        assert_eq!(stats.frontends_written, 1, "{stats:?}");

        let ops = &w.maps.ops;
        let puts = |pred: fn(&Op) -> bool| count(ops, pred);
        assert_eq!(puts(|op| matches!(op, Op::PutBackend(..))), 3, "{ops:#?}");
        assert_eq!(puts(|op| matches!(op, Op::PutSlot(..))), 3, "{ops:#?}");
        assert_eq!(puts(|op| matches!(op, Op::PutFrontend(..))), 1, "{ops:#?}");
        assert_eq!(puts(|op| matches!(op, Op::FilterAdd(_, 1))), 3, "{ops:#?}");
        assert_eq!(puts(|op| matches!(op, Op::PutMeta(_))), 1, "{ops:#?}");
        assert_eq!(ops.len(), 11, "only those writes expected: {ops:#?}");
        let last_backend = ops.iter().rposition(|op| matches!(op, Op::PutBackend(..)));
        let first_slot = ops.iter().position(|op| matches!(op, Op::PutSlot(..)));
        let last_slot = ops.iter().rposition(|op| matches!(op, Op::PutSlot(..)));
        let meta = ops.iter().position(|op| matches!(op, Op::PutMeta(..)));
        let fe = ops.iter().position(|op| matches!(op, Op::PutFrontend(..)));
        if !(last_backend < first_slot
            && last_slot < meta
            && meta < fe
            && fe == Some(ops.len() - 1))
        {
            panic!(
                "want every backend, then every slot, then the metadata record, then the \
                 frontend; wrote {ops:#?}"
            );
        }
        let svc = w.maps.service(&web());
        assert_eq!(svc.backend_count, 3, "{svc:?}");

        w.maps.ops.clear();
        let again = apply_ok(&mut w, &d);
        let want = ApplyStats {
            frontends_unchanged: 1,
            ..ApplyStats::default()
        };
        assert_eq!(again, want, "an identical apply must change nothing");
        if !w.maps.ops.is_empty() {
            panic!("an identical apply wrote {:#?}", w.maps.ops);
        }
    }

    #[test]
    fn adding_a_backend_keeps_service_and_backend_ids_and_bumps_the_revision() {
        let two = [active("10.244.1.1", 8080), active("10.244.1.3", 8080)];
        let mut w = fresh();
        apply_ok(&mut w, &desired([(web(), service("web", &two))]));
        let before = w.maps.service(&web());
        let ids_before = w.maps.backend_ids(&web());

        // Sorts between the two, so it also shifts the second one to another slot.
        let three = [two[0], active("10.244.1.2", 8080), two[1]];
        let stats = apply_ok(&mut w, &desired([(web(), service("web", &three))]));
        assert_eq!(stats.frontends_written, 1, "{stats:?}");
        let after = w.maps.service(&web());
        assert_eq!(
            after.svc_id, before.svc_id,
            "the service id must not change"
        );
        assert_eq!(after.backend_count, 3, "{after:?}");
        if after.revision == before.revision {
            panic!("backend set changed but revision stayed {}", after.revision);
        }
        let ids_after = w.maps.backend_ids(&web());
        for (addr, id) in &ids_before {
            if ids_after.get(addr) != Some(id) {
                panic!(
                    "backend {addr:?} had id {id}, now {:?}",
                    ids_after.get(addr)
                );
            }
        }
        let new_id = w.maps.backend_id(&web(), "10.244.1.2", 8080);
        if ids_before.values().any(|id| *id == new_id) {
            panic!("new backend reused id {new_id} of {ids_before:?}");
        }
        let slots = w.maps.slot_ids(&web());
        let want: Vec<u32> = ["10.244.1.1", "10.244.1.2", "10.244.1.3"]
            .iter()
            .map(|a| w.maps.backend_id(&web(), a, 8080))
            .collect();
        assert_eq!(slots, want, "slots follow the sorted active backends");
    }

    #[test]
    fn removing_a_backend_deletes_it_only_after_the_frontend_count_shrank() {
        let three = [
            active("10.244.1.1", 8080),
            active("10.244.1.2", 8080),
            active("10.244.1.3", 8080),
        ];
        let mut w = fresh();
        apply_ok(&mut w, &desired([(web(), service("web", &three))]));
        let gone = w.maps.backend_id(&web(), "10.244.1.2", 8080);
        let kept = w.maps.backend_ids(&web());
        w.maps.ops.clear();

        apply_ok(
            &mut w,
            &desired([(web(), service("web", &[three[0], three[2]]))]),
        );
        let ops = &w.maps.ops;
        let shrink = ops
            .iter()
            .position(|op| matches!(op, Op::PutFrontend(_, s) if s.backend_count == 2));
        let del = ops.iter().position(|op| *op == Op::DelBackend(gone));
        match (shrink, del) {
            (Some(shrink), Some(del)) if shrink < del => {}
            _ => panic!("want the count shrunk to 2 before backend {gone} goes; wrote {ops:#?}"),
        }
        if w.maps.backends.contains_key(&gone) {
            panic!("backend {gone} is still in {BACKENDS4}");
        }
        let ids = w.maps.backend_ids(&web());
        for addr in [(ip("10.244.1.1"), 8080), (ip("10.244.1.3"), 8080)] {
            assert_eq!(
                ids.get(&addr),
                kept.get(&addr),
                "kept backend {addr:?} changed id"
            );
        }
        let want = vec![ids[&(three[0].addr, 8080)], ids[&(three[2].addr, 8080)]];
        assert_eq!(
            w.maps.slot_ids(&web()),
            want,
            "slots hold the two kept backends"
        );
    }

    #[test]
    fn removing_a_backend_bumps_the_revision_again_once_it_is_gone() {
        // A flow re-validating between the count shrinking and the backend's deletion finds it
        // still there and takes the new revision; only a bump after the deletion moves it off.
        let two = [active("10.244.1.1", 8080), active("10.244.1.2", 8080)];
        let mut w = fresh();
        apply_ok(&mut w, &desired([(web(), service("web", &two))]));
        let gone = w.maps.backend_id(&web(), "10.244.1.2", 8080);
        w.maps.ops.clear();

        apply_ok(&mut w, &desired([(web(), service("web", &two[..1]))]));
        let ops = &w.maps.ops;
        let del = ops.iter().position(|op| *op == Op::DelBackend(gone));
        let revision_before_del = ops[..del.unwrap_or(0)]
            .iter()
            .rev()
            .find_map(|op| match op {
                Op::PutFrontend(_, s) => Some(s.revision),
                _ => None,
            });
        let last = ops.iter().rposition(|op| matches!(op, Op::PutFrontend(..)));
        match (del, last, revision_before_del) {
            (Some(del), Some(last), Some(r)) if last > del => {
                let now = w.maps.service(&web()).revision;
                if now == r {
                    panic!("frontend rewritten after the delete but revision stayed {r}");
                }
            }
            _ => panic!("want a frontend write with a new revision after the delete: {ops:#?}"),
        }
    }

    #[test]
    fn backend_turning_terminating_keeps_its_id_leaves_the_slots_and_stays_in_backends() {
        let mut w = fresh();
        let all_active = [
            active("10.244.1.1", 8080),
            active("10.244.1.2", 8080),
            active("10.244.1.3", 8080),
        ];
        apply_ok(&mut w, &desired([(web(), service("web", &all_active))]));
        // The last one: it sits in the last slot, which the old count still reaches until the
        // frontend shrinks.
        let id = w.maps.backend_id(&web(), "10.244.1.3", 8080);
        let rev = w.maps.service(&web()).revision;
        w.maps.ops.clear();

        let one_terminating = [
            all_active[0],
            all_active[1],
            terminating("10.244.1.3", 8080),
        ];
        apply_ok(
            &mut w,
            &desired([(web(), service("web", &one_terminating))]),
        );
        assert_eq!(
            w.maps.backend_id(&web(), "10.244.1.3", 8080),
            id,
            "id changed"
        );
        let b = w.maps.backends[&id];
        assert_eq!(
            b.state, BACKEND_TERMINATING,
            "backend {id} should be terminating: {b:?}"
        );
        let svc = w.maps.service(&web());
        assert_eq!(svc.backend_count, 2, "{svc:?}");
        if w.maps.slot_ids(&web()).contains(&id) || w.maps.slots.values().any(|v| *v == id) {
            panic!(
                "terminating backend {id} is still in a slot: {:?}",
                w.maps.slots
            );
        }
        if svc.revision == rev {
            panic!("a backend changed state but the revision stayed {rev}");
        }
        let ops = &w.maps.ops;
        let shrink = ops.iter().position(|op| matches!(op, Op::PutFrontend(..)));
        let mark = ops
            .iter()
            .position(|op| matches!(op, Op::PutBackend(i, b) if *i == id));
        match (shrink, mark) {
            (Some(shrink), Some(mark)) if shrink < mark => {}
            _ => panic!("want the count shrunk before backend {id} is marked; wrote {ops:#?}"),
        }

        // And back: active again under the same id, and in a slot before the count covers it.
        apply_ok(&mut w, &desired([(web(), service("web", &all_active))]));
        assert_eq!(
            w.maps.backend_id(&web(), "10.244.1.3", 8080),
            id,
            "id changed"
        );
        assert_eq!(w.maps.backends[&id].state, BACKEND_ACTIVE);
        assert_eq!(w.maps.slot_ids(&web()).last(), Some(&id));
    }

    #[test]
    fn removed_frontend_goes_frontend_first_then_slots_then_backends_then_its_metadata() {
        let d = desired([
            (
                web(),
                service(
                    "web",
                    &[active("10.244.1.1", 8080), active("10.244.1.2", 8080)],
                ),
            ),
            (
                dns(),
                service(
                    "dns",
                    &[active("10.244.9.1", 53), terminating("10.244.9.2", 53)],
                ),
            ),
        ]);
        let mut w = fresh();
        apply_ok(&mut w, &d);
        w.maps.ops.clear();

        let only_web = desired([(web(), d.frontends[&web()].clone())]);
        let stats = apply_ok(&mut w, &only_web);
        assert_eq!(stats.frontends_removed, 1, "{stats:?}");
        assert_eq!(stats.frontends_unchanged, 1, "{stats:?}");
        let ops = &w.maps.ops;
        let kind = |op: &Op| match op {
            Op::DelFrontend(_) => 0,
            Op::DelSlot(_) => 1,
            Op::DelBackend(_) | Op::FilterAdd(..) => 2,
            Op::DelMeta(_) => 3,
            _ => panic!("removing a frontend wrote {op:?}"),
        };
        if !ops.is_sorted_by_key(kind)
            || ops.first().map(kind) != Some(0)
            || ops.last().map(kind) != Some(3)
        {
            panic!("want frontend, then slots, then backends, then metadata; wrote {ops:#?}");
        }
        assert_eq!(count(ops, |op| matches!(op, Op::DelSlot(_))), 1, "{ops:#?}");
        assert_eq!(
            count(ops, |op| matches!(op, Op::DelBackend(_))),
            2,
            "{ops:#?}"
        );
        assert_eq!(w.maps.contents(), contents_of(&only_web));
        assert_eq!(w.frontend_count(), 1);

        apply_ok(&mut w, &Desired::default());
        assert_eq!(w.maps.contents(), contents_of(&Desired::default()));
        if !w.maps.filter.is_empty() {
            panic!("reply filter not back to all-zero: {:?}", w.maps.filter);
        }
        assert_eq!(w.frontend_count(), 0);
    }

    #[test]
    fn same_backend_behind_two_services_gets_two_backend_ids() {
        let shared = active("10.244.1.1", 8080);
        let d = desired([
            (web(), service("web", &[shared])),
            (api(), service("api", &[shared])),
        ]);
        let mut w = fresh();
        apply_ok(&mut w, &d);
        let web_id = w.maps.backend_id(&web(), "10.244.1.1", 8080);
        let api_id = w.maps.backend_id(&api(), "10.244.1.1", 8080);
        if web_id == api_id {
            panic!("both services share backend id {web_id}");
        }
        assert_eq!(
            w.maps.backends[&web_id].svc_id,
            w.maps.service(&web()).svc_id
        );
        assert_eq!(
            w.maps.backends[&api_id].svc_id,
            w.maps.service(&api()).svc_id
        );
        let slot = filter_slot(shared.addr, shared.port);
        assert_eq!(
            w.maps.filter.get(&slot),
            Some(&2),
            "one count per backend id"
        );

        apply_ok(&mut w, &desired([(web(), service("web", &[shared]))]));
        assert_eq!(w.maps.backend_id(&web(), "10.244.1.1", 8080), web_id);
        assert_eq!(w.maps.filter.get(&slot), Some(&1), "the other id is gone");
    }

    #[test]
    fn zero_then_some_then_zero_backends() {
        let mut w = fresh();
        let none = desired([(web(), service("web", &[]))]);
        apply_ok(&mut w, &none);
        let svc = w.maps.service(&web());
        assert_eq!(svc.backend_count, 0, "{svc:?}");
        assert!(
            w.maps.slots.is_empty() && w.maps.backends.is_empty(),
            "{:?}",
            w.maps
        );

        let some = desired([(
            web(),
            service(
                "web",
                &[active("10.244.1.1", 8080), terminating("10.244.1.2", 8080)],
            ),
        )]);
        apply_ok(&mut w, &some);
        assert_eq!(w.maps.contents(), contents_of(&some));
        assert_eq!(w.maps.service(&web()).svc_id, svc.svc_id);

        apply_ok(&mut w, &none);
        assert_eq!(w.maps.contents(), contents_of(&none));
        assert_eq!(w.maps.service(&web()).svc_id, svc.svc_id);
        assert!(
            w.maps.slots.is_empty() && w.maps.backends.is_empty(),
            "{:?}",
            w.maps
        );
        assert!(w.maps.filter.is_empty(), "{:?}", w.maps.filter);
    }

    fn two_services() -> Desired {
        desired([
            (
                web(),
                service(
                    "web",
                    &[
                        active("10.244.1.1", 8080),
                        terminating("10.244.1.2", 8080),
                        active("10.244.1.3", 8080),
                    ],
                ),
            ),
            (
                dns(),
                service("dns", &[active("10.244.9.1", 53), active("10.244.9.2", 53)]),
            ),
        ])
    }

    #[test]
    fn usage_and_service_ids_match_the_maps_after_an_apply() {
        let mut w = fresh();
        apply_ok(&mut w, &two_services());
        let m = &w.maps;
        let want = WriterUsage {
            frontends: m.frontends.len() as u64,
            slots: m.slots.len() as u64,
            backends: m.backends.len() as u64,
            maglev: m.maglev.len() as u64,
        };
        assert_eq!(w.usage(), want);
        assert_eq!((want.frontends, want.slots, want.backends), (2, 4, 5));
        let ids: BTreeMap<Frontend, u32> = w.service_ids().map(|(fe, id)| (*fe, id)).collect();
        assert_eq!(ids[&web()], m.service(&web()).svc_id);
        assert_eq!(ids[&dns()], m.service(&dns()).svc_id);
        assert_eq!(ids.len(), 2);

        apply_ok(&mut w, &Desired::default());
        assert_eq!(w.usage(), WriterUsage::default());
        assert_eq!(w.service_ids().count(), 0);
    }

    /// Maps as an earlier svcproxy left them after applying `d`.
    fn left_by_earlier_writer(d: &Desired) -> FakeMaps {
        let mut earlier = fresh();
        apply_ok(&mut earlier, d);
        let mut maps = earlier.maps.clone();
        maps.ops.clear();
        maps
    }

    #[test]
    fn adopting_maps_of_an_earlier_writer_makes_the_same_apply_write_nothing() {
        let d = two_services();
        let maps = left_by_earlier_writer(&d);
        let before = maps.contents();
        let mut w =
            MapWriter::adopt(maps, TEST_CONFIG).unwrap_or_else(|e| panic!("adopt failed: {e}"));
        assert_eq!(
            w.maps.ops,
            vec![Op::ResetFilter],
            "adopt should only reset the filter"
        );
        assert_eq!(w.frontend_count(), 2);
        w.maps.check_all("after adopt", true);
        w.maps.ops.clear();

        let stats = apply_ok(&mut w, &d);
        let want = ApplyStats {
            frontends_unchanged: 2,
            ..ApplyStats::default()
        };
        assert_eq!(stats, want);
        if !w.maps.ops.is_empty() {
            panic!("apply after adopt wrote {:#?}", w.maps.ops);
        }
        assert_eq!(w.maps.contents(), before);
    }

    #[test]
    fn adopt_removes_slots_backends_and_metadata_no_frontend_reaches() {
        let d = two_services();
        let mut maps = left_by_earlier_writer(&d);
        let web_svc = maps.service(&web());
        let some_backend = *maps.backends.values().next().expect("backends written");
        // As a crash would leave them: a service whose frontend was deleted, and a slot past a
        // live frontend's count (mid-shrink).
        let orphan = Backend4 {
            svc_id: 77,
            ..some_backend
        };
        maps.backends.insert(500, orphan);
        maps.count_hashed(&orphan, 1);
        maps.slots.insert((77, 1), 500);
        maps.slots.insert((77, 2), 3);
        let past_count = (web_svc.svc_id, u32::from(web_svc.backend_count) + 1);
        maps.slots.insert(past_count, 1);
        maps.meta.insert(77, ServiceMeta::default());
        // The filter as that crash left it: counting the orphan too.
        *maps
            .filter
            .entry(reply_filter_slot(orphan.addr_be, orphan.port_be))
            .or_default() += 1;

        let w = adopt(maps);
        let stray = w.maps.contents();
        assert_eq!(stray.stray_slots, 0, "slots left: {:?}", w.maps.slots);
        assert_eq!(
            stray.stray_backends, 0,
            "backends left: {:?}",
            w.maps.backends
        );
        if w.maps.backends.contains_key(&500) {
            panic!("orphaned backend 500 survived adopt");
        }
        assert_eq!(
            stray.stray_meta,
            0,
            "metadata left: {:?}",
            w.maps.meta.keys()
        );
        assert_eq!(
            stray,
            contents_of(&d),
            "adopt must remove only what nothing reaches"
        );
    }

    /// A change only inspection sees (why the backends are what they are) rewrites the record
    /// and nothing else; a Maglev table size is part of the record explain relies on.
    #[test]
    fn a_selection_change_rewrites_only_the_metadata_record() {
        let one = [active("10.244.1.1", 8080)];
        let mut w = fresh();
        apply_ok(&mut w, &desired([(web(), service("web", &one))]));
        let svc_id = w.maps.service(&web()).svc_id;
        let record = |w: &MapWriter<FakeMaps>| svc_meta::decode(&w.maps.meta[&svc_id]);
        assert_eq!(
            (record(&w).namespace.as_str(), record(&w).name.as_str()),
            ("default", "web")
        );
        assert_eq!(record(&w).maglev_table_size, TEST_CONFIG.maglev_table_size);
        w.maps.ops.clear();

        let mut fallback = service("web", &one);
        fallback.selection.terminating_fallback = true;
        let stats = apply_ok(&mut w, &desired([(web(), fallback)]));
        assert_eq!(stats.frontends_written, 1, "{stats:?}");
        assert_eq!(w.maps.ops, vec![Op::PutMeta(svc_id)]);
        assert_eq!(
            record(&w).reasons,
            proxy_common::meta::META_R_TERMINATING_FALLBACK
        );
    }

    #[test]
    fn ids_after_adopt_continue_above_the_adopted_maximum() {
        let d = two_services();
        let mut maps = left_by_earlier_writer(&d);
        let max_svc = maps.frontends.values().map(|s| s.svc_id).max().unwrap_or(0);
        // An orphan (its frontend's removal crashed) with the highest backend id: conntrack
        // entries may still name it, so no new backend may get its id even though adopt
        // deletes it.
        let orphan = Backend4 {
            svc_id: max_svc + 10,
            ..*maps.backends.values().next().expect("backends written")
        };
        maps.backends.insert(1000, orphan);
        maps.count_hashed(&orphan, 1);
        *maps
            .filter
            .entry(reply_filter_slot(orphan.addr_be, orphan.port_be))
            .or_default() += 1;
        let max_rev = maps
            .frontends
            .values()
            .map(|s| s.revision)
            .max()
            .unwrap_or(0);

        let mut w = adopt(maps);
        let mut more = d.clone();
        more.frontends
            .insert(api(), service("api", &[active("10.244.2.1", 8443)]).into());
        Arc::make_mut(more.frontends.get_mut(&web()).expect("web desired"))
            .backends
            .push(active("10.244.1.9", 8080));
        apply_ok(&mut w, &more);
        let api_id = w.maps.service(&api()).svc_id;
        if api_id <= max_svc {
            panic!("new service id {api_id} not above the adopted {max_svc}");
        }
        for (fe, addr, port) in [(api(), "10.244.2.1", 8443), (web(), "10.244.1.9", 8080)] {
            let id = w.maps.backend_id(&fe, addr, port);
            if id <= 1000 {
                panic!("new backend {addr}:{port} got id {id}, not above the adopted 1000");
            }
        }
        let web_rev = w.maps.service(&web()).revision;
        if web_rev <= max_rev {
            panic!("new revision {web_rev} not above the adopted {max_rev}");
        }
    }

    /// The representative change: `web` goes from 2 backends to one terminating, one removed
    /// and 3 new; `api` appears.
    fn before_and_after() -> (Desired, Desired) {
        let before = desired([(
            web(),
            service(
                "web",
                &[active("10.244.1.1", 8080), active("10.244.1.2", 8080)],
            ),
        )]);
        let after = desired([
            (
                web(),
                service(
                    "web",
                    &[
                        terminating("10.244.1.1", 8080),
                        active("10.244.1.3", 8080),
                        active("10.244.1.4", 8080),
                        active("10.244.1.5", 8080),
                    ],
                ),
            ),
            (
                api(),
                service(
                    "api",
                    &[active("10.244.2.1", 8443), active("10.244.2.2", 8443)],
                ),
            ),
        ]);
        (before, after)
    }

    /// Applies `from`, then `to` with write attempts `fail(k)` failing, for every k in the
    /// failure-free run of `to`; the invariant is checked after each write. Then retries with
    /// `retry` and expects exactly what a writer that never failed makes of it, and quiet after.
    fn fail_each_write(from: &Desired, to: &Desired, retry: &Desired, persistent: bool) {
        let total = {
            let mut w = fresh();
            apply_ok(&mut w, from);
            w.maps.attempts = 0;
            apply_ok(&mut w, to);
            w.maps.attempts
        };
        assert!(
            total > 5,
            "the change should take several writes, took {total}"
        );
        let want = contents_of(retry);
        for k in 0..total {
            let how = if persistent { "from" } else { "only" };
            let mut w = fresh();
            apply_ok(&mut w, from);
            w.maps.attempts = 0;
            w.maps.fail = Some(if persistent { k..usize::MAX } else { k..k + 1 });
            let stats = apply(&mut w, to);
            if stats.failed == 0 {
                panic!("write {k} of {total} failed ({how}) but apply reported {stats:?}");
            }
            w.maps.fail = None;
            let stats = apply(&mut w, retry);
            if stats.failed != 0 {
                panic!("retry after write {k} failed ({how}) still failed: {stats:?}");
            }
            let got = w.maps.contents();
            if got != want {
                panic!(
                    "after write {k} of {total} failed ({how}), the retry left\n{got:#?}\nbut a \
                     writer that never failed makes\n{want:#?}"
                );
            }
            w.maps.ops.clear();
            apply_ok(&mut w, retry);
            if !w.maps.ops.is_empty() {
                panic!(
                    "after write {k} failed ({how}), a second retry wrote {:#?}",
                    w.maps.ops
                );
            }
        }
    }

    #[test]
    fn any_failed_write_leaves_the_maps_consistent_and_a_retry_converges() {
        let (before, after) = before_and_after();
        fail_each_write(&before, &after, &after, false);
    }

    #[test]
    fn a_map_failing_from_any_write_on_leaves_the_maps_consistent_and_a_retry_converges() {
        let (before, after) = before_and_after();
        fail_each_write(&before, &after, &after, true);
    }

    #[test]
    fn a_failed_frontend_removal_converges_whether_or_not_it_comes_back() {
        let both = two_services();
        let only_web = desired([(web(), both.frontends[&web()].clone())]);
        for persistent in [false, true] {
            fail_each_write(&both, &only_web, &only_web, persistent);
            fail_each_write(&both, &only_web, &both, persistent);
        }
    }

    #[test]
    fn frontend_with_more_than_65535_active_backends_is_refused_and_others_still_written() {
        let too_many: Vec<Backend> = (0..=u32::from(u16::MAX))
            .map(|i| Backend {
                addr: Ipv4Addr::from(0x0A01_0000 + i),
                port: 8080,
                state: BackendState::Active,
            })
            .collect();
        let d = desired([
            (web(), service("web", &too_many)),
            (api(), service("api", &[active("10.244.2.1", 8443)])),
        ]);
        let mut w = fresh();
        let stats = apply(&mut w, &d);
        let want = ApplyStats {
            frontends_written: 1,
            failed: 1,
            ..ApplyStats::default()
        };
        assert_eq!(stats, want, "web should be refused, api written");
        if w.maps.frontends.contains_key(&to_key(&web())) {
            panic!(
                "frontend {} with {} backends was written",
                web(),
                too_many.len()
            );
        }
        assert_eq!(w.maps.service(&api()).backend_count, 1);
        assert_eq!(
            w.maps.backends.len(),
            1,
            "no backend of the refused frontend may be written"
        );
    }

    #[test]
    fn ten_thousand_frontends_then_one_backend_change_takes_a_handful_of_writes() {
        let fe = |i: u32| Frontend {
            addr: Ipv4Addr::from(0x0A60_0000 + i),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let backends = |i: u32| -> Vec<Backend> {
            (0..10)
                .map(|j| Backend {
                    addr: Ipv4Addr::from(0x0A80_0000 + i * 16 + j),
                    port: 8080,
                    state: BackendState::Active,
                })
                .collect()
        };
        let mut d =
            desired((0..10_000).map(|i| (fe(i), service(&format!("svc-{i}"), &backends(i)))));
        let mut w = fresh();
        let stats = apply_ok(&mut w, &d);
        assert_eq!(stats.frontends_written, 10_000, "{stats:?}");
        assert_eq!(w.maps.backends.len(), 100_000);
        w.maps.ops.clear();

        // Replace the last backend of one service with a new address that still sorts last.
        let changed = fe(4242);
        let mut moved = backends(4242);
        moved[9].addr = Ipv4Addr::from(0x0A80_0000 + 4242 * 16 + 15);
        Arc::make_mut(d.frontends.get_mut(&changed).expect("desired")).backends = moved.clone();
        let stats = apply_ok(&mut w, &d);
        let want = ApplyStats {
            frontends_written: 1,
            frontends_unchanged: 9_999,
            ..ApplyStats::default()
        };
        assert_eq!(stats, want);
        let ops = &w.maps.ops;
        if ops.len() >= 10 {
            panic!("one backend change took {} writes: {ops:#?}", ops.len());
        }
        let got: Vec<_> = w
            .maps
            .slot_ids(&changed)
            .iter()
            .map(|id| addr_of(&w.maps.backends[id]))
            .collect();
        let want: Vec<_> = moved.iter().map(|b| (b.addr, b.port)).collect();
        assert_eq!(got, want, "slots of {changed}");
    }

    fn maglev_service(name: &str, backends: &[Backend]) -> FrontendState {
        FrontendState {
            algorithm: Algorithm::Maglev,
            ..service(name, backends)
        }
    }

    fn ten_backends() -> Vec<Backend> {
        (1..=10)
            .map(|i| active(&format!("10.244.1.{i}"), 8080))
            .collect()
    }

    #[test]
    fn maglev_table_is_whole_before_the_frontend_uses_it_and_gone_after_it_stops() {
        let mut w = fresh();
        apply_ok(
            &mut w,
            &desired([(web(), maglev_service("web", &ten_backends()))]),
        );
        let svc = *w.maps.frontends.values().next().expect("frontend written");
        assert_ne!(svc.flags & SVC_F_MAGLEV, 0, "Maglev flag set");
        let entries = w
            .maps
            .maglev
            .keys()
            .filter(|(id, _)| *id == svc.svc_id)
            .count();
        assert_eq!(entries, TEST_CONFIG.maglev_table_size as usize);

        // Back to random: the flag goes first (checked by the fake), then the table.
        apply_ok(&mut w, &desired([(web(), service("web", &ten_backends()))]));
        let svc = *w.maps.frontends.values().next().expect("frontend written");
        assert_eq!(svc.flags & SVC_F_MAGLEV, 0);
        assert!(
            w.maps.maglev.is_empty(),
            "table removed: {} entries left",
            w.maps.maglev.len()
        );
    }

    #[test]
    fn maglev_backend_removal_rewrites_the_table_before_the_backend_goes() {
        let mut w = fresh();
        apply_ok(
            &mut w,
            &desired([(web(), maglev_service("web", &ten_backends()))]),
        );
        let nine: Vec<Backend> = ten_backends().into_iter().skip(1).collect();
        // The fake panics if the removed backend is deleted while an entry still names it.
        apply_ok(&mut w, &desired([(web(), maglev_service("web", &nine))]));
        assert_eq!(
            w.maps.contents(),
            contents_of(&desired([(web(), maglev_service("web", &nine))]))
        );
        assert_eq!(w.maps.maglev.len(), TEST_CONFIG.maglev_table_size as usize);
        // Removing the frontend removes its table.
        apply_ok(&mut w, &Desired::default());
        assert!(w.maps.maglev.is_empty());
    }

    #[test]
    fn affinity_and_policy_drop_alone_rewrite_the_frontend() {
        let mut w = fresh();
        let one = [active("10.244.1.1", 8080)];
        apply_ok(&mut w, &desired([(web(), service("web", &one))]));
        let sticky = FrontendState {
            affinity_timeout_s: Some(10_800),
            ..service("web", &one)
        };
        let stats = apply_ok(&mut w, &desired([(web(), sticky)]));
        assert_eq!(stats.frontends_written, 1);
        let svc = *w.maps.frontends.values().next().expect("frontend");
        assert_ne!(svc.flags & SVC_F_AFFINITY, 0);
        assert_eq!(svc.affinity_timeout_s, 10_800);

        let dropping = FrontendState {
            drop_when_empty: true,
            ..service("web", &[])
        };
        apply_ok(&mut w, &desired([(web(), dropping)]));
        let svc = *w.maps.frontends.values().next().expect("frontend");
        assert_eq!(svc.flags, SVC_F_POLICY_DROP);
        assert_eq!(svc.backend_count, 0);
    }

    #[test]
    fn a_removed_frontends_service_id_is_reused_with_fresh_counters() {
        let config = WriterConfig {
            max_frontends: 3,
            ..TEST_CONFIG
        };
        let mut w = MapWriter::adopt(FakeMaps::default(), config).expect("adopt");
        let one = [active("10.244.1.1", 8080)];
        apply_ok(
            &mut w,
            &desired([(web(), service("web", &one)), (api(), service("api", &one))]),
        );
        assert_eq!(w.maps.stats_reset, vec![1, 2]);
        let web_id = w.maps.frontends[&to_key(&web())].svc_id;
        apply_ok(
            &mut w,
            &desired([(api(), service("api", &one)), (dns(), service("dns", &one))]),
        );
        assert_eq!(
            w.maps.frontends[&to_key(&dns())].svc_id,
            web_id,
            "freed id reused"
        );
        assert_eq!(
            w.maps.stats_reset.last(),
            Some(&web_id),
            "its counters start from zero"
        );
    }

    #[test]
    fn running_out_of_service_ids_fails_that_frontend_only() {
        let config = WriterConfig {
            max_frontends: 2,
            ..TEST_CONFIG
        };
        let mut w = MapWriter::adopt(FakeMaps::default(), config).expect("adopt");
        let one = [active("10.244.1.1", 8080)];
        let stats = apply(
            &mut w,
            &desired([
                (web(), service("web", &one)),
                (api(), service("api", &one)),
                (dns(), service("dns", &one)),
            ]),
        );
        // Ids 1 and 2 fit; the third frontend is refused.
        assert_eq!(stats.failed, 1, "{stats:?}");
        assert_eq!(w.maps.frontends.len(), 2);
    }
}
