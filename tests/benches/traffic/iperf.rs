//! Bulk TCP throughput with iperf3: a server in a backend pod, the client in the client pod,
//! each pinned to its own core (as the bench's own server and load generator are).

use std::{
    net::SocketAddrV4,
    path::Path,
    process::{Child, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use svcproxy_tests::{cgroup::join_on_exec, cmd, command_in};

/// The port iperf3 serves on in the backend pod.
pub const PORT: u16 = 5201;

/// `iperf3 -s` in a pod's namespace; killed on drop.
pub struct Server {
    child: Child,
}

impl Server {
    pub fn start(netns: &str, cpu: usize) -> Result<Self> {
        let child = command_in(netns, "iperf3")
            .args(["-s", "-p", &PORT.to_string(), "-A", &cpu.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start iperf3 -s (installed by `cargo xtask setup`)")?;
        Ok(Self { child })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One iperf3 run of `secs` seconds from `netns` (and in `cgroup`, if any) to `target`;
/// returns the receiver's Gbit/s. Retries a few times while the server is still starting.
pub fn run(
    netns: &str,
    cgroup: Option<&Path>,
    target: SocketAddrV4,
    secs: u32,
    cpu: usize,
) -> Result<f64> {
    let mut last = None;
    for _ in 0..10 {
        let mut c = command_in(netns, "iperf3");
        if let Some(cg) = cgroup {
            join_on_exec(&mut c, cg)?;
        }
        c.args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
        ])
        .args(["-t", &secs.to_string(), "-A", &cpu.to_string(), "-J"]);
        match cmd::run(&mut c) {
            Ok(out) => return gbits(&out),
            Err(e) => last = Some(e),
        }
        thread::sleep(Duration::from_millis(200));
    }
    match last {
        Some(e) => Err(e.context(format!("iperf3 to {target}"))),
        None => bail!("iperf3 to {target}: no attempt made"),
    }
}

fn gbits(json: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 -J printed no JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3's JSON has no end.sum_received.bits_per_second")
}
