//! pod-route-missing: the source pod has no route to the destination (its default/cluster routes are gone).

use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "pod-route-missing", layer: "routing", hop_from_state: true, detect };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let pod = ctx.src_pod()?;
    if pod.route_to(ctx.dst_ip()).is_some() {
        return None;
    }
    let eth = ctx.pod_if(pod, ctx.src_ip())?;
    let mut facts = vec![format!("{} has no route to {} (no default route, no cluster route)", ctx.src_name(), ctx.dst_ip())];
    let routes: Vec<String> = pod.routes.iter().filter(|r| r.table == 254).map(|r| format!("{}/{}", r.dst, r.prefix)).collect();
    facts.push(format!("its main table holds only: {}", if routes.is_empty() { "nothing".into() } else { routes.join(", ") }));
    if ctx.trace.route_failures(ctx.dst_ip()).next().is_some() {
        facts.push("the kernel's route lookup for the destination failed in the pod".into());
    }
    Some(Diagnosis {
        explanation: format!(
            "{} cannot send to {}: the pod's routing table has no route for it, so nothing leaves {}",
            ctx.src_name(),
            ctx.dst_ip(),
            eth.name
        ),
        facts,
        hop: Some((ctx.src_name().to_string(), eth.name.clone())),
    })
}
