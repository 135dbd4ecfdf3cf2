//! Where packets end: dropped (kfree_skb, with location and reason) or consumed.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use cnitrace_common::EventKind;

use crate::filter::{config, count_only, counting_only, emit_skb, forget, match_skb, new_event, stamp_dev, tracked, Fields, L3At, Skb, Wake};

#[inline(always)]
fn on_drop(ctx: &RawTracePointContext, reason: u32) -> i32 {
    let c = config();
    if c.enabled == 0 {
        return 0;
    }
    let skb: *const u8 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let Some(pkt) = (unsafe { match_skb(c, skb, L3At::NetworkHeader, Fields::Probed, true) }) else { return 0 };
    let mut ev = new_event(EventKind::Drop, skb, pkt);
    unsafe { stamp_dev(c, skb, &mut ev) };
    forget(Skb::Number(skb as u64));
    ev.location = location;
    ev.reason = reason;
    // The record a passive `follow` waits for: wake it.
    emit_skb(c, &mut ev, Wake::Now, skb, L3At::NetworkHeader);
    0
}

// >= 5.17: TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason[, struct sock *rx_sk])
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn kfree_skb_reason(ctx: RawTracePointContext) -> i32 {
    let reason: u32 = ctx.arg(2);
    on_drop(&ctx, reason)
}

// < 5.17: TP_PROTO(struct sk_buff *skb, void *location). Userspace loads one of the two.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn kfree_skb_legacy(ctx: RawTracePointContext) -> i32 {
    on_drop(&ctx, 0)
}

// TP_PROTO(struct sk_buff *skb[, void *location]). Every packet that ends well passes here, most of
// them long after their headers left the cache: only an skb a hook matched before is of interest, and
// a lookup by its address (lock-free) decides that without touching the packet. A hit is checked
// against the headers once more (an skb freed where no tracepoint fires leaves its address behind, and
// an unrelated skb may reuse it).
#[raw_tracepoint(tracepoint = "consume_skb")]
pub fn consume_skb(ctx: RawTracePointContext) -> i32 {
    let c = config();
    if c.enabled == 0 {
        return 0;
    }
    let skb: *const u8 = ctx.arg(0);
    if !tracked(Skb::Number(skb as u64)) {
        return 0;
    }
    let ours = unsafe { match_skb(c, skb, L3At::NetworkHeader, Fields::Probed, false) };
    // The skb's address will be reused (and a stale entry goes too).
    forget(Skb::Number(skb as u64));
    let Some(pkt) = ours else { return 0 };
    if counting_only(c) {
        count_only();
        return 0;
    }
    let mut ev = new_event(EventKind::Consume, skb, pkt);
    unsafe { stamp_dev(c, skb, &mut ev) };
    emit_skb(c, &mut ev, Wake::Later, skb, L3At::NetworkHeader);
    0
}
