//! Tests of the network-namespace sandbox itself: pod-to-pod traffic through the node, the
//! echo protocol, name resolution, running processes in a namespace, and that nothing is left
//! behind after drop, a panic or pod removal. Needs root.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    panic,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use svcproxy_tests::{
    Cluster, RequestError, Sandbox, bulk_pattern,
    cluster::EXTERNAL_IP,
    cmd, command_in, in_netns, list_netns,
    load::{ConnectionLoad, LoadOptions, LongStream},
    netns_exists, tcp_request, tcp_request_here, udp_request, udp_request_here,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const TIMEOUT: Duration = Duration::from_secs(5);

fn echo(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 8080)
}

fn two_pods(tag: &str) -> Sandbox {
    let mut sandbox = Sandbox::new(tag, NODE_IP).expect("create sandbox");
    sandbox.add_pod("a", POD_A).expect("add pod a");
    sandbox.add_pod("b", POD_B).expect("add pod b");
    sandbox
}

/// Every namespace name a sandbox with this prefix could have made.
fn leftovers(prefix: &str) -> Vec<String> {
    list_netns()
        .expect("list namespaces")
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect()
}

#[test]
fn pods_talk_tcp_and_udp_through_the_node() {
    let sandbox = two_pods("talk");
    let a = sandbox.pod("a").expect("pod a").clone();
    let b = sandbox.pod("b").expect("pod b").clone();
    assert_ne!(a.host_veth, b.host_veth);
    assert!(a.host_veth.len() <= 15);
    let glob = sandbox.veth_glob();
    assert!(a.host_veth.starts_with(glob.trim_end_matches('*')));

    let reply = tcp_request(&a.netns, echo(b.ip), b"NAME\n", TIMEOUT).expect("TCP a -> b");
    assert_eq!(reply, b"b\n");
    let reply = tcp_request(&b.netns, echo(a.ip), b"NAME\n", TIMEOUT).expect("TCP b -> a");
    assert_eq!(reply, b"a\n");

    let (reply, from) = udp_request(&a.netns, echo(b.ip), b"ping", TIMEOUT).expect("UDP a -> b");
    assert_eq!(reply, b"b 4");
    assert_eq!(from, echo(b.ip));
    let (reply, from) = udp_request(&b.netns, echo(a.ip), b"", TIMEOUT).expect("UDP b -> a");
    assert_eq!(reply, b"a 0");
    assert_eq!(from, echo(a.ip));

    // The node itself reaches pods too (where a hostNetwork client or the proxy sits).
    let reply =
        tcp_request(sandbox.node_netns(), echo(a.ip), b"NAME\n", TIMEOUT).expect("TCP node -> a");
    assert_eq!(reply, b"a\n");
}

#[test]
fn echo_protocol() {
    let sandbox = two_pods("proto");
    let a = sandbox.pod("a").expect("pod a").clone();

    let reply = tcp_request(&a.netns, echo(POD_B), b"PEER\n", TIMEOUT).expect("PEER");
    let peer = String::from_utf8(reply).expect("PEER reply is text");
    let peer: SocketAddrV4 = peer.trim_end().parse().expect("PEER reply is ip:port");
    assert_eq!(*peer.ip(), POD_A, "the server sees the client pod's IP");
    assert_ne!(peer.port(), 0);

    let n = 1 << 20;
    let reply = tcp_request(
        &a.netns,
        echo(POD_B),
        format!("BULK {n}\n").as_bytes(),
        TIMEOUT,
    )
    .expect("BULK");
    assert_eq!(reply.len(), n);
    assert!(
        reply == bulk_pattern(n),
        "BULK payload differs from the pattern"
    );

    let mut request = b"SINK\n".to_vec();
    request.extend(std::iter::repeat_n(b'x', 300_000));
    let reply = tcp_request(&a.netns, echo(POD_B), &request, TIMEOUT).expect("SINK");
    assert_eq!(reply, b"300000\n");

    let reply = tcp_request(&a.netns, echo(POD_B), b"hello\n", TIMEOUT).expect("greeting");
    assert_eq!(reply, b"b\n");
    let reply = tcp_request(&a.netns, echo(POD_B), b"", TIMEOUT).expect("empty request");
    assert_eq!(reply, b"b\n");

    let reply = tcp_request(
        &a.netns,
        echo(POD_B),
        b"GET / HTTP/1.0\r\nHost: b\r\n\r\n",
        TIMEOUT,
    )
    .expect("GET");
    let reply = String::from_utf8(reply).expect("HTTP reply is text");
    assert!(reply.starts_with("HTTP/1.0 200 OK\r\n"), "{reply:?}");
    assert!(reply.contains("Content-Length: 2\r\n"), "{reply:?}");
    assert!(reply.ends_with("\r\n\r\nb\n"), "{reply:?}");
}

#[test]
fn pod_options_and_errors() {
    let mut sandbox = Sandbox::new("opts", NODE_IP).expect("create sandbox");
    let opts = svcproxy_tests::PodOptions::default()
        .tcp_ports([80, 9000])
        .udp_ports([53])
        .greeting("hello from web\n");
    let web = sandbox.add_pod_with("web", POD_A, opts).expect("add web");
    sandbox.add_pod("client", POD_B).expect("add client");
    let client = sandbox.pod("client").expect("client").netns.clone();

    for port in [80, 9000] {
        let reply = tcp_request(&client, SocketAddrV4::new(web.ip, port), b"hi\n", TIMEOUT)
            .expect("greeting");
        assert_eq!(reply, b"hello from web\n");
    }
    let (reply, _) =
        udp_request(&client, SocketAddrV4::new(web.ip, 53), b"abc", TIMEOUT).expect("UDP 53");
    assert_eq!(reply, b"web 3");

    // Nothing listens on 8080 there: the pod's kernel refuses.
    let err = tcp_request(&client, echo(web.ip), b"NAME\n", TIMEOUT).expect_err("8080 is closed");
    let err = err.downcast_ref::<RequestError>().expect("a RequestError");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");

    // No route on the node: the node answers with an ICMP error from its node IP, so the
    // client fails fast instead of timing out.
    let start = Instant::now();
    let err = tcp_request(
        &client,
        echo(Ipv4Addr::new(10, 244, 9, 9)),
        b"NAME\n",
        TIMEOUT,
    )
    .expect_err("unroutable");
    let err = err.downcast_ref::<RequestError>().expect("a RequestError");
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable
        ),
        "{err}"
    );
    assert!(start.elapsed() < TIMEOUT, "ICMP error arrived");

    assert!(
        sandbox
            .add_pod("web", Ipv4Addr::new(10, 244, 1, 9))
            .is_err(),
        "duplicate name"
    );
    assert!(sandbox.add_pod("other", POD_A).is_err(), "duplicate IP");
    assert!(
        sandbox
            .add_pod("Bad_Name", Ipv4Addr::new(10, 244, 1, 9))
            .is_err(),
        "bad name"
    );
    let err = in_netns("no-such-netns-here", || ()).expect_err("missing namespace");
    assert!(format!("{err:#}").contains("no-such-netns-here"), "{err:#}");
}

#[test]
fn many_connections_from_one_thread() {
    let sandbox = two_pods("many");
    let a = sandbox.pod("a").expect("pod a").netns.clone();
    let start = Instant::now();
    let replies = in_netns(&a, || -> Result<usize, RequestError> {
        for _ in 0..200 {
            let reply = tcp_request_here(echo(POD_B), b"NAME\n", TIMEOUT)?;
            assert_eq!(reply, b"b\n");
            let (reply, _) = udp_request_here(echo(POD_B), b"x", TIMEOUT)?;
            assert_eq!(reply, b"b 1");
        }
        Ok(200)
    })
    .expect("enter pod a");
    assert_eq!(replies.expect("200 exchanges"), 200);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
}

/// The upgrade tests' load generator: connections at a rate, each proven by its reply, and a
/// long stream checked byte by byte. It must count what goes wrong, not only what goes right:
/// a refusal, a reply from the wrong pod, and a stream whose server goes away.
#[test]
fn the_load_generator_counts_every_failure_and_a_broken_stream() {
    let mut sandbox = two_pods("load");
    let a = sandbox.pod("a").expect("pod a").netns.clone();
    let run = |addr: SocketAddrV4, backend: &str| {
        let options = LoadOptions {
            rate: 200,
            ..LoadOptions::default()
        };
        let load = ConnectionLoad::start(&a, addr, &[backend.to_owned()], options).expect("load");
        std::thread::sleep(Duration::from_millis(500));
        load.finish()
    };

    let report = run(echo(POD_B), "b");
    assert!(report.attempted() > 0, "{}", report.summary());
    assert_eq!(
        report.succeeded(),
        report.attempted(),
        "{}",
        report.summary()
    );
    assert_eq!(
        report.answered_by().into_iter().collect::<Vec<_>>(),
        [("b", report.attempted())]
    );

    let report = run(SocketAddrV4::new(POD_B, 9), "b");
    assert!(report.attempted() > 0, "{}", report.summary());
    assert_eq!(report.succeeded(), 0, "{}", report.summary());
    let causes = report.failure_summary();
    assert!(
        causes.len() == 1 && causes[0].contains("Connection refused"),
        "{causes:?}"
    );

    let report = run(echo(POD_B), "c");
    assert_eq!(report.succeeded(), 0, "{}", report.summary());
    assert!(
        report.failures().all(|c| c
            .outcome
            .as_ref()
            .is_err_and(|e| e == "reply \"b\" is from no backend")),
        "{:?}",
        report.failure_summary()
    );

    let stream = LongStream::start(&a, echo(POD_B), Duration::from_secs(1)).expect("stream");
    std::thread::sleep(Duration::from_millis(300));
    let before = stream.received();
    assert!(before > 0, "the stream got nothing");
    // The pod goes, and with it the server end of the stream.
    sandbox.remove_pod("b").expect("remove pod b");
    let report = stream.finish_when_broken(Duration::from_secs(5));
    assert!(
        report.broken.is_some() && report.received >= before,
        "{report:?}"
    );
}

#[test]
fn hosts_file_resolves_in_process_and_for_ip_netns_exec() {
    let sandbox = two_pods("hosts");
    let a = sandbox.pod("a").expect("pod a").netns.clone();
    let svc = Ipv4Addr::new(10, 96, 0, 10);
    sandbox
        .write_hosts(
            "a",
            &[
                (svc, vec!["web.default.svc".into(), "web".into()]),
                (POD_B, vec!["b".into()]),
            ],
        )
        .expect("write hosts");
    assert_eq!(sandbox.resolve("a", "web"), Some(svc));
    assert_eq!(sandbox.resolve("a", "web.default.svc"), Some(svc));
    assert_eq!(sandbox.resolve("a", "b"), Some(POD_B));
    assert_eq!(sandbox.resolve("a", "nope"), None);
    assert_eq!(sandbox.resolve("b", "web"), None, "only pod a got the file");

    let out = cmd::ip(["netns", "exec", &a, "getent", "hosts", "web"]).expect("getent in pod a");
    assert!(out.starts_with("10.96.0.10"), "{out:?}");

    let out = cmd::run(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &a,
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://b:8080/",
    ]))
    .expect("curl from pod a");
    assert_eq!(out, "b\n");
}

#[test]
fn command_in_switches_only_the_network_namespace() {
    let sandbox = two_pods("cmd");
    let a = sandbox.pod("a").expect("pod a").clone();
    let out = cmd::run(command_in(&a.netns, "ip").args(["-4", "addr", "show", "dev", "eth0"]))
        .expect("ip addr in pod a");
    assert!(out.contains(&format!("{}/32", a.ip)), "{out}");

    // Same mount namespace as the test: /sys/fs/bpf stays what the proxy expects.
    let ours = std::fs::read_link("/proc/self/ns/mnt").expect("read own mount namespace");
    let theirs = cmd::run(command_in(&a.netns, "readlink").arg("/proc/self/ns/mnt"))
        .expect("readlink in pod a");
    assert_eq!(theirs.trim_end(), ours.to_string_lossy());

    let out = cmd::run(
        sandbox
            .node_command("cat")
            .arg("/proc/sys/net/ipv4/ip_forward"),
    )
    .expect("read ip_forward");
    assert_eq!(out.trim(), "1");

    // Traffic the node originates (and so its ICMP errors) comes from the node IP.
    let route = cmd::ip([
        "-n",
        sandbox.node_netns(),
        "route",
        "get",
        &a.ip.to_string(),
    ])
    .expect("node route to pod a");
    assert!(route.contains(&format!("src {NODE_IP}")), "{route}");

    // The host side: /32 route and permanent neighbour for the pod, both ends up.
    let node = sandbox.node_netns();
    let routes = cmd::ip(["-n", node, "route", "show", "dev", &a.host_veth]).expect("node routes");
    assert!(routes.contains(&a.ip.to_string()), "{routes}");
    let neigh =
        cmd::ip(["-n", node, "neigh", "show", "dev", &a.host_veth]).expect("node neighbours");
    assert!(neigh.contains("PERMANENT"), "{neigh}");
    let neigh = cmd::ip(["-n", &a.netns, "neigh", "show", "dev", "eth0"]).expect("pod neighbours");
    assert!(
        neigh.contains("169.254.1.1") && neigh.contains("PERMANENT"),
        "{neigh}"
    );

    let mut missing = command_in("no-such-netns-here", "true");
    assert!(
        missing.status().is_err(),
        "spawning into a missing namespace fails"
    );
}

#[test]
fn drop_removes_everything() {
    let sandbox = two_pods("drop");
    let prefix = sandbox.prefix().to_owned();
    let names: Vec<String> = std::iter::once(sandbox.node_netns().to_owned())
        .chain(sandbox.pods().map(|p| p.netns.clone()))
        .collect();
    sandbox
        .write_hosts("a", &[(POD_B, vec!["b".into()])])
        .expect("write hosts");
    for name in &names {
        assert!(netns_exists(name), "{name} exists while the sandbox lives");
    }
    let start = Instant::now();
    drop(sandbox);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        start.elapsed()
    );
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    let listed = cmd::ip(["netns", "list"]).expect("ip netns list");
    for name in &names {
        assert!(
            !listed.contains(name.as_str()),
            "{name} still listed: {listed}"
        );
        assert!(
            !std::path::Path::new("/etc/netns").join(name).exists(),
            "/etc/netns/{name} left"
        );
    }
}

#[test]
fn teardown_reports_and_removes_everything() {
    let sandbox = two_pods("tear");
    let prefix = sandbox.prefix().to_owned();
    sandbox.teardown().expect("teardown");
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
}

#[test]
fn panic_inside_a_test_still_cleans_up() {
    let prefix = Arc::new(Mutex::new(String::new()));
    let seen = prefix.clone();
    let result = panic::catch_unwind(move || {
        let sandbox = two_pods("panic");
        *seen.lock().expect("lock") = sandbox.prefix().to_owned();
        panic!("deliberate panic with a live sandbox");
    });
    assert!(result.is_err());
    let prefix = prefix.lock().expect("lock").clone();
    assert!(!prefix.is_empty());
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
}

#[test]
fn remove_pod_deletes_it() {
    let mut sandbox = two_pods("rm");
    let b = sandbox.pod("b").expect("pod b").clone();
    let a = sandbox.pod("a").expect("pod a").netns.clone();
    sandbox.remove_pod("b").expect("remove b");
    assert!(!netns_exists(&b.netns));
    let links = cmd::ip(["-n", sandbox.node_netns(), "link", "show"]).expect("node links");
    assert!(!links.contains(&b.host_veth), "{links}");
    assert!(sandbox.remove_pod("b").is_err(), "already gone");
    let err =
        tcp_request(&a, echo(POD_B), b"NAME\n", Duration::from_secs(2)).expect_err("b is gone");
    assert!(err.downcast_ref::<RequestError>().is_some(), "{err:#}");

    // A new pod with the same name and IP gets a fresh veth and works.
    let b2 = sandbox.add_pod("b", POD_B).expect("re-add b");
    assert_ne!(b2.host_veth, b.host_veth);
    assert_eq!(
        tcp_request(&a, echo(POD_B), b"NAME\n", TIMEOUT).expect("TCP a -> new b"),
        b"b\n"
    );
}

#[test]
fn two_sandboxes_at_once_are_isolated() {
    let mut one = Sandbox::new("one", NODE_IP).expect("sandbox one");
    let mut two = Sandbox::new("two", NODE_IP).expect("sandbox two");
    assert_ne!(one.prefix(), two.prefix());
    // The same pod IPs in both: each sandbox is its own network.
    one.add_pod("client", POD_A).expect("one client");
    one.add_pod("server-one", POD_B).expect("one server");
    two.add_pod("client", POD_A).expect("two client");
    two.add_pod("server-two", POD_B).expect("two server");
    let c1 = one.pod("client").expect("client").netns.clone();
    let c2 = two.pod("client").expect("client").netns.clone();
    assert_eq!(
        tcp_request(&c1, echo(POD_B), b"NAME\n", TIMEOUT).expect("one"),
        b"server-one\n"
    );
    assert_eq!(
        tcp_request(&c2, echo(POD_B), b"NAME\n", TIMEOUT).expect("two"),
        b"server-two\n"
    );
    assert!(
        !two.veth_glob()
            .starts_with(one.veth_glob().trim_end_matches('*'))
    );
}

/// The test re-runs itself as `nobody`: in that child, building a sandbox must fail with a
/// message naming root.
#[test]
fn sandbox_needs_root() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("SVCPROXY_SANDBOX_CHILD").is_some() {
        let err = Sandbox::new("child", NODE_IP)
            .err()
            .expect("must fail without root");
        let message = format!("{err:#}");
        assert!(message.contains("root"), "{message}");
        return;
    }
    let exe = std::env::current_exe().expect("find the test binary");
    let mut child = std::process::Command::new(exe);
    child
        .args(["--exact", "sandbox_needs_root"])
        .env("SVCPROXY_SANDBOX_CHILD", "1");
    // SAFETY: setgroups/setgid/setuid are async-signal-safe and the closure allocates
    // nothing.
    unsafe {
        child.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = child.output().expect("run the test binary as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 passed"), "{stdout}");
}

/// The kind of the I/O error behind a failed request.
fn failure_kind(e: &anyhow::Error) -> Option<io::ErrorKind> {
    e.downcast_ref::<RequestError>().map(RequestError::kind)
}

/// Two nodes on an underlay: pods on different nodes talk directly (no NAT: each sees the
/// other's pod IP), the external client reaches node IPs but not pod IPs, and a route the test
/// adds for an extra address leads the external client to that node.
#[test]
fn cluster_nodes_route_pod_ranges_and_the_outside_sees_only_nodes() {
    let mut cluster = Cluster::new("clus", 2).expect("cluster");
    let (a_ip, b_ip) = (Cluster::pod_ip(0, 2), Cluster::pod_ip(1, 2));
    let a = cluster
        .node_mut(0)
        .add_pod("a", a_ip)
        .expect("pod a on node 0");
    let b = cluster
        .node_mut(1)
        .add_pod("b", b_ip)
        .expect("pod b on node 1");

    let reply = tcp_request(&a.netns, echo(b_ip), b"PEER\n", TIMEOUT).expect("a -> b across nodes");
    let peer = String::from_utf8_lossy(&reply);
    assert!(
        peer.starts_with(&format!("{a_ip}:")),
        "b saw {peer}: NAT in the way"
    );
    let (reply, _) = udp_request(&b.netns, echo(a_ip), b"ping", TIMEOUT).expect("UDP b -> a");
    assert_eq!(reply, b"a 4");

    let ext = cluster.external_netns().to_owned();
    for i in 0..2 {
        // Nothing listens on the node: a refusal proves the address answered.
        let addr = SocketAddrV4::new(Cluster::node_ip(i), 1);
        let e = tcp_request(&ext, addr, b"x", TIMEOUT).expect_err("nothing listens on node port 1");
        assert_eq!(
            failure_kind(&e),
            Some(io::ErrorKind::ConnectionRefused),
            "{e:#}"
        );
    }
    let e = tcp_request(&ext, echo(a_ip), b"NAME\n", TIMEOUT).expect_err("pods are not routed");
    assert_eq!(
        failure_kind(&e),
        Some(io::ErrorKind::NetworkUnreachable),
        "{e:#}"
    );

    // An address routed to node 1 from outside is delivered there: pod b's IP, as a stand-in.
    cluster
        .route_external(&format!("{b_ip}/32"), 1)
        .expect("external route");
    let reply =
        tcp_request(&ext, echo(b_ip), b"PEER\n", TIMEOUT).expect("external -> b via node 1");
    let peer = String::from_utf8_lossy(&reply);
    assert!(peer.starts_with(&format!("{EXTERNAL_IP}:")), "b saw {peer}");

    let prefixes: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.prefix().to_owned())
        .collect();
    drop(cluster);
    for prefix in prefixes {
        assert_eq!(leftovers(&prefix), Vec::<String>::new());
    }
}
