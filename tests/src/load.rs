//! Load through a Service while something happens to the proxy (an upgrade, a crash): new TCP
//! connections at a steady rate ([`ConnectionLoad`]), and one long TCP stream whose bytes must
//! keep arriving in order ([`LongStream`]). Both run on threads inside a client pod's network
//! namespace and report every failure with its cause, so "no connection lost" is a statement
//! about each connection, not a sample.
//!
//! Built to hold its rate on a small, busy machine: starts are paced by deadline (connection `i`
//! is due at `i / rate` after the start, so a slow moment is caught up rather than stretching the
//! run), a fixed pool of workers bounds how many exchanges are in flight, and the timeout is
//! long enough for a retransmitted SYN. A slow connection is reported as slow; only a refusal,
//! a reset, a timeout or a wrong reply is a loss.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{client::tcp_request_here, echo::bulk_byte, netns::spawn_in_netns};

/// How [`ConnectionLoad`] runs.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// New connections per second.
    pub rate: u32,
    /// Exchanges in flight at most (one thread each).
    pub workers: usize,
    /// Bound on one whole exchange (connect, request, reply). Generous: the kernel retransmits
    /// a lost SYN after 1 s and again after 3 s, and such a connection is slow, not lost.
    pub timeout: Duration,
    /// An exchange taking longer than this is counted as slow (a sign of a dropped packet).
    pub slow: Duration,
    /// A start later than this behind its due time is counted as late (the pool or the CPU
    /// could not keep up), so the report tells whether the rate was really offered.
    pub late: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            rate: 1000,
            workers: 64,
            timeout: Duration::from_secs(10),
            slow: Duration::from_secs(1),
            late: Duration::from_millis(100),
        }
    }
}

/// One connection of the load: when it started (since the load began), how long it took,
/// and which pod answered or why it failed.
#[derive(Clone, Debug)]
pub struct Connection {
    pub index: u64,
    pub started: Duration,
    pub took: Duration,
    pub outcome: Result<String, String>,
}

/// What a finished [`ConnectionLoad`] saw, connection by connection.
#[derive(Debug)]
pub struct LoadReport {
    pub rate: u32,
    /// From the first start to the stop.
    pub duration: Duration,
    /// Every connection attempted, in start order.
    pub connections: Vec<Connection>,
    /// Connections started more than [`LoadOptions::late`] behind schedule.
    pub late: u64,
    pub slow_threshold: Duration,
}

impl LoadReport {
    pub fn attempted(&self) -> usize {
        self.connections.len()
    }

    pub fn failures(&self) -> impl Iterator<Item = &Connection> {
        self.connections.iter().filter(|c| c.outcome.is_err())
    }

    pub fn succeeded(&self) -> usize {
        self.connections.len() - self.failures().count()
    }

    /// Connections that succeeded but took longer than the slow threshold.
    pub fn slow(&self) -> usize {
        self.connections
            .iter()
            .filter(|c| c.outcome.is_ok() && c.took > self.slow_threshold)
            .count()
    }

    /// How many connections each pod answered.
    pub fn answered_by(&self) -> BTreeMap<&str, usize> {
        let mut by = BTreeMap::new();
        for c in &self.connections {
            if let Ok(name) = &c.outcome {
                *by.entry(name.as_str()).or_insert(0) += 1;
            }
        }
        by
    }

    /// Failures grouped by cause (the error text without the connection's own details), most
    /// frequent first: "412 x TCP connect to 10.96.0.10:80 failed: Connection refused".
    pub fn failure_summary(&self) -> Vec<String> {
        let mut by_cause: BTreeMap<&str, usize> = BTreeMap::new();
        for c in self.failures() {
            if let Err(cause) = &c.outcome {
                *by_cause.entry(cause.as_str()).or_insert(0) += 1;
            }
        }
        let mut causes: Vec<(&str, usize)> = by_cause.into_iter().collect();
        causes.sort_by_key(|c| std::cmp::Reverse(c.1));
        causes
            .into_iter()
            .map(|(cause, n)| format!("{n} x {cause}"))
            .collect()
    }

    /// Succeeded connections that started inside `[from, to]` (offsets since the load began):
    /// proof that the load really overlapped an event.
    pub fn succeeded_between(&self, from: Duration, to: Duration) -> usize {
        self.connections
            .iter()
            .filter(|c| c.outcome.is_ok() && c.started >= from && c.started <= to)
            .count()
    }

    /// One line for the test log.
    pub fn summary(&self) -> String {
        let secs = self.duration.as_secs_f64().max(f64::EPSILON);
        let slowest = self.connections.iter().map(|c| c.took).max();
        format!(
            "{} connections in {:.1} s ({:.0}/s offered at {}/s), {} succeeded, {} failed, {} \
             slow (> {:?}, slowest {:?}), {} started late; answered by {:?}",
            self.attempted(),
            secs,
            self.attempted() as f64 / secs,
            self.rate,
            self.succeeded(),
            self.attempted() - self.succeeded(),
            self.slow(),
            self.slow_threshold,
            slowest.unwrap_or_default(),
            self.late,
            self.answered_by(),
        )
    }
}

/// New TCP connections to a Service at a steady rate, each a `NAME` request whose reply (the
/// answering pod's name, which must be one of the expected backends) proves it went through.
pub struct ConnectionLoad {
    begun: Instant,
    /// Nanoseconds after `begun` from which no connection starts; `u64::MAX` while running.
    stop_at: Arc<AtomicU64>,
    workers: Vec<JoinHandle<(Vec<Connection>, u64)>>,
    completed: Arc<AtomicU64>,
    options: LoadOptions,
}

impl ConnectionLoad {
    /// Starts the workers inside `netns`; connections go to `addr`, and a reply must name one
    /// of `backends`.
    pub fn start(
        netns: &str,
        addr: SocketAddrV4,
        backends: &[String],
        options: LoadOptions,
    ) -> Result<Self> {
        anyhow::ensure!(
            options.rate > 0 && options.workers > 0,
            "a load needs a rate and workers"
        );
        let begun = Instant::now();
        let stop_at = Arc::new(AtomicU64::new(u64::MAX));
        let next = Arc::new(AtomicU64::new(0));
        let completed = Arc::new(AtomicU64::new(0));
        let backends: Arc<[String]> = backends.into();
        let mut workers = Vec::with_capacity(options.workers);
        for _ in 0..options.workers {
            let (stop_at, next, completed, backends, options) = (
                stop_at.clone(),
                next.clone(),
                completed.clone(),
                backends.clone(),
                options.clone(),
            );
            workers.push(spawn_in_netns(netns, move || {
                let mut done = Vec::new();
                let mut late = 0;
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let due_ns = index * 1_000_000_000 / u64::from(options.rate);
                    if due_ns >= stop_at.load(Ordering::Relaxed) {
                        break;
                    }
                    let due = begun + Duration::from_nanos(due_ns);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    // The stop may have come while this worker waited for its slot.
                    if due_ns >= stop_at.load(Ordering::Relaxed) {
                        break;
                    }
                    let start = Instant::now();
                    if start.duration_since(due) > options.late {
                        late += 1;
                    }
                    let outcome = match tcp_request_here(addr, b"NAME\n", options.timeout) {
                        Ok(reply) => {
                            let name = String::from_utf8_lossy(&reply).trim().to_owned();
                            if backends.contains(&name) {
                                Ok(name)
                            } else {
                                Err(format!("reply {name:?} is from no backend"))
                            }
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    completed.fetch_add(1, Ordering::Relaxed);
                    done.push(Connection {
                        index,
                        started: start.duration_since(begun),
                        took: start.elapsed(),
                        outcome,
                    });
                }
                (done, late)
            })?);
        }
        Ok(Self {
            begun,
            stop_at,
            workers,
            completed,
            options,
        })
    }

    /// Time since the load began: the clock of [`Connection::started`].
    pub fn elapsed(&self) -> Duration {
        self.begun.elapsed()
    }

    /// Exchanges finished so far (succeeded or not).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Stops starting connections, waits for those in flight (at most the timeout), and
    /// reports.
    pub fn finish(mut self) -> LoadReport {
        let stop = self.begun.elapsed();
        self.stop_at
            .store(stop.as_nanos() as u64, Ordering::Relaxed);
        let mut connections = Vec::new();
        let mut late = 0;
        for worker in std::mem::take(&mut self.workers) {
            match worker.join() {
                Ok((done, l)) => {
                    connections.extend(done);
                    late += l;
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        connections.sort_by_key(|c| c.index);
        LoadReport {
            rate: self.options.rate,
            duration: stop,
            connections,
            late,
            slow_threshold: self.options.slow,
        }
    }
}

impl Drop for ConnectionLoad {
    /// A load dropped unfinished (a test failed) starts nothing more; its workers end once
    /// their exchanges do, so they neither load the next test nor hold the namespace.
    fn drop(&mut self) {
        self.stop_at.store(0, Ordering::Relaxed);
    }
}

/// How a [`LongStream`] ended: bytes received (all in order), and the error that broke it, if
/// one did.
#[derive(Debug)]
pub struct StreamReport {
    pub received: u64,
    pub broken: Option<String>,
}

/// One TCP connection to a Service that downloads a `BULK` pattern at a paced rate for as long
/// as it runs, checking every byte against [`bulk_byte`]: a reset, an early end, a stall or a
/// wrong byte breaks it.
pub struct LongStream {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<StreamReport>>,
}

impl LongStream {
    /// Bytes read per pace.
    const CHUNK: usize = 16 * 1024;
    /// One chunk per pace: about 1.6 MB/s, enough to keep packets flowing both ways (data
    /// one way, ACKs and window updates the other) without costing the machine much.
    const PACE: Duration = Duration::from_millis(10);
    /// What `BULK` may send at most; far more than any run reads.
    const SIZE: u64 = 16 << 30;

    /// Connects from `netns` to `addr` and starts reading. `stall` bounds a read that gets no
    /// bytes at all: longer than that is a broken stream.
    pub fn start(netns: &str, addr: SocketAddrV4, stall: Duration) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), received.clone());
        let thread = spawn_in_netns(netns, move || {
            let mut received = 0u64;
            let broken = Self::read(addr, stall, &flag, &count, &mut received).err();
            StreamReport { received, broken }
        })?;
        Ok(Self {
            stop,
            received,
            thread: Some(thread),
        })
    }

    fn read(
        addr: SocketAddrV4,
        stall: Duration,
        stop: &AtomicBool,
        count: &AtomicU64,
        received: &mut u64,
    ) -> Result<(), String> {
        let mut conn = TcpStream::connect_timeout(&SocketAddr::V4(addr), stall)
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        conn.write_all(format!("BULK {}\n", Self::SIZE).as_bytes())
            .map_err(|e| format!("request: {e}"))?;
        conn.set_read_timeout(Some(stall))
            .map_err(|e| format!("read timeout: {e}"))?;
        let mut buf = vec![0u8; Self::CHUNK];
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let n = match conn.read(&mut buf) {
                Ok(0) => return Err(format!("the stream ended after {received} bytes")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!("no byte for {stall:?} after {received} bytes"));
                }
                Err(e) => return Err(format!("after {received} bytes: {e}")),
            };
            if let Some(i) = (0..n).find(|&i| buf[i] != bulk_byte(*received + i as u64)) {
                return Err(format!(
                    "byte {} is {}, expected {}: out of order or corrupted",
                    *received + i as u64,
                    buf[i],
                    bulk_byte(*received + i as u64)
                ));
            }
            *received += n as u64;
            count.store(*received, Ordering::Relaxed);
            // Deadline pacing, like the connection load: a slow read is made up for.
            next += Self::PACE;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// Bytes received (and checked) so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops reading and reports; closing the connection ends the pod's side too.
    pub fn finish(mut self) -> StreamReport {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("joined only here");
        match thread.join() {
            Ok(report) => report,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl LongStream {
    /// Waits up to `limit` for the stream to end on its own (broken), then
    /// [`finish`](Self::finish)es it: for checking the checker, whose stop could otherwise
    /// come before the break is seen.
    pub fn finish_when_broken(self, limit: Duration) -> StreamReport {
        let deadline = Instant::now() + limit;
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        self.finish()
    }
}

impl Drop for LongStream {
    /// Dropped unfinished (a test failed): the reader stops at its next pace.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
