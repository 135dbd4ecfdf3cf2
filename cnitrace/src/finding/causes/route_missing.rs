//! route-missing: a node has no route to the other node's pod subnet — through the overlay (flannel's
//! VXLAN backend: via the remote VTEP on the VXLAN device) or, on a node without one (flannel's host-gw
//! backend), via the other node's own address on the link they share.

use std::net::Ipv4Addr;

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};
use crate::state::{in_prefix, NsState};

pub const CAUSE: Cause = Cause { id: "route-missing", layer: "routing", detect, fix };

/// Does `node` route `to` as flannel would: through its VXLAN device, or (host-gw) by a route of the
/// cluster network via a gateway on a link that is not the pods' bridge?
fn routed(ctx: &Ctx, node: &NsState, to: Ipv4Addr) -> bool {
    let Some(r) = node.route_to(to) else { return false };
    let link = r.oif.and_then(|o| node.link(o));
    if link.is_some_and(|l| l.kind == "vxlan") {
        return true;
    }
    let cluster = ctx.cluster_cidr();
    let host_gw = ctx.vxlan_dev(node).is_none() && r.gateway.is_some() && r.prefix >= cluster.1 && in_prefix(r.dst, cluster.0, cluster.1);
    host_gw && link.is_some_and(|l| l.kind != "bridge")
}

/// How `node` should reach other nodes' pods, in words.
fn way(ctx: &Ctx, node: &NsState) -> String {
    match ctx.vxlan_dev(node) {
        Some(vx) => format!("through {}", vx.name),
        None => "via the node that holds it (host-gw)".into(),
    }
}

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.cross_node() {
        return None;
    }
    for (node, to) in ctx.legs() {
        if routed(ctx, node, to) {
            continue;
        }
        let name = ctx.node_name(node);
        let r = node.route_to(to);
        let mut facts = vec![match r {
            None => format!("{name} has no route to {to}"),
            Some(r) => format!("{name} routes {to} by {}/{} dev {}, not as flannel does", r.dst, r.prefix, r.oif.map(|o| node.ifname(o)).unwrap_or_default()),
        }];
        if ctx.trace.route_failures(to).next().is_some() {
            facts.push(format!("the kernel's lookup for {to} in the main table failed"));
        }
        if let Some(d) = ctx.trace.first_drop().and_then(|d| d.drop.as_ref()) {
            if d.says("IP_INNOROUTES", &["ip_error"]) {
                facts.push(format!("{} dropped the packet: no route ({})", d.function, d.reason));
            }
        }
        let hop_if = ctx.pods_bridge(node).map(|b| b.name.clone()).unwrap_or_default();
        return Some(Diagnosis {
            explanation: format!("{name} has no route to {to}'s pod subnet {}: the packet has nowhere to go", way(ctx, node)),
            facts,
            hop: Some((name, hop_if)),
        });
    }
    None
}

fn fix(ctx: &Ctx) -> Remedy {
    for (node, to) in ctx.legs() {
        if routed(ctx, node, to) {
            continue;
        }
        let len = ctx.subnet_len(node);
        let net = Ipv4Addr::from(u32::from(to) & (u32::MAX << (32 - len as u32)));
        let ns = Target::of(node);
        let (gateway, ifname, onlink, why) = match ctx.vxlan_dev(node) {
            Some(vx) => {
                let Some(vtep) = ctx.remote_vtep(node, to) else {
                    return Remedy::NoSafeFix(format!(
                        "nothing on {} says which VTEP serves {to}: flannel's node annotations are needed (Kubernetes integration)",
                        ctx.node_name(node)
                    ));
                };
                let why = format!("{}'s pods ({net}/{len}) are reached through VTEP {} on {}", ctx.node_name(node), vtep.ip, vx.name);
                (vtep.ip, vx.name.clone(), true, why)
            }
            None => {
                let Some((via, dev)) = host_gw_next_hop(ctx, node, to) else {
                    return Remedy::NoSafeFix(format!(
                        "{} has no VXLAN device (host-gw) and nothing on this host says which node holds {to}: flannel's node annotations (public-ip) are needed (Kubernetes integration)",
                        ctx.node_name(node)
                    ));
                };
                let why = format!("host-gw: {net}/{len} is the pod subnet of the node at {via}, on the link {dev} shares with it");
                (via, dev, false, why)
            }
        };
        let route = |add: bool| {
            let (dst, prefix, gateway, ifname) = (net, len, Some(gateway), ifname.clone());
            if add {
                Action::RouteAdd { ns: ns.clone(), dst, prefix, gateway, ifname, onlink }
            } else {
                Action::RouteDel { ns: ns.clone(), dst, prefix, gateway, ifname, onlink }
            }
        };
        return Remedy::Steps(vec![Step { action: route(true), undo: route(false), why }]);
    }
    Remedy::NoSafeFix("the routes are there now".into())
}

/// host-gw: the other node of the pair (its state is on this host) holds `to`'s subnet on its bridge;
/// its address on a link `node` shares with it (an address of `node`'s own subnet there) is the next hop.
fn host_gw_next_hop(ctx: &Ctx, node: &NsState, to: Ipv4Addr) -> Option<(Ipv4Addr, String)> {
    let other = [ctx.src_node(), ctx.dst_node()].into_iter().flatten().find(|n| n.inode != node.inode)?;
    let holds = other.links.iter().any(|l| l.kind == "bridge" && other.addrs_of(l.ifindex).any(|a| in_prefix(to, a.addr, a.prefix)));
    if !holds {
        return None;
    }
    let bridges = |n: &NsState, i: u32| n.link(i).is_some_and(|l| l.kind == "bridge" || l.kind == "vxlan");
    node.addrs.iter().filter(|a| a.prefix > 0 && a.prefix < 32 && !bridges(node, a.ifindex)).find_map(|mine| {
        other
            .addrs
            .iter()
            .filter(|o| !bridges(other, o.ifindex) && o.addr != mine.addr)
            .find(|o| in_prefix(o.addr, mine.addr, mine.prefix))
            .map(|o| (o.addr, node.ifname(mine.ifindex)))
    })
}
