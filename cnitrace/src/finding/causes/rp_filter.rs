//! rp-filter: strict reverse-path filtering dropped a packet whose source the node would route back
//! out of another interface.

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "rp-filter", layer: "routing", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let d = ctx.trace.first_drop()?;
    let info = d.drop.as_ref()?;
    if !info.says("IP_RPFILTER", &["ip_rcv_finish_core"]) {
        return None;
    }
    let node = ctx.ns(d.netns)?;
    let level = node.rp_filter(&d.ifname);
    let src = d.packet.as_ref().map(|p| p.outer.as_ref().map(|o| o.src).unwrap_or(p.src))?;
    let back = node.route_to(src);
    let back_if = back.and_then(|r| r.oif).map(|o| node.ifname(o)).unwrap_or_else(|| "nowhere".into());
    Some(Diagnosis {
        explanation: format!(
            "strict rp_filter on {} {} dropped a packet from {src}: the route back to {src} leaves by {back_if}, not by {}",
            ctx.node_name(node),
            d.ifname,
            d.ifname
        ),
        facts: vec![
            format!("rp_filter on {} {} = {level} (all = {})", ctx.node_name(node), d.ifname, node.sysctls.rp_filter.get("all").copied().unwrap_or(0)),
            format!("route to {src}: {}", back.map(|r| format!("{}/{} via {:?} dev {back_if}", r.dst, r.prefix, r.gateway)).unwrap_or_else(|| "none".into())),
        ],
        hop: None,
    })
}

/// Loose mode (2) where strict mode (1) is set: "all" and the receiving interface (undo: the old values).
fn fix(ctx: &Ctx) -> Remedy {
    let Some(d) = ctx.trace.first_drop() else { return Remedy::NoSafeFix("no rp_filter drop".into()) };
    let Some(node) = ctx.ns(d.netns) else { return Remedy::NoSafeFix("the node's state is missing".into()) };
    let ns = Target::of(node);
    let mut steps = Vec::new();
    for name in ["all", d.ifname.as_str()] {
        let Some(&old) = node.sysctls.rp_filter.get(name) else { continue };
        if old != 1 {
            continue;
        }
        let key = format!("net.ipv4.conf.{name}.rp_filter");
        steps.push(Step {
            action: Action::Sysctl { ns: ns.clone(), key: key.clone(), value: "2".into() },
            undo: Action::Sysctl { ns: ns.clone(), key, value: old.to_string() },
            why: format!("loose reverse-path filtering on {name}: the node routes asymmetrically over its two links"),
        });
    }
    if steps.is_empty() { Remedy::NoSafeFix("no strict rp_filter left".into()) } else { Remedy::Steps(steps) }
}
