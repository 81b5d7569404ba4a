//! `svcproxy inspect flows`: the conntrack table's forward entries (one per flow), translated
//! back to Service names.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddrV4,
};

use proxy_common::{
    conntrack::{CT_DIR_FORWARD, CT_F_CLOSING, CT_F_SYN_ONLY, PROTO_TCP, TCP_ACK, ct_is_live},
    meta::ServiceMeta,
};
use serde::Serialize;

use super::{InspectError, MapView, args::ServiceRef, ip, proto_name};
use crate::svc_meta;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowsReport {
    pub flows: Vec<FlowReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowReport {
    pub protocol: String,
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    /// Where the flow is translated to.
    pub backend: SocketAddrV4,
    pub backend_id: u32,
    pub service_id: u32,
    /// `namespace/name` from the metadata record; `None` if the service id has none (its
    /// Service is gone, and the entry waits for its timeout or eviction).
    pub service: Option<String>,
    pub port_name: Option<String>,
    /// TCP: `syn_sent`, `established` or `closing`; other protocols: `open`.
    pub state: &'static str,
    /// Seconds since the flow last refreshed its entry (the datapath refreshes at most once a
    /// second).
    pub idle_s: f64,
    /// False once idle past its timeout: the next packet starts a new flow.
    pub live: bool,
    /// Whether its backend still exists for its Service: if not, the next packet moves it.
    pub backend_current: bool,
}

fn state(proto: u8, flags: u16) -> &'static str {
    if proto != PROTO_TCP {
        "open"
    } else if flags & CT_F_CLOSING != 0 {
        "closing"
    } else if flags & CT_F_SYN_ONLY != 0 {
        "syn_sent"
    } else {
        "established"
    }
}

/// The flows, of one Service if `only` names one, sorted by Service, client and frontend.
pub fn gather(maps: &impl MapView, only: Option<&ServiceRef>) -> Result<FlowsReport, InspectError> {
    let now = maps.now_ns();
    let backends: HashMap<u32, u32> = maps
        .backends()?
        .into_iter()
        .map(|(id, b)| (id, b.svc_id))
        .collect();
    let mut names: HashMap<u32, Option<ServiceMeta>> = HashMap::new();
    // Keyed by the map key: the kernel's iteration may show an entry twice.
    let mut flows = BTreeMap::new();
    for (key, entry) in maps.flows()? {
        if key.dir != CT_DIR_FORWARD {
            continue;
        }
        let meta = match names.get(&entry.svc_id) {
            Some(m) => *m,
            None => {
                let m = maps.meta(entry.svc_id)?;
                names.insert(entry.svc_id, m);
                m
            }
        }
        .map(|m| svc_meta::decode(&m));
        if let Some(only) = only
            && !meta
                .as_ref()
                .is_some_and(|m| m.namespace == only.namespace && m.name == only.name)
        {
            continue;
        }
        let flow = FlowReport {
            protocol: proto_name(key.proto),
            client: SocketAddrV4::new(ip(key.saddr_be), u16::from_be(key.sport_be)),
            frontend: SocketAddrV4::new(ip(key.daddr_be), u16::from_be(key.dport_be)),
            backend: SocketAddrV4::new(ip(entry.nat_addr_be), u16::from_be(entry.nat_port_be)),
            backend_id: entry.backend_id,
            service_id: entry.svc_id,
            service: meta.as_ref().map(|m| format!("{}/{}", m.namespace, m.name)),
            port_name: meta.as_ref().map(|m| m.port_name.clone()),
            state: state(key.proto, entry.flags),
            idle_s: now.saturating_sub(entry.last_seen_ns) as f64 / 1e9,
            // As the datapath judges the flow's next packet (an ACK for TCP).
            live: ct_is_live(entry.last_seen_ns, entry.flags, key.proto, TCP_ACK, now),
            backend_current: backends.get(&entry.backend_id) == Some(&entry.svc_id),
        };
        flows.insert(
            (flow.service.clone(), flow.client, flow.frontend, key.proto),
            flow,
        );
    }
    Ok(FlowsReport {
        flows: flows.into_values().collect(),
    })
}
