//! Kubernetes Services as this node's kube-proxy programmed them, read back from its rules: iptables
//! mode in either backend (nat KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-* DNAT, KUBE-NODEPORTS →
//! KUBE-EXT-*, the filter table's "has no endpoints" REJECTs) and nftables mode (table `ip kube-proxy`:
//! the service-ips / service-nodeports verdict maps, service- and endpoint- chains,
//! no-endpoint-services). IPVS mode keeps its Services in the kernel's IPVS table, not in rules: it is
//! named, not read (`ipvs_seen`).

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use super::RuleSets;

/// One Service port as the node's rules implement it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// kube-proxy's ServicePortName: `NAMESPACE/NAME:PORT` (`NAMESPACE/NAME` for an unnamed port).
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// "tcp", "udp", "sctp".
    pub proto: String,
    pub node_port: Option<u16>,
    /// Where the DNAT sends it; empty: no endpoints.
    pub endpoints: Vec<Endpoint>,
    /// The rule set says it has no endpoints (a REJECT, or nft's no-endpoint-services).
    pub no_endpoints_rule: Option<String>,
    /// "iptables-nft", "iptables-legacy", "nft".
    pub backend: String,
    /// KUBE-SVC-… or service-…-NS/NAME/PROTO/PORT.
    pub chain: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    /// KUBE-SEP-… or endpoint-….
    pub chain: String,
}

impl Service {
    /// `default/jellyfin:http` → `default/jellyfin`.
    pub fn object(&self) -> &str {
        self.name.split(':').next().unwrap_or(&self.name)
    }
    pub fn endpoint(&self, addr: Ipv4Addr) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| *e.addr.ip() == addr)
    }
}

/// Every Service found in the node's rule sets, each backend on its own (a node whose kube-proxy wrote
/// to both backends over time lists a Service twice: both are in the kernel).
pub fn from_rules(rules: &RuleSets) -> Vec<Service> {
    each_backend(rules, from_iptables, from_nft)
}

/// What `ipt` reads from each iptables backend's dump (with the backend's name), then what `nft` reads
/// from the native rule set.
fn each_backend<T>(rules: &RuleSets, ipt: fn(&str, &str) -> Vec<T>, nft: fn(&str) -> Vec<T>) -> Vec<T> {
    let mut out = Vec::new();
    for (dump, backend) in [(&rules.iptables_nft, "iptables-nft"), (&rules.iptables_legacy, "iptables-legacy")] {
        if let Some(d) = dump {
            out.extend(ipt(d, backend));
        }
    }
    if let Some(d) = &rules.nft {
        out.extend(nft(d));
    }
    out
}

/// Does any backend hold kube-proxy's rules at all (its top chains), whatever Services they have?
pub fn kube_proxy_present(rules: &RuleSets) -> Vec<&'static str> {
    let mut v = Vec::new();
    if rules.iptables_nft.as_deref().is_some_and(|d| d.contains(":KUBE-SERVICES")) {
        v.push("iptables-nft");
    }
    if rules.iptables_legacy.as_deref().is_some_and(|d| d.contains(":KUBE-SERVICES")) {
        v.push("iptables-legacy");
    }
    if rules.nft.as_deref().is_some_and(|d| d.contains("table ip kube-proxy")) {
        v.push("nft");
    }
    v
}

/// The Service ranges kube-proxy's rules name (nftables mode drops traffic to unallocated ClusterIPs
/// of the range: `ip daddr 10.96.0.0/12 drop`).
pub fn service_ranges(rules: &RuleSets) -> Vec<(Ipv4Addr, u8)> {
    let Some(d) = &rules.nft else { return vec![] };
    nft_chain(d, "cluster-ips-check")
        .iter()
        .filter(|l| l.ends_with("drop comment \"Drop traffic to unallocated ClusterIPs\"") || l.contains("drop comment \"Drop traffic to unallocated ClusterIPs\""))
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|net| {
            let (a, len) = net.split_once('/')?;
            Some((a.parse().ok()?, len.parse().ok()?))
        })
        .collect()
}

/// kube-proxy in IPVS mode leaves `kube-ipvs0` and KUBE-IPVS chains/sets: its Services are not in rules.
pub fn ipvs_seen(rules: &RuleSets) -> bool {
    [&rules.iptables_nft, &rules.iptables_legacy].iter().any(|d| d.as_deref().is_some_and(|d| d.contains("KUBE-LOAD-BALANCER") || d.contains("KUBE-CLUSTER-IP")))
}

/// Words of an iptables-save rule, quoted comments kept whole (without their quotes).
fn words(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in rule.chars() {
        match ch {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn opt<'a>(w: &'a [String], name: &str) -> Option<&'a str> {
    w.iter().position(|x| x == name).and_then(|i| w.get(i + 1)).map(String::as_str)
}

/// One table's `-A` rules of an iptables-save dump (counters dropped), as word lists.
fn table_rules(dump: &str, table: &str) -> Vec<Vec<String>> {
    let mut cur = String::new();
    let mut out = Vec::new();
    for line in dump.lines() {
        if let Some(t) = line.strip_prefix('*') {
            cur = t.to_string();
            continue;
        }
        if cur != table {
            continue;
        }
        let rule = if line.starts_with('[') { line.split_once(' ').map(|(_, r)| r).unwrap_or("") } else { line };
        if rule.starts_with("-A ") {
            out.push(words(rule));
        }
    }
    out
}

fn from_iptables(dump: &str, backend: &str) -> Vec<Service> {
    let nat = table_rules(dump, "nat");
    let filter = table_rules(dump, "filter");
    // Each table's rules by chain, once: a node with thousands of Services has tens of thousands of rules.
    let by_chain = |rules: &[Vec<String>]| {
        let mut m: std::collections::HashMap<String, Vec<Vec<String>>> = Default::default();
        for w in rules {
            if let Some(c) = w.get(1) {
                m.entry(c.clone()).or_default().push(w.clone());
            }
        }
        m
    };
    let (nat, filter) = (by_chain(&nat), by_chain(&filter));
    let in_chain = |rules: &std::collections::HashMap<String, Vec<Vec<String>>>, chain: &str| -> Vec<Vec<String>> { rules.get(chain).cloned().unwrap_or_default() };
    let mut out: Vec<Service> = Vec::new();
    for w in in_chain(&nat, "KUBE-SERVICES") {
        let (Some(d), Some(dport), Some(target)) = (opt(&w, "-d"), opt(&w, "--dport"), opt(&w, "-j")) else { continue };
        if !target.starts_with("KUBE-SVC-") {
            continue;
        }
        let Some(ip) = d.trim_end_matches("/32").parse::<Ipv4Addr>().ok() else { continue };
        let name = opt(&w, "--comment").unwrap_or(target).trim_end_matches(" cluster IP").to_string();
        let mut endpoints = Vec::new();
        for r in in_chain(&nat, target) {
            let Some(sep) = opt(&r, "-j").filter(|t| t.starts_with("KUBE-SEP-")) else { continue };
            if let Some(to) = in_chain(&nat, sep).iter().find_map(|s| opt(s, "--to-destination").and_then(|t| t.parse::<SocketAddrV4>().ok())) {
                endpoints.push(Endpoint { addr: to, chain: sep.to_string() });
            }
        }
        out.push(Service {
            name,
            cluster_ip: ip,
            port: dport.parse().unwrap_or(0),
            proto: opt(&w, "-p").unwrap_or("tcp").to_string(),
            node_port: None,
            endpoints,
            no_endpoints_rule: None,
            backend: backend.into(),
            chain: target.to_string(),
        });
    }
    // NodePorts: KUBE-NODEPORTS → KUBE-EXT-* (or, older, KUBE-SVC-* / KUBE-XLB-*) → KUBE-SVC-*.
    for w in in_chain(&nat, "KUBE-NODEPORTS") {
        let (Some(np), Some(target)) = (opt(&w, "--dport"), opt(&w, "-j")) else { continue };
        let svc = if target.starts_with("KUBE-SVC-") {
            Some(target.to_string())
        } else {
            in_chain(&nat, target).iter().find_map(|r| opt(r, "-j").filter(|t| t.starts_with("KUBE-SVC-")).map(str::to_string))
        };
        if let Some(s) = svc.and_then(|c| out.iter_mut().find(|s| s.chain == c)) {
            s.node_port = np.parse().ok();
        }
    }
    // Services without endpoints: the filter table's REJECTs.
    for w in in_chain(&filter, "KUBE-SERVICES").into_iter().chain(in_chain(&filter, "KUBE-EXTERNAL-SERVICES")) {
        let (Some(comment), Some(dport)) = (opt(&w, "--comment"), opt(&w, "--dport")) else { continue };
        let Some(name) = comment.strip_suffix(" has no endpoints") else { continue };
        let rule = w.join(" ");
        match opt(&w, "-d").and_then(|d| d.trim_end_matches("/32").parse::<Ipv4Addr>().ok()) {
            Some(ip) => out.push(Service {
                name: name.to_string(),
                cluster_ip: ip,
                port: dport.parse().unwrap_or(0),
                proto: opt(&w, "-p").unwrap_or("tcp").to_string(),
                node_port: None,
                endpoints: Vec::new(),
                no_endpoints_rule: Some(rule),
                backend: backend.into(),
                chain: "KUBE-SERVICES".into(),
            }),
            None => {
                if let Some(s) = out.iter_mut().find(|s| s.name == name && s.endpoints.is_empty()) {
                    s.node_port = dport.parse().ok();
                }
            }
        }
    }
    out
}

/// `a, b : goto c, …` of an nft set or map's `elements = { … }` (over several lines), one string each.
fn nft_elements(dump: &str, table: &str, map: &str) -> Vec<String> {
    let Some(t) = dump.find(&format!("table ip {table} ")) else { return vec![] };
    let rest = &dump[t..];
    let Some(m) = rest.find(&format!("map {map} {{")).or_else(|| rest.find(&format!("set {map} {{"))) else { return vec![] };
    let body = &rest[m..];
    let end = body.find("\n\t}").unwrap_or(body.len());
    let body = &body[..end];
    let Some(e) = body.find("elements = {") else { return vec![] };
    let list = &body[e + "elements = {".len()..];
    let list = &list[..list.rfind('}').unwrap_or(list.len())];
    list.split(',').map(|s| s.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|s| !s.is_empty()).collect()
}

/// The rule lines of an nft chain of table `ip kube-proxy` (handles cut off).
fn nft_chain<'a>(dump: &'a str, chain: &str) -> Vec<&'a str> {
    nft_chains(dump).remove(chain).unwrap_or_default()
}

/// Every chain of the listing with its rule lines (handles cut off), read in one pass: a node with
/// thousands of Services has thousands of chains.
fn nft_chains(dump: &str) -> std::collections::HashMap<&str, Vec<&str>> {
    let mut out: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    let mut current: Option<&str> = None;
    for line in dump.lines() {
        let t = line.trim();
        if let Some(rest) = line.strip_prefix("\tchain ") {
            current = rest.split(" {").next();
            if let Some(c) = current {
                out.entry(c).or_default();
            }
        } else if t == "}" {
            current = None;
        } else if let Some(c) = current {
            out.entry(c).or_default().push(t.split(" # handle").next().unwrap_or(t));
        }
    }
    out
}

/// `service-HASH-NS/NAME/PROTO/PORT` → `NS/NAME:PORT`.
fn nft_service_name(chain: &str) -> String {
    let id = chain.splitn(3, '-').nth(2).unwrap_or(chain);
    let parts: Vec<&str> = id.split('/').collect();
    match parts.as_slice() {
        [ns, name, _proto, port] if !port.is_empty() => format!("{ns}/{name}:{port}"),
        [ns, name, ..] => format!("{ns}/{name}"),
        _ => id.to_string(),
    }
}

fn from_nft(dump: &str) -> Vec<Service> {
    let mut out = Vec::new();
    let chains = nft_chains(dump);
    let chain_of = |name: &str| chains.get(name).cloned().unwrap_or_default();
    for e in nft_elements(dump, "kube-proxy", "service-ips") {
        // 10.96.12.7 . tcp . 8096 : goto service-…
        let Some((key, verdict)) = e.split_once(" : ") else { continue };
        let k: Vec<&str> = key.split(" . ").collect();
        let Some(chain) = verdict.strip_prefix("goto ").or_else(|| verdict.strip_prefix("jump ")) else { continue };
        let [ip, proto, port]: [&str; 3] = k.as_slice().try_into().unwrap_or(["", "", ""]);
        let chain = chain.trim();
        let Ok(ip) = ip.parse::<Ipv4Addr>() else { continue };
        let mut endpoints = Vec::new();
        for line in chain_of(chain) {
            for ep in line.split_whitespace().filter(|w| w.starts_with("endpoint-")) {
                let ep = ep.trim_end_matches([',', '}', ';']);
                if let Some(to) = chain_of(ep).iter().find_map(|l| l.split("dnat to ").nth(1)).and_then(|t| t.split_whitespace().next()?.parse::<SocketAddrV4>().ok()) {
                    endpoints.push(Endpoint { addr: to, chain: ep.to_string() });
                }
            }
        }
        out.push(Service {
            name: nft_service_name(chain),
            cluster_ip: ip,
            port: port.parse().unwrap_or(0),
            proto: proto.to_string(),
            node_port: None,
            endpoints,
            no_endpoints_rule: None,
            backend: "nft".into(),
            chain: chain.to_string(),
        });
    }
    for e in nft_elements(dump, "kube-proxy", "service-nodeports") {
        // tcp . 30896 : goto external-…  (→ goto service-…)
        let Some((key, verdict)) = e.split_once(" : ") else { continue };
        let Some(np) = key.split(" . ").nth(1).and_then(|p| p.parse::<u16>().ok()) else { continue };
        let target = verdict.split_whitespace().nth(1).unwrap_or("");
        let svc = if target.starts_with("service-") {
            Some(target.to_string())
        } else {
            chain_of(target).iter().find_map(|l| l.split_whitespace().skip_while(|w| *w != "goto").nth(1).map(str::to_string))
        };
        if let Some(s) = svc.and_then(|c| out.iter_mut().find(|s| s.chain == c)) {
            s.node_port = Some(np);
        }
    }
    for e in nft_elements(dump, "kube-proxy", "no-endpoint-services") {
        // 10.96.40.10 . tcp . 8096 comment "default/web:http" : goto reject-chain
        let Some((key, _)) = e.split_once(" : ") else { continue };
        let (key, name) = match key.split_once(" comment ") {
            Some((k, c)) => (k, c.trim_matches('"').to_string()),
            None => (key, String::new()),
        };
        let k: Vec<&str> = key.split(" . ").collect();
        let [ip, proto, port]: [&str; 3] = k.as_slice().try_into().unwrap_or(["", "", ""]);
        let Ok(ip) = ip.parse::<Ipv4Addr>() else { continue };
        out.push(Service {
            name: if name.is_empty() { format!("{ip}:{port}") } else { name },
            cluster_ip: ip,
            port: port.parse().unwrap_or(0),
            proto: proto.to_string(),
            node_port: None,
            endpoints: Vec::new(),
            no_endpoints_rule: Some(format!("element {e} of map ip kube-proxy no-endpoint-services")),
            backend: "nft".into(),
            chain: "no-endpoint-services".into(),
        });
    }
    for e in nft_elements(dump, "kube-proxy", "no-endpoint-nodeports") {
        let Some((key, _)) = e.split_once(" : ") else { continue };
        let (key, name) = match key.split_once(" comment ") {
            Some((k, c)) => (k, c.trim_matches('"').to_string()),
            None => continue,
        };
        let np = key.split(" . ").nth(1).and_then(|p| p.parse::<u16>().ok());
        if let Some(s) = out.iter_mut().find(|s| s.name == name && s.endpoints.is_empty()) {
            s.node_port = np;
        }
    }
    out
}

/// A Service whose chain kube-proxy left behind while what leads to it is gone: `iptables -t nat -F
/// KUBE-SERVICES`, a cleanup cut short, a kube-proxy that died mid-sync, the nftables mode's maps
/// emptied. The chain's own rules still name the Service (kube-proxy's comments, the masquerade rule's
/// ClusterIP and port), so the half-gone rules are proven without the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftOver {
    /// `NAMESPACE/NAME:PORT`.
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub proto: String,
    /// The NodePort its KUBE-NODEPORTS rule still names (iptables mode; nftables mode keeps NodePorts only
    /// in the map).
    pub node_port: Option<u16>,
    pub backend: String,
    /// The chain left behind: KUBE-SVC-… or service-….
    pub chain: String,
    /// What no longer leads to it, in words.
    pub unreachable: String,
}

/// Every chain reachable from `roots` by -j/-g in one table's rules.
fn reachable(by_chain: &std::collections::HashMap<String, Vec<Vec<String>>>, roots: &[&str]) -> std::collections::HashSet<String> {
    let mut seen: std::collections::HashSet<String> = roots.iter().map(|r| r.to_string()).collect();
    let mut todo: Vec<String> = seen.iter().cloned().collect();
    while let Some(c) = todo.pop() {
        for w in by_chain.get(&c).into_iter().flatten() {
            if let Some(t) = opt(w, "-j").or_else(|| opt(w, "-g")) {
                if seen.insert(t.to_string()) {
                    todo.push(t.to_string());
                }
            }
        }
    }
    seen
}

fn left_overs_iptables(dump: &str, backend: &str) -> Vec<LeftOver> {
    let mut by_chain: std::collections::HashMap<String, Vec<Vec<String>>> = Default::default();
    for w in table_rules(dump, "nat") {
        if let Some(c) = w.get(1) {
            by_chain.entry(c.clone()).or_default().push(w);
        }
    }
    let live = reachable(&by_chain, &["PREROUTING", "OUTPUT"]);
    let mut out = Vec::new();
    let mut chains: Vec<&String> = by_chain.keys().filter(|c| c.starts_with("KUBE-SVC-") && !live.contains(*c)).collect();
    chains.sort();
    for chain in chains {
        // Its masquerade rule names the ClusterIP and port: `! -s CLUSTER -d CIP/32 -p tcp -m comment
        // --comment "NS/NAME:PORT cluster IP" -m tcp --dport PORT -j KUBE-MARK-MASQ` (written where
        // kube-proxy knows the cluster's CIDR, or masquerades all).
        let Some(w) = by_chain[chain].iter().find(|w| opt(w, "-d").is_some() && opt(w, "--dport").is_some()) else { continue };
        let (Some(ip), Some(port)) = (opt(w, "-d").and_then(|d| d.trim_end_matches("/32").parse().ok()), opt(w, "--dport").and_then(|p| p.parse().ok())) else { continue };
        let name = opt(w, "--comment").map(|c| c.trim_end_matches(" cluster IP").to_string()).unwrap_or_else(|| chain.clone());
        // Its NodePort: KUBE-NODEPORTS → (KUBE-EXT-… →) this chain.
        let node_port = by_chain.get("KUBE-NODEPORTS").into_iter().flatten().find_map(|r| {
            let target = opt(r, "-j")?;
            let leads = target == chain || by_chain.get(target).into_iter().flatten().any(|e| opt(e, "-j") == Some(chain.as_str()));
            leads.then(|| opt(r, "--dport")?.parse().ok())?
        });
        let services_jumps = by_chain.get("KUBE-SERVICES").into_iter().flatten().any(|r| opt(r, "-j") == Some(chain.as_str()));
        let unreachable = if !by_chain.contains_key("KUBE-SERVICES") && !dump.contains(":KUBE-SERVICES") {
            "the KUBE-SERVICES chain is gone".to_string()
        } else if services_jumps {
            "nat PREROUTING and OUTPUT no longer jump to KUBE-SERVICES".to_string()
        } else {
            format!("KUBE-SERVICES has no rule for it ({} rule{} left there)", by_chain.get("KUBE-SERVICES").map_or(0, Vec::len), if by_chain.get("KUBE-SERVICES").map_or(0, Vec::len) == 1 { "" } else { "s" })
        };
        out.push(LeftOver { name, cluster_ip: ip, port, proto: opt(w, "-p").unwrap_or("tcp").to_string(), node_port, backend: backend.into(), chain: chain.clone(), unreachable });
    }
    out
}

fn left_overs_nft(dump: &str) -> Vec<LeftOver> {
    if !dump.contains("table ip kube-proxy") {
        return vec![];
    }
    let in_map: Vec<String> = nft_elements(dump, "kube-proxy", "service-ips").iter().filter_map(|e| e.split_once(" : ").map(|(_, v)| v.split_whitespace().nth(1).unwrap_or("").to_string())).collect();
    let mut out = Vec::new();
    let chains = nft_chains(dump);
    let mut names: Vec<&&str> = chains.keys().filter(|c| c.starts_with("service-") && !in_map.iter().any(|m| m == **c)).collect();
    names.sort();
    for chain in names {
        // `ip daddr 10.96.12.7 tcp dport 8096 ip saddr != 10.244.0.0/16 jump mark-for-masquerade`
        let Some((ip, proto, port)) = chains[*chain].iter().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let ip = w.windows(3).find(|x| x[0] == "ip" && x[1] == "daddr").and_then(|x| x[2].parse::<Ipv4Addr>().ok())?;
            let (proto, port) = w.windows(3).find(|x| matches!(x[0], "tcp" | "udp" | "sctp") && x[1] == "dport").and_then(|x| Some((x[0], x[2].parse::<u16>().ok()?)))?;
            Some((ip, proto, port))
        }) else {
            continue;
        };
        out.push(LeftOver {
            name: nft_service_name(chain),
            cluster_ip: ip,
            port,
            proto: proto.to_string(),
            node_port: None,
            backend: "nft".into(),
            chain: chain.to_string(),
            unreachable: format!("the service-ips map of table ip kube-proxy has no element for it ({} left)", in_map.len()),
        });
    }
    out
}

/// Every Service chain kube-proxy left unreachable on this node, in each backend.
pub fn left_overs(rules: &RuleSets) -> Vec<LeftOver> {
    each_backend(rules, left_overs_iptables, left_overs_nft)
}

/// The left-over Service a destination names: its ClusterIP and port, or (`local`) its NodePort.
pub fn lookup_left_over<'a>(left: &'a [LeftOver], dst: Ipv4Addr, port: u16, proto: &str, local: bool) -> Option<&'a LeftOver> {
    find_port(left, |s| (s.cluster_ip, s.port, s.proto.as_str(), s.node_port), (dst, port, proto), local)
}

/// The first of `items` (each seen as ClusterIP, port, protocol, NodePort through `key`) that
/// `dst:port/proto` names, or (`local`) whose NodePort is `port`. A protocol the rules did not say
/// matches any.
fn find_port<'a, T>(items: &'a [T], key: impl Fn(&T) -> (Ipv4Addr, u16, &str, Option<u16>), (dst, port, proto): (Ipv4Addr, u16, &str), local: bool) -> Option<&'a T> {
    let of = |p: &str| p.is_empty() || p == proto;
    items
        .iter()
        .find(|s| matches!(key(s), (ip, p, pr, _) if ip == dst && p == port && of(pr)))
        .or_else(|| if local { items.iter().find(|s| matches!(key(s), (_, _, pr, np) if np == Some(port) && of(pr))) } else { None })
}

/// The Service a destination names on this node: a ClusterIP and port, or (`local`: an address of the
/// node itself) a NodePort — of protocol `proto` ("tcp", "udp"): a Service's UDP and TCP ports of the
/// same number (kube-dns's dns and dns-tcp) are two, with endpoints each of their own.
pub fn lookup<'a>(services: &'a [Service], dst: Ipv4Addr, port: u16, proto: &str, local: bool) -> Option<&'a Service> {
    find_port(services, |s| (s.cluster_ip, s.port, s.proto.as_str(), s.node_port), (dst, port, proto), local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{services as lab, topology};

    /// The lab's rules as each backend lists them. nft: `nft list table ip kube-proxy` recorded from the
    /// lab on storagenodet3500 (the listing's layout, not the lab's input, is what a node shows).
    fn mode_dump(mode: lab::ProxyMode, empty: &[String]) -> RuleSets {
        match mode {
            lab::ProxyMode::Nftables => RuleSets {
                nft: Some(if empty.is_empty() { include_str!("testdata/kube-proxy-nft.txt") } else { include_str!("testdata/kube-proxy-nft-no-endpoints.txt") }.into()),
                ..Default::default()
            },
            lab::ProxyMode::IptablesLegacy => RuleSets { iptables_legacy: Some(lab::iptables_rules(empty)), ..Default::default() },
            lab::ProxyMode::IptablesNft => RuleSets { iptables_nft: Some(lab::iptables_rules(empty)), ..Default::default() },
        }
    }

    #[test]
    fn the_labs_services_read_back_in_every_mode() {
        for mode in lab::ProxyMode::ALL {
            let svcs = from_rules(&mode_dump(mode, &[]));
            let jf = lookup(&svcs, topology::SERVICES[0].cluster_ip, 8096, "tcp", false).unwrap_or_else(|| panic!("{mode:?}: {svcs:?}"));
            assert_eq!(jf.name, "default/jellyfin:http", "{mode:?}");
            assert_eq!(jf.node_port, Some(30896), "{mode:?}");
            assert_eq!(jf.endpoints.len(), 1, "{mode:?}");
            assert_eq!(jf.endpoints[0].addr, "10.244.0.19:8096".parse().unwrap(), "{mode:?}");
            assert_eq!(lookup(&svcs, "198.51.100.1".parse().unwrap(), 30896, "tcp", true).map(|s| s.name.as_str()), Some("default/jellyfin:http"));
            assert!(lookup(&svcs, "198.51.100.1".parse().unwrap(), 30896, "tcp", false).is_none());
            let none = from_rules(&mode_dump(mode, &["jellyfin".to_string()]));
            let jf = lookup(&none, topology::SERVICES[0].cluster_ip, 8096, "tcp", false).unwrap_or_else(|| panic!("{mode:?}: {none:?}"));
            assert_eq!(jf.name, "default/jellyfin:http", "{mode:?}");
            assert!(jf.endpoints.is_empty() && jf.no_endpoints_rule.is_some(), "{mode:?}: {jf:?}");
            assert_eq!(jf.node_port, Some(30896), "{mode:?}");
            assert_eq!(lookup(&none, topology::SERVICES[1].cluster_ip, 8096, "tcp", false).map(|s| s.endpoints.len()), Some(1), "{mode:?}");
        }
    }

    /// kube-proxy's rules half gone: KUBE-SERVICES flushed (iptables mode), the service maps emptied
    /// (nftables mode). The Services are no more in effect, and their chains still name them.
    #[test]
    fn services_whose_chains_were_left_behind_are_read_from_the_chains() {
        let jf = topology::SERVICES[0].cluster_ip;
        for mode in [lab::ProxyMode::IptablesNft, lab::ProxyMode::IptablesLegacy] {
            let full = mode_dump(mode, &[]);
            assert!(left_overs(&full).is_empty(), "{mode:?}: every chain is in effect");
            let flush = |d: &String| d.lines().filter(|l| !l.starts_with("-A KUBE-SERVICES ")).collect::<Vec<_>>().join("\n") + "\n";
            let half = RuleSets { iptables_nft: full.iptables_nft.as_ref().map(flush), iptables_legacy: full.iptables_legacy.as_ref().map(flush), nft: None };
            // Read as before, nothing is found; the left-overs name it.
            assert!(lookup(&from_rules(&half), jf, 8096, "tcp", false).is_none(), "{mode:?}");
            let left = left_overs(&half);
            let lo = lookup_left_over(&left, jf, 8096, "tcp", false).unwrap_or_else(|| panic!("{mode:?}: {left:?}"));
            assert_eq!((lo.name.as_str(), lo.node_port, lo.backend.as_str()), ("default/jellyfin:http", Some(30896), mode.name()), "{mode:?}");
            assert!(lo.chain.starts_with("KUBE-SVC-") && lo.unreachable.starts_with("KUBE-SERVICES has no rule for it"), "{lo:?}");
            assert_eq!(lookup_left_over(&left, "198.51.100.1".parse().unwrap(), 30896, "tcp", true).map(|l| l.name.as_str()), Some("default/jellyfin:http"));
            // The jumps into KUBE-SERVICES removed, its rules kept: the same, said as such.
            let unhooked = full.iptables_nft.as_ref().or(full.iptables_legacy.as_ref()).unwrap().lines().filter(|l| !l.contains("-j KUBE-SERVICES")).collect::<Vec<_>>().join("\n");
            let left = left_overs(&RuleSets { iptables_nft: Some(unhooked), ..Default::default() });
            assert!(lookup_left_over(&left, jf, 8096, "tcp", false).is_some_and(|l| l.unreachable.contains("no longer jump to KUBE-SERVICES")), "{left:?}");
        }
        let nft = include_str!("testdata/kube-proxy-nft.txt");
        assert!(left_overs(&RuleSets { nft: Some(nft.into()), ..Default::default() }).is_empty());
        let start = nft.find("\tmap service-ips {").unwrap();
        let end = start + nft[start..].find("\n\t}").unwrap();
        let emptied = format!("{}\tmap service-ips {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n{}", &nft[..start], &nft[end..]);
        let left = left_overs(&RuleSets { nft: Some(emptied), ..Default::default() });
        let lo = lookup_left_over(&left, jf, 8096, "tcp", false).unwrap_or_else(|| panic!("{left:?}"));
        assert_eq!((lo.name.as_str(), lo.proto.as_str(), lo.backend.as_str()), ("default/jellyfin:http", "tcp", "nft"));
        assert!(lo.unreachable.contains("service-ips map"), "{lo:?}");
    }

    #[test]
    fn ipvs_mode_is_named_not_read_and_no_rules_is_no_kube_proxy() {
        // kube-proxy's IPVS mode: its Services are ipsets and IPVS virtual servers; iptables only matches
        // the sets (what `iptables-save` shows on such a node).
        let ipvs = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
                    -A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ\n\
                    -A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\nCOMMIT\n";
        let r = RuleSets { iptables_nft: Some(ipvs.into()), ..Default::default() };
        assert!(ipvs_seen(&r));
        assert!(from_rules(&r).is_empty(), "no Service is read from IPVS mode's rules");
        assert_eq!(kube_proxy_present(&r), vec!["iptables-nft"]);
        let none = RuleSets { iptables_nft: Some("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n".into()), nft: Some(String::new()), ..Default::default() };
        assert!(kube_proxy_present(&none).is_empty() && !ipvs_seen(&none));
        // nftables mode names its Service range.
        let nft = RuleSets { nft: Some(include_str!("testdata/kube-proxy-nft.txt").into()), ..Default::default() };
        assert_eq!(service_ranges(&nft), vec![(Ipv4Addr::new(10, 96, 0, 0), 12)]);
    }

    /// The real kube-proxy's rules for kube-dns: a UDP and a TCP port both numbered 53, each a Service
    /// port of its own (named by the probe's protocol), beside flanneld's masquerade.
    #[test]
    fn a_udp_and_a_tcp_port_of_one_number_are_two_service_ports() {
        let r = RuleSets { iptables_nft: Some(include_str!("testdata/kube-proxy-1.34-iptables.txt").into()), ..Default::default() };
        let all = from_rules(&r);
        let dns = Ipv4Addr::new(10, 96, 0, 10);
        let udp = lookup(&all, dns, 53, "udp", false).expect("kube-dns:dns");
        let tcp = lookup(&all, dns, 53, "tcp", false).expect("kube-dns:dns-tcp");
        assert_eq!((udp.name.as_str(), udp.proto.as_str(), udp.endpoints.len()), ("kube-system/kube-dns:dns", "udp", 2));
        assert_eq!((tcp.name.as_str(), tcp.proto.as_str(), tcp.endpoints.len()), ("kube-system/kube-dns:dns-tcp", "tcp", 2));
        assert!(lookup(&all, dns, 9153, "udp", false).is_none(), "metrics is TCP only");
    }
}
