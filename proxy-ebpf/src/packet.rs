//! How the core reads, rewrites and resizes a packet, per program type.
//!
//! Translation in tc uses the checksum helpers: packets from local sockets on a veth are usually
//! CHECKSUM_PARTIAL, where the L4 checksum field holds only the pseudo-header sum and the
//! kernel (not us) knows how to adjust it. XDP sees frames as they came off the wire, whose
//! checksums are complete, so it updates them by RFC 1624 arithmetic.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{
        bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len,
    },
    programs::{TcContext, XdpContext},
};
use proxy_common::csum;

/// Which L4 checksum covers the bytes being rewritten.
#[derive(Clone, Copy)]
pub enum L4Csum {
    /// No checksum to fix: SCTP (CRC32c covers no IP addresses), UDP sent without one, a later
    /// fragment, or an IPv4 header inside an ICMP error (whose own checksum change cancels the
    /// address change in the ICMP sum).
    None,
    /// TCP checksum field at this offset (covers the pseudo header).
    Tcp(usize),
    /// UDP checksum field at this offset, non-zero in the packet (covers the pseudo header).
    Udp(usize),
    /// ICMP checksum field at this offset (no pseudo header).
    Icmp(usize),
}

pub struct RewriteError;

/// `EbpfContext` as a supertrait lets the core log rare errors with aya-log.
pub trait Packet: EbpfContext {
    /// How a reject reply leaves. tc redirects it straight back out of the device it came in
    /// on, so its Ethernet addresses are swapped. XDP hands it to the kernel, which routes it
    /// back to the client: `XDP_TX` on a veth only delivers when the peer runs an XDP program
    /// too, so it would silently drop rejects there. The Ethernet header then stays as
    /// received (addressed to this host), or the stack would discard it as not ours.
    const REPLY_IN_PLACE: bool;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Whether the whole packet (including any part not in the linear area) is at least
    /// `n` bytes long.
    fn has_len(&self, n: usize) -> bool;

    /// Replaces the IPv4 address at `off` (old value `old`, native load), updating the IPv4
    /// header checksum at `ip_csum_off` and the L4 checksum, whose pseudo header covers it.
    fn set_addr(
        &self,
        off: usize,
        old: u32,
        new: u32,
        ip_csum_off: usize,
        l4: L4Csum,
    ) -> Result<(), RewriteError>;

    /// Replaces the 16-bit word (a port) at `off`, updating the L4 checksum.
    fn set_port(&self, off: usize, old: u16, new: u16, l4: L4Csum) -> Result<(), RewriteError>;

    /// Cuts the packet to `len` bytes.
    fn trim_to(&self, len: usize) -> Result<(), RewriteError>;

    /// Inserts `n` bytes between the Ethernet header and the IP header.
    fn insert_after_eth(&self, n: u32) -> Result<(), RewriteError>;
}

/// Bounds-checked pointer to a `T` at `off` in the linear packet data.
#[inline(always)]
pub fn ptr_at<P: Packet, T>(pkt: &P, off: usize) -> Option<*mut T> {
    let start = pkt.data();
    if start + off + size_of::<T>() > pkt.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

impl Packet for TcContext {
    const REPLY_IN_PLACE: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn has_len(&self, n: usize) -> bool {
        TcContext::len(self) as usize >= n
    }

    /// The L4 checksum goes through the kernel's helper (it knows whether the skb is
    /// CHECKSUM_PARTIAL); the IPv4 header checksum is always complete, so it and the address
    /// are written directly, which saves two helper calls per rewrite.
    #[inline(always)]
    fn set_addr(
        &self,
        off: usize,
        old: u32,
        new: u32,
        ip_csum_off: usize,
        l4: L4Csum,
    ) -> Result<(), RewriteError> {
        let pseudo = match l4 {
            L4Csum::Tcp(c) => Some((c, BPF_F_PSEUDO_HDR | 4)),
            L4Csum::Udp(c) => Some((c, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4)),
            L4Csum::None | L4Csum::Icmp(_) => None,
        };
        if let Some((c, flags)) = pseudo {
            self.l4_csum_replace(c, old as u64, new as u64, flags as u64)
                .map_err(|_| RewriteError)?;
        }
        // Pointers are taken after the helper, which may have moved the data.
        let ip_csum = ptr_at::<_, u16>(self, ip_csum_off).ok_or(RewriteError)?;
        let addr = ptr_at::<_, u32>(self, off).ok_or(RewriteError)?;
        // SAFETY: both pointers were bounds-checked against data_end just above; tc programs
        // may write packet data directly (the kernel unclones the skb first).
        unsafe {
            *ip_csum = csum::replace_u32(*ip_csum, old, new);
            *addr = new;
        }
        Ok(())
    }

    #[inline(always)]
    fn set_port(&self, off: usize, old: u16, new: u16, l4: L4Csum) -> Result<(), RewriteError> {
        let res = match l4 {
            L4Csum::None => Ok(()),
            L4Csum::Tcp(c) | L4Csum::Icmp(c) => self.l4_csum_replace(c, old as u64, new as u64, 2),
            L4Csum::Udp(c) => {
                self.l4_csum_replace(c, old as u64, new as u64, (BPF_F_MARK_MANGLED_0 | 2) as u64)
            }
        };
        res.map_err(|_| RewriteError)?;
        let port = ptr_at::<_, u16>(self, off).ok_or(RewriteError)?;
        // SAFETY: bounds-checked just above, after the helper.
        unsafe { *port = new };
        Ok(())
    }

    #[inline(always)]
    fn trim_to(&self, len: usize) -> Result<(), RewriteError> {
        // SAFETY: helper on our own skb.
        let ret = unsafe { bpf_skb_change_tail(self.skb.skb.cast(), len as u32, 0) };
        if ret == 0 { Ok(()) } else { Err(RewriteError) }
    }

    #[inline(always)]
    fn insert_after_eth(&self, n: u32) -> Result<(), RewriteError> {
        self.adjust_room(n as i32, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| RewriteError)
    }
}

impl Packet for XdpContext {
    const REPLY_IN_PLACE: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn has_len(&self, n: usize) -> bool {
        // A pointer comparison: arithmetic on the packet-end pointer (`end - data`) is refused
        // by the verifier.
        XdpContext::data(self) + n <= XdpContext::data_end(self)
    }

    #[inline(always)]
    fn set_addr(
        &self,
        off: usize,
        old: u32,
        new: u32,
        ip_csum_off: usize,
        l4: L4Csum,
    ) -> Result<(), RewriteError> {
        let ip_csum = ptr_at::<_, u16>(self, ip_csum_off).ok_or(RewriteError)?;
        let addr = ptr_at::<_, u32>(self, off).ok_or(RewriteError)?;
        // SAFETY: both pointers were bounds-checked against data_end just above.
        unsafe {
            *ip_csum = csum::replace_u32(*ip_csum, old, new);
            *addr = new;
        }
        match l4 {
            // ICMP has no pseudo header.
            L4Csum::Icmp(_) => Ok(()),
            l4 => xdp_fix_l4(self, l4, |c| csum::replace_u32(c, old, new)),
        }
    }

    #[inline(always)]
    fn set_port(&self, off: usize, old: u16, new: u16, l4: L4Csum) -> Result<(), RewriteError> {
        let port = ptr_at::<_, u16>(self, off).ok_or(RewriteError)?;
        // SAFETY: bounds-checked just above.
        unsafe { *port = new };
        xdp_fix_l4(self, l4, |c| csum::replace_u16(c, old, new))
    }

    #[inline(always)]
    fn trim_to(&self, len: usize) -> Result<(), RewriteError> {
        // SAFETY: helpers on our own xdp_md; the length comes from a helper because
        // `data_end - data` is arithmetic on the packet-end pointer, which the verifier refuses.
        let cur = unsafe { bpf_xdp_get_buff_len(self.ctx.cast()) } as i32;
        let ret = unsafe { bpf_xdp_adjust_tail(self.ctx.cast(), len as i32 - cur) };
        if ret == 0 { Ok(()) } else { Err(RewriteError) }
    }

    #[inline(always)]
    fn insert_after_eth(&self, n: u32) -> Result<(), RewriteError> {
        // SAFETY: helper on our own xdp_md.
        if unsafe { bpf_xdp_adjust_head(self.ctx.cast(), -(n as i32)) } != 0 {
            return Err(RewriteError);
        }
        // Move the Ethernet header to the new front.
        let to = ptr_at::<_, [u8; 14]>(self, 0).ok_or(RewriteError)?;
        let from = ptr_at::<_, [u8; 14]>(self, n as usize).ok_or(RewriteError)?;
        // SAFETY: both 14-byte ranges bounds-checked; n >= 14 so they do not overlap.
        unsafe { *to = *from };
        Ok(())
    }
}

#[inline(always)]
fn xdp_fix_l4(
    ctx: &XdpContext,
    l4: L4Csum,
    update: impl Fn(u16) -> u16,
) -> Result<(), RewriteError> {
    match l4 {
        L4Csum::None => Ok(()),
        L4Csum::Tcp(c) | L4Csum::Icmp(c) => {
            let p = ptr_at::<_, u16>(ctx, c).ok_or(RewriteError)?;
            // SAFETY: bounds-checked just above.
            unsafe { *p = update(*p) };
            Ok(())
        }
        L4Csum::Udp(c) => {
            let p = ptr_at::<_, u16>(ctx, c).ok_or(RewriteError)?;
            // SAFETY: bounds-checked just above. Parsing only hands out `Udp` for a non-zero
            // checksum, so "no checksum" stays untouched.
            unsafe { *p = csum::udp_fixup(update(*p)) };
            Ok(())
        }
    }
}
