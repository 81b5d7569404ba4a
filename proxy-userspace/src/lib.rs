//! svcproxy: a Kubernetes Service load balancer on an eBPF datapath.
//!
//! Data flows one way: [`source`] (API server or manifest directory) -> [`planner`] (pure:
//! objects -> [`desired`] state) -> [`writer`] (the only code that changes the maps, through
//! [`kernel_maps`]) -> kernel.
//! [`loader`] loads, pins and attaches the programs; [`run`] ties it together; [`cli`] is the
//! command line.

pub mod caps;
pub mod cli;
pub mod counters;
pub mod desired;
pub mod health;
pub mod iface;
pub mod inspect;
pub mod kernel_maps;
pub mod loader;
pub mod maglev;
pub mod manifest;
pub mod metrics;
pub mod objects;
pub mod planner;
pub mod run;
pub mod service_health;
pub mod socklb;
pub mod source;
pub mod svc_meta;
pub mod writer;
