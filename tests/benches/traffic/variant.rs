//! The compared variants and how each is loaded with the same Services.
//!
//! To add one: a [`Variant`] entry in [`Variant::ALL`], its name, and its arm in [`load`]; the
//! measuring, the tables, the JSON and the plots pick it up from the list.

use std::{
    net::SocketAddrV4,
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use svcproxy_tests::{TestCgroup, in_netns};

use super::{
    iperf, iptables, loadgen, nftables,
    services::{BACKEND_PORT, ServiceSet},
    svcproxy::Proxy,
    topology::Topology,
};

/// How long a freshly loaded variant may take to answer on the measured Service.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// To the backend pods' IPs: no proxy, the baseline.
    Direct,
    /// kube-proxy's iptables mode.
    Iptables,
    /// kube-proxy's nftables mode.
    Nftables,
    SvcproxyTc,
    SvcproxyXdp,
    /// svcproxy's socket-level balancing (`--socket-lb tcp`): the client's TCP sockets are
    /// connected to a backend at `connect()`, and the tc program (attached too, for UDP)
    /// sees them as packets to a pod. The client's load runs in the cgroup the hooks are
    /// attached to, a threaded one of the bench's own (not the machine's root).
    SvcproxySock,
}

impl Variant {
    pub const ALL: [Variant; 6] = [
        Variant::Direct,
        Variant::Iptables,
        Variant::Nftables,
        Variant::SvcproxyTc,
        Variant::SvcproxyXdp,
        Variant::SvcproxySock,
    ];

    /// The variant called `name` (as [`name`](Self::name) spells it).
    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Iptables => "iptables",
            Variant::Nftables => "nftables",
            Variant::SvcproxyTc => "svcproxy-tc",
            Variant::SvcproxyXdp => "svcproxy-xdp",
            Variant::SvcproxySock => "svcproxy-sock",
        }
    }

    /// Letters for the sandbox's name prefix.
    fn tag(self) -> &'static str {
        match self {
            Variant::Direct => "btd",
            Variant::Iptables => "bti",
            Variant::Nftables => "btn",
            Variant::SvcproxyTc => "btt",
            Variant::SvcproxyXdp => "btx",
            Variant::SvcproxySock => "bts",
        }
    }
}

/// A variant ready to measure. Fields drop in order: the proxy stops before its sandbox goes.
pub struct Loaded {
    _proxy: Option<Proxy>,
    /// The cgroup the socket-level hooks are attached to, which the client's load enters.
    pub cgroup: Option<Arc<TestCgroup>>,
    pub topology: Topology,
    pub variant: Variant,
    /// Where the load goes: the measured Service, or for `direct` its backends' pod IPs.
    pub targets: Vec<SocketAddrV4>,
    /// Where iperf3 goes: the bulk Service, or for `direct` its backend's pod IP.
    pub bulk: SocketAddrV4,
    /// How long loading the Services took (rules or maps written, measured Service answering).
    pub load_time: Duration,
}

/// Builds `variant`'s topology and loads it with `n` Services; `bin` is the svcproxy binary.
pub fn load(variant: Variant, n: usize, bin: &Path) -> Result<Loaded> {
    let topology = Topology::new(variant.tag())?;
    let set = ServiceSet::new(n, &topology.backends);
    let node = topology.sandbox.node_netns().to_owned();
    let started = Instant::now();
    let cgroup = match variant {
        Variant::SvcproxySock => Some(Arc::new(TestCgroup::new(variant.tag())?)),
        _ => None,
    };
    let proxy = match variant {
        Variant::Direct => None,
        Variant::Iptables => {
            iptables::load(&node, &set)?;
            None
        }
        Variant::Nftables => {
            nftables::load(&node, &set)?;
            None
        }
        Variant::SvcproxyTc | Variant::SvcproxyXdp | Variant::SvcproxySock => {
            let hook = if variant == Variant::SvcproxyXdp {
                "xdp"
            } else {
                "tc"
            };
            let socket_lb = match &cgroup {
                Some(cg) => vec![
                    "--socket-lb".into(),
                    "tcp".into(),
                    "--cgroup-path".into(),
                    cg.path().as_os_str().to_owned(),
                ],
                // Measured without: and never on the machine's root cgroup.
                None => vec!["--socket-lb".into(), "off".into()],
            };
            let mut proxy = Proxy::start(
                bin,
                &topology.sandbox,
                &set,
                hook,
                variant.tag(),
                &socket_lb,
            )?;
            let frontends = set.services.iter().map(|s| s.ports.len()).sum();
            proxy.wait_synced(frontends)?;
            Some(proxy)
        }
    };
    let (targets, bulk) = if variant == Variant::Direct {
        let targets = topology
            .backends
            .iter()
            .map(|&ip| SocketAddrV4::new(ip, BACKEND_PORT))
            .collect();
        (
            targets,
            SocketAddrV4::new(topology.backends[0], iperf::PORT),
        )
    } else {
        (vec![set.measured_addr()], set.bulk_addr())
    };
    wait_answering(&topology.client_netns, cgroup.clone(), targets[0])
        .with_context(|| format!("{} with {n} Services", variant.name()))?;
    if let (Variant::SvcproxySock, Some(p)) = (variant, &proxy) {
        p.check_socket_lb_used()?;
    }
    Ok(Loaded {
        load_time: started.elapsed(),
        _proxy: proxy,
        cgroup,
        topology,
        variant,
        targets,
        bulk,
    })
}

/// Waits until a TCP request/response and a UDP one to `target` succeed from the client pod
/// (inside `cgroup`, if any).
fn wait_answering(
    client_netns: &str,
    cgroup: Option<Arc<TestCgroup>>,
    target: SocketAddrV4,
) -> Result<()> {
    in_netns(client_netns, move || {
        if let Some(cg) = &cgroup {
            cg.enter()?;
        }
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < ANSWER_WITHIN {
            match loadgen::probe(target) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            thread::sleep(Duration::from_millis(100));
        }
        match last {
            Some(e) => bail!("{target} did not answer within {ANSWER_WITHIN:?}: {e:#}"),
            None => bail!("{target} did not answer within {ANSWER_WITHIN:?}"),
        }
    })?
}
