//! mtu-mismatch: the pod sends frames larger than the VXLAN path can carry (pod MTU above flannel.1's).

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "mtu-mismatch", layer: "link", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let pod = ctx.src_pod()?;
    let eth = ctx.pod_if(pod, ctx.src_ip())?;
    let path_mtu = if ctx.cross_node() { ctx.src_node().and_then(|n| ctx.vxlan_dev(n)).map(|v| v.mtu) } else { None }?;
    let drop_says = ctx.trace.first_drop().and_then(|d| d.drop.as_ref()).is_some_and(|d| d.says("PKT_TOO_BIG", &["ip_forward"]));
    let icmp_says = ctx.probe.icmp_errors.iter().any(|e| e.contains("fragmentation needed"));
    let small_ok_big_lost = ctx.probe.answered_each.first() == Some(&true) && ctx.probe.answered_each.iter().any(|a| !a);
    if eth.mtu <= path_mtu || !(drop_says || icmp_says || small_ok_big_lost) {
        return None;
    }
    let mut facts = vec![
        format!("{} {} MTU {} > {} MTU {path_mtu} on the way", ctx.src_name(), eth.name, eth.mtu, ctx.vxlan_dev(ctx.src_node()?)?.name),
    ];
    if small_ok_big_lost {
        facts.push(format!("small probes got through, the {}-byte one did not", ctx.probe.sizes.last().copied().unwrap_or(0)));
    }
    Some(Diagnosis {
        explanation: format!(
            "{}'s MTU {} is larger than the VXLAN path carries ({path_mtu}): full-size packets cannot cross to the other node",
            ctx.src_name(),
            eth.mtu
        ),
        facts,
        hop: None,
    })
}

/// Pod and host veth MTU down to what the VXLAN path carries (undo: the old MTU).
fn fix(ctx: &Ctx) -> Remedy {
    let (Some(pod), Some(node)) = (ctx.src_pod(), ctx.src_node()) else { return Remedy::NoSafeFix("no pod or node state".into()) };
    let Some(vx) = ctx.vxlan_dev(node) else { return Remedy::NoSafeFix("no VXLAN device".into()) };
    let mut steps = Vec::new();
    if let Some(eth) = ctx.pod_if(pod, ctx.src_ip()).filter(|l| l.mtu > vx.mtu) {
        let ns = Target::of(pod);
        steps.push(Step {
            action: Action::Mtu { ns: ns.clone(), ifname: eth.name.clone(), mtu: vx.mtu },
            undo: Action::Mtu { ns, ifname: eth.name.clone(), mtu: eth.mtu },
            why: format!("{} carries {} bytes", vx.name, vx.mtu),
        });
    }
    if let Some(host) = ctx.src_host_veth().filter(|l| l.mtu > vx.mtu) {
        let ns = Target::of(node);
        steps.push(Step {
            action: Action::Mtu { ns: ns.clone(), ifname: host.name.clone(), mtu: vx.mtu },
            undo: Action::Mtu { ns, ifname: host.name.clone(), mtu: host.mtu },
            why: "both ends of the veth agree".into(),
        });
    }
    if steps.is_empty() { Remedy::NoSafeFix("the MTUs fit now".into()) } else { Remedy::Steps(steps) }
}
