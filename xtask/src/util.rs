//! Shared helpers for the xtask commands: locating the workspace, building child commands
//! that find cargo-installed tools, and running them with useful error messages.
use std::{
    env,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root: xtask lives one level below it.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// Where `cargo install` puts binaries (`$CARGO_HOME/bin`, else `~/.cargo/bin`).
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cargo").join("bin"))
}

/// `PATH` with cargo's bin dir in front, so tools that setup installs (bpf-linker) and
/// rustup (which aya-build needs to pick the nightly toolchain) are found even when the
/// user's shell never added `~/.cargo/bin`.
fn child_path() -> OsString {
    let current = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    if let Some(bin) = cargo_bin_dir() {
        dirs.retain(|d| d != &bin);
        dirs.insert(0, bin);
    }
    env::join_paths(dirs).unwrap_or(current)
}

/// A command whose program lookup and environment use [`child_path`].
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // std looks the program up in the PATH given to the child, so this also covers
    // programs that live only in cargo's bin dir.
    cmd.env("PATH", child_path());
    cmd
}

/// The cargo that runs this xtask (cargo sets `CARGO` for `cargo run`), so children use
/// the same toolchain; plain `cargo` when started some other way.
pub fn cargo() -> Command {
    command(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// A shell-like rendering of `cmd` for progress messages.
pub fn display(cmd: &Command) -> String {
    let mut parts = vec![short_program(cmd.get_program())];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// The toolchain's cargo has a long absolute path; print it as plain `cargo`.
fn short_program(program: &OsStr) -> String {
    let path = Path::new(program);
    match path.file_name() {
        Some(name) if path.is_absolute() && name == "cargo" => "cargo".into(),
        _ => program.to_string_lossy().into_owned(),
    }
}

/// Prints and runs `cmd` with inherited stdio; fails unless it exits successfully.
/// `hint` tells the user what to do about a failure.
pub fn run(cmd: &mut Command, hint: &str) -> Result<()> {
    let shown = display(cmd);
    println!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`; {hint}"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status}); {hint}");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its output, or `None` if the program does not exist.
/// Used for probes ("is X installed?"), where a non-zero exit is an answer, not an error.
pub fn probe(cmd: &mut Command) -> Result<Option<Output>> {
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("could not run `{}`", display(cmd))),
    }
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` and cargo config (via
/// `cargo metadata`, which knows both).
pub fn target_dir(root: &Path) -> Result<PathBuf> {
    let out = cargo()
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("could not run `cargo metadata` to find the target directory")?;
    if !out.status.success() {
        bail!(
            "`cargo metadata` failed: {}; fix the workspace manifests",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("`cargo metadata` printed invalid JSON")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("`cargo metadata` output has no target_directory")?;
    Ok(PathBuf::from(dir))
}
