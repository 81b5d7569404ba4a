//! `svcproxy inspect services`: every frontend with its Service's name, its backends with their
//! state and share of new flows, and its counters.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use proxy_common::{
    backend::{BACKEND_ACTIVE, BACKEND_TERMINATING, Backend4},
    service::{SVC_F_AFFINITY, SVC_F_MAGLEV, SVC_F_POLICY_DROP, Service4, SlotKey},
    stats::STAT_NAMES,
};
use serde::Serialize;

use super::{InspectError, MapView, ip, proto_name, reason_names};
use crate::svc_meta;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicesReport {
    pub services: Vec<FrontendReport>,
    /// The datapath's outcome counters (every packet it saw, by what it did), summed over CPUs.
    pub outcomes: BTreeMap<&'static str, u64>,
}

/// One frontend (a Service address, port and protocol).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendReport {
    /// `10.96.0.10:80/TCP`.
    pub frontend: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    pub service_id: u32,
    /// From the metadata record; `None` if it has none (pins of an older svcproxy).
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub port_name: Option<String>,
    /// `ClusterIP`, `externalIP` or `LoadBalancer`.
    pub address_kind: Option<&'static str>,
    /// `random` or `maglev`.
    pub algorithm: &'static str,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity_timeout_s: Option<u32>,
    /// What a new flow gets when no backend is active: `reject` (no endpoints) or `drop`
    /// (endpoints exist, none usable for traffic here).
    pub without_backends: &'static str,
    /// Why the backends are the ones they are (see `svcproxy explain`).
    pub reasons: Vec<&'static str>,
    /// The zone topology-aware routing keeps.
    pub zone: Option<String>,
    pub revision: u32,
    pub backends: Vec<BackendReport>,
    pub counters: Counters,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendReport {
    pub id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    /// `active` (takes new flows) or `terminating` (keeps its flows, gets no new ones).
    pub state: String,
    /// Share of new flows it gets (0 to 1): its slots out of the backend count, or its Maglev
    /// table entries out of the table size. `None` when not knowable (Maglev table size
    /// unrecorded).
    pub weight: Option<f64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

pub(crate) fn state_name(state: u8) -> String {
    match state {
        BACKEND_ACTIVE => "active".into(),
        BACKEND_TERMINATING => "terminating".into(),
        n => format!("unknown({n})"),
    }
}

pub(crate) fn algorithm_name(svc: &Service4) -> &'static str {
    if svc.flags & SVC_F_MAGLEV != 0 {
        "maglev"
    } else {
        "random"
    }
}

pub fn gather(maps: &impl MapView) -> Result<ServicesReport, InspectError> {
    let mut by_svc: HashMap<u32, Vec<(u32, Backend4)>> = HashMap::new();
    for (id, b) in maps.backends()? {
        by_svc.entry(b.svc_id).or_default().push((id, b));
    }
    let mut services = Vec::new();
    for (key, svc) in maps.frontends()? {
        let meta = maps.meta(svc.svc_id)?.map(|m| svc_meta::decode(&m));
        let weights = weights(maps, &svc, meta.as_ref().map(|m| m.maglev_table_size))?;
        let mut backends: Vec<BackendReport> = by_svc
            .get(&svc.svc_id)
            .into_iter()
            .flatten()
            .map(|(id, b)| BackendReport {
                id: *id,
                address: ip(b.addr_be),
                port: u16::from_be(b.port_be),
                state: state_name(b.state),
                weight: weights.as_ref().map(|w| w.get(id).copied().unwrap_or(0.0)),
            })
            .collect();
        backends.sort_by_key(|b| (b.address, b.port, b.id));
        let c = maps.service_counters(svc.svc_id)?;
        let (address, port, protocol) = (ip(key.addr_be), u16::from_be(key.port_be), key.proto);
        services.push(FrontendReport {
            frontend: format!("{address}:{port}/{}", proto_name(protocol)),
            address,
            port,
            protocol: proto_name(protocol),
            service_id: svc.svc_id,
            namespace: meta.as_ref().map(|m| m.namespace.clone()),
            name: meta.as_ref().map(|m| m.name.clone()),
            port_name: meta.as_ref().map(|m| m.port_name.clone()),
            address_kind: meta.as_ref().map(|m| m.addr_kind),
            algorithm: algorithm_name(&svc),
            affinity_timeout_s: (svc.flags & SVC_F_AFFINITY != 0).then_some(svc.affinity_timeout_s),
            without_backends: if svc.flags & SVC_F_POLICY_DROP != 0 {
                "drop"
            } else {
                "reject"
            },
            reasons: meta
                .as_ref()
                .map(|m| reason_names(m.reasons))
                .unwrap_or_default(),
            zone: meta
                .as_ref()
                .map(|m| m.zone.clone())
                .filter(|z| !z.is_empty()),
            revision: svc.revision,
            backends,
            counters: Counters {
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
            },
        });
    }
    services.sort_by(|a, b| {
        (
            &a.namespace,
            &a.name,
            &a.port_name,
            a.address,
            a.port,
            &a.protocol,
        )
            .cmp(&(
                &b.namespace,
                &b.name,
                &b.port_name,
                b.address,
                b.port,
                &b.protocol,
            ))
    });
    let outcomes = maps.outcomes()?;
    Ok(ServicesReport {
        services,
        outcomes: STAT_NAMES.iter().copied().zip(outcomes).collect(),
    })
}

/// Each backend id's share of new flows: what the datapath picks from (the slots, or the whole
/// Maglev table). `None` when the Maglev table size is unknown.
pub(crate) fn weights(
    maps: &impl MapView,
    svc: &Service4,
    maglev_table_size: Option<u32>,
) -> Result<Option<HashMap<u32, f64>>, InspectError> {
    let mut counts: HashMap<u32, u32> = HashMap::new();
    let (table, total): (bool, u32) = if svc.flags & SVC_F_MAGLEV != 0 {
        match maglev_table_size {
            Some(m) if m > 0 => (true, m),
            _ => return Ok(None),
        }
    } else {
        (false, u32::from(svc.backend_count))
    };
    for slot in 0..total {
        let key = SlotKey {
            svc_id: svc.svc_id,
            // Slots count from 1, Maglev entries from 0.
            slot: if table { slot } else { slot + 1 },
        };
        let entry = if table {
            maps.maglev(&key)?
        } else {
            maps.slot(&key)?
        };
        if let Some(s) = entry {
            *counts.entry(s.backend_id).or_default() += 1;
        }
    }
    Ok(Some(
        counts
            .into_iter()
            .map(|(id, n)| (id, f64::from(n) / f64::from(total.max(1))))
            .collect(),
    ))
}
