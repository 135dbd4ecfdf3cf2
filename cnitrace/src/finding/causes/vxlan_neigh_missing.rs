//! vxlan-neigh-missing: the permanent neighbour entry flannel writes for the remote VTEP is gone; the
//! node would have to ARP over VXLAN, which flannel's nolearning device cannot answer.

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::{
    finding::{ctx::OverlayLeg, Ctx, Diagnosis},
    state::Neigh,
};

/// An entry the kernel can address the VTEP with.
fn usable(entry: Option<&Neigh>) -> bool {
    entry.is_some_and(|n| n.mac.is_some() && matches!(n.state.as_str(), "permanent" | "reachable" | "stale" | "noarp" | "delay" | "probe"))
}

pub const CAUSE: Cause = Cause { id: "vxlan-neigh-missing", layer: "vxlan", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.cross_node() {
        return None;
    }
    for OverlayLeg { node, to, gw, vx } in ctx.overlay_legs() {
        let entry = node.neigh(vx.ifindex, gw);
        if usable(entry) {
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
    for OverlayLeg { node, to, gw, vx } in ctx.overlay_legs() {
        if usable(node.neigh(vx.ifindex, gw)) {
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
