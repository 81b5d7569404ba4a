//! `cargo xtask bench traffic`: traffic through a ClusterIP, side by side in one run, for no
//! proxy (pod IPs), kube-proxy's iptables and nftables rules, and svcproxy on the tc and the
//! XDP hook, each loaded with N Services x 10 endpoints (PERF.md, method 3).
//!
//! Every variant gets its own copy of one topology (client pod -> node -> ten backend pods,
//! over veths; see `traffic/topology.rs`) and the same Service list (`traffic/services.rs`).
//! For each N all variants are loaded at once and measured in turn, repetition by repetition,
//! so repetition i of every variant shares one stretch of time and the ratios between them
//! cancel the machine's drift. The load generator is the bench's own (`traffic/loadgen.rs`),
//! one thread pinned to one core in the client pod; the servers are one thread pinned to the
//! other core.
//!
//! Needs root, bpffs, iptables, nftables and iperf3 (`cargo xtask setup`), and the release
//! svcproxy binary in `SVCPROXY_BIN` (`cargo xtask bench traffic` builds and passes it).
//! `--quick`: N in {1, 1000}, 2 repetitions, short runs; prints the tables without writing
//! `bench/results/`.

mod cpu;
mod epoll;
mod feed;
mod iperf;
mod iptables;
mod loadgen;
mod nftables;
mod report;
mod server;
mod services;
mod softirq;
mod svcproxy;
mod svg;
mod topology;
mod variant;

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use report::{Metric, Results};
use svcproxy_tests::in_netns;
use variant::{Loaded, Variant};

/// Kept-alive connections the latency run cycles through (one per backend for `direct`).
const LATENCY_CONNECTIONS: usize = 10;
/// The fixed offered load of the softirq measurement, in new connections per second: below
/// what every variant sustains at every N, so all of them do the same work.
const FIXED_RATE: f64 = 1000.0;

struct Config {
    quick: bool,
    ns: Vec<usize>,
    reps: usize,
    conns: Duration,
    latency: Duration,
    udp: Duration,
    iperf_secs: u32,
    softirq: Duration,
}

impl Config {
    fn from_args() -> Result<Self> {
        let mut quick = false;
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--quick" => quick = true,
                // cargo bench passes this to every bench binary.
                "--bench" => {}
                other => bail!("unknown argument {other:?}; usage: traffic [--quick]"),
            }
        }
        Ok(if quick {
            Self {
                quick,
                ns: vec![1, 1_000],
                reps: 2,
                conns: Duration::from_millis(500),
                latency: Duration::from_millis(300),
                udp: Duration::from_millis(300),
                iperf_secs: 1,
                softirq: Duration::from_millis(500),
            }
        } else {
            Self {
                quick,
                ns: vec![1, 1_000, 10_000],
                reps: 5,
                conns: Duration::from_secs(2),
                latency: Duration::from_secs(1),
                udp: Duration::from_secs(1),
                iperf_secs: 2,
                softirq: Duration::from_secs(2),
            }
        })
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cfg = Config::from_args()?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the traffic benchmark builds network namespaces: run it as root (`cargo xtask bench traffic`)"
        );
    }
    let bin = PathBuf::from(std::env::var_os("SVCPROXY_BIN").context(
        "SVCPROXY_BIN is not set: run the bench with `cargo xtask bench traffic`, which builds \
         the release svcproxy and passes it",
    )?);
    let started = Instant::now();
    println!(
        "traffic bench: N in {:?}, {} repetitions{}",
        cfg.ns,
        cfg.reps,
        if cfg.quick { ", quick" } else { "" }
    );
    let mut results = Results::new(&cfg.ns, &Variant::ALL);
    let mut load_times = Vec::new();
    for &n in &cfg.ns {
        let mut loaded = Vec::new();
        for v in Variant::ALL {
            let l = variant::load(v, n, &bin)
                .with_context(|| format!("loading {} with {n} Services", v.name()))?;
            println!(
                "  N={n:>5} {:<13} loaded in {:.1}s",
                v.name(),
                l.load_time.as_secs_f64()
            );
            load_times.push((n, v, l.load_time));
            loaded.push(l);
        }
        // Warm caches, conntrack tables and the servers before the first measured repetition.
        for l in &loaded {
            on_client(l, {
                let targets = l.targets.clone();
                move || loadgen::conns(&targets, Duration::from_millis(200), None)
            })?;
        }
        for rep in 0..cfg.reps {
            for l in &loaded {
                measure(&cfg, l, n, &mut results).with_context(|| {
                    format!("{} at N={n}, repetition {}", l.variant.name(), rep + 1)
                })?;
            }
            println!(
                "  N={n:>5} repetition {}/{} done ({:.0}s so far)",
                rep + 1,
                cfg.reps,
                started.elapsed().as_secs_f64()
            );
        }
        // Dropping stops the proxies and deletes the namespaces, with their rules.
        drop(loaded);
    }
    let tables = results.tables();
    let targets = results.targets();
    println!("\n{tables}\nTargets (PERF.md):\n\n{targets}");
    println!("total {:.0}s", started.elapsed().as_secs_f64());
    if cfg.quick {
        println!("(quick run: bench/results/ left unchanged)");
        return Ok(());
    }
    let dir = workspace_root().join("bench/results");
    write_atomic(
        &dir.join("traffic.md"),
        &markdown(&cfg, &tables, &targets, &load_times, started.elapsed()),
    )?;
    write_atomic(&dir.join("traffic.json"), &results.json()?)?;
    write_atomic(
        &dir.join("traffic-conns.svg"),
        &plot(
            &results,
            &[Metric::ConnsPerS],
            "New TCP connections per second",
            "connections/s",
        ),
    )?;
    write_atomic(
        &dir.join("traffic-latency.svg"),
        &plot(
            &results,
            &[Metric::P50Us, Metric::P99Us],
            "Request/response latency (solid p50, dashed p99)",
            "us",
        ),
    )?;
    println!("wrote bench/results/traffic.{{md,json}} and traffic-{{conns,latency}}.svg");
    Ok(())
}

/// One repetition of every figure for one loaded variant.
fn measure(cfg: &Config, l: &Loaded, n: usize, results: &mut Results) -> Result<()> {
    let v = l.variant;
    let targets = l.targets.clone();
    let duration = cfg.conns;
    let conns = on_client(l, move || loadgen::conns(&targets, duration, None))?;
    warn_failures(l, "connections", conns.failed);
    results.push(n, v, Metric::ConnsPerS, conns.per_s());

    let targets = l.targets.clone();
    let duration = cfg.latency;
    let mut rtts = on_client(l, move || {
        loadgen::latency(&targets, LATENCY_CONNECTIONS, duration)
    })?;
    rtts.sort_unstable();
    results.push(n, v, Metric::P50Us, percentile(&rtts, 0.50) / 1000.0);
    results.push(n, v, Metric::P99Us, percentile(&rtts, 0.99) / 1000.0);

    let targets = l.targets.clone();
    let duration = cfg.udp;
    let udp = on_client(l, move || loadgen::udp(&targets, duration))?;
    warn_failures(l, "UDP requests", udp.failed);
    results.push(n, v, Metric::UdpPerS, udp.per_s());

    let gbits = iperf::run(
        &l.topology.client_netns,
        l.bulk,
        cfg.iperf_secs,
        cpu::CLIENT,
    )?;
    results.push(n, v, Metric::BulkGbit, gbits);

    let targets = l.targets.clone();
    let duration = cfg.softirq;
    let (fixed, pct) = on_client(l, move || -> Result<_> {
        let mark = softirq::mark()?;
        let outcome = loadgen::conns(&targets, duration, Some(FIXED_RATE))?;
        Ok((outcome, softirq::percent_since(&mark)?))
    })?;
    if fixed.per_s() < 0.95 * FIXED_RATE {
        eprintln!(
            "warning: {} at N={n} sustained only {:.0} of the fixed {FIXED_RATE} connections/s",
            v.name(),
            fixed.per_s()
        );
    }
    results.push(n, v, Metric::SoftirqPct, pct);
    Ok(())
}

fn warn_failures(l: &Loaded, what: &str, failed: u64) {
    if failed > 0 {
        eprintln!("warning: {}: {failed} failed {what}", l.variant.name());
    }
}

/// Runs `f` on a thread in the client pod pinned to the client core.
fn on_client<T: Send + 'static>(
    l: &Loaded,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    in_netns(&l.topology.client_netns, move || {
        cpu::pin_current_thread(cpu::CLIENT)?;
        f()
    })?
}

/// The value at quantile `q` of sorted `values` (nearest rank), as f64; NaN when empty.
fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

fn plot(results: &Results, metrics: &[Metric], title: &str, y_title: &str) -> String {
    let labels: Vec<String> = results.ns.iter().map(|n| n.to_string()).collect();
    let mut series = Vec::new();
    for (k, &metric) in metrics.iter().enumerate() {
        for &v in &results.variants {
            let points = results
                .ns
                .iter()
                .map(|&n| results.stat(n, v, metric).map(|s| (s.min, s.median, s.max)))
                .collect();
            let name = if metrics.len() > 1 {
                format!("{} {}", v.name(), metric.key().trim_end_matches("_us"))
            } else {
                v.name().to_owned()
            };
            series.push(svg::Series {
                name,
                dashed: k > 0,
                points,
            });
        }
    }
    svg::line_chart(
        title,
        "Services loaded (N, 10 endpoints each)",
        y_title,
        &labels,
        &series,
    )
}

fn markdown(
    cfg: &Config,
    tables: &str,
    targets: &str,
    load_times: &[(usize, Variant, Duration)],
    took: Duration,
) -> String {
    let host = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_else(|| "unknown".into())
    };
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let loads: Vec<String> = load_times
        .iter()
        .filter(|(_, v, _)| *v != Variant::Direct)
        .map(|(n, v, t)| format!("{} N={n}: {:.1}s", v.name(), t.as_secs_f64()))
        .collect();
    format!(
        "# Traffic through a ClusterIP, side by side\n\n\
         Produced by `cargo xtask bench traffic` in {:.0} s.\n\n\
         - date: {}\n- kernel: {kernel}\n- CPU: {cpu} ({cpus} CPUs)\n\
         - rule loaders: {}; {}; iperf3: {}\n\
         - {} repetitions of each figure per variant and N; medians with min - max; ratios are \
         medians of the per-repetition ratios (repetition i of every variant ran in the same \
         stretch of time)\n\n\
         Topology and methods: see the header of `tests/benches/traffic/main.rs`. Every variant has \
         its own client pod -> node -> 10 backend pods over veths, loaded with N Services x 10 \
         endpoints; the measured Service (in the middle of kube-proxy's Service list) has the 10 \
         real backends, the others unroutable endpoints; iperf3 goes through one more Service \
         with one endpoint. `direct` sends to the pod IPs. Load generator: one thread pinned to \
         CPU {} in the client pod; servers: one thread pinned to CPU {}. Runs: connections {:?} \
         with 16 in flight; latency {:?} over {LATENCY_CONNECTIONS} kept-alive connections, one \
         request at a time; UDP {:?}; iperf3 {} s; softirq over {:?} at a fixed {FIXED_RATE} new \
         connections/s (machine-wide /proc/stat, tick-sampled).\n\n\
         Only the iptables and nftables variants have netfilter rules, so only their node runs \
         conntrack; svcproxy and `direct` forward without it. XDP on a veth copies every packet \
         (PERF.md): its bulk figure shows that cost.\n\n\
         Load times (rules written or maps programmed, until the measured Service answered): \
         {}.\n\n\
         ![connections per second](traffic-conns.svg)\n\n\
         ![latency](traffic-latency.svg)\n\n\
         ## Targets (PERF.md; reported, not asserted)\n\n{targets}\n## Figures\n\n{tables}",
        took.as_secs_f64(),
        host("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        host("iptables-restore", &["--version"]),
        host("nft", &["--version"]),
        host("iperf3", &["--version"]),
        cfg.reps,
        cpu::CLIENT,
        cpu::server(),
        cfg.conns,
        cfg.latency,
        cfg.udp,
        cfg.iperf_secs,
        cfg.softirq,
        loads.join(", "),
    )
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits inside the workspace")
        .to_path_buf()
}

/// Writes through a temporary file so a reader never sees half a report.
fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let dir = path.parent().expect("results live in a directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
