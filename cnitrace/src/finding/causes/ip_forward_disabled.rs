//! ip-forward-disabled: net.ipv4.ip_forward = 0 on a node the pair's traffic must be routed through.

use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "ip-forward-disabled", layer: "routing", hop_from_state: false, detect };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.routed() {
        return None;
    }
    let nodes = if ctx.cross_node() { ctx.nodes() } else { ctx.src_node().into_iter().collect() };
    let node = nodes.into_iter().find(|n| n.sysctls.ip_forward == Some(0))?;
    let mut facts = vec![format!("net.ipv4.ip_forward = 0 on {}", ctx.node_name(node))];
    if let Some(d) = ctx.trace.first_drop().and_then(|d| d.drop.as_ref()) {
        if d.reason == "IP_INADDRERRORS" {
            facts.push(format!("{} refused to forward: the node is not a router", d.function));
        }
    }
    Some(Diagnosis {
        explanation: format!("{} does not forward IPv4 (ip_forward = 0): pod traffic that must be routed dies at its pod bridge", ctx.node_name(node)),
        facts,
        hop: ctx.pods_bridge(node).map(|b| (ctx.node_name(node), b.name.clone())),
    })
}
