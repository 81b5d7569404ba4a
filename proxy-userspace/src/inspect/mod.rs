//! `svcproxy inspect` and `svcproxy explain`: what the datapath holds and would do, read from
//! the pinned maps alone, so it works the same while svcproxy runs and after it stopped.
//!
//! Gathering ([`services`], [`flows`], [`explain`]) is pure over a [`MapView`]: the pinned maps
//! ([`pins::PinnedMaps`], read-only) or an in-memory fake in tests. Rendering ([`render`]) is
//! separate, so the table and the JSON say the same thing. Names come from the metadata map the
//! map writer keeps ([`proxy_common::meta`]); decisions reuse the datapath's own functions
//! ([`proxy_common::select`], [`proxy_common::conntrack::ct_is_live`]).

pub mod args;
pub mod explain;
pub mod flows;
pub mod pins;
pub mod render;
pub mod services;

use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use proxy_common::{
    backend::Backend4,
    conntrack::{AffinityEntry, AffinityKey4, CtEntry4, CtKey4},
    meta::{
        META_R_EXTERNAL_LOCAL_NOT_APPLIED, META_R_NODE_LOCAL, META_R_TERMINATING_FALLBACK,
        META_R_TOPOLOGY, META_R_TOPOLOGY_IGNORED, META_R_TRUNCATED, ServiceMeta,
    },
    service::{Frontend4Key, Service4, Slot, SlotKey},
    stats::{STAT_COUNT, SvcStats},
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum InspectError {
    #[error(
        "no svcproxy maps are pinned in {dir}: has `svcproxy run` run with this --pin-path? \
         (cleanup removes them)"
    )]
    NotPinned { dir: PathBuf },
    #[error(
        "{path} is missing: the pins were left by another svcproxy version; inspect with the \
         version that runs, or let this one start once to create it"
    )]
    MissingMap { path: PathBuf },
    #[error("cannot open {path} read-only: {source}{hint}")]
    Open {
        path: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
    #[error("{path} does not have this build's layout: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error("reading map {map} failed: {reason}")]
    Read { map: &'static str, reason: String },
    #[error("cannot count the possible CPUs ({0}): {1}")]
    Cpus(&'static str, io::Error),
}

/// What to inspect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Services,
    /// Flows, of one Service if given.
    Flows(Option<args::ServiceRef>),
    Explain(args::Source, args::Destination),
}

/// Opens the maps pinned in `pin_path` read-only and answers `request` in `output` form.
pub fn run(
    pin_path: &Path,
    request: &Request,
    output: render::Output,
) -> Result<String, InspectError> {
    let maps = pins::PinnedMaps::open(pin_path)?;
    answer(&maps, request, output)
}

/// Answers `request` from `maps`.
pub fn answer(
    maps: &impl MapView,
    request: &Request,
    output: render::Output,
) -> Result<String, InspectError> {
    use render::Output::{Json, Table};
    Ok(match request {
        Request::Services => {
            let r = services::gather(maps)?;
            match output {
                Table => render::services_table(&r),
                Json => render::json(&r),
            }
        }
        Request::Flows(only) => {
            let r = flows::gather(maps, only.as_ref())?;
            match output {
                Table => render::flows_table(&r),
                Json => render::json(&r),
            }
        }
        Request::Explain(src, dst) => {
            let r = explain::explain(maps, *src, *dst)?;
            match output {
                Table => render::explain_text(&r),
                Json => render::json(&r),
            }
        }
    })
}

/// Read access to the datapath's maps.
pub trait MapView {
    fn frontends(&self) -> Result<Vec<(Frontend4Key, Service4)>, InspectError>;
    fn backends(&self) -> Result<Vec<(u32, Backend4)>, InspectError>;
    /// Every conntrack entry, both directions.
    fn flows(&self) -> Result<Vec<(CtKey4, CtEntry4)>, InspectError>;
    fn frontend(&self, key: &Frontend4Key) -> Result<Option<Service4>, InspectError>;
    fn slot(&self, key: &SlotKey) -> Result<Option<Slot>, InspectError>;
    fn maglev(&self, key: &SlotKey) -> Result<Option<Slot>, InspectError>;
    fn backend(&self, id: u32) -> Result<Option<Backend4>, InspectError>;
    fn meta(&self, svc_id: u32) -> Result<Option<ServiceMeta>, InspectError>;
    fn flow(&self, key: &CtKey4) -> Result<Option<CtEntry4>, InspectError>;
    fn affinity(&self, key: &AffinityKey4) -> Result<Option<AffinityEntry>, InspectError>;
    /// A service id's counters summed over CPUs.
    fn service_counters(&self, svc_id: u32) -> Result<SvcStats, InspectError>;
    /// The outcome counters summed over CPUs, indexed like `STAT_NAMES`.
    fn outcomes(&self) -> Result<[u64; STAT_COUNT as usize], InspectError>;
    /// The datapath's clock now (`bpf_ktime_get_ns`).
    fn now_ns(&self) -> u64;
}

/// Addresses are stored as loaded from the packet (network order in a native u32).
pub(crate) fn ip(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_be.to_ne_bytes())
}

pub(crate) fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The protocol's name as Kubernetes spells it, or its number.
pub(crate) fn proto_name(proto: u8) -> String {
    match proto {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

/// The `META_R_*` bits as stable names (JSON) in a fixed order.
pub(crate) fn reason_names(reasons: u32) -> Vec<&'static str> {
    [
        (META_R_NODE_LOCAL, "internal_traffic_policy_local"),
        (META_R_TOPOLOGY, "topology_zone"),
        (META_R_TOPOLOGY_IGNORED, "topology_hints_unusable"),
        (META_R_TERMINATING_FALLBACK, "terminating_fallback"),
        (
            META_R_EXTERNAL_LOCAL_NOT_APPLIED,
            "external_traffic_policy_local_not_applied",
        ),
        (META_R_TRUNCATED, "names_truncated"),
    ]
    .into_iter()
    .filter(|(bit, _)| reasons & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
