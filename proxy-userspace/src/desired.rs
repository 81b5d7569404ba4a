//! The desired datapath state: what the planner computes from Kubernetes objects and the map
//! writer makes true in the kernel. Plain host types (no map layouts) so the planner stays pure
//! and testable without a kernel.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, sync::Arc};

/// IP protocols a Service port can declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number, as stored in the frontend key.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    /// Parses Kubernetes' spelling; `None` (unset) means TCP, as the API defaults it.
    pub fn from_k8s(value: Option<&str>) -> Option<Self> {
        match value.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// A Service's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where a Service accepts traffic: one address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol)
    }
}

/// Whether a backend takes new flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendState {
    /// Selected for new flows (ready, or the serving+terminating fallback).
    Active,
    /// Present but not selected: existing flows continue until it is deleted.
    Terminating,
}

/// One endpoint address and target port behind a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
}

/// How new flows pick a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Uniformly at random.
    #[default]
    Random,
    /// Maglev consistent hashing of the 5-tuple.
    Maglev,
}

/// What one frontend should do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendState {
    pub service: ServiceName,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// Backends sorted by (addr, port), each address:port once.
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    pub algorithm: Algorithm,
    /// With no active backend: drop (endpoints exist, none usable for traffic here) rather
    /// than reject (no endpoints at all).
    pub drop_when_empty: bool,
    /// Why the backends are the ones they are (for inspection only).
    pub selection: Selection,
}

/// Why a frontend's backends are what they are: written to the pinned metadata map for
/// `svcproxy explain`; the datapath never needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub addr_kind: AddrKind,
    /// `internalTrafficPolicy: Local`: only this node's endpoints.
    pub node_local: bool,
    /// Topology-aware routing kept only the endpoints hinted for this zone.
    pub topology_zone: Option<String>,
    /// The Service asks for topology-aware routing but its hints do not allow it.
    pub topology_ignored: bool,
    /// No ready endpoint: the serving and terminating ones take new flows.
    pub terminating_fallback: bool,
    /// `externalTrafficPolicy: Local`, not applied to pod traffic to an external or LB IP.
    pub external_local_not_applied: bool,
}

/// Which of the Service's addresses a frontend serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AddrKind {
    #[default]
    ClusterIp,
    ExternalIp,
    LoadBalancer,
}

impl FrontendState {
    /// Backends that take new flows, in slot order.
    pub fn active(&self) -> impl Iterator<Item = &Backend> {
        self.backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
    }
}

/// An object (or part of one) the planner refused, with the reason: reported to the operator,
/// never silently dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// "Service dev/ent" or "EndpointSlice dev/ent-abc12".
    pub object: String,
    pub reason: String,
}

/// The whole desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Each state shared with the planner's cache, which keeps it once.
    pub frontends: BTreeMap<Frontend, Arc<FrontendState>>,
    pub rejections: Vec<Rejection>,
}
