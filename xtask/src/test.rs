//! `cargo xtask test`: the whole CI pass — setup, build (including the eBPF object),
//! `cargo test` over the workspace as root, the README's demo (`cargo xtask run --once`),
//! then `cargo xtask bench traffic --quick` to check the benchmark runs — with a per-phase
//! timing summary at the end.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    setup,
    util::{self, cargo, workspace_root},
};

/// Test threads when `RUST_TEST_THREADS` is unset: every integration test builds its own
/// namespaces and loads its own programs, so a few in parallel is fast without overloading
/// small CI machines.
const DEFAULT_TEST_THREADS: usize = 2;

/// The whole workspace for the host: `--workspace` alone would also build `proxy-ebpf` for
/// the host, which cannot work (it is `no_std` BPF code; proxy-userspace's build script
/// builds it for the BPF target).
const WORKSPACE: [&str; 3] = ["--workspace", "--exclude", "proxy-ebpf"];

#[derive(clap::Args)]
pub struct TestArgs {
    /// Extra arguments for `cargo test`, as in `cargo xtask test -- -p svcproxy-tests`;
    /// arguments for the test binaries go after a second `--`, as in
    /// `cargo xtask test -- -p svcproxy-tests -- --nocapture`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn test(args: TestArgs) -> Result<()> {
    let mut phases = Phases::new();
    // Setup and build failures end the run (`?` inside); the summary is printed either way.
    let fatal = run_phases(&mut phases, &args);
    phases.summary();
    fatal?;
    let failed = phases.failed();
    if !failed.is_empty() {
        bail!("failed phases: {} (errors above)", failed.join(", "));
    }
    Ok(())
}

fn run_phases(phases: &mut Phases, args: &TestArgs) -> Result<()> {
    let root = workspace_root();

    phases.run("setup", setup::setup)?;

    let bin = phases.run("build", || {
        let mut cmd = cargo();
        cmd.current_dir(&root)
            .args(["build", "--bins"])
            .args(WORKSPACE)
            // An empty eBPF object would make every datapath test fail confusingly; CI
            // always builds the real one.
            .env_remove("AYA_BUILD_SKIP");
        util::run(
            &mut cmd,
            "read the compiler output above (eBPF build errors come from proxy-userspace's \
             build script; `cargo xtask setup` installs its toolchain)",
        )?;
        let bin = svcproxy_bin(&root)?;
        if !bin.is_file() {
            bail!(
                "the build succeeded but {} does not exist; check that proxy-userspace still \
                 has a `svcproxy` [[bin]]",
                bin.display()
            );
        }
        Ok(bin)
    })?;
    let prepare = |mut cmd: Command| {
        cmd.current_dir(&root)
            .env("SVCPROXY_BIN", &bin)
            .env_remove("AYA_BUILD_SKIP");
        cmd
    };

    // Test failures do not stop the demo, so CI output shows both; `test` reports them.
    let threads = test_threads()?;
    let tested = phases.run("test", || {
        let mut cmd = prepare(cargo());
        cmd.args(cargo_test_args(&args.cargo_test_args, threads));
        util::run(&mut cmd, "see the failing tests above")
    });
    if let Err(e) = tested {
        eprintln!("error: {e:#}");
    }

    // The README's first command, run non-interactively.
    let demo = phases.run("run --once", || {
        let mut cmd = prepare(cargo());
        // With KUBECONFIG set, `run` would follow that cluster instead of playing the demo.
        cmd.args(["xtask", "run", "--once"])
            .env_remove("KUBECONFIG");
        util::run(&mut cmd, "see the demo's output above")
    });
    if let Err(e) = demo {
        eprintln!("error: {e:#}");
    }

    // Only that the traffic benchmark still works end to end: its figures are not checked,
    // and --quick leaves bench/results/ alone.
    let bench = phases.run("bench traffic", || {
        let mut cmd = prepare(cargo());
        cmd.args(["xtask", "bench", "traffic", "--quick"]);
        util::run(&mut cmd, "see the benchmark's output above")
    });
    if let Err(e) = bench {
        eprintln!("error: {e:#}");
    }
    Ok(())
}

/// `<target dir>/debug/svcproxy`.
fn svcproxy_bin(root: &Path) -> Result<PathBuf> {
    Ok(util::target_dir(root)?.join("debug").join("svcproxy"))
}

/// Test-binary parallelism: `RUST_TEST_THREADS` (libtest's own variable) or the default.
fn test_threads() -> Result<usize> {
    match env::var("RUST_TEST_THREADS") {
        Ok(v) => v.trim().parse().ok().filter(|&n| n > 0).with_context(|| {
            format!("RUST_TEST_THREADS={v:?} is not a positive number; fix or unset it")
        }),
        Err(_) => Ok(DEFAULT_TEST_THREADS),
    }
}

/// `cargo test <WORKSPACE> --no-fail-fast <extra> -- --test-threads=N <harness args>`:
/// [`WORKSPACE`] is dropped when the caller picks packages, `--test-threads` when the
/// caller sets it. `--no-fail-fast` so one failing test binary does not hide the results
/// of the others.
fn cargo_test_args(extra: &[String], threads: usize) -> Vec<String> {
    let (cargo_args, harness_args) = match extra.iter().position(|a| a == "--") {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[][..]),
    };
    let picks_packages = cargo_args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package") || (a.starts_with("-p") && a.len() > 2));
    let mut args = vec!["test".to_owned()];
    if !picks_packages {
        args.extend(WORKSPACE.map(String::from));
    }
    if !cargo_args.iter().any(|a| a == "--no-fail-fast") {
        args.push("--no-fail-fast".into());
    }
    args.extend(cargo_args.iter().cloned());
    args.push("--".into());
    if !harness_args.iter().any(|a| a.starts_with("--test-threads")) {
        args.push(format!("--test-threads={threads}"));
    }
    args.extend(harness_args.iter().cloned());
    args
}

/// Phase timings and outcomes for the closing summary.
struct Phases {
    started: Instant,
    done: Vec<(&'static str, Duration, bool)>,
}

impl Phases {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Runs one phase under a banner, recording its time and outcome (callers decide whether
    /// a failure ends the run, and report it).
    fn run<T>(&mut self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        println!("\n==> {name}");
        let start = Instant::now();
        let result = f();
        self.done.push((name, start.elapsed(), result.is_ok()));
        result.with_context(|| format!("phase `{name}` failed"))
    }

    fn failed(&self) -> Vec<&'static str> {
        self.done.iter().filter(|p| !p.2).map(|p| p.0).collect()
    }

    fn summary(&self) {
        println!("\n==> summary");
        for (name, time, ok) in &self.done {
            let status = if *ok { "ok" } else { "FAILED" };
            println!("  {name:<14} {status:<7} {:>7.1}s", time.as_secs_f64());
        }
        let total = self.started.elapsed().as_secs_f64();
        println!("  {:<14} {:<7} {total:>7.1}s", "total", "");
    }
}

#[cfg(test)]
mod tests {
    use super::cargo_test_args;

    fn args(extra: &[&str]) -> String {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        cargo_test_args(&extra, 2).join(" ")
    }

    #[test]
    fn defaults_to_workspace_and_threads() {
        assert_eq!(
            args(&[]),
            "test --workspace --exclude proxy-ebpf --no-fail-fast -- --test-threads=2"
        );
    }

    #[test]
    fn package_selection_drops_workspace() {
        assert_eq!(
            args(&["-p", "svcproxy-tests", "--test", "sandbox"]),
            "test --no-fail-fast -p svcproxy-tests --test sandbox -- --test-threads=2"
        );
        assert_eq!(
            args(&["--package=xtask"]),
            "test --no-fail-fast --package=xtask -- --test-threads=2"
        );
    }

    #[test]
    fn harness_args_pass_through_and_threads_are_not_doubled() {
        assert_eq!(
            args(&["--", "--nocapture", "--test-threads=1"]),
            "test --workspace --exclude proxy-ebpf --no-fail-fast -- --nocapture --test-threads=1"
        );
        assert_eq!(
            args(&["--", "--nocapture"]),
            "test --workspace --exclude proxy-ebpf --no-fail-fast -- --test-threads=2 --nocapture"
        );
    }
}
