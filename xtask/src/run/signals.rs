//! Turning Ctrl-C (and SIGTERM/SIGHUP) into a request to stop, so the demo always cleans up.
//!
//! The default action of these signals would end xtask on the spot, leaving namespaces, veths
//! and pinned maps behind. Instead a handler (signal-hook's self-pipe) wakes one thread, which
//! sets a flag and wakes whoever waits.
//!
//! A handler rather than blocking the signals and taking them with sigwait(2): std lets
//! children inherit the signal mask, so blocked signals would also be blocked in svcproxy,
//! cargo and everything else the demo starts, and svcproxy would never see its SIGTERM.
//! Handlers, unlike a mask, are reset to the default by exec.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};

/// The stop request shared by the demo's threads.
pub struct StopSignal {
    flag: Arc<AtomicBool>,
    received: Receiver<i32>,
}

impl StopSignal {
    /// Installs handlers for SIGINT, SIGTERM and SIGHUP and starts the thread that reacts.
    pub fn install() -> Result<Self> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
            .context("install handlers for SIGINT/SIGTERM/SIGHUP")?;
        let flag = Arc::new(AtomicBool::new(false));
        let (tx, received) = mpsc::channel();
        let thread_flag = Arc::clone(&flag);
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    let name = signal_name(signal);
                    if thread_flag.swap(true, Ordering::SeqCst) {
                        println!("{name} again: still cleaning up, please wait");
                    } else {
                        println!("\n{name}: stopping and cleaning up");
                    }
                    // The receiver lives as long as the demo; afterwards nobody listens.
                    let _ = tx.send(signal);
                }
            })
            .context("start the signal-handling thread")?;
        Ok(StopSignal { flag, received })
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The flag itself, for threads that must give up early.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.flag)
    }

    /// Waits up to `timeout` for a stop request; true once one was made.
    pub fn wait(&self, timeout: Duration) -> bool {
        if self.requested() {
            return true;
        }
        match self.received.recv_timeout(timeout) {
            Ok(_) => true,
            // Disconnected cannot happen while the signal thread loops; go by the flag.
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => self.requested(),
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "signal",
    }
}
