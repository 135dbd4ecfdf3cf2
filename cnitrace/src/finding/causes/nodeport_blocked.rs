//! nodeport-blocked: a filter rule that is not kube-proxy's drops a NodePort's traffic on the node that
//! translates it (before kube-proxy's DNAT, or after it on the way to the endpoint).

use super::{netfilter, Cause};
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "nodeport-blocked", layer: "netfilter", detect, fix };

fn kube_proxys(h: &netfilter::Hit) -> bool {
    h.chain.starts_with("KUBE-") || h.nft_table == "kube-proxy"
}

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    let sp = ctx.states.service.as_ref()?;
    if !sp.node_port || !netfilter::is_netfilter_drop(ctx) {
        return None;
    }
    let d = ctx.trace.first_drop()?;
    if d.where_ != sp.nat_node_name {
        return None;
    }
    let hits = netfilter::hits(ctx);
    let rule = hits.iter().find(|h| !h.is_policy && !kube_proxys(h))?;
    let translated = ctx.translated_to_endpoint();
    Some(Diagnosis {
        explanation: format!(
            "a firewall rule on {} drops the NodePort traffic of Service {} ({}) {}: {} table {} chain {}: `{}`",
            sp.nat_node_name,
            sp.name(),
            sp.asked,
            if translated { "after kube-proxy's DNAT to the endpoint" } else { "before kube-proxy translates it" },
            rule.backend,
            rule.table,
            rule.chain,
            rule.rule
        ),
        facts: hits.iter().map(netfilter::describe).collect(),
        hop: None,
    })
}

/// The rule comes out only with --allow-rule-removal, as any rule someone wrote (undo: back in its place).
fn fix(ctx: &Ctx) -> crate::plan::Remedy {
    super::netfilter_rule_drop::remove_rule(ctx, |h| !kube_proxys(h))
}
