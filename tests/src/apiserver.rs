//! An in-process stand-in for kube-apiserver that speaks the real list/watch protocol over
//! plain HTTP/1.1, so the controller's kube-rs watchers can be tested without a cluster,
//! with faults (dropped connections, stalls, outages, 410s, stale events) injected at will.
//!
//! Served: Services (`/api/v1/services`), EndpointSlices
//! (`/apis/discovery.k8s.io/v1/endpointslices`) and Nodes (`/api/v1/nodes`, also
//! `/api/v1/nodes/<name>`), cluster-wide or per namespace (`/api/v1/namespaces/<ns>/...`),
//! with `labelSelector`, `fieldSelector` (`metadata.name` / `metadata.namespace`),
//! `limit`/`continue`, `resourceVersion`/`resourceVersionMatch`, and watches
//! (`watch=true`, `allowWatchBookmarks`, `timeoutSeconds`, `sendInitialEvents`).
//! Only GET is served: tests change objects through [`ApiServer`] methods.
//!
//! Semantics kube-rs's watcher relies on:
//! - one resourceVersion counter for every kind; lists carry the list's RV, objects theirs;
//! - a watch from RV N replays retained events after N, then streams live ones; if N is
//!   older than the retained window ([`Options::history_limit`] events) it gets a
//!   `{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired",...}}` event,
//!   which is how kube-apiserver reports 410 Gone on a watch;
//! - watches with `allowWatchBookmarks=true` get a BOOKMARK every
//!   [`Options::bookmark_interval`];
//! - streaming lists (`sendInitialEvents=true&resourceVersionMatch=NotOlderThan`) get the
//!   current objects as ADDED, then a bookmark annotated `k8s.io/initial-events-end`;
//! - a watch with a label selector sees an update that moves an object out of (into) the
//!   selection as DELETED (ADDED).
//!
//! Each connection gets a thread; dropping the [`ApiServer`] closes every connection and
//! joins every thread.

mod http;
pub mod objects;
mod selector;
mod store;

use std::{
    collections::HashMap,
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

pub use objects::{Endpoint, EndpointPort, Kind, ServicePort, endpoint_slice, node, service};
use serde_json::{Value, json};
use store::Store;

/// How often the accept thread looks for a connection (the listener is non-blocking so the
/// thread can also notice outages and shutdown).
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// How long fault switches wait for the accept thread to act on them.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(5);
/// "Until told otherwise" for stalls and outages without an end.
const FOREVER: Duration = Duration::from_secs(10 * 365 * 86_400);

/// What can go wrong using the stand-in server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// `apply` got an object of a kind the server does not serve.
    #[error("the test API server does not serve {0}")]
    UnknownKind(String),
    /// `apply` got an object without the fields the server needs.
    #[error("invalid object: {0}")]
    BadObject(String),
    /// `delete` or `replay_stale` named an object that does not exist.
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        kind: Kind,
        namespace: String,
        name: String,
    },
    /// `replay_stale` found no older version of the object in the retained history.
    #[error("no older version of {kind} {namespace}/{name} is retained to replay")]
    NoOlderVersion {
        kind: Kind,
        namespace: String,
        name: String,
    },
    /// Binding the listening socket failed.
    #[error("binding {addr} failed: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    /// Writing the kubeconfig failed.
    #[error("writing kubeconfig {}: {source}", path.display())]
    Kubeconfig { path: PathBuf, source: io::Error },
    /// A fault switch did not take effect in time (e.g. the port was taken during an outage).
    #[error("timed out waiting for the test API server to {0}")]
    Timeout(String),
}

/// How the server behaves; [`Options::default`] suits most tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many events are retained for watches to resume from; older resourceVersions
    /// get 410 Expired.
    pub history_limit: usize,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// If set, every request must carry `Authorization: Bearer <token>` (else 401), and
    /// [`ApiServer::kubeconfig`] writes it.
    pub token: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(2),
            token: None,
        }
    }
}

/// One request the server read, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET` etc.
    pub method: String,
    /// Path and query exactly as sent, e.g. `/api/v1/services?limit=500`.
    pub target: String,
    /// The decoded path.
    pub path: String,
    /// The decoded query parameters, in order.
    pub query: Vec<(String, String)>,
}

impl RecordedRequest {
    /// A decoded query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this was a watch (`watch=true` or `watch=1`).
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }
}

/// Faults switched on at run time.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Requests are not answered and watches send nothing until then.
    pub stall_until: Option<Instant>,
    /// The port is closed until then.
    pub outage_until: Option<Instant>,
    /// How many of the next watches of a kind get 410 at once.
    pub expire_watches: HashMap<Kind, usize>,
    /// How many of the next lists of a kind get 500.
    pub fail_lists: HashMap<Kind, usize>,
}

/// Everything the connection threads share, behind one lock.
#[derive(Debug)]
pub(crate) struct State {
    pub store: Store,
    pub faults: Faults,
    pub requests: Vec<RecordedRequest>,
    pub open_watches: usize,
    pub listening: bool,
    pub shutdown: bool,
    /// Bumped whenever all connections are dropped; a connection thread that sees a value
    /// other than the one it started with stops.
    pub drop_generation: u64,
    /// Bumped by [`ApiServer::expire_open_watches`].
    pub expire_generation: u64,
    /// Why re-binding after an outage last failed.
    pub bind_error: Option<String>,
}

/// Open connections, so faults and shutdown can close them.
#[derive(Debug, Default)]
struct Conns {
    next_id: u64,
    streams: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled on every change to `state`.
    changed: Condvar,
    conns: Mutex<Conns>,
    options: Options,
    addr: SocketAddr,
}

impl Shared {
    /// The state; a panic in another thread holding the lock does not poison the tests.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a change to the state, or `timeout`.
    pub(crate) fn wait<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(guard, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    fn conns(&self) -> MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes every open connection (both directions, so blocked reads and writes return).
    fn drop_connections(&self) -> usize {
        // Lock order: conns, then state (also in `spawn_connection`), so a connection is
        // either registered before the generation bump (and closed here) or gets the new one.
        let conns = self.conns();
        self.lock().drop_generation += 1;
        for stream in conns.streams.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let n = conns.streams.len();
        drop(conns);
        self.changed.notify_all();
        n
    }

    /// Changes the state and wakes every waiter.
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.notify_all();
        r
    }

    /// Waits until `pred` holds, or `timeout`. Returns whether it holds.
    fn wait_until(&self, timeout: Duration, pred: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if pred(&state) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self.wait(state, (deadline - now).min(Duration::from_millis(50)));
        }
    }
}

/// The stand-in API server. Listens on 127.0.0.1 on a port of its own until dropped.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Starts a server with [`Options::default`].
    ///
    /// # Panics
    /// If no loopback port can be bound, which only a broken test machine causes.
    pub fn start() -> ApiServer {
        Self::start_with(Options::default()).expect("starting the test API server on 127.0.0.1")
    }

    /// Starts a server on 127.0.0.1 with a free port.
    pub fn start_with(options: Options) -> Result<ApiServer, ApiServerError> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let listener = bind(any).map_err(|source| ApiServerError::Bind { addr: any, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ApiServerError::Bind { addr: any, source })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                store: Store::new(options.history_limit),
                faults: Faults::default(),
                requests: Vec::new(),
                open_watches: 0,
                listening: true,
                shutdown: false,
                drop_generation: 0,
                expire_generation: 0,
                bind_error: None,
            }),
            changed: Condvar::new(),
            conns: Mutex::new(Conns::default()),
            options,
            addr,
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("apiserver-accept".into())
            .spawn(move || accept_loop(&accept_shared, listener))
            .map_err(|source| ApiServerError::Bind { addr, source })?;
        Ok(ApiServer {
            shared,
            accept: Some(accept),
        })
    }

    /// The base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The listening address (the same across outages).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A kubeconfig (JSON, which is YAML) with one context pointing at this server, with
    /// the bearer token if [`Options::token`] is set.
    pub fn kubeconfig_text(&self) -> String {
        let user = match &self.shared.options.token {
            Some(token) => json!({"token": token}),
            None => json!({}),
        };
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "svcproxy-test", "cluster": {"server": self.url()}}],
            "users": [{"name": "svcproxy-test", "user": user}],
            "contexts": [{
                "name": "svcproxy-test",
                "context": {"cluster": "svcproxy-test", "user": "svcproxy-test", "namespace": "default"},
            }],
            "current-context": "svcproxy-test",
            "preferences": {},
        });
        serde_json::to_string_pretty(&config).unwrap_or_else(|_| config.to_string())
    }

    /// Writes [`Self::kubeconfig_text`] to `path`, for `KUBECONFIG` or
    /// `Kubeconfig::read_from`.
    pub fn kubeconfig(&self, path: impl AsRef<Path>) -> Result<(), ApiServerError> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig_text()).map_err(|source| ApiServerError::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Creates or replaces an object (by kind, namespace, name), bumping the
    /// resourceVersion. Namespaced objects without a namespace go to `default`. Returns the
    /// stored object, with `metadata.resourceVersion`, `uid`, `creationTimestamp` and
    /// `generation` filled in.
    pub fn apply(&self, obj: Value) -> Result<Value, ApiServerError> {
        self.shared.update(|s| s.store.apply(obj))
    }

    /// Deletes an object (`namespace` is ignored for Nodes). Returns its last state, with
    /// the resourceVersion of the deletion.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<Value, ApiServerError> {
        self.shared
            .update(|s| s.store.delete(kind, namespace, name))
    }

    /// The stored object, if any.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.shared.lock().store.get(kind, namespace, name).cloned()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().store.rv()
    }

    /// Forgets the event history, as an etcd compaction does: watches resuming from any
    /// past resourceVersion, and outstanding `continue` tokens, now get 410. Open watches
    /// that have seen every event carry on.
    pub fn compact(&self) {
        self.shared.update(|s| s.store.compact());
    }

    /// Every request read so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// How many watch responses are streaming now.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().open_watches
    }

    /// Waits until at least `n` watches are open. Returns whether that happened in time.
    pub fn wait_for_watches(&self, n: usize, timeout: Duration) -> bool {
        self.shared.wait_until(timeout, |s| s.open_watches >= n)
    }

    /// Waits until a recorded request satisfies `pred`. Returns whether one did in time.
    pub fn wait_for_request(
        &self,
        timeout: Duration,
        pred: impl Fn(&RecordedRequest) -> bool,
    ) -> bool {
        self.shared
            .wait_until(timeout, |s| s.requests.iter().any(&pred))
    }

    // ---- fault injection ----

    /// Closes every open connection now (clients see a reset/EOF mid-stream). The server
    /// keeps listening. Returns how many were closed.
    pub fn drop_connections(&self) -> usize {
        self.shared.drop_connections()
    }

    /// For `duration`, connections are accepted and requests read but not answered, and
    /// open watches send nothing (events queue up). Afterwards everything pending is
    /// answered / delivered, like a server that was stuck. Clients that gave up meanwhile
    /// just see their connection go.
    pub fn stall(&self, duration: Duration) {
        let until = deadline(duration);
        self.shared.update(|s| s.faults.stall_until = Some(until));
    }

    /// Ends a stall early.
    pub fn unstall(&self) {
        self.shared.update(|s| s.faults.stall_until = None);
    }

    /// Stops listening and drops every connection, so clients get "connection refused",
    /// for `duration`; then listens again on the same port. Returns once the port is closed.
    pub fn outage(&self, duration: Duration) -> Result<(), ApiServerError> {
        let until = deadline(duration);
        self.shared.update(|s| s.faults.outage_until = Some(until));
        if self
            .shared
            .wait_until(SWITCH_TIMEOUT, |s| !s.listening || Instant::now() >= until)
        {
            Ok(())
        } else {
            Err(ApiServerError::Timeout("close its port".into()))
        }
    }

    /// Starts an outage that lasts until [`Self::end_outage`].
    pub fn begin_outage(&self) -> Result<(), ApiServerError> {
        self.outage(FOREVER)
    }

    /// Ends an outage: listens again on the same port. Returns once it does.
    pub fn end_outage(&self) -> Result<(), ApiServerError> {
        self.shared.update(|s| s.faults.outage_until = None);
        if self.shared.wait_until(SWITCH_TIMEOUT, |s| s.listening) {
            Ok(())
        } else {
            let why = self.shared.lock().bind_error.clone().unwrap_or_default();
            Err(ApiServerError::Timeout(format!(
                "listen on {} again: {why}",
                self.shared.addr
            )))
        }
    }

    /// Whether the port is open (false during an outage).
    pub fn is_listening(&self) -> bool {
        self.shared.lock().listening
    }

    /// The next watch of `kind` (whatever resourceVersion it asks for) gets a 410 Expired
    /// ERROR event and ends, so the client must relist. Calls add up.
    pub fn expire_next_watch(&self, kind: Kind) {
        self.shared
            .update(|s| *s.faults.expire_watches.entry(kind).or_default() += 1);
    }

    /// Every open watch gets a 410 Expired ERROR event now and ends.
    pub fn expire_open_watches(&self) {
        self.shared.update(|s| s.expire_generation += 1);
    }

    /// Every outstanding `continue` token gets 410 Expired when used.
    pub fn expire_continue_tokens(&self) {
        self.shared.update(|s| s.store.expire_continue_tokens());
    }

    /// The next list of `kind` gets 500 InternalError. Calls add up.
    pub fn fail_next_list(&self, kind: Kind) {
        self.shared
            .update(|s| *s.faults.fail_lists.entry(kind).or_default() += 1);
    }

    /// Sends open (and resuming) watches a duplicate MODIFIED event with the previous
    /// retained version of the object, carrying its older resourceVersion, as a buggy
    /// cache or proxy would. The stored object does not change. Returns the stale object.
    pub fn replay_stale(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiServerError> {
        self.shared
            .update(|s| s.store.replay_stale(kind, namespace, name))
    }

    /// Applies `objects` in order (each bumping the resourceVersion, so lists show the
    /// last state), but watches get the events in reverse order, newest first. With
    /// several versions of one slice this delivers its updates out of order.
    pub fn apply_out_of_order(&self, objects: Vec<Value>) -> Result<Vec<Value>, ApiServerError> {
        self.shared.update(|s| {
            // Check everything first so a bad object leaves the store as it was.
            for obj in &objects {
                store::key_of(obj)?;
                if !obj.get("metadata").is_some_and(Value::is_object) {
                    return Err(ApiServerError::BadObject(
                        "metadata is not an object".into(),
                    ));
                }
            }
            let n = objects.len();
            let stored = objects
                .into_iter()
                .map(|o| s.store.apply(o))
                .collect::<Result<Vec<_>, _>>()?;
            s.store.reverse_last(n);
            Ok(stored)
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.update(|s| s.shutdown = true);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        // The accept thread is gone, so no connection can be added any more.
        let threads = {
            let mut conns = self.shared.conns();
            for stream in conns.streams.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut conns.threads)
        };
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// `now + duration`, saturating far in the future.
fn deadline(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .or_else(|| now.checked_add(FOREVER))
        .unwrap_or(now)
}

/// A non-blocking listener (std sets SO_REUSEADDR, so the port can be bound again right
/// after an outage closes it).
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    let mut listener = Some(listener);
    loop {
        let (shutdown, outage) = {
            let s = shared.lock();
            (
                s.shutdown,
                s.faults
                    .outage_until
                    .is_some_and(|until| Instant::now() < until),
            )
        };
        if shutdown {
            return;
        }
        if outage && listener.is_some() {
            // Closing the listener also resets connections still in its backlog.
            listener = None;
            shared.drop_connections();
            shared.update(|s| s.listening = false);
        }
        if !outage && listener.is_none() {
            match bind(shared.addr) {
                Ok(l) => {
                    listener = Some(l);
                    shared.update(|s| {
                        s.listening = true;
                        s.faults.outage_until = None;
                        s.bind_error = None;
                    });
                }
                Err(e) => shared.update(|s| s.bind_error = Some(e.to_string())),
            }
        }
        match listener.as_ref().map(TcpListener::accept) {
            Some(Ok((stream, _))) => spawn_connection(shared, stream),
            // WouldBlock (nothing to accept), a transient accept error, or no listener.
            _ => thread::sleep(ACCEPT_POLL),
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream) {
    // Accepted sockets inherit non-blocking mode on some systems; the threads block.
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let Ok(registered) = stream.try_clone() else {
        return;
    };
    let mut conns = shared.conns();
    conns.threads.retain(|t| !t.is_finished());
    let generation = shared.lock().drop_generation;
    let id = conns.next_id;
    conns.next_id += 1;
    conns.streams.insert(id, registered);
    let thread_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("apiserver-conn-{id}"))
        .spawn(move || {
            http::serve_connection(&thread_shared, stream, generation);
            thread_shared.conns().streams.remove(&id);
        });
    match spawned {
        Ok(handle) => conns.threads.push(handle),
        Err(_) => {
            // Out of threads: refuse this connection rather than leak it.
            if let Some(s) = conns.streams.remove(&id) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}
