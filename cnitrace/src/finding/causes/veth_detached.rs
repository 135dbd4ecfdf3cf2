//! veth-detached: the host end of a pod's veth is no port of any bridge (what deleting and recreating
//! cni0 leaves behind): ARP for the pod reaches the bridge and goes nowhere.

use crate::plan::{self, Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "veth-detached", layer: "bridge", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let sides = [
        (ctx.dst_name(), ctx.dst_ip(), ctx.dst_node(), ctx.dst_host_veth()),
        (ctx.src_name(), ctx.src_ip(), ctx.src_node(), ctx.src_host_veth()),
    ];
    for (name, ip, node, host) in sides {
        let (Some(node), Some(host)) = (node, host) else { continue };
        // A host end with an address of its own is routed (a point-to-point link, CNI's ptp), not a
        // bridge port that lost its bridge.
        if host.master.is_some() || node.addrs.iter().any(|a| a.ifindex == host.ifindex) {
            continue;
        }
        let bridge = ctx.pods_bridge(node).map(|b| b.name.clone()).unwrap_or_else(|| "the pods' bridge".into());
        let mut facts = vec![format!("{}, the host end of {name}'s eth0 on {}, has no master", host.name, ctx.node_name(node))];
        let node_name = ctx.node_name(node);
        if ctx.trace.arp_request_seen(ip, &node_name, &bridge) {
            facts.push(format!("the ARP request for {ip} reached {bridge} but was never sent to {}", host.name));
        }
        if !ctx.trace.arp_reply_from(ip) {
            facts.push(format!("no ARP reply from {ip}: {name} never heard the question"));
        }
        if ctx.trace.first_drop().and_then(|d| d.drop.as_ref()).is_some_and(|d| d.says("NEIGH_FAILED", &["neigh_invalidate", "arp_error_report"])) {
            facts.push("the source gave up resolving the address and dropped its queued packet (Destination Host Unreachable)".into());
        }
        return Some(Diagnosis {
            explanation: format!(
                "{} is not attached to {bridge}, so {bridge} cannot reach {name}: ARP for {ip} is never answered",
                host.name
            ),
            facts,
            hop: Some((node_name, host.name.clone())),
        });
    }
    None
}

/// Enslave the host veth to the pods' bridge again (undo: release it), keeping the bridge's address.
fn fix(ctx: &Ctx) -> Remedy {
    for (_, node, host) in ctx.host_sides() {
        let (Some(node), Some(host)) = (node, host) else { continue };
        if host.master.is_some() {
            continue;
        }
        let Some(br) = ctx.pods_bridge(node) else {
            return Remedy::NoSafeFix(format!("{} has no pods' bridge to attach {} to", ctx.node_name(node), host.name));
        };
        let ns = Target::of(node);
        let keep = plan::keep_bridge_address(&ns, node, br, host);
        return Remedy::Steps(keep.into_iter().chain([Step {
            action: Action::SetMaster { ns: ns.clone(), ifname: host.name.clone(), master: Some(br.name.clone()) },
            undo: Action::SetMaster { ns, ifname: host.name.clone(), master: None },
            why: format!("{} must be a port of {} for the pod to be reachable", host.name, br.name),
        }]).collect());
    }
    Remedy::NoSafeFix("no detached veth found any more".into())
}
