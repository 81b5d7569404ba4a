//! Loads the datapath into a private pin directory and runs fixture cases against it.

use std::{
    net::Ipv4Addr,
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::TestRunOptions,
};
use proxy_common::{
    conntrack::{
        AFFINITY4, AffinityEntry, AffinityKey4, CT4, CtEntry4, CtKey4, FRAG4, FragKey4, FragPorts,
    },
    stats::{STAT_COUNT, STAT_NAMES, STATS},
};
use svcproxy::{
    desired::{
        Algorithm, Backend, BackendState, Desired, Frontend, FrontendState, Protocol, ServiceName,
    },
    kernel_maps::KernelMaps,
    loader::{Datapath, Hook, MapSizes},
    writer::{MapWriter, WriterConfig},
};

/// tc and XDP return codes for "pass", "drop" and "send back out" (a reject reply: tc
/// redirects to the device it came from, XDP transmits on it).
pub const TC_OK: u32 = 0;
pub const TC_SHOT: u32 = 2;
pub const TC_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The Maglev table size the harness loads the datapath with (a prime).
pub const MAGLEV_TABLE_SIZE: u32 = 251;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    Bounce,
}

/// What a step expects the program to do with its packet.
pub enum Expect {
    /// Passed, rewritten to exactly this frame.
    Rewritten(Vec<u8>),
    /// Passed, rewritten to one of these frames (random backend choice).
    OneOf(Vec<Vec<u8>>),
    /// Passed, not modified.
    Untouched,
    /// Dropped.
    Dropped,
    /// Turned into exactly this frame and sent back where it came from (a reject reply).
    Bounced(Vec<u8>),
}

pub struct Step {
    pub input: Vec<u8>,
    pub expect: Expect,
    /// The outcome counter this packet must increment (and the only one).
    pub stat: u32,
    /// Run only on this hook, for this reason: BPF_PROG_TEST_RUN refuses the input on the
    /// other one.
    pub only_on: Option<(Hook, &'static str)>,
}

/// One frontend with its backends and the traits the writer programs for it.
#[derive(Clone)]
pub struct Svc {
    pub frontend: Frontend,
    pub backends: Vec<Backend>,
    pub affinity_timeout_s: Option<u32>,
    pub algorithm: Algorithm,
    pub drop_when_empty: bool,
}

impl Svc {
    /// Endpoints exist but none is usable here: drop instead of reject.
    pub fn drop_when_empty(mut self) -> Self {
        self.drop_when_empty = true;
        self
    }

    /// `sessionAffinity: ClientIP` with this timeout.
    pub fn affinity(mut self, timeout_s: u32) -> Self {
        self.affinity_timeout_s = Some(timeout_s);
        self
    }

    pub fn maglev(mut self) -> Self {
        self.algorithm = Algorithm::Maglev;
        self
    }
}

pub fn svc(frontend: Frontend, backends: Vec<Backend>) -> Svc {
    Svc {
        frontend,
        backends,
        affinity_timeout_s: None,
        algorithm: Algorithm::Random,
        drop_when_empty: false,
    }
}

pub struct Case {
    pub name: &'static str,
    pub frontends: Vec<Svc>,
    pub steps: Vec<Step>,
}

pub fn fe(addr: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: Ipv4Addr::from(addr),
        port,
        protocol,
    }
}

pub fn be(addr: [u8; 4], port: u16) -> Backend {
    Backend {
        addr: Ipv4Addr::from(addr),
        port,
        state: BackendState::Active,
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads, so a test can age
/// conntrack and affinity entries relative to the datapath's "now".
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A pin directory removed on drop, created before loading so that a load that panics
/// (verifier refusal) leaves nothing behind either.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loaded datapath with a writer over its maps; pins removed on drop.
pub struct Harness {
    dp: Datapath,
    writer: MapWriter<KernelMaps>,
    ct: HashMap<MapData, CtKey4, CtEntry4>,
    affinity: HashMap<MapData, AffinityKey4, AffinityEntry>,
    frag: HashMap<MapData, FragKey4, FragPorts>,
    stats: PerCpuArray<MapData, u64>,
    _pin_dir: PinDir,
}

impl Harness {
    pub fn new(tag: &str) -> Self {
        Self::with_maglev_table(tag, MAGLEV_TABLE_SIZE)
    }

    /// A harness whose Maglev tables have `size` entries (a prime).
    pub fn with_maglev_table(tag: &str, size: u32) -> Self {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/svcproxy-test-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let guard = PinDir(pin_dir.clone());
        let sizes = MapSizes {
            frontends: 1024,
            slots: 4096,
            backends: 4096,
            conntrack: 4096,
            affinity: 1024,
            maglev_entries: 65_536,
            maglev_table_size: size,
        };
        let mut dp = Datapath::load(&pin_dir, &sizes)
            .unwrap_or_else(|e| panic!("loading the datapath failed (root and bpffs needed): {e}"));
        let maps = KernelMaps::take(&mut dp).unwrap_or_else(|e| panic!("maps: {e}"));
        let config = WriterConfig {
            max_frontends: sizes.frontends,
            maglev_table_size: sizes.maglev_table_size,
        };
        let writer = MapWriter::adopt(maps, config).unwrap_or_else(|e| panic!("adopt: {e}"));
        let ct = HashMap::try_from(dp.take_map(CT4).expect("CT4")).expect("CT4 type");
        let affinity =
            HashMap::try_from(dp.take_map(AFFINITY4).expect("AFFINITY4")).expect("AFFINITY4 type");
        let frag = HashMap::try_from(dp.take_map(FRAG4).expect("FRAG4")).expect("FRAG4 type");
        let stats = PerCpuArray::try_from(dp.take_map(STATS).expect("STATS")).expect("STATS type");
        Self {
            dp,
            writer,
            ct,
            affinity,
            frag,
            stats,
            _pin_dir: guard,
        }
    }

    /// A harness whose pin directory names the test and the hook.
    pub fn for_hook(test: &str, hook: Hook) -> Self {
        Self::new(&format!("{test}-{hook:?}").to_lowercase())
    }

    /// Makes the maps hold exactly `frontends`, through the real map writer, keeping every
    /// flow (as the controller does on a Service change).
    pub fn apply(&mut self, frontends: &[Svc]) {
        let mut desired = Desired::default();
        for s in frontends {
            let mut backends = s.backends.clone();
            backends.sort();
            desired.frontends.insert(
                s.frontend,
                FrontendState {
                    service: ServiceName {
                        namespace: "test".into(),
                        name: format!("svc-{}", s.frontend.port),
                    },
                    port_name: String::new(),
                    backends,
                    affinity_timeout_s: s.affinity_timeout_s,
                    algorithm: s.algorithm,
                    drop_when_empty: s.drop_when_empty,
                    ..FrontendState::default()
                }
                .into(),
            );
        }
        let stats = self.writer.apply(&desired);
        assert_eq!(stats.failed, 0, "writing fixture maps failed");
    }

    /// Replaces all map contents with `frontends` and forgets every flow, affinity and
    /// fragment, so a case never sees the state of the one before.
    pub fn set(&mut self, frontends: &[Svc]) {
        self.apply(frontends);
        self.forget_flows();
    }

    /// Empties conntrack, affinity and fragment tracking.
    pub fn forget_flows(&mut self) {
        let keys: Vec<CtKey4> = self.ct.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.ct.remove(&k);
        }
        let keys: Vec<AffinityKey4> = self.affinity.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.affinity.remove(&k);
        }
        let keys: Vec<FragKey4> = self.frag.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.frag.remove(&k);
        }
        assert_eq!(
            self.ct_len(),
            0,
            "conntrack still holds entries after flushing it"
        );
    }

    pub fn stats(&self) -> [u64; STAT_COUNT as usize] {
        let mut out = [0; STAT_COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.stats.get(&(i as u32), 0).expect("stats").iter().sum();
        }
        out
    }

    pub fn ct_len(&self) -> usize {
        self.ct.keys().count()
    }

    pub fn ct_entries(&self) -> Vec<(CtKey4, CtEntry4)> {
        self.ct.iter().map(|r| r.expect("reading CT4")).collect()
    }

    pub fn ct_put(&mut self, key: &CtKey4, entry: &CtEntry4) {
        self.ct.insert(key, entry, 0).expect("writing CT4");
    }

    pub fn affinity_entries(&self) -> Vec<(AffinityKey4, AffinityEntry)> {
        self.affinity
            .iter()
            .map(|r| r.expect("reading AFFINITY4"))
            .collect()
    }

    pub fn affinity_put(&mut self, key: &AffinityKey4, entry: &AffinityEntry) {
        self.affinity
            .insert(key, entry, 0)
            .expect("writing AFFINITY4");
    }

    /// Runs one packet; returns the verdict and the output frame.
    pub fn run(&mut self, hook: Hook, input: &[u8]) -> (Verdict, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let res = self
            .dp
            .test_run(hook, opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN ({hook:?}) failed: {e:?}"));
        let verdict = match (hook, res.return_value) {
            (Hook::Tc, TC_OK) | (Hook::Xdp, XDP_PASS) => Verdict::Pass,
            (Hook::Tc, TC_SHOT) | (Hook::Xdp, XDP_DROP) => Verdict::Drop,
            (Hook::Tc, TC_REDIRECT) => Verdict::Bounce,
            (h, rc) => panic!("{h:?} returned unexpected code {rc}"),
        };
        out.truncate(res.data_size_out as usize);
        (verdict, out)
    }

    /// Runs one packet, checks that exactly the counter `stat` moved (by one) and returns the
    /// verdict and output.
    pub fn run_counted(
        &mut self,
        hook: Hook,
        input: &[u8],
        stat: u32,
        ctx: &str,
    ) -> (Verdict, Vec<u8>) {
        let before = self.stats();
        let res = self.run(hook, input);
        let after = self.stats();
        let moved: Vec<String> = (0..STAT_COUNT as usize)
            .filter(|s| after[*s] != before[*s])
            .map(|s| format!("{} +{}", STAT_NAMES[s], after[s] - before[s]))
            .collect();
        let want = vec![format!("{} +1", STAT_NAMES[stat as usize])];
        assert!(
            moved == want,
            "{ctx}: outcome counters moved {moved:?}, expected exactly {want:?}"
        );
        res
    }

    /// Runs one step; panics with `ctx` on a mismatch. Returns the output frame.
    pub fn step(&mut self, hook: Hook, step: &Step, ctx: &str) -> Vec<u8> {
        let (verdict, out) = self.run_counted(hook, &step.input, step.stat, ctx);
        let want_verdict = match step.expect {
            Expect::Dropped => Verdict::Drop,
            // XDP hands a reject reply to the kernel to route back (XDP_TX would be lost on a
            // veth whose peer runs no XDP program).
            Expect::Bounced(_) if hook == Hook::Xdp => Verdict::Pass,
            Expect::Bounced(_) => Verdict::Bounce,
            _ => Verdict::Pass,
        };
        assert_eq!(verdict, want_verdict, "{ctx}: verdict");
        match &step.expect {
            Expect::Dropped => {}
            Expect::Untouched => {
                if out != step.input {
                    panic!(
                        "{ctx}: packet must pass untouched\n  got:  {}\n  sent: {}",
                        crate::packet::hex(&out),
                        crate::packet::hex(&step.input)
                    );
                }
            }
            Expect::Rewritten(want) => {
                if let Err(e) = crate::packet::same_frame(&out, want) {
                    panic!("{ctx}: {e}");
                }
            }
            Expect::Bounced(want) => {
                // tc sends the reply straight back, addressed to the sender; XDP leaves the
                // Ethernet header as received so the kernel accepts and routes it.
                let mut want = want.clone();
                if hook == Hook::Xdp && want.len() >= 12 {
                    let (dst, src) = want.split_at_mut(6);
                    dst.swap_with_slice(&mut src[..6]);
                }
                if let Err(e) = crate::packet::same_frame(&out, &want) {
                    panic!("{ctx}: {e}");
                }
            }
            Expect::OneOf(wants) => {
                if !wants
                    .iter()
                    .any(|w| crate::packet::same_frame(&out, w).is_ok())
                {
                    panic!(
                        "{ctx}: output matches none of the {} expected frames\n  got: {}",
                        wants.len(),
                        crate::packet::hex(&out)
                    );
                }
            }
        }
        out
    }

    /// Runs a whole case on one hook; panics with the case name and step on a mismatch.
    pub fn check(&mut self, hook: Hook, case: &Case) {
        self.set(&case.frontends);
        for (i, step) in case.steps.iter().enumerate() {
            let ctx = format!("case {:?} step {i} on {hook:?}", case.name);
            match step.only_on {
                Some((only, why)) if only != hook => println!("{ctx}: not run: {why}"),
                _ => {
                    self.step(hook, step, &ctx);
                }
            }
        }
    }
}

/// Runs every case on `hook`, each on fresh map contents, and fails listing every case that
/// failed (one broken case must not hide the others).
pub fn run_cases(hook: Hook, tag: &str, cases: &[Case]) {
    let mut h = Harness::for_hook(tag, hook);
    let mut failed = Vec::new();
    for case in cases {
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| h.check(hook, case))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let first = msg.lines().next().unwrap_or("");
            // Step failures name their case already; other panics (a failed syscall) do not.
            if first.contains(case.name) {
                failed.push(first.to_owned());
            } else {
                failed.push(format!("case {:?}: {first}", case.name));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed on {hook:?}:\n  {}",
        failed.len(),
        cases.len(),
        failed.join("\n  ")
    );
}
