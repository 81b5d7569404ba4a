//! `cargo xtask run --kubeconfig PATH` (or with `KUBECONFIG` set): svcproxy on this machine as
//! a node of that cluster, e.g. inside a kind node, instead of the sandbox demo. It attaches to
//! this machine's interfaces and follows the cluster's API server, as the DaemonSet's pod does;
//! Ctrl-C stops it, and the maps stay pinned for the next start, as they do for the pod.

use std::{
    ffi::OsString,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::{RunArgs, proxy::Proxy, signals::StopSignal};
use crate::setup;

/// The interfaces attached to unless `--interfaces` says otherwise: the host ends of pod veths
/// and the node's uplink, where replies from other nodes' backends arrive (deploy/'s default).
pub const DEFAULT_INTERFACES: &str = "veth*,@default-route";
/// Where the maps are pinned unless `--pin-path` says otherwise: the DaemonSet's pin path, so
/// `bpftool` and a later svcproxy find them in the usual place.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/svcproxy";
/// svcproxy's `/metrics` (its default bind address). Its last-sync timestamp, not `/healthz`,
/// tells that the first sync happened: like kube-proxy's, `/healthz` answers 200 from the start
/// until a change has waited too long.
const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);
const LAST_SYNC: &str = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
/// How long `--once` waits for svcproxy's first complete sync.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which cluster to follow, and how svcproxy learns of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cluster {
    /// `--kubeconfig PATH`: passed on as svcproxy's `--kubeconfig`.
    Kubeconfig(PathBuf),
    /// `KUBECONFIG` (possibly a list of files): svcproxy inherits it and reads it itself.
    Env(OsString),
}

impl Cluster {
    /// The cluster to follow: `--kubeconfig` first, else a non-empty `KUBECONFIG`; `None` means
    /// the sandbox demo.
    pub fn from(flag: Option<&Path>, env: Option<OsString>) -> Option<Self> {
        match (flag, env) {
            (Some(path), _) => Some(Self::Kubeconfig(path.to_owned())),
            (None, Some(env)) if !env.is_empty() => Some(Self::Env(env)),
            _ => None,
        }
    }
}

/// What `cargo xtask run` does with `args` and the `KUBECONFIG` value `env`: follow a cluster,
/// or (`None`) play the sandbox demo. Refuses options that belong to the other mode rather
/// than ignore them.
pub fn choose(args: &RunArgs, env: Option<OsString>) -> Result<Option<Cluster>> {
    let cluster = Cluster::from(args.kubeconfig.as_deref(), env);
    match &cluster {
        Some(Cluster::Env(env)) if args.app.is_some() => bail!(
            "--app plays the sandbox demo, but KUBECONFIG={} asks to follow that cluster; \
             unset KUBECONFIG for the demo",
            env.to_string_lossy()
        ),
        None if !args.interfaces.is_empty()
            || args.node_name.is_some()
            || args.pin_path.is_some() =>
        {
            bail!(
                "--interfaces, --node-name and --pin-path are for following a cluster; add \
                 --kubeconfig PATH (or set KUBECONFIG), or drop them for the sandbox demo"
            )
        }
        _ => Ok(cluster),
    }
}

/// The `svcproxy run` arguments for following `cluster` on this machine.
pub fn svcproxy_args(cluster: &Cluster, args: &RunArgs) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec!["run".into()];
    match cluster {
        Cluster::Kubeconfig(path) => out.extend(["--kubeconfig".into(), path.into()]),
        Cluster::Env(_) => out.extend(["--source".into(), "kube".into()]),
    }
    let interfaces = if args.interfaces.is_empty() {
        DEFAULT_INTERFACES.to_owned()
    } else {
        args.interfaces.join(",")
    };
    out.extend(["--interfaces".into(), interfaces.into()]);
    // auto: tc on the pod veths (where XDP copies every packet), native XDP on a NIC with it.
    out.extend(["--hook".into(), "auto".into()]);
    let pin_path = args
        .pin_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_PATH));
    out.extend(["--pin-path".into(), pin_path.into()]);
    // Without it svcproxy takes NODE_NAME, else the hostname (a kind node's is its name).
    if let Some(node) = &args.node_name {
        out.extend(["--node-name".into(), node.into()]);
    }
    if let Some(mode) = &args.socket_lb {
        out.extend(["--socket-lb".into(), mode.into()]);
    }
    out
}

/// Runs svcproxy against `cluster` until Ctrl-C (or, with `--once`, until its first complete
/// sync, then stops it).
pub fn run(args: &RunArgs, cluster: &Cluster, stop: &StopSignal) -> Result<()> {
    prepare()?;
    let binary = super::svcproxy_binary()?;
    let svcproxy_args = svcproxy_args(cluster, args);
    let mut cmd = Command::new(&binary);
    cmd.args(&svcproxy_args);
    let mut shown = format!(
        "svcproxy {}",
        svcproxy_args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Cluster::Env(env) = cluster {
        shown = format!("KUBECONFIG={} {shown}", env.to_string_lossy());
    }
    println!("\nfollowing the cluster's API server as this node: {shown}");
    let started = Instant::now();
    let mut proxy = Proxy::start(cmd, &shown)?;
    let result = supervise(args, &mut proxy, stop, started);
    let stopped = proxy.stop();
    let status = stopped?;
    println!("svcproxy stopped ({status}); its maps stay pinned for the next start");
    result
}

/// Root and bpffs always; the build toolchain only when svcproxy must be built here.
fn prepare() -> Result<()> {
    if std::env::var_os("SVCPROXY_BIN").is_some_and(|b| !b.is_empty()) {
        setup::ensure_root()?;
        setup::ensure_bpffs()
    } else {
        setup::setup()
    }
}

fn supervise(args: &RunArgs, proxy: &mut Proxy, stop: &StopSignal, started: Instant) -> Result<()> {
    let mut announced = false;
    loop {
        if stop.wait(Duration::from_millis(250)) {
            return Ok(());
        }
        if let Err(e) = proxy.check_running() {
            // Ctrl-C in a terminal reaches svcproxy too and may end it first.
            if stop.wait(Duration::from_millis(200)) {
                return Ok(());
            }
            return Err(e);
        }
        if !announced && synced() {
            announced = true;
            println!(
                "\nsvcproxy programmed this node's datapath from the cluster ({:.1} s after start).",
                started.elapsed().as_secs_f64()
            );
            if args.once {
                return Ok(());
            }
            println!(
                "Inspect it with `bpftool map dump pinned {}/FRONTENDS4`; Ctrl-C to stop.",
                args.pin_path
                    .as_deref()
                    .unwrap_or(Path::new(DEFAULT_PIN_PATH))
                    .display()
            );
        }
        if args.once && started.elapsed() > READY_TIMEOUT {
            bail!(
                "svcproxy did not complete its first sync within {READY_TIMEOUT:?} (its log is \
                 above)"
            );
        }
    }
}

/// Whether svcproxy has programmed the maps at least once: its last-sync timestamp in
/// `/metrics` is set.
fn synced() -> bool {
    let attempt = || -> std::io::Result<String> {
        let mut conn = TcpStream::connect_timeout(&METRICS.into(), Duration::from_millis(200))?;
        conn.set_read_timeout(Some(Duration::from_secs(1)))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut page = String::new();
        conn.read_to_string(&mut page)?;
        Ok(page)
    };
    attempt().is_ok_and(|page| last_sync(&page).is_some_and(|t| t > 0.0))
}

/// The value of [`LAST_SYNC`] in a metrics page.
fn last_sync(page: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(LAST_SYNC)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let argv = std::iter::once("run").chain(extra.iter().copied());
        Cli::try_parse_from(argv)
            .expect("valid xtask run arguments")
            .run
    }

    fn line(cluster: &Cluster, extra: &[&str]) -> String {
        svcproxy_args(cluster, &args(extra))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_flag_wins_over_kubeconfig_env_and_neither_means_the_demo() {
        let kc = Path::new("/tmp/kc");
        assert_eq!(
            Cluster::from(Some(kc), Some("/other".into())),
            Some(Cluster::Kubeconfig(kc.into()))
        );
        assert_eq!(
            Cluster::from(None, Some("/a:/b".into())),
            Some(Cluster::Env("/a:/b".into()))
        );
        assert_eq!(Cluster::from(None, Some("".into())), None, "empty is unset");
        assert_eq!(Cluster::from(None, None), None);
    }

    #[test]
    fn kubeconfig_runs_svcproxy_on_the_node_interfaces_with_the_auto_hook() {
        let kc = Cluster::Kubeconfig("/root/.kube/config".into());
        assert_eq!(
            line(&kc, &["--kubeconfig", "/root/.kube/config"]),
            "run --kubeconfig /root/.kube/config --interfaces veth*,@default-route --hook auto \
             --pin-path /sys/fs/bpf/svcproxy"
        );
        assert_eq!(
            line(
                &kc,
                &[
                    "--kubeconfig",
                    "/root/.kube/config",
                    "--interfaces",
                    "cali*,ens5",
                    "--node-name",
                    "worker-1",
                    "--pin-path",
                    "/sys/fs/bpf/test"
                ]
            ),
            "run --kubeconfig /root/.kube/config --interfaces cali*,ens5 --hook auto \
             --pin-path /sys/fs/bpf/test --node-name worker-1"
        );
    }

    #[test]
    fn kubeconfig_env_is_left_for_svcproxy_to_read() {
        assert_eq!(
            line(&Cluster::Env("/a:/b".into()), &[]),
            "run --source kube --interfaces veth*,@default-route --hook auto --pin-path /sys/fs/bpf/svcproxy"
        );
    }

    #[test]
    fn the_first_sync_shows_as_a_last_sync_timestamp() {
        let page = format!("# TYPE {LAST_SYNC} gauge\n{LAST_SYNC} 0.0\n");
        assert_eq!(last_sync(&page), Some(0.0));
        let page = format!("{LAST_SYNC}_other 5\n{LAST_SYNC} 1763780000.5\n");
        assert_eq!(last_sync(&page), Some(1763780000.5));
        assert_eq!(last_sync("nothing"), None);
    }

    #[test]
    fn options_of_the_other_mode_are_refused() {
        let env = || Some(OsString::from("/kc"));
        assert!(choose(&args(&["--app", "a.yaml"]), env()).is_err());
        assert!(choose(&args(&["--node-name", "n"]), None).is_err());
        assert!(choose(&args(&["--pin-path", "/sys/fs/bpf/x"]), None).is_err());
        assert_eq!(choose(&args(&["--app", "a.yaml"]), None).ok(), Some(None));
        assert_eq!(
            choose(&args(&["--node-name", "n"]), env()).ok(),
            Some(Some(Cluster::Env("/kc".into())))
        );
    }
}
