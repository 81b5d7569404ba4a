//! Proxy health with kube-proxy's semantics (`/healthz`, `/livez` on the health port) and the
//! HTTP servers for it and for `/metrics`.
//!
//! Health only reports: being unhealthy never changes the datapath.

use std::{
    convert::Infallible,
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue, X_CONTENT_TYPE_OPTIONS},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE};

/// kube-proxy's default `--metrics-bind-address`.
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249));
/// kube-proxy's default `--healthz-bind-address`.
pub const DEFAULT_HEALTH_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 10256));
/// How long a queued change may wait for programming before `/healthz` and `/livez` fail
/// (kube-proxy uses twice its sync period).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// A client gets this long to send its request headers (slow clients must not pin
/// connections forever).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, in-flight requests get this long to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// After a failed `accept` (e.g. out of file descriptors), wait before retrying instead of
/// spinning.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("binding {what} server to {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Inner {
    /// When the datapath last matched the last queued change.
    last_updated: Option<SystemTime>,
    /// The oldest change queued since then; `None` when fully programmed (or starting up).
    oldest_pending: Option<SystemTime>,
    /// Not being deleted and not tainted for deletion. True until told otherwise, like
    /// kube-proxy: a starting proxy has not seen its Node yet.
    node_eligible: bool,
}

/// Proxy health, shared by the controller (which reports) and the HTTP server (which
/// answers). Clones share the same state.
#[derive(Clone, Debug)]
pub struct HealthState {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
}

impl Default for HealthState {
    fn default() -> Self {
        Self::new(DEFAULT_HEALTH_TIMEOUT)
    }
}

/// Health at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    /// No queued change has waited longer than the timeout.
    pub healthy: bool,
    pub node_eligible: bool,
    /// When the datapath last matched the last queued change; `None` if never.
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
}

impl HealthStatus {
    /// `/healthz`: healthy and the node is not going away (load balancers should drain it).
    pub fn healthz_ok(&self) -> bool {
        self.healthy && self.node_eligible
    }

    /// `/livez`: healthy, whatever the node's state (a restart would not help a node being
    /// deleted).
    pub fn livez_ok(&self) -> bool {
        self.healthy
    }
}

impl HealthState {
    pub fn new(timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                last_updated: None,
                oldest_pending: None,
                node_eligible: true,
            })),
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a few plain fields, each always valid: a panic elsewhere while holding
        // the lock cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change that needs programming was received at `now`. Only the oldest pending one
    /// counts: later ones do not restart the clock.
    pub fn queued(&self, now: SystemTime) {
        let mut inner = self.lock();
        inner.oldest_pending.get_or_insert(now);
    }

    /// The datapath matches every change queued so far (the caller must only say so after a
    /// sync that started after the last [`queued`](Self::queued)).
    pub fn programmed(&self, now: SystemTime) {
        let mut inner = self.lock();
        inner.oldest_pending = None;
        inner.last_updated = Some(now);
    }

    /// The local Node's state: being deleted (deletion timestamp set) or tainted
    /// [`TO_BE_DELETED_TAINT`] makes `/healthz` fail.
    pub fn node_state(&self, deleting: bool, tainted_to_be_deleted: bool) {
        self.lock().node_eligible = !(deleting || tainted_to_be_deleted);
    }

    pub fn status(&self, now: SystemTime) -> HealthStatus {
        let inner = self.lock();
        let healthy = match inner.oldest_pending {
            None => true,
            // A wall clock stepping back makes the wait look shorter, never negative.
            Some(queued) => now.duration_since(queued).unwrap_or_default() < self.timeout,
        };
        HealthStatus {
            healthy,
            node_eligible: inner.node_eligible,
            last_updated: inner.last_updated,
            current_time: now,
        }
    }
}

/// kube-proxy's body: `{"lastUpdated": ..., "currentTime": ..., "nodeEligible": ...}`
/// (`nodeEligible` on `/healthz` only). Times are RFC 3339 in UTC.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HealthBody {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
}

/// Go's zero time, which kube-proxy reports when it has never synced.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

fn rfc3339(t: Option<SystemTime>) -> String {
    t.and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map_or_else(|| ZERO_TIME.to_owned(), |t| t.to_string())
}

/// Status code and JSON body for `/healthz` (`with_node` true) or `/livez`.
fn health_response(status: &HealthStatus, with_node: bool) -> (StatusCode, String) {
    let ok = if with_node {
        status.healthz_ok()
    } else {
        status.livez_ok()
    };
    // Like kube-proxy (for compatibility with its older releases): when healthy,
    // lastUpdated is "now"; when not, it is the last successful programming.
    let last_updated = if ok {
        Some(status.current_time)
    } else {
        status.last_updated
    };
    let body = HealthBody {
        last_updated: rfc3339(last_updated),
        current_time: rfc3339(Some(status.current_time)),
        node_eligible: with_node.then_some(status.node_eligible),
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Serializing two strings and a bool cannot fail; an empty object still is valid JSON.
    let body = serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_owned());
    (code, body)
}

#[derive(Clone, Copy, Debug)]
enum Role {
    Metrics,
    Health,
}

fn response(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

fn handle(
    role: Role,
    path: &str,
    metrics: &Metrics,
    health: &HealthState,
) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    const TEXT: &str = "text/plain; charset=utf-8";
    match (role, path) {
        (Role::Metrics, "/metrics") => {
            response(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, metrics.encode())
        }
        // kube-proxy's metrics server answers a plain "ok" here: it says the process serves.
        (Role::Metrics, "/healthz") => response(StatusCode::OK, TEXT, "ok".to_owned()),
        (Role::Health, "/healthz") => {
            let (code, body) = health_response(&health.status(SystemTime::now()), true);
            metrics.healthz_served(code.as_u16());
            response(code, JSON, body)
        }
        (Role::Health, "/livez") => {
            let (code, body) = health_response(&health.status(SystemTime::now()), false);
            metrics.livez_served(code.as_u16());
            response(code, JSON, body)
        }
        _ => response(
            StatusCode::NOT_FOUND,
            TEXT,
            "404 page not found\n".to_owned(),
        ),
    }
}

fn spawn_connection(
    stream: TcpStream,
    role: Role,
    metrics: &Arc<Metrics>,
    health: &HealthState,
    graceful: &GracefulShutdown,
) {
    let metrics = Arc::clone(metrics);
    let health = health.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let resp = handle(role, req.uri().path(), &metrics, &health);
        async move { Ok::<_, Infallible>(resp) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            // A client that hangs up or sends garbage is its problem, not the proxy's.
            tracing::debug!("{role:?} HTTP connection: {e}");
        }
    });
}

/// Binds kube-proxy's two listeners (metrics: `/metrics`, `/healthz`; health: `/healthz`,
/// `/livez`) and serves them until `shutdown` completes.
pub async fn serve(
    metrics_addr: SocketAddr,
    health_addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: HealthState,
    shutdown: impl Future,
) -> Result<(), HealthError> {
    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| HealthError::Bind { what, addr, source })
    };
    let metrics_listener = bind("metrics", metrics_addr).await?;
    let health_listener = bind("health", health_addr).await?;
    serve_listeners(metrics_listener, health_listener, metrics, health, shutdown).await;
    Ok(())
}

/// [`serve`] on listeners the caller bound (tests bind port 0 and read the addresses). On
/// shutdown it stops accepting, lets in-flight requests finish for a few seconds, and
/// returns.
pub async fn serve_listeners(
    metrics_listener: TcpListener,
    health_listener: TcpListener,
    metrics: Arc<Metrics>,
    health: HealthState,
    shutdown: impl Future,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (accepted, role) = tokio::select! {
            _ = &mut shutdown => break,
            r = metrics_listener.accept() => (r, Role::Metrics),
            r = health_listener.accept() => (r, Role::Health),
        };
        match accepted {
            Ok((stream, _peer)) => spawn_connection(stream, role, &metrics, &health, &graceful),
            Err(e) => {
                tracing::warn!("accepting {role:?} HTTP connection: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
    drop(metrics_listener);
    drop(health_listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("HTTP connections still open after {SHUTDOWN_GRACE:?}; closing them");
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn fresh_state_is_healthy() {
        let h = HealthState::default();
        let s = h.status(t(0));
        assert!(s.healthy && s.node_eligible && s.healthz_ok() && s.livez_ok());
        assert_eq!(s.last_updated, None);
    }

    #[test]
    fn queued_change_fails_only_after_the_timeout() {
        let h = HealthState::new(Duration::from_secs(30));
        h.queued(t(0));
        // Later changes do not restart the clock.
        h.queued(t(20));
        assert!(h.status(t(29)).healthy);
        let s = h.status(t(30));
        assert!(!s.healthy && !s.healthz_ok() && !s.livez_ok());

        h.programmed(t(31));
        let s = h.status(t(31));
        assert!(s.healthy);
        assert_eq!(s.last_updated, Some(t(31)));

        // A new queue starts a new clock.
        h.queued(t(40));
        assert!(h.status(t(69)).healthy);
        assert!(!h.status(t(70)).healthy);
        // A clock stepping back does not make it look older (or panic).
        assert!(h.status(t(10)).healthy);
    }

    #[test]
    fn clones_share_state() {
        let h = HealthState::new(Duration::from_secs(1));
        let c = h.clone();
        c.queued(t(0));
        assert!(!h.status(t(5)).healthy);
    }

    #[test]
    fn node_going_away_fails_healthz_not_livez() {
        let h = HealthState::default();
        h.node_state(true, false);
        let s = h.status(t(0));
        assert!(!s.healthz_ok() && s.livez_ok());
        h.node_state(false, true);
        assert!(!h.status(t(0)).healthz_ok());
        h.node_state(false, false);
        assert!(h.status(t(0)).healthz_ok());
    }

    #[test]
    fn bodies_mirror_kube_proxy() {
        let h = HealthState::default();
        let (code, body) = health_response(&h.status(t(0)), true);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:13:20Z","nodeEligible":true}"#
        );
        h.queued(t(0));
        let (code, body) = health_response(&h.status(t(100)), false);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            r#"{"lastUpdated":"0001-01-01T00:00:00Z","currentTime":"2023-11-14T22:15:00Z"}"#
        );
    }

    struct Reply {
        status: u16,
        content_type: String,
        body: String,
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("response in time")
            .expect("read");
        let raw = String::from_utf8(raw).expect("utf-8");
        let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let content_type = lines
            .filter_map(|l| l.split_once(": "))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.to_owned())
            .unwrap_or_default();
        Reply {
            status,
            content_type,
            body: body.to_owned(),
        }
    }

    #[tokio::test]
    async fn servers_answer_and_shut_down() {
        let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let ml = TcpListener::bind(localhost).await.expect("bind metrics");
        let hl = TcpListener::bind(localhost).await.expect("bind health");
        let (maddr, haddr) = (
            ml.local_addr().expect("addr"),
            hl.local_addr().expect("addr"),
        );
        let metrics = Arc::new(Metrics::new());
        let health = HealthState::new(Duration::from_secs(30));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_listeners(
            ml,
            hl,
            Arc::clone(&metrics),
            health.clone(),
            stopped,
        ));

        let r = get(haddr, "/healthz").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "application/json");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(v["nodeEligible"], serde_json::Value::Bool(true));
        assert!(v["lastUpdated"].is_string() && v["currentTime"].is_string());

        // Node being deleted: /healthz fails, /livez does not.
        health.node_state(true, false);
        let r = get(haddr, "/healthz").await;
        assert_eq!(r.status, 503);
        assert!(r.body.contains(r#""nodeEligible":false"#), "{}", r.body);
        let r = get(haddr, "/livez").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "application/json");
        assert!(!r.body.contains("nodeEligible"));

        // A change queued long ago and never programmed fails both.
        health.node_state(false, false);
        health.queued(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(get(haddr, "/healthz").await.status, 503);
        assert_eq!(get(haddr, "/livez").await.status, 503);
        health.programmed(SystemTime::now());
        assert_eq!(get(haddr, "/healthz").await.status, 200);

        assert_eq!(get(haddr, "/metrics").await.status, 404);
        assert_eq!(get(maddr, "/livez").await.status, 404);
        assert_eq!(get(maddr, "/healthz").await.body, "ok");

        let r = get(maddr, "/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(
            r.body
                .contains("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram")
        );
        assert!(
            r.body
                .contains("kubeproxy_proxy_healthz_total{code=\"503\"} 2")
        );
        assert!(
            r.body
                .contains("kubeproxy_proxy_livez_total{code=\"200\"} 1")
        );
        assert!(r.body.ends_with("# EOF\n"));

        stop.send(()).expect("server running");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server stops")
            .expect("server task");
        assert!(TcpStream::connect(haddr).await.is_err());
    }
}
