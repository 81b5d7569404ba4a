//! The backends' servers: one thread, pinned to one core, serving the TCP and UDP port of
//! every backend pod through one epoll set. The sandbox's echo servers spawn a thread per
//! connection, which would cost more than the proxies being compared; this one costs the same
//! few syscalls per request for every variant.
//!
//! Protocol (fixed-size messages of [`MSG`] bytes): TCP replies to every message with the
//! same bytes; a message starting with [`CLOSE`] is answered and then the server closes, so
//! the server and not the load generator holds TIME_WAIT and the client's ports free up at
//! once. UDP echoes every datagram.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result};
use svcproxy_tests::in_netns;

use super::{cpu::pin_current_thread, epoll::Epoll};

/// Request and reply size.
pub const MSG: usize = 32;
/// First byte of a request after whose reply the server closes the connection.
pub const CLOSE: u8 = b'C';
/// First byte of a request on a kept-alive connection.
pub const KEEP: u8 = b'K';

/// How often the serving thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);

enum Entry {
    Listener(TcpListener),
    Udp(UdpSocket),
    Conn {
        stream: TcpStream,
        got: usize,
        buf: [u8; MSG],
    },
}

/// The running server thread; stopped (and every socket closed, so the pods' namespaces can
/// go) on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Servers {
    /// Binds TCP and UDP `port` on 0.0.0.0 in each of `netns` and serves them from one thread
    /// pinned to `cpu`.
    pub fn start(netns: &[String], port: u16, cpu: usize) -> Result<Self> {
        let mut entries = Vec::new();
        for ns in netns {
            let name = ns.clone();
            // Sockets keep the namespace they were made in; only binding happens inside it.
            let (listener, udp) = in_netns(ns, move || -> Result<_> {
                let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
                let listener =
                    TcpListener::bind(any).with_context(|| format!("bind TCP {any} in {name}"))?;
                listener.set_nonblocking(true)?;
                let udp =
                    UdpSocket::bind(any).with_context(|| format!("bind UDP {any} in {name}"))?;
                udp.set_nonblocking(true)?;
                Ok((listener, udp))
            })??;
            entries.push(Some(Entry::Listener(listener)));
            entries.push(Some(Entry::Udp(udp)));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("bench servers".into())
            .spawn(move || {
                if let Err(e) = serve(entries, &flag, cpu) {
                    eprintln!("warning: bench server thread stopped: {e:#}");
                }
            })
            .context("spawn the bench server thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut entries: Vec<Option<Entry>>, stop: &AtomicBool, cpu: usize) -> Result<()> {
    pin_current_thread(cpu)?;
    let mut epoll = Epoll::new().context("epoll for the bench servers")?;
    for (token, entry) in entries.iter().enumerate() {
        match entry {
            Some(Entry::Listener(l)) => epoll.add(l, super::epoll::READABLE, token as u64)?,
            Some(Entry::Udp(u)) => epoll.add(u, super::epoll::READABLE, token as u64)?,
            _ => {}
        }
    }
    let mut free: Vec<usize> = Vec::new();
    let mut datagram = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let ready = epoll.wait(POLL)?;
        for i in 0..ready {
            let token = epoll.event(i).0 as usize;
            match entries.get_mut(token).and_then(Option::as_mut) {
                Some(Entry::Listener(listener)) => {
                    let mut accepted = Vec::new();
                    while let Ok((stream, _)) = listener.accept() {
                        accepted.push(stream);
                    }
                    for stream in accepted {
                        // A socket that cannot be set up is dropped: the client sees a reset.
                        if stream.set_nonblocking(true).is_err()
                            || stream.set_nodelay(true).is_err()
                        {
                            continue;
                        }
                        let slot = free.pop().unwrap_or_else(|| {
                            entries.push(None);
                            entries.len() - 1
                        });
                        if epoll
                            .add(&stream, super::epoll::READABLE, slot as u64)
                            .is_ok()
                        {
                            entries[slot] = Some(Entry::Conn {
                                stream,
                                got: 0,
                                buf: [0; MSG],
                            });
                        } else {
                            free.push(slot);
                        }
                    }
                }
                Some(Entry::Udp(socket)) => {
                    while let Ok((n, from)) = socket.recv_from(&mut datagram) {
                        // A lost reply is what UDP does; the client counts it.
                        let _ = socket.send_to(&datagram[..n], from);
                    }
                }
                Some(Entry::Conn { stream, got, buf }) => {
                    let open = serve_conn(stream, got, buf);
                    if !open {
                        // Dropping the stream closes it, which also leaves the epoll set.
                        entries[token] = None;
                        free.push(token);
                    }
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// Reads what is there and answers complete messages; false when the connection is done.
fn serve_conn(stream: &mut TcpStream, got: &mut usize, buf: &mut [u8; MSG]) -> bool {
    loop {
        match stream.read(&mut buf[*got..]) {
            Ok(0) => return false,
            Ok(n) => {
                *got += n;
                if *got < MSG {
                    continue;
                }
                *got = 0;
                // 32 bytes always fit an empty socket buffer; a short write means the
                // client misbehaves, and the connection is dropped.
                if !matches!(stream.write(&buf[..]), Ok(MSG)) {
                    return false;
                }
                if buf[0] == CLOSE {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}
