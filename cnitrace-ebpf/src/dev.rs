//! Every device on the path: transmit and receive. (net_dev_queue is left out: every frame that leaves
//! a device passes net_dev_start_xmit too, and a second record per hop cost a third of the traced
//! flow's throughput in `cargo xtask bench`.)

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use cnitrace_common::EventKind;

use crate::filter::{config, count_only, counting_only, emit, match_skb, new_event, stamp_dev, L3At};

#[inline(always)]
fn on_skb(ctx: &RawTracePointContext, kind: EventKind, at: L3At) -> i32 {
    let c = config();
    if c.enabled == 0 {
        return 0;
    }
    let skb: *const u8 = ctx.arg(0);
    let mut ev = new_event(kind, skb);
    unsafe {
        if !match_skb(c, skb, at, &mut ev, false) {
            return 0;
        }
        // Matched (and tracked for a later drop); the record itself only within this CPU's budget.
        if counting_only(c) {
            count_only();
            return 0;
        }
        stamp_dev(c, skb, &mut ev);
    }
    emit(&mut ev);
    0
}

// TP_PROTO(const struct sk_buff *skb, const struct net_device *dev)
#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
pub fn net_dev_start_xmit(ctx: RawTracePointContext) -> i32 {
    on_skb(&ctx, EventKind::Xmit, L3At::NetworkHeader)
}

// TP_PROTO(struct sk_buff *skb); the MAC header is already pulled: skb->data is the L3 header.
#[raw_tracepoint(tracepoint = "netif_receive_skb")]
pub fn netif_receive_skb(ctx: RawTracePointContext) -> i32 {
    on_skb(&ctx, EventKind::Receive, L3At::Data)
}
