//! Route lookups for the pair.

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use cnitrace_common::{EventKind, ETH_P_IP};

use crate::filter::{config, count_only, counting_only, dev_ids, emit, in_pair, is_pair, load, new_event, read, zeroed, Fields, Wake};

// TP_PROTO(u32 tb_id, const struct flowi4 *flp, const struct fib_nh_common *nhc, int err)
// No net argument: the namespace comes from the result's device when there is one; userspace places a
// failed lookup with the packet seen just before on the same CPU. Every lookup on the node runs it, so
// it comes as a BTF tracepoint too (flowi4's addresses are plain loads), as the device hooks do.
#[raw_tracepoint(tracepoint = "fib_table_lookup")]
pub fn fib_table_lookup(ctx: RawTracePointContext) -> i32 {
    on_lookup(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3), Fields::Probed)
}

#[btf_tracepoint(function = "fib_table_lookup")]
pub fn tp_fib_table_lookup(ctx: BtfTracePointContext) -> i32 {
    on_lookup(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3), Fields::Direct)
}

#[inline(always)]
fn on_lookup(tb_id: u32, flp: *const u8, nhc: *const u8, err: i32, fields: Fields) -> i32 {
    let c = config();
    if c.enabled == 0 {
        return 0;
    }
    let (saddr, daddr): (u32, u32) = match fields {
        Fields::Direct => unsafe { (load(flp, c.flowi4_saddr), load(flp, c.flowi4_daddr)) },
        Fields::Probed => unsafe { (read(flp, c.flowi4_saddr).unwrap_or(0), read(flp, c.flowi4_daddr).unwrap_or(0)) },
    };
    // The pair's own lookups: towards one of them from the other (the reverse-path check swaps the two),
    // or from a socket not bound yet. Another host's traffic to one of the pair is not the pair's.
    if !(is_pair(c, saddr, daddr) || (saddr == 0 && in_pair(c, daddr))) {
        return 0;
    }
    // A failed lookup is evidence, always written; a successful one is a hop.
    if err == 0 && counting_only(c) {
        count_only();
        return 0;
    }
    let mut ev = new_event(EventKind::FibLookup, core::ptr::null(), zeroed());
    ev.pkt.ethertype = ETH_P_IP;
    ev.pkt.saddr = saddr;
    ev.pkt.daddr = daddr;
    ev.reason = tb_id;
    ev.err = err;
    if !nhc.is_null() {
        let dev: *const u8 = unsafe { read(nhc, c.nhc_dev) }.unwrap_or(core::ptr::null());
        let (netns, ifindex) = unsafe { dev_ids(c, dev) };
        ev.header.netns = netns;
        ev.oif = ifindex;
    }
    emit(&mut ev, Wake::Later);
    0
}
