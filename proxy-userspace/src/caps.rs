//! The capabilities svcproxy needs, checked at start: the kernel answers a missing one with a
//! bare "Operation not permitted" (or a verifier log) halfway through loading, while this names
//! it before anything is created.
//!
//! Needed, whatever the kernel (>= 5.8, which introduced CAP_BPF and CAP_PERFMON):
//! - CAP_BPF: create maps, load programs, pin both.
//! - CAP_NET_ADMIN: load and attach tc and XDP programs (networking program types).
//! - CAP_PERFMON: without it the verifier treats the loader as untrusted and applies Spectre v1
//!   hardening, which refuses pointer arithmetic with a variable offset; the datapath needs
//!   that to reach the L4 header behind a variable-length IPv4 header.
//!
//! CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON (the kernel accepts either), so a privileged
//! process passes too. CAP_SYS_RESOURCE is needed only on kernels before 5.11, which charge map
//! memory to RLIMIT_MEMLOCK instead of the memory cgroup: there svcproxy raises the limit, and
//! names the capability if it may not.

use std::{fmt, io};

use thiserror::Error;

/// One Linux capability: its name in `capabilities(7)` and its bit in the capability sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    pub bit: u32,
    /// What svcproxy does with it, for the error message.
    pub used_for: &'static str,
}

impl Capability {
    /// The name Kubernetes' `securityContext.capabilities` uses (without `CAP_`).
    pub fn kubernetes_name(&self) -> &'static str {
        self.name.strip_prefix("CAP_").unwrap_or(self.name)
    }

    fn is_in(&self, set: u64) -> bool {
        set & (1 << self.bit) != 0
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.used_for)
    }
}

pub const CAP_NET_ADMIN: Capability = Capability {
    name: "CAP_NET_ADMIN",
    bit: 12,
    used_for: "load and attach tc and XDP programs",
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    name: "CAP_SYS_ADMIN",
    bit: 21,
    used_for: "covers CAP_BPF and CAP_PERFMON",
};
pub const CAP_SYS_RESOURCE: Capability = Capability {
    name: "CAP_SYS_RESOURCE",
    bit: 24,
    used_for: "raise RLIMIT_MEMLOCK for the maps on kernels before 5.11",
};
pub const CAP_PERFMON: Capability = Capability {
    name: "CAP_PERFMON",
    bit: 38,
    used_for: "let the verifier accept variable-offset packet pointer arithmetic",
};
pub const CAP_BPF: Capability = Capability {
    name: "CAP_BPF",
    bit: 39,
    used_for: "create maps and load programs",
};

/// Needed only with `--socket-lb all`: re-balancing a connected UDP socket borrows it from its
/// process (`pidfd_getfd`), which the kernel allows only with ptrace rights over that process.
pub const CAP_SYS_PTRACE: Capability = Capability {
    name: "CAP_SYS_PTRACE",
    bit: 19,
    used_for: "re-balance other processes' connected UDP sockets (--socket-lb all)",
};

/// Every capability `svcproxy run` needs on a current kernel, and no other.
pub const REQUIRED: [Capability; 3] = [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON];

#[derive(Debug, Error)]
pub enum CapError {
    #[error(
        "missing {}; grant {} (Kubernetes: securityContext.capabilities.add: [{}]; see \
         docs/operations.md)",
        list(.missing), if .missing.len() == 1 { "it" } else { "them" },
        .missing.iter().map(Capability::kubernetes_name).collect::<Vec<_>>().join(", ")
    )]
    Missing { missing: Vec<Capability> },
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Status(io::Error),
    #[error(
        "kernel {release} charges map memory to RLIMIT_MEMLOCK (kernels before 5.11 do) and the \
         limit is {limit}; raising it failed ({error}): grant {CAP_SYS_RESOURCE} or start \
         svcproxy with an unlimited memlock limit (`ulimit -l unlimited`)"
    )]
    Memlock {
        release: String,
        limit: String,
        error: io::Error,
    },
}

fn list(caps: &[Capability]) -> String {
    caps.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fails, naming each missing capability, unless this process may load and attach the datapath.
/// Also raises RLIMIT_MEMLOCK where the kernel still charges maps to it.
pub fn check() -> Result<(), CapError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(CapError::Status)?;
    let effective = effective_set(&status).ok_or_else(|| {
        CapError::Status(io::Error::new(
            io::ErrorKind::InvalidData,
            "no readable CapEff line",
        ))
    })?;
    let missing = missing(effective);
    if !missing.is_empty() {
        return Err(CapError::Missing { missing });
    }
    raise_memlock_if_charged()
}

/// Fails unless this process holds [`CAP_SYS_PTRACE`] (for `--socket-lb all`).
pub fn check_udp_rebalancing() -> Result<(), CapError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(CapError::Status)?;
    match effective_set(&status) {
        Some(set) if CAP_SYS_PTRACE.is_in(set) => Ok(()),
        _ => Err(CapError::Missing {
            missing: vec![CAP_SYS_PTRACE],
        }),
    }
}

/// The required capabilities absent from the effective set `effective`.
pub fn missing(effective: u64) -> Vec<Capability> {
    let admin = CAP_SYS_ADMIN.is_in(effective);
    REQUIRED
        .into_iter()
        .filter(|cap| !cap.is_in(effective))
        // The kernel's bpf_capable() and perfmon_capable() also accept CAP_SYS_ADMIN.
        .filter(|cap| !(admin && (*cap == CAP_BPF || *cap == CAP_PERFMON)))
        .collect()
}

/// The effective set from the text of `/proc/<pid>/status` (`CapEff:` in hex).
pub fn effective_set(status: &str) -> Option<u64> {
    status_field(status, "CapEff:")
}

/// A capability set (`CapEff:`, `CapPrm:`, `CapBnd:`, ...) from `/proc/<pid>/status`.
pub fn status_field(status: &str, field: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix(field))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Kernels before 5.11 charge map memory to RLIMIT_MEMLOCK, whose default (64 KiB to 8 MiB)
/// is far below the conntrack map's size; later ones charge the memory cgroup instead.
fn charges_memlock(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < (5, 11),
        // An unparsable release: assume a current kernel rather than demand a capability.
        _ => false,
    }
}

fn kernel_release() -> Option<String> {
    // SAFETY: uname fills a zeroed utsname; its fields are NUL-terminated.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    // SAFETY: `release` is NUL-terminated by uname.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
    Some(release.to_string_lossy().into_owned())
}

fn raise_memlock_if_charged() -> Result<(), CapError> {
    let Some(release) = kernel_release().filter(|r| charges_memlock(r)) else {
        return Ok(());
    };
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with valid pointers to rlimit structs.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) };
    if current.rlim_cur == libc::RLIM_INFINITY {
        return Ok(());
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        tracing::info!(%release, "raised RLIMIT_MEMLOCK: this kernel charges map memory to it");
        return Ok(());
    }
    Err(CapError::Memlock {
        release,
        limit: format!("{} KiB", current.rlim_cur / 1024),
        error: io::Error::last_os_error(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(caps: &[Capability]) -> u64 {
        caps.iter().fold(0, |s, c| s | 1 << c.bit)
    }

    #[test]
    fn each_missing_capability_is_named_and_sys_admin_covers_bpf_and_perfmon() {
        for (have, missing_names) in [
            (set(&REQUIRED), vec![]),
            (u64::MAX, vec![]),
            (0, vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]),
            (set(&[CAP_NET_ADMIN, CAP_PERFMON]), vec!["CAP_BPF"]),
            (set(&[CAP_BPF, CAP_PERFMON]), vec!["CAP_NET_ADMIN"]),
            (set(&[CAP_BPF, CAP_NET_ADMIN]), vec!["CAP_PERFMON"]),
            (set(&[CAP_SYS_ADMIN, CAP_NET_ADMIN]), vec![]),
            (set(&[CAP_SYS_ADMIN]), vec!["CAP_NET_ADMIN"]),
        ] {
            let got: Vec<&str> = missing(have).iter().map(|c| c.name).collect();
            assert_eq!(got, missing_names, "effective set {have:#x}");
        }
    }

    #[test]
    fn error_names_the_capability_and_the_kubernetes_spelling() {
        let msg = CapError::Missing {
            missing: vec![CAP_BPF],
        }
        .to_string();
        assert!(
            msg.contains("missing CAP_BPF (create maps") && msg.contains("add: [BPF]"),
            "{msg}"
        );
    }

    #[test]
    fn capability_sets_parse_from_proc_status() {
        let status = "Name:\tsvcproxy\nCapInh:\t0000000000000000\nCapEff:\t000000c000001000\n";
        assert_eq!(effective_set(status), Some(set(&REQUIRED)));
        assert_eq!(status_field(status, "CapInh:"), Some(0));
        assert_eq!(effective_set("Name:\tx\n"), None);
    }

    #[test]
    fn only_kernels_before_5_11_charge_maps_to_memlock() {
        for (release, charged) in [
            ("5.10.0-28-amd64", true),
            ("4.19.0", true),
            ("5.11.0", false),
            ("6.18.44-fc-v595", false),
            ("garbage", false),
        ] {
            assert_eq!(charges_memlock(release), charged, "{release}");
        }
    }
}
