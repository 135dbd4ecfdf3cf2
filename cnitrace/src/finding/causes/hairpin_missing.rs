//! hairpin-missing: a pod reaches itself through its own Service; kube-proxy's DNAT sends the packet
//! back to it, out of the bridge port it came in by — which the bridge refuses unless that port is in
//! hairpin mode (the CNI bridge plugin's `hairpinMode`, the kubelet's hairpin-veth).

use super::Cause;
use crate::finding::{Ctx, Diagnosis};
use crate::plan::{Action, Remedy, Step, Target};

pub const CAUSE: Cause = Cause { id: "hairpin-missing", layer: "bridge", detect, fix };

/// The source pod's host veth on its bridge, with hairpin off, when the source reached itself through
/// a Service's DNAT.
fn port<'a>(ctx: &Ctx<'a>) -> Option<(&'a crate::state::NsState, &'a crate::state::Link)> {
    let sp = ctx.states.service.as_ref()?;
    let ep = sp.chosen.as_ref()?;
    if *ep.addr.ip() != ctx.src_ip() {
        return None;
    }
    let node = ctx.src_node()?;
    let veth = node.link(ctx.states.src_host_veth?)?;
    (veth.master.is_some() && veth.hairpin == Some(false)).then_some((node, veth))
}

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let (node, veth) = port(ctx)?;
    let sp = ctx.states.service.as_ref()?;
    let bridge = veth.master.and_then(|m| node.link(m)).map(|b| b.name.clone()).unwrap_or_else(|| "its bridge".into());
    let mut facts = vec![format!("{}'s port {} on {} has hairpin mode off", bridge, veth.name, ctx.node_name(node))];
    if let Some(d) = ctx.trace.first_drop().filter(|d| d.drop.as_ref().is_some_and(|i| i.function.starts_with("br_"))) {
        facts.push(format!("the bridge freed the translated packet on {} {} ({})", d.where_, d.ifname, d.drop.as_ref().map(|i| i.function.as_str()).unwrap_or("")));
    }
    Some(Diagnosis {
        explanation: format!(
            "{} reached its own Service {} and kube-proxy sent it back to itself ({}), but {bridge} does not send a frame out of the port it came in by: hairpin mode is off on {}",
            ctx.src_name(),
            sp.name(),
            sp.asked,
            veth.name
        ),
        facts,
        hop: Some((ctx.node_name(node), veth.name.clone())),
    })
}

fn fix(ctx: &Ctx) -> Remedy {
    let Some((node, veth)) = port(ctx) else { return Remedy::NoSafeFix("the port's hairpin mode is on now".into()) };
    let ns = Target::of(node);
    Remedy::Steps(vec![Step {
        action: Action::Hairpin { ns: ns.clone(), ifname: veth.name.clone(), on: true },
        undo: Action::Hairpin { ns, ifname: veth.name.clone(), on: false },
        why: format!("the CNI bridge plugin sets hairpin mode on pod ports (hairpinMode) so a pod can reach itself through its Service; {} lost it", veth.name),
    }])
}
