//! Shared pieces of the end-to-end tests: a manifest directory the tests edit like an operator
//! would, and the `svcproxy` binary running in a sandbox's node namespace.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    ffi::{OsStr, OsString},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, PerCpuArray};
use proxy_common::stats::{STAT_NAMES, STATS};
use serde_json::{Value, json};
use svcproxy_tests::{Sandbox, in_netns, tcp_request_here};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test (in this or a parallel test process) uses.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The `svcproxy` binary: `SVCPROXY_BIN`, else next to the test executable's `deps/` dir.
pub fn svcproxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SVCPROXY_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("svcproxy"));
    match bin {
        Some(b) if b.exists() => b,
        _ => panic!("svcproxy binary not found: run `cargo build --bins` or set SVCPROXY_BIN"),
    }
}

pub struct SvcPort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    pub target: u16,
}

impl SvcPort {
    pub fn new(name: &str, port: u16, protocol: &str, target: u16) -> Self {
        Self {
            name: name.into(),
            port,
            protocol: protocol.into(),
            target,
        }
    }
}

pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub pod: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    pub fn ready(ip: Ipv4Addr, pod: &str) -> Self {
        Self {
            ip,
            pod: pod.into(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

/// A manifest directory, deleted on drop. Files are replaced atomically (write a hidden file,
/// rename), as `kubectl`-style tooling and ConfigMap mounts do.
pub struct Manifests {
    dir: PathBuf,
}

impl Manifests {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("svcproxy-manifests"));
        std::fs::create_dir_all(&dir).expect("manifest dir");
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write(&self, file: &str, value: &Value) {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(value).expect("json")).expect("write");
        std::fs::rename(&tmp, self.dir.join(file)).expect("rename");
    }

    pub fn service(&self, ns: &str, name: &str, ip: Ipv4Addr, ports: &[SvcPort]) {
        self.service_with(ns, name, ip, ports, json!({}), &[]);
    }

    /// Like [`service`](Self::service), with more `spec` fields (e.g.
    /// `{"sessionAffinity": "ClientIP"}`; they override the generated ones) and annotations.
    pub fn service_with(
        &self,
        ns: &str,
        name: &str,
        ip: Ipv4Addr,
        ports: &[SvcPort],
        extra_spec: Value,
        annotations: &[(&str, &str)],
    ) {
        let ports: Vec<Value> = ports
            .iter()
            .map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": p.target}))
            .collect();
        let mut spec =
            json!({"clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()], "ports": ports});
        let Value::Object(extra) = extra_spec else {
            panic!("extra spec of Service {ns}/{name} must be a JSON object, got {extra_spec}");
        };
        spec.as_object_mut()
            .expect("spec is an object")
            .extend(extra);
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        self.write(
            &format!("{ns}-{name}-svc.json"),
            &json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns, "annotations": annotations},
                "spec": spec,
            }),
        );
    }

    pub fn slice(&self, ns: &str, svc: &str, endpoints: &[Endpoint], ports: &[SvcPort]) {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|e| {
                json!({
                    "addresses": [e.ip.to_string()],
                    "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                    "nodeName": "node",
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": e.pod},
                })
            })
            .collect();
        let ports: Vec<Value> = ports
            .iter()
            .map(|p| json!({"name": p.name, "port": p.target, "protocol": p.protocol}))
            .collect();
        self.write(
            &format!("{ns}-{svc}-slice.json"),
            &json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{svc}-abc12"), "namespace": ns,
                    "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4", "endpoints": eps, "ports": ports,
            }),
        );
    }

    pub fn remove(&self, ns: &str, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(format!("{ns}-{name}-svc.json")));
        let _ = std::fs::remove_file(self.dir.join(format!("{ns}-{name}-slice.json")));
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `svcproxy run` in the sandbox's node namespace with its own pin directory. Stopped (SIGTERM,
/// then SIGKILL) and its pins removed on drop, also when the test panics.
pub struct Proxy {
    child: Option<Child>,
    pin_dir: PathBuf,
    /// How it was started, for [`restart`](Self::restart).
    args: Vec<OsString>,
    /// The program (and its arguments) that execs svcproxy, if any: see
    /// [`start_with_capabilities`](Self::start_with_capabilities).
    wrapper: Vec<OsString>,
}

/// The `setpriv` command line that execs its argument with only the capabilities `caps`
/// (lower-case names without `cap_`, as setpriv spells them), the way a container runtime starts
/// a container with `capabilities: {drop: [ALL], add: [...]}` and
/// `allowPrivilegeEscalation: false`.
///
/// As uid 0, exec gives a process every capability of its bounding set, so the bounding set is
/// what limits it; no-new-privs (what `allowPrivilegeEscalation: false` sets) also caps it at
/// the caller's permitted set, and the inheritable and ambient sets are emptied.
pub fn setpriv_with_only(caps: &[&str]) -> Vec<OsString> {
    let set: String = caps.iter().map(|c| format!(",+{c}")).collect();
    [
        "setpriv".to_owned(),
        format!("--bounding-set=-all{set}"),
        "--inh-caps=-all".to_owned(),
        "--ambient-caps=-all".to_owned(),
        "--no-new-privs".to_owned(),
        "--".to_owned(),
    ]
    .map(OsString::from)
    .to_vec()
}

impl Proxy {
    pub fn start(sb: &Sandbox, manifests: &Path, hook: &str) -> Self {
        Self::spawn(
            sb,
            &["--manifests".as_ref(), manifests.as_os_str()],
            hook,
            Vec::new(),
        )
    }

    /// Like [`start`](Self::start), with more options for `svcproxy run` (a repeated
    /// `--interfaces` adds to the sandbox's veth glob).
    pub fn start_with_options(sb: &Sandbox, manifests: &Path, hook: &str, extra: &[&str]) -> Self {
        let mut args = vec!["--manifests".as_ref(), manifests.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        Self::spawn(sb, &args, hook, Vec::new())
    }

    /// [`start_with_options`](Self::start_with_options) with only the capabilities `caps`
    /// (see [`setpriv_with_only`]).
    pub fn start_with_options_and_capabilities(
        sb: &Sandbox,
        manifests: &Path,
        hook: &str,
        extra: &[&str],
        caps: &[&str],
    ) -> Self {
        let mut args = vec!["--manifests".as_ref(), manifests.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        Self::spawn(sb, &args, hook, setpriv_with_only(caps))
    }

    /// Like [`start`](Self::start), with only the capabilities `caps` (see
    /// [`setpriv_with_only`]) instead of all of root's.
    pub fn start_with_capabilities(
        sb: &Sandbox,
        manifests: &Path,
        hook: &str,
        caps: &[&str],
    ) -> Self {
        Self::spawn(
            sb,
            &["--manifests".as_ref(), manifests.as_os_str()],
            hook,
            setpriv_with_only(caps),
        )
    }

    /// Like [`start`](Self::start), following the API server named in `kubeconfig` (which must
    /// be reachable from the node namespace) as the node called `node`.
    pub fn start_kube(sb: &Sandbox, kubeconfig: &Path, hook: &str) -> Self {
        Self::spawn(
            sb,
            &[
                "--kubeconfig".as_ref(),
                kubeconfig.as_os_str(),
                "--node-name".as_ref(),
                "node".as_ref(),
            ],
            hook,
            Vec::new(),
        )
    }

    fn spawn(sb: &Sandbox, source_args: &[&OsStr], hook: &str, wrapper: Vec<OsString>) -> Self {
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("svcproxy-e2e"));
        let mut args = vec![OsString::from("run")];
        args.extend(source_args.iter().map(|a| a.to_os_string()));
        args.extend(
            [
                "--interfaces",
                &sb.veth_glob(),
                "--hook",
                hook,
                "--pin-path",
            ]
            .map(OsString::from),
        );
        args.push(pin_dir.clone().into());
        // The socket-level hooks act on every process of their cgroup, by default the whole
        // machine, where other tests run: only the tests that ask for them (with a cgroup of
        // their own, `--cgroup-path`) get them.
        if !source_args.iter().any(|a| *a == "--socket-lb") {
            args.extend(["--socket-lb", "off"].map(OsString::from));
        }
        args.extend(
            [
                "--max-frontends",
                "1024",
                "--max-slots",
                "4096",
                "--max-backends",
                "4096",
                "--max-flows",
                "65536",
            ]
            .map(OsString::from),
        );
        let child = Self::run(sb, &wrapper, &args);
        Self {
            child: Some(child),
            pin_dir,
            args,
            wrapper,
        }
    }

    fn run(sb: &Sandbox, wrapper: &[OsString], args: &[OsString]) -> Child {
        Self::build(sb, wrapper, args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting svcproxy: {e}"))
    }

    fn build(sb: &Sandbox, wrapper: &[OsString], args: &[OsString]) -> std::process::Command {
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = sb.node_command(program);
                cmd.args(wrapper_args).arg(svcproxy_bin());
                cmd
            }
            None => sb.node_command(svcproxy_bin()),
        };
        cmd.args(args).env("SVCPROXY_LOG", "info");
        cmd
    }

    /// Stops svcproxy (it must exit cleanly) and starts it again with the same options and
    /// pins, as a rolling upgrade or a crash-restart does.
    pub fn restart(&mut self, sb: &Sandbox) {
        let mut child = self.child.take().expect("running");
        let status = terminate(&mut child);
        assert!(
            status.is_some_and(|s| s.success()),
            "svcproxy exited with {status:?}"
        );
        self.child = Some(Self::run(sb, &self.wrapper, &self.args));
    }

    /// Kills svcproxy with SIGKILL (no clean-up of any kind runs) and starts it again with the
    /// same options and pins, as a crash or an OOM kill followed by the DaemonSet's restart.
    pub fn kill_and_restart(&mut self, sb: &Sandbox) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL svcproxy");
        let status = child.wait().expect("reap svcproxy");
        assert!(!status.success(), "killed, yet exited with {status:?}");
        self.child = Some(Self::run(sb, &self.wrapper, &self.args));
    }

    /// Starts a second svcproxy over this one's pins, with the same options plus `extra`
    /// (e.g. other metrics and health addresses, which the running one still holds), as a
    /// surge upgrade does: the new process starts before the old one stops and takes the
    /// links over from it. Stop the old one with [`stop_keeping_pins`](Self::stop_keeping_pins)
    /// afterwards, or its drop removes the pins the new one uses.
    pub fn start_alongside(&self, sb: &Sandbox, extra: &[&str]) -> Self {
        let mut args = self.args.clone();
        args.extend(extra.iter().map(OsString::from));
        let child = Self::run(sb, &self.wrapper, &args);
        Self {
            child: Some(child),
            pin_dir: self.pin_dir.clone(),
            args,
            wrapper: self.wrapper.clone(),
        }
    }

    /// The command line this svcproxy was started with (same pins, same options), to run
    /// another one to completion over its pins and look at what it printed.
    pub fn command(&self, sb: &Sandbox) -> std::process::Command {
        Self::build(sb, &self.wrapper, &self.args)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The running svcproxy's `/proc/<pid>/status` (its capability sets among others). A
    /// wrapper such as setpriv execs svcproxy in its own process, so the pid is svcproxy's.
    pub fn proc_status(&self) -> String {
        let child = self.child.as_ref().expect("running");
        let path = format!("/proc/{}/status", child.id());
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    /// The datapath's outcome counters (`STATS`, summed over CPUs) by name.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, String> {
        let path = self.pin_dir.join(STATS);
        let map =
            MapData::from_pin(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let counters = PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(map))
            .map_err(|e| format!("{} is no per-CPU array: {e}", path.display()))?;
        STAT_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let per_cpu = counters
                    .get(&(i as u32), 0)
                    .map_err(|e| format!("reading {name}: {e}"))?;
                Ok((*name, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// One counter of [`counters`](Self::counters) (0 when unreadable).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters()
            .ok()
            .and_then(|c| c.into_iter().find(|(n, _)| *n == name))
            .map_or(0, |(_, v)| v)
    }

    /// The non-zero counters as `"fwd_new=3 reply=3"`, for failure messages: they tell which
    /// branch of the datapath the packets took.
    pub fn stats(&self) -> String {
        match self.counters() {
            Err(e) => format!("(counters unavailable: {e})"),
            Ok(c) => {
                let set: Vec<String> = c
                    .iter()
                    .filter(|(_, v)| *v != 0)
                    .map(|(n, v)| format!("{n}={v}"))
                    .collect();
                if set.is_empty() {
                    "(all zero)".into()
                } else {
                    set.join(" ")
                }
            }
        }
    }

    /// Waits (up to 15 s) until a TCP request from `pod` to `addr` is answered.
    pub fn wait_until_serving(&self, sb: &Sandbox, pod: &str, addr: SocketAddrV4) {
        let netns = sb.pod(pod).expect("pod").netns.clone();
        let ok = in_netns(&netns, move || {
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if tcp_request_here(addr, b"NAME\n", Duration::from_millis(300)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })
        .expect("netns");
        assert!(ok, "svcproxy did not start serving {addr} within 15 s");
    }

    /// Like [`stop`](Self::stop), but the pins (maps and links) stay: the datapath keeps
    /// running without svcproxy. The returned guard removes them when dropped.
    pub fn stop_keeping_pins(mut self) -> PinDir {
        let pins = PinDir(std::mem::take(&mut self.pin_dir));
        let mut child = self.child.take().expect("running");
        let status = terminate(&mut child);
        assert!(
            status.is_some_and(|s| s.success()),
            "svcproxy exited with {status:?}"
        );
        pins
    }

    /// Asks svcproxy to stop and checks it exits cleanly.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let status = terminate(&mut child);
        assert!(
            status.is_some_and(|s| s.success()),
            "svcproxy exited with {status:?}"
        );
    }
}

fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().ok();
    None
}

/// A pin directory left by a stopped svcproxy, removed (with its links, so the programs
/// detach) on drop, also while a test unwinds.
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
        // Empty once `stop_keeping_pins` handed the directory on.
        if !self.pin_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

/// GETs `/metrics` from svcproxy's default metrics address (127.0.0.1:10249) inside the
/// sandbox's node namespace, where the proxy runs.
pub fn scrape_metrics(sb: &Sandbox) -> String {
    try_scrape_metrics(sb).unwrap_or_else(|e| panic!("{e}"))
}

/// [`scrape_metrics`], for a proxy that may not be listening yet.
pub fn try_scrape_metrics(sb: &Sandbox) -> Result<String, String> {
    let netns = sb.node_netns().to_owned();
    in_netns(&netns, || {
        use std::io::{Read as _, Write as _};
        let mut conn = std::net::TcpStream::connect_timeout(
            &SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249).into(),
            Duration::from_secs(2),
        )
        .map_err(|e| format!("connecting to svcproxy's /metrics: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| format!("read timeout: {e}"))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .map_err(|e| format!("sending the request: {e}"))?;
        let mut body = String::new();
        conn.read_to_string(&mut body)
            .map_err(|e| format!("reading the response: {e}"))?;
        Ok(body)
    })
    .expect("entering the node namespace")
}

/// The value of one sample line (`name{labels} value`) in a metrics page.
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .trim()
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// `bpftool -j map dump pinned <pin dir>/<map>` as JSON: what an operator inspecting a live
/// svcproxy sees.
pub fn bpftool_dump(pin_dir: &Path, map: &str) -> Value {
    let path = pin_dir.join(map);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running bpftool (installed by `cargo xtask setup`): {e}"));
    assert!(
        out.status.success(),
        "bpftool map dump pinned {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool printed no JSON for {}: {e}", path.display()))
}
