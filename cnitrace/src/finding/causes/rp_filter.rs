//! rp-filter: strict reverse-path filtering dropped a packet whose source the node would route back
//! out of another interface.

use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "rp-filter", layer: "routing", hop_from_state: false, detect };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let d = ctx.trace.first_drop()?;
    let info = d.drop.as_ref()?;
    if info.reason != "IP_RPFILTER" {
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
