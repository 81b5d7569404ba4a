//! Inspection against maps the real map writer filled, with flows and affinity entries added as
//! the datapath adds them: names, weights, and explain's decisions, checked against values
//! computed independently (the Maglev table from `maglev::table`, not from the maps).

use std::net::Ipv4Addr;

use proxy_common::{
    conntrack::{
        AffinityEntry, AffinityKey4, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, CtEntry4, CtKey4,
    },
    select::{maglev_flow_hash, maglev_index},
    service::Frontend4Key,
    stats::{STAT_FWD_NEW, SvcStats},
};
use serde_json::Value;

use super::{
    Request, addr_be, answer,
    args::{Destination, ServiceRef, Source},
    explain,
    fake::{FakeMaps, TEST_MAGLEV},
    flows,
    render::{Output, services_table},
    services,
};
use crate::{
    desired::{
        Algorithm, Backend, BackendState, Desired, Frontend, FrontendState, Protocol, Selection,
        ServiceName,
    },
    maglev,
};

const S: u64 = 1_000_000_000;
const NOW: u64 = 10_000 * S;

fn ip(s: &str) -> Ipv4Addr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
}

fn backend(addr: &str, state: BackendState) -> Backend {
    Backend {
        addr: ip(addr),
        port: 8080,
        state,
    }
}

fn frontend(addr: &str, port: u16) -> Frontend {
    Frontend {
        addr: ip(addr),
        port,
        protocol: Protocol::Tcp,
    }
}

fn state(ns: &str, name: &str, backends: Vec<Backend>) -> FrontendState {
    FrontendState {
        service: ServiceName {
            namespace: ns.into(),
            name: name.into(),
        },
        port_name: "http".into(),
        backends,
        ..FrontendState::default()
    }
}

fn put(d: &mut Desired, fe: Frontend, state: FrontendState) {
    d.frontends.insert(fe, state.into());
}

/// `dev/web` (random, two active backends and a terminating one), `dev/hash` (Maglev over
/// three), `dev/sticky` (affinity), `dev/empty` (no endpoints: reject), `dev/local` (none on
/// this node: drop).
fn cluster() -> Desired {
    use BackendState::{Active, Terminating};
    let mut d = Desired::default();
    put(
        &mut d,
        frontend("10.96.0.10", 80),
        state(
            "dev",
            "web",
            vec![
                backend("10.244.1.1", Active),
                backend("10.244.1.2", Active),
                backend("10.244.1.3", Terminating),
            ],
        ),
    );
    put(
        &mut d,
        frontend("10.96.0.11", 80),
        FrontendState {
            algorithm: Algorithm::Maglev,
            ..state(
                "dev",
                "hash",
                vec![
                    backend("10.244.2.1", Active),
                    backend("10.244.2.2", Active),
                    backend("10.244.2.3", Active),
                ],
            )
        },
    );
    put(
        &mut d,
        frontend("10.96.0.12", 80),
        FrontendState {
            affinity_timeout_s: Some(60),
            ..state(
                "dev",
                "sticky",
                vec![backend("10.244.3.1", Active), backend("10.244.3.2", Active)],
            )
        },
    );
    put(
        &mut d,
        frontend("10.96.0.13", 80),
        state("dev", "empty", vec![]),
    );
    put(
        &mut d,
        frontend("10.96.0.14", 80),
        FrontendState {
            drop_when_empty: true,
            selection: Selection {
                node_local: true,
                ..Selection::default()
            },
            ..state("dev", "local", vec![])
        },
    );
    d
}

fn maps() -> FakeMaps {
    FakeMaps::written(&cluster(), NOW)
}

fn svc_id(maps: &FakeMaps, fe: Frontend) -> u32 {
    let key = Frontend4Key {
        addr_be: addr_be(fe.addr),
        port_be: fe.port.to_be(),
        proto: 6,
        scope: 0,
    };
    maps.state().frontends[&key].svc_id
}

fn backend_id(maps: &FakeMaps, addr: &str) -> u32 {
    let st = maps.state();
    let found = st
        .backends
        .iter()
        .find(|(_, b)| b.addr_be == addr_be(ip(addr)));
    match found {
        Some((id, _)) => *id,
        None => panic!("no backend {addr} in the maps"),
    }
}

/// A forward conntrack entry as the datapath writes it for a new flow.
fn add_flow(maps: &FakeMaps, client: (&str, u16), fe: Frontend, to: &str, idle_s: u64, flags: u16) {
    let svc = svc_id(maps, fe);
    let id = backend_id(maps, to);
    let revision = maps
        .state()
        .frontends
        .values()
        .find(|f| f.svc_id == svc)
        .map_or(0, |f| f.revision);
    let key = CtKey4 {
        saddr_be: addr_be(ip(client.0)),
        daddr_be: addr_be(fe.addr),
        sport_be: client.1.to_be(),
        dport_be: fe.port.to_be(),
        proto: 6,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    let entry = CtEntry4 {
        nat_addr_be: addr_be(ip(to)),
        nat_port_be: 8080u16.to_be(),
        flags,
        svc_id: svc,
        backend_id: id,
        revision,
        _pad: 0,
        last_seen_ns: NOW - idle_s * S,
    };
    let reply = CtKey4 {
        saddr_be: entry.nat_addr_be,
        daddr_be: key.saddr_be,
        sport_be: entry.nat_port_be,
        dport_be: key.sport_be,
        dir: CT_DIR_REPLY,
        ..key
    };
    let mut st = maps.state();
    st.flows.push((key, entry));
    st.flows.push((reply, entry));
}

fn src(text: &str) -> Source {
    text.parse().unwrap_or_else(|e| panic!("{e}"))
}

fn dst(text: &str) -> Destination {
    text.parse().unwrap_or_else(|e| panic!("{e}"))
}

fn explained(maps: &FakeMaps, s: &str, d: &str) -> explain::Explanation {
    explain::explain(maps, src(s), dst(d)).unwrap_or_else(|e| panic!("explain failed: {e}"))
}

#[test]
fn services_name_every_frontend_and_weigh_its_backends() {
    let maps = maps();
    let web = svc_id(&maps, frontend("10.96.0.10", 80));
    maps.state().counters.insert(
        web,
        SvcStats {
            packets: 10,
            bytes: 1000,
            new_flows: 4,
        },
    );
    maps.state().outcomes[STAT_FWD_NEW as usize] = 4;
    let r = services::gather(&maps).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = r
        .services
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s.namespace.as_deref().unwrap_or("?"),
                s.name.as_deref().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "dev/empty",
            "dev/hash",
            "dev/local",
            "dev/sticky",
            "dev/web"
        ]
    );

    let web = &r.services[4];
    assert_eq!(web.frontend, "10.96.0.10:80/TCP");
    assert_eq!(web.port_name.as_deref(), Some("http"));
    assert_eq!(web.address_kind, Some("ClusterIP"));
    assert_eq!((web.algorithm, web.without_backends), ("random", "reject"));
    assert_eq!((web.counters.packets, web.counters.new_flows), (10, 4));
    let backends: Vec<(String, &str, Option<f64>)> = web
        .backends
        .iter()
        .map(|b| (b.address.to_string(), b.state.as_str(), b.weight))
        .collect();
    assert_eq!(
        backends,
        [
            ("10.244.1.1".into(), "active", Some(0.5)),
            ("10.244.1.2".into(), "active", Some(0.5)),
            ("10.244.1.3".into(), "terminating", Some(0.0)),
        ]
    );

    // Maglev shares are table entries over the table size: together all of it, each about a
    // third.
    let hash = &r.services[1];
    assert_eq!(hash.algorithm, "maglev");
    let shares: Vec<f64> = hash.backends.iter().filter_map(|b| b.weight).collect();
    assert_eq!(shares.len(), 3);
    assert!(
        (shares.iter().sum::<f64>() - 1.0).abs() < 1e-9,
        "{shares:?}"
    );
    assert!(
        shares.iter().all(|s| (s - 1.0 / 3.0).abs() < 0.01),
        "{shares:?}"
    );

    let local = &r.services[2];
    assert_eq!(local.without_backends, "drop");
    assert_eq!(local.reasons, ["internal_traffic_policy_local"]);
    assert_eq!(r.services[3].affinity_timeout_s, Some(60));
    assert_eq!(r.outcomes["fwd_new"], 4);
}

#[test]
fn services_table_and_json_say_the_same() {
    let maps = maps();
    let table = answer(&maps, &Request::Services, Output::Table).unwrap_or_else(|e| panic!("{e}"));
    let header = table.lines().next().unwrap_or_default();
    let columns: Vec<&str> = header.split_whitespace().take(3).collect();
    assert_eq!(columns, ["SERVICE", "PORT", "FRONTEND"], "{table}");
    let web = table
        .lines()
        .find(|l| l.starts_with("dev/web "))
        .unwrap_or_else(|| panic!("no dev/web row:\n{table}"));
    let cells: Vec<&str> = web.split_whitespace().collect();
    assert_eq!(
        &cells[..3],
        ["dev/web", "http", "10.96.0.10:80/TCP"],
        "{web}"
    );
    assert!(
        table.contains("10.96.0.10:80/TCP  10.244.1.3:8080  ")
            && table.contains("terminating  0.0%"),
        "{table}"
    );
    // Columns line up: every row of the first table starts its FRONTEND column where the header
    // does.
    let col = header.find("FRONTEND").unwrap_or_default();
    for line in table.lines().skip(1).take_while(|l| !l.is_empty()) {
        assert_eq!(
            line.get(col..col + 3),
            Some("10."),
            "misaligned row {line:?}"
        );
    }

    let json: Value = serde_json::from_str(
        &answer(&maps, &Request::Services, Output::Json).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("not JSON: {e}"));
    let web = &json["services"][4];
    assert_eq!(web["namespace"], "dev");
    assert_eq!(web["name"], "web");
    assert_eq!(web["backends"][2]["state"], "terminating");
    assert_eq!(web["backends"][0]["weight"], 0.5);
    assert_eq!(
        services_table(&services::gather(&maps).unwrap_or_else(|e| panic!("{e}"))),
        table
    );
}

#[test]
fn flows_are_translated_back_to_services_and_filtered_by_one() {
    let maps = maps();
    let web = frontend("10.96.0.10", 80);
    let hash = frontend("10.96.0.11", 80);
    add_flow(&maps, ("10.244.0.2", 40000), web, "10.244.1.2", 3, 0);
    add_flow(&maps, ("10.244.0.2", 40001), hash, "10.244.2.1", 0, 0);
    // Idle past the 10 s a closing TCP flow lives.
    add_flow(
        &maps,
        ("10.244.0.3", 40002),
        web,
        "10.244.1.1",
        11,
        CT_F_CLOSING,
    );
    let r = flows::gather(&maps, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.flows.len(), 3, "reply entries are not flows: {r:?}");
    let f = &r.flows[1];
    assert_eq!(f.service.as_deref(), Some("dev/web"));
    assert_eq!(f.client.to_string(), "10.244.0.2:40000");
    assert_eq!(f.frontend.to_string(), "10.96.0.10:80");
    assert_eq!(f.backend.to_string(), "10.244.1.2:8080");
    assert_eq!(
        (f.state, f.live, f.backend_current),
        ("established", true, true)
    );
    assert!((f.idle_s - 3.0).abs() < 1e-9);
    let closing = &r.flows[2];
    assert_eq!((closing.state, closing.live), ("closing", false));

    let only = ServiceRef {
        namespace: "dev".into(),
        name: "hash".into(),
    };
    let r = flows::gather(&maps, Some(&only)).unwrap_or_else(|e| panic!("{e}"));
    let clients: Vec<String> = r.flows.iter().map(|f| f.client.to_string()).collect();
    assert_eq!(clients, ["10.244.0.2:40001"]);

    // Once its backend is deleted, the flow says so.
    let id = backend_id(&maps, "10.244.2.1");
    maps.state().backends.remove(&id);
    let r = flows::gather(&maps, Some(&only)).unwrap_or_else(|e| panic!("{e}"));
    assert!(!r.flows[0].backend_current);
    let table =
        answer(&maps, &Request::Flows(Some(only)), Output::Table).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        table.contains("dev/hash") && table.contains("backend gone"),
        "{table}"
    );
}

#[test]
fn explain_names_no_frontend_reject_and_policy_drop() {
    let maps = maps();
    let e = explained(&maps, "10.244.0.2", "10.96.0.99:80/tcp");
    assert_eq!((e.verdict, e.decided_by), ("pass", "no_frontend"));
    let e = explained(&maps, "10.244.0.2", "10.96.0.10:80/udp");
    assert_eq!(
        (e.verdict, e.decided_by),
        ("pass", "no_frontend"),
        "UDP is another frontend"
    );

    let e = explained(&maps, "10.244.0.2:40000", "10.96.0.13:80/tcp");
    assert_eq!((e.verdict, e.decided_by), ("reject", "no_backend"));
    let e = explained(&maps, "10.244.0.2:40000", "10.96.0.14:80/tcp");
    assert_eq!((e.verdict, e.decided_by), ("drop", "no_backend"));
    assert!(
        e.steps
            .iter()
            .any(|s| s.contains("internalTrafficPolicy: Local")),
        "the drop says why: {:?}",
        e.steps
    );
}

#[test]
fn explain_random_lists_the_active_backends_with_equal_shares() {
    let maps = maps();
    let e = explained(&maps, "10.244.0.2:40000", "10.96.0.10:80/tcp");
    assert_eq!((e.verdict, e.decided_by), ("forward", "random"));
    assert_eq!(e.backend, None, "a random pick is not known in advance");
    let c: Vec<(String, Option<f64>)> = e
        .candidates
        .iter()
        .map(|c| (c.address.to_string(), c.weight))
        .collect();
    assert_eq!(
        c,
        [
            ("10.244.1.1".into(), Some(0.5)),
            ("10.244.1.2".into(), Some(0.5))
        ],
        "the terminating backend gets no new flows"
    );
}

/// The Maglev answer is the entry the datapath's hash selects in the table the writer built;
/// checked against a table computed here from the backend list alone.
#[test]
fn explain_maglev_gives_the_entry_the_datapath_hashes_to() {
    let maps = maps();
    let backends = [ip("10.244.2.1"), ip("10.244.2.2"), ip("10.244.2.3")];
    let table = maglev::table(&backends.map(|a| (a, 8080)), TEST_MAGLEV);
    let mut seen = std::collections::BTreeSet::new();
    for port in 40000..40064u16 {
        let e = explained(&maps, &format!("10.244.0.2:{port}"), "10.96.0.11:80/tcp");
        assert_eq!((e.verdict, e.decided_by), ("forward", "maglev"));
        let index = maglev_index(
            maglev_flow_hash(
                addr_be(ip("10.244.0.2")),
                addr_be(ip("10.96.0.11")),
                port.to_be(),
                80u16.to_be(),
                6,
            ),
            TEST_MAGLEV,
        );
        assert_eq!(e.maglev_index, Some(index));
        let want = backends[table[index as usize] as usize];
        let got = e.backend.as_ref().map(|b| b.address);
        assert_eq!(got, Some(want), "source port {port}");
        seen.insert(want);
    }
    assert_eq!(seen.len(), 3, "64 source ports reach every backend");

    let e = explained(&maps, "10.244.0.2", "10.96.0.11:80/tcp");
    assert_eq!((e.decided_by, e.backend.is_none()), ("maglev", true));
    assert_eq!(e.candidates.len(), 3, "without a port: the shares");
    assert!(
        e.steps.iter().any(|s| s.contains("give SRC_IP:PORT")),
        "{:?}",
        e.steps
    );
}

#[test]
fn explain_affinity_holds_while_fresh_and_active() {
    let maps = maps();
    let fe = frontend("10.96.0.12", 80);
    let svc = svc_id(&maps, fe);
    let to = backend_id(&maps, "10.244.3.2");
    let key = AffinityKey4 {
        svc_id: svc,
        client_addr_be: addr_be(ip("10.244.0.2")),
    };
    let set_idle = |idle_s: u64| {
        maps.state().affinity.insert(
            key,
            AffinityEntry {
                backend_id: to,
                _pad: 0,
                last_seen_ns: NOW - idle_s * S,
            },
        );
    };
    set_idle(59);
    let e = explained(&maps, "10.244.0.2", "10.96.0.12:80/tcp");
    assert_eq!((e.verdict, e.decided_by), ("forward", "affinity"));
    assert_eq!(e.backend.as_ref().map(|b| b.id), Some(to));
    let e = explained(&maps, "10.244.0.3", "10.96.0.12:80/tcp");
    assert_eq!(e.decided_by, "random", "another client has no affinity");

    set_idle(61);
    let e = explained(&maps, "10.244.0.2", "10.96.0.12:80/tcp");
    assert_eq!(e.decided_by, "random");
    assert!(
        e.steps
            .iter()
            .any(|s| s.contains("expired (61 s idle, timeout 60 s)")),
        "{:?}",
        e.steps
    );

    set_idle(1);
    if let Some(b) = maps.state().backends.get_mut(&to) {
        b.state = proxy_common::backend::BACKEND_TERMINATING;
    }
    let e = explained(&maps, "10.244.0.2", "10.96.0.12:80/tcp");
    assert_eq!(e.decided_by, "random");
    assert!(
        e.steps.iter().any(|s| s.contains("terminating")),
        "{:?}",
        e.steps
    );
}

#[test]
fn explain_existing_flow_keeps_its_backend_until_expired_or_gone() {
    let maps = maps();
    let web = frontend("10.96.0.10", 80);
    add_flow(&maps, ("10.244.0.2", 40000), web, "10.244.1.3", 5, 0);
    // A terminating backend keeps its existing flows.
    let e = explained(&maps, "10.244.0.2:40000", "10.96.0.10:80/tcp");
    assert_eq!((e.verdict, e.decided_by), ("forward", "conntrack"));
    let b = e
        .backend
        .as_ref()
        .unwrap_or_else(|| panic!("no backend: {e:?}"));
    assert_eq!(
        (b.address, b.state.as_str()),
        (ip("10.244.1.3"), "terminating")
    );
    let text = answer(
        &maps,
        &Request::Explain(src("10.244.0.2:40000"), dst("10.96.0.10:80/tcp")),
        Output::Table,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        text.starts_with(
            "10.244.0.2:40000 -> 10.96.0.10:80/TCP\nverdict: forward to 10.244.1.3:8080"
        ),
        "{text}"
    );
    assert!(text.contains("decided by conntrack"), "{text}");

    // Another port of the same client is a new flow.
    let e = explained(&maps, "10.244.0.2:40001", "10.96.0.10:80/tcp");
    assert_eq!(e.decided_by, "random");

    // Expired: idle past the SYN timeout of a flow that never saw an ACK.
    add_flow(
        &maps,
        ("10.244.0.4", 40000),
        web,
        "10.244.1.1",
        61,
        proxy_common::conntrack::CT_F_SYN_ONLY,
    );
    let e = explained(&maps, "10.244.0.4:40000", "10.96.0.10:80/tcp");
    assert_eq!(e.decided_by, "random");
    assert!(
        e.steps
            .iter()
            .any(|s| s.contains("expired (61 s idle, timeout 60 s)")),
        "{:?}",
        e.steps
    );

    // Its backend deleted, and the Service's revision moved on: the flow moves.
    let id = backend_id(&maps, "10.244.1.3");
    maps.state().backends.remove(&id);
    for f in maps.state().frontends.values_mut() {
        f.revision += 100;
    }
    let e = explained(&maps, "10.244.0.2:40000", "10.96.0.10:80/tcp");
    assert_eq!(e.decided_by, "random");
    assert!(
        e.steps.iter().any(|s| s.contains("which is gone")),
        "{:?}",
        e.steps
    );
}

#[test]
fn explain_json_has_the_decision_fields() {
    let maps = maps();
    let text = answer(
        &maps,
        &Request::Explain(src("10.244.0.2:40000"), dst("10.96.0.11:80/tcp")),
        Output::Json,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON: {e}: {text}"));
    assert_eq!(v["verdict"], "forward");
    assert_eq!(v["decided_by"], "maglev");
    assert_eq!(v["frontend"]["namespace"], "dev");
    assert_eq!(v["frontend"]["name"], "hash");
    assert!(
        v["maglev_index"].is_u64() && v["backend"]["address"].is_string(),
        "{v}"
    );
    assert!(v["steps"].as_array().is_some_and(|s| s.len() >= 3), "{v}");
}
