//! Map names, key and value layouts and pure helpers shared by the datapath (`proxy-ebpf`) and the
//! controller (`proxy-userspace`).
//!
//! Every key and value is `#[repr(C)]`, has explicit padding, holds no `bool`/enum/`Option`, and
//! says its byte order in the field name (`_be` = network order, as in the packet). A
//! compile-time assertion pins each size, so a layout change is a deliberate act that also bumps
//! [`LAYOUT_VERSION`].
//!
//! The families are IPv4-only today and named `*4` so an IPv6 family can be added beside them
//! (Cilium's `lb4_*`/`lb6_*` split) without touching these layouts.
#![no_std]

pub mod backend;
pub mod conntrack;
pub mod csum;
pub mod meta;
pub mod select;
pub mod service;
pub mod sock;
pub mod stats;

/// Bumped whenever a map layout below changes. The controller refuses to adopt pinned maps whose
/// key/value sizes do not match, rather than misreading them.
pub const LAYOUT_VERSION: u32 = 3;

/// The pinned one-entry array holding the [`LAYOUT_VERSION`] of the build that wrote the maps
/// beside it: a field can move without any key or value size changing, so sizes alone cannot
/// tell two layouts apart. 0 means not yet recorded (a first load that stopped before it could).
pub const LAYOUT: &str = "LAYOUT";

/// Implements `aya::Pod` for the host side. The `bytemuck::Pod` derive already proved the type
/// has no padding bytes or invalid bit patterns, which is exactly `aya::Pod`'s contract.
#[macro_export]
#[doc(hidden)]
macro_rules! impl_user_pod {
    ($($t:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: `bytemuck::Pod` is derived for the type: plain data, no padding, any bit
            // pattern valid.
            unsafe impl aya::Pod for $t {}
        )+
    };
}

#[cfg(test)]
mod tests {
    use bytemuck::bytes_of;

    use crate::{
        backend::Backend4,
        conntrack::{CT_DIR_REPLY, CtKey4},
        service::Frontend4Key,
    };

    /// Keys hold addresses and ports exactly as they sit in the packet, so the datapath can
    /// build them from raw loads without byte swapping.
    #[test]
    fn frontend_key_bytes_are_in_packet_order() {
        let key = Frontend4Key {
            addr_be: u32::from_ne_bytes([10, 96, 0, 10]),
            port_be: 80u16.to_be(),
            proto: 6,
            scope: 0,
        };
        assert_eq!(bytes_of(&key), &[10, 96, 0, 10, 0, 80, 6, 0]);
    }

    #[test]
    fn conntrack_key_bytes_follow_the_declared_fields() {
        let key = CtKey4 {
            saddr_be: u32::from_ne_bytes([10, 244, 0, 2]),
            daddr_be: u32::from_ne_bytes([10, 96, 0, 10]),
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: 17,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        assert_eq!(
            bytes_of(&key),
            &[10, 244, 0, 2, 10, 96, 0, 10, 0x9c, 0x40, 0, 80, 17, 1, 0, 0]
        );
    }

    /// The liveness rule both the datapath and `svcproxy explain` apply.
    #[test]
    fn conntrack_entries_live_until_their_timeout_and_a_closed_flow_yields_to_a_new_syn() {
        use crate::conntrack::{
            CT_F_CLOSING, CT_F_SYN_ONLY, CT_TIMEOUT_CLOSING_NS, CT_TIMEOUT_SYN_NS,
            CT_TIMEOUT_TCP_NS, CT_TIMEOUT_UDP_NS, PROTO_TCP, TCP_ACK, TCP_SYN, ct_is_live,
            ct_timeout_ns,
        };
        assert_eq!(ct_timeout_ns(17, CT_F_CLOSING), CT_TIMEOUT_UDP_NS);
        assert_eq!(ct_timeout_ns(PROTO_TCP, 0), CT_TIMEOUT_TCP_NS);
        assert_eq!(ct_timeout_ns(PROTO_TCP, CT_F_SYN_ONLY), CT_TIMEOUT_SYN_NS);
        assert_eq!(
            ct_timeout_ns(PROTO_TCP, CT_F_CLOSING | CT_F_SYN_ONLY),
            CT_TIMEOUT_CLOSING_NS
        );
        let t0 = 1_000;
        assert!(ct_is_live(t0, 0, 17, 0, t0 + CT_TIMEOUT_UDP_NS));
        assert!(!ct_is_live(t0, 0, 17, 0, t0 + CT_TIMEOUT_UDP_NS + 1));
        assert!(ct_is_live(t0, CT_F_CLOSING, PROTO_TCP, TCP_ACK, t0 + 1));
        assert!(!ct_is_live(t0, CT_F_CLOSING, PROTO_TCP, TCP_SYN, t0 + 1));
        assert!(
            ct_is_live(t0, 0, PROTO_TCP, TCP_SYN, t0 + 1),
            "a SYN retransmit"
        );
    }

    #[test]
    fn backend_value_has_no_hidden_padding() {
        let b = Backend4 {
            addr_be: u32::from_ne_bytes([10, 244, 1, 1]),
            port_be: 8080u16.to_be(),
            proto: 6,
            state: 1,
            svc_id: 7,
        };
        let bytes = bytes_of(&b);
        assert_eq!(&bytes[..8], &[10, 244, 1, 1, 0x1f, 0x90, 6, 1]);
        assert_eq!(
            u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            7
        );
    }
}
