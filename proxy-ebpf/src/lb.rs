//! The load-balancing core shared by every entry point: look up the frontend, keep flows on
//! their backend, pick a backend for new flows, translate, and reverse-translate replies.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_log_ebpf::error;
use proxy_common::{
    backend::{Backend4, reply_filter_slot},
    conntrack::{CT_DIR_REPLY, CtEntry4, CtKey4},
    service::{Frontend4Key, Service4, SlotKey},
    stats::*,
};

use crate::{
    conntrack, nat,
    maps::{BACKENDS4, CT4, FRONTENDS4, REPLY_FILTER, SLOTS},
    packet::Packet,
    parse::{self, Flow4, Parsed},
    stats::count,
};

/// What the entry point should do with the packet.
pub enum Verdict {
    Pass,
    #[allow(dead_code, reason = "reject and policy drops use it")]
    Drop,
}

#[inline(always)]
pub fn process<P: Packet>(pkt: &P) -> Verdict {
    let flow = match parse::parse(pkt) {
        Parsed::Flow(flow) => flow,
        Parsed::NotIpv4 => return counted(STAT_PASS_NOT_IPV4, Verdict::Pass),
        Parsed::OtherIpv4 => return counted(STAT_PASS_NO_SERVICE, Verdict::Pass),
        Parsed::Fragment => return counted(STAT_PASS_FRAGMENT, Verdict::Pass),
        // Malformed packets are not ours to judge: the kernel drops what it must.
        Parsed::Malformed => return counted(STAT_MALFORMED, Verdict::Pass),
    };
    let key = Frontend4Key {
        addr_be: flow.daddr,
        port_be: flow.dport,
        proto: flow.proto,
        scope: 0,
    };
    // SAFETY: the controller only replaces frontend values whole; a torn read can at worst
    // pick from the old or new backend count, both of which have their slots written.
    match unsafe { FRONTENDS4.get(&key) } {
        Some(svc) => forward(pkt, &flow, &key, svc),
        None => reply(pkt, &flow),
    }
}

#[inline(always)]
fn counted(stat: u32, verdict: Verdict) -> Verdict {
    count(stat);
    verdict
}

/// A packet to a frontend: established flows keep their backend, new ones get one.
#[inline(always)]
fn forward<P: Packet>(pkt: &P, flow: &Flow4, fe: &Frontend4Key, svc: &Service4) -> Verdict {
    let now = conntrack::now_ns();
    let ct_key = conntrack::forward_key(flow);
    if let Some(entry) = CT4.get_ptr_mut(&ct_key) {
        // SAFETY: pointer from a successful lookup.
        let e = unsafe { &mut *entry };
        if e.svc_id == svc.svc_id && conntrack::is_live(e, flow, now) && revalidate(e, svc) {
            conntrack::touch(entry, flow, now);
            return translate(pkt, flow, e.nat_addr_be, e.nat_port_be, STAT_FWD_ESTABLISHED);
        }
    }
    if svc.backend_count == 0 {
        return counted(STAT_NO_BACKEND, Verdict::Pass);
    }
    // Modulo of a random number: uniform enough for counts far below 2^32.
    // SAFETY: helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.backend_count as u32 + 1;
    let Some(backend_id) = (unsafe {
        // SAFETY: slot values are written whole by the controller.
        SLOTS.get(&SlotKey {
            svc_id: svc.svc_id,
            slot,
        })
    })
    .map(|s| s.backend_id) else {
        return bad_slot(pkt, svc.svc_id, slot);
    };
    // SAFETY: backend values are written whole by the controller.
    let Some(backend) = (unsafe { BACKENDS4.get(&backend_id) }) else {
        return bad_slot(pkt, svc.svc_id, slot);
    };
    if record_flow(flow, fe, svc, backend_id, backend, now).is_err() {
        return counted(STAT_CT_INSERT_FAILED, Verdict::Pass);
    }
    translate(pkt, flow, backend.addr_be, backend.port_be, STAT_FWD_NEW)
}

/// A slot within the backend count names no backend: the controller's write order rules this
/// out, so it is logged (rare by construction) as well as counted.
#[inline(never)]
fn bad_slot<P: Packet>(pkt: &P, svc_id: u32, slot: u32) -> Verdict {
    error!(pkt, "service {} slot {} names no backend", svc_id, slot);
    counted(STAT_BAD_SLOT, Verdict::Pass)
}

/// Checks a cached backend against the current Service. Only when the Service's backend set
/// changed since the entry was validated does this cost a lookup.
#[inline(always)]
fn revalidate(e: &mut CtEntry4, svc: &Service4) -> bool {
    if e.revision == svc.revision {
        return true;
    }
    // SAFETY: backend values are written whole by the controller.
    match unsafe { BACKENDS4.get(&e.backend_id) } {
        Some(b) if b.svc_id == svc.svc_id => {
            e.nat_addr_be = b.addr_be;
            e.nat_port_be = b.port_be;
            e.revision = svc.revision;
            true
        }
        _ => false,
    }
}

/// Writes the forward and the reply entry of a new flow.
#[inline(always)]
fn record_flow(
    flow: &Flow4,
    fe: &Frontend4Key,
    svc: &Service4,
    backend_id: u32,
    backend: &Backend4,
    now: u64,
) -> Result<(), i32> {
    let flags = conntrack::initial_flags(flow);
    let fwd = CtEntry4 {
        nat_addr_be: backend.addr_be,
        nat_port_be: backend.port_be,
        flags,
        svc_id: svc.svc_id,
        backend_id,
        revision: svc.revision,
        _pad: 0,
        last_seen_ns: now,
    };
    conntrack::insert(&conntrack::forward_key(flow), &fwd)?;
    let rev = CtEntry4 {
        nat_addr_be: fe.addr_be,
        nat_port_be: fe.port_be,
        ..fwd
    };
    // The reply comes from the backend to the client.
    let key = CtKey4 {
        saddr_be: backend.addr_be,
        daddr_be: flow.saddr,
        sport_be: backend.port_be,
        dport_be: flow.sport,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    conntrack::insert(&key, &rev)
}

/// A packet to no frontend: maybe a reply from a backend, else not ours.
#[inline(always)]
fn reply<P: Packet>(pkt: &P, flow: &Flow4) -> Verdict {
    let slot = reply_filter_slot(flow.saddr, flow.sport);
    match REPLY_FILTER.get(slot) {
        Some(n) if *n != 0 => {}
        _ => return counted(STAT_PASS_NO_SERVICE, Verdict::Pass),
    }
    let Some(entry) = CT4.get_ptr_mut(&conntrack::reply_key(flow)) else {
        return counted(STAT_PASS_NO_SERVICE, Verdict::Pass);
    };
    // SAFETY: pointer from a successful lookup.
    let (addr, port) = unsafe { ((*entry).nat_addr_be, (*entry).nat_port_be) };
    conntrack::touch(entry, flow, conntrack::now_ns());
    match nat::snat(pkt, flow, addr, port) {
        Ok(()) => counted(STAT_REPLY, Verdict::Pass),
        Err(_) => counted(STAT_REWRITE_FAILED, Verdict::Pass),
    }
}

#[inline(always)]
fn translate<P: Packet>(pkt: &P, flow: &Flow4, addr: u32, port: u16, stat: u32) -> Verdict {
    match nat::dnat(pkt, flow, addr, port) {
        Ok(()) => counted(stat, Verdict::Pass),
        // Never forward a half-translated packet.
        Err(_) => counted(STAT_REWRITE_FAILED, Verdict::Drop),
    }
}
