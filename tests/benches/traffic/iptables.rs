//! The kube-proxy iptables-mode variant: the rules kube-proxy writes for the same Services
//! (its `syncProxyRules` output: `KUBE-SERVICES` -> `KUBE-SVC-*` with `statistic --mode random
//! --probability` -> `KUBE-SEP-*` doing the DNAT, the masquerade marks, the filter-table
//! jumps), loaded with `iptables-restore` into the node namespace. Deleting the namespace
//! deletes them.

use std::fmt::Write as _;

use anyhow::Result;

use super::{
    feed,
    services::{CLUSTER_CIDR, NAMESPACE, Service, ServiceSet, name_hash},
};

/// `iptables-restore` input for `set`.
pub fn rules(set: &ServiceSet) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for svc in &set.services {
        service_rules(svc, &mut chains, &mut rules);
    }
    let mut out = String::with_capacity(chains.len() + rules.len() + 4096);
    out.push_str(FILTER);
    out.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    out.push_str(&chains);
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    out.push_str(&rules);
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n",
    );
    out
}

/// The filter table: with every Service having endpoints, kube-proxy's filter chains hold only
/// the jumps and the forwarding rules, but those run for every packet (no conntrack shortcut).
const FILTER: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
    :KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
    :KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
    -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
    -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
    -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
    -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
    -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
    -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
    -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
    -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
    -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
    -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
    -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
    -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
    COMMIT\n";

/// One Service's chain declarations and rules, as kube-proxy writes them per Service port.
fn service_rules(svc: &Service, chains: &mut String, rules: &mut String) {
    for port in &svc.ports {
        let (proto, ip) = (port.proto.lower(), svc.cluster_ip);
        let svc_port_name = format!("{NAMESPACE}/{}:{}", svc.name, port.name);
        let svc_chain = format!(
            "KUBE-SVC-{}",
            name_hash(&format!("{svc_port_name}{proto}"), 16)
        );
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{svc_port_name} cluster IP\" -m {proto} -p {proto} \
             -d {ip} --dport {} -j {svc_chain}",
            port.port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{svc_port_name} cluster IP\" -m {proto} -p {proto} \
             -d {ip} --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            port.port
        );
        let count = svc.endpoints.len();
        let mut sep_rules = String::new();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let dest = format!("{ep}:{}", port.target);
            let sep_chain = format!(
                "KUBE-SEP-{}",
                name_hash(&format!("{svc_port_name}{proto}{dest}"), 16)
            );
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            // Endpoint i of n is taken with probability 1/(n-i), so each gets 1/n overall;
            // the last one unconditionally. kube-proxy prints it with %0.10f.
            let statistic = if i + 1 < count {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (count - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{svc_port_name} -> {dest}\"{statistic} -j {sep_chain}"
            );
            let _ = writeln!(
                sep_rules,
                "-A {sep_chain} -m comment --comment {svc_port_name} -s {ep} -j KUBE-MARK-MASQ\n\
                 -A {sep_chain} -m comment --comment {svc_port_name} -m {proto} -p {proto} \
                 -j DNAT --to-destination {dest}"
            );
        }
        rules.push_str(&sep_rules);
    }
}

/// Loads `set` into the node namespace `netns` with `iptables-restore`.
pub fn load(netns: &str, set: &ServiceSet) -> Result<()> {
    feed::stdin_of(netns, "iptables-restore", &[], &rules(set))
}
