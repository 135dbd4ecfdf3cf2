//! Events grouped into per-packet timelines, and the point where the pair's traffic died.

use serde::{Deserialize, Serialize};

use crate::event::{Kind, TraceEvent};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PacketPath {
    pub key: String,
    pub what: String,
    pub events: Vec<TraceEvent>,
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

/// TCP's receiver freeing a segment whose data (or acknowledgement) it had already: a retransmission
/// that arrived after all, data already in the out-of-order queue. The data got through; where a copy
/// was lost on the way, that loss is a drop of its own. A bulk flow of a healthy pair shows some
/// (`cargo xtask bench` saw TCP_OLD_DATA end one traced run in three), and a trace that stopped there
/// named TCP as the place the pair's traffic died.
const TCP_DUPLICATES: &[&str] = &["TCP_OLD_DATA", "TCP_OFOMERGE", "TCP_OLD_SEQUENCE", "TCP_OLD_ACK"];

impl Trace {
    /// Builds timelines from decoded events (any order).
    pub fn build(mut events: Vec<TraceEvent>) -> Trace {
        events.sort_by_key(|e| e.t_ns);
        // Records matched only through the tracking map carry no headers: they belong to the packet last
        // seen with the same skb.
        let mut last_key_of_skb: std::collections::HashMap<u64, (String, String)> = Default::default();
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
            let (key, what) = match &e.packet {
                Some(p) => {
                    last_key_of_skb.insert(e.skb, (p.key.clone(), p.what.clone()));
                    (p.key.clone(), p.what.clone())
                }
                None => match last_key_of_skb.get(&e.skb) {
                    Some(k) => k.clone(),
                    None => continue,
                },
            };
            match packets.iter_mut().find(|p| p.key == key) {
                Some(p) => p.events.push(e.clone()),
                None => packets.push(PacketPath { key, what, events: vec![e.clone()] }),
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
        self.control.iter().filter(move |e| {
            e.route.as_ref().is_some_and(|r| r.err != 0 && r.err != -11 && r.table != 255)
                && e.packet.as_ref().is_some_and(|p| p.dst == dst)
        })
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
}
