//! Address and port translation of a parsed flow, with checksums kept valid.

use crate::{
    packet::{Packet, RewriteError},
    parse::{Flow4, Frag, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
};

/// Offsets of the source and destination port in TCP, UDP and SCTP headers alike.
const L4_SPORT_OFF: usize = 0;
const L4_DPORT_OFF: usize = 2;

/// Client -> frontend becomes client -> backend.
#[inline(always)]
pub fn dnat<P: Packet>(pkt: &P, flow: &Flow4, addr: u32, port: u16) -> Result<(), RewriteError> {
    if flow.daddr != addr {
        pkt.set_addr(
            flow.l3_off + IP_DADDR_OFF,
            flow.daddr,
            addr,
            flow.l3_off + IP_CSUM_OFF,
            flow.l4_csum,
        )?;
    }
    // The controller never asks for a port rewrite on SCTP (its CRC32c covers the ports). A
    // later fragment has no ports: its first fragment carried them.
    if flow.dport != port && flow.frag != Frag::Later {
        pkt.set_port(flow.l4_off + L4_DPORT_OFF, flow.dport, port, flow.l4_csum)?;
    }
    Ok(())
}

/// Backend -> client becomes frontend -> client.
#[inline(always)]
pub fn snat<P: Packet>(pkt: &P, flow: &Flow4, addr: u32, port: u16) -> Result<(), RewriteError> {
    if flow.saddr != addr {
        pkt.set_addr(
            flow.l3_off + IP_SADDR_OFF,
            flow.saddr,
            addr,
            flow.l3_off + IP_CSUM_OFF,
            flow.l4_csum,
        )?;
    }
    if flow.sport != port && flow.frag != Frag::Later {
        pkt.set_port(flow.l4_off + L4_SPORT_OFF, flow.sport, port, flow.l4_csum)?;
    }
    Ok(())
}
