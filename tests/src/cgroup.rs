//! A cgroup of a test's own, for svcproxy's socket-level hooks (`--cgroup-path`): they act on
//! every process below the cgroup they are attached to, and attached to the machine's root they
//! would translate other tests' ClusterIPs too. The cgroup is *threaded*, so one test thread
//! can move in alone ([`TestCgroup::enter`]) while the rest of the test binary stays outside.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStringExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A threaded child of this process's cgroup (v2), removed on drop.
pub struct TestCgroup {
    path: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestCgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let mounts = fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
        let Some(root) = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        }) else {
            bail!("no cgroup2 filesystem is mounted");
        };
        // Ours: a thread may only move between cgroups of its process's threaded domain.
        let own = fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
        let Some(own) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
            bail!("this process is in no cgroup v2 cgroup");
        };
        let parent = root.join(own.trim_start_matches('/'));
        let name = format!(
            "svcproxy-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = parent.join(name);
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        let cg = Self { path };
        fs::write(cg.path.join("cgroup.type"), "threaded")
            .with_context(|| format!("make {} threaded", cg.path.display()))?;
        Ok(cg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the calling thread (only it) into the cgroup. Sockets it creates from then on
    /// belong to the cgroup, wherever they are used afterwards.
    pub fn enter(&self) -> Result<()> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        fs::write(self.path.join("cgroup.threads"), tid.to_string())
            .with_context(|| format!("move thread {tid} into {}", self.path.display()))
    }
}

/// Makes the child of `cmd` join the cgroup at `path` before it execs (so every thread it starts
/// is inside too).
pub fn join_on_exec(cmd: &mut Command, path: &Path) -> Result<()> {
    let file = CString::new(path.join("cgroup.threads").into_os_string().into_vec())
        .context("cgroup path with a NUL byte")?;
    // SAFETY: between fork and exec the closure only calls open/write/close, which are
    // async-signal-safe, on a path built before the fork; it allocates nothing. "0" names the
    // calling thread, the child's only one.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if written == 1 { Ok(()) } else { Err(err) }
        });
    }
    Ok(())
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Threads that were inside may still be exiting; removal also detaches every bpf
        // program attached to the cgroup.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}
