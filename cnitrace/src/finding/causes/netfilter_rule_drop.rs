//! netfilter-rule-drop: an explicit DROP/REJECT rule matched the pair's traffic.

use crate::plan::{Action, Remedy, Step, Target};
use super::{netfilter, Cause};
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "netfilter-rule-drop", layer: "netfilter", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    // A netfilter drop in the trace, or the ARP the source could not resolve dropped by a rule.
    let hits = netfilter::hits(ctx);
    if !netfilter::is_netfilter_drop(ctx) && hits.is_empty() {
        return None;
    }
    let rule = hits.iter().find(|h| !h.is_policy)?;
    Some(Diagnosis {
        explanation: format!(
            "an explicit {} rule drops the traffic: {} table {} chain {}: `{}`{} on {}",
            rule.verdict,
            rule.backend,
            rule.table,
            rule.chain,
            rule.rule,
            rule.handle.map(|h| format!(" (handle {h})")).unwrap_or_default(),
            rule.node
        ),
        facts: hits.iter().map(netfilter::describe).collect(),
        hop: rule.place.clone(),
    })
}

/// Removing a rule someone wrote is never automatic: shown with its location, applied only with
/// --allow-rule-removal (undo: the rule back where it was).
fn fix(ctx: &Ctx) -> Remedy {
    remove_rule(ctx, |_| true)
}

/// The removal of the first rule (not a policy) `pick` takes among those that counted the dropped packet.
pub(super) fn remove_rule(ctx: &Ctx, pick: impl Fn(&netfilter::Hit) -> bool) -> Remedy {
    let hits = netfilter::hits(ctx);
    let Some(h) = hits.iter().find(|h| !h.is_policy && pick(h)) else { return Remedy::NoSafeFix("no rule counted the probe any more".into()) };
    let Some(node) = netfilter::node_of(ctx, h) else { return Remedy::NoSafeFix("the node's state is missing".into()) };
    let ns = Target::of(node);
    let step = if h.backend == "nft" {
        let Some(handle) = h.handle else { return Remedy::NoSafeFix("the nft rule's handle is unknown".into()) };
        let text = netfilter::strip_counter(&h.rule);
        Step {
            action: Action::Nft { ns: ns.clone(), script: format!("delete rule {} {} {} handle {handle}", h.nft_family, h.nft_table, h.chain) },
            // Back in its place: after the rule that preceded it, or first in the chain.
            undo: Action::Nft {
                ns,
                script: match h.nft_after {
                    Some(p) => format!("add rule {} {} {} position {p} {text}", h.nft_family, h.nft_table, h.chain),
                    None => format!("insert rule {} {} {} {text}", h.nft_family, h.nft_table, h.chain),
                },
            },
            why: format!("the rule `{}` in nft table {} {} chain {} drops the pair's traffic", h.rule, h.nft_family, h.nft_table, h.chain),
        }
    } else {
        let spec = h.rule.trim_start_matches("-A ").to_string();
        let rest = spec.split_once(' ').map(|(_, r)| r).unwrap_or("");
        Step {
            action: Action::Iptables { ns: ns.clone(), backend: h.backend.into(), table: h.table.clone(), lines: vec![format!("-D {spec}")] },
            undo: Action::Iptables { ns, backend: h.backend.into(), table: h.table.clone(), lines: vec![format!("-I {} {} {rest}", h.chain, h.position.max(1))] },
            why: format!("the rule `{}` ({} table {}) drops the pair's traffic", h.rule, h.backend, h.table),
        }
    };
    Remedy::RuleRemoval(vec![step])
}
