//! From an address to a pod: its namespace, its interface, and its node (the namespace holding the host
//! end of its veth). Works the same on a real node (pods under the root namespace) and on the lab (nodes
//! in namespaces of their own). Behind one trait: Kubernetes pod names come later as another resolver.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Result;
use serde::Serialize;
use thiserror::Error;

use crate::{
    netns::{self, NetNs},
    state::{self, NsState},
};

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct NsRef {
    pub inode: u32,
    pub name: String,
    #[serde(skip)]
    pub ns: Option<NetNs>,
}

/// Where an address lives on this host.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LocalEndpoint {
    pub ip: Ipv4Addr,
    /// What people call it: the pod name when known, else the namespace name.
    pub display: String,
    pub netns: NsRef,
    pub ifname: String,
    pub ifindex: u32,
    /// The node side of the pod's veth, when the address sits on a veth.
    pub node: Option<NodeSide>,
    /// The pod the Kubernetes API says holds this address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<crate::k8s::facts::PodFacts>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct NodeSide {
    pub netns: NsRef,
    /// What people call the node: its Kubernetes name when the API gave it, else the namespace's.
    pub display: String,
    pub host_veth: String,
    pub host_ifindex: u32,
}

/// A pod of this host and the node it hangs off.
#[derive(Clone, Debug, Serialize)]
pub struct PodOnNode {
    pub ip: Ipv4Addr,
    pub display: String,
    pub netns: NsRef,
    pub node: NsRef,
    /// The node's address the pod routes through (its bridge's, in the pod's subnet).
    pub gateway: Option<Ipv4Addr>,
    /// Not a pod but a host on a link: the node's end of the veth holds an address (a point-to-point
    /// link between two hosts, an underlay or uplink, as in the lab, rather than a pod's veth, whose node
    /// end a bridge addresses), or this namespace is itself a node (pods hang off it: nodes on a switch).
    pub host_addressed: bool,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub enum Endpoint {
    Local(LocalEndpoint),
    /// Not on this host (another node, or outside the cluster).
    Remote(Ipv4Addr),
}

impl Endpoint {
    pub fn ip(&self) -> Ipv4Addr {
        match self {
            Endpoint::Local(l) => l.ip,
            Endpoint::Remote(ip) => *ip,
        }
    }
    pub fn local(&self) -> Option<&LocalEndpoint> {
        match self {
            Endpoint::Local(l) => Some(l),
            Endpoint::Remote(_) => None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("{ip} is configured in more than one network namespace: {}", .places.join(", "))]
    Ambiguous { ip: Ipv4Addr, places: Vec<String> },
}

pub trait Resolver {
    fn resolve(&self, ip: Ipv4Addr) -> Result<Endpoint>;
}

/// How namespaces name each other: the nsid `target` has as seen from `from`, which `from`'s links carry
/// as IFLA_LINK_NETNSID for a peer in `target`. None where `target` has none there.
pub trait NsIds {
    fn nsid(&self, from: &NetNs, target: &NetNs) -> Option<i32>;
}

/// The kernel's answer (RTM_GETNSID from inside `from`).
pub struct KernelNsIds;

impl NsIds for KernelNsIds {
    fn nsid(&self, from: &NetNs, target: &NetNs) -> Option<i32> {
        state::nsid_of(&from.path, &target.path).ok().flatten()
    }
}

/// Looks addresses up in every network namespace of the host.
pub struct HostResolver {
    spaces: Vec<(NetNs, NsState)>,
    nsids: Box<dyn NsIds>,
}

impl HostResolver {
    /// Reads links and addresses of every namespace once.
    pub fn scan() -> Result<Self> {
        let mut spaces = Vec::new();
        for ns in netns::list()? {
            // A namespace that vanished meanwhile is simply not there.
            if let Ok(st) = state::links_and_addrs(&ns) {
                spaces.push((ns, st));
            }
        }
        Ok(HostResolver { spaces, nsids: Box::new(KernelNsIds) })
    }

    /// A resolver over given namespaces and what they call each other (tests, recorded states).
    pub fn from_spaces(spaces: Vec<(NetNs, NsState)>, nsids: Box<dyn NsIds>) -> Self {
        HostResolver { spaces, nsids }
    }

    /// Every pod on this host: an address on a veth whose other end is in another namespace (its node;
    /// see [`PodOnNode::host_addressed`] for links between hosts, which look the same),
    /// with the node's gateway for it (the address of the bridge the host end is a port of, in the pod's
    /// subnet) where there is one. A detached or downed pod is still a pod of its node.
    pub fn pods(&self) -> Vec<PodOnNode> {
        let mut out = Vec::new();
        for (ns, st) in &self.spaces {
            for link in st.links.iter().filter(|l| l.kind == "veth") {
                let Some((node, host)) = self.peer_of(ns, link) else { continue };
                let node_st = self.spaces.iter().find(|(n, _)| n.inode == node.inode).map(|(_, s)| s);
                for a in st.addrs_of(link.ifindex) {
                    let gateway = node_st.and_then(|nst| {
                        let bridge = host.master?;
                        nst.addrs_of(bridge).find(|b| crate::state::in_prefix(b.addr, a.addr, a.prefix) && b.addr != a.addr).map(|b| b.addr)
                    });
                    let host_addressed = node_st.is_some_and(|nst| nst.addrs_of(host.ifindex).next().is_some());
                    out.push(PodOnNode { ip: a.addr, display: display_ns(ns), netns: nsref(ns), node: nsref(node), gateway, host_addressed });
                }
            }
        }
        // A namespace that pods hang off is a node, whatever hangs it off something else: nodes joined by
        // a switch (a bridge in a namespace of its own, veth ports without addresses, as the real
        // cluster's underlay in the lab, or kind's nodes on docker's bridge) look like that switch's pods.
        let nodes: std::collections::BTreeSet<u32> = out.iter().filter(|p| !p.host_addressed).map(|p| p.node.inode).collect();
        for p in &mut out {
            p.host_addressed |= nodes.contains(&p.netns.inode);
        }
        out
    }

    /// The other end of `link` (a veth in `ns`): the veth elsewhere that names this link as its peer and
    /// that this link names as its own, in the namespace this link's IFLA_LINK_NETNSID designates.
    /// Interface indexes repeat from one namespace to the next (several nodes' namespaces on one host:
    /// the lab, kind, k3d), so the indexes only pick candidates; the namespace id decides. A link whose
    /// peer namespace is not among those scanned has no other end here: None, never a guess.
    fn peer_of(&self, ns: &NetNs, link: &state::Link) -> Option<(&NetNs, &state::Link)> {
        let nsid = link.peer_netnsid?;
        self.spaces.iter().filter(|(other, _)| other.inode != ns.inode).find_map(|(other, ost)| {
            let peer = ost.links.iter().find(|l| l.kind == "veth" && l.peer_ifindex == Some(link.ifindex) && Some(l.ifindex) == link.peer_ifindex)?;
            (self.nsids.nsid(ns, other) == Some(nsid)).then_some((other, peer))
        })
    }

    /// The namespaces joined to `from` by veths, directly or through others (the pair's nodes, their
    /// pods, the other nodes on their underlay, a switch between them): one cluster's part of this host.
    /// Another cluster in namespaces of its own (a second lab, k3d, a developer's kind cluster) is
    /// joined to none of them and is left out, whatever addresses it uses.
    pub fn joined(&self, from: &[u32]) -> std::collections::BTreeSet<u32> {
        let mut seen: std::collections::BTreeSet<u32> = from.iter().copied().collect();
        let mut todo: Vec<u32> = from.to_vec();
        while let Some(inode) = todo.pop() {
            let Some((ns, st)) = self.spaces.iter().find(|(n, _)| n.inode == inode) else { continue };
            for link in st.links.iter().filter(|l| l.kind == "veth" && l.peer_netnsid.is_some()) {
                if let Some((other, _)) = self.peer_of(ns, link) {
                    if seen.insert(other.inode) {
                        todo.push(other.inode);
                    }
                }
            }
        }
        seen
    }

    pub fn namespace(&self, inode: u32) -> Option<&NetNs> {
        self.spaces.iter().find(|(ns, _)| ns.inode == inode).map(|(ns, _)| ns)
    }

    /// Every namespace's links: to name the interfaces of events.
    pub fn spaces(&self) -> &[(NetNs, NsState)] {
        &self.spaces
    }
}

/// Where whoever makes network namespaces names them for people: one file per namespace, named as `ip
/// netns` names it, holding the name cnitrace shows for it (the lab writes `debug` for
/// `cnitrace-pod-debug`, `storagenodet3500` for `cnitrace-storagenodet3500`). With the Kubernetes API the
/// API's names come first; without a file, a namespace is shown by its own name.
pub const NAMES_DIR: &str = "/run/cnitrace/names";

/// Gives the namespace `ns` (its `ip netns` name) the name `shown` in everything cnitrace prints.
pub fn name_namespace(ns: &str, shown: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(NAMES_DIR)?;
    std::fs::write(Path::new(NAMES_DIR).join(ns), shown)
}

/// Takes back the name given to `ns` (gone with the namespace).
pub fn forget_namespace_name(ns: &str) {
    let _ = std::fs::remove_file(Path::new(NAMES_DIR).join(ns));
    // The folder too once empty (nothing is left behind); fails while another namespace has a name.
    let _ = std::fs::remove_dir(NAMES_DIR);
}

/// What people call a namespace: the root one by the host's name; one named in [`NAMES_DIR`] by that
/// name; else by its own name.
pub fn display_ns(ns: &NetNs) -> String {
    if ns.is_root {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        return if host.trim().is_empty() { "root".into() } else { host.trim().to_string() };
    }
    let given = (!ns.name.is_empty() && !ns.name.contains('/')).then(|| std::fs::read_to_string(Path::new(NAMES_DIR).join(&ns.name)).ok()).flatten();
    given.map(|g| g.trim().to_string()).filter(|g| !g.is_empty()).unwrap_or_else(|| ns.name.clone())
}

fn nsref(ns: &NetNs) -> NsRef {
    NsRef { inode: ns.inode, name: ns.name.clone(), ns: Some(ns.clone()) }
}

impl Resolver for HostResolver {
    fn resolve(&self, ip: Ipv4Addr) -> Result<Endpoint> {
        let hits: Vec<(&NetNs, &NsState, u32)> = self
            .spaces
            .iter()
            .flat_map(|(ns, st)| {
                st.addrs
                    .iter()
                    .filter(move |a| a.addr == ip && st.link(a.ifindex).is_some_and(|l| l.name != "lo"))
                    .map(move |a| (ns, st, a.ifindex))
            })
            .collect();
        if hits.len() > 1 {
            let places = hits.iter().map(|(ns, st, i)| format!("{} ({})", ns.name, st.ifname(*i))).collect();
            return Err(ResolveError::Ambiguous { ip, places }.into());
        }
        let Some((ns, st, ifindex)) = hits.into_iter().next() else {
            return Ok(Endpoint::Remote(ip));
        };
        let link = st.link(ifindex).expect("hit on a known link");
        let node = (link.kind == "veth")
            .then(|| self.peer_of(ns, link))
            .flatten()
            .map(|(other, hl)| NodeSide { netns: nsref(other), display: display_ns(other), host_veth: hl.name.clone(), host_ifindex: hl.ifindex });
        Ok(Endpoint::Local(LocalEndpoint {
            ip,
            display: display_ns(ns),
            netns: nsref(ns),
            ifname: link.name.clone(),
            ifindex,
            node,
            pod: None,
        }))
    }
}

/// The display name for a namespace known only by its name (no root check).
pub fn display_name_of(name: &str) -> String {
    display_ns(&NetNs { inode: 0, name: name.to_string(), path: Default::default(), is_root: false })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{Addr, Link};

    fn ns(inode: u32, name: &str, links: Vec<Link>, addrs: Vec<Addr>) -> (NetNs, NsState) {
        let n = NetNs { inode, name: name.into(), path: format!("/run/netns/{name}").into(), is_root: false };
        (n, NsState { inode, name: name.into(), links, addrs, ..Default::default() })
    }

    /// `veth(ifindex, name, peer ifindex, peer's nsid as seen from here)`
    fn veth(ifindex: u32, name: &str, peer: u32, nsid: i32) -> Link {
        Link { ifindex, name: name.into(), kind: "veth".into(), admin_up: true, peer_ifindex: Some(peer), peer_netnsid: Some(nsid), ..Default::default() }
    }

    fn addr(ifindex: u32, ip: &str) -> Addr {
        Addr { ifindex, addr: ip.parse().unwrap(), prefix: 24, broadcast: None }
    }

    /// (from inode, target inode) → nsid.
    struct Ids(BTreeMap<(u32, u32), i32>);

    impl NsIds for Ids {
        fn nsid(&self, from: &NetNs, target: &NetNs) -> Option<i32> {
            self.0.get(&(from.inode, target.inode)).copied()
        }
    }

    fn ids(pairs: &[((u32, u32), i32)]) -> Box<dyn NsIds> {
        Box::new(Ids(pairs.iter().copied().collect()))
    }

    #[test]
    fn a_pod_is_found_with_its_node_through_the_veth_peer() {
        let r = HostResolver::from_spaces(
            vec![
                ns(1, "node", vec![veth(7, "veth1234", 2, 0), veth(8, "veth5678", 2, 1)], vec![]),
                ns(2, "x-pod-debug", vec![veth(2, "eth0", 7, 0)], vec![addr(2, "10.244.0.20")]),
                ns(3, "x-pod-jellyfin", vec![veth(2, "eth0", 8, 0)], vec![addr(2, "10.244.0.19")]),
            ],
            ids(&[((2, 1), 0), ((3, 1), 0)]),
        );
        let Endpoint::Local(l) = r.resolve("10.244.0.19".parse().unwrap()).unwrap() else { panic!("local") };
        assert_eq!(l.display, "x-pod-jellyfin", "no name given it: its own");
        let node = l.node.expect("its node");
        assert_eq!((node.netns.name.as_str(), node.host_veth.as_str()), ("node", "veth5678"));
        assert!(matches!(r.resolve("10.244.1.10".parse().unwrap()).unwrap(), Endpoint::Remote(_)));
    }

    /// Two nodes on one host whose interfaces were made in the same order: node-a's veth and node-b's
    /// have the same ifindex and name the same peer ifindex. Only the namespace id tells them apart
    /// (issue 17: the source pod of a cross-node pair was placed on the other node).
    #[test]
    fn colliding_interface_indexes_do_not_move_a_pod_to_another_node() {
        let spaces = || {
            vec![
                ns(10, "node-a", vec![veth(3, "vethaaaa", 2, 0)], vec![]),
                ns(20, "node-b", vec![veth(3, "vethbbbb", 2, 0)], vec![]),
                ns(11, "pod-a", vec![veth(2, "eth0", 3, 0)], vec![addr(2, "10.1.0.2")]),
                ns(21, "pod-b", vec![veth(2, "eth0", 3, 0)], vec![addr(2, "10.1.1.2")]),
            ]
        };
        // Each pod sees its own node as nsid 0 and the other node not at all.
        let r = HostResolver::from_spaces(spaces(), ids(&[((11, 10), 0), ((21, 20), 0), ((10, 11), 0), ((20, 21), 0)]));
        for (ip, node, veth) in [("10.1.0.2", "node-a", "vethaaaa"), ("10.1.1.2", "node-b", "vethbbbb")] {
            let Endpoint::Local(l) = r.resolve(ip.parse().unwrap()).unwrap() else { panic!("local") };
            let n = l.node.unwrap_or_else(|| panic!("{ip} has a node"));
            assert_eq!((n.netns.name.as_str(), n.host_veth.as_str()), (node, veth), "{ip}");
        }
        // A peer namespace the scan does not hold: no node, rather than the wrong one.
        let r = HostResolver::from_spaces(spaces(), ids(&[]));
        let Endpoint::Local(l) = r.resolve("10.1.1.2".parse().unwrap()).unwrap() else { panic!("local") };
        assert!(l.node.is_none(), "{:?}", l.node);
    }

    #[test]
    fn a_namespace_is_named_by_its_own_name_unless_its_maker_gave_it_one() {
        assert_eq!(display_name_of("kind-worker"), "kind-worker");
        assert_eq!(display_name_of("k3d-dev-agent-0"), "k3d-dev-agent-0");
        assert_eq!(display_name_of("cnitrace-pod-debug"), "cnitrace-pod-debug", "no lab convention is read from a name");
        let ns = format!("cnitrace-unit-{}-node", std::process::id());
        match name_namespace(&ns, "rack4") {
            // Giving names needs root (/run): the rest of the suite runs as root.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            other => {
                other.unwrap();
                assert_eq!(display_name_of(&ns), "rack4");
                forget_namespace_name(&ns);
                assert_eq!(display_name_of(&ns), ns);
            }
        }
    }

    #[test]
    fn pods_are_listed_with_their_node_and_gateway() {
        let mut node_a = ns(10, "node-a", vec![veth(3, "vethaaaa", 2, 0)], vec![addr(5, "10.1.0.1")]);
        node_a.1.links[0].master = Some(5);
        node_a.1.links.push(Link { ifindex: 5, name: "br0".into(), kind: "bridge".into(), ..Default::default() });
        let r = HostResolver::from_spaces(
            vec![
                node_a,
                ns(20, "node-b", vec![veth(3, "vethbbbb", 2, 0)], vec![]),
                ns(11, "pod-a", vec![veth(2, "eth0", 3, 0)], vec![addr(2, "10.1.0.2")]),
                ns(21, "pod-b", vec![veth(2, "eth0", 3, 0)], vec![addr(2, "10.1.1.2")]),
            ],
            ids(&[((11, 10), 0), ((21, 20), 0), ((10, 11), 0), ((20, 21), 0)]),
        );
        let pods: Vec<(String, String, Option<String>)> =
            r.pods().into_iter().map(|p| (p.ip.to_string(), p.node.name, p.gateway.map(|g| g.to_string()))).collect();
        assert_eq!(pods, [("10.1.0.2".into(), "node-a".into(), Some("10.1.0.1".into())), ("10.1.1.2".into(), "node-b".into(), None)]);
    }

    #[test]
    fn an_address_in_two_namespaces_is_an_error_naming_both() {
        let r = HostResolver::from_spaces(
            vec![ns(2, "a", vec![veth(2, "eth0", 7, 0)], vec![addr(2, "10.244.0.20")]), ns(3, "b", vec![veth(5, "eth1", 9, 0)], vec![addr(5, "10.244.0.20")])],
            ids(&[]),
        );
        let e = r.resolve("10.244.0.20".parse().unwrap()).unwrap_err().to_string();
        assert!(e.contains("a (eth0)") && e.contains("b (eth1)"), "{e}");
    }
}
