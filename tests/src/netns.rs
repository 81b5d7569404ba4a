//! Entering named network namespaces (the ones `ip netns add` pins under `/run/netns`): child
//! processes through [`command_in`], threads through [`in_netns`] / [`spawn_in_netns`].
//!
//! Only the *network* namespace is switched. `ip netns exec` would also unshare the mount
//! namespace and remount /sys, which hides the bpffs at /sys/fs/bpf that the proxy pins its
//! maps in.

use std::{
    ffi::OsStr,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    thread::{self, JoinHandle},
};

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

/// Where iproute2 bind-mounts named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The file that pins the named network namespace.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(netns)
}

/// Whether a named network namespace exists (as `ip netns list` would show it).
pub fn netns_exists(netns: &str) -> bool {
    netns_path(netns).exists()
}

/// The names of all named network namespaces (what `ip netns list` shows), sorted.
pub fn list_netns() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(entries) => entries,
        // No namespace was ever added on this machine.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("list {NETNS_RUN_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("list {NETNS_RUN_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn open_netns(netns: &str) -> Result<File> {
    let path = netns_path(netns);
    File::open(&path).with_context(|| {
        format!(
            "open network namespace {netns} ({}); does it exist?",
            path.display()
        )
    })
}

/// A [`Command`] for `program` whose child runs in the network namespace `netns` (and in the
/// caller's mount namespace, so /sys/fs/bpf stays visible).
///
/// The namespace is opened now, in the parent; if that fails, `spawn()`/`output()` fail with
/// the OS error of the open (e.g. "No such file or directory"), so check [`netns_exists`]
/// first when a clearer message matters.
pub fn command_in(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // Keep only the errno: `pre_exec` can report nothing richer to `spawn()` anyway.
    let target: std::result::Result<File, i32> =
        File::open(netns_path(netns)).map_err(|e| e.raw_os_error().unwrap_or(libc::ENOENT));
    // SAFETY: between fork and exec the closure only calls setns(2), which is
    // async-signal-safe, on a descriptor opened before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || match &target {
            Ok(file) => {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }
            Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
        });
    }
    cmd
}

/// Runs `f` on a fresh thread that has entered the network namespace `netns`, and returns its
/// result. Sockets created by `f` stay in that namespace wherever they are used afterwards.
///
/// A panic inside `f` is resumed on the caller's thread, so assertions inside work as usual.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let handle = spawn_in_netns(netns, f)?;
    match handle.join() {
        Ok(value) => Ok(value),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Like [`in_netns`] but does not wait for `f`: returns once the thread is inside `netns`
/// (or fails if it could not get there), for clients that must run while the test goes on.
pub fn spawn_in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    let target = open_netns(netns)?;
    let name = netns.to_owned();
    let (entered_tx, entered_rx) = mpsc::channel::<Result<()>>();
    let handle = thread::Builder::new()
        .name(format!("netns {netns}"))
        .spawn(move || {
            // The network namespace is per thread, so this moves only this thread.
            let entered = setns(&target, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into network namespace {name}"));
            drop(target);
            let failed = entered.is_err();
            // The receiver waits for exactly this message, so sending cannot fail.
            let _ = entered_tx.send(entered);
            if failed {
                // Never run `f` outside the namespace; the caller already got the error.
                std::panic::resume_unwind(Box::new("setns failed"));
            }
            f()
        })
        .with_context(|| format!("spawn a thread for network namespace {netns}"))?;
    match entered_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(anyhow!(
                "thread for network namespace {netns} died before entering it"
            ))
        }
    }
}
