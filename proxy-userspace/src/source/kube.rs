//! The API-server source: watches Services, EndpointSlices and this node's Node into compact
//! stores, and notifies on every change.
//!
//! Each object is turned into what the proxy reads of it ([`crate::objects`], [`NodeState`]) as
//! it arrives; the API object itself is dropped at once. The stores follow kube's reflector
//! rules otherwise: a relist replaces a store whole only when its list is complete, so objects
//! are never deleted before the full list says they are gone.
//!
//! The selectors are kube-proxy's, so both proxies see the same objects: Services without the
//! `service.kubernetes.io/headless` and `service.kubernetes.io/service-proxy-name` labels,
//! EndpointSlices without the headless label, and only the Node named `metadata.name=<node>`.
//! Watch errors (API server gone, RBAC missing, relist after a compaction) are never fatal: the
//! stores keep their last contents, nothing is notified, so nothing is written and the datapath
//! keeps serving what it has; the watcher retries with kube's default backoff (0.8 s doubling
//! to 30 s, with jitter, as client-go), and after it relists, the next plan converges.

use std::{
    fmt::Debug,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    ChangeKind, Changes, ClusterState, NodeState, Source, Store,
    keyed::{Keyed, KeyedSet},
};
use crate::{
    metrics::{LAST_CHANGE_TRIGGER_TIME_ANNOTATION, parse_trigger_time},
    objects::{Interner, ServiceObject, SliceObject},
};

/// kube-proxy's Service selector: headless Services have no virtual IP, and Services labelled
/// with a service-proxy name belong to another proxy.
pub const SERVICE_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";
/// kube-proxy's EndpointSlice selector: slices of headless Services.
pub const SLICE_SELECTOR: &str = "!service.kubernetes.io/headless";
/// While a watch keeps failing, how often its error is logged again.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Errors setting up the API client. Watch errors are not here: they are retried, never fatal.
/// Each message already holds its cause's, so none is also a `source` (printed twice).
#[derive(Debug, Error)]
pub enum KubeSourceError {
    #[error("cannot read kubeconfig {}: {error}; check the --kubeconfig path", .path.display())]
    ReadKubeconfig {
        path: PathBuf,
        error: kube::config::KubeconfigError,
    },
    #[error("kubeconfig {}: {error}; check its current context, cluster and user", .path.display())]
    Kubeconfig {
        path: PathBuf,
        error: kube::config::KubeconfigError,
    },
    #[error(
        "no API server configuration: {0}; pass --kubeconfig, set KUBECONFIG, or run in a pod \
         with a service account"
    )]
    Infer(kube::config::InferConfigError),
    #[error("cannot build the API client: {0}")]
    Client(kube::Error),
}

/// Where the API server is and which node we are.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// A kubeconfig file; `None` infers (`KUBECONFIG`, `~/.kube/config`, then in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// This node's `metadata.name`.
    pub node_name: String,
}

/// Builds the client from `opts` and starts the three watches; they run until `shutdown`.
pub async fn start(
    opts: &KubeOptions,
    shutdown: CancellationToken,
) -> Result<Store, KubeSourceError> {
    let client = client(opts.kubeconfig.as_deref()).await?;
    let changes = Changes::new();
    let services = watch::<Service>(
        "Services",
        Api::all(client.clone()),
        watcher::Config::default().labels(SERVICE_SELECTOR),
        &changes,
        &shutdown,
    );
    let slices = watch::<EndpointSlice>(
        "EndpointSlices",
        Api::all(client.clone()),
        watcher::Config::default().labels(SLICE_SELECTOR),
        &changes,
        &shutdown,
    );
    let node = watch::<Node>(
        "Node",
        Api::all(client),
        watcher::Config::default().fields(&format!("metadata.name={}", opts.node_name)),
        &changes,
        &shutdown,
    );
    let tasks = vec![services.task, slices.task, node.task];
    let source = KubeSource {
        services: services.reader,
        slices: slices.reader,
        node: node.reader,
        ready: [services.ready, slices.ready, node.ready],
        node_name: opts.node_name.clone(),
    };
    Ok(Store::new(Arc::new(source), changes, tasks))
}

async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc =
                Kubeconfig::read_from(path).map_err(|error| KubeSourceError::ReadKubeconfig {
                    path: path.to_path_buf(),
                    error,
                })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|error| KubeSourceError::Kubeconfig {
                    path: path.to_path_buf(),
                    error,
                })?
        }
        None => Config::infer().await.map_err(KubeSourceError::Infer)?,
    };
    tracing::info!(server = %config.cluster_url, "following the API server");
    Client::try_from(config).map_err(KubeSourceError::Client)
}

struct KubeSource {
    services: Shared<ServiceObject>,
    slices: Shared<SliceObject>,
    node: Shared<(String, NodeState)>,
    /// One flag per watch, set when its first list completed.
    ready: [Arc<AtomicBool>; 3],
    node_name: String,
}

impl Source for KubeSource {
    fn is_ready(&self) -> bool {
        self.ready.iter().all(|r| r.load(Ordering::Acquire))
    }

    fn snapshot(&self) -> ClusterState {
        // The stores hand out shared pointers: no object is copied.
        ClusterState {
            services: lock(&self.services).iter().cloned().collect(),
            slices: lock(&self.slices).iter().cloned().collect(),
            // The field selector already names the node; checking again costs nothing and
            // keeps another node's state out should a server ignore the selector.
            node: lock(&self.node)
                .get((None, &self.node_name))
                .map(|n| n.1.clone()),
        }
    }
}

/// One kind's compact objects, shared between its watch task and the snapshots.
type Shared<T> = Arc<Mutex<KeyedSet<T>>>;

fn lock<T>(shared: &Shared<T>) -> std::sync::MutexGuard<'_, KeyedSet<T>> {
    // Every update is one map operation or one swap, so a poisoned lock is still whole.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The writing side of one kind's store: applies watch events as kube's reflector does.
struct CompactStore<T> {
    objects: Shared<T>,
    /// The objects of a list in progress; they replace the store whole at its end.
    listing: Option<KeyedSet<T>>,
}

impl<T: Keyed + PartialEq> CompactStore<T> {
    fn new() -> Self {
        Self {
            objects: Arc::new(Mutex::new(KeyedSet::default())),
            listing: None,
        }
    }

    /// Applies one event, the object already made compact (`None` for the events without
    /// one). The compact object keeps the API object's namespace and name, its key.
    fn apply<K: Resource>(&mut self, event: &watcher::Event<K>, compact: Option<T>) {
        match (event, compact) {
            (watcher::Event::Apply(_), Some(c)) => {
                let mut objects = lock(&self.objects);
                let c = self.shared(&objects, c);
                objects.insert(c);
            }
            (watcher::Event::Delete(o), _) => {
                let meta = o.meta();
                lock(&self.objects).remove((
                    meta.namespace.as_deref(),
                    meta.name.as_deref().unwrap_or_default(),
                ));
            }
            (watcher::Event::Init, _) => self.listing = Some(KeyedSet::default()),
            (watcher::Event::InitApply(_), Some(c)) => {
                let c = self.shared(&lock(&self.objects), c);
                self.listing.get_or_insert_default().insert(c);
            }
            (watcher::Event::InitDone, _) => {
                if let Some(listed) = self.listing.take() {
                    *lock(&self.objects) = listed;
                }
            }
            (watcher::Event::Apply(_) | watcher::Event::InitApply(_), None) => {}
        }
    }

    fn len(&self) -> usize {
        lock(&self.objects).len()
    }

    /// `compact`, shared: the object already stored if it is equal (a change to fields the
    /// proxy does not read, or an object relisted unchanged), so the planner, which takes an
    /// unchanged pointer for an unchanged object, does not plan its Service again.
    fn shared(&self, objects: &KeyedSet<T>, compact: T) -> Arc<T> {
        match objects.get(compact.key()) {
            Some(held) if **held == compact => Arc::clone(held),
            _ => Arc::new(compact),
        }
    }
}

/// One watched kind: the store's reading side, whether its first list completed, its task.
struct Watch<T> {
    reader: Shared<T>,
    ready: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

fn watch<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    changes: &Changes,
    shutdown: &CancellationToken,
) -> Watch<K::Compact>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + Watched
        + 'static,
{
    let store = CompactStore::new();
    let reader = store.objects.clone();
    let ready = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(follow(
        kind,
        api,
        config,
        store,
        ready.clone(),
        changes.clone(),
        shutdown.clone(),
    ));
    Watch {
        reader,
        ready,
        task,
    }
}

/// Runs one watch into `store` until `shutdown`, notifying `changes` whenever the store
/// changed.
async fn follow<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    mut store: CompactStore<K::Compact>,
    ready: Arc<AtomicBool>,
    changes: Changes,
    shutdown: CancellationToken,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + Watched
        + 'static,
{
    let mut errors = ErrorLog::new(ERROR_LOG_INTERVAL);
    let mut interner = Interner::default();
    // The trigger times of a list in progress.
    let mut listed: Vec<Option<SystemTime>> = Vec::new();
    // The backoff never gives up, so the stream never ends; should it anyway, a fresh one
    // starts (with a pause, so a bug cannot spin) rather than silently freezing this kind.
    loop {
        let mut stream = watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed();
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => return,
                item = stream.next() => item,
            };
            let Some(item) = item else { break };
            let event = match item {
                Ok(event) => event,
                Err(e) => {
                    if let Some(suppressed) = errors.failed(Instant::now()) {
                        tracing::warn!(
                            kind,
                            suppressed,
                            "watch failed, retrying with backoff (the datapath keeps its \
                             current state): {e}"
                        );
                    }
                    continue;
                }
            };
            // The watcher reports nothing when a retry succeeds, so recovery shows at the
            // first event after it (a quiet kind reports late, and a longer outage). `Init`
            // does not count: it is emitted before the list request is even sent.
            if !matches!(event, watcher::Event::Init)
                && let Some(outage) = errors.recovered(Instant::now())
            {
                tracing::info!(
                    kind,
                    since_first_error_s = outage.as_secs(),
                    "watch delivering again"
                );
            }
            let compact = match &event {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                    Some(o.compact(&mut interner))
                }
                _ => None,
            };
            store.apply(&event, compact);
            match event {
                watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                    changes.record(K::CHANGE, o.trigger_time());
                }
                watcher::Event::InitDone => {
                    // Counted only now that they are visible, so a sync that takes the count
                    // also has the objects.
                    for trigger in listed.drain(..) {
                        changes.count(K::CHANGE, trigger);
                    }
                    if !ready.swap(true, Ordering::AcqRel) {
                        tracing::info!(kind, count = store.len(), "initial list complete");
                    }
                    changes.notify();
                }
                // The store changes only at InitDone, when the relisted set replaces the old
                // one at once (so a relist never shows a half-listed store); each listed
                // object counts as a change then, as in kube-proxy.
                watcher::Event::InitApply(o) => listed.push(o.trigger_time()),
                watcher::Event::Init => listed.clear(),
            }
        }
        tracing::error!(kind, "watch stream ended unexpectedly; restarting it");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A watched kind: what is kept of it, and how a change to it is counted.
trait Watched {
    type Compact: Keyed + PartialEq + Send + Sync + 'static;
    const CHANGE: ChangeKind;
    fn compact(&self, interner: &mut Interner) -> Self::Compact;
    /// When the change that caused this version of the object happened, if it says.
    fn trigger_time(&self) -> Option<SystemTime> {
        None
    }
}

impl Watched for Service {
    type Compact = ServiceObject;
    const CHANGE: ChangeKind = ChangeKind::Service;
    fn compact(&self, interner: &mut Interner) -> ServiceObject {
        ServiceObject::new(self, interner)
    }
}

impl Watched for EndpointSlice {
    type Compact = SliceObject;
    const CHANGE: ChangeKind = ChangeKind::EndpointSlice;
    fn compact(&self, interner: &mut Interner) -> SliceObject {
        SliceObject::new(self, interner)
    }
    fn trigger_time(&self) -> Option<SystemTime> {
        let value = self
            .metadata
            .annotations
            .as_ref()?
            .get(LAST_CHANGE_TRIGGER_TIME_ANNOTATION)?;
        // A malformed stamp costs one histogram sample, not the change: debug, not warn.
        parse_trigger_time(value)
            .inspect_err(|e| tracing::debug!("{e}"))
            .ok()
    }
}

impl Watched for Node {
    /// The name, the store's key (a Node has no namespace).
    type Compact = (String, NodeState);
    const CHANGE: ChangeKind = ChangeKind::Other;
    fn compact(&self, _: &mut Interner) -> (String, NodeState) {
        let name = self.metadata.name.clone().unwrap_or_default();
        (name, NodeState::from_node(self))
    }
}

/// Rate-limits one watch's error log: the first error of an outage is logged, then at most one
/// per interval with the count of those not logged; the end of an outage is logged once.
#[derive(Debug)]
struct ErrorLog {
    interval: Duration,
    failing_since: Option<Instant>,
    last_logged: Option<Instant>,
    suppressed: u32,
}

impl ErrorLog {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            failing_since: None,
            last_logged: None,
            suppressed: 0,
        }
    }

    /// Records an error; `Some(errors suppressed since the last log)` if this one is logged.
    fn failed(&mut self, now: Instant) -> Option<u32> {
        self.failing_since.get_or_insert(now);
        let due = self
            .last_logged
            .is_none_or(|t| now.duration_since(t) >= self.interval);
        if !due {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Records a success; `Some(outage length)` if it ends an outage.
    fn recovered(&mut self, now: Instant) -> Option<Duration> {
        let since = self.failing_since.take()?;
        self.last_logged = None;
        self.suppressed = 0;
        Some(now.duration_since(since))
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn error_log_logs_first_error_then_once_per_interval_and_the_recovery() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut log = ErrorLog::new(s(30));
        assert_eq!(log.recovered(t0), None, "no outage yet");
        assert_eq!(log.failed(t0), Some(0), "first error is logged");
        assert_eq!(log.failed(t0 + s(1)), None);
        assert_eq!(log.failed(t0 + s(3)), None);
        assert_eq!(
            log.failed(t0 + s(30)),
            Some(2),
            "then once per interval, with a count"
        );
        assert_eq!(log.failed(t0 + s(31)), None);
        assert_eq!(log.recovered(t0 + s(40)), Some(s(40)), "the whole outage");
        assert_eq!(log.recovered(t0 + s(41)), None, "recovery is logged once");
        assert_eq!(log.failed(t0 + s(42)), Some(0), "a new outage logs at once");
    }

    fn svc(name: &str, ip: &str) -> Service {
        let mut svc = Service::default();
        svc.metadata.name = Some(name.into());
        svc.metadata.namespace = Some("dev".into());
        svc.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ips: Some(vec![ip.into()]),
            ..Default::default()
        });
        svc
    }

    fn names(store: &CompactStore<ServiceObject>) -> Vec<String> {
        let mut names: Vec<String> = lock(&store.objects)
            .iter()
            .filter_map(|s| s.name.clone())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_compact_store_keeps_reflector_semantics() {
        let mut interner = Interner::default();
        let mut store = CompactStore::new();
        let mut apply = |store: &mut CompactStore<ServiceObject>,
                         event: watcher::Event<Service>| {
            let compact = match &event {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                    Some(o.compact(&mut interner))
                }
                _ => None,
            };
            store.apply(&event, compact);
        };
        apply(&mut store, watcher::Event::Init);
        apply(&mut store, watcher::Event::InitApply(svc("a", "10.96.0.1")));
        apply(&mut store, watcher::Event::InitApply(svc("b", "10.96.0.2")));
        assert!(
            names(&store).is_empty(),
            "nothing shows before the list ends"
        );
        apply(&mut store, watcher::Event::InitDone);
        assert_eq!(names(&store), ["a", "b"]);

        apply(&mut store, watcher::Event::Apply(svc("c", "10.96.0.3")));
        apply(&mut store, watcher::Event::Delete(svc("a", "10.96.0.1")));
        assert_eq!(names(&store), ["b", "c"]);
        let ip = |store: &CompactStore<ServiceObject>, name: &str| {
            lock(&store.objects)
                .get((Some("dev"), name))
                .and_then(|s| s.spec.as_ref()?.cluster_ips.first().cloned())
        };
        apply(&mut store, watcher::Event::Apply(svc("c", "10.96.0.9")));
        assert_eq!(
            ip(&store, "c").as_deref(),
            Some("10.96.0.9"),
            "an update replaces"
        );

        // A relist (after a watch failed): the old objects stay until the list is complete,
        // then the listed set replaces them whole.
        apply(&mut store, watcher::Event::Init);
        apply(&mut store, watcher::Event::InitApply(svc("d", "10.96.0.4")));
        assert_eq!(
            names(&store),
            ["b", "c"],
            "never deleted before the full list"
        );
        apply(&mut store, watcher::Event::InitDone);
        assert_eq!(names(&store), ["d"]);

        // An object that comes back equal (relisted, or changed only where the proxy does not
        // look) keeps its pointer: the planner then knows it has not changed.
        let held = |store: &CompactStore<ServiceObject>| {
            lock(&store.objects)
                .get((Some("dev"), "d"))
                .cloned()
                .unwrap_or_else(|| panic!("d is stored"))
        };
        let before = held(&store);
        let mut relabelled = svc("d", "10.96.0.4");
        relabelled.metadata.resource_version = Some("2".into());
        apply(&mut store, watcher::Event::Apply(relabelled));
        assert!(Arc::ptr_eq(&before, &held(&store)), "an unread change");
        apply(&mut store, watcher::Event::Init);
        apply(&mut store, watcher::Event::InitApply(svc("d", "10.96.0.4")));
        apply(&mut store, watcher::Event::InitDone);
        assert!(Arc::ptr_eq(&before, &held(&store)), "relisted unchanged");
        apply(&mut store, watcher::Event::Apply(svc("d", "10.96.0.5")));
        assert!(!Arc::ptr_eq(&before, &held(&store)), "a real change");
    }
}
