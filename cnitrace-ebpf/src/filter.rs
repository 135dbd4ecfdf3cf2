//! The one filter and emit path every hook shares.

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf, generated},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use core::mem::MaybeUninit;

use cnitrace_common::{counter, pkt_flags, Captured, Config, Event, EventKind, PacketInfo, ETH_P_ARP, ETH_P_IP, MAX_SNAPLEN};

#[unsafe(no_mangle)]
static CONFIG: Config = Config::zeroed();

/// bpf_ringbuf_submit flags: do not wake the consumer; wake it whatever it consumed.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// While the reader sleeps, every this many records of a CPU wake it, whatever they are: it sleeps up
/// to 100 ms, and the ring (4 MiB: 43,690 records, 40 ms of the fastest flood measured) must not fill
/// meanwhile.
const WAKE_EVERY: u64 = 4096;

/// Slot 0 is 1 while the reader sleeps until woken (an idle trace); 0 while it polls on its own.
#[map]
pub static READER: Array<u32> = Array::with_max_entries(1, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// [matched, emitted, lost, counted only] per CPU.
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
/// A direct-mapped table: an skb's address goes in the slot its hash picks, and a later skb of the pair
/// with the same slot takes it over. A lookup is one load the verifier inlines, no helper call and no
/// lock. It was an LRU hash map: every matched hop's insert took a free node from the LRU list and
/// gave it back when the key was there already (`bpf_lru_pop_free`, `bpf_lru_push_free`), and with the
/// map full of skbs TCP had freed unseen, each new one evicted under the LRU's lock — 4.3 % of the
/// traced flow's core, sampled cross-node, half of all the tracer cost.
#[map]
pub static TRACKED: Array<u64> = Array::with_max_entries(TRACKED_SLOTS, 0);
/// 512 KiB of kernel memory. Two skbs of the pair alive at once share a slot one time in
/// `TRACKED_SLOTS / live`: for the few hundred a TCP window holds, under 1 %.
const TRACKED_SLOTS: u32 = 1 << TRACKED_BITS;
const TRACKED_BITS: u32 = 16;

/// One u64 per CPU where a BTF tracepoint's skb pointer becomes a plain number (see [`Skb`]).
#[map]
static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// An skb's address as the program holds it: a number (raw tracepoints), or a BTF-typed pointer
/// (`Fields::Direct`) the verifier allows no arithmetic but addition on.
#[derive(Clone, Copy)]
pub enum Skb {
    Number(u64),
    Typed(u64),
}

impl Skb {
    /// The address as a number and its slot in [`TRACKED`]: the top bits of a multiplicative
    /// (Fibonacci) hash, so slab objects a fixed stride apart spread over the table. A typed pointer
    /// stored and loaded back through a map value is a number (two moves; the probe-read helper would
    /// cost ~50 ns). Only the device hooks hold typed pointers, and they run with bottom halves off
    /// (transmit) or in them (receive): no other program of this object can run on the CPU between the
    /// two moves and leave its skb there.
    #[inline(always)]
    fn slot(self) -> Option<(u64, u32)> {
        let n = match self {
            Skb::Number(n) => n,
            Skb::Typed(ptr) => {
                let p = SCRATCH.get_ptr_mut(0)?;
                unsafe {
                    core::ptr::write_volatile(p, ptr);
                    core::ptr::read_volatile(p)
                }
            }
        };
        Some((n, (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - TRACKED_BITS)) as u32))
    }
}

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

/// Zeroes `*p` with word stores (volatile: LLVM turns a plain loop back into the call). Past a few words
/// LLVM's BPF backend calls `memset`, a subprogram storing a byte at a time: 40 rounds for a
/// PacketInfo, which sampling found in every program run once it sat before the unrelated path's exit.
#[inline(always)]
pub unsafe fn zero<T>(p: *mut T) {
    const { assert!(core::mem::size_of::<T>() % 4 == 0 && core::mem::align_of::<T>() >= 4) };
    if core::mem::align_of::<T>() >= 8 && core::mem::size_of::<T>() % 8 == 0 {
        for i in 0..core::mem::size_of::<T>() / 8 {
            unsafe { core::ptr::write_volatile(p.cast::<u64>().add(i), 0) };
        }
    } else {
        for i in 0..core::mem::size_of::<T>() / 4 {
            unsafe { core::ptr::write_volatile(p.cast::<u32>().add(i), 0) };
        }
    }
}

/// A zeroed value of `T`, without `memset` (see [`zero`]).
#[inline(always)]
pub fn zeroed<T>() -> T {
    let mut v = MaybeUninit::<T>::uninit();
    // SAFETY: every byte is written (T is made of plain integers wherever this is used).
    unsafe {
        zero(v.as_mut_ptr());
        v.assume_init()
    }
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

/// An address of side A: the source as given, or one a masquerade gave it.
#[inline(always)]
fn side_a(c: &Config, addr: u32) -> bool {
    addr == c.addr_a || (c.alts != 0 && addr != 0 && (addr == c.alt_a[0] || addr == c.alt_a[1]))
}

/// An address of side B: the destination as given (a Service's), or an endpoint behind it.
#[inline(always)]
fn side_b(c: &Config, addr: u32) -> bool {
    addr == c.addr_b
        || (c.alts != 0
            && addr != 0
            && (addr == c.alt_b[0] || addr == c.alt_b[1] || addr == c.alt_b[2] || addr == c.alt_b[3] || addr == c.alt_b[4] || addr == c.alt_b[5]))
}

#[inline(always)]
pub fn in_pair(c: &Config, addr: u32) -> bool {
    side_a(c, addr) || side_b(c, addr)
}

/// A next hop of the pair's path (its ARP and neighbour entry are followed).
#[inline(always)]
pub fn is_next_hop(c: &Config, addr: u32) -> bool {
    addr != 0 && (addr == c.next_hops[0] || addr == c.next_hops[1] || addr == c.next_hops[2] || addr == c.next_hops[3])
}

#[inline(always)]
pub fn is_pair(c: &Config, s: u32, d: u32) -> bool {
    if c.alts == 0 {
        return (s == c.addr_a && d == c.addr_b) || (s == c.addr_b && d == c.addr_a);
    }
    (side_a(c, s) && side_b(c, d)) || (side_b(c, s) && side_a(c, d))
}

/// The first bytes of a packet from its network header, read with one helper call (a helper call is
/// most of what unrelated traffic pays): IPv4 (20), UDP (8), VXLAN (8), inner Ethernet (14), inner IPv4
/// (20) and inner transport words (8). Everything the filter looks at, plain or encapsulated, sits at a
/// constant offset in it — the 5.10 verifier allows no variable-offset stack reads — so IP options are
/// cut out as the window is read: each header lands where it would be without them.
#[repr(C, align(8))]
struct Window([u8; WIN]);

const WIN: usize = 80;
/// Offsets in the window of one level (the outer packet at 0, a VXLAN packet's inner one at INNER).
const L4: usize = 20;
const VXLAN: usize = L4 + 8;
const INNER_TYPE: usize = VXLAN + 8 + 12;
const INNER: usize = VXLAN + 8 + 14;
/// Bytes before an encapsulated packet's inner IPv4 header, from the outer transport header on.
const ENCAP_LEN: u32 = (INNER - L4) as u32;

impl Window {
    #[inline(always)]
    fn u8(&self, off: usize) -> u8 {
        self.0[off]
    }
    #[inline(always)]
    fn be16(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.0[off], self.0[off + 1]])
    }
    /// Network order, as the pair's addresses are kept.
    #[inline(always)]
    fn ne32(&self, off: usize) -> u32 {
        u32::from_ne_bytes([self.0[off], self.0[off + 1], self.0[off + 2], self.0[off + 3]])
    }
    #[inline(always)]
    fn ihl(&self, level: usize) -> u32 {
        (self.0[level] & 0x0f) as u32 * 4
    }

    /// Reads the window at `l3` into `w`, cutting out the outer IPv4 header's options. In place: a
    /// window returned by value was copied once more on the stack (20 instructions a packet).
    #[inline(always)]
    unsafe fn read_into(w: &mut MaybeUninit<Window>, l3: *const u8, ethertype: u16) -> Option<&mut Window> {
        let dst = w.as_mut_ptr();
        if unsafe { generated::bpf_probe_read_kernel(dst.cast(), WIN as u32, l3.cast()) } != 0 {
            // The window reaches past readable memory: the headers themselves, without the rest.
            unsafe { zero(dst) };
            let w = unsafe { &mut *dst };
            unsafe { bpf_probe_read_kernel_buf(l3, &mut w.0[..VXLAN]) }.ok()?;
        }
        unsafe { w.assume_init_mut().cut_options(l3, ethertype) }
    }

    /// A window read whole from `l3`: the outer IPv4 header's options cut out (what follows them read
    /// again to where it would be without them).
    #[inline(always)]
    unsafe fn cut_options(&mut self, l3: *const u8, ethertype: u16) -> Option<&mut Window> {
        let ihl = self.ihl(0);
        if ethertype == ETH_P_IP && ihl > 20 {
            unsafe { bpf_probe_read_kernel_buf(l3.add(ihl as usize), &mut self.0[L4..]) }.ok()?;
        }
        Some(self)
    }

    /// Plainly not the pair's: an IPv4 header without options, no address of the pair in it, and if it
    /// carries VXLAN, an inner IPv4 packet with none either (or no inner ARP, IPv4 or nothing). Exactly
    /// the packets [`match_l3`] calls unrelated, less the rare ones it needs more to tell (options, ARP).
    #[inline(always)]
    fn unrelated_at_a_glance(&self, c: &Config) -> bool {
        if self.ihl(0) != 20 || in_pair(c, self.ne32(12)) || in_pair(c, self.ne32(16)) {
            return false;
        }
        if self.u8(9) != IPPROTO_UDP {
            return true;
        }
        let dport = self.be16(L4 + 2);
        if dport == 0 || (dport != c.vxlan_port_1 && dport != c.vxlan_port_2) {
            return true;
        }
        match self.be16(INNER_TYPE) {
            ETH_P_IP => !(in_pair(c, self.ne32(INNER + 12)) || in_pair(c, self.ne32(INNER + 16))),
            ETH_P_ARP => false,
            _ => true,
        }
    }

    /// Transport words of the level at `level`.
    #[inline(always)]
    fn l4(&self, level: usize) -> [u16; 4] {
        let t = level + L4;
        [self.be16(t), self.be16(t + 2), self.be16(t + 4), self.be16(t + 6)]
    }
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Transport words (host order): ports for TCP/UDP, type/code/id/seq for ICMP.
#[inline(always)]
fn fill_l4(p: &mut PacketInfo, proto: u8, l4: [u16; 4]) {
    if proto == IPPROTO_ICMP {
        p.sport = l4[0] >> 8;
        p.dport = l4[0] & 0xff;
        p.id = l4[2];
        p.seq = l4[3];
    } else if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        p.sport = l4[0];
        p.dport = l4[1];
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

/// Matches one level of the window (the packet at `level`, an IPv4 packet or ARP frame) against the
/// pair. `l4_in_packet` is where that level's transport header really starts, for the one field past
/// the window: the header an ICMP error quotes, inside a VXLAN packet.
#[inline(always)]
unsafe fn match_level(c: &Config, l3: *const u8, w: &Window, level: usize, l4_in_packet: u32, ethertype: u16, p: &mut PacketInfo) -> Seen {
    if ethertype == ETH_P_ARP {
        // htype(2) ptype(2) hlen(1) plen(1) op(2) sha(6) spa(4) tha(6) tpa(4)
        let spa = w.ne32(level + 14);
        let tpa = w.ne32(level + 24);
        if !(in_pair(c, spa) || in_pair(c, tpa) || is_next_hop(c, tpa) || is_next_hop(c, spa)) {
            return Seen::Unrelated;
        }
        p.ethertype = ETH_P_ARP;
        p.saddr = spa;
        p.daddr = tpa;
        p.id = w.be16(level + 6);
        return Seen::Match;
    }
    if ethertype != ETH_P_IP {
        return Seen::Unrelated;
    }
    let (proto, saddr, daddr) = (w.u8(level + 9), w.ne32(level + 12), w.ne32(level + 16));
    if is_pair(c, saddr, daddr) {
        p.ethertype = ETH_P_IP;
        p.ip_proto = proto;
        p.saddr = saddr;
        p.daddr = daddr;
        p.len = w.be16(level + 2) as u32;
        fill_l4(p, proto, w.l4(level));
        return Seen::Match;
    }
    let one_side = in_pair(c, saddr) || in_pair(c, daddr);
    // An ICMP error about the pair (host unreachable, TTL exceeded...): match on the quoted header.
    if proto == IPPROTO_ICMP && one_side {
        let l4 = w.l4(level);
        let ty = l4[0] >> 8;
        if ty == 3 || ty == 11 || ty == 12 {
            // The quoted IPv4 header's addresses, 8 bytes past the ICMP header's start.
            let quoted = level + L4 + 8 + 12;
            let (qs, qd) = if quoted + 8 <= WIN {
                (w.ne32(quoted), w.ne32(quoted + 4))
            } else {
                let Some(q) = (unsafe { read::<[u32; 2]>(l3, l4_in_packet + 8 + 12) }) else { return Seen::OneSide };
                (q[0], q[1])
            };
            if is_pair(c, qs, qd) {
                p.ethertype = ETH_P_IP;
                p.ip_proto = IPPROTO_ICMP;
                p.flags |= pkt_flags::ICMP_ERROR;
                p.saddr = qs;
                p.daddr = qd;
                p.outer_saddr = saddr;
                p.outer_daddr = daddr;
                p.len = w.be16(level + 2) as u32;
                fill_l4(p, IPPROTO_ICMP, l4);
                return Seen::Match;
            }
        }
    }
    if one_side { Seen::OneSide } else { Seen::Unrelated }
}

/// Matches the pair at `l3`, looking one level into VXLAN (UDP to the configured ports). One helper
/// call reads every header either level needs (see [`Window`]). `w` holds the window already read from
/// `l3` when `read`; otherwise it is read into `w` here (the caller's space: 80 more bytes of stack here
/// put a kretprobe's two frames past the 512 bytes 5.10 allows).
#[inline(always)]
unsafe fn match_l3(c: &Config, l3: *const u8, ethertype: u16, w: &mut Window, read: bool, p: &mut PacketInfo) -> Seen {
    if ethertype != ETH_P_IP && ethertype != ETH_P_ARP {
        return Seen::Unrelated;
    }
    let w = if read {
        unsafe { w.cut_options(l3, ethertype) }
    } else {
        // SAFETY: a Window is initialised bytes; read_into writes it whole before reading it.
        unsafe { Window::read_into(&mut *(w as *mut Window).cast::<MaybeUninit<Window>>(), l3, ethertype) }
    };
    let Some(w) = w else { return Seen::OneSide };
    let outer_ihl = w.ihl(0);
    let plain = unsafe { match_level(c, l3, w, 0, outer_ihl, ethertype, p) };
    if plain != Seen::Unrelated || ethertype != ETH_P_IP || w.u8(9) != IPPROTO_UDP {
        return plain;
    }
    let dport = w.be16(L4 + 2);
    if dport == 0 || (dport != c.vxlan_port_1 && dport != c.vxlan_port_2) {
        return Seen::Unrelated;
    }
    let inner_type = w.be16(INNER_TYPE);
    let inner_ihl = w.ihl(INNER);
    let inner_l4 = outer_ihl + ENCAP_LEN + inner_ihl;
    if inner_type == ETH_P_IP && inner_ihl > 20 {
        // The inner header has options: its transport words are further on.
        let _ = unsafe { bpf_probe_read_kernel_buf(l3.add(inner_l4 as usize), &mut w.0[INNER + L4..INNER + L4 + 8]) };
    }
    let seen = unsafe { match_level(c, l3, w, INNER, inner_l4, inner_type, p) };
    if seen == Seen::Match {
        p.flags |= pkt_flags::ENCAP;
        p.outer_saddr = w.ne32(12);
        p.outer_daddr = w.ne32(16);
        p.vni = u32::from_be_bytes([0, w.u8(VXLAN + 4), w.u8(VXLAN + 5), w.u8(VXLAN + 6)]);
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

/// `Config::SKB_WINDOW` bytes of the sk_buff from `protocol` on.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct SkbWindow([u8; Config::SKB_WINDOW as usize]);

impl SkbWindow {
    /// The field at `off` (an offset into the sk_buff, a constant the verifier knows). Userspace set
    /// `skb_window` only where every field fits, aligned: the checks here fold away.
    #[inline(always)]
    unsafe fn field<T: Copy + Default>(&self, c: &Config, off: u32) -> T {
        let rel = off.wrapping_sub(c.skb_protocol) as usize;
        if rel + core::mem::size_of::<T>() > self.0.len() || rel % core::mem::align_of::<T>() != 0 {
            return T::default();
        }
        unsafe { *(self.0.as_ptr().add(rel) as *const T) }
    }
}

/// How a program reaches kernel structs: with the probe-read helper (raw tracepoints: ~50 ns a call
/// here), or with plain loads the verifier checks against the kernel's BTF (BTF tracepoints, `tp_btf`:
/// the argument is a typed pointer). Packet bytes are read with the helper either way.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fields {
    Probed,
    Direct,
}

/// A field of a struct the program holds a BTF-typed pointer to (`Fields::Direct`), at an offset the
/// verifier knows (a constant from `CONFIG`); 0 where this kernel has no such field.
#[inline(always)]
pub unsafe fn load<T: Copy + Default>(base: *const u8, off: u32) -> T {
    if off == Config::ABSENT {
        return T::default();
    }
    unsafe { core::ptr::read_volatile(base.add(off as usize) as *const T) }
}

/// The skb's protocol (host order) and where its network header starts: plain loads from a BTF
/// tracepoint; else one helper call where the kernel's layout allows (`Config::skb_window`), one per
/// field otherwise.
#[inline(always)]
pub unsafe fn skb_l3(c: &Config, skb: *const u8, at: L3At, fields: Fields) -> (u16, *const u8) {
    let (proto, head, nh, data): (u16, u64, u16, u64) = if fields == Fields::Direct {
        let proto = unsafe { load(skb, c.skb_protocol) };
        match at {
            L3At::Data => (proto, 0, 0, unsafe { load(skb, c.skb_data) }),
            L3At::NetworkHeader => (proto, unsafe { load(skb, c.skb_head) }, unsafe { load(skb, c.skb_network_header) }, 0),
        }
    } else if c.skb_window != 0 {
        let Some(w) = (unsafe { read::<SkbWindow>(skb, c.skb_protocol) }) else { return (0, core::ptr::null()) };
        unsafe { (w.field(c, c.skb_protocol), w.field(c, c.skb_head), w.field(c, c.skb_network_header), w.field(c, c.skb_data)) }
    } else {
        let proto = unsafe { read::<u16>(skb, c.skb_protocol) }.unwrap_or(0);
        match at {
            L3At::Data => (proto, 0, 0, unsafe { read(skb, c.skb_data) }.unwrap_or(0)),
            L3At::NetworkHeader => (proto, unsafe { read(skb, c.skb_head) }.unwrap_or(0), unsafe { read(skb, c.skb_network_header) }.unwrap_or(0), 0),
        }
    };
    let l3 = match at {
        L3At::Data => data,
        L3At::NetworkHeader if head == 0 || nh == 0 || nh == 0xffff => 0,
        L3At::NetworkHeader => head + nh as u64,
    };
    (u16::from_be(proto), l3 as *const u8)
}

/// Parses and matches an skb. A packet that is not plainly the pair's but may be (one address of the
/// pair, no network header or an unreadable one; at a drop, `lookup_unknown`, also no protocol set yet)
/// is looked up in the tracking map; plainly unrelated traffic never touches the map. Headers that
/// plainly belong to another packet win over the map, at a drop too: the map keeps the addresses of
/// skbs the kernel freed where no tracepoint fires (most TCP data: `consume_skb` runs for almost none),
/// and an unrelated skb reusing one (an IPv6 neighbour solicitation vxlan_xmit drops, NO_TX_TARGET) ended
/// a healthy trace as "dropped" within a second of a bulk flow.
///
/// Nearly every packet a hook sees is not the pair's and says so in its first bytes: those leave here,
/// on a short straight path, and everything else goes to [`match_read`], a function of its own. Inlined,
/// the whole filter (4.4 KB of x86 per program) scattered the unrelated packet's path over the program.
#[inline(always)]
pub unsafe fn match_skb(c: &Config, skb: *const u8, at: L3At, fields: Fields, lookup_unknown: bool) -> Option<PacketInfo> {
    let (proto, l3) = unsafe { skb_l3(c, skb, at, fields) };
    if proto != ETH_P_IP && proto != ETH_P_ARP && !(lookup_unknown && proto == 0) {
        return None;
    }
    let mut buf = MaybeUninit::<Window>::uninit();
    let mut read = false;
    if proto == ETH_P_IP && !l3.is_null() {
        if unsafe { generated::bpf_probe_read_kernel(buf.as_mut_ptr().cast(), WIN as u32, l3.cast()) } == 0 {
            if unsafe { buf.assume_init_ref() }.unrelated_at_a_glance(c) {
                return None;
            }
            read = true;
        }
    }
    if !read {
        // What [`match_read`] is given is initialised either way (the verifier insists); it reads into it.
        unsafe { zero(buf.as_mut_ptr()) };
    }
    let how = proto as u64 | (read as u64) << 16 | ((fields == Fields::Direct) as u64) << 17;
    let mut p = MaybeUninit::<PacketInfo>::uninit();
    // match_read writes the whole packet info first.
    unsafe { match_read(skb as u64, l3 as u64, how, buf.as_mut_ptr(), p.as_mut_ptr()).then(|| p.assume_init()) }
}

/// The rest of [`match_skb`], for a packet that may be the pair's: `how` holds the protocol (bits 0–15;
/// 0 when not set yet: the tracking map decides), whether `w` holds the window read from `l3` (bit 16)
/// and whether `skb` is, to the verifier, a BTF-typed pointer (bit 17; see [`Skb`]). A BPF-to-BPF
/// call: five arguments at most, and plain numbers for the compiler. Zeroes `*p` first, then fills it
/// in. Cold: the compiler lays the unrelated path out without it.
#[cold]
#[inline(never)]
unsafe fn match_read(skb: u64, l3: u64, how: u64, w: *mut Window, p: *mut PacketInfo) -> bool {
    let c = config();
    let (proto, read) = (how as u16, how & 1 << 16 != 0);
    let skb = if how & 1 << 17 != 0 { Skb::Typed(skb) } else { Skb::Number(skb) };
    let l3 = l3 as *const u8;
    unsafe { zero(p) };
    let p = unsafe { &mut *p };
    let seen = if proto != ETH_P_IP && proto != ETH_P_ARP || l3.is_null() {
        Seen::OneSide
    } else {
        unsafe { match_l3(c, l3, proto, &mut *w, read, p) }
    };
    if seen == Seen::Match {
        track(skb);
        return true;
    }
    if seen == Seen::OneSide && tracked(skb) {
        p.flags |= pkt_flags::TRACKED_ONLY;
        return true;
    }
    false
}

/// Remembers a matched skb (a store only when its slot holds another: the slot's cache line stays
/// shared while one skb crosses its hops on several CPUs).
#[inline(always)]
fn track(skb: Skb) {
    let Some((skb, slot)) = skb.slot() else { return };
    if let Some(p) = TRACKED.get_ptr_mut(slot) {
        unsafe {
            if core::ptr::read_volatile(p) != skb {
                core::ptr::write_volatile(p, skb);
            }
        }
    }
}

/// Did a hook match this skb before (and the kernel has not freed it since)?
#[inline(always)]
pub fn tracked(skb: Skb) -> bool {
    let Some((skb, slot)) = skb.slot() else { return false };
    TRACKED.get(slot).is_some_and(|v| unsafe { core::ptr::read_volatile(v) } == skb)
}

/// Forgets an skb once the kernel freed it: its address will be reused. (Another CPU may store a new
/// skb in the slot between the check and the store; that skb is then forgotten too: rare, and only the
/// tracking of one skb is lost, never a wrong match.)
#[inline(always)]
pub fn forget(skb: Skb) {
    let Some((skb, slot)) = skb.slot() else { return };
    if let Some(p) = TRACKED.get_ptr_mut(slot) {
        unsafe {
            if core::ptr::read_volatile(p) == skb {
                core::ptr::write_volatile(p, 0);
            }
        }
    }
}

/// A record of `kind` for `skb`, with the packet the filter parsed.
#[inline(always)]
pub fn new_event(kind: EventKind, skb: *const u8, pkt: PacketInfo) -> Event {
    let mut ev: Event = zeroed();
    ev.header.kind = kind as u32;
    ev.header.skb = skb as u64;
    ev.pkt = pkt;
    ev
}

/// How urgently userspace wants a record: a drop ends a passive `follow`; the rest can wait for the
/// reader's next look.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Later,
    Now,
}

/// Stamps and writes a matched record; every call counts as matched and as emitted or lost.
#[inline(always)]
pub fn emit(ev: &mut Event, wake: Wake) {
    stamp(ev);
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(*ev);
            // No wakeup per record: a wakeup costs the traced flow more than the record itself, and
            // userspace polls every 10 ms while records come.
            slot.submit(wake_flags(wake));
            bump(counter::EMITTED);
        }
        None => bump(counter::LOST),
    }
}

#[inline(always)]
fn stamp(ev: &mut Event) {
    bump(counter::MATCHED);
    ev.header.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.header.cpu = unsafe { bpf_get_smp_processor_id() };
}

/// [`emit`] for a record about `skb`: with the packet's first bytes when `follow --write` asked for
/// them (`Config::snaplen`), in a function of its own that a trace without it never enters.
#[inline(always)]
pub fn emit_skb(c: &Config, ev: &mut Event, wake: Wake, skb: *const u8, at: L3At) {
    if c.snaplen == 0 {
        emit(ev, wake);
        return;
    }
    let how = (at == L3At::Data) as u64 | ((wake == Wake::Now) as u64) << 1;
    unsafe { emit_captured(ev as *mut Event, skb as u64, how) };
}

/// Writes `*ev` as a [`Captured`] record: `how` bit 0: the network header is at `data` (else at the
/// recorded network header); bit 1: wake the reader now. The bytes are read with the probe-read
/// helper whatever the program holds (a number or a BTF-typed pointer), from the network header up
/// to the end of the linear data (`tail`) and at most `snaplen`; a packet whose header is not set is
/// written without bytes.
#[cold]
#[inline(never)]
unsafe fn emit_captured(ev: *mut Event, skb: u64, how: u64) {
    let c = config();
    let at = if how & 1 != 0 { L3At::Data } else { L3At::NetworkHeader };
    let wake = if how & 2 != 0 { Wake::Now } else { Wake::Later };
    let skb = skb as *const u8;
    let ev = unsafe { &mut *ev };
    stamp(ev);
    let (_, l3) = unsafe { skb_l3(c, skb, at, Fields::Probed) };
    let mut n = c.snaplen as u64;
    if c.skb_tail != Config::ABSENT {
        let head: u64 = unsafe { read(skb, c.skb_head) }.unwrap_or(0);
        let tail: u32 = unsafe { read(skb, c.skb_tail) }.unwrap_or(0);
        let end = head + tail as u64;
        let linear = if head == 0 || end <= l3 as u64 { 0 } else { end - l3 as u64 };
        if linear < n {
            n = linear;
        }
    }
    if l3.is_null() {
        n = 0;
    }
    match EVENTS.reserve::<Captured>(0) {
        Some(mut slot) => {
            let p = slot.as_mut_ptr();
            let n = n as u32;
            unsafe {
                (*p).event = *ev;
                let ok = n > 0
                    && n <= MAX_SNAPLEN
                    && generated::bpf_probe_read_kernel((*p).bytes.as_mut_ptr().cast(), n, l3.cast()) == 0;
                (*p).caplen = if ok { n } else { 0 };
                (*p)._pad = 0;
            }
            slot.submit(wake_flags(wake));
            bump(counter::EMITTED);
        }
        None => bump(counter::LOST),
    }
}

/// Whether this record wakes the reader: only while it sleeps (an idle trace), for a drop or every
/// `WAKE_EVERY`th record of a CPU. A reader that polls on its own is never woken.
#[inline(always)]
fn wake_flags(wake: Wake) -> u64 {
    if !READER.get(0).is_some_and(|r| *r != 0) {
        return BPF_RB_NO_WAKEUP;
    }
    if wake == Wake::Now || COUNTERS.get(counter::EMITTED).is_some_and(|n| (*n + 1) % WAKE_EVERY == 0) {
        return BPF_RB_FORCE_WAKEUP;
    }
    BPF_RB_NO_WAKEUP
}

/// Namespace inode and ifindex of skb->dev.
#[inline(always)]
pub unsafe fn skb_dev_ids(c: &Config, skb: *const u8) -> (u32, u32) {
    let dev: *const u8 = unsafe { read(skb, c.skb_dev) }.unwrap_or(core::ptr::null());
    unsafe { dev_ids(c, dev) }
}

/// skb->dev's namespace and ifindex into the header.
#[inline(always)]
pub unsafe fn stamp_dev(c: &Config, skb: *const u8, ev: &mut Event) {
    (ev.header.netns, ev.header.ifindex) = unsafe { skb_dev_ids(c, skb) };
}
