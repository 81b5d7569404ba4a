//! Packet parsing: Ethernet -> IPv4 (L4 offset from IHL, never a fixed 20 bytes) -> TCP, UDP or
//! SCTP ports, or the flow quoted inside an ICMP error. Every read is bounds-checked;
//! inconsistent headers are reported, not guessed at.

use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};
pub use proxy_common::conntrack::{PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::packet::{L4Csum, Packet, ptr_at};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Offsets inside an IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;

/// Where a packet stands in IP fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// A whole datagram.
    None,
    /// The first fragment: it has the L4 header; later fragments will need its ports.
    First,
    /// A later fragment: no L4 header, so no ports to match (they come from `FRAG4`).
    Later,
}

/// What a packet is, as far as load balancing cares. The details are written into the
/// caller's (zero-initialised) structs rather than carried in enum payloads: with payloads,
/// LLVM merges the variants into registers and speculatively reads one that is undefined on
/// some paths, which the verifier rejects (`!read_ok`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// An IPv4 TCP/UDP/SCTP packet (or a later fragment of one): see the `Flow4`.
    Flow,
    /// An ICMP error quoting a TCP/UDP/SCTP packet: see the `IcmpError4`.
    IcmpError,
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...).
    NotIpv4,
    /// IPv4 but nothing to balance: another protocol, an ICMP query, ...
    OtherIpv4,
    /// Too short or inconsistent headers.
    Malformed,
}

/// The fields of an IPv4 L4 packet the core needs. Addresses and ports are kept as loaded from
/// the packet (network byte order in memory), the same representation the map keys use.
#[derive(Clone, Copy)]
pub struct Flow4 {
    pub l3_off: usize,
    pub l4_off: usize,
    pub saddr: u32,
    pub daddr: u32,
    /// Zero for a later fragment until looked up in `FRAG4`.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flag bits (FIN, SYN, RST, ACK, ...); 0 for other protocols.
    pub tcp_flags: u8,
    pub l4_csum: L4Csum,
    pub frag: Frag,
    /// IP identification as loaded (network order), for fragment tracking.
    pub ip_id: u16,
    /// IP total length (host order), for byte counters and reject replies.
    pub tot_len: u16,
    /// IHL in bytes.
    pub ihl: usize,
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) and the flow it
/// quotes: the packet the error is about, as that packet was sent.
#[derive(Clone, Copy)]
pub struct IcmpError4 {
    pub l3_off: usize,
    pub saddr: u32,
    pub icmp_off: usize,
    pub inner_l3_off: usize,
    pub inner_l4_off: usize,
    pub inner_saddr: u32,
    pub inner_daddr: u32,
    pub inner_sport: u16,
    pub inner_dport: u16,
    pub inner_proto: u8,
}

/// Reads the IPv4 header at `l3_off`: (header, IHL in bytes), or `None` if malformed.
#[inline(always)]
fn ipv4<P: Packet>(pkt: &P, l3_off: usize) -> Option<(&Ipv4Hdr, usize)> {
    let ip = ptr_at::<_, Ipv4Hdr>(pkt, l3_off)?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    Some((ip, ihl))
}

impl Flow4 {
    pub const fn zeroed() -> Self {
        Self {
            l3_off: 0,
            l4_off: 0,
            saddr: 0,
            daddr: 0,
            sport: 0,
            dport: 0,
            proto: 0,
            tcp_flags: 0,
            l4_csum: L4Csum::None,
            frag: Frag::None,
            ip_id: 0,
            tot_len: 0,
            ihl: 0,
        }
    }
}

impl IcmpError4 {
    pub const fn zeroed() -> Self {
        Self {
            l3_off: 0,
            saddr: 0,
            icmp_off: 0,
            inner_l3_off: 0,
            inner_l4_off: 0,
            inner_saddr: 0,
            inner_daddr: 0,
            inner_sport: 0,
            inner_dport: 0,
            inner_proto: 0,
        }
    }
}

#[inline(always)]
pub fn parse<P: Packet>(pkt: &P, flow: &mut Flow4, icmp: &mut IcmpError4) -> Parsed {
    let Some(eth) = ptr_at::<_, EthHdr>(pkt, 0) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Parsed::NotIpv4;
    }
    let l3_off = EthHdr::LEN;
    let Some((ip, ihl)) = ipv4(pkt, l3_off) else {
        return Parsed::Malformed;
    };
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < ihl || !pkt.has_len(l3_off + tot_len) {
        return Parsed::Malformed;
    }
    let frags = u16::from_be_bytes(ip.frags);
    let frag = if frags & 0x1fff != 0 {
        Frag::Later
    } else if frags & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    let l4_off = l3_off + ihl;
    let l4_len = tot_len - ihl;
    flow.l3_off = l3_off;
    flow.l4_off = l4_off;
    flow.saddr = u32::from_ne_bytes(ip.src_addr);
    flow.daddr = u32::from_ne_bytes(ip.dst_addr);
    flow.proto = ip.proto;
    flow.frag = frag;
    flow.ip_id = u16::from_ne_bytes(ip.id);
    flow.tot_len = tot_len as u16;
    flow.ihl = ihl;
    if frag == Frag::Later {
        return match flow.proto {
            PROTO_TCP | PROTO_UDP | PROTO_SCTP => Parsed::Flow,
            _ => Parsed::OtherIpv4,
        };
    }
    match flow.proto {
        PROTO_TCP => {
            let Some(tcp) = ptr_at::<_, TcpHdr>(pkt, l4_off) else {
                return Parsed::Malformed;
            };
            // SAFETY: bounds-checked by ptr_at.
            let (tcp, raw) = unsafe { (&*tcp, &*(tcp as *const [u8; TcpHdr::LEN])) };
            // Byte 12 holds the data offset, byte 13 the flags (CWR..FIN); plain byte reads
            // are cheaper than the bitfield accessors.
            let doff = (raw[12] >> 4) as usize * 4;
            if doff < TcpHdr::LEN || doff > l4_len {
                return Parsed::Malformed;
            }
            flow.sport = u16::from_ne_bytes(tcp.source);
            flow.dport = u16::from_ne_bytes(tcp.dest);
            flow.tcp_flags = raw[13];
            flow.l4_csum = L4Csum::Tcp(l4_off + 16);
        }
        PROTO_UDP => {
            let Some(udp) = ptr_at::<_, UdpHdr>(pkt, l4_off) else {
                return Parsed::Malformed;
            };
            // SAFETY: bounds-checked by ptr_at.
            let udp = unsafe { &*udp };
            if (u16::from_be_bytes(udp.len) as usize) < UdpHdr::LEN || l4_len < UdpHdr::LEN {
                return Parsed::Malformed;
            }
            flow.sport = u16::from_ne_bytes(udp.src);
            flow.dport = u16::from_ne_bytes(udp.dst);
            if udp.check != [0, 0] {
                flow.l4_csum = L4Csum::Udp(l4_off + 6);
            }
        }
        PROTO_SCTP => {
            // SCTP's common header starts with the two ports, like UDP's.
            let Some(ports) = ptr_at::<_, [u16; 2]>(pkt, l4_off) else {
                return Parsed::Malformed;
            };
            if l4_len < 12 {
                return Parsed::Malformed;
            }
            // SAFETY: bounds-checked by ptr_at.
            let ports = unsafe { *ports };
            flow.sport = ports[0];
            flow.dport = ports[1];
        }
        PROTO_ICMP if frag == Frag::None => return icmp_error(pkt, flow, icmp),
        _ => return Parsed::OtherIpv4,
    }
    Parsed::Flow
}

/// ICMP types that quote the offending packet.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

#[inline(always)]
fn icmp_error<P: Packet>(pkt: &P, outer: &Flow4, out: &mut IcmpError4) -> Parsed {
    let Some(icmp) = ptr_at::<_, [u8; 8]>(pkt, outer.l4_off) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds-checked by ptr_at.
    let icmp_type = unsafe { (*icmp)[0] };
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return Parsed::OtherIpv4;
    }
    let inner_l3_off = outer.l4_off + 8;
    let Some((inner, inner_ihl)) = ipv4(pkt, inner_l3_off) else {
        return Parsed::OtherIpv4;
    };
    let inner_proto = inner.proto;
    if !matches!(inner_proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        return Parsed::OtherIpv4;
    }
    let (inner_saddr, inner_daddr) = (
        u32::from_ne_bytes(inner.src_addr),
        u32::from_ne_bytes(inner.dst_addr),
    );
    let inner_l4_off = inner_l3_off + inner_ihl;
    // An ICMP error quotes at least 8 bytes of the offending L4 header: the ports.
    let Some(ports) = ptr_at::<_, [u16; 2]>(pkt, inner_l4_off) else {
        return Parsed::OtherIpv4;
    };
    // SAFETY: bounds-checked by ptr_at.
    let ports = unsafe { *ports };
    *out = IcmpError4 {
        l3_off: outer.l3_off,
        saddr: outer.saddr,
        icmp_off: outer.l4_off,
        inner_l3_off,
        inner_l4_off,
        inner_saddr,
        inner_daddr,
        inner_sport: ports[0],
        inner_dport: ports[1],
        inner_proto,
    };
    Parsed::IcmpError
}
