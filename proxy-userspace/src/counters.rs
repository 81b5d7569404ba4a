//! The datapath's counters as `/metrics` shows them: read from the kernel at scrape time (the
//! kernel keeps the running totals, so reading more often would only cost syscalls) and named
//! through the [`Directory`] the run loop keeps after every sync.

use std::sync::{Arc, Mutex, PoisonError};

use crate::{
    desired::Desired,
    kernel_maps::StatsReader,
    loader::MapSizes,
    metrics::{DatapathSnapshot, MapUsage, ServiceLabels},
    writer::{MapOps, MapWriter},
};

/// What the kernel's counters cannot say by themselves: which Service a service id belongs to,
/// and how full the writer's maps are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    pub services: Vec<(u32, ServiceLabels)>,
    pub maps: Vec<MapUsage>,
}

impl Directory {
    /// The directory after `writer` applied `desired`. Frontends the writer holds but `desired`
    /// no longer has (a removal that failed and waits for its retry) keep counting, under no
    /// name rather than a wrong one, so they are left out.
    pub fn of<M: MapOps>(writer: &MapWriter<M>, desired: &Desired, sizes: &MapSizes) -> Self {
        let services = writer
            .service_ids()
            .filter_map(|(fe, id)| {
                let state = desired.frontends.get(fe)?;
                Some((id, ServiceLabels::new(&state.service, &state.port_name)))
            })
            .collect();
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
        for (id, labels) in directory.services {
            let stats = self
                .stats
                .read_service(id)
                .map_err(|e| format!("counters of service id {id} ({labels:?}): {e}"))?;
            services.push((labels, stats));
        }
        Ok(DatapathSnapshot {
            outcomes,
            services,
            maps: directory.maps,
        })
    }
}
