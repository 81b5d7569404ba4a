//! `cargo xtask bench ...`: the benchmarks of PERF.md. Each one runs setup, then its cargo bench
//! target as root from the workspace root; the bench prints its table and writes it under
//! `bench/results/`.
use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::{
    setup,
    util::{self, cargo, workspace_root},
};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(clap::Subcommand)]
enum BenchWhat {
    /// Cost per packet of the datapath program (BPF_PROG_TEST_RUN) next to an empty and a
    /// one-lookup program, for 1 to 65535 Services x 10 backends; writes
    /// bench/results/datapath.{md,json}.
    Datapath {
        /// Smoke test: fewer, shorter runs; prints the table without writing results.
        #[arg(long)]
        quick: bool,
    },
    /// The controller against the API-server stand-in with 100 and 10,000 Services x 10
    /// endpoints: cold sync, endpoint change -> map latency (p50/p99), RSS and map memory;
    /// writes bench/results/control-plane.{md,json}.
    ControlPlane {
        /// Smoke test: 100 and 1,000 Services, fewer starts and changes; prints only.
        #[arg(long)]
        quick: bool,
    },
    /// Traffic through a ClusterIP side by side: pod IPs, kube-proxy's iptables and nftables
    /// rules, svcproxy on tc, on XDP and with socket-level balancing, with 1, 1k and 10k
    /// Services x 10 endpoints loaded; writes bench/results/traffic.{md,json} and its SVG
    /// plots. `SVCPROXY_BENCH_VARIANTS` (e.g. `svcproxy-tc,svcproxy-sock`) and
    /// `SVCPROXY_BENCH_NS` (e.g. `1,10000`) measure only those, and print without writing.
    Traffic {
        /// Smoke test: N in {1, 1000}, 2 repetitions, short runs; prints the tables without
        /// writing results.
        #[arg(long)]
        quick: bool,
    },
}

pub fn bench(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchWhat::Datapath { quick } => {
            setup::setup()?;
            cargo_bench("datapath", quick, None)
        }
        BenchWhat::ControlPlane { quick } => {
            setup::setup()?;
            let bin = release_svcproxy()?;
            cargo_bench("control_plane", quick, Some(bin))
        }
        BenchWhat::Traffic { quick } => {
            setup::setup()?;
            // The proxy under test is the optimised build users run, not the debug one the
            // tests use.
            let bin = release_svcproxy()?;
            cargo_bench("traffic", quick, Some(bin))
        }
    }
}

/// Builds `svcproxy` (and its eBPF object) in release mode and returns its path.
fn release_svcproxy() -> Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = cargo();
    cmd.current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "proxy-userspace",
            "--bin",
            "svcproxy",
        ])
        .env_remove("AYA_BUILD_SKIP");
    util::run(
        &mut cmd,
        "read the compiler output above (eBPF build errors come from proxy-userspace's build \
         script; `cargo xtask setup` installs its toolchain)",
    )?;
    let bin = util::target_dir(&root)?.join("release").join("svcproxy");
    if !bin.is_file() {
        bail!(
            "the release build succeeded but {} does not exist; check that proxy-userspace \
             still has a `svcproxy` [[bin]]",
            bin.display()
        );
    }
    Ok(bin)
}

/// Runs one bench target of the tests crate (benches build with the optimised `bench` profile);
/// `svcproxy` is passed to it as `SVCPROXY_BIN`.
fn cargo_bench(name: &str, quick: bool, svcproxy: Option<PathBuf>) -> Result<()> {
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args(["bench", "-p", "svcproxy-tests", "--bench", name, "--"])
        // An empty eBPF object would only fail at load time; benches always build the real one.
        .env_remove("AYA_BUILD_SKIP");
    if let Some(bin) = svcproxy {
        cmd.env("SVCPROXY_BIN", bin);
    }
    if quick {
        cmd.arg("--quick");
    }
    util::run(
        &mut cmd,
        "read the output above (eBPF build errors come from proxy-userspace's build script; \
         `cargo xtask setup` installs its toolchain)",
    )
}
