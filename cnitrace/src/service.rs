//! A destination that is a Kubernetes Service: which node's kube-proxy translates it (the node holding a
//! NodePort's address, else the source pod's node), the Service and its endpoints as that node's rules
//! have them, and — after the trace — the endpoint the packet was translated to.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use serde::{Deserialize, Serialize};

use crate::{
    path::Trace,
    resolve::{display_ns, Endpoint, HostResolver},
    state::{self, services::{self, Service}, RuleSets},
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServicePath {
    /// What the probe was sent to: a ClusterIP and port, or a node's address and a NodePort.
    pub asked: SocketAddrV4,
    pub node_port: bool,
    /// The namespace whose rules translate it (inode, display name).
    pub nat_node: u32,
    pub nat_node_name: String,
    /// The Service as the translating node's rules have it; None: no rule there knows `asked`.
    pub service: Option<Service>,
    /// The backends in which kube-proxy's rules exist on the translating node (none: kube-proxy has
    /// written nothing there).
    pub kube_proxy: Vec<String>,
    /// IPVS mode's traces on the translating node: its Services are in IPVS, which cnitrace does not read.
    pub ipvs: bool,
    /// Other nodes of this host whose rules know `asked` (several nodes on one host: the lab).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub elsewhere: Vec<(String, Service)>,
    /// The translating node's rules are half gone: the Service's own chain is still there, and nothing
    /// leads to it any more (then `service` is None: it is not in effect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_over: Option<services::LeftOver>,
    /// The endpoint the trace shows the packet translated to.
    pub chosen: Option<services::Endpoint>,
}

impl ServicePath {
    /// The Service's name for people: `default/jellyfin:http`, or the address asked.
    pub fn name(&self) -> String {
        self.service
            .as_ref()
            .or(self.elsewhere.first().map(|(_, s)| s))
            .map(|s| s.name.clone())
            .or_else(|| self.left_over.as_ref().map(|l| l.name.clone()))
            .unwrap_or_else(|| self.asked.to_string())
    }

    /// Addresses the traced packets may carry after translation: the endpoints.
    pub fn endpoint_ips(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self.service.iter().flat_map(|s| s.endpoints.iter().map(|e| *e.addr.ip())).collect();
        v.dedup();
        v
    }

    /// One line: the Service, where it is translated, its endpoints.
    pub fn describe(&self) -> String {
        match &self.service {
            Some(s) => format!(
                "{} is Service {} ({} on {}): {}",
                self.asked,
                s.name,
                match s.backend.as_str() {
                    "nft" => "kube-proxy nftables mode".to_string(),
                    b => format!("kube-proxy iptables mode, {b}"),
                },
                self.nat_node_name,
                if s.endpoints.is_empty() {
                    "no endpoints".to_string()
                } else {
                    format!("endpoints {}", s.endpoints.iter().map(|e| format!("{} ({})", e.addr, e.chain)).collect::<Vec<_>>().join(", "))
                }
            ),
            None => match &self.left_over {
                Some(l) => format!(
                    "{} is Service {} by the chain {} kube-proxy left in {} on {}, which nothing leads to: {}",
                    self.asked, l.name, l.chain, l.backend, self.nat_node_name, l.unreachable
                ),
                None => format!("{} is in no rule of kube-proxy on {}", self.asked, self.nat_node_name),
            },
        }
    }
}

/// A namespace's rule sets, read once: `read` keeps what was read (follow's rules before the probe).
fn rules_in<'a>(resolver: &HostResolver, inode: u32, read: &'a mut BTreeMap<u32, RuleSets>) -> Option<&'a RuleSets> {
    if let std::collections::btree_map::Entry::Vacant(e) = read.entry(inode) {
        let ns = resolver.namespace(inode)?;
        let r = crate::netns::in_netns(&ns.path.clone(), || Ok(state::rules_now())).ok()?;
        e.insert(r);
    }
    read.get(&inode)
}

/// The Service `dst:port` names, seen from `src`: None when no node of this host has kube-proxy rules for
/// it, it is not in a Service range kube-proxy names, the API (`api`: it has a Service at that address)
/// does not say so, and it is not a node's own address (then it is just an address and port). The rule
/// sets it reads are kept in `read` (by namespace inode) and not read again when already there.
pub fn find(resolver: &HostResolver, src: &Endpoint, dst: &Endpoint, (port, proto): (u16, &str), api: bool, read: &mut BTreeMap<u32, RuleSets>) -> Option<ServicePath> {
    let dst_ip = dst.ip();
    // An address of this host: a NodePort if the namespace holding it has kube-proxy's rules (a pod's
    // address and port is just that); translated where it is held.
    let (nat_node, node_port) = match dst.local() {
        Some(l) => (l.netns.inode, true),
        None => {
            let s = src.local()?;
            (s.node.as_ref().map(|n| n.netns.inode).unwrap_or(s.netns.inode), false)
        }
    };
    let ns = resolver.namespace(nat_node)?;
    let rules = rules_in(resolver, nat_node, read)?.clone();
    let all = services::from_rules(&rules);
    let mut service = services::lookup(&all, dst_ip, port, proto, node_port).cloned();
    // A Service whose chain nothing leads to any more is not in effect: its rules are half gone.
    let left = services::left_overs(&rules);
    let left_over = services::lookup_left_over(&left, dst_ip, port, proto, node_port).filter(|l| service.as_ref().is_none_or(|s| s.chain == l.chain && s.backend == l.backend)).cloned();
    if left_over.is_some() {
        service = None;
    }
    let kube_proxy: Vec<String> = services::kube_proxy_present(&rules).into_iter().map(str::to_string).collect();
    if node_port && kube_proxy.is_empty() {
        return None;
    }
    let in_range = services::service_ranges(&rules).iter().any(|(net, len)| state::in_prefix(dst_ip, *net, *len));
    let mut path = ServicePath {
        asked: SocketAddrV4::new(dst_ip, port),
        node_port,
        nat_node,
        nat_node_name: display_ns(ns),
        service,
        kube_proxy,
        ipvs: services::ipvs_seen(&rules),
        elsewhere: Vec::new(),
        left_over,
        chosen: None,
    };
    if path.service.is_none() {
        // The other nodes of this host (namespaces holding pods' host veths) that know it.
        let mut nodes: Vec<u32> = resolver.pods().iter().map(|p| p.node.inode).collect();
        nodes.sort();
        nodes.dedup();
        for inode in nodes.into_iter().filter(|i| *i != nat_node) {
            let Some(r) = rules_in(resolver, inode, read) else { continue };
            let local = node_port && resolver.spaces().iter().any(|(n, st)| n.inode == inode && st.has_addr(dst_ip).is_some());
            if let Some(s) = services::lookup(&services::from_rules(r), dst_ip, port, proto, local || node_port) {
                let name = resolver.namespace(inode).map(display_ns).unwrap_or_default();
                path.elsewhere.push((name, s.clone()));
            }
        }
        if path.elsewhere.is_empty() && path.left_over.is_none() && !in_range && !path.ipvs && !api {
            return None;
        }
    }
    Some(path)
}

/// The endpoint the trace saw `asked` translated to (its first DNAT away from the Service's address or
/// NodePort), and the translations named by the endpoint's rule.
pub fn chosen(path: &ServicePath, trace: &mut Trace) -> Option<services::Endpoint> {
    let svc = path.service.as_ref()?;
    let asked = path.asked.to_string();
    let mut found = None;
    for p in &mut trace.packets {
        for n in &mut p.nat {
            if n.dst.0 != asked || !n.dnat() {
                continue;
            }
            let Ok(to) = n.dst.1.parse::<SocketAddrV4>() else { continue };
            if let Some(ep) = svc.endpoints.iter().find(|e| e.addr == to) {
                n.by = Some(ep.chain.clone());
                found.get_or_insert_with(|| ep.clone());
            }
        }
    }
    found
}
