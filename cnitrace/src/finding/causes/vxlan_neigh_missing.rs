//! vxlan-neigh-missing: the permanent neighbour entry flannel writes for the remote VTEP is gone; the
//! node would have to ARP over VXLAN, which flannel's nolearning device cannot answer.

use crate::fix::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "vxlan-neigh-missing", layer: "vxlan", hop_from_state: true, detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.cross_node() {
        return None;
    }
    let legs = [(ctx.src_node(), ctx.dst_ip()), (ctx.dst_node(), ctx.src_ip())];
    for (node, to) in legs {
        let Some(node) = node else { continue };
        let Some(r) = node.route_to(to) else { continue };
        let (Some(gw), Some(oif)) = (r.gateway, r.oif) else { continue };
        let Some(vx) = node.link(oif).filter(|l| l.kind == "vxlan") else { continue };
        let entry = node.neigh(vx.ifindex, gw);
        let ok = entry.is_some_and(|n| n.mac.is_some() && matches!(n.state.as_str(), "permanent" | "reachable" | "stale" | "noarp"));
        if ok {
            continue;
        }
        let name = ctx.node_name(node);
        return Some(Diagnosis {
            explanation: format!("{name} has no neighbour entry for the remote VTEP {gw} on {}: it cannot address the encapsulated frame", vx.name),
            facts: vec![
                format!("route to {to}: via {gw} dev {}", vx.name),
                format!("neighbour {gw} on {}: {}", vx.name, entry.map(|n| n.state.clone()).unwrap_or_else(|| "absent".into())),
            ],
            hop: Some((name, vx.name.clone())),
        });
    }
    None
}

/// The permanent neighbour flannel writes for the remote VTEP (undo: removed).
fn fix(ctx: &Ctx) -> Remedy {
    let legs = [(ctx.src_node(), ctx.dst_ip()), (ctx.dst_node(), ctx.src_ip())];
    for (node, to) in legs {
        let Some(node) = node else { continue };
        let Some(r) = node.route_to(to) else { continue };
        let (Some(gw), Some(oif)) = (r.gateway, r.oif) else { continue };
        let Some(vx) = node.link(oif).filter(|l| l.kind == "vxlan") else { continue };
        if node.neigh(vx.ifindex, gw).is_some_and(|n| n.mac.is_some() && n.state != "failed" && n.state != "incomplete") {
            continue;
        }
        let Some(vtep) = ctx.remote_vtep(node, to).filter(|v| v.ip == gw) else {
            return Remedy::NoSafeFix(format!("the MAC of VTEP {gw} is not known on this host: flannel's node annotations are needed"));
        };
        let ns = Target::of(node);
        return Remedy::Steps(vec![Step {
            action: Action::NeighSet { ns: ns.clone(), ifname: vx.name.clone(), ip: gw, mac: vtep.mac.clone() },
            undo: Action::NeighDel { ns, ifname: vx.name.clone(), ip: gw },
            why: format!("VTEP {gw} is {}, as flannel records it", vtep.mac),
        }]);
    }
    Remedy::NoSafeFix("the VTEP neighbours are there now".into())
}
