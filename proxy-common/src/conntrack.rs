//! Per-flow state: which backend a flow was given, and how to reverse-translate its replies.

use bytemuck::{Pod, Zeroable};

/// `LruHashMap<CtKey4, CtEntry4>`. Two entries per flow: the forward one keyed by the client's
/// tuple towards the frontend, the reply one keyed by the backend's tuple towards the client.
pub const CT4: &str = "CT4";

/// 512k entries = 256k flows. Entry cost is about 16 + 32 bytes plus the kernel's per-element
/// overhead (~64 bytes) = ~56 MiB at the default size.
pub const DEFAULT_CT: u32 = 524_288;

/// Key direction: client -> frontend.
pub const CT_DIR_FORWARD: u8 = 0;
/// Key direction: backend -> client.
pub const CT_DIR_REPLY: u8 = 1;

/// A FIN or RST was seen on this TCP flow: it expires after [`CT_TIMEOUT_CLOSING_NS`].
pub const CT_F_CLOSING: u16 = 1;
/// The flow has only seen a SYN: it expires after [`CT_TIMEOUT_SYN_NS`].
pub const CT_F_SYN_ONLY: u16 = 2;

/// Idle timeouts, matching Cilium's defaults.
pub const CT_TIMEOUT_TCP_NS: u64 = 21_600 * 1_000_000_000;
pub const CT_TIMEOUT_SYN_NS: u64 = 60 * 1_000_000_000;
pub const CT_TIMEOUT_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_TIMEOUT_UDP_NS: u64 = 60 * 1_000_000_000;
/// `last_seen_ns` is written at most this often, to keep the established path read-mostly.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// IP protocol number of TCP, the one protocol whose flows have states.
pub const PROTO_TCP: u8 = 6;
/// TCP header flags the flow table follows.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// How long an entry lives without traffic, by protocol and TCP state (`CT_F_*` flags).
#[inline(always)]
pub const fn ct_timeout_ns(proto: u8, flags: u16) -> u64 {
    if proto != PROTO_TCP {
        CT_TIMEOUT_UDP_NS
    } else if flags & CT_F_CLOSING != 0 {
        CT_TIMEOUT_CLOSING_NS
    } else if flags & CT_F_SYN_ONLY != 0 {
        CT_TIMEOUT_SYN_NS
    } else {
        CT_TIMEOUT_TCP_NS
    }
}

/// Whether an entry (its `last_seen_ns` and `flags`) may carry a packet of protocol `proto`
/// with TCP flags `tcp_flags` at `now_ns`: not idle past its timeout, and not a closed TCP flow
/// whose tuple a new connection (a bare SYN) is reusing. Shared by the datapath and
/// `svcproxy explain`.
#[inline(always)]
pub const fn ct_is_live(
    last_seen_ns: u64,
    flags: u16,
    proto: u8,
    tcp_flags: u8,
    now_ns: u64,
) -> bool {
    if now_ns.wrapping_sub(last_seen_ns) > ct_timeout_ns(proto, flags) {
        return false;
    }
    let bare_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    !(proto == PROTO_TCP && bare_syn && flags & CT_F_CLOSING != 0)
}

/// Key of [`CT4`], in the orientation of the packet that looks it up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey4 {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// `CT_DIR_FORWARD` or `CT_DIR_REPLY`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of [`CT4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry4 {
    /// Forward: the backend address and port to DNAT to. Reply: the frontend address and port
    /// to put back as the source.
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    /// `CT_F_*` bits.
    pub flags: u16,
    pub svc_id: u32,
    pub backend_id: u32,
    /// The frontend's revision when the backend was last validated.
    pub revision: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution) when the flow was last
    /// refreshed.
    pub last_seen_ns: u64,
}

const _: () = assert!(size_of::<CtKey4>() == 16);
const _: () = assert!(size_of::<CtEntry4>() == 32);

crate::impl_user_pod!(CtKey4, CtEntry4);

/// `LruHashMap<AffinityKey4, AffinityEntry>`: which backend a client was last given per service.
pub const AFFINITY4: &str = "AFFINITY4";
pub const DEFAULT_AFFINITY: u32 = 65_536;

/// `LruHashMap<FragKey4, FragPorts>`: ports of fragmented datagrams, learnt from the first
/// fragment so later fragments (which carry no L4 header) follow the same translation.
pub const FRAG4: &str = "FRAG4";
pub const DEFAULT_FRAG: u32 = 8_192;

/// Key of [`AFFINITY4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey4 {
    pub svc_id: u32,
    pub client_addr_be: u32,
}

/// Value of [`AFFINITY4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityEntry {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
}

/// Key of [`FRAG4`]: the (untranslated) datagram identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey4 {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`FRAG4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
}

const _: () = assert!(size_of::<AffinityKey4>() == 8);
const _: () = assert!(size_of::<AffinityEntry>() == 16);
const _: () = assert!(size_of::<FragKey4>() == 12);
const _: () = assert!(size_of::<FragPorts>() == 4);

crate::impl_user_pod!(AffinityKey4, AffinityEntry, FragKey4, FragPorts);
