//! The demo's stand-in for the Kubernetes control plane: reads an application's manifests
//! (Namespaces, Deployments, Pods, Services) as generic YAML, turns Deployments into pods the
//! way the ReplicaSet controller names them, allocates pod IPs and ClusterIPs, matches Service
//! selectors to pods, and renders the Services and EndpointSlices that svcproxy reads.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::Ipv4Addr,
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde::Deserialize as _;
use serde_json::json;
use serde_yaml::{Mapping, Value};

/// Pod IPs come from this /24 (the node's podCIDR in a kubeadm-style cluster); `.0` is the
/// network and `.1` is conventionally the node's gateway, so pods start at `.2`.
const POD_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 24);
/// ClusterIPs come from kubeadm's default service CIDR; `.0` is the network and `.1` belongs
/// to the `kubernetes` Service in a real cluster.
const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
/// The pod-template annotation that says what a pod's stand-in server answers (the sandbox
/// cannot run the container image, so the manifest tells it what the image would say).
pub const GREETING_ANNOTATION: &str = "svcproxy.io/sandbox-greeting";
/// The cluster DNS domain the hosts files imitate.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
const DEFAULT_NAMESPACE: &str = "default";
/// Kubernetes' alphabet for generated name suffixes (no vowels, so no accidental words, and
/// no look-alike characters).
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Everything the demo plays: pods with their IPs, and Services with their ClusterIPs and
/// endpoints.
#[derive(Debug)]
pub struct Cluster {
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    /// Objects that the demo does not play, with why (printed so nothing is silently lost).
    pub skipped: Vec<String>,
}

#[derive(Debug)]
pub struct Pod {
    pub namespace: String,
    /// The Kubernetes name (for Deployments `<deployment>-<template hash>-<5 random>`).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `"<annotation>\nHostname: <name>\n"`, so every answer names the pod that gave it.
    pub greeting: String,
    /// Declared container ports; the stand-in server listens on them too.
    pub ports: Vec<ContainerPort>,
    pub ip: Ipv4Addr,
    /// `Deployment/<name>` or `Pod`, for the overview.
    pub owner: String,
}

impl Pod {
    /// The pod's name in the sandbox: short names repeat across namespaces, so the namespace
    /// goes in front (`dev-jump`).
    pub fn sandbox_name(&self) -> String {
        format!("{}-{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn parse(value: Option<&Value>, what: &str) -> Result<Self> {
        match value.map(|v| v.as_str().ok_or_else(|| anyhow!("{what}: not a string"))) {
            None => Ok(Protocol::Tcp),
            Some(s) => match s? {
                "TCP" => Ok(Protocol::Tcp),
                "UDP" => Ok(Protocol::Udp),
                "SCTP" => Ok(Protocol::Sctp),
                other => bail!("{what}: unknown protocol {other:?} (TCP, UDP or SCTP)"),
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// `None` for a Service without selector: Kubernetes leaves its endpoints to the user.
    pub selector: Option<BTreeMap<String, String>>,
    /// Pods grouped by the ports they resolve to, as the EndpointSlice controller groups them
    /// (pods only differ when a named `targetPort` means different numbers in different pods).
    pub endpoints: Vec<EndpointGroup>,
    /// The manifest as read, written back with the allocated ClusterIP.
    object: Value,
}

impl Service {
    /// The names a pod in `namespace` would resolve to this Service through cluster DNS and its
    /// search path (`<ns>.svc.cluster.local svc.cluster.local cluster.local`): the short name
    /// only from the same namespace.
    pub fn names_from(&self, namespace: &str) -> Vec<String> {
        let (svc, ns) = (&self.name, &self.namespace);
        let mut names = Vec::new();
        if namespace == ns {
            names.push(svc.clone());
        }
        names.push(format!("{svc}.{ns}"));
        names.push(format!("{svc}.{ns}.svc"));
        names.push(format!("{svc}.{ns}.svc.{CLUSTER_DOMAIN}"));
        names
    }

    /// The pods behind service port `port` (index into [`Service::ports`]), with the target
    /// port each of them serves it on.
    pub fn endpoints_of_port(&self, port: usize) -> Vec<(usize, u16)> {
        self.endpoints
            .iter()
            .filter_map(|g| g.ports[port].map(|target| (g, target)))
            .flat_map(|(g, target)| g.pods.iter().map(move |&pod| (pod, target)))
            .collect()
    }
}

#[derive(Debug)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub target: TargetPort,
}

#[derive(Debug)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, looked up in each selected pod.
    Name(String),
}

#[derive(Debug)]
pub struct EndpointGroup {
    /// Indexes into [`Cluster::pods`].
    pub pods: Vec<usize>,
    /// Per service port (same order as [`Service::ports`]), the pods' port for it; `None` when
    /// these pods have no container port of that name.
    pub ports: Vec<Option<u16>>,
}

/// Reads the manifests in `path` (several YAML documents) and plays them.
pub fn load(path: &Path) -> Result<Cluster> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = Value::deserialize(document).with_context(|| {
            format!(
                "{}: document {} is not valid YAML",
                path.display(),
                index + 1
            )
        })?;
        // An empty document (a trailing `---`) is no object.
        if !value.is_null() {
            documents.push((index + 1, value));
        }
    }
    build(&documents).with_context(|| format!("play the manifests in {}", path.display()))
}

/// The Kubernetes part of [`load`], on parsed documents (1-based document number, value).
fn build(documents: &[(usize, Value)]) -> Result<Cluster> {
    let mut rng = rand::rng();
    let mut cluster = Cluster {
        pods: Vec::new(),
        services: Vec::new(),
        skipped: Vec::new(),
    };
    let mut seen = HashSet::new();
    let mut pod_ips = (2..255).map(|host| nth_address(POD_CIDR, host));
    let mut new_pod_ip = || {
        pod_ips.next().ok_or_else(|| {
            anyhow!(
                "more pods than the pod network {}/{} holds",
                POD_CIDR.0,
                POD_CIDR.1
            )
        })
    };
    let mut service_docs = Vec::new();
    for (number, doc) in documents {
        let object = Object::of(doc).with_context(|| format!("document {number}"))?;
        let what = format!("document {number} ({object})");
        ensure!(
            seen.insert((
                object.kind.clone(),
                object.namespace.clone(),
                object.name.clone()
            )),
            "{what}: the same object appears twice"
        );
        match object.kind.as_str() {
            "Namespace" => {}
            "Deployment" => {
                for pod in deployment_pods(doc, &object, &cluster.pods, &mut rng)
                    .with_context(|| what.clone())?
                {
                    cluster.pods.push(Pod {
                        ip: new_pod_ip()?,
                        ..pod
                    });
                }
            }
            "Pod" => {
                let pod = pod_from(
                    doc,
                    &object,
                    &object.name,
                    "Pod".into(),
                    &field(doc, &["metadata"]),
                )
                .with_context(|| what.clone())?;
                cluster.pods.push(Pod {
                    ip: new_pod_ip()?,
                    ..pod
                });
            }
            // Services need every pod, so they come after all documents were read.
            "Service" => service_docs.push((what, object, doc)),
            other => cluster
                .skipped
                .push(format!("{object}: the demo does not play {other} objects")),
        }
    }
    let explicit_ips = explicit_cluster_ips(&service_docs)?;
    let mut cluster_ips = (2..(1u32 << (32 - SERVICE_CIDR.1)) - 1)
        .map(|host| nth_address(SERVICE_CIDR, host))
        .filter(|ip| !explicit_ips.contains(ip));
    for (what, object, doc) in service_docs {
        let spec = field(doc, &["spec"]);
        let service_type = str_field(&spec, &["type"]).with_context(|| what.clone())?;
        let requested = str_field(&spec, &["clusterIP"]).with_context(|| what.clone())?;
        if service_type == Some("ExternalName") || requested == Some("None") {
            cluster.skipped.push(format!(
                "{object}: a headless or ExternalName Service has no ClusterIP for svcproxy"
            ));
            continue;
        }
        let cluster_ip = match requested.filter(|ip| !ip.is_empty()) {
            // Already checked by explicit_cluster_ips.
            Some(ip) => ip.parse().with_context(|| what.clone())?,
            None => cluster_ips.next().ok_or_else(|| {
                anyhow!(
                    "more Services than the service network {}/{} holds",
                    SERVICE_CIDR.0,
                    SERVICE_CIDR.1
                )
            })?,
        };
        let service =
            service_from(doc, &object, cluster_ip, &cluster.pods).with_context(|| what.clone())?;
        cluster.services.push(service);
    }
    Ok(cluster)
}

/// The identity every object needs.
struct Object {
    kind: String,
    namespace: String,
    name: String,
}

impl Object {
    fn of(doc: &Value) -> Result<Self> {
        let kind = str_field(doc, &["kind"])?
            .ok_or_else(|| anyhow!("no `kind`"))?
            .to_owned();
        let name = str_field(doc, &["metadata", "name"])?
            .ok_or_else(|| anyhow!("{kind} without `metadata.name`"))?
            .to_owned();
        let namespace = match kind.as_str() {
            // Cluster-scoped.
            "Namespace" => String::new(),
            _ => str_field(doc, &["metadata", "namespace"])?
                .unwrap_or(DEFAULT_NAMESPACE)
                .to_owned(),
        };
        Ok(Object {
            kind,
            namespace,
            name,
        })
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The pods a Deployment's ReplicaSet would create: `replicas` (default 1) copies of the
/// template, named `<deployment>-<pod-template-hash>-<5 random characters>`.
fn deployment_pods(
    doc: &Value,
    object: &Object,
    existing: &[Pod],
    rng: &mut impl rand::Rng,
) -> Result<Vec<Pod>> {
    let replicas = match field(doc, &["spec", "replicas"]) {
        Value::Null => 1,
        value => value
            .as_u64()
            .ok_or_else(|| anyhow!("spec.replicas: not a non-negative integer"))?,
    };
    let template = field(doc, &["spec", "template"]);
    ensure!(template.is_mapping(), "no spec.template");
    let template_meta = field(&template, &["metadata"]);
    let labels = string_map(&template_meta, &["labels"])?;
    // Kubernetes refuses a Deployment whose selector does not select its own pods.
    let selector = string_map(doc, &["spec", "selector", "matchLabels"])?;
    ensure!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "spec.selector.matchLabels does not match the template's labels"
    );
    let hash = pod_template_hash(&template)?;
    let taken: HashSet<&str> = existing
        .iter()
        .filter(|p| p.namespace == object.namespace)
        .map(|p| p.name.as_str())
        .collect();
    let mut names = Vec::new();
    for _ in 0..replicas {
        // Random suffixes can collide; Kubernetes retries too.
        let name = loop {
            let name = format!("{}-{hash}-{}", object.name, random_suffix(rng, 5));
            if !taken.contains(name.as_str()) && !names.contains(&name) {
                break name;
            }
        };
        names.push(name);
    }
    names
        .into_iter()
        .map(|name| {
            let mut pod = pod_from(
                &template,
                object,
                &name,
                format!("Deployment/{}", object.name),
                &template_meta,
            )?;
            pod.labels.insert("pod-template-hash".into(), hash.clone());
            Ok(pod)
        })
        .collect()
}

/// A pod from a pod spec holder (a Pod or a pod template), `meta` being its metadata.
fn pod_from(
    holder: &Value,
    object: &Object,
    name: &str,
    owner: String,
    meta: &Value,
) -> Result<Pod> {
    let labels = string_map(meta, &["labels"])?;
    let greeting = match str_field(meta, &["annotations", GREETING_ANNOTATION])? {
        Some(text) => format!("{text}\nHostname: {name}\n"),
        None => format!("Hostname: {name}\n"),
    };
    let mut ports = Vec::new();
    for container in seq(holder, &["spec", "containers"])? {
        for port in seq(container, &["ports"])? {
            let number = port_number(field(port, &["containerPort"]), "containerPort")?;
            ports.push(ContainerPort {
                name: str_field(port, &["name"])?.map(str::to_owned),
                port: number,
                protocol: Protocol::parse(port.get("protocol"), "container port protocol")?,
            });
        }
    }
    Ok(Pod {
        namespace: object.namespace.clone(),
        name: name.to_owned(),
        labels,
        greeting,
        ports,
        ip: Ipv4Addr::UNSPECIFIED,
        owner,
    })
}

/// ClusterIPs the manifests ask for, checked to be valid, unique and inside the service
/// network (the API server checks the same).
fn explicit_cluster_ips(services: &[(String, Object, &Value)]) -> Result<HashSet<Ipv4Addr>> {
    let mut ips = HashSet::new();
    for (what, _, doc) in services {
        let Some(requested) = str_field(doc, &["spec", "clusterIP"])? else {
            continue;
        };
        if requested.is_empty() || requested == "None" {
            continue;
        }
        let ip: Ipv4Addr = requested.parse().with_context(|| {
            format!("{what}: spec.clusterIP {requested:?} is not an IPv4 address")
        })?;
        ensure!(
            in_network(ip, SERVICE_CIDR),
            "{what}: spec.clusterIP {ip} is outside the service network {}/{}",
            SERVICE_CIDR.0,
            SERVICE_CIDR.1
        );
        ensure!(
            ips.insert(ip),
            "{what}: spec.clusterIP {ip} is already taken"
        );
    }
    Ok(ips)
}

fn service_from(
    doc: &Value,
    object: &Object,
    cluster_ip: Ipv4Addr,
    pods: &[Pod],
) -> Result<Service> {
    let mut ports = Vec::new();
    for (index, port) in seq(doc, &["spec", "ports"])?.into_iter().enumerate() {
        let what = format!("spec.ports[{index}]");
        let number = port_number(field(port, &["port"]), &format!("{what}.port"))?;
        let target = match field(port, &["targetPort"]) {
            // Kubernetes defaults targetPort to port.
            Value::Null => TargetPort::Number(number),
            Value::String(name) => match name.parse::<u16>() {
                // `targetPort: "8080"` is a number in a string, as IntOrString allows.
                Ok(n) if n > 0 => TargetPort::Number(n),
                _ => TargetPort::Name(name.clone()),
            },
            value => TargetPort::Number(port_number(value, &format!("{what}.targetPort"))?),
        };
        ports.push(ServicePort {
            name: str_field(port, &["name"])?.map(str::to_owned),
            port: number,
            protocol: Protocol::parse(port.get("protocol"), &format!("{what}.protocol"))?,
            target,
        });
    }
    ensure!(!ports.is_empty(), "spec.ports is empty");
    let selector = string_map(doc, &["spec", "selector"])?;
    // An empty selector means "no selector" for a Service, not "every pod".
    let selector = (!selector.is_empty()).then_some(selector);
    let mut groups: BTreeMap<Vec<Option<u16>>, Vec<usize>> = BTreeMap::new();
    if let Some(selector) = &selector {
        for (index, pod) in pods.iter().enumerate() {
            let selected = pod.namespace == object.namespace
                && selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v));
            if !selected {
                continue;
            }
            let resolved: Vec<Option<u16>> = ports
                .iter()
                .map(|port| match &port.target {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Name(name) => pod
                        .ports
                        .iter()
                        .find(|p| p.protocol == port.protocol && p.name.as_deref() == Some(name))
                        .map(|p| p.port),
                })
                .collect();
            // A pod that serves none of the ports is no endpoint at all.
            if resolved.iter().any(Option::is_some) {
                groups.entry(resolved).or_default().push(index);
            }
        }
    }
    Ok(Service {
        namespace: object.namespace.clone(),
        name: object.name.clone(),
        cluster_ip,
        ports,
        selector,
        endpoints: groups
            .into_iter()
            .map(|(ports, pods)| EndpointGroup { pods, ports })
            .collect(),
        object: doc.clone(),
    })
}

/// The Service as the API server would store it: the manifest with its namespace filled in
/// and the allocated ClusterIP in `spec.clusterIP` and `spec.clusterIPs`.
pub fn service_manifest(service: &Service) -> Result<Value> {
    let mut object = service.object.clone();
    let root = object
        .as_mapping_mut()
        .context("a Service manifest is a mapping")?;
    mapping_entry(root, "metadata")?.insert("namespace".into(), service.namespace.clone().into());
    let spec = mapping_entry(root, "spec")?;
    let ip = service.cluster_ip.to_string();
    spec.insert("clusterIP".into(), ip.clone().into());
    spec.insert("clusterIPs".into(), Value::Sequence(vec![ip.into()]));
    Ok(object)
}

/// The EndpointSlices the EndpointSlice controller would write for `service`: one per group
/// of pods with the same ports, every endpoint ready and on node `node`.
pub fn endpoint_slices(
    cluster: &Cluster,
    service: &Service,
    node: &str,
) -> Result<Vec<(String, Value)>> {
    let mut rng = rand::rng();
    let mut names = HashSet::new();
    let mut slices = Vec::new();
    for group in &service.endpoints {
        let name = loop {
            let name = format!("{}-{}", service.name, random_suffix(&mut rng, 5));
            if names.insert(name.clone()) {
                break name;
            }
        };
        let endpoints: Vec<_> = group
            .pods
            .iter()
            .map(|&index| {
                let pod = &cluster.pods[index];
                json!({
                    "addresses": [pod.ip.to_string()],
                    "conditions": { "ready": true, "serving": true, "terminating": false },
                    "nodeName": node,
                    "targetRef": { "kind": "Pod", "namespace": pod.namespace, "name": pod.name },
                })
            })
            .collect();
        let ports: Vec<_> = service
            .ports
            .iter()
            .zip(&group.ports)
            .filter_map(|(port, target)| {
                let target = (*target)?;
                let mut entry = json!({ "port": target, "protocol": port.protocol.as_str() });
                // The slice port's name is how kube-proxy pairs it with the Service port; an
                // unnamed Service port has an unnamed slice port.
                if let Some(name) = &port.name {
                    entry["name"] = name.clone().into();
                }
                Some(entry)
            })
            .collect();
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": service.namespace,
                "labels": {
                    "kubernetes.io/service-name": service.name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        });
        let value = serde_yaml::to_value(&slice).context("convert an EndpointSlice to YAML")?;
        slices.push((name, value));
    }
    Ok(slices)
}

/// `map[key]` as a mapping, created when absent.
fn mapping_entry<'a>(map: &'a mut Mapping, key: &str) -> Result<&'a mut Mapping> {
    let entry = map
        .entry(key.into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if entry.is_null() {
        *entry = Value::Mapping(Mapping::new());
    }
    entry
        .as_mapping_mut()
        .ok_or_else(|| anyhow!("`{key}` is not a mapping"))
}

/// The value at `path`, or `Null` when any step is missing.
fn field(value: &Value, path: &[&str]) -> Value {
    path.iter()
        .try_fold(value, |v, key| v.get(*key))
        .cloned()
        .unwrap_or(Value::Null)
}

fn str_field<'a>(value: &'a Value, path: &[&str]) -> Result<Option<&'a str>> {
    match path.iter().try_fold(value, |v, key| v.get(*key)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| anyhow!("`{}` is not a string", path.join("."))),
    }
}

/// The sequence at `path` (empty when absent).
fn seq<'a>(value: &'a Value, path: &[&str]) -> Result<Vec<&'a Value>> {
    match path.iter().try_fold(value, |v, key| v.get(*key)) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Sequence(items)) => Ok(items.iter().collect()),
        Some(_) => bail!("`{}` is not a list", path.join(".")),
    }
}

/// A string-to-string mapping such as labels (empty when absent).
fn string_map(value: &Value, path: &[&str]) -> Result<BTreeMap<String, String>> {
    let what = path.join(".");
    match path.iter().try_fold(value, |v, key| v.get(*key)) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| match (k.as_str(), v.as_str()) {
                (Some(k), Some(v)) => Ok((k.to_owned(), v.to_owned())),
                // Kubernetes rejects `version: 1` too: label values are strings.
                _ => Err(anyhow!(
                    "`{what}`: keys and values must be strings (quote numbers)"
                )),
            })
            .collect(),
        Some(_) => bail!("`{what}` is not a mapping"),
    }
}

fn port_number(value: Value, what: &str) -> Result<u16> {
    value
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| anyhow!("{what}: not a port number (1-65535)"))
}

/// Kubernetes' pod-template-hash: FNV-1a (32 bit) of the template, its decimal digits mapped
/// into [`NAME_ALPHABET`]. The input is our YAML rendering rather than Go's struct dump, so the
/// value differs from a real cluster's, but it has the same shape and is just as stable.
fn pod_template_hash(template: &Value) -> Result<String> {
    let text = serde_yaml::to_string(template).context("render the pod template")?;
    let hash = text.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    Ok(hash
        .to_string()
        .bytes()
        .map(|b| char::from(NAME_ALPHABET[usize::from(b) % NAME_ALPHABET.len()]))
        .collect())
}

fn random_suffix(rng: &mut impl rand::Rng, len: usize) -> String {
    (0..len)
        .map(|_| char::from(NAME_ALPHABET[rng.random_range(0..NAME_ALPHABET.len())]))
        .collect()
}

fn nth_address((network, _): (Ipv4Addr, u8), host: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(network) + host)
}

fn in_network(ip: Ipv4Addr, (network, prefix): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX << (32 - prefix);
    u32::from(ip) & mask == u32::from(network) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Cluster {
        let documents: Vec<_> = serde_yaml::Deserializer::from_str(text)
            .enumerate()
            .map(|(i, d)| (i + 1, Value::deserialize(d).expect("valid YAML")))
            .filter(|(_, v)| !v.is_null())
            .collect();
        build(&documents).expect("valid manifests")
    }

    const APP: &str = r#"
kind: Deployment
apiVersion: apps/v1
metadata: { name: web, namespace: a }
spec:
  replicas: 3
  selector: { matchLabels: { app: web } }
  template:
    metadata:
      labels: { app: web }
      annotations: { svcproxy.io/sandbox-greeting: "hi" }
    spec:
      containers:
      - name: c
        ports: [{ name: http, containerPort: 9000 }]
---
kind: Pod
apiVersion: v1
metadata: { name: web-extra, namespace: b, labels: { app: web } }
spec: { containers: [{ name: c }] }
---
kind: Service
apiVersion: v1
metadata: { name: web, namespace: a }
spec:
  selector: { app: web }
  ports: [{ name: http, port: 80, targetPort: http }, { name: dns, port: 53, protocol: UDP }]
---
kind: Service
apiVersion: v1
metadata: { name: fixed }
spec:
  clusterIP: 10.96.0.2
  ports: [{ port: 80 }]
---
kind: ConfigMap
apiVersion: v1
metadata: { name: x }
"#;

    #[test]
    fn deployments_become_named_pods_with_ips() {
        let cluster = parse(APP);
        assert_eq!(cluster.pods.len(), 4);
        let web = &cluster.pods[0];
        let parts: Vec<_> = web.name.split('-').collect();
        assert_eq!(parts.len(), 3, "{}", web.name);
        assert_eq!(parts[0], "web");
        assert_eq!(parts[2].len(), 5);
        assert_eq!(web.greeting, format!("hi\nHostname: {}\n", web.name));
        assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(web.ip, Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(cluster.pods[3].ip, Ipv4Addr::new(10, 244, 0, 5));
        assert_eq!(cluster.pods[3].sandbox_name(), "b-web-extra");
        let names: HashSet<_> = cluster.pods.iter().map(|p| &p.name).collect();
        assert_eq!(names.len(), 4);
        assert_eq!(cluster.skipped.len(), 1);
    }

    #[test]
    fn services_get_cluster_ips_and_same_namespace_endpoints() {
        let cluster = parse(APP);
        let web = &cluster.services[0];
        // 10.96.0.2 is asked for explicitly by the other Service.
        assert_eq!(web.cluster_ip, Ipv4Addr::new(10, 96, 0, 3));
        assert_eq!(cluster.services[1].cluster_ip, Ipv4Addr::new(10, 96, 0, 2));
        assert_eq!(cluster.services[1].namespace, "default");
        assert_eq!(
            web.endpoints_of_port(0),
            vec![(0, 9000), (1, 9000), (2, 9000)]
        );
        assert_eq!(web.endpoints_of_port(1), vec![(0, 53), (1, 53), (2, 53)]);
        assert_eq!(web.endpoints[0].ports, vec![Some(9000), Some(53)]);
        assert_eq!(web.names_from("a")[0], "web");
        assert_eq!(web.names_from("b")[0], "web.a");
        assert!(cluster.services[1].endpoints.is_empty());

        let manifest = service_manifest(web).expect("renders");
        assert_eq!(
            str_field(&manifest, &["spec", "clusterIP"]).ok().flatten(),
            Some("10.96.0.3")
        );
        let slices = endpoint_slices(&cluster, web, "node").expect("renders");
        assert_eq!(slices.len(), 1);
        let slice = &slices[0].1;
        assert_eq!(seq(slice, &["endpoints"]).expect("list").len(), 3);
        assert_eq!(field(slice, &["ports"])[0]["name"].as_str(), Some("http"));
        assert_eq!(
            field(slice, &["ports"])[1]["protocol"].as_str(),
            Some("UDP")
        );
    }

    #[test]
    fn bad_manifests_are_refused() {
        let bad = |text: &str| {
            let documents: Vec<_> = serde_yaml::Deserializer::from_str(text)
                .enumerate()
                .map(|(i, d)| (i + 1, Value::deserialize(d).expect("valid YAML")))
                .collect();
            build(&documents).is_err()
        };
        assert!(bad("kind: Pod\nmetadata: {}\n"));
        assert!(bad(
            "kind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}]}\n"
        ));
        assert!(bad(
            "kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 0}]}\n"
        ));
        assert!(bad(
            "kind: Pod\nmetadata: {name: p}\n---\nkind: Pod\nmetadata: {name: p}\n"
        ));
    }
}
