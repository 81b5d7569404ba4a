//! `svcproxy inspect` and `svcproxy explain` against the real binary in the netns sandbox: what
//! they report is checked against the manifests, against real connections (explain predicts the
//! backend a flow then really reaches), and again after svcproxy stopped, from the pins alone.
//! Also: every pinned map carries BTF, and missing pins or bad arguments give clear errors.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    path::Path,
    process::Output,
    time::Duration,
};

use common::{Endpoint, Manifests, Proxy, SvcPort};
use serde_json::Value;
use svcproxy_tests::{Sandbox, in_netns, sandbox::DEFAULT_ECHO_PORT};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const PODS: [(&str, Ipv4Addr); 3] = [
    ("web-0", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-1", Ipv4Addr::new(10, 244, 0, 12)),
    ("web-2", Ipv4Addr::new(10, 244, 0, 13)),
];
/// dev/web: random over web-0 and web-1; web-2 is terminating.
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// dev/hash: Maglev over all three, UDP.
const HASH: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// dev/empty: no endpoints.
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const TIMEOUT: Duration = Duration::from_secs(2);

fn ip_of(pod: &str) -> Ipv4Addr {
    match PODS.iter().find(|(name, _)| *name == pod) {
        Some((_, ip)) => *ip,
        None => panic!("answered by unknown pod {pod:?}"),
    }
}

fn cluster(sb: &mut Sandbox, manifests: &Manifests) {
    sb.add_pod("client", CLIENT).expect("client pod");
    for (name, ip) in PODS {
        sb.add_pod(name, ip).expect("backend pod");
    }
    let tcp = [SvcPort::new("http", 80, "TCP", DEFAULT_ECHO_PORT)];
    let udp = [SvcPort::new("dns", 80, "UDP", DEFAULT_ECHO_PORT)];
    let ready = |(name, ip): (&str, Ipv4Addr)| Endpoint::ready(ip, name);
    let draining = Endpoint {
        ready: false,
        serving: true,
        terminating: true,
        ..ready(PODS[2])
    };
    manifests.service("dev", "web", WEB, &tcp);
    manifests.slice(
        "dev",
        "web",
        &[ready(PODS[0]), ready(PODS[1]), draining],
        &tcp,
    );
    manifests.service_with(
        "dev",
        "hash",
        HASH,
        &udp,
        serde_json::json!({}),
        &[("svcproxy.io/lb-algorithm", "maglev")],
    );
    manifests.slice("dev", "hash", &PODS.map(ready), &udp);
    manifests.service("dev", "empty", EMPTY, &tcp);
}

fn svcproxy(args: &[&str], pins: &Path) -> Output {
    std::process::Command::new(common::svcproxy_bin())
        .args(args)
        .arg("--pin-path")
        .arg(pins)
        .output()
        .unwrap_or_else(|e| panic!("running svcproxy {args:?}: {e}"))
}

/// Runs an inspection that must succeed; its stdout.
fn stdout_of(args: &[&str], pins: &Path) -> String {
    let out = svcproxy(args, pins);
    assert!(
        out.status.success(),
        "svcproxy {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("svcproxy {args:?}: not UTF-8: {e}"))
}

fn json_of(args: &[&str], pins: &Path) -> Value {
    let mut args = args.to_vec();
    args.extend(["--output", "json"]);
    let text = stdout_of(&args, pins);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("svcproxy {args:?}: not JSON: {e}\n{text}"))
}

fn service<'a>(report: &'a Value, name: &str) -> &'a Value {
    let services = report["services"].as_array().expect("a services list");
    match services.iter().find(|s| s["name"] == name) {
        Some(s) => s,
        None => panic!("no Service {name} in {report:#}"),
    }
}

/// `inspect services` matches the manifests: names, backends with state and weight, reasons.
fn check_services(pins: &Path, when: &str) {
    let report = json_of(&["inspect", "services"], pins);
    let names: Vec<&str> = report["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(names, ["empty", "hash", "web"], "{when}: {report:#}");

    let web = service(&report, "web");
    assert_eq!(web["namespace"], "dev", "{when}");
    assert_eq!(web["port_name"], "http", "{when}");
    assert_eq!(web["frontend"], "10.96.0.10:80/TCP", "{when}");
    assert_eq!(web["algorithm"], "random", "{when}");
    assert_eq!(web["address_kind"], "ClusterIP", "{when}");
    let backends: Vec<(String, String, f64)> = web["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                format!("{}:{}", b["address"].as_str().unwrap_or("?"), b["port"]),
                b["state"].as_str().unwrap_or("?").to_owned(),
                b["weight"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect();
    let at = |i: usize| format!("{}:{DEFAULT_ECHO_PORT}", PODS[i].1);
    assert_eq!(
        backends,
        [
            (at(0), "active".into(), 0.5),
            (at(1), "active".into(), 0.5),
            (at(2), "terminating".into(), 0.0),
        ],
        "{when}"
    );

    let hash = service(&report, "hash");
    assert_eq!(hash["algorithm"], "maglev", "{when}");
    assert_eq!(hash["protocol"], "UDP", "{when}");
    let shares: Vec<f64> = hash["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter_map(|b| b["weight"].as_f64())
        .collect();
    assert_eq!(shares.len(), 3, "{when}: {hash:#}");
    assert!(
        (shares.iter().sum::<f64>() - 1.0).abs() < 1e-6
            && shares.iter().all(|s| (s - 1.0 / 3.0).abs() < 0.01),
        "{when}: Maglev shares {shares:?}"
    );
    let empty = service(&report, "empty");
    assert_eq!(empty["without_backends"], "reject", "{when}");
    assert_eq!(empty["backends"], Value::Array(vec![]), "{when}");
    assert!(
        report["outcomes"]["fwd_new"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{when}: {report:#}"
    );

    let table = stdout_of(&["inspect", "services"], pins);
    let row = table
        .lines()
        .find(|l| l.starts_with("dev/web "))
        .unwrap_or_else(|| panic!("{when}: no dev/web row in\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells[..6],
        [
            "dev/web",
            "http",
            "10.96.0.10:80/TCP",
            cells[3],
            "ClusterIP",
            "random"
        ],
        "{when}: {row}"
    );
    assert!(
        table.contains(&format!("{}  ", at(2))) && table.contains("terminating"),
        "{when}:\n{table}"
    );
}

/// The backend `explain` names for `src` -> `dst`, after checking how it decided.
fn explained(pins: &Path, src: &str, dst: &str, decided_by: &str, when: &str) -> Ipv4Addr {
    let e = json_of(&["explain", src, dst], pins);
    assert_eq!(e["verdict"], "forward", "{when}: {e:#}");
    assert_eq!(e["decided_by"], decided_by, "{when}: {e:#}");
    e["backend"]["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{when}: no backend address in {e:#}"))
}

/// One UDP request to dev/hash from a fixed client port; the pod that answered.
fn udp_from_port(sb: &Sandbox, port: u16) -> String {
    let netns = sb.pod("client").expect("client").netns.clone();
    in_netns(&netns, move || {
        let sock = UdpSocket::bind(SocketAddrV4::new(CLIENT, port))
            .unwrap_or_else(|e| panic!("bind UDP {CLIENT}:{port}: {e}"));
        sock.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        sock.send_to(b"NAME", SocketAddrV4::new(HASH, 80))
            .unwrap_or_else(|e| panic!("send from port {port}: {e}"));
        let mut buf = [0u8; 256];
        let (n, _) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no reply through dev/hash to port {port}: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.split(' ').next().unwrap_or_default().to_owned()
    })
    .expect("client namespace")
}

/// A TCP connection to dev/web held open (the flow stays established).
fn hold_connection(sb: &Sandbox) -> TcpStream {
    let netns = sb.pod("client").expect("client").netns.clone();
    in_netns(&netns, || {
        TcpStream::connect_timeout(&SocketAddrV4::new(WEB, 80).into(), TIMEOUT)
            .unwrap_or_else(|e| panic!("connecting to dev/web: {e}"))
    })
    .expect("client namespace")
}

/// The flow of `client` in `inspect flows --service dev/web`.
fn web_flow(pins: &Path, client: SocketAddrV4, when: &str) -> Value {
    let report = json_of(&["inspect", "flows", "--service", "dev/web"], pins);
    let flows = report["flows"].as_array().expect("flows");
    assert!(
        flows.iter().all(|f| f["service"] == "dev/web"),
        "{when}: the filter let others through: {report:#}"
    );
    match flows.iter().find(|f| f["client"] == client.to_string()) {
        Some(f) => f.clone(),
        None => panic!("{when}: no flow of {client} in {report:#}"),
    }
}

#[test]
fn inspect_and_explain_match_the_datapath_while_running_and_after_it_stopped() {
    let mut sb = Sandbox::new("insp", Ipv4Addr::new(172, 18, 0, 2)).expect("sandbox");
    let manifests = Manifests::new();
    cluster(&mut sb, &manifests);
    let proxy = Proxy::start(&sb, manifests.dir(), "tc");
    proxy.wait_until_serving(&sb, "client", SocketAddrV4::new(WEB, 80));
    let pins = proxy.pin_dir().to_owned();

    check_services(&pins, "running");
    every_map_carries_btf(&pins);

    // Maglev: explain predicts the backend of a new flow from each source port, and the
    // datapath then sends the flow there; after it, the flow is known to conntrack.
    let mut reached = std::collections::BTreeSet::new();
    for port in 41000..41012u16 {
        let src = format!("{CLIENT}:{port}");
        let predicted = explained(&pins, &src, "10.96.0.11:80/udp", "maglev", "new flow");
        let answered = ip_of(&udp_from_port(&sb, port));
        assert_eq!(
            answered, predicted,
            "port {port}: explain said {predicted}, the datapath chose {answered}"
        );
        let known = explained(&pins, &src, "10.96.0.11:80/udp", "conntrack", "after it");
        assert_eq!(
            known, answered,
            "port {port}: conntrack holds another backend"
        );
        reached.insert(answered);
    }
    assert!(
        reached.len() >= 2,
        "12 source ports all hashed to {reached:?}"
    );

    // An established TCP flow: `inspect flows` shows it with its Service and backend, and
    // explain says the flow stays there.
    let conn = hold_connection(&sb);
    let client = match conn.local_addr() {
        Ok(std::net::SocketAddr::V4(a)) => a,
        other => panic!("local address of the held connection: {other:?}"),
    };
    let flow = web_flow(&pins, client, "running");
    assert_eq!(flow["frontend"], "10.96.0.10:80");
    assert_eq!(flow["state"], "established", "{flow:#}");
    assert_eq!(
        (&flow["live"], &flow["backend_current"]),
        (&Value::Bool(true), &Value::Bool(true))
    );
    let backend: SocketAddrV4 = flow["backend"]
        .as_str()
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("no backend in {flow:#}"));
    assert!(
        backend.ip() == &PODS[0].1 || backend.ip() == &PODS[1].1,
        "a new flow went to {backend}, not an active backend"
    );
    let src = client.to_string();
    let stays = explained(&pins, &src, "10.96.0.10:80/tcp", "conntrack", "held flow");
    assert_eq!(&stays, backend.ip());
    let flows_table = stdout_of(&["inspect", "flows"], &pins);
    assert!(
        flows_table
            .lines()
            .any(|l| l.contains(&src) && l.contains("dev/web") && l.contains("established")),
        "{flows_table}"
    );

    // A new flow without a port, and the other verdicts.
    let e = json_of(&["explain", "10.244.0.2", "10.96.0.10:80/tcp"], &pins);
    assert_eq!(e["decided_by"], "random", "{e:#}");
    let candidates: Vec<&str> = e["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .filter_map(|c| c["address"].as_str())
        .collect();
    assert_eq!(candidates, ["10.244.0.11", "10.244.0.12"], "{e:#}");
    let e = json_of(&["explain", "10.244.0.2:40000", "10.96.0.12:80/tcp"], &pins);
    assert_eq!(
        (&e["verdict"], &e["decided_by"]),
        (&"reject".into(), &"no_backend".into())
    );
    let e = json_of(&["explain", "10.244.0.2", "10.96.0.99:80/tcp"], &pins);
    assert_eq!(e["verdict"], "pass", "{e:#}");
    let text = stdout_of(&["explain", &src, "10.96.0.10:80/tcp"], &pins);
    assert!(
        text.contains(&format!("verdict: forward to {backend}")) && text.contains("conntrack"),
        "{text}"
    );

    // svcproxy stopped: the pins answer the same.
    let pins = proxy.stop_keeping_pins();
    check_services(&pins.0, "stopped");
    let flow = web_flow(&pins.0, client, "stopped");
    assert_eq!(flow["backend"], backend.to_string());
    let stays = explained(&pins.0, &src, "10.96.0.10:80/tcp", "conntrack", "stopped");
    assert_eq!(&stays, backend.ip());
    for port in 41000..41003u16 {
        explained(
            &pins.0,
            &format!("{CLIENT}:{port}"),
            "10.96.0.11:80/udp",
            "conntrack",
            "stopped",
        );
    }
    drop(conn);
}

/// `bpftool map show` gives a `btf_id` only to maps that carry BTF, which is what lets
/// `bpftool map dump` print field names; the metadata map's names are fields too.
fn every_map_carries_btf(pins: &Path) {
    let entries = std::fs::read_dir(pins).unwrap_or_else(|e| panic!("{}: {e}", pins.display()));
    let mut maps: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    maps.sort();
    assert!(maps.len() >= 11, "pinned maps: {maps:?}");
    for map in &maps {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(pins.join(map))
            .output()
            .unwrap_or_else(|e| panic!("running bpftool: {e}"));
        let info: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("bpftool map show {map}: {e}"));
        assert!(
            info["btf_id"].as_u64().is_some_and(|id| id > 0),
            "map {map} has no BTF: {info}"
        );
    }
    let meta = common::bpftool_dump(pins, proxy_common::meta::SVC_META);
    let entries = meta.as_array().expect("entries");
    assert_eq!(entries.len(), 3, "one record per frontend: {meta}");
    for e in entries {
        let f = &e["formatted"]["value"];
        assert!(
            f["namespace"].is_array() && f["name"].is_array() && f["reasons"].is_u64(),
            "{e}"
        );
    }
}

#[test]
fn missing_pins_and_bad_arguments_are_clear_errors() {
    let nowhere = Path::new("/sys/fs/bpf").join(common::unique("svcproxy-never-ran"));
    for args in [
        &["inspect", "services"][..],
        &["inspect", "flows"],
        &["explain", "10.244.0.2", "10.96.0.10:80/tcp"],
    ] {
        let out = svcproxy(args, &nowhere);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&nowhere.display().to_string()) && err.contains("svcproxy run"),
            "{args:?}: the error names the pin path and what to do: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    for (args, want) in [
        (
            ["explain", "10.244.0.2:99999", "10.96.0.10:80/tcp"],
            "is not a port",
        ),
        (
            ["explain", "10.244.0.2", "10.96.0.10:80/gre"],
            "is not tcp, udp or sctp",
        ),
        (
            ["explain", "010.244.0.2", "10.96.0.10:80/tcp"],
            "no leading zeros",
        ),
    ] {
        let out = svcproxy(&args, &nowhere);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
