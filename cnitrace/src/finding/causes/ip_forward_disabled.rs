//! ip-forward-disabled: net.ipv4.ip_forward = 0 on a node the pair's traffic must be routed through.

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "ip-forward-disabled", layer: "routing", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.routed() {
        return None;
    }
    let nodes = if ctx.cross_node() { ctx.nodes() } else { ctx.src_node().into_iter().collect() };
    let node = nodes.into_iter().find(|n| n.sysctls.ip_forward == Some(0))?;
    let mut facts = vec![format!("net.ipv4.ip_forward = 0 on {}", ctx.node_name(node))];
    if let Some(d) = ctx.trace.first_drop().and_then(|d| d.drop.as_ref()) {
        if d.says("IP_INADDRERRORS", &["ip_error"]) {
            facts.push(format!("{} refused to forward: the node is not a router", d.function));
        }
    }
    Some(Diagnosis {
        explanation: format!("{} does not forward IPv4 (ip_forward = 0): pod traffic that must be routed dies at its pod bridge", ctx.node_name(node)),
        facts,
        hop: ctx.pods_bridge(node).map(|b| (ctx.node_name(node), b.name.clone())),
    })
}

fn fix(ctx: &Ctx) -> Remedy {
    let steps: Vec<Step> = ctx
        .nodes()
        .into_iter()
        .filter(|n| n.sysctls.ip_forward == Some(0))
        .map(|n| {
            let ns = Target::of(n);
            Step {
                action: Action::Sysctl { ns: ns.clone(), key: "net.ipv4.ip_forward".into(), value: "1".into() },
                undo: Action::Sysctl { ns, key: "net.ipv4.ip_forward".into(), value: "0".into() },
                why: format!("{} must route pod traffic", ctx.node_name(n)),
            }
        })
        .collect();
    if steps.is_empty() { Remedy::NoSafeFix("ip_forward is on everywhere now".into()) } else { Remedy::Steps(steps) }
}
