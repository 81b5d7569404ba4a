//! Loading the datapath: the embedded eBPF object, its maps pinned under the pin path (adopted
//! when already there, so a restart keeps every flow), and program attachment to interfaces.

use std::{
    collections::BTreeMap,
    fs, io,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapInfo},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        TestRunResult, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use proxy_common::{
    LAYOUT,
    backend::{BACKENDS4, Backend4, DEFAULT_BACKENDS, REPLY_FILTER, REPLY_FILTER_WORDS},
    conntrack::{
        AFFINITY4, AffinityEntry, AffinityKey4, CT4, CtEntry4, CtKey4, DEFAULT_AFFINITY,
        DEFAULT_CT, DEFAULT_FRAG, FRAG4, FragKey4, FragPorts,
    },
    meta::{SVC_META, ServiceMeta},
    service::{
        DEFAULT_FRONTENDS, DEFAULT_MAGLEV_ENTRIES, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_SLOTS,
        FRONTEND_FILTER, FRONTEND_FILTER_WORDS, FRONTENDS4, Frontend4Key, MAGLEV_TABLE_SIZE_GLOBAL,
        MAGLEV4, SLOTS, SVC_REVISIONS, Service4, Slot, SlotKey,
    },
    sock::{
        DEFAULT_SOCK_REVNAT, NODE_NETNS_COOKIE_GLOBAL, SOCK_LB_MODE_GLOBAL, SOCK_REVNAT4,
        SockRevEntry4, SockRevKey4,
    },
    stats::{STAT_COUNT, STATS, SVC_STATS, SvcStats},
};
use thiserror::Error;

use crate::{
    iface::{self, Interface},
    socklb::{self, SocketLb},
};

/// The eBPF object built from `proxy-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

const TC_PROGRAM: &str = "svcproxy_tc";
const XDP_PROGRAM: &str = "svcproxy_xdp";

/// Which kernel hook carries the datapath on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Hook {
    /// tc ingress (tcx): right for veths and other virtual devices.
    Tc,
    /// XDP: right for NICs with a native driver; slow on veth (it copies every packet).
    Xdp,
}

impl Hook {
    /// The name in link pin file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tc => "tc",
            Self::Xdp => "xdp",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Tc => Self::Xdp,
            Self::Xdp => Self::Tc,
        }
    }
}

/// What `--hook` asks for: one hook everywhere, or each interface the hook that suits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HookChoice {
    /// tc on software devices (veth, bridge, tunnel); XDP on physical NICs whose driver runs it
    /// natively, else tc.
    Auto,
    /// tc ingress (tcx) everywhere.
    Tc,
    /// XDP everywhere (natively where the driver can, else the kernel's generic XDP).
    Xdp,
}

/// Map sizes and the Maglev table size, set at load time.
///
/// Memory at the defaults: the controller-written maps (frontends, slots, backends, Maglev) are
/// not preallocated and cost about 80-100 bytes per entry in use (64k Services x 4 backends:
/// ~30 MiB); conntrack is preallocated: 512k entries x ~112 bytes = ~56 MiB; affinity 64k x
/// ~88 bytes = ~6 MiB; per-Service counters 24 bytes x CPUs x 64k = 1.5 MiB per CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Frontends, which also bounds service ids (per-Service counters are indexed by them).
    pub frontends: u32,
    pub slots: u32,
    pub backends: u32,
    pub conntrack: u32,
    pub affinity: u32,
    /// Entries of all Maglev tables together (services using Maglev x table size).
    pub maglev_entries: u32,
    /// Maglev table size per service: a prime.
    pub maglev_table_size: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            frontends: DEFAULT_FRONTENDS,
            slots: DEFAULT_SLOTS,
            backends: DEFAULT_BACKENDS,
            conntrack: DEFAULT_CT,
            affinity: DEFAULT_AFFINITY,
            maglev_entries: DEFAULT_MAGLEV_ENTRIES,
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
        }
    }
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("this svcproxy binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild it")]
    NoObject,
    #[error("Maglev table size {0} is not a prime; pick one such as 16381 or 65521")]
    MaglevNotPrime(u32),
    #[error("{path} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },
    #[error("cannot create pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error(
        "pin directory {path} belongs to uid {owner}, not to us (uid {euid}): someone else could \
         replace the maps in it; remove it or pick another --pin-path"
    )]
    PinDirOwner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "pinned map {path} has {what} {found}, this build expects {expected}; it was written by \
         an incompatible svcproxy (layout version {layout}) or with other map sizes: remove the \
         pins (`rm -r {dir}`) to start over, which drops live flows"
    )]
    IncompatiblePin {
        path: PathBuf,
        dir: PathBuf,
        what: &'static str,
        found: u32,
        expected: u32,
        layout: u32,
    },
    #[error(
        "the maps pinned in {dir} were written by svcproxy with map layout version {found}, this \
         build has version {expected}: their entries would be misread. Run a build of that \
         version, or remove the pins (`svcproxy cleanup --pin-path {dir}`, or `rm -r {dir}`) to \
         start over, which drops live flows"
    )]
    IncompatibleLayout {
        dir: PathBuf,
        /// `None` for pins of a build from before layout versions were recorded.
        found: LayoutVersion,
        expected: u32,
    },
    #[error("cannot read the layout version pinned at {path}: {source}")]
    LayoutVersion {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("cannot inspect pinned map {path}: {source}")]
    PinInfo {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name} failed: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot pin the link at {path}: {error}")]
    PinLink { path: PathBuf, error: String },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("attaching {hook:?} to {iface} failed: {source}{hint}")]
    Attach {
        iface: String,
        hook: Hook,
        source: aya::programs::ProgramError,
        hint: &'static str,
    },
    #[error("interface {0} does not exist (any more)")]
    NoSuchInterface(String),
    #[error("socket-level balancing: {what}: {error}")]
    SocketLb { what: String, error: String },
}

/// One interface's attachment: a bpf link pinned under the pin directory, so the program stays
/// attached when svcproxy exits or is killed, and the next svcproxy replaces the program in
/// the same link (one atomic `BPF_LINK_UPDATE`: no packet sees no program).
struct Attachment {
    /// Keeps the link open while we run; the pin keeps it attached after.
    _link: FdLink,
    pin: PathBuf,
    hook: Hook,
    /// The interface's index when attached: one re-created under the same name is another
    /// interface, and the link died with the old one.
    index: u32,
}

/// The subdirectory of the pin directory holding the links, one file per interface and hook.
const LINKS_DIR: &str = "links";

/// The loaded programs and (pinned) maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attached: BTreeMap<String, Attachment>,
    socket_lb: SocketLb,
    /// The pinned links of the cgroup hooks (`--socket-lb`), held open while we run.
    cgroup_links: Vec<(PathBuf, std::os::fd::OwnedFd)>,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Names, key/value sizes and max entries of every map, for pin compatibility checks.
pub(crate) fn map_specs(sizes: &MapSizes) -> [(&'static str, u32, u32, u32); 15] {
    [
        (
            MAGLEV4,
            size_of::<SlotKey>() as u32,
            size_of::<Slot>() as u32,
            sizes.maglev_entries,
        ),
        (
            AFFINITY4,
            size_of::<AffinityKey4>() as u32,
            size_of::<AffinityEntry>() as u32,
            sizes.affinity,
        ),
        (
            FRAG4,
            size_of::<FragKey4>() as u32,
            size_of::<FragPorts>() as u32,
            DEFAULT_FRAG,
        ),
        // Service ids run from 1 to `frontends`.
        (
            SVC_STATS,
            4,
            size_of::<SvcStats>() as u32,
            sizes.frontends + 1,
        ),
        (
            FRONTENDS4,
            size_of::<Frontend4Key>() as u32,
            size_of::<Service4>() as u32,
            sizes.frontends,
        ),
        (
            SLOTS,
            size_of::<SlotKey>() as u32,
            size_of::<Slot>() as u32,
            sizes.slots,
        ),
        (BACKENDS4, 4, size_of::<Backend4>() as u32, sizes.backends),
        (
            CT4,
            size_of::<CtKey4>() as u32,
            size_of::<CtEntry4>() as u32,
            sizes.conntrack,
        ),
        (REPLY_FILTER, 4, 8, REPLY_FILTER_WORDS),
        (FRONTEND_FILTER, 4, 8, FRONTEND_FILTER_WORDS),
        (SVC_REVISIONS, 4, 4, sizes.frontends + 1),
        (STATS, 4, 8, STAT_COUNT),
        (
            SOCK_REVNAT4,
            size_of::<SockRevKey4>() as u32,
            size_of::<SockRevEntry4>() as u32,
            DEFAULT_SOCK_REVNAT,
        ),
        (LAYOUT, 4, 4, 1),
        // One record per service id.
        (
            SVC_META,
            4,
            size_of::<ServiceMeta>() as u32,
            sizes.frontends + 1,
        ),
    ]
}

impl Datapath {
    /// Loads the programs and creates or adopts the maps pinned in `pin_dir`; the socket-level
    /// hooks are loaded for `--socket-lb tcp` (the default) but attached only by
    /// [`attach_cgroup`](Self::attach_cgroup).
    pub fn load(pin_dir: &Path, sizes: &MapSizes) -> Result<Self, LoadError> {
        Self::load_with(pin_dir, sizes, SocketLb::default())
    }

    /// [`load`](Self::load) with the socket-level balancing mode `socket_lb`.
    pub fn load_with(
        pin_dir: &Path,
        sizes: &MapSizes,
        socket_lb: SocketLb,
    ) -> Result<Self, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        if !is_prime(sizes.maglev_table_size) {
            return Err(LoadError::MaglevNotPrime(sizes.maglev_table_size));
        }
        prepare_pin_dir(pin_dir)?;
        let specs = map_specs(sizes);
        check_layout(pin_dir)?;
        check_pins(pin_dir, &specs)?;
        let paths: Vec<(&'static str, PathBuf)> = specs
            .iter()
            .map(|(name, ..)| (*name, pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader.override_global(MAGLEV_TABLE_SIZE_GLOBAL, &sizes.maglev_table_size, true);
        let mode = socket_lb.mode();
        loader.override_global(SOCK_LB_MODE_GLOBAL, &mode, true);
        // Only read with socket-level balancing on: a kernel without the option still loads.
        let netns = match socket_lb {
            SocketLb::Off => 0,
            _ => socklb::netns_cookie().map_err(|e| LoadError::SocketLb {
                what: "cannot read this network namespace's cookie (kernel >= 5.14)".into(),
                error: e.to_string(),
            })?,
        };
        loader.override_global(NODE_NETNS_COOKIE_GLOBAL, &netns, true);
        for (name, _, _, max) in &specs {
            loader.map_max_entries(name, *max);
        }
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // Recorded before anything else is written: from here on the pins are this layout's.
        record_layout(&mut ebpf, pin_dir)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            // The object only logs on rare error paths; without log statements there is no
            // log map, which is fine.
            Err(e) => {
                tracing::debug!("eBPF logger not initialised: {e}");
                None
            }
        };
        let tc: &mut SchedClassifier = program(&mut ebpf, TC_PROGRAM)?;
        tc.load().map_err(|source| LoadError::Program {
            name: TC_PROGRAM,
            source,
        })?;
        let xdp: &mut Xdp = program(&mut ebpf, XDP_PROGRAM)?;
        xdp.load().map_err(|source| LoadError::Program {
            name: XDP_PROGRAM,
            source,
        })?;
        if socket_lb != SocketLb::Off {
            for (name, _) in socklb::PROGRAMS {
                let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                prog.load()
                    .map_err(|source| LoadError::Program { name, source })?;
            }
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            attached: BTreeMap::new(),
            socket_lb,
            cgroup_links: Vec::new(),
            _logger: logger,
        })
    }

    /// Hands out the eBPF logger. The caller must keep it alive and drain it: dropping it
    /// closes the log map's fd, and an undrained ring buffer silently loses records.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self._logger.take()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Takes a map out of the object (for the map writer or stats reader).
    pub fn take_map(&mut self, name: &'static str) -> Result<aya::maps::Map, LoadError> {
        self.ebpf
            .take_map(name)
            .ok_or(LoadError::MissingMap { name })
    }

    /// Where the link of `hook` on `iface` is pinned.
    fn link_pin(&self, iface: &str, hook: Hook) -> PathBuf {
        self.pin_dir
            .join(LINKS_DIR)
            .join(format!("{}-{iface}", hook.name()))
    }

    /// Attaches the datapath to `iface` with `hook`, or takes over the link an earlier svcproxy
    /// pinned there (replacing its program atomically). Attaching twice is a no-op. A link of
    /// the other hook on `iface` is removed: one datapath per interface.
    pub fn attach(&mut self, iface: &str, hook: Hook) -> Result<(), LoadError> {
        self.attach_mode(iface, hook, XdpMode::default())
    }

    /// Attaches to `iface` as `choice` says (see [`HookChoice`]); the hook it got.
    pub fn attach_as(&mut self, iface: &str, choice: HookChoice) -> Result<Hook, LoadError> {
        let hook = match choice {
            HookChoice::Tc => Hook::Tc,
            HookChoice::Xdp => Hook::Xdp,
            HookChoice::Auto => {
                if let Some(a) = self.attached.get(iface) {
                    return Ok(a.hook);
                }
                if iface::is_physical(iface) != Some(true) {
                    Hook::Tc
                } else {
                    // Native only: generic XDP is slower than tc, so tc is the fallback.
                    match self.attach_mode(iface, Hook::Xdp, XdpMode::Driver) {
                        Ok(()) => return Ok(Hook::Xdp),
                        Err(e) => {
                            tracing::info!(iface, "no native XDP ({e}); attaching tc");
                            Hook::Tc
                        }
                    }
                }
            }
        };
        self.attach(iface, hook).map(|()| hook)
    }

    fn attach_mode(&mut self, iface: &str, hook: Hook, xdp_mode: XdpMode) -> Result<(), LoadError> {
        if self.attached.contains_key(iface) {
            return Ok(());
        }
        let pin = self.link_pin(iface, hook);
        // Looked up before attaching: if the interface goes away in between, the attach fails.
        let index =
            iface::index_of(iface).ok_or_else(|| LoadError::NoSuchInterface(iface.to_owned()))?;
        let links_dir = self.pin_dir.join(LINKS_DIR);
        fs::create_dir_all(&links_dir).map_err(|source| LoadError::PinDir {
            path: links_dir,
            source,
        })?;
        let other = self.link_pin(iface, hook.other());
        remove_link_pin(&other);

        let attach_err = |source| LoadError::Attach {
            iface: iface.to_owned(),
            hook,
            source,
            hint: match hook {
                Hook::Tc => " (tcx needs kernel >= 6.6)",
                Hook::Xdp => " (if the driver lacks native XDP, use --hook tc)",
            },
        };
        let pin_err = |error| LoadError::PinLink {
            path: pin.clone(),
            error,
        };
        let adopted = self.replace_in_pinned_link(iface, hook, &pin);
        let link = match adopted {
            Some(link) => link,
            None => {
                // No usable pinned link: a fresh attach, pinned before we rely on it.
                let link: FdLink = match hook {
                    Hook::Tc => {
                        let tc: &mut SchedClassifier = program(&mut self.ebpf, TC_PROGRAM)?;
                        let id = tc
                            .attach(iface, TcAttachType::Ingress)
                            .map_err(attach_err)?;
                        let link = tc.take_link(id).map_err(attach_err)?;
                        FdLink::try_from(link).map_err(|e| pin_err(e.to_string()))?
                    }
                    Hook::Xdp => {
                        let xdp: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?;
                        let id = xdp.attach(iface, xdp_mode).map_err(attach_err)?;
                        let link = xdp.take_link(id).map_err(attach_err)?;
                        FdLink::try_from(link).map_err(|e| pin_err(e.to_string()))?
                    }
                };
                let pinned = link.pin(&pin).map_err(|e| pin_err(e.to_string()))?;
                tracing::info!(iface, ?hook, "attached");
                FdLink::from(pinned)
            }
        };
        self.attached.insert(
            iface.to_owned(),
            Attachment {
                _link: link,
                pin,
                hook,
                index,
            },
        );
        Ok(())
    }

    /// Puts this process's program into the link pinned at `pin`, if there is one that still
    /// works. A link whose interface was deleted (and maybe re-created under the same name)
    /// is defunct: its pin is removed and `None` returned, for a fresh attach.
    fn replace_in_pinned_link(&mut self, iface: &str, hook: Hook, pin: &Path) -> Option<FdLink> {
        if !pin.exists() {
            return None;
        }
        let replaced: Result<FdLink, String> = (|| {
            let link: FdLink = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?.into();
            match hook {
                Hook::Tc => {
                    let tc: &mut SchedClassifier =
                        program(&mut self.ebpf, TC_PROGRAM).map_err(|e| e.to_string())?;
                    let link = SchedClassifierLink::try_from(link).map_err(|e| e.to_string())?;
                    let id = tc.attach_to_link(link).map_err(|e| e.to_string())?;
                    let link = tc.take_link(id).map_err(|e| e.to_string())?;
                    FdLink::try_from(link).map_err(|e| e.to_string())
                }
                Hook::Xdp => {
                    let xdp: &mut Xdp =
                        program(&mut self.ebpf, XDP_PROGRAM).map_err(|e| e.to_string())?;
                    let link = XdpLink::try_from(link).map_err(|e| e.to_string())?;
                    let id = xdp.attach_to_link(link).map_err(|e| e.to_string())?;
                    let link = xdp.take_link(id).map_err(|e| e.to_string())?;
                    FdLink::try_from(link).map_err(|e| e.to_string())
                }
            }
        })();
        match replaced {
            Ok(link) => {
                tracing::info!(iface, ?hook, "took over the pinned link (program replaced)");
                Some(link)
            }
            Err(e) => {
                tracing::info!(iface, ?hook, "pinned link not usable ({e}); attaching anew");
                remove_link_pin(pin);
                None
            }
        }
    }

    /// Removes the pinned links of interfaces this run did not attach to (no longer matched
    /// by `--interfaces`, or gone): a pin would keep such a link, and its program, forever.
    pub fn prune_links(&mut self) {
        let dir = self.pin_dir.join(LINKS_DIR);
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        let kept: Vec<&Path> = self
            .attached
            .values()
            .map(|a| a.pin.as_path())
            .chain(self.cgroup_links.iter().map(|(pin, _)| pin.as_path()))
            .collect();
        for entry in entries.flatten() {
            let path = entry.path();
            if !kept.contains(&path.as_path()) {
                tracing::info!(link = %path.display(), "detaching a link this run does not use");
                remove_link_pin(&path);
            }
        }
    }

    /// Attaches the socket-level hooks to the cgroup v2 directory `cgroup` (the hierarchy's
    /// root serves every process of the node), or takes over the links an earlier svcproxy
    /// pinned for it. The pins are named after the cgroup's inode, so a run with another
    /// `--cgroup-path` attaches anew and [`prune_links`](Self::prune_links) drops the old
    /// ones. Nothing is attached with `--socket-lb off`.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), LoadError> {
        if self.socket_lb == SocketLb::Off || !self.cgroup_links.is_empty() {
            return Ok(());
        }
        let fail = |what: String, error: String| LoadError::SocketLb { what, error };
        let dir = fs::File::open(cgroup).map_err(|e| {
            fail(
                format!("cannot open cgroup {}", cgroup.display()),
                e.to_string(),
            )
        })?;
        let ino = dir
            .metadata()
            .map_err(|e| {
                fail(
                    format!("cannot stat cgroup {}", cgroup.display()),
                    e.to_string(),
                )
            })?
            .ino();
        let links_dir = self.pin_dir.join(LINKS_DIR);
        fs::create_dir_all(&links_dir).map_err(|source| LoadError::PinDir {
            path: links_dir.clone(),
            source,
        })?;
        for (name, hook) in socklb::PROGRAMS {
            let pin = links_dir.join(format!("sock-{hook}-{ino}"));
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let prog_fd = prog
                .fd()
                .map_err(|source| LoadError::Program { name, source })?
                .as_fd()
                .as_raw_fd();
            let adopted = if pin.exists() {
                match socklb::obj_get(&pin).and_then(|link| {
                    socklb::link_update(&link, prog_fd)?;
                    Ok(link)
                }) {
                    Ok(link) => {
                        tracing::info!(hook, "took over the pinned cgroup link (program replaced)");
                        Some(link)
                    }
                    Err(e) => {
                        tracing::info!(hook, "pinned cgroup link not usable ({e}); attaching anew");
                        remove_link_pin(&pin);
                        None
                    }
                }
            } else {
                None
            };
            let link = match adopted {
                Some(link) => link,
                None => {
                    let pin_err = |error: String| LoadError::PinLink {
                        path: pin.clone(),
                        error,
                    };
                    // Links on cgroups always allow other programs beside them (other tools'
                    // hooks keep running); the mode is the flag for the legacy attach only.
                    let id = prog
                        .attach(&dir, CgroupAttachMode::Single)
                        .map_err(|source| LoadError::Program { name, source })?;
                    let link = prog
                        .take_link(id)
                        .map_err(|source| LoadError::Program { name, source })?;
                    let link = FdLink::try_from(link).map_err(|e| pin_err(e.to_string()))?;
                    link.pin(&pin).map_err(|e| pin_err(e.to_string()))?;
                    tracing::info!(hook, cgroup = %cgroup.display(), "attached socket-level hook");
                    socklb::obj_get(&pin).map_err(|e| pin_err(e.to_string()))?
                }
            };
            self.cgroup_links.push((pin, link));
        }
        Ok(())
    }

    /// Runs one of the programs on a packet with BPF_PROG_TEST_RUN (tests and benchmarks).
    pub fn test_run(
        &mut self,
        hook: Hook,
        opts: TestRunOptions<'_>,
    ) -> Result<TestRunResult, LoadError> {
        let res = match hook {
            Hook::Tc => program::<SchedClassifier>(&mut self.ebpf, TC_PROGRAM)?.test_run(opts),
            Hook::Xdp => program::<Xdp>(&mut self.ebpf, XDP_PROGRAM)?.test_run(opts),
        };
        res.map_err(|source| LoadError::Program {
            name: match hook {
                Hook::Tc => TC_PROGRAM,
                Hook::Xdp => XDP_PROGRAM,
            },
            source,
        })
    }

    /// A tc program of the object other than the datapath (the benchmark's reference
    /// programs), loaded on first use. The product never attaches these.
    pub fn bench_program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoadError> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| LoadError::Program { name, source })?;
        }
        Ok(prog)
    }

    /// Detaches from `iface` (its pinned link is removed). Not done on exit: the links stay so
    /// traffic keeps flowing until the next svcproxy takes them over.
    pub fn detach(&mut self, iface: &str) {
        if let Some(a) = self.attached.remove(iface) {
            remove_link_pin(&a.pin);
            tracing::info!(iface, "detached");
        }
    }

    /// The interfaces attached to, with their index at the time.
    pub fn attached(&self) -> Vec<Interface> {
        self.attached
            .iter()
            .map(|(name, a)| Interface {
                name: name.clone(),
                index: a.index,
            })
            .collect()
    }

    /// Detaches from every interface (see [`detach`](Self::detach)).
    pub fn detach_all(&mut self) {
        let ifaces: Vec<String> = self.attached.keys().cloned().collect();
        for iface in ifaces {
            self.detach(&iface);
        }
    }
}

/// Removes a link pin; once no process holds the link either, the kernel detaches it.
fn remove_link_pin(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(link = %path.display(), "cannot remove link pin: {e}"),
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(LoadError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    prog.try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// The pin directory must be on bpffs, ours, and usable by its owner only: the pins are the
/// live datapath, and whoever can replace one can redirect every Service.
fn prepare_pin_dir(dir: &Path) -> Result<(), LoadError> {
    let pin_err = |source| LoadError::PinDir {
        path: dir.to_owned(),
        source,
    };
    // Created 0700 rather than chmod-ed after, so it is never open to others, not even briefly.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(pin_err)?;
    // /sys/fs/bpf is often world-writable (1777): another user may have made the directory
    // first, and would keep control of it whatever its mode.
    let owner = fs::metadata(dir).map_err(pin_err)?.uid();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if owner != euid {
        return Err(LoadError::PinDirOwner {
            path: dir.to_owned(),
            owner,
            euid,
        });
    }
    // An existing directory (an older svcproxy's) may be more open.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(pin_err)?;
    ensure_bpffs(dir)
}

/// Removes everything svcproxy pinned in `dir`: the links first (which detaches the programs
/// from every interface, as no process holds them after svcproxy exited), then the maps, which
/// drops every flow's state. What kube-proxy's `--cleanup` is to its rules. Returns false if
/// there was nothing to remove. Refuses a directory that is not on bpffs, so a wrong
/// `--pin-path` cannot delete ordinary files.
pub fn cleanup(dir: &Path) -> Result<bool, LoadError> {
    if !dir.exists() {
        return Ok(false);
    }
    ensure_bpffs(dir)?;
    let remove = |path: &Path| {
        fs::remove_dir_all(path).or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => Ok(()),
            _ => Err(LoadError::PinDir {
                path: path.to_owned(),
                source: e,
            }),
        })
    };
    remove(&dir.join(LINKS_DIR))?;
    remove(dir)?;
    Ok(true)
}

fn ensure_bpffs(dir: &Path) -> Result<(), LoadError> {
    let pin_err = |source| LoadError::PinDir {
        path: dir.to_owned(),
        source,
    };
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| pin_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: statfs on a NUL-terminated path into a zeroed, properly sized struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(pin_err(io::Error::last_os_error()));
    }
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(LoadError::NotBpffs {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// A layout version found in a pin directory, as printed in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutVersion(pub Option<u32>);

impl std::fmt::Display for LayoutVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("1 or 2 (from before versions were recorded)"),
        }
    }
}

/// Refuses pins written by a build with another layout version. Pins without a version record
/// beside existing maps come from a build that predates the record.
fn check_layout(dir: &Path) -> Result<(), LoadError> {
    let path = dir.join(LAYOUT);
    let refuse = |found| LoadError::IncompatibleLayout {
        dir: dir.to_owned(),
        found,
        expected: proxy_common::LAYOUT_VERSION,
    };
    if !path.exists() {
        let has_maps = [FRONTENDS4, BACKENDS4, CT4]
            .iter()
            .any(|m| dir.join(m).exists());
        return if has_maps {
            Err(refuse(LayoutVersion(None)))
        } else {
            Ok(())
        };
    }
    let read = || -> Result<u32, aya::maps::MapError> {
        let data = MapData::from_pin(&path)?;
        Array::<_, u32>::try_from(Map::Array(data))?.get(&0, 0)
    };
    match read() {
        Ok(found) if found == 0 || found == proxy_common::LAYOUT_VERSION => Ok(()),
        Ok(found) => Err(refuse(LayoutVersion(Some(found)))),
        Err(source) => Err(LoadError::LayoutVersion { path, source }),
    }
}

fn record_layout(ebpf: &mut Ebpf, dir: &Path) -> Result<(), LoadError> {
    let path = dir.join(LAYOUT);
    let err = |source| LoadError::LayoutVersion {
        path: path.clone(),
        source,
    };
    let map = ebpf.map_mut(LAYOUT).ok_or_else(|| {
        err(aya::maps::MapError::InvalidName {
            name: LAYOUT.to_owned(),
        })
    })?;
    Array::<_, u32>::try_from(map)
        .and_then(|mut a| a.set(0, proxy_common::LAYOUT_VERSION, 0))
        .map_err(err)
}

/// Refuses pinned maps whose layout or size differs from this build's: adopting them would
/// misread every entry.
fn check_pins(dir: &Path, specs: &[(&'static str, u32, u32, u32)]) -> Result<(), LoadError> {
    for (name, key, value, max) in specs {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| LoadError::PinInfo {
            path: path.clone(),
            source,
        })?;
        for (what, found, expected) in [
            ("key size", info.key_size(), *key),
            ("value size", info.value_size(), *value),
            ("max entries", info.max_entries(), *max),
        ] {
            if found != expected {
                return Err(LoadError::IncompatiblePin {
                    path,
                    dir: dir.to_owned(),
                    what,
                    found,
                    expected,
                    layout: proxy_common::LAYOUT_VERSION,
                });
            }
        }
    }
    Ok(())
}

/// Trial division: table sizes are below 2^32 and checked once at load.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= n as u64 {
        if (n as u64).is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}
