//! Active reject for frontends without endpoints: the packet is turned, in place, into a TCP
//! RST or an ICMP port unreachable from the frontend back to the client, so the client sees
//! "connection refused" at once instead of a timeout (kube-proxy's REJECT).
//!
//! Every checksum here is computed over fixed-size spans built on the stack: a loop over a
//! variable length makes LLVM emit arithmetic on the packet-end pointer, which the verifier
//! refuses. Where a span has variable length (IPv4 options, the quoted header) its sum is known
//! without reading it: see each function.

use proxy_common::csum;

use crate::{
    packet::{Packet, RewriteError, ptr_at},
    parse::{Flow4, PROTO_ICMP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const ETH_LEN: usize = 14;
const TCP_LEN: usize = 20;
/// New outer IPv4 header (no options) + ICMP header.
const ICMP_ROOM: u32 = 28;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

/// One's-complement sum of a fixed-size span, as native 16-bit loads (see `proxy_common::csum`
/// for why native order is right).
#[inline(always)]
fn sum<const N: usize>(bytes: &[u8; N], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        acc += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    acc
}

#[inline(always)]
fn word(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

/// Addresses the Ethernet header back to the sender, when the reply goes straight back out
/// (`Packet::REPLY_IN_PLACE`).
#[inline(always)]
fn swap_macs<P: Packet>(pkt: &P) -> Result<(), RewriteError> {
    if !P::REPLY_IN_PLACE {
        return Ok(());
    }
    let eth = ptr_at::<_, [u8; 12]>(pkt, 0).ok_or(RewriteError)?;
    // SAFETY: bounds-checked just above.
    let old = unsafe { *eth };
    let mut new = [0u8; 12];
    new[..6].copy_from_slice(&old[6..]);
    new[6..].copy_from_slice(&old[..6]);
    // SAFETY: as above.
    unsafe { *eth = new };
    Ok(())
}

/// Turns a TCP segment to a frontend into the RST the frontend would send (RFC 9293 3.10.7.1).
#[inline(always)]
pub fn tcp_rst<P: Packet>(pkt: &P, flow: &Flow4) -> Result<(), RewriteError> {
    let tcp = ptr_at::<_, [u8; TCP_LEN]>(pkt, flow.l4_off).ok_or(RewriteError)?;
    // SAFETY: bounds-checked just above.
    let orig = unsafe { *tcp };
    let seq = u32::from_be_bytes([orig[4], orig[5], orig[6], orig[7]]);
    let ack = u32::from_be_bytes([orig[8], orig[9], orig[10], orig[11]]);
    let doff = (orig[12] >> 4) as usize * 4;
    let payload = (flow.tot_len as usize).saturating_sub(flow.ihl + doff) as u32;
    let (rst_seq, rst_ack, flags) = if flow.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let syn_fin =
            (flow.tcp_flags & TCP_SYN != 0) as u32 + (flow.tcp_flags & TCP_FIN != 0) as u32;
        (
            0,
            seq.wrapping_add(payload).wrapping_add(syn_fin),
            TCP_RST | TCP_ACK,
        )
    };
    let l4_off = flow.l4_off;
    pkt.trim_to(l4_off + TCP_LEN)?;
    swap_macs(pkt)?;

    // IPv4: options are kept, so the header's length varies; its checksum is updated for the
    // words that change (swapping the addresses does not change the sum).
    let ip = ptr_at::<_, [u8; 20]>(pkt, ETH_LEN).ok_or(RewriteError)?;
    // SAFETY: bounds-checked just above.
    let old = unsafe { *ip };
    let mut new = old;
    new[1] = 0; // TOS
    new[2..4].copy_from_slice(&((flow.ihl + TCP_LEN) as u16).to_be_bytes());
    new[4..6].copy_from_slice(&[0, 0]); // id
    new[6..8].copy_from_slice(&[0x40, 0]); // DF
    new[8] = 64; // TTL
    new[12..16].copy_from_slice(&old[16..20]);
    new[16..20].copy_from_slice(&old[12..16]);
    let mut c = word(&old, 10);
    for i in [0, 2, 4, 6, 8] {
        c = csum::replace_u16(c, word(&old, i), word(&new, i));
    }
    new[10..12].copy_from_slice(&c.to_ne_bytes());
    // SAFETY: as above.
    unsafe { *ip = new };

    let mut t = [0u8; TCP_LEN];
    t[0..2].copy_from_slice(&orig[2..4]);
    t[2..4].copy_from_slice(&orig[0..2]);
    t[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    t[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    // Pseudo header: reply source and destination (their sum is the same either way round),
    // protocol, TCP length.
    let pseudo = csum::fold(flow.daddr) as u32
        + csum::fold(flow.saddr) as u32
        + u16::from_ne_bytes([0, flow.proto]) as u32
        + u16::from_ne_bytes((TCP_LEN as u16).to_be_bytes()) as u32;
    let c = !csum::fold(sum(&t, pseudo));
    t[16..18].copy_from_slice(&c.to_ne_bytes());
    let tcp = ptr_at::<_, [u8; TCP_LEN]>(pkt, l4_off).ok_or(RewriteError)?;
    // SAFETY: bounds-checked just above.
    unsafe { *tcp = t };
    Ok(())
}

/// Turns a datagram to a frontend into an ICMP port unreachable from the frontend, quoting the
/// original IP header and the first 8 bytes of its payload (RFC 792).
#[inline(always)]
pub fn icmp_port_unreachable<P: Packet>(pkt: &P, flow: &Flow4) -> Result<(), RewriteError> {
    let quote = flow.ihl + 8;
    if (flow.tot_len as usize) < quote {
        return Err(RewriteError);
    }
    let (client, frontend) = (flow.saddr, flow.daddr);
    pkt.insert_after_eth(ICMP_ROOM)?;
    pkt.trim_to(ETH_LEN + ICMP_ROOM as usize + quote)?;
    swap_macs(pkt)?;

    // Both new headers are written through one fixed-size pointer: with two, LLVM merges the
    // bounds checks in a way the verifier cannot follow.
    let hdr = ptr_at::<_, [u8; ICMP_ROOM as usize]>(pkt, ETH_LEN).ok_or(RewriteError)?;
    // The ICMP checksum covers the ICMP header, the quoted IPv4 header and 8 bytes of its
    // payload. A valid IPv4 header sums to 0xffff, which is zero in one's-complement
    // arithmetic, so only the header and the 8 payload bytes need summing. (A quoted header
    // with a bad checksum gives a bad ICMP checksum; the kernel would have dropped it anyway.)
    let l4 =
        ptr_at::<_, [u8; 8]>(pkt, ETH_LEN + ICMP_ROOM as usize + flow.ihl).ok_or(RewriteError)?;
    // SAFETY: bounds-checked just above.
    let l4 = unsafe { *l4 };

    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((ICMP_ROOM as usize + quote) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = PROTO_ICMP;
    ip[12..16].copy_from_slice(&frontend.to_ne_bytes());
    ip[16..20].copy_from_slice(&client.to_ne_bytes());
    let c = !csum::fold(sum(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    let mut icmp = [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    let c = !csum::fold(sum(&icmp, sum(&l4, 0)));
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut both = [0u8; ICMP_ROOM as usize];
    both[..20].copy_from_slice(&ip);
    both[20..].copy_from_slice(&icmp);
    // SAFETY: bounds-checked above, after the last helper call that could move the data.
    unsafe { *hdr = both };
    Ok(())
}
