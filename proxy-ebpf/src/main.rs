//! svcproxy's kernel programs: a tc (tcx) ingress classifier and an XDP program, both thin
//! wrappers over one load-balancing core ([`lb::process`]) that only differ in how they touch
//! the packet ([`packet::Packet`]) and which action a verdict becomes.
#![no_std]
#![no_main]

mod bench;
mod conntrack;
mod icmp;
mod lb;
mod maps;
mod nat;
mod packet;
mod parse;
mod reject;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::lb::Verdict;

/// tc ingress on pod veths and other virtual devices (tcx on kernels >= 6.6).
#[classifier]
pub fn svcproxy_tc(ctx: TcContext) -> i32 {
    match lb::process(&ctx) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        // Ingress redirected to the same device's egress: back to the sender.
        // SAFETY: reading ifindex from our own skb; the helper takes plain integers.
        Verdict::Bounce => unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 },
    }
}

/// XDP on devices with a native driver (real NICs); same core as the tc program.
#[xdp]
pub fn svcproxy_xdp(ctx: XdpContext) -> u32 {
    match lb::process(&ctx) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        // The reject reply is addressed to the client: the kernel routes it back (see
        // `Packet::REPLY_IN_PLACE` for why not XDP_TX).
        Verdict::Bounce => xdp_action::XDP_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier proves no path reaches here; there is no unwinding in BPF.
    loop {}
}

/// The kernel refuses programs without a GPL-compatible license to use GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
