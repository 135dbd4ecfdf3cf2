//! The verdict: where the pair's traffic died (from the trace) and why (trace + node state), as one
//! catalog cause with the facts that prove it. Never a cause the evidence does not support: a drop that
//! fits no cause is reported with cause null and every fact found.

pub mod causes;
pub mod ctx;

use serde::{Deserialize, Serialize};

pub use ctx::{Ctx, States};

use crate::event::TraceEvent;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Delivered,
    Dropped,
    Inconclusive,
}

/// What a cause detector returns when the evidence fits it.
#[derive(Clone, Debug)]
pub struct Diagnosis {
    pub explanation: String,
    pub facts: Vec<String>,
    /// The fault's place (namespace display name, interface): the broken device or the node that should
    /// have acted, as the node's state shows it. None: the place is where the kernel dropped the packet.
    pub hop: Option<(String, String)>,
}

/// Where the kernel freed the pair's packet: the namespace (display name), the device, the function
/// and the drop reason, as its kfree_skb said it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropSite {
    pub netns: String,
    pub ifname: String,
    pub function: String,
    pub reason: String,
}

impl DropSite {
    fn of(d: &TraceEvent) -> Option<DropSite> {
        let info = d.drop.as_ref()?;
        Some(DropSite { netns: d.where_.clone(), ifname: d.ifname.clone(), function: info.function.clone(), reason: info.reason.clone() })
    }
}

/// The verdict object: the last line of `--json`, and the end of the text output.
///
/// `netns` and `ifname` are the fault's place (`where`): the hop a cause names from the node's state,
/// else where the kernel dropped the packet. One fault gives the same `where` whichever way the kernel
/// happened to free its packet (an ARP give-up in the source pod, or a request unanswered at a detached
/// port). The kernel's own drop site, when there was one, is `dropped_at`; `function` and `reason` are
/// its function and reason.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Verdict {
    pub verdict: Outcome,
    pub cause: Option<String>,
    pub layer: Option<String>,
    pub function: Option<String>,
    pub reason: Option<String>,
    pub ifname: Option<String>,
    pub netns: Option<String>,
    /// Where the kernel freed the packet (None: no kernel drop was seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_at: Option<DropSite>,
    pub explanation: String,
    pub facts: Vec<String>,
    /// Evidence this kernel could not give, and what the verdict rests on instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// The cause's guide (what you see, why, the fix and its undo, the commands by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
}

/// Where a catalog cause's guide is, in the source tree (and under `share/doc/cnitrace` once installed).
pub fn doc_of(cause: &str) -> String {
    format!("docs/causes.md#{cause}")
}

impl Verdict {
    pub fn exit_code(&self) -> u8 {
        match self.verdict {
            Outcome::Delivered => crate::exit::OK,
            Outcome::Dropped => crate::exit::DROPPED,
            Outcome::Inconclusive => crate::exit::INCONCLUSIVE,
        }
    }
}

fn drop_facts(d: &TraceEvent) -> String {
    let info = d.drop.as_ref().expect("a drop event");
    format!(
        "the kernel dropped {} in {} at {} ({}), reason {}",
        d.packet.as_ref().map(|p| p.what.as_str()).unwrap_or("a packet of the pair"),
        d.where_,
        if d.ifname.is_empty() { "no device" } else { d.ifname.as_str() },
        info.function,
        info.reason
    )
}

/// What the optional kprobes add: the netfilter hook a packet dropped in netfilter was in, and the
/// first refusal of each function with a return value (the reverse-path check).
fn kprobe_facts(ctx: &Ctx) -> Vec<String> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    if let Some(d) = ctx.trace.first_drop() {
        let in_netfilter = d.drop.as_ref().is_some_and(|i| i.function == "nf_hook_slow" || i.function.starts_with("nft_") || i.function.starts_with("ipt_"));
        let hook = ctx
            .trace
            .events
            .iter()
            .filter(|e| e.skb == d.skb && e.t_ns <= d.t_ns)
            .filter_map(|e| e.func.as_ref().filter(|f| f.function == "nf_hook_slow").map(|f| (e, f)))
            .next_back();
        if let (true, Some((e, f))) = (in_netfilter, hook) {
            out.push(format!("kprobe: the packet was in netfilter hook {} on {} {} when it was dropped", f.detail, e.where_, e.ifname));
        }
    }
    for e in ctx.trace.packets.iter().flat_map(|p| p.events.iter()) {
        let Some(f) = e.func.as_ref().filter(|f| f.refused()) else { continue };
        if seen.contains(&f.function) {
            continue;
        }
        seen.push(f.function.clone());
        out.push(format!(
            "kprobe: {} {} on {} {} → {} for {}",
            f.function,
            f.detail,
            e.where_,
            e.ifname,
            f.verdict.clone().unwrap_or_default(),
            e.packet.as_ref().map(|p| p.what.as_str()).unwrap_or("a packet of the pair")
        ));
    }
    out
}

/// Decides the verdict for one traced pair (through a Service: the Service, its translation and the
/// endpoint chosen are part of it).
pub fn diagnose(ctx: &Ctx) -> Verdict {
    let mut v = diagnose_pair(ctx);
    if let Some(sp) = &ctx.states.service {
        let mut facts = vec![sp.describe()];
        for n in ctx.trace.translations() {
            facts.push(format!("translated on {} {}: {}", n.where_, n.ifname, n.describe()));
        }
        if sp.ipvs {
            facts.push(format!("kube-proxy on {} runs in IPVS mode (KUBE-* IPVS sets and chains): its Services live in the kernel's IPVS table, which cnitrace does not read — not covered", sp.nat_node_name));
        }
        if v.verdict == Outcome::Delivered {
            v.explanation = match &sp.chosen {
                Some(ep) => format!("{} reached {} through Service {} ({} → {}) and the answer came back", ctx.src_name(), ctx.dst_name(), sp.name(), sp.asked, ep.addr),
                None => format!("{} reached Service {} ({}) and the answer came back", ctx.src_name(), sp.name(), sp.asked),
            };
        }
        facts.append(&mut v.facts);
        v.facts = facts;
    }
    v
}

fn diagnose_pair(ctx: &Ctx) -> Verdict {
    let drop = ctx.trace.first_drop();
    let saw_traffic = !ctx.trace.packets.is_empty() || !ctx.trace.control.is_empty();
    let probe = ctx.probe;
    let all_answered = probe.sent > 0 && probe.answered == probe.sent;
    let passive_delivered = probe.sent == 0 && drop.is_none() && ctx.reply_reached_source();
    if all_answered || passive_delivered {
        return Verdict {
            verdict: Outcome::Delivered,
            cause: None,
            layer: None,
            function: None,
            reason: None,
            ifname: None,
            netns: None,
            dropped_at: None,
            explanation: format!("{} reached {} and the answer came back", ctx.src_name(), ctx.dst_name()),
            facts: ctx.delivery_facts(),
            missing: Vec::new(),
            doc: None,
        };
    }
    if probe.sent == 0 && probe.send_error.is_none() && !saw_traffic {
        return inconclusive(ctx, "no traffic of the pair was seen while tracing");
    }
    if let Some(v) = no_listener(ctx) {
        return v;
    }
    for cause in causes::CAUSES {
        if let Some(d) = (cause.detect)(ctx) {
            let mut facts = d.facts;
            if let Some(dr) = drop {
                facts.push(drop_facts(dr));
            }
            facts.extend(kprobe_facts(ctx));
            facts.extend(ctx.probe_facts());
            // The fault's place: the hop the cause names, else the kernel's drop site, else the last hop.
            let (netns, ifname) = match (d.hop, drop) {
                (Some((w, i)), _) => (Some(w), Some(i)),
                (None, Some(dr)) => (Some(dr.where_.clone()), Some(dr.ifname.clone())),
                (None, None) => ctx.last_hop().map(|e| (Some(e.where_.clone()), Some(e.ifname.clone()))).unwrap_or((None, None)),
            };
            return Verdict {
                verdict: Outcome::Dropped,
                cause: Some(cause.id.to_string()),
                layer: Some(cause.layer.to_string()),
                function: drop.and_then(|d| d.drop.as_ref().map(|i| i.function.clone())),
                reason: drop.and_then(|d| d.drop.as_ref().map(|i| i.reason.clone())),
                ifname,
                netns,
                dropped_at: drop.and_then(DropSite::of),
                explanation: d.explanation,
                facts,
                missing: Vec::new(),
                doc: Some(doc_of(cause.id)),
            };
        }
    }
    match drop {
        Some(d) => {
            let info = d.drop.as_ref().expect("drop event");
            let mut facts = vec![drop_facts(d)];
            facts.extend(kprobe_facts(ctx));
            facts.extend(ctx.probe_facts());
            facts.extend(ctx.trail_facts());
            Verdict {
                verdict: Outcome::Dropped,
                cause: None,
                layer: Some(layer_of_function(&info.function).into()),
                function: Some(info.function.clone()),
                reason: Some(info.reason.clone()),
                ifname: Some(d.ifname.clone()),
                netns: Some(d.where_.clone()),
                dropped_at: DropSite::of(d),
                explanation: format!(
                    "dropped in {} by {} ({}); none of the known causes matches the node's state",
                    d.where_, info.function, info.reason
                ),
                facts,
                missing: Vec::new(),
                doc: None,
            }
        }
        None => match unanswered_arp(ctx) {
            Some(v) => v,
            None => inconclusive(ctx, "the traffic was not answered, but no drop was seen and no known cause matches"),
        },
    }
}

/// The pair's own packet, freed in the destination's namespace because no socket there takes its port
/// (NO_SOCKET; the kernel answers port unreachable, or a reset): the network delivered it, so no network
/// cause applies — the service is not running, or listens on another port or address. Not a catalog
/// cause: nothing on the node's network is to repair.
fn no_listener(ctx: &Ctx) -> Option<Verdict> {
    let d = ctx.trace.first_drop()?;
    let info = d.drop.as_ref()?;
    let p = d.packet.as_ref()?;
    // A Service whose rules are half gone is not translated: the NodePort's packet reaching the node's
    // own stack untranslated is kube-proxy's fault, not a missing listener.
    if ctx.states.service.as_ref().is_some_and(|sp| sp.left_over.is_some()) {
        return None;
    }
    let arrived = ctx.states.dst_pod == Some(d.netns) && p.dst == ctx.dst_ip() && p.outer.is_none() && !p.icmp_error;
    if !arrived || !matches!(p.proto.as_str(), "udp" | "tcp") || !info.says("NO_SOCKET", &["__udp4_lib_rcv", "tcp_v4_rcv"]) {
        return None;
    }
    let mut facts = vec![drop_facts(d)];
    facts.extend(ctx.probe_facts());
    Some(Verdict {
        verdict: Outcome::Dropped,
        cause: None,
        layer: Some("socket".into()),
        function: Some(info.function.clone()),
        reason: Some(info.reason.clone()),
        ifname: Some(d.ifname.clone()),
        netns: Some(d.where_.clone()),
        dropped_at: DropSite::of(d),
        explanation: format!(
            "{} reached {} ({} {}), where nothing listens on its port ({}): the network delivered it; the service there is not running or listens elsewhere",
            p.what, ctx.dst_name(), d.where_, d.ifname, p.proto
        ),
        facts,
        missing: Vec::new(),
        doc: None,
    })
}

/// An ARP request of the path that nobody answered is a drop whatever its cause: the kernel will drop
/// the queued packet (NEIGH_FAILED). The verdict names the hop the trail proves — the target's own
/// interface when the request reached it, else the last place the request was seen and that nobody
/// there owns the address — and claims no kernel drop it did not see (function and reason null).
fn unanswered_arp(ctx: &Ctx) -> Option<Verdict> {
    let (target, events) = ctx.trace.unanswered_arp().into_iter().next()?;
    let asker = events.iter().find(|e| e.kind == crate::event::Kind::Xmit)?;
    let owner = ctx.states.by_inode.values().find(|st| st.addrs.iter().any(|a| a.addr == target && st.ifname(a.ifindex) != "lo"));
    let reached = owner.and_then(|o| events.iter().copied().find(|e| e.netns == o.inode && e.kind == crate::event::Kind::Receive));
    // The furthest the request got: its last transmit or receive outside the asker's namespace (a
    // flood comes back to the asker's own port; a consume is a copy being freed).
    let last = events
        .iter()
        .rev()
        .find(|e| e.netns != asker.netns && matches!(e.kind, crate::event::Kind::Xmit | crate::event::Kind::Receive))
        .copied()
        .unwrap_or(asker);
    let (hop, explanation) = match (owner, reached) {
        (Some(_), Some(r)) => (r, format!("the ARP request for {target} from {} {} reached {} {} and was not answered", asker.where_, asker.ifname, r.where_, r.ifname)),
        (Some(o), None) => (
            last,
            format!(
                "the ARP request for {target} from {} {} never reached {} (namespace {} holds {target}): it was last seen on {} {}",
                asker.where_, asker.ifname, ctx.node_name(o), o.name, last.where_, last.ifname
            ),
        ),
        (None, _) => (last, format!("the ARP request for {target} from {} {} was not answered: nobody on {} {} owns {target}", asker.where_, asker.ifname, last.where_, last.ifname)),
    };
    let mut facts = vec![format!(
        "ARP request for {target} seen at: {}",
        events.iter().filter(|e| matches!(e.kind, crate::event::Kind::Xmit | crate::event::Kind::Receive)).map(|e| format!("{} {}", e.where_, e.ifname)).fold(Vec::<String>::new(), |mut v, h| {
            if !v.contains(&h) {
                v.push(h);
            }
            v
        }).join(" → ")
    )];
    facts.extend(ctx.probe_facts());
    facts.extend(ctx.trail_facts());
    Some(Verdict {
        verdict: Outcome::Dropped,
        cause: None,
        layer: Some("neighbour".into()),
        function: None,
        reason: None,
        ifname: Some(hop.ifname.clone()),
        netns: Some(hop.where_.clone()),
        dropped_at: None,
        explanation: format!("{explanation}; none of the known causes matches the node's state"),
        facts,
        missing: Vec::new(),
        doc: None,
    })
}

fn inconclusive(ctx: &Ctx, why: &str) -> Verdict {
    let mut facts = ctx.probe_facts();
    facts.extend(ctx.trail_facts());
    let last = ctx.last_hop();
    Verdict {
        verdict: Outcome::Inconclusive,
        cause: None,
        layer: None,
        function: None,
        reason: None,
        ifname: last.map(|e| e.ifname.clone()),
        netns: last.map(|e| e.where_.clone()),
        dropped_at: None,
        explanation: why.to_string(),
        facts,
        missing: Vec::new(),
        doc: None,
    }
}

/// What this kernel did not give the verdict, in words: tracepoints it lacks, and a drop without a
/// reason (kfree_skb has one since 5.17). Optional kprobes are detail, not evidence: not listed.
pub fn missing_evidence(v: &Verdict, hooks: &[crate::probe::HookStatus], kfree_has_reason: bool) -> Vec<String> {
    let mut out = Vec::new();
    if !kfree_has_reason && v.function.is_some() {
        out.push(format!(
            "drop reason: this kernel's kfree_skb tracepoint carries none (it has since 5.17); the cause was named from where the kernel freed the packet ({}), the packets' trail and the node's state",
            v.function.clone().unwrap_or_default()
        ));
    }
    for h in hooks.iter().filter(|h| !h.attached && h.hook.starts_with("raw_tp/")) {
        out.push(format!("{}: {}", h.hook, h.reason.clone().unwrap_or_default()));
    }
    out
}

/// A coarse layer for drops no cause claims, from the dropping function's name.
pub fn layer_of_function(f: &str) -> &'static str {
    if f.starts_with("br_") {
        "bridge"
    } else if f.starts_with("nf_") || f.starts_with("nft_") || f.starts_with("ipt_") {
        "netfilter"
    } else if f.starts_with("vxlan") || f.starts_with("udp") || f.starts_with("__udp") {
        "vxlan"
    } else if f.starts_with("neigh") || f.starts_with("arp") {
        "neighbour"
    } else if f.starts_with("ip_") || f.starts_with("fib") {
        "ip"
    } else {
        "link"
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::HookStatus;

    fn dropped_at(function: &str) -> Verdict {
        Verdict {
            verdict: Outcome::Dropped,
            cause: Some("netfilter-policy-drop".into()),
            layer: Some("netfilter".into()),
            function: Some(function.into()),
            reason: Some("unknown (this kernel's kfree_skb has no reason)".into()),
            ifname: None,
            netns: None,
            dropped_at: None,
            explanation: String::new(),
            facts: Vec::new(),
            missing: Vec::new(),
            doc: None,
        }
    }

    #[test]
    fn a_kernel_without_drop_reasons_or_a_tracepoint_says_so() {
        let hooks = vec![
            HookStatus { hook: "raw_tp/kfree_skb".into(), attached: true, reason: None },
            HookStatus { hook: "raw_tp/neigh_update".into(), attached: false, reason: Some("no such tracepoint".into()) },
            HookStatus { hook: "kprobe/*".into(), attached: false, reason: Some("no kprobes".into()) },
        ];
        let m = missing_evidence(&dropped_at("nf_hook_slow"), &hooks, false);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].starts_with("drop reason:") && m[0].contains("nf_hook_slow"), "{m:?}");
        assert_eq!(m[1], "raw_tp/neigh_update: no such tracepoint");
        // kprobes are detail, not evidence; a kernel with reasons and every tracepoint lacks nothing.
        assert!(missing_evidence(&dropped_at("nf_hook_slow"), &hooks[..1], true).is_empty());
    }
}
