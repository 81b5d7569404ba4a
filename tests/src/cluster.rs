//! Several sandbox nodes on one underlay, and a client outside the cluster: the topology that
//! node-facing Services (NodePort, LoadBalancer, external IPs, traffic policies) are tested on.
//!
//! - The **underlay** is a bridge in a namespace of its own, standing for the network between
//!   machines. Its subnet is [`UNDERLAY`]; node `i` has the address [`Cluster::node_ip`].
//! - Each **node** is a [`Sandbox`] (its node IP on loopback, pods behind veths) whose namespace
//!   also has an uplink, [`UPLINK`], into the bridge. The node answers ARP for its IP there
//!   (loopback addresses are answered on any interface), so its IP is reachable on the underlay.
//! - Each node owns the pod range 10.244.`i`.0/24 ([`Cluster::pod_ip`]) and routes the other
//!   nodes' ranges through their node IPs, as a CNI in host-gateway mode does (flannel host-gw,
//!   Calico without an overlay): pods on different nodes reach each other un-NATed.
//! - The **external client** is a namespace on the underlay with [`EXTERNAL_IP`] and no route
//!   to the pod ranges: it reaches the cluster only through node IPs and the routes a test adds
//!   for load-balancer IPs ([`Cluster::route_external`]), as a client outside the cluster does.
//!
//! Dropping a [`Cluster`] deletes the underlay and the external client, then every node.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};

use crate::{
    cmd::ip,
    netns::netns_exists,
    sandbox::{Sandbox, ip_in, remove_etc_netns, set_sysctls},
};

/// The underlay subnet (a /24).
pub const UNDERLAY: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 0);
/// The external client's address on the underlay.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 200);
/// The uplink's name in each node namespace.
pub const UPLINK: &str = "uplink";
/// The most nodes a cluster may have (their addresses and pod ranges stay distinct).
pub const MAX_NODES: usize = 8;

/// Nodes joined by an underlay, plus a client outside the cluster.
pub struct Cluster {
    underlay: String,
    external: String,
    nodes: Vec<Sandbox>,
    torn_down: bool,
}

impl Cluster {
    /// `count` nodes, named by `tag` like [`Sandbox::new`]'s.
    pub fn new(tag: &str, count: usize) -> Result<Self> {
        ensure!(
            (1..=MAX_NODES).contains(&count),
            "1 to {MAX_NODES} nodes, not {count}"
        );
        let mut nodes = Vec::with_capacity(count);
        for i in 0..count {
            nodes.push(Sandbox::new(tag, Self::node_ip(i)).with_context(|| format!("node {i}"))?);
        }
        let prefix = nodes[0].prefix().to_owned();
        let mut cluster = Cluster {
            underlay: format!("{prefix}-ul"),
            external: format!("{prefix}-ext"),
            nodes,
            torn_down: false,
        };
        // From here on a failure drops `cluster`, which deletes whatever was made.
        cluster.build().context("build the cluster's underlay")?;
        Ok(cluster)
    }

    fn build(&mut self) -> Result<()> {
        let (ul, ext) = (&self.underlay, &self.external);
        ip(["netns", "add", ul])?;
        set_sysctls(ul, &[])?;
        ip_in(ul, "link set lo up")?;
        ip_in(ul, "link add br0 type bridge")?;
        ip_in(ul, "link set br0 up")?;
        let subnet = format!("{UNDERLAY}/24");
        for (i, node) in self.nodes.iter().enumerate() {
            let netns = node.node_netns();
            let (node_ip, port) = (Self::node_ip(i), format!("n{i}"));
            ip_in(
                ul,
                &format!("link add {port} type veth peer name {UPLINK} netns {netns}"),
            )?;
            ip_in(ul, &format!("link set {port} master br0 up"))?;
            ip_in(netns, &format!("link set {UPLINK} up"))?;
            ip_in(
                netns,
                &format!("route add {subnet} dev {UPLINK} src {node_ip}"),
            )?;
            for other in (0..self.nodes.len()).filter(|&o| o != i) {
                ip_in(
                    netns,
                    &format!(
                        "route add {} via {} dev {UPLINK}",
                        Self::pod_cidr(other),
                        Self::node_ip(other)
                    ),
                )?;
            }
        }
        ip(["netns", "add", ext])?;
        set_sysctls(ext, &[])?;
        ip_in(ext, "link set lo up")?;
        ip_in(
            ul,
            &format!("link add ext type veth peer name eth0 netns {ext}"),
        )?;
        ip_in(ul, "link set ext master br0 up")?;
        ip_in(ext, &format!("addr add {EXTERNAL_IP}/24 dev eth0"))?;
        ip_in(ext, "link set eth0 up")?;
        Ok(())
    }

    /// Node `i`'s address on the underlay.
    pub fn node_ip(i: usize) -> Ipv4Addr {
        let [a, b, c, _] = UNDERLAY.octets();
        Ipv4Addr::new(a, b, c, 10 + i as u8)
    }

    /// Node `i`'s pod range, `10.244.<i>.0/24`.
    pub fn pod_cidr(i: usize) -> String {
        format!("10.244.{i}.0/24")
    }

    /// Address `host` (1-254) of node `i`'s pod range.
    pub fn pod_ip(i: usize, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, i as u8, host)
    }

    pub fn node(&self, i: usize) -> &Sandbox {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Sandbox {
        &mut self.nodes[i]
    }

    pub fn nodes(&self) -> &[Sandbox] {
        &self.nodes
    }

    /// The external client's namespace.
    pub fn external_netns(&self) -> &str {
        &self.external
    }

    /// Routes `dest` (an address or CIDR) from the external client via node `i`, as a router
    /// announcing a load-balancer IP (MetalLB's layer-2 or BGP mode) makes the outside do.
    pub fn route_external(&self, dest: &str, i: usize) -> Result<()> {
        ip_in(
            &self.external,
            &format!("route replace {dest} via {}", Self::node_ip(i)),
        )
        .map(drop)
    }

    /// Deletes everything now and reports what could not be deleted.
    pub fn teardown(mut self) -> Result<()> {
        self.torn_down = true;
        let mut problems = self.delete_underlay();
        for node in std::mem::take(&mut self.nodes) {
            if let Err(e) = node.teardown() {
                problems.push(format!("{e:#}"));
            }
        }
        ensure!(
            problems.is_empty(),
            "tear down cluster: {}",
            problems.join("; ")
        );
        Ok(())
    }

    /// Deleting a namespace deletes the veths with an end in it, so the nodes lose their uplinks.
    fn delete_underlay(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for ns in [&self.external, &self.underlay] {
            if netns_exists(ns)
                && let Err(e) = ip(["netns", "del", ns.as_str()])
            {
                problems.push(format!("{e:#}"));
            }
            if let Err(e) = remove_etc_netns(ns) {
                problems.push(format!("{e:#}"));
            }
        }
        problems
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        // Never let a panic escape while unwinding; the nodes drop (and clean up) after this.
        let problems =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.delete_underlay()))
                .unwrap_or_else(|_| vec!["panicked".to_owned()]);
        if !problems.is_empty() {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "warning: tear down cluster {}: {}",
                self.underlay,
                problems.join("; ")
            );
        }
    }
}
