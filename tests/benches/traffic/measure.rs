//! One repetition of every figure over all loaded variants, interleaved finely.
//!
//! On a shared machine the background load changes within seconds. Each figure is therefore
//! taken in short slices that go round the variants (slice 1 of every variant, then slice 2,
//! ...) and summed per variant, so the variants of one repetition see the same background
//! within a second or two and their ratio is fair even when the absolute figure drifts.

use std::time::Duration;

use anyhow::{Context as _, Result};
use svcproxy_tests::in_netns;

use super::{
    cpu, iperf, loadgen,
    report::{Metric, Results},
    softirq,
    variant::Loaded,
};

/// Kept-alive connections the latency run cycles through (one per backend for `direct`).
pub const LATENCY_CONNECTIONS: usize = 10;
/// The fixed offered load of the softirq measurement, in new connections per second: below
/// what every variant sustains at every N, so all of them do the same work.
pub const FIXED_RATE: f64 = 1000.0;

/// How long each figure runs per variant and repetition, and in how many slices.
pub struct Durations {
    pub slices: u32,
    pub conns: Duration,
    pub latency: Duration,
    pub udp: Duration,
    pub iperf_secs: u32,
    pub softirq: Duration,
}

/// Measures every figure once for each of `loaded` (all loaded with `n` Services).
pub fn repetition(d: &Durations, loaded: &[Loaded], n: usize, results: &mut Results) -> Result<()> {
    let count = loaded.len();
    let (mut done, mut failed) = (vec![0u64; count], vec![0u64; count]);
    let mut rtts = vec![Vec::new(); count];
    let mut udp_done = vec![0u64; count];
    let mut softirq_cpu = vec![0.0f64; count];
    let mut softirq_wall = vec![0.0f64; count];
    let mut fixed_done = vec![0u64; count];
    for _ in 0..d.slices {
        for (i, l) in loaded.iter().enumerate() {
            let (targets, slice) = (l.targets.clone(), d.conns / d.slices);
            let o = on_client(l, move || loadgen::conns(&targets, slice, None))?;
            done[i] += o.completed;
            failed[i] += o.failed;
        }
    }
    for _ in 0..d.slices {
        for (i, l) in loaded.iter().enumerate() {
            let (targets, slice) = (l.targets.clone(), d.latency / d.slices);
            rtts[i].extend(on_client(l, move || {
                loadgen::latency(&targets, LATENCY_CONNECTIONS, slice)
            })?);
        }
    }
    for _ in 0..d.slices {
        for (i, l) in loaded.iter().enumerate() {
            let (targets, slice) = (l.targets.clone(), d.udp / d.slices);
            let o = on_client(l, move || loadgen::udp(&targets, slice))?;
            udp_done[i] += o.completed;
            failed[i] += o.failed;
        }
    }
    for l in loaded {
        let cgroup = l.cgroup.as_ref().map(|c| c.path());
        let gbits = iperf::run(
            &l.topology.client_netns,
            cgroup,
            l.bulk,
            d.iperf_secs,
            cpu::CLIENT,
        )
        .with_context(|| format!("iperf3 through {}", l.variant.name()))?;
        results.push(n, l.variant, Metric::BulkGbit, gbits);
    }
    for _ in 0..d.slices {
        for (i, l) in loaded.iter().enumerate() {
            let (targets, slice) = (l.targets.clone(), d.softirq / d.slices);
            let (o, (cpu_s, wall_s)) = on_client(l, move || -> Result<_> {
                let mark = softirq::mark()?;
                let o = loadgen::conns(&targets, slice, Some(FIXED_RATE))?;
                Ok((o, softirq::since(&mark)?))
            })?;
            fixed_done[i] += o.completed;
            softirq_cpu[i] += cpu_s;
            softirq_wall[i] += wall_s;
        }
    }
    for (i, l) in loaded.iter().enumerate() {
        let v = l.variant;
        if failed[i] > 0 {
            eprintln!(
                "warning: {} at N={n}: {} failed connections or lost UDP requests",
                v.name(),
                failed[i]
            );
        }
        let fixed = fixed_done[i] as f64 / d.softirq.as_secs_f64();
        if fixed < 0.95 * FIXED_RATE {
            eprintln!(
                "warning: {} at N={n} sustained only {fixed:.0} of the fixed {FIXED_RATE} \
                 connections/s",
                v.name()
            );
        }
        results.push(
            n,
            v,
            Metric::ConnsPerS,
            done[i] as f64 / d.conns.as_secs_f64(),
        );
        rtts[i].sort_unstable();
        results.push(n, v, Metric::P50Us, percentile(&rtts[i], 0.50) / 1000.0);
        results.push(n, v, Metric::P99Us, percentile(&rtts[i], 0.99) / 1000.0);
        results.push(
            n,
            v,
            Metric::UdpPerS,
            udp_done[i] as f64 / d.udp.as_secs_f64(),
        );
        results.push(
            n,
            v,
            Metric::SoftirqPct,
            100.0 * softirq_cpu[i] / softirq_wall[i],
        );
    }
    Ok(())
}

/// A short connection run against every variant, to warm caches, conntrack tables and the
/// servers before the first measured repetition.
pub fn warm_up(loaded: &[Loaded]) -> Result<()> {
    for l in loaded {
        let targets = l.targets.clone();
        on_client(l, move || {
            loadgen::conns(&targets, Duration::from_millis(200), None)
        })?;
    }
    Ok(())
}

/// Runs `f` on a thread in the client pod pinned to the client core (and in the variant's
/// cgroup, for socket-level balancing).
fn on_client<T: Send + 'static>(
    l: &Loaded,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let cgroup = l.cgroup.clone();
    in_netns(&l.topology.client_netns, move || {
        cpu::pin_current_thread(cpu::CLIENT)?;
        if let Some(cg) = &cgroup {
            cg.enter()?;
        }
        f()
    })?
    .with_context(|| format!("load from the client pod of {}", l.variant.name()))
}

/// The value at quantile `q` of sorted `values` (nearest rank), as f64; NaN when empty.
fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}
