//! Everything a cause detector may look at, and the questions they share about it.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::{
    event::{Kind, TraceEvent},
    inject::ProbeOutcome,
    path::Trace,
    state::{in_prefix, Link, NsState, RuleSets, MAIN_TABLE},
};

/// The state snapshots around one traced pair (recorded as fixtures for the unit tests).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct States {
    /// netns inode → state.
    pub by_inode: BTreeMap<u32, NsState>,
    /// Rule sets read before the probe, per namespace: counters that moved show which rule matched.
    pub rules_before: BTreeMap<u32, RuleSets>,
    pub src_pod: u32,
    pub src_node: Option<u32>,
    pub dst_pod: Option<u32>,
    pub dst_node: Option<u32>,
    pub src_ip: Option<Ipv4Addr>,
    pub dst_ip: Option<Ipv4Addr>,
    /// Host end of the source's / destination's veth (ifindex in the node).
    pub src_host_veth: Option<u32>,
    pub dst_host_veth: Option<u32>,
    /// Display names (pod names) of the pair.
    pub src_name: String,
    pub dst_name: String,
    /// netns inode → the name shown for it: the Kubernetes name (`namespace/pod`, or the node's) where the
    /// API gave one, else the name its maker gave it (`resolve::NAMES_DIR`), as it was when traced.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub names: BTreeMap<u32, String>,
    /// What the Kubernetes API said (nodes, the pair's pods, flannel's configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::k8s::ClusterFacts>,
    /// The destination is a Service: how this host's kube-proxy rules translate it, and the endpoint the
    /// trace saw chosen (then `dst_*` above are that endpoint's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<crate::service::ServicePath>,
}

pub struct Ctx<'a> {
    pub trace: &'a Trace,
    pub probe: &'a ProbeOutcome,
    pub states: &'a States,
}

pub const VXLAN_DEV: &str = "flannel.1";

/// One direction of the overlay: a node, where its packets for the pair go, the remote VTEP it routes
/// them to and the VXLAN device they leave by.
pub struct OverlayLeg<'a> {
    pub node: &'a NsState,
    pub to: Ipv4Addr,
    pub gw: Ipv4Addr,
    pub vx: &'a Link,
}

/// The far end of the overlay, as flannel records it.
#[derive(Clone, Debug)]
pub struct RemoteVtep {
    pub ip: Ipv4Addr,
    pub mac: String,
    pub underlay: Option<Ipv4Addr>,
}

impl<'a> Ctx<'a> {
    pub fn src_ip(&self) -> Ipv4Addr {
        self.states.src_ip.expect("source address")
    }
    pub fn dst_ip(&self) -> Ipv4Addr {
        self.states.dst_ip.expect("destination address")
    }
    /// The address the source sent to: a Service's (ClusterIP, a node's NodePort address) when the
    /// destination is one, else the destination's. The source's own routes are about this one.
    pub fn sent_to(&self) -> Ipv4Addr {
        self.states.service.as_ref().map(|s| *s.asked.ip()).unwrap_or_else(|| self.dst_ip())
    }
    /// Did the trace see the Service's address translated to one of its endpoints?
    pub fn translated_to_endpoint(&self) -> bool {
        self.states.service.as_ref().is_some_and(|s| s.chosen.is_some())
    }
    pub fn src_name(&self) -> &str {
        &self.states.src_name
    }
    pub fn dst_name(&self) -> &str {
        &self.states.dst_name
    }
    pub fn ns(&self, inode: u32) -> Option<&'a NsState> {
        self.states.by_inode.get(&inode)
    }
    pub fn src_pod(&self) -> Option<&'a NsState> {
        self.ns(self.states.src_pod)
    }
    pub fn src_node(&self) -> Option<&'a NsState> {
        self.states.src_node.and_then(|i| self.ns(i))
    }
    pub fn dst_pod(&self) -> Option<&'a NsState> {
        self.states.dst_pod.and_then(|i| self.ns(i))
    }
    pub fn dst_node(&self) -> Option<&'a NsState> {
        self.states.dst_node.and_then(|i| self.ns(i))
    }
    /// Every node namespace we know of (source's and destination's, once each).
    pub fn nodes(&self) -> Vec<&'a NsState> {
        let mut v: Vec<&NsState> = self.src_node().into_iter().collect();
        if let Some(d) = self.dst_node() {
            if self.states.dst_node != self.states.src_node {
                v.push(d);
            }
        }
        v
    }
    pub fn same_node(&self) -> bool {
        self.states.dst_node.is_some() && self.states.dst_node == self.states.src_node
    }
    /// The source pod's route to the destination.
    pub fn src_route(&self) -> Option<&'a crate::state::Route> {
        self.src_pod()?.route_to(self.dst_ip())
    }
    /// The gateway the source pod uses for the destination (None: same L2 segment or no route).
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.src_route().and_then(|r| r.gateway)
    }
    /// The source pod's default/cluster gateway, even when its routes are gone: from its own subnet's
    /// first address is a guess we do not make; look at any gateway route it still has.
    pub fn any_pod_gateway(&self) -> Option<Ipv4Addr> {
        self.src_pod()?.routes.iter().find_map(|r| r.gateway)
    }
    /// Does the path leave the pods' L2 segment (through the node's IP layer)?
    pub fn routed(&self) -> bool {
        match self.src_route() {
            Some(r) => r.gateway.is_some(),
            None => true,
        }
    }
    /// Is the destination a pod on another node (through the overlay)?
    pub fn cross_node(&self) -> bool {
        if self.same_node() {
            return false;
        }
        if self.states.dst_node.is_some() {
            return true;
        }
        // Not on this host: a pod of the cluster if the node routes it through the overlay, or the
        // node's VXLAN device serves the cluster network it belongs to.
        self.src_node().is_some_and(|n| {
            n.route_to(self.dst_ip()).and_then(|r| r.oif).is_some_and(|o| n.link(o).is_some_and(|l| l.kind == "vxlan"))
        }) || self.in_cluster_network(self.dst_ip()) && !self.in_node_subnet(self.dst_ip())
    }
    /// Inside the pod network, as the source pod's non-default gateway routes describe it.
    pub fn in_cluster_network(&self, ip: Ipv4Addr) -> bool {
        self.src_pod().is_some_and(|p| {
            p.routes.iter().any(|r| r.table == MAIN_TABLE && r.prefix > 0 && r.gateway.is_some() && in_prefix(ip, r.dst, r.prefix))
        }) || self.src_node().and_then(|n| self.vxlan_dev(n)).is_some() && {
            let (net, prefix) = self.cluster_cidr();
            in_prefix(ip, net, prefix)
        }
    }
    pub fn in_node_subnet(&self, ip: Ipv4Addr) -> bool {
        self.src_pod().is_some_and(|p| p.addrs.iter().any(|a| a.prefix < 32 && a.ifindex != 1 && in_prefix(ip, a.addr, a.prefix)))
    }
    pub fn src_host_veth(&self) -> Option<&'a Link> {
        self.src_node()?.link(self.states.src_host_veth?)
    }
    pub fn dst_host_veth(&self) -> Option<&'a Link> {
        self.dst_node()?.link(self.states.dst_host_veth?)
    }
    /// Both directions of a cross-node path: the source's node towards the destination, and the
    /// destination's node back towards the source (when it is on this host).
    pub fn legs(&self) -> Vec<(&'a NsState, Ipv4Addr)> {
        [(self.src_node(), self.dst_ip()), (self.dst_node(), self.src_ip())]
            .into_iter()
            .filter_map(|(n, to)| n.map(|n| (n, to)))
            .collect()
    }

    /// The legs whose route leaves through a VXLAN device via a gateway (the remote VTEP).
    pub fn overlay_legs(&self) -> Vec<OverlayLeg<'a>> {
        self.legs()
            .into_iter()
            .filter_map(|(node, to)| {
                let r = node.route_to(to)?;
                let (gw, oif) = (r.gateway?, r.oif?);
                let vx = node.link(oif).filter(|l| l.kind == "vxlan")?;
                Some(OverlayLeg { node, to, gw, vx })
            })
            .collect()
    }

    /// Each pod of the pair with its node and the host end of its veth, the destination first (the
    /// side a same-node failure usually sits on).
    pub fn host_sides(&self) -> [(&'a str, Option<&'a NsState>, Option<&'a Link>); 2] {
        [
            (self.states.dst_name.as_str(), self.dst_node(), self.dst_host_veth()),
            (self.states.src_name.as_str(), self.src_node(), self.src_host_veth()),
        ]
    }

    /// The bridge the pods of `node` hang off: the bridge holding a pod's gateway address (whatever
    /// its name), else the master of a pod veth we know to be attached, else the bridge named cni0.
    pub fn pods_bridge(&self, node: &'a NsState) -> Option<&'a Link> {
        let gateways: Vec<Ipv4Addr> =
            [self.src_pod(), self.dst_pod()].into_iter().flatten().flat_map(|p| p.routes.iter().filter_map(|r| r.gateway)).collect();
        let by_gateway = node.links.iter().find(|l| l.kind == "bridge" && node.addrs_of(l.ifindex).any(|a| gateways.contains(&a.addr)));
        let via_veth = || {
            [self.states.src_host_veth, self.states.dst_host_veth]
                .into_iter()
                .flatten()
                .filter_map(|i| node.link(i))
                .find_map(|l| l.master.and_then(|m| node.link(m)).filter(|b| b.kind == "bridge"))
        };
        by_gateway.or_else(via_veth).or_else(|| node.link_by_name("cni0"))
    }
    pub fn vxlan_dev(&self, node: &'a NsState) -> Option<&'a Link> {
        node.link_by_name(VXLAN_DEV).or_else(|| node.links.iter().find(|l| l.kind == "vxlan"))
    }
    /// The pod's own eth0 (or the interface holding its address).
    pub fn pod_if(&self, pod: &'a NsState, ip: Ipv4Addr) -> Option<&'a Link> {
        pod.has_addr(ip).and_then(|a| pod.link(a.ifindex))
    }

    /// Did an answer from the destination get back into the source's namespace (passive mode)?
    pub fn reply_reached_source(&self) -> bool {
        let (src, dst) = (self.src_ip(), self.dst_ip());
        self.trace.packets.iter().any(|p| {
            p.events.iter().any(|e| {
                e.kind == Kind::Receive
                    && e.netns == self.states.src_pod
                    && e.packet.as_ref().is_some_and(|pk| pk.src == dst && pk.dst == src && pk.proto != "arp" && !pk.icmp_error)
            })
        })
    }

    /// The last place the request direction was seen.
    pub fn last_hop(&self) -> Option<&'a TraceEvent> {
        let (src, dst) = (self.src_ip(), self.dst_ip());
        self.trace
            .packets
            .iter()
            .filter(|p| p.events.first().and_then(|e| e.packet.as_ref()).is_some_and(|pk| pk.src == src && pk.dst == dst && !pk.icmp_error))
            .flat_map(|p| p.events.iter())
            .filter(|e| e.kind != Kind::Drop)
            .max_by_key(|e| e.t_ns)
    }

    pub fn probe_facts(&self) -> Vec<String> {
        let p = self.probe;
        let mut f = Vec::new();
        if p.sent > 0 {
            f.push(format!("probe: {} of {} answered (payload sizes {:?})", p.answered, p.sent, p.sizes));
        }
        for e in &p.icmp_errors {
            f.push(format!("the source got ICMP {e}"));
        }
        if let Some(e) = &p.send_error {
            f.push(format!("the source could not send: {e}"));
        }
        f
    }

    /// A summary of where each packet of the request direction went last.
    pub fn trail_facts(&self) -> Vec<String> {
        self.trace
            .packets
            .iter()
            .take(6)
            .map(|p| {
                let l = p.last();
                format!("{}: last seen {:?} at {} {}", p.what, l.kind, l.where_, l.ifname)
            })
            .collect()
    }

    pub fn delivery_facts(&self) -> Vec<String> {
        let mut f = self.probe_facts();
        let (src, dst) = (self.src_ip(), self.dst_ip());
        let request = self.trace.packets.iter().find(|p| {
            p.events.first().and_then(|e| e.packet.as_ref()).is_some_and(|pk| pk.src == src && pk.dst == dst && pk.proto != "arp")
        });
        if let Some(p) = request {
            let mut hops: Vec<String> = Vec::new();
            for e in p.events.iter().filter(|e| matches!(e.kind, Kind::Xmit | Kind::Receive)) {
                let hop = format!("{} {}", e.where_, e.ifname);
                if hops.last() != Some(&hop) {
                    hops.push(hop);
                }
            }
            f.push(format!("{}: {}", p.what, hops.join(" → ")));
        }
        f
    }

    /// The pod network (flannel's `Network`): the source pod's gateway route that is not the default,
    /// else the /16 around the source's address (flannel's default).
    pub fn cluster_cidr(&self) -> (Ipv4Addr, u8) {
        self.src_pod()
            .and_then(|p| p.routes.iter().find(|r| r.table == MAIN_TABLE && r.prefix > 0 && r.prefix < 24 && r.gateway.is_some()))
            .map(|r| (r.dst, r.prefix))
            .unwrap_or_else(|| {
                let o = self.src_ip().octets();
                (Ipv4Addr::new(o[0], o[1], 0, 0), 16)
            })
    }

    /// The node's own pod subnet prefix length (its pods bridge's address), flannel's SubnetLen.
    pub fn subnet_len(&self, node: &NsState) -> u8 {
        self.pods_bridge(node).and_then(|b| node.addrs_of(b.ifindex).next()).map(|a| a.prefix).unwrap_or(24)
    }

    /// What flannel would write on `node` for the remote VTEP serving `to`: its address on flannel.1,
    /// its MAC, and its underlay address. From the other node's own device when it is on this host, else
    /// from the neighbour and FDB entries flannel left on `node`.
    pub fn remote_vtep(&self, node: &NsState, to: Ipv4Addr) -> Option<RemoteVtep> {
        let other = [self.src_node(), self.dst_node()].into_iter().flatten().find(|n| n.inode != node.inode);
        if let Some(other) = other {
            if let Some(vx) = self.vxlan_dev(other) {
                if let Some(a) = other.addrs_of(vx.ifindex).find(|a| !a.addr.is_unspecified()) {
                    return Some(RemoteVtep { ip: a.addr, mac: vx.mac.clone(), underlay: vx.vxlan.as_ref().and_then(|x| x.local) });
                }
            }
        }
        let from_api = self.vtep_from_api(to);
        let vx = self.vxlan_dev(node)?;
        let len = self.subnet_len(node);
        let local = node.neighbours.iter().find(|n| n.ifindex == vx.ifindex && in_prefix(n.ip, to, len) && n.mac.is_some()).and_then(|n| {
            let mac = n.mac.clone()?;
            let underlay = node.fdb.iter().find(|f| f.ifindex == vx.ifindex && f.mac == mac).and_then(|f| f.dst);
            Some(RemoteVtep { ip: n.ip, mac, underlay })
        });
        match (local, from_api) {
            // This node's own record, completed by the API's where it has a gap and both agree on the VTEP.
            (Some(mut l), Some(a)) if l.mac == a.mac && l.ip == a.ip => {
                l.underlay = l.underlay.or(a.underlay);
                Some(l)
            }
            (Some(l), _) => Some(l),
            (None, a) => a,
        }
    }

    /// The VTEP of the node whose pod network holds `to`, as flanneld registers it on its Node object:
    /// the pod network's own address, `backend-data`'s VtepMAC, `public-ip` (else the InternalIP).
    pub fn vtep_from_api(&self, to: Ipv4Addr) -> Option<RemoteVtep> {
        let n = self.states.cluster.as_ref()?.node_for_pod_ip(to)?;
        let (net, _) = n.pod_nets().into_iter().find(|(net, len)| in_prefix(to, *net, *len))?;
        Some(RemoteVtep { ip: net, mac: n.vtep_mac.clone()?, underlay: n.public_ip.or(n.internal_ip) })
    }

    /// A node's name in words: the same rule as every other namespace's ([`crate::resolve::display_name_of`]),
    /// never a piece of the namespace's name (`kind-worker` was called `worker`).
    pub fn node_name(&self, node: &NsState) -> String {
        self.states.names.get(&node.inode).cloned().unwrap_or_else(|| crate::resolve::display_name_of(&node.name))
    }
}
