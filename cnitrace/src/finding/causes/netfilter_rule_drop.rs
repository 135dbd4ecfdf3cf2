//! netfilter-rule-drop: an explicit DROP/REJECT rule matched the pair's traffic.

use super::{netfilter, Cause};
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "netfilter-rule-drop", layer: "netfilter", hop_from_state: false, detect };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !netfilter::is_netfilter_drop(ctx) {
        return None;
    }
    let hits = netfilter::hits(ctx);
    let rule = hits.iter().find(|h| !h.is_policy)?;
    Some(Diagnosis {
        explanation: format!(
            "an explicit {} rule drops the traffic: {} table {} chain {}: `{}` on {}",
            rule.verdict, rule.backend, rule.table, rule.chain, rule.rule, rule.node
        ),
        facts: hits.iter().map(netfilter::describe).collect(),
        hop: None,
    })
}
