//! `cargo xtask run --kubeconfig` end to end: the xtask binary, started in a sandbox node's
//! network namespace with a kubeconfig of the API-server stand-in (running in that namespace),
//! runs svcproxy there, which serves the stand-in's Service to a client pod; SIGTERM stops both
//! cleanly and leaves the maps pinned. With `--once` it stops by itself after the first sync,
//! with the Service in the pinned maps.
//! Needs root, bpffs and the built svcproxy binary (`cargo xtask test` provides all three).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use svcproxy_tests::{
    Sandbox,
    apiserver::{ApiServer, Endpoint, EndpointPort, ServicePort, endpoint_slice, node, service},
    command_in, in_netns,
    sandbox::DEFAULT_ECHO_PORT,
    tcp_request_here,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 0, 11), Ipv4Addr::new(10, 244, 0, 12)];
const NODE: &str = "node";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The `svcproxy` binary: `SVCPROXY_BIN`, else next to the xtask binary cargo built for us.
fn svcproxy_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SVCPROXY_BIN").filter(|b| !b.is_empty()) {
        return bin.into();
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_xtask")).with_file_name("svcproxy");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --bins` or set SVCPROXY_BIN",
        bin.display()
    );
    bin
}

/// A sandbox node with a client and two backend pods, the API-server stand-in in the node's
/// namespace holding Service `default/web` with both pods, and a kubeconfig for it. Fields drop
/// in order: the xtask (and its svcproxy) first, then the files, then the namespaces.
struct Node {
    xtask: Option<Child>,
    kubeconfig: PathBuf,
    pin_dir: PathBuf,
    _api: ApiServer,
    sb: Sandbox,
}

impl Node {
    fn new(tag: &str) -> Self {
        let mut sb = Sandbox::new(tag, NODE_IP).expect("sandbox");
        sb.add_pod("client", CLIENT).expect("client pod");
        for (i, ip) in BACKENDS.iter().enumerate() {
            sb.add_pod(&format!("web-{i}"), *ip).expect("backend pod");
        }
        let api = in_netns(sb.node_netns(), ApiServer::start).expect("entering the node netns");
        let apply = |obj| {
            api.apply(obj)
                .unwrap_or_else(|e| panic!("apply through the API: {e}"))
        };
        apply(node(NODE, &[]));
        apply(service(
            "default",
            "web",
            &VIP.to_string(),
            &[ServicePort::tcp("http", 80, DEFAULT_ECHO_PORT)],
        ));
        let endpoints: Vec<Endpoint> = BACKENDS
            .iter()
            .map(|ip| Endpoint::ready(&ip.to_string(), NODE))
            .collect();
        apply(endpoint_slice(
            "default",
            "web-abc12",
            "web",
            &endpoints,
            &[EndpointPort::tcp("http", DEFAULT_ECHO_PORT)],
        ));
        let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", sb.prefix()));
        api.kubeconfig(&kubeconfig).expect("write kubeconfig");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(format!(
            "xtask-node-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        Self {
            xtask: None,
            kubeconfig,
            pin_dir,
            _api: api,
            sb,
        }
    }

    /// `cargo xtask run --kubeconfig ...` (the built xtask binary) in the node's namespace.
    fn start_xtask(&mut self, extra: &[&str]) {
        let mut cmd: Command = command_in(self.sb.node_netns(), env!("CARGO_BIN_EXE_xtask"));
        cmd.arg("run")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--interfaces", &self.sb.veth_glob(), "--node-name", NODE])
            .arg("--pin-path")
            .arg(&self.pin_dir)
            .args(extra)
            // Not on the machine's root cgroup, where other tests run.
            .args(["--socket-lb", "off"])
            // The binary under test, not a fresh build (which would also run the full setup).
            .env("SVCPROXY_BIN", svcproxy_bin())
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        self.xtask = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("starting xtask: {e}")),
        );
    }

    /// Waits up to `limit` for the xtask to exit.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.xtask.as_mut().expect("started");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait for xtask") {
                self.xtask = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "xtask run did not exit within {limit:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pods answering 20 new connections from the client to the ClusterIP, or why not.
    fn answering(&self) -> Result<BTreeSet<String>, String> {
        let netns = self.sb.pod("client").expect("client pod").netns.clone();
        in_netns(&netns, || {
            let mut names = BTreeSet::new();
            for _ in 0..20 {
                let out = tcp_request_here(
                    SocketAddrV4::new(VIP, 80),
                    b"NAME\n",
                    Duration::from_millis(500),
                )
                .map_err(|e| e.to_string())?;
                names.insert(String::from_utf8_lossy(&out).trim().to_owned());
            }
            Ok(names)
        })
        .expect("entering the client netns")
    }
}

/// SIGTERM to `child`, which is not reaped yet, so its pid cannot name another process.
fn sigterm(child: &Child) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid fits a pid_t"));
    kill(pid, Signal::SIGTERM).expect("send SIGTERM to xtask");
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.xtask.take() {
            // SIGTERM lets xtask stop svcproxy; a kill would leave svcproxy running.
            sigterm(&child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

#[test]
fn run_with_a_kubeconfig_serves_that_clusters_services_on_this_node() {
    let mut node = Node::new("xnode");
    node.start_xtask(&[]);
    let want: BTreeSet<String> = ["web-0", "web-1"].map(String::from).into();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = node.answering();
        if got.as_ref() == Ok(&want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ClusterIP was not served by both pods within 30 s; last: {got:?}"
        );
        if let Some(status) = node
            .xtask
            .as_mut()
            .and_then(|c| c.try_wait().expect("wait"))
        {
            panic!("xtask run exited early ({status}); its output is above");
        }
        thread::sleep(Duration::from_millis(200));
    }

    sigterm(node.xtask.as_ref().expect("running"));
    let status = node.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "xtask run after SIGTERM: {status}");
    assert!(
        node.pin_dir.join("FRONTENDS4").exists(),
        "the maps stay pinned for the next start, as the DaemonSet's pod leaves them"
    );
}

#[test]
fn run_once_with_a_kubeconfig_stops_after_the_first_sync() {
    let mut node = Node::new("xonce");
    node.start_xtask(&["--once"]);
    let status = node.wait_exit(Duration::from_secs(45));
    assert!(status.success(), "xtask run --once: {status}");
    // It stopped after programming, not before: the pinned frontends hold the Service.
    let map = node.pin_dir.join("FRONTENDS4");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .unwrap_or_else(|e| panic!("running bpftool: {e}"));
    assert!(
        out.status.success(),
        "bpftool map dump pinned {}",
        map.display()
    );
    let entries: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
    assert_eq!(
        entries.as_array().map(Vec::len),
        Some(1),
        "one frontend (web, 80/TCP): {entries}"
    );
}
