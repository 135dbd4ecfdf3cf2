//! vxlan-down: the node's VXLAN device (flannel.1, or flannel.<VNI>) is down or missing; the kernel drops
//! the routes through it, so cross-node traffic has no way out. Missing only counts where the other node
//! of the pair has one: a node without one may use host-gw.

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "vxlan-down", layer: "vxlan", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.cross_node() {
        return None;
    }
    for node in ctx.nodes() {
        let name = ctx.node_name(node);
        match ctx.vxlan_dev(node) {
            Some(vx) if !vx.admin_up => {
                return Some(Diagnosis {
                    explanation: format!("{} on {name} is down: the routes to the other nodes' pods went with it", vx.name),
                    facts: vec![
                        format!("{} on {name}: admin down, oper {}", vx.name, vx.oper),
                        format!("{name} route to {}: {}", ctx.dst_ip(), node.route_to(ctx.dst_ip()).map(|r| format!("{}/{}", r.dst, r.prefix)).unwrap_or_else(|| "none".into())),
                    ],
                    hop: Some((name, vx.name.clone())),
                })
            }
            None => {
                let Some((other, theirs)) = other_nodes_device(ctx, node) else { continue };
                return Some(Diagnosis {
                    explanation: format!("{name} has no VXLAN device ({theirs}, as {other} has): it cannot reach the other nodes' pods"),
                    facts: vec![format!("no vxlan link on {name}"), format!("{other} has {theirs}")],
                    hop: Some((name, theirs)),
                });
            }
            _ => {}
        }
    }
    None
}

/// Bring flannel.1 up. The kernel dropped its routes and neighbours when it went down: the next round
/// finds them missing and writes them back.
fn fix(ctx: &Ctx) -> Remedy {
    for node in ctx.nodes() {
        match ctx.vxlan_dev(node) {
            Some(vx) if !vx.admin_up => {
                let ns = Target::of(node);
                return Remedy::Steps(vec![Step {
                    action: Action::LinkUp { ns: ns.clone(), ifname: vx.name.clone() },
                    undo: Action::LinkDown { ns, ifname: vx.name.clone() },
                    why: format!("{} carries every packet to the other nodes' pods", vx.name),
                }]);
            }
            None if other_nodes_device(ctx, node).is_some() => {
                return Remedy::NoSafeFix(format!("{} has no VXLAN device at all: flanneld must create it (restart flannel on that node)", ctx.node_name(node)))
            }
            _ => {}
        }
    }
    Remedy::NoSafeFix("the VXLAN devices are up now".into())
}

/// The other node of the pair and its VXLAN device's name, when it has one.
fn other_nodes_device(ctx: &Ctx, node: &crate::state::NsState) -> Option<(String, String)> {
    let other = ctx.nodes().into_iter().find(|n| n.inode != node.inode)?;
    ctx.vxlan_dev(other).map(|vx| (ctx.node_name(other), vx.name.clone()))
}
