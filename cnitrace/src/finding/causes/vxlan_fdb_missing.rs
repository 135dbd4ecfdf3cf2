//! vxlan-fdb-missing: flannel.1 knows the remote VTEP's MAC but has no FDB entry saying which underlay
//! address owns it: vxlan_xmit has no target (NO_TX_TARGET).

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{ctx::OverlayLeg, Ctx, Diagnosis};

/// The overlay legs whose VTEP neighbour is known but has no FDB entry, with that VTEP's MAC.
fn missing<'a>(ctx: &Ctx<'a>) -> Vec<(OverlayLeg<'a>, String)> {
    ctx.overlay_legs()
        .into_iter()
        .filter_map(|leg| {
            let mac = leg.node.neigh(leg.vx.ifindex, leg.gw).and_then(|n| n.mac.clone())?;
            let known = leg.node.fdb.iter().any(|f| f.ifindex == leg.vx.ifindex && f.mac == mac && f.dst.is_some());
            (!known).then_some((leg, mac))
        })
        .collect()
}

pub const CAUSE: Cause = Cause { id: "vxlan-fdb-missing", layer: "vxlan", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.cross_node() {
        return None;
    }
    // The first leg whose VTEP has no FDB entry.
    let (OverlayLeg { node, gw, vx, .. }, mac) = missing(ctx).into_iter().next()?;
    let name = ctx.node_name(node);
    let mut facts = vec![
        format!("neighbour {gw} on {} is {mac}", vx.name),
        format!("{} on {name} has no FDB entry for {mac} (no underlay destination)", vx.name),
    ];
    if let Some(d) = ctx.trace.first_drop().and_then(|d| d.drop.as_ref()) {
        if d.says("NO_TX_TARGET", &["vxlan_xmit", "vxlan_xmit_one"]) {
            facts.push(format!("{} dropped the frame: no transmit target (NO_TX_TARGET)", d.function));
        }
    }
    Some(Diagnosis {
        explanation: format!("{} on {name} does not know which node owns VTEP {mac}: the encapsulated frame has no destination", vx.name),
        facts,
        hop: None,
    })
}

/// The FDB entry flannel writes: the VTEP's MAC lives at the remote node's underlay address (undo: removed).
fn fix(ctx: &Ctx) -> Remedy {
    let Some((OverlayLeg { node, to, vx, .. }, mac)) = missing(ctx).into_iter().next() else {
        return Remedy::NoSafeFix("the FDB entries are there now".into());
    };
    let Some(underlay) = ctx.remote_vtep(node, to).filter(|v| v.mac == mac).and_then(|v| v.underlay) else {
        return Remedy::NoSafeFix(format!("which node owns VTEP {mac} is not known on this host: flannel's node annotations (public-ip) are needed"));
    };
    let ns = Target::of(node);
    Remedy::Steps(vec![Step {
        action: Action::FdbAdd { ns: ns.clone(), ifname: vx.name.clone(), mac: mac.clone(), dst: underlay },
        undo: Action::FdbDel { ns, ifname: vx.name.clone(), mac: mac.clone(), dst: underlay },
        why: format!("VTEP {mac} is reached at {underlay} on the underlay"),
    }])
}
