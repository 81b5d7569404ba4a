//! The network-namespace sandbox: one "node" namespace that routes between "pod" namespaces
//! attached to it by veth pairs (Calico-style: /32 routes, no bridge, no ARP), each pod
//! running echo servers. Everything it creates is deleted on drop, also while unwinding.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::{
    cmd::ip,
    echo::{EchoConfig, EchoServers},
    netns::{command_in, in_netns, netns_exists},
};

/// The link-local gateway every pod routes through (as in Calico). No interface owns it: the
/// pod reaches it through a static neighbour entry pointing at the host-side veth.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The interface in the node namespace that carries the node IP. Loopback rather than a
/// dummy interface because kernels built without CONFIG_DUMMY (like the test VMs') cannot
/// create one; for the node it makes no difference: traffic to a local address goes through
/// `lo` whichever interface holds it, and a scope-global address on `lo` is still what the
/// kernel picks as the source of ICMP errors sent out of the address-less host veths.
pub const NODE_IFACE: &str = "lo";
/// The interface name inside every pod.
pub const POD_IFACE: &str = "eth0";
/// The port the echo servers listen on unless [`PodOptions`] says otherwise.
pub const DEFAULT_ECHO_PORT: u16 = 8080;

const ETC_NETNS: &str = "/etc/netns";
/// Linux interface names hold at most 15 bytes (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;
/// Room kept in host veth names for the pod index (`p` + up to 3 digits).
const POD_INDEX_DIGITS: usize = 3;
/// Sandboxes created by this process so far; part of the name prefix.
static SANDBOX_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A pod of the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// The name given to [`Sandbox::add_pod`].
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its IP (on `eth0`, as a /32).
    pub ip: Ipv4Addr,
    /// The host-side veth, in the node namespace. For a pod behind a router
    /// ([`Sandbox::add_pod_behind`]): the router's, the node-side veth its traffic crosses.
    pub host_veth: String,
}

/// What a pod serves. The default: TCP and UDP echo on [`DEFAULT_ECHO_PORT`] with the
/// greeting `"<podname>\n"`.
#[derive(Debug, Clone)]
pub struct PodOptions {
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// `None` means `"<podname>\n"`.
    pub greeting: Option<String>,
}

impl Default for PodOptions {
    fn default() -> Self {
        PodOptions {
            tcp_ports: vec![DEFAULT_ECHO_PORT],
            udp_ports: vec![DEFAULT_ECHO_PORT],
            greeting: None,
        }
    }
}

impl PodOptions {
    /// Serve TCP on these ports (none: no TCP server).
    pub fn tcp_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.tcp_ports = ports.into_iter().collect();
        self
    }

    /// Serve UDP on these ports (none: no UDP server).
    pub fn udp_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.udp_ports = ports.into_iter().collect();
        self
    }

    /// Answer unknown requests and HTTP GETs with this text.
    pub fn greeting(mut self, greeting: impl Into<String>) -> Self {
        self.greeting = Some(greeting.into());
        self
    }
}

struct Pod {
    info: PodInfo,
    servers: EchoServers,
    uplink: Uplink,
}

/// Where the other end of a pod's `eth0` lives, which decides what deleting the pod involves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Uplink {
    /// In the node namespace: [`PodInfo::host_veth`], plus the node's /32 route through it.
    Node,
    /// In a router pod's namespace (`link` there), plus the node's /32 route via the router.
    Router { netns: String, link: String },
    /// A router pod: on the node like any pod, and forwarding for the pods behind it.
    NodeRouter,
}

/// A node namespace plus pods; see the crate docs for the topology.
///
/// Dropping it (also during a panic) stops the echo servers and deletes every namespace and
/// `/etc/netns` directory it created; [`teardown`](Self::teardown) does the same and
/// reports problems. Anything the caller started in its namespaces (a proxy process, client
/// threads) must be stopped first: a live process or socket keeps a deleted namespace alive.
pub struct Sandbox {
    prefix: String,
    node_netns: String,
    node_ip: Ipv4Addr,
    /// Whether the node namespace was created (so teardown must delete it).
    node_created: bool,
    pods: BTreeMap<String, Pod>,
    next_pod_index: u32,
    torn_down: bool,
}

impl Sandbox {
    /// Creates the node namespace: loopback up, IPv4 forwarding on, IPv6 off, and
    /// `node_ip`/32 on [`NODE_IFACE`] (the source of its ICMP errors).
    ///
    /// `tag` (its first few lowercase letters) starts the name prefix, to tell in
    /// `ip netns list` which test made what. Fails with a clear message when not root or
    /// without network namespace support.
    pub fn new(tag: &str, node_ip: Ipv4Addr) -> Result<Self> {
        preflight()?;
        let prefix = make_prefix(
            tag,
            std::process::id(),
            SANDBOX_COUNTER.fetch_add(1, Ordering::Relaxed),
        );
        let mut sandbox = Sandbox {
            node_netns: format!("{prefix}-node"),
            prefix,
            node_ip,
            node_created: false,
            pods: BTreeMap::new(),
            next_pod_index: 0,
            torn_down: false,
        };
        // From here on, a failure drops `sandbox`, which deletes whatever was created.
        let node = sandbox.node_netns.clone();
        ip(["netns", "add", &node]).with_context(|| {
            format!(
                "create the node namespace {node} (if it already exists, an earlier run with \
                 the same process id was killed before cleaning up: `ip netns del {node}`)"
            )
        })?;
        sandbox.node_created = true;
        set_sysctls(&node, &[("net/ipv4/ip_forward", "1")])?;
        ip_in(&node, "link set lo up")?;
        ip_in(&node, &format!("addr add {node_ip}/32 dev {NODE_IFACE}"))?;
        Ok(sandbox)
    }

    /// The prefix of every name this sandbox creates.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The node's network namespace (where the proxy runs and the host veths live).
    pub fn node_netns(&self) -> &str {
        &self.node_netns
    }

    /// The node IP given to [`new`](Self::new).
    pub fn node_ip(&self) -> Ipv4Addr {
        self.node_ip
    }

    /// A glob matching exactly this sandbox's host-side veths (e.g. `sp1234aap*`).
    pub fn veth_glob(&self) -> String {
        format!("{}p*", self.prefix)
    }

    /// A command that runs `program` in the node namespace (see [`command_in`]).
    pub fn node_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.node_netns, program)
    }

    /// The pod named `name`, if it exists.
    pub fn pod(&self, name: &str) -> Option<&PodInfo> {
        self.pods.get(name).map(|p| &p.info)
    }

    /// All pods, by name.
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values().map(|p| &p.info)
    }

    /// Adds a pod with the default echo servers (TCP and UDP 8080, greeting `"<name>\n"`).
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<PodInfo> {
        self.add_pod_with(name, ip, PodOptions::default())
    }

    /// Adds a pod: a namespace behind a veth pair with `ip`/32 on `eth0`, a default route via
    /// [`POD_GATEWAY`], static neighbour entries on both sides, a /32 route to it in the node
    /// namespace, and echo servers as `options` says.
    ///
    /// `name` is lowercase letters, digits and `-` (as Kubernetes names).
    pub fn add_pod_with(
        &mut self,
        name: &str,
        ip: Ipv4Addr,
        options: PodOptions,
    ) -> Result<PodInfo> {
        let index = self.reserve_pod(name, ip)?;
        let info = PodInfo {
            name: name.to_owned(),
            netns: format!("{}-{name}", self.prefix),
            ip,
            host_veth: format!("{}p{index}", self.prefix),
        };
        let servers = match self.setup_pod(&info, options) {
            Ok(servers) => servers,
            Err(e) => {
                // Undo the half-made pod; the original error is the one worth reporting.
                let _ = self.delete_pod_parts(&info, &Uplink::Node);
                return Err(e.context(format!("sandbox {}: add pod {name} ({ip})", self.prefix)));
            }
        };
        self.pods.insert(
            name.to_owned(),
            Pod {
                info: info.clone(),
                servers,
                uplink: Uplink::Node,
            },
        );
        Ok(info)
    }

    /// Checks that a new pod's name and IP are free and takes the next pod index (which
    /// numbers its veth names).
    fn reserve_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<u32> {
        validate_pod_name(name)?;
        ensure!(
            !self.pods.contains_key(name),
            "sandbox {}: pod {name} already exists",
            self.prefix
        );
        if let Some(other) = self.pods.values().find(|p| p.info.ip == ip) {
            bail!(
                "sandbox {}: IP {ip} already belongs to pod {}",
                self.prefix,
                other.info.name
            );
        }
        ensure!(
            ip != self.node_ip,
            "sandbox {}: IP {ip} is the node IP",
            self.prefix
        );
        let index = self.next_pod_index;
        ensure!(
            index < 10u32.pow(POD_INDEX_DIGITS as u32),
            "sandbox {}: no more than {} pods per sandbox (veth names must fit in {IFNAME_MAX} bytes)",
            self.prefix,
            10u32.pow(POD_INDEX_DIGITS as u32)
        );
        self.next_pod_index += 1;
        Ok(index)
    }

    /// Adds a router pod: a pod like [`add_pod`](Self::add_pod) (echo servers included) that
    /// also forwards IPv4, for pods placed behind it with [`add_pod_behind`](Self::add_pod_behind).
    ///
    /// Being a real hop, it does what routers do to traffic crossing it: decrements the TTL and
    /// answers a DF packet too big for the next link with ICMP "fragmentation needed".
    pub fn add_router_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<PodInfo> {
        let info = self.add_pod(name, ip)?;
        if let Err(e) = set_sysctls(&info.netns, &[("net/ipv4/ip_forward", "1")]) {
            let _ = self.remove_pod(name);
            return Err(e.context(format!("sandbox {}: make pod {name} a router", self.prefix)));
        }
        if let Some(pod) = self.pods.get_mut(name) {
            pod.uplink = Uplink::NodeRouter;
        }
        Ok(info)
    }

    /// Adds a pod that hangs off the router pod `router` instead of the node: its `eth0` is a
    /// veth to the router (both ends with `mtu`), the router routes `ip`/32 to it, and the node
    /// routes `ip`/32 via the router. Otherwise a pod as [`add_pod_with`](Self::add_pod_with)
    /// makes (address, default route via [`POD_GATEWAY`], static neighbours, echo servers).
    ///
    /// A small `mtu` makes the router the hop where a DF packet no longer fits, so it sends
    /// ICMP "fragmentation needed" back to the sender, as a real path would.
    pub fn add_pod_behind(
        &mut self,
        router: &str,
        name: &str,
        ip: Ipv4Addr,
        mtu: u32,
        options: PodOptions,
    ) -> Result<PodInfo> {
        let (router_netns, router_ip, router_veth) = match self.pods.get(router) {
            Some(p) if p.uplink == Uplink::NodeRouter => {
                (p.info.netns.clone(), p.info.ip, p.info.host_veth.clone())
            }
            Some(_) => bail!(
                "sandbox {}: pod {router} is no router (add it with add_router_pod)",
                self.prefix
            ),
            None => bail!("sandbox {}: no router pod named {router}", self.prefix),
        };
        ensure!(
            (68..=65535).contains(&mtu),
            "sandbox {}: MTU {mtu} for pod {name} is outside 68..=65535",
            self.prefix
        );
        let index = self.reserve_pod(name, ip)?;
        let info = PodInfo {
            name: name.to_owned(),
            netns: format!("{}-{name}", self.prefix),
            ip,
            host_veth: router_veth,
        };
        let uplink = Uplink::Router {
            netns: router_netns,
            link: format!("{}r{index}", self.prefix),
        };
        let servers = match self.setup_pod_behind(&info, &uplink, router_ip, mtu, options) {
            Ok(servers) => servers,
            Err(e) => {
                let _ = self.delete_pod_parts(&info, &uplink);
                return Err(e.context(format!(
                    "sandbox {}: add pod {name} ({ip}) behind {router}",
                    self.prefix
                )));
            }
        };
        self.pods.insert(
            name.to_owned(),
            Pod {
                info: info.clone(),
                servers,
                uplink,
            },
        );
        Ok(info)
    }

    fn setup_pod_behind(
        &self,
        pod: &PodInfo,
        uplink: &Uplink,
        router_ip: Ipv4Addr,
        mtu: u32,
        options: PodOptions,
    ) -> Result<EchoServers> {
        let Uplink::Router {
            netns: router,
            link,
        } = uplink
        else {
            bail!("pod {} is not behind a router", pod.name);
        };
        // The router's end of the link plays the host veth's part.
        wire_pod(router, link, pod, Some(mtu))?;
        // The node already has a permanent neighbour entry for the router, so this never ARPs.
        ip_in(
            &self.node_netns,
            &format!(
                "route add {}/32 via {router_ip} dev {} onlink",
                pod.ip, pod.host_veth
            ),
        )?;
        start_echo(pod, options)
    }

    fn setup_pod(&self, pod: &PodInfo, options: PodOptions) -> Result<EchoServers> {
        wire_pod(&self.node_netns, &pod.host_veth, pod, None)?;
        start_echo(pod, options)
    }

    /// Stops a pod's servers and deletes its veth pair, namespace and `/etc/netns` directory.
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let router_netns = self.pods.get(name).map(|p| p.info.netns.clone());
        if let Some(behind) = self.pods.values().find(|p| {
            matches!(&p.uplink, Uplink::Router { netns, .. } if Some(netns) == router_netns.as_ref())
        }) {
            bail!(
                "sandbox {}: pod {} is behind router {name}; remove it first",
                self.prefix,
                behind.info.name
            );
        }
        let mut pod = self
            .pods
            .remove(name)
            .ok_or_else(|| anyhow!("sandbox {}: no pod named {name}", self.prefix))?;
        // Sockets hold the namespace: close them before deleting it so it really goes away.
        pod.servers.stop();
        self.delete_pod_parts(&pod.info, &pod.uplink)
            .with_context(|| format!("sandbox {}: remove pod {name}", self.prefix))
    }

    /// Deletes whatever exists of a pod's veth, node route, namespace and hosts directory,
    /// trying every step even when one fails.
    fn delete_pod_parts(&self, pod: &PodInfo, uplink: &Uplink) -> Result<()> {
        let mut problems = Vec::new();
        match uplink {
            Uplink::Node | Uplink::NodeRouter => {
                if self.node_created && link_exists(&self.node_netns, &pod.host_veth) {
                    // Deleting one end deletes both at once; waiting for the namespace to be
                    // destroyed would leave the host end around for a while.
                    if let Err(e) = ip(["-n", &self.node_netns, "link", "del", &pod.host_veth]) {
                        problems.push(format!("{e:#}"));
                    }
                }
            }
            Uplink::Router { netns, link } => {
                // The router (and with it this link) may already be gone during teardown.
                if netns_exists(netns)
                    && link_exists(netns, link)
                    && let Err(e) = ip(["-n", netns, "link", "del", link])
                {
                    problems.push(format!("{e:#}"));
                }
                // The node's route via the router outlives this pod unless deleted; it goes
                // by itself only with the router's veth.
                let dest = format!("{}/32", pod.ip);
                if self.node_created
                    && netns_exists(&self.node_netns)
                    && ip(["-n", &self.node_netns, "route", "show", "exact", &dest])
                        .is_ok_and(|r| !r.trim().is_empty())
                    && let Err(e) = ip(["-n", &self.node_netns, "route", "del", &dest])
                {
                    problems.push(format!("{e:#}"));
                }
            }
        }
        if netns_exists(&pod.netns)
            && let Err(e) = ip(["netns", "del", &pod.netns])
        {
            problems.push(format!("{e:#}"));
        }
        if let Err(e) = remove_etc_netns(&pod.netns) {
            problems.push(format!("{e:#}"));
        }
        join_problems(problems)
    }

    /// The namespace whose hosts file `who` names: a pod's, or the node's when `who` is
    /// [`node_netns`](Self::node_netns).
    fn netns_of(&self, who: &str) -> Result<&str> {
        if who == self.node_netns {
            return Ok(&self.node_netns);
        }
        self.pods
            .get(who)
            .map(|p| p.info.netns.as_str())
            .ok_or_else(|| anyhow!("sandbox {}: no pod named {who}", self.prefix))
    }

    /// Writes `/etc/netns/<netns>/hosts` for pod `pod` (or for the node namespace when `pod`
    /// is [`node_netns`](Self::node_netns)), so that `ip netns exec` (getent, curl) resolves
    /// these names there; [`resolve`](Self::resolve) reads the same file for in-process
    /// clients. `localhost` and the pod's own name are always included.
    pub fn write_hosts(&self, pod: &str, entries: &[(Ipv4Addr, Vec<String>)]) -> Result<()> {
        let netns = self.netns_of(pod)?;
        let mut text =
            String::from("# written by the svcproxy test sandbox\n127.0.0.1\tlocalhost\n");
        if let Some(p) = self.pods.get(pod) {
            let _ = writeln!(text, "{}\t{}", p.info.ip, p.info.name);
        }
        for (addr, names) in entries {
            if !names.is_empty() {
                let _ = writeln!(text, "{addr}\t{}", names.join(" "));
            }
        }
        let dir = Path::new(ETC_NETNS).join(netns);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("hosts");
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    }

    /// Looks `name` up in the hosts file [`write_hosts`](Self::write_hosts) wrote for `pod`.
    pub fn resolve(&self, pod: &str, name: &str) -> Option<Ipv4Addr> {
        let netns = self.netns_of(pod).ok()?;
        let text = fs::read_to_string(hosts_path(netns)).ok()?;
        text.lines()
            .map(|line| line.split('#').next().unwrap_or_default())
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                let addr = fields.next()?.parse::<Ipv4Addr>().ok()?;
                fields.any(|n| n.eq_ignore_ascii_case(name)).then_some(addr)
            })
    }

    /// Deletes everything now and reports what could not be deleted.
    pub fn teardown(mut self) -> Result<()> {
        self.torn_down = true;
        self.do_teardown()
    }

    fn do_teardown(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        // Signal every pod first so their server threads wind down in parallel.
        for pod in self.pods.values() {
            pod.servers.signal_stop();
        }
        let pods = std::mem::take(&mut self.pods);
        for (_, mut pod) in pods {
            pod.servers.stop();
            if let Err(e) = self.delete_pod_parts(&pod.info, &pod.uplink) {
                problems.push(format!("{e:#}"));
            }
        }
        if self.node_created {
            if netns_exists(&self.node_netns)
                && let Err(e) = ip(["netns", "del", &self.node_netns])
            {
                problems.push(format!("{e:#}"));
            }
            if let Err(e) = remove_etc_netns(&self.node_netns) {
                problems.push(format!("{e:#}"));
            }
            self.node_created = false;
        }
        join_problems(problems).with_context(|| format!("tear down sandbox {}", self.prefix))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        // Never let a panic escape: during unwinding that would abort the whole test binary.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.do_teardown()));
        let message = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("tear down sandbox {}: panicked", self.prefix),
        };
        // eprintln! would panic if stderr is gone; a lost message is better than an abort.
        use std::io::Write as _;
        let _ = writeln!(io::stderr(), "warning: {message}");
    }
}

/// Root and network namespace support, checked up front so the error says what is missing
/// instead of some `ip` command failing with "Operation not permitted".
fn preflight() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the network-namespace sandbox must run as root (it creates namespaces, veths and routes); \
         run the tests with sudo or as root"
    );
    ensure!(
        Path::new("/proc/self/ns/net").exists(),
        "this kernel has no network namespace support (/proc/self/ns/net is missing)"
    );
    Ok(())
}

/// The per-sandbox name prefix: tag letters, then the process id in decimal, then the
/// sandbox counter as exactly two letters.
///
/// Letters-digits-letters with a fixed-width counter means no prefix followed by `p` can be
/// the start of another prefix, so [`Sandbox::veth_glob`] never matches a sibling
/// sandbox's veths. The counter wraps after 676 sandboxes per process, long after the first
/// ones are gone.
fn make_prefix(tag: &str, pid: u32, counter: u32) -> String {
    let pid = pid.to_string();
    let counter = counter % (26 * 26);
    let counter: String = [counter / 26, counter % 26]
        .iter()
        .map(|&d| char::from(b'a' + d as u8))
        .collect();
    let budget = IFNAME_MAX - 1 - POD_INDEX_DIGITS;
    let room = budget.saturating_sub(pid.len() + counter.len()).max(1);
    let mut tag: String = tag
        .chars()
        .filter(char::is_ascii_alphabetic)
        .map(|c| c.to_ascii_lowercase())
        .take(room)
        .collect();
    if tag.is_empty() {
        tag.push('s');
    }
    format!("{tag}{pid}{counter}")
}

fn validate_pod_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "invalid pod name {name:?}: use 1-63 lowercase letters, digits and '-'"
    );
    // "<prefix>-node" is the node's namespace.
    ensure!(
        name != "node",
        "invalid pod name \"node\": the node namespace has that name"
    );
    Ok(())
}

/// Writes `/proc/sys` settings from a thread inside `netns` (`/proc/sys/net` shows the
/// writing thread's namespace). IPv6 is always switched off: the sandbox is IPv4-only, and
/// router solicitations and DAD would otherwise add stray packets to every veth.
pub(crate) fn set_sysctls(netns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let mut all: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // Absent when the kernel has no IPv6; then there is nothing to switch off.
    if Path::new("/proc/sys/net/ipv6").exists() {
        for conf in ["all", "default"] {
            all.push((format!("net/ipv6/conf/{conf}/disable_ipv6"), "1".into()));
        }
    }
    let ns = netns.to_owned();
    in_netns(netns, move || -> Result<()> {
        for (key, value) in all {
            let path = Path::new("/proc/sys").join(&key);
            fs::write(&path, &value)
                .with_context(|| format!("set {key}={value} in network namespace {ns}"))?;
        }
        Ok(())
    })?
}

/// `ip -n NETNS ARGS...` with `args` split on whitespace; only for arguments built from
/// validated names, IPs and MACs, which never contain spaces.
pub(crate) fn ip_in(netns: &str, args: &str) -> Result<String> {
    ip(["-n", netns].into_iter().chain(args.split_whitespace()))
}

fn link_exists(netns: &str, link: &str) -> bool {
    ip(["-n", netns, "link", "show", "dev", link]).is_ok()
}

fn hosts_path(netns: &str) -> PathBuf {
    Path::new(ETC_NETNS).join(netns).join("hosts")
}

pub(crate) fn remove_etc_netns(netns: &str) -> Result<()> {
    let dir = Path::new(ETC_NETNS).join(netns);
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn join_problems(problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(problems.join("; ")))
    }
}

/// Creates the pod's namespace and its veth pair to `upstream` (the node, or a router pod):
/// `link` is the upstream end, the pod end is `eth0` with the pod IP, a default route via the
/// link-local gateway, and permanent neighbour entries both ways so nothing ever ARPs.
fn wire_pod(upstream: &str, link: &str, pod: &PodInfo, mtu: Option<u32>) -> Result<()> {
    let ns = &pod.netns;
    // MACs derived from the pod IP: deterministic and unique within the node, which is all
    // the static neighbour entries need.
    let [a, b, c, d] = pod.ip.octets();
    let up_mac = format!("02:48:{a:02x}:{b:02x}:{c:02x}:{d:02x}");
    let pod_mac = format!("02:50:{a:02x}:{b:02x}:{c:02x}:{d:02x}");
    let (pod_ip, gw, eth0) = (pod.ip, POD_GATEWAY, POD_IFACE);
    let mtu = mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();

    ip(["netns", "add", ns])?;
    // Before the veth exists, so its end in the pod inherits the "default" settings.
    set_sysctls(ns, &[])?;
    // Creating the peer directly inside the pod namespace means the name eth0 never has to be
    // free upstream.
    ip_in(
        upstream,
        &format!(
            "link add {link} address {up_mac}{mtu} type veth peer name {eth0} address {pod_mac}{mtu} netns {ns}"
        ),
    )?;
    ip_in(ns, "link set lo up")?;
    ip_in(ns, &format!("addr add {pod_ip}/32 dev {eth0}"))?;
    // Both ends up before routes and neighbours: the kernel refuses routes through a down link
    // and flushes neighbour entries when a link goes down.
    ip_in(ns, &format!("link set {eth0} up"))?;
    ip_in(upstream, &format!("link set {link} up"))?;
    ip_in(ns, &format!("route add default via {gw} dev {eth0} onlink"))?;
    ip_in(
        ns,
        &format!("neigh replace {gw} lladdr {up_mac} dev {eth0} nud permanent"),
    )?;
    ip_in(upstream, &format!("route add {pod_ip}/32 dev {link}"))?;
    ip_in(
        upstream,
        &format!("neigh replace {pod_ip} lladdr {pod_mac} dev {link} nud permanent"),
    )?;
    Ok(())
}

/// Starts the pod's echo servers inside its namespace.
fn start_echo(pod: &PodInfo, options: PodOptions) -> Result<EchoServers> {
    EchoServers::start(
        &pod.netns,
        EchoConfig {
            name: pod.name.clone(),
            greeting: options
                .greeting
                .unwrap_or_else(|| format!("{}\n", pod.name)),
            tcp_ports: options.tcp_ports,
            udp_ports: options.udp_ports,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_fits_interface_names() {
        let prefix = make_prefix("kube-proxy", 4_194_304, 675);
        assert_eq!(prefix, "ku4194304zz");
        assert!(format!("{prefix}p999").len() <= IFNAME_MAX);
        assert_eq!(make_prefix("sp", 1234, 0), "sp1234aa");
        assert_eq!(make_prefix("---", 12, 27), "s12bb");
        assert_eq!(make_prefix("Tests", 1, 1), "tests1ab");
    }

    #[test]
    fn pod_names_are_checked() {
        assert!(validate_pod_name("web-1").is_ok());
        assert!(validate_pod_name("").is_err());
        assert!(validate_pod_name("Web").is_err());
        assert!(validate_pod_name("a/b").is_err());
        assert!(validate_pod_name("node").is_err());
    }
}
