//! vxlan-down: the node's VXLAN device (flannel.1) is down or missing; the kernel drops the routes
//! through it, so cross-node traffic has no way out.

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "vxlan-down", layer: "vxlan", hop_from_state: true, detect, fix };

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
            None if node.links.iter().any(|l| l.name == "cni0") => {
                return Some(Diagnosis {
                    explanation: format!("{name} has no VXLAN device (flannel.1): it cannot reach the other nodes' pods"),
                    facts: vec![format!("no vxlan link on {name}")],
                    hop: Some((name, "flannel.1".into())),
                })
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
            None => return Remedy::NoSafeFix(format!("{} has no flannel.1 at all: flanneld must create it (restart flannel on that node)", ctx.node_name(node))),
            _ => {}
        }
    }
    Remedy::NoSafeFix("flannel.1 is up now".into())
}
