//! pod-prefix-too-wide: a pod's address carries a wider prefix than its node's pod subnet (the incident's
//! pods held `10.244.0.20/16` on a node whose cni0 is `10.244.0.1/24`). The pod then takes every other
//! node's pods for neighbours on its own link and asks ARP for them instead of sending through its
//! gateway; nobody on the bridge answers, and the kernel drops the queued packets (NEIGH_FAILED).

use std::net::Ipv4Addr;

use super::Cause;
use crate::{
    finding::{Ctx, Diagnosis},
    plan::{Action, Remedy, Step, Target},
    state::{in_prefix, Addr, Link, NsState},
};

pub const CAUSE: Cause = Cause { id: "pod-prefix-too-wide", layer: "routing", detect, fix };

/// One side of the pair whose address is wider than its node's subnet and takes the other end for a
/// neighbour on its link.
struct Wide<'a> {
    name: &'a str,
    pod: &'a NsState,
    eth: &'a Link,
    addr: &'a Addr,
    /// The node's gateway address for the pod, with the node subnet's prefix.
    gateway: &'a Addr,
    node: &'a NsState,
    /// The other end, which the pod wrongly takes for a neighbour.
    peer: Ipv4Addr,
}

fn wide_side<'a>(ctx: &'a Ctx<'a>) -> Option<Wide<'a>> {
    let sides = [
        (ctx.src_name(), ctx.src_pod(), ctx.src_ip(), ctx.src_node(), ctx.sent_to()),
        (ctx.dst_name(), ctx.dst_pod(), ctx.dst_ip(), ctx.dst_node(), ctx.src_ip()),
    ];
    sides.into_iter().find_map(|(name, pod, ip, node, peer)| {
        let (pod, node) = (pod?, node?);
        let eth = ctx.pod_if(pod, ip)?;
        let addr = pod.addrs.iter().find(|a| a.addr == ip)?;
        let bridge = ctx.pods_bridge(node)?;
        let gateway = node.addrs_of(bridge.ifindex).find(|g| in_prefix(ip, g.addr, g.prefix))?;
        // Only where the wide prefix decides the route: a route through the gateway for the same
        // network (a cluster route) masks it, and then the prefix is harmless.
        let on_link_for_pod = in_prefix(peer, addr.addr, addr.prefix) && pod.route_to(peer).is_some_and(|r| r.gateway.is_none());
        let off_the_node_subnet = !in_prefix(peer, gateway.addr, gateway.prefix);
        (addr.prefix < gateway.prefix && on_link_for_pod && off_the_node_subnet).then_some(Wide { name, pod, eth, addr, gateway, node, peer })
    })
}

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let w = wide_side(ctx)?;
    let mut facts = vec![
        format!("{} {} holds {}/{}", w.name, w.eth.name, w.addr.addr, w.addr.prefix),
        format!(
            "its node {} gives its pods {}/{} (the gateway {} on {})",
            ctx.node_name(w.node),
            network(w.gateway),
            w.gateway.prefix,
            w.gateway.addr,
            ctx.pods_bridge(w.node).map(|b| b.name.as_str()).unwrap_or("the bridge")
        ),
    ];
    if let Some(r) = w.pod.route_to(w.peer) {
        facts.push(format!("{}'s route to {} is {}/{} on-link (no gateway)", w.name, w.peer, r.dst, r.prefix));
    }
    if ctx.trace.arp_request_seen(w.peer, w.name, &w.eth.name) {
        facts.push(format!("{} asked ARP for {} on {} instead of sending it to its gateway", w.name, w.peer, w.eth.name));
    }
    Some(Diagnosis {
        explanation: format!(
            "{}'s address {}/{} is wider than its node's pod subnet /{}: it takes {} (another node's) for a neighbour on its own link and asks ARP for it instead of going through its gateway {}; nobody answers",
            w.name, w.addr.addr, w.addr.prefix, w.gateway.prefix, w.peer, w.gateway.addr
        ),
        facts,
        hop: Some((w.name.to_string(), w.eth.name.clone())),
    })
}

fn network(a: &Addr) -> Ipv4Addr {
    let mask = if a.prefix == 0 { 0 } else { u32::MAX << (32 - a.prefix as u32) };
    Ipv4Addr::from(u32::from(a.addr) & mask)
}

/// The pod's address with the node subnet's prefix: the narrow one added first, then the wide one
/// removed, so the pod's default route through its gateway stays (removing first would take it away);
/// the undo runs the other way round and leaves the pod exactly as it was.
fn fix(ctx: &Ctx) -> Remedy {
    let Some(w) = wide_side(ctx) else { return Remedy::NoSafeFix("the pod's prefix matches its node's subnet now".into()) };
    let ns = Target::of(w.pod);
    let (ifname, addr) = (w.eth.name.clone(), w.addr.addr);
    let narrow = w.gateway.prefix;
    let steps = vec![
        Step {
            action: Action::AddrAdd { ns: ns.clone(), ifname: ifname.clone(), addr, prefix: narrow, broadcast: None },
            undo: Action::AddrDel { ns: ns.clone(), ifname: ifname.clone(), addr, prefix: narrow },
            why: format!("the node's pod subnet is /{narrow}: the pod's own address as the CNI plugin gives it"),
        },
        Step {
            action: Action::AddrDel { ns: ns.clone(), ifname: ifname.clone(), addr, prefix: w.addr.prefix },
            undo: Action::AddrAdd { ns, ifname, addr, prefix: w.addr.prefix, broadcast: w.addr.broadcast },
            why: format!("the /{} address makes other nodes' pods look on-link", w.addr.prefix),
        },
    ];
    Remedy::Steps(steps)
}
