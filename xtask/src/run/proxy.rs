//! The svcproxy process of the demo: started in the node namespace with its log lines
//! prefixed, and stopped the way a node agent is (SIGTERM, SIGKILL after a grace period).

use std::{
    io::{BufRead as _, BufReader, Read, Write},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// How long svcproxy gets to detach after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);
/// Put in front of every line svcproxy prints, to tell its log from the demo's output.
const PREFIX: &str = "  svcproxy | ";

pub struct Proxy {
    /// `None` once the process was reaped.
    child: Option<Child>,
    status: Option<ExitStatus>,
    readers: Vec<JoinHandle<()>>,
    synced: Arc<AtomicBool>,
}

impl Proxy {
    /// Starts `cmd` with its stdout and stderr copied, line by line and prefixed, to ours.
    pub fn start(mut cmd: Command, shown: &str) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Through a pipe the log would otherwise carry colour codes into files and CI logs.
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            cmd.env("NO_COLOR", "1");
        }
        let mut child = cmd.spawn().with_context(|| format!("start `{shown}`"))?;
        let synced = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(copy_lines(out, false, Arc::clone(&synced)));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(copy_lines(err, true, Arc::clone(&synced)));
        }
        Ok(Proxy {
            child: Some(child),
            status: None,
            readers,
            synced,
        })
    }

    /// Whether svcproxy has logged that it programmed the maps.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// Fails if svcproxy has exited (it should run until stopped).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(child) = &mut self.child
            && let Some(status) = child.try_wait().context("check on svcproxy")?
        {
            self.status = Some(status);
            self.child = None;
        }
        match self.status {
            Some(status) => bail!("svcproxy exited unexpectedly ({status}); its log is above"),
            None => Ok(()),
        }
    }

    /// Sends SIGTERM, waits up to [`GRACE`], then kills. Returns how it ended; calling it
    /// again returns the same.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(mut child) = self.child.take() {
            let status = terminate(&mut child)?;
            self.status = Some(status);
        }
        // The pipes close when the process is gone, which ends the copying threads.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        self.status.context("svcproxy's exit status is unknown")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Only reached without an explicit stop (an early return or a panic); a process left
        // running would keep the sandbox's namespaces alive.
        if let Err(e) = self.stop() {
            let _ = writeln!(std::io::stderr(), "warning: stop svcproxy: {e:#}");
        }
    }
}

fn terminate(child: &mut Child) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait().context("check on svcproxy")? {
        return Ok(status);
    }
    let pid = i32::try_from(child.id()).context("svcproxy's pid does not fit a pid_t")?;
    // Not yet reaped, so the pid still names our child and cannot have been reused.
    kill(Pid::from_raw(pid), Signal::SIGTERM).context("send SIGTERM to svcproxy")?;
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().context("wait for svcproxy")? {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    println!("svcproxy did not stop within {GRACE:?} of SIGTERM; killing it");
    child.kill().context("kill svcproxy")?;
    child.wait().context("wait for the killed svcproxy")
}

fn copy_lines(
    stream: impl Read + Send + 'static,
    to_stderr: bool,
    synced: Arc<AtomicBool>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            if text.contains("synced") {
                synced.store(true, Ordering::SeqCst);
            }
            // A closed stdout/stderr must not end the copying: svcproxy would then block
            // on a full pipe.
            if to_stderr {
                let _ = writeln!(std::io::stderr(), "{PREFIX}{text}");
            } else {
                let _ = writeln!(std::io::stdout(), "{PREFIX}{text}");
            }
        }
    })
}
