//! kube-proxy-rules-missing: the node that should translate a Service has no rule for it (kube-proxy not
//! running there, cleaned up, or not synced), so its traffic goes out untranslated. kube-proxy's own
//! restart is the fix; cnitrace never writes NAT rules by hand.

use super::Cause;
use crate::finding::{Ctx, Diagnosis};
use crate::plan::Remedy;

pub const CAUSE: Cause = Cause { id: "kube-proxy-rules-missing", layer: "service", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let sp = ctx.states.service.as_ref()?;
    if sp.service.is_some() || sp.ipvs || ctx.translated_to_endpoint() {
        return None;
    }
    let node = &sp.nat_node_name;
    let api_name = ctx.states.by_inode.get(&sp.nat_node).map(|n| ctx.node_name(n)).unwrap_or_else(|| node.clone());
    let mut facts = Vec::new();
    let from_api = ctx.states.cluster.as_ref().and_then(|c| c.service_with_ip(*sp.asked.ip()));
    let known = match (sp.elsewhere.first(), from_api) {
        (_, Some(s)) => {
            facts.push(format!("the API has Service {} at {} (selector {})", s.full_name(), sp.asked, s.selector_text()));
            format!("Service {}", s.full_name())
        }
        (Some((other, s)), None) => {
            facts.push(format!("{other}'s kube-proxy rules ({}) have Service {} at {}", s.backend, s.name, sp.asked));
            format!("Service {}", s.name)
        }
        (None, None) if sp.left_over.is_some() => format!("Service {}", sp.name()),
        (None, None) => {
            facts.push(format!("{} lies in the Service range kube-proxy's rules name", sp.asked.ip()));
            format!("{} (in the Service range)", sp.asked)
        }
    };
    let why = if let Some(l) = &sp.left_over {
        facts.push(format!(
            "{node}'s {} still holds kube-proxy's chain {} for Service {} ({}:{}{}), but {}",
            l.backend,
            l.chain,
            l.name,
            l.cluster_ip,
            l.port,
            l.node_port.map(|p| format!(", NodePort {p}")).unwrap_or_default(),
            l.unreachable
        ));
        format!("kube-proxy's rules on {node} are half gone ({}: {}); kube-proxy stopped partway through a cleanup or a sync", l.backend, l.unreachable)
    } else if sp.kube_proxy.is_empty() {
        facts.push(format!("{node} has no KUBE-SERVICES chain in iptables-nft or iptables-legacy and no table ip kube-proxy"));
        format!("{node} has none of kube-proxy's rules (kube-proxy is not running there, or was cleaned up)")
    } else {
        facts.push(format!("kube-proxy's rules on {node} are in {} but name no {}", sp.kube_proxy.join(" and "), sp.asked));
        format!("kube-proxy's rules on {node} ({}) have no rule for it (kube-proxy has not synced it)", sp.kube_proxy.join(", "))
    };
    match ctx.states.cluster.as_ref().map(|c| c.pods.iter().find(|p| p.app.as_deref() == Some("kube-proxy") && p.node.as_deref() == Some(api_name.as_str()))) {
        Some(Some(p)) => facts.push(format!(
            "kube-proxy's pod on {api_name}: {} ({}{}{})",
            p.full_name(),
            p.phase,
            if p.ready { ", Ready" } else { ", not Ready" },
            p.waiting.as_ref().map(|w| format!(", waiting: {w}, {} restarts", p.restarts)).unwrap_or_default()
        ) + &p.last_log.as_ref().map(|l| format!("; its log: {l}")).unwrap_or_default()),
        Some(None) => facts.push(format!("the API shows no kube-proxy pod on {api_name}")),
        None => {}
    }
    Some(Diagnosis {
        explanation: format!("{} is not translated on {node}: {why}; its traffic leaves the node still addressed to the Service", known),
        facts,
        hop: Some((node.clone(), ctx.trace.events.iter().rev().find(|e| e.where_ == *node && !e.ifname.is_empty()).map(|e| e.ifname.clone()).unwrap_or_default())),
    })
}

fn fix(ctx: &Ctx) -> Remedy {
    let Some(sp) = ctx.states.service.as_ref() else { return Remedy::NoSafeFix("no Service in this trace".into()) };
    let node_name = &sp.nat_node_name;
    // A kube-proxy that is crashing would crash again: what it says is the repair, not a restart.
    let api_name = ctx.states.by_inode.get(&sp.nat_node).map(|n| ctx.node_name(n)).unwrap_or_else(|| node_name.clone());
    if let Some(p) = ctx.states.cluster.as_ref().and_then(|c| c.pods.iter().find(|p| p.app.as_deref() == Some("kube-proxy") && p.node.as_deref() == Some(api_name.as_str()) && !p.ready)) {
        return Remedy::NoSafeFix(format!(
            "kube-proxy on {api_name} is not Ready ({}): restarting it would not help; its log says what stops it{}",
            p.state(),
            p.last_log.as_ref().map(|l| format!(": {l}")).unwrap_or_default()
        ));
    }
    if let Some(node) = ctx.states.by_inode.get(&sp.nat_node) {
        if let Some(r) = super::restart_daemon(ctx, node, "kube-proxy", &format!("kube-proxy's rules for {} are missing on {node_name}", sp.asked)) {
            return r;
        }
    }
    Remedy::NoSafeFix(format!(
        "kube-proxy writes these rules and cnitrace never writes NAT rules by hand: restart kube-proxy on {node_name} \
         (kubectl -n kube-system delete pod -l k8s-app=kube-proxy --field-selector spec.nodeName={node_name}) and check its log"
    ))
}
