//! `cargo xtask bench control-plane`: how fast the controller gets the API server's state into
//! the maps (PERF.md, method 4). The API-server stand-in holds N Services x 10 endpoints; the
//! real `svcproxy` binary (release build) follows it from a sandbox node, as in production.
//!
//! Figures per N:
//! - **cold sync**: from the first complete list to consistent maps, i.e. the first sync's own
//!   duration (snapshot, plan, every map write), read from svcproxy's
//!   `sync_proxy_rules_duration_seconds`; min/median/max over fresh starts with empty pins.
//!   Also "start to synced": process start to that sync's end (program load and the lists
//!   included).
//! - **change latency**: one EndpointSlice changed in the stand-in -> the Service's frontend
//!   entry in the pinned map shows the new revision (the writer bumps it after the new backend
//!   set is in place), polled every 50 us by this process; p50/p99 over >= 200 changes, one at
//!   a time. Includes the watch delivery; the changes are far enough apart that svcproxy's
//!   coalescing window (at most one sync per 5 ms by default) does not hold them back.
//! - **RSS**: svcproxy's resident set (VmRSS) after the changes, and its peak (VmHWM).
//! - **map memory**: `bytes_memlock` of every pinned map, as `bpftool map show` reports it.
//!
//! Needs root and bpffs (`cargo xtask setup`). `--quick`: N in {100, 1000}, fewer changes and
//! starts; the table is printed but not written under `bench/results/`.

// The end-to-end tests' helpers: scraping svcproxy's /metrics from the node namespace.
#[path = "../tests/common/mod.rs"]
mod common;
mod shared;

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{HashMap, Map, MapData};
use proxy_common::service::{FRONTENDS4, Frontend4Key, Service4};
use serde_json::{Value, json};
use svcproxy_tests::{
    Sandbox,
    apiserver::{ApiServer, Endpoint, EndpointPort, ServicePort, endpoint_slice, node, service},
    in_netns,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const NODE: &str = "node";
const ENDPOINTS_PER_SERVICE: usize = 10;
/// How long a start (load, list, first sync) or one change may take before the run fails.
const START_LIMIT: Duration = Duration::from_secs(120);
const CHANGE_LIMIT: Duration = Duration::from_secs(10);
/// Pause between changes, so each is measured alone rather than coalesced with the next.
const BETWEEN_CHANGES: Duration = Duration::from_millis(20);

struct Config {
    quick: bool,
    counts: Vec<usize>,
    starts: usize,
    changes: usize,
}

impl Config {
    fn from_args() -> Result<Self> {
        let quick = shared::quick_flag("control_plane")?;
        Ok(if quick {
            Self {
                quick,
                counts: vec![100, 1_000],
                starts: 2,
                changes: 40,
            }
        } else {
            Self {
                quick,
                counts: vec![100, 10_000],
                starts: 5,
                changes: 200,
            }
        })
    }
}

fn main() -> ExitCode {
    shared::main_with(run)
}

fn run() -> Result<()> {
    let cfg = Config::from_args()?;
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the control-plane benchmark runs svcproxy in network namespaces: run it as root \
         (`cargo xtask bench control-plane`)"
    );
    let bin = svcproxy_bin()?;
    println!(
        "control-plane bench: {} starts and {} changes per N, svcproxy {}{}",
        cfg.starts,
        cfg.changes,
        bin.display(),
        if cfg.quick { ", quick" } else { "" }
    );
    let mut rows = Vec::new();
    for &n in &cfg.counts {
        let row = measure(&cfg, &bin, n).with_context(|| format!("N = {n}"))?;
        println!("  N={n:>5}: {}", row.summary());
        rows.push(row);
    }
    let text = render(&rows);
    println!("\n{text}");
    if cfg.quick {
        println!("(quick run: bench/results/ left unchanged)");
    } else {
        let dir = shared::workspace_root().join("bench/results");
        shared::write_atomic(&dir.join("control-plane.md"), &markdown(&text))?;
        shared::write_atomic(&dir.join("control-plane.json"), &json_rows(&rows)?)?;
        println!("wrote bench/results/control-plane.md and bench/results/control-plane.json");
    }
    Ok(())
}

/// The release binary (benchmarks measure what ships): `SVCPROXY_BIN`, else
/// `target/release/svcproxy`, which `cargo xtask bench` builds first.
fn svcproxy_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SVCPROXY_BIN") {
        return Ok(p.into());
    }
    let bin = shared::workspace_root().join("target/release/svcproxy");
    ensure!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p proxy-userspace` (`cargo xtask \
         bench control-plane` does)",
        bin.display()
    );
    Ok(bin)
}

fn service_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + k as u32)
}

/// Endpoint `j` of Service `k`; `j` = 10 is the alternate address the changes swap in.
fn endpoint_ip(k: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (k * 16 + j) as u32)
}

fn svc_object(k: usize) -> Value {
    service(
        "bench",
        &format!("svc-{k}"),
        &service_ip(k).to_string(),
        &[ServicePort::tcp("http", 80, 8080)],
    )
}

/// Service `k`'s slice; with `swapped`, its last endpoint is the alternate address.
fn slice_object(k: usize, swapped: bool) -> Value {
    let endpoints: Vec<Endpoint> = (0..ENDPOINTS_PER_SERVICE)
        .map(|j| {
            let j = if swapped && j == ENDPOINTS_PER_SERVICE - 1 {
                ENDPOINTS_PER_SERVICE
            } else {
                j
            };
            Endpoint::ready(&endpoint_ip(k, j).to_string(), NODE)
        })
        .collect();
    endpoint_slice(
        "bench",
        &format!("svc-{k}-abcde"),
        &format!("svc-{k}"),
        &endpoints,
        &[EndpointPort::tcp("http", 8080)],
    )
}

fn frontend_key(k: usize) -> Frontend4Key {
    Frontend4Key {
        addr_be: u32::from_ne_bytes(service_ip(k).octets()),
        port_be: 80u16.to_be(),
        proto: 6,
        scope: 0,
    }
}

/// One svcproxy process following the stand-in; killed (and its pins removed) on drop.
struct Running {
    child: Child,
    pin_dir: PathBuf,
    started: Instant,
}

impl Running {
    fn start(sb: &Sandbox, bin: &Path, kubeconfig: &Path, n: usize, tag: usize) -> Result<Self> {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/svcproxy-cpbench-{}-{n}-{tag}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&pin_dir);
        // Room for the Services with some to spare; flows are not what this measures.
        let frontends = (n + 1024).next_power_of_two();
        let per_backend = (frontends * (ENDPOINTS_PER_SERVICE + 1)).to_string();
        let started = Instant::now();
        let child = sb
            .node_command(bin)
            .args(["run", "--kubeconfig"])
            .arg(kubeconfig)
            .args(["--node-name", NODE, "--interfaces", &sb.veth_glob()])
            .args(["--hook", "tc", "--pin-path"])
            .arg(&pin_dir)
            // The datapath is not measured here; no hooks on the machine's root cgroup.
            .args(["--socket-lb", "off"])
            .args(["--max-frontends", &frontends.to_string()])
            .args(["--max-slots", &per_backend, "--max-backends", &per_backend])
            .args(["--max-flows", "65536", "--max-affinity", "1024"])
            // Quiet unless asked (SVCPROXY_LOG=info shows each sync's time split).
            .env(
                "SVCPROXY_LOG",
                std::env::var("SVCPROXY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .context("starting svcproxy")?;
        Ok(Self {
            child,
            pin_dir,
            started,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first sync; returns (its own duration, start to its end).
    fn wait_synced(&mut self, sb: &Sandbox) -> Result<(f64, f64)> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("svcproxy exited with {status} before its first sync");
            }
            if let Ok(page) = common::try_scrape_metrics(sb) {
                let count = common::metric_value(
                    &page,
                    "kubeproxy_sync_proxy_rules_duration_seconds_count",
                );
                if count.is_some_and(|c| c >= 1.0) {
                    let synced_at = self.started.elapsed().as_secs_f64();
                    let sum = common::metric_value(
                        &page,
                        "kubeproxy_sync_proxy_rules_duration_seconds_sum",
                    )
                    .context("sync duration missing")?;
                    // More than one sync by now: the first is what a cold start costs, and
                    // later ones (nothing changed) are tiny next to it.
                    return Ok((sum, synced_at));
                }
            }
            ensure!(
                self.started.elapsed() < START_LIMIT,
                "no sync within {START_LIMIT:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

/// `VmRSS` and `VmHWM` of `pid`, in MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} missing"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Sum of `bytes_memlock` over the pinned maps, in MiB.
fn map_memory_mib(pin_dir: &Path) -> Result<f64> {
    let mut bytes = 0u64;
    for entry in fs::read_dir(pin_dir)? {
        let path = entry?.path();
        if path.is_dir() {
            continue; // the links
        }
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
            .context("running bpftool (`cargo xtask setup` installs it)")?;
        ensure!(
            out.status.success(),
            "bpftool map show {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        bytes += v["bytes_memlock"].as_u64().unwrap_or(0);
    }
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

#[derive(Clone, Copy, Debug)]
struct Stat {
    min: f64,
    median: f64,
    max: f64,
}

impl Stat {
    fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Self {
            min: v[0],
            median: v[v.len() / 2],
            max: v[v.len() - 1],
        }
    }
}

/// The value at quantile `q` (nearest rank) of `sorted`.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Row {
    n: usize,
    cold_sync_ms: Stat,
    start_to_synced_s: Stat,
    /// Sorted change latencies, ms.
    changes_ms: Vec<f64>,
    rss_mib: f64,
    peak_rss_mib: f64,
    map_mib: f64,
}

impl Row {
    fn p(&self, q: f64) -> f64 {
        quantile(&self.changes_ms, q)
    }

    fn summary(&self) -> String {
        format!(
            "cold sync {:.0} ms (median), change p50 {:.2} ms p99 {:.2} ms, RSS {:.1} MiB \
             (peak {:.1}), maps {:.1} MiB",
            self.cold_sync_ms.median,
            self.p(0.5),
            self.p(0.99),
            self.rss_mib,
            self.peak_rss_mib,
            self.map_mib
        )
    }
}

fn measure(cfg: &Config, bin: &Path, n: usize) -> Result<Row> {
    let mut sb = Sandbox::new("cpbench", NODE_IP)?;
    // Something to attach to; no traffic is sent.
    sb.add_pod("client", Ipv4Addr::new(10, 244, 0, 2))?;
    let api = in_netns(sb.node_netns(), ApiServer::start)?;
    api.apply(node(NODE, &[]))?;
    let loaded = Instant::now();
    for k in 0..n {
        api.apply(svc_object(k))?;
        api.apply(slice_object(k, false))?;
    }
    println!(
        "  N={n}: {n} Services and slices in the stand-in in {:.1}s",
        loaded.elapsed().as_secs_f64()
    );
    let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", sb.prefix()));
    api.kubeconfig(&kubeconfig)?;
    let _remove_kubeconfig = RemoveOnDrop(kubeconfig.clone());

    // Cold starts, each on empty pins.
    let (mut cold, mut start_to_synced) = (Vec::new(), Vec::new());
    for i in 0..cfg.starts {
        let mut proxy = Running::start(&sb, bin, &kubeconfig, n, i)?;
        let (sync_s, synced_at_s) = proxy.wait_synced(&sb)?;
        cold.push(sync_s * 1000.0);
        start_to_synced.push(synced_at_s);
    }

    // Changes against one more (warm) proxy.
    let mut proxy = Running::start(&sb, bin, &kubeconfig, n, cfg.starts)?;
    proxy.wait_synced(&sb)?;
    let map = MapData::from_pin(proxy.pin_dir.join(FRONTENDS4))?;
    let frontends: HashMap<_, Frontend4Key, Service4> = HashMap::try_from(Map::HashMap(map))?;
    let mut swapped = vec![false; n];
    let mut latencies = Vec::with_capacity(cfg.changes);
    for i in 0..cfg.changes {
        // Spread over the Services (7919 is prime, so it visits them all before repeating).
        let k = (i * 7919) % n;
        let key = frontend_key(k);
        let before = frontends.get(&key, 0)?;
        swapped[k] = !swapped[k];
        let t0 = Instant::now();
        api.apply(slice_object(k, swapped[k]))?;
        loop {
            let now = frontends.get(&key, 0)?;
            if now.revision != before.revision {
                ensure!(
                    now.backend_count as usize == ENDPOINTS_PER_SERVICE,
                    "Service {k} has {} backends after the change",
                    now.backend_count
                );
                break;
            }
            ensure!(
                t0.elapsed() < CHANGE_LIMIT,
                "change {i} (Service {k}) not in the maps after {CHANGE_LIMIT:?}"
            );
            thread::sleep(Duration::from_micros(50));
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
        thread::sleep(BETWEEN_CHANGES);
    }
    latencies.sort_by(f64::total_cmp);
    let (rss, peak) = rss_mib(proxy.pid())?;
    let map_mib = map_memory_mib(&proxy.pin_dir)?;
    drop(proxy);
    drop(api);
    Ok(Row {
        n,
        cold_sync_ms: Stat::of(&cold),
        start_to_synced_s: Stat::of(&start_to_synced),
        changes_ms: latencies,
        rss_mib: rss,
        peak_rss_mib: peak,
        map_mib,
    })
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn fmt_stat(s: Stat, prec: usize) -> String {
    format!("{:.prec$} ({:.prec$}-{:.prec$})", s.median, s.min, s.max)
}

fn render(rows: &[Row]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| Services x 10 endpoints | cold sync ms | start to synced s | change p50 ms | change \
         p99 ms | changes | RSS MiB (peak) | map memory MiB |"
    );
    let _ = writeln!(t, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.2} | {:.2} | {} | {:.1} ({:.1}) | {:.1} |",
            r.n,
            fmt_stat(r.cold_sync_ms, 0),
            fmt_stat(r.start_to_synced_s, 2),
            r.p(0.5),
            r.p(0.99),
            r.changes_ms.len(),
            r.rss_mib,
            r.peak_rss_mib,
            r.map_mib
        );
    }
    let _ = writeln!(
        t,
        "\nMedian (min-max) over fresh starts. Targets at 10,000 Services: cold sync <= 2000 ms, \
         change p99 <= 100 ms (stretch 10 ms), RSS <= 64 MiB."
    );
    if let Some(top) = rows.iter().find(|r| r.n == 10_000) {
        let check = |ok: bool| if ok { "met" } else { "MISSED" };
        let _ = writeln!(
            t,
            "At 10,000: cold sync {} ({:.0} ms), change p99 {} ({:.2} ms; stretch {}), RSS {} \
             ({:.1} MiB).",
            check(top.cold_sync_ms.median <= 2000.0),
            top.cold_sync_ms.median,
            check(top.p(0.99) <= 100.0),
            top.p(0.99),
            check(top.p(0.99) <= 10.0),
            check(top.rss_mib <= 64.0),
            top.rss_mib
        );
    }
    t
}

fn markdown(table: &str) -> String {
    let shared::Machine { kernel, cpu, cpus } = shared::Machine::this();
    format!(
        "# Control plane: API server to maps\n\n`cargo xtask bench control-plane`, taken {} on \
         kernel {}, {} ({} CPUs). Method: PERF.md method 4; details at the top of \
         `tests/benches/control_plane.rs`.\n\n{table}",
        jiff::Timestamp::now().strftime("%Y-%m-%d"),
        kernel,
        cpu,
        cpus
    )
}

fn json_rows(rows: &[Row]) -> Result<String> {
    let stat = |s: Stat| json!({"min": s.min, "median": s.median, "max": s.max});
    let mut out = Vec::new();
    for r in rows {
        let one = |metric: &str, s: Value| {
            let mut v = json!({"variant": "svcproxy", "n": r.n, "metric": metric});
            if let (Some(o), Some(s)) = (v.as_object_mut(), s.as_object()) {
                o.extend(s.clone());
            }
            v
        };
        out.push(one("cold_sync_ms", stat(r.cold_sync_ms)));
        out.push(one("start_to_synced_s", stat(r.start_to_synced_s)));
        // One figure per change: min/median/max of them all, and the p99 the target is on.
        out.push(one(
            "change_ms",
            json!({
                "min": r.changes_ms[0],
                "median": r.p(0.5),
                "p99": r.p(0.99),
                "max": r.changes_ms[r.changes_ms.len() - 1],
            }),
        ));
        out.push(one(
            "rss_mib",
            json!({"min": r.rss_mib, "median": r.rss_mib, "max": r.peak_rss_mib}),
        ));
        out.push(one(
            "map_memory_mib",
            json!({"min": r.map_mib, "median": r.map_mib, "max": r.map_mib}),
        ));
    }
    Ok(serde_json::to_string_pretty(&out)? + "\n")
}
