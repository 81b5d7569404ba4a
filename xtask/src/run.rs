//! `cargo xtask run`: the demo. Plays an application's manifests (by default the "Service
//! discovery and namespaces" example) on a network-namespace sandbox node without a cluster,
//! runs svcproxy on the resulting Services and EndpointSlices, shows requests to Service names
//! being balanced, and cleans everything up on Ctrl-C (or right away with `--once`).
//!
//! With `--kubeconfig` (or `KUBECONFIG` set) it runs svcproxy on this machine as a node of that
//! cluster instead ([`node`]).

mod check;
mod cluster;
mod node;
mod proxy;
mod signals;

use std::{
    collections::{BTreeMap, BTreeSet},
    env, fs, io,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use svcproxy_tests::{PodOptions, Sandbox, sandbox::DEFAULT_ECHO_PORT};

use self::{
    check::Target,
    cluster::{Cluster, Protocol},
    proxy::Proxy,
    signals::StopSignal,
};
use crate::{setup, util};

/// The manifests played unless `--app` says otherwise, relative to the workspace root.
const DEFAULT_APP: &str = "examples/service-discovery/app.yaml";
/// The sandbox node's IP (what a kind node would have).
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
/// Starts every sandbox name, so `ip netns list` shows what the demo made.
const SANDBOX_TAG: &str = "run";
/// The bpffs mount; each run pins its maps in its own directory below it.
const BPFFS: &str = "/sys/fs/bpf";
/// How long svcproxy may take from start to answering every Service.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct RunArgs {
    /// Do the checks once, print the results, clean up and exit (non-zero if any answer was
    /// wrong) instead of staying up until Ctrl-C. With a cluster: stop svcproxy once its
    /// first sync is done (its /healthz answers 200).
    #[arg(long)]
    pub once: bool,
    /// Kubernetes manifests to play: Deployments and Pods become sandbox pods, Services get a
    /// ClusterIP and EndpointSlices [default: examples/service-discovery/app.yaml]
    #[arg(long, value_name = "FILE", conflicts_with = "kubeconfig")]
    pub app: Option<PathBuf>,
    /// Instead of the demo, run svcproxy on this machine (e.g. inside a kind node) following
    /// this cluster; `KUBECONFIG` set does the same.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// With a cluster: the interfaces to attach to, comma-separated globs [default: veth*,@default-route]
    #[arg(long, value_delimiter = ',')]
    pub interfaces: Vec<String>,
    /// With a cluster: this node's name [default: NODE_NAME, else the hostname]
    #[arg(long)]
    pub node_name: Option<String>,
    /// With a cluster: where the maps are pinned [default: /sys/fs/bpf/svcproxy]
    #[arg(long, value_name = "DIR")]
    pub pin_path: Option<PathBuf>,
    /// svcproxy's `--socket-lb` (tcp, all, off) when following a cluster; default: svcproxy's.
    #[arg(long, value_name = "MODE")]
    pub socket_lb: Option<String>,
}

pub fn run(args: RunArgs) -> Result<()> {
    // First, so that from here on Ctrl-C means "clean up and stop", never "die and leave
    // namespaces behind". (Setup's and cargo's children still get Ctrl-C from the terminal
    // and fail, which ends the run before anything exists.)
    let stop = StopSignal::install()?;
    if let Some(cluster) = node::choose(&args, env::var_os("KUBECONFIG"))? {
        return node::run(&args, &cluster, &stop);
    }
    // Whatever fails after Ctrl-C (a child killed by the same SIGINT, a wait cut short)
    // failed because of it; saying so beats a confusing secondary error.
    let interrupted = |e: anyhow::Error| {
        if stop.requested() {
            anyhow!("interrupted")
        } else {
            e
        }
    };
    setup::setup().map_err(interrupted)?;
    ensure!(!stop.requested(), "interrupted");
    let binary = svcproxy_binary().map_err(interrupted)?;
    ensure!(!stop.requested(), "interrupted");
    let app = args
        .app
        .clone()
        .unwrap_or_else(|| util::workspace_root().join(DEFAULT_APP));
    let cluster = cluster::load(&app)?;

    let mut demo = Demo::default();
    let played = play(&args, &stop, &binary, &app, &cluster, &mut demo).map_err(interrupted);
    let cleaned = demo.cleanup();
    match (played, cleaned) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(c)) => Err(c),
        (Err(e), Err(c)) => Err(e.context(format!("and cleaning up failed too: {c:#}"))),
    }
}

/// What the demo created, so that it can all be removed whichever way the demo ends.
#[derive(Default)]
struct Demo {
    proxy: Option<Proxy>,
    sandbox: Option<Sandbox>,
    pin_dir: Option<PathBuf>,
    manifest_dir: Option<PathBuf>,
}

impl Demo {
    /// Removes everything, in dependency order: svcproxy first (it holds the node namespace
    /// and the pins), then the sandbox, then the pinned maps and the manifests. Every step is
    /// tried even when an earlier one failed.
    fn cleanup(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        if self.proxy.is_none()
            && self.sandbox.is_none()
            && self.pin_dir.is_none()
            && self.manifest_dir.is_none()
        {
            return Ok(());
        }
        println!("cleaning up:");
        if let Some(mut proxy) = self.proxy.take() {
            match proxy.stop() {
                Ok(status) => println!("  svcproxy stopped ({status})"),
                Err(e) => problems.push(format!("stop svcproxy: {e:#}")),
            }
        }
        if let Some(sandbox) = self.sandbox.take() {
            let what = format!(
                "sandbox {} (namespaces {}-*, its veths and /etc/netns entries)",
                sandbox.prefix(),
                sandbox.prefix()
            );
            match sandbox.teardown() {
                Ok(()) => println!("  deleted {what}"),
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
        for dir in [self.pin_dir.take(), self.manifest_dir.take()]
            .into_iter()
            .flatten()
        {
            match remove_dir_if_present(&dir) {
                Ok(()) => println!("  removed {}", dir.display()),
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("cleanup incomplete: {}", problems.join("; ")))
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // Only does something when `run` did not get to its cleanup (a panic).
        if let Err(e) = self.cleanup() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Everything between building and cleaning up; whatever it creates goes into `demo` the
/// moment it exists.
fn play(
    args: &RunArgs,
    stop: &StopSignal,
    binary: &Path,
    app: &Path,
    cluster: &Cluster,
    demo: &mut Demo,
) -> Result<()> {
    let sandbox = demo
        .sandbox
        .insert(Sandbox::new(SANDBOX_TAG, NODE_IP).context("create the sandbox node")?);
    let prefix = sandbox.prefix().to_owned();
    let node = sandbox.node_netns().to_owned();
    println!(
        "\nplaying {} on sandbox node {node} (node IP {NODE_IP}):",
        shown_path(app)
    );
    for note in &cluster.skipped {
        println!("  skipped {note}");
    }

    // Pods: a namespace each, with a stand-in server answering like the container would.
    let served = served_ports(cluster);
    for (index, pod) in cluster.pods.iter().enumerate() {
        ensure!(!stop.requested(), "interrupted");
        let (tcp, udp) = &served[index];
        let options = PodOptions::default()
            .greeting(pod.greeting.clone())
            .tcp_ports(tcp.iter().copied())
            .udp_ports(udp.iter().copied());
        sandbox
            .add_pod_with(&pod.sandbox_name(), pod.ip, options)
            .with_context(|| format!("start pod {}/{}", pod.namespace, pod.name))?;
    }
    // Names, as cluster DNS and each pod's search path would resolve them.
    for pod in &cluster.pods {
        // Like the kubelet's /etc/hosts, the pod's own hostname first.
        let own = (pod.ip, vec![pod.name.clone()]);
        let entries: Vec<(Ipv4Addr, Vec<String>)> = std::iter::once(own)
            .chain(
                cluster
                    .services
                    .iter()
                    .map(|svc| (svc.cluster_ip, svc.names_from(&pod.namespace))),
            )
            .collect();
        sandbox.write_hosts(&pod.sandbox_name(), &entries)?;
    }
    print_overview(cluster, sandbox);

    // What the API server would hold: Services with their ClusterIP, and EndpointSlices.
    let manifest_dir = env::temp_dir().join(format!("svcproxy-run-{prefix}"));
    remove_dir_if_present(&manifest_dir)?;
    fs::create_dir(&manifest_dir).with_context(|| format!("create {}", manifest_dir.display()))?;
    demo.manifest_dir = Some(manifest_dir.clone());
    write_manifests(cluster, &manifest_dir, &node, app)?;

    // svcproxy, in the node namespace only (a full `ip netns exec` would hide the bpffs).
    let pin_dir = Path::new(BPFFS).join(format!("svcproxy-run-{prefix}"));
    // Only a killed earlier run with the same pid can have left this; its maps are stale.
    remove_dir_if_present(&pin_dir)?;
    demo.pin_dir = Some(pin_dir.clone());
    let glob = sandbox.veth_glob();
    let mut cmd = sandbox.node_command(binary);
    cmd.arg("run")
        .arg("--manifests")
        .arg(&manifest_dir)
        .args(["--interfaces", &glob, "--hook", "tc", "--pin-path"])
        .arg(&pin_dir)
        .args(["--node-name", &node])
        // The sandbox is not the machine: hooks on the root cgroup would translate the
        // sandbox's ClusterIPs for every process of the machine.
        .args(["--socket-lb", "off"]);
    let shown = format!(
        "svcproxy run --manifests {} --interfaces '{glob}' --hook tc --pin-path {} --node-name {node} --socket-lb off",
        manifest_dir.display(),
        pin_dir.display()
    );
    println!("\nstarting in {node}: {shown}");
    let started = Instant::now();
    let proxy = demo.proxy.insert(Proxy::start(cmd, &shown)?);

    let client = cluster.pods.iter().find(|p| p.owner == "Pod").context(
        "the manifests have no standalone Pod (like the example's `jump`) to send requests from",
    )?;
    let client_netns = sandbox
        .pod(&client.sandbox_name())
        .context("the client pod is missing from the sandbox")?
        .netns
        .clone();
    let targets = targets(cluster, sandbox, client)?;
    check::wait_ready(&client_netns, &targets, proxy, stop, READY_TIMEOUT)
        .context("svcproxy did not start answering")?;
    println!(
        "\nsvcproxy answers after {:.1} s. From pod {}/{} ({}):\n",
        started.elapsed().as_secs_f64(),
        client.namespace,
        client.name,
        client.ip
    );
    let verdicts = check::try_all(&client_netns, targets, stop.flag())?;
    let failed: Vec<String> = verdicts
        .iter()
        .filter(|v| !v.ok())
        .map(|v| format!("{}:{}", v.target.host, v.target.addr.port()))
        .collect();
    if failed.is_empty() {
        println!("every name was answered by all of its Service's pods and only by them");
    } else {
        println!("FAILED: wrong or missing answers for {}", failed.join(", "));
    }

    if args.once {
        ensure!(
            failed.is_empty(),
            "wrong or missing answers for {} (details above)",
            failed.join(", ")
        );
        return Ok(());
    }
    print_try_it(cluster, client, &client_netns, &pin_dir);
    loop {
        if stop.wait(Duration::from_millis(500)) {
            break;
        }
        // Ctrl-C in a terminal reaches svcproxy too, which may exit before we notice the
        // signal ourselves; that is the normal end, not a crash.
        if let Err(e) = proxy.check_running() {
            if stop.wait(Duration::from_millis(200)) {
                break;
            }
            return Err(e);
        }
    }
    ensure!(
        failed.is_empty(),
        "wrong or missing answers for {} (details above)",
        failed.join(", ")
    );
    Ok(())
}

/// Per pod (same order as [`Cluster::pods`]), the TCP and UDP ports its stand-in server
/// listens on: the echo default, the declared container ports, and every port a Service
/// sends it to (in Kubernetes `containerPort` is informational, so a Service may target an
/// undeclared one).
fn served_ports(cluster: &Cluster) -> Vec<(BTreeSet<u16>, BTreeSet<u16>)> {
    let mut served: Vec<_> = cluster
        .pods
        .iter()
        .map(|pod| {
            let mut tcp = BTreeSet::from([DEFAULT_ECHO_PORT]);
            let mut udp = BTreeSet::from([DEFAULT_ECHO_PORT]);
            for port in &pod.ports {
                match port.protocol {
                    Protocol::Tcp => tcp.insert(port.port),
                    Protocol::Udp => udp.insert(port.port),
                    Protocol::Sctp => false,
                };
            }
            (tcp, udp)
        })
        .collect();
    for svc in &cluster.services {
        for (index, port) in svc.ports.iter().enumerate() {
            for (pod, target) in svc.endpoints_of_port(index) {
                match port.protocol {
                    Protocol::Tcp => served[pod].0.insert(target),
                    Protocol::Udp => served[pod].1.insert(target),
                    Protocol::Sctp => false,
                };
            }
        }
    }
    served
}

/// Writes one file per Service and per EndpointSlice into `dir`.
fn write_manifests(cluster: &Cluster, dir: &Path, node: &str, app: &Path) -> Result<()> {
    let header = format!(
        "# Written by `cargo xtask run` from {}; svcproxy reads this directory.\n",
        shown_path(app)
    );
    for svc in &cluster.services {
        let mut files = vec![(
            format!("service.{}.{}.yaml", svc.namespace, svc.name),
            cluster::service_manifest(svc)?,
        )];
        for (name, slice) in cluster::endpoint_slices(cluster, svc, node)? {
            files.push((
                format!("endpointslice.{}.{name}.yaml", svc.namespace),
                slice,
            ));
        }
        for (file, value) in files {
            let text = serde_yaml::to_string(&value).context("render a manifest")?;
            let path = dir.join(file);
            fs::write(&path, format!("{header}{text}"))
                .with_context(|| format!("write {}", path.display()))?;
        }
    }
    Ok(())
}

/// The names to try from `client`, for every Service port with endpoints: the short name
/// when it resolves there, and always the fully qualified one.
fn targets(cluster: &Cluster, sandbox: &Sandbox, client: &cluster::Pod) -> Result<Vec<Target>> {
    let client_name = client.sandbox_name();
    let pod_names: BTreeMap<String, String> = cluster
        .pods
        .iter()
        .map(|p| (p.sandbox_name(), p.name.clone()))
        .collect();
    let mut targets = Vec::new();
    for svc in &cluster.services {
        let names = svc.names_from(&client.namespace);
        // The short name where the search path makes it work, and the fully qualified one.
        let mut hosts: Vec<&String> = Vec::new();
        if svc.namespace == client.namespace {
            hosts.extend(names.first());
        }
        hosts.extend(names.last());
        for (index, port) in svc.ports.iter().enumerate() {
            let service = format!("{}/{}", svc.namespace, svc.name);
            if port.protocol == Protocol::Sctp {
                println!("  (not trying {service} port {}: SCTP)", port.port);
                continue;
            }
            let expected: BTreeSet<String> = svc
                .endpoints_of_port(index)
                .into_iter()
                .map(|(pod, _)| cluster.pods[pod].name.clone())
                .collect();
            if expected.is_empty() {
                println!("  (not trying {service} port {}: no endpoints)", port.port);
                continue;
            }
            for &host in &hosts {
                let ip = sandbox.resolve(&client_name, host).with_context(|| {
                    format!("{host} does not resolve in pod {client_name}'s hosts file")
                })?;
                ensure!(
                    ip == svc.cluster_ip,
                    "{host} resolves to {ip}, not to {service}'s ClusterIP {}",
                    svc.cluster_ip
                );
                targets.push(Target {
                    host: host.clone(),
                    addr: SocketAddrV4::new(ip, port.port),
                    protocol: port.protocol,
                    service: service.clone(),
                    expected: expected.clone(),
                    pod_names: pod_names.clone(),
                });
            }
        }
    }
    ensure!(
        !targets.is_empty(),
        "no Service with endpoints to send requests to"
    );
    Ok(targets)
}

fn print_overview(cluster: &Cluster, sandbox: &Sandbox) {
    let mut rows = vec![vec![
        "NAMESPACE".to_owned(),
        "POD".into(),
        "IP".into(),
        "OWNER".into(),
        "NETWORK NAMESPACE".into(),
    ]];
    for pod in &cluster.pods {
        let netns = sandbox
            .pod(&pod.sandbox_name())
            .map(|p| p.netns.clone())
            .unwrap_or_default();
        rows.push(vec![
            pod.namespace.clone(),
            pod.name.clone(),
            pod.ip.to_string(),
            pod.owner.clone(),
            netns,
        ]);
    }
    print_table(&rows);
    println!();
    let mut rows = vec![vec![
        "NAMESPACE".to_owned(),
        "SERVICE".into(),
        "CLUSTER-IP".into(),
        "PORT(S)".into(),
        "ENDPOINTS".into(),
    ]];
    for svc in &cluster.services {
        let ports: Vec<String> = svc
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.port, p.protocol))
            .collect();
        let mut endpoints: Vec<String> = Vec::new();
        for (index, _) in svc.ports.iter().enumerate() {
            for (pod, target) in svc.endpoints_of_port(index) {
                let endpoint = format!("{}:{target}", cluster.pods[pod].ip);
                if !endpoints.contains(&endpoint) {
                    endpoints.push(endpoint);
                }
            }
        }
        let endpoints = match (&svc.selector, endpoints.is_empty()) {
            (None, _) => "<no selector>".to_owned(),
            (Some(_), true) => "<none>".to_owned(),
            (Some(_), false) => endpoints.join(","),
        };
        rows.push(vec![
            svc.namespace.clone(),
            svc.name.clone(),
            svc.cluster_ip.to_string(),
            ports.join(","),
            endpoints,
        ]);
    }
    print_table(&rows);
}

fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("  {}", line.join("  ").trim_end());
    }
}

fn print_try_it(cluster: &Cluster, client: &cluster::Pod, client_netns: &str, pin_dir: &Path) {
    println!("\nTry it by hand from another terminal (as root):");
    for svc in &cluster.services {
        let Some(port) = svc.ports.iter().find(|p| p.protocol == Protocol::Tcp) else {
            continue;
        };
        let names = svc.names_from(&client.namespace);
        if let Some(name) = names.first() {
            println!(
                "  ip netns exec {client_netns} curl -s {name}:{}",
                port.port
            );
        }
    }
    for map in ["FRONTENDS4", "BACKENDS4"] {
        println!("  bpftool map dump pinned {}/{map}", pin_dir.display());
    }
    println!("\nCtrl-C to stop (svcproxy detaches and everything above is deleted).");
}

/// The svcproxy binary: `$SVCPROXY_BIN` when set (how `cargo xtask test` passes the one it
/// built), else built now. xtask cannot depend on proxy-userspace itself: building that needs
/// the toolchain that setup installs.
fn svcproxy_binary() -> Result<PathBuf> {
    if let Some(bin) = env::var_os("SVCPROXY_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        ensure!(
            bin.is_file(),
            "SVCPROXY_BIN={} is not a file; unset it to build svcproxy",
            bin.display()
        );
        println!("using SVCPROXY_BIN={}", bin.display());
        return Ok(bin);
    }
    let root = util::workspace_root();
    let mut cmd = util::cargo();
    cmd.current_dir(&root)
        .args(["build", "-p", "proxy-userspace", "--bin", "svcproxy"])
        // An empty eBPF object would only fail later, when svcproxy loads it.
        .env_remove("AYA_BUILD_SKIP");
    util::run(
        &mut cmd,
        "read the compiler output above (eBPF build errors come from proxy-userspace's build \
         script; `cargo xtask setup` installs its toolchain)",
    )?;
    let bin = util::target_dir(&root)?.join("debug").join("svcproxy");
    ensure!(
        bin.is_file(),
        "the build succeeded but {} does not exist",
        bin.display()
    );
    Ok(bin)
}

/// `path` relative to the workspace when it is inside it (shorter, and the same everywhere).
fn shown_path(path: &Path) -> String {
    let root = util::workspace_root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}
