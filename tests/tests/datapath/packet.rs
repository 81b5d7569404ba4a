//! Building test frames (Ethernet + IPv4 + TCP/UDP/SCTP) with full, independently computed
//! checksums, and checking frames the datapath produced.

use std::net::Ipv4Addr;

use proxy_common::csum;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// An IPv4 packet to build. Defaults give a valid TCP SYN with no payload.
#[derive(Clone, Debug)]
pub struct Ip {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
    /// Send UDP without a checksum (field 0).
    pub udp_no_csum: bool,
    /// Raw flags+fragment offset field.
    pub frag: u16,
    pub ether_type: u16,
}

pub fn ip(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> Ip {
    Ip {
        src: src.0,
        dst: dst.0,
        sport: src.1,
        dport: dst.1,
        proto,
        tcp_flags: if proto == TCP { SYN } else { 0 },
        options: Vec::new(),
        payload: Vec::new(),
        udp_no_csum: false,
        frag: 0x4000, // DF
        ether_type: 0x0800,
    }
}

impl Ip {
    pub fn flags(mut self, f: u8) -> Self {
        self.tcp_flags = f;
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

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        match self.proto {
            TCP => {
                l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
                l4.extend_from_slice(&(if self.tcp_flags & ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
                l4.push(5 << 4);
                l4.push(self.tcp_flags);
                l4.extend_from_slice(&64240u16.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]); // csum, urg
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
            TCP => Some((16, csum::l4_ipv4(self.src.octets(), self.dst.octets(), TCP, &l4))),
            UDP if !self.udp_no_csum => Some((
                6,
                csum::udp_fixup(csum::l4_ipv4(self.src.octets(), self.dst.octets(), UDP, &l4)),
            )),
            _ => None,
        };
        if let Some((off, c)) = c {
            l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        l4
    }

    /// The whole Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let l4 = self.l4();
        let ihl = 20 + self.options.len();
        assert!(ihl % 4 == 0 && ihl <= 60, "IP options must pad to 4 bytes");
        let mut f = Vec::new();
        f.extend_from_slice(&NODE_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&self.ether_type.to_be_bytes());
        let mut hdr = vec![0x40 | (ihl / 4) as u8, 0];
        hdr.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        hdr.extend_from_slice(&0x1234u16.to_be_bytes());
        hdr.extend_from_slice(&self.frag.to_be_bytes());
        hdr.push(64);
        hdr.push(self.proto);
        hdr.extend_from_slice(&[0, 0]);
        hdr.extend_from_slice(&self.src.octets());
        hdr.extend_from_slice(&self.dst.octets());
        hdr.extend_from_slice(&self.options);
        let c = csum::ipv4_header(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&hdr);
        f.extend_from_slice(&l4);
        f
    }
}

/// Recomputes the IPv4 and TCP/UDP checksums of `frame` and says which one is wrong.
pub fn checksums_valid(frame: &[u8]) -> Result<(), String> {
    let ip = &frame[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let mut hdr = ip[..ihl].to_vec();
    let got = u16::from_be_bytes([hdr[10], hdr[11]]);
    hdr[10] = 0;
    hdr[11] = 0;
    let want = csum::ipv4_header(&hdr);
    if !same_csum(got, want) {
        return Err(format!("IPv4 header checksum {got:#06x}, recomputed {want:#06x}"));
    }
    let (proto, src, dst) = (ip[9], [ip[12], ip[13], ip[14], ip[15]], [ip[16], ip[17], ip[18], ip[19]]);
    let frag_off = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    let more = u16::from_be_bytes([ip[6], ip[7]]) & 0x2000 != 0;
    if frag_off != 0 || more {
        return Ok(()); // L4 checksum covers the whole datagram, not one fragment
    }
    let mut l4 = ip[ihl..tot].to_vec();
    let off = match proto {
        TCP => 16,
        UDP => 6,
        _ => return Ok(()),
    };
    let got = u16::from_be_bytes([l4[off], l4[off + 1]]);
    if proto == UDP && got == 0 {
        return Ok(());
    }
    l4[off] = 0;
    l4[off + 1] = 0;
    let want = csum::l4_ipv4(src, dst, proto, &l4);
    if !same_csum(got, want) {
        return Err(format!("L4 checksum {got:#06x}, recomputed {want:#06x}"));
    }
    Ok(())
}

/// 0x0000 and 0xffff are the same one's-complement number.
fn same_csum(a: u16, b: u16) -> bool {
    a == b || (a | b == 0xffff && (a == 0 || b == 0))
}

/// Compares frames byte by byte, except checksum fields, which are checked by recomputation
/// instead (an incremental update may legally produce the other representation of zero).
pub fn same_frame(got: &[u8], want: &[u8]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("length {} != expected {}", got.len(), want.len()));
    }
    let mut mask = vec![false; got.len()];
    if got.len() >= 34 && u16::from_be_bytes([got[12], got[13]]) == 0x0800 {
        mask[24] = true;
        mask[25] = true;
        let ihl = (got[14] & 0x0f) as usize * 4;
        let l4 = 14 + ihl;
        let off = match got[23] {
            TCP => Some(16),
            UDP => Some(6),
            _ => None,
        };
        if let Some(off) = off.filter(|o| l4 + o + 1 < got.len()) {
            mask[l4 + off] = true;
            mask[l4 + off + 1] = true;
        }
        checksums_valid(got)?;
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !mask[i] && g != w {
            return Err(format!("byte {i}: {g:#04x} != expected {w:#04x}"));
        }
    }
    Ok(())
}
