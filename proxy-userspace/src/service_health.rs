//! Health-check node ports: for each LoadBalancer Service with `externalTrafficPolicy: Local`,
//! an HTTP server on its `healthCheckNodePort` that tells the cloud load balancer whether this
//! node has local endpoints, so it sends traffic only to nodes that can serve it without a hop.
//!
//! Same answers as kube-proxy's (pkg/proxy/healthcheck/service_health.go): any path; 200 when
//! the node has at least one local ready endpoint and the proxy is healthy, else 503; a JSON
//! body naming the Service with `localEndpoints` and `serviceProxyHealthy`; the count also in
//! `X-Load-Balancing-Endpoint-Weight`. Local endpoints that are only terminating count 0: the
//! load balancer must drain this node while they finish.
//!
//! Servers are opened and closed as Services come and go; a count change only updates the
//! state the running server reads. A port that cannot be bound (something else holds it) is
//! logged and retried at every sync, as kube-proxy does, without affecting the others.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderName, HeaderValue, X_CONTENT_TYPE_OPTIONS},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{desired::ServiceName, health::HealthState};

/// kube-proxy's header with the local endpoint count (a weight for load balancers that use it).
const WEIGHT_HEADER: HeaderName = HeaderName::from_static("x-load-balancing-endpoint-weight");
/// A client gets this long to send its request headers.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One health-check node port to serve: what the planner derives from a Service and the
/// EndpointSlices on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub service: ServiceName,
    /// Endpoints on this node that are ready (not merely serving while terminating).
    pub local_endpoints: usize,
}

/// What a server answers from: updated in place when the count changes.
#[derive(Debug)]
struct Entry {
    service: ServiceName,
    local_endpoints: usize,
}

struct Server {
    entry: Arc<Mutex<Entry>>,
    stop: CancellationToken,
}

/// The health-check servers of this node, kept equal to the wanted set by [`sync`](Self::sync).
pub struct ServiceHealthServers {
    /// The address the servers listen on (kube-proxy: every address, unless restricted by
    /// `--nodeport-addresses`).
    listen: Ipv4Addr,
    health: HealthState,
    servers: BTreeMap<u16, Server>,
}

impl ServiceHealthServers {
    pub fn new(listen: Ipv4Addr, health: HealthState) -> Self {
        Self {
            listen,
            health,
            servers: BTreeMap::new(),
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }

    /// Opens servers for new ports, updates counts, and closes servers no longer wanted.
    /// Returns the ports that could not be opened (they are tried again on the next call).
    /// Needs a tokio runtime.
    pub fn sync(&mut self, wanted: &[HealthCheck]) -> Vec<(u16, std::io::Error)> {
        let wanted_ports: BTreeMap<u16, &HealthCheck> =
            wanted.iter().map(|h| (h.port, h)).collect();
        self.servers.retain(|port, server| {
            let keep = wanted_ports.contains_key(port);
            if !keep {
                server.stop.cancel();
                tracing::info!(port, "closed health-check node port");
            }
            keep
        });
        let mut failed = Vec::new();
        for (&port, check) in &wanted_ports {
            if let Some(server) = self.servers.get(&port) {
                let mut entry = server.entry.lock().unwrap_or_else(PoisonError::into_inner);
                entry.service.clone_from(&check.service);
                entry.local_endpoints = check.local_endpoints;
                continue;
            }
            match self.open(check) {
                Ok(server) => {
                    tracing::info!(port, service = %check.service, "opened health-check node port");
                    self.servers.insert(port, server);
                }
                Err(e) => {
                    tracing::warn!(
                        port,
                        service = %check.service,
                        "cannot open the health-check node port: {e}; retrying at the next sync"
                    );
                    failed.push((port, e));
                }
            }
        }
        failed
    }

    fn open(&self, check: &HealthCheck) -> std::io::Result<Server> {
        let addr = SocketAddr::V4(SocketAddrV4::new(self.listen, check.port));
        // Bound here, synchronously, so a taken port is reported by this sync.
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let entry = Arc::new(Mutex::new(Entry {
            service: check.service.clone(),
            local_endpoints: check.local_endpoints,
        }));
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            Arc::clone(&entry),
            self.health.clone(),
            stop.clone(),
        ));
        Ok(Server { entry, stop })
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.stop.cancel();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    entry: Arc<Mutex<Entry>>,
    health: HealthState,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!("accepting a health-check connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (entry, health) = (Arc::clone(&entry), health.clone());
        let service = service_fn(move |_req: Request<Incoming>| {
            let resp = answer(&entry, &health);
            async move { Ok::<_, Infallible>(resp) }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                result = conn => if let Err(e) = result {
                    tracing::debug!("health-check HTTP connection: {e}");
                }
            }
        });
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: BodyService<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct BodyService<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// Status and body for the current state (kube-proxy's `hcHandler.ServeHTTP`).
fn respond(
    service: &ServiceName,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> (StatusCode, String) {
    let code = if local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Body {
        service: BodyService {
            namespace: &service.namespace,
            name: &service.name,
        },
        local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    // Strings, a number and a bool always serialize; an empty object is still valid JSON.
    (
        code,
        serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_owned()),
    )
}

fn answer(entry: &Mutex<Entry>, health: &HealthState) -> Response<Full<Bytes>> {
    let (service, count) = {
        let e = entry.lock().unwrap_or_else(PoisonError::into_inner);
        (e.service.clone(), e.local_endpoints)
    };
    // kube-proxy's "serviceProxyHealthy" is its sync health, not the node's eligibility.
    let healthy = health.status(SystemTime::now()).healthy;
    let (code, body) = respond(&service, count, healthy);
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(WEIGHT_HEADER, HeaderValue::from(count));
    resp
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn svc(name: &str) -> ServiceName {
        ServiceName {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn answers_200_only_with_local_endpoints_and_a_healthy_proxy() {
        let (code, body) = respond(&svc("web"), 2, true);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        assert_eq!(
            respond(&svc("web"), 0, true).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let (code, body) = respond(&svc("web"), 3, false);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(r#""serviceProxyHealthy":false"#), "{body}");
    }

    /// A raw HTTP/1.0 GET; the whole response.
    async fn get(port: u16) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        s.write_all(b"GET /anything HTTP/1.0\r\n\r\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    #[tokio::test]
    async fn servers_open_update_and_close_with_the_wanted_set() {
        let health = HealthState::default();
        let mut servers = ServiceHealthServers::new(Ipv4Addr::LOCALHOST, health.clone());
        let (p1, p2) = (free_port(), free_port());
        let check = |port, name, n| HealthCheck {
            port,
            service: svc(name),
            local_endpoints: n,
        };
        assert!(
            servers
                .sync(&[check(p1, "a", 1), check(p2, "b", 0)])
                .is_empty()
        );
        let a = get(p1).await.expect("a answers");
        assert!(a.starts_with("HTTP/1.0 200"), "{a}");
        assert!(a.contains("x-load-balancing-endpoint-weight: 1"), "{a}");
        assert!(a.contains(r#""localEndpoints":1"#), "{a}");
        let b = get(p2).await.expect("b answers");
        assert!(b.starts_with("HTTP/1.0 503"), "{b}");

        // The count changes in place: the same port, the new answer.
        assert!(
            servers
                .sync(&[check(p1, "a", 0), check(p2, "b", 4)])
                .is_empty()
        );
        assert!(get(p1).await.unwrap().starts_with("HTTP/1.0 503"));
        assert!(get(p2).await.unwrap().starts_with("HTTP/1.0 200"));

        // A stalled sync makes the proxy unhealthy: 503 whatever the count.
        let slow = HealthState::new(Duration::ZERO);
        slow.queued(SystemTime::now() - Duration::from_secs(1));
        let mut unhealthy = ServiceHealthServers::new(Ipv4Addr::LOCALHOST, slow);
        let p3 = free_port();
        assert!(unhealthy.sync(&[check(p3, "c", 5)]).is_empty());
        let c = get(p3).await.unwrap();
        assert!(c.starts_with("HTTP/1.0 503") && c.contains(r#""serviceProxyHealthy":false"#));

        // Removed: the port closes.
        assert!(servers.sync(&[check(p2, "b", 4)]).is_empty());
        assert_eq!(servers.ports(), vec![p2]);
        let mut closed = false;
        for _ in 0..50 {
            if get(p1).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "port {p1} still answers after its Service went");
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_and_retried_without_affecting_others() {
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let other = free_port();
        let mut servers = ServiceHealthServers::new(Ipv4Addr::LOCALHOST, HealthState::default());
        let wanted = [
            HealthCheck {
                port,
                service: svc("a"),
                local_endpoints: 1,
            },
            HealthCheck {
                port: other,
                service: svc("b"),
                local_endpoints: 1,
            },
        ];
        let failed = servers.sync(&wanted);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, port);
        assert_eq!(servers.ports(), vec![other]);
        drop(taken);
        assert!(
            servers.sync(&wanted).is_empty(),
            "retried once the port is free"
        );
        assert!(get(port).await.unwrap().starts_with("HTTP/1.0 200"));
    }
}
