//! The `svcproxy` command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use svcproxy::{
    health::{DEFAULT_HEALTH_ADDR, DEFAULT_METRICS_ADDR},
    loader::{Hook, MapSizes},
    planner::{Ipv4Cidr, PlanOptions},
    run::{RunOptions, SourceKind, SourceOptions, run},
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "svcproxy",
    version,
    about = "Kubernetes Service load balancer on an eBPF datapath"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
struct RunArgs {
    /// Where Services and EndpointSlices come from; by default the source whose option
    /// (--manifests or --kubeconfig) is given.
    #[arg(long, value_enum)]
    source: Option<SourceKind>,
    /// Directory of Kubernetes manifests (Services, EndpointSlices), re-read on change.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// kubeconfig of the API server to follow. With `--source kube` and no kubeconfig:
    /// `KUBECONFIG`, else the in-cluster service account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// How long a change waits for more before the maps are updated, in milliseconds:
    /// a burst (a rollout) becomes one update.
    #[arg(long, default_value_t = 5)]
    coalesce_ms: u64,
    /// Address of the `/metrics` endpoint.
    #[arg(long, default_value_t = DEFAULT_METRICS_ADDR)]
    metrics_bind_address: SocketAddr,
    /// Address of the `/healthz` and `/livez` endpoints.
    #[arg(long, default_value_t = DEFAULT_HEALTH_ADDR)]
    healthz_bind_address: SocketAddr,
    /// Interfaces to attach to: comma-separated globs, e.g. `veth*,eth0`.
    #[arg(long, value_delimiter = ',', required = true)]
    interfaces: Vec<String>,
    /// Kernel hook: tc (virtual devices such as veth) or xdp (NICs with a native driver).
    #[arg(long, value_enum, default_value = "tc")]
    hook: Hook,
    /// bpffs directory the maps are pinned in (and adopted from on restart).
    #[arg(long, default_value = "/sys/fs/bpf/svcproxy")]
    pin_path: PathBuf,
    /// This node's name (for node-local traffic policies, its zone and its health); default:
    /// the hostname.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Serve only the `spec.externalIPs` inside these comma-separated CIDRs (`none`: serve no
    /// external IP). Default: all, as kube-proxy. Anyone who may create a Service can claim any
    /// address as an external IP (CVE-2020-8554); this fences them.
    #[arg(long, value_delimiter = ',', value_parser = parse_range)]
    external_ip_ranges: Option<Vec<ExternalIpRange>>,
    /// Maximum number of frontends (Service address x port x protocol).
    #[arg(long, default_value_t = MapSizes::default().frontends)]
    max_frontends: u32,
    /// Maximum number of backend slots over all frontends.
    #[arg(long, default_value_t = MapSizes::default().slots)]
    max_slots: u32,
    /// Maximum number of backends over all frontends.
    #[arg(long, default_value_t = MapSizes::default().backends)]
    max_backends: u32,
    /// Maximum number of conntrack entries (two per flow).
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    max_flows: u32,
    /// Maximum number of session-affinity entries (one per client and Service).
    #[arg(long, default_value_t = MapSizes::default().affinity)]
    max_affinity: u32,
    /// Maglev table size per Service using `svcproxy.io/lb-algorithm: maglev`; a prime.
    #[arg(long, default_value_t = MapSizes::default().maglev_table_size)]
    maglev_table_size: u32,
    /// Maximum number of Maglev table entries over all Services using it.
    #[arg(long, default_value_t = MapSizes::default().maglev_entries)]
    max_maglev_entries: u32,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // kube's HTTP layer logs every failed request as an error; the watch loop logs the
            // same failures itself, rate-limited, so an outage does not flood the log.
            EnvFilter::try_from_env("SVCPROXY_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,kube_client::client::builder=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            let node_name = args.node_name.unwrap_or_else(hostname);
            let source = match SourceOptions::resolve(args.source, args.manifests, args.kubeconfig)
            {
                Ok(source) => source,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let external_ip_ranges = args.external_ip_ranges.map(|ranges| {
                ranges
                    .into_iter()
                    .filter_map(|r| match r {
                        ExternalIpRange::Cidr(c) => Some(c),
                        ExternalIpRange::None => None,
                    })
                    .collect()
            });
            let opts = RunOptions {
                source,
                plan: PlanOptions {
                    external_ip_ranges,
                    ..PlanOptions::default()
                },
                interfaces: args.interfaces,
                hook: args.hook,
                pin_path: args.pin_path,
                node_name,
                sizes: MapSizes {
                    frontends: args.max_frontends,
                    slots: args.max_slots,
                    backends: args.max_backends,
                    conntrack: args.max_flows,
                    affinity: args.max_affinity,
                    maglev_entries: args.max_maglev_entries,
                    maglev_table_size: args.maglev_table_size,
                },
                coalesce: Duration::from_millis(args.coalesce_ms),
                metrics_addr: args.metrics_bind_address,
                health_addr: args.healthz_bind_address,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run(opts)).map_err(anyhow::Error::from))
        }
        Command::Cleanup { pin_path } => match svcproxy::loader::cleanup(&pin_path) {
            Ok(true) => {
                tracing::info!(pin_path = %pin_path.display(), "detached and removed");
                Ok(())
            }
            Ok(false) => {
                tracing::info!(pin_path = %pin_path.display(), "nothing pinned there");
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One `--external-ip-ranges` item.
#[derive(Clone, Copy, Debug)]
enum ExternalIpRange {
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
