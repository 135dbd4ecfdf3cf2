//! service-no-endpoints: the Service selects no Ready pod; kube-proxy answers its traffic with a
//! rejection ("has no endpoints"). Nothing on the node is broken: no node fix.

use super::Cause;
use crate::finding::{Ctx, Diagnosis};
use crate::plan::Remedy;

pub const CAUSE: Cause = Cause { id: "service-no-endpoints", layer: "service", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let sp = ctx.states.service.as_ref()?;
    let svc = sp.service.as_ref()?;
    if !svc.endpoints.is_empty() || ctx.translated_to_endpoint() {
        return None;
    }
    let rule = svc.no_endpoints_rule.clone().unwrap_or_else(|| "no DNAT rule".into());
    let mut facts = vec![
        format!("kube-proxy on {} ({}) has no endpoint for {}: `{rule}`", sp.nat_node_name, svc.backend, svc.name),
        "kube-proxy rejects a Service without endpoints (ICMP port unreachable: the client sees \"connection refused\")".into(),
    ];
    // Why it has none, where the API says: what its selector matches and how those pods are.
    let mut why = "it selects no Ready pod".to_string();
    if let Some(s) = ctx.states.cluster.as_ref().and_then(|c| c.service_with_ip(*sp.asked.ip())) {
        if s.selector.is_empty() {
            why = "it has no selector, and nobody added endpoints by hand".into();
        } else if s.selected.is_empty() {
            why = format!("its selector {} matches no pod in namespace {}", s.selector_text(), s.namespace);
        } else {
            let not_ready: Vec<String> = s
                .selected
                .iter()
                .filter(|p| !p.ready)
                .map(|p| format!("{} ({}{}{})", p.full_name(), p.phase, p.waiting.as_ref().map(|w| format!(", waiting: {w}")).unwrap_or_default(), if p.restarts > 0 { format!(", {} restarts", p.restarts) } else { String::new() }))
                .collect();
            why = format!("its selector {} matches {} pod(s), none Ready: {}", s.selector_text(), s.selected.len(), not_ready.join(", "));
            // A pod that crashed says why in its log; one that runs but is not Ready fails its
            // readiness probe, which the kubelet sends from its node: that path, traced, says where.
            for p in s.selected.iter().filter(|p| !p.ready) {
                if let Some(line) = &p.last_log {
                    let previous = if p.restarts > 0 { " --previous" } else { "" };
                    facts.push(format!("{} crashed; its last line (kubectl -n {} logs {}{previous}): {line}", p.full_name(), p.namespace, p.name));
                    continue;
                }
                if p.waiting.is_some() || p.ip.is_none() {
                    continue;
                }
                if let Some(node) = &p.node {
                    facts.push(format!("{}'s readiness probe comes from its node: `cnitrace follow node/{node} {}` traces that path", p.full_name(), p.full_name()));
                }
            }
        }
        facts.push(format!("the API: Service {} selector {}: {}", s.full_name(), if s.selector.is_empty() { "none".into() } else { s.selector_text() }, why));
    }
    if let Some(d) = ctx.trace.first_drop().and_then(|d| d.drop.as_ref().map(|i| (d, i))).filter(|(_, i)| i.reason == "IP_INNOROUTES") {
        facts.push(format!(
            "the packet died at {} ({}) on {} before reaching that rule: the node has no route for {} (no default route); with one, the rejection answers",
            d.1.function, d.1.reason, d.0.where_, sp.asked.ip()
        ));
    }
    Some(Diagnosis {
        explanation: format!(
            "Service {} ({}) has no endpoints: {why}, so kube-proxy on {} does not translate its traffic but rejects it",
            svc.name, sp.asked, sp.nat_node_name
        ),
        facts,
        hop: None,
    })
}

fn fix(ctx: &Ctx) -> Remedy {
    let name = ctx.states.service.as_ref().map(|s| s.name()).unwrap_or_default();
    let (object, _) = name.split_once(':').unwrap_or((&name, ""));
    let (ns, svc) = object.split_once('/').unwrap_or(("default", object));
    Remedy::NoSafeFix(format!(
        "a Service without endpoints is not a node problem: its selector matches no Ready pod. See why: \
         kubectl -n {ns} get endpointslices -l kubernetes.io/service-name={svc}; kubectl -n {ns} describe service {svc} \
         (the selector), and the readiness of the pods it should select"
    ))
}
