//! Node checks: what is wrong on a node whatever pair is traced — every pod's veth, the pods' bridge,
//! forwarding, the VXLAN device and what flannel writes for each remote node, the FORWARD policies. No
//! name is assumed: the pods' bridge is the bridge the pods' veths hang off (whatever it is called), a
//! pod's veth is a veth without an address whose peer is in another namespace (a node's uplink to an
//! underlay carries one), the VXLAN device is the node's vxlan link. `fix --auto`
//! without a pair runs them on the nodes of the last followed pair and reports each finding with its
//! catalog cause and the command that repairs it; the pair's own fix is what gets applied and verified.

use serde::Serialize;

use crate::{
    finding::causes::netfilter::has_pod_accepts,
    k8s::ClusterFacts,
    plan::{Action, Target},
    state::{rules::parse_iptables, Link, NsState},
};

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NodeFinding {
    pub node: String,
    pub cause: &'static str,
    pub what: String,
    /// The command that repairs it, where one follows from the finding alone (`fix` plans from a trace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// The trace that says more (a pod failing its probes: the kubelet's path from the node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// The checks, on one node's state. `node` is its display name.
pub fn check(node: &NsState, name: &str) -> Vec<NodeFinding> {
    let mut out = Vec::new();
    let mut add = |cause: &'static str, what: String| out.push(NodeFinding { node: name.to_string(), cause, what, fix: None, trace: None });
    let pod_veths = pod_veths(node);
    let bridge = pods_bridge(node, &pod_veths);
    if let Some(br) = bridge {
        if !br.admin_up {
            add("bridge-down", format!("{} is down", br.name));
        }
    }
    for l in &pod_veths {
        match (l.master.and_then(|m| node.link(m)), bridge) {
            (None, Some(br)) => add("veth-detached", format!("{} is no port of {}", l.name, br.name)),
            (Some(m), Some(br)) if m.ifindex != br.ifindex => add("veth-wrong-bridge", format!("{} is a port of {}, not {}", l.name, m.name, br.name)),
            _ => {}
        }
        if !l.admin_up {
            add("veth-down", format!("{} is down", l.name));
        }
        if let Some(st) = l.port_state.as_deref().filter(|s| *s != "forwarding" && l.admin_up) {
            add("bridge-port-blocked", format!("{} is in state {st}", l.name));
        }
    }
    if node.sysctls.ip_forward == Some(0) {
        add("ip-forward-disabled", "net.ipv4.ip_forward = 0".into());
    }
    if node.sysctls.rp_filter.get("all") == Some(&1) {
        add("rp-filter", "net.ipv4.conf.all.rp_filter = 1 (strict): asymmetric underlay paths drop".into());
    }
    // A node without a VXLAN device may use host-gw: its absence alone proves nothing.
    if let Some(vx) = node.links.iter().find(|l| l.kind == "vxlan") {
        let dev = &vx.name;
        if !vx.admin_up {
            add("vxlan-down", format!("{dev} is down"));
        }
        let addrs: Vec<_> = node.addrs_of(vx.ifindex).collect();
        if addrs.is_empty() || addrs.iter().any(|a| a.addr.is_unspecified() || a.prefix != 32) {
            add("vxlan-address-invalid", format!("{dev} holds {:?}", addrs.iter().map(|a| format!("{}/{}", a.addr, a.prefix)).collect::<Vec<_>>()));
        }
        for r in node.routes.iter().filter(|r| r.oif == Some(vx.ifindex) && r.table == 254) {
            let Some(gw) = r.gateway else { continue };
            match node.neigh(vx.ifindex, gw).and_then(|n| n.mac.clone()) {
                None => add("vxlan-neigh-missing", format!("no neighbour for VTEP {gw} ({}/{} routes through it)", r.dst, r.prefix)),
                Some(mac) if !node.fdb.iter().any(|f| f.ifindex == vx.ifindex && f.mac == mac && f.dst.is_some()) => {
                    add("vxlan-fdb-missing", format!("no FDB entry for VTEP {gw} ({mac})"))
                }
                _ => {}
            }
        }
    }
    // The pod network's first two octets, from the pods' gateway (nothing to compare rules with without one).
    let pod_net = bridge.and_then(|b| node.addrs_of(b.ifindex).next()).map(|a| {
        let o = a.addr.octets();
        format!("{}.{}.", o[0], o[1])
    });
    for (backend, dump) in [("iptables-nft", &node.rules.iptables_nft), ("iptables-legacy", &node.rules.iptables_legacy)] {
        let (Some(d), Some(pod_net)) = (dump, pod_net.as_ref()) else { continue };
        let drops = parse_iptables(d).into_iter().any(|r| r.is_policy && r.table == "filter" && r.chain == "FORWARD" && r.target == "DROP");
        if drops && !has_pod_accepts(Some(d), pod_net) {
            add("netfilter-policy-drop", format!("{backend} FORWARD policy DROP with no accept for {pod_net}0.0/16"));
        }
    }
    out
}

/// The pods' bridge: the one most pod veths are ports of, else the only bridge holding an address.
fn pods_bridge<'a>(node: &'a NsState, pod_veths: &[&Link]) -> Option<&'a Link> {
    let bridges = node.links.iter().filter(|l| l.kind == "bridge");
    let ports = |b: &Link| pod_veths.iter().filter(|v| v.master == Some(b.ifindex)).count();
    let with_ports = bridges.clone().filter(|b| ports(b) > 0).max_by_key(|b| (ports(b), node.addrs_of(b.ifindex).next().is_some()));
    with_ports.or_else(|| {
        let mut addressed = bridges.filter(|b| node.addrs_of(b.ifindex).next().is_some());
        let first = addressed.next();
        first.filter(|_| addressed.next().is_none())
    })
}

/// What flanneld writes on this node for every other node, checked against the Node objects it writes
/// from (`podCIDR`, `backend-data` VtepMAC, `public-ip`): the route to each remote pod network through
/// the VXLAN device, the VTEP's permanent neighbour, its FDB entry; and this node's own VXLAN device and
/// pods' gateway against its own Node object and flannel's ConfigMap. Each finding carries the command
/// flanneld's state implies (`ip route replace`, `ip neigh replace`, `bridge fdb append`).
pub fn against_the_api(node: &NsState, name: &str, facts: &ClusterFacts) -> Vec<NodeFinding> {
    let mut out = Vec::new();
    let mut add = |cause: &'static str, what: String, fix: Option<Action>| {
        out.push(NodeFinding { node: name.to_string(), cause, what, fix: fix.map(|a| a.command()), trace: None })
    };
    let me = facts.node(name);
    let target = Target::of(node);
    let bridge = pods_bridge(node, &pod_veths(node));
    if let (Some(me), Some(br)) = (me, bridge) {
        let held: Vec<_> = node.addrs_of(br.ifindex).collect();
        if !me.pod_nets().is_empty() && !held.is_empty() && !held.iter().any(|a| me.holds_pod_ip(a.addr)) {
            add(
                "bridge-ip-conflict",
                format!("{} holds {} but Node {name}'s pod network is {}", br.name, held.iter().map(|a| format!("{}/{}", a.addr, a.prefix)).collect::<Vec<_>>().join(", "), me.pod_cidrs.join(", ")),
                None,
            );
        }
    }
    let Some(vx) = node.links.iter().find(|l| l.kind == "vxlan") else { return out };
    if let (Some(conf), Some(x)) = (facts.flannel.as_ref(), vx.vxlan.as_ref()) {
        if conf.backend_type.as_deref().is_none_or(|t| t == "vxlan") && (x.vni, x.port) != (conf.vni, conf.port) {
            add(
                "vxlan-config-mismatch",
                format!("{} has VNI {} port {}; flannel's ConfigMap {} says VNI {} port {}", vx.name, x.vni, x.port, conf.source, conf.vni, conf.port),
                None,
            );
        }
    }
    for other in facts.nodes.iter().filter(|n| n.name != name && n.flannel_backend.as_deref().is_none_or(|b| b == "vxlan")) {
        let (Some(mac), Some((net, len))) = (other.vtep_mac.as_ref(), other.pod_nets().into_iter().next()) else { continue };
        let vtep = net;
        let routed = node.routes.iter().any(|r| r.table == 254 && r.dst == net && r.prefix == len && r.oif == Some(vx.ifindex) && r.gateway == Some(vtep));
        if !routed {
            add(
                "route-missing",
                format!("no route to {net}/{len} (Node {}) via {vtep} on {}", other.name, vx.name),
                Some(Action::RouteAdd { ns: target.clone(), dst: net, prefix: len, gateway: Some(vtep), ifname: vx.name.clone(), onlink: true }),
            );
        }
        match node.neigh(vx.ifindex, vtep).and_then(|n| n.mac.clone()) {
            Some(m) if m.eq_ignore_ascii_case(mac) => {}
            have => add(
                "vxlan-neigh-missing",
                match have {
                    Some(m) => format!("neighbour {vtep} on {} is {m}; Node {} says VtepMAC {mac}", vx.name, other.name),
                    None => format!("no neighbour for VTEP {vtep} on {} (Node {} says VtepMAC {mac})", vx.name, other.name),
                },
                Some(Action::NeighSet { ns: target.clone(), ifname: vx.name.clone(), ip: vtep, mac: mac.clone() }),
            ),
        }
        let Some(underlay) = other.public_ip.or(other.internal_ip) else { continue };
        if !node.fdb.iter().any(|f| f.ifindex == vx.ifindex && f.mac.eq_ignore_ascii_case(mac) && f.dst == Some(underlay)) {
            add(
                "vxlan-fdb-missing",
                format!("no FDB entry on {} for VTEP {mac} at {underlay} (Node {})", vx.name, other.name),
                Some(Action::FdbAdd { ns: target.clone(), ifname: vx.name.clone(), mac: mac.clone(), dst: underlay }),
            );
        }
    }
    out
}

/// What Windows nodes need of flannel's VXLAN backend: VNI 4096 and UDP port 4789 (flannel's Windows
/// support, the `host-gw`-less overlay of `win-overlay`).
pub const WINDOWS_VNI: u32 = 4096;
pub const WINDOWS_PORT: u16 = 4789;

/// The cluster's findings (not one node's): Windows nodes present and a flannel backend they cannot join,
/// with the ConfigMap patch and the DaemonSet restart that the incident's `fix_flannel_mixed_os.sh` did.
pub fn cluster_findings(facts: &ClusterFacts) -> Vec<NodeFinding> {
    let mut out = Vec::new();
    let windows: Vec<&str> = facts.nodes.iter().filter(|n| n.os.as_deref() == Some("windows")).map(|n| n.name.as_str()).collect();
    let Some(conf) = facts.flannel.as_ref() else { return out };
    if windows.is_empty() {
        return out;
    }
    let vxlan = conf.backend_type.as_deref().is_some_and(|t| t.eq_ignore_ascii_case("vxlan"));
    if vxlan && conf.vni == WINDOWS_VNI && conf.port == WINDOWS_PORT {
        return out;
    }
    let have = format!("{} VNI {} port {}", conf.backend_type.as_deref().unwrap_or("no backend"), conf.vni, conf.port);
    let patched = patched_net_conf(&conf.raw);
    let (ns, name) = conf.source.split_once('/').unwrap_or(("kube-flannel", "kube-flannel-cfg"));
    out.push(NodeFinding {
        node: "cluster".into(),
        cause: "flannel-backend-windows",
        what: format!("Windows node{} {} cannot join flannel's {have} (they need vxlan VNI {WINDOWS_VNI} port {WINDOWS_PORT}); {} says so", if windows.len() == 1 { "" } else { "s" }, windows.join(", "), conf.source),
        fix: patched.map(|p| {
            format!(
                "kubectl -n {ns} patch configmap {name} --type merge -p '{}' && kubectl -n {ns} rollout restart daemonset kube-flannel-ds",
                serde_json::json!({"data": {"net-conf.json": p}})
            )
        }),
        trace: None,
    });
    out
}

/// `net-conf.json` with the Backend made Windows-compatible and everything else as written.
pub fn patched_net_conf(raw: &str) -> Option<String> {
    let mut v: serde_json::Value = serde_json::from_str(raw).ok()?;
    let backend = v.get_mut("Backend")?.as_object_mut()?;
    backend.insert("Type".into(), "vxlan".into());
    backend.insert("VNI".into(), WINDOWS_VNI.into());
    backend.insert("Port".into(), WINDOWS_PORT.into());
    serde_json::to_string_pretty(&v).ok()
}

/// What kube-proxy and flannel write as they die, and the catalog cause each line proves.
const LOG_CAUSES: &[(&str, &str)] = &[
    // iptables-nft reading rules another iptables (or nft itself) wrote in a form it cannot show.
    ("is incompatible, use 'nft' tool", "iptables-backend-conflict"),
    ("iptables-legacy tables present", "iptables-backend-conflict"),
];

/// The pods scheduled on `node` that are not Ready, from the API: each a `pod-not-ready` finding with
/// its state; kube-proxy's and flannel's (found by their app label) with the last lines of the
/// container that crashed, and a catalog cause where a line proves one. Reads only.
pub fn pods_not_ready(cluster: &mut crate::k8s::Cluster, node: &str) -> (Vec<NodeFinding>, Vec<String>) {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    let pods = match cluster.pods_on(node) {
        Ok(p) => p,
        Err(e) => return (out, vec![e.to_string()]),
    };
    for p in pods.iter().filter(|p| !p.ready && p.phase != "Succeeded") {
        let mut f = NodeFinding { node: node.to_string(), cause: "pod-not-ready", what: format!("{}: {}", p.full_name(), p.state()), fix: None, trace: None };
        let system = matches!(p.app.as_deref(), Some("kube-proxy") | Some("flannel"));
        if system {
            for c in &p.containers {
                let log = match cluster.logs(&p.namespace, &p.name, c, p.restarts > 0, 50) {
                    Ok(l) => l,
                    Err(e) => {
                        missing.push(e.to_string());
                        continue;
                    }
                };
                let hit = log.lines().rev().find_map(|l| LOG_CAUSES.iter().find(|(needle, _)| l.contains(needle)).map(|(_, cause)| (l, *cause)));
                if let Some((line, cause)) = hit {
                    f.cause = cause;
                    f.what = format!("{}: {}; its log: {}", p.full_name(), p.state(), line.trim());
                    break;
                }
                if let Some(last) = log.lines().rev().find(|l| !l.trim().is_empty()) {
                    f.what = format!("{}: {}; last log line: {}", p.full_name(), p.state(), last.trim());
                }
            }
        } else if p.ip.is_some() {
            // The kubelet probes from the node: that path, traced, says where a probe dies.
            f.trace = Some(format!("cnitrace follow node/{node} {}", p.full_name()));
        }
        out.push(f);
    }
    (out, missing)
}

/// The veths of a node's pods: no address here, the peer in another namespace (an uplink carries one).
fn pod_veths(node: &NsState) -> Vec<&Link> {
    node.links.iter().filter(|l| l.kind == "veth" && l.peer_netnsid.is_some() && node.addrs_of(l.ifindex).next().is_none()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Addr, Link, Route};

    #[test]
    fn a_detached_veth_and_a_missing_vtep_neighbour_are_found() {
        let mut n = NsState::default();
        n.links = vec![
            Link { ifindex: 3, name: "cni0".into(), kind: "bridge".into(), admin_up: true, ..Default::default() },
            Link { ifindex: 7, name: "veth1".into(), kind: "veth".into(), admin_up: true, peer_netnsid: Some(0), master: Some(3), port_state: Some("forwarding".into()), ..Default::default() },
            Link { ifindex: 8, name: "veth2".into(), kind: "veth".into(), admin_up: true, peer_netnsid: Some(1), ..Default::default() },
            Link { ifindex: 9, name: "flannel.1".into(), kind: "vxlan".into(), admin_up: true, ..Default::default() },
        ];
        n.addrs = vec![
            Addr { ifindex: 3, addr: "10.244.0.1".parse().unwrap(), prefix: 24, broadcast: None },
            Addr { ifindex: 9, addr: "10.244.0.0".parse().unwrap(), prefix: 32, broadcast: None },
        ];
        n.routes = vec![Route { table: 254, dst: "10.244.1.0".parse().unwrap(), prefix: 24, gateway: Some("10.244.1.0".parse().unwrap()), oif: Some(9), kind: "unicast".into() }];
        n.sysctls.ip_forward = Some(1);
        let found: Vec<&str> = check(&n, "node").iter().map(|f| f.cause).collect();
        assert_eq!(found, vec!["veth-detached", "vxlan-neigh-missing"]);
    }

    #[test]
    fn no_name_is_assumed() {
        // A host-gw node: bridge br-x, pods' veths named by hand, an uplink veth with an address, no VXLAN
        // device (nothing missing), and a detached pod veth.
        let mut n = NsState::default();
        n.links = vec![
            Link { ifindex: 2, name: "ens3".into(), kind: "veth".into(), admin_up: true, peer_netnsid: Some(4), ..Default::default() },
            Link { ifindex: 5, name: "br-x".into(), kind: "bridge".into(), admin_up: false, ..Default::default() },
            Link { ifindex: 6, name: "web-h".into(), kind: "veth".into(), admin_up: true, peer_netnsid: Some(0), master: Some(5), port_state: Some("forwarding".into()), ..Default::default() },
            Link { ifindex: 7, name: "db-h".into(), kind: "veth".into(), admin_up: true, peer_netnsid: Some(1), ..Default::default() },
        ];
        n.addrs = vec![
            Addr { ifindex: 2, addr: "192.168.7.10".parse().unwrap(), prefix: 24, broadcast: None },
            Addr { ifindex: 5, addr: "172.20.3.1".parse().unwrap(), prefix: 24, broadcast: None },
        ];
        n.routes = vec![Route { table: 254, dst: "172.20.9.0".parse().unwrap(), prefix: 24, gateway: Some("192.168.7.11".parse().unwrap()), oif: Some(2), kind: "unicast".into() }];
        n.sysctls.ip_forward = Some(1);
        let found: Vec<String> = check(&n, "node").iter().map(|f| format!("{}: {}", f.cause, f.what)).collect();
        assert_eq!(found, vec!["bridge-down: br-x is down", "veth-detached: db-h is no port of br-x"]);
        // The same with flannel's VXLAN device as flannel names it for VNI 4096, down.
        n.links.push(Link { ifindex: 9, name: "flannel.4096".into(), kind: "vxlan".into(), admin_up: false, ..Default::default() });
        n.addrs.push(Addr { ifindex: 9, addr: "172.20.3.0".parse().unwrap(), prefix: 32, broadcast: None });
        assert!(check(&n, "node").iter().any(|f| f.cause == "vxlan-down" && f.what == "flannel.4096 is down"));
    }

    #[test]
    fn windows_nodes_need_vxlan_4096_on_4789_and_the_patch_keeps_the_rest() {
        let node = |name: &str, os: &str| crate::k8s::NodeFacts { name: name.into(), os: Some(os.into()), ..Default::default() };
        let conf = |raw: &str| crate::k8s::NetConf { source: "kube-flannel/kube-flannel-cfg".into(), ..crate::k8s::NetConf::parse(raw).unwrap() };
        let mut facts = ClusterFacts { nodes: vec![node("lin-1", "linux"), node("win-1", "windows")], ..Default::default() };
        facts.flannel = Some(conf(r#"{"Network": "10.244.0.0/16", "EnableNFTables": false, "Backend": {"Type": "vxlan"}}"#));
        let f = cluster_findings(&facts);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].what.starts_with("Windows node win-1 cannot join flannel's vxlan VNI 1 port 8472"), "{}", f[0].what);
        let fix = f[0].fix.as_deref().unwrap();
        assert!(fix.starts_with("kubectl -n kube-flannel patch configmap kube-flannel-cfg --type merge -p '") && fix.ends_with("rollout restart daemonset kube-flannel-ds"), "{fix}");
        let patched: serde_json::Value = serde_json::from_str(&patched_net_conf(&facts.flannel.as_ref().unwrap().raw).unwrap()).unwrap();
        assert_eq!(patched["Backend"], serde_json::json!({"Type": "vxlan", "VNI": 4096, "Port": 4789}));
        assert_eq!((patched["Network"].as_str(), patched["EnableNFTables"].as_bool()), (Some("10.244.0.0/16"), Some(false)), "the rest kept");
        // Already right, or no Windows node: nothing.
        facts.flannel = Some(conf(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 4096, "Port": 4789}}"#));
        assert!(cluster_findings(&facts).is_empty());
        facts.flannel = Some(conf(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#));
        facts.nodes.pop();
        assert!(cluster_findings(&facts).is_empty());
    }
}
