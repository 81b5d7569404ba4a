//! Socket-level load balancing: cgroup `sock_addr` hooks that translate a frontend to a backend
//! when a socket connects (TCP, connected UDP) or sends a datagram to an address (unconnected
//! UDP), and answer `getpeername()`/`recvmsg()` with the frontend again. No packet is rewritten:
//! the socket talks to the backend directly, so the per-packet path sees a flow to a backend
//! address and passes it (its replies are no conntrack entry's either).
//!
//! The hooks run for every `connect()` of every process in the cgroup (the whole node when
//! attached at the root), so they touch nothing whose destination is not a known frontend, and
//! they never refuse a syscall except to say a Service has no backend (what the per-packet path
//! says with a reset or an ICMP error).

use aya_ebpf::{
    btf_maps::LruHashMap,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use proxy_common::{
    backend::{BACKEND_ACTIVE, filter_slot, filter_word_bit},
    conntrack::AffinityKey4,
    select::{affinity_fresh, maglev_flow_hash, maglev_index, random_slot},
    service::{
        FRONTEND_FILTER_SIZE, Frontend4Key, SVC_F_AFFINITY, SVC_F_MAGLEV, SVC_F_POLICY_DROP,
        Service4, SlotKey,
    },
    sock::{SOCK_LB_ALL, SOCK_LB_TCP, SockRevEntry4, SockRevKey4},
};

use crate::{
    lb::remember,
    maps::{AFFINITY4, BACKENDS4, FRONTEND_FILTER, FRONTENDS4, MAGLEV_TABLE_SIZE, MAGLEV4, SLOTS},
};

/// Socket cookie and backend -> the frontend asked for (see `proxy_common::sock`).
#[btf_map]
pub static SOCK_REVNAT4: LruHashMap<SockRevKey4, SockRevEntry4, 65_536> = LruHashMap::new();

/// `proxy_common::sock::SOCK_LB_*`, set by the controller at load time.
#[unsafe(no_mangle)]
pub static SOCK_LB_MODE: u32 = SOCK_LB_TCP;

/// The node's network namespace cookie, set by the controller at load time.
#[unsafe(no_mangle)]
pub static NODE_NETNS_COOKIE: u64 = 0;

const PROTO_TCP: u32 = 6;
const PROTO_UDP: u32 = 17;
const ECONNREFUSED: i32 = 111;

/// Let the syscall go on (translated or not).
const ALLOW: i32 = 1;
/// Fail the syscall, with the error set by `bpf_set_retval`.
const REFUSE: i32 = 0;

/// `connect()` of TCP sockets and (with `--socket-lb all`) UDP sockets.
#[cgroup_sock_addr(connect4)]
pub fn svcproxy_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx)
}

/// `sendto()`/`sendmsg()` with an address on unconnected UDP sockets: each datagram picks its
/// backend anew, so one to a removed backend is never sent.
#[cgroup_sock_addr(sendmsg4)]
pub fn svcproxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx)
}

/// Datagrams from a backend read as from the frontend the socket sent to.
#[cgroup_sock_addr(recvmsg4)]
pub fn svcproxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    // The kernel insists: these hooks cannot fail the syscall.
    ALLOW
}

/// A translated socket's peer reads as the frontend it connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn svcproxy_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

#[inline(always)]
fn mode() -> u32 {
    // SAFETY: a plain read of a global the loader sets before the program runs.
    unsafe { core::ptr::read_volatile(&SOCK_LB_MODE) }
}

#[inline(always)]
fn forward(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid context; these fields are readable in every sock_addr
    // hook.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol;
    let wanted = proto == PROTO_TCP || (proto == PROTO_UDP && mode() == SOCK_LB_ALL);
    if !wanted {
        return ALLOW;
    }
    let addr = sa.user_ip4;
    // The port sits in the low two bytes of the field, in network order.
    let port = sa.user_port as u16;
    let (word, bit) = filter_word_bit(filter_slot(addr, port, FRONTEND_FILTER_SIZE));
    if !FRONTEND_FILTER.get(word).is_some_and(|w| *w & bit != 0) {
        return ALLOW;
    }
    let key = Frontend4Key {
        addr_be: addr,
        port_be: port,
        proto: proto as u8,
        scope: 0,
    };
    // SAFETY: the controller only replaces frontend values whole.
    let Some(svc) = (unsafe { FRONTENDS4.get(key) }) else {
        return ALLOW;
    };
    // SAFETY: helpers on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let node_netns = unsafe {
        bpf_get_netns_cookie(ctx.sock_addr.cast()) == core::ptr::read_volatile(&NODE_NETNS_COOKIE)
    };
    if svc.flags & SVC_F_AFFINITY != 0 && !node_netns {
        // Affinity is per client address; a pod's is only known per packet.
        return ALLOW;
    }
    if svc.backend_count == 0 {
        if svc.flags & SVC_F_POLICY_DROP != 0 {
            // Untranslated, the traffic goes where the per-packet path drops it (or nowhere).
            return ALLOW;
        }
        // SAFETY: helper with a plain integer.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    }
    let Some((backend_addr, backend_port)) = select(svc, cookie, &key) else {
        // A slot naming no backend (ruled out by the controller's write order): untranslated.
        return ALLOW;
    };
    let rev_key = SockRevKey4 {
        cookie,
        backend_addr_be: backend_addr,
        backend_port_be: backend_port,
        _pad: 0,
    };
    let rev = SockRevEntry4 {
        frontend_addr_be: addr,
        frontend_port_be: port,
        _pad: 0,
        svc_id: svc.svc_id,
    };
    // Only unchanged entries are skipped: a socket sending many datagrams writes once.
    // SAFETY: values are written whole.
    let known = unsafe { SOCK_REVNAT4.get(rev_key) }.is_some_and(|e| *e == rev);
    if !known && SOCK_REVNAT4.insert(rev_key, rev, 0).is_err() {
        // Without the reverse entry the application would see the backend as its peer; better
        // untranslated than inconsistent.
        return ALLOW;
    }
    sa.user_ip4 = backend_addr;
    sa.user_port = backend_port as u32;
    ALLOW
}

/// Picks a backend with the per-packet path's rules (`lb::select`): the affinity entry while
/// fresh (only the node's own sockets get here, all one client: address 0), else the Maglev
/// table or a random slot. A socket has no source port yet at `connect()`, so Maglev hashes the
/// socket cookie in its place: one socket, one backend.
#[inline(always)]
fn select(svc: &Service4, cookie: u64, fe: &Frontend4Key) -> Option<(u32, u16)> {
    let aff_key = AffinityKey4 {
        svc_id: svc.svc_id,
        client_addr_be: 0,
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if svc.flags & SVC_F_AFFINITY != 0 {
        // SAFETY: values are written whole.
        if let Some(a) = unsafe { AFFINITY4.get(aff_key) } {
            let fresh = affinity_fresh(now, a.last_seen_ns, svc.affinity_timeout_s);
            // SAFETY: backend values are written whole by the controller.
            match unsafe { BACKENDS4.get(a.backend_id) } {
                Some(b) if fresh && b.svc_id == svc.svc_id && b.state == BACKEND_ACTIVE => {
                    let (addr, port) = (b.addr_be, b.port_be);
                    remember(&aff_key, a.backend_id, now);
                    return Some((addr, port));
                }
                _ => {}
            }
        }
    }
    let key = if svc.flags & SVC_F_MAGLEV != 0 {
        // SAFETY: a plain read of a global the loader sets before the program runs.
        let m = unsafe { core::ptr::read_volatile(&MAGLEV_TABLE_SIZE) };
        let h = maglev_flow_hash(
            cookie as u32,
            fe.addr_be,
            (cookie >> 32) as u16,
            fe.port_be,
            fe.proto,
        );
        SlotKey {
            svc_id: svc.svc_id,
            slot: maglev_index(h, m),
        }
    } else {
        SlotKey {
            svc_id: svc.svc_id,
            // SAFETY: helper without arguments.
            slot: random_slot(unsafe { bpf_get_prandom_u32() }, svc.backend_count),
        }
    };
    // SAFETY: slot and backend values are written whole by the controller.
    let slot = unsafe {
        if svc.flags & SVC_F_MAGLEV != 0 {
            MAGLEV4.get(key)
        } else {
            SLOTS.get(key)
        }
    }?;
    let backend_id = slot.backend_id;
    // SAFETY: as above.
    let b = unsafe { BACKENDS4.get(backend_id) }?;
    let (addr, port) = (b.addr_be, b.port_be);
    if svc.flags & SVC_F_AFFINITY != 0 {
        remember(&aff_key, backend_id, now);
    }
    Some((addr, port))
}

/// The peer or a datagram's sender is a backend this socket was translated to: say the frontend.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = SockRevKey4 {
        // SAFETY: helper on our own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        backend_addr_be: sa.user_ip4,
        backend_port_be: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: values are written whole.
    if let Some(e) = unsafe { SOCK_REVNAT4.get(key) } {
        sa.user_ip4 = e.frontend_addr_be;
        sa.user_port = e.frontend_port_be as u32;
    }
}
