//! cnitrace's kernel side: tracepoint programs that follow one pair of pod addresses.
//!
//! Every hook goes through `filter` (parse once, match the pair / its ARP / VXLAN inner headers, remember
//! the skb) and `emit` (one fixed-size record, counted as matched, emitted or lost). Struct offsets come
//! from userspace through `CONFIG`: Rust eBPF has no CO-RE relocations.
#![no_std]
#![no_main]

mod dev;
mod drop;
mod filter;
mod kfunc;
mod neigh;
mod route;
mod watch;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
