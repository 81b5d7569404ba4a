//! What every benchmark binary shares: the entry point, where results go, and the machine
//! description printed above each table (figures only mean something next to it).

#![allow(dead_code, reason = "each bench binary uses a different subset")]

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result};

/// `main` of a bench: runs it and turns an error into a message and a failing exit code.
pub fn main_with(run: fn() -> Result<()>) -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The one argument every bench takes: `--quick` (a smoke run that prints but writes no
/// results). `cargo bench` adds `--bench`, which is ignored; anything else is refused.
pub fn quick_flag(bench: &str) -> Result<bool> {
    let mut quick = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?}; usage: {bench} [--quick]"),
        }
    }
    Ok(quick)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits inside the workspace")
        .to_path_buf()
}

/// Writes through a temporary file so a reader never sees half a report.
pub fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let dir = path.parent().expect("results live in a directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// The kernel release, the CPU model and the CPU count.
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
}

impl Machine {
    pub fn this() -> Self {
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
        Self { kernel, cpu, cpus }
    }
}
