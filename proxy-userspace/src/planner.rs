//! The planner: Services and EndpointSlices in, the [`Desired`] datapath state out.
//!
//! One pure function ([`plan`]): no I/O, no clock, no randomness, and the output does not depend
//! on the order of the input slices, so equal inputs give equal outputs, a replayed or
//! out-of-order event is harmless, and every rule below is checked by a table test. The rules are
//! kube-proxy's (`pkg/proxy/endpointslicecache.go`, `pkg/proxy/topology.go`), and where the
//! datapath needs more caution (hostile addresses, octal-looking IPs) the object is refused with
//! a [`Rejection`] rather than skipped silently.
//!
//! IPv4 frontends from ClusterIPs, external IPs (fenced by [`PlanOptions::external_ip_ranges`])
//! and load-balancer VIPs are produced; NodePorts slot in as a further [`FrontendSource`], with
//! its traffic policy.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map::Entry},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use thiserror::Error;

use crate::{
    desired::{
        AddrKind, Algorithm, Backend, BackendState, Desired, Frontend, FrontendState, Protocol,
        Rejection, Selection, ServiceName,
    },
    objects::{Address, ServiceObject, SliceEndpoint, SliceObject},
};

/// Services carrying this label belong to another proxy (any value, unless it equals
/// [`PlanOptions::service_proxy_name`]).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// EndpointSlices of headless Services: no virtual IP to serve.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Joins an EndpointSlice to its Service (same namespace).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The legacy way a Service asks for topology-aware routing ("Auto"/"auto").
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// svcproxy's own annotation choosing how new flows pick a backend: `random` (default) or
/// `maglev` (consistent hashing of the 5-tuple: the same flow maps to the same backend on every
/// node, and a backend change moves few flows).
pub const ANNOTATION_LB_ALGORITHM: &str = "svcproxy.io/lb-algorithm";
/// Namespace of an object that names none (only hand-written objects lack one).
const DEFAULT_NAMESPACE: &str = "default";

/// The node this proxy runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.name` of the Node, compared with endpoints' `nodeName`.
    pub name: String,
    /// The Node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

/// Operator choices that change planning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Reserved: Services labelled [`LABEL_SERVICE_PROXY_NAME`] are ignored unless the label
    /// equals this. `None` (kube-proxy's behaviour) ignores every labelled Service.
    pub service_proxy_name: Option<String>,
    /// Which `spec.externalIPs` are served: `None` all of them (kube-proxy's behaviour), else
    /// only those inside one of these ranges (empty: none). Any user who can create a Service
    /// can claim any address as an external IP (CVE-2020-8554); this is the operator's fence.
    pub external_ip_ranges: Option<Vec<Ipv4Cidr>>,
}

/// An IPv4 prefix, as written in `--external-ip-ranges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = String;

    /// `a.b.c.d/n` or a bare address (a /32). Surrounding whitespace is allowed, as in
    /// `loadBalancerSourceRanges`; leading zeros are not (they would read as octal elsewhere).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (addr, len) = text.split_once('/').unwrap_or((text, "32"));
        let addr = match parse_ip(addr) {
            ParsedIp::V4(addr) => addr,
            _ => return Err(format!("{text:?} is not an IPv4 address or CIDR")),
        };
        let len = len
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= 32 && (len == "0" || !len.starts_with('0')))
            .ok_or_else(|| format!("{text:?}: prefix length must be 0-32"))?;
        Ok(Self { addr, len })
    }
}

/// Everything [`plan`] reads.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput<'a> {
    /// Shared with the source's store: a sync reads them without copying.
    pub services: &'a [Arc<ServiceObject>],
    pub slices: &'a [Arc<SliceObject>],
    pub node: &'a NodeInfo,
    pub options: &'a PlanOptions,
}

/// Why the planner refused an object or part of one; the text of [`Rejection::reason`].
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("metadata.name is missing; the object is ignored until it has one")]
    MissingName,
    #[error(
        "spec.externalIPs {addr} is outside the ranges this proxy serves external IPs from \
         (--external-ip-ranges); not served"
    )]
    ExternalIpNotAllowed { addr: Ipv4Addr },
    #[error(
        "{field} {value:?} has a leading zero, which some parsers read as octal (CVE-2021-29923); \
         write it without leading zeros"
    )]
    LeadingZeroIp { field: &'static str, value: String },
    #[error("{field} {value:?} is not an IP address; fix the object")]
    UnparseableIp { field: &'static str, value: String },
    #[error("{field} {addr} is a {class} address, which can never be a Service address")]
    SpecialFrontendIp {
        field: &'static str,
        addr: Ipv4Addr,
        class: &'static str,
    },
    #[error(
        "endpoint address {addr} is a {class} address; refused so that a slice cannot send \
         Service traffic to the node itself (CVE-2021-25737)"
    )]
    HostileEndpoint { addr: Ipv4Addr, class: &'static str },
    #[error(
        "endpoint address {addr} is the ClusterIP of a Service; refused so that Service traffic \
         cannot be looped through another Service"
    )]
    EndpointIsClusterIp { addr: Ipv4Addr },
    #[error("port {name:?} has number {number}, outside 1-65535; fix the object")]
    PortOutOfRange { name: String, number: i32 },
    #[error("port {name:?} has protocol {protocol:?}; only TCP, UDP and SCTP are proxied")]
    UnknownProtocol { name: String, protocol: String },
    #[error(
        "SCTP frontend {frontend} would need its port rewritten to {target}: SCTP's CRC32c covers \
         the ports, so svcproxy does not translate it; make targetPort equal port"
    )]
    SctpPortRewrite { frontend: Frontend, target: u16 },
    #[error(
        "annotation {ANNOTATION_LB_ALGORITHM} is {value:?}; use \"random\" or \"maglev\" (using random)"
    )]
    UnknownAlgorithm { value: String },
    #[error(
        "frontend {frontend} is already served by the older Service {owner}; this Service does \
         not get it until one of them changes"
    )]
    FrontendConflict {
        frontend: Frontend,
        owner: ServiceName,
    },
    #[error(
        "frontend {frontend} is declared twice (ports {first:?} and {second:?}); keeping {first:?}"
    )]
    DuplicateFrontend {
        frontend: Frontend,
        first: String,
        second: String,
    },
}

/// The `sessionAffinity: ClientIP` timeout of `svc` in seconds, or `None` without affinity:
/// `sessionAffinityConfig.clientIP.timeoutSeconds`, defaulting to 10800 and held to 1..=86400
/// as the API validates it. [`Desired`] has no place for it yet; the map writer needs it for
/// session affinity.
pub fn client_ip_affinity_timeout(svc: &ServiceObject) -> Option<u32> {
    const DEFAULT_SECONDS: u32 = 10_800;
    const MAX_SECONDS: u32 = 86_400;
    let spec = svc.spec.as_ref()?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let configured = spec.affinity_timeout_s;
    // Out-of-range values cannot pass API validation; a hand-written one gets the default
    // (zero or negative) or the maximum (too large) rather than no affinity.
    Some(
        configured
            .and_then(|s| u32::try_from(s).ok())
            .filter(|&s| s > 0)
            .map_or(DEFAULT_SECONDS, |s| s.min(MAX_SECONDS)),
    )
}

/// Computes the desired datapath state. Never fails: whatever cannot be served is listed in
/// [`Desired::rejections`] and everything else is planned.
pub fn plan(input: &PlanInput<'_>) -> Desired {
    PlanCache::default().plan(input).clone()
}

/// [`plan`], kept up to date from one input to the next at the cost of what changed: the objects
/// of a snapshot are shared with the source's store, so an object that is the very same
/// (pointer-equal) as last time has not changed. Only the Services whose object or slices
/// changed are planned again, only the frontends they claim are resolved again, and the result
/// is updated in place: with 10,000 Services and one EndpointSlice changed, one Service is
/// planned and one frontend rewritten. The result always equals [`plan`]'s (a test checks it
/// across changes), and [`take_changed`](Self::take_changed) names the frontends that differ.
#[derive(Default)]
pub struct PlanCache {
    /// What every cached plan was made with; when either differs, everything is replanned.
    node: NodeInfo,
    options: PlanOptions,
    /// Every IPv4 ClusterIP, with the number of Services declaring it.
    cluster_ips: HashMap<Ipv4Addr, u32>,
    /// Every Service of the last input, by unit id (one per object, in order of first sight).
    units: HashMap<u64, Unit>,
    next_unit: u64,
    /// Unit id by object address (the unit holds the object, so the address stays its own).
    service_ptrs: HashMap<usize, u64>,
    /// By (namespace, name): the units (more than one only in hand-written input) and the
    /// usable slices, sorted by name.
    by_key: HashMap<ServiceKey, Named>,
    /// Every slice of the last input by object address.
    slice_ptrs: HashMap<usize, Arc<SliceObject>>,
    /// Every claim on a frontend, as (unit, event index): the oldest Service's first claim wins.
    claims: HashMap<Frontend, Vec<(u64, usize)>>,
    /// Units with rejections, in planning order, to list them in that order.
    rejecting: BTreeMap<Order, u64>,
    desired: Desired,
    /// Frontends whose state changed (or that went away) since the last take.
    changed: BTreeSet<Frontend>,
    /// Services planned (not taken from the cache) by the last [`plan`](Self::plan).
    pub last_planned: usize,
}

/// (namespace, name) of a Service.
type ServiceKey = (String, String);

/// Planning order: oldest first, so that when two Services claim one frontend the older keeps
/// it. A Service without a creation time (hand-written) counts as newest, so it never takes a
/// frontend from one the API server has admitted; equals go in order of first sight (unit id).
type Order = (bool, Option<Time>, String, Option<String>, u64);

/// [`Order`], borrowed from the unit.
type OrderRef<'a> = (bool, Option<&'a Time>, &'a str, Option<&'a str>, u64);

#[derive(Default)]
struct Named {
    units: Vec<u64>,
    slices: Vec<Arc<SliceObject>>,
}

struct Unit {
    service: Arc<ServiceObject>,
    events: Vec<Event>,
    /// This Service's rejections, its own and its lost claims, in event order.
    rejections: Vec<Rejection>,
}

/// What planning one Service produced, in order; its frontends are claims, resolved against
/// the other Services' claims (the only place Services meet).
#[derive(Clone, Debug)]
enum Event {
    Frontend(Frontend, Arc<FrontendState>),
    Reject(Rejection),
}

fn ptr<T>(arc: &Arc<T>) -> usize {
    Arc::as_ptr(arc) as usize
}

fn service_key(svc: &ServiceObject) -> ServiceKey {
    (
        namespace_of(svc.namespace.as_deref()).to_owned(),
        svc.name.clone().unwrap_or_default(),
    )
}

/// The Service a slice belongs to, if the slice is one this datapath uses.
fn slice_key(slice: &SliceObject) -> Option<ServiceKey> {
    if slice.headless || &*slice.address_type != "IPv4" {
        return None;
    }
    let service = slice.service_name.as_deref().filter(|s| !s.is_empty())?;
    Some((
        namespace_of(slice.namespace.as_deref()).to_owned(),
        service.to_owned(),
    ))
}

impl Unit {
    fn order(&self, id: u64) -> OrderRef<'_> {
        let svc = &*self.service;
        (
            svc.created.is_none(),
            svc.created.as_ref(),
            namespace_of(svc.namespace.as_deref()),
            svc.name.as_deref(),
            id,
        )
    }

    fn owned_order(&self, id: u64) -> Order {
        let (none, created, namespace, name, id) = self.order(id);
        (
            none,
            created.cloned(),
            namespace.to_owned(),
            name.map(str::to_owned),
            id,
        )
    }
}

impl PlanCache {
    /// The desired state for `input`.
    pub fn plan(&mut self, input: &PlanInput<'_>) -> &Desired {
        if self.node != *input.node || self.options != *input.options {
            let changed = std::mem::take(&mut self.changed);
            let old = std::mem::take(&mut self.desired.frontends);
            *self = Self {
                node: input.node.clone(),
                options: input.options.clone(),
                ..Self::default()
            };
            // Everything is planned afresh; what was there counts as changed until compared.
            self.changed = changed;
            self.changed.extend(old.into_keys());
        }
        self.last_planned = 0;
        let mut dirty: HashSet<ServiceKey> = HashSet::new();
        let mut ips_changed: HashSet<Ipv4Addr> = HashSet::new();
        let mut touched: HashSet<Frontend> = HashSet::new();
        let mut reject_dirty: HashSet<u64> = HashSet::new();
        let mut rejections_changed = false;

        // Services: new objects become units; objects gone take their units with them.
        let mut added = Vec::new();
        for svc in input.services {
            if !self.service_ptrs.contains_key(&ptr(svc)) {
                added.push(svc);
            }
        }
        if self.service_ptrs.len() + added.len() != input.services.len() {
            let present: HashSet<usize> = input.services.iter().map(ptr).collect();
            let gone: Vec<u64> = self
                .service_ptrs
                .iter()
                .filter(|(p, _)| !present.contains(p))
                .map(|(_, id)| *id)
                .collect();
            for id in gone {
                self.remove_unit(
                    id,
                    &mut dirty,
                    &mut ips_changed,
                    &mut touched,
                    &mut rejections_changed,
                );
            }
        }
        for svc in added {
            let id = self.next_unit;
            self.next_unit += 1;
            let key = service_key(svc);
            for ip in cluster_ipv4s_of(svc) {
                let count = self.cluster_ips.entry(ip).or_default();
                if *count == 0 {
                    ips_changed.insert(ip);
                }
                *count += 1;
            }
            self.service_ptrs.insert(ptr(svc), id);
            self.by_key.entry(key.clone()).or_default().units.push(id);
            self.units.insert(
                id,
                Unit {
                    service: Arc::clone(svc),
                    events: Vec::new(),
                    rejections: Vec::new(),
                },
            );
            dirty.insert(key);
        }

        // Slices: each one new or gone dirties its Service.
        let mut added = Vec::new();
        for slice in input.slices {
            if !self.slice_ptrs.contains_key(&ptr(slice)) {
                added.push(slice);
            }
        }
        if self.slice_ptrs.len() + added.len() != input.slices.len() {
            let present: HashSet<usize> = input.slices.iter().map(ptr).collect();
            let gone: Vec<usize> = self
                .slice_ptrs
                .keys()
                .filter(|p| !present.contains(p))
                .copied()
                .collect();
            for p in gone {
                let Some(slice) = self.slice_ptrs.remove(&p) else {
                    continue;
                };
                if let Some(key) = slice_key(&slice) {
                    if let Some(named) = self.by_key.get_mut(&key) {
                        named.slices.retain(|s| !Arc::ptr_eq(s, &slice));
                        if named.slices.is_empty() && named.units.is_empty() {
                            self.by_key.remove(&key);
                        }
                    }
                    dirty.insert(key);
                }
            }
        }
        for slice in added {
            self.slice_ptrs.insert(ptr(slice), Arc::clone(slice));
            if let Some(key) = slice_key(slice) {
                let list = &mut self.by_key.entry(key.clone()).or_default().slices;
                // After the equally named ones already there: order of first sight.
                let at = list.partition_point(|s| s.name <= slice.name);
                list.insert(at, Arc::clone(slice));
                dirty.insert(key);
            }
        }

        // An endpoint may not be a ClusterIP: when ClusterIPs come or go, the Services with an
        // endpoint at one of those addresses are planned again (and only those).
        if !ips_changed.is_empty() {
            for (key, named) in &self.by_key {
                if named.slices.iter().any(|s| mentions_any(s, &ips_changed)) {
                    dirty.insert(key.clone());
                }
            }
        }

        for key in &dirty {
            let ids = self
                .by_key
                .get(key)
                .map(|n| n.units.clone())
                .unwrap_or_default();
            for id in ids {
                self.replan(id, key, &mut touched);
                reject_dirty.insert(id);
            }
        }

        // Resolve each touched frontend: the first claim wins; every claimant's rejections
        // may change with it.
        for fe in touched {
            let winner = self.claims.get(&fe).and_then(|claims| {
                reject_dirty.extend(claims.iter().map(|(id, _)| *id));
                self.winner(claims)
            });
            let state = winner
                .and_then(|(id, index)| self.frontend_state(id, index))
                .cloned();
            if self.desired.frontends.get(&fe) == state.as_ref() {
                continue;
            }
            self.changed.insert(fe);
            match state {
                Some(state) => self.desired.frontends.insert(fe, state),
                None => self.desired.frontends.remove(&fe),
            };
        }

        for id in reject_dirty {
            let Some(rejections) = self.unit_rejections(id) else {
                continue;
            };
            let Some(unit) = self.units.get_mut(&id) else {
                continue;
            };
            if unit.rejections == rejections {
                continue;
            }
            rejections_changed = true;
            unit.rejections = rejections;
            if unit.rejections.is_empty() {
                self.rejecting.remove(&unit.owned_order(id));
            } else {
                self.rejecting.insert(unit.owned_order(id), id);
            }
        }
        if rejections_changed {
            self.desired.rejections = self
                .rejecting
                .values()
                .filter_map(|id| self.units.get(id))
                .flat_map(|u| u.rejections.iter().cloned())
                .collect();
        }
        &self.desired
    }

    /// The desired state as of the last [`plan`](Self::plan).
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The frontends whose desired state changed, or that are no longer desired, since the
    /// last call: what the map writer has to look at.
    pub fn take_changed(&mut self) -> BTreeSet<Frontend> {
        std::mem::take(&mut self.changed)
    }

    fn remove_unit(
        &mut self,
        id: u64,
        dirty: &mut HashSet<ServiceKey>,
        ips_changed: &mut HashSet<Ipv4Addr>,
        touched: &mut HashSet<Frontend>,
        rejections_changed: &mut bool,
    ) {
        let Some(unit) = self.units.remove(&id) else {
            return;
        };
        self.withdraw(id, &unit.events, touched);
        self.service_ptrs.remove(&ptr(&unit.service));
        if !unit.rejections.is_empty() {
            self.rejecting.remove(&unit.owned_order(id));
            *rejections_changed = true;
        }
        for ip in cluster_ipv4s_of(&unit.service) {
            if let Entry::Occupied(mut count) = self.cluster_ips.entry(ip) {
                *count.get_mut() -= 1;
                if *count.get() == 0 {
                    count.remove();
                    ips_changed.insert(ip);
                }
            }
        }
        let key = service_key(&unit.service);
        if let Some(named) = self.by_key.get_mut(&key) {
            named.units.retain(|u| *u != id);
            if named.units.is_empty() && named.slices.is_empty() {
                self.by_key.remove(&key);
            }
        }
        dirty.insert(key);
    }

    /// Takes back a unit's claims.
    fn withdraw(&mut self, id: u64, events: &[Event], touched: &mut HashSet<Frontend>) {
        for event in events {
            if let Event::Frontend(fe, _) = event {
                if let Some(claims) = self.claims.get_mut(fe) {
                    claims.retain(|(u, _)| *u != id);
                    if claims.is_empty() {
                        self.claims.remove(fe);
                    }
                }
                touched.insert(*fe);
            }
        }
    }

    /// Plans one Service again from its object and slices, replacing its claims.
    fn replan(&mut self, id: u64, key: &ServiceKey, touched: &mut HashSet<Frontend>) {
        let Some(unit) = self.units.get_mut(&id) else {
            return;
        };
        let old = std::mem::take(&mut unit.events);
        let service = Arc::clone(&unit.service);
        self.withdraw(id, &old, touched);
        let own: Vec<&SliceObject> = self
            .by_key
            .get(key)
            .map(|named| named.slices.iter().map(|s| &**s).collect())
            .unwrap_or_default();
        let mut planner = Planner {
            node: &self.node,
            cluster_ips: &self.cluster_ips,
            events: Vec::new(),
        };
        planner.service(&service, &self.options, &own);
        self.last_planned += 1;
        let events = planner.events;
        for (index, event) in events.iter().enumerate() {
            if let Event::Frontend(fe, _) = event {
                self.claims.entry(*fe).or_default().push((id, index));
                touched.insert(*fe);
            }
        }
        if let Some(unit) = self.units.get_mut(&id) {
            unit.events = events;
        }
    }

    /// The winning claim: the oldest Service's, and its first among its own.
    fn winner(&self, claims: &[(u64, usize)]) -> Option<(u64, usize)> {
        claims
            .iter()
            .filter_map(|&(id, index)| Some((self.units.get(&id)?.order(id), index)))
            .min()
            .map(|(order, index)| (order.4, index))
    }

    fn frontend_state(&self, id: u64, index: usize) -> Option<&Arc<FrontendState>> {
        match self.units.get(&id)?.events.get(index)? {
            Event::Frontend(_, state) => Some(state),
            Event::Reject(_) => None,
        }
    }

    /// A unit's rejections as the claims stand: its own, then each claim it lost, in order.
    fn unit_rejections(&self, id: u64) -> Option<Vec<Rejection>> {
        let unit = self.units.get(&id)?;
        let mut out = Vec::new();
        for (index, event) in unit.events.iter().enumerate() {
            let (frontend, state) = match event {
                Event::Reject(r) => {
                    out.push(r.clone());
                    continue;
                }
                Event::Frontend(frontend, state) => (*frontend, state),
            };
            let Some((wid, windex)) = self.claims.get(&frontend).and_then(|c| self.winner(c))
            else {
                continue;
            };
            if (wid, windex) == (id, index) {
                continue;
            }
            let Some(held) = self.frontend_state(wid, windex) else {
                continue;
            };
            let error = if held.service == state.service {
                PlanError::DuplicateFrontend {
                    frontend,
                    first: held.port_name.clone(),
                    second: state.port_name.clone(),
                }
            } else {
                PlanError::FrontendConflict {
                    frontend,
                    owner: held.service.clone(),
                }
            };
            out.push(Rejection {
                object: format!("Service {}/{}", state.service.namespace, state.service.name),
                reason: error.to_string(),
            });
        }
        Some(out)
    }
}

/// Whether an endpoint of `slice` has one of `addrs` as its (first, used) address.
fn mentions_any(slice: &SliceObject, addrs: &HashSet<Ipv4Addr>) -> bool {
    slice.endpoints.iter().any(|e| {
        e.address
            .as_ref()
            .is_some_and(|a| matches!(parse_address(a), ParsedIp::V4(ip) if addrs.contains(&ip)))
    })
}

/// Plans one Service into events.
struct Planner<'a> {
    node: &'a NodeInfo,
    /// Every IPv4 ClusterIP of every Service (with its count), which no endpoint may be.
    cluster_ips: &'a HashMap<Ipv4Addr, u32>,
    events: Vec<Event>,
}

/// Where a frontend address comes from; each source has its traffic policy. NodePorts add a
/// variant here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrontendSource {
    ClusterIp,
    /// `spec.externalIPs`.
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip` with `ipMode` VIP (or unset).
    LoadBalancer,
}

impl FrontendSource {
    fn kind(self) -> AddrKind {
        match self {
            Self::ClusterIp => AddrKind::ClusterIp,
            Self::ExternalIp => AddrKind::ExternalIp,
            Self::LoadBalancer => AddrKind::LoadBalancer,
        }
    }
}

/// What a frontend inherits from its Service besides backends.
#[derive(Clone, Copy)]
struct FrontendTraits {
    affinity_timeout_s: Option<u32>,
    algorithm: Algorithm,
    drop_when_empty: bool,
}

/// One `spec.ports` entry.
struct ServicePortSpec {
    name: String,
    port: u16,
    protocol: Protocol,
}

impl Planner<'_> {
    fn service(
        &mut self,
        svc: &ServiceObject,
        options: &PlanOptions,
        service_slices: &[&SliceObject],
    ) {
        let namespace = namespace_of(svc.namespace.as_deref());
        let Some(name) = svc.name.as_deref().filter(|n| !n.is_empty()) else {
            self.reject_service(namespace, "<unnamed>", PlanError::MissingName);
            return;
        };
        let Some(spec) = svc.spec.as_ref() else {
            return;
        };
        if let Some(label) = svc.service_proxy_name.as_deref()
            && options.service_proxy_name.as_deref() != Some(label)
        {
            return;
        }
        if spec.type_.as_deref() == Some("ExternalName") || is_headless(svc) {
            return;
        }
        let service = ServiceName {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };

        let mut addrs: Vec<(Ipv4Addr, FrontendSource)> = self
            .cluster_ipv4s(svc, &service)
            .into_iter()
            .map(|a| (a, FrontendSource::ClusterIp))
            .collect();
        for (addr, source) in self.external_ipv4s(svc, &service, options) {
            // The same address twice in one Service (an LB IP that is also an external IP)
            // is one frontend, not a conflict with itself.
            if !addrs.iter().any(|(a, _)| *a == addr) {
                addrs.push((addr, source));
            }
        }
        let ports = self.service_ports(svc, &service);
        if addrs.is_empty() || ports.is_empty() {
            return;
        }

        let parsed: Vec<ParsedSlice<'_>> = service_slices
            .iter()
            .map(|slice| self.parse_slice(slice))
            .collect();

        let traits = FrontendTraits {
            affinity_timeout_s: client_ip_affinity_timeout(svc),
            algorithm: self.algorithm(svc, &service),
            drop_when_empty: false,
        };
        for port in &ports {
            let candidates = merge_endpoints(&parsed, &port.name, port.protocol);
            // kube-proxy's hasAnyEndpoints: with none usable anywhere, reject; with some usable
            // elsewhere but none for this traffic here, drop.
            let usable_anywhere = candidates
                .iter()
                .any(|c| c.endpoint.ready || (c.endpoint.serving && c.endpoint.terminating));
            for &(addr, source) in &addrs {
                let policy = traffic_policy(svc, source);
                let mut selection = Selection {
                    addr_kind: source.kind(),
                    node_local: policy.local,
                    external_local_not_applied: source != FrontendSource::ClusterIp
                        && spec.external_traffic_policy.as_deref() == Some("Local"),
                    ..Selection::default()
                };
                let backends = select_backends(&candidates, policy, self.node, &mut selection);
                let drop_when_empty =
                    usable_anywhere && !backends.iter().any(|b| b.state == BackendState::Active);
                let frontend = Frontend {
                    addr,
                    port: port.port,
                    protocol: port.protocol,
                };
                if port.protocol == Protocol::Sctp
                    && let Some(b) = backends.iter().find(|b| b.port != port.port)
                {
                    let error = PlanError::SctpPortRewrite {
                        frontend,
                        target: b.port,
                    };
                    self.reject_service(&service.namespace, &service.name, error);
                    continue;
                }
                let traits = FrontendTraits {
                    drop_when_empty,
                    ..traits
                };
                self.add_frontend(frontend, &service, &port.name, &backends, traits, selection);
            }
        }
    }

    /// The Service's backend selection, from svcproxy's annotation.
    fn algorithm(&mut self, svc: &ServiceObject, service: &ServiceName) -> Algorithm {
        match &svc.lb_algorithm {
            None => Algorithm::Random,
            Some(v) if v == "random" => Algorithm::Random,
            Some(v) if v == "maglev" => Algorithm::Maglev,
            Some(v) => {
                let error = PlanError::UnknownAlgorithm { value: v.clone() };
                self.reject_service(&service.namespace, &service.name, error);
                Algorithm::Random
            }
        }
    }

    fn add_frontend(
        &mut self,
        frontend: Frontend,
        service: &ServiceName,
        port_name: &str,
        backends: &[Backend],
        traits: FrontendTraits,
        selection: Selection,
    ) {
        self.events.push(Event::Frontend(
            frontend,
            Arc::new(FrontendState {
                service: service.clone(),
                port_name: port_name.to_owned(),
                backends: backends.to_vec(),
                affinity_timeout_s: traits.affinity_timeout_s,
                algorithm: traits.algorithm,
                drop_when_empty: traits.drop_when_empty,
                selection,
            }),
        ));
    }

    /// The IPv4 external IPs (allowed by the operator) and load-balancer VIPs of `svc`, refusing
    /// bad literals and skipping other families.
    fn external_ipv4s(
        &mut self,
        svc: &ServiceObject,
        service: &ServiceName,
        options: &PlanOptions,
    ) -> Vec<(Ipv4Addr, FrontendSource)> {
        let external = svc
            .spec
            .iter()
            .flat_map(|s| &s.external_ips)
            .map(|v| ("spec.externalIPs", v.as_str(), FrontendSource::ExternalIp));
        // `ipMode: Proxy`: the load balancer proxies to the nodes itself and must receive the
        // traffic, so the VIP must not be intercepted.
        let lb = svc
            .lb_ingress
            .iter()
            .filter(|i| matches!(i.ip_mode.as_deref(), None | Some("VIP")))
            .filter_map(|i| i.ip.as_deref())
            .map(|v| {
                (
                    "status.loadBalancer.ingress.ip",
                    v,
                    FrontendSource::LoadBalancer,
                )
            });
        let mut out = Vec::new();
        for (field, value, source) in external.chain(lb) {
            let error = match parse_ip(value) {
                ParsedIp::V4(addr) => match special_class(addr) {
                    Some(class) => PlanError::SpecialFrontendIp { field, addr, class },
                    None if source == FrontendSource::ExternalIp
                        && options
                            .external_ip_ranges
                            .as_ref()
                            .is_some_and(|r| !r.iter().any(|c| c.contains(addr))) =>
                    {
                        PlanError::ExternalIpNotAllowed { addr }
                    }
                    None => {
                        out.push((addr, source));
                        continue;
                    }
                },
                ParsedIp::V6 => continue,
                ParsedIp::LeadingZero => PlanError::LeadingZeroIp {
                    field,
                    value: value.to_owned(),
                },
                ParsedIp::Invalid => PlanError::UnparseableIp {
                    field,
                    value: value.to_owned(),
                },
            };
            self.reject_service(&service.namespace, &service.name, error);
        }
        out
    }

    /// The IPv4 ClusterIPs of `svc`, refusing bad literals and skipping other families.
    fn cluster_ipv4s(&mut self, svc: &ServiceObject, service: &ServiceName) -> Vec<Ipv4Addr> {
        let mut addrs = Vec::new();
        for value in cluster_ip_strings(svc) {
            let error = match parse_ip(value) {
                ParsedIp::V4(addr) => match special_class(addr) {
                    None => {
                        addrs.push(addr);
                        continue;
                    }
                    Some(class) => PlanError::SpecialFrontendIp {
                        field: "spec.clusterIPs",
                        addr,
                        class,
                    },
                },
                // The other family: served by another datapath, not an error.
                ParsedIp::V6 => continue,
                ParsedIp::LeadingZero => PlanError::LeadingZeroIp {
                    field: "spec.clusterIPs",
                    value: value.to_owned(),
                },
                ParsedIp::Invalid => PlanError::UnparseableIp {
                    field: "spec.clusterIPs",
                    value: value.to_owned(),
                },
            };
            self.reject_service(&service.namespace, &service.name, error);
        }
        addrs
    }

    fn service_ports(
        &mut self,
        svc: &ServiceObject,
        service: &ServiceName,
    ) -> Vec<ServicePortSpec> {
        let mut out = Vec::new();
        for port in svc.spec.iter().flat_map(|s| &s.ports) {
            let name = port.name.as_deref().unwrap_or_default().to_owned();
            let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
                let protocol = port.protocol.as_deref().unwrap_or_default().to_owned();
                self.reject_service(
                    &service.namespace,
                    &service.name,
                    PlanError::UnknownProtocol { name, protocol },
                );
                continue;
            };
            match u16::try_from(port.port).ok().filter(|&p| p != 0) {
                Some(number) => out.push(ServicePortSpec {
                    name,
                    port: number,
                    protocol,
                }),
                None => self.reject_service(
                    &service.namespace,
                    &service.name,
                    PlanError::PortOutOfRange {
                        name,
                        number: port.port,
                    },
                ),
            }
        }
        out
    }

    /// Reads one slice once (not once per Service port), refusing its bad ports and addresses.
    fn parse_slice<'s>(&mut self, slice: &'s SliceObject) -> ParsedSlice<'s> {
        let namespace = namespace_of(slice.namespace.as_deref());
        let name = slice.name.as_deref().unwrap_or("<unnamed>");
        let mut ports = HashMap::new();
        for port in &slice.ports {
            let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
                // No Service port can have this protocol (they are refused), so nothing joins it.
                continue;
            };
            let port_name = port.name.as_deref().unwrap_or_default();
            let number = match port.port {
                // No port: usable by nothing (kube-proxy's "all ports" is not implemented there
                // either).
                None => None,
                Some(number) => match u16::try_from(number).ok().filter(|&p| p != 0) {
                    Some(number) => Some(number),
                    None => {
                        self.reject(
                            "EndpointSlice",
                            namespace,
                            name,
                            PlanError::PortOutOfRange {
                                name: port_name.to_owned(),
                                number,
                            },
                        );
                        None
                    }
                },
            };
            // The first entry of a name and protocol wins, as the API forbids repeats anyway.
            ports.entry((port_name, protocol)).or_insert(number);
        }
        let mut endpoints = Vec::with_capacity(slice.endpoints.len());
        for endpoint in &slice.endpoints {
            // kube-proxy uses the first address; the API says all addresses are fungible.
            let Some(address) = &endpoint.address else {
                continue;
            };
            // Only addresses kept as text can be malformed.
            let value = match address {
                Address::V4(_) => "",
                Address::Text(text) => &**text,
            };
            let error = match parse_address(address) {
                ParsedIp::V4(addr) => match special_class(addr) {
                    Some(class) => PlanError::HostileEndpoint { addr, class },
                    None if self.cluster_ips.contains_key(&addr) => {
                        PlanError::EndpointIsClusterIp { addr }
                    }
                    None => {
                        endpoints.push(ParsedEndpoint::new(addr, endpoint));
                        continue;
                    }
                },
                ParsedIp::LeadingZero => PlanError::LeadingZeroIp {
                    field: "endpoint address",
                    value: value.to_owned(),
                },
                // An IPv6 address in an IPv4 slice is as broken as garbage.
                ParsedIp::V6 | ParsedIp::Invalid => PlanError::UnparseableIp {
                    field: "endpoint address",
                    value: value.to_owned(),
                },
            };
            self.reject("EndpointSlice", namespace, name, error);
        }
        ParsedSlice { ports, endpoints }
    }

    fn reject_service(&mut self, namespace: &str, name: &str, error: PlanError) {
        self.reject("Service", namespace, name, error);
    }

    fn reject(&mut self, kind: &str, namespace: &str, name: &str, error: PlanError) {
        self.events.push(Event::Reject(Rejection {
            object: format!("{kind} {namespace}/{name}"),
            reason: error.to_string(),
        }));
    }
}

fn namespace_of(namespace: Option<&str>) -> &str {
    namespace
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

fn is_headless(svc: &ServiceObject) -> bool {
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    spec.cluster_ip.as_deref() == Some("None") || spec.cluster_ips.iter().any(|ip| ip == "None")
}

/// `spec.clusterIPs`, or the legacy `spec.clusterIP` only when the list is empty (objects written
/// before dual-stack, or by hand).
fn cluster_ip_strings(svc: &ServiceObject) -> Vec<&str> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    match spec.cluster_ips.as_slice() {
        ips if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty())
            .into_iter()
            .collect(),
    }
}

/// The IPv4 ClusterIPs of one Service.
fn cluster_ipv4s_of(svc: &ServiceObject) -> Vec<Ipv4Addr> {
    cluster_ip_strings(svc)
        .into_iter()
        .filter_map(|value| match parse_ip(value) {
            ParsedIp::V4(addr) => Some(addr),
            _ => None,
        })
        .collect()
}

enum ParsedIp {
    V4(Ipv4Addr),
    V6,
    LeadingZero,
    Invalid,
}

/// [`parse_ip`] of an address as the source keeps it.
fn parse_address(address: &Address) -> ParsedIp {
    match address {
        Address::V4(addr) => ParsedIp::V4(*addr),
        Address::Text(text) => parse_ip(text),
    }
}

/// Strict parse: IPv4 dotted-quad in decimal only. Anything with a colon is IPv6, including
/// IPv4-mapped addresses (`::ffff:10.0.0.1`), which are not IPv4 frontends.
fn parse_ip(value: &str) -> ParsedIp {
    if value.contains(':') {
        return match value.parse::<Ipv6Addr>() {
            Ok(_) => ParsedIp::V6,
            Err(_) => ParsedIp::Invalid,
        };
    }
    let octets: Vec<&str> = value.split('.').collect();
    let looks_dotted = octets.len() == 4
        && octets
            .iter()
            .all(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()));
    if looks_dotted && octets.iter().any(|o| o.len() > 1 && o.starts_with('0')) {
        return ParsedIp::LeadingZero;
    }
    // std's parser is strict already (no octal, no short forms); the check above only makes the
    // message say why.
    match value.parse::<Ipv4Addr>() {
        Ok(addr) => ParsedIp::V4(addr),
        Err(_) => ParsedIp::Invalid,
    }
}

/// Addresses that are never a Service or Pod address: traffic to them would reach the node
/// itself or nobody.
fn special_class(addr: Ipv4Addr) -> Option<&'static str> {
    if addr.octets()[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if addr.is_loopback() {
        Some("loopback (127.0.0.0/8)")
    } else if addr.is_link_local() {
        Some("link-local (169.254.0.0/16)")
    } else if addr.is_multicast() {
        Some("multicast (224.0.0.0/4)")
    } else if addr.is_broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

/// What the planner needs of one slice.
struct ParsedSlice<'s> {
    /// Port number by (name, protocol); `None` when the slice port has no usable number.
    ports: HashMap<(&'s str, Protocol), Option<u16>>,
    endpoints: Vec<ParsedEndpoint<'s>>,
}

#[derive(Clone, Debug)]
struct ParsedEndpoint<'s> {
    addr: Ipv4Addr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node_name: Option<&'s str>,
    zone_hints: Vec<&'s str>,
}

impl<'s> ParsedEndpoint<'s> {
    fn new(addr: Ipv4Addr, endpoint: &'s SliceEndpoint) -> Self {
        // The API's defaults: unset ready/serving mean true, unset terminating means false.
        Self {
            addr,
            ready: endpoint.ready.unwrap_or(true),
            serving: endpoint.serving.unwrap_or(true),
            terminating: endpoint.terminating.unwrap_or(false),
            node_name: endpoint.node_name.as_deref(),
            zone_hints: endpoint.zone_hints.iter().map(|z| &**z).collect(),
        }
    }

    /// Which copy of a duplicated address to keep: ready first, then not terminating, then
    /// serving.
    fn preference(&self) -> (bool, bool, bool) {
        (self.ready, !self.terminating, self.serving)
    }
}

/// One endpoint for one Service port.
struct Candidate<'p, 's> {
    endpoint: &'p ParsedEndpoint<'s>,
    port: u16,
}

/// All endpoints of one Service port across the Service's slices, one per address (the
/// preferred copy, the first slice by name among equals), sorted by address. Each endpoint takes
/// the port number of its own slice, since slices may disagree during a rollout.
fn merge_endpoints<'p, 's>(
    slices: &'p [ParsedSlice<'s>],
    port_name: &str,
    protocol: Protocol,
) -> Vec<Candidate<'p, 's>> {
    let mut by_addr: HashMap<Ipv4Addr, Candidate<'p, 's>> = HashMap::new();
    for slice in slices {
        let Some(&Some(port)) = slice.ports.get(&(port_name, protocol)) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let candidate = Candidate { endpoint, port };
            by_addr
                .entry(endpoint.addr)
                .and_modify(|held| {
                    if endpoint.preference() > held.endpoint.preference() {
                        *held = Candidate { endpoint, port };
                    }
                })
                .or_insert(candidate);
        }
    }
    let mut merged: Vec<_> = by_addr.into_values().collect();
    merged.sort_by_key(|c| c.endpoint.addr);
    merged
}

/// How one kind of traffic picks endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TrafficPolicy {
    /// Only endpoints on this node (`internalTrafficPolicy: Local` for ClusterIP traffic).
    local: bool,
    /// The Service asks for topology-aware routing (used only if the hints allow it).
    wants_topology: bool,
}

fn traffic_policy(svc: &ServiceObject, source: FrontendSource) -> TrafficPolicy {
    let spec = svc.spec.as_ref();
    let local = match source {
        FrontendSource::ClusterIp => {
            spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local")
        }
        // externalTrafficPolicy applies to traffic from outside the cluster only; pods reaching
        // an external or LB IP use every endpoint (kube-proxy's "short-circuit"). The hooks
        // see pod traffic, so that is the policy here; the node-facing hook that sees outside
        // traffic gets frontends of its own scope.
        FrontendSource::ExternalIp | FrontendSource::LoadBalancer => false,
    };
    let distribution = spec.and_then(|s| s.traffic_distribution.as_deref());
    let annotation = svc.topology_mode.as_deref();
    TrafficPolicy {
        local,
        wants_topology: matches!(distribution, Some("PreferClose" | "PreferSameZone"))
            || matches!(annotation, Some("Auto" | "auto")),
    }
}

/// kube-proxy's `CategorizeEndpoints` for one traffic class. Active: ready endpoints (of this
/// node for a Local policy, of this zone when topology applies); if none, the serving and
/// terminating ones. Terminating endpoints outside the active set stay, marked, so their
/// established flows finish; everything else is left out. Notes in `selection` what narrowed
/// the choice.
fn select_backends(
    candidates: &[Candidate<'_, '_>],
    policy: TrafficPolicy,
    node: &NodeInfo,
    selection: &mut Selection,
) -> Vec<Backend> {
    let on_node = |c: &Candidate<'_, '_>| {
        !node.name.is_empty() && c.endpoint.node_name == Some(node.name.as_str())
    };
    let eligible = |c: &Candidate<'_, '_>| !policy.local || on_node(c);
    // Topology narrows cluster-wide traffic only; a Local policy is narrower already.
    let zone = (!policy.local && policy.wants_topology)
        .then(|| topology_zone(candidates, node))
        .flatten();
    let in_zone = |c: &Candidate<'_, '_>| zone.is_none_or(|z| c.endpoint.zone_hints.contains(&z));
    selection.topology_zone = zone.map(str::to_owned);
    selection.topology_ignored = !policy.local && policy.wants_topology && zone.is_none();

    let mut active: Vec<bool> = candidates
        .iter()
        .map(|c| eligible(c) && c.endpoint.ready && in_zone(c))
        .collect();
    if !active.contains(&true) {
        // Not filtered by topology: topology applies only when a ready endpoint is hinted for
        // this zone, so reaching here means no ready endpoint at all.
        active = candidates
            .iter()
            .map(|c| eligible(c) && c.endpoint.serving && c.endpoint.terminating)
            .collect();
        selection.terminating_fallback = active.contains(&true);
    }
    candidates
        .iter()
        .zip(active)
        .filter_map(|(c, active)| {
            let state = if active {
                BackendState::Active
            } else if c.endpoint.terminating {
                BackendState::Terminating
            } else {
                return None;
            };
            Some(Backend {
                addr: c.endpoint.addr,
                port: c.port,
                state,
            })
        })
        .collect()
}

/// The zone to filter by, if topology hints are usable: some endpoint is ready, every ready one
/// carries a zone hint, and some hint names this node's zone.
fn topology_zone<'n>(candidates: &[Candidate<'_, '_>], node: &'n NodeInfo) -> Option<&'n str> {
    let zone = node.zone.as_deref().filter(|z| !z.is_empty())?;
    let mut ready = candidates.iter().filter(|c| c.endpoint.ready).peekable();
    ready.peek()?;
    let mut hinted_here = false;
    for candidate in ready {
        let hints = &candidate.endpoint.zone_hints;
        if hints.is_empty() {
            return None;
        }
        hinted_here |= hints.contains(&zone);
    }
    hinted_here.then_some(zone)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use serde_json::{Value, json};

    use super::*;

    // ---- object builders -------------------------------------------------------------------

    /// A Service in namespace `dev` with `clusterIPs` and ports (name, port, protocol); an
    /// empty name or protocol is left unset.
    fn svc(name: &str, ips: &[&str], ports: &[(&str, i32, &str)]) -> Value {
        let ports: Vec<Value> = ports
            .iter()
            .map(|&(port_name, port, protocol)| {
                let mut p = json!({ "port": port });
                if !port_name.is_empty() {
                    p["name"] = json!(port_name);
                }
                if !protocol.is_empty() {
                    p["protocol"] = json!(protocol);
                }
                p
            })
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": "dev" },
            "spec": { "clusterIPs": ips, "ports": ports },
        })
    }

    /// `svc` with `patch` merged in (objects merge key by key, anything else replaces).
    fn with(mut base: Value, patch: Value) -> Value {
        merge(&mut base, patch);
        base
    }

    fn merge(base: &mut Value, patch: Value) {
        match (base, patch) {
            (Value::Object(base), Value::Object(patch)) => {
                for (key, value) in patch {
                    merge(base.entry(key).or_insert(Value::Null), value);
                }
            }
            (base, patch) => *base = patch,
        }
    }

    /// An endpoint; every condition unset unless set by a builder method.
    #[derive(Clone, Default)]
    struct Ep {
        addr: String,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
        node: Option<String>,
        zones: Vec<String>,
    }

    fn ep(addr: &str) -> Ep {
        Ep {
            addr: addr.to_owned(),
            ..Ep::default()
        }
    }

    impl Ep {
        fn ready(mut self, v: bool) -> Self {
            self.ready = Some(v);
            self
        }
        fn serving(mut self, v: bool) -> Self {
            self.serving = Some(v);
            self
        }
        fn terminating(mut self, v: bool) -> Self {
            self.terminating = Some(v);
            self
        }
        /// Terminating and still serving: the shape of a pod in its grace period.
        fn draining(self) -> Self {
            self.ready(false).serving(true).terminating(true)
        }
        fn node(mut self, n: &str) -> Self {
            self.node = Some(n.to_owned());
            self
        }
        fn zones(mut self, z: &[&str]) -> Self {
            self.zones = z.iter().map(|s| s.to_string()).collect();
            self
        }
        fn json(&self) -> Value {
            let mut e = json!({ "addresses": [self.addr] });
            let mut conditions = serde_json::Map::new();
            for (key, value) in [
                ("ready", self.ready),
                ("serving", self.serving),
                ("terminating", self.terminating),
            ] {
                if let Some(v) = value {
                    conditions.insert(key.to_owned(), json!(v));
                }
            }
            if !conditions.is_empty() {
                e["conditions"] = Value::Object(conditions);
            }
            if let Some(n) = &self.node {
                e["nodeName"] = json!(n);
            }
            if !self.zones.is_empty() {
                let zones: Vec<Value> = self.zones.iter().map(|z| json!({ "name": z })).collect();
                e["hints"] = json!({ "forZones": zones });
            }
            e
        }
    }

    /// An IPv4 EndpointSlice of Service `dev/<service>` with ports (name, port, protocol).
    fn slice(name: &str, service: &str, ports: &[(&str, Option<i32>, &str)], eps: &[Ep]) -> Value {
        let ports: Vec<Value> = ports
            .iter()
            .map(|&(port_name, port, protocol)| {
                let mut p = json!({ "port": port });
                if !port_name.is_empty() {
                    p["name"] = json!(port_name);
                }
                if !protocol.is_empty() {
                    p["protocol"] = json!(protocol);
                }
                p
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "dev",
                "labels": { LABEL_SERVICE_NAME: service },
            },
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": eps.iter().map(Ep::json).collect::<Vec<_>>(),
        })
    }

    /// The common case: Service `web` on 10.96.0.10:80/TCP, slice port unnamed 8080.
    fn web() -> Value {
        svc("web", &["10.96.0.10"], &[("", 80, "")])
    }

    fn web_slice(name: &str, eps: &[Ep]) -> Value {
        slice(name, "web", &[("", Some(8080), "")], eps)
    }

    fn node_a() -> NodeInfo {
        NodeInfo {
            name: "node-a".to_owned(),
            zone: Some("zone-a".to_owned()),
        }
    }

    /// A test Service as the sources keep it: the API object, made compact.
    fn arc(v: Value) -> Arc<ServiceObject> {
        let svc: Service = serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("test Service does not deserialize: {e}: {v}"));
        Arc::new(ServiceObject::from(&svc))
    }

    fn arc_slice(v: Value) -> Arc<SliceObject> {
        let slice: EndpointSlice = serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("test EndpointSlice does not deserialize: {e}: {v}"));
        Arc::new(SliceObject::from(&slice))
    }

    fn run(services: &[Value], slices: &[Value], node: &NodeInfo) -> Desired {
        let services: Vec<Arc<ServiceObject>> = services.iter().cloned().map(arc).collect();
        let slices: Vec<Arc<SliceObject>> = slices.iter().cloned().map(arc_slice).collect();
        plan(&PlanInput {
            services: &services,
            slices: &slices,
            node,
            options: &PlanOptions::default(),
        })
    }

    /// One line per frontend: `10.96.0.10:80/TCP dev/web => 10.1.0.1:8080 10.1.0.2:8080(T)`.
    fn show(desired: &Desired) -> Vec<String> {
        desired
            .frontends
            .iter()
            .map(|(frontend, state)| {
                let backends: Vec<String> = state
                    .backends
                    .iter()
                    .map(|b| match b.state {
                        BackendState::Active => format!("{}:{}", b.addr, b.port),
                        BackendState::Terminating => format!("{}:{}(T)", b.addr, b.port),
                    })
                    .collect();
                format!("{frontend} {} => {}", state.service, backends.join(" "))
                    .trim_end()
                    .to_owned()
            })
            .collect()
    }

    fn show_rejections(desired: &Desired) -> Vec<String> {
        desired
            .rejections
            .iter()
            .map(|r| format!("{}: {}", r.object, r.reason))
            .collect()
    }

    // ---- the table ---------------------------------------------------------------------------

    struct Case {
        name: &'static str,
        services: Vec<Value>,
        slices: Vec<Value>,
        node: NodeInfo,
        want: Vec<&'static str>,
        /// Each rejection, as substrings of "<object>: <reason>", in order.
        rejections: Vec<Vec<&'static str>>,
    }

    impl Default for Case {
        fn default() -> Self {
            Self {
                name: "",
                services: vec![web()],
                slices: Vec::new(),
                node: node_a(),
                want: Vec::new(),
                rejections: Vec::new(),
            }
        }
    }

    fn cases() -> Vec<Case> {
        let hinted = |zone_b_ready: bool| {
            vec![web_slice(
                "web-1",
                &[
                    ep("10.1.0.1").zones(&["zone-a"]),
                    ep("10.1.0.2").zones(&["zone-b"]).ready(zone_b_ready),
                    ep("10.1.0.3").zones(&["zone-b"]),
                ],
            )]
        };
        let prefer_close = || {
            with(
                web(),
                json!({ "spec": { "trafficDistribution": "PreferClose" } }),
            )
        };
        let all_three = "10.96.0.10:80/TCP dev/web => 10.1.0.1:8080 10.1.0.2:8080 10.1.0.3:8080";
        vec![
            Case {
                name: "basic ClusterIP",
                slices: vec![web_slice("web-1", &[ep("10.1.0.2"), ep("10.1.0.1")])],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080 10.1.0.2:8080"],
                ..Case::default()
            },
            Case {
                name: "no slices: frontend with no backends, so the datapath rejects",
                want: vec!["10.96.0.10:80/TCP dev/web =>"],
                ..Case::default()
            },
            Case {
                name: "legacy clusterIP used only when clusterIPs is empty",
                services: vec![
                    with(
                        svc("a", &[], &[("", 80, "")]),
                        json!({ "spec": { "clusterIP": "10.96.0.1" } }),
                    ),
                    with(
                        svc("b", &["10.96.0.2"], &[("", 80, "")]),
                        json!({ "spec": { "clusterIP": "10.96.0.99" } }),
                    ),
                ],
                want: vec!["10.96.0.1:80/TCP dev/a =>", "10.96.0.2:80/TCP dev/b =>"],
                ..Case::default()
            },
            Case {
                name: "multi-port: named target ports, two slices with different numbers",
                services: vec![svc(
                    "web",
                    &["10.96.0.10"],
                    &[
                        ("http", 80, "TCP"),
                        ("dns", 53, "UDP"),
                        ("dns-tcp", 53, "TCP"),
                    ],
                )],
                slices: vec![
                    slice(
                        "web-new",
                        "web",
                        &[
                            ("http", Some(8081), "TCP"),
                            ("dns", Some(5353), "UDP"),
                            ("dns-tcp", Some(5353), "TCP"),
                        ],
                        &[ep("10.1.0.2")],
                    ),
                    slice(
                        "web-old",
                        "web",
                        &[("dns", Some(53), "UDP"), ("http", Some(8080), "TCP")],
                        &[ep("10.1.0.1")],
                    ),
                ],
                want: vec![
                    "10.96.0.10:53/TCP dev/web => 10.1.0.2:5353",
                    "10.96.0.10:53/UDP dev/web => 10.1.0.1:53 10.1.0.2:5353",
                    "10.96.0.10:80/TCP dev/web => 10.1.0.1:8080 10.1.0.2:8081",
                ],
                ..Case::default()
            },
            Case {
                name: "Service spread over several slices is merged; other Services' slices are not",
                slices: vec![
                    web_slice("web-c", &[ep("10.1.0.3")]),
                    web_slice("web-a", &[ep("10.1.0.1")]),
                    web_slice("web-b", &[ep("10.1.0.2")]),
                    slice("api-1", "api", &[("", Some(8080), "")], &[ep("10.1.0.9")]),
                    with(
                        web_slice("web-x", &[ep("10.1.0.8")]),
                        json!({ "metadata": { "namespace": "prod" } }),
                    ),
                ],
                want: vec![all_three],
                ..Case::default()
            },
            Case {
                name: "same address in two slices: the non-terminating copy wins",
                slices: vec![
                    web_slice("web-a", &[ep("10.1.0.1").draining()]),
                    web_slice("web-b", &[ep("10.1.0.1"), ep("10.1.0.2")]),
                ],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080 10.1.0.2:8080"],
                ..Case::default()
            },
            Case {
                name: "same address in one slice twice: kept once",
                slices: vec![web_slice(
                    "web-a",
                    &[ep("10.1.0.1").ready(false), ep("10.1.0.1")],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080"],
                ..Case::default()
            },
            Case {
                name: "nil conditions mean ready, serving, not terminating",
                slices: vec![web_slice(
                    "web-1",
                    &[ep("10.1.0.1"), ep("10.1.0.2").serving(false)],
                )],
                // ready unset = true even when serving is false: ready decides.
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080 10.1.0.2:8080"],
                ..Case::default()
            },
            Case {
                name: "not ready and not terminating: left out",
                slices: vec![web_slice(
                    "web-1",
                    &[ep("10.1.0.1"), ep("10.1.0.2").ready(false)],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080"],
                ..Case::default()
            },
            Case {
                name: "no ready endpoint: fall back to serving+terminating ones",
                slices: vec![web_slice(
                    "web-1",
                    &[
                        ep("10.1.0.1").draining(),
                        ep("10.1.0.2").ready(false).serving(false).terminating(true),
                        ep("10.1.0.3").ready(false),
                    ],
                )],
                // .2 is terminating but not serving: not active, kept for its existing flows.
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080 10.1.0.2:8080(T)"],
                ..Case::default()
            },
            Case {
                name: "ready endpoints exist: terminating ones kept as Terminating",
                slices: vec![web_slice(
                    "web-1",
                    &[ep("10.1.0.1"), ep("10.1.0.2").draining()],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080 10.1.0.2:8080(T)"],
                ..Case::default()
            },
            Case {
                name: "internalTrafficPolicy Local: only this node's endpoints",
                services: vec![with(
                    web(),
                    json!({ "spec": { "internalTrafficPolicy": "Local" } }),
                )],
                slices: vec![web_slice(
                    "web-1",
                    &[
                        ep("10.1.0.1").node("node-a"),
                        ep("10.1.0.2").node("node-b"),
                        ep("10.1.0.3"),
                    ],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080"],
                ..Case::default()
            },
            Case {
                name: "internalTrafficPolicy Local without local endpoints: none (the datapath drops)",
                services: vec![with(
                    web(),
                    json!({ "spec": { "internalTrafficPolicy": "Local" } }),
                )],
                slices: vec![web_slice("web-1", &[ep("10.1.0.2").node("node-b")])],
                want: vec!["10.96.0.10:80/TCP dev/web =>"],
                ..Case::default()
            },
            Case {
                name: "internalTrafficPolicy Local: local serving+terminating fallback",
                services: vec![with(
                    web(),
                    json!({ "spec": { "internalTrafficPolicy": "Local" } }),
                )],
                slices: vec![web_slice(
                    "web-1",
                    &[
                        ep("10.1.0.1").node("node-a").draining(),
                        ep("10.1.0.2").node("node-b"),
                    ],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080"],
                ..Case::default()
            },
            Case {
                name: "internalTrafficPolicy Local with an unnamed node never matches",
                services: vec![with(
                    web(),
                    json!({ "spec": { "internalTrafficPolicy": "Local" } }),
                )],
                slices: vec![web_slice("web-1", &[ep("10.1.0.1").node("")])],
                node: NodeInfo::default(),
                want: vec!["10.96.0.10:80/TCP dev/web =>"],
                ..Case::default()
            },
            Case {
                name: "topology: PreferClose with usable hints keeps this zone",
                services: vec![prefer_close()],
                slices: hinted(true),
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080"],
                ..Case::default()
            },
            Case {
                name: "topology: PreferSameZone is the same ask",
                services: vec![with(
                    web(),
                    json!({ "spec": { "trafficDistribution": "PreferSameZone" } }),
                )],
                slices: hinted(true),
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080"],
                ..Case::default()
            },
            Case {
                name: "topology: annotation auto is the same ask",
                services: vec![with(
                    web(),
                    json!({ "metadata": { "annotations": { ANNOTATION_TOPOLOGY_MODE: "auto" } } }),
                )],
                slices: hinted(true),
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080"],
                ..Case::default()
            },
            Case {
                name: "topology not filtered: the Service does not ask, hints or not",
                slices: hinted(true),
                want: vec![all_three],
                ..Case::default()
            },
            Case {
                name: "topology not filtered: annotation in another case (AUTO)",
                services: vec![with(
                    web(),
                    json!({ "metadata": { "annotations": { ANNOTATION_TOPOLOGY_MODE: "AUTO" } } }),
                )],
                slices: hinted(true),
                want: vec![all_three],
                ..Case::default()
            },
            Case {
                name: "topology not filtered: a ready endpoint has no hint",
                services: vec![prefer_close()],
                slices: vec![web_slice(
                    "web-1",
                    &[
                        ep("10.1.0.1").zones(&["zone-a"]),
                        ep("10.1.0.2"),
                        ep("10.1.0.3").zones(&["zone-b"]),
                    ],
                )],
                want: vec![all_three],
                ..Case::default()
            },
            Case {
                name: "topology: a non-ready endpoint without a hint does not matter",
                services: vec![prefer_close()],
                slices: vec![web_slice(
                    "web-1",
                    &[
                        ep("10.1.0.1").zones(&["zone-a"]),
                        ep("10.1.0.2").ready(false),
                        ep("10.1.0.3").zones(&["zone-b"]),
                    ],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080"],
                ..Case::default()
            },
            Case {
                name: "topology not filtered: no hint names this node's zone",
                services: vec![prefer_close()],
                slices: hinted(true),
                node: NodeInfo {
                    name: "node-c".to_owned(),
                    zone: Some("zone-c".to_owned()),
                },
                want: vec![all_three],
                ..Case::default()
            },
            Case {
                name: "topology not filtered: this node has no zone",
                services: vec![prefer_close()],
                slices: hinted(true),
                node: NodeInfo {
                    name: "node-a".to_owned(),
                    zone: None,
                },
                want: vec![all_three],
                ..Case::default()
            },
            Case {
                name: "topology is not applied to internalTrafficPolicy Local",
                services: vec![with(
                    prefer_close(),
                    json!({ "spec": { "internalTrafficPolicy": "Local" } }),
                )],
                slices: vec![web_slice(
                    "web-1",
                    &[
                        ep("10.1.0.1").zones(&["zone-a"]).node("node-b"),
                        ep("10.1.0.2").zones(&["zone-b"]).node("node-a"),
                    ],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.2:8080"],
                ..Case::default()
            },
            Case {
                name: "ignored: headless Service",
                services: vec![with(
                    web(),
                    json!({ "spec": { "clusterIP": "None", "clusterIPs": ["None"] } }),
                )],
                slices: vec![web_slice("web-1", &[ep("10.1.0.1")])],
                ..Case::default()
            },
            Case {
                name: "ignored: ExternalName even with a clusterIP",
                services: vec![with(
                    web(),
                    json!({ "spec": { "type": "ExternalName", "externalName": "example.com" } }),
                )],
                slices: vec![web_slice("web-1", &[ep("10.1.0.1")])],
                ..Case::default()
            },
            Case {
                name: "ignored: service-proxy-name label, any value",
                services: vec![
                    with(
                        web(),
                        json!({ "metadata": { "labels": { LABEL_SERVICE_PROXY_NAME: "other" } } }),
                    ),
                    with(
                        svc("empty", &["10.96.0.11"], &[("", 80, "")]),
                        json!({ "metadata": { "labels": { LABEL_SERVICE_PROXY_NAME: "" } } }),
                    ),
                ],
                ..Case::default()
            },
            Case {
                name: "ignored: headless-labelled, FQDN and IPv6 slices",
                slices: vec![
                    with(
                        web_slice("web-h", &[ep("10.1.0.1")]),
                        json!({ "metadata": { "labels": { LABEL_HEADLESS: "" } } }),
                    ),
                    with(
                        web_slice("web-f", &[ep("10.1.0.2")]),
                        json!({ "addressType": "FQDN" }),
                    ),
                    with(
                        web_slice("web-6", &[ep("fd00::1")]),
                        json!({ "addressType": "IPv6" }),
                    ),
                    web_slice("web-4", &[ep("10.1.0.4")]),
                ],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.4:8080"],
                ..Case::default()
            },
            Case {
                name: "ignored: slice without the service-name label",
                slices: vec![with(
                    web_slice("web-1", &[ep("10.1.0.1")]),
                    json!({ "metadata": { "labels": null } }),
                )],
                want: vec!["10.96.0.10:80/TCP dev/web =>"],
                ..Case::default()
            },
            Case {
                name: "dual-stack: IPv6 and IPv4-mapped IPv6 ClusterIPs skipped silently",
                services: vec![svc(
                    "web",
                    &["fd00:96::10", "10.96.0.10", "::ffff:10.96.0.11"],
                    &[("", 80, "")],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web =>"],
                ..Case::default()
            },
            Case {
                name: "IPv6-only Service: nothing, no rejection",
                services: vec![svc("web", &["fd00:96::10"], &[("", 80, "")])],
                ..Case::default()
            },
            Case {
                name: "leading-zero and garbage ClusterIPs refused, never read as octal",
                services: vec![
                    svc("web", &["010.96.0.10"], &[("", 80, "")]),
                    svc("api", &["172.30.0.041", "10.96.0.12"], &[("", 80, "")]),
                    svc("bad", &["10.96.0", "zz::1"], &[("", 80, "")]),
                ],
                want: vec!["10.96.0.12:80/TCP dev/api =>"],
                rejections: vec![
                    vec!["Service dev/api", "\"172.30.0.041\"", "leading zero"],
                    vec!["Service dev/bad", "\"10.96.0\"", "not an IP"],
                    vec!["Service dev/bad", "\"zz::1\"", "not an IP"],
                    vec!["Service dev/web", "\"010.96.0.10\"", "leading zero"],
                ],
                ..Case::default()
            },
            Case {
                name: "special ClusterIPs refused",
                services: vec![svc(
                    "web",
                    &["127.0.0.1", "0.0.0.0", "10.96.0.10"],
                    &[("", 80, "")],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web =>"],
                rejections: vec![
                    vec!["Service dev/web", "127.0.0.1", "loopback"],
                    vec!["Service dev/web", "0.0.0.0", "unspecified"],
                ],
                ..Case::default()
            },
            Case {
                name: "hostile endpoint addresses refused, naming slice and address",
                slices: vec![web_slice(
                    "web-evil",
                    &[
                        ep("127.0.0.1"),
                        ep("127.1.2.3"),
                        ep("169.254.169.254"),
                        ep("0.0.0.0"),
                        ep("224.0.0.1"),
                        ep("255.255.255.255"),
                        ep("010.1.0.1"),
                        ep("fd00::1"),
                        ep("10.1.0.1"),
                    ],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080"],
                rejections: vec![
                    vec!["EndpointSlice dev/web-evil", "127.0.0.1", "loopback"],
                    vec!["EndpointSlice dev/web-evil", "127.1.2.3", "loopback"],
                    vec![
                        "EndpointSlice dev/web-evil",
                        "169.254.169.254",
                        "link-local",
                    ],
                    vec!["EndpointSlice dev/web-evil", "0.0.0.0", "unspecified"],
                    vec!["EndpointSlice dev/web-evil", "224.0.0.1", "multicast"],
                    vec!["EndpointSlice dev/web-evil", "255.255.255.255", "broadcast"],
                    vec!["EndpointSlice dev/web-evil", "010.1.0.1", "leading zero"],
                    vec!["EndpointSlice dev/web-evil", "fd00::1", "not an IP"],
                ],
                ..Case::default()
            },
            Case {
                name: "endpoint equal to a ClusterIP (of any Service) refused",
                services: vec![web(), svc("api", &["10.96.0.20"], &[("", 80, "")])],
                slices: vec![web_slice(
                    "web-1",
                    &[ep("10.96.0.20"), ep("10.96.0.10"), ep("10.1.0.1")],
                )],
                want: vec![
                    "10.96.0.10:80/TCP dev/web => 10.1.0.1:8080",
                    "10.96.0.20:80/TCP dev/api =>",
                ],
                rejections: vec![
                    vec!["EndpointSlice dev/web-1", "10.96.0.20", "ClusterIP"],
                    vec!["EndpointSlice dev/web-1", "10.96.0.10", "ClusterIP"],
                ],
                ..Case::default()
            },
            Case {
                name: "slice port with nil port is unusable",
                slices: vec![
                    slice("web-a", "web", &[("", None, "")], &[ep("10.1.0.1")]),
                    web_slice("web-b", &[ep("10.1.0.2")]),
                ],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.2:8080"],
                ..Case::default()
            },
            Case {
                name: "slice port out of range is refused and unusable",
                slices: vec![slice(
                    "web-a",
                    "web",
                    &[("", Some(70000), "")],
                    &[ep("10.1.0.1")],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web =>"],
                rejections: vec![vec!["EndpointSlice dev/web-a", "70000"]],
                ..Case::default()
            },
            Case {
                name: "protocol mismatch: TCP and UDP on one port are separate, each joins its own",
                services: vec![svc(
                    "web",
                    &["10.96.0.10"],
                    &[("dns", 53, "UDP"), ("web", 80, "")],
                )],
                slices: vec![slice(
                    "web-1",
                    "web",
                    &[("dns", Some(5353), "TCP"), ("web", Some(8080), "UDP")],
                    &[ep("10.1.0.1")],
                )],
                want: vec![
                    "10.96.0.10:53/UDP dev/web =>",
                    "10.96.0.10:80/TCP dev/web =>",
                ],
                ..Case::default()
            },
            Case {
                name: "unnamed Service port matches unnamed or empty-named slice port only",
                slices: vec![
                    slice(
                        "web-a",
                        "web",
                        &[("", Some(8080), "TCP")],
                        &[ep("10.1.0.1")],
                    ),
                    slice(
                        "web-b",
                        "web",
                        &[("http", Some(9090), "TCP")],
                        &[ep("10.1.0.2")],
                    ),
                    with(
                        slice("web-c", "web", &[], &[ep("10.1.0.3")]),
                        json!({ "ports": [{ "name": "", "port": 7070 }] }),
                    ),
                ],
                want: vec!["10.96.0.10:80/TCP dev/web => 10.1.0.1:8080 10.1.0.3:7070"],
                ..Case::default()
            },
            Case {
                name: "bad Service ports refused, good ones kept",
                services: vec![svc(
                    "web",
                    &["10.96.0.10"],
                    &[("a", 0, ""), ("b", 80, "ICMP"), ("c", 81, "SCTP")],
                )],
                want: vec!["10.96.0.10:81/SCTP dev/web =>"],
                rejections: vec![
                    vec!["Service dev/web", "\"a\"", "outside"],
                    vec!["Service dev/web", "ICMP"],
                ],
                ..Case::default()
            },
            Case {
                name: "frontend conflict: the older Service keeps it",
                services: vec![
                    with(
                        svc("young", &["10.96.0.10"], &[("", 80, ""), ("", 81, "")]),
                        json!({ "metadata": { "creationTimestamp": "2024-05-01T00:00:00Z" } }),
                    ),
                    with(
                        svc("old", &["10.96.0.10"], &[("", 80, "")]),
                        json!({ "metadata": { "creationTimestamp": "2023-01-01T00:00:00Z" } }),
                    ),
                ],
                want: vec![
                    "10.96.0.10:80/TCP dev/old =>",
                    "10.96.0.10:81/TCP dev/young =>",
                ],
                rejections: vec![vec!["Service dev/young", "10.96.0.10:80/TCP", "dev/old"]],
                ..Case::default()
            },
            Case {
                name: "frontend conflict: same age goes by namespace/name; no age counts as newest",
                services: vec![
                    svc("aaa", &["10.96.0.10"], &[("", 80, "")]),
                    svc("zzz", &["10.96.0.10"], &[("", 80, "")]),
                    with(
                        svc("stamped", &["10.96.0.10"], &[("", 80, "")]),
                        json!({ "metadata": { "creationTimestamp": "2030-01-01T00:00:00Z" } }),
                    ),
                ],
                want: vec!["10.96.0.10:80/TCP dev/stamped =>"],
                rejections: vec![
                    vec!["Service dev/aaa", "dev/stamped"],
                    vec!["Service dev/zzz", "dev/stamped"],
                ],
                ..Case::default()
            },
            Case {
                name: "externalIPs and VIP-mode LB ingress are frontends; ipMode Proxy is not",
                services: vec![with(
                    web(),
                    json!({
                        "spec": { "externalIPs": ["203.0.113.5"] },
                        "status": { "loadBalancer": { "ingress": [
                            { "ip": "198.51.100.7" },
                            { "ip": "198.51.100.8", "ipMode": "Proxy" },
                            { "ip": "198.51.100.9", "ipMode": "VIP" },
                            { "hostname": "lb.example.com" },
                        ] } },
                    }),
                )],
                slices: vec![web_slice("web-1", &[ep("10.1.0.1")])],
                want: vec![
                    "10.96.0.10:80/TCP dev/web => 10.1.0.1:8080",
                    "198.51.100.7:80/TCP dev/web => 10.1.0.1:8080",
                    "198.51.100.9:80/TCP dev/web => 10.1.0.1:8080",
                    "203.0.113.5:80/TCP dev/web => 10.1.0.1:8080",
                ],
                ..Case::default()
            },
            Case {
                name: "traffic policies: internal narrows the ClusterIP only, external never narrows pod traffic",
                services: vec![with(
                    web(),
                    json!({
                        "spec": {
                            "internalTrafficPolicy": "Local",
                            "externalTrafficPolicy": "Local",
                            "externalIPs": ["203.0.113.5"],
                        },
                        "status": { "loadBalancer": { "ingress": [{ "ip": "198.51.100.7" }] } },
                    }),
                )],
                slices: vec![web_slice(
                    "web-1",
                    &[ep("10.1.0.1").node("node-a"), ep("10.1.0.2").node("node-b")],
                )],
                want: vec![
                    "10.96.0.10:80/TCP dev/web => 10.1.0.1:8080",
                    "198.51.100.7:80/TCP dev/web => 10.1.0.1:8080 10.1.0.2:8080",
                    "203.0.113.5:80/TCP dev/web => 10.1.0.1:8080 10.1.0.2:8080",
                ],
                ..Case::default()
            },
            Case {
                name: "externalTrafficPolicy Local with no endpoint anywhere: external IP rejects too",
                services: vec![with(
                    web(),
                    json!({ "spec": { "externalTrafficPolicy": "Local", "externalIPs": ["203.0.113.5"] } }),
                )],
                want: vec![
                    "10.96.0.10:80/TCP dev/web =>",
                    "203.0.113.5:80/TCP dev/web =>",
                ],
                ..Case::default()
            },
            Case {
                name: "bad external and LB addresses refused, IPv6 ones skipped, good ones kept",
                services: vec![with(
                    web(),
                    json!({
                        "spec": { "externalIPs": ["010.1.2.3", "2001:db8::1", "127.0.0.1", "203.0.113.5"] },
                        "status": { "loadBalancer": { "ingress": [{ "ip": "lb" }, { "ip": "2001:db8::2" }] } },
                    }),
                )],
                want: vec![
                    "10.96.0.10:80/TCP dev/web =>",
                    "203.0.113.5:80/TCP dev/web =>",
                ],
                rejections: vec![
                    vec!["Service dev/web", "spec.externalIPs", "010.1.2.3"],
                    vec![
                        "Service dev/web",
                        "spec.externalIPs",
                        "127.0.0.1",
                        "loopback",
                    ],
                    vec![
                        "Service dev/web",
                        "status.loadBalancer.ingress.ip",
                        "\"lb\"",
                    ],
                ],
                ..Case::default()
            },
            Case {
                name: "an LB IP that is also the Service's external IP is one frontend",
                services: vec![with(
                    web(),
                    json!({
                        "spec": { "externalIPs": ["203.0.113.5"] },
                        "status": { "loadBalancer": { "ingress": [{ "ip": "203.0.113.5" }] } },
                    }),
                )],
                want: vec![
                    "10.96.0.10:80/TCP dev/web =>",
                    "203.0.113.5:80/TCP dev/web =>",
                ],
                ..Case::default()
            },
            Case {
                name: "an external IP equal to another Service's ClusterIP: the ClusterIP's owner keeps it",
                services: vec![
                    with(
                        web(),
                        json!({ "metadata": { "creationTimestamp": "2024-01-01T00:00:00Z" } }),
                    ),
                    with(
                        svc("api", &["10.96.0.20"], &[("", 80, "")]),
                        json!({
                            "metadata": { "creationTimestamp": "2024-06-01T00:00:00Z" },
                            "spec": { "externalIPs": ["10.96.0.10"] },
                        }),
                    ),
                ],
                want: vec![
                    "10.96.0.10:80/TCP dev/web =>",
                    "10.96.0.20:80/TCP dev/api =>",
                ],
                rejections: vec![vec!["Service dev/api", "10.96.0.10:80/TCP", "dev/web"]],
                ..Case::default()
            },
            Case {
                name: "the same frontend twice in one Service: first port kept",
                services: vec![svc(
                    "web",
                    &["10.96.0.10"],
                    &[("a", 80, ""), ("b", 80, "TCP")],
                )],
                want: vec!["10.96.0.10:80/TCP dev/web =>"],
                rejections: vec![vec!["Service dev/web", "declared twice", "\"a\""]],
                ..Case::default()
            },
        ]
    }

    #[test]
    fn planner_table() {
        for case in cases() {
            let desired = run(&case.services, &case.slices, &case.node);
            assert_eq!(show(&desired), case.want, "case: {}", case.name);
            let rejections = show_rejections(&desired);
            assert_eq!(
                rejections.len(),
                case.rejections.len(),
                "case: {}: rejections {rejections:#?}",
                case.name
            );
            for (got, want) in rejections.iter().zip(&case.rejections) {
                for part in want {
                    assert!(
                        got.contains(part),
                        "case: {}: {got:?} lacks {part:?}",
                        case.name
                    );
                }
            }
            for state in desired.frontends.values() {
                let mut sorted = state.backends.clone();
                sorted.sort_by_key(|b| (b.addr, b.port));
                sorted.dedup_by_key(|b| (b.addr, b.port));
                assert_eq!(
                    sorted, state.backends,
                    "case: {}: sorted and unique",
                    case.name
                );
            }
        }
    }

    #[test]
    fn the_cache_plans_only_changed_services_and_always_equals_a_fresh_plan() {
        let aged = |v: Value, t: &str| with(v, json!({ "metadata": { "creationTimestamp": t } }));
        let mut services = vec![
            arc(aged(web(), "2024-01-01T00:00:00Z")),
            arc(aged(
                svc("api", &["10.96.0.20"], &[("", 80, "")]),
                "2024-02-01T00:00:00Z",
            )),
            arc(aged(
                svc("db", &["10.96.0.30"], &[("", 5432, "")]),
                "2024-03-01T00:00:00Z",
            )),
        ];
        let mut slices = vec![
            arc_slice(web_slice("web-1", &[ep("10.1.0.1"), ep("10.1.0.2")])),
            arc_slice(slice(
                "api-1",
                "api",
                &[("", Some(8080), "")],
                &[ep("10.1.0.3")],
            )),
        ];
        let mut node = node_a();
        let options = PlanOptions::default();
        let mut cache = PlanCache::default();
        let mut before = Desired::default();
        let mut step = |what: &str,
                        services: &[Arc<ServiceObject>],
                        slices: &[Arc<SliceObject>],
                        node: &NodeInfo,
                        want_planned: usize| {
            let input = PlanInput {
                services,
                slices,
                node,
                options: &options,
            };
            let cached = cache.plan(&input).clone();
            assert_eq!(cached, plan(&input), "{what}: cached result differs");
            assert_eq!(cache.last_planned, want_planned, "{what}: Services planned");
            // What the writer is told to look at: every frontend that differs, and only
            // frontends that were or are desired.
            let changed = cache.take_changed();
            for fe in before.frontends.keys().chain(cached.frontends.keys()) {
                if before.frontends.get(fe) != cached.frontends.get(fe) {
                    assert!(changed.contains(fe), "{what}: {fe} changed unreported");
                }
            }
            for fe in &changed {
                assert!(
                    before.frontends.contains_key(fe) || cached.frontends.contains_key(fe),
                    "{what}: {fe} reported but never desired"
                );
            }
            before = cached;
        };
        step("first", &services, &slices, &node, 3);
        step("nothing changed", &services, &slices, &node, 0);

        slices[0] = arc_slice(web_slice("web-1", &[ep("10.1.0.1")]));
        step("one slice changed", &services, &slices, &node, 1);

        slices.push(arc_slice(slice(
            "db-1",
            "db",
            &[("", Some(5432), "")],
            &[ep("10.1.0.9")],
        )));
        step("a slice added", &services, &slices, &node, 1);

        // The older web takes api's ClusterIP as an external IP: api, unchanged, loses it
        // in the replay. A new ClusterIP set (none here) would replan everything.
        services[0] = arc(aged(
            with(web(), json!({ "spec": { "externalIPs": ["10.96.0.20"] } })),
            "2024-01-01T00:00:00Z",
        ));
        step(
            "conflict from a changed Service",
            &services,
            &slices,
            &node,
            1,
        );

        // db (changed) takes a ClusterIP equal to api's endpoint: api, unchanged, is planned
        // again and refuses that endpoint; web is untouched.
        services[2] = arc(aged(
            svc("db", &["10.1.0.3"], &[("", 5432, "")]),
            "2024-03-01T00:00:00Z",
        ));
        step(
            "ClusterIP equal to an endpoint",
            &services,
            &slices,
            &node,
            2,
        );

        node.zone = Some("zone-b".into());
        step("node changed", &services, &slices, &node, 3);

        services.remove(1);
        step("a Service deleted", &services, &slices, &node, 0);
        services.push(arc(svc("api", &["10.96.0.20"], &[("", 80, "")])));
        step(
            "re-created under the same name",
            &services,
            &slices,
            &node,
            1,
        );
    }

    #[test]
    fn the_cache_hands_a_contested_frontend_on_when_its_owner_goes_and_back() {
        let aged = |v: Value, t: &str| with(v, json!({ "metadata": { "creationTimestamp": t } }));
        let old = || arc(aged(web(), "2024-01-01T00:00:00Z"));
        // A newer Service claims web's ClusterIP as an external IP.
        let newer = arc(aged(
            with(
                svc("api", &["10.96.0.20"], &[("", 80, "")]),
                json!({ "spec": { "externalIPs": ["10.96.0.10"] } }),
            ),
            "2024-02-01T00:00:00Z",
        ));
        let contested = Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let node = node_a();
        let options = PlanOptions::default();
        let mut cache = PlanCache::default();
        let mut step = |what: &str, services: &[Arc<ServiceObject>], owner: &str| {
            let input = PlanInput {
                services,
                slices: &[],
                node: &node,
                options: &options,
            };
            let cached = cache.plan(&input).clone();
            assert_eq!(cached, plan(&input), "{what}: cached result differs");
            let held = cached
                .frontends
                .get(&contested)
                .map(|s| s.service.name.clone());
            assert_eq!(held.as_deref(), Some(owner), "{what}");
            assert!(
                cache.take_changed().contains(&contested) || what == "both",
                "{what}"
            );
            (cache.last_planned, show_rejections(&cached))
        };
        let (_, rejected) = step("both", &[old(), newer.clone()], "web");
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(
            rejected[0].contains("older Service dev/web"),
            "{rejected:?}"
        );

        let (planned, rejected) = step("owner deleted", std::slice::from_ref(&newer), "api");
        assert_eq!(
            planned, 0,
            "the newer Service is not planned again, only resolved"
        );
        assert_eq!(
            rejected,
            Vec::<String>::new(),
            "its claim no longer conflicts"
        );

        let (planned, rejected) = step("owner back", &[newer, old()], "web");
        assert_eq!(planned, 1, "only the returning Service is planned");
        assert_eq!(rejected.len(), 1, "{rejected:?}");
    }

    #[test]
    fn port_name_is_recorded_and_unset_protocol_is_tcp() {
        let desired = run(
            &[svc("web", &["10.96.0.10"], &[("http", 80, "")])],
            &[],
            &node_a(),
        );
        let frontend = Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let state = desired.frontends.get(&frontend);
        assert_eq!(state.map(|s| s.port_name.as_str()), Some("http"));
    }

    #[test]
    fn output_does_not_depend_on_input_order() {
        let services = [web(), svc("api", &["10.96.0.20"], &[("", 80, "")])];
        let slices = [
            web_slice("web-a", &[ep("10.1.0.1").draining()]),
            web_slice("web-b", &[ep("10.1.0.1").ready(false), ep("10.1.0.2")]),
            slice("api-1", "api", &[("", Some(8080), "")], &[ep("10.1.0.3")]),
        ];
        let forward = run(&services, &slices, &node_a());
        let mut rev_services = services.to_vec();
        rev_services.reverse();
        let mut rev_slices = slices.to_vec();
        rev_slices.reverse();
        assert_eq!(forward, run(&rev_services, &rev_slices, &node_a()));
    }

    #[test]
    fn service_proxy_name_option_claims_matching_services() {
        let services: Vec<Arc<ServiceObject>> = [
            with(
                web(),
                json!({ "metadata": { "labels": { LABEL_SERVICE_PROXY_NAME: "svcproxy" } } }),
            ),
            with(
                svc("other", &["10.96.0.11"], &[("", 80, "")]),
                json!({ "metadata": { "labels": { LABEL_SERVICE_PROXY_NAME: "cilium" } } }),
            ),
        ]
        .into_iter()
        .map(arc)
        .collect();
        let desired = plan(&PlanInput {
            services: &services,
            slices: &[],
            node: &node_a(),
            options: &PlanOptions {
                service_proxy_name: Some("svcproxy".to_owned()),
                ..PlanOptions::default()
            },
        });
        assert_eq!(show(&desired), ["10.96.0.10:80/TCP dev/web =>"]);
    }

    #[test]
    fn external_ip_ranges_fence_external_ips_but_not_cluster_or_lb_ips() {
        let services: Vec<Arc<ServiceObject>> = [with(
            web(),
            json!({
                "spec": { "externalIPs": ["203.0.113.5", "192.0.2.1"] },
                "status": { "loadBalancer": { "ingress": [{ "ip": "198.51.100.7" }] } },
            }),
        )]
        .into_iter()
        .map(arc)
        .collect();
        let plan_with = |ranges: Option<Vec<Ipv4Cidr>>| {
            plan(&PlanInput {
                services: &services,
                slices: &[],
                node: &node_a(),
                options: &PlanOptions {
                    external_ip_ranges: ranges,
                    ..PlanOptions::default()
                },
            })
        };
        let cidr = |s: &str| s.parse::<Ipv4Cidr>().unwrap_or_else(|e| panic!("{e}"));
        let everything = plan_with(None);
        assert_eq!(everything.frontends.len(), 4, "{:?}", show(&everything));

        let fenced = plan_with(Some(vec![cidr("203.0.113.0/24")]));
        assert_eq!(
            show(&fenced),
            [
                "10.96.0.10:80/TCP dev/web =>",
                "198.51.100.7:80/TCP dev/web =>",
                "203.0.113.5:80/TCP dev/web =>",
            ]
        );
        let rejected = show_rejections(&fenced);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(rejected[0].contains("192.0.2.1") && rejected[0].contains("--external-ip-ranges"));

        let off = plan_with(Some(Vec::new()));
        assert_eq!(off.frontends.len(), 2, "ClusterIP and LB IP only");
        assert_eq!(show_rejections(&off).len(), 2);
    }

    #[test]
    fn cidrs_parse_strictly() {
        let ok = |s: &str| s.parse::<Ipv4Cidr>().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert!(ok(" 10.0.0.0/8 ").contains(Ipv4Addr::new(10, 200, 1, 1)));
        assert!(!ok("10.0.0.0/8").contains(Ipv4Addr::new(11, 0, 0, 1)));
        assert!(ok("0.0.0.0/0").contains(Ipv4Addr::new(8, 8, 8, 8)));
        assert!(ok("192.0.2.7").contains(Ipv4Addr::new(192, 0, 2, 7)));
        assert!(!ok("192.0.2.7").contains(Ipv4Addr::new(192, 0, 2, 8)));
        for bad in [
            "10.0.0.0/33",
            "010.0.0.0/8",
            "10.0.0.0/08",
            "fd00::/8",
            "x",
            "10.0.0.0/",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn client_ip_affinity_timeout_defaults_and_bounds() {
        let cases: [(&str, Value, Option<u32>); 5] = [
            ("no affinity", json!({}), None),
            (
                "ClientIP default",
                json!({ "sessionAffinity": "ClientIP" }),
                Some(10_800),
            ),
            (
                "ClientIP configured",
                json!({ "sessionAffinity": "ClientIP", "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 60 } } }),
                Some(60),
            ),
            (
                "too large is held to the maximum",
                json!({ "sessionAffinity": "ClientIP", "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 999_999 } } }),
                Some(86_400),
            ),
            (
                "None",
                json!({ "sessionAffinity": "None", "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 60 } } }),
                None,
            ),
        ];
        for (what, spec, want) in cases {
            let service: Service = serde_json::from_value(with(web(), json!({ "spec": spec })))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                client_ip_affinity_timeout(&ServiceObject::from(&service)),
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn slice_with_1000_endpoints_is_planned_whole() {
        let eps: Vec<Ep> = (0..1000u32)
            .map(|i| {
                let e = ep(&Ipv4Addr::from(0x0a01_0000 + i).to_string());
                if i % 10 == 0 { e.draining() } else { e }
            })
            .collect();
        let desired = run(&[web()], &[web_slice("web-1", &eps)], &node_a());
        assert!(desired.rejections.is_empty(), "{:?}", desired.rejections);
        let state = desired.frontends.values().next();
        let backends = state.map(|s| s.backends.as_slice()).unwrap_or_default();
        assert_eq!(backends.len(), 1000);
        assert_eq!(state.map(|s| s.active().count()), Some(900));
        assert!(backends.windows(2).all(|w| w[0].addr < w[1].addr));
    }

    #[test]
    fn service_with_2000_ports_plans_fast() {
        let ports: Vec<(String, i32)> = (0..2000).map(|i| (format!("p{i}"), 1000 + i)).collect();
        let svc_ports: Vec<(&str, i32, &str)> =
            ports.iter().map(|(n, p)| (n.as_str(), *p, "TCP")).collect();
        let slice_ports: Vec<(&str, Option<i32>, &str)> = ports
            .iter()
            .map(|(n, p)| (n.as_str(), Some(*p + 10_000), "TCP"))
            .collect();
        let eps: Vec<Ep> = (1..=20).map(|i| ep(&format!("10.1.0.{i}"))).collect();
        let services: Vec<Arc<ServiceObject>> = [svc("big", &["10.96.0.10"], &svc_ports)]
            .into_iter()
            .map(arc)
            .collect();
        let slices: Vec<Arc<SliceObject>> = [
            slice("big-1", "big", &slice_ports, &eps[..10]),
            slice("big-2", "big", &slice_ports, &eps[10..]),
        ]
        .into_iter()
        .map(arc_slice)
        .collect();

        let start = Instant::now();
        let desired = plan(&PlanInput {
            services: &services,
            slices: &slices,
            node: &node_a(),
            options: &PlanOptions::default(),
        });
        let took = start.elapsed();
        assert_eq!(desired.frontends.len(), 2000);
        assert!(desired.frontends.values().all(|s| s.backends.len() == 20));
        let last = desired.frontends.values().last();
        assert_eq!(last.map(|s| s.backends[0].port), Some(12_999));
        // Generous for an unoptimised build on a shared machine; the real cost is milliseconds.
        assert!(took < Duration::from_millis(500), "planning took {took:?}");
    }

    /// What `svcproxy explain` reports as the reason for a frontend's backends is what the
    /// planner actually did.
    #[test]
    fn selection_records_why_the_backends_are_what_they_are() {
        let selection = |services: &[Value], slices: &[Value]| {
            let d = run(services, slices, &node_a());
            let states: Vec<&FrontendState> = d.frontends.values().map(|s| &**s).collect();
            match states.as_slice() {
                [one] => one.selection.clone(),
                other => panic!("want one frontend, got {}", other.len()),
            }
        };
        let prefer_close = with(
            web(),
            json!({ "spec": { "trafficDistribution": "PreferClose" } }),
        );
        let hinted = [web_slice(
            "web-1",
            &[
                ep("10.1.0.1").zones(&["zone-a"]),
                ep("10.1.0.2").zones(&["zone-b"]),
            ],
        )];
        assert_eq!(
            selection(std::slice::from_ref(&prefer_close), &hinted),
            Selection {
                topology_zone: Some("zone-a".into()),
                ..Selection::default()
            }
        );
        let unhinted = [web_slice("web-1", &[ep("10.1.0.1"), ep("10.1.0.2")])];
        assert_eq!(
            selection(&[prefer_close], &unhinted),
            Selection {
                topology_ignored: true,
                ..Selection::default()
            }
        );
        let draining = [web_slice("web-1", &[ep("10.1.0.1").draining()])];
        assert_eq!(
            selection(&[web()], &draining),
            Selection {
                terminating_fallback: true,
                ..Selection::default()
            }
        );
        let local = with(
            web(),
            json!({ "spec": { "internalTrafficPolicy": "Local" } }),
        );
        assert_eq!(
            selection(&[local], &unhinted),
            Selection {
                node_local: true,
                ..Selection::default()
            }
        );
        let external = json!({ "spec": {
            "type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "externalIPs": ["192.0.2.7"] } });
        let d = run(&[with(web(), external)], &unhinted, &node_a());
        let by_kind: Vec<(AddrKind, bool)> = d
            .frontends
            .values()
            .map(|s| {
                (
                    s.selection.addr_kind,
                    s.selection.external_local_not_applied,
                )
            })
            .collect();
        assert_eq!(
            by_kind,
            [(AddrKind::ClusterIp, false), (AddrKind::ExternalIp, true)]
        );
    }
}
