//! ICMP errors about translated flows (port unreachable, fragmentation needed, ...): the error
//! quotes the packet as the backend saw it (client -> backend), so it is reverse-translated to
//! what the client sent (client -> frontend), outer and inner headers, before delivery.

use crate::{
    conntrack,
    maps::CT4,
    packet::{L4Csum, Packet, RewriteError},
    parse::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IcmpError4},
};

/// Returns `Ok(false)` when the quoted flow is not one of ours.
#[inline(always)]
pub fn reverse_translate<P: Packet>(pkt: &P, e: &IcmpError4) -> Result<bool, RewriteError> {
    // The quoted packet went client -> backend; its replies are keyed backend -> client.
    let key = conntrack::reply_key_of(
        e.inner_daddr,
        e.inner_saddr,
        e.inner_dport,
        e.inner_sport,
        e.inner_proto,
    );
    // SAFETY: entries are written whole; a concurrent refresh only touches last_seen/flags.
    let Some(entry) = (unsafe { CT4.get(key) }) else {
        return Ok(false);
    };
    let (fe_addr, fe_port) = (entry.nat_addr_be, entry.nat_port_be);
    // Inner destination: backend -> frontend. The inner IP checksum changes by exactly the
    // opposite amount, so the ICMP checksum over both needs no update.
    pkt.set_addr(
        e.inner_l3_off + IP_DADDR_OFF,
        e.inner_daddr,
        fe_addr,
        e.inner_l3_off + IP_CSUM_OFF,
        L4Csum::None,
    )?;
    if e.inner_dport != fe_port {
        pkt.set_port(
            e.inner_l4_off + 2,
            e.inner_dport,
            fe_port,
            L4Csum::Icmp(e.icmp_off + 2),
        )?;
    }
    // The error came from the backend itself: it must appear to come from the frontend.
    if e.saddr == e.inner_daddr {
        pkt.set_addr(
            e.l3_off + IP_SADDR_OFF,
            e.saddr,
            fe_addr,
            e.l3_off + IP_CSUM_OFF,
            L4Csum::Icmp(e.icmp_off + 2),
        )?;
    }
    Ok(true)
}
