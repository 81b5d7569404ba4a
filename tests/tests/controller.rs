//! The controller following the API server, end to end: the stand-in API server runs in the
//! sandbox's node namespace, `svcproxy run --kubeconfig` watches it, and a client pod checks
//! through a ClusterIP that every change made through the API reaches the datapath (within
//! 1 s), and that an API-server outage neither breaks traffic nor loses a change. On the tc
//! hook (the one for pod veths). Needs root, bpffs and the built binary (`cargo xtask test`).

mod common;

use std::{
    collections::BTreeSet,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{Proxy, bpftool_dump, metric_value, scrape_metrics, try_scrape_metrics};
use serde_json::{Value, json};
use svcproxy_tests::{
    PodOptions, Sandbox,
    apiserver::{
        ApiServer, Endpoint, EndpointPort, Kind, ServicePort, endpoint_slice, node, service,
    },
    in_netns,
    sandbox::DEFAULT_ECHO_PORT,
    spawn_in_netns, tcp_request_here, udp_request_here,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// The node name the proxy runs as (`Proxy::start_kube`).
const NODE: &str = "node";
const HOOK: &str = "tc";
/// How soon a change made through the API must be visible in the datapath.
const VISIBLE_WITHIN: Duration = Duration::from_secs(1);
/// How long a proxy gets to start (load, attach, first list).
const STARTUP: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the API server is away in the outage test (the "dropped for 30 s").
const API_OUTAGE: Duration = Duration::from_secs(30);
/// For probing an address that is expected to be unanswered.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 11 + i)
}

/// A sandbox node with a client pod and backend pods, the stand-in API server in the node
/// namespace (it listens on the node's loopback, where the proxy can reach it), and the proxy
/// following it. Fields drop in order: the proxy stops before its namespace goes.
struct Cluster {
    proxy: Proxy,
    api: ApiServer,
    kubeconfig: PathBuf,
    sb: Sandbox,
}

impl Cluster {
    fn new(tag: &str, backends: &[(&str, PodOptions)]) -> Self {
        let mut sb = Sandbox::new(tag, NODE_IP).expect("sandbox");
        sb.add_pod("client", CLIENT).expect("client pod");
        for (i, (name, options)) in backends.iter().enumerate() {
            sb.add_pod_with(name, backend_ip(i as u8), options.clone())
                .unwrap_or_else(|e| panic!("pod {name}: {e:#}"));
        }
        // Threads started in a namespace stay in it, so the server's accept thread (which
        // also re-binds after an outage) listens in the node namespace.
        let api = in_netns(sb.node_netns(), ApiServer::start).expect("entering the node netns");
        api.apply(node(NODE, &[("topology.kubernetes.io/zone", "z1")]))
            .expect("apply Node");
        let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", sb.prefix()));
        api.kubeconfig(&kubeconfig).expect("write kubeconfig");
        let proxy = Proxy::start_kube(&sb, &kubeconfig, HOOK);
        Self {
            proxy,
            api,
            kubeconfig,
            sb,
        }
    }

    fn apply(&self, obj: Value) {
        self.api
            .apply(obj)
            .unwrap_or_else(|e| panic!("apply through the API: {e}"));
    }

    fn client_netns(&self) -> String {
        self.sb.pod("client").expect("client pod").netns.clone()
    }

    /// `n` new TCP connections from the client to `addr`: the names of the pods that answered,
    /// or the first error.
    fn sample(&self, addr: SocketAddrV4, n: usize) -> Result<BTreeSet<String>, io::Error> {
        self.sample_within(addr, n, REQUEST_TIMEOUT)
    }

    fn sample_within(
        &self,
        addr: SocketAddrV4,
        n: usize,
        timeout: Duration,
    ) -> Result<BTreeSet<String>, io::Error> {
        in_netns(&self.client_netns(), move || {
            let mut names = BTreeSet::new();
            for _ in 0..n {
                let out = tcp_request_here(addr, b"NAME\n", timeout)
                    .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
                names.insert(String::from_utf8_lossy(&out).trim().to_owned());
            }
            Ok(names)
        })
        .expect("entering the client netns")
    }

    /// Whether a connection to `addr` is refused at once (the proxy's reject for a Service
    /// without endpoints; an address nobody serves gives "no route" instead).
    fn refused(&self, addr: SocketAddrV4) -> bool {
        matches!(self.sample(addr, 1), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }

    /// Waits until `addr` is answered by exactly the pods `want` (or refused when `want` is
    /// empty), checking `samples` connections at a time. Returns how long it took; panics
    /// after `limit` with what was seen last.
    fn wait_for_pods(&self, addr: SocketAddrV4, want: &[&str], limit: Duration) -> Duration {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < limit {
            let ok = if want.is_empty() {
                let got = self.sample_within(addr, 1, PROBE_TIMEOUT);
                let ok = matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused);
                last = format!("{got:?}");
                ok
            } else {
                // 20 connections miss one of two equally likely backends with p = 2^-19.
                // A short timeout: a SYN sent before the change is dropped, and waiting for
                // TCP's 1 s retransmission would be measured as the proxy's delay.
                let got = self.sample_within(addr, 20, PROBE_TIMEOUT);
                let ok = got.as_ref().is_ok_and(|names| *names == want);
                last = format!("{got:?}");
                ok
            };
            if ok {
                return start.elapsed();
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{addr}: wanted {want:?} (empty: refused) within {limit:?}, last saw {last}; \
             datapath: {}",
            self.proxy.stats()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn web_service(name: &str, ip: Ipv4Addr) -> Value {
    service(
        "default",
        name,
        &ip.to_string(),
        &[ServicePort::tcp("http", 80, DEFAULT_ECHO_PORT)],
    )
}

/// The slice of Service `service` holding the pods `pods` (named `web-<i>`, at `backend_ip(i)`).
fn web_slice(service: &str, pods: &[usize]) -> Value {
    let endpoints: Vec<Endpoint> = pods
        .iter()
        .map(|&i| Endpoint::ready(&backend_ip(i as u8).to_string(), NODE))
        .collect();
    let mut slice = endpoint_slice(
        "default",
        &format!("{service}-abc12"),
        service,
        &endpoints,
        &[EndpointPort::tcp("http", DEFAULT_ECHO_PORT)],
    );
    // As the EndpointSlice controller stamps it: the start of network programming latency.
    slice["metadata"]["annotations"]["endpoints.kubernetes.io/last-change-trigger-time"] =
        json!(jiff::Timestamp::now().to_string());
    slice
}

fn web_pods(n: usize) -> Vec<(String, PodOptions)> {
    (0..n)
        .map(|i| (format!("web-{i}"), PodOptions::default()))
        .collect()
}

fn cluster_with_web_pods(tag: &str, n: usize) -> Cluster {
    let pods = web_pods(n);
    let pods: Vec<(&str, PodOptions)> = pods.iter().map(|(n, o)| (n.as_str(), o.clone())).collect();
    Cluster::new(tag, &pods)
}

fn assert_quick(what: &str, took: Duration) {
    assert!(
        took <= VISIBLE_WITHIN,
        "{what}: visible after {took:?}, more than {VISIBLE_WITHIN:?}"
    );
}

#[test]
fn endpoints_follow_the_api_server_from_zero_to_two_and_back() {
    let c = cluster_with_web_pods("kbasic", 2);
    let vip = SocketAddrV4::new(VIP, 80);
    c.apply(web_service("web", VIP));
    c.apply(web_slice("web", &[]));
    // The first state includes the proxy's start-up.
    c.wait_for_pods(vip, &[], STARTUP);

    let steps: [(&[usize], &[&str]); 4] = [
        (&[0], &["web-0"]),
        (&[0, 1], &["web-0", "web-1"]),
        (&[1], &["web-1"]),
        (&[], &[]),
    ];
    for (pods, names) in steps {
        let start = Instant::now();
        c.apply(web_slice("web", pods));
        c.wait_for_pods(vip, names, STARTUP);
        assert_quick(&format!("endpoints {names:?}"), start.elapsed());
    }
    assert!(c.refused(vip), "no endpoints: rejected");

    // What an operator's dashboards read of all that.
    let page = scrape_metrics(&c.sb);
    let value = |series: &str| {
        metric_value(&page, series).unwrap_or_else(|| panic!("no {series} in\n{page}"))
    };
    let programmed = value("kubeproxy_network_programming_duration_seconds_count");
    assert!(
        programmed >= 4.0,
        "each of the 4 stamped slice changes is one network-programming sample: {programmed}"
    );
    let mean = value("kubeproxy_network_programming_duration_seconds_sum") / programmed;
    assert!(mean < VISIBLE_WITHIN.as_secs_f64(), "mean latency {mean} s");
    assert!(value("kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 5.0);
    assert!(value("kubeproxy_sync_proxy_rules_service_changes_total") >= 1.0);
    assert_eq!(
        value("kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
        0.0
    );
    assert!(value("svcproxy_event_to_map_seconds_count") >= 5.0);
    let web = "{namespace=\"default\",name=\"web\",port=\"http\"}";
    let flows = value(&format!("svcproxy_service_new_flows_total{web}"));
    assert!(
        flows >= 20.0,
        "every probe connection is a new flow: {flows}"
    );
    assert!(value(&format!("svcproxy_service_packets_total{web}")) > flows);
    assert_eq!(value("svcproxy_map_entries{map=\"FRONTENDS4\"}"), 1.0);
    assert_eq!(value("svcproxy_map_entries{map=\"BACKENDS4\"}"), 0.0);
    assert_eq!(value("svcproxy_map_capacity{map=\"FRONTENDS4\"}"), 1024.0);
}

#[test]
fn external_and_load_balancer_ips_are_served_to_pods() {
    let c = cluster_with_web_pods("kextip", 2);
    let (external, lb, proxied) = (
        Ipv4Addr::new(203, 0, 113, 5),
        Ipv4Addr::new(198, 51, 100, 7),
        Ipv4Addr::new(198, 51, 100, 8),
    );
    let mut svc = web_service("web", VIP);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["externalIPs"] = json!([external.to_string()]);
    // Pods use every endpoint whatever the external policy (it is for outside traffic).
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    svc["status"] = json!({ "loadBalancer": { "ingress": [
        { "ip": lb.to_string(), "ipMode": "VIP" },
        { "ip": proxied.to_string(), "ipMode": "Proxy" },
    ] } });
    c.apply(svc);
    c.apply(web_slice("web", &[0, 1]));
    for ip in [VIP, external, lb] {
        c.wait_for_pods(SocketAddrV4::new(ip, 80), &["web-0", "web-1"], STARTUP);
    }
    // ipMode Proxy: the load balancer must get that traffic, so it is left alone (and here
    // nothing answers it).
    let probe = c.sample_within(SocketAddrV4::new(proxied, 80), 1, PROBE_TIMEOUT);
    assert!(
        probe
            .as_ref()
            .is_err_and(|e| e.kind() != io::ErrorKind::ConnectionRefused),
        "an ipMode Proxy address is not ours: {probe:?}"
    );
}

#[test]
fn session_affinity_switches_client_ip_to_none_and_back() {
    let c = cluster_with_web_pods("kaffinity", 3);
    let vip = SocketAddrV4::new(VIP, 80);
    let with_affinity = |affinity: &str| {
        let mut svc = web_service("web", VIP);
        svc["spec"]["sessionAffinity"] = json!(affinity);
        if affinity == "ClientIP" {
            svc["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 600}});
        }
        svc
    };
    let all = ["web-0", "web-1", "web-2"];
    c.apply(web_service("web", VIP));
    c.apply(web_slice("web", &[0, 1, 2]));
    c.wait_for_pods(vip, &all, STARTUP);

    // 30 connections from one client: with affinity one pod answers all of them.
    let pinned = |c: &Cluster| {
        let start = Instant::now();
        loop {
            let names = c.sample_within(vip, 30, REQUEST_TIMEOUT).expect("requests");
            if names.len() == 1 {
                return (names, start.elapsed());
            }
            assert!(
                start.elapsed() < STARTUP,
                "affinity never took hold: {names:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    };
    c.apply(with_affinity("ClientIP"));
    let (first, took) = pinned(&c);
    assert_quick("ClientIP affinity", took);

    // None: new connections spread again (30 connections miss one of 3 pods with p < 1e-5).
    let start = Instant::now();
    c.apply(with_affinity("None"));
    c.wait_for_pods(vip, &all, STARTUP);
    assert_quick("affinity None", start.elapsed());

    let start = Instant::now();
    c.apply(with_affinity("ClientIP"));
    let (second, _) = pinned(&c);
    assert_quick("ClientIP affinity again", start.elapsed());
    eprintln!("pinned to {first:?}, then after None and back to {second:?}");
}

#[test]
fn service_deleted_and_recreated_with_a_new_cluster_ip() {
    let c = cluster_with_web_pods("krecreate", 1);
    let (old, new) = (SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP2, 80));
    c.apply(web_service("web", VIP));
    c.apply(web_slice("web", &[0]));
    c.wait_for_pods(old, &["web-0"], STARTUP);

    let start = Instant::now();
    c.api
        .delete(Kind::Service, "default", "web")
        .expect("delete Service");
    // An unserved address is not answered at all, so each probe waits out a short timeout;
    // what counts is when the first unanswered probe was sent.
    let gone = loop {
        let sent = Instant::now();
        if c.sample_within(old, 1, PROBE_TIMEOUT).is_err() || sent > start + STARTUP {
            break sent - start;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert_quick("Service deleted", gone);
    // Gone, not rejected: nothing serves that address any more.
    let probe = c.sample_within(old, 1, PROBE_TIMEOUT);
    assert!(
        probe
            .as_ref()
            .is_err_and(|e| e.kind() != io::ErrorKind::ConnectionRefused),
        "a deleted Service is neither served nor rejected: {probe:?}"
    );

    // The same name again, as `kubectl replace --force` does: a new object with a new IP.
    let start = Instant::now();
    c.apply(web_service("web", VIP2));
    c.wait_for_pods(new, &["web-0"], STARTUP);
    assert_quick("recreated Service", start.elapsed());
    assert!(
        c.sample_within(old, 1, PROBE_TIMEOUT).is_err(),
        "the old ClusterIP must stay unserved"
    );
}

#[test]
fn multi_port_service_with_named_target_ports() {
    // Named target ports resolve per pod, so two pods may use different numbers for one name;
    // the EndpointSlice controller then puts them in two slices with their own ports.
    let a = PodOptions::default()
        .tcp_ports([8080, 9090])
        .udp_ports([5353]);
    let b = PodOptions::default()
        .tcp_ports([8081, 9091])
        .udp_ports([5354]);
    let c = Cluster::new("kports", &[("web-0", a), ("web-1", b)]);
    let target = |name: &str| json!(name);
    let mut svc = service(
        "default",
        "multi",
        &VIP.to_string(),
        &[
            ServicePort::tcp("http", 80, 1),
            ServicePort::tcp("admin", 81, 1),
            ServicePort::udp("dns", 53, 1),
        ],
    );
    // targetPort by name (the builder writes numbers).
    for (port, name) in svc["spec"]["ports"]
        .as_array_mut()
        .expect("ports")
        .iter_mut()
        .zip(["web", "adm", "dns"])
    {
        port["targetPort"] = target(name);
    }
    c.apply(svc);
    for (i, (http, admin, dns)) in [(8080, 9090, 5353), (8081, 9091, 5354)]
        .into_iter()
        .enumerate()
    {
        // Slice ports in another order than the Service's: pairing is by name only.
        c.apply(endpoint_slice(
            "default",
            &format!("multi-{i}"),
            "multi",
            &[Endpoint::ready(&backend_ip(i as u8).to_string(), NODE)],
            &[
                EndpointPort::udp("dns", dns),
                EndpointPort::tcp("admin", admin),
                EndpointPort::tcp("http", http),
            ],
        ));
    }
    c.wait_for_pods(SocketAddrV4::new(VIP, 80), &["web-0", "web-1"], STARTUP);
    c.wait_for_pods(SocketAddrV4::new(VIP, 81), &["web-0", "web-1"], STARTUP);
    let dns = in_netns(&c.client_netns(), || {
        let mut names = BTreeSet::new();
        for _ in 0..20 {
            match udp_request_here(SocketAddrV4::new(VIP, 53), b"NAME", REQUEST_TIMEOUT) {
                Ok((reply, _)) => {
                    let text = String::from_utf8_lossy(&reply).into_owned();
                    names.insert(text.split(' ').next().unwrap_or_default().to_owned());
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(names)
    })
    .expect("entering the client netns");
    assert_eq!(
        dns,
        Ok(BTreeSet::from(["web-0".to_owned(), "web-1".to_owned()])),
        "UDP port 53 reaches both pods on their own `dns` port"
    );
    // A port the Service does not declare is not translated.
    assert!(
        c.sample_within(SocketAddrV4::new(VIP, 8080), 1, PROBE_TIMEOUT)
            .is_err(),
        "undeclared port answered"
    );
}

/// New TCP connections through `addr` from `netns`, back to back until `stop`: the pods that
/// answered in order, and every failure.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<(Vec<String>, Vec<String>)>,
}

impl Traffic {
    fn start(netns: &str, addr: SocketAddrV4) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = spawn_in_netns(netns, move || {
            let (mut names, mut failures) = (Vec::new(), Vec::new());
            while !flag.load(Ordering::Relaxed) {
                match tcp_request_here(addr, b"NAME\n", REQUEST_TIMEOUT) {
                    Ok(out) => names.push(String::from_utf8_lossy(&out).trim().to_owned()),
                    Err(e) => failures.push(e.to_string()),
                }
                thread::sleep(Duration::from_millis(5));
            }
            (names, failures)
        })
        .expect("entering the client netns");
        Self { stop, thread }
    }

    fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("traffic thread")
    }
}

#[test]
fn api_server_outage_keeps_traffic_flowing_and_a_change_made_during_it_lands_after() {
    let c = cluster_with_web_pods("koutage", 3);
    let vip = SocketAddrV4::new(VIP, 80);
    c.apply(web_service("web", VIP));
    c.apply(web_slice("web", &[0, 1]));
    c.wait_for_pods(vip, &["web-0", "web-1"], STARTUP);

    let traffic = Traffic::start(&c.client_netns(), vip);
    thread::sleep(Duration::from_millis(500));
    c.api.begin_outage().expect("begin outage");
    let outage = Instant::now();
    thread::sleep(Duration::from_secs(1));
    // Made while the proxy cannot see it.
    c.apply(web_slice("web", &[0, 1, 2]));
    thread::sleep(API_OUTAGE - Duration::from_secs(1));
    c.api.end_outage().expect("end outage");
    let outage = outage.elapsed();

    // The watchers retry with backoff (0.8 s doubling to 30 s, jittered), relist or resume,
    // and the change applies: web-2 starts answering. After 30 s of failures the next retry
    // can be up to one full backoff step away.
    let start = Instant::now();
    let limit = Duration::from_secs(60);
    let mut seen = false;
    while !seen && start.elapsed() < limit {
        seen = c.sample(vip, 20).is_ok_and(|names| names.contains("web-2"));
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(500));
    let (names, failures) = traffic.finish();
    assert!(
        seen,
        "the change made during the outage was not applied within {limit:?} after it; datapath: {}",
        c.proxy.stats()
    );
    assert!(
        failures.is_empty(),
        "{} of {} connections failed around the {outage:?} outage, first: {:?}",
        failures.len(),
        failures.len() + names.len(),
        failures.first()
    );
    assert!(
        names.len() > 100,
        "too little traffic to tell: {} connections",
        names.len()
    );
    eprintln!(
        "outage {outage:?}: {} connections, none failed; change applied {:?} after it",
        names.len(),
        start.elapsed()
    );
}

#[test]
fn restart_while_the_api_server_is_down_keeps_serving_from_the_pinned_maps() {
    let mut c = cluster_with_web_pods("krestart", 2);
    let vip = SocketAddrV4::new(VIP, 80);
    c.apply(web_service("web", VIP));
    c.apply(web_slice("web", &[0]));
    c.wait_for_pods(vip, &["web-0"], STARTUP);

    c.api.begin_outage().expect("begin outage");
    let Cluster { proxy, sb, .. } = &mut c;
    proxy.restart(sb);
    // The new process adopts the pinned maps and attaches; with no API server it never gets a
    // first list, so it writes nothing and the Service keeps its backend.
    c.wait_for_pods(vip, &["web-0"], STARTUP);
    thread::sleep(Duration::from_secs(2));
    c.wait_for_pods(vip, &["web-0"], Duration::from_secs(1));

    c.apply(web_slice("web", &[1]));
    c.api.end_outage().expect("end outage");
    c.wait_for_pods(vip, &["web-1"], Duration::from_secs(30));
}

/// A TCP stream and a UDP stream through the Service, each on one connection / socket, until
/// stopped: what a crash of the proxy must not interrupt.
struct Streams {
    stop: Arc<AtomicBool>,
    tcp: thread::JoinHandle<TcpOutcome>,
    udp: thread::JoinHandle<UdpOutcome>,
}

/// Bytes sent and bytes the pod read, or how the stream broke.
type TcpOutcome = Result<(u64, u64), String>;
/// The pods that answered, datagrams answered, and each unanswered one.
type UdpOutcome = (BTreeSet<String>, u64, Vec<String>);

impl Streams {
    const CHUNK: [u8; 1000] = [b'x'; 1000];
    const PACE: Duration = Duration::from_millis(10);

    fn start(netns: &str, tcp: SocketAddrV4, udp: SocketAddrV4) -> Self {
        use std::{
            io::Write as _,
            net::{TcpStream, UdpSocket},
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // SINK: the pod counts what it read and reports it when we close our side.
        let tcp = spawn_in_netns(netns, move || {
            let mut conn = TcpStream::connect_timeout(&tcp.into(), REQUEST_TIMEOUT)
                .map_err(|e| format!("connect: {e}"))?;
            conn.write_all(b"SINK\n")
                .map_err(|e| format!("SINK: {e}"))?;
            let mut sent = 0u64;
            while !flag.load(Ordering::Relaxed) {
                conn.write_all(&Self::CHUNK)
                    .map_err(|e| format!("after {sent} bytes: {e}"))?;
                sent += Self::CHUNK.len() as u64;
                thread::sleep(Self::PACE);
            }
            conn.shutdown(std::net::Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            let mut reply = String::new();
            std::io::Read::read_to_string(&mut conn, &mut reply)
                .map_err(|e| format!("reading the count: {e}"))?;
            let got = reply
                .trim()
                .parse()
                .map_err(|e| format!("count {reply:?}: {e}"))?;
            Ok((sent, got))
        })
        .expect("entering the client netns");
        let flag = stop.clone();
        // One connected socket, one datagram per pace, each answered by `<pod> <len>`.
        let udp = spawn_in_netns(netns, move || {
            let (mut names, mut answered, mut failures) = (BTreeSet::new(), 0, Vec::new());
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
            socket.connect(udp).expect("connect");
            socket
                .set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            let mut buf = [0u8; 256];
            let mut seq = 0u64;
            while !flag.load(Ordering::Relaxed) {
                seq += 1;
                let sent = socket.send(format!("ping {seq}").as_bytes());
                match sent.and_then(|_| socket.recv(&mut buf)) {
                    Ok(n) => {
                        answered += 1;
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        names.insert(text.split(' ').next().unwrap_or_default().to_owned());
                    }
                    Err(e) => failures.push(format!("datagram {seq}: {e}")),
                }
                thread::sleep(Self::PACE);
            }
            (names, answered, failures)
        })
        .expect("entering the client netns");
        Self { stop, tcp, udp }
    }

    fn finish(self) -> (TcpOutcome, UdpOutcome) {
        self.stop.store(true, Ordering::Relaxed);
        (
            self.tcp.join().expect("TCP stream thread"),
            self.udp.join().expect("UDP stream thread"),
        )
    }
}

#[test]
fn sigkill_and_restart_interrupt_no_stream_and_rewrite_nothing() {
    let mut c = cluster_with_web_pods("kkill", 2);
    let (tcp, udp) = (SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP, 53));
    c.apply(service(
        "default",
        "web",
        &VIP.to_string(),
        &[
            ServicePort::tcp("http", 80, DEFAULT_ECHO_PORT),
            ServicePort::udp("dns", 53, DEFAULT_ECHO_PORT),
        ],
    ));
    c.apply(endpoint_slice(
        "default",
        "web-abc12",
        "web",
        &[0u8, 1].map(|i| Endpoint::ready(&backend_ip(i).to_string(), NODE)),
        &[
            EndpointPort::tcp("http", DEFAULT_ECHO_PORT),
            EndpointPort::udp("dns", DEFAULT_ECHO_PORT),
        ],
    ));
    c.wait_for_pods(tcp, &["web-0", "web-1"], STARTUP);

    let streams = Streams::start(&c.client_netns(), tcp, udp);
    thread::sleep(Duration::from_secs(1));
    let maps = ["FRONTENDS4", "SLOTS", "BACKENDS4", "REPLY_FILTER"];
    let dump = |c: &Cluster| maps.map(|m| bpftool_dump(c.proxy.pin_dir(), m));
    let before = dump(&c);

    let Cluster { proxy, sb, .. } = &mut c;
    proxy.kill_and_restart(sb);
    // The new process is back once its first sync is done.
    let start = Instant::now();
    let page = loop {
        let page = try_scrape_metrics(&c.sb).unwrap_or_default();
        if metric_value(&page, "kubeproxy_sync_proxy_rules_last_timestamp_seconds")
            .is_some_and(|t| t > 0.0)
        {
            break page;
        }
        assert!(
            start.elapsed() < STARTUP,
            "the restarted svcproxy never synced"
        );
        thread::sleep(Duration::from_millis(100));
    };
    eprintln!("restarted and synced in {:?}", start.elapsed());
    thread::sleep(Duration::from_secs(1));
    let after = dump(&c);
    let ((tcp_result, (names, answered, failures)), proxy_stats) =
        (streams.finish(), c.proxy.stats());

    for ((map, before), after) in maps.iter().zip(&before).zip(&after) {
        assert_eq!(
            before, after,
            "{map} changed across the restart though nothing else did"
        );
    }
    let synced = |result: &str| {
        metric_value(
            &page,
            &format!("svcproxy_sync_frontends_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(synced("written"), Some(0.0), "rewrote frontends:\n{page}");
    assert_eq!(synced("removed"), Some(0.0), "removed frontends:\n{page}");
    assert_eq!(
        synced("unchanged"),
        Some(2.0),
        "both frontends adopted as they were"
    );

    let (sent, got) = tcp_result.unwrap_or_else(|e| panic!("TCP stream broke: {e}"));
    assert_eq!(
        sent, got,
        "the pod read {got} of {sent} bytes; datapath: {proxy_stats}"
    );
    assert!(
        failures.is_empty(),
        "{} of {} datagrams unanswered, first: {:?}; datapath: {proxy_stats}",
        failures.len(),
        failures.len() as u64 + answered,
        failures.first()
    );
    assert_eq!(names.len(), 1, "the UDP flow kept its backend: {names:?}");
    eprintln!("TCP stream: {sent} bytes; UDP: {answered} datagrams answered by {names:?}");
}

/// The API-server source on its own, in process (no namespaces, no root): ready only after
/// every initial list, a notification per change, kube-proxy's selectors, nothing notified
/// while the server is away, and the change made meanwhile delivered after it.
#[tokio::test]
async fn kube_source_lists_selects_and_notifies() {
    use svcproxy::source::kube::{KubeOptions, SERVICE_SELECTOR, start};
    use tokio_util::sync::CancellationToken;

    async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(limit, fut)
            .await
            .unwrap_or_else(|_| panic!("{what} within {limit:?}"))
    }
    let names = |state: &svcproxy::source::ClusterState| -> Vec<String> {
        state
            .services
            .iter()
            .filter_map(|s| s.name.clone())
            .collect()
    };

    let api = ApiServer::start();
    let kubeconfig = std::env::temp_dir().join(format!(
        "svcproxy-kube-source-{}.kubeconfig",
        std::process::id()
    ));
    api.kubeconfig(&kubeconfig).expect("write kubeconfig");
    api.apply(web_service("web", VIP)).expect("apply");
    let mut other = web_service("other-proxy", VIP2);
    other["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("other");
    api.apply(other).expect("apply");
    api.apply(web_slice("web", &[0])).expect("apply");

    let shutdown = CancellationToken::new();
    let opts = KubeOptions {
        kubeconfig: Some(kubeconfig.clone()),
        node_name: NODE.into(),
    };
    let mut store = start(&opts, shutdown.clone()).await.expect("kube source");
    within("ready", Duration::from_secs(5), store.ready()).await;
    let state = store.snapshot();
    assert_eq!(
        names(&state),
        ["web"],
        "a Service of another proxy is not listed"
    );
    assert_eq!(state.slices.len(), 1);
    assert_eq!(state.node, None, "the Node does not exist yet");
    let services: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/services")
        .collect();
    assert!(
        !services.is_empty()
            && services
                .iter()
                .all(|r| r.param("labelSelector") == Some(SERVICE_SELECTOR)),
        "every Service request carries kube-proxy's selector: {services:?}"
    );

    api.apply(node(NODE, &[("topology.kubernetes.io/zone", "z1")]))
        .expect("apply Node");
    api.apply(node("elsewhere", &[("topology.kubernetes.io/zone", "z9")]))
        .expect("apply Node");
    within("the Node", Duration::from_secs(5), async {
        loop {
            store.changed().await;
            if store.snapshot().node.is_some() {
                break;
            }
        }
    })
    .await;
    let state = store.snapshot();
    assert_eq!(state.node_info(NODE).zone.as_deref(), Some("z1"));

    api.begin_outage().expect("begin outage");
    // Errors only: nothing changed, so nothing is notified (and nothing would be written).
    let quiet = tokio::time::timeout(Duration::from_secs(2), store.changed()).await;
    assert!(quiet.is_err(), "no notification while the server is away");
    api.apply(web_service("late", VIP2)).expect("apply");
    api.end_outage().expect("end outage");
    within(
        "the change made during the outage",
        Duration::from_secs(30),
        async {
            loop {
                store.changed().await;
                if names(&store.snapshot()).contains(&"late".to_owned()) {
                    break;
                }
            }
        },
    )
    .await;

    shutdown.cancel();
    within(
        "the watches to stop",
        Duration::from_secs(5),
        store.stopped(),
    )
    .await;
    let _ = std::fs::remove_file(&kubeconfig);
}
