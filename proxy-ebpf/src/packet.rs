//! How the core reads and rewrites a packet, per program type.
//!
//! tc must use the checksum helpers: packets from local sockets on a veth are usually
//! CHECKSUM_PARTIAL, where the L4 checksum field holds only the pseudo-header sum and the
//! kernel (not us) knows how to adjust it. XDP sees frames as they came off the wire, whose
//! checksums are complete, so it updates them by RFC 1624 arithmetic.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use proxy_common::csum;

/// Which L4 checksum covers the bytes being rewritten.
#[derive(Clone, Copy)]
pub enum L4Csum {
    /// No checksum to fix: SCTP (CRC32c covers no IP addresses) or UDP sent without one.
    None,
    /// TCP checksum field at this offset.
    Tcp(usize),
    /// UDP checksum field at this offset (non-zero in the packet).
    Udp(usize),
}

pub struct RewriteError;

/// `EbpfContext` as a supertrait lets the core log rare errors with aya-log.
pub trait Packet: EbpfContext {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet, including any part not in the linear area.
    fn len(&self) -> usize;

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

    /// Replaces the L4 port at `off`, updating the L4 checksum.
    fn set_port(&self, off: usize, old: u16, new: u16, l4: L4Csum) -> Result<(), RewriteError>;
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
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
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
        let l4_res = match l4 {
            L4Csum::None => Ok(()),
            L4Csum::Tcp(c) => self.l4_csum_replace(
                c,
                old as u64,
                new as u64,
                (BPF_F_PSEUDO_HDR | 4) as u64,
            ),
            L4Csum::Udp(c) => self.l4_csum_replace(
                c,
                old as u64,
                new as u64,
                (BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4) as u64,
            ),
        };
        l4_res.map_err(|_| RewriteError)?;
        self.l3_csum_replace(ip_csum_off, old as u64, new as u64, 4)
            .map_err(|_| RewriteError)?;
        self.store(off, &new, 0).map_err(|_| RewriteError)
    }

    #[inline(always)]
    fn set_port(&self, off: usize, old: u16, new: u16, l4: L4Csum) -> Result<(), RewriteError> {
        let res = match l4 {
            L4Csum::None => Ok(()),
            L4Csum::Tcp(c) => self.l4_csum_replace(c, old as u64, new as u64, 2),
            L4Csum::Udp(c) => {
                self.l4_csum_replace(c, old as u64, new as u64, (BPF_F_MARK_MANGLED_0 | 2) as u64)
            }
        };
        res.map_err(|_| RewriteError)?;
        self.store(off, &new, 0).map_err(|_| RewriteError)
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
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
        xdp_fix_l4(self, l4, |c| csum::replace_u32(c, old, new))
    }

    #[inline(always)]
    fn set_port(&self, off: usize, old: u16, new: u16, l4: L4Csum) -> Result<(), RewriteError> {
        let port = ptr_at::<_, u16>(self, off).ok_or(RewriteError)?;
        // SAFETY: bounds-checked just above.
        unsafe { *port = new };
        xdp_fix_l4(self, l4, |c| csum::replace_u16(c, old, new))
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
        L4Csum::Tcp(c) => {
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
