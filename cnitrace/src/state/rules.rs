//! The rule sets of every netfilter backend, with counters: iptables-nft, iptables-legacy, native nft.
//! Read by running each backend's own dump inside the current thread's namespace.

use std::process::Stdio;

use cnitrace_tools::{self as tools, Tool};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RuleSets {
    /// `iptables-nft-save -c` (None: the tool is not installed).
    pub iptables_nft: Option<String>,
    /// `iptables-legacy-save -c`.
    pub iptables_legacy: Option<String>,
    /// `nft -a list ruleset` (with rule handles).
    pub nft: Option<String>,
}

fn dump(tool: &Tool, args: &[&str]) -> Option<String> {
    let out = tool.command().args(args).stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn read() -> RuleSets {
    RuleSets {
        iptables_nft: dump(&tools::IPTABLES_NFT_SAVE, &["-c"]),
        iptables_legacy: dump(&tools::IPTABLES_LEGACY_SAVE, &["-c"]),
        nft: dump(&tools::NFT, &["-a", "list", "ruleset"]),
    }
}

/// One rule (or chain policy) of an iptables dump, with its counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptRule {
    pub table: String,
    pub chain: String,
    /// The rule as `iptables-save` writes it (without counters); for a policy: ":CHAIN POLICY".
    pub rule: String,
    pub is_policy: bool,
    /// "DROP", "REJECT", "ACCEPT", a chain name...
    pub target: String,
    pub packets: u64,
}

/// Parses `iptables-save -c` output into rules and policies.
pub fn parse_iptables(dump: &str) -> Vec<IptRule> {
    let mut out = Vec::new();
    let mut table = String::new();
    for line in dump.lines() {
        let line = line.trim();
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(rest) = line.strip_prefix(':') {
            // :FORWARD DROP [12:1008]
            let mut parts = rest.split_whitespace();
            let chain = parts.next().unwrap_or("").to_string();
            let policy = parts.next().unwrap_or("-").to_string();
            let packets = counters(parts.next().unwrap_or(""));
            if policy != "-" {
                out.push(IptRule {
                    table: table.clone(),
                    rule: format!(":{chain} {policy}"),
                    chain,
                    is_policy: true,
                    target: policy,
                    packets,
                });
            }
        } else if line.starts_with('[') {
            // [3:252] -A FORWARD -d 10.244.1.0/24 -j DROP
            let (c, rule) = line.split_once(' ').unwrap_or((line, ""));
            let chain = rule.split_whitespace().nth(1).unwrap_or("").to_string();
            let target = rule
                .split_whitespace()
                .skip_while(|w| *w != "-j" && *w != "-g")
                .nth(1)
                .unwrap_or("")
                .to_string();
            out.push(IptRule {
                table: table.clone(),
                chain,
                rule: rule.to_string(),
                is_policy: false,
                target,
                packets: counters(c),
            });
        }
    }
    out
}

fn counters(c: &str) -> u64 {
    c.trim_matches(|ch| ch == '[' || ch == ']').split(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
}

/// A native nft rule with a verdict, and its counter when it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftRule {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub rule: String,
    pub packets: Option<u64>,
    pub verdict: String,
    /// `hook forward`, ... of the chain the rule is in.
    pub hook: Option<String>,
    /// The base chain's priority as nft prints it ("filter + 10").
    pub priority: Option<String>,
    pub policy: Option<String>,
    /// A netdev base chain's device (`device "eth0"`); None for a chain of several devices.
    pub device: Option<String>,
    /// The rule's handle (`nft -a`), to delete exactly this rule.
    pub handle: Option<u64>,
    /// The handle of the rule before it in its chain (None: the first), to put it back in its place.
    pub after: Option<u64>,
}

/// Parses `nft list ruleset` into rules (one per line inside chains) and chain policies.
pub fn parse_nft(dump: &str) -> Vec<NftRule> {
    let mut out = Vec::new();
    let (mut family, mut table, mut chain) = (String::new(), String::new(), String::new());
    let (mut hook, mut policy, mut priority): (Option<String>, Option<String>, Option<String>) = (None, None, None);
    let mut device: Option<String> = None;
    for line in dump.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("table ") {
            let mut p = rest.split_whitespace();
            family = p.next().unwrap_or("").into();
            table = p.next().unwrap_or("").into();
        } else if let Some(rest) = l.strip_prefix("chain ") {
            chain = rest.split_whitespace().next().unwrap_or("").into();
            // "chain forward { # handle 2"
            hook = None;
            policy = None;
            priority = None;
            device = None;
        } else if l.starts_with("type ") {
            hook = l.split_whitespace().skip_while(|w| *w != "hook").nth(1).map(str::to_string);
            priority = l.split_once(" priority ").map(|(_, r)| r.split(';').next().unwrap_or("").trim().to_string());
            device = l.split_whitespace().skip_while(|w| *w != "device").nth(1).filter(|d| *d != "=").map(|d| d.trim_matches(|c| c == '"' || c == ',').to_string());
            policy = l
                .split_whitespace()
                .skip_while(|w| *w != "policy")
                .nth(1)
                .map(|p| p.trim_end_matches(';').to_string());
            if let Some(p) = &policy {
                out.push(NftRule {
                    family: family.clone(),
                    table: table.clone(),
                    chain: chain.clone(),
                    rule: format!("policy {p}"),
                    packets: None,
                    verdict: p.clone(),
                    hook: hook.clone(),
                    priority: priority.clone(),
                    policy: policy.clone(),
                    device: device.clone(),
                    handle: None,
                    after: None,
                });
            }
        } else if !l.is_empty() && l != "}" && !l.contains('{') && !chain.is_empty() {
            let after = out.iter().rev().take_while(|r: &&NftRule| r.family == family && r.table == table && r.chain == chain).find(|r| r.handle.is_some()).and_then(|r| r.handle);
            let (l, handle) = match l.split_once(" # handle ") {
                Some((r, h)) => (r.trim(), h.trim().parse().ok()),
                None => (l, None),
            };
            let words: Vec<&str> = l.split_whitespace().collect();
            let verdict = ["drop", "reject", "accept", "jump", "goto", "return"]
                .iter()
                .find(|v| words.contains(v))
                .map(|v| v.to_string())
                .unwrap_or_default();
            let packets = words.windows(2).find(|w| w[0] == "packets").and_then(|w| w[1].parse().ok());
            out.push(NftRule {
                family: family.clone(),
                table: table.clone(),
                chain: chain.clone(),
                rule: l.to_string(),
                packets,
                verdict,
                hook: hook.clone(),
                priority: priority.clone(),
                policy: policy.clone(),
                device: device.clone(),
                handle,
                after,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_counters_and_policies() {
        let dump = "*filter\n:INPUT ACCEPT [10:800]\n:FORWARD DROP [3:252]\n:FLANNEL-FWD - [0:0]\n[2:168] -A FORWARD -d 10.244.1.0/24 -j DROP\n[0:0] -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\nCOMMIT\n";
        let rules = parse_iptables(dump);
        let pol = rules.iter().find(|r| r.is_policy && r.chain == "FORWARD").expect("FORWARD policy");
        assert_eq!((pol.target.as_str(), pol.packets), ("DROP", 3));
        let drop = rules.iter().find(|r| !r.is_policy && r.target == "DROP").expect("the DROP rule");
        assert_eq!(drop.rule, "-A FORWARD -d 10.244.1.0/24 -j DROP");
        assert_eq!(drop.packets, 2);
        assert!(!rules.iter().any(|r| r.chain == "FLANNEL-FWD" && r.is_policy), "user chains have no policy");
    }

    #[test]
    fn nft_rules_with_counters() {
        let dump = "table inet hardening { # handle 7\n\tchain forward { # handle 1\n\t\ttype filter hook forward priority filter + 10; policy accept;\n\t\tip daddr 10.244.1.0/24 counter packets 4 bytes 336 drop # handle 2\n\t}\n}\n";
        let rules = parse_nft(dump);
        let r = rules.iter().find(|r| r.verdict == "drop").expect("drop rule");
        assert_eq!(r.handle, Some(2));
        assert_eq!(r.chain, "forward");
        assert_eq!(r.rule, "ip daddr 10.244.1.0/24 counter packets 4 bytes 336 drop");
        assert_eq!(r.packets, Some(4));
        assert_eq!(r.hook.as_deref(), Some("forward"));
        assert_eq!(r.table, "hardening");
        assert_eq!(r.after, None, "the first rule of its chain");
    }

    #[test]
    fn an_nft_rule_knows_the_rule_before_it() {
        let dump = "table inet fw { # handle 9\n\tchain fwd { # handle 1\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tct state established accept # handle 4\n\t\tip daddr 10.9.1.0/24 drop # handle 6\n\t}\n\tchain other { # handle 2\n\t\tip daddr 10.9.2.0/24 drop # handle 8\n\t}\n}\n";
        let rules = parse_nft(dump);
        let after = |rule: &str| rules.iter().find(|r| r.rule == rule).map(|r| r.after);
        assert_eq!(after("ct state established accept"), Some(None));
        assert_eq!(after("ip daddr 10.9.1.0/24 drop"), Some(Some(4)));
        // Another chain starts afresh.
        assert_eq!(after("ip daddr 10.9.2.0/24 drop"), Some(None));
    }
}
