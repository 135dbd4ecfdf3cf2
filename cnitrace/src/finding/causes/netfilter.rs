//! What the netfilter causes share: was the drop netfilter's, and which rules or policies counted the
//! probe (counters before vs after, per backend).

use crate::{
    finding::Ctx,
    state::rules::{parse_iptables, parse_nft},
    state::{NsState, RuleSets},
};

#[derive(Clone, Debug)]
pub struct Hit {
    /// "iptables-nft", "iptables-legacy", "nft".
    pub backend: &'static str,
    pub table: String,
    pub chain: String,
    pub rule: String,
    pub is_policy: bool,
    pub verdict: String,
    pub delta: u64,
    pub node: String,
    /// 1-based position in its chain (iptables), to put a removed rule back where it was.
    pub position: usize,
    /// nft: family and table name apart, and the rule's handle.
    pub nft_family: String,
    pub nft_table: String,
    pub handle: Option<u64>,
}

pub fn is_netfilter_drop(ctx: &Ctx) -> bool {
    ctx.trace.first_drop().and_then(|d| d.drop.as_ref()).is_some_and(|d| {
        d.reason == "NETFILTER_DROP" || ["nf_hook_slow", "nft_do_chain", "ipt_do_table"].contains(&d.function.as_str())
    })
}

fn ipt_hits(backend: &'static str, before: Option<&String>, after: Option<&String>, node: &str) -> Vec<Hit> {
    let (Some(before), Some(after)) = (before, after) else { return vec![] };
    let b = parse_iptables(before);
    let after = parse_iptables(after);
    after
        .iter()
        .cloned()
        .filter_map(|r| {
            let position = after.iter().filter(|o| !o.is_policy && o.table == r.table && o.chain == r.chain).position(|o| o.rule == r.rule).map(|p| p + 1).unwrap_or(0);
            let old = b.iter().find(|o| o.table == r.table && o.rule == r.rule).map(|o| o.packets).unwrap_or(0);
            let verdict = r.target.to_uppercase();
            (r.packets > old && matches!(verdict.as_str(), "DROP" | "REJECT")).then(|| Hit {
                backend,
                table: r.table.clone(),
                chain: r.chain.clone(),
                rule: r.rule.clone(),
                is_policy: r.is_policy,
                verdict,
                delta: r.packets - old,
                node: node.into(),
                position,
                nft_family: String::new(),
                nft_table: String::new(),
                handle: None,
            })
        })
        .collect()
}

fn nft_hits(before: Option<&String>, after: Option<&String>, node: &str) -> Vec<Hit> {
    let (Some(before), Some(after)) = (before, after) else { return vec![] };
    let b = parse_nft(before);
    parse_nft(after)
        .into_iter()
        .filter(|r| !is_iptables_nft_table(&r.table))
        .filter_map(|r| {
            let now = r.packets?;
            let old = b.iter().find(|o| o.table == r.table && o.chain == r.chain && strip_counter(&o.rule) == strip_counter(&r.rule)).and_then(|o| o.packets).unwrap_or(0);
            (now > old && matches!(r.verdict.as_str(), "drop" | "reject")).then(|| Hit {
                backend: "nft",
                table: format!("{} {}", r.family, r.table),
                chain: r.chain.clone(),
                rule: r.rule.clone(),
                is_policy: false,
                verdict: r.verdict.to_uppercase(),
                delta: now - old,
                node: node.into(),
                position: 0,
                nft_family: r.family.clone(),
                nft_table: r.table.clone(),
                handle: r.handle,
            })
        })
        .collect()
}

/// Tables iptables-nft manages show up in `nft list ruleset` too; they are counted through iptables.
fn is_iptables_nft_table(t: &str) -> bool {
    matches!(t, "filter" | "nat" | "mangle" | "raw" | "security")
}

/// An nft rule's text without its counter values (what `add rule` takes back).
pub fn strip_counter(rule: &str) -> String {
    let mut out = Vec::new();
    let mut skip = 0;
    for w in rule.split_whitespace() {
        if skip > 0 {
            skip -= 1;
            continue;
        }
        if w == "packets" || w == "bytes" {
            skip = 1;
            continue;
        }
        out.push(w);
    }
    out.join(" ")
}

/// Every DROP/REJECT rule or policy whose counter grew during the probe, on the nodes of the path.
pub fn hits(ctx: &Ctx) -> Vec<Hit> {
    let mut out = Vec::new();
    for node in ctx.nodes() {
        let Some(before) = ctx.states.rules_before.get(&node.inode) else { continue };
        out.extend(hits_in(before, node, &ctx.node_name(node)));
    }
    out
}

fn hits_in(before: &RuleSets, node: &NsState, name: &str) -> Vec<Hit> {
    let after = &node.rules;
    let mut out = ipt_hits("iptables-nft", before.iptables_nft.as_ref(), after.iptables_nft.as_ref(), name);
    out.extend(ipt_hits("iptables-legacy", before.iptables_legacy.as_ref(), after.iptables_legacy.as_ref(), name));
    out.extend(nft_hits(before.nft.as_ref(), after.nft.as_ref(), name));
    out
}

/// Does this backend hold accept rules for the pod network (flannel's FLANNEL-FWD or alike)?
pub fn has_pod_accepts(dump: Option<&String>, pod_net_prefix: &str) -> bool {
    dump.is_some_and(|d| {
        parse_iptables(d).iter().any(|r| !r.is_policy && r.target == "ACCEPT" && r.rule.contains(pod_net_prefix))
    })
}

pub fn describe(h: &Hit) -> String {
    if h.is_policy {
        format!("{} on {}: table {}, chain {} policy {} counted {} packet(s) of the probe", h.backend, h.node, h.table, h.chain, h.verdict, h.delta)
    } else {
        format!("{} on {}: table {}, chain {}, rule `{}` counted {} packet(s) of the probe", h.backend, h.node, h.table, h.chain, h.rule, h.delta)
    }
}

/// Flannel's own forward accepts for the pod network, inserted first in FORWARD of `backend`
/// (undo: the same rules deleted).
pub fn accept_pod_network(ctx: &Ctx, node: &NsState, backend: &str) -> crate::plan::Remedy {
    use crate::plan::{Action, Remedy, Step, Target};
    let (net, len) = ctx.cluster_cidr();
    let rules: Vec<String> = ["-s", "-d"]
        .iter()
        .map(|dir| format!("FORWARD {dir} {net}/{len} -m comment --comment \"flanneld forward (cnitrace)\" -j ACCEPT"))
        .collect();
    let ns = Target::of(node);
    Remedy::Steps(vec![Step {
        action: Action::Iptables { ns: ns.clone(), backend: backend.into(), table: "filter".into(), lines: rules.iter().map(|r| format!("-I {}", r.replacen("FORWARD", "FORWARD 1", 1))).collect() },
        undo: Action::Iptables { ns, backend: backend.into(), table: "filter".into(), lines: rules.iter().map(|r| format!("-D {r}")).collect() },
        why: format!("accept the pod network {net}/{len} in FORWARD, as flannel does, in the backend whose policy dropped ({backend})"),
    }])
}

pub fn node_of<'a>(ctx: &Ctx<'a>, h: &Hit) -> Option<&'a NsState> {
    ctx.nodes().into_iter().find(|n| ctx.node_name(n) == h.node)
}
