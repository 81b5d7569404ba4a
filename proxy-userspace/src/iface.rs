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

/// Interfaces matching any of the glob patterns, sorted by name.
pub fn matching(patterns: &[glob::Pattern]) -> io::Result<Vec<Interface>> {
    let mut found: Vec<Interface> = list()?
        .into_iter()
        .filter(|i| patterns.iter().any(|p| p.matches(&i.name)))
        .collect();
    found.sort();
    Ok(found)
}

/// The index of the interface named `name` now, if there is one.
pub fn index_of(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// How often interfaces are listed again when the netlink socket failed.
const POLL_FALLBACK: std::time::Duration = std::time::Duration::from_secs(1);

/// Wakes when an interface is added, removed or renamed: an rtnetlink socket subscribed to
/// link notifications. It carries no state of its own: after each wake the caller lists the
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
        addr.nl_groups = libc::RTMGRP_LINK as u32;
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
        let pats = [glob::Pattern::new("l?").unwrap()];
        assert!(matching(&pats).unwrap().contains(&lo));
        assert_eq!(index_of("no-such-interface-x"), None);
        assert_eq!(index_of("nul\0inside"), None);
    }
}
