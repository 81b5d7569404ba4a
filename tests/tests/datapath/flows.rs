//! Behaviour over time and map changes, which the fixture table cannot express: Service
//! changes under live flows, aged conntrack and affinity entries, and Maglev's stability. Each
//! runs on both hooks.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use proxy_common::stats::*;
use svcproxy::{
    desired::{Backend, Protocol},
    loader::Hook,
};

use crate::{
    cases::{B1, B2, B3, CLIENT, VIP, VIP_A, a},
    harness::{Harness, Svc, Verdict, be, fe, monotonic_ns, svc},
    packet::{ACK, FIN, Ip, TCP, UDP, ip},
};

const SEC: u64 = 1_000_000_000;

/// The destination address of an output frame without IP options.
fn dst_of(frame: &[u8]) -> [u8; 4] {
    frame[30..34]
        .try_into()
        .expect("frame too short for an IPv4 header")
}

fn tcp3() -> Svc {
    svc(
        fe(VIP, 80, Protocol::Tcp),
        vec![be(B1, 8080), be(B2, 8080), be(B3, 8080)],
    )
}

/// Runs `p` expecting it forwarded to some backend, counted as `stat`; returns the backend.
fn forwarded(h: &mut Harness, hook: Hook, p: &Ip, stat: u32, ctx: &str) -> [u8; 4] {
    let (verdict, out) = h.run_counted(hook, &p.frame(), stat, ctx);
    assert_eq!(verdict, Verdict::Pass, "{ctx}: verdict");
    crate::packet::checksums_valid(&out).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    dst_of(&out)
}

/// Sets `last_seen_ns` of every conntrack entry to `age_ns` before now.
fn age_conntrack(h: &mut Harness, age_ns: u64) {
    let then = monotonic_ns().wrapping_sub(age_ns);
    for (k, mut e) in h.ct_entries() {
        e.last_seen_ns = then;
        h.ct_put(&k, &e);
    }
}

/// Sets `last_seen_ns` of every affinity entry to `age_ns` before now.
fn age_affinity(h: &mut Harness, age_ns: u64) {
    let then = monotonic_ns().wrapping_sub(age_ns);
    let entries = h.affinity_entries();
    assert!(
        !entries.is_empty(),
        "no affinity entry to age: the frontend has no affinity"
    );
    for (k, mut e) in entries {
        e.last_seen_ns = then;
        h.affinity_put(&k, &e);
    }
}

macro_rules! both_hooks {
    ($f:ident: $tc:ident, $xdp:ident) => {
        #[test]
        fn $tc() {
            $f(Hook::Tc);
        }

        #[test]
        fn $xdp() {
            $f(Hook::Xdp);
        }
    };
}

/// With three backends, every packet of one flow goes where its first packet went, and the
/// flow's two conntrack entries exist.
fn established_flow_is_sticky(hook: Hook) {
    let mut h = Harness::for_hook("sticky", hook);
    h.set(&[tcp3()]);
    let syn = ip((CLIENT, 42000), (VIP_A, 80), TCP);
    let chosen = forwarded(&mut h, hook, &syn, STAT_FWD_NEW, "first packet");
    assert!(
        [B1, B2, B3].contains(&chosen),
        "first packet went to {chosen:?}"
    );
    for i in 0..20 {
        let got = forwarded(
            &mut h,
            hook,
            &syn.clone().flags(ACK),
            STAT_FWD_ESTABLISHED,
            "ack",
        );
        assert_eq!(
            got, chosen,
            "packet {i} of an established flow changed backend"
        );
    }
    assert_eq!(h.ct_len(), 2, "a flow has a forward and a reply entry");
}
both_hooks!(
    established_flow_is_sticky:
    established_flow_is_sticky_tc,
    established_flow_is_sticky_xdp
);

/// New flows spread over all backends.
fn new_flows_spread_over_backends(hook: Hook) {
    let mut h = Harness::for_hook("spread", hook);
    h.set(&[tcp3()]);
    let mut hits: HashMap<[u8; 4], u32> = HashMap::new();
    for port in 0..300u16 {
        let syn = ip((CLIENT, 20000 + port), (VIP_A, 80), TCP);
        *hits
            .entry(forwarded(&mut h, hook, &syn, STAT_FWD_NEW, "new flow"))
            .or_default() += 1;
    }
    assert_eq!(hits.len(), 3, "all backends chosen: {hits:?}");
    assert!(
        hits.values().all(|n| *n >= 45),
        "each backend gets >= 15%: {hits:?}"
    );
}
both_hooks!(
    new_flows_spread_over_backends:
    new_flows_spread_over_backends_tc,
    new_flows_spread_over_backends_xdp
);

/// Adding backends changes where new flows go, never where live TCP and UDP flows go.
fn flow_keeps_its_backend_when_backends_are_added(hook: Hook) {
    let mut h = Harness::for_hook("added", hook);
    let tcp = |b: Vec<Backend>| svc(fe(VIP, 80, Protocol::Tcp), b);
    let udp = |b: Vec<Backend>| svc(fe(VIP, 53, Protocol::Udp), b);
    h.set(&[tcp(vec![be(B1, 8080)]), udp(vec![be(B1, 5353)])]);
    let syn = ip((CLIENT, 41000), (VIP_A, 80), TCP);
    let query = ip((CLIENT, 41001), (VIP_A, 53), UDP).payload(b"q");
    assert_eq!(forwarded(&mut h, hook, &syn, STAT_FWD_NEW, "tcp flow"), B1);
    assert_eq!(
        forwarded(&mut h, hook, &query, STAT_FWD_NEW, "udp flow"),
        B1
    );

    let all = |port| vec![be(B1, port), be(B2, port), be(B3, port)];
    h.apply(&[tcp(all(8080)), udp(all(5353))]);
    for i in 0..20 {
        let ack = syn.clone().flags(ACK);
        let got = forwarded(
            &mut h,
            hook,
            &ack,
            STAT_FWD_ESTABLISHED,
            "tcp after the change",
        );
        assert_eq!(
            got, B1,
            "tcp packet {i} left its backend after backends were added"
        );
        let got = forwarded(
            &mut h,
            hook,
            &query,
            STAT_FWD_ESTABLISHED,
            "udp after the change",
        );
        assert_eq!(
            got, B1,
            "udp datagram {i} left its backend after backends were added"
        );
    }
    let reply = ip((a(B1), 8080), (CLIENT, 41000), TCP).flags(ACK);
    let (_, out) = h.run_counted(hook, &reply.frame(), STAT_REPLY, "reply after the change");
    assert_eq!(
        out[26..30],
        VIP,
        "the reply of a live flow must still come from the frontend"
    );

    let new: HashSet<[u8; 4]> = (0..60)
        .map(|i| {
            let s = ip((CLIENT, 30000 + i), (VIP_A, 80), TCP);
            forwarded(&mut h, hook, &s, STAT_FWD_NEW, "new flow after the change")
        })
        .collect();
    assert!(
        new.len() > 1,
        "new flows must reach the added backends too, went only to {new:?}"
    );
}
both_hooks!(
    flow_keeps_its_backend_when_backends_are_added:
    flow_keeps_its_backend_when_backends_are_added_tc,
    flow_keeps_its_backend_when_backends_are_added_xdp
);

/// A flow pinned to a removed backend moves to a live one on its next packet (as a new flow),
/// TCP and UDP alike; flows on the remaining backend stay.
fn flow_moves_when_its_backend_is_removed(hook: Hook) {
    let mut h = Harness::for_hook("removed", hook);
    let tcp = |b: Vec<Backend>| svc(fe(VIP, 80, Protocol::Tcp), b);
    let udp = |b: Vec<Backend>| svc(fe(VIP, 53, Protocol::Udp), b);
    h.set(&[
        tcp(vec![be(B1, 8080), be(B2, 8080)]),
        udp(vec![be(B1, 5353), be(B2, 5353)]),
    ]);

    // One flow of each protocol on each backend.
    let mut flows: HashMap<(u8, [u8; 4]), Ip> = HashMap::new();
    for port in 43000..43400 {
        let syn = ip((CLIENT, port), (VIP_A, 80), TCP);
        let query = ip((CLIENT, port), (VIP_A, 53), UDP).payload(b"q");
        for p in [syn, query] {
            let b = forwarded(&mut h, hook, &p, STAT_FWD_NEW, "initial flow");
            flows.entry((p.proto, b)).or_insert(p);
        }
        if flows.len() == 4 {
            break;
        }
    }
    assert_eq!(
        flows.len(),
        4,
        "400 flows of each protocol never reached both backends"
    );

    h.apply(&[tcp(vec![be(B2, 8080)]), udp(vec![be(B2, 5353)])]);
    for proto in [TCP, UDP] {
        let stays = flows[&(proto, B2)]
            .clone()
            .flags(if proto == TCP { ACK } else { 0 });
        let got = forwarded(
            &mut h,
            hook,
            &stays,
            STAT_FWD_ESTABLISHED,
            "flow on the kept backend",
        );
        assert_eq!(
            got, B2,
            "proto {proto}: a flow on the remaining backend moved"
        );

        let moved = flows[&(proto, B1)]
            .clone()
            .flags(if proto == TCP { ACK } else { 0 });
        let got = forwarded(
            &mut h,
            hook,
            &moved,
            STAT_FWD_NEW,
            "flow of the removed backend",
        );
        assert_eq!(
            got, B2,
            "proto {proto}: a flow of the removed backend must move to B2"
        );
        let got = forwarded(
            &mut h,
            hook,
            &moved,
            STAT_FWD_ESTABLISHED,
            "moved flow, next packet",
        );
        assert_eq!(
            got, B2,
            "proto {proto}: the moved flow must stay on its new backend"
        );

        let port = if proto == TCP { 8080 } else { 5353 };
        let reply = ip((a(B2), port), (CLIENT, moved.sport), proto).flags(if proto == TCP {
            ACK
        } else {
            0
        });
        let (_, out) = h.run_counted(
            hook,
            &reply.frame(),
            STAT_REPLY,
            "reply from the new backend",
        );
        assert_eq!(
            out[26..30],
            VIP,
            "proto {proto}: the new backend's reply must come from the frontend"
        );
    }
}
both_hooks!(
    flow_moves_when_its_backend_is_removed:
    flow_moves_when_its_backend_is_removed_tc,
    flow_moves_when_its_backend_is_removed_xdp
);

/// A removed frontend's established flows are no longer translated, also on the short path
/// that never looks the frontend up: a UDP frontend on the same address and port keeps the
/// frontend filter's bit set, so only the service id's zeroed revision stops the TCP flow. When
/// the frontend comes back (with its service id reused), the flow gets one of its backends.
fn removed_frontend_stops_its_established_flows(hook: Hook) {
    let mut h = Harness::for_hook("fegone", hook);
    let tcp = |b: Vec<Backend>| svc(fe(VIP, 80, Protocol::Tcp), b);
    let udp = svc(fe(VIP, 80, Protocol::Udp), vec![be(B3, 8080)]);
    h.set(&[tcp(vec![be(B1, 8080)]), udp.clone()]);
    let syn = ip((CLIENT, 44000), (VIP_A, 80), TCP);
    let ack = syn.clone().flags(ACK);
    assert_eq!(forwarded(&mut h, hook, &syn, STAT_FWD_NEW, "first SYN"), B1);
    assert_eq!(
        forwarded(&mut h, hook, &ack, STAT_FWD_ESTABLISHED, "first ACK"),
        B1
    );

    h.apply(std::slice::from_ref(&udp));
    let (verdict, out) = h.run_counted(
        hook,
        &ack.frame(),
        STAT_PASS_NO_SERVICE,
        "ACK after the frontend was removed",
    );
    assert_eq!(verdict, Verdict::Pass);
    assert_eq!(
        dst_of(&out),
        VIP,
        "a removed frontend's flow must pass untranslated"
    );

    h.apply(&[tcp(vec![be(B2, 8080)]), udp]);
    assert_eq!(
        forwarded(
            &mut h,
            hook,
            &ack,
            STAT_FWD_NEW,
            "ACK after the frontend came back"
        ),
        B2,
        "the flow must be given a backend of the frontend as it is now"
    );
    assert_eq!(
        forwarded(&mut h, hook, &ack, STAT_FWD_ESTABLISHED, "next ACK"),
        B2
    );
}
both_hooks!(
    removed_frontend_stops_its_established_flows: removed_frontend_stops_its_established_flows_tc,
    removed_frontend_stops_its_established_flows_xdp
);

/// A UDP flow idle for less than its 60 s timeout continues; idle for longer, its next
/// datagram is a new flow.
fn aged_udp_flow_is_reselected(hook: Hook) {
    let mut h = Harness::for_hook("aged-udp", hook);
    h.set(&[svc(fe(VIP, 53, Protocol::Udp), vec![be(B1, 5353)])]);
    let query = ip((CLIENT, 44000), (VIP_A, 53), UDP).payload(b"q");
    forwarded(&mut h, hook, &query, STAT_FWD_NEW, "first datagram");
    age_conntrack(&mut h, 59 * SEC);
    forwarded(
        &mut h,
        hook,
        &query,
        STAT_FWD_ESTABLISHED,
        "datagram after 59 s idle",
    );
    age_conntrack(&mut h, 61 * SEC);
    forwarded(
        &mut h,
        hook,
        &query,
        STAT_FWD_NEW,
        "datagram after 61 s idle",
    );
    forwarded(
        &mut h,
        hook,
        &query,
        STAT_FWD_ESTABLISHED,
        "datagram of the new flow",
    );
}
both_hooks!(
    aged_udp_flow_is_reselected:
    aged_udp_flow_is_reselected_tc,
    aged_udp_flow_is_reselected_xdp
);

/// TCP idle timeouts follow the flow's state: 60 s with only a SYN seen, 6 h established,
/// 10 s once a FIN or RST was seen.
fn tcp_idle_timeout_follows_the_flow_state(hook: Hook) {
    let mut h = Harness::for_hook("aged-tcp", hook);
    h.set(&[svc(fe(VIP, 80, Protocol::Tcp), vec![be(B1, 8080)])]);

    let syn = ip((CLIENT, 45000), (VIP_A, 80), TCP);
    forwarded(&mut h, hook, &syn, STAT_FWD_NEW, "syn");
    age_conntrack(&mut h, 61 * SEC);
    forwarded(
        &mut h,
        hook,
        &syn,
        STAT_FWD_NEW,
        "syn retransmitted after 61 s (SYN-only timeout)",
    );

    let est = ip((CLIENT, 45001), (VIP_A, 80), TCP);
    forwarded(&mut h, hook, &est, STAT_FWD_NEW, "syn");
    forwarded(
        &mut h,
        hook,
        &est.clone().flags(ACK),
        STAT_FWD_ESTABLISHED,
        "ack",
    );
    age_conntrack(&mut h, 3600 * SEC);
    let ack = est.clone().flags(ACK);
    forwarded(
        &mut h,
        hook,
        &ack,
        STAT_FWD_ESTABLISHED,
        "established flow after 1 h idle",
    );

    let fin = ip((CLIENT, 45002), (VIP_A, 80), TCP);
    forwarded(&mut h, hook, &fin, STAT_FWD_NEW, "syn");
    forwarded(
        &mut h,
        hook,
        &fin.clone().flags(ACK),
        STAT_FWD_ESTABLISHED,
        "ack",
    );
    forwarded(
        &mut h,
        hook,
        &fin.clone().flags(FIN | ACK),
        STAT_FWD_ESTABLISHED,
        "fin",
    );
    age_conntrack(&mut h, 9 * SEC);
    let ack = fin.clone().flags(ACK);
    forwarded(
        &mut h,
        hook,
        &ack,
        STAT_FWD_ESTABLISHED,
        "last ack 9 s after the fin",
    );
    age_conntrack(&mut h, 11 * SEC);
    forwarded(
        &mut h,
        hook,
        &ack,
        STAT_FWD_NEW,
        "ack 11 s after the fin (closing timeout)",
    );
}
both_hooks!(
    tcp_idle_timeout_follows_the_flow_state:
    tcp_idle_timeout_follows_the_flow_state_tc,
    tcp_idle_timeout_follows_the_flow_state_xdp
);

/// With `sessionAffinity: ClientIP`, every new flow of a client goes to its first flow's
/// backend while the affinity is fresh; other clients are balanced on their own.
fn affinity_keeps_a_client_on_its_backend(hook: Hook) {
    let mut h = Harness::for_hook("affinity", hook);
    h.set(&[tcp3().affinity(10_800)]);
    let first = forwarded(
        &mut h,
        hook,
        &ip((CLIENT, 46000), (VIP_A, 80), TCP),
        STAT_FWD_NEW,
        "first flow",
    );
    for i in 1..40 {
        let s = ip((CLIENT, 46000 + i), (VIP_A, 80), TCP);
        let got = forwarded(
            &mut h,
            hook,
            &s,
            STAT_FWD_NEW,
            "new flow of the same client",
        );
        assert_eq!(
            got, first,
            "flow {i} of the client left its affinity backend"
        );
    }
    let others: HashSet<[u8; 4]> = (0..40)
        .map(|i| {
            let s = ip(
                (Ipv4Addr::new(10, 244, 3, i as u8 + 1), 46000),
                (VIP_A, 80),
                TCP,
            );
            forwarded(&mut h, hook, &s, STAT_FWD_NEW, "flow of another client")
        })
        .collect();
    assert!(
        others.len() > 1,
        "40 different clients all went to {others:?}: affinity is per client"
    );
}
both_hooks!(
    affinity_keeps_a_client_on_its_backend:
    affinity_keeps_a_client_on_its_backend_tc,
    affinity_keeps_a_client_on_its_backend_xdp
);

/// An affinity entry idle for longer than the timeout no longer binds the client: new flows
/// are balanced again (over 30 expiries, more than one backend is chosen).
fn affinity_expires_after_its_timeout(hook: Hook) {
    let mut h = Harness::for_hook("affinity-timeout", hook);
    h.set(&[tcp3().affinity(10)]);
    let mut port = 47000;
    let mut new_flow = |h: &mut Harness, ctx: &str| {
        port += 1;
        forwarded(
            h,
            hook,
            &ip((CLIENT, port), (VIP_A, 80), TCP),
            STAT_FWD_NEW,
            ctx,
        )
    };
    let first = new_flow(&mut h, "first flow");
    age_affinity(&mut h, 9 * SEC);
    assert_eq!(
        new_flow(&mut h, "flow 9 s later"),
        first,
        "affinity lost within its 10 s timeout"
    );

    let mut chosen = HashSet::new();
    for _ in 0..30 {
        age_affinity(&mut h, 11 * SEC);
        let b = new_flow(&mut h, "flow after the timeout");
        // Within the timeout again, the new choice binds.
        assert_eq!(
            new_flow(&mut h, "flow right after"),
            b,
            "the re-chosen backend must bind"
        );
        chosen.insert(b);
    }
    assert!(
        chosen.len() > 1,
        "after 30 expiries the client always got {chosen:?}: not re-balanced"
    );
}
both_hooks!(
    affinity_expires_after_its_timeout:
    affinity_expires_after_its_timeout_tc,
    affinity_expires_after_its_timeout_xdp
);

const MAGLEV_FLOWS: u32 = 10_000;

/// `MAGLEV_FLOWS` distinct synthetic UDP flows (client address and port vary).
fn maglev_flow(i: u32) -> Ip {
    let client = Ipv4Addr::new(10, 245, (i / 250) as u8, (i % 250) as u8 + 1);
    ip(
        (client, 10_000 + (i * 7919 % 50_000) as u16),
        (VIP_A, 53),
        UDP,
    )
    .payload(b"q")
}

fn maglev_svc(backends: &[[u8; 4]]) -> Svc {
    svc(
        fe(VIP, 53, Protocol::Udp),
        backends.iter().map(|b| be(*b, 5353)).collect(),
    )
    .maglev()
}

/// Sends every synthetic flow with no conntrack state and returns each one's backend.
fn maglev_pass(h: &mut Harness, hook: Hook, backends: &[[u8; 4]]) -> Vec<[u8; 4]> {
    h.apply(&[maglev_svc(backends)]);
    h.forget_flows();
    (0..MAGLEV_FLOWS)
        .map(|i| {
            let (verdict, out) = h.run(hook, &maglev_flow(i).frame());
            assert_eq!(verdict, Verdict::Pass, "maglev flow {i}: verdict");
            let b = dst_of(&out);
            assert!(
                backends.contains(&b),
                "maglev flow {i} went to {b:?}, not a backend"
            );
            b
        })
        .collect()
}

/// Maglev: the same flow gets the same backend without conntrack; adding an 11th backend to
/// 10 moves at most 20% of flows; removing one moves all of its flows and few others. Maglev
/// is not perfectly stable on removal (it trades that for equal shares): with the default
/// table of 16381 entries about 0.5% of other flows move, with a 251-entry table about 6%, so
/// this runs at the default size and allows 1%. Established flows never move: conntrack keeps
/// them (see `flow_keeps_its_backend_when_backends_are_added`).
fn maglev_moves_few_flows_when_backends_change(hook: Hook) {
    let mut h = Harness::with_maglev_table(
        &format!("maglev-{hook:?}").to_lowercase(),
        proxy_common::service::DEFAULT_MAGLEV_TABLE_SIZE,
    );
    let ten: Vec<[u8; 4]> = (1..=10).map(|i| [10, 244, 2, i]).collect();
    let before = maglev_pass(&mut h, hook, &ten);

    let mut per_backend: HashMap<[u8; 4], u32> = HashMap::new();
    for b in &before {
        *per_backend.entry(*b).or_default() += 1;
    }
    assert_eq!(
        per_backend.len(),
        10,
        "every backend must own flows: {per_backend:?}"
    );
    assert!(
        per_backend.values().all(|n| *n >= MAGLEV_FLOWS / 20),
        "each of 10 backends must get >= 5% of flows: {per_backend:?}"
    );
    let again = maglev_pass(&mut h, hook, &ten);
    let differ = before.iter().zip(&again).filter(|(x, y)| x != y).count();
    assert_eq!(
        differ, 0,
        "{differ} flows changed backend with the same backends (not consistent hashing)"
    );

    let mut eleven = ten.clone();
    eleven.push([10, 244, 2, 11]);
    let added = maglev_pass(&mut h, hook, &eleven);
    let moved = before.iter().zip(&added).filter(|(x, y)| x != y).count();
    println!("maglev ({hook:?}): adding 1 backend to 10 moved {moved} of {MAGLEV_FLOWS} flows");
    assert!(
        moved as u32 <= MAGLEV_FLOWS / 5,
        "adding 1 backend to 10 moved {moved} of {MAGLEV_FLOWS} flows (> 20%)"
    );

    let gone = ten[3];
    let nine: Vec<[u8; 4]> = ten.iter().copied().filter(|b| *b != gone).collect();
    let removed = maglev_pass(&mut h, hook, &nine);
    let (mut of_gone, mut others, mut others_moved) = (0, 0, 0);
    for (x, y) in before.iter().zip(&removed) {
        if *x == gone {
            of_gone += 1;
            assert_ne!(*y, gone, "a flow still went to the removed backend");
        } else {
            others += 1;
            others_moved += (x != y) as u32;
        }
    }
    let share = others_moved as f64 * 100.0 / others as f64;
    println!(
        "maglev ({hook:?}): removing 1 of 10 backends moved its {of_gone} flows and {others_moved} \
         of {others} others ({share:.2}%)"
    );
    assert!(
        others_moved * 100 <= others,
        "removing 1 of 10 backends moved {others_moved} of {others} flows of other backends \
         ({share:.2}% > 1%)"
    );
}
both_hooks!(
    maglev_moves_few_flows_when_backends_change:
    maglev_moves_few_flows_when_backends_change_tc,
    maglev_moves_few_flows_when_backends_change_xdp
);

#[test]
fn synthetic_maglev_flows_are_distinct() {
    let set: HashSet<(Ipv4Addr, u16)> = (0..MAGLEV_FLOWS)
        .map(|i| {
            let f = maglev_flow(i);
            (f.src, f.sport)
        })
        .collect();
    assert_eq!(
        set.len(),
        MAGLEV_FLOWS as usize,
        "synthetic Maglev flows repeat a tuple"
    );
}
