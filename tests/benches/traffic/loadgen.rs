//! The bench's own load generator. Every function runs on the calling thread, which the
//! caller has put into the client pod's namespace and pinned to one core: one thread
//! multiplexing its sockets with epoll is the same offered load for every variant.
//!
//! - [`conns`]: new TCP connections (connect, one request/response, the server closes, close),
//!   a fixed number in flight, as fast as they complete or at a fixed rate;
//! - [`latency`]: request/response round trips on kept-alive connections, one at a time;
//! - [`udp`]: UDP request/response with a fixed number of requests in flight.

use std::{
    io::{self, Read as _, Write as _},
    mem,
    net::{SocketAddrV4, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    epoll::{Epoll, READABLE, WRITABLE},
    server::{CLOSE, KEEP, MSG},
};

/// Connections in flight for [`conns`]: enough to keep both cores busy through the
/// handshakes' round trips, few enough that the listen backlogs never overflow.
const CONNS_IN_FLIGHT: usize = 16;
/// UDP requests in flight, one per socket (and so one flow per socket).
const UDP_IN_FLIGHT: usize = 16;
/// A UDP request without a reply after this long is counted lost and sent again.
const UDP_LOST_AFTER: Duration = Duration::from_millis(200);
/// How long [`conns`] waits for its last connections after the measuring window.
const DRAIN: Duration = Duration::from_millis(500);

/// What one run of [`conns`] or [`udp`] did (completed within its window).
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub completed: u64,
    pub failed: u64,
}

enum Slot {
    Idle,
    Connecting { stream: TcpStream },
    Reading { stream: TcpStream, got: usize },
}

/// New TCP connections to `targets` (taken round-robin) for `duration`, with
/// [`CONNS_IN_FLIGHT`] at a time; `rate` caps the starts per second (a fixed offered load).
pub fn conns(targets: &[SocketAddrV4], duration: Duration, rate: Option<f64>) -> Result<Outcome> {
    if targets.is_empty() {
        bail!("no targets for the connection load");
    }
    let mut epoll = Epoll::new().context("epoll for the load generator")?;
    let mut slots: Vec<Slot> = (0..CONNS_IN_FLIGHT).map(|_| Slot::Idle).collect();
    let (mut completed, mut failed, mut started) = (0u64, 0u64, 0u64);
    let begin = Instant::now();
    let end = begin + duration;
    let mut next_target = 0;
    let mut buf = [0u8; MSG];
    let request = message(CLOSE);
    loop {
        let now = Instant::now();
        let measuring = now < end;
        if !measuring && (slots.iter().all(|s| matches!(s, Slot::Idle)) || now >= end + DRAIN) {
            break;
        }
        // Start connections in idle slots while the window is open and the rate allows.
        if measuring {
            for (i, slot) in slots.iter_mut().enumerate() {
                if !matches!(slot, Slot::Idle) {
                    continue;
                }
                if let Some(rate) = rate
                    && started as f64 >= rate * now.duration_since(begin).as_secs_f64()
                {
                    break;
                }
                let target = targets[next_target % targets.len()];
                next_target += 1;
                started += 1;
                match start_connect(target) {
                    Ok(stream) => {
                        epoll.add(&stream, WRITABLE, i as u64)?;
                        *slot = Slot::Connecting { stream };
                    }
                    Err(_) => failed += 1,
                }
            }
        }
        // With a rate cap, wake up in time for the next start.
        let timeout = if rate.is_some() {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(50)
        };
        let ready = epoll.wait(timeout)?;
        for e in 0..ready {
            let (token, _) = epoll.event(e);
            let i = token as usize;
            let slot = mem::replace(&mut slots[i], Slot::Idle);
            slots[i] = match slot {
                Slot::Connecting { mut stream } => match stream.take_error() {
                    Ok(None) if matches!(stream.write(&request), Ok(MSG)) => {
                        epoll.modify(&stream, READABLE, token)?;
                        Slot::Reading { stream, got: 0 }
                    }
                    _ => {
                        failed += 1;
                        Slot::Idle
                    }
                },
                Slot::Reading {
                    mut stream,
                    mut got,
                } => match read_reply(&mut stream, &mut got, &mut buf) {
                    // The reply came, then the server's FIN: one finished connection, and the
                    // close below is the last packet.
                    Ok(true) if got == MSG => {
                        if measuring {
                            completed += 1;
                        }
                        Slot::Idle
                    }
                    Ok(true) => {
                        failed += 1;
                        Slot::Idle
                    }
                    Ok(false) => Slot::Reading { stream, got },
                    Err(_) => {
                        failed += 1;
                        Slot::Idle
                    }
                },
                Slot::Idle => Slot::Idle,
            };
        }
    }
    Ok(Outcome { completed, failed })
}

/// Reads the reply; Ok(true) once the server has closed (EOF), Ok(false) if more is to come.
fn read_reply(stream: &mut TcpStream, got: &mut usize, buf: &mut [u8; MSG]) -> io::Result<bool> {
    loop {
        let room = &mut buf[(*got).min(MSG - 1)..];
        match stream.read(room) {
            Ok(0) => return Ok(true),
            Ok(n) => *got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A non-blocking TCP socket with its connect under way.
fn start_connect(target: SocketAddrV4) -> io::Result<TcpStream> {
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    stream.set_nodelay(true)?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a valid sockaddr_in and its size is passed along.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&raw const addr).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(stream)
}

fn message(kind: u8) -> [u8; MSG] {
    let mut m = [b'.'; MSG];
    m[0] = kind;
    m
}

/// Round trips of one [`MSG`] each on `connections` kept-alive connections to `targets`
/// (round-robin), one at a time, for `duration`; returns each round trip in nanoseconds.
pub fn latency(
    targets: &[SocketAddrV4],
    connections: usize,
    duration: Duration,
) -> Result<Vec<u64>> {
    if targets.is_empty() {
        bail!("no targets for the latency load");
    }
    let mut streams = Vec::new();
    for i in 0..connections {
        let target = targets[i % targets.len()];
        let stream = TcpStream::connect_timeout(&target.into(), Duration::from_secs(2))
            .with_context(|| format!("connect to {target} for the latency run"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        streams.push(stream);
    }
    let request = message(KEEP);
    let mut reply = [0u8; MSG];
    let mut samples = Vec::with_capacity(1 << 16);
    let end = Instant::now() + duration;
    let mut i = 0;
    while Instant::now() < end {
        let stream = &mut streams[i % connections];
        i += 1;
        let t = Instant::now();
        stream
            .write_all(&request)
            .context("latency run: send a request")?;
        stream
            .read_exact(&mut reply)
            .context("latency run: read a reply")?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    Ok(samples)
}

/// UDP request/response to `targets` for `duration` with [`UDP_IN_FLIGHT`] requests in
/// flight, each on its own connected socket (so its own flow through the proxy).
pub fn udp(targets: &[SocketAddrV4], duration: Duration) -> Result<Outcome> {
    if targets.is_empty() {
        bail!("no targets for the UDP load");
    }
    let mut epoll = Epoll::new().context("epoll for the UDP load")?;
    let mut sockets = Vec::new();
    for i in 0..UDP_IN_FLIGHT {
        let target = targets[i % targets.len()];
        let socket = UdpSocket::bind("0.0.0.0:0").context("bind a UDP client socket")?;
        socket.connect(target)?;
        socket.set_nonblocking(true)?;
        epoll.add(&socket, READABLE, i as u64)?;
        sockets.push(socket);
    }
    let request = message(KEEP);
    let mut reply = [0u8; 2048];
    let mut sent_at = vec![Instant::now(); UDP_IN_FLIGHT];
    for (socket, at) in sockets.iter().zip(sent_at.iter_mut()) {
        // A failed send is found by the loss sweep below and retried.
        let _ = socket.send(&request);
        *at = Instant::now();
    }
    let (mut completed, mut failed) = (0u64, 0u64);
    let begin = Instant::now();
    let end = begin + duration;
    let mut last_sweep = begin;
    while Instant::now() < end {
        let ready = epoll.wait(Duration::from_millis(20))?;
        for e in 0..ready {
            let i = epoll.event(e).0 as usize;
            while let Ok(n) = sockets[i].recv(&mut reply) {
                if n == MSG {
                    completed += 1;
                }
                let _ = sockets[i].send(&request);
                sent_at[i] = Instant::now();
            }
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= UDP_LOST_AFTER / 4 {
            last_sweep = now;
            for (socket, at) in sockets.iter().zip(sent_at.iter_mut()) {
                if now.duration_since(*at) >= UDP_LOST_AFTER {
                    failed += 1;
                    let _ = socket.send(&request);
                    *at = now;
                }
            }
        }
    }
    Ok(Outcome { completed, failed })
}

/// One short TCP exchange and one UDP exchange with `target`, each within a second: whether
/// the path through the variant is up.
pub fn probe(target: SocketAddrV4) -> Result<()> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&target.into(), timeout)
        .with_context(|| format!("TCP connect to {target}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&message(CLOSE))?;
    let mut reply = [0u8; MSG];
    stream
        .read_exact(&mut reply)
        .with_context(|| format!("TCP reply from {target}"))?;
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(&message(KEEP))?;
    let n = socket
        .recv(&mut reply)
        .with_context(|| format!("UDP reply from {target}"))?;
    if n != MSG {
        bail!("UDP reply from {target} has {n} bytes, not {MSG}");
    }
    Ok(())
}
