//! neighbor-stale: the source holds a neighbour entry for its next hop with a wrong MAC; frames go to a
//! MAC nobody has, are flooded, and die as OTHERHOST where they land.

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "neighbor-stale", layer: "neighbour", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let pod = ctx.src_pod()?;
    let eth = ctx.pod_if(pod, ctx.src_ip())?;
    let (next_hop, real_mac, owner) = match ctx.gateway() {
        None => {
            let dst_pod = ctx.dst_pod()?;
            let deth = ctx.pod_if(dst_pod, ctx.dst_ip())?;
            (ctx.dst_ip(), deth.mac.clone(), format!("{}'s {}", ctx.dst_name(), deth.name))
        }
        Some(gw) => {
            let node = ctx.src_node()?;
            let br = ctx.pods_bridge(node)?;
            (gw, br.mac.clone(), format!("{} on {}", br.name, ctx.node_name(node)))
        }
    };
    let entry = pod.neigh(eth.ifindex, next_hop)?;
    let mac = entry.mac.as_deref()?;
    if mac == real_mac || entry.state == "failed" || entry.state == "incomplete" {
        return None;
    }
    let mut facts = vec![
        format!("{} has a {} neighbour entry {next_hop} lladdr {mac} on {}", ctx.src_name(), entry.state, eth.name),
        format!("{next_hop} is {owner}, whose MAC is {real_mac}"),
    ];
    if ctx.trace.first_drop().and_then(|d| d.drop.as_ref()).is_some_and(|d| d.says("OTHERHOST", &["ip_rcv_core"])) {
        facts.push("the frames reached a host whose MAC they do not carry and were dropped as OTHERHOST".into());
    }
    Some(Diagnosis {
        explanation: format!(
            "{}'s neighbour entry for {next_hop} points at {mac}, not at {real_mac}: its frames go to nobody",
            ctx.src_name()
        ),
        facts,
        hop: Some((ctx.src_name().to_string(), eth.name.clone())),
    })
}

/// Delete the wrong entry: the kernel resolves the address again (undo: the entry as it was, permanent).
fn fix(ctx: &Ctx) -> Remedy {
    let Some(pod) = ctx.src_pod() else { return Remedy::NoSafeFix("no source pod state".into()) };
    let Some(eth) = ctx.pod_if(pod, ctx.src_ip()) else { return Remedy::NoSafeFix("no source interface".into()) };
    let next_hop = ctx.gateway().unwrap_or(ctx.dst_ip());
    let Some(entry) = pod.neigh(eth.ifindex, next_hop) else { return Remedy::NoSafeFix("the entry is gone already".into()) };
    let Some(mac) = entry.mac.clone() else { return Remedy::NoSafeFix("the entry has no address".into()) };
    let ns = Target::of(pod);
    Remedy::Steps(vec![Step {
        action: Action::NeighDel { ns: ns.clone(), ifname: eth.name.clone(), ip: next_hop },
        undo: Action::NeighSet { ns, ifname: eth.name.clone(), ip: next_hop, mac },
        why: format!("the entry for {next_hop} points at the wrong MAC; ARP will find the right one"),
    }])
}
