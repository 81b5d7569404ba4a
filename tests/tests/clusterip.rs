//! End to end through real network namespaces: a client pod reaches three backend pods through a
//! ClusterIP served by the `svcproxy` binary, on both hooks, and on tc once more with svcproxy
//! holding only the capabilities it checks for (as the DaemonSet grants them). Needs root,
//! bpffs and the built binary (`cargo xtask test` provides all three).

mod common;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::Duration,
};

use common::{Endpoint, Manifests, Proxy, SvcPort};
use proxy_common::{backend::BACKENDS4, service::FRONTENDS4};
use svcproxy::caps;
use svcproxy_tests::{
    Sandbox, bulk_pattern, in_netns, sandbox::DEFAULT_ECHO_PORT, tcp_request_here, udp_request_here,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 0, 11),
    Ipv4Addr::new(10, 244, 0, 12),
    Ipv4Addr::new(10, 244, 0, 13),
];
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);
const TIMEOUT: Duration = Duration::from_secs(2);

fn ports() -> Vec<SvcPort> {
    vec![
        SvcPort::new("tcp", 80, "TCP", DEFAULT_ECHO_PORT),
        SvcPort::new("udp", 80, "UDP", DEFAULT_ECHO_PORT),
    ]
}

fn endpoints(ips: &[Ipv4Addr]) -> Vec<Endpoint> {
    ips.iter()
        .enumerate()
        .map(|(i, ip)| Endpoint::ready(*ip, &format!("web-{i}")))
        .collect()
}

/// 200 new connections (TCP: one per connect; UDP: one fresh socket per request), counting which
/// pod answered. Every exchange must succeed, and UDP replies must come from the ClusterIP.
fn spread(sb: &Sandbox, proto: &'static str, n: usize) -> HashMap<String, usize> {
    let netns = sb.pod("client").expect("client pod").netns.clone();
    in_netns(&netns, move || {
        let mut hits = HashMap::new();
        for i in 0..n {
            let name = match proto {
                "tcp" => {
                    let out = tcp_request_here(SocketAddrV4::new(VIP, 80), b"NAME\n", TIMEOUT)
                        .unwrap_or_else(|e| {
                            panic!("TCP connection {i} through the ClusterIP: {e}")
                        });
                    String::from_utf8_lossy(&out).trim().to_owned()
                }
                _ => {
                    let (out, from) =
                        udp_request_here(SocketAddrV4::new(VIP, 80), b"NAME", TIMEOUT)
                            .unwrap_or_else(|e| {
                                panic!("UDP request {i} through the ClusterIP: {e}")
                            });
                    assert_eq!(
                        from,
                        SocketAddrV4::new(VIP, 80),
                        "UDP reply must come from the ClusterIP"
                    );
                    let text = String::from_utf8_lossy(&out).into_owned();
                    text.split(' ').next().unwrap_or_default().to_owned()
                }
            };
            *hits.entry(name).or_insert(0) += 1;
        }
        hits
    })
    .expect("entering the client namespace")
}

/// Asserts that the running svcproxy holds exactly [`caps::REQUIRED`]: effective, permitted
/// and bounding sets, nothing inheritable or ambient, and no way to gain more (no-new-privs).
fn assert_only_required_capabilities(proxy: &Proxy, hook: &str) {
    let status = proxy.proc_status();
    let required = caps::REQUIRED.iter().fold(0u64, |set, c| set | 1 << c.bit);
    for (field, want) in [
        ("CapEff:", required),
        ("CapPrm:", required),
        ("CapBnd:", required),
        ("CapInh:", 0),
        ("CapAmb:", 0),
    ] {
        let got = caps::status_field(&status, field);
        assert_eq!(
            got,
            Some(want),
            "{hook}: svcproxy's {field} is {got:#x?}, want {want:#x}"
        );
    }
    assert!(
        status.lines().any(|l| l == "NoNewPrivs:\t1"),
        "{hook}: svcproxy runs with no-new-privs"
    );
}

/// The capabilities as setpriv spells them (`bpf`, `net_admin`, ...).
fn required_for_setpriv() -> Vec<String> {
    caps::REQUIRED
        .iter()
        .map(|c| c.kubernetes_name().to_lowercase())
        .collect()
}

/// With `only_required_caps`, svcproxy runs with just [`caps::REQUIRED`] (checked on the
/// running process) instead of all of root's capabilities.
fn clusterip_end_to_end(hook: &str, only_required_caps: bool) {
    let mut sb = Sandbox::new(&format!("ci{hook}"), Ipv4Addr::new(172, 18, 0, 2)).expect("sandbox");
    sb.add_pod("client", CLIENT).expect("client pod");
    for (i, ip) in BACKENDS.iter().enumerate() {
        sb.add_pod(&format!("web-{i}"), *ip).expect("backend pod");
    }
    sb.add_pod("other", OTHER).expect("other pod");
    let manifests = Manifests::new();
    manifests.service("default", "web", VIP, &ports());
    manifests.slice("default", "web", &endpoints(&BACKENDS), &ports());
    let proxy = if only_required_caps {
        let caps = required_for_setpriv();
        let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
        Proxy::start_with_capabilities(&sb, manifests.dir(), hook, &caps)
    } else {
        Proxy::start(&sb, manifests.dir(), hook)
    };
    proxy.wait_until_serving(&sb, "client", SocketAddrV4::new(VIP, 80));
    if only_required_caps {
        assert_only_required_capabilities(&proxy, hook);
    }

    // `bpftool map dump` shows the Service and backend maps with field names (BTF), not only
    // raw bytes: with `-j` the BTF view is the `formatted` object, present only when the map
    // carries BTF.
    let frontends = common::bpftool_dump(proxy.pin_dir(), FRONTENDS4);
    let entries = frontends.as_array().expect("a JSON array of entries");
    assert_eq!(
        entries.len(),
        2,
        "{hook}: TCP and UDP frontends: {frontends}"
    );
    for e in entries {
        let f = &e["formatted"];
        assert!(
            f["key"]["addr_be"].is_u64() && f["key"]["proto"].is_u64(),
            "{hook}: {e}"
        );
        assert!(f["value"]["backend_count"] == 3, "{hook}: 3 backends: {e}");
    }
    let backends = common::bpftool_dump(proxy.pin_dir(), BACKENDS4);
    let backends = backends.as_array().expect("a JSON array of entries");
    assert_eq!(backends.len(), 6, "{hook}: 3 backends x 2 frontends");
    let vip_be = u64::from(u32::from_ne_bytes(VIP.octets()));
    assert!(
        entries
            .iter()
            .all(|e| e["formatted"]["key"]["addr_be"] == vip_be),
        "{hook}: keys hold the ClusterIP"
    );
    assert!(
        backends
            .iter()
            .all(|b| b["formatted"]["value"]["addr_be"].is_u64()
                && b["formatted"]["value"]["svc_id"].is_u64()),
        "{hook}: {backends:?}"
    );

    // Load balancing: each backend gets >= 15% of 200 new connections, TCP and UDP.
    for proto in ["tcp", "udp"] {
        let hits = spread(&sb, proto, 200);
        assert_eq!(
            hits.len(),
            3,
            "{hook}/{proto}: all three backends answer: {hits:?}"
        );
        for (pod, n) in &hits {
            assert!(
                *n >= 30,
                "{hook}/{proto}: {pod} got {n} of 200 (< 15%): {hits:?}"
            );
        }
    }

    // The datapath's outcome counters reach /metrics (refreshed every second). Once traffic
    // has stopped, the page shows exactly what the pinned counter holds: at least the 200 TCP
    // connections (a UDP request may reuse a source port whose flow is still live, and count
    // as established).
    thread::sleep(Duration::from_millis(1500));
    let page = common::scrape_metrics(&sb);
    let new_flows = common::metric_value(
        &page,
        "svcproxy_datapath_packets_total{outcome=\"fwd_new\"}",
    );
    let pinned = proxy.counter("fwd_new") as f64;
    assert!(
        new_flows == Some(pinned) && pinned >= 200.0,
        "{hook}: /metrics says {new_flows:?} new flows, the datapath counted {pinned}"
    );

    // A 1 MiB transfer in each direction completes intact.
    let client = sb.pod("client").expect("client").netns.clone();
    let (down, up) = in_netns(&client, || {
        let down = tcp_request_here(
            SocketAddrV4::new(VIP, 80),
            b"BULK 1048576\n",
            Duration::from_secs(10),
        );
        let mut req = b"SINK\n".to_vec();
        req.extend(bulk_pattern(1 << 20));
        let up = tcp_request_here(SocketAddrV4::new(VIP, 80), &req, Duration::from_secs(10));
        (down, up)
    })
    .expect("client namespace");
    let down = down.unwrap_or_else(|e| panic!("{hook}: 1 MiB download: {e}"));
    assert!(
        down == bulk_pattern(1 << 20),
        "{hook}: 1 MiB download arrived corrupted or short"
    );
    let up = up.unwrap_or_else(|e| panic!("{hook}: 1 MiB upload: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&up).trim(),
        "1048576",
        "{hook}: upload byte count"
    );

    // Traffic to a non-Service address is untouched: the pod sees the client's own address.
    let peer = svcproxy_tests::tcp_request(
        &client,
        SocketAddrV4::new(OTHER, DEFAULT_ECHO_PORT),
        b"PEER\n",
        TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{hook}: direct pod traffic: {e}"));
    assert!(
        String::from_utf8_lossy(&peer).starts_with(&format!("{CLIENT}:")),
        "{hook}: direct traffic must keep the client address, got {:?}",
        String::from_utf8_lossy(&peer)
    );

    // An endpoint removed from the manifests gets no new connections within 2 s.
    manifests.slice("default", "web", &endpoints(&BACKENDS[..2]), &ports());
    thread::sleep(Duration::from_secs(2));
    let hits = spread(&sb, "tcp", 100);
    assert!(
        !hits.contains_key("web-2"),
        "{hook}: removed endpoint still chosen: {hits:?}"
    );
    let hits = spread(&sb, "udp", 100);
    assert!(
        !hits.contains_key("web-2"),
        "{hook}: removed endpoint still chosen (UDP): {hits:?}"
    );

    // A Service removed from the manifests is no longer translated: nothing answers the VIP.
    manifests.remove("default", "web");
    thread::sleep(Duration::from_secs(2));
    let res = svcproxy_tests::tcp_request(&client, SocketAddrV4::new(VIP, 80), b"NAME\n", TIMEOUT);
    assert!(
        res.is_err(),
        "{hook}: removed Service still answered: {res:?}"
    );

    if only_required_caps {
        // Still the same after every update the scenario made.
        assert_only_required_capabilities(&proxy, hook);
    }
    proxy.stop();
}

#[test]
fn clusterip_tc() {
    clusterip_end_to_end("tc", false);
}

#[test]
fn clusterip_xdp() {
    clusterip_end_to_end("xdp", false);
}

#[test]
fn clusterip_tc_with_only_the_required_capabilities() {
    clusterip_end_to_end("tc", true);
}

/// `n` TCP connections from the client to the ClusterIP; the pods that answered, or the error.
fn names_through_vip(sb: &Sandbox, n: usize, timeout: Duration) -> Result<Vec<String>, String> {
    let netns = sb.pod("client").expect("client pod").netns.clone();
    in_netns(&netns, move || {
        (0..n)
            .map(|_| {
                tcp_request_here(SocketAddrV4::new(VIP, 80), b"NAME\n", timeout)
                    .map(|out| String::from_utf8_lossy(&out).trim().to_owned())
                    .map_err(|e| e.to_string())
            })
            .collect()
    })
    .expect("entering the client namespace")
}

/// The programs stay attached through their pinned links after svcproxy exits, so the Service
/// keeps working with no svcproxy running; `svcproxy cleanup` detaches and removes everything.
#[test]
fn the_datapath_outlives_svcproxy_until_cleanup() {
    let mut sb = Sandbox::new("cileft", Ipv4Addr::new(172, 18, 0, 2)).expect("sandbox");
    sb.add_pod("client", CLIENT).expect("client pod");
    for (i, ip) in BACKENDS.iter().enumerate() {
        sb.add_pod(&format!("web-{i}"), *ip).expect("backend pod");
    }
    let manifests = Manifests::new();
    manifests.service("default", "web", VIP, &ports());
    manifests.slice("default", "web", &endpoints(&BACKENDS), &ports());
    let proxy = Proxy::start(&sb, manifests.dir(), "tc");
    proxy.wait_until_serving(&sb, "client", SocketAddrV4::new(VIP, 80));
    let pins = proxy.stop_keeping_pins();

    for pod in sb.pods() {
        let link = pins.0.join("links").join(format!("tc-{}", pod.host_veth));
        assert!(link.exists(), "no pinned link {}", link.display());
    }
    let names = names_through_vip(&sb, 30, TIMEOUT)
        .unwrap_or_else(|e| panic!("the ClusterIP stopped working with svcproxy: {e}"));
    assert!(
        names.iter().all(|n| n.starts_with("web-")),
        "answered by {names:?}"
    );

    let cleanup = |what: &str| {
        let out = sb
            .node_command(common::svcproxy_bin())
            .args(["cleanup", "--pin-path"])
            .arg(&pins.0)
            .output()
            .expect("running svcproxy cleanup");
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cleanup("cleanup");
    assert!(!pins.0.exists(), "cleanup left {}", pins.0.display());
    // Nothing translates the ClusterIP any more: nobody answers it. The kernel releases an
    // unpinned link from a work queue, so the detach lands shortly after the unlink.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let probe = loop {
        let probe = names_through_vip(&sb, 1, Duration::from_millis(300));
        if probe.is_err() || std::time::Instant::now() > deadline {
            break probe;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert!(
        probe.is_err(),
        "still answered 3 s after cleanup: {probe:?}"
    );
    cleanup("a second cleanup finds nothing and succeeds");
}

/// The index of `iface` in the node namespace, from `ip -j link`.
fn node_ifindex(sb: &Sandbox, iface: &str) -> Option<u64> {
    let out = sb
        .node_command("ip")
        .args(["-j", "link", "show", "dev", iface])
        .output()
        .expect("running ip");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    links.get(0)?.get("ifindex")?.as_u64()
}

/// The index of the interface the tcx or XDP link pinned at `pin` is attached to, from the
/// kernel's link info (this machine's bpftool predates tcx links).
fn link_ifindex(pin: &std::path::Path) -> Option<u64> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).ok()?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut get = [0u64; 2];
    get[0] = path.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET reads the attr of the size given; the path outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, get.as_mut_ptr(), 16) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose tcx and xdp
    // members both start with the ifindex.
    let mut info = [0u32; 32];
    // BPF_OBJ_GET_INFO_BY_FD attr: bpf_fd (u32), info_len (u32), info (u64).
    let attr: [u64; 2] = [
        u64::from(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32)
            | (std::mem::size_of_val(&info) as u64) << 32,
        info.as_mut_ptr() as u64,
    ];
    // SAFETY: the kernel writes at most info_len bytes into `info`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 15, attr.as_ptr(), 16) };
    (rc == 0).then(|| u64::from(info[4]))
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; how long it took, if it held.
fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Pods start long after svcproxy does: an interface matching `--interfaces` that appears later
/// gets the datapath within a second, one re-created under the same name gets it again, one
/// removed is forgotten (its pin goes), and a pod started later reaches the ClusterIP. With
/// `--hook auto`, every veth gets tc (the pins are `tc-*`): veths are software devices.
#[test]
fn interfaces_that_appear_later_are_attached_within_a_second() {
    const LIMIT: Duration = Duration::from_secs(1);
    let mut sb = Sandbox::new("cilate", Ipv4Addr::new(172, 18, 0, 3)).expect("sandbox");
    sb.add_pod("client", CLIENT).expect("client pod");
    for (i, ip) in BACKENDS.iter().enumerate() {
        sb.add_pod(&format!("web-{i}"), *ip).expect("backend pod");
    }
    let manifests = Manifests::new();
    manifests.service("default", "web", VIP, &ports());
    manifests.slice("default", "web", &endpoints(&BACKENDS), &ports());
    let proxy = Proxy::start(&sb, manifests.dir(), "auto");
    proxy.wait_until_serving(&sb, "client", SocketAddrV4::new(VIP, 80));
    for pod in sb.pods() {
        assert!(
            pin_of(&proxy, &pod.host_veth).exists(),
            "{} has no tc link",
            pod.host_veth
        );
    }

    // A bare veth whose node side matches the glob (`<prefix>p*`) and whose peer does not.
    let late = format!("{}p900", sb.prefix());
    let pin = pin_of(&proxy, &late);
    let ip_node = |args: &str| {
        let out = sb
            .node_command("ip")
            .args(args.split(' '))
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let attached_to_current = |iface: &str, pin: &std::path::Path| {
        let now = node_ifindex(&sb, iface);
        now.is_some() && link_ifindex(pin) == now
    };
    let peer = format!("{}q900", sb.prefix());
    ip_node(&format!("link add {late} type veth peer name {peer}"));
    let took = within(LIMIT, || attached_to_current(&late, &pin));
    assert!(took.is_some(), "{late} not attached within {LIMIT:?}");
    assert!(
        !pin_of(&proxy, &peer).exists(),
        "attached to {peer}, which no glob matches"
    );

    // Deleted and re-created at once: the same name, another interface. The old link died
    // with the old interface; the new one must get a link of its own.
    let old = node_ifindex(&sb, &late);
    ip_node(&format!("link del {late}"));
    ip_node(&format!("link add {late} type veth peer name {peer}"));
    assert_ne!(node_ifindex(&sb, &late), old, "the kernel reused the index");
    let took = within(LIMIT, || attached_to_current(&late, &pin));
    assert!(
        took.is_some(),
        "re-created {late} not attached within {LIMIT:?}"
    );

    ip_node(&format!("link del {late}"));
    let took = within(LIMIT, || !pin.exists());
    assert!(
        took.is_some(),
        "the pin of deleted {late} still there after {LIMIT:?}"
    );

    // A whole pod, started now, is served.
    let pod = sb.add_pod("late", OTHER).expect("late pod");
    let took = within(LIMIT, || pin_of(&proxy, &pod.host_veth).exists());
    assert!(
        took.is_some(),
        "the late pod's veth not attached within {LIMIT:?}"
    );
    let vip = SocketAddrV4::new(VIP, 80);
    let answer = in_netns(&pod.netns, move || {
        tcp_request_here(vip, b"NAME\n", TIMEOUT).map_err(|e| e.to_string())
    })
    .expect("entering the late pod");
    let name = String::from_utf8_lossy(&answer.expect("the late pod reaches the ClusterIP"))
        .trim()
        .to_owned();
    assert!(name.starts_with("web-"), "answered by {name:?}");
}

fn pin_of(proxy: &Proxy, iface: &str) -> std::path::PathBuf {
    proxy.pin_dir().join("links").join(format!("tc-{iface}"))
}

/// `@default-route` in `--interfaces` selects the device of the node's IPv4 default route,
/// whatever its name, and follows the route when it moves to another device.
#[test]
fn the_default_route_device_is_attached_and_followed() {
    const LIMIT: Duration = Duration::from_secs(1);
    let sb = Sandbox::new("ciroute", Ipv4Addr::new(172, 18, 0, 4)).expect("sandbox");
    let ip_node = |args: String| {
        let out = sb
            .node_command("ip")
            .args(args.split(' '))
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Two uplink candidates that the sandbox's veth glob (`<prefix>p*`) does not match.
    let uplinks = ["u1", "u2"].map(|u| format!("{}{u}", sb.prefix()));
    for (i, up) in uplinks.iter().enumerate() {
        ip_node(format!(
            "link add {up} type veth peer name {}w{i}",
            sb.prefix()
        ));
        ip_node(format!("link set {up} up"));
    }
    ip_node(format!("route add default dev {}", uplinks[0]));
    let manifests = Manifests::new();
    let proxy = Proxy::start_with_options(
        &sb,
        manifests.dir(),
        "auto",
        &["--interfaces", "@default-route"],
    );
    let first = pin_of(&proxy, &uplinks[0]);
    assert!(
        within(Duration::from_secs(15), || first.exists()).is_some(),
        "the default-route device {} was not attached",
        uplinks[0]
    );
    assert!(
        !pin_of(&proxy, &uplinks[1]).exists(),
        "{} has no default route",
        uplinks[1]
    );

    ip_node(format!("route replace default dev {}", uplinks[1]));
    let second = pin_of(&proxy, &uplinks[1]);
    assert!(
        within(LIMIT, || second.exists() && !first.exists()).is_some(),
        "the default route moved to {}, the attachment did not follow within {LIMIT:?}",
        uplinks[1]
    );
}
