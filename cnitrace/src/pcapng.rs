//! `follow --write FILE.pcapng`: the trace as a capture Wireshark and tshark read. Every record that
//! carries the packet's first bytes (captured in the kernel, `--snaplen`) becomes a packet on the
//! interface of its hop — one interface per (namespace, device), named `node-or-pod/device` — with the
//! hop, its direction and, for a drop, the kernel's function and reason in the packet's comment. The
//! verdict is the capture's own comment.
//!
//! The bytes start at the network header (the kernel's hooks see a packet before and after its link
//! header exists), so the link type is Linux cooked capture (SLL): the ethertype and direction are in
//! it, and Wireshark decodes IPv4, ARP and — from the outer header on — VXLAN.

use std::{borrow::Cow, collections::HashMap, io::Write, path::Path, time::Duration};

use anyhow::{Context, Result};
use pcap_file::{
    pcapng::{
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
            section_header::{SectionHeaderBlock, SectionHeaderOption},
        },
        PcapNgWriter,
    },
    DataLink, Endianness,
};

use crate::event::{Kind, TraceEvent};

/// Bytes captured per packet unless `--snaplen` says otherwise: the headers of a VXLAN packet and its
/// inner packet (IPv4 20 + UDP 8 + VXLAN 8 + Ethernet 14 + IPv4 20 + TCP 20–60) fit.
pub const DEFAULT_SNAPLEN: u32 = 128;

/// Linux cooked capture's packet types (`sll_pkttype`).
const SLL_HOST: u16 = 0;
const SLL_OUTGOING: u16 = 4;
const ARPHRD_ETHER: u16 = 1;
const SLL_HEADER: usize = 16;

/// `epb_flags` direction bits.
const INBOUND: u32 = 1;
const OUTBOUND: u32 = 2;

/// What a written capture holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub packets: usize,
    pub interfaces: usize,
}

/// Writes `events` (those with bytes) to `path`. `t0_unix` is the wall-clock time of the trace's first
/// record (`TraceEvent::t_ns` counts from it); `verdict` becomes the capture's comment.
pub fn write(path: &Path, events: &[TraceEvent], t0_unix: Duration, snaplen: u32, verdict: &str) -> Result<Written> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    to_writer(std::io::BufWriter::new(file), events, t0_unix, snaplen, verdict)
}

/// [`write`] to any writer.
pub fn to_writer<W: Write>(out: W, events: &[TraceEvent], t0_unix: Duration, snaplen: u32, verdict: &str) -> Result<Written> {
    let section = SectionHeaderBlock {
        endianness: Endianness::native(),
        major_version: 1,
        minor_version: 0,
        section_length: -1,
        options: vec![
            SectionHeaderOption::Comment(Cow::Owned(verdict.to_string())),
            SectionHeaderOption::UserApplication(Cow::Owned(format!("cnitrace {}", env!("CARGO_PKG_VERSION")))),
        ],
    };
    let mut w = PcapNgWriter::with_section_header(out, section).context("write the pcapng section header")?;
    let mut interfaces: HashMap<(u32, u32), u32> = HashMap::new();
    let mut written = Written::default();
    for e in events {
        let Some(bytes) = e.bytes.as_ref().filter(|b| !b.0.is_empty()) else { continue };
        let Some(ethertype) = ethertype(e, &bytes.0) else { continue };
        let next = interfaces.len() as u32;
        let id = *interfaces.entry((e.netns, e.ifindex)).or_insert(next);
        if id == next {
            w.write_pcapng_block(interface(e, snaplen)).context("write an interface block")?;
        }
        let (pkttype, flags) = match e.kind {
            Kind::Xmit | Kind::Queue => (SLL_OUTGOING, OUTBOUND),
            Kind::Receive => (SLL_HOST, INBOUND),
            _ => (SLL_HOST, 0),
        };
        let mut data = Vec::with_capacity(SLL_HEADER + bytes.0.len());
        data.extend_from_slice(&pkttype.to_be_bytes());
        data.extend_from_slice(&ARPHRD_ETHER.to_be_bytes());
        data.extend_from_slice(&[0; 10]); // no link-layer address
        data.extend_from_slice(&ethertype.to_be_bytes());
        let wire = wire_len(ethertype, &bytes.0);
        let captured = bytes.0.len().min(wire);
        data.extend_from_slice(&bytes.0[..captured]);
        let mut options = vec![EnhancedPacketOption::Comment(Cow::Owned(comment(e)))];
        if flags != 0 {
            options.push(EnhancedPacketOption::Flags(flags));
        }
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: id,
            timestamp: t0_unix + Duration::from_nanos(e.t_ns),
            original_len: (SLL_HEADER + wire) as u32,
            data: Cow::Owned(data),
            options,
        })
        .context("write a packet block")?;
        written.packets += 1;
    }
    written.interfaces = interfaces.len();
    w.into_inner().flush().context("flush the capture")?;
    Ok(written)
}

fn interface(e: &TraceEvent, snaplen: u32) -> InterfaceDescriptionBlock<'static> {
    let name = if e.ifname.is_empty() { format!("{}/if{}", e.where_, e.ifindex) } else { format!("{}/{}", e.where_, e.ifname) };
    InterfaceDescriptionBlock {
        linktype: DataLink::LINUX_SLL,
        snaplen: snaplen + SLL_HEADER as u32,
        options: vec![
            InterfaceDescriptionOption::IfName(Cow::Owned(name)),
            InterfaceDescriptionOption::IfDescription(Cow::Owned(format!(
                "{} in network namespace {} ({}), ifindex {}",
                if e.ifname.is_empty() { "device" } else { &e.ifname },
                e.netns,
                e.where_,
                e.ifindex
            ))),
            // EPB timestamps are written in nanoseconds.
            InterfaceDescriptionOption::IfTsResol(9),
        ],
    }
}

/// The ethertype of the captured bytes: what the record's parsed headers say, else the IP version.
fn ethertype(e: &TraceEvent, bytes: &[u8]) -> Option<u16> {
    if e.packet.as_ref().is_some_and(|p| p.proto == "arp") {
        return Some(cnitrace_common::ETH_P_ARP);
    }
    (bytes.first()? >> 4 == 4).then_some(cnitrace_common::ETH_P_IP)
}

/// The packet's length on the wire from its own header (IPv4 total length; an ARP request or reply is
/// 28 bytes); the captured bytes past it are not the packet's.
fn wire_len(ethertype: u16, bytes: &[u8]) -> usize {
    match ethertype {
        cnitrace_common::ETH_P_ARP => 28,
        _ if bytes.len() >= 4 => u16::from_be_bytes([bytes[2], bytes[3]]) as usize,
        _ => bytes.len(),
    }
}

/// The packet's story at this hop, in the words of the timeline.
fn comment(e: &TraceEvent) -> String {
    let hop = format!("{} {}", e.where_, if e.ifname.is_empty() { "-" } else { &e.ifname });
    match e.kind {
        Kind::Drop => {
            let d = e.drop.as_ref();
            format!(
                "DROPPED at {hop}: kernel function {}, drop reason {}",
                d.map_or("?", |d| d.function.as_str()),
                d.map_or("?", |d| d.reason.as_str())
            )
        }
        Kind::Xmit => format!("{hop}: transmit"),
        Kind::Queue => format!("{hop}: queued for transmit"),
        Kind::Receive => format!("{hop}: receive"),
        Kind::Consume => format!("{hop}: consumed (delivered or freed after use)"),
        Kind::Func => {
            let f = e.func.as_ref();
            let what = f.map(|f| [f.function.as_str(), f.detail.as_str()].join(" ").trim().to_string()).unwrap_or_default();
            match f.and_then(|f| f.verdict.as_deref()) {
                Some(v) => format!("{hop}: {what} ({v})"),
                None => format!("{hop}: {what}"),
            }
        }
        Kind::Route => format!("{hop}: route lookup"),
        Kind::Neigh => format!("{hop}: neighbour entry"),
    }
}

/// The capture's comment: what was followed and the verdict, in one paragraph.
pub fn verdict_comment(title: &str, v: &crate::finding::Verdict) -> String {
    let mut s = format!("{title}: {}", v.explanation);
    if let Some(cause) = &v.cause {
        s.push_str(&format!(" (cause: {cause})"));
    }
    for f in &v.facts {
        s.push_str("\n- ");
        s.push_str(f);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{DropInfo, Packet, PacketBytes};
    use pcap_file::pcapng::{Block, PcapNgReader};

    fn ev(kind: Kind, netns: u32, ifname: &str, t_ns: u64, bytes: Option<Vec<u8>>) -> TraceEvent {
        TraceEvent {
            t_ns,
            kind,
            netns,
            where_: "debug".into(),
            ifindex: 2,
            ifname: ifname.into(),
            cpu: 0,
            skb: 1,
            packet: Some(Packet {
                proto: "icmp".into(),
                src: "10.244.0.20".parse().unwrap(),
                dst: "10.244.0.19".parse().unwrap(),
                what: String::new(),
                len: 1450,
                outer: None,
                icmp_error: false,
                key: String::new(),
                echo_id: None,
            }),
            drop: None,
            route: None,
            neigh: None,
            func: None,
            bytes: bytes.map(PacketBytes),
        }
    }

    /// An IPv4 header of `total` bytes on the wire, then `captured - 20` more bytes.
    fn ipv4(total: u16, captured: usize) -> Vec<u8> {
        let mut b = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0, 10, 244, 0, 20, 10, 244, 0, 19];
        b[2..4].copy_from_slice(&total.to_be_bytes());
        b.resize(captured, 0xaa);
        b
    }

    #[test]
    fn each_hop_is_an_interface_and_a_drop_says_where_and_why() {
        let mut drop = ev(Kind::Drop, 7, "cni0", 3_000, Some(ipv4(84, 84)));
        drop.where_ = "node".into();
        drop.drop = Some(DropInfo { reason: "NETFILTER_DROP".into(), reason_code: 7, function: "nft_do_chain".into(), location: 0 });
        let events = vec![
            ev(Kind::Xmit, 5, "eth0", 0, Some(ipv4(1450, 128))),
            // A record without bytes (a route lookup, a neighbour change) is not a packet.
            ev(Kind::Route, 5, "eth0", 500, None),
            ev(Kind::Receive, 5, "eth0", 1_000, Some(ipv4(84, 100))),
            drop,
        ];
        let mut out = Vec::new();
        let w = to_writer(&mut out, &events, Duration::from_secs(1_700_000_000), 128, "verdict here").unwrap();
        assert_eq!(w, Written { packets: 3, interfaces: 2 });

        let mut r = PcapNgReader::new(&out[..]).unwrap();
        assert!(format!("{:?}", r.section().options).contains("verdict here"));
        let (mut idbs, mut epbs) = (Vec::new(), Vec::new());
        while let Some(b) = r.next_block() {
            match b.unwrap() {
                Block::InterfaceDescription(i) => idbs.push(i.into_owned()),
                Block::EnhancedPacket(p) => epbs.push(p.into_owned()),
                _ => {}
            }
        }
        assert_eq!(idbs.len(), 2);
        assert_eq!(idbs[0].linktype, DataLink::LINUX_SLL);
        assert!(format!("{:?}", idbs[1].options).contains("node/cni0"));
        assert_eq!(epbs.iter().map(|p| p.interface_id).collect::<Vec<_>>(), [0, 0, 1]);
        // Outbound, the ethertype in the cooked header, the wire length from the IP header.
        assert_eq!(&epbs[0].data[..2], &SLL_OUTGOING.to_be_bytes());
        assert_eq!(&epbs[0].data[14..16], &cnitrace_common::ETH_P_IP.to_be_bytes());
        assert_eq!((epbs[0].data.len(), epbs[0].original_len), (16 + 128, 16 + 1450));
        // Bytes captured past the packet's own end are not the packet's.
        assert_eq!((epbs[1].data.len(), epbs[1].original_len), (16 + 84, 16 + 84));
        assert_eq!(epbs[2].timestamp, Duration::from_secs(1_700_000_000) + Duration::from_nanos(3_000));
        let comment = format!("{:?}", epbs[2].options);
        assert!(comment.contains("DROPPED at node cni0") && comment.contains("nft_do_chain") && comment.contains("NETFILTER_DROP"), "{comment}");
    }

    #[test]
    fn bytes_are_hex_in_json_and_back() {
        let e = ev(Kind::Xmit, 5, "eth0", 0, Some(vec![0x45, 0x00, 0xff]));
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["bytes"], "4500ff");
        let back: TraceEvent = serde_json::from_value(j).unwrap();
        assert_eq!(back, e);
        assert!(serde_json::from_value::<PacketBytes>(serde_json::json!("4g")).is_err());
    }
}
