//! The `svcproxy` command line: its flags, and how they become [`RunOptions`]. In the library
//! so that the deployment manifests can be checked against the exact parser the binary uses.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    health::{DEFAULT_HEALTH_ADDR, DEFAULT_METRICS_ADDR},
    inspect::{
        Request,
        args::{Destination, ServiceRef, Source},
        render::Output,
    },
    loader::{HookChoice, MapSizes},
    planner::{Ipv4Cidr, PlanOptions},
    run::{RunError, RunOptions, SourceKind, SourceOptions},
    socklb::SocketLb,
};

/// Where `svcproxy run` pins its maps and links unless told otherwise.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/svcproxy";

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
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Show what the datapath holds, read from its pinned maps (also while svcproxy is down).
    Inspect {
        #[command(subcommand)]
        what: InspectCommand,
    },
    /// Say what the datapath would do with a packet from SRC to DST, and why: which backend
    /// (an existing flow's, the client's affinity, a Maglev entry, a random slot), or a drop or
    /// reject. Read from the pinned maps (also while svcproxy is down).
    Explain {
        /// The client: SRC_IP, or SRC_IP:PORT to consult conntrack and compute Maglev exactly.
        src: Source,
        /// The frontend: DST_IP:PORT/PROTO (tcp, udp or sctp).
        dst: Destination,
        #[command(flatten)]
        maps: ReadArgs,
    },
}

#[derive(Subcommand)]
pub enum InspectCommand {
    /// Every frontend with its Service, backends (state and weight), reasons and counters.
    Services {
        #[command(flatten)]
        maps: ReadArgs,
    },
    /// The flows in conntrack, with the Service and backend each is translated to.
    Flows {
        /// Only the flows of this Service (NAMESPACE/NAME).
        #[arg(long)]
        service: Option<ServiceRef>,
        #[command(flatten)]
        maps: ReadArgs,
    },
}

/// Where inspection reads from and how it prints.
#[derive(clap::Args)]
pub struct ReadArgs {
    /// The bpffs directory `svcproxy run` pinned into.
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// `table` for people, `json` for tools.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

impl Command {
    /// The inspection this command asks for, with its options; `None` for other commands.
    pub fn inspection(&self) -> Option<(Request, &ReadArgs)> {
        match self {
            Self::Inspect {
                what: InspectCommand::Services { maps },
            } => Some((Request::Services, maps)),
            Self::Inspect {
                what: InspectCommand::Flows { service, maps },
            } => Some((Request::Flows(service.clone()), maps)),
            Self::Explain { src, dst, maps } => Some((Request::Explain(*src, *dst), maps)),
            _ => None,
        }
    }
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
    /// Interfaces to attach to, followed as they appear and go: comma-separated globs, and
    /// `@default-route` for the devices of the IPv4 default route (the node's uplink). The
    /// default covers the host ends of common CNIs' pod veths (bridge CNIs and kindnet `veth*`,
    /// Calico `cali*`, Cilium `lxc*`, GKE `gke*`, AWS VPC CNI `eni*`, Azure `azv*`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "veth*,cali*,lxc*,gke*,eni*,azv*,@default-route"
    )]
    pub interfaces: Vec<String>,
    /// Kernel hook: auto (tc on virtual devices such as veth, native XDP on NICs whose driver
    /// has it, else tc), tc, or xdp.
    #[arg(long, value_enum, default_value = "auto")]
    pub hook: HookChoice,
    /// bpffs directory the maps are pinned in (and adopted from on restart).
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Socket-level balancing: translate a Service address to a backend when a socket
    /// connects (cgroup hooks), which is how the node's own processes and hostNetwork pods
    /// reach Services, and spares pods the per-packet NAT. `tcp`: TCP sockets; `all`: UDP too
    /// (connected UDP sockets are re-balanced when their backend goes); `off`: none, so the
    /// node's own traffic to a ClusterIP is not translated.
    #[arg(long, value_enum, default_value = "tcp")]
    pub socket_lb: SocketLb,
    /// The cgroup v2 directory the socket-level hooks attach to; they act on every process
    /// below it. Default: the root of the cgroup v2 hierarchy (the whole node).
    #[arg(long)]
    pub cgroup_path: Option<PathBuf>,
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
            socket_lb: self.socket_lb,
            cgroup_path: self.cgroup_path,
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("svcproxy").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    fn inspection(args: &[&str]) -> (Request, PathBuf, Output) {
        let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command.inspection() {
            Some((request, read)) => (request, read.pin_path.clone(), read.output),
            None => panic!("{args:?} is no inspection"),
        }
    }

    #[test]
    fn inspection_commands_take_the_run_pin_path_and_an_output() {
        let (request, pins, output) = inspection(&["inspect", "services"]);
        assert_eq!(
            (request, pins, output),
            (Request::Services, DEFAULT_PIN_PATH.into(), Output::Table)
        );
        let (request, pins, output) = inspection(&[
            "inspect",
            "flows",
            "--service",
            "dev/web",
            "--pin-path",
            "/sys/fs/bpf/x",
            "-o",
            "json",
        ]);
        let web = ServiceRef {
            namespace: "dev".into(),
            name: "web".into(),
        };
        assert_eq!(
            (request, pins, output),
            (
                Request::Flows(Some(web)),
                "/sys/fs/bpf/x".into(),
                Output::Json
            )
        );
        let (request, ..) = inspection(&["explain", "10.244.0.2:40000", "10.96.0.10:80/udp"]);
        let want = Request::Explain(
            Source {
                addr: Ipv4Addr::new(10, 244, 0, 2),
                port: Some(40000),
            },
            Destination {
                addr: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                proto: 17,
            },
        );
        assert_eq!(request, want);
        assert!(parse(&["cleanup"]).is_ok_and(|c| c.command.inspection().is_none()));
    }

    #[test]
    fn malformed_inspection_arguments_are_refused_with_the_reason() {
        for (args, want) in [
            (&["explain", "10.244.0.2", "10.96.0.10:80"][..], "no /PROTO"),
            (
                &["explain", "10.244.0.x", "10.96.0.10:80/tcp"],
                "not an IPv4 address",
            ),
            (&["explain", "10.244.0.2"], "DST"),
            (&["inspect", "flows", "--service", "web"], "NAMESPACE/NAME"),
            (&["inspect", "services", "-o", "yaml"], "yaml"),
        ] {
            match parse(args) {
                Err(e) if e.contains(want) => {}
                Err(e) => panic!("{args:?}: error does not mention {want:?}: {e}"),
                Ok(_) => panic!("{args:?} was accepted"),
            }
        }
    }
}
