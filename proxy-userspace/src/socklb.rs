//! Socket-level load balancing (`--socket-lb`): which sockets the cgroup hooks translate, and
//! where they attach. The hooks themselves are in `proxy-ebpf` (`sock.rs`); the loader attaches
//! them with pinned links like the per-packet programs.
//!
//! Why it exists: a process in the node's own network namespace (and a hostNetwork pod) sends
//! to a ClusterIP without crossing any interface svcproxy is attached to, so no per-packet hook
//! sees it. A `connect()` hook sees every socket, whatever its namespace, and translating there
//! also spares pods the per-packet NAT.

use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use proxy_common::sock::{SOCK_LB_ALL, SOCK_LB_OFF, SOCK_LB_TCP};

/// What `--socket-lb` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLb {
    /// TCP sockets are translated at `connect()`; UDP goes through the per-packet path.
    #[default]
    Tcp,
    /// TCP and UDP sockets: connected UDP at `connect()`, unconnected UDP on every send.
    All,
    /// No socket is translated: the hooks are not attached.
    Off,
}

impl SocketLb {
    /// The value of the object's `SOCK_LB_MODE` global.
    pub fn mode(self) -> u32 {
        match self {
            Self::Tcp => SOCK_LB_TCP,
            Self::All => SOCK_LB_ALL,
            Self::Off => SOCK_LB_OFF,
        }
    }
}

/// The cgroup hooks of the object: program name and the name its link is pinned under.
pub(crate) const PROGRAMS: [(&str, &str); 4] = [
    ("svcproxy_connect4", "connect4"),
    ("svcproxy_sendmsg4", "sendmsg4"),
    ("svcproxy_recvmsg4", "recvmsg4"),
    ("svcproxy_getpeername4", "getpeername4"),
];

/// Where the cgroup v2 hierarchy is mounted (its root: every process of the node is below it),
/// from /proc/self/mounts.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    parse_cgroup2_root(&mounts).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem is mounted (socket-level balancing needs cgroup v2; mount \
             one or pass --socket-lb off)",
        )
    })
}

fn parse_cgroup2_root(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        // Mount points escape spaces as \040.
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, kernel >= 5.14):
/// the hooks compare a socket's with it to tell the node's own sockets from pods'.
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket syscalls on a descriptor we own; the option value is a u64.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        const SO_NETNS_COOKIE: libc::c_int = 71;
        if libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }
}

/// Opens a pinned bpf object (`BPF_OBJ_GET`).
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: the attribute outlives the call and its size is passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            size_of::<Attr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of a bpf link (`BPF_LINK_UPDATE`): atomic, no call sees no program.
pub(crate) fn link_update(link: &OwnedFd, prog_fd: i32) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    const BPF_LINK_UPDATE: libc::c_long = 29;
    // SAFETY: as above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw const attr,
            size_of::<Attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_among_v1_mounts() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_root(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_root("cgroup /x cgroup rw 0 0\n"), None);
    }

    #[test]
    fn modes_match_the_datapath_constants() {
        assert_eq!(SocketLb::default(), SocketLb::Tcp);
        assert_eq!(SocketLb::Off.mode(), SOCK_LB_OFF);
        assert_eq!(SocketLb::Tcp.mode(), SOCK_LB_TCP);
        assert_eq!(SocketLb::All.mode(), SOCK_LB_ALL);
    }
}

/// Re-balances connected UDP sockets (`--socket-lb all`) whose backend went away.
///
/// A connected UDP socket was translated once, at `connect()`, and the kernel runs no hook on
/// its later sends: left alone it would send to the removed backend forever (the most reported
/// trouble with socket-level balancing). So after a sync removes a UDP backend, the sockets
/// connected to it are found (`/proc/<pid>/net/udp` of every network namespace in use, then
/// the file descriptors naming them), borrowed from their process (`pidfd_getfd`, which needs
/// CAP_SYS_PTRACE) and connected again to the frontend they asked for: the `connect()` hook
/// picks a live backend, and the application's next send goes there. The application keeps
/// its socket, its port and its peer address (the ClusterIP), and sees no error.
#[derive(Debug, Default)]
pub struct UdpRebalancer {
    /// Backends of UDP frontends at the last sync.
    known: std::collections::HashSet<(std::net::Ipv4Addr, u16)>,
}

impl UdpRebalancer {
    /// Compares the UDP backends of `desired` with the last sync's and re-balances the
    /// sockets connected to those that went. Returns how many sockets were re-connected.
    pub fn after_sync(&mut self, desired: &crate::desired::Desired) -> usize {
        let now: std::collections::HashSet<_> = desired
            .frontends
            .iter()
            .filter(|(f, _)| f.protocol == crate::desired::Protocol::Udp)
            .flat_map(|(_, s)| s.backends.iter().map(|b| (b.addr, b.port)))
            .collect();
        let gone: Vec<_> = self.known.difference(&now).copied().collect();
        self.known = now;
        if gone.is_empty() {
            return 0;
        }
        let n = reconnect_udp_sockets(&gone);
        if n > 0 {
            tracing::info!(
                sockets = n,
                "re-balanced connected UDP sockets of removed backends"
            );
        }
        n
    }
}

/// Connects again every connected UDP socket on the node whose peer is one of `backends`.
fn reconnect_udp_sockets(backends: &[(std::net::Ipv4Addr, u16)]) -> usize {
    use std::{collections::HashSet, os::unix::fs::MetadataExt};
    let pids: Vec<i32> = match fs::read_dir("/proc") {
        Ok(d) => d
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
        Err(e) => {
            tracing::warn!("cannot list processes to re-balance UDP sockets: {e}");
            return 0;
        }
    };
    // Each network namespace's table once.
    let mut netns_seen = HashSet::new();
    let mut inodes = HashSet::new();
    for pid in &pids {
        let Ok(ns) = fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if !netns_seen.insert((ns.dev(), ns.ino())) {
            continue;
        }
        if let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/udp")) {
            inodes.extend(connected_to(&table, backends));
        }
    }
    if inodes.is_empty() {
        return 0;
    }
    let mut done = 0;
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Some(inode) = fs::read_link(fd.path()).ok().and_then(|l| {
                let l = l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
                l.parse::<u64>().ok()
            }) else {
                continue;
            };
            if !inodes.contains(&inode) {
                continue;
            }
            let Some(num) = fd.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            match reconnect(pid, num, backends) {
                Ok(true) => done += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(pid, fd = num, "cannot re-balance a UDP socket: {e}"),
            }
        }
    }
    done
}

/// Inodes of the connected sockets of a `/proc/net/udp` table whose peer is in `backends`.
fn connected_to(table: &str, backends: &[(std::net::Ipv4Addr, u16)]) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            let (rem, st, inode) = (f.get(2)?, f.get(3)?, f.get(9)?);
            // 01: TCP_ESTABLISHED, what a connected UDP socket shows.
            if *st != "01" {
                return None;
            }
            let (addr, port) = rem.split_once(':')?;
            // The address is the network-order word printed as a number on this machine.
            let addr = std::net::Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?.to_ne_bytes());
            let port = u16::from_str_radix(port, 16).ok()?;
            backends
                .contains(&(addr, port))
                .then(|| inode.parse().ok())?
        })
        .collect()
}

/// Borrows socket `fd` of process `pid` and connects it again to the frontend its peer reads
/// as (the `getpeername()` hook answers with it). False if the socket is not one the hooks
/// translated (its peer reads as the removed backend itself).
fn reconnect(pid: i32, fd: i32, backends: &[(std::net::Ipv4Addr, u16)]) -> io::Result<bool> {
    // SAFETY: plain syscalls; each returned descriptor is owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let sock = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = unsafe { OwnedFd::from_raw_fd(sock as i32) };
    // SAFETY: a zeroed sockaddr_in and its size; the kernel fills at most that.
    let mut peer: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    if unsafe { libc::getpeername(sock.as_raw_fd(), (&raw mut peer).cast(), &mut len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = std::net::Ipv4Addr::from(peer.sin_addr.s_addr.to_ne_bytes());
    let port = u16::from_be(peer.sin_port);
    if peer.sin_family != libc::AF_INET as libc::sa_family_t || backends.contains(&(addr, port)) {
        return Ok(false);
    }
    if unsafe { libc::connect(sock.as_raw_fd(), (&raw const peer).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}
