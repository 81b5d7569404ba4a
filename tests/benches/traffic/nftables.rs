//! The kube-proxy nftables-mode variant: the `ip kube-proxy` table kube-proxy writes for the
//! same Services (base chains jumping to `services`, whose `service-ips` verdict map leads to
//! one chain per Service port doing `numgen random mod N vmap` into one chain per endpoint
//! doing the DNAT; the masquerade marks and the filter checks), loaded with `nft -f` into the
//! node namespace. Deleting the namespace deletes it.

use std::fmt::Write as _;

use anyhow::Result;

use super::{
    feed,
    services::{CLUSTER_CIDR, NAMESPACE, Service, ServiceSet, name_hash},
};

const TABLE: &str = "ip kube-proxy";
/// The Service CIDR, dropped in `cluster-ips-check` when no Service port matched.
const SERVICE_CIDR: &str = "10.96.0.0/16";

/// `nft -f` input for `set`.
pub fn rules(set: &ServiceSet) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}\n{BASE}",
        BASE = base()
    );
    for svc in &set.services {
        service_rules(svc, &mut out);
    }
    out
}

/// The table's fixed part, as kube-proxy's `setupNFTables` creates it.
fn base() -> String {
    let t = TABLE;
    let chains = [
        "add chain {t} mark-for-masquerade",
        "add rule {t} mark-for-masquerade mark set mark or 0x4000",
        "add chain {t} masquerading",
        "add rule {t} masquerading mark and 0x4000 == 0 return",
        "add rule {t} masquerading mark set mark xor 0x4000",
        "add rule {t} masquerading masquerade fully-random",
        "add set {t} cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }",
        "add map {t} service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
        "add map {t} service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }",
        "add map {t} no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }",
        "add map {t} no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }",
        "add map {t} firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }",
        "add chain {t} firewall-check",
        "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        "add chain {t} service-endpoints-check",
        "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "add chain {t} nodeport-endpoints-check",
        "add rule {t} nodeport-endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports",
        "add chain {t} cluster-ips-check",
        "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
        "add rule {t} cluster-ips-check ip daddr {SERVICE_CIDR} drop comment \"Drop traffic to unallocated ClusterIPs\"",
        "add chain {t} services",
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
        "add chain {t} filter-prerouting { type filter hook prerouting priority -110 ; }",
        "add rule {t} filter-prerouting ct state new jump firewall-check",
        "add chain {t} filter-input { type filter hook input priority -110 ; }",
        "add rule {t} filter-input ct state new jump nodeport-endpoints-check",
        "add rule {t} filter-input ct state new jump service-endpoints-check",
        "add chain {t} filter-forward { type filter hook forward priority -110 ; }",
        "add rule {t} filter-forward ct state new jump service-endpoints-check",
        "add rule {t} filter-forward ct state new jump cluster-ips-check",
        "add chain {t} filter-output { type filter hook output priority -110 ; }",
        "add rule {t} filter-output ct state new jump service-endpoints-check",
        "add rule {t} filter-output ct state new jump firewall-check",
        "add chain {t} filter-output-post-dnat { type filter hook output priority -90 ; }",
        "add rule {t} filter-output-post-dnat ct state new jump cluster-ips-check",
        "add chain {t} nat-prerouting { type nat hook prerouting priority -100 ; }",
        "add rule {t} nat-prerouting jump services",
        "add chain {t} nat-output { type nat hook output priority -100 ; }",
        "add rule {t} nat-output jump services",
        "add chain {t} nat-postrouting { type nat hook postrouting priority 100 ; }",
        "add rule {t} nat-postrouting jump masquerading",
    ];
    chains
        .iter()
        .map(|c| c.replace("{t}", t).replace("{SERVICE_CIDR}", SERVICE_CIDR) + "\n")
        .collect()
}

/// One Service's chains and map elements, as kube-proxy writes them per Service port.
fn service_rules(svc: &Service, out: &mut String) {
    let t = TABLE;
    for port in &svc.ports {
        let (proto, ip) = (port.proto.lower(), svc.cluster_ip);
        let svc_port_name = format!("{NAMESPACE}/{}/{proto}/{}", svc.name, port.name);
        let svc_chain = format!("service-{}-{svc_port_name}", name_hash(&svc_port_name, 8));
        let mut vmap = Vec::with_capacity(svc.endpoints.len());
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let ep_name = format!("{svc_port_name}__{ep}/{}", port.target);
            let ep_chain = format!("endpoint-{}-{ep_name}", name_hash(&ep_name, 8));
            let _ = write!(
                out,
                "add chain {t} {ep_chain}\n\
                 add rule {t} {ep_chain} ip saddr {ep} jump mark-for-masquerade\n\
                 add rule {t} {ep_chain} meta l4proto {proto} dnat to {ep}:{}\n",
                port.target
            );
            vmap.push(format!("{i} : goto {ep_chain}"));
        }
        let _ = write!(
            out,
            "add chain {t} {svc_chain}\n\
             add rule {t} {svc_chain} ip daddr {ip} {proto} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\
             add rule {t} {svc_chain} numgen random mod {} vmap {{ {} }}\n\
             add element {t} cluster-ips {{ {ip} }}\n\
             add element {t} service-ips {{ {ip} . {proto} . {} : goto {svc_chain} }}\n",
            port.port,
            svc.endpoints.len(),
            vmap.join(" , "),
            port.port,
        );
    }
}

/// Loads `set` into the node namespace `netns` with `nft -f -`.
pub fn load(netns: &str, set: &ServiceSet) -> Result<()> {
    feed::stdin_of(netns, "nft", &["-f", "-"], &rules(set))
}
