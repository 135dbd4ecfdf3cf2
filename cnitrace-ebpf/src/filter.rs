//! The one filter and emit path every hook shares.

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use cnitrace_common::{counter, pkt_flags, Config, Event, EventKind, PacketInfo, ETH_P_ARP, ETH_P_IP};

#[unsafe(no_mangle)]
static CONFIG: Config = Config::zeroed();

/// bpf_ringbuf_submit flag: do not wake the consumer.
const BPF_RB_NO_WAKEUP: u64 = 1;
/// bpf_map_update_elem flag: only if the key is not there yet.
const BPF_NOEXIST: u64 = 1;

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// [matched, emitted, lost, spare] per CPU.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Has this CPU written its budget of records (`Config::hop_budget`)? Then hop records are counted only.
#[inline(always)]
pub fn counting_only(c: &Config) -> bool {
    c.hop_budget != 0 && COUNTERS.get(counter::EMITTED).is_some_and(|n| *n >= c.hop_budget as u64)
}

#[inline(always)]
pub fn count_only() {
    bump(counter::COUNTED_ONLY);
}

/// skbs already matched: later hooks (and the drop, where headers may be gone) follow them by address.
#[map]
pub static TRACKED: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

/// The configuration, read in place: each field is one load from the frozen .rodata map (a constant the
/// verifier knows). The pointer goes through a volatile read so the compiler cannot fold the fields to
/// the zeros they are built with; copying the whole struct to the stack instead cost 26 instructions and
/// 104 bytes of stack in every program run.
#[inline(always)]
pub fn config() -> &'static Config {
    let p: *const Config = &CONFIG;
    unsafe { &*core::ptr::read_volatile(&p) }
}

#[inline(always)]
pub unsafe fn read<T>(base: *const u8, off: u32) -> Option<T> {
    if base.is_null() || off == Config::ABSENT {
        return None;
    }
    unsafe { bpf_probe_read_kernel(base.add(off as usize) as *const T).ok() }
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        unsafe { *p += 1 };
    }
}

/// Namespace inode and ifindex of a net_device.
#[inline(always)]
pub unsafe fn dev_ids(c: &Config, dev: *const u8) -> (u32, u32) {
    if dev.is_null() {
        return (0, 0);
    }
    let ifindex: u32 = unsafe { read(dev, c.dev_ifindex) }.unwrap_or(0);
    let net: *const u8 = unsafe { read(dev, c.dev_nd_net) }.unwrap_or(core::ptr::null());
    let netns: u32 = unsafe { read(net, c.net_ns_inum) }.unwrap_or(0);
    (netns, ifindex)
}

#[inline(always)]
fn in_pair(c: &Config, addr: u32) -> bool {
    addr == c.addr_a || addr == c.addr_b
}

/// A next hop of the pair's path (its ARP and neighbour entry are followed).
#[inline(always)]
pub fn is_next_hop(c: &Config, addr: u32) -> bool {
    addr != 0 && (addr == c.next_hops[0] || addr == c.next_hops[1] || addr == c.next_hops[2] || addr == c.next_hops[3])
}

#[inline(always)]
fn is_pair(c: &Config, s: u32, d: u32) -> bool {
    (s == c.addr_a && d == c.addr_b) || (s == c.addr_b && d == c.addr_a)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IpHdr {
    vihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag: u16,
    ttl: u8,
    proto: u8,
    csum: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ArpHdr {
    htype: u16,
    ptype: u16,
    hlen: u8,
    plen: u8,
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// Transport words: ports for TCP/UDP, type/code/id/seq for ICMP.
#[repr(C)]
#[derive(Clone, Copy)]
struct L4 {
    a: u16,
    b: u16,
    c: u16,
    d: u16,
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[inline(always)]
fn fill_l4(p: &mut PacketInfo, proto: u8, l4: &L4) {
    if proto == IPPROTO_ICMP {
        let tc = u16::from_be(l4.a);
        p.sport = tc >> 8;
        p.dport = tc & 0xff;
        p.id = u16::from_be(l4.c);
        p.seq = u16::from_be(l4.d);
    } else if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        p.sport = u16::from_be(l4.a);
        p.dport = u16::from_be(l4.b);
    }
}

/// How a packet relates to the pair.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The pair's traffic (or its ARP, or an ICMP error about it).
    Match,
    /// One address of the pair: maybe ours after NAT; the tracking map decides.
    OneSide,
    /// Nothing to do with the pair: no map lookup, the cheap path for unrelated traffic.
    Unrelated,
}

/// Matches an IPv4 packet or ARP frame at `l3` against the pair, without looking into tunnels.
#[inline(always)]
unsafe fn match_plain(c: &Config, l3: *const u8, ethertype: u16, p: &mut PacketInfo) -> Seen {
    if ethertype == ETH_P_ARP {
        let Some(arp) = (unsafe { read::<ArpHdr>(l3, 0) }) else { return Seen::Unrelated };
        let spa = u32::from_ne_bytes(arp.spa);
        let tpa = u32::from_ne_bytes(arp.tpa);
        if !(in_pair(c, spa) || in_pair(c, tpa) || is_next_hop(c, tpa) || is_next_hop(c, spa)) {
            return Seen::Unrelated;
        }
        p.ethertype = ETH_P_ARP;
        p.saddr = spa;
        p.daddr = tpa;
        p.id = u16::from_be(arp.op);
        return Seen::Match;
    }
    if ethertype != ETH_P_IP {
        return Seen::Unrelated;
    }
    let Some(ip) = (unsafe { read::<IpHdr>(l3, 0) }) else { return Seen::OneSide };
    unsafe { match_ip(c, l3, &ip, p) }
}

/// Matches an IPv4 packet whose header `ip` (at `l3`) was read already.
#[inline(always)]
unsafe fn match_ip(c: &Config, l3: *const u8, ip: &IpHdr, p: &mut PacketInfo) -> Seen {
    let ihl = ((ip.vihl & 0x0f) as u32) * 4;
    if is_pair(c, ip.saddr, ip.daddr) {
        p.ethertype = ETH_P_IP;
        p.ip_proto = ip.proto;
        p.saddr = ip.saddr;
        p.daddr = ip.daddr;
        p.len = u16::from_be(ip.tot_len) as u32;
        if let Some(l4) = unsafe { read::<L4>(l3, ihl) } {
            fill_l4(p, ip.proto, &l4);
        }
        return Seen::Match;
    }
    // An ICMP error about the pair (host unreachable, TTL exceeded...): match on the quoted header.
    if ip.proto == IPPROTO_ICMP && (in_pair(c, ip.daddr) || in_pair(c, ip.saddr)) {
        let Some(l4) = (unsafe { read::<L4>(l3, ihl) }) else { return Seen::OneSide };
        let ty = u16::from_be(l4.a) >> 8;
        if ty == 3 || ty == 11 || ty == 12 {
            let Some(inner) = (unsafe { read::<IpHdr>(l3, ihl + 8) }) else { return Seen::OneSide };
            if is_pair(c, inner.saddr, inner.daddr) {
                p.ethertype = ETH_P_IP;
                p.ip_proto = IPPROTO_ICMP;
                p.flags |= pkt_flags::ICMP_ERROR;
                p.saddr = inner.saddr;
                p.daddr = inner.daddr;
                p.outer_saddr = ip.saddr;
                p.outer_daddr = ip.daddr;
                p.len = u16::from_be(ip.tot_len) as u32;
                fill_l4(p, IPPROTO_ICMP, &l4);
                return Seen::Match;
            }
        }
    }
    if in_pair(c, ip.saddr) || in_pair(c, ip.daddr) { Seen::OneSide } else { Seen::Unrelated }
}

/// Matches the pair at `l3`, looking one level into VXLAN (UDP to the configured ports). The outer
/// IPv4 header is read once: a read is a helper call, the bulk of what unrelated traffic pays.
#[inline(always)]
pub unsafe fn match_l3(c: &Config, l3: *const u8, ethertype: u16, p: &mut PacketInfo) -> Seen {
    if ethertype != ETH_P_IP {
        return unsafe { match_plain(c, l3, ethertype, p) };
    }
    let Some(ip) = (unsafe { read::<IpHdr>(l3, 0) }) else { return Seen::OneSide };
    let plain = unsafe { match_ip(c, l3, &ip, p) };
    if plain != Seen::Unrelated || ip.proto != IPPROTO_UDP {
        return plain;
    }
    let ihl = ((ip.vihl & 0x0f) as u32) * 4;
    let Some(udp) = (unsafe { read::<L4>(l3, ihl) }) else { return Seen::Unrelated };
    let dport = u16::from_be(udp.b);
    if dport == 0 || (dport != c.vxlan_port_1 && dport != c.vxlan_port_2) {
        return Seen::Unrelated;
    }
    // udp(8) + vxlan(8) + inner ethernet(14)
    let vx = ihl + 8;
    let vni: u32 = unsafe { read::<u32>(l3, vx + 4) }.map(|v| u32::from_be(v) >> 8).unwrap_or(0);
    let inner_type: u16 = unsafe { read::<u16>(l3, vx + 8 + 12) }.map(u16::from_be).unwrap_or(0);
    let inner = unsafe { l3.add((vx + 8 + 14) as usize) };
    let seen = unsafe { match_plain(c, inner, inner_type, p) };
    if seen == Seen::Match {
        p.flags |= pkt_flags::ENCAP;
        p.outer_saddr = ip.saddr;
        p.outer_daddr = ip.daddr;
        p.vni = vni;
    }
    seen
}

/// Where the network header of `skb` starts: `data` on receive (the MAC header is pulled), the
/// recorded network header otherwise.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L3At {
    Data,
    NetworkHeader,
}

/// Parses and matches an skb. A packet that is not plainly the pair's but may be (one address of the
/// pair, unparseable headers; always at a drop, where headers may be gone) is looked up in the tracking
/// map; plainly unrelated traffic never touches the map.
#[inline(always)]
pub unsafe fn match_skb(c: &Config, skb: *const u8, at: L3At, ev: &mut Event, always_lookup: bool) -> bool {
    let proto: u16 = unsafe { read::<u16>(skb, c.skb_protocol) }.map(u16::from_be).unwrap_or(0);
    let mut seen = if always_lookup { Seen::OneSide } else { Seen::Unrelated };
    if proto == ETH_P_IP || proto == ETH_P_ARP {
        let l3: *const u8 = match at {
            L3At::Data => unsafe { read(skb, c.skb_data) }.unwrap_or(core::ptr::null()),
            L3At::NetworkHeader => {
                let head: *const u8 = unsafe { read(skb, c.skb_head) }.unwrap_or(core::ptr::null());
                let nh: u16 = unsafe { read(skb, c.skb_network_header) }.unwrap_or(0);
                if head.is_null() || nh == 0 || nh == 0xffff {
                    core::ptr::null()
                } else {
                    unsafe { head.add(nh as usize) }
                }
            }
        };
        if l3.is_null() {
            seen = Seen::OneSide;
        } else {
            let s = unsafe { match_l3(c, l3, proto, &mut ev.pkt) };
            if s != Seen::Unrelated || !always_lookup {
                seen = s;
            }
        }
    }
    let key = skb as u64;
    if seen == Seen::Match {
        // Only the first hop inserts: an LRU update replaces the element even when the key exists.
        let _ = TRACKED.insert(&key, &1, BPF_NOEXIST);
        return true;
    }
    if seen == Seen::OneSide && unsafe { TRACKED.get(&key) }.is_some() {
        ev.pkt.flags |= pkt_flags::TRACKED_ONLY;
        return true;
    }
    false
}

/// Did a hook match this skb before (and the kernel has not freed it since)?
#[inline(always)]
pub fn tracked(skb: *const u8) -> bool {
    unsafe { TRACKED.get(&(skb as u64)) }.is_some()
}

/// Forgets an skb once the kernel freed it: its address will be reused.
#[inline(always)]
pub fn forget(skb: *const u8) -> bool {
    TRACKED.remove(&(skb as u64)).is_ok()
}

#[inline(always)]
pub fn new_event(kind: EventKind, skb: *const u8) -> Event {
    let mut ev = Event::default();
    ev.header.kind = kind as u32;
    ev.header.skb = skb as u64;
    ev
}

/// Stamps and writes a matched record; every call counts as matched and as emitted or lost.
#[inline(always)]
pub fn emit(ev: &mut Event) {
    bump(counter::MATCHED);
    ev.header.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.header.cpu = unsafe { bpf_get_smp_processor_id() };
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(*ev);
            // No wakeup per record: userspace polls every few milliseconds anyway, and a wakeup per
            // event costs the traced flow more than the record itself.
            slot.submit(BPF_RB_NO_WAKEUP);
            bump(counter::EMITTED);
        }
        None => bump(counter::LOST),
    }
}

/// skb->dev's namespace and ifindex into the header.
#[inline(always)]
pub unsafe fn stamp_dev(c: &Config, skb: *const u8, ev: &mut Event) {
    let dev: *const u8 = unsafe { read(skb, c.skb_dev) }.unwrap_or(core::ptr::null());
    let (netns, ifindex) = unsafe { dev_ids(c, dev) };
    ev.header.netns = netns;
    ev.header.ifindex = ifindex;
}
