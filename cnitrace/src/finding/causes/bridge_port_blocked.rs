//! bridge-port-blocked: a pod's bridge port is not in the forwarding state (STP state).

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "bridge-port-blocked", layer: "bridge", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    for (name, node, host) in ctx.host_sides() {
        let (Some(node), Some(host)) = (node, host) else { continue };
        let Some(state) = host.port_state.as_deref() else { continue };
        if state == "forwarding" {
            continue;
        }
        let bridge = host.master.and_then(|m| node.link(m)).map(|b| b.name.clone()).unwrap_or_default();
        return Some(Diagnosis {
            explanation: format!("{bridge}'s port {} (towards {name}) is in state {state}: the bridge neither forwards to it nor from it", host.name),
            facts: vec![format!("bridge port {} on {}: state {state}", host.name, ctx.node_name(node))],
            hop: Some((ctx.node_name(node), host.name.clone())),
        });
    }
    None
}

/// Put the port back to forwarding (undo: the state it had).
fn fix(ctx: &Ctx) -> Remedy {
    for (_, node, host) in ctx.host_sides() {
        let (Some(node), Some(host)) = (node, host) else { continue };
        let Some(state) = host.port_state.clone().filter(|s| s != "forwarding") else { continue };
        let ns = Target::of(node);
        return Remedy::Steps(vec![Step {
            action: Action::PortState { ns: ns.clone(), ifname: host.name.clone(), state: "forwarding".into() },
            undo: Action::PortState { ns, ifname: host.name.clone(), state },
            why: "a pod's bridge port must forward (cni0 runs without STP)".into(),
        }]);
    }
    Remedy::NoSafeFix("no blocked port found any more".into())
}
