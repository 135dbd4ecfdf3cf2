//! Every device on the path: transmit and receive. (net_dev_queue is left out: every frame that leaves
//! a device passes net_dev_start_xmit too, and a second record per hop cost a third of the traced
//! flow's throughput in `cargo xtask bench`.)
//!
//! These two run for every packet on the node, the pair's or not, so each comes twice: as a BTF
//! tracepoint (`tp_btf`: the skb's fields are plain loads, one helper call less per packet) and as a raw
//! tracepoint for kernels that refuse the first. Userspace attaches one of the two.

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use cnitrace_common::EventKind;

use crate::filter::{config, count_only, counting_only, emit_skb, match_skb, new_event, stamp_dev, Fields, L3At, Wake};

#[inline(always)]
fn on_skb(skb: *const u8, kind: EventKind, at: L3At, fields: Fields) -> i32 {
    let c = config();
    if c.enabled == 0 {
        return 0;
    }
    let Some(pkt) = (unsafe { match_skb(c, skb, at, fields, false) }) else { return 0 };
    // Matched (and tracked for a later drop); the record itself only within this CPU's budget.
    if counting_only(c) {
        count_only();
        return 0;
    }
    let mut ev = new_event(kind, skb, pkt);
    unsafe { stamp_dev(c, skb, &mut ev) };
    emit_skb(c, &mut ev, Wake::Later, skb, at);
    0
}

// TP_PROTO(const struct sk_buff *skb, const struct net_device *dev)
#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
pub fn net_dev_start_xmit(ctx: RawTracePointContext) -> i32 {
    on_skb(ctx.arg(0), EventKind::Xmit, L3At::NetworkHeader, Fields::Probed)
}

#[btf_tracepoint(function = "net_dev_start_xmit")]
pub fn tp_net_dev_start_xmit(ctx: BtfTracePointContext) -> i32 {
    on_skb(ctx.arg(0), EventKind::Xmit, L3At::NetworkHeader, Fields::Direct)
}

// TP_PROTO(struct sk_buff *skb); the MAC header is already pulled: skb->data is the L3 header.
#[raw_tracepoint(tracepoint = "netif_receive_skb")]
pub fn netif_receive_skb(ctx: RawTracePointContext) -> i32 {
    on_skb(ctx.arg(0), EventKind::Receive, L3At::Data, Fields::Probed)
}

#[btf_tracepoint(function = "netif_receive_skb")]
pub fn tp_netif_receive_skb(ctx: BtfTracePointContext) -> i32 {
    on_skb(ctx.arg(0), EventKind::Receive, L3At::Data, Fields::Direct)
}
