//! vxlan-down: the node's VXLAN device (flannel.1) is down or missing; the kernel drops the routes
//! through it, so cross-node traffic has no way out.

use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "vxlan-down", layer: "vxlan", hop_from_state: true, detect };

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
