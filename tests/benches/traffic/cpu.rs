//! Which core each side of the traffic runs on. The load generator and the servers each get
//! their own core so that neither steals the other's time, and so that a run measures the
//! same thing whatever else the scheduler would have done.

use anyhow::{Context as _, Result};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};

/// The load generator's and the iperf3 client's core.
pub const CLIENT: usize = 0;

/// The servers' (and the iperf3 server's) core: the second one if there is one.
pub fn server() -> usize {
    usize::from(std::thread::available_parallelism().map_or(1, |n| n.get()) > 1)
}

/// Pins the calling thread to `cpu` (sched_setaffinity on thread id 0 = this thread).
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} is out of range"))?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pin a thread to CPU {cpu}"))
}
