//! The in-process echo servers every sandbox pod runs (TCP and UDP), and the byte pattern
//! of their `BULK` replies.
//!
//! TCP protocol, one request per connection, the request being the first line:
//! - `NAME` -> `<podname>\n`
//! - `PEER` -> `<client ip>:<client port>\n` as the server saw it
//! - `BULK <n>` -> n bytes of [`bulk_pattern`], then close
//! - `SINK` -> reads until EOF, replies `<bytes read after the SINK line>\n`
//! - `GET ...` -> a minimal HTTP/1.0 200 response whose body is the greeting (for curl)
//! - anything else (also an empty request) -> the greeting
//!
//! UDP: every datagram gets one reply `<podname> <datagram length>` back to its sender.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::netns::in_netns;

/// How often blocked server threads wake up to look at the stop flag; bounds how long
/// stopping a pod (and so dropping a sandbox) waits.
const POLL: Duration = Duration::from_millis(100);
/// How long a connection may sit without progress before the server gives up on it.
const IDLE: Duration = Duration::from_secs(30);
/// How long to wait for the rest of an HTTP request's headers.
const HTTP_HEADERS: Duration = Duration::from_secs(5);
/// How long to read and discard what a client still sends after the reply.
const LINGER: Duration = Duration::from_secs(2);
/// The longest first line the server reads; the rest is treated as body.
const MAX_LINE: usize = 4096;
/// Refuse absurd `BULK` sizes so a typo cannot keep a thread busy for hours.
const MAX_BULK: u64 = 16 << 30;

/// The byte at offset `i` of a `BULK` reply.
pub fn bulk_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// The first `n` bytes of a `BULK` reply, to compare against what a client received.
pub fn bulk_pattern(n: usize) -> Vec<u8> {
    (0..n as u64).map(bulk_byte).collect()
}

/// What a pod's echo servers answer and on which ports.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// Answer to `NAME` and the first word of UDP replies.
    pub name: String,
    /// Answer to unknown requests and the HTTP body.
    pub greeting: String,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
}

/// Running echo server threads; stops them on drop.
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl EchoServers {
    /// Binds every configured port on 0.0.0.0 inside `netns` and starts serving.
    pub fn start(netns: &str, config: EchoConfig) -> Result<Self> {
        let (tcp_ports, udp_ports) = (config.tcp_ports.clone(), config.udp_ports.clone());
        let ns = netns.to_owned();
        // Sockets keep the namespace they were created in, so only the binding needs to
        // happen inside it; the serving threads can be ordinary ones.
        let (listeners, sockets) = in_netns(netns, move || -> Result<_> {
            let listeners = tcp_ports
                .iter()
                .map(|&port| {
                    let listener =
                        TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
                            .with_context(|| {
                                format!("bind TCP 0.0.0.0:{port} in network namespace {ns}")
                            })?;
                    // Non-blocking so the accept loop can wait with poll(2) and a timeout.
                    listener.set_nonblocking(true).with_context(|| {
                        format!("make TCP listener on port {port} in {ns} non-blocking")
                    })?;
                    Ok((port, listener))
                })
                .collect::<Result<Vec<_>>>()?;
            let sockets = udp_ports
                .iter()
                .map(|&port| {
                    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
                        .with_context(|| {
                            format!("bind UDP 0.0.0.0:{port} in network namespace {ns}")
                        })?;
                    socket
                        .set_read_timeout(Some(POLL))
                        .with_context(|| format!("set read timeout on UDP port {port} in {ns}"))?;
                    Ok((port, socket))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((listeners, sockets))
        })??;

        let mut servers = EchoServers {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            connections: Arc::new(Mutex::new(Vec::new())),
        };
        let config = Arc::new(config);
        for (port, listener) in listeners {
            let (stop, connections, config) = (
                servers.stop.clone(),
                servers.connections.clone(),
                config.clone(),
            );
            let thread = thread::Builder::new()
                .name(format!("echo tcp {port}"))
                .spawn(move || accept_loop(listener, &stop, &connections, &config))
                .with_context(|| format!("spawn TCP echo server thread for {netns} port {port}"))?;
            servers.threads.push(thread);
        }
        for (port, socket) in sockets {
            let (stop, name) = (servers.stop.clone(), config.name.clone());
            let thread = thread::Builder::new()
                .name(format!("echo udp {port}"))
                .spawn(move || udp_loop(socket, &stop, &name))
                .with_context(|| format!("spawn UDP echo server thread for {netns} port {port}"))?;
            servers.threads.push(thread);
        }
        Ok(servers)
    }

    /// Asks every thread to stop without waiting; [`stop`](Self::stop) then waits. Splitting
    /// the two lets a sandbox stop all pods' servers in parallel.
    pub fn signal_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stops all threads and waits for them (at most about [`POLL`] each, since every
    /// blocking call has that timeout). Closes every socket, which matters because open
    /// sockets keep a deleted network namespace, and its veths, alive.
    pub fn stop(&mut self) {
        self.signal_stop();
        for thread in self.threads.drain(..) {
            // A panicked server thread has nothing left to clean up.
            let _ = thread.join();
        }
        let connections = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for thread in connections {
            let _ = thread.join();
        }
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: &Arc<AtomicBool>,
    connections: &Mutex<Vec<JoinHandle<()>>>,
    config: &Arc<EchoConfig>,
) {
    let mut pollfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: `pollfd` is a valid, exclusively borrowed array of one entry whose fd
        // stays open (owned by `listener`) for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, POLL.as_millis() as libc::c_int) };
        if ready <= 0 {
            // Timeout, or EINTR: look at the stop flag again.
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let (stop, config) = (stop.clone(), config.clone());
                    let spawned =
                        thread::Builder::new()
                            .name("echo conn".into())
                            .spawn(move || {
                                // Errors only mean the client went away; nobody to tell.
                                let _ = serve_connection(stream, &stop, &config);
                            });
                    let mut connections = connections
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    // Forget finished connections so a long test does not pile up handles.
                    connections.retain(|t| !t.is_finished());
                    if let Ok(thread) = spawned {
                        connections.push(thread);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ECONNABORTED and friends concern one connection, not the listener.
                Err(_) => break,
            }
        }
    }
}

fn udp_loop(socket: UdpSocket, stop: &AtomicBool, name: &str) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        // Errors are timeouts (WouldBlock) or transient: look at the stop flag again.
        if let Ok((len, from)) = socket.recv_from(&mut buf) {
            // A lost reply is what UDP does; the client times out and reports it.
            let _ = socket.send_to(format!("{name} {len}").as_bytes(), from);
        }
    }
}

/// One accepted TCP connection with reads and writes that give up when the server stops
/// or the client stalls.
struct Conn<'a> {
    stream: TcpStream,
    stop: &'a AtomicBool,
}

impl Conn<'_> {
    /// Reads some bytes (0 = EOF), waiting at most `patience` for them.
    fn read_some(&mut self, buf: &mut [u8], patience: Duration) -> io::Result<usize> {
        let deadline = Instant::now() + patience;
        loop {
            match self.stream.read(buf) {
                Ok(n) => return Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    self.check(deadline)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes all of `data`, giving up after [`IDLE`] without progress or when the server
    /// stops. The stop flag is looked at before every write, not only after a timeout: a
    /// client that keeps reading a long `BULK` never lets a write time out.
    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        let mut deadline = Instant::now() + IDLE;
        while !data.is_empty() {
            self.check(deadline)?;
            match self.stream.write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    data = &data[n..];
                    deadline = Instant::now() + IDLE;
                }
                // Looked at again by `check` at the top of the loop.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn check(&self, deadline: Instant) -> io::Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "server stopping",
            ));
        }
        if Instant::now() >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(())
    }

    /// Reads until the first `\n` (or EOF, or [`MAX_LINE`] bytes). Returns everything read,
    /// and where the first line ends within it.
    fn read_first_line(&mut self) -> io::Result<(Vec<u8>, usize)> {
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(pos) = data.iter().position(|&b| b == b'\n') {
                return Ok((data, pos + 1));
            }
            if data.len() >= MAX_LINE {
                let end = data.len();
                return Ok((data, end));
            }
            let n = self.read_some(&mut buf, IDLE)?;
            if n == 0 {
                let end = data.len();
                return Ok((data, end));
            }
            data.extend_from_slice(&buf[..n]);
        }
    }
}

fn serve_connection(stream: TcpStream, stop: &AtomicBool, config: &EchoConfig) -> io::Result<()> {
    // Accepted sockets do not inherit O_NONBLOCK on Linux, but do not rely on it.
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(POLL))?;
    let mut conn = Conn { stream, stop };
    let (mut data, line_end) = conn.read_first_line()?;
    let line = String::from_utf8_lossy(&data[..line_end]);
    let request = line.trim_end_matches(['\r', '\n']).to_owned();
    let mut words = request.split_ascii_whitespace();
    match words.next() {
        Some("NAME") if words.next().is_none() => {
            conn.write_all(format!("{}\n", config.name).as_bytes())?;
        }
        Some("PEER") if words.next().is_none() => {
            let peer = conn.stream.peer_addr()?;
            conn.write_all(format!("{peer}\n").as_bytes())?;
        }
        Some("BULK") => match (
            words.next().and_then(|n| n.parse::<u64>().ok()),
            words.next(),
        ) {
            (Some(n), None) if n <= MAX_BULK => send_bulk(&mut conn, n)?,
            _ => conn.write_all(format!("bad BULK request {request:?}\n").as_bytes())?,
        },
        Some("SINK") if words.next().is_none() => {
            let mut total = (data.len() - line_end) as u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match conn.read_some(&mut buf, IDLE)? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            conn.write_all(format!("{total}\n").as_bytes())?;
        }
        Some("GET") => {
            // Read the rest of the request headers first: closing a socket with unread data
            // makes the kernel send a RST, and curl then reports a reset instead of the reply.
            let mut buf = [0u8; 4096];
            while !(contains(&data, b"\r\n\r\n") || contains(&data, b"\n\n")) {
                match conn.read_some(&mut buf, HTTP_HEADERS) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => data.extend_from_slice(&buf[..n]),
                }
            }
            let body = config.greeting.as_bytes();
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes())?;
            conn.write_all(body)?;
        }
        _ => conn.write_all(config.greeting.as_bytes())?,
    }
    // Half-close, then swallow whatever the client still sends until it closes too, so the
    // close is a FIN and never a RST that could eat the tail of the reply.
    conn.stream.shutdown(Shutdown::Write)?;
    let deadline = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match conn.read_some(&mut buf, left) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

fn send_bulk(conn: &mut Conn<'_>, n: u64) -> io::Result<()> {
    // 251 * 256 bytes: a whole number of pattern periods, so every chunk is identical.
    let chunk = bulk_pattern(251 * 256);
    let mut left = n;
    while left > 0 {
        let len = left.min(chunk.len() as u64) as usize;
        conn.write_all(&chunk[..len])?;
        left -= len as u64;
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
