//! Softirq CPU time from /proc/stat. Packet forwarding through veths, and with it every
//! proxy's per-packet work, runs in softirq context, so its share of CPU at a fixed offered
//! load is the proxies' cost in CPU rather than in throughput.
//!
//! The counter is machine-wide: the figure includes whatever else the machine does meanwhile
//! (little softirq work on an idle host). Without CONFIG_IRQ_TIME_ACCOUNTING the kernel
//! samples it at each tick, so short windows are coarse.

use std::{fs, time::Instant};

use anyhow::{Context as _, Result, bail};

/// A reading of the softirq counter.
pub struct Mark {
    ticks: u64,
    at: Instant,
}

pub fn mark() -> Result<Mark> {
    let stat = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        bail!("/proc/stat has no `cpu` line");
    };
    // cpu user nice system idle iowait irq softirq ...
    let ticks = line
        .split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .context("/proc/stat's `cpu` line has no softirq field")?;
    Ok(Mark {
        ticks,
        at: Instant::now(),
    })
}

/// Softirq CPU time between `start` and now, and the wall time, both in seconds.
pub fn since(start: &Mark) -> Result<(f64, f64)> {
    let end = mark()?;
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    let cpu = (end.ticks - start.ticks) as f64 / hz as f64;
    Ok((cpu, end.at.duration_since(start.at).as_secs_f64()))
}
