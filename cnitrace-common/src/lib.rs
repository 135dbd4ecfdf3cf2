//! The kernel/user boundary of cnitrace, and nothing else.
//!
//! Every record the eBPF programs write to the ring buffer is one fixed-size [`Event`]: a header that
//! every hook fills (kind, time, skb, namespace, interface), the packet's parsed headers, and a few
//! kind-specific words. One size keeps the ring buffer reservation and the userspace decoder trivial.
//! [`Config`] travels the other way: the struct offsets read from the running kernel's BTF and the pair to
//! follow, handed to the programs as one global before load.
//!
//! Numbers here are ABI: event kinds are stable, leave gaps, never renumber. No `bool` in records.
#![no_std]

/// What a hook saw. Stable numbers; gaps leave room per family.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// net:net_dev_start_xmit: the device is about to transmit the frame.
    Xmit = 1,
    /// net:netif_receive_skb: the device received the frame (after eth_type_trans).
    Receive = 2,
    /// net:net_dev_queue: handed to the device's queue.
    Queue = 3,
    /// skb:kfree_skb: the kernel dropped the packet (location + reason).
    Drop = 10,
    /// skb:consume_skb: the packet was consumed normally (delivered to a socket, freed after copy...).
    Consume = 11,
    /// fib:fib_table_lookup: a route lookup for the pair.
    FibLookup = 20,
    /// neigh:neigh_update: a neighbour entry for one of the pair changed state.
    NeighUpdate = 30,
    /// neigh:neigh_timer_handler: the neighbour timer ran (INCOMPLETE -> FAILED happens here).
    NeighTimer = 31,
    /// An optional kprobe saw the packet enter a kernel function ([`func`] id in `reason`).
    FuncEntry = 40,
    /// An optional kretprobe saw that function return for the packet (return value in `err`).
    FuncReturn = 41,
}

/// Kernel functions the optional kprobes watch (`Event::reason` of Func* records). Stable numbers.
pub mod func {
    /// Netfilter's hook slow path: `oif` = hook number | family << 8.
    pub const NF_HOOK_SLOW: u32 = 1;
    /// The bridge forwards a frame to another port.
    pub const BR_FORWARD: u32 = 2;
    /// The VXLAN device transmits (encapsulates) a frame.
    pub const VXLAN_XMIT: u32 = 3;
    /// The VXLAN socket receives (decapsulates) a packet.
    pub const VXLAN_RCV: u32 = 4;
    /// IPv4 forwarding of a routed packet.
    pub const IP_FORWARD: u32 = 5;
    /// The reverse-path check (rp_filter); return: 0 or a positive itag accept, <0 refuse.
    pub const FIB_VALIDATE_SOURCE: u32 = 6;
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Xmit,
            2 => Self::Receive,
            3 => Self::Queue,
            10 => Self::Drop,
            11 => Self::Consume,
            20 => Self::FibLookup,
            30 => Self::NeighUpdate,
            31 => Self::NeighTimer,
            40 => Self::FuncEntry,
            41 => Self::FuncReturn,
            _ => return None,
        })
    }
}

/// Header every record starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    /// An [`EventKind`] as u32.
    pub kind: u32,
    pub cpu: u32,
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Address of the sk_buff: the packet's identity inside the kernel.
    pub skb: u64,
    /// Inode of the network namespace of the device (0 when unknown).
    pub netns: u32,
    pub ifindex: u32,
}

/// `PacketInfo::flags` bits.
pub mod pkt_flags {
    /// The addresses below are the inner headers of a VXLAN packet; outer_* hold the underlay.
    pub const ENCAP: u8 = 1 << 0;
    /// An ICMP error whose quoted header is the pair: addresses below are the quoted (inner) ones.
    pub const ICMP_ERROR: u8 = 1 << 1;
    /// Matched through the tracking map, headers could not be parsed at this hook.
    pub const TRACKED_ONLY: u8 = 1 << 2;
}

/// ethertypes in host order.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

/// The parsed headers of a matched packet. Addresses are in network byte order, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketInfo {
    /// ETH_P_IP or ETH_P_ARP (host order).
    pub ethertype: u16,
    /// IP protocol (1 icmp, 6 tcp, 17 udp).
    pub ip_proto: u8,
    /// [`pkt_flags`].
    pub flags: u8,
    /// IPv4 saddr/daddr, or ARP sender/target protocol address.
    pub saddr: u32,
    pub daddr: u32,
    /// TCP/UDP ports (host order); for ICMP: type and code.
    pub sport: u16,
    pub dport: u16,
    /// ICMP echo id and sequence (host order); ARP: opcode in `id`.
    pub id: u16,
    pub seq: u16,
    /// IP total length (host order) or skb->len for ARP.
    pub len: u32,
    /// Underlay addresses when ENCAP (network order).
    pub outer_saddr: u32,
    pub outer_daddr: u32,
    /// VXLAN network identifier when ENCAP.
    pub vni: u32,
    pub _pad: u32,
}

/// One record in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Event {
    pub header: EventHeader,
    pub pkt: PacketInfo,
    /// Drop: kfree_skb location (kernel text address). Neigh: link-layer address (6 bytes, low end).
    pub location: u64,
    /// Drop: `enum skb_drop_reason` value (0 when the kernel has none). Fib: table id. Neigh: nud state.
    pub reason: u32,
    /// Fib: the lookup's error (0 found, negative errno). Neigh: error of the timer/update.
    pub err: i32,
    /// Fib: ifindex the route resolved to (0 when none).
    pub oif: u32,
    pub _pad: u32,
}

/// Counter slots of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Records that passed the filter.
    pub const MATCHED: u32 = 0;
    /// Records written to the ring buffer.
    pub const EMITTED: u32 = 1;
    /// Records lost because the ring buffer was full. MATCHED = EMITTED + LOST, always.
    pub const LOST: u32 = 2;
    /// Hop records of the pair (transmit, receive, consume, successful route lookups, kprobe entries and
    /// successful returns) past `Config::hop_budget` on a CPU: counted here instead of written. Not part
    /// of MATCHED.
    pub const COUNTED_ONLY: u32 = 3;
    pub const LEN: u32 = 4;
}

/// What userspace tells the programs before load (one global, `CONFIG`).
/// Offsets are byte offsets read from the running kernel's BTF; 0xffff_ffff means "not present here".
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The pair, network byte order. Traffic between them in either direction is followed.
    pub addr_a: u32,
    pub addr_b: u32,
    /// VXLAN UDP ports to look inside (host order); 0 = unused.
    pub vxlan_port_1: u16,
    pub vxlan_port_2: u16,
    /// 1 when the loaded programs should emit anything (lets start-up attach before filtering starts).
    pub enabled: u32,
    /// Next hops the pair's packets resolve on the way (a node's gateway towards the other pod, e.g. the
    /// remote VTEP on flannel.1), network byte order, 0 = unused: their ARP and neighbour entries are
    /// followed too, so a packet waiting on one of them is seen waiting.
    pub next_hops: [u32; 4],
    /// More addresses of each side, network byte order, 0 = unused: a Service's traffic changes addresses
    /// on the way (DNAT to an endpoint, SNAT to a node's address), and a packet between any address of
    /// one side and any of the other is the pair's. `alt_b`: the endpoints behind a Service address;
    /// `alt_a`: the addresses a masquerade gives the source. `alts` is 0 when both are empty (the
    /// programs then compare the two addresses only).
    pub alt_a: [u32; 2],
    pub alt_b: [u32; 6],
    pub alts: u32,
    /// Records a CPU writes before its hop records (see counter::COUNTED_ONLY) are only counted; drops,
    /// failed route lookups, refusals (a kprobe's non-zero return) and neighbour events are always
    /// written. The timeline userspace keeps is bounded anyway: a bulk flow need not pay for records
    /// nobody reads. 0 = no limit.
    pub hop_budget: u32,

    pub skb_head: u32,
    pub skb_data: u32,
    pub skb_len: u32,
    pub skb_dev: u32,
    pub skb_protocol: u32,
    pub skb_network_header: u32,
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    pub net_ns_inum: u32,
    pub flowi4_saddr: u32,
    pub flowi4_daddr: u32,
    pub nhc_dev: u32,
    pub neigh_primary_key: u32,
    pub neigh_dev: u32,
    pub neigh_nud_state: u32,
    pub neigh_ha: u32,
    /// `struct nf_hook_state`: hook and pf. `hook` is an unsigned int on 5.10 and a u8 later; both are
    /// read as their low byte (little-endian), which holds the value.
    pub nf_state_hook: u32,
    pub nf_state_pf: u32,
    /// `follow --write`: bytes of each matched packet to capture from its network header (0: none, the
    /// records carry no bytes; at most [`MAX_SNAPLEN`]). Each such record is a [`Captured`].
    pub snaplen: u32,
    /// `sk_buff::tail`: where the linear data ends (an offset from `head`), so a capture never reads
    /// past it into memory that is not the packet's.
    pub skb_tail: u32,
    /// 1 when `sk_buff`'s protocol, network_header, head and data lie within [`Config::SKB_WINDOW`] bytes
    /// from `protocol`, each at an offset aligned to its size (every kernel this project runs on): the
    /// programs then read them with one helper call instead of three.
    pub skb_window: u32,
}

impl Config {
    pub const ABSENT: u32 = u32::MAX;
    /// Bytes of `sk_buff` read at once from `skb_protocol` when `skb_window` is set.
    pub const SKB_WINDOW: u32 = 32;

    /// Does this layout let the programs read protocol, network_header, head and data in one window?
    pub fn skb_fields_in_window(&self) -> bool {
        let fits = |off: u32, size: u32| {
            off != Self::ABSENT && off >= self.skb_protocol && off - self.skb_protocol + size <= Self::SKB_WINDOW && (off - self.skb_protocol) % size == 0
        };
        self.skb_protocol != Self::ABSENT && fits(self.skb_network_header, 2) && fits(self.skb_head, 8) && fits(self.skb_data, 8)
    }

    pub const fn zeroed() -> Self {
        Config {
            addr_a: 0,
            addr_b: 0,
            vxlan_port_1: 0,
            vxlan_port_2: 0,
            enabled: 0,
            next_hops: [0; 4],
            alt_a: [0; 2],
            alt_b: [0; 6],
            alts: 0,
            hop_budget: 0,
            skb_head: 0,
            skb_data: 0,
            skb_len: 0,
            skb_dev: 0,
            skb_protocol: 0,
            skb_network_header: 0,
            dev_ifindex: 0,
            dev_nd_net: 0,
            net_ns_inum: 0,
            flowi4_saddr: 0,
            flowi4_daddr: 0,
            nhc_dev: 0,
            neigh_primary_key: 0,
            neigh_dev: 0,
            neigh_nud_state: 0,
            neigh_ha: 0,
            nf_state_hook: 0,
            nf_state_pf: 0,
            snaplen: 0,
            skb_tail: 0,
            skb_window: 0,
        }
    }
}

// The layout is ABI between two compilers: pin it.
const _: () = assert!(core::mem::size_of::<EventHeader>() == 32);
const _: () = assert!(core::mem::size_of::<PacketInfo>() == 40);
const _: () = assert!(core::mem::size_of::<Event>() == 96);
const _: () = assert!(core::mem::size_of::<Config>() == 156);
const _: () = assert!(core::mem::size_of::<Captured>() == 104 + MAX_SNAPLEN as usize);

/// Most bytes a record captures (`Config::snaplen`).
pub const MAX_SNAPLEN: u32 = 256;

/// A record with the first bytes of its packet (`follow --write`): what [`Event`] is, then `caplen`
/// bytes from the network header on (the rest of `bytes` is not the packet's). Told from a plain
/// [`Event`] by its size in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Captured {
    pub event: Event,
    pub caplen: u32,
    pub _pad: u32,
    pub bytes: [u8; MAX_SNAPLEN as usize],
}

/// `cnitrace watch`: drops counted in the kernel by where and why (map `DROPS`, key → count). No pair
/// and no record per packet: a node can run it for hours.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    /// Where the kernel freed the packet (an address in a function, named from kallsyms).
    pub location: u64,
    /// The namespace and interface the packet was on.
    pub netns: u32,
    pub ifindex: u32,
    /// The kernel's drop reason (0 where kfree_skb has none, before 5.17).
    pub reason: u32,
    /// Ethernet protocol (host order); IPv4 packets also carry their addresses and transport protocol.
    pub proto: u16,
    pub l4: u8,
    pub _pad: u8,
    /// Network byte order; 0 for other protocols.
    pub saddr: u32,
    pub daddr: u32,
}

impl DropKey {
    /// Entries the kernel keeps (least recently dropped go first when full).
    pub const MAX: u32 = 8192;
}

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::DropKey {}
    // SAFETY: plain-old-data, repr(C), no padding holes that matter, no pointers.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Captured {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(protocol: u32, network_header: u32, head: u32, data: u32) -> Config {
        Config { skb_protocol: protocol, skb_network_header: network_header, skb_head: head, skb_data: data, ..Config::zeroed() }
    }

    #[test]
    fn skb_window_takes_the_usual_layout_and_refuses_others() {
        // 5.10 to 7.x: protocol, transport_header, network_header, mac_header, tail, end, head, data.
        assert!(!layout(0xb4, 0xb8, 0xc2, 0xca).skb_fields_in_window(), "head not 8-aligned from protocol");
        assert!(layout(0xb8, 0xbc, 0xc8, 0xd0).skb_fields_in_window());
        // data past the window, a field before protocol, a missing field.
        assert!(!layout(0xb8, 0xbc, 0xc8, 0xe0).skb_fields_in_window());
        assert!(!layout(0xb8, 0xb0, 0xc8, 0xd0).skb_fields_in_window());
        assert!(!layout(0xb8, Config::ABSENT, 0xc8, 0xd0).skb_fields_in_window());
    }
}
