//! verify: a repair is verified on everything it could have touched, not only on the traced pair. The
//! node's paths come from the host's own state (no lab, no names): every pod of the pair's nodes ↔ its
//! gateway, ↔ each other pod of its node, ↔ one pod of each other node on this host. An answered echo
//! proves both ways. They are checked before the repair and after it; `judge` says what got worse and
//! what the repaired namespaces still cannot reach that their siblings can.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Result;

use crate::{
    inject::{self, ProbeKind, ProbePlan},
    resolve::{HostResolver, PodOnNode},
};

/// What kind of path: siblings are compared by it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    /// The pod's gateway on its node.
    Gateway,
    /// Another pod of the same node.
    SameNode,
    /// A pod of the node with this namespace inode.
    OtherNode(u32),
}

#[derive(Clone, Debug)]
pub struct NodePath {
    pub from: String,
    pub from_ip: Ipv4Addr,
    /// The source pod's namespace (name, as actions name it) and a path that opens it.
    pub from_netns: String,
    from_path: PathBuf,
    from_node: u32,
    from_node_name: String,
    pub to: Ipv4Addr,
    pub to_name: String,
    /// The destination pod's namespace name (empty for a gateway).
    pub to_netns: String,
    pub class: Class,
}

impl NodePath {
    pub fn name(&self) -> String {
        format!("{} → {} ({})", self.from, self.to_name, self.to)
    }
}

/// The paths of every pod on the nodes with these namespace inodes. A pod is an address of the cluster's
/// pod network (`cluster`: flannel's `Network`) on a veth whose other end is on a node: nodes joined by
/// veths (an underlay, an uplink on another node's bridge) are not pods. The other nodes are those of
/// this cluster: joined to these nodes by veths (their underlay); another cluster's namespaces on the
/// same host, whatever its addresses, are not.
pub fn discover(nodes: &[u32], cluster: (Ipv4Addr, u8)) -> Result<Vec<NodePath>> {
    let host = HostResolver::scan()?;
    let joined = host.joined(nodes);
    let pods: Vec<PodOnNode> = host.pods().into_iter().filter(|p| joined.contains(&p.node.inode) && crate::state::in_prefix(p.ip, cluster.0, cluster.1)).collect();
    Ok(paths_of(&pods, nodes))
}

/// The paths of one node's pods as its agent sees them: each pod ↔ its gateway, ↔ each sibling, and ↔
/// one pod of each other node from `others` (`(node, pod address, pod name)`: what the other nodes'
/// agents said they hold — this host sees only its own pods).
pub fn discover_node(node: u32, cluster: (Ipv4Addr, u8), others: &[(String, Ipv4Addr, String)]) -> Result<Vec<NodePath>> {
    let mut pods: Vec<PodOnNode> = HostResolver::scan()?
        .pods()
        .into_iter()
        .filter(|p| p.node.inode == node && !p.host_addressed && crate::state::in_prefix(p.ip, cluster.0, cluster.1))
        .collect();
    let mut nodes: Vec<&String> = others.iter().map(|(n, _, _)| n).collect();
    nodes.sort();
    nodes.dedup();
    for (ip, name, other) in others.iter().map(|(n, ip, name)| (*ip, name, n)) {
        // Another machine's pod: no namespace here; its node keyed by its place among the others.
        let key = nodes.iter().position(|n| *n == other).unwrap_or(0) as u32 + 1;
        let remote = crate::resolve::NsRef { inode: 0, name: String::new(), ns: None };
        pods.push(PodOnNode { ip, display: name.clone(), netns: remote, node: crate::resolve::NsRef { inode: key, name: other.clone(), ns: None }, gateway: None, host_addressed: false });
    }
    Ok(paths_of(&pods, &[node]))
}

fn paths_of(pods: &[PodOnNode], nodes: &[u32]) -> Vec<NodePath> {
    let mut out = Vec::new();
    let path = |from: &PodOnNode, to: Ipv4Addr, to_name: String, to_netns: String, class: Class| NodePath {
        from: from.display.clone(),
        from_ip: from.ip,
        from_netns: from.netns.name.clone(),
        from_path: from.netns.ns.as_ref().map(|n| n.path.clone()).unwrap_or_default(),
        from_node: from.node.inode,
        from_node_name: from.node.name.clone(),
        to,
        to_name,
        to_netns,
        class,
    };
    for p in pods.iter().filter(|p| nodes.contains(&p.node.inode)) {
        if let Some(gw) = p.gateway {
            out.push(path(p, gw, format!("its gateway on {}", p.node.name), String::new(), Class::Gateway));
        }
        for q in pods.iter().filter(|q| q.node.inode == p.node.inode && q.netns.inode != p.netns.inode) {
            out.push(path(p, q.ip, q.display.clone(), q.netns.name.clone(), Class::SameNode));
        }
        let mut other_nodes: Vec<u32> = pods.iter().map(|q| q.node.inode).filter(|n| *n != p.node.inode).collect();
        other_nodes.sort();
        other_nodes.dedup();
        for n in other_nodes {
            // One pod of each other node: the first, by address (stable from one check to the next).
            if let Some(q) = pods.iter().filter(|q| q.node.inode == n).min_by_key(|q| q.ip) {
                out.push(path(p, q.ip, q.display.clone(), q.netns.name.clone(), Class::OtherNode(n)));
            }
        }
    }
    out
}

/// Whether each path answers now: one echo, 1 s at most, all paths at once.
pub fn check(paths: &[NodePath]) -> Vec<bool> {
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .iter()
            .map(|p| {
                s.spawn(move || {
                    let plan = ProbePlan {
                        netns: p.from_path.clone(),
                        dst: p.to,
                        kind: ProbeKind::Icmp,
                        sizes: vec![56],
                        wait: Duration::from_secs(1),
                        icmp_id: inject::new_icmp_id(),
                        stop: Default::default(),
                    };
                    inject::run(plan).is_ok_and(|o| o.answered > 0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(false)).collect()
    })
}

/// What the repair left wrong, in words: paths that worked before and fail now, and paths from or to a
/// namespace the repair acted in (`touched`: namespace names) that fail while a sibling pod of the same
/// node reaches the same kind of place (the pod a repair brought back must reach what its siblings do).
pub fn judge(paths: &[NodePath], before: &[bool], after: &[bool], touched: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        if after[i] {
            continue;
        }
        if before[i] {
            out.push(format!("{} worked before the repair and fails now", p.name()));
            continue;
        }
        let involved = touched.iter().any(|t| *t == p.from_netns || *t == p.to_netns);
        let sibling_ok = paths.iter().enumerate().any(|(j, q)| j != i && after[j] && q.from_node == p.from_node && q.class == p.class && q.from_netns != p.from_netns);
        if involved && sibling_ok {
            out.push(format!("{} fails after the repair while {}'s other pods reach the same", p.name(), p.from_node_name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::NsRef;

    fn nsref(inode: u32, name: &str) -> NsRef {
        NsRef { inode, name: name.into(), ns: None }
    }

    fn pod(ip: &str, name: &str, inode: u32, node: (u32, &str), gw: Option<&str>) -> PodOnNode {
        PodOnNode { ip: ip.parse().unwrap(), display: name.into(), netns: nsref(inode, &format!("ns-{name}")), node: nsref(node.0, node.1), gateway: gw.map(|g| g.parse().unwrap()), host_addressed: false }
    }

    fn lab() -> Vec<PodOnNode> {
        vec![
            pod("10.9.0.20", "debug", 11, (10, "n1"), Some("10.9.0.1")),
            pod("10.9.0.19", "jellyfin", 12, (10, "n1"), Some("10.9.0.1")),
            pod("10.9.1.10", "web", 21, (20, "n2"), Some("10.9.1.1")),
        ]
    }

    #[test]
    fn a_nodes_paths_are_each_pod_to_its_gateway_its_siblings_and_one_pod_of_each_other_node() {
        let paths = paths_of(&lab(), &[10]);
        let names: Vec<String> = paths.iter().map(NodePath::name).collect();
        assert_eq!(
            names,
            [
                "debug → its gateway on n1 (10.9.0.1)",
                "debug → jellyfin (10.9.0.19)",
                "debug → web (10.9.1.10)",
                "jellyfin → its gateway on n1 (10.9.0.1)",
                "jellyfin → debug (10.9.0.20)",
                "jellyfin → web (10.9.1.10)",
            ]
        );
    }

    /// jellyfin's eth0 was brought up, its routes not restored: the pair (debug → jellyfin) verifies,
    /// jellyfin still cannot reach web while debug can.
    #[test]
    fn a_repaired_pod_that_cannot_reach_what_its_sibling_reaches_is_not_verified() {
        let paths = paths_of(&lab(), &[10]);
        let before = [true, false, true, true, false, false];
        let after = [true, true, true, true, true, false];
        let wrong = judge(&paths, &before, &after, &["ns-jellyfin".to_string()]);
        assert_eq!(wrong, ["jellyfin → web (10.9.1.10) fails after the repair while n1's other pods reach the same"]);
        // The same failure in a namespace the repair never touched is not the repair's doing.
        assert!(judge(&paths, &before, &after, &["ns-other".to_string()]).is_empty());
        // A path that worked before and fails now is always reported.
        let after = [true, true, false, true, true, true];
        assert_eq!(judge(&paths, &before, &after, &[]), ["debug → web (10.9.1.10) worked before the repair and fails now"]);
    }
}
