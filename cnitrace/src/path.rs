//! Events grouped into per-packet timelines, and the point where the pair's traffic died.

use serde::{Deserialize, Serialize};

use crate::event::{Kind, TraceEvent};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PacketPath {
    pub key: String,
    pub what: String,
    pub events: Vec<TraceEvent>,
    /// Address translations on the way (kube-proxy's DNAT, a masquerade, their reversal): the packet
    /// keeps its first key, the events after a translation carry the new addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat: Vec<Nat>,
}

/// One address translation seen between two hops of the same packet (the same skb, not freed between).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nat {
    /// The first hop with the new addresses.
    pub t_ns: u64,
    pub where_: String,
    pub ifname: String,
    /// `ADDR:PORT` (or the address, for ICMP) before and after, source then destination.
    pub src: (String, String),
    pub dst: (String, String),
    /// The rule that did it, where follow could tell (`KUBE-SEP-…`, `endpoint-…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl Nat {
    pub fn dnat(&self) -> bool {
        self.dst.0 != self.dst.1
    }
    pub fn snat(&self) -> bool {
        self.src.0 != self.src.1
    }
    /// `10.96.12.7:8096 → 10.244.0.19:8096` (destination), `src 10.244.0.20:4 → 10.244.0.1:9` (source).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.dnat() {
            parts.push(format!("dst {} → {}", self.dst.0, self.dst.1));
        }
        if self.snat() {
            parts.push(format!("src {} → {}", self.src.0, self.src.1));
        }
        let by = self.by.as_ref().map(|b| format!(" by {b}")).unwrap_or_default();
        format!("NAT {}{by}", parts.join(", "))
    }
}

/// Source and destination of a packet as `ADDR[:PORT]`, from its decoded key (`tcp A:p>B:q`, `icmp 8
/// A>B id seq`).
fn ends(p: &crate::event::Packet) -> Option<(String, String)> {
    let body = p.key.split_whitespace().nth(if p.proto == "icmp" { 2 } else { 1 })?;
    let (a, b) = body.split_once('>')?;
    Some((a.to_string(), b.to_string()))
}

impl PacketPath {
    pub fn last(&self) -> &TraceEvent {
        self.events.last().expect("a path has events")
    }
    pub fn dropped(&self) -> Option<&TraceEvent> {
        self.events.iter().find(|e| e.kind == Kind::Drop && !is_noise(e))
    }
    /// Seen on this interface in this namespace (display names)?
    pub fn seen_at(&self, where_: &str, ifname: &str) -> bool {
        self.events.iter().any(|e| e.where_ == where_ && e.ifname == ifname && e.kind != Kind::Drop)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Trace {
    /// Every decoded event, in time order (what `--json` prints one per line).
    pub events: Vec<TraceEvent>,
    pub packets: Vec<PacketPath>,
    /// Route lookups and neighbour changes for the pair's addresses.
    pub control: Vec<TraceEvent>,
}

/// Drops that are not the pair's traffic dying: a raw-socket ping's echo reply is consumed by the raw
/// socket and then freed with NO_SOCKET (by `ping_rcv`; by `icmp_rcv` without a reason on kernels
/// before 5.17); neighbour queues purged as links go away; TCP discarding what it already has.
pub fn is_noise(e: &TraceEvent) -> bool {
    let Some(d) = &e.drop else { return false };
    let echo_reply = e.packet.as_ref().is_some_and(|p| p.proto == "icmp" && p.what.starts_with("echo reply"));
    let at = |f: &str| d.function.split('.').next() == Some(f) && (d.reason == "NO_SOCKET" || d.reasonless());
    at("ping_rcv")
        || (echo_reply && at("icmp_rcv"))
        || d.reason == "QUEUE_PURGE"
        || TCP_DUPLICATES.contains(&d.reason.as_str())
        || e.packet.as_ref().is_some_and(|p| p.icmp_error)
}

/// A route lookup that found nothing: an error other than the local table's miss or a policy rule's
/// "try the next table" (-EAGAIN).
pub fn is_route_failure(e: &TraceEvent) -> bool {
    e.kind == Kind::Route && e.route.as_ref().is_some_and(|r| r.err != 0 && r.err != -11 && r.table != 255)
}

/// TCP's receiver freeing a segment whose data (or acknowledgement) it had already: a retransmission
/// that arrived after all, data already in the out-of-order queue. The data got through; where a copy
/// was lost on the way, that loss is a drop of its own. A bulk flow of a healthy pair shows some
/// (`cargo xtask bench` saw TCP_OLD_DATA end one traced run in three), and a trace that stopped there
/// named TCP as the place the pair's traffic died.
const TCP_DUPLICATES: &[&str] = &["TCP_OLD_DATA", "TCP_OFOMERGE", "TCP_OLD_SEQUENCE", "TCP_OLD_ACK"];

/// The translation between an skb's previous hop (`before`, at `t`) and this one, if its addresses
/// changed: same protocol, not freed in between, not a reply that reused a freed skb's memory (the
/// two ends swapped), within a second.
fn translation(t: u64, before: &crate::event::Packet, e: &TraceEvent, now: &crate::event::Packet) -> Option<Nat> {
    if before.key == now.key || before.proto != now.proto || now.proto == "arp" || before.icmp_error || now.icmp_error {
        return None;
    }
    if e.t_ns.saturating_sub(t) > 1_000_000_000 {
        return None;
    }
    let (b, n) = (ends(before)?, ends(now)?);
    if b.0 == n.1 && b.1 == n.0 {
        return None;
    }
    if b == n {
        // Same ends, another id or sequence: another packet.
        return None;
    }
    Some(Nat { t_ns: e.t_ns, where_: e.where_.clone(), ifname: e.ifname.clone(), src: (b.0, n.0), dst: (b.1, n.1), by: None })
}

impl Trace {
    /// Every translation of the trace, in time order.
    pub fn translations(&self) -> Vec<&Nat> {
        let mut v: Vec<&Nat> = self.packets.iter().flat_map(|p| p.nat.iter()).collect();
        v.sort_by_key(|n| n.t_ns);
        v
    }

    /// Builds timelines from decoded events (any order).
    pub fn build(mut events: Vec<TraceEvent>) -> Trace {
        events.sort_by_key(|e| e.t_ns);
        // Records matched only through the tracking map carry no headers: they belong to the packet last
        // seen with the same skb.
        let mut last_key_of_skb: std::collections::HashMap<u64, (String, String)> = Default::default();
        // Per skb: its last event with headers (time, kind, the packet), to see a translation.
        let mut last_of_skb: std::collections::HashMap<u64, (u64, crate::event::Packet)> = Default::default();
        // A translated packet's key → the key it had first (its path).
        let mut first_key: std::collections::HashMap<String, String> = Default::default();
        let mut packets: Vec<PacketPath> = Vec::new();
        let mut control = Vec::new();
        let mut last_on_cpu: std::collections::HashMap<u32, (u32, String)> = Default::default();
        for e in &mut events {
            match e.kind {
                Kind::Route | Kind::Neigh => {
                    // A route lookup has no namespace argument: it ran where this CPU's packet just was.
                    if e.netns == 0 {
                        if let Some((ns, name)) = last_on_cpu.get(&e.cpu) {
                            e.netns = *ns;
                            e.where_ = name.clone();
                        }
                    }
                    control.push(e.clone());
                    continue;
                }
                _ => {}
            }
            last_on_cpu.insert(e.cpu, (e.netns, e.where_.clone()));
            let mut nat = None;
            let (key, what) = match &e.packet {
                Some(p) => {
                    if let Some((t, before)) = last_of_skb.get(&e.skb) {
                        nat = translation(*t, before, e, p);
                        if nat.is_some() && !first_key.contains_key(&p.key) {
                            let orig = first_key.get(&before.key).cloned().unwrap_or_else(|| before.key.clone());
                            first_key.insert(p.key.clone(), orig);
                        }
                    }
                    last_of_skb.insert(e.skb, (e.t_ns, p.clone()));
                    last_key_of_skb.insert(e.skb, (p.key.clone(), p.what.clone()));
                    (p.key.clone(), p.what.clone())
                }
                None => match last_key_of_skb.get(&e.skb) {
                    Some(k) => k.clone(),
                    None => continue,
                },
            };
            if matches!(e.kind, Kind::Drop | Kind::Consume) {
                // Freed: an skb at this address from now on is another packet.
                last_of_skb.remove(&e.skb);
            }
            let key = first_key.get(&key).cloned().unwrap_or(key);
            let path = match packets.iter().position(|p| p.key == key) {
                Some(i) => &mut packets[i],
                None => {
                    packets.push(PacketPath { key, what, events: Vec::new(), nat: Vec::new() });
                    packets.last_mut().expect("just pushed")
                }
            };
            path.events.push(e.clone());
            if let Some(n) = nat {
                if !path.nat.iter().any(|m| m.src == n.src && m.dst == n.dst) {
                    path.nat.push(n);
                }
            }
        }
        Trace { events, packets, control }
    }

    /// The first drop of the pair's traffic that is not noise.
    pub fn first_drop(&self) -> Option<&TraceEvent> {
        self.packets.iter().filter_map(|p| p.dropped()).min_by_key(|e| e.t_ns)
    }

    pub fn packets_matching(&self, pred: impl Fn(&PacketPath) -> bool) -> impl Iterator<Item = &PacketPath> {
        self.packets.iter().filter(move |p| pred(p))
    }

    /// Did any ARP request for `ip` reach the interface?
    pub fn arp_request_seen(&self, ip: std::net::Ipv4Addr, where_: &str, ifname: &str) -> bool {
        self.packets.iter().any(|p| {
            p.events.first().and_then(|e| e.packet.as_ref()).is_some_and(|pk| pk.proto == "arp" && pk.dst == ip && p.key.starts_with("arp 1"))
                && p.seen_at(where_, ifname)
        })
    }

    pub fn arp_reply_from(&self, ip: std::net::Ipv4Addr) -> bool {
        self.packets.iter().any(|p| p.key.starts_with("arp 2") && p.events.iter().any(|e| e.packet.as_ref().is_some_and(|pk| pk.src == ip)))
    }

    /// The ARP requests the trace shows asked (transmitted) and never answered, by target, oldest
    /// first, each with every event of its request packets in time order.
    pub fn unanswered_arp(&self) -> Vec<(std::net::Ipv4Addr, Vec<&TraceEvent>)> {
        let mut out: Vec<(std::net::Ipv4Addr, Vec<&TraceEvent>)> = Vec::new();
        for p in self.packets.iter().filter(|p| p.key.starts_with("arp 1")) {
            let Some(target) = p.events.iter().find_map(|e| e.packet.as_ref().filter(|pk| pk.src != pk.dst).map(|pk| pk.dst)) else { continue };
            if self.arp_reply_from(target) || !p.events.iter().any(|e| e.kind == Kind::Xmit) {
                continue;
            }
            match out.iter_mut().find(|(t, _)| *t == target) {
                Some((_, evs)) => evs.extend(p.events.iter()),
                None => out.push((target, p.events.iter().collect())),
            }
        }
        for (_, evs) in &mut out {
            evs.sort_by_key(|e| e.t_ns);
        }
        out.sort_by_key(|(_, evs)| evs.first().map(|e| e.t_ns));
        out
    }

    /// Failed route lookups (err != 0 in a non-local table) for `dst`.
    pub fn route_failures(&self, dst: std::net::Ipv4Addr) -> impl Iterator<Item = &TraceEvent> {
        self.control.iter().filter(move |e| is_route_failure(e) && e.packet.as_ref().is_some_and(|p| p.dst == dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{DropInfo, Packet};

    fn drop_of(proto: &str, key: &str, t_ns: u64, function: &str, reason: &str) -> TraceEvent {
        TraceEvent {
            t_ns,
            kind: Kind::Drop,
            netns: 1,
            where_: "web".into(),
            ifindex: 2,
            ifname: "eth0".into(),
            cpu: 0,
            skb: t_ns,
            packet: Some(Packet {
                proto: proto.into(),
                src: "10.244.0.20".parse().unwrap(),
                dst: "10.244.1.10".parse().unwrap(),
                what: "segment".into(),
                len: 1500,
                outer: None,
                icmp_error: false,
                key: key.into(),
                echo_id: None,
            }),
            drop: Some(DropInfo { reason: reason.into(), reason_code: 7, function: function.into(), location: 0 }),
            route: None,
            neigh: None,
            func: None,
            bytes: None,
        }
    }

    #[test]
    fn tcp_discarding_data_it_already_has_is_not_where_the_pair_died() {
        let dup = drop_of("tcp", "tcp a", 10, "tcp_data_queue", "TCP_OLD_DATA");
        assert!(is_noise(&dup));
        assert!(Trace::build(vec![dup.clone()]).first_drop().is_none());
        // A drop for a reason of its own still is, after the duplicate.
        let real = drop_of("tcp", "tcp b", 20, "tcp_v4_rcv", "TCP_CSUM");
        let t = Trace::build(vec![dup, real]);
        assert_eq!(t.first_drop().and_then(|e| e.drop.as_ref()).map(|d| d.reason.as_str()), Some("TCP_CSUM"));
    }

    fn hop(kind: Kind, t_ns: u64, skb: u64, where_: &str, src: &str, dst: &str) -> TraceEvent {
        let mut e = drop_of("tcp", &format!("tcp {src}>{dst}"), t_ns, "", "");
        e.kind = kind;
        e.skb = skb;
        e.drop = None;
        e.where_ = where_.into();
        let p = e.packet.as_mut().unwrap();
        p.src = src.split(':').next().unwrap().parse().unwrap();
        p.dst = dst.split(':').next().unwrap().parse().unwrap();
        e
    }

    #[test]
    fn a_translated_packet_keeps_its_path_and_a_reused_skb_is_another_packet() {
        let t = Trace::build(vec![
            hop(Kind::Xmit, 1, 7, "debug", "10.244.0.20:4000", "10.96.12.7:8096"),
            hop(Kind::Receive, 2, 7, "node", "10.244.0.20:4000", "10.96.12.7:8096"),
            // kube-proxy's DNAT between two hops of the same skb.
            hop(Kind::Xmit, 3, 7, "node", "10.244.0.20:4000", "10.244.0.19:8096"),
            hop(Kind::Consume, 4, 7, "jellyfin", "10.244.0.20:4000", "10.244.0.19:8096"),
            // The answer, in the freed skb's memory: another packet, not a translation.
            hop(Kind::Xmit, 5, 7, "jellyfin", "10.244.0.19:8096", "10.244.0.20:4000"),
        ]);
        assert_eq!(t.packets.len(), 2, "{:?}", t.packets.iter().map(|p| &p.key).collect::<Vec<_>>());
        assert_eq!(t.packets[0].events.len(), 4, "the translated hops stay on the packet's first path");
        let n = t.translations();
        assert_eq!(n.len(), 1);
        assert_eq!((n[0].dst.0.as_str(), n[0].dst.1.as_str(), n[0].where_.as_str()), ("10.96.12.7:8096", "10.244.0.19:8096", "node"));
        assert!(n[0].dnat() && !n[0].snat());
        // Ends swapped in an skb not seen freed: a reply reusing the memory, still not a translation.
        let t = Trace::build(vec![hop(Kind::Xmit, 1, 9, "a", "10.0.0.1:1", "10.0.0.2:2"), hop(Kind::Xmit, 2, 9, "b", "10.0.0.2:2", "10.0.0.1:1")]);
        assert!(t.translations().is_empty());
    }
}
