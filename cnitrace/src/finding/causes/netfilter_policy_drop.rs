//! netfilter-policy-drop: a chain policy (FORWARD DROP, what Docker sets) dropped pod traffic and no rule
//! accepts the pod network before it.

use crate::plan::Remedy;
use super::{iptables_backend_conflict::pod_net_prefix, netfilter, Cause};
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "netfilter-policy-drop", layer: "netfilter", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    // A netfilter drop in the trace, or the ARP the source could not resolve dropped by a rule.
    let hits = netfilter::hits(ctx);
    if !netfilter::is_netfilter_drop(ctx) && hits.is_empty() {
        return None;
    }
    let h = hits.iter().find(|h| h.is_policy)?;
    let mut facts: Vec<String> = hits.iter().map(netfilter::describe).collect();
    let node = ctx.nodes().into_iter().find(|n| ctx.node_name(n) == h.node);
    if let Some(n) = node {
        if n.sysctls.bridge_nf_call_iptables == Some(1) && ctx.same_node() {
            facts.push(format!("net.bridge.bridge-nf-call-iptables = 1 on {}: bridged pod-to-pod frames go through iptables FORWARD too", h.node));
        }
        if n.rules.iptables_nft.as_deref().is_some_and(|d| d.contains(":FLANNEL-FWD")) {
            facts.push("the FLANNEL-FWD chain exists but FORWARD does not jump to it".into());
        }
    }
    Some(Diagnosis {
        explanation: format!(
            "{} chain {} policy {} on {} drops pod traffic: no rule accepts the pod network {}0.0/16 before the policy",
            h.backend,
            h.chain,
            h.verdict,
            h.node,
            pod_net_prefix(ctx)
        ),
        facts,
        hop: h.place.clone(),
    })
}

fn fix(ctx: &Ctx) -> Remedy {
    let hits = netfilter::hits(ctx);
    let Some(h) = hits.iter().find(|h| h.is_policy) else { return Remedy::NoSafeFix("no policy drop counted any more".into()) };
    let Some(node) = netfilter::node_of(ctx, h) else { return Remedy::NoSafeFix("the node's state is missing".into()) };
    if h.backend == "nft" {
        // A native nft chain's policy is someone's firewall: what to let through it is theirs to say.
        return Remedy::NoSafeFix(format!(
            "nft table {} chain {} on {} drops by its policy: add an accept rule for the pod's traffic before it (nft insert rule {} {} …) or change the policy; cnitrace does not rewrite a firewall's policy",
            h.table, h.chain, h.node, h.table, h.chain
        ));
    }
    netfilter::accept_pod_network(ctx, node, h.backend)
}
