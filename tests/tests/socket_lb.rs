//! Socket-level balancing (`--socket-lb`) end to end: processes in the node's own network
//! namespace (what hostNetwork pods are) and in pods reach a ClusterIP because the cgroup hooks
//! translate it at `connect()`/`sendto()`, and read the ClusterIP back from `getpeername()` and
//! `recvmsg()`. With `all`, a connected UDP socket whose backend is removed is moved to a live
//! one and its next send goes there. With `off`, the node's own traffic to a ClusterIP is not
//! translated at all (there is no per-packet hook on its path).
//!
//! The hooks act on every process of the cgroup they are attached to, so each test attaches
//! them to a threaded cgroup of its own (`--cgroup-path`) and moves only its client thread in.

mod common;

use std::{
    collections::HashSet,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use common::{Endpoint, Manifests, Proxy, SvcPort};
use svcproxy::caps;
use svcproxy_tests::{Sandbox, TestCgroup, in_netns, sandbox::DEFAULT_ECHO_PORT};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const FRONTEND: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 0, 11), Ipv4Addr::new(10, 244, 0, 12)];
const TIMEOUT: Duration = Duration::from_secs(2);

fn ports() -> Vec<SvcPort> {
    vec![
        SvcPort::new("tcp", 80, "TCP", DEFAULT_ECHO_PORT),
        SvcPort::new("udp", 80, "UDP", DEFAULT_ECHO_PORT),
    ]
}

/// Backend pod `i` is named `web-{i}` (its echo servers answer `NAME` with that).
fn endpoints(idx: &[usize]) -> Vec<Endpoint> {
    idx.iter()
        .map(|i| Endpoint::ready(BACKENDS[*i], &format!("web-{i}")))
        .collect()
}

/// A sandbox with the backends (and a client pod), the Service, and a cgroup for the hooks.
fn setup(tag: &str) -> (Sandbox, Manifests, TestCgroup) {
    let mut sb = Sandbox::new(tag, Ipv4Addr::new(172, 18, 0, 2)).expect("sandbox");
    sb.add_pod("client", CLIENT).expect("client pod");
    for (i, ip) in BACKENDS.iter().enumerate() {
        sb.add_pod(&format!("web-{i}"), *ip).expect("backend pod");
    }
    let m = Manifests::new();
    m.service("default", "web", VIP, &ports());
    m.slice("default", "web", &endpoints(&[0, 1]), &ports());
    let cg = TestCgroup::new(tag).expect("test cgroup");
    (sb, m, cg)
}

fn proxy_args<'a>(mode: &'a str, cg: &'a Path) -> Vec<&'a str> {
    vec![
        "--socket-lb",
        mode,
        "--cgroup-path",
        cg.to_str().expect("utf-8 cgroup path"),
    ]
}

/// Runs `f` on a thread in `netns` that has moved into the cgroup `cg`.
fn in_cgroup<T: Send + 'static>(
    netns: &str,
    cg: &Arc<TestCgroup>,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let cg = cg.clone();
    in_netns(netns, move || {
        cg.enter().expect("entering the test cgroup");
        f()
    })
    .expect("entering the namespace")
}

/// One TCP exchange; returns the answering pod and the peer address the socket reports.
fn tcp_name(addr: SocketAddrV4) -> std::io::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&addr.into(), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let peer = s.peer_addr()?;
    s.write_all(b"NAME\n")?;
    s.shutdown(Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok((out.trim().to_owned(), peer))
}

/// One UDP exchange on `s` (connected or not); returns the answering pod and the sender.
fn udp_name(s: &UdpSocket, to: Option<SocketAddrV4>) -> std::io::Result<(String, SocketAddr)> {
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    match to {
        Some(to) => s.send_to(b"NAME", to)?,
        None => s.send(b"NAME")?,
    };
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok((text.split(' ').next().unwrap_or_default().to_owned(), from))
}

/// Retries `f` until it succeeds (the proxy is starting) or 15 s pass.
fn eventually<T>(what: &str, mut f: impl FnMut() -> std::io::Result<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn the_node_namespace_reaches_a_clusterip_over_tcp_and_udp_and_sees_only_the_clusterip() {
    let (sb, m, cg) = setup("sknode");
    // A Service without endpoints: connect() to it is refused at once, as the per-packet
    // path's reset would.
    let empty = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 80);
    m.service("default", "empty", *empty.ip(), &ports());
    let proxy = Proxy::start_with_options(&sb, m.dir(), "tc", &proxy_args("all", cg.path()));
    let cg = Arc::new(cg);
    let (tcp_names, udp_names) = in_cgroup(sb.node_netns(), &cg, move || {
        eventually("first TCP connection from the node namespace", || {
            tcp_name(FRONTEND)
        });
        let mut tcp_names = HashSet::new();
        for i in 0..30 {
            let (name, peer) =
                tcp_name(FRONTEND).unwrap_or_else(|e| panic!("TCP connection {i}: {e}"));
            assert_eq!(
                peer,
                SocketAddr::V4(FRONTEND),
                "getpeername() must say the ClusterIP, not the backend"
            );
            tcp_names.insert(name);
        }
        let mut udp_names = HashSet::new();
        for i in 0..30 {
            // Unconnected: translated on each send, the reply read as from the ClusterIP.
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            let (name, from) =
                udp_name(&s, Some(FRONTEND)).unwrap_or_else(|e| panic!("UDP request {i}: {e}"));
            assert_eq!(
                from,
                SocketAddr::V4(FRONTEND),
                "recvmsg() must say the ClusterIP"
            );
            udp_names.insert(name);
        }
        // Connected: translated at connect(), the peer still the ClusterIP.
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.connect(FRONTEND).expect("connect UDP");
        assert_eq!(s.peer_addr().expect("peer"), SocketAddr::V4(FRONTEND));
        let (name, from) = udp_name(&s, None).expect("connected UDP exchange");
        assert_eq!(from, SocketAddr::V4(FRONTEND));
        udp_names.insert(name);
        let refused = TcpStream::connect_timeout(&empty.into(), TIMEOUT).map(|_| ());
        assert_eq!(
            refused.as_ref().map_err(|e| e.kind()),
            Err(ErrorKind::ConnectionRefused),
            "a Service without endpoints refuses at connect(): {refused:?}"
        );
        (tcp_names, udp_names)
    });
    let all: HashSet<String> = ["web-0", "web-1"].map(String::from).into();
    assert_eq!(tcp_names, all, "TCP connections spread over both backends");
    assert_eq!(udp_names, all, "UDP datagrams spread over both backends");
    proxy.stop();
}

#[test]
fn a_connected_udp_socket_moves_off_its_removed_backend_on_its_next_send() {
    let (sb, m, cg) = setup("skudp");
    let proxy = Proxy::start_with_options(&sb, m.dir(), "tc", &proxy_args("all", cg.path()));
    let cg = Arc::new(cg);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = {
        let cg = cg.clone();
        let netns = sb.node_netns().to_owned();
        thread::spawn(move || {
            in_cgroup(&netns, &cg, move || {
                let s = eventually("connecting a UDP socket to the ClusterIP", || {
                    let s = UdpSocket::bind("0.0.0.0:0")?;
                    s.connect(FRONTEND)?;
                    udp_name(&s, None)?;
                    Ok(s)
                });
                let (first, _) = udp_name(&s, None).expect("exchange");
                let local = s.local_addr().expect("local address");
                tx.send(first.clone()).expect("report");
                go_rx.recv().expect("go");
                // Until svcproxy re-balances, the socket still reaches the removed backend (its
                // pod is alive): wait for the answer to change, on this very socket.
                let deadline = Instant::now() + Duration::from_secs(15);
                loop {
                    match udp_name(&s, None) {
                        Ok((name, from)) if name != first => {
                            assert_eq!(
                                from,
                                SocketAddr::V4(FRONTEND),
                                "replies still from the ClusterIP"
                            );
                            assert_eq!(s.peer_addr().expect("peer"), SocketAddr::V4(FRONTEND));
                            assert_eq!(
                                s.local_addr().expect("local"),
                                local,
                                "same socket, same port"
                            );
                            return (first, name);
                        }
                        Ok(_) => {}
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(e) => panic!("sending on the connected socket failed: {e}"),
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the connected UDP socket still reaches {first} 15 s after its removal"
                    );
                    thread::sleep(Duration::from_millis(100));
                }
            })
        })
    };
    let first = rx.recv().expect("first exchange");
    let keep: Vec<usize> = (0..2).filter(|i| format!("web-{i}") != first).collect();
    m.slice("default", "web", &endpoints(&keep), &ports());
    go_tx.send(()).expect("go");
    let (first, then) = client.join().expect("client thread");
    assert_ne!(first, then);
    proxy.stop();
}

#[test]
fn without_socket_lb_the_node_namespace_is_not_translated_and_tcp_mode_leaves_udp_alone() {
    let (sb, m, cg) = setup("skoff");
    let cg = Arc::new(cg);
    // `tcp` (the default): TCP from the node works, UDP is not translated.
    let proxy = Proxy::start_with_options(&sb, m.dir(), "tc", &proxy_args("tcp", cg.path()));
    let udp = in_cgroup(sb.node_netns(), &cg, || {
        eventually("TCP from the node namespace", || tcp_name(FRONTEND));
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        udp_name(&s, Some(FRONTEND))
    });
    assert!(
        udp.is_err(),
        "with --socket-lb tcp a datagram from the node to the ClusterIP is not translated, got {udp:?}"
    );
    proxy.stop();

    // `off`: a fresh cgroup (the first one's links go away asynchronously).
    let cg = Arc::new(TestCgroup::new("skoff2").expect("cgroup"));
    let proxy = Proxy::start_with_options(&sb, m.dir(), "tc", &proxy_args("off", cg.path()));
    // The per-packet path still serves pods (once this proxy is attached: the first one's
    // programs may linger for a moment after it stopped).
    let links = proxy.pin_dir().join("links");
    eventually("the second svcproxy attaching", || {
        let n = links.read_dir()?.count();
        if n < 3 {
            return Err(std::io::Error::other(format!("{n} links so far")));
        }
        Ok(())
    });
    proxy.wait_until_serving(&sb, "client", FRONTEND);
    let tcp = in_cgroup(sb.node_netns(), &cg, || tcp_name(FRONTEND));
    // The node namespace has no route to the ClusterIP range: the connect fails at once; on
    // a real node it would leave by the default route and time out, as without kube-proxy.
    assert!(
        tcp.is_err(),
        "with --socket-lb off the node's connection to the ClusterIP must not be translated, got {tcp:?}"
    );
    assert!(
        !links
            .read_dir()
            .expect("links")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("sock-")),
        "no socket-level hook is attached with --socket-lb off"
    );
    proxy.stop();
}

#[test]
fn a_pod_connects_to_the_backend_directly_and_the_per_packet_path_leaves_the_flow_alone() {
    let (sb, m, cg) = setup("skpod");
    let caps: Vec<String> = caps::REQUIRED
        .iter()
        .map(|c| c.kubernetes_name().to_lowercase())
        .collect();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    // With only the capabilities the DaemonSet grants: attaching the hooks needs no more.
    let proxy = Proxy::start_with_options_and_capabilities(
        &sb,
        m.dir(),
        "tc",
        &proxy_args("tcp", cg.path()),
        &caps,
    );
    let cg = Arc::new(cg);
    let netns = sb.pod("client").expect("client").netns.clone();
    // Outside the cgroup: the per-packet path translates (and counts a new flow).
    proxy.wait_until_serving(&sb, "client", FRONTEND);
    let new_flows = proxy.counter("fwd_new");
    assert!(
        new_flows > 0,
        "the per-packet path served the pod outside the cgroup"
    );
    let names = in_cgroup(&netns, &cg, || {
        let mut names = HashSet::new();
        for i in 0..20 {
            let (name, peer) = tcp_name(FRONTEND).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            assert_eq!(
                peer,
                SocketAddr::V4(FRONTEND),
                "getpeername() says the ClusterIP"
            );
            names.insert(name);
        }
        names
    });
    assert_eq!(names.len(), 2, "both backends answered: {names:?}");
    assert_eq!(
        proxy.counter("fwd_new"),
        new_flows,
        "translated at connect(): no packet reached the per-packet path as a new flow ({})",
        proxy.stats()
    );
    assert_eq!(proxy.counter("rewrite_failed"), 0, "{}", proxy.stats());
    proxy.stop();
}

/// The pinned socket-level links by pin name: link id and the id of the program in it.
fn sock_link_ids(pin_dir: &Path) -> Vec<(String, u32, u32)> {
    let mut ids: Vec<(String, u32, u32)> = std::fs::read_dir(pin_dir.join("links"))
        .expect("links directory")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("sock-"))
        .map(|e| {
            let link = aya::programs::links::PinnedLink::from_pin(e.path()).expect("pinned link");
            let info = aya::programs::links::FdLink::from(link)
                .info()
                .expect("link info");
            (
                e.file_name().to_string_lossy().into_owned(),
                info.id(),
                info.program_id(),
            )
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn a_restart_takes_over_the_cgroup_links_and_cleanup_detaches_them() {
    let (sb, m, cg) = setup("skrst");
    let mut proxy = Proxy::start_with_options(&sb, m.dir(), "tc", &proxy_args("tcp", cg.path()));
    let cg = Arc::new(cg);
    let node = sb.node_netns().to_owned();
    in_cgroup(&node, &cg, || {
        eventually("TCP from the node namespace", || tcp_name(FRONTEND))
    });
    let before = sock_link_ids(proxy.pin_dir());
    assert_eq!(before.len(), 4, "one link per hook: {before:?}");
    proxy.restart(&sb);
    // The new process replaces the programs inside the same links: the hooks never went away.
    let (_, peer) = in_cgroup(&node, &cg, || {
        eventually("TCP from the node namespace after the restart", || {
            tcp_name(FRONTEND)
        })
    });
    assert_eq!(peer, SocketAddr::V4(FRONTEND));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = sock_link_ids(proxy.pin_dir());
        let same_links = now.len() == before.len()
            && now
                .iter()
                .zip(&before)
                .all(|(a, b)| a.0 == b.0 && a.1 == b.1);
        let new_programs = now.iter().zip(&before).all(|(a, b)| a.2 != b.2);
        if same_links && new_programs {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted svcproxy did not put its programs into the links {before:?}: {now:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }

    let pins = proxy.stop_keeping_pins();
    // Still attached without svcproxy: the pins hold the links.
    let (_, peer) = in_cgroup(&node, &cg, || tcp_name(FRONTEND).expect("without svcproxy"));
    assert_eq!(peer, SocketAddr::V4(FRONTEND));
    let out = sb
        .node_command(common::svcproxy_bin())
        .args(["cleanup", "--pin-path"])
        .arg(&pins.0)
        .output()
        .expect("running svcproxy cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The kernel releases an unpinned link asynchronously.
    let deadline = Instant::now() + Duration::from_secs(15);
    while in_cgroup(&node, &cg, || tcp_name(FRONTEND)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the node still reaches the ClusterIP 15 s after cleanup: a hook stayed attached"
        );
        thread::sleep(Duration::from_millis(100));
    }
}
