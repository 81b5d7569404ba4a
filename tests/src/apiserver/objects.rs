//! The resource kinds the stand-in API server serves, and builders for their JSON shaped
//! like what kube-apiserver returns (Services, EndpointSlices, Nodes).

use std::fmt;

use serde_json::{Map, Value, json};

/// A resource kind the server knows. Adding one is a new variant plus a line in each
/// `match` below; routing and storage are generic over this table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` Service (namespaced).
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice (namespaced).
    EndpointSlice,
    /// `v1` Node (cluster-scoped).
    Node,
}

impl Kind {
    /// Every kind, for routing.
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    /// The `kind` field of an object.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    /// The `apiVersion` field of an object (group/version, or just version for core).
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The resource name in URL paths.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    /// Whether objects live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// The URL prefix of the kind's group/version: `/api/v1` or `/apis/<group>/<version>`.
    pub fn prefix(self) -> String {
        match self.api_version().split_once('/') {
            None => format!("/api/{}", self.api_version()),
            Some(_) => format!("/apis/{}", self.api_version()),
        }
    }

    /// The kind of a list response, e.g. `ServiceList`.
    pub fn list_kind(self) -> String {
        format!("{}List", self.name())
    }

    /// The kind with this `kind` and `apiVersion` fields, if the server serves it.
    pub fn from_type(kind: &str, api_version: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == kind && k.api_version() == api_version)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (may be empty for a single-port Service).
    pub name: String,
    /// The Service (cluster IP) port.
    pub port: u16,
    /// The pod port traffic goes to.
    pub target_port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

impl ServicePort {
    /// A TCP port.
    pub fn tcp(name: &str, port: u16, target_port: u16) -> Self {
        Self {
            name: name.into(),
            port,
            target_port,
            protocol: "TCP".into(),
        }
    }

    /// A UDP port.
    pub fn udp(name: &str, port: u16, target_port: u16) -> Self {
        Self {
            name: name.into(),
            port,
            target_port,
            protocol: "UDP".into(),
        }
    }
}

/// One port of an EndpointSlice (the pod-side port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    /// Must equal the Service port's name for the proxy to pair them.
    pub name: String,
    /// The pod port.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

impl EndpointPort {
    /// A TCP port.
    pub fn tcp(name: &str, port: u16) -> Self {
        Self {
            name: name.into(),
            port,
            protocol: "TCP".into(),
        }
    }

    /// A UDP port.
    pub fn udp(name: &str, port: u16) -> Self {
        Self {
            name: name.into(),
            port,
            protocol: "UDP".into(),
        }
    }
}

/// One endpoint (pod) of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The pod IP.
    pub address: String,
    /// The node the pod runs on, if known.
    pub node_name: Option<String>,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
}

impl Endpoint {
    /// A ready, serving endpoint on a node.
    pub fn ready(address: &str, node_name: &str) -> Self {
        Self {
            address: address.into(),
            node_name: Some(node_name.into()),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// A terminating endpoint that still serves (graceful termination).
    pub fn terminating(address: &str, node_name: &str) -> Self {
        Self {
            ready: false,
            serving: true,
            terminating: true,
            ..Self::ready(address, node_name)
        }
    }
}

/// A ClusterIP Service like `kubectl create service clusterip` makes, selecting `app=<name>`.
pub fn service(namespace: &str, name: &str, cluster_ip: &str, ports: &[ServicePort]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            json!({"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": p.target_port})
        })
        .collect();
    let family = if cluster_ip.contains(':') {
        "IPv6"
    } else {
        "IPv4"
    };
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": [family],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": ports,
        },
        "status": {"loadBalancer": {}},
    })
}

/// An EndpointSlice of `service` as the EndpointSlice controller makes it (IPv4 addresses,
/// `kubernetes.io/service-name` label).
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    endpoints: &[Endpoint],
    ports: &[EndpointPort],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            let mut ep = json!({
                "addresses": [e.address],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
            });
            if let Some(node) = &e.node_name {
                ep["nodeName"] = json!(node);
            }
            ep
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// A Node with these labels plus the `kubernetes.io/hostname` label kubelet sets.
pub fn node(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut map = Map::new();
    map.insert("kubernetes.io/hostname".into(), json!(name));
    for (k, v) in labels {
        map.insert((*k).into(), json!(v));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": map},
        "spec": {},
        "status": {"addresses": [{"type": "Hostname", "address": name}]},
    })
}
