//! iptables-backend-conflict: rules live in both iptables-legacy and iptables-nft; a policy in one
//! backend drops what the accept rules in the other one were meant to let through.

use crate::plan::Remedy;
use super::{netfilter, Cause};
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "iptables-backend-conflict", layer: "netfilter", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !netfilter::is_netfilter_drop(ctx) {
        return None;
    }
    let pod_net = pod_net_prefix(ctx);
    for h in netfilter::hits(ctx).into_iter().filter(|h| h.is_policy) {
        let Some(node) = netfilter::node_of(ctx, &h) else { continue };
        let (other, other_dump) = match h.backend {
            "iptables-legacy" => ("iptables-nft", node.rules.iptables_nft.as_ref()),
            "iptables-nft" => ("iptables-legacy", node.rules.iptables_legacy.as_ref()),
            _ => continue,
        };
        if !netfilter::has_pod_accepts(other_dump, &pod_net) {
            continue;
        }
        let mut facts = vec![
            netfilter::describe(&h),
            format!("{other} holds ACCEPT rules for {pod_net}... that {} never consults", h.backend),
            "every packet traverses both backends' hooks: a DROP in either one wins".into(),
        ];
        // The same split breaks kube-proxy (its rules written through one backend, read through the
        // other): where the API shows it not Ready on this node, that is part of the picture.
        if let Some(c) = ctx.states.cluster.as_ref() {
            for p in c.pods.iter().filter(|p| p.app.as_deref() == Some("kube-proxy") && p.node.as_deref() == Some(h.node.as_str()) && !p.ready) {
                facts.push(format!("{} on {}: {} (see `cnitrace check` for its log)", p.full_name(), h.node, p.state()));
            }
        }
        return Some(Diagnosis {
            explanation: format!(
                "two iptables backends are in use on {}: {} drops by chain policy ({} {}) while the accept rules for the pod network live in {}",
                h.node, h.backend, h.chain, h.verdict, other
            ),
            facts,
            hop: None,
        });
    }
    None
}

/// "10.244." for a 10.244.x.x pod: enough to recognise the pod network in a rule.
pub fn pod_net_prefix(ctx: &Ctx) -> String {
    let o = ctx.src_ip().octets();
    format!("{}.{}.", o[0], o[1])
}

/// The accept rules, in the backend that drops (the other one keeps its own): both agree again.
fn fix(ctx: &Ctx) -> Remedy {
    let hits = netfilter::hits(ctx);
    let Some(h) = hits.iter().find(|h| h.is_policy && h.backend != "nft") else { return Remedy::NoSafeFix("no policy drop counted any more".into()) };
    let Some(node) = netfilter::node_of(ctx, h) else { return Remedy::NoSafeFix("the node's state is missing".into()) };
    netfilter::accept_pod_network(ctx, node, h.backend)
}
