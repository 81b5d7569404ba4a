//! End to end through real network namespaces, the datapath behaviours a client's socket can
//! see: rejection of Services without endpoints, fragmented datagrams, ICMP errors from the
//! path, session affinity and Maglev. Each scenario runs the `svcproxy` binary on both hooks.
//! Needs root, bpffs and the built binary (`cargo xtask test` provides all three).

mod common;

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use common::{Endpoint, Manifests, Proxy, SvcPort};
use serde_json::json;
use svcproxy_tests::{
    PodOptions, Sandbox, bulk_pattern, in_netns,
    sandbox::DEFAULT_ECHO_PORT,
    sockopt::{
        SO_EE_ORIGIN_ICMP, path_mtu, read_queued_error, set_pmtu_discovery, set_recv_errors,
        set_reset_on_close, tcp_connect_from,
    },
    tcp_request_here, udp_request_here,
};

const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const TIMEOUT: Duration = Duration::from_secs(2);
/// How soon a manifest change must show in the datapath (svcproxy re-reads within ~200 ms).
const CONVERGE: Duration = Duration::from_secs(2);

/// Every scenario, once per hook: `scenario::tc` and `scenario::xdp`.
macro_rules! on_both_hooks {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn tc() {
                super::$scenario("tc");
            }

            #[test]
            fn xdp() {
                super::$scenario("xdp");
            }
        }
    )*};
}

on_both_hooks!(
    no_endpoint_service_is_refused_within_100ms,
    udp_datagram_of_2000_bytes_crosses_a_clusterip,
    icmp_frag_needed_from_the_path_reaches_the_client,
    session_affinity_keeps_a_client_on_one_backend,
    maglev_spreads_and_is_stable,
);

/// TCP and UDP on `port`, both to the echo servers' port.
fn tcp_udp(port: u16) -> Vec<SvcPort> {
    vec![
        SvcPort::new("tcp", port, "TCP", DEFAULT_ECHO_PORT),
        SvcPort::new("udp", port, "UDP", DEFAULT_ECHO_PORT),
    ]
}

fn endpoints(pods: &[(&str, Ipv4Addr)]) -> Vec<Endpoint> {
    pods.iter()
        .map(|(name, ip)| Endpoint::ready(*ip, name))
        .collect()
}

/// A sandbox tagged with the scenario and hook (so `ip netns list` tells who made what) and a
/// client pod.
fn sandbox(tag: &str, hook: &str) -> Sandbox {
    let mut sb = Sandbox::new(&format!("{tag}{hook}"), NODE).expect("sandbox");
    sb.add_pod("client", CLIENT).expect("client pod");
    sb
}

fn client_netns(sb: &Sandbox) -> String {
    sb.pod("client").expect("client pod").netns.clone()
}

/// The pod that answered a UDP echo (`"<podname> <length>"`).
fn udp_pod(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply)
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// One new TCP connection (fresh source port) asking who answers.
fn tcp_name_here(vip: SocketAddrV4) -> String {
    let out = tcp_request_here(vip, b"NAME\n", TIMEOUT)
        .unwrap_or_else(|e| panic!("TCP NAME request to {vip}: {e}"));
    String::from_utf8_lossy(&out).trim().to_owned()
}

/// `n` new TCP connections from the client, counting the pods that answered.
fn tcp_spread(sb: &Sandbox, vip: SocketAddrV4, n: usize) -> BTreeMap<String, usize> {
    in_netns(&client_netns(sb), move || {
        let mut hits = BTreeMap::new();
        for _ in 0..n {
            *hits.entry(tcp_name_here(vip)).or_insert(0) += 1;
        }
        hits
    })
    .expect("client namespace")
}

// ---------------------------------------------------------------------------------------------
// 1. No endpoints: refused at once.

/// A Service whose EndpointSlice lists no endpoints, and one without any slice, must be
/// refused actively (TCP RST, ICMP port unreachable from the ClusterIP) so clients fail at once
/// rather than after a connect or read timeout.
fn no_endpoint_service_is_refused_within_100ms(hook: &str) {
    const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
    const NO_SLICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
    /// Generous for a reply built in the kernel on the first hop, and far below any timeout.
    const LIMIT: Duration = Duration::from_millis(100);

    let mut sb = sandbox("rej", hook);
    let web0 = sb
        .add_pod("web-0", Ipv4Addr::new(10, 244, 0, 11))
        .expect("backend pod");
    let manifests = Manifests::new();
    manifests.service("default", "web", WEB, &tcp_udp(80));
    manifests.slice(
        "default",
        "web",
        &endpoints(&[("web-0", web0.ip)]),
        &tcp_udp(80),
    );
    manifests.service("default", "empty", EMPTY, &tcp_udp(80));
    manifests.slice("default", "empty", &[], &tcp_udp(80));
    manifests.service("default", "noslice", NO_SLICE, &tcp_udp(80));
    let proxy = Proxy::start(&sb, manifests.dir(), hook);
    proxy.wait_until_serving(&sb, "client", SocketAddrV4::new(WEB, 80));

    for (what, vip) in [
        ("an empty EndpointSlice", EMPTY),
        ("no EndpointSlice", NO_SLICE),
    ] {
        let addr = SocketAddrV4::new(vip, 80);
        let (settled, tcp, udp) = in_netns(&client_netns(&sb), move || {
            // Not measured: the frontend may be programmed a moment after the web Service.
            // Without it the node answers "network unreachable", not "refused".
            let settled = refused_soon(addr);
            (
                settled,
                attempts(|| tcp_refusal(addr)),
                attempts(|| udp_refusal(addr)),
            )
        })
        .expect("client namespace");
        if let Err(e) = settled {
            panic!(
                "{hook}: TCP to {addr} ({what}) never refused within 10 s, last error: {e}; \
                 datapath counters: {} (reject_no_backend counts rejects built and sent back; \
                 if it grows while the client times out, they are lost on the way back)",
                proxy.stats()
            );
        }
        for (proto, results) in [("TCP connect", &tcp), ("UDP send+recv", &udp)] {
            let mut best = Duration::MAX;
            for (i, r) in results.iter().enumerate() {
                match r {
                    Ok(t) => best = best.min(*t),
                    Err(e) => panic!(
                        "{hook}: {proto} to {addr} ({what}), attempt {}: want ECONNREFUSED, got {e}; \
                         datapath counters: {}",
                        i + 1,
                        proxy.stats()
                    ),
                }
            }
            assert!(
                best < LIMIT,
                "{hook}: {proto} to {addr} ({what}) was refused, but the fastest of 3 attempts \
                 took {best:?} (limit {LIMIT:?}): {results:?}"
            );
        }
    }
    proxy.stop();
}

/// Retries a TCP connect until it is refused (the frontend is in place), for up to 10 s.
fn refused_soon(addr: SocketAddrV4) -> Result<(), io::Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(()),
            Ok(_) => return Err(io::Error::other("connection accepted")),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Three tries of `f`, all reported: the best time filters out scheduler noise, and every
/// try must be a refusal.
fn attempts(f: impl Fn() -> Result<Duration, String>) -> Vec<Result<Duration, String>> {
    (0..3).map(|_| f()).collect()
}

/// How long a TCP connect to `addr` takes to be refused.
fn tcp_refusal(addr: SocketAddrV4) -> Result<Duration, String> {
    let start = Instant::now();
    match TcpStream::connect_timeout(&addr.into(), TIMEOUT) {
        Ok(_) => Err("the connection was accepted".into()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(start.elapsed()),
        Err(e) => Err(format!("{e} ({:?}) after {:?}", e.kind(), start.elapsed())),
    }
}

/// How long a connected UDP socket takes to see ECONNREFUSED for a datagram to `addr`, having
/// checked that the ICMP error behind it was a port unreachable sent by `addr`'s IP (the
/// ClusterIP, not a backend or the node).
fn udp_refusal(addr: SocketAddrV4) -> Result<Duration, String> {
    let sock =
        UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
    sock.connect(addr).map_err(|e| format!("connect: {e}"))?;
    set_recv_errors(&sock).map_err(|e| format!("IP_RECVERR: {e}"))?;
    sock.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let start = Instant::now();
    sock.send(b"hello").map_err(|e| format!("send: {e}"))?;
    let elapsed = match sock.recv(&mut buf) {
        Ok(n) => {
            return Err(format!(
                "got a reply {:?}",
                String::from_utf8_lossy(&buf[..n])
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => start.elapsed(),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(format!(
                "no reply and no error within {TIMEOUT:?} (dropped, not rejected)"
            ));
        }
        Err(e) => return Err(format!("{e} ({:?})", e.kind())),
    };
    match read_queued_error(&sock) {
        Ok(Some(q))
            if q.origin == SO_EE_ORIGIN_ICMP
                && (q.icmp_type, q.icmp_code) == (3, 3)
                && q.offender == Some(*addr.ip()) =>
        {
            Ok(elapsed)
        }
        Ok(Some(q)) => Err(format!(
            "refused, but not by an ICMP port unreachable from {}: {q:?}",
            addr.ip()
        )),
        Ok(None) => Err("refused, but no ICMP error was queued".into()),
        Err(e) => Err(format!("reading the error queue: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Fragmented datagrams.

/// A UDP server answering `BIG <n>` with `n` bytes of [`bulk_pattern`], which the standard echo
/// servers cannot do (their UDP reply is always `"<podname> <length>"`). Stops on drop.
struct BigReplyServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BigReplyServer {
    fn start(netns: &str, port: u16) -> Self {
        let sock = in_netns(netns, move || {
            UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        })
        .expect("pod namespace")
        .unwrap_or_else(|e| panic!("bind UDP {port} in {netns}: {e}"));
        // Wake up now and then to look at the stop flag.
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::SeqCst) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                if let Some(len) = request
                    .strip_prefix("BIG ")
                    .and_then(|l| l.trim().parse::<usize>().ok())
                {
                    // A lost reply shows as a timeout on the client, which reports it.
                    let _ = sock.send_to(&bulk_pattern(len.min(65_000)), from);
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BigReplyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A datagram larger than the MTU leaves the sender as IP fragments; only the first carries
/// the UDP ports. The datapath translates the first and remembers its ports so the later ones
/// follow; if they did not, the backend's kernel could never reassemble the datagram.
fn udp_datagram_of_2000_bytes_crosses_a_clusterip(hook: &str) {
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
    const BIG_PORT: u16 = 9090;

    let mut sb = sandbox("frag", hook);
    let web0 = sb
        .add_pod("web-0", Ipv4Addr::new(10, 244, 0, 11))
        .expect("backend pod");
    let mut ports = tcp_udp(80);
    ports.push(SvcPort::new("big", 90, "UDP", BIG_PORT));
    let manifests = Manifests::new();
    manifests.service("default", "web", VIP, &ports);
    manifests.slice("default", "web", &endpoints(&[("web-0", web0.ip)]), &ports);
    let proxy = Proxy::start(&sb, manifests.dir(), hook);
    // Declared after the proxy so it stops first: its socket would keep the pod alive.
    let _big = BigReplyServer::start(&web0.netns, BIG_PORT);
    proxy.wait_until_serving(&sb, "client", SocketAddrV4::new(VIP, 80));
    let fragments_before = proxy.counter("fragment_translated");

    // Client -> backend: 2000 bytes (2 fragments at MTU 1500) and 4000 (3 fragments, so more
    // than one later fragment must follow the first).
    let results = in_netns(&client_netns(&sb), move || {
        [2000usize, 4000].map(|len| {
            (
                len,
                udp_request_here(SocketAddrV4::new(VIP, 80), &bulk_pattern(len), TIMEOUT),
            )
        })
    })
    .expect("client namespace");
    for (len, result) in results {
        let (reply, from) = result.unwrap_or_else(|e| {
            panic!(
                "{hook}: {len}-byte datagram to {VIP}:80: {e}; datapath counters: {}",
                proxy.stats()
            )
        });
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("web-0 {len}"),
            "{hook}: the backend must receive the {len}-byte datagram whole"
        );
        assert_eq!(
            from,
            SocketAddrV4::new(VIP, 80),
            "{hook}: the reply must come from the ClusterIP"
        );
    }
    assert!(
        proxy.counter("fragment_translated") > fragments_before,
        "{hook}: the datagrams arrived, but the datapath counted no translated later fragment, so \
         the test did not exercise fragments: {}",
        proxy.stats()
    );

    // Backend -> client: a 3000-byte reply leaves the backend as fragments and is
    // reverse-translated the same way.
    let (reply, from) = svcproxy_tests::udp_request(
        &client_netns(&sb),
        SocketAddrV4::new(VIP, 90),
        b"BIG 3000",
        TIMEOUT,
    )
    .unwrap_or_else(|e| {
        panic!(
            "{hook}: 3000-byte reply from {VIP}:90: {e:#}; datapath counters: {}",
            proxy.stats()
        )
    });
    assert_eq!(
        reply.len(),
        3000,
        "{hook}: the fragmented reply must arrive whole"
    );
    assert!(
        reply == bulk_pattern(3000),
        "{hook}: the fragmented reply arrived corrupted"
    );
    assert_eq!(
        from,
        SocketAddrV4::new(VIP, 90),
        "{hook}: the reply must come from the ClusterIP"
    );

    proxy.stop();
}

// ---------------------------------------------------------------------------------------------
// 3. ICMP "fragmentation needed" from a router on the path.

/// Path MTU discovery through a ClusterIP: the client sends a DF datagram to the ClusterIP;
/// after translation it goes to the backend, and a router before the backend, whose link is
/// too small, answers with ICMP "fragmentation needed" quoting client -> backend. The client's
/// kernel matches ICMP errors to sockets by the quoted header, and the client's socket talks
/// to the ClusterIP, so only after the datapath rewrites the quote to client -> ClusterIP does
/// the socket learn the smaller MTU. Otherwise it would resend too-big packets forever (a PMTU
/// black hole).
fn icmp_frag_needed_from_the_path_reaches_the_client(hook: &str) {
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
    const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 30);
    const FAR: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    const SMALL_MTU: u32 = 1200;
    /// Fits the client's 1500-byte link (with 28 bytes of headers), not the router's 1200.
    const TOO_BIG: usize = 1400;

    let mut sb = sandbox("pmtu", hook);
    sb.add_router_pod("router", ROUTER).expect("router pod");
    sb.add_pod_behind("router", "far-0", FAR, SMALL_MTU, PodOptions::default())
        .expect("pod behind the router");
    let manifests = Manifests::new();
    manifests.service("default", "far", VIP, &tcp_udp(80));
    manifests.slice(
        "default",
        "far",
        &endpoints(&[("far-0", FAR)]),
        &tcp_udp(80),
    );
    let proxy = Proxy::start(&sb, manifests.dir(), hook);
    proxy.wait_until_serving(&sb, "client", SocketAddrV4::new(VIP, 80));
    let client = client_netns(&sb);

    // Control: talking to the backend directly, no translation is involved; if this socket
    // does not learn the MTU either, the topology is broken, not the datapath.
    let direct = SocketAddrV4::new(FAR, DEFAULT_ECHO_PORT);
    let learned =
        in_netns(&client, move || learn_path_mtu(direct, TOO_BIG)).expect("client namespace");
    assert_eq!(
        learned,
        Ok(SMALL_MTU),
        "{hook}: test topology: a DF datagram straight to {direct} must make the router report \
         MTU {SMALL_MTU}"
    );

    let vip = SocketAddrV4::new(VIP, 80);
    let outcome = in_netns(&client, move || -> Result<(), String> {
        let sock = connected_df_socket(vip)?;
        let learned = wait_for_smaller_mtu(&sock, TOO_BIG)?;
        if learned != SMALL_MTU {
            return Err(format!(
                "the socket's path MTU is {learned}, want {SMALL_MTU}"
            ));
        }
        match sock.send(&vec![0u8; TOO_BIG]) {
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
            other => {
                return Err(format!(
                    "a {TOO_BIG}-byte send after the MTU dropped: want EMSGSIZE, got {other:?}"
                ));
            }
        }
        // The error as queued: the router's report, with the MTU intact. The router is not
        // the backend, so its address stays (only a backend's own errors become the ClusterIP's).
        match read_queued_error(&sock) {
            Ok(Some(q))
                if q.origin == SO_EE_ORIGIN_ICMP
                    && (q.icmp_type, q.icmp_code) == (3, 4)
                    && q.info == SMALL_MTU
                    && q.offender == Some(ROUTER) => {}
            other => {
                return Err(format!(
                    "want a queued frag-needed from {ROUTER} with MTU {SMALL_MTU}, got {other:?}"
                ));
            }
        }
        // The socket also holds EMSGSIZE as a pending error; clear it, then check the flow
        // works at the learned size.
        let _ = sock.take_error();
        let fits = SMALL_MTU as usize - 28;
        sock.send(&vec![0u8; fits])
            .map_err(|e| format!("a {fits}-byte send: {e}"))?;
        let mut buf = [0u8; 64];
        let n = sock
            .recv(&mut buf)
            .map_err(|e| format!("reply to a {fits}-byte datagram: {e}"))?;
        let reply = String::from_utf8_lossy(&buf[..n]);
        if reply != format!("far-0 {fits}") {
            return Err(format!("reply to a {fits}-byte datagram: {reply:?}"));
        }
        Ok(())
    })
    .expect("client namespace");
    if let Err(e) = outcome {
        panic!(
            "{hook}: DF datagrams to {vip} behind a {SMALL_MTU}-byte link: {e}; datapath counters \
             (icmp_error_reply counts rewritten ICMP errors): {}",
            proxy.stats()
        );
    }
    proxy.stop();
}

/// A UDP socket connected to `to` that sets DF and refuses to fragment locally.
fn connected_df_socket(to: SocketAddrV4) -> Result<UdpSocket, String> {
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
        .map_err(|e| format!("bind: {e}"))?;
    sock.connect(to)
        .map_err(|e| format!("connect to {to}: {e}"))?;
    set_pmtu_discovery(&sock).map_err(|e| format!("IP_MTU_DISCOVER: {e}"))?;
    set_recv_errors(&sock).map_err(|e| format!("IP_RECVERR: {e}"))?;
    sock.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(sock)
}

/// Sends `size`-byte DF datagrams on `sock` until its path MTU drops below the link's (resending
/// in case an ICMP error was rate limited), for up to 3 s; returns the new path MTU.
fn wait_for_smaller_mtu(sock: &UdpSocket, size: usize) -> Result<u32, String> {
    let initial = path_mtu(sock).map_err(|e| format!("IP_MTU: {e}"))?;
    if initial != 1500 {
        return Err(format!(
            "the socket starts with path MTU {initial}, want the link's 1500"
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match sock.send(&vec![0u8; size]) {
            Ok(_) => {}
            // Already too big for the path: the MTU dropped between two checks.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
            Err(e) => return Err(format!("sending {size} bytes: {e}")),
        }
        let wait_until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < wait_until {
            let mtu = path_mtu(sock).map_err(|e| format!("IP_MTU: {e}"))?;
            if mtu < initial {
                return Ok(mtu);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    Err(format!(
        "the socket's path MTU stayed {initial} for 3 s of {size}-byte DF datagrams: the \
         fragmentation-needed error never reached it"
    ))
}

/// [`wait_for_smaller_mtu`] on a fresh socket connected to `to`.
fn learn_path_mtu(to: SocketAddrV4, size: usize) -> Result<u32, String> {
    wait_for_smaller_mtu(&connected_df_socket(to)?, size)
}

// ---------------------------------------------------------------------------------------------
// 4. Session affinity.

/// `sessionAffinity: ClientIP` pins a client to one backend across new connections; switching
/// the Service to `None` spreads its new connections again at once, and back to `ClientIP`
/// pins it again.
fn session_affinity_keeps_a_client_on_one_backend(hook: &str) {
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
    let client_ip = json!({
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}},
    });
    let none = json!({"sessionAffinity": "None"});

    let mut sb = sandbox("aff", hook);
    let mut backends = Vec::new();
    for i in 0..3u8 {
        let name = format!("web-{i}");
        let pod = sb
            .add_pod(&name, Ipv4Addr::new(10, 244, 0, 11 + i))
            .expect("backend pod");
        backends.push((name, pod.ip));
    }
    let eps: Vec<(&str, Ipv4Addr)> = backends.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let manifests = Manifests::new();
    manifests.service_with("default", "web", VIP, &tcp_udp(80), client_ip.clone(), &[]);
    manifests.slice("default", "web", &endpoints(&eps), &tcp_udp(80));
    let proxy = Proxy::start(&sb, manifests.dir(), hook);
    let vip = SocketAddrV4::new(VIP, 80);
    proxy.wait_until_serving(&sb, "client", vip);

    let hits = tcp_spread(&sb, vip, 30);
    assert_eq!(
        hits.len(),
        1,
        "{hook}: ClientIP affinity: 30 TCP connections must reach one backend: {hits:?}"
    );
    // UDP is its own frontend with its own affinity, just as sticky.
    let udp_hits = in_netns(&client_netns(&sb), move || {
        let mut hits = BTreeMap::new();
        for i in 0..30 {
            let (reply, _) = udp_request_here(vip, b"NAME", TIMEOUT)
                .unwrap_or_else(|e| panic!("UDP request {i} to {vip}: {e}"));
            *hits.entry(udp_pod(&reply)).or_insert(0) += 1;
        }
        hits
    })
    .expect("client namespace");
    assert_eq!(
        udp_hits.len(),
        1,
        "{hook}: ClientIP affinity: 30 UDP sockets must reach one backend: {udp_hits:?}"
    );

    manifests.service_with("default", "web", VIP, &tcp_udp(80), none, &[]);
    let spread = converge(&sb, vip, |hits| hits.len() >= 2);
    assert!(
        spread.is_ok(),
        "{hook}: after switching to sessionAffinity None, new connections still all reached one \
         backend for {CONVERGE:?}: {spread:?}"
    );
    let hits = tcp_spread(&sb, vip, 30);
    assert!(
        hits.len() >= 2,
        "{hook}: sessionAffinity None: 30 connections must spread: {hits:?}"
    );

    manifests.service_with("default", "web", VIP, &tcp_udp(80), client_ip, &[]);
    let sticky = converge(&sb, vip, |hits| hits.len() == 1);
    assert!(
        sticky.is_ok(),
        "{hook}: after switching back to ClientIP, new connections did not become sticky within \
         {CONVERGE:?}: {sticky:?}"
    );
    let hits = tcp_spread(&sb, vip, 30);
    assert_eq!(
        hits.len(),
        1,
        "{hook}: ClientIP again: 30 TCP connections must reach one backend: {hits:?}"
    );
    proxy.stop();
}

/// Batches of 10 new connections until one satisfies `done`, for up to [`CONVERGE`] after
/// the manifest change; the last batch either way.
fn converge(
    sb: &Sandbox,
    vip: SocketAddrV4,
    done: impl Fn(&BTreeMap<String, usize>) -> bool,
) -> Result<BTreeMap<String, usize>, BTreeMap<String, usize>> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let hits = tcp_spread(sb, vip, 10);
        if done(&hits) {
            return Ok(hits);
        }
        if Instant::now() >= deadline {
            return Err(hits);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Maglev.

/// What `svcproxy.io/lb-algorithm: maglev` guarantees, and so what is asserted:
///
/// - New flows pick the backend owning the Maglev table entry of their 5-tuple hash. Every
///   backend owns ~1/n of the table, so ephemeral-port connections spread evenly.
/// - A flow with a live conntrack entry keeps its backend (the entry is re-validated against
///   the Service, and a backend that still exists stays valid). So re-sending from the same
///   UDP sockets hits the same backends, before and also after a backend is added: 0 changes.
///   That is conntrack's guarantee (SEMANTICS 5), whatever the algorithm.
/// - The hash itself is consistent: the same 5-tuple as a *new* flow maps to the same backend
///   while the backend set is unchanged. To see that without conntrack, TCP connections from
///   fixed source ports are closed with a RST: the flow's entry is then closing, and a bare SYN
///   reusing the tuple is a new flow that is hashed again. (With random selection only ~1/4
///   would land where they did.)
/// - Adding a 5th backend moves only the table entries it takes over (ideally 1/5) plus a
///   little churn, so at most ~30% of those new-flow tuples change backend, mostly to the new
///   one; random selection would move ~80%.
fn maglev_spreads_and_is_stable(hook: &str) {
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
    const UDP_PORTS: std::ops::Range<u16> = 20_000..20_100;
    const TCP_PORTS: std::ops::Range<u16> = 21_000..21_100;
    let maglev = [("svcproxy.io/lb-algorithm", "maglev")];

    let mut sb = sandbox("mag", hook);
    let mut backends = Vec::new();
    for i in 0..5u8 {
        let name = format!("web-{i}");
        let pod = sb
            .add_pod(&name, Ipv4Addr::new(10, 244, 0, 11 + i))
            .expect("backend pod");
        backends.push((name, pod.ip));
    }
    let eps: Vec<(&str, Ipv4Addr)> = backends.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let manifests = Manifests::new();
    manifests.service_with("default", "web", VIP, &tcp_udp(80), json!({}), &maglev);
    manifests.slice("default", "web", &endpoints(&eps[..4]), &tcp_udp(80));
    let proxy = Proxy::start(&sb, manifests.dir(), hook);
    let vip = SocketAddrV4::new(VIP, 80);
    proxy.wait_until_serving(&sb, "client", vip);

    let hits = tcp_spread(&sb, vip, 200);
    assert_eq!(
        hits.len(),
        4,
        "{hook}: 200 connections must reach all 4 backends: {hits:?}"
    );
    for (pod, n) in &hits {
        assert!(
            *n >= 30,
            "{hook}: {pod} got {n} of 200 connections (< 15%): {hits:?}"
        );
    }

    // One socket per source port, kept open so each re-send repeats its 5-tuple.
    let client = client_netns(&sb);
    let udp = in_netns(&client, move || {
        UDP_PORTS
            .map(|p| {
                UdpSocket::bind(SocketAddrV4::new(CLIENT, p))
                    .unwrap_or_else(|e| panic!("bind UDP {CLIENT}:{p}: {e}"))
            })
            .collect::<Vec<_>>()
    })
    .expect("client namespace");
    let udp = Arc::new(udp);
    let udp_round = || {
        let socks = udp.clone();
        in_netns(&client, move || udp_backends(&socks, vip)).expect("client namespace")
    };
    let tcp_round =
        || in_netns(&client, move || tcp_backends(TCP_PORTS, vip)).expect("client namespace");

    let udp_first = udp_round();
    let udp_again = udp_round();
    let changed = changes(&udp_first, &udp_again);
    assert!(
        changed.is_empty(),
        "{hook}: UDP flows with live conntrack entries changed backend: {changed:?}"
    );

    let tcp_first = tcp_round();
    let tcp_again = tcp_round();
    let changed = changes(&tcp_first, &tcp_again);
    assert!(
        changed.is_empty(),
        "{hook}: Maglev must hash a repeated 5-tuple to the same backend, but {} of 100 new TCP \
         flows from fixed source ports moved (is {} honoured?): {changed:?}",
        changed.len(),
        maglev[0].0
    );

    // A 5th backend: wait until it gets new flows, so the datapath has the new table.
    manifests.slice("default", "web", &endpoints(&eps), &tcp_udp(80));
    let deadline = Instant::now() + CONVERGE;
    loop {
        let hits = tcp_spread(&sb, vip, 20);
        if hits.contains_key("web-4") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{hook}: the added backend web-4 got no new connections within {CONVERGE:?}: {hits:?}"
        );
    }

    let udp_after = udp_round();
    let changed = changes(&udp_first, &udp_after);
    assert!(
        changed.is_empty(),
        "{hook}: adding a backend moved {} of 100 UDP flows with live conntrack entries; \
         established flows must keep their backend: {changed:?}",
        changed.len()
    );

    let tcp_after = tcp_round();
    let changed = changes(&tcp_first, &tcp_after);
    let to_new = changed.values().filter(|(_, to)| to == "web-4").count();
    assert!(
        changed.len() <= 30,
        "{hook}: adding a 5th backend moved {} of 100 new-flow tuples (Maglev: ~20%, at most \
         30%): {changed:?}",
        changed.len()
    );
    assert!(
        to_new >= 5 && to_new * 2 >= changed.len(),
        "{hook}: of {} tuples that moved, {to_new} went to the new backend; Maglev moves mostly \
         those the new backend takes over: {changed:?}",
        changed.len()
    );
    drop(udp);
    proxy.stop();
}

/// Source port -> backend for one datagram from each socket.
fn udp_backends(socks: &[UdpSocket], vip: SocketAddrV4) -> BTreeMap<u16, String> {
    let mut buf = [0u8; 256];
    socks
        .iter()
        .map(|s| {
            let port = s.local_addr().expect("local address").port();
            s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
            s.send_to(b"NAME", vip)
                .unwrap_or_else(|e| panic!("UDP send from port {port}: {e}"));
            let (n, from) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("UDP reply to source port {port} from {vip}: {e}"));
            assert_eq!(
                from,
                vip.into(),
                "UDP reply to source port {port} must come from the ClusterIP"
            );
            (port, udp_pod(&buf[..n]))
        })
        .collect()
}

/// Source port -> backend for one new TCP connection from each port. The server closes first
/// (after its reply) and the client answers with a RST, so neither side keeps the 4-tuple in
/// TIME_WAIT and the next round can reuse it at once.
fn tcp_backends(ports: std::ops::Range<u16>, vip: SocketAddrV4) -> BTreeMap<u16, String> {
    ports
        .map(|port| {
            let name = tcp_name_from(SocketAddrV4::new(CLIENT, port), vip)
                .unwrap_or_else(|e| panic!("TCP NAME from {CLIENT}:{port} to {vip}: {e}"));
            (port, name)
        })
        .collect()
}

fn tcp_name_from(local: SocketAddrV4, vip: SocketAddrV4) -> io::Result<String> {
    let mut stream = tcp_connect_from(local, vip, TIMEOUT)?;
    set_reset_on_close(&stream)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    // No shutdown(Write): the client must not close first, or it would hold TIME_WAIT.
    stream.write_all(b"NAME\n")?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok(String::from_utf8_lossy(&reply).trim().to_owned())
}

/// The source ports whose backend differs between two rounds: port -> (before, after).
fn changes(
    before: &BTreeMap<u16, String>,
    after: &BTreeMap<u16, String>,
) -> BTreeMap<u16, (String, String)> {
    before
        .iter()
        .filter_map(|(port, b)| {
            let a = after.get(port).cloned().unwrap_or_default();
            (a != *b).then(|| (*port, (b.clone(), a)))
        })
        .collect()
}
