//! One variant's network: a sandbox node with a client pod and ten backend pods over veths,
//! the bench servers in the backends and iperf3 in the first one. Every variant gets its own,
//! with the same addresses, so rules and programs of one never touch another's traffic.

use std::{fs, net::Ipv4Addr};

use anyhow::{Context as _, Result};
use svcproxy_tests::{PodOptions, Sandbox, in_netns};

use super::{
    cpu, iperf,
    server::Servers,
    services::{BACKEND_PORT, ENDPOINTS_PER_SERVICE},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);

/// Fields drop in order: the servers' sockets and iperf3 hold the pods' namespaces, so they
/// go before the sandbox.
pub struct Topology {
    _iperf: iperf::Server,
    _servers: Servers,
    pub client_netns: String,
    pub backends: Vec<Ipv4Addr>,
    pub sandbox: Sandbox,
}

impl Topology {
    pub fn new(tag: &str) -> Result<Self> {
        let mut sandbox = Sandbox::new(tag, NODE_IP)?;
        // The bench's own servers replace the sandbox's echo servers.
        let none = || PodOptions::default().tcp_ports([]).udp_ports([]);
        let client = sandbox.add_pod_with("client", CLIENT_IP, none())?;
        let mut backends = Vec::new();
        let mut backend_netns = Vec::new();
        for i in 0..ENDPOINTS_PER_SERVICE {
            let ip = Ipv4Addr::new(10, 244, 1, 1 + i as u8);
            let pod = sandbox.add_pod_with(&format!("backend-{i}"), ip, none())?;
            backends.push(ip);
            backend_netns.push(pod.netns);
        }
        // Each connection of a run takes a fresh ephemeral port: give it the whole range.
        in_netns(&client.netns, || {
            fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")
                .context("widen the client's ephemeral port range")
        })??;
        let servers = Servers::start(&backend_netns, BACKEND_PORT, cpu::server())?;
        let iperf = iperf::Server::start(&backend_netns[0], cpu::server())?;
        Ok(Self {
            _iperf: iperf,
            _servers: servers,
            client_netns: client.netns,
            backends,
            sandbox,
        })
    }
}
