//! `cargo xtask bench ...`: the benchmarks of PERF.md. Each one runs setup, then its cargo bench
//! target as root from the workspace root; the bench prints its table and writes it under
//! `bench/results/`.
use anyhow::Result;

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
}

pub fn bench(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchWhat::Datapath { quick } => cargo_bench("datapath", quick),
        BenchWhat::ControlPlane { quick } => {
            setup::setup()?;
            // The bench runs the shipped (release) binary.
            let mut build = cargo();
            build
                .current_dir(workspace_root())
                .args([
                    "build",
                    "--release",
                    "-p",
                    "proxy-userspace",
                    "--bin",
                    "svcproxy",
                ])
                .env_remove("AYA_BUILD_SKIP");
            util::run(&mut build, "read the build output above")?;
            cargo_bench("control_plane", quick)
        }
    }
}

/// Runs one bench target of the tests crate (benches build with the optimised `bench` profile).
fn cargo_bench(name: &str, quick: bool) -> Result<()> {
    setup::setup()?;
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args(["bench", "-p", "svcproxy-tests", "--bench", name, "--"])
        // An empty eBPF object would only fail at load time; benches always build the real one.
        .env_remove("AYA_BUILD_SKIP");
    if quick {
        cmd.arg("--quick");
    }
    util::run(
        &mut cmd,
        "read the output above (eBPF build errors come from proxy-userspace's build script; \
         `cargo xtask setup` installs its toolchain)",
    )
}
