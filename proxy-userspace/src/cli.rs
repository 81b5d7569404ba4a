//! The `svcproxy` command line: its flags, and how they become [`RunOptions`]. In the library
//! so that the deployment manifests can be checked against the exact parser the binary uses.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    health::{DEFAULT_HEALTH_ADDR, DEFAULT_METRICS_ADDR},
    loader::{Hook, MapSizes},
    planner::{Ipv4Cidr, PlanOptions},
    run::{RunError, RunOptions, SourceKind, SourceOptions},
};

#[derive(Parser)]
#[command(
    name = "svcproxy",
    version,
    about = "Kubernetes Service load balancer on an eBPF datapath"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the datapath, attach it, and keep its maps in sync with the Services. The programs
    /// stay attached and the maps pinned when it exits, for the next start to take over.
    Run(Box<RunArgs>),
    /// Detach the datapath from every interface and remove its pinned maps (live flows are
    /// lost): for uninstalling, with svcproxy stopped.
    Cleanup {
        /// The bpffs directory `svcproxy run` pinned into.
        #[arg(long, default_value = "/sys/fs/bpf/svcproxy")]
        pin_path: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Where Services and EndpointSlices come from; by default the source whose option
    /// (--manifests or --kubeconfig) is given.
    #[arg(long, value_enum)]
    pub source: Option<SourceKind>,
    /// Directory of Kubernetes manifests (Services, EndpointSlices), re-read on change.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// kubeconfig of the API server to follow. With `--source kube` and no kubeconfig:
    /// `KUBECONFIG`, else the in-cluster service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The shortest time between two updates of the maps, in milliseconds: a change after a
    /// quiet spell is written at once, and a burst (a rollout) becomes one update per window.
    #[arg(long, default_value_t = 5)]
    pub coalesce_ms: u64,
    /// Address of the `/metrics` endpoint.
    #[arg(long, default_value_t = DEFAULT_METRICS_ADDR)]
    pub metrics_bind_address: SocketAddr,
    /// Address of the `/healthz` and `/livez` endpoints.
    #[arg(long, default_value_t = DEFAULT_HEALTH_ADDR)]
    pub healthz_bind_address: SocketAddr,
    /// Interfaces to attach to: comma-separated globs, e.g. `veth*,eth0`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub interfaces: Vec<String>,
    /// Kernel hook: tc (virtual devices such as veth) or xdp (NICs with a native driver).
    #[arg(long, value_enum, default_value = "tc")]
    pub hook: Hook,
    /// bpffs directory the maps are pinned in (and adopted from on restart).
    #[arg(long, default_value = "/sys/fs/bpf/svcproxy")]
    pub pin_path: PathBuf,
    /// This node's name (for node-local traffic policies, its zone and its health); default:
    /// the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Serve only the `spec.externalIPs` inside these comma-separated CIDRs (`none`: serve no
    /// external IP). Default: all, as kube-proxy. Anyone who may create a Service can claim any
    /// address as an external IP (CVE-2020-8554); this fences them.
    #[arg(long, value_delimiter = ',', value_parser = parse_range)]
    pub external_ip_ranges: Option<Vec<ExternalIpRange>>,
    /// Maximum number of frontends (Service address x port x protocol).
    #[arg(long, default_value_t = MapSizes::default().frontends)]
    pub max_frontends: u32,
    /// Maximum number of backend slots over all frontends.
    #[arg(long, default_value_t = MapSizes::default().slots)]
    pub max_slots: u32,
    /// Maximum number of backends over all frontends.
    #[arg(long, default_value_t = MapSizes::default().backends)]
    pub max_backends: u32,
    /// Maximum number of conntrack entries (two per flow).
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    pub max_flows: u32,
    /// Maximum number of session-affinity entries (one per client and Service).
    #[arg(long, default_value_t = MapSizes::default().affinity)]
    pub max_affinity: u32,
    /// Maglev table size per Service using `svcproxy.io/lb-algorithm: maglev`; a prime.
    #[arg(long, default_value_t = MapSizes::default().maglev_table_size)]
    pub maglev_table_size: u32,
    /// Maximum number of Maglev table entries over all Services using it.
    #[arg(long, default_value_t = MapSizes::default().maglev_entries)]
    pub max_maglev_entries: u32,
}

/// One `--external-ip-ranges` item.
#[derive(Clone, Copy, Debug)]
pub enum ExternalIpRange {
    None,
    Cidr(Ipv4Cidr),
}

fn parse_range(text: &str) -> Result<ExternalIpRange, String> {
    if text.trim() == "none" {
        Ok(ExternalIpRange::None)
    } else {
        text.parse().map(ExternalIpRange::Cidr)
    }
}

impl RunArgs {
    /// The options `svcproxy run` runs with; `hostname` names the node when neither
    /// `--node-name` nor `NODE_NAME` does.
    pub fn into_options(self, hostname: impl FnOnce() -> String) -> Result<RunOptions, RunError> {
        let source = SourceOptions::resolve(self.source, self.manifests, self.kubeconfig)?;
        let external_ip_ranges = self.external_ip_ranges.map(|ranges| {
            ranges
                .into_iter()
                .filter_map(|r| match r {
                    ExternalIpRange::Cidr(c) => Some(c),
                    ExternalIpRange::None => None,
                })
                .collect()
        });
        Ok(RunOptions {
            source,
            plan: PlanOptions {
                external_ip_ranges,
                ..PlanOptions::default()
            },
            interfaces: self.interfaces,
            hook: self.hook,
            pin_path: self.pin_path,
            node_name: self.node_name.unwrap_or_else(hostname),
            sizes: MapSizes {
                frontends: self.max_frontends,
                slots: self.max_slots,
                backends: self.max_backends,
                conntrack: self.max_flows,
                affinity: self.max_affinity,
                maglev_entries: self.max_maglev_entries,
                maglev_table_size: self.maglev_table_size,
            },
            coalesce: Duration::from_millis(self.coalesce_ms),
            metrics_addr: self.metrics_bind_address,
            health_addr: self.healthz_bind_address,
        })
    }
}
