//! route-missing: a node has no route to the other node's pod subnet through the overlay.

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "route-missing", layer: "routing", hop_from_state: true, detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.cross_node() {
        return None;
    }
    // The way there from the source's node, and the way back from the destination's.
    for (node, to) in ctx.legs() {
        let name = ctx.node_name(node);
        let r = node.route_to(to);
        let via_overlay = r.and_then(|r| r.oif).and_then(|o| node.link(o)).is_some_and(|l| l.kind == "vxlan");
        if via_overlay {
            continue;
        }
        let mut facts = vec![match r {
            None => format!("{name} has no route to {to}"),
            Some(r) => format!("{name} routes {to} by {}/{} dev {}, not through the overlay", r.dst, r.prefix, r.oif.map(|o| node.ifname(o)).unwrap_or_default()),
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
            explanation: format!("{name} has no route to {to}'s pod subnet through flannel.1: the packet has nowhere to go"),
            facts,
            hop: Some((name, hop_if)),
        });
    }
    None
}

/// The route flannel writes: the remote subnet via its VTEP, dev flannel.1 onlink (undo: removed).
fn fix(ctx: &Ctx) -> Remedy {
    for (node, to) in ctx.legs() {
        let ok = node.route_to(to).and_then(|r| r.oif).and_then(|o| node.link(o)).is_some_and(|l| l.kind == "vxlan");
        if ok {
            continue;
        }
        let Some(vx) = ctx.vxlan_dev(node) else { return Remedy::NoSafeFix(format!("{} has no flannel.1", ctx.node_name(node))) };
        let Some(vtep) = ctx.remote_vtep(node, to) else {
            return Remedy::NoSafeFix(format!(
                "nothing on {} says which VTEP serves {to}: flannel's node annotations are needed (Kubernetes integration)",
                ctx.node_name(node)
            ));
        };
        let len = ctx.subnet_len(node);
        let net = std::net::Ipv4Addr::from(u32::from(to) & (u32::MAX << (32 - len as u32)));
        let ns = Target::of(node);
        let route = |add: bool| {
            let (dst, prefix, gateway, ifname, onlink) = (net, len, Some(vtep.ip), vx.name.clone(), true);
            if add {
                Action::RouteAdd { ns: ns.clone(), dst, prefix, gateway, ifname, onlink }
            } else {
                Action::RouteDel { ns: ns.clone(), dst, prefix, gateway, ifname, onlink }
            }
        };
        return Remedy::Steps(vec![Step {
            action: route(true),
            undo: route(false),
            why: format!("{}'s pods ({net}/{len}) are reached through VTEP {} on {}", ctx.node_name(node), vtep.ip, vx.name),
        }]);
    }
    Remedy::NoSafeFix("the routes are there now".into())
}
