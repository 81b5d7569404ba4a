//! The parts of Services and EndpointSlices the planner reads, copied out of each API object
//! as it arrives so the proxy never keeps the objects themselves.
//!
//! Every node holds every Service and EndpointSlice of the cluster; as API objects (metadata,
//! target references, every optional field) 10,000 Services with 10 endpoints each took about
//! 70 MiB, as these structs about a tenth of that. The copies keep values as the API wrote
//! them (the planner still judges every field, refusing what is bad with its reason); only
//! strings many objects repeat (namespaces, node and zone names, port names, enum-like values)
//! are shared through an [`Interner`], an endpoint address in canonical dotted-quad form is
//! kept as the address, and the legacy `clusterIP` only where the planner reads it.

use std::{collections::HashSet, net::Ipv4Addr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::Service,
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};

use crate::planner::{
    ANNOTATION_LB_ALGORITHM, ANNOTATION_TOPOLOGY_MODE, LABEL_HEADLESS, LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME,
};

/// What the planner reads of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceObject {
    pub namespace: Option<Arc<str>>,
    pub name: Option<String>,
    pub created: Option<Time>,
    /// The [`LABEL_SERVICE_PROXY_NAME`] label.
    pub service_proxy_name: Option<String>,
    /// The [`ANNOTATION_LB_ALGORITHM`] annotation.
    pub lb_algorithm: Option<String>,
    /// The [`ANNOTATION_TOPOLOGY_MODE`] annotation.
    pub topology_mode: Option<String>,
    /// `spec`, `None` when the object has none.
    pub spec: Option<Box<ServiceSpec>>,
    /// `status.loadBalancer.ingress`.
    pub lb_ingress: Vec<LbIngress>,
}

/// What the planner reads of a Service's `spec`. Absent lists are empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    pub type_: Option<Arc<str>>,
    /// Kept only when `cluster_ips` is empty or it is "None" (headless): otherwise the list
    /// says everything.
    pub cluster_ip: Option<String>,
    pub cluster_ips: Vec<String>,
    pub external_ips: Vec<String>,
    pub ports: Vec<ServicePort>,
    pub session_affinity: Option<Arc<str>>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_s: Option<i32>,
    pub internal_traffic_policy: Option<Arc<str>>,
    pub external_traffic_policy: Option<Arc<str>>,
    pub traffic_distribution: Option<Arc<str>>,
}

/// One `spec.ports` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<Arc<str>>,
    pub protocol: Option<Arc<str>>,
    pub port: i32,
}

/// One `status.loadBalancer.ingress` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbIngress {
    pub ip: Option<String>,
    pub ip_mode: Option<String>,
}

/// What the planner reads of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceObject {
    pub namespace: Option<Arc<str>>,
    pub name: Option<String>,
    /// The [`LABEL_SERVICE_NAME`] label.
    pub service_name: Option<String>,
    /// Labelled [`LABEL_HEADLESS`] (any value).
    pub headless: bool,
    pub address_type: Arc<str>,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// One `ports` entry of a slice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<Arc<str>>,
    pub protocol: Option<Arc<str>>,
    pub port: Option<i32>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first of `addresses` (the one kube-proxy uses); `None` when there is none.
    pub address: Option<Address>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<Arc<str>>,
    /// `hints.forZones[].name`.
    pub zone_hints: Box<[Arc<str>]>,
}

/// An address as the API wrote it: the common case (an IPv4 address in canonical form) in four
/// bytes, anything else as its text, for the planner to judge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    V4(Ipv4Addr),
    Text(Box<str>),
}

impl Address {
    pub fn new(text: &str) -> Self {
        // Only when writing the address back gives the same text: then nothing the planner
        // checks (leading zeros, other spellings) can be lost.
        match text.parse::<Ipv4Addr>() {
            Ok(addr) if addr.to_string() == text => Self::V4(addr),
            _ => Self::Text(text.into()),
        }
    }
}

/// Shares one allocation among equal strings. Forgets strings nobody else holds when it has
/// doubled in size since it last looked, so departed nodes and namespaces do not pile up.
#[derive(Debug, Default)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
    prune_at: usize,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(held) = self.strings.get(s) {
            return held.clone();
        }
        if self.strings.len() >= self.prune_at {
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.prune_at = (self.strings.len() * 2).max(64);
        }
        let new: Arc<str> = s.into();
        self.strings.insert(new.clone());
        new
    }
}

impl ServiceObject {
    pub fn new(svc: &Service, interner: &mut Interner) -> Self {
        let meta = &svc.metadata;
        let labels = meta.labels.as_ref();
        let annotations = meta.annotations.as_ref();
        let spec = svc.spec.as_ref().map(|spec| {
            let cluster_ips = spec.cluster_ips.clone().unwrap_or_default();
            let mut intern = |s: &Option<String>| s.as_deref().map(|s| interner.intern(s));
            Box::new(ServiceSpec {
                type_: intern(&spec.type_),
                cluster_ip: spec
                    .cluster_ip
                    .clone()
                    .filter(|ip| cluster_ips.is_empty() || ip == "None"),
                cluster_ips,
                external_ips: spec.external_ips.clone().unwrap_or_default(),
                ports: spec
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| ServicePort {
                        name: intern(&p.name),
                        protocol: intern(&p.protocol),
                        port: p.port,
                    })
                    .collect(),
                session_affinity: intern(&spec.session_affinity),
                affinity_timeout_s: spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds),
                internal_traffic_policy: intern(&spec.internal_traffic_policy),
                external_traffic_policy: intern(&spec.external_traffic_policy),
                traffic_distribution: intern(&spec.traffic_distribution),
            })
        });
        let lb_ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .map(|i| LbIngress {
                ip: i.ip.clone(),
                ip_mode: i.ip_mode.clone(),
            })
            .collect();
        Self {
            namespace: meta.namespace.as_deref().map(|n| interner.intern(n)),
            name: meta.name.clone(),
            created: meta.creation_timestamp.clone(),
            service_proxy_name: labels
                .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
                .cloned(),
            lb_algorithm: annotations
                .and_then(|a| a.get(ANNOTATION_LB_ALGORITHM))
                .cloned(),
            topology_mode: annotations
                .and_then(|a| a.get(ANNOTATION_TOPOLOGY_MODE))
                .cloned(),
            spec,
            lb_ingress,
        }
    }
}

impl From<&Service> for ServiceObject {
    fn from(svc: &Service) -> Self {
        Self::new(svc, &mut Interner::default())
    }
}

impl SliceObject {
    pub fn new(slice: &EndpointSlice, interner: &mut Interner) -> Self {
        let meta = &slice.metadata;
        let labels = meta.labels.as_ref();
        Self {
            namespace: meta.namespace.as_deref().map(|n| interner.intern(n)),
            name: meta.name.clone(),
            service_name: labels.and_then(|l| l.get(LABEL_SERVICE_NAME)).cloned(),
            headless: labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)),
            address_type: interner.intern(&slice.address_type),
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePort {
                    name: p.name.as_deref().map(|n| interner.intern(n)),
                    protocol: p.protocol.as_deref().map(|n| interner.intern(n)),
                    port: p.port,
                })
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .flatten()
                .map(|e| SliceEndpoint::new(e, interner))
                .collect(),
        }
    }
}

impl From<&EndpointSlice> for SliceObject {
    fn from(slice: &EndpointSlice) -> Self {
        Self::new(slice, &mut Interner::default())
    }
}

impl SliceEndpoint {
    fn new(endpoint: &Endpoint, interner: &mut Interner) -> Self {
        let conditions = endpoint.conditions.as_ref();
        Self {
            address: endpoint.addresses.first().map(|a| Address::new(a)),
            ready: conditions.and_then(|c| c.ready),
            serving: conditions.and_then(|c| c.serving),
            terminating: conditions.and_then(|c| c.terminating),
            node_name: endpoint.node_name.as_deref().map(|n| interner.intern(n)),
            zone_hints: endpoint
                .hints
                .iter()
                .flat_map(|h| h.for_zones.iter().flatten())
                .map(|z| interner.intern(&z.name))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_ipv4_text_becomes_an_address() {
        assert_eq!(
            Address::new("10.1.0.1"),
            Address::V4(Ipv4Addr::new(10, 1, 0, 1))
        );
        for text in [
            "010.1.0.1",
            "10.1.0.01",
            "fd00::1",
            "::ffff:10.1.0.1",
            "x",
            "",
        ] {
            assert_eq!(Address::new(text), Address::Text(text.into()), "{text}");
        }
    }

    #[test]
    fn the_interner_shares_equal_strings_and_forgets_unused_ones() {
        let mut interner = Interner::default();
        let a = interner.intern("node-a");
        assert!(Arc::ptr_eq(&a, &interner.intern("node-a")));
        for i in 0..200 {
            interner.intern(&format!("gone-{i}"));
        }
        assert!(
            interner.strings.len() < 150,
            "unused strings are pruned: {}",
            interner.strings.len()
        );
        assert!(
            Arc::ptr_eq(&a, &interner.intern("node-a")),
            "a string still held stays"
        );
    }
}
