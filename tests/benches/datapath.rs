//! `cargo xtask bench datapath`: the datapath program's cost per packet, measured with
//! BPF_PROG_TEST_RUN next to an empty program and a one-lookup program in the same run, for
//! 1 to 65535 Services x 10 backends (PERF.md, method 1).
//!
//! Needs root and bpffs (`cargo xtask setup`). Arguments: `--quick` for a smoke test (fewer and
//! shorter runs; the table is printed but not written under `bench/results/`).
//!
//! Two timing methods, both read the kernel's own clock (the syscall is outside it):
//! - **repeat**: one BPF_PROG_TEST_RUN with `repeat` = 1e6; the kernel reports the average time
//!   per repetition (truncated to whole ns). Caches are warm, as on a busy node. Repetitions
//!   share one packet buffer that the kernel does not restore, so a packet the datapath rewrites
//!   must stay a packet of the kind measured: see the ping-pong flow in `Setup::new`.
//! - **single**: `repeat` = 1, once per packet, for what repetitions cannot show: a new flow
//!   (the first repetition would create the flow and the others hit it). Each figure then
//!   includes the kernel's timer reads and the cost of coming back from a syscall with colder
//!   caches, so it is only compared with the empty and lookup programs measured the same way.

mod shared;

use std::{
    collections::HashSet, fmt::Write as _, fs, net::Ipv4Addr, path::PathBuf, process::ExitCode,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{TestRun as _, TestRunOptions},
};
use proxy_common::{
    backend::{REPLY_FILTER_SIZE, filter_slot, reply_filter_slot},
    conntrack::{CT_DIR_FORWARD, CT4, CtEntry4, CtKey4},
    service::{FRONTEND_FILTER_SIZE, Frontend4Key, Service4},
    stats::{
        STAT_COUNT, STAT_FWD_ESTABLISHED, STAT_FWD_NEW, STAT_NAMES, STAT_PASS_NO_SERVICE, STATS,
    },
};
use svcproxy::{
    desired::{Backend, BackendState, Desired, Frontend, FrontendState, Protocol, ServiceName},
    kernel_maps::KernelMaps,
    loader::{Datapath, Hook, MapSizes},
    writer::{MapWriter, WriterConfig},
};

/// Service counts; 100 is there because the scaling target is stated against 100 Services. The
/// top is the most a 65536-entry frontend map takes: the writer hands out service ids
/// 1..frontends (0 is never used), so 65535.
const SERVICE_COUNTS: [usize; 5] = [1, 100, 1_000, 10_000, SCALE_TOP_N];
const BACKENDS_PER_SERVICE: usize = 10;
/// Room for 65535 Services x 10 backends and a million flows; the rest as the product's
/// defaults.
fn sizes() -> MapSizes {
    MapSizes {
        frontends: 65_536,
        slots: 1 << 20,
        backends: 1 << 20,
        conntrack: 1 << 20,
        ..MapSizes::default()
    }
}

const TC_ACT_OK: u32 = 0;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Every packet comes from one client pod; the port tells the flows apart.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// The ping-pong flow of `hit_est` (repeat method).
const PORT_PINGPONG: u16 = 40_000;
const PORT_MISS: u16 = 40_001;
/// The established flow of the single-shot method.
const PORT_EST: u16 = 40_002;
/// The flow that shows why `hit_est` cannot simply repeat an established packet.
const PORT_NAIVE: u16 = 40_003;
/// `hit_new` takes one fresh port per packet from here on.
const PORT_NEW_BASE: u16 = 20_000;
/// An address no Service owns.
const NOT_A_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 9);
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

const TARGET_HIT_LU: f64 = 2.5;
const TARGET_MISS_LU: f64 = 1.3;
const TARGET_SCALE: f64 = 1.5;
const SCALE_BASE_N: usize = 100;
const SCALE_TOP_N: usize = 65_535;

struct Config {
    quick: bool,
    /// Repeat method: runs per variant and repetitions per run.
    runs: usize,
    repeat: u32,
    /// Single method: rounds, and packets per variant in each round.
    rounds: usize,
    per_round: usize,
}

impl Config {
    fn from_args() -> Result<Self> {
        let quick = shared::quick_flag("datapath")?;
        Ok(if quick {
            Self {
                quick,
                runs: 3,
                repeat: 200_000,
                rounds: 3,
                per_round: 200,
            }
        } else {
            Self {
                quick,
                runs: 5,
                repeat: 1_000_000,
                rounds: 5,
                per_round: 400,
            }
        })
    }
}

fn main() -> ExitCode {
    shared::main_with(run)
}

fn run() -> Result<()> {
    let cfg = Config::from_args()?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the datapath benchmark loads eBPF programs: run it as root \
             (`cargo xtask bench datapath`)"
        );
    }
    println!(
        "datapath bench: {} runs x repeat {} (repeat method), {} rounds x {} packets (single \
         method){}",
        cfg.runs,
        cfg.repeat,
        cfg.rounds,
        cfg.per_round,
        if cfg.quick { ", quick" } else { "" }
    );
    // Every N stays loaded and the runs go round all of them, so run i of every N and variant
    // shares one stretch of time: ratios across N then cancel the machine's drift as well as
    // ratios within one N do.
    let mut setups = Vec::new();
    for &n in &SERVICE_COUNTS {
        let started = Instant::now();
        setups.push(Setup::new(cfg.repeat, n).with_context(|| format!("loading {n} Services"))?);
        println!(
            "  loaded N={n} ({} frontends, {} backends) in {:.1}s",
            setups.last().map_or(0, |s| s.frontends_loaded),
            setups.last().map_or(0, |s| s.frontends_loaded) * BACKENDS_PER_SERVICE,
            started.elapsed().as_secs_f64()
        );
    }
    let started = Instant::now();
    let rows = measure(&cfg, &mut setups)?;
    println!("  measured in {:.1}s", started.elapsed().as_secs_f64());
    for row in &rows {
        println!("  N={:>5}: {}", row.n, row.summary());
    }
    drop(setups);
    let report = Report::new(&cfg, rows);
    let text = report.render();
    println!("\n{text}");
    if cfg.quick {
        println!("(quick run: bench/results/ left unchanged)");
    } else {
        let dir = shared::workspace_root().join("bench/results");
        shared::write_atomic(&dir.join("datapath.md"), &report.markdown(&text))?;
        shared::write_atomic(&dir.join("datapath.json"), &report.json()?)?;
        println!("wrote bench/results/datapath.md and bench/results/datapath.json");
    }
    Ok(())
}

/// min / median / max of a set of per-run figures.
#[derive(Clone, Copy, Debug)]
struct Stat {
    min: f64,
    median: f64,
    max: f64,
}

impl Stat {
    fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self {
                min: f64::NAN,
                median: f64::NAN,
                max: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Self {
            min: v[0],
            median,
            max: v[v.len() - 1],
        }
    }
}

/// Per-run figures of one N. Each run (repeat method) or round (single method) measured every
/// variant at every N back to back, so run `i` of one variant and N pairs with run `i` of the
/// others.
struct Row {
    n: usize,
    // Repeat method, ns per packet.
    empty: Vec<f64>,
    lookup: Vec<f64>,
    miss: Vec<f64>,
    hit_est: Vec<f64>,
    // Single method, median ns per packet of each round.
    s_empty: Vec<f64>,
    s_lookup: Vec<f64>,
    s_hit_est: Vec<f64>,
    hit_new: Vec<f64>,
    /// How the miss packet fares in the datapath's two bitmap filters.
    miss_filters: MissFilters,
    /// Frontends in the map while measuring (N, or 2 for N = 1: see `Setup::new`).
    frontends_loaded: usize,
    /// What the counters said when one established packet was simply repeated.
    naive: String,
}

impl Row {
    fn summary(&self) -> String {
        format!(
            "empty {:.0}  lookup {:.0}  miss {:.0}  hit_est {:.0}  hit_new {:.0} ns (medians)",
            Stat::of(&self.empty).median,
            Stat::of(&self.lookup).median,
            Stat::of(&self.miss).median,
            Stat::of(&self.hit_est).median,
            Stat::of(&self.hit_new).median,
        )
    }
}

/// (prog - empty) / (lookup - empty), run by run.
fn lookup_units(prog: &[f64], empty: &[f64], lookup: &[f64]) -> Vec<f64> {
    prog.iter()
        .zip(empty)
        .zip(lookup)
        .map(|((p, e), l)| {
            if l - e > 0.0 {
                (p - e) / (l - e)
            } else {
                f64::NAN
            }
        })
        .collect()
}

fn net(prog: &[f64], empty: &[f64]) -> Vec<f64> {
    prog.iter().zip(empty).map(|(p, e)| p - e).collect()
}

/// Net cost at one N over net cost at another, run by run (run i of every N shares a stretch
/// of time).
fn scale(top: (&[f64], &[f64]), base: (&[f64], &[f64])) -> Vec<f64> {
    net(top.0, top.1)
        .iter()
        .zip(net(base.0, base.1))
        .map(|(t, b)| if b > 0.0 { t / b } else { f64::NAN })
        .collect()
}

/// Removes the benchmark's pin directory when dropped, also when a measurement panics.
struct PinDirGuard(PathBuf);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn service_addr(i: usize) -> Ipv4Addr {
    // 10.96.0.1 upwards; a 65536th would wrap to 10.96.0.0, still inside 10.96.x.y.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) | ((i + 1) & 0xffff) as u32)
}

fn backend_addr(i: usize) -> Ipv4Addr {
    // 10.16.0.1 upwards: 655360 pod addresses, clear of the client and the Services.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + i as u32 + 1)
}

fn desired(services: usize) -> Desired {
    let mut d = Desired::default();
    for s in 0..services {
        let backends = (0..BACKENDS_PER_SERVICE)
            .map(|b| Backend {
                addr: backend_addr(s * BACKENDS_PER_SERVICE + b),
                port: BACKEND_PORT,
                state: BackendState::Active,
            })
            .collect();
        d.frontends.insert(
            frontend(s),
            FrontendState {
                service: ServiceName {
                    namespace: "bench".into(),
                    name: format!("svc-{s}"),
                },
                port_name: String::new(),
                backends,
                ..Default::default()
            }
            .into(),
        );
    }
    d
}

fn frontend(s: usize) -> Frontend {
    Frontend {
        addr: service_addr(s),
        port: SERVICE_PORT,
        protocol: Protocol::Tcp,
    }
}

fn frontend_key(s: usize) -> Frontend4Key {
    Frontend4Key {
        addr_be: u32::from_ne_bytes(service_addr(s).octets()),
        port_be: SERVICE_PORT.to_be(),
        proto: 6,
        scope: 0,
    }
}

/// Ethernet + IPv4 + TCP (no options, no payload) with valid checksums.
fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    use proxy_common::csum;
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&1000u32.to_be_bytes());
    tcp.extend_from_slice(&(if flags & TCP_ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags]);
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    let c = csum::l4_ipv4(src.octets(), dst.octets(), 6, &tcp);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&40u16.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = csum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// The loaded datapath with everything the benchmark touches.
struct Bench {
    dp: Datapath,
    ct: HashMap<MapData, CtKey4, CtEntry4>,
    stats: PerCpuArray<MapData, u64>,
    // Held until the measurement ends, so the maps they own stay open and as written.
    _bench_frontends: HashMap<MapData, Frontend4Key, Service4>,
    _writer: MapWriter<KernelMaps>,
}

#[derive(Clone, Copy)]
enum Prog {
    Datapath,
    Empty,
    Lookup,
}

impl Bench {
    /// One BPF_PROG_TEST_RUN; returns the kernel's average ns per repetition.
    fn time(&mut self, prog: Prog, packet: &[u8], repeat: u32) -> Result<f64> {
        let opts = TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..Default::default()
        };
        let res = match prog {
            Prog::Datapath => self.dp.test_run(Hook::Tc, opts)?,
            Prog::Empty => self.dp.bench_program("bench_empty")?.test_run(opts)?,
            Prog::Lookup => self.dp.bench_program("bench_lookup")?.test_run(opts)?,
        };
        ensure!(
            res.return_value == TC_ACT_OK,
            "program returned {} instead of TC_ACT_OK",
            res.return_value
        );
        Ok(res.duration.as_nanos() as f64)
    }

    fn read_stats(&self) -> Result<[u64; STAT_COUNT as usize]> {
        let mut out = [0; STAT_COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// Runs the datapath and checks that every repetition ended in counter `stat`: the cost
    /// measured must be the path named, not some other one.
    fn time_checked(&mut self, packet: &[u8], repeat: u32, stat: u32, what: &str) -> Result<f64> {
        let before = self.read_stats()?;
        let ns = self.time(Prog::Datapath, packet, repeat)?;
        check_counted(&before, &self.read_stats()?, stat, repeat as u64, what)?;
        Ok(ns)
    }

    fn forward_key(dst: Ipv4Addr, dport: u16, sport: u16) -> CtKey4 {
        CtKey4 {
            saddr_be: u32::from_ne_bytes(CLIENT.octets()),
            daddr_be: u32::from_ne_bytes(dst.octets()),
            sport_be: sport.to_be(),
            dport_be: dport.to_be(),
            proto: 6,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        }
    }
}

fn check_counted(
    before: &[u64; STAT_COUNT as usize],
    after: &[u64; STAT_COUNT as usize],
    stat: u32,
    want: u64,
    what: &str,
) -> Result<()> {
    let got = after[stat as usize] - before[stat as usize];
    let total: u64 = (0..STAT_COUNT as usize).map(|i| after[i] - before[i]).sum();
    ensure!(
        got == want && total == want,
        "{what}: expected {want} packets counted as {}, the datapath counted: {}",
        STAT_NAMES[stat as usize],
        deltas(before, after)
    );
    Ok(())
}

/// The counters that moved, as "name +delta, ...".
fn deltas(before: &[u64; STAT_COUNT as usize], after: &[u64; STAT_COUNT as usize]) -> String {
    let moved: Vec<String> = (0..STAT_COUNT as usize)
        .filter(|&i| after[i] != before[i])
        .map(|i| format!("{} +{}", STAT_NAMES[i], after[i] - before[i]))
        .collect();
    if moved.is_empty() {
        "nothing".into()
    } else {
        moved.join(", ")
    }
}

/// Repeats a plain established-flow packet of a fresh flow and reports what the datapath
/// counted: it shows (and keeps checking) why `hit_est` ping-pongs between two Services.
fn naive_repeat(b: &mut Bench, repeat: u32) -> Result<String> {
    let svc0 = service_addr(0);
    let syn = tcp_frame(CLIENT, PORT_NAIVE, svc0, SERVICE_PORT, TCP_SYN);
    b.time_checked(&syn, 1, STAT_FWD_NEW, "creating the naive flow")?;
    let ack = tcp_frame(CLIENT, PORT_NAIVE, svc0, SERVICE_PORT, TCP_ACK);
    let before = b.read_stats()?;
    let ns = b.time(Prog::Datapath, &ack, repeat)?;
    Ok(format!(
        "{} ({ns:.0} ns/pkt)",
        deltas(&before, &b.read_stats()?)
    ))
}

/// The miss packet in the datapath's bitmap filters. A set frontend bit (its destination) costs
/// a miss the flow and the frontend lookups; a set reply bit (its source) a conntrack lookup.
/// The shares of bits set are those odds for a packet of random addresses.
#[derive(Clone, Copy)]
struct MissFilters {
    frontend_taken: bool,
    frontend_share: f64,
    reply_taken: bool,
    reply_share: f64,
}

impl MissFilters {
    /// What the map writer sets for `frontends` Services of the benchmark's shape.
    fn of(frontends: usize) -> Self {
        let fe: HashSet<u32> = (0..frontends)
            .map(|s| {
                let k = frontend_key(s);
                filter_slot(k.addr_be, k.port_be, FRONTEND_FILTER_SIZE)
            })
            .collect();
        let reply: HashSet<u32> = (0..frontends * BACKENDS_PER_SERVICE)
            .map(|i| {
                reply_filter_slot(
                    u32::from_ne_bytes(backend_addr(i).octets()),
                    BACKEND_PORT.to_be(),
                )
            })
            .collect();
        Self {
            frontend_taken: fe.contains(&filter_slot(
                u32::from_ne_bytes(NOT_A_SERVICE.octets()),
                SERVICE_PORT.to_be(),
                FRONTEND_FILTER_SIZE,
            )),
            frontend_share: fe.len() as f64 / FRONTEND_FILTER_SIZE as f64,
            reply_taken: reply.contains(&reply_filter_slot(
                u32::from_ne_bytes(CLIENT.octets()),
                PORT_MISS.to_be(),
            )),
            reply_share: reply.len() as f64 / REPLY_FILTER_SIZE as f64,
        }
    }

    fn describe(&self) -> String {
        let bit = |taken| if taken { "set" } else { "clear" };
        format!(
            "frontend {} ({:.1}%), reply {} ({:.1}%)",
            bit(self.frontend_taken),
            self.frontend_share * 100.0,
            bit(self.reply_taken),
            self.reply_share * 100.0
        )
    }
}

/// One N loaded: the datapath with its maps written, the packets, and the flows they need.
struct Setup {
    n: usize,
    /// Frontends in the map (N, or 2 for N = 1: see `Setup::new`).
    frontends_loaded: usize,
    b: Bench,
    /// hit_est's ping-pong packet (repeat method).
    pingpong: Vec<u8>,
    miss: Vec<u8>,
    /// An established flow's packet to a real backend (single method).
    est: Vec<u8>,
    miss_filters: MissFilters,
    naive: String,
    /// Next fresh client port for hit_new.
    next_port: u16,
    // Last: removes the pins after everything else has closed its maps.
    _guard: PinDirGuard,
}

impl Setup {
    fn new(repeat: u32, n: usize) -> Result<Self> {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/svcproxy-bench-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&pin_dir);
        let guard = PinDirGuard(pin_dir.clone());
        let mut dp = Datapath::load(&pin_dir, &sizes())
            .context("loading the datapath (needs root and bpffs: `cargo xtask setup`)")?;
        // Load the reference programs while every map fd they refer to is still open.
        dp.bench_program("bench_empty")?;
        dp.bench_program("bench_lookup")?;

        // hit_est's ping-pong (below) needs two Services; with N = 1 a second one is added,
        // which changes no lookup cost (the hash table has 65536 buckets either way).
        let frontends_loaded = n.max(2);
        let config = WriterConfig {
            max_frontends: sizes().frontends,
            maglev_table_size: sizes().maglev_table_size,
        };
        let mut writer = MapWriter::adopt(KernelMaps::take(&mut dp)?, config)?;
        let stats = writer.apply(&desired(frontends_loaded));
        ensure!(
            stats.failed == 0 && stats.frontends_written == frontends_loaded,
            "the map writer wrote {} of {frontends_loaded} frontends ({} failed)",
            stats.frontends_written,
            stats.failed
        );
        let mut bench_frontends: HashMap<MapData, Frontend4Key, Service4> =
            HashMap::try_from(dp.take_map("BENCH_FRONTENDS")?)?;
        for s in 0..n {
            let value = Service4 {
                svc_id: s as u32 + 1,
                backend_count: BACKENDS_PER_SERVICE as u16,
                ..Default::default()
            };
            bench_frontends.insert(frontend_key(s), value, 0)?;
        }
        let ct = HashMap::try_from(dp.take_map(CT4)?)?;
        let stats = PerCpuArray::try_from(dp.take_map(STATS)?)?;
        let mut b = Bench {
            dp,
            ct,
            stats,
            _bench_frontends: bench_frontends,
            _writer: writer,
        };

        let svc0 = service_addr(0);
        let svc1 = service_addr(1);
        let miss_filters = MissFilters::of(frontends_loaded);

        // hit_est, repeat method. BPF_PROG_TEST_RUN runs every repetition on the same buffer,
        // so after the first one the packet is already translated to its backend and would
        // take the miss path. Instead the flow ping-pongs between two Services: the conntrack
        // entry of client -> Service 0 translates to Service 1's address, and that of
        // client -> Service 1 back to Service 0's. Every repetition is then an established-flow
        // packet with a full address rewrite (the ports stay 80, so no port rewrite is
        // measured here; the single method's hit_est includes one).
        let pingpong = tcp_frame(CLIENT, PORT_PINGPONG, svc0, SERVICE_PORT, TCP_ACK);
        for (from, to) in [(svc0, svc1), (svc1, svc0)] {
            let syn = tcp_frame(CLIENT, PORT_PINGPONG, from, SERVICE_PORT, TCP_SYN);
            b.time_checked(&syn, 1, STAT_FWD_NEW, "creating the ping-pong flow")?;
            let key = Bench::forward_key(from, SERVICE_PORT, PORT_PINGPONG);
            let mut entry =
                b.ct.get(&key, 0)
                    .context("the SYN left no conntrack entry")?;
            entry.nat_addr_be = u32::from_ne_bytes(to.octets());
            entry.nat_port_be = SERVICE_PORT.to_be();
            b.ct.insert(key, entry, 0)?;
        }
        // The first ACK clears the flow's SYN-only flag (one write); measure after it.
        b.time_checked(
            &pingpong,
            2,
            STAT_FWD_ESTABLISHED,
            "warming the ping-pong flow",
        )?;

        // Single method: a plain established flow to a real backend (address and port
        // rewrite); every call starts from the untranslated packet.
        let est = tcp_frame(CLIENT, PORT_EST, svc0, SERVICE_PORT, TCP_ACK);
        let est_syn = tcp_frame(CLIENT, PORT_EST, svc0, SERVICE_PORT, TCP_SYN);
        b.time_checked(&est_syn, 1, STAT_FWD_NEW, "creating the established flow")?;
        b.time_checked(
            &est,
            1,
            STAT_FWD_ESTABLISHED,
            "first ACK of the established flow",
        )?;

        let naive = naive_repeat(&mut b, repeat)?;
        Ok(Self {
            n,
            frontends_loaded,
            b,
            pingpong,
            miss: tcp_frame(CLIENT, PORT_MISS, NOT_A_SERVICE, SERVICE_PORT, TCP_ACK),
            est,
            miss_filters,
            naive,
            next_port: PORT_NEW_BASE,
            _guard: guard,
        })
    }

    /// One run of the repeat method: every variant once, back to back.
    fn repeat_run(&mut self, repeat: u32, row: &mut Row) -> Result<()> {
        let b = &mut self.b;
        row.empty.push(b.time(Prog::Empty, &self.pingpong, repeat)?);
        row.lookup
            .push(b.time(Prog::Lookup, &self.pingpong, repeat)?);
        row.miss
            .push(b.time_checked(&self.miss, repeat, STAT_PASS_NO_SERVICE, "miss")?);
        row.hit_est.push(b.time_checked(
            &self.pingpong,
            repeat,
            STAT_FWD_ESTABLISHED,
            "hit_est",
        )?);
        Ok(())
    }

    /// One round of the single method: `packets` of every variant, interleaved; each variant's
    /// figure is the round's median.
    fn single_round(&mut self, packets: usize, row: &mut Row) -> Result<()> {
        let (mut e, mut l, mut h, mut nw) = (vec![], vec![], vec![], vec![]);
        let b = &mut self.b;
        let before = b.read_stats()?;
        for _ in 0..packets {
            e.push(b.time(Prog::Empty, &self.est, 1)?);
            l.push(b.time(Prog::Lookup, &self.est, 1)?);
            h.push(b.time(Prog::Datapath, &self.est, 1)?);
            // A SYN from a port never used before: a new flow every time.
            let port = self.next_port;
            self.next_port = port.checked_add(1).context("ran out of client ports")?;
            let syn = tcp_frame(CLIENT, port, service_addr(0), SERVICE_PORT, TCP_SYN);
            nw.push(b.time(Prog::Datapath, &syn, 1)?);
        }
        let after = b.read_stats()?;
        for (stat, what) in [
            (STAT_FWD_ESTABLISHED, "single hit_est"),
            (STAT_FWD_NEW, "hit_new"),
        ] {
            let got = after[stat as usize] - before[stat as usize];
            ensure!(
                got == packets as u64,
                "{what}: {got} of {packets} packets counted as {}",
                STAT_NAMES[stat as usize]
            );
        }
        row.s_empty.push(Stat::of(&e).median);
        row.s_lookup.push(Stat::of(&l).median);
        row.s_hit_est.push(Stat::of(&h).median);
        row.hit_new.push(Stat::of(&nw).median);
        Ok(())
    }
}

/// Runs both methods over every loaded N, run by run.
fn measure(cfg: &Config, setups: &mut [Setup]) -> Result<Vec<Row>> {
    let mut rows: Vec<Row> = setups
        .iter()
        .map(|s| Row {
            n: s.n,
            empty: Vec::new(),
            lookup: Vec::new(),
            miss: Vec::new(),
            hit_est: Vec::new(),
            s_empty: Vec::new(),
            s_lookup: Vec::new(),
            s_hit_est: Vec::new(),
            hit_new: Vec::new(),
            miss_filters: s.miss_filters,
            frontends_loaded: s.frontends_loaded,
            naive: s.naive.clone(),
        })
        .collect();
    for _ in 0..cfg.runs {
        for (setup, row) in setups.iter_mut().zip(&mut rows) {
            setup
                .repeat_run(cfg.repeat, row)
                .with_context(|| format!("N={}", setup.n))?;
        }
    }
    for _ in 0..cfg.rounds {
        for (setup, row) in setups.iter_mut().zip(&mut rows) {
            setup
                .single_round(cfg.per_round, row)
                .with_context(|| format!("N={}", setup.n))?;
        }
    }
    Ok(rows)
}

struct Report {
    quick: bool,
    repeat: u32,
    cfg_line: String,
    rows: Vec<Row>,
}

fn fmt_stat(s: Stat, prec: usize) -> String {
    if s.median.is_nan() {
        return "n/a".into();
    }
    format!("{:.p$} ({:.p$}-{:.p$})", s.median, s.min, s.max, p = prec)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

impl Report {
    fn new(cfg: &Config, rows: Vec<Row>) -> Self {
        Self {
            quick: cfg.quick,
            repeat: cfg.repeat,
            cfg_line: format!(
                "repeat method: median (min-max) of {} runs of repeat = {}, kernel-timed average \
                 per packet; single method: median (min-max) over {} rounds of the per-round \
                 median of {} packets sent one per BPF_PROG_TEST_RUN (repeat = 1).",
                cfg.runs, cfg.repeat, cfg.rounds, cfg.per_round
            ),
            rows,
        }
    }

    fn row(&self, n: usize) -> Option<&Row> {
        self.rows.iter().find(|r| r.n == n)
    }

    /// The report as plain text (printed, and embedded in the markdown file).
    fn render(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "{}", self.cfg_line);
        let _ = writeln!(
            t,
            "\nns per packet, repeat method (warm caches; hit_est = established flow with an \
             address rewrite):"
        );
        let _ = writeln!(
            t,
            "{:>6} | {:>16} | {:>16} | {:>16} | {:>16}",
            "N", "empty", "lookup", "miss", "hit_est"
        );
        for r in &self.rows {
            let _ = writeln!(
                t,
                "{:>6} | {:>16} | {:>16} | {:>16} | {:>16}",
                r.n,
                fmt_stat(Stat::of(&r.empty), 0),
                fmt_stat(Stat::of(&r.lookup), 0),
                fmt_stat(Stat::of(&r.miss), 0),
                fmt_stat(Stat::of(&r.hit_est), 0),
            );
        }
        let _ = writeln!(
            t,
            "\nns per packet, single method (one packet per syscall; includes the kernel's timer \
             reads; hit_new = SYN of a new flow, hit_est = established flow with address and \
             port rewrite):"
        );
        let _ = writeln!(
            t,
            "{:>6} | {:>16} | {:>16} | {:>16} | {:>16}",
            "N", "empty", "lookup", "hit_new", "hit_est"
        );
        for r in &self.rows {
            let _ = writeln!(
                t,
                "{:>6} | {:>16} | {:>16} | {:>16} | {:>16}",
                r.n,
                fmt_stat(Stat::of(&r.s_empty), 0),
                fmt_stat(Stat::of(&r.s_lookup), 0),
                fmt_stat(Stat::of(&r.hit_new), 0),
                fmt_stat(Stat::of(&r.s_hit_est), 0),
            );
        }
        let first = self.rows.first().map(|r| r.n).unwrap_or(1);
        let _ = writeln!(
            t,
            "\nin lookup units = (prog - empty) / (lookup - empty), run by run (single-method \
             figures against the single-method empty and lookup); then hit_est's net cost \
             (prog - empty) relative to N={first} and N={SCALE_BASE_N}:"
        );
        let _ = writeln!(
            t,
            "{:>6} | {:>18} | {:>18} | {:>18} | {:>18} | {:>8} | {:>8} | miss packet's filter bits \
             (share of bits set)",
            "N",
            "miss",
            "hit_est",
            "hit_new (single)",
            "hit_est (single)",
            format!("x N={first}"),
            format!("x N={SCALE_BASE_N}"),
        );
        for r in &self.rows {
            let ratio = |base: Option<&Row>| {
                base.map_or(f64::NAN, |b| {
                    Stat::of(&scale((&r.hit_est, &r.empty), (&b.hit_est, &b.empty))).median
                })
            };
            let _ = writeln!(
                t,
                "{:>6} | {:>18} | {:>18} | {:>18} | {:>18} | {:>8.2} | {:>8.2} | {}",
                r.n,
                fmt_stat(Stat::of(&lookup_units(&r.miss, &r.empty, &r.lookup)), 2),
                fmt_stat(Stat::of(&lookup_units(&r.hit_est, &r.empty, &r.lookup)), 2),
                fmt_stat(
                    Stat::of(&lookup_units(&r.hit_new, &r.s_empty, &r.s_lookup)),
                    2
                ),
                fmt_stat(
                    Stat::of(&lookup_units(&r.s_hit_est, &r.s_empty, &r.s_lookup)),
                    2
                ),
                ratio(self.row(first)),
                ratio(self.row(SCALE_BASE_N)),
                r.miss_filters.describe(),
            );
        }
        if let Some(r) = self.rows.iter().find(|r| r.frontends_loaded != r.n) {
            let _ = writeln!(
                t,
                "(N={}: {} Services loaded, the second being hit_est's ping-pong partner)",
                r.n, r.frontends_loaded
            );
        }

        if let Some(r) = self.rows.first() {
            let _ = writeln!(
                t,
                "(why hit_est ping-pongs: one established ACK repeated {} times in one run was \
                 counted as {}; BPF_PROG_TEST_RUN does not restore the packet between \
                 repetitions, so from the second one on it is already translated)",
                self.repeat, r.naive
            );
        }

        let _ = writeln!(t, "\ntargets (PERF.md), per N on medians:");
        let per_n = |name: &str, target: f64, f: &dyn Fn(&Row) -> f64| {
            let figures: Vec<(usize, f64)> = self.rows.iter().map(|r| (r.n, f(r))).collect();
            let ok = figures.iter().all(|(_, v)| *v <= target);
            let list: Vec<String> = figures
                .iter()
                .map(|(n, v)| format!("N={n} {v:.2}"))
                .collect();
            format!(
                "  {:<34} <= {target:<4}: {}  [{}]",
                name,
                verdict(ok),
                list.join(", ")
            )
        };
        let _ = writeln!(
            t,
            "{}",
            per_n("hit_est, lookup units", TARGET_HIT_LU, &|r| {
                Stat::of(&lookup_units(&r.hit_est, &r.empty, &r.lookup)).median
            })
        );
        let _ = writeln!(
            t,
            "{}",
            per_n("hit_new (single), lookup units", TARGET_HIT_LU, &|r| {
                Stat::of(&lookup_units(&r.hit_new, &r.s_empty, &r.s_lookup)).median
            })
        );
        let _ = writeln!(
            t,
            "{}",
            per_n("miss, lookup units", TARGET_MISS_LU, &|r| {
                Stat::of(&lookup_units(&r.miss, &r.empty, &r.lookup)).median
            })
        );
        match (self.row(SCALE_TOP_N), self.row(SCALE_BASE_N)) {
            (Some(top), Some(base)) => {
                let ratio = |prog: fn(&Row) -> &Vec<f64>, empty: fn(&Row) -> &Vec<f64>| {
                    Stat::of(&scale((prog(top), empty(top)), (prog(base), empty(base))))
                };
                let est = ratio(|r| &r.hit_est, |r| &r.empty);
                let _ = writeln!(
                    t,
                    "  {:<34} <= {TARGET_SCALE:<4}: {}  [{}; also miss {}, hit_new {}]",
                    format!("hit_est net, N={SCALE_TOP_N} / N={SCALE_BASE_N}"),
                    verdict(est.median <= TARGET_SCALE),
                    fmt_stat(est, 2),
                    fmt_stat(ratio(|r| &r.miss, |r| &r.empty), 2),
                    fmt_stat(ratio(|r| &r.hit_new, |r| &r.s_empty), 2),
                );
            }
            _ => {
                let _ = writeln!(
                    t,
                    "  scaling: N={SCALE_TOP_N} or N={SCALE_BASE_N} not measured"
                );
            }
        }
        t
    }

    fn markdown(&self, text: &str) -> String {
        let host = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|| "unknown".into())
        };
        let shared::Machine { kernel, cpu, cpus } = shared::Machine::this();
        format!(
            "# Datapath cost per packet (BPF_PROG_TEST_RUN)\n\n\
             Produced by `cargo xtask bench datapath`{}.\n\n\
             - date: {}\n- kernel: {kernel}\n- CPU: {cpu} ({cpus} CPUs)\n\
             - Services: N x {BACKENDS_PER_SERVICE} backends, written by the map writer; \
             map sizes: frontends {}, slots {}, backends {}, conntrack {}\n\n\
             Methods: see the header of `tests/benches/datapath.rs`. `empty` and `lookup` are \
             reference programs in the same object, measured in the same run on the same packet; \
             `lookup` does one lookup in a hash map of the frontend map's size holding the same N \
             keys.\n\n```text\n{text}```\n",
            if self.quick { " --quick" } else { "" },
            host("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            sizes().frontends,
            sizes().slots,
            sizes().backends,
            sizes().conntrack,
        )
    }

    fn json(&self) -> Result<String> {
        /// One figure; fields in this order in the file.
        #[derive(serde::Serialize)]
        struct JsonRow<'a> {
            variant: &'a str,
            n: usize,
            metric: &'a str,
            /// "repeat" or "single" (see the file header).
            method: &'a str,
            min: Option<f64>,
            median: Option<f64>,
            max: Option<f64>,
        }
        let mut out = Vec::new();
        let mut push = |variant, method, n, metric, s: Stat| {
            out.push(JsonRow {
                variant,
                n,
                metric,
                method,
                min: finite(s.min),
                median: finite(s.median),
                max: finite(s.max),
            });
        };
        for r in &self.rows {
            let n = r.n;
            for (v, m, vals) in [
                ("empty", "repeat", &r.empty),
                ("lookup", "repeat", &r.lookup),
                ("miss", "repeat", &r.miss),
                ("hit_est", "repeat", &r.hit_est),
                ("empty_single", "single", &r.s_empty),
                ("lookup_single", "single", &r.s_lookup),
                ("hit_new", "single", &r.hit_new),
                ("hit_est_single", "single", &r.s_hit_est),
            ] {
                push(v, m, n, "ns_per_pkt", Stat::of(vals));
            }
            for (v, m, prog, empty, lookup) in [
                ("miss", "repeat", &r.miss, &r.empty, &r.lookup),
                ("hit_est", "repeat", &r.hit_est, &r.empty, &r.lookup),
                ("hit_new", "single", &r.hit_new, &r.s_empty, &r.s_lookup),
                (
                    "hit_est_single",
                    "single",
                    &r.s_hit_est,
                    &r.s_empty,
                    &r.s_lookup,
                ),
            ] {
                push(
                    v,
                    m,
                    n,
                    "lookup_units",
                    Stat::of(&lookup_units(prog, empty, lookup)),
                );
            }
        }
        Ok(serde_json::to_string_pretty(&out)? + "\n")
    }
}

/// JSON has no NaN: a figure that could not be computed is null.
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some((x * 1000.0).round() / 1000.0)
}
