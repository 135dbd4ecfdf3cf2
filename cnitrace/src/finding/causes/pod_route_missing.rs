//! pod-route-missing: the source pod has no route to the destination (its default/cluster routes are gone).

use crate::plan::{Action, Remedy, Step, Target};
use crate::state::{in_prefix, NsState};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "pod-route-missing", layer: "routing", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let pod = ctx.src_pod()?;
    if pod.route_to(ctx.sent_to()).is_some() {
        return None;
    }
    let eth = ctx.pod_if(pod, ctx.src_ip())?;
    let mut facts = vec![format!("{} has no route to {} (no default route, no cluster route)", ctx.src_name(), ctx.sent_to())];
    let routes: Vec<String> = pod.routes.iter().filter(|r| r.table == 254).map(|r| format!("{}/{}", r.dst, r.prefix)).collect();
    facts.push(format!("its main table holds only: {}", if routes.is_empty() { "nothing".into() } else { routes.join(", ") }));
    if ctx.trace.route_failures(ctx.sent_to()).next().is_some() {
        facts.push("the kernel's route lookup for the destination failed in the pod".into());
    }
    Some(Diagnosis {
        explanation: format!(
            "{} cannot send to {}: the pod's routing table has no route for it, so nothing leaves {}",
            ctx.src_name(),
            ctx.sent_to(),
            eth.name
        ),
        facts,
        hop: Some((ctx.src_name().to_string(), eth.name.clone())),
    })
}

/// The routes the CNI bridge plugin gives a pod: default and the cluster network via the gateway.
fn fix(ctx: &Ctx) -> Remedy {
    let (Some(pod), Some(node)) = (ctx.src_pod(), ctx.src_node()) else { return Remedy::NoSafeFix("no pod or node state".into()) };
    match cni_routes(ctx, pod, ctx.src_ip(), node) {
        Ok(steps) if steps.is_empty() => Remedy::NoSafeFix("the pod's routes are there now".into()),
        Ok(steps) => Remedy::Steps(steps),
        Err(why) => Remedy::NoSafeFix(why),
    }
}

/// The steps that give `pod` (address `ip`, on `node`) back the routes the CNI bridge plugin gave it —
/// default and the cluster network via the pod's gateway on the node's bridge — where they are missing.
/// Also what the kernel removes with a pod's eth0 when the link goes down (the veth-down repair).
pub(super) fn cni_routes(ctx: &Ctx, pod: &NsState, ip: std::net::Ipv4Addr, node: &NsState) -> Result<Vec<Step>, String> {
    let eth = ctx.pod_if(pod, ip).ok_or("no pod interface")?;
    let pod_addr = pod.addrs.iter().find(|a| a.addr == ip).ok_or("no pod address")?;
    let gw = ctx.pods_bridge(node).and_then(|b| node.addrs_of(b.ifindex).find(|a| in_prefix(a.addr, pod_addr.addr, pod_addr.prefix)).map(|a| a.addr));
    let gw = gw.ok_or("the node's bridge holds no gateway in the pod's subnet")?;
    let (net, len) = ctx.cluster_cidr();
    let ns = Target::of(pod);
    let mut steps = Vec::new();
    for (dst, prefix) in [(std::net::Ipv4Addr::UNSPECIFIED, 0u8), (net, len)] {
        if pod.routes.iter().any(|r| r.table == 254 && r.dst == dst && r.prefix == prefix) {
            continue;
        }
        let mk = |add: bool| {
            let (dst, prefix, gateway, ifname, onlink) = (dst, prefix, Some(gw), eth.name.clone(), false);
            if add {
                Action::RouteAdd { ns: ns.clone(), dst, prefix, gateway, ifname, onlink }
            } else {
                Action::RouteDel { ns: ns.clone(), dst, prefix, gateway, ifname, onlink }
            }
        };
        steps.push(Step { action: mk(true), undo: mk(false), why: format!("the CNI bridge plugin routes {dst}/{prefix} via the gateway {gw}") });
    }
    Ok(steps)
}
