//! masquerade-missing: a pod's traffic to the outside leaves its node with the pod's own address as
//! source — no MASQUERADE/SNAT rule applies to it — so the answer has no way back (the incident's
//! "external connectivity also fails"). flannel writes that rule (`--ip-masq`): its restart is the fix.

use std::net::Ipv4Addr;

use super::Cause;
use crate::event::Kind;
use crate::finding::{Ctx, Diagnosis};
use crate::plan::Remedy;
use crate::state::{in_prefix, NsState};

pub const CAUSE: Cause = Cause { id: "masquerade-missing", layer: "netfilter", detect, fix };

fn net(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, l) = s.split_once('/').unwrap_or((s, "32"));
    Some((a.parse().ok()?, l.parse().ok()?))
}

/// Would an unconditional MASQUERADE/SNAT rule (not kube-proxy's mark-based one) in the node's nat rules
/// translate `src` → `dst`? iptables rules of both backends read exactly (`-s`, `-d`, `! -d`); a native
/// nft masquerade/snat rule counts when its `ip saddr` covers `src` (or it has none).
fn masquerade_rules(node: &NsState, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<String> {
    let mut out = Vec::new();
    let rules = &node.rules;
    for dump in [&rules.iptables_nft, &rules.iptables_legacy].into_iter().flatten() {
        let all = crate::state::rules::parse_iptables(dump);
        // Chains that return early for packets without a mark (kube-proxy's KUBE-POSTROUTING: only
        // what KUBE-MARK-MASQ marked gets to its MASQUERADE).
        let mark_gated: Vec<&str> =
            all.iter().filter(|r| r.table == "nat" && r.target == "RETURN" && r.rule.contains("! --mark")).map(|r| r.chain.as_str()).collect();
        for r in all.iter().filter(|r| r.table == "nat" && !r.is_policy && matches!(r.target.as_str(), "MASQUERADE" | "SNAT") && !mark_gated.contains(&r.chain.as_str())) {
            let w: Vec<&str> = r.rule.split_whitespace().collect();
            if w.windows(2).any(|p| p[0] == "--mark" || p[0] == "-m" && p[1] == "mark") {
                continue;
            }
            let arg = |flag: &str| w.windows(2).position(|p| p[0] == flag).map(|i| (i > 0 && w[i - 1] == "!", w[i + 1]));
            let fits = |flag: &str, ip: Ipv4Addr| match arg(flag).and_then(|(neg, n)| net(n).map(|(a, l)| (neg, a, l))) {
                None => true,
                Some((neg, a, l)) => in_prefix(ip, a, l) != neg,
            };
            if fits("-s", src) && fits("-d", dst) {
                out.push(r.rule.clone());
            }
        }
    }
    if let Some(nft) = &rules.nft {
        // Native tables only: iptables-nft's own (ip nat, ip filter…) were read above. A chain that
        // returns early on an unmarked packet (kube-proxy's masquerading) is gated like KUBE-POSTROUTING.
        let (mut table, mut gated) = (String::new(), false);
        for l in nft.lines().map(str::trim) {
            if let Some(t) = l.strip_prefix("table ") {
                table = t.split(" {").next().unwrap_or(t).to_string();
                continue;
            }
            if l.starts_with("chain ") {
                gated = false;
                continue;
            }
            if rules.iptables_nft.is_some() && ["ip nat", "ip filter", "ip mangle", "ip raw"].contains(&table.as_str()) {
                continue;
            }
            if l.contains("meta mark") && l.contains("return") {
                gated = true;
            }
            if gated || !l.split_whitespace().any(|w| w == "masquerade" || w == "snat") || l.contains("meta mark") {
                continue;
            }
            let covers = match l.split("ip saddr ").nth(1).and_then(|x| x.split_whitespace().next()) {
                None => true,
                Some("!=") => l.split("ip saddr != ").nth(1).and_then(|x| x.split_whitespace().next()).and_then(net).is_some_and(|(a, p)| !in_prefix(src, a, p)),
                Some(n) => net(n).is_some_and(|(a, p)| in_prefix(src, a, p)),
            };
            if covers {
                out.push(format!("{table}: {}", l.split(" # handle").next().unwrap_or(l)));
            }
        }
    }
    out
}

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if ctx.states.service.is_some() || ctx.probe.answered > 0 {
        return None;
    }
    let node = ctx.src_node()?;
    let (src, dst) = (ctx.src_ip(), ctx.dst_ip());
    // The pair's own request leaving the source's node on a device that is neither the pods' bridge,
    // a port of it, nor the overlay: out towards the world, its source still the pod's.
    let out = ctx.trace.packets.iter().flat_map(|p| p.events.iter()).find(|e| {
        e.kind == Kind::Xmit
            && e.netns == node.inode
            && e.packet.as_ref().is_some_and(|p| p.src == src && p.dst == dst && p.outer.is_none() && !p.icmp_error)
            && node.link_by_name(&e.ifname).is_some_and(|l| l.kind != "bridge" && l.kind != "vxlan" && l.master.is_none() && !l.name.starts_with("lo"))
    })?;
    if ctx.trace.translations().iter().any(|n| n.snat()) {
        return None;
    }
    let rules = masquerade_rules(node, src, dst);
    if !rules.is_empty() {
        return None;
    }
    let name = ctx.node_name(node);
    let mut facts = vec![
        format!("no MASQUERADE or SNAT rule in {name}'s nat rules (iptables-nft, iptables-legacy, nft) covers {src} → {dst}"),
        "flannel masquerades pod traffic leaving the pod network (its FLANNEL-POSTRTG chain, --ip-masq)".into(),
    ];
    if let Some(pod) = flannel_without_ip_masq(ctx, node) {
        facts.push(format!("flanneld on {name} ({}) runs without --ip-masq: `{}`", pod.full_name(), pod.command.join(" ")));
    }
    Some(Diagnosis {
        explanation: format!(
            "{} leaves {name} by {} with the pod's own address {src} as source: no masquerade (SNAT) rule on {name} applies to it, so {dst}'s answer has no way back to a pod address",
            out.packet.as_ref().map(|p| p.what.as_str()).unwrap_or("the pod's packet"),
            out.ifname
        ),
        facts,
        hop: Some((name, out.ifname.clone())),
    })
}

/// flannel's Running pod on `node`, when its command line is known and does not ask for masquerading.
fn flannel_without_ip_masq<'a>(ctx: &'a Ctx, node: &NsState) -> Option<&'a crate::k8s::PodFacts> {
    super::daemon_pod(ctx, node, "flannel").filter(|p| p.flag_set("ip-masq") == Some(false))
}

fn fix(ctx: &Ctx) -> Remedy {
    let Some(node) = ctx.src_node() else { return Remedy::NoSafeFix("the source's node is unknown".into()) };
    let name = ctx.node_name(node);
    if let Some(pod) = flannel_without_ip_masq(ctx, node) {
        // Restarted, it would come back without the rule again: the repair is flannel's configuration,
        // which is the cluster's, not this node's.
        let owner = pod.owner.clone().map(|o| o.replace("DaemonSet/", "daemonset/")).unwrap_or_else(|| format!("pod/{}", pod.name));
        return Remedy::NoSafeFix(format!(
            "flanneld on {name} runs without --ip-masq, so it does not write the masquerade rule and a restart would not bring it back: \
             add --ip-masq to its args (kubectl -n {} edit {owner}); cnitrace changes neither flannel's configuration nor NAT rules by hand",
            pod.namespace
        ));
    }
    if let Some(r) = super::restart_flannel(ctx, node, &format!("flannel's masquerade rule for the pod network is missing on {name}")) {
        return r;
    }
    Remedy::NoSafeFix(format!(
        "flanneld writes the masquerade rule (--ip-masq, its FLANNEL-POSTRTG chain) and cnitrace does not write NAT rules by hand: \
         restart flannel on {name} (kubectl -n kube-flannel delete pod -l app=flannel --field-selector spec.nodeName={name})"
    ))
}
