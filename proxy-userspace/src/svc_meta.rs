//! The pinned metadata record of a frontend ([`proxy_common::meta::ServiceMeta`]): encoded
//! from the desired state by the map writer, decoded by inspection. Both directions live here
//! so they cannot disagree.

use proxy_common::meta::{
    META_ADDR_CLUSTER_IP, META_ADDR_EXTERNAL_IP, META_ADDR_LOAD_BALANCER,
    META_R_EXTERNAL_LOCAL_NOT_APPLIED, META_R_NODE_LOCAL, META_R_TERMINATING_FALLBACK,
    META_R_TOPOLOGY, META_R_TOPOLOGY_IGNORED, META_R_TRUNCATED, ServiceMeta, text,
};

use crate::desired::{AddrKind, FrontendState};

/// The record of a frontend in `state`, for a datapath indexing Maglev tables of
/// `maglev_table_size` entries.
pub fn encode(state: &FrontendState, maglev_table_size: u32) -> ServiceMeta {
    let sel = &state.selection;
    let mut meta = ServiceMeta {
        maglev_table_size,
        addr_kind: match sel.addr_kind {
            AddrKind::ClusterIp => META_ADDR_CLUSTER_IP,
            AddrKind::ExternalIp => META_ADDR_EXTERNAL_IP,
            AddrKind::LoadBalancer => META_ADDR_LOAD_BALANCER,
        },
        ..ServiceMeta::default()
    };
    let truncated = [
        put(&mut meta.namespace, &state.service.namespace),
        put(&mut meta.name, &state.service.name),
        put(&mut meta.port_name, &state.port_name),
        put(&mut meta.zone, sel.topology_zone.as_deref().unwrap_or("")),
    ]
    .contains(&true);
    for (on, bit) in [
        (sel.node_local, META_R_NODE_LOCAL),
        (sel.topology_zone.is_some(), META_R_TOPOLOGY),
        (sel.topology_ignored, META_R_TOPOLOGY_IGNORED),
        (sel.terminating_fallback, META_R_TERMINATING_FALLBACK),
        (
            sel.external_local_not_applied,
            META_R_EXTERNAL_LOCAL_NOT_APPLIED,
        ),
        (truncated, META_R_TRUNCATED),
    ] {
        if on {
            meta.reasons |= bit;
        }
    }
    meta
}

/// Copies `value` into a NUL-padded field, cut at a character boundary if it does not fit;
/// returns whether it was cut. Kubernetes' own limits fit; a manifest may not respect them.
fn put(field: &mut [u8], value: &str) -> bool {
    let mut end = value.len().min(field.len());
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    field[..end].copy_from_slice(&value.as_bytes()[..end]);
    end < value.len()
}

/// A record read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub zone: String,
    pub reasons: u32,
    pub maglev_table_size: u32,
    pub addr_kind: &'static str,
}

/// Reads a record; bytes that are not UTF-8 (a foreign writer) are shown replaced, never
/// trusted.
pub fn decode(meta: &ServiceMeta) -> Decoded {
    let s = |field: &[u8]| String::from_utf8_lossy(text(field)).into_owned();
    Decoded {
        namespace: s(&meta.namespace),
        name: s(&meta.name),
        port_name: s(&meta.port_name),
        zone: s(&meta.zone),
        reasons: meta.reasons,
        maglev_table_size: meta.maglev_table_size,
        addr_kind: match meta.addr_kind {
            META_ADDR_CLUSTER_IP => "ClusterIP",
            META_ADDR_EXTERNAL_IP => "externalIP",
            META_ADDR_LOAD_BALANCER => "LoadBalancer",
            _ => "unknown",
        },
    }
}

/// A 64-bit fingerprint of a record: the writer keeps this instead of the 220-byte record to
/// know whether the one in the map is current (FNV-1a; stable within and across runs).
pub fn fingerprint(meta: &ServiceMeta) -> u64 {
    bytemuck::bytes_of(meta)
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{Selection, ServiceName};

    fn state(namespace: &str, name: &str, port_name: &str, selection: Selection) -> FrontendState {
        FrontendState {
            service: ServiceName {
                namespace: namespace.into(),
                name: name.into(),
            },
            port_name: port_name.into(),
            selection,
            ..FrontendState::default()
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let sel = Selection {
            addr_kind: AddrKind::LoadBalancer,
            topology_zone: Some("zone-a".into()),
            terminating_fallback: true,
            external_local_not_applied: true,
            ..Selection::default()
        };
        let meta = encode(&state("prod", "web", "https", sel), 16_381);
        let back = decode(&meta);
        assert_eq!(
            back,
            Decoded {
                namespace: "prod".into(),
                name: "web".into(),
                port_name: "https".into(),
                zone: "zone-a".into(),
                reasons: META_R_TOPOLOGY
                    | META_R_TERMINATING_FALLBACK
                    | META_R_EXTERNAL_LOCAL_NOT_APPLIED,
                maglev_table_size: 16_381,
                addr_kind: "LoadBalancer",
            }
        );
    }

    #[test]
    fn names_at_the_kubernetes_limits_fit_and_longer_ones_are_cut_on_a_character() {
        let ns = "n".repeat(63);
        let name = "s".repeat(63);
        let meta = encode(
            &state(&ns, &name, "p23456789012345", Selection::default()),
            7,
        );
        let back = decode(&meta);
        assert_eq!((back.namespace, back.name), (ns, name));
        assert_eq!(back.port_name, "p23456789012345");
        assert_eq!(back.reasons & META_R_TRUNCATED, 0);

        // 15 ASCII bytes then a 2-byte character: only the ASCII fits in 16.
        let long = format!("{}é", "x".repeat(15));
        let meta = encode(&state("ns", "svc", &long, Selection::default()), 7);
        let back = decode(&meta);
        assert_eq!(back.port_name, "x".repeat(15));
        assert_ne!(back.reasons & META_R_TRUNCATED, 0);
    }

    #[test]
    fn fingerprints_differ_when_any_field_does() {
        let a = encode(&state("ns", "a", "", Selection::default()), 7);
        let b = encode(&state("ns", "b", "", Selection::default()), 7);
        let c = encode(&state("ns", "a", "", Selection::default()), 11);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    }
}
