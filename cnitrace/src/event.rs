//! Raw kernel records, decoded once into rich events: names for namespaces, interfaces, drop reasons and
//! locations. Text and JSON both render from this model.

use std::{collections::HashMap, net::Ipv4Addr};

use cnitrace_common::{pkt_flags, Event, EventKind, ETH_P_ARP};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Xmit,
    Receive,
    Queue,
    Drop,
    Consume,
    Route,
    Neigh,
    /// An optional kprobe: a kernel function entered or returned for the packet.
    Func,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Packet {
    /// "icmp", "tcp", "udp", "arp", or the protocol number.
    pub proto: String,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// A short description: "echo request id 7 seq 1", "who-has 10.244.0.19", "SYN 8096"...
    pub what: String,
    pub len: u32,
    /// Underlay header when this packet travelled inside VXLAN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer: Option<Outer>,
    /// An ICMP error quoting a packet of the pair.
    pub icmp_error: bool,
    /// Key that groups all events of one packet (direction, protocol, id/seq).
    pub key: String,
    /// ICMP echo id (request or reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_id: Option<u16>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outer {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub vni: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DropInfo {
    /// The kernel's drop reason name (from BTF), or "unknown (no reason on this kernel)".
    pub reason: String,
    pub reason_code: u32,
    /// The function that freed the packet ("br_handle_frame"), from the location symbol.
    pub function: String,
    pub location: u64,
}

impl DropInfo {
    /// The kernel gave no reason: none on this kernel (before 5.17), or NOT_SPECIFIED where this
    /// kernel's call site had not been given one yet.
    pub fn reasonless(&self) -> bool {
        self.reason_code == 0 || self.reason == "NOT_SPECIFIED"
    }

    /// The drop is `reason`, or — on a kernel that gave no reason — happened in one of `locations`, the
    /// functions that drop for that reason (a `.constprop.0`-style suffix is the same function).
    pub fn says(&self, reason: &str, locations: &[&str]) -> bool {
        if self.reason == reason {
            return true;
        }
        let base = self.function.split('.').next().unwrap_or(&self.function);
        self.reasonless() && locations.contains(&base)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteInfo {
    pub table: u32,
    /// 0 found; a negative errno otherwise.
    pub err: i32,
    pub oif: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NeighInfo {
    pub ip: Ipv4Addr,
    pub state: String,
    pub lladdr: String,
}

/// What an optional kprobe saw: the function, what it was doing, and (on return) its answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FuncInfo {
    pub function: String,
    /// "FORWARD (ipv4)" for netfilter; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// The return value, for kretprobes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<i32>,
    /// The return value in words: "accept", "DROP", "refused"...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
}

impl FuncInfo {
    /// The function said no to the packet (netfilter drop, reverse-path check refused).
    pub fn refused(&self) -> bool {
        self.ret.is_some_and(|r| r < 0)
    }
}

fn nf_family(pf: u32) -> &'static str {
    match pf {
        1 => "inet",
        2 => "ipv4",
        3 => "arp",
        5 => "netdev",
        7 => "bridge",
        10 => "ipv6",
        _ => "?",
    }
}

fn nf_hook(pf: u32, hook: u32) -> String {
    let name = match (pf, hook) {
        (3, 0) => "IN",
        (3, 1) => "OUT",
        (3, 2) => "FORWARD",
        (_, 0) => "PREROUTING",
        (_, 1) => "INPUT",
        (_, 2) => "FORWARD",
        (_, 3) => "OUTPUT",
        (_, 4) => "POSTROUTING",
        (7, 5) => "BROUTING",
        _ => return format!("hook {hook}"),
    };
    name.to_string()
}

/// Names a Func record: (function, detail, verdict).
pub fn func_info(id: u32, extra: u32, ret: Option<i32>) -> FuncInfo {
    use cnitrace_common::func;
    let errno = |r: i32| std::io::Error::from_raw_os_error(-r).to_string();
    let (function, detail, verdict) = match id {
        func::NF_HOOK_SLOW => {
            // Entry only: the drop that follows is the verdict.
            let (hook, pf) = (extra & 0xff, (extra >> 8) & 0xff);
            ("nf_hook_slow", format!("{} ({})", nf_hook(pf, hook), nf_family(pf)), None)
        }
        func::FIB_VALIDATE_SOURCE => {
            let verdict = ret.map(|r| if r < 0 { format!("refused ({})", errno(r)) } else { "passed".to_string() });
            ("fib_validate_source", "reverse-path check".to_string(), verdict)
        }
        func::BR_FORWARD => ("br_forward", String::new(), None),
        func::VXLAN_XMIT => ("vxlan_xmit", String::new(), None),
        func::VXLAN_RCV => ("vxlan_rcv", String::new(), None),
        func::IP_FORWARD => ("ip_forward", String::new(), None),
        other => return FuncInfo { function: format!("function {other}"), detail: String::new(), ret, verdict: None },
    };
    FuncInfo { function: function.to_string(), detail, ret, verdict }
}

/// One decoded event.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TraceEvent {
    /// Nanoseconds since the first event of the trace.
    pub t_ns: u64,
    pub kind: Kind,
    pub netns: u32,
    /// Pod or node name ("debug", "storagenodet3500", "root").
    pub where_: String,
    pub ifindex: u32,
    pub ifname: String,
    pub cpu: u32,
    pub skb: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet: Option<Packet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neigh: Option<NeighInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub func: Option<FuncInfo>,
    /// The packet's first bytes from its network header, captured in the kernel (`follow --write`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<PacketBytes>,
}

/// Captured packet bytes; hex in JSON (`--json`, recordings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketBytes(pub Vec<u8>);

impl Serialize for PacketBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut hex = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            use std::fmt::Write;
            let _ = write!(hex, "{b:02x}");
        }
        s.serialize_str(&hex)
    }
}

impl<'de> Deserialize<'de> for PacketBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(d)?;
        if hex.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd number of hex digits"));
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16).map_err(serde::de::Error::custom))
            .collect::<Result<Vec<u8>, _>>()
            .map(PacketBytes)
    }
}

/// Names the decoder needs, gathered before tracing.
#[derive(Default)]
pub struct Names {
    /// netns inode → display name (pod or node name).
    pub netns: HashMap<u32, String>,
    /// (netns inode, ifindex) → interface name.
    pub ifnames: HashMap<(u32, u32), String>,
    pub drop_reasons: std::collections::BTreeMap<u32, String>,
    pub has_reasons: bool,
}

pub struct Decoder {
    names: Names,
    t0: Option<u64>,
    /// Drop locations named so far (a trace has a handful).
    functions: HashMap<u64, String>,
}

fn ip(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

fn nud(state: u32) -> String {
    let names = [
        (0x01, "incomplete"),
        (0x02, "reachable"),
        (0x04, "stale"),
        (0x08, "delay"),
        (0x10, "probe"),
        (0x20, "failed"),
        (0x40, "noarp"),
        (0x80, "permanent"),
    ];
    let s: Vec<&str> = names.iter().filter(|(b, _)| state & b != 0).map(|(_, n)| *n).collect();
    if s.is_empty() { "none".into() } else { s.join("|") }
}

fn mac(v: u64) -> String {
    v.to_le_bytes()[..6].iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl Decoder {
    pub fn new(names: Names) -> Self {
        Decoder { names, t0: None, functions: HashMap::new() }
    }

    /// Drop locations among `records` this decoder cannot name yet: naming one reads /proc/kallsyms
    /// (~50 ms here), which the caller does before decoding them, away from whatever must not wait
    /// (a location not learned is shown as its address).
    pub fn unnamed_locations<'a>(&self, records: impl Iterator<Item = &'a Event>) -> Vec<u64> {
        let mut v: Vec<u64> = records
            .filter(|e| e.header.kind == EventKind::Drop as u32 && !self.functions.contains_key(&e.location))
            .map(|e| e.location)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Names for `locations`, found with [`crate::probe::kallsyms::resolve`] (an address it could not name is shown
    /// as such).
    pub fn learn_functions(&mut self, locations: &[u64], mut names: HashMap<u64, String>) {
        for l in locations {
            let f = names.remove(l).unwrap_or_else(|| format!("{l:#x}"));
            self.functions.insert(*l, f);
        }
    }

    fn where_(&self, netns: u32) -> String {
        if netns == 0 {
            return "?".into();
        }
        self.names.netns.get(&netns).cloned().unwrap_or_else(|| format!("netns:{netns}"))
    }

    fn ifname(&self, netns: u32, ifindex: u32) -> String {
        if ifindex == 0 {
            return String::new();
        }
        self.names.ifnames.get(&(netns, ifindex)).cloned().unwrap_or_else(|| format!("if{ifindex}"))
    }

    fn packet(&self, e: &Event) -> Option<Packet> {
        let p = &e.pkt;
        if p.ethertype == 0 {
            return None;
        }
        let (src, dst) = (ip(p.saddr), ip(p.daddr));
        if p.ethertype == ETH_P_ARP {
            let what = match p.id {
                1 => format!("ARP who-has {dst} tell {src}"),
                2 => format!("ARP reply {src} is-at"),
                op => format!("ARP op {op}"),
            };
            return Some(Packet {
                proto: "arp".into(),
                src,
                dst,
                what,
                len: p.len,
                outer: None,
                icmp_error: false,
                key: format!("arp {} {src}>{dst}", p.id),
                echo_id: None,
            });
        }
        let icmp_error = p.flags & pkt_flags::ICMP_ERROR != 0;
        let (proto, what, key) = match p.ip_proto {
            1 if icmp_error => (
                "icmp".to_string(),
                format!("ICMP error type {} code {} from {} about {src} > {dst}", p.sport, p.dport, ip(p.outer_saddr)),
                format!("icmp-error {} {src}>{dst}", p.sport),
            ),
            1 => {
                let what = match p.sport {
                    8 => format!("echo request id {} seq {}", p.id, p.seq),
                    0 => format!("echo reply id {} seq {}", p.id, p.seq),
                    t => format!("icmp type {t} code {}", p.dport),
                };
                ("icmp".to_string(), what, format!("icmp {} {src}>{dst} {} {}", p.sport, p.id, p.seq))
            }
            6 => ("tcp".into(), format!("tcp {} > {}", p.sport, p.dport), format!("tcp {src}:{}>{dst}:{}", p.sport, p.dport)),
            17 => ("udp".into(), format!("udp {} > {}", p.sport, p.dport), format!("udp {src}:{}>{dst}:{}", p.sport, p.dport)),
            n => (n.to_string(), format!("ip proto {n}"), format!("ip{n} {src}>{dst}")),
        };
        let outer = (p.flags & pkt_flags::ENCAP != 0).then(|| Outer { src: ip(p.outer_saddr), dst: ip(p.outer_daddr), vni: p.vni });
        let echo_id = (p.ip_proto == 1 && !icmp_error && (p.sport == 0 || p.sport == 8)).then_some(p.id);
        Some(Packet { proto, src, dst, what, len: p.len, outer, icmp_error, key, echo_id })
    }

    /// The kernel's clock (CLOCK_MONOTONIC, ns) at the trace's first record: `TraceEvent::t_ns` counts
    /// from it.
    pub fn t0(&self) -> Option<u64> {
        self.t0
    }

    /// [`Decoder::decode`] of a ring buffer record, with the bytes it captured.
    pub fn decode_record(&mut self, r: &crate::probe::Record) -> Option<TraceEvent> {
        let mut ev = self.decode(&r.event)?;
        ev.bytes = r.bytes.as_ref().map(|b| PacketBytes(b.to_vec()));
        Some(ev)
    }

    pub fn decode(&mut self, e: &Event) -> Option<TraceEvent> {
        let kind = match EventKind::from_u32(e.header.kind)? {
            EventKind::Xmit => Kind::Xmit,
            EventKind::Receive => Kind::Receive,
            EventKind::Queue => Kind::Queue,
            EventKind::Drop => Kind::Drop,
            EventKind::Consume => Kind::Consume,
            EventKind::FibLookup => Kind::Route,
            EventKind::NeighUpdate | EventKind::NeighTimer => Kind::Neigh,
            EventKind::FuncEntry | EventKind::FuncReturn => Kind::Func,
        };
        let t0 = *self.t0.get_or_insert(e.header.ts_ns);
        let netns = e.header.netns;
        let mut ev = TraceEvent {
            t_ns: e.header.ts_ns.saturating_sub(t0),
            kind: kind.clone(),
            netns,
            where_: self.where_(netns),
            ifindex: e.header.ifindex,
            ifname: self.ifname(netns, e.header.ifindex),
            cpu: e.header.cpu,
            skb: e.header.skb,
            packet: None,
            drop: None,
            route: None,
            neigh: None,
            func: None,
            bytes: None,
        };
        match kind {
            Kind::Route => {
                ev.packet = self.packet(e);
                ev.route = Some(RouteInfo {
                    table: e.reason,
                    err: e.err,
                    oif: (e.oif != 0).then(|| self.ifname(netns, e.oif)),
                });
            }
            Kind::Neigh => {
                ev.neigh = Some(NeighInfo { ip: ip(e.pkt.daddr), state: nud(e.reason), lladdr: mac(e.location) });
            }
            Kind::Drop => {
                ev.packet = self.packet(e);
                // Named beforehand (`unnamed_locations`, `learn_functions`): decoding never reads kallsyms.
                let function = self.functions.get(&e.location).cloned().unwrap_or_else(|| format!("{:#x}", e.location));
                let reason = if self.names.has_reasons {
                    self.names.drop_reasons.get(&e.reason).cloned().unwrap_or_else(|| format!("reason {}", e.reason))
                } else {
                    "unknown (this kernel's kfree_skb has no reason)".into()
                };
                ev.drop = Some(DropInfo { reason, reason_code: e.reason, function, location: e.location });
            }
            Kind::Func => {
                ev.packet = self.packet(e);
                let ret = (e.header.kind == EventKind::FuncReturn as u32).then_some(e.err);
                ev.func = Some(func_info(e.reason, e.oif, ret));
            }
            _ => ev.packet = self.packet(e),
        }
        Some(ev)
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reasonless_drop_is_read_from_its_location() {
        let d = |reason: &str, code: u32, function: &str| DropInfo { reason: reason.into(), reason_code: code, function: function.into(), location: 0 };
        assert!(d("IP_RPFILTER", 42, "ip_rcv_finish_core.constprop.0").says("IP_RPFILTER", &["ip_rcv_finish_core"]));
        // 5.10: no reason at all; the function is the evidence.
        assert!(d("unknown (this kernel's kfree_skb has no reason)", 0, "ip_rcv_finish_core.constprop.0").says("IP_RPFILTER", &["ip_rcv_finish_core"]));
        // A kernel that has reasons, but not yet at this call site.
        assert!(d("NOT_SPECIFIED", 2, "br_handle_frame").says("BRIDGE_INGRESS_STP_STATE", &["br_handle_frame"]));
        // A different reason at the same function is not this one.
        assert!(!d("NETFILTER_DROP", 7, "ip_rcv_finish_core").says("IP_RPFILTER", &["ip_rcv_finish_core"]));
        assert!(!d("unknown", 0, "ip_forward").says("IP_RPFILTER", &["ip_rcv_finish_core"]));
    }

    #[test]
    fn kprobe_records_are_named_in_netfilters_and_the_kernels_words() {
        use cnitrace_common::func;
        let f = func_info(func::NF_HOOK_SLOW, 2 | 2 << 8, None);
        assert_eq!((f.function.as_str(), f.detail.as_str(), f.verdict.as_deref()), ("nf_hook_slow", "FORWARD (ipv4)", None));
        assert!(!f.refused());
        assert_eq!(func_info(func::NF_HOOK_SLOW, 4 | 7 << 8, None).detail, "POSTROUTING (bridge)");
        assert_eq!(func_info(func::NF_HOOK_SLOW, 1 | 3 << 8, None).detail, "OUT (arp)");
        let f = func_info(func::FIB_VALIDATE_SOURCE, 0, Some(-18));
        assert!(f.refused() && f.verdict.as_deref().is_some_and(|v| v.starts_with("refused")), "{f:?}");
        let f = func_info(func::BR_FORWARD, 0, None);
        assert_eq!((f.function.as_str(), f.verdict), ("br_forward", None));
    }
}
