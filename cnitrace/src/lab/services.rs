//! The lab's Services, programmed on every node the way kube-proxy programs them: in iptables mode
//! (KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-* DNAT, KUBE-NODEPORTS → KUBE-EXT-*, KUBE-MARK-MASQ and
//! KUBE-POSTROUTING, the filter table's REJECT for a Service without endpoints) through either iptables
//! backend, or in nftables mode (table `ip kube-proxy`: the service-ips and service-nodeports verdict
//! maps, service-/external-/endpoint- chains, no-endpoint-services → reject-chain). Chain names, comments,
//! marks and priorities follow kube-proxy's; the rules are written here (kube-proxy is not packaged).

use std::{fmt::Write as _, net::Ipv4Addr, str::FromStr};

use anyhow::{anyhow, Result};
use cnitrace_tools as tools;
use serde::{Deserialize, Serialize};

use super::{
    topology::{self, ServiceSpec, NODES, SERVICES},
    Lab,
};
use crate::sys;

/// How kube-proxy runs on the lab's nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyMode {
    /// iptables mode through iptables-nft (the backend flannel's rules use here).
    #[default]
    IptablesNft,
    /// iptables mode through iptables-legacy (a kube-proxy image older than the node's iptables).
    IptablesLegacy,
    /// nftables mode (kube-proxy ≥ 1.31's `--proxy-mode nftables`).
    Nftables,
}

impl ProxyMode {
    pub const ALL: [ProxyMode; 3] = [ProxyMode::IptablesNft, ProxyMode::IptablesLegacy, ProxyMode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::IptablesNft => "iptables-nft",
            ProxyMode::IptablesLegacy => "iptables-legacy",
            ProxyMode::Nftables => "nftables",
        }
    }
}

impl FromStr for ProxyMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "iptables" | "iptables-nft" => Ok(ProxyMode::IptablesNft),
            "iptables-legacy" => Ok(ProxyMode::IptablesLegacy),
            "nftables" => Ok(ProxyMode::Nftables),
            _ => Err(anyhow!("unknown proxy mode {s:?}: iptables (iptables-nft), iptables-legacy or nftables")),
        }
    }
}

/// kube-proxy's masquerade mark (`--masquerade-bit 14`).
const MASQ_MARK: &str = "0x4000";

/// `NAMESPACE/NAME:PORTNAME`, kube-proxy's ServicePortName.
pub fn port_name(s: &ServiceSpec) -> String {
    format!("default/{}:{}", s.name, s.port_name)
}

/// A stable 16-character upper-case base32 hash of `text`, as kube-proxy's chain names carry (it hashes
/// with SHA-256; any stable hash serves a lab).
fn hash16(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in text.bytes() {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013B);
    }
    (0..16).map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char).collect()
}

fn svc_chain(s: &ServiceSpec) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{}tcp", port_name(s))))
}
fn ext_chain(s: &ServiceSpec) -> String {
    format!("KUBE-EXT-{}", hash16(&format!("{}tcp", port_name(s))))
}
fn sep_chain(s: &ServiceSpec, ep: Ipv4Addr) -> String {
    format!("KUBE-SEP-{}", hash16(&format!("{}tcp{ep}:{}", port_name(s), s.target_port)))
}

/// The endpoints each Service has in a lab: the addresses of the pods it selects (none when `empty`
/// names it: its pods are not Ready).
pub fn endpoints(s: &ServiceSpec, empty: &[String]) -> Vec<Ipv4Addr> {
    if empty.iter().any(|e| e == s.name) {
        return Vec::new();
    }
    s.selects.iter().filter_map(|p| topology::pod(p)).map(|p| p.ip).collect()
}

/// The addresses a node accepts NodePort traffic on (its own, not the pods').
fn node_ips(node: usize) -> Vec<Ipv4Addr> {
    let mut v = vec![NODES[node].underlay, super::SECOND_NIC_ADDRS[node].split('/').next().and_then(|a| a.parse().ok()).expect("address")];
    if node == 0 {
        v.push(topology::UPLINK_IP);
    }
    v
}

/// iptables-restore input for one node: everything kube-proxy's iptables mode writes.
pub fn iptables_rules(empty: &[String]) -> String {
    let cluster = topology::CLUSTER_CIDR;
    let mut nat = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut nat_rules = String::new();
    let filter = String::from("*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n");
    let mut filter_rules = String::new();
    let _ = writeln!(nat_rules, "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES");
    let _ = writeln!(nat_rules, "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES");
    let _ = writeln!(nat_rules, "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING");
    let _ = writeln!(nat_rules, "-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}");
    let _ = writeln!(nat_rules, "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN");
    let _ = writeln!(nat_rules, "-A KUBE-POSTROUTING -j MARK --set-xmark {MASQ_MARK}/0x0");
    let _ = writeln!(nat_rules, "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully");
    let _ = writeln!(filter_rules, "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally visible service portals\" -j KUBE-EXTERNAL-SERVICES");
    let _ = writeln!(filter_rules, "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD");
    let _ = writeln!(filter_rules, "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES");
    let _ = writeln!(filter_rules, "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally visible service portals\" -j KUBE-EXTERNAL-SERVICES");
    let _ = writeln!(filter_rules, "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES");
    let _ = writeln!(filter_rules, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP");
    let _ = writeln!(filter_rules, "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT");
    let _ = writeln!(filter_rules, "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT");
    for s in &SERVICES {
        let name = port_name(s);
        let (cip, port, np) = (s.cluster_ip, s.port, s.node_port);
        let eps = endpoints(s, empty);
        if eps.is_empty() {
            let _ = writeln!(filter_rules, "-A KUBE-SERVICES -d {cip}/32 -p tcp -m comment --comment \"{name} has no endpoints\" -m tcp --dport {port} -j REJECT --reject-with icmp-port-unreachable");
            let _ = writeln!(filter_rules, "-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment \"{name} has no endpoints\" -m addrtype --dst-type LOCAL -m tcp --dport {np} -j REJECT --reject-with icmp-port-unreachable");
            continue;
        }
        let (svc, ext) = (svc_chain(s), ext_chain(s));
        let _ = writeln!(nat, ":{svc} - [0:0]\n:{ext} - [0:0]");
        let _ = writeln!(nat_rules, "-A KUBE-SERVICES -d {cip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j {svc}");
        let _ = writeln!(nat_rules, "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{name}\" -m tcp --dport {np} -j {ext}");
        let _ = writeln!(nat_rules, "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ");
        let _ = writeln!(nat_rules, "-A {ext} -j {svc}");
        let _ = writeln!(nat_rules, "-A {svc} ! -s {cluster} -d {cip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ");
        for (i, ep) in eps.iter().enumerate() {
            let sep = sep_chain(s, *ep);
            let _ = writeln!(nat, ":{sep} - [0:0]");
            let left = eps.len() - i;
            let pick = if left > 1 { format!(" -m statistic --mode random --probability {:.10}", 1.0 / left as f64) } else { String::new() };
            let _ = writeln!(nat_rules, "-A {svc} -m comment --comment \"{name} -> {ep}:{}\"{pick} -j {sep}", s.target_port);
            let _ = writeln!(nat_rules, "-A {sep} -s {ep}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ");
            let _ = writeln!(nat_rules, "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ep}:{}", s.target_port);
        }
    }
    let _ = writeln!(
        nat_rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
    format!("{nat}{nat_rules}COMMIT\n{filter}{filter_rules}COMMIT\n")
}

/// `nft -f` input for one node: kube-proxy's nftables mode (table `ip kube-proxy`).
pub fn nft_rules(node: usize, empty: &[String]) -> String {
    let cluster = topology::CLUSTER_CIDR;
    let mut t = String::from("table ip kube-proxy {\n comment \"rules for kube-proxy\"\n");
    let _ = writeln!(t, " set cluster-ips {{ type ipv4_addr; comment \"Active ClusterIPs\"; }}");
    let _ = writeln!(t, " set nodeport-ips {{ type ipv4_addr; comment \"IPs that accept NodePort traffic\"; }}");
    let _ = writeln!(t, " map no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict; comment \"vmap to drop or reject packets to services with no endpoints\"; }}");
    let _ = writeln!(t, " map no-endpoint-nodeports {{ type inet_proto . inet_service : verdict; comment \"vmap to drop or reject packets to service nodeports with no endpoints\"; }}");
    let _ = writeln!(t, " map service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"; }}");
    let _ = writeln!(t, " map service-nodeports {{ type inet_proto . inet_service : verdict; comment \"NodePort traffic\"; }}");
    let _ = writeln!(t, " chain reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\"; reject; }}");
    let _ = writeln!(t, " chain mark-for-masquerade {{ mark set mark or {MASQ_MARK}; }}");
    let _ = writeln!(t, " chain masquerading {{ meta mark & {MASQ_MARK} == 0 return; meta mark set mark xor {MASQ_MARK}; masquerade fully-random; }}");
    let _ = writeln!(t, " chain services {{ ip daddr . meta l4proto . th dport vmap @service-ips; ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports; }}");
    let _ = writeln!(t, " chain service-endpoints-check {{ ip daddr . meta l4proto . th dport vmap @no-endpoint-services; }}");
    let _ = writeln!(t, " chain nodeport-endpoints-check {{ ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports; }}");
    let _ = writeln!(
        t,
        " chain cluster-ips-check {{ ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"; ip daddr {} drop comment \"Drop traffic to unallocated ClusterIPs\"; }}",
        topology::SERVICE_CIDR
    );
    let _ = writeln!(t, " chain nat-prerouting {{ type nat hook prerouting priority -100; policy accept; jump services; }}");
    let _ = writeln!(t, " chain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}");
    let _ = writeln!(t, " chain nat-postrouting {{ type nat hook postrouting priority 100; policy accept; jump masquerading; }}");
    let _ = writeln!(t, " chain filter-input {{ type filter hook input priority -110; policy accept; ct state new jump nodeport-endpoints-check; ct state new jump service-endpoints-check; }}");
    let _ = writeln!(t, " chain filter-forward {{ type filter hook forward priority -110; policy accept; ct state new jump service-endpoints-check; ct state new jump cluster-ips-check; }}");
    let _ = writeln!(t, " chain filter-output {{ type filter hook output priority -110; policy accept; ct state new jump service-endpoints-check; }}");
    let mut elements = String::new();
    let cips: Vec<String> = SERVICES.iter().map(|s| s.cluster_ip.to_string()).collect();
    let _ = writeln!(elements, "add element ip kube-proxy cluster-ips {{ {} }}", cips.join(", "));
    let nips: Vec<String> = node_ips(node).iter().map(|a| a.to_string()).collect();
    let _ = writeln!(elements, "add element ip kube-proxy nodeport-ips {{ {} }}", nips.join(", "));
    for s in &SERVICES {
        let name = port_name(s);
        let (cip, port, np) = (s.cluster_ip, s.port, s.node_port);
        let eps = endpoints(s, empty);
        if eps.is_empty() {
            let _ = writeln!(elements, "add element ip kube-proxy no-endpoint-services {{ {cip} . tcp . {port} comment \"{name}\" : goto reject-chain }}");
            let _ = writeln!(elements, "add element ip kube-proxy no-endpoint-nodeports {{ tcp . {np} comment \"{name}\" : goto reject-chain }}");
            continue;
        }
        // service-HASH-NAMESPACE/NAME/tcp/PORTNAME, as kube-proxy names them.
        let id = format!("default/{}/tcp/{}", s.name, s.port_name);
        let h = &hash16(&format!("{}tcp", port_name(s)))[..8];
        let (svc, ext) = (format!("service-{h}-{id}"), format!("external-{h}-{id}"));
        let mut vmap = Vec::new();
        for (i, ep) in eps.iter().enumerate() {
            let epc = format!("endpoint-{}-{id}__{ep}/{}", &hash16(&format!("{id}{ep}"))[..8], s.target_port);
            let _ = writeln!(t, " chain {epc} {{ ip saddr {ep} jump mark-for-masquerade; meta l4proto tcp dnat to {ep}:{}; }}", s.target_port);
            vmap.push(format!("{i} : goto {epc}"));
        }
        let _ = writeln!(
            t,
            " chain {svc} {{ ip daddr {cip} tcp dport {port} ip saddr != {cluster} jump mark-for-masquerade; numgen random mod {} vmap {{ {} }}; }}",
            eps.len(),
            vmap.join(", ")
        );
        let _ = writeln!(t, " chain {ext} {{ jump mark-for-masquerade; goto {svc}; }}");
        let _ = writeln!(elements, "add element ip kube-proxy service-ips {{ {cip} . tcp . {port} : goto {svc} }}");
        let _ = writeln!(elements, "add element ip kube-proxy service-nodeports {{ tcp . {np} : goto {ext} }}");
    }
    t.push_str("}\n");
    t + &elements
}

/// Programs kube-proxy's rules on node `i` in `mode`, replacing any it has (a sync).
pub fn program(lab: &Lab, i: usize, mode: ProxyMode, empty: &[String]) -> Result<()> {
    remove(lab, i, mode)?;
    let ns = lab.node_ns(i);
    match mode {
        ProxyMode::IptablesNft => sys::run_in_stdin(&ns, &tools::IPTABLES_NFT_RESTORE, &["--noflush", "-w"], &iptables_rules(empty)).map(|_| ()),
        ProxyMode::IptablesLegacy => sys::run_in_stdin(&ns, &tools::IPTABLES_LEGACY_RESTORE, &["--noflush", "-w"], &iptables_rules(empty)).map(|_| ()),
        ProxyMode::Nftables => sys::run_in_stdin(&ns, &tools::NFT, &["-f", "-"], &nft_rules(i, empty)).map(|_| ()),
    }
}

/// Removes every rule kube-proxy wrote on node `i` (what `kube-proxy --cleanup` leaves, or a node where
/// it never ran). Nothing to remove is not an error.
pub fn remove(lab: &Lab, i: usize, mode: ProxyMode) -> Result<()> {
    let ns = lab.node_ns(i);
    match mode {
        ProxyMode::Nftables => {
            sys::run_in_stdin(&ns, &tools::NFT, &["-f", "-"], "table ip kube-proxy {}\ndelete table ip kube-proxy\n").map(|_| ())
        }
        ProxyMode::IptablesNft | ProxyMode::IptablesLegacy => {
            let (save, restore) = match mode {
                ProxyMode::IptablesLegacy => (&tools::IPTABLES_LEGACY_SAVE, &tools::IPTABLES_LEGACY_RESTORE),
                _ => (&tools::IPTABLES_NFT_SAVE, &tools::IPTABLES_NFT_RESTORE),
            };
            let dump = sys::run_in(&ns, save, &[])?;
            let script = removal_script(&dump);
            if script.is_empty() {
                return Ok(());
            }
            sys::run_in_stdin(&ns, restore, &["--noflush", "-w"], &script).map(|_| ())
        }
    }
}

/// From an `iptables-save` dump: the deletions of every rule that jumps to a KUBE- chain from a
/// built-in chain, then every KUBE- chain flushed and deleted, table by table.
fn removal_script(dump: &str) -> String {
    let mut out = String::new();
    let mut table = String::new();
    let mut chains: Vec<String> = Vec::new();
    let mut jumps: Vec<String> = Vec::new();
    let flush = |out: &mut String, table: &str, chains: &mut Vec<String>, jumps: &mut Vec<String>| {
        if table.is_empty() || (chains.is_empty() && jumps.is_empty()) {
            return;
        }
        let _ = writeln!(out, "*{table}");
        for j in jumps.drain(..) {
            let _ = writeln!(out, "-D {j}");
        }
        for c in chains.iter() {
            let _ = writeln!(out, "-F {c}");
        }
        for c in chains.drain(..) {
            let _ = writeln!(out, "-X {c}");
        }
        let _ = writeln!(out, "COMMIT");
    };
    for line in dump.lines() {
        if let Some(t) = line.strip_prefix('*') {
            flush(&mut out, &table, &mut chains, &mut jumps);
            table = t.to_string();
        } else if let Some(c) = line.strip_prefix(':') {
            let name = c.split_whitespace().next().unwrap_or("");
            if name.starts_with("KUBE-") {
                chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            let to_kube = rule.split_whitespace().skip_while(|w| *w != "-j").nth(1).is_some_and(|t| t.starts_with("KUBE-"));
            if !chain.starts_with("KUBE-") && to_kube {
                jumps.push(rule.to_string());
            }
        }
    }
    flush(&mut out, &table, &mut chains, &mut jumps);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_undoes_the_jumps_then_the_chains_and_leaves_the_rest() {
        let dump = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:FLANNEL-POSTRTG - [0:0]\n\
                    -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                    -A POSTROUTING -j FLANNEL-POSTRTG\nCOMMIT\n*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n";
        let s = removal_script(dump);
        assert_eq!(s, "*nat\n-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-F KUBE-SERVICES\n-X KUBE-SERVICES\nCOMMIT\n");
    }

    #[test]
    fn chain_names_are_stable_and_distinct() {
        let [a, b] = &SERVICES;
        assert_eq!(svc_chain(a), svc_chain(a));
        assert_ne!(svc_chain(a), svc_chain(b));
        assert_eq!(svc_chain(a).len(), "KUBE-SVC-".len() + 16);
    }
}
