//! veth-down: one end of a pod's veth pair is down (the pod's eth0 or the host end on the node).

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "veth-down", layer: "link", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let sides = [
        (ctx.src_name(), ctx.src_pod(), ctx.src_ip(), ctx.src_node(), ctx.src_host_veth()),
        (ctx.dst_name(), ctx.dst_pod(), ctx.dst_ip(), ctx.dst_node(), ctx.dst_host_veth()),
    ];
    for (name, pod, ip, node, host) in sides {
        if let Some(eth) = pod.and_then(|p| ctx.pod_if(p, ip)) {
            if !eth.admin_up {
                return Some(Diagnosis {
                    explanation: format!("{name}'s {} (the pod end of its veth) is down: nothing goes in or out of the pod", eth.name),
                    facts: vec![format!("{name} {}: admin down, oper {}", eth.name, eth.oper), arp_fact(ctx, ip)],
                    hop: Some((name.to_string(), eth.name.clone())),
                });
            }
        }
        if let (Some(host), Some(node)) = (host, node) {
            if !host.admin_up {
                return Some(Diagnosis {
                    explanation: format!(
                        "{}, the host end of {name}'s eth0 on {}, is down: the bridge cannot deliver to the pod",
                        host.name,
                        ctx.node_name(node)
                    ),
                    facts: vec![format!("{} on {}: admin down, oper {}", host.name, ctx.node_name(node), host.oper), arp_fact(ctx, ip)],
                    hop: Some((ctx.node_name(node), host.name.clone())),
                });
            }
        }
    }
    None
}

fn arp_fact(ctx: &Ctx, ip: std::net::Ipv4Addr) -> String {
    if ctx.trace.arp_reply_from(ip) {
        format!("{ip} still answered ARP")
    } else {
        format!("no ARP reply from {ip} was seen")
    }
}

/// Bring up the end that is down, in its own namespace. A pod end that went down lost its routes with
/// it (the kernel flushes the routes through a link it takes down; only the connected route comes back
/// with the link): they are restored as the CNI plugin made them, or the pod reaches its own subnet and
/// nothing else (seen: the pair verified, the pod cut from the other node and the outside).
fn fix(ctx: &Ctx) -> Remedy {
    let sides = [
        (ctx.src_pod(), ctx.src_ip(), ctx.src_node(), ctx.src_host_veth()),
        (ctx.dst_pod(), ctx.dst_ip(), ctx.dst_node(), ctx.dst_host_veth()),
    ];
    let mut steps = Vec::new();
    for (pod, ip, node, host) in sides {
        if let Some(pod) = pod {
            if let Some(eth) = ctx.pod_if(pod, ip).filter(|l| !l.admin_up) {
                let ns = Target::of(pod);
                steps.push(Step {
                    action: Action::LinkUp { ns: ns.clone(), ifname: eth.name.clone() },
                    undo: Action::LinkDown { ns, ifname: eth.name.clone() },
                    why: format!("the pod end of the veth is down in {}", pod.name),
                });
                if let Some(node) = node {
                    match super::pod_route_missing::cni_routes(ctx, pod, ip, node) {
                        Ok(routes) => steps.extend(routes.into_iter().map(|s| Step { why: format!("{} (the kernel removed it with {})", s.why, eth.name), ..s })),
                        Err(why) => return Remedy::NoSafeFix(format!("{} is down and its routes cannot be rebuilt: {why}", eth.name)),
                    }
                }
            }
        }
        if let (Some(node), Some(host)) = (node, host) {
            if !host.admin_up {
                let ns = Target::of(node);
                steps.push(Step {
                    action: Action::LinkUp { ns: ns.clone(), ifname: host.name.clone() },
                    undo: Action::LinkDown { ns, ifname: host.name.clone() },
                    why: format!("the host end of the veth is down on {}", ctx.node_name(node)),
                });
            }
        }
    }
    if steps.is_empty() {
        Remedy::NoSafeFix("both ends are up now".into())
    } else {
        Remedy::Steps(steps)
    }
}
