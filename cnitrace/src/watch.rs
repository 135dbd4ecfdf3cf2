//! `cnitrace watch`: every drop on the node as it happens — no pair — grouped by pod, reason and the
//! function that freed the packet, with rates; the noise classes `follow` discounts folded away.
//!
//! kernel counts (probe::watch) → groups (named here) → text / JSON / Prometheus (cli::watch).

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    time::Duration,
};

use cnitrace_common::DropKey;
use serde::Serialize;

use crate::resolve::{self, HostResolver};

/// One line of the view: drops of one pod (or namespace) for one reason at one function.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Group {
    /// The pod the drops concern (the namespace they happened in, or the pod one of their addresses
    /// belongs to), else the namespace's name.
    pub pod: String,
    /// The node the pod hangs off (its node namespace's name), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where the kernel freed them: namespace and interface.
    pub netns: String,
    pub ifname: String,
    pub reason: String,
    pub function: String,
    /// What was dropped, from the last packet counted: `ipv4 udp 10.244.0.20 → 10.244.1.53`.
    pub what: String,
    pub total: u64,
    /// Drops a second over the last period.
    pub rate: f64,
    /// A class `follow` does not count as the pair dying (TCP duplicates, a ping reply after its socket…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise: Option<&'static str>,
}

/// Drops that are not traffic dying: the classes `follow` discounts (path::is_noise), and what every
/// IPv4 pod network drops all day without anyone missing it (IPv6 neighbour discovery and multicast on
/// links that carry IPv4 only, multicast nobody joined).
pub fn noise_class(function: &str, reason: &str, k: &DropKey) -> Option<&'static str> {
    let base = function.split('.').next().unwrap_or(function);
    let l4 = k.l4;
    if k.proto == 0x86dd {
        return Some("ipv6 on an ipv4 pod network");
    }
    if k.proto == 0x0800 && Ipv4Addr::from(k.daddr.to_ne_bytes()).is_multicast() {
        return Some("multicast nobody joined");
    }
    let no_socket = reason == "NO_SOCKET" || reason.starts_with("unknown");
    if matches!(reason, "TCP_OLD_DATA" | "TCP_OFOMERGE" | "TCP_OLD_SEQUENCE" | "TCP_OLD_ACK") {
        return Some("tcp duplicate");
    }
    if reason == "QUEUE_PURGE" {
        return Some("queue purge");
    }
    if no_socket && (base == "ping_rcv" || (base == "icmp_rcv" && l4 == 1)) {
        return Some("ping reply after its socket");
    }
    None
}

/// Names namespaces, their interfaces and pods from the host's state (read again every refresh: pods
/// come and go).
#[derive(Default)]
pub struct Namer {
    netns: HashMap<u32, String>,
    ifnames: HashMap<(u32, u32), String>,
    /// Pod namespace inode → (pod, node).
    pod_ns: HashMap<u32, (String, String)>,
    pod_ip: HashMap<Ipv4Addr, (String, String)>,
}

impl Namer {
    /// With the API, pods and nodes are named as Kubernetes names them (`NAMESPACE/POD`, the
    /// Node's name); without, by what the host shows (the pod's own namespace name, its address).
    pub fn scan(cluster: Option<&mut crate::k8s::Cluster>) -> Namer {
        let Ok(r) = HostResolver::scan() else { return Namer::default() };
        let facts = cluster.map(|c| crate::k8s::gather_host(c, &r));
        let kube_names: BTreeMap<u32, String> = facts.map(|f| crate::k8s::name_namespaces(&f, &r)).unwrap_or_default();
        let mut n = Namer::default();
        for (ns, st) in r.spaces() {
            n.netns.insert(ns.inode, kube_names.get(&ns.inode).cloned().unwrap_or_else(|| resolve::display_ns(ns)));
            for l in &st.links {
                n.ifnames.insert((ns.inode, l.ifindex), l.name.clone());
            }
        }
        for p in r.pods().into_iter().filter(|p| !p.host_addressed) {
            let pod = kube_names.get(&p.netns.inode).cloned().unwrap_or(p.display.clone());
            let node = n.netns.get(&p.node.inode).cloned().unwrap_or_else(|| p.node.name.clone());
            n.pod_ns.insert(p.netns.inode, (pod.clone(), node.clone()));
            n.pod_ip.insert(p.ip, (pod, node));
        }
        n
    }

    /// The pod a drop concerns: the pod whose namespace it happened in, else the pod of its destination,
    /// else of its source (a drop on a node, on the way).
    fn pod_of(&self, k: &DropKey) -> Option<&(String, String)> {
        let ip = |v: u32| Ipv4Addr::from(v.to_ne_bytes());
        self.pod_ns.get(&k.netns).or_else(|| (k.daddr != 0).then(|| self.pod_ip.get(&ip(k.daddr))).flatten()).or_else(|| (k.saddr != 0).then(|| self.pod_ip.get(&ip(k.saddr))).flatten())
    }
}

pub fn what(k: &DropKey) -> String {
    let ip = |v: u32| Ipv4Addr::from(v.to_ne_bytes());
    match k.proto {
        0x0800 => {
            let l4 = match k.l4 {
                1 => "icmp".to_string(),
                6 => "tcp".to_string(),
                17 => "udp".to_string(),
                n => format!("proto {n}"),
            };
            format!("ipv4 {l4} {} → {}", ip(k.saddr), ip(k.daddr))
        }
        0x0806 => "arp".into(),
        0x86dd => "ipv6".into(),
        0 => "no protocol set".into(),
        p => format!("ethertype {p:#06x}"),
    }
}

/// The kernel's counts made groups; `functions` names drop locations, `reason` names reason codes.
pub fn group(counts: &[(DropKey, u64)], namer: &Namer, functions: &HashMap<u64, String>, reason: impl Fn(u32) -> String) -> Vec<Group> {
    let mut by: BTreeMap<(String, String, String, String, String), Group> = BTreeMap::new();
    for (k, n) in counts {
        let function = functions.get(&k.location).cloned().unwrap_or_else(|| format!("{:#x}", k.location));
        let reason = reason(k.reason);
        let netns = namer.netns.get(&k.netns).cloned().unwrap_or_else(|| if k.netns == 0 { "?".into() } else { format!("netns {}", k.netns) });
        let ifname = namer.ifnames.get(&(k.netns, k.ifindex)).cloned().unwrap_or_else(|| if k.ifindex == 0 { "-".into() } else { format!("if{}", k.ifindex) });
        let (pod, node) = match namer.pod_of(k) {
            Some((p, n)) => (p.clone(), Some(n.clone())),
            None => (netns.clone(), None),
        };
        let noise = noise_class(&function, &reason, k);
        let g = by.entry((pod.clone(), reason.clone(), function.clone(), netns.clone(), ifname.clone())).or_insert_with(|| Group {
            pod,
            node,
            netns,
            ifname,
            reason,
            function,
            what: what(k),
            total: 0,
            rate: 0.0,
            noise,
        });
        g.total += n;
    }
    by.into_values().collect()
}

/// Rates against the previous period's totals (a group new this period counts all its drops).
pub fn with_rates(now: Vec<Group>, before: &[Group], period: Duration) -> Vec<Group> {
    let secs = period.as_secs_f64().max(1e-3);
    now.into_iter()
        .map(|mut g| {
            let prev = before.iter().find(|b| same(b, &g)).map(|b| b.total).unwrap_or(0);
            g.rate = g.total.saturating_sub(prev) as f64 / secs;
            g
        })
        .collect()
}

pub fn same(a: &Group, b: &Group) -> bool {
    (&a.pod, &a.reason, &a.function, &a.netns, &a.ifname) == (&b.pod, &b.reason, &b.function, &b.netns, &b.ifname)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(location: u64, netns: u32, reason: u32, saddr: [u8; 4], daddr: [u8; 4], l4: u8) -> DropKey {
        DropKey { location, netns, ifindex: 2, reason, proto: 0x0800, l4, _pad: 0, saddr: u32::from_ne_bytes(saddr), daddr: u32::from_ne_bytes(daddr) }
    }

    #[test]
    fn drops_are_grouped_by_pod_reason_and_function_with_rates() {
        let mut namer = Namer::default();
        namer.netns.insert(10, "storagenodet3500".into());
        namer.netns.insert(20, "debug".into());
        namer.pod_ns.insert(20, ("debug".into(), "storagenodet3500".into()));
        namer.pod_ip.insert(Ipv4Addr::new(10, 244, 1, 10), ("web".into(), "storagenodet3501".into()));
        let functions: HashMap<u64, String> = [(1, "nft_do_chain".to_string()), (2, "ping_rcv".to_string())].into();
        let reason = |c: u32| match c {
            6 => "NETFILTER_DROP".to_string(),
            2 => "NO_SOCKET".to_string(),
            _ => "?".to_string(),
        };
        // Two flows dropped on the node towards web's address: one group (web's), their counts summed.
        let counts = vec![
            (key(1, 10, 6, [10, 244, 0, 20], [10, 244, 1, 10], 1), 4),
            (key(1, 10, 6, [10, 244, 0, 19], [10, 244, 1, 10], 6), 3),
            (key(2, 20, 2, [10, 244, 0, 1], [10, 244, 0, 20], 1), 9),
        ];
        let g = group(&counts, &namer, &functions, reason);
        assert_eq!(g.len(), 2, "{g:#?}");
        let web = g.iter().find(|x| x.pod == "web").expect("web's group");
        assert_eq!((web.total, web.netns.as_str(), web.function.as_str(), web.reason.as_str()), (7, "storagenodet3500", "nft_do_chain", "NETFILTER_DROP"));
        assert_eq!(web.node.as_deref(), Some("storagenodet3501"));
        let ping = g.iter().find(|x| x.pod == "debug").expect("debug's group");
        assert_eq!(ping.noise, Some("ping reply after its socket"), "{ping:?}");
        let later = vec![(counts[0].0, 14), (counts[1].0, 3), (counts[2].0, 9)];
        let r = with_rates(group(&later, &namer, &functions, reason), &g, Duration::from_millis(500));
        let web = r.iter().find(|x| x.pod == "web").expect("web");
        assert_eq!((web.total, web.rate), (17, 20.0));
    }
}
