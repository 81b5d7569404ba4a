//! Interface discovery in the current network namespace, and a watch that says when its set
//! of interfaces may have changed (so pods started after svcproxy get the datapath too).
//!
//! Uses if_nameindex(3) (netlink under the hood) rather than /sys/class/net, because sysfs shows
//! the namespace it was mounted in, not the one this process may have entered.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// An interface of this network namespace. The index tells a re-created interface from the
/// one that had its name before: a link on the old one died with it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

/// Every interface in this process's network namespace.
pub fn list() -> io::Result<Vec<Interface>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut cur = head;
    // SAFETY: walking the array up to its terminator; names are NUL-terminated C strings.
    unsafe {
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            found.push(Interface {
                name: CStr::from_ptr((*cur).if_name)
                    .to_string_lossy()
                    .into_owned(),
                index: (*cur).if_index,
            });
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(found)
}

/// The `--interfaces` entry that stands for the devices holding an IPv4 default route (the
/// node's uplink, whatever its name).
pub const DEFAULT_ROUTE: &str = "@default-route";

/// Which interfaces the datapath belongs on: name globs, and optionally the default-route
/// devices (resolved at every listing, so a changed uplink is followed).
#[derive(Clone, Debug)]
pub struct Selector {
    globs: Vec<glob::Pattern>,
    default_route: bool,
}

impl Selector {
    /// From `--interfaces` entries: globs, or [`DEFAULT_ROUTE`].
    pub fn parse(entries: &[String]) -> Result<Self, (String, glob::PatternError)> {
        let mut selector = Self {
            globs: Vec::new(),
            default_route: false,
        };
        for entry in entries {
            if entry == DEFAULT_ROUTE {
                selector.default_route = true;
            } else {
                let glob = glob::Pattern::new(entry).map_err(|e| (entry.clone(), e))?;
                selector.globs.push(glob);
            }
        }
        Ok(selector)
    }

    /// The interfaces selected now, sorted by name.
    pub fn matching(&self) -> io::Result<Vec<Interface>> {
        let uplinks = if self.default_route {
            default_route_devices(&std::fs::read_to_string("/proc/self/net/route")?)
        } else {
            Vec::new()
        };
        let mut found: Vec<Interface> = list()?
            .into_iter()
            .filter(|i| uplinks.contains(&i.name) || self.globs.iter().any(|p| p.matches(&i.name)))
            .collect();
        found.sort();
        Ok(found)
    }
}

/// The devices of the IPv4 default routes in `/proc/net/route` text (of this process's network
/// namespace): rows whose destination and mask are both 0.
fn default_route_devices(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            (cols.len() > 7 && cols[1] == "00000000" && cols[7] == "00000000")
                .then(|| cols[0].to_owned())
        })
        .collect()
}

/// The index of the interface named `name` now, if there is one.
pub fn index_of(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Whether `name` is backed by a device on a bus (a NIC: PCI, virtio, ...) rather than being a
/// software device (veth, bridge, tunnel, loopback): the ethtool driver info of a physical device
/// names its bus address. Only physical devices can gain from native XDP; on a veth native XDP
/// costs more than tc (it gives up the kernel's GRO and checksum offloads). `None` when the
/// kernel does not say (no such interface, or no ethtool support): treat as software.
pub fn is_physical(name: &str) -> Option<bool> {
    /// struct ethtool_drvinfo (linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return None;
    }
    // SAFETY: both are plain data, valid when zeroed.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: plain socket(2), owned right after.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return None;
    }
    // SAFETY: a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: SIOCETHTOOL with GDRVINFO writes at most sizeof(ethtool_drvinfo) into `info`,
    // which outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    (rc == 0).then(|| info.bus_info[0] != 0)
}

/// How often interfaces are listed again when the netlink socket failed.
const POLL_FALLBACK: std::time::Duration = std::time::Duration::from_secs(1);

/// Wakes when an interface is added, removed or renamed, or an IPv4 route changes: an
/// rtnetlink socket subscribed to link and route notifications. It carries no state of its own: after each wake the caller lists the
/// interfaces again, so a lost notification (the socket's buffer overflowed during a burst of
/// pod starts) costs nothing but the wake, which the overflow itself triggers.
pub struct LinkWatch {
    /// `None` once the socket failed: then every [`POLL_FALLBACK`] is a wake.
    fd: Option<AsyncFd<OwnedFd>>,
}

impl LinkWatch {
    /// Subscribes in this process's network namespace. Needs a tokio runtime.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zeroed is its documented initial state.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // Routes too: the default route moving to another device changes the selection.
        addr.nl_groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_ROUTE) as u32;
        // SAFETY: `addr` is a valid sockaddr_nl of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open while it is registered.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { fd: Some(fd) })
    }

    /// Waits for the next notification, then drains every queued one: a burst is one wake.
    /// Never fails: if the socket breaks, the watch degrades to listing every second.
    pub async fn changed(&mut self) {
        let Some(fd) = &mut self.fd else {
            return tokio::time::sleep(POLL_FALLBACK).await;
        };
        if let Err(e) = Self::next(fd).await {
            tracing::warn!(
                "interface notifications failed ({e}); listing interfaces every {:?} instead",
                POLL_FALLBACK
            );
            self.fd = None;
        }
    }

    async fn next(fd: &mut AsyncFd<OwnedFd>) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = fd.readable_mut().await?;
            let mut woke = false;
            loop {
                // SAFETY: `buf` is writable for its length.
                let n = unsafe {
                    libc::recv(
                        guard.get_inner().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n >= 0 {
                    woke = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    // Notifications were dropped: something changed, we don't know what.
                    Some(libc::ENOBUFS) => woke = true,
                    Some(libc::EINTR) => {}
                    _ => return Err(err),
                }
            }
            if woke {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_with_its_index_and_matched_by_glob() {
        let lo = list()
            .expect("listing interfaces")
            .into_iter()
            .find(|i| i.name == "lo")
            .expect("every namespace has lo");
        assert_eq!(index_of("lo"), Some(lo.index));
        let only_lo = Selector::parse(&["l?".to_owned()]).unwrap();
        assert!(only_lo.matching().unwrap().contains(&lo));
        let nothing = Selector::parse(&["x*".to_owned()]).unwrap();
        assert!(!nothing.matching().unwrap().contains(&lo));
        assert_eq!(index_of("no-such-interface-x"), None);
        assert_eq!(index_of("nul\0inside"), None);
    }

    #[test]
    fn selector_parses_globs_and_the_default_route_entry() {
        let s = Selector::parse(&["veth*".into(), DEFAULT_ROUTE.into()]).unwrap();
        assert!(s.default_route);
        assert_eq!(s.globs.len(), 1);
        let (bad, _) = Selector::parse(&["veth[".into()]).unwrap_err();
        assert_eq!(bad, "veth[");
    }

    #[test]
    fn default_route_devices_are_read_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
            ens5\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
            vxlan0\t00000000\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n\
            short\t00000000\n";
        assert_eq!(default_route_devices(table), ["eth0", "ens5"]);
        assert!(default_route_devices("").is_empty());
    }

    #[test]
    fn software_devices_are_not_physical() {
        // Loopback has no bus; a missing interface is unknown, not an error.
        assert_ne!(is_physical("lo"), Some(true));
        assert_eq!(is_physical("no-such-if-x"), None);
        assert_eq!(is_physical("a-name-far-too-long-for-linux"), None);
    }
}
