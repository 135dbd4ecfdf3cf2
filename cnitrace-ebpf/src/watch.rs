//! `cnitrace watch`: every drop on the node, counted in the kernel by where and why. No pair filter and
//! no record per packet: one map update per drop (none for any other packet), read by userspace once a
//! period, so a node can run it for hours.

use aya_ebpf::{macros::{map, raw_tracepoint}, maps::LruPerCpuHashMap, programs::RawTracePointContext};
use cnitrace_common::DropKey;

use crate::filter::{config, read, skb_dev_ids, skb_l3, Fields, L3At};

#[map]
static DROPS: LruPerCpuHashMap<DropKey, u64> = LruPerCpuHashMap::with_max_entries(DropKey::MAX, 0);

const ETH_P_IP: u16 = 0x0800;

/// One more drop in this CPU's count of an entry (per-CPU values: no atomics, no shared cache line;
/// userspace sums them).
#[inline(always)]
fn bump(n: *mut u64) {
    unsafe { *n += 1 };
}

#[inline(always)]
fn count(ctx: &RawTracePointContext, reason: u32) -> i32 {
    let c = config();
    let skb: *const u8 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let (proto, l3) = unsafe { skb_l3(c, skb, L3At::NetworkHeader, Fields::Probed) };
    let (netns, ifindex) = unsafe { skb_dev_ids(c, skb) };
    let mut key = DropKey { location, netns, ifindex, reason, proto, l4: 0, _pad: 0, saddr: 0, daddr: 0 };
    if proto == ETH_P_IP && !l3.is_null() {
        // version/ihl … protocol at 9, saddr at 12, daddr at 16.
        if let Some(h) = unsafe { read::<[u32; 5]>(l3, 0) } {
            key.l4 = (u32::from_be(h[2]) >> 16) as u8;
            key.saddr = h[3];
            key.daddr = h[4];
        }
    }
    match DROPS.get_ptr_mut(&key) {
        Some(n) => bump(n),
        None => {
            // Another CPU may have inserted it meanwhile: then this drop goes to this CPU's count there.
            if DROPS.insert(&key, &1, 1 /* BPF_NOEXIST */).is_err() {
                if let Some(n) = DROPS.get_ptr_mut(&key) {
                    bump(n);
                }
            }
        }
    }
    0
}

// >= 5.17: TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason[, struct sock *rx_sk])
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn watch_drop_reason(ctx: RawTracePointContext) -> i32 {
    let reason: u32 = ctx.arg(2);
    count(&ctx, reason)
}

// < 5.17: TP_PROTO(struct sk_buff *skb, void *location).
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn watch_drop_legacy(ctx: RawTracePointContext) -> i32 {
    count(&ctx, 0)
}
