//! `cargo xtask bench traffic`: traffic through a ClusterIP, side by side in one run, for no
//! proxy (pod IPs), kube-proxy's iptables and nftables rules, and svcproxy on the tc and the
//! XDP hook and with socket-level balancing, each loaded with N Services x 10 endpoints
//! (PERF.md, method 3).
//!
//! Every variant gets its own copy of one topology (client pod -> node -> ten backend pods,
//! over veths; see `traffic/topology.rs`) and the same Service list (`traffic/services.rs`).
//! For each N all variants are loaded at once and measured in turn, in short slices that go
//! round the variants (`traffic/measure.rs`), so repetition i of every variant shares one
//! stretch of time and the ratios between them cancel the machine's drift. The load generator is the bench's own (`traffic/loadgen.rs`),
//! one thread pinned to one core in the client pod; the servers are one thread pinned to the
//! other core.
//!
//! Needs root, bpffs, iptables, nftables and iperf3 (`cargo xtask setup`), and the release
//! svcproxy binary in `SVCPROXY_BIN` (`cargo xtask bench traffic` builds and passes it).
//! `--quick`: N in {1, 1000}, 2 repetitions, short runs; prints the tables without writing
//! `bench/results/`. `SVCPROXY_BENCH_VARIANTS=svcproxy-tc,svcproxy-sock` and
//! `SVCPROXY_BENCH_NS=1,10000` measure only those (printed, not written either).

mod cpu;
mod epoll;
mod feed;
mod iperf;
mod iptables;
mod loadgen;
mod measure;
mod nftables;
mod output;
mod report;
mod server;
mod services;
#[path = "../shared/mod.rs"]
mod shared;
mod softirq;
mod svcproxy;
mod svg;
mod topology;
mod variant;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use measure::Durations;
use output::{markdown, plot};
use report::{Metric, Results};
use shared::{workspace_root, write_atomic};
use variant::Variant;

struct Config {
    quick: bool,
    /// Only some variants or Ns (`SVCPROXY_BENCH_VARIANTS`, `SVCPROXY_BENCH_NS`): results
    /// are then printed only, as for `--quick`, never written over the full run's.
    filtered: bool,
    variants: Vec<Variant>,
    ns: Vec<usize>,
    reps: usize,
    durations: Durations,
}

impl Config {
    fn from_args() -> Result<Self> {
        let quick = shared::quick_flag("traffic")?;
        let mut cfg = if quick {
            Self {
                quick,
                filtered: false,
                variants: Variant::ALL.to_vec(),
                ns: vec![1, 1_000],
                reps: 2,
                durations: Durations {
                    slices: 2,
                    conns: Duration::from_millis(500),
                    latency: Duration::from_millis(300),
                    udp: Duration::from_millis(300),
                    iperf_secs: 1,
                    softirq: Duration::from_millis(500),
                },
            }
        } else {
            Self {
                quick,
                filtered: false,
                variants: Variant::ALL.to_vec(),
                ns: vec![1, 1_000, 10_000],
                reps: 5,
                durations: Durations {
                    slices: 4,
                    conns: Duration::from_secs(2),
                    latency: Duration::from_secs(1),
                    udp: Duration::from_secs(1),
                    iperf_secs: 2,
                    softirq: Duration::from_secs(2),
                },
            }
        };
        if let Some(list) = std::env::var_os("SVCPROXY_BENCH_VARIANTS") {
            let list = list.to_string_lossy().into_owned();
            cfg.variants = list
                .split(',')
                .map(|name| {
                    Variant::by_name(name.trim()).with_context(|| {
                        let all: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
                        format!("SVCPROXY_BENCH_VARIANTS: no variant {name:?}; there are {all:?}")
                    })
                })
                .collect::<Result<_>>()?;
            cfg.filtered = true;
        }
        if let Some(list) = std::env::var_os("SVCPROXY_BENCH_NS") {
            cfg.ns = list
                .to_string_lossy()
                .split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .with_context(|| format!("SVCPROXY_BENCH_NS: {n:?}"))
                })
                .collect::<Result<_>>()?;
            cfg.filtered = true;
        }
        Ok(cfg)
    }
}

fn main() -> ExitCode {
    shared::main_with(run)
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
    let mut results = Results::new(&cfg.ns, &cfg.variants);
    let mut load_times = Vec::new();
    for &n in &cfg.ns {
        let mut loaded = Vec::new();
        for &v in &cfg.variants {
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
        measure::warm_up(&loaded)?;
        for rep in 0..cfg.reps {
            measure::repetition(&cfg.durations, &loaded, n, &mut results)
                .with_context(|| format!("N={n}, repetition {}", rep + 1))?;
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
    if cfg.quick || cfg.filtered {
        println!("(quick or filtered run: bench/results/ left unchanged)");
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
