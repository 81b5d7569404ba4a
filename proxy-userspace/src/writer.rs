//! The map writer: the only code that changes the datapath maps. It diffs the desired state
//! against what it knows is in the maps and writes only the difference, in an order that never
//! shows a packet a half-written frontend: backends, then slots, then the frontend; removals in
//! reverse.
//!
//! Ids are stable: a frontend keeps its service id and a backend (per service, address, port)
//! keeps its backend id for as long as it exists, so conntrack entries stay valid while other
//! backends come and go.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use proxy_common::{
    backend::{BACKEND_ACTIVE, BACKEND_TERMINATING, Backend4, reply_filter_slot},
    service::{Frontend4Key, Service4, Slot, SlotKey},
};
use thiserror::Error;

use crate::desired::{BackendState, Desired, Frontend, FrontendState, Protocol};

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
}

/// Counts of what one `apply` changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub frontends_unchanged: usize,
    pub failed: usize,
}

pub struct MapWriter<M> {
    maps: M,
    written: BTreeMap<Frontend, Written>,
    next_svc_id: u32,
    next_backend_id: u32,
    next_revision: u32,
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

fn filter_slot(addr: Ipv4Addr, port: u16) -> u32 {
    reply_filter_slot(u32::from_ne_bytes(addr.octets()), port.to_be())
}

impl<M: MapOps> MapWriter<M> {
    /// A writer over maps that are empty or hold what an earlier svcproxy wrote: their contents
    /// are adopted as the starting point, so the first `apply` writes only real changes.
    pub fn adopt(mut maps: M) -> Result<Self, WriteError> {
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
        // Slots of services that no longer have a frontend, and backends of none: left by a
        // crash mid-write. Nothing can reach them; remove them.
        for (key, _) in &snap.slots {
            if !by_svc.contains_key(&key.svc_id) {
                maps.del_slot(*key)?;
            }
        }
        for id in orphans {
            maps.del_backend(id)?;
        }
        maps.reset_filter(&filter)?;
        Ok(Self {
            maps,
            written,
            next_svc_id,
            next_backend_id,
            next_revision,
        })
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Number of frontends currently written.
    pub fn frontend_count(&self) -> usize {
        self.written.len()
    }

    /// Makes the maps hold `desired`. A frontend whose write fails is left consistent (its old
    /// or new state, never a mix a packet could trip over), counted in `failed`, and retried on
    /// the next apply.
    pub fn apply(&mut self, desired: &Desired) -> ApplyStats {
        let mut stats = ApplyStats::default();
        let gone: Vec<Frontend> = self
            .written
            .keys()
            .filter(|fe| !desired.frontends.contains_key(fe))
            .copied()
            .collect();
        // Removals first, so a full map gets room before additions.
        for fe in gone {
            match self.remove_frontend(&fe) {
                Ok(()) => stats.frontends_removed += 1,
                Err(e) => {
                    tracing::error!(%fe, "removing frontend failed: {e}");
                    stats.failed += 1;
                }
            }
        }
        for (fe, state) in &desired.frontends {
            match self.write_frontend(fe, state) {
                Ok(true) => stats.frontends_written += 1,
                Ok(false) => stats.frontends_unchanged += 1,
                Err(e) => {
                    tracing::error!(%fe, service = %state.service, "writing frontend failed: {e}");
                    stats.failed += 1;
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
            None => {
                let id = self.next_svc_id;
                self.next_svc_id += 1;
                (id, None)
            }
        };
        let mut cur = old.clone().unwrap_or(Written {
            svc_id,
            revision: 0,
            backends: BTreeMap::new(),
            slots: Vec::new(),
            count: 0,
            in_map: false,
        });
        let proto = fe.protocol.number();

        // 1. Backends: new ones get fresh ids; existing ones keep theirs.
        let mut next = BTreeMap::new();
        for b in &state.backends {
            let id = match cur.backends.get(&(b.addr, b.port)).copied() {
                Some((id, st)) if st == b.state => id,
                Some((id, _)) => {
                    self.maps
                        .put_backend(id, backend_value(b.addr, b.port, proto, b.state, svc_id))?;
                    cur.backends.insert((b.addr, b.port), (id, b.state));
                    id
                }
                None => {
                    let id = self.next_backend_id;
                    self.next_backend_id += 1;
                    self.maps
                        .put_backend(id, backend_value(b.addr, b.port, proto, b.state, svc_id))?;
                    cur.backends.insert((b.addr, b.port), (id, b.state));
                    self.written.insert(*fe, cur.clone());
                    self.maps.filter_add(filter_slot(b.addr, b.port), 1)?;
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
        let changed = !cur.in_map || cur.count != count || cur.revision != revision;
        if changed {
            let value = Service4 {
                svc_id,
                backend_count: count,
                flags: 0,
                revision,
                _pad: 0,
            };
            self.maps.put_frontend(to_key(fe), value)?;
            cur.count = count;
            cur.revision = revision;
            cur.in_map = true;
            self.written.insert(*fe, cur.clone());
        }

        // 4. Slots past the new count, then backends no longer wanted.
        while cur.slots.len() > slots.len() {
            self.maps.del_slot(SlotKey {
                svc_id,
                slot: cur.slots.len() as u32,
            })?;
            cur.slots.pop();
            self.written.insert(*fe, cur.clone());
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
            self.written.insert(*fe, cur.clone());
            self.maps.filter_add(filter_slot(addr, port), -1)?;
        }
        Ok(changed || slots_changed || backends_changed)
    }

    /// Removes a frontend: the frontend first, so no packet finds it, then its slots and
    /// backends.
    fn remove_frontend(&mut self, fe: &Frontend) -> Result<(), WriteError> {
        let Some(w) = self.written.get(fe).cloned() else {
            return Ok(());
        };
        self.maps.del_frontend(to_key(fe))?;
        for slot in 1..=w.slots.len() as u32 {
            self.maps.del_slot(SlotKey {
                svc_id: w.svc_id,
                slot,
            })?;
        }
        for ((addr, port), (id, _)) in &w.backends {
            self.maps.del_backend(*id)?;
            self.maps.filter_add(filter_slot(*addr, *port), -1)?;
        }
        self.written.remove(fe);
        Ok(())
    }
}
