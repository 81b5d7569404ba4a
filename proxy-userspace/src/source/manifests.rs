//! The manifest-directory source: polls a directory of Service and EndpointSlice manifests and
//! publishes what it holds whenever that changes.
//!
//! Polling (rather than inotify) because a mounted ConfigMap changes by swapping a symlink,
//! which inotify on the directory reports unreliably; a [`DirFingerprint`] makes a poll cheap
//! (one `stat` per file). A bad file is reported and skipped whole (see [`crate::manifest`]).
//! The source is ready after the first successful read: while the directory cannot be listed
//! nothing is published, so the maps keep what they have.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::{Changes, ClusterState, Source, Store};
use crate::{
    manifest::{self, DirFingerprint},
    objects::{Interner, ServiceObject, SliceObject},
};

/// How often the directory is checked for changes.
pub const POLL: Duration = Duration::from_millis(200);

/// Starts polling `dir` until `shutdown` fires.
pub fn start(dir: PathBuf, shutdown: CancellationToken) -> Store {
    let source = Arc::new(ManifestSource::default());
    let changes = Changes::new();
    let task = tokio::spawn(poll(
        Poller::new(dir),
        source.clone(),
        changes.clone(),
        shutdown,
    ));
    Store::new(source, changes, vec![task])
}

/// The objects of the last successful read; `None` before the first.
#[derive(Default)]
struct ManifestSource {
    state: Mutex<Option<ClusterState>>,
}

impl ManifestSource {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ClusterState>> {
        // A panic while holding the lock leaves a whole ClusterState behind (it is replaced in
        // one assignment), so a poisoned lock is still good to use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Source for ManifestSource {
    fn is_ready(&self) -> bool {
        self.lock().is_some()
    }

    fn snapshot(&self) -> ClusterState {
        self.lock().clone().unwrap_or_default()
    }
}

async fn poll(
    mut poller: Poller,
    source: Arc<ManifestSource>,
    changes: Changes,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if poller.poll_once(&source) {
            // Files say nothing about which objects changed; the change still times.
            changes.record(super::ChangeKind::Other, None);
        }
    }
}

/// What one poll remembers of the last.
struct Poller {
    dir: PathBuf,
    seen: Option<DirFingerprint>,
    /// The problems last logged, so a bad file is reported when it appears or changes, not on
    /// every re-read of an unsettled directory.
    reported: Vec<String>,
    interner: Interner,
}

/// `new` as shared objects, each one equal to the object published at its place taken from
/// there: the planner sees an unchanged object as the same pointer and does not plan its
/// Service again.
fn reuse<T: PartialEq>(old: &[Arc<T>], new: Vec<T>) -> Vec<Arc<T>> {
    new.into_iter()
        .enumerate()
        .map(|(i, object)| match old.get(i) {
            Some(held) if **held == object => Arc::clone(held),
            _ => Arc::new(object),
        })
        .collect()
}

impl Poller {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            seen: None,
            reported: Vec::new(),
            interner: Interner::default(),
        }
    }

    /// Re-reads the directory if it changed; true if the published objects changed.
    fn poll_once(&mut self, source: &ManifestSource) -> bool {
        let fp = match DirFingerprint::of(&self.dir) {
            Ok(fp) => fp,
            Err(e) => {
                self.report(vec![e.to_string()]);
                return false;
            }
        };
        if self.seen.as_ref() == Some(&fp) {
            return false;
        }
        let set = match manifest::load_dir(&self.dir) {
            Ok(set) => set,
            Err(e) => {
                self.report(vec![e.to_string()]);
                return false;
            }
        };
        self.seen = Some(set.fingerprint.clone());
        // The errors name their file; a bad file is skipped whole, the rest applies.
        let problems = set
            .errors
            .iter()
            .map(|e| format!("skipped file: {e}"))
            .chain(set.warnings.iter().map(ToString::to_string))
            .collect();
        self.report(problems);
        let interner = &mut self.interner;
        let services: Vec<ServiceObject> = set
            .services
            .iter()
            .map(|s| ServiceObject::new(s, interner))
            .collect();
        let slices: Vec<SliceObject> = set
            .slices
            .iter()
            .map(|s| SliceObject::new(s, interner))
            .collect();
        let mut published = source.lock();
        let (old_services, old_slices) = published
            .as_ref()
            .map_or((&[][..], &[][..]), |p| (&p.services[..], &p.slices[..]));
        let state = ClusterState {
            services: reuse(old_services, services),
            slices: reuse(old_slices, slices),
            node: None,
        };
        // A just-written file keeps the fingerprint unsettled for a while and the directory is
        // re-read on every poll; only a real difference is worth a plan.
        if published.as_ref() == Some(&state) {
            return false;
        }
        if published.is_none() {
            tracing::info!(dir = %self.dir.display(), services = state.services.len(),
                slices = state.slices.len(), "manifest directory read");
        }
        *published = Some(state);
        true
    }

    fn report(&mut self, problems: Vec<String>) {
        if problems == self.reported {
            return;
        }
        for problem in &problems {
            tracing::warn!("{problem}");
        }
        self.reported = problems;
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path, time::Instant};

    use super::*;

    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "svcproxy-source-{tag}-{}-{:?}",
                std::process::id(),
                Instant::now()
            ));
            Self(dir)
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: dev\n\
             spec:\n  clusterIPs: [{ip}]\n  ports:\n  - port: 80\n"
        )
    }

    fn write(dir: &Path, file: &str, text: &str) {
        let path = dir.join(file);
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(2), fut)
            .await
            .unwrap_or_else(|_| panic!("{what} within 2 s"))
    }

    fn ips(state: &ClusterState) -> Vec<String> {
        state
            .services
            .iter()
            .filter_map(|s| s.spec.as_ref()?.cluster_ips.first().cloned())
            .collect()
    }

    #[test]
    fn ready_only_after_the_first_read_and_notifies_only_real_changes() {
        let scratch = ScratchDir::new("poller");
        let source = ManifestSource::default();
        let mut poller = Poller::new(scratch.0.clone());

        assert!(!poller.poll_once(&source), "missing directory: nothing");
        assert!(
            !source.is_ready(),
            "not ready while the directory is missing"
        );

        fs::create_dir_all(&poller.dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
        assert!(
            poller.poll_once(&source),
            "an empty directory is a first state"
        );
        assert!(source.is_ready());
        assert!(source.snapshot().services.is_empty());

        write(&scratch.0, "a.yaml", &service("a", "10.96.0.1"));
        assert!(poller.poll_once(&source), "a new file is a change");
        assert_eq!(ips(&source.snapshot()), ["10.96.0.1"]);
        // The file is fresh, so the fingerprint never matches and each poll re-reads it; the
        // objects are the same, so no change is reported.
        assert!(!poller.poll_once(&source), "re-read without a difference");

        write(&scratch.0, "b.yaml", "kind: [broken\n");
        assert!(!poller.poll_once(&source), "a bad file is skipped");
        assert_eq!(
            poller.reported.len(),
            1,
            "and reported once: {:?}",
            poller.reported
        );
        assert!(poller.reported[0].contains("b.yaml"));

        fs::remove_dir_all(&scratch.0).unwrap_or_else(|e| panic!("rm: {e}"));
        assert!(
            !poller.poll_once(&source),
            "a vanished directory changes nothing"
        );
        assert!(source.is_ready(), "and the last state stays published");
        assert_eq!(ips(&source.snapshot()), ["10.96.0.1"]);
    }

    #[tokio::test]
    async fn store_over_a_directory_becomes_ready_and_wakes_on_edits() {
        let scratch = ScratchDir::new("store");
        fs::create_dir_all(&scratch.0).unwrap_or_else(|e| panic!("mkdir: {e}"));
        write(&scratch.0, "a.yaml", &service("a", "10.96.0.1"));
        let shutdown = CancellationToken::new();
        let mut store = start(scratch.0.clone(), shutdown.clone());
        within("ready", store.ready()).await;
        assert_eq!(ips(&store.snapshot()), ["10.96.0.1"]);

        write(&scratch.0, "a.yaml", &service("a", "10.96.0.2"));
        within("a change", store.changed()).await;
        assert_eq!(ips(&store.snapshot()), ["10.96.0.2"]);

        shutdown.cancel();
        within("stop", store.stopped()).await;
    }
}
