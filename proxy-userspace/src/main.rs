//! The `svcproxy` command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use svcproxy::{
    loader::{Hook, MapSizes},
    run::{RunOptions, run},
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
    /// Load the datapath, attach it, and keep its maps in sync with the Services.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory of Kubernetes manifests (Services, EndpointSlices), re-read on change.
    #[arg(long)]
    manifests: PathBuf,
    /// Interfaces to attach to: comma-separated globs, e.g. `veth*,eth0`.
    #[arg(long, value_delimiter = ',', required = true)]
    interfaces: Vec<String>,
    /// Kernel hook: tc (virtual devices such as veth) or xdp (NICs with a native driver).
    #[arg(long, value_enum, default_value = "tc")]
    hook: Hook,
    /// bpffs directory the maps are pinned in (and adopted from on restart).
    #[arg(long, default_value = "/sys/fs/bpf/svcproxy")]
    pin_path: PathBuf,
    /// This node's name (for node-local traffic policies).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
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
            EnvFilter::try_from_env("SVCPROXY_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            let node_name = args.node_name.unwrap_or_else(hostname);
            let opts = RunOptions {
                manifests: args.manifests,
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
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run(opts)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
