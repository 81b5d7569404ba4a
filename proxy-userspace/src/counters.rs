//! The datapath's counters as `/metrics` shows them: read from the kernel at scrape time (the
//! kernel keeps the running totals, so reading more often would only cost syscalls) and named
//! through the [`Directory`] the run loop keeps after every sync.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
};

use crate::{
    desired::{Desired, Frontend},
    kernel_maps::StatsReader,
    loader::MapSizes,
    metrics::{DatapathSnapshot, MapUsage, ServiceLabels},
    writer::{MapOps, MapWriter},
};

/// What the kernel's counters cannot say by themselves: which Service a service id belongs to,
/// and how full the writer's maps are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    /// Shared with the [`Names`] that keeps them: a scrape copies a pointer.
    pub services: Arc<BTreeMap<u32, ServiceLabels>>,
    pub maps: Vec<MapUsage>,
}

/// The names behind service ids, kept up to date frontend by frontend as syncs change them.
/// Frontends the writer holds but the desired state no longer has (a removal that failed and
/// waits for its retry) keep counting, under no name rather than a wrong one, so they are left
/// out.
#[derive(Debug, Default)]
pub struct Names {
    ids: HashMap<Frontend, u32>,
    services: Arc<BTreeMap<u32, ServiceLabels>>,
}

impl Names {
    /// After `writer` applied `desired`, looking at [`MapWriter::looked_at`]: nothing else can
    /// have changed its service id or its name.
    pub fn update<M: MapOps>(&mut self, writer: &MapWriter<M>, desired: &Desired) {
        let services = Arc::make_mut(&mut self.services);
        let looked_at = writer.looked_at();
        // Every old name first: an id freed by one frontend may go to another in one sync.
        for fe in looked_at {
            if let Some(id) = self.ids.remove(fe) {
                services.remove(&id);
            }
        }
        for fe in looked_at {
            let (Some(id), Some(state)) = (writer.service_id(fe), desired.frontends.get(fe)) else {
                continue;
            };
            self.ids.insert(*fe, id);
            services.insert(id, ServiceLabels::new(&state.service, &state.port_name));
        }
    }
}

impl Directory {
    /// The directory after `writer` applied a desired state named by `names`.
    pub fn of<M: MapOps>(writer: &MapWriter<M>, names: &Names, sizes: &MapSizes) -> Self {
        let services = Arc::clone(&names.services);
        let usage = writer.usage();
        let map = |name: &str, entries, capacity| MapUsage {
            name: name.to_owned(),
            entries,
            capacity: u64::from(capacity),
        };
        let maps = vec![
            map(
                proxy_common::service::FRONTENDS4,
                usage.frontends,
                sizes.frontends,
            ),
            map(proxy_common::service::SLOTS, usage.slots, sizes.slots),
            map(
                proxy_common::backend::BACKENDS4,
                usage.backends,
                sizes.backends,
            ),
            map(
                proxy_common::service::MAGLEV4,
                usage.maglev,
                sizes.maglev_entries,
            ),
        ];
        Self { services, maps }
    }
}

/// The directory shared between the run loop (which replaces it after each sync) and the
/// metrics collector (which reads it on each scrape).
pub type SharedDirectory = Arc<Mutex<Directory>>;

/// Reads the datapath's counters for the metrics collector.
pub struct CounterReader {
    stats: StatsReader,
    directory: SharedDirectory,
}

impl CounterReader {
    pub fn new(stats: StatsReader, directory: SharedDirectory) -> Self {
        Self { stats, directory }
    }
}

impl crate::metrics::DatapathReader for CounterReader {
    fn read(&self) -> Result<DatapathSnapshot, String> {
        let outcomes = self
            .stats
            .read()
            .map_err(|e| format!("outcome counters: {e}"))?;
        // Copied out so a scrape never holds up a sync that wants to publish.
        let directory = self
            .directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut services = Vec::with_capacity(directory.services.len());
        for (&id, labels) in directory.services.iter() {
            let stats = self
                .stats
                .read_service(id)
                .map_err(|e| format!("counters of service id {id} ({labels:?}): {e}"))?;
            services.push((labels.clone(), stats));
        }
        Ok(DatapathSnapshot {
            outcomes,
            services,
            maps: directory.maps,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proxy_common::{
        backend::Backend4,
        service::{Frontend4Key, Service4, Slot, SlotKey},
    };

    use super::*;
    use crate::{
        desired::{FrontendState, Protocol, ServiceName},
        writer::{Snapshot, WriteError, WriterConfig},
    };

    /// Maps that accept every write: only the writer's bookkeeping matters here.
    struct Accepting;

    impl MapOps for Accepting {
        fn put_frontend(&mut self, _: Frontend4Key, _: Service4) -> Result<(), WriteError> {
            Ok(())
        }
        fn del_frontend(&mut self, _: Frontend4Key) -> Result<(), WriteError> {
            Ok(())
        }
        fn put_slot(&mut self, _: SlotKey, _: Slot) -> Result<(), WriteError> {
            Ok(())
        }
        fn del_slot(&mut self, _: SlotKey) -> Result<(), WriteError> {
            Ok(())
        }
        fn put_backend(&mut self, _: u32, _: Backend4) -> Result<(), WriteError> {
            Ok(())
        }
        fn del_backend(&mut self, _: u32) -> Result<(), WriteError> {
            Ok(())
        }
        fn put_maglev(&mut self, _: SlotKey, _: Slot) -> Result<(), WriteError> {
            Ok(())
        }
        fn del_maglev(&mut self, _: SlotKey) -> Result<(), WriteError> {
            Ok(())
        }
        fn put_meta(
            &mut self,
            _: u32,
            _: proxy_common::meta::ServiceMeta,
        ) -> Result<(), WriteError> {
            Ok(())
        }
        fn del_meta(&mut self, _: u32) -> Result<(), WriteError> {
            Ok(())
        }
        fn reset_svc_stats(&mut self, _: u32) -> Result<(), WriteError> {
            Ok(())
        }
        fn filter_add(&mut self, _: u32, _: i32) -> Result<(), WriteError> {
            Ok(())
        }
        fn snapshot(&mut self) -> Result<Snapshot, WriteError> {
            Ok(Snapshot::default())
        }
        fn reset_filter(&mut self, _: &HashMap<u32, u32>) -> Result<(), WriteError> {
            Ok(())
        }
    }

    fn frontend(last: u8) -> Frontend {
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, last),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn desired(names: &[(u8, &str)]) -> Desired {
        let mut d = Desired::default();
        for &(last, name) in names {
            let state = FrontendState {
                service: ServiceName {
                    namespace: "dev".into(),
                    name: name.into(),
                },
                ..FrontendState::default()
            };
            d.frontends.insert(frontend(last), Arc::new(state));
        }
        d
    }

    fn named(names: &Names) -> Vec<(u32, String)> {
        names
            .services
            .iter()
            .map(|(id, l)| (*id, l.name.clone()))
            .collect()
    }

    #[test]
    fn names_follow_each_sync_and_a_reused_service_id_takes_its_new_name() {
        let config = WriterConfig {
            max_frontends: 16,
            maglev_table_size: 7,
        };
        let mut writer = MapWriter::adopt(Accepting, config).unwrap_or_else(|e| panic!("{e}"));
        let mut names = Names::default();
        let first = desired(&[(2, "b"), (3, "a")]);
        writer.apply(&first);
        names.update(&writer, &first);
        assert_eq!(named(&names), [(1, "b".into()), (2, "a".into())]);

        // a goes and c comes in one sync: c (looked at first) gets a's freed id, and keeps
        // its name when a's is taken off.
        let second = desired(&[(1, "c"), (2, "b")]);
        let changed = [frontend(1), frontend(3)].into_iter().collect();
        writer.apply_changed(&second, &changed);
        assert_eq!(writer.service_id(&frontend(1)), Some(2));
        names.update(&writer, &second);
        assert_eq!(named(&names), [(1, "b".into()), (2, "c".into())]);
    }
}
