//! Building test frames (Ethernet + IPv4 + TCP/UDP/SCTP/ICMP, fragments, VLAN-tagged and IPv6
//! frames) with full, independently computed checksums, and checking frames the datapath
//! produced.

use std::net::Ipv4Addr;

use proxy_common::csum;

pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// IP flags+fragment-offset field values.
pub const DF: u16 = 0x4000;
pub const MF: u16 = 0x2000;

/// ICMP types and codes the fixtures use.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
pub const CODE_PORT_UNREACH: u8 = 3;
pub const CODE_FRAG_NEEDED: u8 = 4;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// An IPv4 packet to build. Defaults give a valid TCP SYN with no payload (or, for ICMP, an
/// ICMP header with an empty body), sent from the client towards the node.
#[derive(Clone, Debug)]
pub struct Ip {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    /// Written only when the ACK flag is set (the field is zero otherwise).
    pub ack: u32,
    pub window: u16,
    /// TCP options (padded to 4 bytes by the caller); the data offset follows their length.
    pub tcp_options: Vec<u8>,
    /// ICMP type and code (`proto == ICMP`).
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// ICMP "rest of header" (identifier+sequence, next-hop MTU, pointer, ...).
    pub icmp_rest: [u8; 4],
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
    /// Send UDP without a checksum (field 0).
    pub udp_no_csum: bool,
    /// Raw flags+fragment offset field.
    pub frag: u16,
    pub id: u16,
    pub tos: u8,
    pub ttl: u8,
    pub ether_type: u16,
    /// Node -> client MACs (a frame the datapath sends back) instead of client -> node.
    pub reply_macs: bool,
}

pub fn ip(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> Ip {
    Ip {
        src: src.0,
        dst: dst.0,
        sport: src.1,
        dport: dst.1,
        proto,
        tcp_flags: if proto == TCP { SYN } else { 0 },
        seq: 1000,
        ack: 2000,
        window: 64240,
        tcp_options: Vec::new(),
        icmp_type: 0,
        icmp_code: 0,
        icmp_rest: [0; 4],
        options: Vec::new(),
        payload: Vec::new(),
        udp_no_csum: false,
        frag: DF,
        id: 0x1234,
        tos: 0,
        ttl: 64,
        ether_type: ETHERTYPE_IPV4,
        reply_macs: false,
    }
}

/// An ICMP message from `src` to `dst`; the body (a quote, echo data) is the payload.
pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, code: u8) -> Ip {
    Ip {
        icmp_type,
        icmp_code: code,
        ..ip((src, 0), (dst, 0), ICMP)
    }
}

impl Ip {
    pub fn flags(mut self, f: u8) -> Self {
        self.tcp_flags = f;
        self
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn window(mut self, window: u16) -> Self {
        self.window = window;
        self
    }

    pub fn tcp_options(mut self, o: &[u8]) -> Self {
        assert!(
            o.len().is_multiple_of(4) && o.len() <= 40,
            "TCP options must pad to 4 bytes"
        );
        self.tcp_options = o.to_vec();
        self
    }

    pub fn rest(mut self, rest: [u8; 4]) -> Self {
        self.icmp_rest = rest;
        self
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn options(mut self, o: &[u8]) -> Self {
        self.options = o.to_vec();
        self
    }

    pub fn no_udp_csum(mut self) -> Self {
        self.udp_no_csum = true;
        self
    }

    pub fn frag(mut self, field: u16) -> Self {
        self.frag = field;
        self
    }

    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn reply_macs(mut self) -> Self {
        self.reply_macs = true;
        self
    }

    /// The same packet with other addresses (the expected translation).
    pub fn with_src(mut self, a: Ipv4Addr, port: u16) -> Self {
        self.src = a;
        self.sport = port;
        self
    }

    pub fn with_dst(mut self, a: Ipv4Addr, port: u16) -> Self {
        self.dst = a;
        self.dport = port;
        self
    }

    /// Appends two payload bytes chosen so the UDP checksum of this packet computes to zero,
    /// which UDP must send as 0xffff (RFC 768).
    pub fn udp_csum_computes_to_zero(mut self) -> Self {
        assert_eq!(self.proto, UDP, "only UDP has the zero-checksum rule");
        assert!(
            self.payload.len().is_multiple_of(2),
            "the tuning word must be 16-bit aligned"
        );
        self.payload.extend_from_slice(&[0, 0]);
        let mut l4 = self.l4();
        l4[6] = 0;
        l4[7] = 0;
        // The sum with the last word zero is !c; adding c makes it 0xffff, whose complement
        // (the checksum) is zero.
        let c = csum::l4_ipv4(self.src.octets(), self.dst.octets(), UDP, &l4);
        let n = self.payload.len();
        self.payload[n - 2..].copy_from_slice(&c.to_be_bytes());
        assert_eq!(u16::from_be_bytes([self.l4()[6], self.l4()[7]]), 0xffff);
        self
    }

    fn ihl(&self) -> usize {
        let ihl = 20 + self.options.len();
        assert!(
            ihl.is_multiple_of(4) && ihl <= 60,
            "IP options must pad to 4 bytes"
        );
        ihl
    }

    /// The L4 header and payload, with its checksum over the whole datagram.
    pub fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        if self.proto == ICMP {
            l4.extend_from_slice(&[self.icmp_type, self.icmp_code, 0, 0]);
            l4.extend_from_slice(&self.icmp_rest);
        } else {
            l4.extend_from_slice(&self.sport.to_be_bytes());
            l4.extend_from_slice(&self.dport.to_be_bytes());
        }
        match self.proto {
            TCP => {
                l4.extend_from_slice(&self.seq.to_be_bytes());
                let ack = if self.tcp_flags & ACK != 0 {
                    self.ack
                } else {
                    0
                };
                l4.extend_from_slice(&ack.to_be_bytes());
                l4.push((((20 + self.tcp_options.len()) / 4) << 4) as u8);
                l4.push(self.tcp_flags);
                l4.extend_from_slice(&self.window.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]); // csum, urg
                l4.extend_from_slice(&self.tcp_options);
            }
            UDP => {
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            SCTP => {
                l4.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]); // vtag, crc
            }
            _ => {}
        }
        l4.extend_from_slice(&self.payload);
        let c = match self.proto {
            TCP => Some((
                16,
                csum::l4_ipv4(self.src.octets(), self.dst.octets(), TCP, &l4),
            )),
            UDP if !self.udp_no_csum => Some((
                6,
                csum::udp_fixup(csum::l4_ipv4(
                    self.src.octets(),
                    self.dst.octets(),
                    UDP,
                    &l4,
                )),
            )),
            ICMP => Some((2, !csum::fold(csum::sum_be(&l4, 0)))),
            _ => None,
        };
        if let Some((off, c)) = c {
            l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        l4
    }

    /// The IPv4 header for a (fragment of the) datagram with `l4_len` bytes after it.
    fn header(&self, l4_len: usize, frag: u16) -> Vec<u8> {
        let ihl = self.ihl();
        let mut hdr = vec![0x40 | (ihl / 4) as u8, self.tos];
        hdr.extend_from_slice(&((ihl + l4_len) as u16).to_be_bytes());
        hdr.extend_from_slice(&self.id.to_be_bytes());
        hdr.extend_from_slice(&frag.to_be_bytes());
        hdr.push(self.ttl);
        hdr.push(self.proto);
        hdr.extend_from_slice(&[0, 0]);
        hdr.extend_from_slice(&self.src.octets());
        hdr.extend_from_slice(&self.dst.octets());
        hdr.extend_from_slice(&self.options);
        let c = csum::ipv4_header(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        hdr
    }

    fn eth(&self) -> Vec<u8> {
        let (dst, src) = if self.reply_macs {
            (CLIENT_MAC, NODE_MAC)
        } else {
            (NODE_MAC, CLIENT_MAC)
        };
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&self.ether_type.to_be_bytes());
        f
    }

    /// The IPv4 datagram (no Ethernet header).
    pub fn datagram(&self) -> Vec<u8> {
        let l4 = self.l4();
        let mut d = self.header(l4.len(), self.frag);
        d.extend_from_slice(&l4);
        d
    }

    /// The whole Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let mut f = self.eth();
        f.extend_from_slice(&self.datagram());
        f
    }

    /// What an ICMP error about this packet quotes: its IPv4 header (with options) and the
    /// first `l4_bytes` bytes after it.
    pub fn quote(&self, l4_bytes: usize) -> Vec<u8> {
        let d = self.datagram();
        d[..self.ihl() + l4_bytes].to_vec()
    }

    /// The datagram split in two fragments: the first carries the first `first_len` bytes of
    /// the L4 header and payload (MF set, offset 0), the second the rest. The L4 checksum
    /// covers the whole datagram, as the sender computed it before fragmenting.
    pub fn fragments(&self, first_len: usize) -> (Vec<u8>, Vec<u8>) {
        assert!(
            first_len.is_multiple_of(8),
            "fragment offsets count 8-byte units"
        );
        let l4 = self.l4();
        assert!(
            first_len < l4.len(),
            "the datagram must be longer than its first fragment"
        );
        let mut first = self.eth();
        first.extend_from_slice(&self.header(first_len, MF));
        first.extend_from_slice(&l4[..first_len]);
        let mut later = self.eth();
        later.extend_from_slice(&self.header(l4.len() - first_len, (first_len / 8) as u16));
        later.extend_from_slice(&l4[first_len..]);
        (first, later)
    }
}

/// `frame` (an untagged Ethernet frame) with an 802.1Q tag for `vid` inserted.
pub fn vlan_tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// An IPv6 UDP datagram (fd00::10:40000 -> fd00::a:53) in an Ethernet frame.
pub fn ipv6_udp_frame() -> Vec<u8> {
    let src: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    let dst: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
    let payload = b"query";
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, UDP]);
    let c = csum::udp_fixup(!csum::fold(csum::sum_be(&udp, csum::sum_be(&pseudo, 0))));
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no traffic class or flow label
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.push(UDP);
    f.push(64);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&udp);
    f
}

/// An ARP request (who has 10.96.0.10?) in a broadcast frame.
pub fn arp_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[10, 244, 0, 10]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 96, 0, 10]);
    f
}

/// Recomputes the IPv4 header checksum and, where the frame holds the whole segment, the
/// TCP/UDP checksum of `frame` after a fixture deliberately broke a header field, so the only
/// defect left is the one under test.
pub fn fix_csums(frame: &mut [u8]) {
    if frame.len() < 34 {
        return;
    }
    let ihl = ((frame[14] & 0x0f) as usize * 4).clamp(20, frame.len() - 14);
    frame[24] = 0;
    frame[25] = 0;
    let c = csum::ipv4_header(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let (l4, end) = (14 + ihl, 14 + tot);
    let off = match frame[23] {
        TCP => 16,
        UDP => 6,
        _ => return,
    };
    if end > frame.len() || l4 + off + 2 > end {
        return;
    }
    let (src, dst) = (
        [frame[26], frame[27], frame[28], frame[29]],
        [frame[30], frame[31], frame[32], frame[33]],
    );
    frame[l4 + off] = 0;
    frame[l4 + off + 1] = 0;
    let mut c = csum::l4_ipv4(src, dst, frame[23], &frame[l4..end]);
    if frame[23] == UDP {
        c = csum::udp_fixup(c);
    }
    frame[l4 + off..l4 + off + 2].copy_from_slice(&c.to_be_bytes());
}

/// Where the checksums of an IPv4 frame sit, as (offset in the frame, kind).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Csum {
    /// Internet checksum: 0x0000 and 0xffff are the same number.
    Internet,
    /// UDP: 0x0000 means "no checksum", so it is not interchangeable with 0xffff.
    Udp,
}

fn csum_fields(frame: &[u8]) -> Vec<(usize, Csum)> {
    let mut out = Vec::new();
    if frame.len() < 34 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4 {
        return out;
    }
    out.push((24, Csum::Internet));
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let l4 = 14 + ihl;
    let first_frag = u16::from_be_bytes([frame[20], frame[21]]) & 0x1fff == 0;
    let field = match frame[23] {
        TCP => Some((l4 + 16, Csum::Internet)),
        UDP => Some((l4 + 6, Csum::Udp)),
        ICMP => Some((l4 + 2, Csum::Internet)),
        _ => None,
    };
    if let Some((off, kind)) = field.filter(|(off, _)| first_frag && off + 1 < frame.len()) {
        out.push((off, kind));
    }
    // An ICMP error's quoted IPv4 header has a checksum of its own.
    if frame[23] == ICMP && is_icmp_error(frame.get(l4).copied()) && frame.len() >= l4 + 8 + 20 {
        out.push((l4 + 8 + 10, Csum::Internet));
    }
    out
}

fn is_icmp_error(icmp_type: Option<u8>) -> bool {
    matches!(
        icmp_type,
        Some(ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM)
    )
}

/// Recomputes the IPv4, TCP/UDP/ICMP and (for ICMP errors) quoted IPv4 header checksums of
/// `frame` and says which one is wrong. The L4 checksum of a fragment covers the whole
/// datagram, so it cannot be recomputed here; [`same_frame`] compares it with the expected one.
pub fn checksums_valid(frame: &[u8]) -> Result<(), String> {
    let ip = &frame[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < 20 || tot < ihl || tot > ip.len() {
        return Err(format!(
            "inconsistent IPv4 header: IHL {ihl}, total length {tot}"
        ));
    }
    let want = header_csum(&ip[..ihl]);
    let got = u16::from_be_bytes([ip[10], ip[11]]);
    if !same_csum(got, want) {
        return Err(format!(
            "IPv4 header checksum {got:#06x}, recomputed {want:#06x}"
        ));
    }
    let (proto, src, dst) = (
        ip[9],
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
    );
    let frags = u16::from_be_bytes([ip[6], ip[7]]);
    if frags & 0x1fff != 0 || frags & MF != 0 {
        return Ok(());
    }
    let mut l4 = ip[ihl..tot].to_vec();
    let off = match proto {
        TCP => 16,
        UDP => 6,
        ICMP => 2,
        _ => return Ok(()),
    };
    if l4.len() < off + 2 {
        return Err(format!(
            "L4 header of protocol {proto} truncated to {} bytes",
            l4.len()
        ));
    }
    let got = u16::from_be_bytes([l4[off], l4[off + 1]]);
    l4[off] = 0;
    l4[off + 1] = 0;
    match proto {
        UDP if got == 0 => {}
        UDP => {
            let want = csum::udp_fixup(csum::l4_ipv4(src, dst, proto, &l4));
            if got != want {
                return Err(format!("UDP checksum {got:#06x}, recomputed {want:#06x}"));
            }
        }
        ICMP => {
            let want = !csum::fold(csum::sum_be(&l4, 0));
            if !same_csum(got, want) {
                return Err(format!("ICMP checksum {got:#06x}, recomputed {want:#06x}"));
            }
            if is_icmp_error(Some(l4[0])) && l4.len() >= 8 + 20 {
                let inner = &l4[8..];
                let inner_ihl = ((inner[0] & 0x0f) as usize * 4).min(inner.len());
                let want = header_csum(&inner[..inner_ihl]);
                let got = u16::from_be_bytes([inner[10], inner[11]]);
                if !same_csum(got, want) {
                    return Err(format!(
                        "quoted IPv4 header checksum {got:#06x}, recomputed {want:#06x}"
                    ));
                }
            }
        }
        _ => {
            let want = csum::l4_ipv4(src, dst, proto, &l4);
            if !same_csum(got, want) {
                return Err(format!("L4 checksum {got:#06x}, recomputed {want:#06x}"));
            }
        }
    }
    Ok(())
}

/// The checksum an IPv4 header should carry (its own checksum field taken as zero).
fn header_csum(hdr: &[u8]) -> u16 {
    let mut hdr = hdr.to_vec();
    hdr[10] = 0;
    hdr[11] = 0;
    csum::ipv4_header(&hdr)
}

/// 0x0000 and 0xffff are the same one's-complement number.
fn same_csum(a: u16, b: u16) -> bool {
    a == b || (a | b == 0xffff && (a == 0 || b == 0))
}

/// Compares frames byte by byte. Checksum fields must equal the expected frame's (whose
/// checksums were computed in full), except that an Internet checksum may be the other
/// representation of zero (an incremental update may legally produce it); every checksum of
/// the output is also recomputed, and so are the expected frame's, to catch fixture mistakes.
pub fn same_frame(got: &[u8], want: &[u8]) -> Result<(), String> {
    checksums_valid_if_ipv4(want)
        .map_err(|e| format!("the expected frame itself is wrong: {e}"))?;
    if got.len() != want.len() {
        return Err(format!(
            "length {} != expected {}\n  got:  {}\n  want: {}",
            got.len(),
            want.len(),
            hex(got),
            hex(want)
        ));
    }
    checksums_valid_if_ipv4(got)?;
    let fields = csum_fields(want);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g == w {
            continue;
        }
        let field = fields.iter().find(|(off, _)| i == *off || i == off + 1);
        if let Some((off, Csum::Internet)) = field {
            let g = u16::from_be_bytes([got[*off], got[off + 1]]);
            let w = u16::from_be_bytes([want[*off], want[off + 1]]);
            if same_csum(g, w) {
                continue;
            }
        }
        return Err(format!(
            "byte {i}: {g:#04x} != expected {w:#04x}\n  got:  {}\n  want: {}",
            hex(got),
            hex(want)
        ));
    }
    Ok(())
}

fn checksums_valid_if_ipv4(frame: &[u8]) -> Result<(), String> {
    if frame.len() >= 34 && u16::from_be_bytes([frame[12], frame[13]]) == ETHERTYPE_IPV4 {
        checksums_valid(frame)
    } else {
        Ok(())
    }
}

/// A frame as hex, one space between header-sized groups of 4 bytes, for failure messages.
pub fn hex(frame: &[u8]) -> String {
    frame
        .chunks(4)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The checker itself: a fixture suite whose comparison accepted wrong frames would pass
/// vacuously.
mod checker {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
    const B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

    #[test]
    fn same_frame_accepts_an_identical_frame() {
        let f = ip((A, 40000), (B, 80), TCP).payload(b"data").frame();
        same_frame(&f, &f).unwrap();
    }

    #[test]
    fn same_frame_reports_a_changed_payload_byte() {
        let want = ip((A, 40000), (B, 80), TCP).payload(b"data").frame();
        let mut got = want.clone();
        *got.last_mut().unwrap() ^= 1;
        assert!(
            same_frame(&got, &want).is_err(),
            "a changed payload byte went unnoticed"
        );
    }

    #[test]
    fn same_frame_reports_an_address_rewritten_without_its_l4_checksum() {
        let before = ip((A, 40000), (B, 80), TCP).frame();
        let want = ip((A, 40000), (C, 80), TCP).frame();
        let mut got = before.clone();
        got[30..34].copy_from_slice(&C.octets());
        got[24..26].copy_from_slice(&want[24..26]); // IP checksum fixed, TCP checksum stale
        let err = same_frame(&got, &want).expect_err("a stale TCP checksum went unnoticed");
        assert!(err.contains("L4 checksum"), "{err}");
    }

    #[test]
    fn udp_checksum_0_is_not_the_same_as_0xffff() {
        let want = ip((A, 40000), (B, 53), UDP)
            .payload(b"zero")
            .udp_csum_computes_to_zero()
            .frame();
        assert_eq!(want[40..42], [0xff, 0xff]);
        let mut got = want.clone();
        got[40..42].copy_from_slice(&[0, 0]);
        assert!(
            same_frame(&got, &want).is_err(),
            "UDP checksum 0 (none) accepted for 0xffff"
        );
    }

    #[test]
    fn checksums_valid_checks_the_quoted_header_of_an_icmp_error() {
        let quoted = ip((A, 40000), (B, 53), UDP).payload(b"q");
        let mut quote = quoted.quote(8);
        quote[8] = 1; // TTL changed, the quoted header checksum left stale
        let f = icmp(C, A, ICMP_DEST_UNREACH, CODE_PORT_UNREACH)
            .payload(&quote)
            .frame();
        let err = checksums_valid(&f).expect_err("a stale quoted header checksum went unnoticed");
        assert!(err.contains("quoted IPv4 header"), "{err}");
    }

    #[test]
    fn checksums_valid_checks_the_icmp_checksum() {
        let mut f = icmp(C, A, ICMP_ECHO_REPLY, 0).payload(b"ping").frame();
        *f.last_mut().unwrap() ^= 1;
        let err = checksums_valid(&f).expect_err("a bad ICMP checksum went unnoticed");
        assert!(err.contains("ICMP checksum"), "{err}");
    }

    #[test]
    fn fragments_carry_the_datagram_in_8_byte_units_with_one_l4_checksum() {
        let d = ip((A, 40000), (B, 53), UDP).id(0x4242).payload(&[7; 40]);
        let (first, later) = d.fragments(24);
        assert_eq!(
            u16::from_be_bytes([first[20], first[21]]),
            MF,
            "first: MF, offset 0"
        );
        assert_eq!(
            u16::from_be_bytes([later[20], later[21]]),
            3,
            "later: offset 24 / 8"
        );
        assert_eq!(
            [first[18], first[19]],
            [0x42, 0x42],
            "fragments share the IP id"
        );
        let mut joined = first[34..].to_vec();
        joined.extend_from_slice(&later[34..]);
        assert_eq!(
            joined,
            d.l4(),
            "the fragments hold the whole datagram, in order"
        );
        checksums_valid(&first).unwrap();
        checksums_valid(&later).unwrap();
    }

    #[test]
    fn fix_csums_makes_an_edited_header_consistent_again() {
        let mut f = ip((A, 40000), (B, 80), TCP).frame();
        f[22] = 3; // TTL
        f[46] = 6 << 4; // data offset
        fix_csums(&mut f);
        checksums_valid(&f).unwrap();
    }
}
