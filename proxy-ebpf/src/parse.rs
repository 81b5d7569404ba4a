//! Packet parsing: Ethernet -> IPv4 (L4 offset from IHL, never a fixed 20 bytes) -> TCP, UDP or
//! SCTP ports. Every read is bounds-checked; inconsistent headers are reported, not guessed at.

use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::packet::{L4Csum, Packet, ptr_at};

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offset of the IPv4 header checksum and addresses from the start of the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;

/// What a packet is, as far as load balancing cares.
pub enum Parsed {
    /// An IPv4 TCP/UDP/SCTP packet with ports.
    Flow(Flow4),
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...).
    NotIpv4,
    /// IPv4 but nothing to balance: another protocol (ICMP, ...).
    OtherIpv4,
    /// A non-first fragment: it carries no L4 header, so there are no ports to match.
    Fragment,
    /// Too short or inconsistent headers.
    Malformed,
}

/// The fields of an IPv4 L4 packet the core needs. Addresses and ports are kept as loaded from
/// the packet (network byte order in memory), the same representation the map keys use.
pub struct Flow4 {
    pub l3_off: usize,
    pub l4_off: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flag bits (FIN, SYN, RST, ...); 0 for other protocols.
    pub tcp_flags: u8,
    pub l4_csum: L4Csum,
}

#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Parsed {
    let Some(eth) = ptr_at::<_, EthHdr>(pkt, 0) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds-checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type != EtherType::Ipv4 as u16 {
        return Parsed::NotIpv4;
    }
    let l3_off = EthHdr::LEN;
    let Some(ip) = ptr_at::<_, Ipv4Hdr>(pkt, l3_off) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl_bytes = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl_bytes < Ipv4Hdr::LEN {
        return Parsed::Malformed;
    }
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < ihl_bytes || l3_off + tot_len > pkt.len() {
        return Parsed::Malformed;
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & 0x1fff != 0 {
        return Parsed::Fragment;
    }
    let l4_off = l3_off + ihl_bytes;
    let l4_len = tot_len - ihl_bytes;
    let mut flow = Flow4 {
        l3_off,
        l4_off,
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        proto: ip.proto,
        tcp_flags: 0,
        l4_csum: L4Csum::None,
    };
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
        _ => return Parsed::OtherIpv4,
    }
    Parsed::Flow(flow)
}
