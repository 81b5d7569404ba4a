//! Loads the datapath into a private pin directory and runs fixture cases against it.

use std::{net::Ipv4Addr, path::PathBuf};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::TestRunOptions,
};
use proxy_common::{
    conntrack::{CT4, CtEntry4, CtKey4},
    stats::{STAT_COUNT, STAT_NAMES, STATS},
};
use svcproxy::{
    desired::{Backend, BackendState, Desired, Frontend, FrontendState, Protocol, ServiceName},
    kernel_maps::KernelMaps,
    loader::{Datapath, Hook, MapSizes},
    writer::MapWriter,
};

/// tc and XDP return codes for "pass" and "drop".
pub const TC_OK: u32 = 0;
pub const TC_SHOT: u32 = 2;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
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
}

pub struct Step {
    pub input: Vec<u8>,
    pub expect: Expect,
    /// The outcome counter this packet must increment.
    pub stat: u32,
}

pub struct Case {
    pub name: &'static str,
    pub frontends: Vec<(Frontend, Vec<Backend>)>,
    pub steps: Vec<Step>,
}

pub fn fe(addr: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
    Frontend { addr: Ipv4Addr::from(addr), port, protocol }
}

pub fn be(addr: [u8; 4], port: u16) -> Backend {
    Backend { addr: Ipv4Addr::from(addr), port, state: BackendState::Active }
}

/// A loaded datapath with a writer over its maps; pins removed on drop.
pub struct Harness {
    dp: Datapath,
    writer: MapWriter<KernelMaps>,
    ct: HashMap<MapData, CtKey4, CtEntry4>,
    stats: PerCpuArray<MapData, u64>,
    pin_dir: PathBuf,
}

impl Harness {
    pub fn new(tag: &str) -> Self {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/svcproxy-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let sizes = MapSizes { frontends: 1024, slots: 4096, backends: 4096, conntrack: 4096 };
        let mut dp = Datapath::load(&pin_dir, &sizes)
            .unwrap_or_else(|e| panic!("loading the datapath failed (root and bpffs needed): {e}"));
        let maps = KernelMaps::take(&mut dp).unwrap_or_else(|e| panic!("maps: {e}"));
        let writer = MapWriter::adopt(maps).unwrap_or_else(|e| panic!("adopt: {e}"));
        let ct = HashMap::try_from(dp.take_map(CT4).expect("CT4")).expect("CT4 type");
        let stats = PerCpuArray::try_from(dp.take_map(STATS).expect("STATS")).expect("STATS type");
        Self { dp, writer, ct, stats, pin_dir }
    }

    /// Replaces all map contents with `frontends` and forgets every flow.
    pub fn set(&mut self, frontends: &[(Frontend, Vec<Backend>)]) {
        let mut desired = Desired::default();
        for (f, backends) in frontends {
            let mut backends = backends.clone();
            backends.sort();
            desired.frontends.insert(*f, FrontendState {
                service: ServiceName { namespace: "test".into(), name: format!("svc-{}", f.port) },
                port_name: String::new(),
                backends,
            });
        }
        let stats = self.writer.apply(&desired);
        assert_eq!(stats.failed, 0, "writing fixture maps failed");
        let keys: Vec<CtKey4> = self.ct.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.ct.remove(&k);
        }
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

    /// Runs one packet; returns the verdict and the output frame.
    pub fn run(&mut self, hook: Hook, input: &[u8]) -> (Verdict, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 256];
        let mut opts = TestRunOptions::default();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        let res = self
            .dp
            .test_run(hook, opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN ({hook:?}) failed: {e}"));
        let verdict = match (hook, res.return_value) {
            (Hook::Tc, TC_OK) | (Hook::Xdp, XDP_PASS) => Verdict::Pass,
            (Hook::Tc, TC_SHOT) | (Hook::Xdp, XDP_DROP) => Verdict::Drop,
            (h, rc) => panic!("{h:?} returned unexpected code {rc}"),
        };
        out.truncate(res.data_size_out as usize);
        (verdict, out)
    }

    /// Runs a whole case on one hook; panics with the case name and step on a mismatch.
    pub fn check(&mut self, hook: Hook, case: &Case) {
        self.set(&case.frontends);
        for (i, step) in case.steps.iter().enumerate() {
            let before = self.stats();
            let (verdict, out) = self.run(hook, &step.input);
            let ctx = format!("case {:?} step {i} on {hook:?}", case.name);
            let after = self.stats();
            let bumped: Vec<&str> = (0..STAT_COUNT as usize)
                .filter(|s| after[*s] != before[*s])
                .map(|s| STAT_NAMES[s])
                .collect();
            assert_eq!(bumped, vec![STAT_NAMES[step.stat as usize]], "{ctx}: counters");
            match &step.expect {
                Expect::Dropped => assert_eq!(verdict, Verdict::Drop, "{ctx}: verdict"),
                Expect::Untouched => {
                    assert_eq!(verdict, Verdict::Pass, "{ctx}: verdict");
                    assert_eq!(out, step.input, "{ctx}: packet must pass untouched");
                }
                Expect::Rewritten(want) => {
                    assert_eq!(verdict, Verdict::Pass, "{ctx}: verdict");
                    if let Err(e) = crate::packet::same_frame(&out, want) {
                        panic!("{ctx}: {e}");
                    }
                }
                Expect::OneOf(wants) => {
                    assert_eq!(verdict, Verdict::Pass, "{ctx}: verdict");
                    if !wants.iter().any(|w| crate::packet::same_frame(&out, w).is_ok()) {
                        panic!("{ctx}: output matches none of the {} expected frames", wants.len());
                    }
                }
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
