//! Sources of cluster state: the objects the planner reads and this node's Node, kept current
//! by a source's tasks and read by the run loop as whole snapshots through one [`Store`].
//!
//! Two sources implement [`Source`]: [`manifests`] polls a directory, [`kube`] watches the API
//! server. The run loop does not care which: it waits for [`Store::ready`] (every initial list
//! complete), then for [`Store::changed`], and plans from [`Store::snapshot`]. Sources only keep
//! objects and never decide what to delete: the planner recomputes everything from a snapshot,
//! so a lost, replayed or out-of-order event cannot leave a stale frontend behind.

mod keyed;
pub mod kube;
pub mod manifests;

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Instant, SystemTime},
};

use k8s_openapi::api::core::v1::Node;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    objects::{ServiceObject, SliceObject},
    planner::NodeInfo,
};

/// The Node label naming the node's zone, for topology-aware routing.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// The taint the cluster autoscaler puts on a node it is about to remove. kube-proxy fails its
/// `/healthz` on it so load balancers drain the node before it goes.
pub use crate::health::TO_BE_DELETED_TAINT as TAINT_TO_BE_DELETED;

/// Everything a source knows at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    /// Shared with the source's store: a snapshot copies pointers, not objects, and an
    /// object that did not change is the same pointer in the next snapshot.
    pub services: Vec<Arc<ServiceObject>>,
    pub slices: Vec<Arc<SliceObject>>,
    /// This node's Node; `None` when the source does not follow Nodes (manifests) or the Node
    /// does not exist (yet).
    pub node: Option<NodeState>,
}

impl ClusterState {
    /// What the planner needs to know about the node called `name`.
    pub fn node_info(&self, name: &str) -> NodeInfo {
        NodeInfo {
            name: name.to_owned(),
            zone: self.node.as_ref().and_then(|n| n.zone.clone()),
        }
    }
}

/// The parts of this node's Node that matter to the proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// The [`LABEL_ZONE`] label.
    pub zone: Option<String>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// Tainted [`TAINT_TO_BE_DELETED`].
    pub autoscaler_removing: bool,
}

impl NodeState {
    pub fn from_node(node: &Node) -> Self {
        Self {
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ZONE))
                .cloned(),
            deleting: node.metadata.deletion_timestamp.is_some(),
            autoscaler_removing: node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED)),
        }
    }

    /// Why the proxy should report itself unhealthy to load balancers (kube-proxy's `/healthz`),
    /// or `None`. Never a reason to change the datapath: traffic keeps flowing while it drains.
    pub fn draining_reason(&self) -> Option<&'static str> {
        if self.deleting {
            Some("the Node is being deleted")
        } else if self.autoscaler_removing {
            Some("the Node is tainted ToBeDeletedByClusterAutoscaler")
        } else {
            None
        }
    }
}

/// What both sources implement: the objects they hold, readable at any moment.
pub trait Source: Send + Sync + 'static {
    /// True once every initial list is complete. Before that a snapshot may be missing objects
    /// that exist, and planning from it would delete their frontends.
    fn is_ready(&self) -> bool;
    /// The objects as they are now.
    fn snapshot(&self) -> ClusterState;
}

/// What a change was to, for kube-proxy's change counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Service,
    EndpointSlice,
    /// The Node, or a source that only knows that something changed (manifests).
    Other,
}

/// Trigger times kept per sync at most: a change storm while writes fail must not grow
/// memory without bound; the network-programming histogram then misses the newest ones.
const MAX_TRIGGERS: usize = 10_000;

/// Changes received and not yet programmed, and the running totals.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pending {
    pub services: u64,
    pub endpoints: u64,
    /// When the oldest of them arrived.
    pub since: Option<Instant>,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of the EndpointSlice changes that
    /// carried one (from after this process started).
    pub triggers: Vec<SystemTime>,
}

impl Pending {
    fn add(&mut self, kind: ChangeKind, trigger: Option<SystemTime>, now: Instant) {
        match kind {
            ChangeKind::Service => self.services += 1,
            ChangeKind::EndpointSlice => self.endpoints += 1,
            ChangeKind::Other => {}
        }
        self.since.get_or_insert(now);
        if let Some(t) = trigger
            && self.triggers.len() < MAX_TRIGGERS
        {
            self.triggers.push(t);
        }
    }

    /// Puts back changes taken by a sync that failed, ahead of the ones that came since.
    fn merge_older(&mut self, mut older: Pending) {
        self.services += older.services;
        self.endpoints += older.endpoints;
        self.since = older.since.or(self.since);
        older.triggers.append(&mut self.triggers);
        older.triggers.truncate(MAX_TRIGGERS);
        self.triggers = older.triggers;
    }
}

/// Changes received since the start, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeTotals {
    pub services: u64,
    pub endpoints: u64,
}

#[derive(Debug)]
struct Ledger {
    pending: Pending,
    totals: ChangeTotals,
    /// Trigger times before this are of changes made before we ran: the datapath we adopted
    /// may have programmed them long ago, so their age says nothing about us (kube-proxy
    /// filters them the same way).
    started: SystemTime,
}

/// The sending side of a [`Store`]'s change notification, held by the source's tasks, with
/// the ledger of what changed.
#[derive(Clone, Debug)]
pub struct Changes {
    tx: watch::Sender<u64>,
    ledger: Arc<Mutex<Ledger>>,
}

impl Changes {
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(0),
            ledger: Arc::new(Mutex::new(Ledger {
                pending: Pending::default(),
                totals: ChangeTotals::default(),
                started: SystemTime::now(),
            })),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // Every update leaves the ledger whole, so a poisoned lock is still good to use.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the reader that the source's objects (or its readiness) changed. Call it after
    /// the change is visible through [`Source::snapshot`]. Notifications that arrive before the
    /// reader looks merge into one, which is the batching the run loop wants.
    pub fn notify(&self) {
        self.tx
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// Counts one change (visible through [`Source::snapshot`] already) without notifying:
    /// for the items of a list, notified once at its end.
    pub fn count(&self, kind: ChangeKind, trigger: Option<SystemTime>) {
        let now = Instant::now();
        let mut ledger = self.ledger();
        let trigger = trigger.filter(|t| *t >= ledger.started);
        ledger.pending.add(kind, trigger, now);
        match kind {
            ChangeKind::Service => ledger.totals.services += 1,
            ChangeKind::EndpointSlice => ledger.totals.endpoints += 1,
            ChangeKind::Other => {}
        }
    }

    /// [`count`](Self::count), then [`notify`](Self::notify).
    pub fn record(&self, kind: ChangeKind, trigger: Option<SystemTime>) {
        self.count(kind, trigger);
        self.notify();
    }
}

impl Default for Changes {
    fn default() -> Self {
        Self::new()
    }
}

/// The run loop's handle on a source: readiness, change notification, snapshots, and the
/// source's tasks (which stop when the shared shutdown signal fires).
pub struct Store {
    source: Arc<dyn Source>,
    rx: watch::Receiver<u64>,
    /// The sources' side, kept so the receiver never sees a closed channel ([`Store::changed`]
    /// then has no error case, whatever happens to the source's tasks), and for its ledger.
    changes: Changes,
    tasks: Vec<JoinHandle<()>>,
}

impl Store {
    /// A store over `source`, whose tasks (already spawned) call `changes.notify()`.
    pub fn new(source: Arc<dyn Source>, changes: Changes, tasks: Vec<JoinHandle<()>>) -> Self {
        Self {
            source,
            rx: changes.tx.subscribe(),
            changes,
            tasks,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.source.is_ready()
    }

    /// Returns once the source is ready (at once if it already is).
    pub async fn ready(&mut self) {
        loop {
            // Mark what we have seen before looking, so a notification that lands between
            // the check and the wait still wakes us.
            self.rx.borrow_and_update();
            if self.source.is_ready() {
                return;
            }
            self.changed().await;
        }
    }

    /// Returns when something changed since the last [`snapshot`](Self::snapshot) (or
    /// [`ready`](Self::ready)); at once if a change is already pending.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // Unreachable: we hold a sender. Waiting forever is the right meaning anyway.
            std::future::pending::<()>().await;
        }
    }

    /// The source's objects now. Every change notified before this call is in it; one notified
    /// during or after it wakes the next [`changed`](Self::changed).
    pub fn snapshot(&mut self) -> ClusterState {
        self.rx.borrow_and_update();
        self.source.snapshot()
    }

    /// Takes the pending changes. Call it before [`snapshot`](Self::snapshot): a change is
    /// counted after it is visible, so everything taken is in the snapshot that follows.
    pub fn take_pending(&self) -> Pending {
        std::mem::take(&mut self.changes.ledger().pending)
    }

    /// Returns changes taken by a sync whose writes failed: they are still not programmed.
    pub fn restore_pending(&self, older: Pending) {
        self.changes.ledger().pending.merge_older(older);
    }

    /// Pending changes (services, endpoints) and the totals so far.
    pub fn counts(&self) -> (ChangeTotals, ChangeTotals) {
        let ledger = self.changes.ledger();
        let pending = ChangeTotals {
            services: ledger.pending.services,
            endpoints: ledger.pending.endpoints,
        };
        (pending, ledger.totals)
    }

    /// Waits for the source's tasks to end (after the shutdown signal fired).
    pub async fn stopped(self) {
        for task in self.tasks {
            if let Err(e) = task.await
                && e.is_panic()
            {
                tracing::error!("a source task panicked: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Mutex,
            atomic::{AtomicBool, Ordering},
        },
        time::Duration,
    };

    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    #[derive(Default)]
    struct Fake {
        ready: AtomicBool,
        services: Mutex<usize>,
    }

    impl Source for Fake {
        fn is_ready(&self) -> bool {
            self.ready.load(Ordering::SeqCst)
        }
        fn snapshot(&self) -> ClusterState {
            let n = *self.services.lock().unwrap_or_else(|e| e.into_inner());
            ClusterState {
                services: (0..n).map(|_| Arc::new(ServiceObject::default())).collect(),
                ..ClusterState::default()
            }
        }
    }

    async fn resolves(fut: impl Future<Output = ()>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), fut)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn ready_waits_for_the_source_and_changes_merge_until_snapshot() {
        let fake = Arc::new(Fake::default());
        let changes = Changes::new();
        let mut store = Store::new(fake.clone(), changes.clone(), Vec::new());
        assert!(!resolves(store.ready()).await, "not ready yet");
        changes.notify(); // a change that does not make it ready
        assert!(!resolves(store.ready()).await, "still not ready");

        fake.ready.store(true, Ordering::SeqCst);
        changes.notify();
        assert!(
            resolves(store.ready()).await,
            "ready after the notification"
        );
        assert!(
            !resolves(store.changed()).await,
            "ready consumed the notification"
        );

        *fake.services.lock().unwrap_or_else(|e| e.into_inner()) = 2;
        changes.notify();
        changes.notify();
        assert!(resolves(store.changed()).await, "a change wakes the reader");
        assert_eq!(store.snapshot().services.len(), 2);
        assert!(
            !resolves(store.changed()).await,
            "two notifications before the snapshot are one change"
        );
        changes.notify();
        let _ = store.snapshot();
        assert!(
            !resolves(store.changed()).await,
            "a snapshot includes what was notified before it"
        );
    }

    #[test]
    fn the_ledger_counts_by_kind_keeps_recent_triggers_and_takes_back_a_failed_sync() {
        let changes = Changes::new();
        let store = Store::new(Arc::new(Fake::default()), changes.clone(), Vec::new());
        let before_start = SystemTime::now() - Duration::from_secs(3600);
        let recent = SystemTime::now() + Duration::from_millis(1);
        changes.record(ChangeKind::Service, None);
        changes.count(ChangeKind::EndpointSlice, Some(before_start));
        changes.count(ChangeKind::EndpointSlice, Some(recent));
        changes.record(ChangeKind::Other, None);
        let (pending, totals) = store.counts();
        assert_eq!((pending.services, pending.endpoints), (1, 2));
        assert_eq!(pending, totals);

        let first = store.take_pending();
        assert_eq!(
            first.triggers,
            [recent],
            "a trigger from before the start is not ours to measure"
        );
        let oldest = first.since.expect("changes were counted");
        assert_eq!(store.counts().0, ChangeTotals::default());

        changes.count(
            ChangeKind::EndpointSlice,
            Some(recent + Duration::from_secs(1)),
        );
        store.restore_pending(first);
        let (pending, totals) = store.counts();
        assert_eq!((pending.services, pending.endpoints), (1, 3));
        assert_eq!((totals.services, totals.endpoints), (1, 3));
        let again = store.take_pending();
        assert_eq!(
            again.since,
            Some(oldest),
            "the failed sync's changes are the oldest"
        );
        assert_eq!(again.triggers.len(), 2);
        assert_eq!(again.triggers[0], recent);
    }

    #[test]
    fn node_state_reads_zone_deletion_and_autoscaler_taint() {
        let node = |labels: &[(&str, &str)], deleting: bool, taints: &[&str]| Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                deletion_timestamp: deleting.then(|| Time(Default::default())),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|k| Taint {
                            key: k.to_string(),
                            effect: "NoSchedule".into(),
                            ..Taint::default()
                        })
                        .collect(),
                ),
                ..NodeSpec::default()
            }),
            status: None,
        };
        let plain = NodeState::from_node(&node(&[(LABEL_ZONE, "z1")], false, &["other"]));
        assert_eq!(plain.zone.as_deref(), Some("z1"));
        assert_eq!(plain.draining_reason(), None);
        let state = ClusterState {
            node: Some(plain),
            ..ClusterState::default()
        };
        assert_eq!(state.node_info("n1").zone.as_deref(), Some("z1"));

        let deleting = NodeState::from_node(&node(&[], true, &[]));
        assert_eq!(deleting.zone, None);
        assert!(
            deleting
                .draining_reason()
                .is_some_and(|r| r.contains("deleted"))
        );
        let tainted = NodeState::from_node(&node(&[], false, &[TAINT_TO_BE_DELETED]));
        assert!(
            tainted
                .draining_reason()
                .is_some_and(|r| r.contains(TAINT_TO_BE_DELETED))
        );
    }
}
