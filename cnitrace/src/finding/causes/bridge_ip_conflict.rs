//! bridge-ip-conflict: the pods' bridge does not hold the pods' gateway address (it holds another one):
//! the pods' ARP for their gateway goes unanswered, and the CNI plugin refuses new pods.

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::{
    finding::{Ctx, Diagnosis},
    state::in_prefix,
};

pub const CAUSE: Cause = Cause { id: "bridge-ip-conflict", layer: "bridge", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.routed() {
        return None;
    }
    let gw = ctx.gateway().or_else(|| ctx.any_pod_gateway())?;
    let node = ctx.src_node()?;
    let br = ctx.pods_bridge(node)?;
    if node.addrs_of(br.ifindex).any(|a| a.addr == gw) {
        return None;
    }
    let pod_net = ctx.src_pod()?.addrs.iter().find(|a| a.addr == ctx.src_ip())?;
    let held: Vec<String> = node.addrs_of(br.ifindex).map(|a| format!("{}/{}", a.addr, a.prefix)).collect();
    let outside = node.addrs_of(br.ifindex).any(|a| !in_prefix(a.addr, pod_net.addr, pod_net.prefix));
    let mut facts = vec![
        format!("the pods' gateway is {gw} ({} routes through it)", ctx.src_name()),
        format!("{} on {} holds {}", br.name, ctx.node_name(node), if held.is_empty() { "no address".into() } else { held.join(", ") }),
    ];
    if outside {
        facts.push(format!("that is outside the pods' subnet {}/{}", pod_net.addr, pod_net.prefix));
    }
    if !ctx.trace.arp_reply_from(gw) {
        facts.push(format!("nobody answered ARP for {gw}"));
    }
    facts.push(format!("new pods fail too: the CNI bridge plugin refuses a {} whose address differs from {gw}", br.name));
    Some(Diagnosis {
        explanation: format!(
            "{} on {} does not hold the pods' gateway {gw}{}: pods cannot reach anything beyond their own subnet",
            br.name,
            ctx.node_name(node),
            if held.is_empty() { String::new() } else { format!(" (it holds {})", held.join(", ")) }
        ),
        facts,
        hop: Some((ctx.node_name(node), br.name.clone())),
    })
}

/// Give the bridge the pods' gateway address and take the wrong one away (undo: the reverse).
fn fix(ctx: &Ctx) -> Remedy {
    let (Some(node), Some(pod)) = (ctx.src_node(), ctx.src_pod()) else { return Remedy::NoSafeFix("no node state".into()) };
    let Some(gw) = ctx.gateway().or_else(|| ctx.any_pod_gateway()) else {
        return Remedy::NoSafeFix("the pod has no gateway route to learn the gateway address from".into());
    };
    let Some(br) = ctx.pods_bridge(node) else { return Remedy::NoSafeFix("no pods' bridge".into()) };
    let Some(pod_addr) = pod.addrs.iter().find(|a| a.addr == ctx.src_ip()) else { return Remedy::NoSafeFix("no pod address".into()) };
    let ns = Target::of(node);
    let mut steps = vec![Step {
        action: Action::AddrAdd { ns: ns.clone(), ifname: br.name.clone(), addr: gw, prefix: pod_addr.prefix, broadcast: Some(broadcast_of(gw, pod_addr.prefix)) },
        undo: Action::AddrDel { ns: ns.clone(), ifname: br.name.clone(), addr: gw, prefix: pod_addr.prefix },
        why: format!("the pods route through {gw}: it belongs on {}", br.name),
    }];
    for a in node.addrs_of(br.ifindex).filter(|a| !in_prefix(a.addr, pod_addr.addr, pod_addr.prefix)) {
        steps.push(Step {
            action: Action::AddrDel { ns: ns.clone(), ifname: br.name.clone(), addr: a.addr, prefix: a.prefix },
            undo: Action::AddrAdd { ns: ns.clone(), ifname: br.name.clone(), addr: a.addr, prefix: a.prefix, broadcast: a.broadcast },
            why: format!("{}/{} is outside the pods' subnet; the CNI plugin refuses new pods while it is there", a.addr, a.prefix),
        });
    }
    Remedy::Steps(steps)
}

/// The subnet's broadcast address, as the CNI bridge plugin gives the gateway.
fn broadcast_of(addr: std::net::Ipv4Addr, prefix: u8) -> std::net::Ipv4Addr {
    let host_bits = u32::MAX.checked_shr(prefix as u32).unwrap_or(0);
    std::net::Ipv4Addr::from(u32::from(addr) | host_bits)
}
