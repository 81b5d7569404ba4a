//! Reference programs for `cargo xtask bench datapath`: an empty tc program and one that does a
//! single frontend-sized hash lookup. The datapath's cost is reported relative to these two,
//! measured in the same run, because absolute nanoseconds drift on shared machines. They ship in
//! the object but svcproxy never loads or attaches them.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_OK},
    btf_maps::HashMap,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use proxy_common::service::{Frontend4Key, Service4};

/// Ethernet (14) + option-less IPv4 header: where the destination address and the TCP/UDP
/// destination port sit in the benchmark's packets.
const DADDR_OFF: usize = 14 + 16;
const DPORT_OFF: usize = 14 + 20 + 2;
const PROTO_TCP: u8 = 6;

/// Same key, value, size and flags as the datapath's `FRONTENDS4`, filled with the same keys by
/// the benchmark, so one lookup here costs what one frontend lookup costs there. A map of its
/// own so the benchmark never writes the product's maps behind the writer's back.
#[btf_map]
static BENCH_FRONTENDS: HashMap<Frontend4Key, Service4, 65_536, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// The floor: program entry and exit as BPF_PROG_TEST_RUN sees them.
#[classifier]
pub fn bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// One lookup unit: read the destination address and port at fixed offsets (bounds-checked, as
/// the verifier demands), build a frontend key, look it up once.
#[classifier]
pub fn bench_lookup(ctx: TcContext) -> i32 {
    let start = ctx.data();
    if start + DPORT_OFF + 2 > ctx.data_end() {
        return TC_ACT_OK;
    }
    // SAFETY: both reads lie within [data, data_end), checked just above; the packet need not
    // be aligned, hence the unaligned reads.
    let (addr_be, port_be) = unsafe {
        (
            core::ptr::read_unaligned((start + DADDR_OFF) as *const u32),
            core::ptr::read_unaligned((start + DPORT_OFF) as *const u16),
        )
    };
    let key = Frontend4Key {
        addr_be,
        port_be,
        proto: PROTO_TCP,
        scope: 0,
    };
    // Reading the value (as the datapath does) keeps the compiler from dropping the lookup and
    // makes a hit cost what a datapath hit costs.
    if let Some(svc) = BENCH_FRONTENDS.get_ptr(key) {
        // SAFETY: pointer from a successful lookup; the value is read, never kept.
        core::hint::black_box(unsafe { core::ptr::read_volatile(&raw const (*svc).svc_id) });
    }
    TC_ACT_OK
}
