//! The load-balancing core shared by every entry point: look up the frontend, keep flows on
//! their backend, pick a backend for new flows, translate, and reverse-translate replies and
//! ICMP errors.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_log_ebpf::error;
use proxy_common::{
    backend::{BACKEND_ACTIVE, Backend4, filter_slot, filter_word_bit, reply_filter_slot},
    conntrack::{AffinityEntry, AffinityKey4, CT_DIR_REPLY, CtEntry4, CtKey4, FragKey4, FragPorts},
    select::{affinity_fresh, maglev_flow_hash, maglev_index, random_slot},
    service::{
        FRONTEND_FILTER_SIZE, Frontend4Key, SVC_F_AFFINITY, SVC_F_MAGLEV, SVC_F_POLICY_DROP,
        Service4, SlotKey,
    },
    stats::*,
};

use crate::{
    conntrack, icmp,
    maps::{
        AFFINITY4, BACKENDS4, CT4, FRAG4, FRONTEND_FILTER, FRONTENDS4, MAGLEV_TABLE_SIZE, MAGLEV4,
        REPLY_FILTER, SLOTS, SVC_REVISIONS, SVC_STATS,
    },
    nat,
    packet::Packet,
    parse::{self, Flow4, Frag, IcmpError4, PROTO_TCP, Parsed, TCP_FIN, TCP_RST},
    reject,
    stats::count,
};

/// What the entry point should do with the packet.
pub enum Verdict {
    Pass,
    Drop,
    /// The packet was turned into a reject reply to its sender: tc sends it back out where it
    /// came from, XDP lets the kernel route it back.
    Bounce,
}

#[inline(always)]
pub fn process<P: Packet>(pkt: &P) -> Verdict {
    let mut flow = Flow4::zeroed();
    let mut icmp_err = IcmpError4::zeroed();
    match parse::parse(pkt, &mut flow, &mut icmp_err) {
        Parsed::Flow => {}
        Parsed::IcmpError => {
            return match icmp::reverse_translate(pkt, &icmp_err) {
                Ok(true) => counted(STAT_ICMP_ERROR_REPLY, Verdict::Pass),
                Ok(false) => counted(STAT_PASS_NO_SERVICE, Verdict::Pass),
                Err(_) => counted(STAT_REWRITE_FAILED, Verdict::Drop),
            };
        }
        Parsed::NotIpv4 => return counted(STAT_PASS_NOT_IPV4, Verdict::Pass),
        Parsed::OtherIpv4 => return counted(STAT_PASS_NO_SERVICE, Verdict::Pass),
        // Malformed packets are not ours to judge: the kernel drops what it must.
        Parsed::Malformed => return counted(STAT_MALFORMED, Verdict::Pass),
    }
    if flow.frag == Frag::Later {
        // SAFETY: values are written whole.
        match unsafe { FRAG4.get(frag_key(&flow)) } {
            Some(p) => {
                flow.sport = p.sport_be;
                flow.dport = p.dport_be;
            }
            None => return counted(STAT_PASS_FRAGMENT, Verdict::Pass),
        }
    }
    // A clear frontend-filter bit proves the packet is to no frontend: no hash lookup before
    // the reply path. Otherwise the flow is tried first, so an established flow costs one
    // lookup; the frontend is looked up only for new flows and entries that need re-validating.
    let verdict = if may_be_frontend(&flow) {
        match established(pkt, &flow) {
            Some(verdict) => verdict,
            None => to_frontend(pkt, &flow),
        }
    } else {
        reply(pkt, &flow)
    };
    if flow.frag == Frag::First && matches!(verdict, Verdict::Pass) {
        // Later fragments carry no ports: remember them under the untranslated identity. A
        // full table evicts the oldest datagram, whose later fragments then pass untranslated.
        let _ = FRAG4.insert(
            frag_key(&flow),
            FragPorts {
                sport_be: flow.sport,
                dport_be: flow.dport,
            },
            0,
        );
    }
    verdict
}

/// Whether some frontend may have the packet's destination address and port.
#[inline(always)]
fn may_be_frontend(flow: &Flow4) -> bool {
    let (word, bit) = filter_word_bit(filter_slot(flow.daddr, flow.dport, FRONTEND_FILTER_SIZE));
    FRONTEND_FILTER.get(word).is_some_and(|w| *w & bit != 0)
}

/// An established flow whose entry is still current: translated with one hash lookup (the
/// flow's) and array reads. `None` sends the packet down the full path, which re-validates or
/// re-selects.
#[inline(always)]
fn established<P: Packet>(pkt: &P, flow: &Flow4) -> Option<Verdict> {
    let entry = CT4.get_ptr_mut(conntrack::forward_key(flow))?;
    // SAFETY: pointer from a successful lookup; fields are copied out before `touch` writes.
    let (svc_id, revision, addr, port) = unsafe {
        (
            (*entry).svc_id,
            (*entry).revision,
            (*entry).nat_addr_be,
            (*entry).nat_port_be,
        )
    };
    // The entry was validated under this revision of its frontend. The controller changes the
    // revision whenever the frontend's backend set changes and zeroes it when the frontend
    // goes (revisions are never reused across frontends), so an equal non-zero revision means
    // the cached backend is still one of this frontend's.
    match SVC_REVISIONS.get(svc_id) {
        Some(r) if *r != 0 && *r == revision => {}
        _ => return None,
    }
    let now = conntrack::now_ns();
    // SAFETY: as above.
    if !conntrack::is_live(unsafe { &*entry }, flow, now) {
        return None;
    }
    conntrack::touch(entry, flow, now);
    count_service(svc_id, flow);
    let stat = if flow.frag == Frag::Later {
        STAT_FRAGMENT_TRANSLATED
    } else {
        STAT_FWD_ESTABLISHED
    };
    Some(translate(pkt, flow, addr, port, stat))
}

/// The full path: look up the frontend, then keep, re-validate or create the flow.
#[inline(always)]
fn to_frontend<P: Packet>(pkt: &P, flow: &Flow4) -> Verdict {
    let key = Frontend4Key {
        addr_be: flow.daddr,
        port_be: flow.dport,
        proto: flow.proto,
        scope: 0,
    };
    // SAFETY: the controller only replaces frontend values whole; a torn read can at worst
    // pick from the old or new backend count, both of which have their slots written.
    match unsafe { FRONTENDS4.get(key) } {
        Some(svc) => forward(pkt, flow, &key, svc),
        None => reply(pkt, flow),
    }
}

/// Counts a forward packet in its Service's counters; returns them for the new-flow count.
#[inline(always)]
fn count_service(svc_id: u32, flow: &Flow4) -> Option<*mut SvcStats> {
    let s = SVC_STATS.get_ptr_mut(svc_id)?;
    // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
    unsafe {
        (*s).packets += 1;
        (*s).bytes += flow.tot_len as u64;
    }
    Some(s)
}

#[inline(always)]
fn frag_key(flow: &Flow4) -> FragKey4 {
    FragKey4 {
        saddr_be: flow.saddr,
        daddr_be: flow.daddr,
        id_be: flow.ip_id,
        proto: flow.proto,
        _pad: 0,
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
    let svc_stats = count_service(svc.svc_id, flow);
    let now = conntrack::now_ns();
    let ct_key = conntrack::forward_key(flow);
    if let Some(entry) = CT4.get_ptr_mut(ct_key) {
        // SAFETY: pointer from a successful lookup.
        let e = unsafe { &mut *entry };
        if e.svc_id == svc.svc_id && conntrack::is_live(e, flow, now) && revalidate(e, svc) {
            conntrack::touch(entry, flow, now);
            let stat = if flow.frag == Frag::Later {
                STAT_FRAGMENT_TRANSLATED
            } else {
                STAT_FWD_ESTABLISHED
            };
            return translate(pkt, flow, e.nat_addr_be, e.nat_port_be, stat);
        }
    }
    if flow.frag == Frag::Later {
        // Its first fragment created no flow (it was rejected or dropped): nothing to follow.
        return counted(STAT_PASS_FRAGMENT, Verdict::Pass);
    }
    if svc.backend_count == 0 {
        return no_backend(pkt, flow, svc);
    }
    let Some((backend_id, backend)) = select(pkt, flow, svc, now) else {
        return counted(STAT_BAD_SLOT, Verdict::Pass);
    };
    if record_flow(flow, fe, svc, backend_id, backend, now).is_err() {
        return counted(STAT_CT_INSERT_FAILED, Verdict::Drop);
    }
    if let Some(s) = svc_stats {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { (*s).new_flows += 1 };
    }
    translate(pkt, flow, backend.addr_be, backend.port_be, STAT_FWD_NEW)
}

/// No usable backend: drop when endpoints exist elsewhere (policy), else reject so the client
/// fails at once.
#[inline(always)]
fn no_backend<P: Packet>(pkt: &P, flow: &Flow4, svc: &Service4) -> Verdict {
    if svc.flags & SVC_F_POLICY_DROP != 0 {
        return counted(STAT_DROP_POLICY, Verdict::Drop);
    }
    let built = if flow.proto == PROTO_TCP {
        reject::tcp_rst(pkt, flow)
    } else {
        reject::icmp_port_unreachable(pkt, flow)
    };
    match built {
        Ok(()) => counted(STAT_REJECT_NO_BACKEND, Verdict::Bounce),
        Err(_) => counted(STAT_REJECT_FAILED, Verdict::Drop),
    }
}

/// Picks the backend of a new flow: the client's affinity entry while fresh, else Maglev or a
/// random slot.
#[inline(always)]
fn select<'a, P: Packet>(
    pkt: &P,
    flow: &Flow4,
    svc: &Service4,
    now: u64,
) -> Option<(u32, &'a Backend4)> {
    let aff_key = AffinityKey4 {
        svc_id: svc.svc_id,
        client_addr_be: flow.saddr,
    };
    if svc.flags & SVC_F_AFFINITY != 0 {
        // SAFETY: values are written whole.
        if let Some(a) = unsafe { AFFINITY4.get(aff_key) } {
            let fresh = affinity_fresh(now, a.last_seen_ns, svc.affinity_timeout_s);
            // SAFETY: backend values are written whole by the controller.
            match unsafe { BACKENDS4.get(a.backend_id) } {
                Some(b) if fresh && b.svc_id == svc.svc_id && b.state == BACKEND_ACTIVE => {
                    remember(&aff_key, a.backend_id, now);
                    return Some((a.backend_id, b));
                }
                _ => {}
            }
        }
    }
    let (table_key, slot) = if svc.flags & SVC_F_MAGLEV != 0 {
        // SAFETY: a plain read of a global the loader sets before the program runs.
        let m = unsafe { core::ptr::read_volatile(&MAGLEV_TABLE_SIZE) };
        (true, maglev_index(flow_hash(flow), m))
    } else {
        // SAFETY: helper without arguments.
        (
            false,
            random_slot(unsafe { bpf_get_prandom_u32() }, svc.backend_count),
        )
    };
    let key = SlotKey {
        svc_id: svc.svc_id,
        slot,
    };
    // SAFETY: slot values are written whole by the controller.
    let slot_value = unsafe {
        if table_key {
            MAGLEV4.get(key)
        } else {
            SLOTS.get(key)
        }
    };
    let Some(backend_id) = slot_value.map(|s| s.backend_id) else {
        bad_slot(pkt, svc.svc_id, slot);
        return None;
    };
    // SAFETY: backend values are written whole by the controller.
    let Some(backend) = (unsafe { BACKENDS4.get(backend_id) }) else {
        bad_slot(pkt, svc.svc_id, slot);
        return None;
    };
    if svc.flags & SVC_F_AFFINITY != 0 {
        remember(&aff_key, backend_id, now);
    }
    Some((backend_id, backend))
}

#[inline(always)]
pub(crate) fn remember(key: &AffinityKey4, backend_id: u32, now: u64) {
    // LRU: a full table forgets the least recent client, which then gets a new backend.
    let _ = AFFINITY4.insert(
        key,
        AffinityEntry {
            backend_id,
            _pad: 0,
            last_seen_ns: now,
        },
        0,
    );
}

/// The flow's 5-tuple hashed for Maglev (shared with `svcproxy explain`).
#[inline(always)]
fn flow_hash(flow: &Flow4) -> u32 {
    maglev_flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
}

/// A slot within the backend count names no backend: the controller's write order rules this
/// out, so it is logged (rare by construction) as well as counted.
#[inline(never)]
fn bad_slot<P: Packet>(pkt: &P, svc_id: u32, slot: u32) {
    error!(pkt, "service {} slot {} names no backend", svc_id, slot);
}

/// Checks a cached backend against the current Service. Only when the Service's backend set
/// changed since the entry was validated does this cost a lookup.
#[inline(always)]
fn revalidate(e: &mut CtEntry4, svc: &Service4) -> bool {
    if e.revision == svc.revision {
        return true;
    }
    // SAFETY: backend values are written whole by the controller.
    match unsafe { BACKENDS4.get(e.backend_id) } {
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
    let (word, bit) = filter_word_bit(reply_filter_slot(flow.saddr, flow.sport));
    match REPLY_FILTER.get(word) {
        Some(w) if *w & bit != 0 => {}
        _ => return counted(STAT_PASS_NO_SERVICE, Verdict::Pass),
    }
    let Some(entry) = CT4.get_ptr_mut(conntrack::reply_key(flow)) else {
        let stat = if flow.frag == Frag::Later {
            STAT_PASS_FRAGMENT
        } else {
            STAT_PASS_NO_SERVICE
        };
        return counted(stat, Verdict::Pass);
    };
    // SAFETY: pointer from a successful lookup.
    let (addr, port) = unsafe { ((*entry).nat_addr_be, (*entry).nat_port_be) };
    let now = conntrack::now_ns();
    conntrack::touch(entry, flow, now);
    if flow.proto == PROTO_TCP && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        // The backend closed the flow: its forward entry (which decides whether a new SYN on
        // this tuple is a new flow) must know too.
        let fwd = conntrack::forward_key_of(flow.daddr, addr, flow.dport, port, flow.proto);
        if let Some(f) = CT4.get_ptr_mut(fwd) {
            conntrack::touch(f, flow, now);
        }
    }
    let stat = if flow.frag == Frag::Later {
        STAT_FRAGMENT_TRANSLATED
    } else {
        STAT_REPLY
    };
    match nat::snat(pkt, flow, addr, port) {
        Ok(()) => counted(stat, Verdict::Pass),
        Err(_) => counted(STAT_REWRITE_FAILED, Verdict::Drop),
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
