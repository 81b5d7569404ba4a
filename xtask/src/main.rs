//! Developer commands for svcproxy (`cargo xtask ...`): `setup` installs the toolchain,
//! `test` is the full CI pass, `run` is the demo.
mod bench;
mod run;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(bin_name = "cargo xtask", about = "svcproxy developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing needs (apt packages, rust-src, bpf-linker) and
    /// mount bpffs; each step is skipped when already done. Needs root.
    Setup,
    /// Setup, build everything (including the eBPF object), run all tests as root, then the
    /// demo once and the traffic benchmark's quick run; prints a per-phase timing summary.
    Test(test::TestArgs),
    /// The demo: svcproxy balancing a Service across pods in a network-namespace sandbox.
    Run(run::RunArgs),
    /// Benchmarks (PERF.md): print a table and write it under bench/results/.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::Test(args) => test::test(args),
        Cmd::Run(args) => run::run(args),
        Cmd::Bench(args) => bench::bench(args),
    };
    // One line with the whole context chain; a backtrace of the xtask itself (printed by
    // anyhow when RUST_BACKTRACE is set) would only bury the message.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
