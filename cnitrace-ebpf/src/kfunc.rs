//! Optional kprobes on the kernel functions tracepoints cannot see into: which netfilter hook ran and
//! its verdict, the bridge's forwarding, VXLAN encapsulation and decapsulation, IP forwarding and the
//! reverse-path check. Userspace tries each one at start and carries on without it when the kernel
//! refuses (no CONFIG_KPROBES, as on this project's CI kernel): they add detail, never the verdict.

use aya_ebpf::{
    macros::{kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{ProbeContext, RetProbeContext},
};
use cnitrace_common::{func, EventKind};

use crate::filter::{config, count_only, counting_only, emit, match_skb, new_event, read, skb_dev_ids, stamp_dev, zeroed, Fields, L3At, Wake};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Frame {
    skb: u64,
    /// The device at entry: by the return, okfn may have carried the skb into another namespace.
    netns: u32,
    ifindex: u32,
}

impl Frame {
    #[inline(always)]
    fn at_entry(skb: *const u8, matched: bool) -> Frame {
        if !matched {
            return Frame { skb: 0, netns: 0, ifindex: 0 };
        }
        let (netns, ifindex) = unsafe { skb_dev_ids(config(), skb) };
        Frame { skb: skb as u64, netns, ifindex }
    }
}

/// Per CPU: the skb fib_validate_source was called for (it does not nest).
#[map]
static RPF_SLOT: PerCpuArray<Frame> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn entry(skb: *const u8, id: u32, extra: u32) -> bool {
    let c = config();
    if c.enabled == 0 || skb.is_null() {
        return false;
    }
    let Some(pkt) = (unsafe { match_skb(c, skb, L3At::NetworkHeader, Fields::Probed, false) }) else { return false };
    if counting_only(c) {
        count_only();
        return true;
    }
    let mut ev = new_event(EventKind::FuncEntry, skb, pkt);
    unsafe { stamp_dev(c, skb, &mut ev) };
    ev.reason = id;
    ev.oif = extra;
    emit(&mut ev, Wake::Later);
    true
}

#[inline(always)]
fn ret_event(f: &Frame, id: u32, ret: i32) {
    let c = config();
    // A refusal is evidence, always written; a success is a hop.
    if ret == 0 && counting_only(c) {
        count_only();
        return;
    }
    let skb = f.skb as *const u8;
    // Matched at entry: the headers may have changed since (NAT), the identity has not.
    let pkt = unsafe { match_skb(c, skb, L3At::NetworkHeader, Fields::Probed, true) }.unwrap_or_else(zeroed);
    let mut ev = new_event(EventKind::FuncReturn, skb, pkt);
    ev.header.netns = f.netns;
    ev.header.ifindex = f.ifindex;
    ev.reason = id;
    ev.err = ret;
    emit(&mut ev, Wake::Later);
}

// int nf_hook_slow(struct sk_buff *skb, struct nf_hook_state *state, const struct nf_hook_entries *e, unsigned int s)
// Entry only: a drop inside it is the kfree_skb right after, so the last hook a dropped packet entered
// is the hook that dropped it. (A kretprobe paired through a per-CPU stack lost its place on real
// traffic: a return the program did not see left every later frame off by one.)
#[kprobe]
pub fn kp_nf_hook_slow(ctx: ProbeContext) -> u32 {
    let c = config();
    let skb: *const u8 = ctx.arg(0).unwrap_or(core::ptr::null());
    let state: *const u8 = ctx.arg(1).unwrap_or(core::ptr::null());
    let hook: u8 = unsafe { read(state, c.nf_state_hook) }.unwrap_or(0xff);
    let pf: u8 = unsafe { read(state, c.nf_state_pf) }.unwrap_or(0xff);
    entry(skb, func::NF_HOOK_SLOW, hook as u32 | (pf as u32) << 8);
    0
}

// int fib_validate_source(struct sk_buff *skb, __be32 src, __be32 dst, dscp_t dscp, int oif,
//                         struct net_device *dev, struct in_device *idev, u32 *itag)
#[kprobe]
pub fn kp_fib_validate_source(ctx: ProbeContext) -> u32 {
    let c = config();
    let skb: *const u8 = ctx.arg(0).unwrap_or(core::ptr::null());
    let mut matched = false;
    if c.enabled != 0 && !skb.is_null() {
        matched = unsafe { match_skb(c, skb, L3At::NetworkHeader, Fields::Probed, false) }.is_some();
    }
    if let Some(slot) = RPF_SLOT.get_ptr_mut(0) {
        unsafe { *slot = Frame::at_entry(skb, matched) };
    }
    0
}

#[kretprobe]
pub fn kr_fib_validate_source(ctx: RetProbeContext) -> u32 {
    let Some(slot) = RPF_SLOT.get_ptr_mut(0) else { return 0 };
    let f = unsafe { *slot };
    unsafe { (*slot).skb = 0 };
    if f.skb != 0 {
        let ret: i32 = ctx.ret();
        ret_event(&f, func::FIB_VALIDATE_SOURCE, ret);
    }
    0
}

// void br_forward(const struct net_bridge_port *to, struct sk_buff *skb, bool local_rcv, bool local_orig)
#[kprobe]
pub fn kp_br_forward(ctx: ProbeContext) -> u32 {
    entry(ctx.arg(1).unwrap_or(core::ptr::null()), func::BR_FORWARD, 0);
    0
}

// netdev_tx_t vxlan_xmit(struct sk_buff *skb, struct net_device *dev)
#[kprobe]
pub fn kp_vxlan_xmit(ctx: ProbeContext) -> u32 {
    entry(ctx.arg(0).unwrap_or(core::ptr::null()), func::VXLAN_XMIT, 0);
    0
}

// int vxlan_rcv(struct sock *sk, struct sk_buff *skb)
#[kprobe]
pub fn kp_vxlan_rcv(ctx: ProbeContext) -> u32 {
    entry(ctx.arg(1).unwrap_or(core::ptr::null()), func::VXLAN_RCV, 0);
    0
}

// int ip_forward(struct sk_buff *skb)
#[kprobe]
pub fn kp_ip_forward(ctx: ProbeContext) -> u32 {
    entry(ctx.arg(0).unwrap_or(core::ptr::null()), func::IP_FORWARD, 0);
    0
}
