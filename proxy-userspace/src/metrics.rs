//! Prometheus metrics: kube-proxy's names where kube-proxy has one (so existing dashboards and
//! alerts keep working), svcproxy's own for what only an eBPF datapath has (map fill, per-outcome
//! and per-Service datapath counters), and their OpenMetrics text encoding.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError, atomic::AtomicU64},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        TypedMetric,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use proxy_common::stats::{STAT_COUNT, STAT_NAMES, SvcStats};

use crate::desired::ServiceName;

/// The annotation the EndpointSlice (and Endpoints) controller sets to the time of the
/// Service/Pod change that caused the object's last update; the start of network programming
/// latency.
pub const LAST_CHANGE_TRIGGER_TIME_ANNOTATION: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";

/// What `/metrics` answers with: the OpenMetrics text format, which Prometheus negotiates and
/// which is the only one that carries `# UNIT` and `# EOF`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `result` labels of `svcproxy_sync_frontends_total`.
pub const SYNC_RESULTS: [&str; 4] = ["written", "removed", "unchanged", "failed"];

/// Outcome counters, one per `STAT_*` constant.
pub const OUTCOME_COUNT: usize = STAT_COUNT as usize;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "{LAST_CHANGE_TRIGGER_TIME_ANNOTATION} value {value:?} is not an RFC 3339 time: {source}"
    )]
    TriggerTime {
        value: String,
        #[source]
        source: jiff::Error,
    },
}

/// Parses the [`LAST_CHANGE_TRIGGER_TIME_ANNOTATION`] value (RFC 3339, as the controllers write
/// it) for [`Metrics::observe_network_programming`].
pub fn parse_trigger_time(value: &str) -> Result<SystemTime, MetricsError> {
    value
        .trim()
        .parse::<jiff::Timestamp>()
        .map(SystemTime::from)
        .map_err(|source| MetricsError::TriggerTime {
            value: value.to_owned(),
            source,
        })
}

/// Labels of the per-Service datapath counters. `port` is the Service port's name ("" for the
/// single unnamed port), as in kube-proxy's `namespace/name:port` service-port names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceLabels {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl ServiceLabels {
    pub fn new(service: &ServiceName, port_name: &str) -> Self {
        Self {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            port: port_name.to_owned(),
        }
    }
}

/// Fill of one BPF map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapUsage {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
}

/// The datapath's counters at one moment, per-CPU values already summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathSnapshot {
    /// Indexed by the `STAT_*` constants.
    pub outcomes: [u64; OUTCOME_COUNT],
    /// One entry per frontend; frontends of the same Service port (ClusterIP, NodePort,
    /// external IPs, ...) may repeat a label set and are summed.
    pub services: Vec<(ServiceLabels, SvcStats)>,
    pub maps: Vec<MapUsage>,
}

/// Where the collector reads the datapath's counters at scrape time.
pub trait DatapathReader: Send + Sync {
    fn read(&self) -> Result<DatapathSnapshot, String>;
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// kube-proxy's `sync_proxy_rules_duration_seconds` buckets are 1 ms x 2^n up to 16.384 s;
/// ours extend them down to 125 us (a map sync is often sub-millisecond) and keep every one
/// of kube-proxy's bounds, so quantiles stay comparable.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_125, 2.0, 18)
}

/// From 1 ms (an eBPF map write lands in well under that after the event) to kube-proxy's
/// 5 minutes upper bound.
const NETWORK_PROGRAMMING_BUCKETS: [f64; 27] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 15.0,
    20.0, 30.0, 45.0, 60.0, 75.0, 90.0, 120.0, 150.0, 180.0, 240.0, 300.0,
];

/// From 10 us to 1 s: the local event-to-map path is meant to be sub-millisecond.
const EVENT_TO_MAP_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0,
];

/// All metrics of one svcproxy process. Cheap to update from any thread (`&self` everywhere);
/// share it in an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    sync_last_timestamp: Gauge<f64, AtomicU64>,
    network_programming: Histogram,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    healthz_total: Family<CodeLabel, Counter>,
    livez_total: Family<CodeLabel, Counter>,
    event_to_map: Histogram,
    write_failures: Family<ReasonLabel, Counter>,
    rejected: Family<KindLabel, Counter>,
    sync_frontends: Family<ResultLabel, Counter>,
    datapath: Arc<DatapathCollector>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let sync_duration = Histogram::new(sync_buckets());
        let sync_last_timestamp = Gauge::<f64, AtomicU64>::default();
        let network_programming = Histogram::new(NETWORK_PROGRAMMING_BUCKETS);
        let endpoint_changes_pending = Gauge::default();
        let endpoint_changes_total = Counter::default();
        let service_changes_pending = Gauge::default();
        let service_changes_total = Counter::default();
        let healthz_total: Family<CodeLabel, Counter> = Family::default();
        let livez_total: Family<CodeLabel, Counter> = Family::default();
        // The two answers the health server gives exist from the start, so rate() over them
        // works before the first failure.
        for code in ["200", "503"] {
            let code = CodeLabel {
                code: code.to_owned(),
            };
            drop(healthz_total.get_or_create(&code));
            drop(livez_total.get_or_create(&code));
        }
        let event_to_map = Histogram::new(EVENT_TO_MAP_BUCKETS);
        let write_failures = Family::default();
        let rejected = Family::default();
        let sync_frontends: Family<ResultLabel, Counter> = Family::default();
        for result in SYNC_RESULTS {
            drop(sync_frontends.get_or_create(&ResultLabel { result }));
        }
        let datapath = Arc::new(DatapathCollector::default());

        let mut registry = Registry::default();
        {
            let kp = registry.sub_registry_with_prefix("kubeproxy");
            kp.register_with_unit(
                "sync_proxy_rules_duration",
                "SyncProxyRules latency in seconds",
                Unit::Seconds,
                sync_duration.clone(),
            );
            kp.register_with_unit(
                "sync_proxy_rules_last_timestamp",
                "The last time proxy rules were successfully synced",
                Unit::Seconds,
                sync_last_timestamp.clone(),
            );
            kp.register_with_unit(
                "network_programming_duration",
                "In Cluster Network Programming Latency in seconds",
                Unit::Seconds,
                network_programming.clone(),
            );
            kp.register(
                "sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
                endpoint_changes_pending.clone(),
            );
            kp.register(
                "sync_proxy_rules_endpoint_changes",
                "Cumulative proxy rules Endpoint changes",
                endpoint_changes_total.clone(),
            );
            kp.register(
                "sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
                service_changes_pending.clone(),
            );
            kp.register(
                "sync_proxy_rules_service_changes",
                "Cumulative proxy rules Service changes",
                service_changes_total.clone(),
            );
            kp.register(
                "proxy_healthz",
                "Cumulative proxy healthz HTTP status",
                healthz_total.clone(),
            );
            kp.register(
                "proxy_livez",
                "Cumulative proxy livez HTTP status",
                livez_total.clone(),
            );
        }
        {
            let sp = registry.sub_registry_with_prefix("svcproxy");
            sp.register_with_unit(
                "event_to_map",
                "Time from receiving an object change to its map writes being done",
                Unit::Seconds,
                event_to_map.clone(),
            );
            sp.register(
                "map_write_failures",
                "BPF map writes that failed, by reason",
                write_failures.clone(),
            );
            sp.register(
                "rejected_objects",
                "Objects (or parts of them) refused as invalid or unsupported, by kind",
                rejected.clone(),
            );
            sp.register(
                "sync_frontends",
                "Frontends per sync by what the sync did to them: written, removed, unchanged \
                 or failed (a restart that adopts its maps writes none)",
                sync_frontends.clone(),
            );
            sp.register_collector(Box::new(Arc::clone(&datapath)));
        }

        Self {
            registry,
            sync_duration,
            sync_last_timestamp,
            network_programming,
            endpoint_changes_pending,
            endpoint_changes_total,
            service_changes_pending,
            service_changes_total,
            healthz_total,
            livez_total,
            event_to_map,
            write_failures,
            rejected,
            sync_frontends,
            datapath,
        }
    }

    /// What one sync did to the frontends: counts by [`SYNC_RESULTS`], in that order.
    pub fn observe_sync_frontends(&self, counts: [u64; 4]) {
        for (result, n) in SYNC_RESULTS.into_iter().zip(counts) {
            self.sync_frontends
                .get_or_create(&ResultLabel { result })
                .inc_by(n);
        }
    }

    /// One sync of the desired state to the maps took `duration` and finished (successfully)
    /// at `at`.
    pub fn observe_sync(&self, duration: Duration, at: SystemTime) {
        self.sync_duration.observe(duration.as_secs_f64());
        self.sync_last_timestamp.set(unix_seconds(at));
    }

    /// A change stamped `trigger_time` (see [`parse_trigger_time`]) is now programmed. The
    /// trigger time comes from the control plane's clock: with skew it can lie in our future,
    /// which is counted as zero rather than a negative latency that would corrupt the sum.
    pub fn observe_network_programming(&self, trigger_time: SystemTime, now: SystemTime) {
        let latency = now.duration_since(trigger_time).unwrap_or_default();
        self.network_programming.observe(latency.as_secs_f64());
    }

    /// From receiving one change to its map writes being done.
    pub fn observe_event_to_map(&self, d: Duration) {
        self.event_to_map.observe(d.as_secs_f64());
    }

    /// Changes received but not yet programmed.
    pub fn set_pending(&self, endpoint_changes: u64, service_changes: u64) {
        self.endpoint_changes_pending
            .set(saturating_i64(endpoint_changes));
        self.service_changes_pending
            .set(saturating_i64(service_changes));
    }

    /// Changes received (cumulative).
    pub fn add_changes(&self, endpoint_changes: u64, service_changes: u64) {
        self.endpoint_changes_total.inc_by(endpoint_changes);
        self.service_changes_total.inc_by(service_changes);
    }

    /// Replaces the datapath counters shown on the next scrape.
    pub fn set_datapath_snapshot(&self, snapshot: DatapathSnapshot) {
        self.datapath.set(snapshot);
    }

    /// From now on every scrape reads the datapath counters from `reader`; a failed read is
    /// logged and the last good values are shown.
    pub fn set_datapath_reader(&self, reader: Box<dyn DatapathReader>) {
        *self
            .datapath
            .reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(reader);
    }

    /// A map write failed; `reason` is a short fixed word ("full", "einval", ...), never an
    /// object name, to keep the label set small.
    pub fn write_failure(&self, reason: &str) {
        self.write_failures
            .get_or_create(&ReasonLabel {
                reason: escape_label_value(reason),
            })
            .inc();
    }

    /// An object of `kind` ("Service", "EndpointSlice", ...) was refused.
    pub fn rejected(&self, kind: &str) {
        self.rejected
            .get_or_create(&KindLabel {
                kind: escape_label_value(kind),
            })
            .inc();
    }

    /// The proxy health server answered `/healthz` with `code`.
    pub fn healthz_served(&self, code: u16) {
        self.healthz_total
            .get_or_create(&CodeLabel {
                code: code.to_string(),
            })
            .inc();
    }

    /// The proxy health server answered `/livez` with `code`.
    pub fn livez_served(&self, code: u16) {
        self.livez_total
            .get_or_create(&CodeLabel {
                code: code.to_string(),
            })
            .inc();
    }

    /// Everything, in the OpenMetrics text format (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String cannot fail and our collector only forwards writer errors,
            // so this is unreachable in practice; a scrape must still get a well-formed end.
            tracing::error!("encoding metrics: {e}");
            out.push_str("# EOF\n");
        }
        out
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// prometheus-client writes label values verbatim, and namespace, name and port names can come
/// from hand-written manifests: escape as the OpenMetrics text format requires so one odd name
/// cannot break the whole exposition.
fn escape_label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The last datapath snapshot, aggregated and escaped once when set rather than on every
/// scrape.
#[derive(Debug)]
struct Aggregated {
    outcomes: [u64; OUTCOME_COUNT],
    services: BTreeMap<ServiceLabels, SvcStats>,
    maps: Vec<MapUsage>,
}

/// Exposes the datapath's counters. The kernel keeps the running totals, so these are
/// counters whose value is set from a snapshot, which prometheus-client's `Counter` cannot do:
/// a collector emits them as constant counters on each scrape.
#[derive(Default)]
struct DatapathCollector {
    snapshot: Mutex<Option<Aggregated>>,
    reader: Mutex<Option<Box<dyn DatapathReader>>>,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCollector")
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}

impl DatapathCollector {
    /// Reads the datapath into the snapshot, if there is a reader.
    fn refresh(&self) {
        let reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(reader) = reader.as_ref() else {
            return;
        };
        match reader.read() {
            Ok(snapshot) => self.set(snapshot),
            Err(e) => tracing::warn!("reading the datapath counters failed: {e}"),
        }
    }

    fn set(&self, snapshot: DatapathSnapshot) {
        let mut services: BTreeMap<ServiceLabels, SvcStats> = BTreeMap::new();
        for (labels, stats) in snapshot.services {
            let labels = ServiceLabels {
                namespace: escape_label_value(&labels.namespace),
                name: escape_label_value(&labels.name),
                port: escape_label_value(&labels.port),
            };
            let sum = services.entry(labels).or_default();
            sum.packets = sum.packets.saturating_add(stats.packets);
            sum.bytes = sum.bytes.saturating_add(stats.bytes);
            sum.new_flows = sum.new_flows.saturating_add(stats.new_flows);
        }
        let maps = snapshot
            .maps
            .into_iter()
            .map(|m| MapUsage {
                name: escape_label_value(&m.name),
                ..m
            })
            .collect();
        let aggregated = Aggregated {
            outcomes: snapshot.outcomes,
            services,
            maps,
        };
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = Some(aggregated);
    }
}

fn service_label_set(l: &ServiceLabels) -> [(&'static str, &str); 3] {
    [
        ("namespace", l.namespace.as_str()),
        ("name", l.name.as_str()),
        ("port", l.port.as_str()),
    ]
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.refresh();
        let guard = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        // Before the first snapshot the families are described but have no samples: a zero
        // would claim the datapath was read.
        let snap = guard.as_ref();

        {
            let mut family = encoder.encode_descriptor(
                "datapath_packets",
                "Packets seen by the datapath programs, by outcome (each packet counted once)",
                None,
                ConstCounter::<u64>::TYPE,
            )?;
            if let Some(s) = snap {
                for (name, value) in STAT_NAMES.iter().zip(s.outcomes) {
                    ConstCounter::new(value)
                        .encode(family.encode_family(&[("outcome", *name)])?)?;
                }
            }
        }

        type Field = fn(&SvcStats) -> u64;
        let per_service: [(&str, &str, Field); 3] = [
            (
                "service_packets",
                "Packets to a Service port (forward direction)",
                |s| s.packets,
            ),
            (
                "service_bytes",
                "Bytes to a Service port (forward direction)",
                |s| s.bytes,
            ),
            ("service_new_flows", "New flows to a Service port", |s| {
                s.new_flows
            }),
        ];
        for (name, help, field) in per_service {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstCounter::<u64>::TYPE)?;
            for (labels, stats) in snap.iter().flat_map(|s| s.services.iter()) {
                ConstCounter::new(field(stats))
                    .encode(family.encode_family(&service_label_set(labels))?)?;
            }
        }

        type MapField = fn(&MapUsage) -> u64;
        let per_map: [(&str, &str, MapField); 2] = [
            ("map_entries", "Entries in a BPF map", |m| m.entries),
            ("map_capacity", "Maximum entries of a BPF map", |m| {
                m.capacity
            }),
        ];
        for (name, help, field) in per_map {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstGauge::<u64>::TYPE)?;
            for map in snap.iter().flat_map(|s| s.maps.iter()) {
                ConstGauge::new(field(map))
                    .encode(family.encode_family(&[("map", map.name.as_str())])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::stats::{STAT_FWD_NEW, STAT_REJECT_NO_BACKEND};

    use super::*;

    /// The value of the sample line starting with `prefix` (name and labels).
    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn encoding_has_kube_proxy_and_svcproxy_names() {
        let m = Metrics::new();
        m.write_failure("full");
        m.rejected("Service");
        m.healthz_served(200);
        m.observe_sync_frontends([2, 0, 5, 1]);
        m.observe_sync_frontends([0, 1, 7, 0]);
        let text = m.encode();
        for name in [
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
            "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            "# TYPE kubeproxy_network_programming_duration_seconds histogram",
            "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_pending gauge",
            "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes counter",
            "# TYPE kubeproxy_sync_proxy_rules_service_changes_pending gauge",
            "# TYPE kubeproxy_sync_proxy_rules_service_changes counter",
            "# TYPE kubeproxy_proxy_healthz counter",
            "# TYPE kubeproxy_proxy_livez counter",
            "# TYPE svcproxy_event_to_map_seconds histogram",
            "# TYPE svcproxy_map_write_failures counter",
            "# TYPE svcproxy_rejected_objects counter",
            "# TYPE svcproxy_datapath_packets counter",
            "# TYPE svcproxy_service_packets counter",
            "# TYPE svcproxy_service_bytes counter",
            "# TYPE svcproxy_service_new_flows counter",
            "# TYPE svcproxy_map_entries gauge",
            "# TYPE svcproxy_map_capacity gauge",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
        assert_eq!(
            sample(&text, "svcproxy_map_write_failures_total{reason=\"full\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "svcproxy_rejected_objects_total{kind=\"Service\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "kubeproxy_proxy_healthz_total{code=\"200\"}"),
            Some(1.0)
        );
        for (result, want) in SYNC_RESULTS.into_iter().zip([2.0, 1.0, 12.0, 1.0]) {
            assert_eq!(
                sample(
                    &text,
                    &format!("svcproxy_sync_frontends_total{{result=\"{result}\"}}")
                ),
                Some(want)
            );
        }
        assert!(text.ends_with("# EOF\n"));
        // No datapath samples before the first snapshot.
        assert!(!text.contains("svcproxy_datapath_packets_total{"));
    }

    #[test]
    fn histograms_and_counters_move() {
        let m = Metrics::new();
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        m.observe_sync(Duration::from_millis(3), at);
        m.observe_event_to_map(Duration::from_micros(40));
        m.observe_network_programming(at - Duration::from_millis(1500), at);
        // Trigger time in the future (clock skew) counts as zero.
        m.observe_network_programming(at + Duration::from_secs(5), at);
        m.set_pending(3, 1);
        m.add_changes(5, 2);
        m.add_changes(1, 0);
        let text = m.encode();

        let p = "kubeproxy_sync_proxy_rules_duration_seconds";
        assert_eq!(sample(&text, &format!("{p}_count")), Some(1.0));
        assert_eq!(
            sample(&text, &format!("{p}_bucket{{le=\"0.002\"}}")),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, &format!("{p}_bucket{{le=\"0.004\"}}")),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
            Some(1_700_000_000.0)
        );

        let p = "svcproxy_event_to_map_seconds";
        assert_eq!(
            sample(&text, &format!("{p}_bucket{{le=\"0.000025\"}}")),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, &format!("{p}_bucket{{le=\"0.00005\"}}")),
            Some(1.0)
        );

        let p = "kubeproxy_network_programming_duration_seconds";
        assert_eq!(sample(&text, &format!("{p}_count")), Some(2.0));
        assert_eq!(
            sample(&text, &format!("{p}_bucket{{le=\"0.001\"}}")),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, &format!("{p}_bucket{{le=\"1.0\"}}")),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, &format!("{p}_bucket{{le=\"2.0\"}}")),
            Some(2.0)
        );
        assert_eq!(sample(&text, &format!("{p}_sum")), Some(1.5));

        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_service_changes_pending"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            Some(6.0)
        );
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_service_changes_total"),
            Some(2.0)
        );
    }

    #[test]
    fn datapath_snapshot_shows_outcomes_services_and_maps() {
        let m = Metrics::new();
        let mut outcomes = [0u64; OUTCOME_COUNT];
        outcomes[STAT_FWD_NEW as usize] = 7;
        outcomes[STAT_REJECT_NO_BACKEND as usize] = 2;
        let web = ServiceLabels::new(
            &ServiceName {
                namespace: "default".into(),
                name: "web".into(),
            },
            "http",
        );
        let stats = |packets, bytes, new_flows| SvcStats {
            packets,
            bytes,
            new_flows,
        };
        m.set_datapath_snapshot(DatapathSnapshot {
            outcomes,
            services: vec![
                // ClusterIP and NodePort frontends of the same port: summed.
                (web.clone(), stats(10, 1000, 2)),
                (web, stats(5, 500, 1)),
                (
                    ServiceLabels {
                        namespace: "odd".into(),
                        name: "quo\"te".into(),
                        port: String::new(),
                    },
                    stats(1, 60, 1),
                ),
            ],
            maps: vec![MapUsage {
                name: "FRONTENDS".into(),
                entries: 12,
                capacity: 65536,
            }],
        });
        let text = m.encode();

        assert_eq!(
            sample(
                &text,
                "svcproxy_datapath_packets_total{outcome=\"fwd_new\"}"
            ),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &text,
                "svcproxy_datapath_packets_total{outcome=\"reject_no_backend\"}"
            ),
            Some(2.0)
        );
        // Every outcome is present, zero or not.
        for name in STAT_NAMES {
            let line = format!("svcproxy_datapath_packets_total{{outcome=\"{name}\"}}");
            assert!(sample(&text, &line).is_some(), "missing {line}");
        }
        let web = "{namespace=\"default\",name=\"web\",port=\"http\"}";
        assert_eq!(
            sample(&text, &format!("svcproxy_service_packets_total{web}")),
            Some(15.0)
        );
        assert_eq!(
            sample(&text, &format!("svcproxy_service_bytes_total{web}")),
            Some(1500.0)
        );
        assert_eq!(
            sample(&text, &format!("svcproxy_service_new_flows_total{web}")),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                "svcproxy_service_packets_total{namespace=\"odd\",name=\"quo\\\"te\",port=\"\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "svcproxy_map_entries{map=\"FRONTENDS\"}"),
            Some(12.0)
        );
        assert_eq!(
            sample(&text, "svcproxy_map_capacity{map=\"FRONTENDS\"}"),
            Some(65536.0)
        );

        // A later snapshot replaces the earlier one: deleted Services disappear.
        m.set_datapath_snapshot(DatapathSnapshot::default());
        let text = m.encode();
        assert!(!text.contains("name=\"web\""));
        assert_eq!(
            sample(
                &text,
                "svcproxy_datapath_packets_total{outcome=\"fwd_new\"}"
            ),
            Some(0.0)
        );
    }

    struct Counting {
        reads: std::sync::atomic::AtomicU64,
        fail: std::sync::atomic::AtomicBool,
    }

    impl DatapathReader for Arc<Counting> {
        fn read(&self) -> Result<DatapathSnapshot, String> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.fail.load(SeqCst) {
                return Err("map gone".into());
            }
            let n = self.reads.fetch_add(1, SeqCst) + 1;
            let mut outcomes = [0u64; OUTCOME_COUNT];
            outcomes[STAT_FWD_NEW as usize] = n;
            Ok(DatapathSnapshot {
                outcomes,
                ..DatapathSnapshot::default()
            })
        }
    }

    #[test]
    fn a_datapath_reader_is_read_on_every_scrape_and_a_failed_read_keeps_the_last_values() {
        use std::sync::atomic::Ordering::SeqCst;
        let m = Metrics::new();
        let counting = Arc::new(Counting {
            reads: 0.into(),
            fail: false.into(),
        });
        m.set_datapath_reader(Box::new(counting.clone()));
        let line = "svcproxy_datapath_packets_total{outcome=\"fwd_new\"}";
        assert_eq!(sample(&m.encode(), line), Some(1.0));
        assert_eq!(sample(&m.encode(), line), Some(2.0));
        counting.fail.store(true, SeqCst);
        assert_eq!(sample(&m.encode(), line), Some(2.0));
    }

    #[test]
    fn trigger_time_parses_rfc3339() {
        let t = parse_trigger_time("2024-05-01T12:00:00Z").expect("valid time");
        assert_eq!(t, UNIX_EPOCH + Duration::from_secs(1_714_564_800));
        let t = parse_trigger_time("2024-05-01T14:00:00.5+02:00").expect("valid time");
        assert_eq!(t, UNIX_EPOCH + Duration::from_millis(1_714_564_800_500));
        assert!(parse_trigger_time("yesterday").is_err());
        assert!(parse_trigger_time("").is_err());
    }
}
