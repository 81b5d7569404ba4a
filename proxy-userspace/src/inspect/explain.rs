//! `svcproxy explain`: what the datapath would do with a packet from SRC to DST, and why. It
//! walks the same checks in the same order as the datapath's `lb::forward` (conntrack, no
//! backend, affinity, Maglev or random slot) over the same map contents, with the same shared
//! functions ([`proxy_common::select`], [`ct_is_live`]), so its answer is the datapath's.

use std::net::{Ipv4Addr, SocketAddrV4};

use proxy_common::{
    backend::{BACKEND_ACTIVE, Backend4},
    conntrack::{
        AffinityKey4, CT_DIR_FORWARD, CT_F_CLOSING, CtKey4, PROTO_TCP, TCP_ACK, ct_is_live,
        ct_timeout_ns,
    },
    meta::{
        META_R_EXTERNAL_LOCAL_NOT_APPLIED, META_R_NODE_LOCAL, META_R_TERMINATING_FALLBACK,
        META_R_TOPOLOGY, META_R_TOPOLOGY_IGNORED,
    },
    select::{affinity_fresh, maglev_flow_hash, maglev_index},
    service::{Frontend4Key, SVC_F_AFFINITY, SVC_F_MAGLEV, SVC_F_POLICY_DROP, Service4, SlotKey},
};
use serde::Serialize;

use super::{
    InspectError, MapView, addr_be,
    args::{Destination, Source},
    ip, proto_name, reason_names,
    services::{algorithm_name, state_name, weights},
};
use crate::svc_meta::{self, Decoded};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    pub source: String,
    pub destination: String,
    pub frontend: Option<FrontendInfo>,
    /// `forward`, `reject`, `drop` or `pass` (not a Service, or a broken slot).
    pub verdict: &'static str,
    /// The check that decided: `no_frontend`, `conntrack`, `no_backend`, `affinity`,
    /// `maglev`, `random` or `bad_slot`.
    pub decided_by: &'static str,
    /// The backend the packet goes to, when that is determined.
    pub backend: Option<Choice>,
    /// The Maglev table index (0-based) the flow hashes to.
    pub maglev_index: Option<u32>,
    /// When the choice is left to chance (random), or to a source port not given (Maglev):
    /// the backends it falls among, with their shares.
    pub candidates: Vec<Choice>,
    /// The checks in the datapath's order, each with what it found.
    pub steps: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendInfo {
    pub service_id: u32,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub port_name: Option<String>,
    pub algorithm: &'static str,
    pub affinity_timeout_s: Option<u32>,
    pub active_backends: u16,
    pub reasons: Vec<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Choice {
    pub id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    pub state: String,
    pub weight: Option<f64>,
}

fn choice(id: u32, b: &Backend4, weight: Option<f64>) -> Choice {
    Choice {
        id,
        address: ip(b.addr_be),
        port: u16::from_be(b.port_be),
        state: state_name(b.state),
        weight,
    }
}

/// A decision in progress.
struct Walk {
    out: Explanation,
}

impl Walk {
    fn step(&mut self, text: String) {
        self.out.steps.push(text);
    }

    fn decide(mut self, verdict: &'static str, by: &'static str) -> Explanation {
        self.out.verdict = verdict;
        self.out.decided_by = by;
        self.out
    }
}

pub fn explain(
    maps: &impl MapView,
    src: Source,
    dst: Destination,
) -> Result<Explanation, InspectError> {
    let dst_text = format!("{}:{}/{}", dst.addr, dst.port, proto_name(dst.proto));
    let mut w = Walk {
        out: Explanation {
            source: src.to_string(),
            destination: dst_text.clone(),
            frontend: None,
            verdict: "",
            decided_by: "",
            backend: None,
            maglev_index: None,
            candidates: Vec::new(),
            steps: Vec::new(),
        },
    };
    let key = Frontend4Key {
        addr_be: addr_be(dst.addr),
        port_be: dst.port.to_be(),
        proto: dst.proto,
        scope: 0,
    };
    let Some(svc) = maps.frontend(&key)? else {
        w.step(format!(
            "{dst_text} is no frontend: the datapath passes the packet untouched (unless it is \
             a reply of a translated flow)"
        ));
        return Ok(w.decide("pass", "no_frontend"));
    };
    let meta = maps.meta(svc.svc_id)?.map(|m| svc_meta::decode(&m));
    w.out.frontend = Some(frontend_info(&svc, meta.as_ref()));
    w.step(format!(
        "{dst_text} is a frontend of {} (service id {}): {} active backend(s), {} selection{}",
        service_text(meta.as_ref()),
        svc.svc_id,
        svc.backend_count,
        algorithm_name(&svc),
        if svc.flags & SVC_F_AFFINITY != 0 {
            format!(", ClientIP affinity for {} s", svc.affinity_timeout_s)
        } else {
            String::new()
        }
    ));
    if let Some(m) = &meta {
        for why in reason_text(m) {
            w.step(why);
        }
    }
    let now = maps.now_ns();

    // 1. Conntrack: a known flow keeps its backend.
    match src.port {
        None => w.step(
            "no source port given: conntrack not consulted (each connection has its own \
             entry); this is what a new flow gets"
                .into(),
        ),
        Some(sport) => {
            if conntrack(maps, &mut w, &svc, src.addr, sport, dst, now)? {
                return Ok(w.decide("forward", "conntrack"));
            }
        }
    }

    // 2. No usable backend.
    if svc.backend_count == 0 {
        return Ok(if svc.flags & SVC_F_POLICY_DROP != 0 {
            w.step(
                "no backend takes traffic arriving here, though the Service has endpoints \
                 elsewhere: dropped, as kube-proxy does"
                    .into(),
            );
            w.decide("drop", "no_backend")
        } else {
            w.step(
                "the Service has no usable endpoint: rejected at once (TCP RST, or ICMP port \
                 unreachable), so the client sees \"connection refused\""
                    .into(),
            );
            w.decide("reject", "no_backend")
        });
    }

    // 3. Session affinity.
    if svc.flags & SVC_F_AFFINITY != 0 {
        let aff_key = AffinityKey4 {
            svc_id: svc.svc_id,
            client_addr_be: addr_be(src.addr),
        };
        match maps.affinity(&aff_key)? {
            None => w.step(format!(
                "no affinity entry for client {}: the backend chosen below is remembered",
                src.addr
            )),
            Some(a) => {
                let fresh = affinity_fresh(now, a.last_seen_ns, svc.affinity_timeout_s);
                let idle = now.saturating_sub(a.last_seen_ns) / 1_000_000_000;
                match maps.backend(a.backend_id)? {
                    Some(b) if fresh && b.svc_id == svc.svc_id && b.state == BACKEND_ACTIVE => {
                        w.step(format!(
                            "client {} has affinity to backend {} (last used {idle} s ago, \
                             timeout {} s): it gets that backend",
                            src.addr, a.backend_id, svc.affinity_timeout_s
                        ));
                        w.out.backend = Some(choice(a.backend_id, &b, None));
                        return Ok(w.decide("forward", "affinity"));
                    }
                    found => {
                        let why = if !fresh {
                            format!(
                                "expired ({idle} s idle, timeout {} s)",
                                svc.affinity_timeout_s
                            )
                        } else {
                            match found {
                                None => "its backend is gone".into(),
                                Some(b) if b.svc_id != svc.svc_id => {
                                    "its backend id now belongs to another Service".into()
                                }
                                Some(_) => "its backend is terminating".into(),
                            }
                        };
                        w.step(format!(
                            "client {}'s affinity entry (backend {}) is not used: {why}",
                            src.addr, a.backend_id
                        ));
                    }
                }
            }
        }
    }

    // 4. Maglev or a random slot.
    if svc.flags & SVC_F_MAGLEV != 0 {
        maglev(maps, w, &svc, meta.as_ref(), src, dst)
    } else {
        random(maps, w, &svc)
    }
}

/// The conntrack check; true if an existing flow decides (its backend is then set).
fn conntrack(
    maps: &impl MapView,
    w: &mut Walk,
    svc: &Service4,
    client: Ipv4Addr,
    sport: u16,
    dst: Destination,
    now: u64,
) -> Result<bool, InspectError> {
    let key = CtKey4 {
        saddr_be: addr_be(client),
        daddr_be: addr_be(dst.addr),
        sport_be: sport.to_be(),
        dport_be: dst.port.to_be(),
        proto: dst.proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    let Some(e) = maps.flow(&key)? else {
        w.step(format!(
            "no conntrack entry for {client}:{sport}: a new flow"
        ));
        return Ok(false);
    };
    let idle_s = now.saturating_sub(e.last_seen_ns) / 1_000_000_000;
    if e.svc_id != svc.svc_id {
        w.step(format!(
            "the conntrack entry for {client}:{sport} belongs to service id {}, not this \
             frontend's (the Service was replaced): a new flow",
            e.svc_id
        ));
        return Ok(false);
    }
    // Judged as the flow's next packet (for TCP, an ACK).
    if !ct_is_live(e.last_seen_ns, e.flags, dst.proto, TCP_ACK, now) {
        w.step(format!(
            "the conntrack entry for {client}:{sport} expired ({idle_s} s idle, timeout {} s): a \
             new flow",
            ct_timeout_ns(dst.proto, e.flags) / 1_000_000_000
        ));
        return Ok(false);
    }
    let backend = maps.backend(e.backend_id)?;
    let valid = e.revision == svc.revision || backend.is_some_and(|b| b.svc_id == svc.svc_id);
    if !valid {
        w.step(format!(
            "the conntrack entry for {client}:{sport} names backend {}, which is gone: the flow \
             moves to a backend chosen as for a new flow",
            e.backend_id
        ));
        return Ok(false);
    }
    let (addr, port) = (ip(e.nat_addr_be), u16::from_be(e.nat_port_be));
    w.step(format!(
        "existing flow (conntrack, {idle_s} s idle): stays on backend {} at {}",
        e.backend_id,
        SocketAddrV4::new(addr, port)
    ));
    if dst.proto == PROTO_TCP && e.flags & CT_F_CLOSING != 0 {
        w.step(
            "the flow is closing: a new connection (a bare SYN) from the same port starts a new \
             flow instead"
                .into(),
        );
    }
    w.out.backend = Some(Choice {
        id: e.backend_id,
        address: addr,
        port,
        state: backend.map_or_else(|| "unknown".into(), |b| state_name(b.state)),
        weight: None,
    });
    Ok(true)
}

fn maglev(
    maps: &impl MapView,
    mut w: Walk,
    svc: &Service4,
    meta: Option<&Decoded>,
    src: Source,
    dst: Destination,
) -> Result<Explanation, InspectError> {
    let Some(m) = meta.map(|m| m.maglev_table_size).filter(|m| *m > 0) else {
        w.step(
            "the Maglev table size is not recorded (no metadata record): the backend cannot be \
             computed"
                .into(),
        );
        return Ok(w.decide("forward", "maglev"));
    };
    let Some(sport) = src.port else {
        w.step(format!(
            "Maglev hashes the whole 5-tuple, source port included: give SRC_IP:PORT for the \
             exact backend; over all ports, the shares are as listed (table of {m} entries)"
        ));
        w.out.candidates = candidates(maps, svc, Some(m))?;
        return Ok(w.decide("forward", "maglev"));
    };
    let hash = maglev_flow_hash(
        addr_be(src.addr),
        addr_be(dst.addr),
        sport.to_be(),
        dst.port.to_be(),
        dst.proto,
    );
    let index = maglev_index(hash, m);
    w.out.maglev_index = Some(index);
    let key = SlotKey {
        svc_id: svc.svc_id,
        slot: index,
    };
    let Some(slot) = maps.maglev(&key)? else {
        w.step(format!(
            "flow hash {hash:#010x} -> Maglev entry {index} of {m}, which is missing: the packet \
             passes untranslated (counted as bad_slot)"
        ));
        return Ok(w.decide("pass", "bad_slot"));
    };
    match maps.backend(slot.backend_id)? {
        Some(b) => {
            w.step(format!(
                "flow hash {hash:#010x} -> Maglev entry {index} of {m} -> backend {} at {}:{}",
                slot.backend_id,
                ip(b.addr_be),
                u16::from_be(b.port_be)
            ));
            w.out.backend = Some(choice(slot.backend_id, &b, None));
            Ok(w.decide("forward", "maglev"))
        }
        None => {
            w.step(format!(
                "Maglev entry {index} names backend {}, which is missing: the packet passes \
                 untranslated (counted as bad_slot)",
                slot.backend_id
            ));
            Ok(w.decide("pass", "bad_slot"))
        }
    }
}

fn random(maps: &impl MapView, mut w: Walk, svc: &Service4) -> Result<Explanation, InspectError> {
    let candidates = candidates(maps, svc, None)?;
    let n = svc.backend_count;
    if let [only] = candidates.as_slice()
        && n == 1
    {
        w.step(format!(
            "one active backend (slot 1): backend {} at {}:{}",
            only.id, only.address, only.port
        ));
        w.out.backend = Some(only.clone());
    } else {
        w.step(format!(
            "a random slot of 1..={n}: each active backend gets 1/{n} of new flows; which one \
             is decided per flow"
        ));
    }
    w.out.candidates = candidates;
    Ok(w.decide("forward", "random"))
}

/// The backends new flows fall among, with their shares.
fn candidates(
    maps: &impl MapView,
    svc: &Service4,
    maglev_table_size: Option<u32>,
) -> Result<Vec<Choice>, InspectError> {
    let mut out = Vec::new();
    if let Some(shares) = weights(maps, svc, maglev_table_size)? {
        for (id, share) in shares {
            if let Some(b) = maps.backend(id)? {
                out.push(choice(id, &b, Some(share)));
            }
        }
    }
    out.sort_by_key(|c| (c.address, c.port, c.id));
    Ok(out)
}

fn frontend_info(svc: &Service4, meta: Option<&Decoded>) -> FrontendInfo {
    FrontendInfo {
        service_id: svc.svc_id,
        namespace: meta.map(|m| m.namespace.clone()),
        name: meta.map(|m| m.name.clone()),
        port_name: meta.map(|m| m.port_name.clone()),
        algorithm: algorithm_name(svc),
        affinity_timeout_s: (svc.flags & SVC_F_AFFINITY != 0).then_some(svc.affinity_timeout_s),
        active_backends: svc.backend_count,
        reasons: meta.map(|m| reason_names(m.reasons)).unwrap_or_default(),
    }
}

fn service_text(meta: Option<&Decoded>) -> String {
    match meta {
        Some(m) if m.port_name.is_empty() => format!("Service {}/{}", m.namespace, m.name),
        Some(m) => format!("Service {}/{} port {}", m.namespace, m.name, m.port_name),
        None => "an unnamed Service (no metadata record)".into(),
    }
}

/// The selection reasons as sentences.
fn reason_text(m: &Decoded) -> Vec<String> {
    let mut out = Vec::new();
    if m.reasons & META_R_NODE_LOCAL != 0 {
        out.push("internalTrafficPolicy: Local: only endpoints on this node are backends".into());
    }
    if m.reasons & META_R_TOPOLOGY != 0 {
        out.push(format!(
            "topology-aware routing: only endpoints hinted for zone {} take new flows",
            m.zone
        ));
    }
    if m.reasons & META_R_TOPOLOGY_IGNORED != 0 {
        out.push(
            "topology-aware routing is asked for but its hints are unusable (a ready endpoint \
             without hint, or none for this zone): endpoints of every zone are used"
                .into(),
        );
    }
    if m.reasons & META_R_TERMINATING_FALLBACK != 0 {
        out.push(
            "no endpoint is ready: serving endpoints that are terminating take new flows".into(),
        );
    }
    if m.reasons & META_R_EXTERNAL_LOCAL_NOT_APPLIED != 0 {
        out.push(format!(
            "externalTrafficPolicy: Local is not applied to traffic from pods to this {} \
             address: every endpoint is used, as with kube-proxy",
            m.addr_kind
        ));
    }
    out
}
