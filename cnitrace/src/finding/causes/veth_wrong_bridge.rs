//! veth-wrong-bridge: the host end of a pod's veth is a port of another bridge than the pods' one.

use crate::plan::{self, Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "veth-wrong-bridge", layer: "bridge", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    for (name, node, host) in ctx.host_sides() {
        let (Some(node), Some(host)) = (node, host) else { continue };
        let Some(master) = host.master.and_then(|m| node.link(m)) else { continue };
        let Some(pods) = ctx.pods_bridge(node) else { continue };
        if master.ifindex == pods.ifindex {
            continue;
        }
        return Some(Diagnosis {
            explanation: format!(
                "{}, the host end of {name}'s eth0, is a port of {} instead of {}: the pods' bridge cannot reach {name}",
                host.name, master.name, pods.name
            ),
            facts: vec![
                format!("{} master = {} on {}", host.name, master.name, ctx.node_name(node)),
                format!("the other pods hang off {}", pods.name),
            ],
            hop: Some((ctx.node_name(node), master.name.clone())),
        });
    }
    None
}

/// Move the host veth back to the pods' bridge (undo: back to the bridge it was on).
fn fix(ctx: &Ctx) -> Remedy {
    for (_, node, host) in ctx.host_sides() {
        let (Some(node), Some(host)) = (node, host) else { continue };
        let (Some(master), Some(pods)) = (host.master.and_then(|m| node.link(m)), ctx.pods_bridge(node)) else { continue };
        if master.ifindex == pods.ifindex {
            continue;
        }
        let ns = Target::of(node);
        // Both bridges keep their addresses: the one the veth joins and the one it leaves.
        let keep = [pods, master].into_iter().filter_map(|br| plan::keep_bridge_address(&ns, node, br, host)).collect::<Vec<_>>();
        return Remedy::Steps(keep.into_iter().chain([Step {
            action: Action::SetMaster { ns: ns.clone(), ifname: host.name.clone(), master: Some(pods.name.clone()) },
            undo: Action::SetMaster { ns, ifname: host.name.clone(), master: Some(master.name.clone()) },
            why: format!("{} belongs on {}, not on {}", host.name, pods.name, master.name),
        }]).collect());
    }
    Remedy::NoSafeFix("no veth on a wrong bridge found any more".into())
}
