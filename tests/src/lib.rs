//! The network-namespace sandbox that the integration tests and `cargo xtask run` use to get
//! a Kubernetes-like node with pods, without a cluster.
//!
//! Topology (IPv4 only, Calico-like):
//! - the **node** is a network namespace with IPv4 forwarding and the node IP on loopback
//!   (see [`sandbox::NODE_IFACE`]); the proxy runs there ([`Sandbox::node_command`]);
//! - each **pod** is a namespace whose `eth0` (pod IP/32) is one end of a veth pair, with a
//!   default route via 169.254.1.1 and a permanent neighbour entry for it; the other end
//!   sits in the node namespace with a /32 route and a permanent neighbour entry for the pod.
//!   MACs are fixed at creation, so nothing ever ARPs;
//! - every pod runs in-process TCP and UDP echo servers (protocol in [`echo`]);
//! - a **router pod** ([`Sandbox::add_router_pod`]) is a pod that also forwards: pods added
//!   behind it ([`Sandbox::add_pod_behind`]) reach the node only through it, over a link whose
//!   MTU the test picks, so the path has a real hop that can send ICMP errors.
//!
//! A [`Cluster`] joins several sandbox nodes by an underlay bridge, routes each node's pod range
//! through its node IP, and adds a client namespace outside the cluster (see [`cluster`]).
//!
//! Names carry a per-sandbox prefix (tag, pid, counter), so sandboxes in parallel tests do
//! not collide. Dropping a [`Sandbox`] deletes everything it made, also during a panic.
//!
//! Clients: [`tcp_request`] / [`udp_request`] enter a namespace for one exchange; inside
//! [`in_netns`], [`tcp_request_here`] / [`udp_request_here`] do many on one thread; [`sockopt`]
//! has the socket controls (path MTU, ICMP error queue, fixed source ports) beyond `std::net`;
//! [`load`] keeps a steady rate of new connections and a long stream going through a Service
//! while a test upgrades or kills the proxy.

pub mod apiserver;
pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod cmd;
pub mod echo;
pub mod load;
pub mod netns;
pub mod sandbox;
pub mod sockopt;

pub use cgroup::TestCgroup;
pub use client::{RequestError, tcp_request, tcp_request_here, udp_request, udp_request_here};
pub use cluster::Cluster;
pub use echo::{bulk_byte, bulk_pattern};
pub use netns::{command_in, in_netns, list_netns, netns_exists, spawn_in_netns};
pub use sandbox::{PodInfo, PodOptions, Sandbox};
