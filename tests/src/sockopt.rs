//! Socket controls the end-to-end tests need beyond `std::net`: path-MTU discovery and the
//! path MTU a socket learned, the ICMP error queue (to see *who* sent an error and what it
//! said), and TCP connections from a chosen source port that close with a RST.
//!
//! All of these act on sockets created inside whatever network namespace the calling thread is
//! in (see [`crate::in_netns`]).

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// One error from a socket's error queue (`IP_RECVERR`), as `struct sock_extended_err` and
/// the offender address describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedError {
    /// The errno the error maps to (e.g. `ECONNREFUSED`, `EMSGSIZE`).
    pub errno: i32,
    /// `SO_EE_ORIGIN_*`: 2 for an ICMP message.
    pub origin: u8,
    /// ICMP type and code when `origin` is ICMP.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// For "fragmentation needed": the next-hop MTU the ICMP message announced.
    pub info: u32,
    /// Who sent the ICMP message (its outer source address).
    pub offender: Option<Ipv4Addr>,
}

/// `SO_EE_ORIGIN_ICMP`: the queued error came from an ICMP message.
pub const SO_EE_ORIGIN_ICMP: u8 = 2;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_int(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed along.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    })
}

/// `IP_MTU_DISCOVER = IP_PMTUDISC_DO`: set DF on every datagram and refuse (`EMSGSIZE`) to send
/// one larger than the path MTU the socket knows, instead of fragmenting it locally.
pub fn set_pmtu_discovery(sock: &impl AsRawFd) -> io::Result<()> {
    set_int(
        sock,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    )
}

/// `IP_RECVERR`: queue ICMP errors with their details for [`read_queued_error`]. The pending
/// socket error (what the next `recv` reports) is set as without it.
pub fn set_recv_errors(sock: &impl AsRawFd) -> io::Result<()> {
    set_int(sock, libc::IPPROTO_IP, libc::IP_RECVERR, 1)
}

/// `IP_MTU` of a connected socket: the path MTU the kernel currently has for its peer. Lowered
/// by an ICMP "fragmentation needed" that the kernel matched to this socket.
pub fn path_mtu(sock: &impl AsRawFd) -> io::Result<u32> {
    let mut mtu: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: `mtu` and `len` outlive the call and `len` holds the buffer size.
    check(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut i32).cast(),
            &mut len,
        )
    })?;
    Ok(mtu as u32)
}

/// Takes the oldest error off the socket's error queue without blocking; `None` when empty.
/// Needs [`set_recv_errors`] before the error arrived.
pub fn read_queued_error(sock: &impl AsRawFd) -> io::Result<Option<QueuedError>> {
    let mut data = [0u8; 256];
    // Room for the IP_RECVERR control message (extended error + offender sockaddr_in).
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>() as _;
    // SAFETY: every buffer `msg` points to outlives the call and its length is set.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled, within the
    // length it reported; the extended error and the offender follow the header as
    // ip_recv_error(7) lays them out.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_RECVERR {
                let ee_ptr = libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err;
                let ee = ee_ptr.read_unaligned();
                // The offender follows the extended error in the control buffer, so its
                // address comes from the pointer into the buffer, not from the copy.
                let offender = libc::SO_EE_OFFENDER(ee_ptr) as *const libc::sockaddr_in;
                let offender = offender.read_unaligned();
                let offender = (offender.sin_family == libc::AF_INET as libc::sa_family_t)
                    .then(|| Ipv4Addr::from(u32::from_be(offender.sin_addr.s_addr)));
                return Ok(Some(QueuedError {
                    errno: ee.ee_errno as i32,
                    origin: ee.ee_origin,
                    icmp_type: ee.ee_type,
                    icmp_code: ee.ee_code,
                    info: ee.ee_info,
                    offender,
                }));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Err(io::Error::other(
        "error queue entry without an IP_RECVERR control message",
    ))
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is valid and the fields are set below.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    sa
}

/// A TCP connection from exactly `local` to `remote` (`connect` gives up after `timeout`),
/// so a test can repeat a 5-tuple. `SO_REUSEADDR` lets the port be bound again while an
/// earlier connection from it lingers; closing with [`set_reset_on_close`] avoids TIME_WAIT.
pub fn tcp_connect_from(
    local: SocketAddrV4,
    remote: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    // Linux bounds a blocking connect(2) by the send timeout.
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` outlives the call and its size is passed along.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let local = sockaddr(local);
    // SAFETY: `local` is a valid sockaddr_in of the length passed.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&local as *const libc::sockaddr_in).cast(),
            len,
        )
    })?;
    let remote = sockaddr(remote);
    // SAFETY: as for bind.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            len,
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        // A send timeout surfaces as EINPROGRESS/EAGAIN; say what it means.
        return Err(match e.raw_os_error() {
            Some(libc::EINPROGRESS | libc::EAGAIN) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect within {timeout:?}"),
            ),
            _ => e,
        });
    }
    let stream = TcpStream::from(fd);
    // The send timeout was only for connect; the caller sets its own.
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// `SO_LINGER` {on, 0}: `close` sends a RST and frees the port at once (no TIME_WAIT), so the
/// same 5-tuple can connect again right away.
pub fn set_reset_on_close(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` outlives the call and its size is passed along.
    check(unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    })
}
