//! What the netfilter causes share: was the drop netfilter's, and which rules or policies counted the
//! probe (counters before vs after, per backend).

use std::net::Ipv4Addr;

use crate::{
    finding::Ctx,
    state::rules::{parse_iptables, parse_nft, NftRule},
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
    /// The namespace holding the rule (a node's, or a pod's own), by display name and inode.
    pub node: String,
    pub inode: u32,
    /// 1-based position in its chain (iptables), to put a removed rule back where it was.
    pub position: usize,
    /// nft: family and table name apart, and the rule's handle.
    pub nft_family: String,
    pub nft_table: String,
    pub handle: Option<u64>,
    /// nft: the handle of the rule before it in its chain (None: it is the first).
    pub nft_after: Option<u64>,
    /// How the rule was found: its counter moved during the probe, or (a native nft rule without a
    /// counter) the rule set evaluated against the dropped packet's headers.
    pub found_by: FoundBy,
    /// nft base chains: "hook forward priority filter + 10".
    pub hook: Option<String>,
    /// The fault's place when it is not where the kernel freed the packet: the interface whose ARP
    /// requests the rule drops (display name, interface).
    pub place: Option<(String, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoundBy {
    Counter,
    Evaluation,
    /// The source's ARP for an address went unanswered and the rule set of the namespace holding that
    /// address drops such a request (a trace that saw only the source give up, NEIGH_FAILED: the
    /// requests went out before it attached, or the previous trace's did).
    UnansweredArp,
}

pub fn is_netfilter_drop(ctx: &Ctx) -> bool {
    ctx.trace.first_drop().and_then(|d| d.drop.as_ref()).is_some_and(|d| {
        d.reason == "NETFILTER_DROP" || ["nf_hook_slow", "nft_do_chain", "ipt_do_table"].contains(&d.function.as_str())
    })
}

fn ipt_hits(backend: &'static str, before: Option<&String>, after: Option<&String>, node: &str, inode: u32) -> Vec<Hit> {
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
                inode,
                position,
                nft_family: String::new(),
                nft_table: String::new(),
                handle: None,
                nft_after: None,
                found_by: FoundBy::Counter,
                hook: None,
                place: None,
            })
        })
        .collect()
}

fn nft_hits(before: Option<&String>, after: Option<&String>, node: &str, inode: u32) -> Vec<Hit> {
    let (Some(before), Some(after)) = (before, after) else { return vec![] };
    let b = parse_nft(before);
    parse_nft(after)
        .into_iter()
        .filter(|r| !is_iptables_nft_table(&r.family, &r.table))
        .filter_map(|r| {
            let now = r.packets?;
            let old = b
                .iter()
                .find(|o| o.family == r.family && o.table == r.table && o.chain == r.chain && strip_counter(&o.rule) == strip_counter(&r.rule))
                .and_then(|o| o.packets)
                .unwrap_or(0);
            (now > old && matches!(r.verdict.as_str(), "drop" | "reject")).then(|| nft_hit(&r, node.into(), inode, now - old, FoundBy::Counter))
        })
        .collect()
}

/// Tables iptables-nft manages (`ip filter`, `ip6 nat`, …) show up in `nft list ruleset` too; they are
/// counted through iptables. The same names in other families are nft's own: `inet filter` (Debian's
/// default nftables.conf), arptables-nft's `arp filter`, ebtables-nft's `bridge filter`.
fn is_iptables_nft_table(family: &str, table: &str) -> bool {
    matches!(family, "ip" | "ip6") && matches!(table, "filter" | "nat" | "mangle" | "raw" | "security")
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

/// Every DROP/REJECT rule or policy whose counter grew during the probe, on the nodes of the path. When
/// none did and nftables dropped the packet, the native nft rule found by evaluating the dropping
/// namespace's rule set against the packet's headers ([`evaluate_nft`]): a rule without a counter (what
/// firewalld and most hand-written rule sets look like) still gets named.
pub fn hits(ctx: &Ctx) -> Vec<Hit> {
    if !is_netfilter_drop(ctx) {
        // No netfilter drop in the trace: only a rule proven to drop the ARP the source could not
        // resolve (never a counter that moved for other traffic).
        return arp_hit(ctx).into_iter().collect();
    }
    let mut out = Vec::new();
    for node in ctx.nodes() {
        let Some(before) = ctx.states.rules_before.get(&node.inode) else { continue };
        out.extend(hits_in(before, node, &ctx.node_name(node)));
    }
    if out.is_empty() {
        out.extend(evaluated_hit(ctx));
    }
    out
}

fn hook_words(r: &NftRule) -> Option<String> {
    r.hook.as_ref().map(|h| match &r.priority {
        Some(p) => format!("hook {h} priority {p}"),
        None => format!("hook {h}"),
    })
}

/// Which way the dropped packet was going in the namespace that dropped it: received there (and
/// delivered or forwarded: the input-side hooks), sent from it (output, postrouting, egress), or not
/// known (every hook is considered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    In,
    Out,
    Unknown,
}

/// The headers of a dropped packet that nft rules match on.
pub struct Headers<'a> {
    /// IPv4 source and destination; for ARP, the sender's and the target's protocol addresses.
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// "icmp", "tcp", "udp", "arp", or a number.
    pub proto: &'a str,
    /// ARP: "request" or "reply".
    pub arp_op: Option<&'a str>,
    pub way: Way,
    /// The device the namespace dropped it at: a netdev chain is bound to its own.
    pub dev: &'a str,
}

impl Headers<'_> {
    fn is_arp(&self) -> bool {
        self.proto == "arp"
    }
}

/// What evaluating one namespace's native nft rule set against a packet found: the drop rules it
/// certainly reaches, and whether some rule on the way could not be evaluated (then nothing is named).
pub struct Evaluation {
    pub drops: Vec<NftRule>,
    pub unsure: Vec<String>,
}

/// Does a base chain of this family see this packet at all? ARP goes through the `arp` family's hooks
/// and, bridged or on a device, `bridge` and `netdev`; IPv4 through `ip`, `inet`, `bridge` and `netdev`.
fn family_sees(family: &str, h: &Headers) -> bool {
    match family {
        "arp" => h.is_arp(),
        "ip" | "inet" => !h.is_arp(),
        "bridge" | "netdev" => true,
        _ => false,
    }
}

/// Does this hook see a packet going this way? A received packet meets the input side (and, forwarded,
/// postrouting and egress); a sent one only the output side.
fn hook_sees(hook: &str, way: Way) -> bool {
    match way {
        Way::Unknown => true,
        Way::In => hook != "output",
        Way::Out => matches!(hook, "output" | "postrouting" | "egress"),
    }
}

/// Walks every base chain of the native nft tables (every family: ip, inet, arp, bridge, netdev) that
/// sees this packet, in order, as the kernel would: the first rule that certainly matches decides the
/// chain; a drop/reject there is a drop rule reached; a chain no rule decided ends in its policy (a drop
/// policy is a drop reached too). A rule this evaluator cannot read (sets, ct state, interface names…)
/// makes the chain unsure from there on. Chains reached only by a jump are not followed (unsure too).
pub fn evaluate_nft(dump: &str, h: &Headers) -> Evaluation {
    let rules = parse_nft(dump);
    let mut ev = Evaluation { drops: Vec::new(), unsure: Vec::new() };
    let mut chains: Vec<(&str, &str, &str)> = Vec::new();
    for r in &rules {
        let key = (r.family.as_str(), r.table.as_str(), r.chain.as_str());
        let Some(hook) = r.hook.as_deref() else { continue };
        let on_its_device = r.device.as_deref().is_none_or(|d| h.dev.is_empty() || d == h.dev);
        if !chains.contains(&key) && family_sees(&r.family, h) && hook_sees(hook, h.way) && on_its_device && !is_iptables_nft_table(&r.family, &r.table) {
            chains.push(key);
        }
    }
    for (family, table, chain) in chains {
        let in_chain = || rules.iter().filter(|r| r.family == family && r.table == table && r.chain == chain);
        let mut decided = false;
        for r in in_chain().filter(|r| r.handle.is_some()) {
            match nft_rule_matches(&r.rule, h) {
                Some(false) => continue,
                Some(true) if matches!(r.verdict.as_str(), "drop" | "reject") => {
                    ev.drops.push(r.clone());
                    decided = true;
                    break;
                }
                Some(true) if r.verdict == "accept" => {
                    decided = true;
                    break;
                }
                Some(true) if r.verdict.is_empty() => continue,
                _ => {
                    ev.unsure.push(format!("{family} {table} {chain}: `{}`", strip_counter(&r.rule)));
                    decided = true;
                    break;
                }
            }
        }
        if !decided {
            if let Some(policy) = in_chain().find(|r| r.handle.is_none() && r.policy.as_deref() == Some("drop") && r.rule == "policy drop") {
                ev.drops.push(policy.clone());
            }
        }
    }
    ev
}

/// An address or prefix as nft prints it ("10.244.1.0/24", "10.244.1.10").
fn prefix(v: &str) -> Option<(Ipv4Addr, u8)> {
    match v.split_once('/') {
        Some((n, l)) => Some((n.parse().ok()?, l.parse().ok()?)),
        None => Some((v.parse().ok()?, 32)),
    }
}

/// Does an nft rule (as `nft list ruleset` prints it) match these headers? None when it holds an
/// expression this evaluator does not read. A match on one protocol's header never matches another
/// protocol's packet (nft adds that dependency itself): `ip daddr` never matches ARP, `arp operation`
/// never matches IPv4.
pub fn nft_rule_matches(rule: &str, h: &Headers) -> Option<bool> {
    let rule = strip_counter(rule);
    let words: Vec<&str> = rule.split_whitespace().collect();
    let mut i = 0;
    let mut all = true;
    let arp = h.is_arp();
    while i < words.len() {
        let (neg, value_at) = if words.get(i + 2) == Some(&"!=") { (true, i + 3) } else { (false, i + 2) };
        match (words[i], words.get(i + 1).copied()) {
            ("counter", _) => i += 1,
            ("drop" | "accept", _) => break,
            ("reject", _) => break,
            ("ip", Some("saddr" | "daddr" | "protocol")) if arp => return Some(false),
            ("arp", Some(_)) if !arp => return Some(false),
            ("ip", Some(field @ ("saddr" | "daddr"))) => {
                let (net, len) = prefix(words.get(value_at)?)?;
                let addr = if field == "saddr" { h.src } else { h.dst };
                all &= crate::state::in_prefix(addr, net, len) != neg;
                i = value_at + 1;
            }
            ("ip", Some("protocol")) | ("meta", Some("l4proto")) => {
                let v = words.get(value_at)?;
                all &= (*v == h.proto) != neg;
                i = value_at + 1;
            }
            // arp saddr ip 10.1.2.3 / arp daddr ip != 10.1.2.0/24
            ("arp", Some(field @ ("saddr" | "daddr"))) if words.get(i + 2) == Some(&"ip") => {
                let (neg, value_at) = if words.get(i + 3) == Some(&"!=") { (true, i + 4) } else { (false, i + 3) };
                let (net, len) = prefix(words.get(value_at)?)?;
                let addr = if field == "saddr" { h.src } else { h.dst };
                all &= crate::state::in_prefix(addr, net, len) != neg;
                i = value_at + 1;
            }
            ("arp", Some("operation")) => {
                let v = *words.get(value_at)?;
                let op = match v {
                    "request" | "1" => "request",
                    "reply" | "2" => "reply",
                    _ => return None,
                };
                all &= (Some(op) == h.arp_op) != neg;
                i = value_at + 1;
            }
            // The frame's protocol: ether type (bridge, netdev), meta protocol, meta nfproto (inet).
            ("ether", Some("type")) | ("meta", Some("protocol")) => {
                let is = match *words.get(value_at)? {
                    "arp" => arp,
                    "ip" => !arp,
                    "ip6" | "vlan" | "8021q" | "8021ad" => false,
                    _ => return None,
                };
                all &= is != neg;
                i = value_at + 1;
            }
            ("meta", Some("nfproto")) => {
                let is = match *words.get(value_at)? {
                    "ipv4" => !arp,
                    "ipv6" => false,
                    _ => return None,
                };
                all &= is != neg;
                i = value_at + 1;
            }
            ("tcp" | "udp", Some("dport" | "sport")) if words[i] != h.proto => {
                // A port match implies the protocol: another protocol's packet never matches it.
                all = false;
                break;
            }
            _ => return None,
        }
    }
    Some(all)
}

/// The native nft rule that dropped the packet, found by evaluation (no counter moved): only when the
/// drop was nftables', in a namespace whose rule set names exactly one drop rule the packet reaches and
/// no rule on the way was beyond reading.
fn evaluated_hit(ctx: &Ctx) -> Option<Hit> {
    if !is_netfilter_drop(ctx) {
        return None;
    }
    let d = ctx.trace.first_drop()?;
    let p = d.packet.as_ref()?;
    let ns = ctx.ns(d.netns)?;
    // Received in the dropping namespace (a receive of this packet there before the drop), or sent
    // from it (its source is one of the namespace's own addresses), or not known.
    let received = ctx.trace.events.iter().any(|e| {
        e.kind == crate::event::Kind::Receive && e.netns == d.netns && e.skb == d.skb && e.t_ns <= d.t_ns && e.packet.as_ref().is_some_and(|q| q.key == p.key)
    });
    let way = if received {
        Way::In
    } else if ns.has_addr(p.src).is_some() {
        Way::Out
    } else {
        Way::Unknown
    };
    let arp_op = (p.proto == "arp").then(|| if p.what.starts_with("ARP who-has") { "request" } else { "reply" });
    let h = Headers { src: p.src, dst: p.dst, proto: &p.proto, arp_op, way, dev: &d.ifname };
    let ev = evaluate_nft(ns.rules.nft.as_ref()?, &h);
    let [r] = ev.drops.as_slice() else { return None };
    if !ev.unsure.is_empty() {
        return None;
    }
    Some(nft_hit(r, ctx.node_name(ns), ns.inode, 0, FoundBy::Evaluation))
}

/// The ARP the source could not resolve, as (asker's address, target address): the trace's unanswered
/// request, or — a trace that saw only the source pod give up on it (NEIGH_FAILED) — the address its
/// route resolves for the destination (its gateway, else the destination itself).
fn unresolved_arp(ctx: &Ctx) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if let Some((target, events)) = ctx.trace.unanswered_arp().into_iter().next() {
        let asker = events.iter().find(|e| e.kind == crate::event::Kind::Xmit)?.packet.as_ref()?.src;
        return Some((asker, target));
    }
    let d = ctx.trace.first_drop()?;
    let gave_up = d.drop.as_ref().is_some_and(|i| i.says("NEIGH_FAILED", &["neigh_invalidate"]));
    (gave_up && ctx.states.src_pod == d.netns).then(|| (ctx.src_ip(), ctx.gateway().unwrap_or_else(|| ctx.sent_to())))
}

/// The nft rule that drops the ARP request the source could not get answered, in the namespace holding
/// the address it asked for: named only when evaluation is certain (one drop rule reached, nothing on
/// the way beyond reading). The fault's place is that namespace's interface, whatever the kernel freed.
pub fn arp_hit(ctx: &Ctx) -> Option<Hit> {
    let (asker, target) = unresolved_arp(ctx)?;
    let (owner, addr) = ctx.states.by_inode.values().find_map(|st| st.addrs.iter().find(|a| a.addr == target && st.ifname(a.ifindex) != "lo").map(|a| (st, a)))?;
    let dev = owner.ifname(addr.ifindex);
    let h = Headers { src: asker, dst: target, proto: "arp", arp_op: Some("request"), way: Way::In, dev: &dev };
    let ev = evaluate_nft(owner.rules.nft.as_ref()?, &h);
    let [r] = ev.drops.as_slice() else { return None };
    if !ev.unsure.is_empty() {
        return None;
    }
    let name = ctx.node_name(owner);
    let mut hit = nft_hit(r, name.clone(), owner.inode, 0, FoundBy::UnansweredArp);
    hit.place = Some((name, dev));
    Some(hit)
}

/// A native nft rule that dropped the pair's packet, as a hit.
fn nft_hit(r: &NftRule, node: String, inode: u32, delta: u64, found_by: FoundBy) -> Hit {
    Hit {
        backend: "nft",
        table: format!("{} {}", r.family, r.table),
        chain: r.chain.clone(),
        rule: r.rule.clone(),
        // A base chain's policy (parse_nft lists it as "policy drop", without a handle).
        is_policy: r.handle.is_none() && r.rule.starts_with("policy "),
        verdict: r.verdict.to_uppercase(),
        delta,
        node,
        inode,
        position: 0,
        nft_family: r.family.clone(),
        nft_table: r.table.clone(),
        handle: r.handle,
        nft_after: r.after,
        found_by,
        hook: hook_words(r),
        place: None,
    }
}

fn hits_in(before: &RuleSets, node: &NsState, name: &str) -> Vec<Hit> {
    let after = &node.rules;
    let mut out = ipt_hits("iptables-nft", before.iptables_nft.as_ref(), after.iptables_nft.as_ref(), name, node.inode);
    out.extend(ipt_hits("iptables-legacy", before.iptables_legacy.as_ref(), after.iptables_legacy.as_ref(), name, node.inode));
    out.extend(nft_hits(before.nft.as_ref(), after.nft.as_ref(), name, node.inode));
    out
}

/// Does this backend hold accept rules for the pod network (flannel's FLANNEL-FWD or alike)?
pub fn has_pod_accepts(dump: Option<&String>, pod_net_prefix: &str) -> bool {
    dump.is_some_and(|d| {
        parse_iptables(d).iter().any(|r| !r.is_policy && r.target == "ACCEPT" && r.rule.contains(pod_net_prefix))
    })
}

pub fn describe(h: &Hit) -> String {
    if h.found_by == FoundBy::UnansweredArp {
        format!(
            "nft on {}: table {}, chain {} ({}), {} drops the ARP requests arriving on {}: the source's went unanswered (found by evaluating the rule set against such a request)",
            h.node,
            h.table,
            h.chain,
            h.hook.as_deref().unwrap_or("no hook"),
            if h.is_policy { format!("policy {}", h.verdict) } else { format!("rule `{}` handle {}", strip_counter(&h.rule), h.handle.map(|x| x.to_string()).unwrap_or_else(|| "?".into())) },
            h.place.as_ref().map(|(_, dev)| dev.as_str()).unwrap_or("its interface")
        )
    } else if h.found_by == FoundBy::Evaluation && h.is_policy {
        format!(
            "nft on {}: table {}, chain {} ({}) policy {}: no rule of the chain decides for the dropped packet's headers, so its policy does (found by evaluating the rule set against them)",
            h.node,
            h.table,
            h.chain,
            h.hook.as_deref().unwrap_or("no hook"),
            h.verdict
        )
    } else if h.found_by == FoundBy::Evaluation {
        format!(
            "nft on {}: table {}, chain {} ({}), rule `{}` handle {} matches the dropped packet's headers (the rule has no counter: found by evaluating the rule set against them)",
            h.node,
            h.table,
            h.chain,
            h.hook.as_deref().unwrap_or("no hook"),
            strip_counter(&h.rule),
            h.handle.map(|x| x.to_string()).unwrap_or_else(|| "?".into())
        )
    } else if h.is_policy {
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

/// The namespace holding the hit's rule: a node's, or (a rule in a pod's own namespace) the pod's.
pub fn node_of<'a>(ctx: &Ctx<'a>, h: &Hit) -> Option<&'a NsState> {
    ctx.ns(h.inode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn icmp(src: &str, dst: &str) -> Headers<'static> {
        Headers { src: src.parse().unwrap(), dst: dst.parse().unwrap(), proto: "icmp", arp_op: None, way: Way::Unknown, dev: "" }
    }

    fn arp_request(src: &str, dst: &str, way: Way, dev: &'static str) -> Headers<'static> {
        Headers { src: src.parse().unwrap(), dst: dst.parse().unwrap(), proto: "arp", arp_op: Some("request"), way, dev }
    }

    /// `nft -a list ruleset` of a namespace holding rules of every family but ip's.
    const FAMILIES: &str = "table arp t { # handle 3\n\tchain in { # handle 1\n\t\ttype filter hook input priority filter; policy accept;\n\t\tdrop # handle 2\n\t}\n}\n\
        table bridge filter { # handle 4\n\tchain FORWARD { # handle 1\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tip daddr 172.30.5.9 counter packets 3 bytes 252 drop # handle 5\n\t}\n}\n\
        table netdev edge { # handle 5\n\tchain ing { # handle 1\n\t\ttype filter hook ingress device \"veth9\" priority filter; policy accept;\n\t\tether type arp arp operation reply drop # handle 3\n\t}\n}\n";

    #[test]
    fn arp_is_judged_by_the_arp_bridge_and_netdev_families() {
        // The ARP request arriving in the pod: the arp family's input chain drops it (no counter).
        let ev = evaluate_nft(FAMILIES, &arp_request("172.30.5.7", "172.30.5.9", Way::In, "eth0"));
        assert_eq!(ev.drops.iter().map(|r| (r.family.as_str(), r.handle)).collect::<Vec<_>>(), [("arp", Some(2))], "{:?}", ev.drops);
        assert!(ev.unsure.is_empty(), "{:?}", ev.unsure);
        // Sent from the namespace: an input chain never sees it.
        assert!(evaluate_nft(FAMILIES, &arp_request("172.30.5.9", "172.30.5.7", Way::Out, "eth0")).drops.is_empty());
        // An echo to the same address: the arp family does not see it; the bridge's forward rule does.
        let ev = evaluate_nft(FAMILIES, &Headers { way: Way::In, ..icmp("172.30.5.7", "172.30.5.9") });
        assert_eq!(ev.drops.iter().map(|r| (r.family.as_str(), r.table.as_str(), r.handle)).collect::<Vec<_>>(), [("bridge", "filter", Some(5))]);
        // A reply on the netdev chain's own device; on another device that chain is not there.
        let reply = |dev| Headers { arp_op: Some("reply"), ..arp_request("172.30.5.9", "172.30.5.7", Way::In, dev) };
        let on = evaluate_nft(FAMILIES, &reply("veth9"));
        assert!(on.drops.iter().any(|r| r.family == "netdev" && r.handle == Some(3)), "{:?}", on.drops);
        assert!(!evaluate_nft(FAMILIES, &reply("veth1")).drops.iter().any(|r| r.family == "netdev"));
    }

    #[test]
    fn a_chain_no_rule_decides_ends_in_its_policy() {
        let set = "table arp guard { # handle 7\n\tchain out { # handle 1\n\t\ttype filter hook output priority filter; policy drop;\n\t\tarp daddr ip 10.1.0.0/16 accept # handle 2\n\t}\n}\n";
        let ev = evaluate_nft(set, &arp_request("192.168.9.4", "192.168.9.1", Way::Out, "eth0"));
        assert_eq!(ev.drops.len(), 1, "{:?}", ev.drops);
        assert_eq!((ev.drops[0].rule.as_str(), ev.drops[0].handle), ("policy drop", None));
        // The accept decides first for its own addresses.
        assert!(evaluate_nft(set, &arp_request("10.1.2.3", "10.1.0.1", Way::Out, "eth0")).drops.is_empty());
    }

    #[test]
    fn a_protocols_header_match_never_matches_another_protocol() {
        let arp = arp_request("10.9.0.20", "10.9.0.19", Way::Unknown, "");
        assert_eq!(nft_rule_matches("ip daddr 10.9.0.19 drop", &arp), Some(false));
        assert_eq!(nft_rule_matches("ip saddr != 10.0.0.0/8 drop", &arp), Some(false), "a negated IPv4 match needs IPv4 too");
        assert_eq!(nft_rule_matches("arp operation request drop", &arp), Some(true));
        assert_eq!(nft_rule_matches("arp daddr ip 10.9.0.19 drop", &arp), Some(true));
        assert_eq!(nft_rule_matches("arp saddr ip != 10.9.0.0/24 drop", &arp), Some(false));
        assert_eq!(nft_rule_matches("meta protocol arp drop", &arp), Some(true));
        let echo = icmp("10.9.0.20", "10.9.0.19");
        assert_eq!(nft_rule_matches("arp operation request drop", &echo), Some(false));
        assert_eq!(nft_rule_matches("ether type arp drop", &echo), Some(false));
        assert_eq!(nft_rule_matches("meta nfproto ipv4 ip daddr 10.9.0.19 drop", &echo), Some(true));
    }

    #[test]
    fn only_ip_and_ip6_tables_of_iptables_names_are_iptables_nfts() {
        assert!(is_iptables_nft_table("ip", "filter") && is_iptables_nft_table("ip6", "nat"));
        assert!(!is_iptables_nft_table("inet", "filter"), "Debian's default nftables.conf");
        assert!(!is_iptables_nft_table("arp", "filter") && !is_iptables_nft_table("bridge", "filter"));
    }

    #[test]
    fn nft_rules_are_matched_on_what_they_say_and_unknown_beyond_it() {
        let h = icmp("10.244.0.20", "10.244.1.10");
        assert_eq!(nft_rule_matches("ip daddr 10.244.1.0/24 drop", &h), Some(true));
        assert_eq!(nft_rule_matches("ip daddr 10.244.1.0/24 counter packets 2 bytes 1534 drop", &h), Some(true));
        assert_eq!(nft_rule_matches("ip saddr != 10.244.0.0/16 drop", &h), Some(false));
        assert_eq!(nft_rule_matches("ip protocol icmp ip daddr 10.244.1.10 reject with icmp type host-unreachable", &h), Some(true));
        assert_eq!(nft_rule_matches("tcp dport 22 drop", &h), Some(false), "a port match implies its protocol");
        assert_eq!(nft_rule_matches("ct state invalid drop", &h), None);
        assert_eq!(nft_rule_matches("ip daddr { 10.244.1.0/24, 10.9.0.0/16 } drop", &h), None);
        assert_eq!(nft_rule_matches("iifname \"cni0\" drop", &h), None);
    }

    #[test]
    fn the_first_certain_verdict_of_each_base_chain_decides() {
        let h = icmp("10.244.0.20", "10.244.1.10");
        let set = "table inet fw { # handle 9\n\tchain fwd { # handle 1\n\t\ttype filter hook forward priority filter + 10; policy accept;\n\t\tip saddr 10.244.0.99 accept # handle 2\n\t\tip daddr 10.244.1.0/24 drop # handle 3\n\t}\n\tchain other { # handle 4\n\t\tip daddr 10.244.1.10 drop # handle 5\n\t}\n}\n";
        let ev = evaluate_nft(set, &h);
        assert_eq!(ev.drops.iter().map(|r| r.handle).collect::<Vec<_>>(), [Some(3)], "chain `other` has no hook: only a jump reaches it");
        assert_eq!(ev.drops[0].priority.as_deref(), Some("filter + 10"));
        assert!(ev.unsure.is_empty());
        // An accept that certainly matches first: nothing dropped here.
        let accepted = set.replace("ip saddr 10.244.0.99 accept", "ip saddr 10.244.0.20 accept");
        assert!(evaluate_nft(&accepted, &h).drops.is_empty());
        // A rule it cannot read before the drop: unsure, so nothing is named.
        let unsure = set.replace("ip saddr 10.244.0.99 accept", "ct state established accept");
        let ev = evaluate_nft(&unsure, &h);
        assert!(ev.drops.is_empty() && ev.unsure.len() == 1, "{:?}", ev.unsure);
    }
}
