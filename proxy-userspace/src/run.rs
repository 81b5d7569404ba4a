//! `svcproxy run`: load and attach the datapath, then keep its maps equal to what the source
//! (the API server or a manifest directory) describes, until asked to stop.
//!
//! Flow: start the source -> load/adopt the datapath -> wait until the source is ready (every
//! initial list complete) -> loop { wait for a change and for the end of the coalescing window
//! that began with the last sync, snapshot, plan, apply }. Before the first complete list nothing is written, so after
//! a restart the adopted pinned maps keep serving exactly what they served; when the source
//! loses the API server nothing is notified and nothing is written either. SIGINT/SIGTERM
//! fire the one shutdown signal every task watches; the programs stay attached through their
//! pinned links and the maps stay pinned, for the next start to take over without a gap.

use std::{
    collections::HashSet,
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use thiserror::Error;
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tokio_util::sync::CancellationToken;

use crate::{
    caps::{self, CapError},
    counters::{CounterReader, Directory, Names, SharedDirectory},
    health::{self, HealthState},
    iface,
    kernel_maps::{KernelMaps, OpenError, StatsReader},
    loader::{Datapath, HookChoice, LoadError, MapSizes},
    metrics::Metrics,
    planner::{PlanCache, PlanInput, PlanOptions},
    socklb::{self, SocketLb, UdpRebalancer},
    source::{
        self, ChangeTotals, Store,
        kube::{KubeOptions, KubeSourceError},
    },
    writer::{MapOps, MapWriter, WriteError, WriterConfig},
};

/// After a write failed (a full map), how soon it is tried again without a new change.
const RETRY_FAILED_WRITE: Duration = Duration::from_secs(1);
/// While the source is not ready, how often to say we are still waiting.
const READY_NAG: Duration = Duration::from_secs(10);

/// Which source `svcproxy run` follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// A directory of manifest files, polled for changes.
    Manifests,
    /// The API server: a kubeconfig, else `KUBECONFIG`, else the in-cluster service account.
    Kube,
}

/// The chosen source and its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceOptions {
    Manifests(PathBuf),
    Kube { kubeconfig: Option<PathBuf> },
}

impl SourceOptions {
    /// The source from the command line: `--source` if given, else the one whose option is
    /// present. Refuses a missing or ambiguous choice rather than guessing.
    pub fn resolve(
        kind: Option<SourceKind>,
        manifests: Option<PathBuf>,
        kubeconfig: Option<PathBuf>,
    ) -> Result<Self, RunError> {
        match (kind, manifests, kubeconfig) {
            (Some(SourceKind::Manifests) | None, Some(dir), None) => Ok(Self::Manifests(dir)),
            (Some(SourceKind::Kube) | None, None, kubeconfig @ Some(_))
            | (Some(SourceKind::Kube), None, kubeconfig @ None) => Ok(Self::Kube { kubeconfig }),
            (None, None, None) => Err(RunError::NoSource),
            (Some(SourceKind::Manifests), None, _) => Err(RunError::SourceOption {
                problem: "--source manifests needs --manifests DIR",
            }),
            (Some(SourceKind::Manifests), Some(_), Some(_)) => Err(RunError::SourceOption {
                problem: "--kubeconfig is only read with --source kube",
            }),
            (Some(SourceKind::Kube), Some(_), _) => Err(RunError::SourceOption {
                problem: "--manifests is only read with --source manifests",
            }),
            (None, Some(_), Some(_)) => Err(RunError::SourceOption {
                problem: "both --manifests and --kubeconfig are given; pick one with --source",
            }),
        }
    }
}

pub struct RunOptions {
    pub source: SourceOptions,
    /// Operator choices for planning (external IP fence, service-proxy name).
    pub plan: PlanOptions,
    pub interfaces: Vec<String>,
    pub hook: HookChoice,
    pub pin_path: PathBuf,
    /// `--socket-lb`: which sockets the cgroup hooks translate.
    pub socket_lb: SocketLb,
    /// `--cgroup-path`: where the hooks attach; `None`: the cgroup v2 root.
    pub cgroup_path: Option<PathBuf>,
    pub node_name: String,
    pub sizes: MapSizes,
    /// The shortest time between two syncs: a rollout touches many EndpointSlices within
    /// milliseconds, and one plan for all of them is cheaper than one each; a lone change after
    /// a quiet spell is planned at once.
    pub coalesce: Duration,
    /// Where `/metrics` is served (kube-proxy's `--metrics-bind-address`).
    pub metrics_addr: SocketAddr,
    /// Where `/healthz` and `/livez` are served (kube-proxy's `--healthz-bind-address`).
    pub health_addr: SocketAddr,
}

/// Why `svcproxy run` could not start (or stopped). Once the loop runs, nothing in it is fatal:
/// source errors are retried and failed writes are retried. Each message already holds its
/// cause's, so no variant also reports it as a `source` (that would print it twice).
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Capabilities(#[from] CapError),
    #[error(
        "no source of Services: pass --manifests DIR, or --kubeconfig PATH, or --source kube to \
         use KUBECONFIG or the in-cluster service account"
    )]
    NoSource,
    #[error("{problem}")]
    SourceOption { problem: &'static str },
    #[error("bad interface glob {glob:?}: {error}")]
    BadGlob {
        glob: String,
        error: glob::PatternError,
    },
    #[error("cannot list interfaces: {0}")]
    ListInterfaces(io::Error),
    #[error("cannot install the SIGINT/SIGTERM handlers: {0}")]
    Signals(io::Error),
    #[error("cannot listen for {what} on {addr}: {error}; pick another address or port")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: io::Error,
    },
    #[error(transparent)]
    Kube(#[from] KubeSourceError),
    /// Boxed: the loader's errors are large, and this enum travels through every `?`.
    #[error(transparent)]
    Load(Box<LoadError>),
    #[error("cannot open the datapath's maps: {0}")]
    OpenMaps(OpenError),
    #[error("cannot adopt the pinned maps: {0}")]
    Adopt(WriteError),
}

impl From<LoadError> for RunError {
    fn from(e: LoadError) -> Self {
        Self::Load(Box::new(e))
    }
}

pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    // First: without these, loading would fail halfway with a bare EPERM.
    caps::check()?;
    if opts.socket_lb == SocketLb::All {
        caps::check_udp_rebalancing()?;
    }
    let selector = iface::Selector::parse(&opts.interfaces)
        .map_err(|(glob, error)| RunError::BadGlob { glob, error })?;
    // The one shutdown signal of every task. Cancelled on return too (errors included), so
    // no task outlives the run.
    let shutdown = CancellationToken::new();
    let _cancel_on_return = shutdown.clone().drop_guard();
    let signals = watch_signals(shutdown.clone())?;
    let metrics = Arc::new(Metrics::new());
    let health = HealthState::default();
    // Until the first sync everything is pending: if the first list never completes,
    // `/healthz` fails after the health timeout, as kube-proxy's does.
    health.queued(SystemTime::now());
    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|error| RunError::Bind { what, addr, error })
    };
    let metrics_listener = bind("metrics", opts.metrics_addr).await?;
    let health_listener = bind("health checks", opts.health_addr).await?;
    let http = tokio::spawn(health::serve_listeners(
        metrics_listener,
        health_listener,
        metrics.clone(),
        health.clone(),
        shutdown.clone().cancelled_owned(),
    ));

    // The source starts before the datapath loads: a bad kubeconfig fails before anything is
    // attached, and the initial list runs while the programs load.
    let store = match &opts.source {
        SourceOptions::Manifests(dir) => source::manifests::start(dir.clone(), shutdown.clone()),
        SourceOptions::Kube { kubeconfig } => {
            let kube = KubeOptions {
                kubeconfig: kubeconfig.clone(),
                node_name: opts.node_name.clone(),
            };
            source::kube::start(&kube, shutdown.clone()).await?
        }
    };

    let mut dp = Datapath::load_with(&opts.pin_path, &opts.sizes, opts.socket_lb)?;
    // Subscribed before the first listing, so an interface created in between is not missed.
    let links = iface::LinkWatch::new().map_err(RunError::ListInterfaces)?;
    let ifaces = selector.matching().map_err(RunError::ListInterfaces)?;
    if ifaces.is_empty() {
        tracing::warn!(
            interfaces = ?opts.interfaces,
            "no interface matches --interfaces yet; each is attached when it appears"
        );
    }
    // A failure here leaves the interfaces already done attached: they run this build's
    // program on the pinned maps, which is what the previous run served. Tearing down working
    // traffic because one interface failed would be worse.
    for found in &ifaces {
        dp.attach_as(&found.name, opts.hook)?;
    }
    if opts.socket_lb != SocketLb::Off {
        let cgroup = match &opts.cgroup_path {
            Some(path) => path.clone(),
            None => socklb::cgroup2_root().map_err(|e| {
                RunError::Load(Box::new(LoadError::SocketLb {
                    what: "cannot find the cgroup v2 root".into(),
                    error: e.to_string(),
                }))
            })?,
        };
        dp.attach_cgroup(&cgroup)?;
    }
    // Also detaches the socket-level hooks of an earlier run when they are now off.
    dp.prune_links();
    let mut interfaces = Interfaces {
        selector,
        hook: opts.hook,
        links,
    };
    let logs = dp
        .take_logger()
        .map(|logger| tokio::spawn(drain_logs(logger)));
    let directory = SharedDirectory::default();
    match StatsReader::take(&mut dp) {
        Ok(stats) => {
            metrics.set_datapath_reader(Box::new(CounterReader::new(stats, directory.clone())))
        }
        Err(e) => return Err(RunError::OpenMaps(e)),
    }
    let mut syncer = Syncer {
        node_name: opts.node_name.clone(),
        plan_options: opts.plan.clone(),
        planner: PlanCache::default(),
        sizes: opts.sizes,
        reported: HashSet::new(),
        metrics,
        health,
        directory,
        names: Names::default(),
        applied_once: false,
        totals: ChangeTotals::default(),
        udp_rebalancer: (opts.socket_lb == SocketLb::All).then(UdpRebalancer::default),
    };
    let result = sync_loop(
        &mut dp,
        &mut interfaces,
        &opts,
        store,
        &mut syncer,
        &shutdown,
    )
    .await;
    shutdown.cancel();
    // The links stay: the programs keep serving from the pinned maps until the next svcproxy
    // takes them over (`svcproxy cleanup` removes them).
    drop(dp);
    if let Some(task) = logs {
        task.abort();
    }
    signals.abort();
    // In-flight health and metrics requests get their grace period.
    let _ = http.await;
    result
}

/// Fires `shutdown` on SIGINT or SIGTERM. The handlers are installed before this returns, so
/// a signal that arrives while the datapath loads is not lost.
fn watch_signals(shutdown: CancellationToken) -> Result<tokio::task::JoinHandle<()>, RunError> {
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
            _ = shutdown.cancelled() => return,
        };
        tracing::info!("{name}: stopping");
        shutdown.cancel();
    }))
}

/// Forwards the datapath's (rare) log records to our log as they arrive.
async fn drain_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd and the AsyncFd owns the logger, so the fd
    // stays open for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("cannot watch the eBPF log buffer: {}", e.into_parts().1);
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!("eBPF log buffer: {e}");
                return;
            }
        }
    }
}

/// The interfaces the datapath belongs on: those matching `--interfaces`, followed as they come
/// and go (a pod's veth appears when the pod starts, long after svcproxy did).
struct Interfaces {
    selector: iface::Selector,
    hook: HookChoice,
    links: iface::LinkWatch,
}

impl Interfaces {
    /// Attaches to matching interfaces that appeared and forgets those that went away (or were
    /// re-created under their name: the old link died with the old interface). Failures are
    /// logged, not fatal: one odd interface must not stop the proxy serving the others.
    fn reconcile(&self, dp: &mut Datapath) {
        let now = match self.selector.matching() {
            Ok(now) => now,
            Err(e) => return tracing::warn!("cannot list interfaces: {e}"),
        };
        for gone in dp.attached().into_iter().filter(|a| !now.contains(a)) {
            dp.detach(&gone.name);
        }
        for found in &now {
            if let Err(e) = dp.attach_as(&found.name, self.hook) {
                tracing::warn!("{e}");
            }
        }
    }
}

async fn sync_loop(
    dp: &mut Datapath,
    interfaces: &mut Interfaces,
    opts: &RunOptions,
    mut store: Store,
    syncer: &mut Syncer,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let config = WriterConfig {
        max_frontends: opts.sizes.frontends,
        maglev_table_size: opts.sizes.maglev_table_size,
    };
    let maps = KernelMaps::take(dp).map_err(RunError::OpenMaps)?;
    let mut writer = MapWriter::adopt(maps, config).map_err(RunError::Adopt)?;
    tracing::info!(frontends = writer.frontend_count(), pin_path = %opts.pin_path.display(),
        "datapath ready");

    if !store.is_ready() {
        tracing::info!(
            "waiting for the source's first complete list; the maps keep serving what they hold"
        );
    }
    let waited = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return stop(store).await,
            _ = store.ready() => break,
            _ = interfaces.links.changed() => interfaces.reconcile(dp),
            _ = tokio::time::sleep(READY_NAG) => tracing::warn!(
                waited_s = waited.elapsed().as_secs(),
                "still waiting for the source's first complete list; nothing is written until then"
            ),
        }
    }

    loop {
        let synced_at = tokio::time::Instant::now();
        let failed = syncer.once(&mut store, &mut writer);
        let retry = failed.then(|| tokio::time::Instant::now() + RETRY_FAILED_WRITE);
        // Interface changes are handled here and need no plan: the maps are shared by every
        // attachment, so a new interface serves the current state at once.
        let changed = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return stop(store).await,
                _ = store.changed() => break true,
                _ = sleep_until(retry) => break false,
                _ = interfaces.links.changed() => interfaces.reconcile(dp),
            }
        };
        if changed {
            syncer.health.queued(SystemTime::now());
            syncer.count_changes(&store);
        }
        // At most one sync per coalescing window, as kube-proxy's minimum sync period: a
        // change after a quiet spell is planned at once, and the rest of a burst (a rollout)
        // waits for the window to end and is planned together.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(synced_at + opts.coalesce) => {}
        }
    }
    stop(store).await
}

async fn stop(store: Store) -> Result<(), RunError> {
    store.stopped().await;
    tracing::info!("stopping; the datapath stays attached and pinned for the next start");
    Ok(())
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One snapshot -> plan -> apply, and what it reports to and remembers between runs.
struct Syncer {
    node_name: String,
    plan_options: PlanOptions,
    /// Plans only the Services whose objects changed since the last sync.
    planner: PlanCache,
    /// Rejections already logged: each sync recomputes all of them, and the log should say
    /// when one appears, not repeat it on every endpoint change.
    reported: HashSet<String>,
    metrics: Arc<Metrics>,
    health: HealthState,
    sizes: MapSizes,
    /// Names per service id for the counters, replaced after every sync.
    directory: SharedDirectory,
    /// The names behind the directory, updated frontend by frontend.
    names: Names,
    /// Whether the writer has applied a whole desired state yet.
    applied_once: bool,
    /// Change totals already added to the metrics' counters.
    totals: ChangeTotals,
    /// With `--socket-lb all`: moves connected UDP sockets off backends that went.
    udp_rebalancer: Option<UdpRebalancer>,
}

impl Syncer {
    /// Brings the change metrics (pending gauges, total counters) up to date.
    fn count_changes(&mut self, store: &Store) {
        let (pending, totals) = store.counts();
        self.metrics
            .set_pending(pending.endpoints, pending.services);
        self.metrics.add_changes(
            totals.endpoints.saturating_sub(self.totals.endpoints),
            totals.services.saturating_sub(self.totals.services),
        );
        self.totals = totals;
    }

    /// Returns true if some write failed (a full map) and should be retried.
    fn once<M: MapOps>(&mut self, store: &mut Store, writer: &mut MapWriter<M>) -> bool {
        let started = Instant::now();
        // Before the snapshot: what is taken is in it (see `Store::take_pending`).
        let changes = store.take_pending();
        let state = store.snapshot();
        if let Some(node) = &state.node {
            self.health
                .node_state(node.deleting, node.autoscaler_removing);
        }
        let node = state.node_info(&self.node_name);
        let snapshot_done = Instant::now();
        self.planner.plan(&PlanInput {
            services: &state.services,
            slices: &state.slices,
            node: &node,
            options: &self.plan_options,
        });
        let changed = self.planner.take_changed();
        // The snapshot's pointers are no longer needed: the planner holds what it keeps.
        drop(state);
        let desired = self.planner.desired();
        let rejections: HashSet<String> = desired
            .rejections
            .iter()
            .map(|r| format!("refused {}: {}", r.object, r.reason))
            .collect();
        for r in rejections.difference(&self.reported) {
            tracing::warn!("{r}");
        }
        self.reported = rejections;
        let plan_done = Instant::now();
        // The first apply looks at everything: the adopted maps may hold frontends the planner
        // never produced. After that, only what the planner says changed (and failed writes).
        let stats = if self.applied_once {
            writer.apply_changed(desired, &changed)
        } else {
            self.applied_once = true;
            writer.apply(desired)
        };
        if let Some(r) = &mut self.udp_rebalancer {
            // After the maps changed: the `connect()` hook must pick among the new backends.
            r.after_sync(desired);
        }
        let apply_done = Instant::now();
        self.metrics.observe_sync_frontends(
            [
                stats.frontends_written,
                stats.frontends_removed,
                stats.frontends_unchanged,
                stats.failed,
            ]
            .map(|n| n as u64),
        );
        {
            let mut published = self
                .directory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Let go of the published names first, so the update changes them in place
            // rather than copying all of them (a scrape reading them meanwhile keeps its copy).
            *published = Directory::default();
            self.names.update(writer, desired);
            *published = Directory::of(writer, &self.names, &self.sizes);
        }
        if stats.failed == 0 {
            // Everything queued before the snapshot is programmed now.
            let now = SystemTime::now();
            self.metrics.observe_sync(started.elapsed(), now);
            self.health.programmed(now);
            if let Some(since) = changes.since {
                self.metrics.observe_event_to_map(since.elapsed());
            }
            for trigger in &changes.triggers {
                self.metrics.observe_network_programming(*trigger, now);
            }
        } else {
            store.restore_pending(changes);
        }
        let frontends = desired.frontends.len();
        self.count_changes(store);
        if stats.frontends_written + stats.frontends_removed + stats.failed == 0 {
            tracing::debug!(frontends, "no change");
        } else {
            tracing::info!(
                frontends,
                written = stats.frontends_written,
                removed = stats.frontends_removed,
                failed = stats.failed,
                took_ms = started.elapsed().as_millis() as u64,
                planned = self.planner.last_planned,
                // Where a slow sync spends its time.
                snapshot_ms = (snapshot_done - started).as_millis() as u64,
                plan_ms = (plan_done - snapshot_done).as_millis() as u64,
                apply_ms = (apply_done - plan_done).as_millis() as u64,
                "synced"
            );
        }
        stats.failed > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_is_the_one_given_or_named_and_never_guessed() {
        let dir = || Some(PathBuf::from("m"));
        let kc = || Some(PathBuf::from("kc"));
        let ok = |kind, m, k| SourceOptions::resolve(kind, m, k).map_err(|e| e.to_string());
        use SourceKind::{Kube, Manifests};
        assert_eq!(
            ok(None, dir(), None),
            Ok(SourceOptions::Manifests("m".into()))
        );
        assert_eq!(
            ok(Some(Manifests), dir(), None),
            Ok(SourceOptions::Manifests("m".into()))
        );
        assert_eq!(
            ok(None, None, kc()),
            Ok(SourceOptions::Kube { kubeconfig: kc() })
        );
        assert_eq!(
            ok(Some(Kube), None, None),
            Ok(SourceOptions::Kube { kubeconfig: None }),
            "in-cluster or KUBECONFIG"
        );
        for (kind, m, k, want) in [
            (None, None, None, "no source"),
            (None, dir(), kc(), "pick one"),
            (Some(Manifests), None, None, "needs --manifests"),
            (Some(Manifests), dir(), kc(), "--kubeconfig is only"),
            (Some(Kube), dir(), None, "--manifests is only"),
        ] {
            let got = ok(kind, m, k);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(want)),
                "{kind:?}: {got:?} should mention {want:?}"
            );
        }
    }
}
