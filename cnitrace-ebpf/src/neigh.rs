//! ARP resolution of the pair's addresses: state changes and the timer that fails them.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use cnitrace_common::{EventKind, ETH_P_ARP};

use crate::filter::{config, dev_ids, emit, in_pair, is_next_hop, new_event, read, zeroed, Wake};

#[inline(always)]
fn on_neigh(n: *const u8, lladdr: *const u8, kind: EventKind, new_state: Option<u32>, err: i32) -> i32 {
    let c = config();
    if c.enabled == 0 {
        return 0;
    }
    let key: u32 = unsafe { read(n, c.neigh_primary_key) }.unwrap_or(0);
    if !in_pair(c, key) && !is_next_hop(c, key) {
        return 0;
    }
    let mut ev = new_event(kind, core::ptr::null(), zeroed());
    ev.pkt.ethertype = ETH_P_ARP;
    ev.pkt.daddr = key;
    let dev: *const u8 = unsafe { read(n, c.neigh_dev) }.unwrap_or(core::ptr::null());
    let (netns, ifindex) = unsafe { dev_ids(c, dev) };
    ev.header.netns = netns;
    ev.header.ifindex = ifindex;
    let state: u8 = unsafe { read(n, c.neigh_nud_state) }.unwrap_or(0);
    ev.reason = new_state.unwrap_or(state as u32);
    // The address being written (neigh_update), else the entry's own.
    let ha: [u8; 6] = if lladdr.is_null() {
        unsafe { read(n, c.neigh_ha) }.unwrap_or([0; 6])
    } else {
        unsafe { read(lladdr, 0) }.unwrap_or([0; 6])
    };
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(&ha);
    ev.location = u64::from_le_bytes(b);
    ev.err = err;
    emit(&mut ev, Wake::Later);
    0
}

// TP_PROTO(struct neighbour *n, const u8 *lladdr, u8 new, u32 flags, u32 nlmsg_pid)
#[raw_tracepoint(tracepoint = "neigh_update")]
pub fn neigh_update(ctx: RawTracePointContext) -> i32 {
    let n: *const u8 = ctx.arg(0);
    let lladdr: *const u8 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    on_neigh(n, lladdr, EventKind::NeighUpdate, Some((new & 0xff) as u32), 0)
}

// TP_PROTO(struct neighbour *n, int err)
#[raw_tracepoint(tracepoint = "neigh_timer_handler")]
pub fn neigh_timer_handler(ctx: RawTracePointContext) -> i32 {
    let n: *const u8 = ctx.arg(0);
    let err: i32 = ctx.arg(1);
    on_neigh(n, core::ptr::null(), EventKind::NeighTimer, None, err)
}
