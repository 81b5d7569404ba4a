//! Test clients for the echo servers: one TCP request/response exchange or one UDP
//! datagram/reply, either from inside a namespace (`*_here`, for loops of many requests on
//! one thread) or entering the namespace first.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::netns::in_netns;

/// A failed client exchange: which protocol, which step, towards which address, and the
/// underlying I/O error (whose [`kind`](RequestError::kind) tells refused from timed out).
#[derive(Debug, thiserror::Error)]
#[error("{proto} {step} {addr} failed: {source}")]
pub struct RequestError {
    /// "TCP" or "UDP".
    pub proto: &'static str,
    /// What was being done, e.g. "connect to", "read reply from".
    pub step: &'static str,
    /// The address the request was sent to.
    pub addr: SocketAddrV4,
    #[source]
    pub source: io::Error,
}

impl RequestError {
    /// The kind of the underlying I/O error, e.g. `ConnectionRefused` or `TimedOut`.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

fn err(
    proto: &'static str,
    step: &'static str,
    addr: SocketAddrV4,
) -> impl FnOnce(io::Error) -> RequestError {
    move |source| RequestError {
        proto,
        step,
        addr,
        source,
    }
}

fn timed_out(timeout: Duration, what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} within {timeout:?}"),
    )
}

/// Time left until `deadline`, or a `TimedOut` error once it has passed.
fn remaining(
    deadline: Instant,
    timeout: Duration,
    what: impl FnOnce() -> String,
) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(timed_out(timeout, what()))
    } else {
        Ok(left)
    }
}

/// One TCP exchange from the current thread's network namespace: connect, write `request`,
/// shut down the write side, read until the server closes. `timeout` bounds the whole
/// exchange, not each step.
pub fn tcp_request_here(
    addr: SocketAddrV4,
    request: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, RequestError> {
    const TCP: &str = "TCP";
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout).map_err(err(
        TCP,
        "connect to",
        addr,
    ))?;
    let mut written = 0;
    while written < request.len() {
        let left = remaining(deadline, timeout, || "no complete write".into()).map_err(err(
            TCP,
            "write request to",
            addr,
        ))?;
        stream
            .set_write_timeout(Some(left))
            .map_err(err(TCP, "set write timeout for", addr))?;
        match stream.write(&request[written..]) {
            Ok(0) => {
                return Err(err(TCP, "write request to", addr)(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "connection closed while writing",
                )));
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(TCP, "write request to", addr)(e)),
        }
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(err(TCP, "shut down writing to", addr))?;
    let mut reply = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = remaining(deadline, timeout, || {
            format!("no end of reply (got {} bytes)", reply.len())
        })
        .map_err(err(TCP, "read reply from", addr))?;
        stream
            .set_read_timeout(Some(left))
            .map_err(err(TCP, "set read timeout for", addr))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(reply),
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A read timeout shows up as WouldBlock on Linux; loop to report it as TimedOut.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(err(TCP, "read reply from", addr)(e)),
        }
    }
}

/// One UDP exchange from the current thread's network namespace: send `payload` from a fresh
/// unconnected socket and wait up to `timeout` for one datagram back. Returns the reply and
/// the address it came from, so callers can check it came from where they sent to (that the
/// reverse NAT happened).
pub fn udp_request_here(
    addr: SocketAddrV4,
    payload: &[u8],
    timeout: Duration,
) -> Result<(Vec<u8>, SocketAddrV4), RequestError> {
    const UDP: &str = "UDP";
    let deadline = Instant::now() + timeout;
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).map_err(err(
        UDP,
        "bind a socket to talk to",
        addr,
    ))?;
    socket
        .send_to(payload, addr)
        .map_err(err(UDP, "send to", addr))?;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = remaining(deadline, timeout, || "no reply".into()).map_err(err(
            UDP,
            "receive reply from",
            addr,
        ))?;
        socket
            .set_read_timeout(Some(left))
            .map_err(err(UDP, "set read timeout for", addr))?;
        match socket.recv_from(&mut buf) {
            Ok((n, SocketAddr::V4(from))) => return Ok((buf[..n].to_vec(), from)),
            // An IPv4 socket never receives from an IPv6 peer; ignore rather than fail.
            Ok((_, SocketAddr::V6(_))) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(err(UDP, "receive reply from", addr)(e)),
        }
    }
}

/// [`tcp_request_here`] from inside the network namespace `netns`. A failed exchange can be
/// inspected with `err.downcast_ref::<RequestError>()`.
pub fn tcp_request(
    netns: &str,
    addr: SocketAddrV4,
    request: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let request = request.to_vec();
    in_netns(netns, move || tcp_request_here(addr, &request, timeout))?
        .with_context(|| format!("TCP request from network namespace {netns}"))
}

/// [`udp_request_here`] from inside the network namespace `netns`. A failed exchange can be
/// inspected with `err.downcast_ref::<RequestError>()`.
pub fn udp_request(
    netns: &str,
    addr: SocketAddrV4,
    payload: &[u8],
    timeout: Duration,
) -> Result<(Vec<u8>, SocketAddrV4)> {
    let payload = payload.to_vec();
    in_netns(netns, move || udp_request_here(addr, &payload, timeout))?
        .with_context(|| format!("UDP request from network namespace {netns}"))
}
