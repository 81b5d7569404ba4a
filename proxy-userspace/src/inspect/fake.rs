//! In-memory maps for the inspection tests, filled through the real map writer (so they hold
//! exactly what it writes, metadata and Maglev tables included) plus flows and affinity entries
//! as the datapath would add them.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    rc::Rc,
};

use proxy_common::{
    backend::Backend4,
    conntrack::{AffinityEntry, AffinityKey4, CtEntry4, CtKey4},
    meta::ServiceMeta,
    service::{Frontend4Key, Service4, Slot, SlotKey},
    stats::{STAT_COUNT, SvcStats},
};

use super::{InspectError, MapView};
use crate::{
    desired::Desired,
    writer::{MapOps, MapWriter, Snapshot, WriteError, WriterConfig},
};

#[derive(Default)]
pub struct State {
    pub frontends: BTreeMap<Frontend4Key, Service4>,
    pub slots: HashMap<(u32, u32), u32>,
    pub maglev: HashMap<(u32, u32), u32>,
    pub backends: BTreeMap<u32, Backend4>,
    pub meta: HashMap<u32, ServiceMeta>,
    pub flows: Vec<(CtKey4, CtEntry4)>,
    pub affinity: HashMap<AffinityKey4, AffinityEntry>,
    pub counters: HashMap<u32, SvcStats>,
    pub outcomes: [u64; STAT_COUNT as usize],
    pub now_ns: u64,
}

/// A handle on shared [`State`]: one goes to the writer, the test keeps another.
#[derive(Clone, Default)]
pub struct FakeMaps(pub Rc<RefCell<State>>);

/// Small enough to keep tests fast; prime, as the loader insists.
pub const TEST_MAGLEV: u32 = 251;

impl FakeMaps {
    /// Maps holding `desired` as the writer writes it, with the clock at `now_ns`.
    pub fn written(desired: &Desired, now_ns: u64) -> Self {
        let maps = Self::default();
        maps.0.borrow_mut().now_ns = now_ns;
        let config = WriterConfig {
            max_frontends: 1024,
            maglev_table_size: TEST_MAGLEV,
        };
        let mut writer = match MapWriter::adopt(maps.clone(), config) {
            Ok(w) => w,
            Err(e) => panic!("adopting empty fake maps: {e}"),
        };
        let stats = writer.apply(desired);
        assert_eq!(stats.failed, 0, "writing the fake maps failed");
        maps
    }

    pub fn state(&self) -> std::cell::RefMut<'_, State> {
        self.0.borrow_mut()
    }
}

impl MapOps for FakeMaps {
    fn put_frontend(&mut self, key: Frontend4Key, value: Service4) -> Result<(), WriteError> {
        self.state().frontends.insert(key, value);
        Ok(())
    }
    fn del_frontend(&mut self, key: Frontend4Key) -> Result<(), WriteError> {
        self.state().frontends.remove(&key);
        Ok(())
    }
    fn put_slot(&mut self, key: SlotKey, value: Slot) -> Result<(), WriteError> {
        self.state()
            .slots
            .insert((key.svc_id, key.slot), value.backend_id);
        Ok(())
    }
    fn del_slot(&mut self, key: SlotKey) -> Result<(), WriteError> {
        self.state().slots.remove(&(key.svc_id, key.slot));
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: Backend4) -> Result<(), WriteError> {
        self.state().backends.insert(id, value);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), WriteError> {
        self.state().backends.remove(&id);
        Ok(())
    }
    fn put_maglev(&mut self, key: SlotKey, value: Slot) -> Result<(), WriteError> {
        self.state()
            .maglev
            .insert((key.svc_id, key.slot), value.backend_id);
        Ok(())
    }
    fn del_maglev(&mut self, key: SlotKey) -> Result<(), WriteError> {
        self.state().maglev.remove(&(key.svc_id, key.slot));
        Ok(())
    }
    fn put_meta(&mut self, svc_id: u32, value: ServiceMeta) -> Result<(), WriteError> {
        self.state().meta.insert(svc_id, value);
        Ok(())
    }
    fn del_meta(&mut self, svc_id: u32) -> Result<(), WriteError> {
        self.state().meta.remove(&svc_id);
        Ok(())
    }
    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<(), WriteError> {
        self.state().counters.remove(&svc_id);
        Ok(())
    }
    fn filter_add(&mut self, _slot: u32, _delta: i32) -> Result<(), WriteError> {
        Ok(())
    }
    fn snapshot(&mut self) -> Result<Snapshot, WriteError> {
        Ok(Snapshot::default())
    }
    fn reset_filter(&mut self, _counts: &HashMap<u32, u32>) -> Result<(), WriteError> {
        Ok(())
    }
}

impl MapView for FakeMaps {
    fn frontends(&self) -> Result<Vec<(Frontend4Key, Service4)>, InspectError> {
        Ok(self
            .0
            .borrow()
            .frontends
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect())
    }
    fn backends(&self) -> Result<Vec<(u32, Backend4)>, InspectError> {
        Ok(self
            .0
            .borrow()
            .backends
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect())
    }
    fn flows(&self) -> Result<Vec<(CtKey4, CtEntry4)>, InspectError> {
        Ok(self.0.borrow().flows.clone())
    }
    fn frontend(&self, key: &Frontend4Key) -> Result<Option<Service4>, InspectError> {
        Ok(self.0.borrow().frontends.get(key).copied())
    }
    fn slot(&self, key: &SlotKey) -> Result<Option<Slot>, InspectError> {
        let s = self.0.borrow();
        Ok(s.slots
            .get(&(key.svc_id, key.slot))
            .map(|&backend_id| Slot { backend_id }))
    }
    fn maglev(&self, key: &SlotKey) -> Result<Option<Slot>, InspectError> {
        let s = self.0.borrow();
        Ok(s.maglev
            .get(&(key.svc_id, key.slot))
            .map(|&backend_id| Slot { backend_id }))
    }
    fn backend(&self, id: u32) -> Result<Option<Backend4>, InspectError> {
        Ok(self.0.borrow().backends.get(&id).copied())
    }
    fn meta(&self, svc_id: u32) -> Result<Option<ServiceMeta>, InspectError> {
        Ok(self.0.borrow().meta.get(&svc_id).copied())
    }
    fn flow(&self, key: &CtKey4) -> Result<Option<CtEntry4>, InspectError> {
        Ok(self
            .0
            .borrow()
            .flows
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v))
    }
    fn affinity(&self, key: &AffinityKey4) -> Result<Option<AffinityEntry>, InspectError> {
        Ok(self.0.borrow().affinity.get(key).copied())
    }
    fn service_counters(&self, svc_id: u32) -> Result<SvcStats, InspectError> {
        Ok(self
            .0
            .borrow()
            .counters
            .get(&svc_id)
            .copied()
            .unwrap_or_default())
    }
    fn outcomes(&self) -> Result<[u64; STAT_COUNT as usize], InspectError> {
        Ok(self.0.borrow().outcomes)
    }
    fn now_ns(&self) -> u64 {
        self.0.borrow().now_ns
    }
}
