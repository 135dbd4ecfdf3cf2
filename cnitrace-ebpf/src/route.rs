//! Route lookups for the pair.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use cnitrace_common::{EventKind, ETH_P_IP};

use crate::filter::{config, count_only, counting_only, dev_ids, emit, new_event, read};

// TP_PROTO(u32 tb_id, const struct flowi4 *flp, const struct fib_nh_common *nhc, int err)
// No net argument: the namespace comes from the result's device when there is one; userspace places a
// failed lookup with the packet seen just before on the same CPU.
#[raw_tracepoint(tracepoint = "fib_table_lookup")]
pub fn fib_table_lookup(ctx: RawTracePointContext) -> i32 {
    let c = config();
    if c.enabled == 0 {
        return 0;
    }
    let tb_id: u32 = ctx.arg(0);
    let flp: *const u8 = ctx.arg(1);
    let nhc: *const u8 = ctx.arg(2);
    let err: i32 = ctx.arg(3);
    let daddr: u32 = unsafe { read(flp, c.flowi4_daddr) }.unwrap_or(0);
    if daddr != c.addr_a && daddr != c.addr_b {
        return 0;
    }
    // A failed lookup is evidence, always written; a successful one is a hop.
    if err == 0 && counting_only(c) {
        count_only();
        return 0;
    }
    let saddr: u32 = unsafe { read(flp, c.flowi4_saddr) }.unwrap_or(0);
    let mut ev = new_event(EventKind::FibLookup, core::ptr::null());
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
    emit(&mut ev);
    0
}
