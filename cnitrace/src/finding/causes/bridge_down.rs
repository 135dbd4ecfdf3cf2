//! bridge-down: the pods' bridge (cni0) is administratively down; frames die at its ingress.

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "bridge-down", layer: "bridge", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    for node in ctx.nodes() {
        let Some(br) = ctx.pods_bridge(node) else { continue };
        if br.admin_up {
            continue;
        }
        let mut facts = vec![format!("{} on {} is administratively down (oper state {})", br.name, ctx.node_name(node), br.oper)];
        if let Some(d) = ctx.trace.first_drop().and_then(|d| d.drop.as_ref()) {
            if d.says("BRIDGE_INGRESS_STP_STATE", &["br_handle_frame"]) {
                facts.push(format!("frames arriving on its ports are dropped by {} (a down bridge forwards nothing)", d.function));
            }
        }
        return Some(Diagnosis {
            explanation: format!("the pods' bridge {} on {} is down: it drops every frame its ports receive", br.name, ctx.node_name(node)),
            facts,
            hop: Some((ctx.node_name(node), br.name.clone())),
        });
    }
    None
}

/// Bring the bridge up (undo: down again).
fn fix(ctx: &Ctx) -> Remedy {
    for node in ctx.nodes() {
        let Some(br) = ctx.pods_bridge(node).filter(|b| !b.admin_up) else { continue };
        let ns = Target::of(node);
        return Remedy::Steps(vec![Step {
            action: Action::LinkUp { ns: ns.clone(), ifname: br.name.clone() },
            undo: Action::LinkDown { ns, ifname: br.name.clone() },
            why: format!("{} is the pods' bridge on {}", br.name, ctx.node_name(node)),
        }]);
    }
    Remedy::NoSafeFix("no down bridge found any more".into())
}
