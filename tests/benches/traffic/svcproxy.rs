//! The svcproxy variants: the same Services written as Service and EndpointSlice manifests,
//! and the release `svcproxy` binary following them from the node namespace, attached to the
//! pods' host veths with the tc or the XDP hook (and, for the socket-level variant, to a
//! cgroup of the bench's own).

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use svcproxy_tests::Sandbox;

use super::services::{NAMESPACE, ServiceSet};

/// How long svcproxy may take to program 10k Services.
const READY_WITHIN: Duration = Duration::from_secs(120);

/// One file with every Service and EndpointSlice as concatenated JSON documents.
pub fn manifests(set: &ServiceSet) -> String {
    let mut out = String::new();
    for svc in &set.services {
        let ports: Vec<Value> = svc
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "port": p.port, "protocol": p.proto.upper(), "targetPort": p.target}))
            .collect();
        let ip = svc.cluster_ip.to_string();
        let service = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc.name, "namespace": NAMESPACE},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports},
        });
        let endpoints: Vec<Value> = svc
            .endpoints
            .iter()
            .map(|ep| json!({"addresses": [ep.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "node"}))
            .collect();
        let slice_ports: Vec<Value> = svc
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "port": p.target, "protocol": p.proto.upper()}))
            .collect();
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-bench", svc.name), "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": svc.name}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": slice_ports,
        });
        out.push_str(&service.to_string());
        out.push('\n');
        out.push_str(&slice.to_string());
        out.push('\n');
    }
    out
}

/// A running `svcproxy run`: stopped, and its manifest directory, log and pins deleted, on
/// drop (also during a panic).
pub struct Proxy {
    child: Option<Child>,
    dir: PathBuf,
    pin_dir: PathBuf,
}

impl Proxy {
    /// Writes the manifests and starts `bin` in `sb`'s node namespace; `tag` keeps its files
    /// apart from the other variant's.
    pub fn start(
        bin: &Path,
        sb: &Sandbox,
        set: &ServiceSet,
        hook: &str,
        tag: &str,
        extra: &[OsString],
    ) -> Result<Self> {
        let unique = format!("svcproxy-bench-{}-{tag}", std::process::id());
        let mut proxy = Self {
            child: None,
            dir: std::env::temp_dir().join(&unique),
            pin_dir: Path::new("/sys/fs/bpf").join(&unique),
        };
        let manifest_dir = proxy.dir.join("manifests");
        fs::create_dir_all(&manifest_dir)
            .with_context(|| format!("create {}", manifest_dir.display()))?;
        // Written before the start, so the first read already sees every Service.
        fs::write(manifest_dir.join("services.json"), manifests(set))
            .context("write the bench manifests")?;
        let log = fs::File::create(proxy.log()).context("create the svcproxy log")?;
        let child = sb
            .node_command(bin)
            .args(["run", "--manifests"])
            .arg(&manifest_dir)
            .args([
                "--interfaces",
                &sb.veth_glob(),
                "--hook",
                hook,
                "--pin-path",
            ])
            .arg(&proxy.pin_dir)
            .args(extra)
            .env("SVCPROXY_LOG", "info")
            // No colours: the log is searched for the sync line.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone the log file")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        proxy.child = Some(child);
        Ok(proxy)
    }

    /// Fails unless the socket-level hooks translated some socket (they record each in the
    /// pinned `SOCK_REVNAT4`): without this, a hook that never fired would be measured as the
    /// tc path under another name.
    pub fn check_socket_lb_used(&self) -> Result<()> {
        use aya::maps::{HashMap, Map, MapData};
        use proxy_common::sock::{SOCK_REVNAT4, SockRevEntry4, SockRevKey4};
        let path = self.pin_dir.join(SOCK_REVNAT4);
        let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
        let map = HashMap::<_, SockRevKey4, SockRevEntry4>::try_from(Map::LruHashMap(data))
            .context("SOCK_REVNAT4 is no LRU hash")?;
        if map.keys().next().is_none() {
            bail!("no socket was translated at connect(): the socket-level hooks did not run");
        }
        Ok(())
    }

    fn log(&self) -> PathBuf {
        self.dir.join("svcproxy.log")
    }

    /// Waits until svcproxy logged a sync that wrote at least `frontends` frontends.
    pub fn wait_synced(&mut self, frontends: usize) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < READY_WITHIN {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("svcproxy exited with {status}; its log:\n{}", self.tail());
            }
            let log = fs::read_to_string(self.log()).unwrap_or_default();
            if log
                .lines()
                .filter(|l| l.contains("synced"))
                .any(|l| written(l) >= frontends)
            {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "svcproxy did not write {frontends} frontends within {READY_WITHIN:?}; its log:\n{}",
            self.tail()
        )
    }

    fn tail(&self) -> String {
        let log = fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// The `written=K` field of a "synced" log line (0 if absent).
fn written(line: &str) -> usize {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("written="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid, which it still is (not yet reaped).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.pin_dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}
