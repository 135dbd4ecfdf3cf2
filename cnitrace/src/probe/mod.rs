//! Loading and attaching the eBPF programs, and reading what they report.
//!
//! "Can this hook run here?" is separate from "attach it": each hook is tried on its own, a refusal is
//! recorded with its one-line reason, and tracing carries on with the rest. kprobes and fentry are
//! refused on some kernels (this project's CI kernel among them), so nothing here needs them.

pub mod btf;
pub mod kallsyms;
pub mod watch;

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, KProbe, Program, ProgramError, RawTracePoint},
    Ebpf, EbpfLoader,
};
use cnitrace_common::{counter, Captured, Config, Event};
use serde::Serialize;

/// One hook: the program in the object and the tracepoint it attaches to.
struct Hook {
    program: &'static str,
    tracepoint: &'static str,
    /// The same program as a BTF tracepoint (`tp_btf`), for hooks every packet on the node runs: it
    /// reads the skb's fields with plain loads, one helper call (~50 ns here) less per packet. Tried
    /// first; the raw tracepoint is the fallback.
    btf_program: Option<&'static str>,
    /// Without it, no verdict is possible.
    essential: bool,
}

const HOOKS: &[Hook] = &[
    Hook { program: "net_dev_start_xmit", tracepoint: "net_dev_start_xmit", btf_program: Some("tp_net_dev_start_xmit"), essential: true },
    Hook { program: "netif_receive_skb", tracepoint: "netif_receive_skb", btf_program: Some("tp_netif_receive_skb"), essential: true },
    // kfree_skb_reason or kfree_skb_legacy, chosen from the tracepoint's arguments.
    Hook { program: "kfree_skb", tracepoint: "kfree_skb", btf_program: None, essential: true },
    Hook { program: "consume_skb", tracepoint: "consume_skb", btf_program: None, essential: false },
    Hook { program: "fib_table_lookup", tracepoint: "fib_table_lookup", btf_program: Some("tp_fib_table_lookup"), essential: false },
    Hook { program: "neigh_update", tracepoint: "neigh_update", btf_program: None, essential: false },
    Hook { program: "neigh_timer_handler", tracepoint: "neigh_timer_handler", btf_program: None, essential: false },
];

/// How to load the programs, beyond the pair.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Records per CPU before hop records are only counted (0: no limit).
    pub hop_budget: u32,
    /// Have the kernel keep each program's run count and time (BPF_ENABLE_STATS) while loaded.
    pub kernel_stats: bool,
    /// Also try the optional kprobes (false: tracepoints only, even where kprobes work).
    pub kprobes: bool,
    /// Attach the hooks that have one as BTF tracepoints (false: raw tracepoints only).
    pub btf_tracepoints: bool,
    /// Attach every program with the filter off: each run returns at once. What the hooks alone cost
    /// (the kernel's dispatch and entering a program), the floor `cargo xtask bench` measures against.
    pub hooks_only: bool,
    /// More addresses of each side of the pair (a Service's traffic after NAT): see `Config::alt_a`.
    pub alt_a: Vec<Ipv4Addr>,
    pub alt_b: Vec<Ipv4Addr>,
    /// Bytes of each packet record to capture in the kernel (`follow --write`); 0: none.
    pub snaplen: u32,
}

/// An optional kprobe (or kprobe + kretprobe pair) on one kernel function: detail that tracepoints
/// cannot give. Used where it attaches; otherwise skipped with its reason.
struct Extra {
    function: &'static str,
    entry: &'static str,
    /// The kretprobe of the pair, when the return value is the point.
    ret: Option<&'static str>,
}

const EXTRAS: &[Extra] = &[
    // Which netfilter hooks the packet went through: the last one before a drop there dropped it.
    Extra { function: "nf_hook_slow", entry: "kp_nf_hook_slow", ret: None },
    // The reverse-path check's own answer (rp_filter).
    Extra { function: "fib_validate_source", entry: "kp_fib_validate_source", ret: Some("kr_fib_validate_source") },
    Extra { function: "br_forward", entry: "kp_br_forward", ret: None },
    Extra { function: "ip_forward", entry: "kp_ip_forward", ret: None },
    Extra { function: "vxlan_xmit", entry: "kp_vxlan_xmit", ret: None },
    Extra { function: "vxlan_rcv", entry: "kp_vxlan_rcv", ret: None },
];

/// Why this kernel takes no kprobes at all, checked before any is loaded (None: it may).
fn kprobes_unavailable() -> Option<String> {
    let pmu = std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
    let tracefs = ["/sys/kernel/tracing/kprobe_events", "/sys/kernel/debug/tracing/kprobe_events"].iter().any(|p| std::path::Path::new(p).exists());
    (!pmu && !tracefs).then(|| "this kernel has no kprobes (no kprobe PMU, no kprobe_events): tracepoints only".to_string())
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct HookStatus {
    pub hook: String,
    pub attached: bool,
    /// Why not, in one line.
    pub reason: Option<String>,
}

/// The kernel's own accounting of one program (BPF_ENABLE_STATS).
#[derive(Clone, Debug, Serialize)]
pub struct ProgramStats {
    pub program: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub matched: u64,
    pub emitted: u64,
    pub lost: u64,
    /// Hop records past the kept timeline, counted in the kernel instead of written (not in `matched`).
    pub counted_only: u64,
}

/// One record of the ring buffer: the event, and the packet's first bytes when they were captured.
pub struct Record {
    pub event: Event,
    pub bytes: Option<Box<[u8]>>,
}

/// The kernel side, loaded and attached. Dropping it detaches everything (links are fds of this process,
/// so even SIGKILL leaves nothing behind).
pub struct Probe {
    ebpf: Option<Ebpf>,
    /// Held while the kernel keeps per-program run time (only when asked: it costs every program run).
    _stats: Option<std::os::fd::OwnedFd>,
    ring: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    /// Slot 0: 1 while this reader sleeps until the kernel wakes it (see `wait_woken`).
    reader: Array<MapData, u32>,
    pub hooks: Vec<HookStatus>,
    /// `enum skb_drop_reason` of this kernel (empty before 5.17).
    pub drop_reasons: BTreeMap<u32, String>,
    pub kfree_has_reason: bool,
}

/// An `EbpfLoader` that has not parsed the kernel's BTF. `EbpfLoader::new()` always does
/// (aya-rs/aya#1172), though `.btf(None)` then throws it away: 18 MiB of heap for this host's 5.5 MB BTF
/// — three quarters of cnitrace's peak memory — and more on distribution kernels, for nothing (raw
/// tracepoints and kprobes attach by name; our offsets come from btf-rs). So it is made on a thread
/// with a mount namespace of its own where /sys/kernel/btf is an empty tmpfs: aya finds no BTF and
/// parses none. The namespace is private (no mount propagates to the host's) and ends with the
/// thread. Where any step is refused, the plain loader is the fallback.
pub(crate) fn loader_without_kernel_btf() -> EbpfLoader<'static> {
    use nix::{
        mount::{mount, MsFlags},
        sched::{unshare, CloneFlags},
    };
    let masked = std::thread::spawn(|| -> nix::Result<EbpfLoader<'static>> {
        // A thread may leave the process's mount namespace (CLONE_NEWNS implies CLONE_FS only).
        unshare(CloneFlags::CLONE_NEWNS)?;
        // First make every mount private in the new namespace: only then does a mount stay in it.
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)?;
        mount(Some("cnitrace-no-btf"), "/sys/kernel/btf", Some("tmpfs"), MsFlags::MS_RDONLY, None::<&str>)?;
        Ok(EbpfLoader::new())
    })
    .join();
    let mut loader = match masked {
        Ok(Ok(l)) => l,
        _ => EbpfLoader::new(),
    };
    loader.btf(None);
    loader
}

impl Probe {
    /// Loads the programs with the kernel's offsets and the pair, then attaches every hook it can.
    /// `next_hops`: gateways the pair's packets resolve on the way (up to 4; their ARP is followed too).
    pub fn start(a: Ipv4Addr, b: Ipv4Addr, next_hops: &[Ipv4Addr], vxlan_ports: [u16; 2], opts: &ProbeOptions) -> Result<Probe> {
        raise_memlock();
        let stats = if opts.kernel_stats {
            Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?)
        } else {
            None
        };
        let mut loader = loader_without_kernel_btf();
        let kbtf = btf::KernelBtf::load()?;
        let mut cfg: Config = kbtf.config()?;
        cfg.addr_a = u32::from_ne_bytes(a.octets());
        cfg.addr_b = u32::from_ne_bytes(b.octets());
        for (slot, hop) in cfg.next_hops.iter_mut().zip(next_hops.iter().filter(|h| **h != a && **h != b)) {
            *slot = u32::from_ne_bytes(hop.octets());
        }
        for (slot, ip) in cfg.alt_a.iter_mut().zip(&opts.alt_a) {
            *slot = u32::from_ne_bytes(ip.octets());
        }
        for (slot, ip) in cfg.alt_b.iter_mut().zip(&opts.alt_b) {
            *slot = u32::from_ne_bytes(ip.octets());
        }
        cfg.alts = u32::from(!opts.alt_a.is_empty() || !opts.alt_b.is_empty());
        cfg.hop_budget = opts.hop_budget;
        cfg.snaplen = opts.snaplen.min(cnitrace_common::MAX_SNAPLEN);
        cfg.vxlan_port_1 = vxlan_ports[0];
        cfg.vxlan_port_2 = vxlan_ports[1];
        cfg.enabled = u32::from(!opts.hooks_only);
        let kfree_args = kbtf.tracepoint_args("kfree_skb").unwrap_or(2);
        let kfree_has_reason = kfree_args >= 3;
        let drop_reasons = kbtf.drop_reasons();
        let btf_targets = if opts.btf_tracepoints {
            let tps: Vec<&str> = HOOKS.iter().filter(|h| h.btf_program.is_some()).map(|h| h.tracepoint).collect();
            Some(btf::attach_targets(&kbtf.tracepoint_type_ids(&tps)))
        } else {
            None
        };
        drop(kbtf);
        let mut ebpf = loader
            .override_global("CONFIG", &cfg, true)
            .load(crate::EBPF_OBJECT)
            .context("load the eBPF object")?;

        let mut hooks = Vec::new();
        for h in HOOKS {
            let program = match h.program {
                "kfree_skb" if kfree_has_reason => "kfree_skb_reason",
                "kfree_skb" => "kfree_skb_legacy",
                p => p,
            };
            if let (Some(bp), Some(targets)) = (h.btf_program, &btf_targets) {
                let r = targets.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|t| attach_btf(&mut ebpf, bp, h.tracepoint, t));
                let attached = r.is_ok();
                hooks.push(HookStatus {
                    hook: format!("tp_btf/{}", h.tracepoint),
                    attached,
                    reason: r.err().map(|e| format!("{e:#}; attached as a raw tracepoint instead")),
                });
                if attached {
                    continue;
                }
            }
            let r = attach(&mut ebpf, program, h.tracepoint);
            if let Err(e) = &r {
                if h.essential {
                    return Err(anyhow::anyhow!("cannot attach to tracepoint {}: {e:#}", h.tracepoint));
                }
            }
            hooks.push(HookStatus {
                hook: format!("raw_tp/{}", h.tracepoint),
                attached: r.is_ok(),
                reason: r.err().map(|e| format!("{e:#}")),
            });
        }
        drop(btf_targets);
        let refused = if opts.kprobes { kprobes_unavailable() } else { Some("turned off (--no-kprobes)".into()) };
        match refused {
            Some(why) => hooks.push(HookStatus { hook: "kprobe/*".into(), attached: false, reason: Some(why) }),
            None => {
                for x in EXTRAS {
                    let r = attach_kprobe(&mut ebpf, x.entry, x.function).and_then(|_| match x.ret {
                        Some(ret) => attach_kprobe(&mut ebpf, ret, x.function).inspect_err(|_| {
                            // Half a pair would leave the entry's per-CPU state unread: drop both.
                            if let Ok(k) = program::<KProbe>(&mut ebpf, x.entry) {
                                let _ = k.unload();
                            }
                        }),
                        None => Ok(()),
                    });
                    hooks.push(HookStatus {
                        hook: format!("{}/{}", if x.ret.is_some() { "kprobe+kretprobe" } else { "kprobe" }, x.function),
                        attached: r.is_ok(),
                        reason: r.err().map(|e| format!("{e:#}")),
                    });
                }
            }
        }
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map")?)?;
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("COUNTERS map")?)?;
        let reader = Array::try_from(ebpf.take_map("READER").context("READER map")?)?;
        Ok(Probe { ebpf: Some(ebpf), _stats: stats, ring, counters, reader, hooks, drop_reasons, kfree_has_reason })
    }

    /// Hands every record waiting in the ring buffer to `each`, oldest first.
    pub fn drain(&mut self, mut each: impl FnMut(Record)) {
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<Captured>() {
                // SAFETY: a record this size is one `Captured` (see `Event`).
                let c = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Captured) };
                let n = (c.caplen as usize).min(c.bytes.len());
                each(Record { event: c.event, bytes: (n > 0).then(|| c.bytes[..n].into()) });
            } else if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the kernel side writes one `Event` per record (or a `Captured`, above);
                // read_unaligned copes with the ring buffer's 8-byte alignment.
                each(Record { event: unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) }, bytes: None });
            }
        }
    }

    /// Waits `timeout` before the next drain (the programs submit without waking the consumer): while
    /// records come, a fixed period batches them.
    pub fn wait(&self, timeout: Duration) {
        std::thread::sleep(timeout);
    }

    /// Sleeps until the kernel wakes the reader or `timeout` passes: for an idle trace. Meanwhile the
    /// programs wake it for a drop and for every 4,096th record of a CPU (so a burst cannot fill the
    /// ring); other records wait for the timeout. A reader that polls (`wait`) is never woken: a wakeup
    /// costs the traced flow more than its record.
    pub fn wait_woken(&mut self, timeout: Duration) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        // If the flag cannot be set, the sleep is a plain timeout.
        let _ = self.reader.set(0, 1, 0);
        let mut fds = [PollFd::new(self.ring.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        // Interrupted (Ctrl-C) or woken: either way the caller looks again.
        let _ = poll(&mut fds, ms);
        let _ = self.reader.set(0, 0, 0);
    }

    /// Run count and time of each loaded program (meaningful with kernel stats on).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let Some(ebpf) = self.ebpf.as_ref() else { return Vec::new() };
        ebpf.programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some(ProgramStats { program: name.to_string(), run_count: info.run_count(), run_time_ns: info.run_time().as_nanos() as u64 })
            })
            .filter(|s| s.run_count > 0 || s.run_time_ns > 0)
            .collect()
    }

    /// Detaches every program (the maps stay): after this no record is matched, emitted or lost any
    /// more, so the counters read next add up exactly.
    pub fn detach(&mut self) {
        self.ebpf.take();
    }

    /// Matched, emitted and lost records, summed over CPUs.
    pub fn counters(&self) -> Counters {
        let sum = |slot: u32| self.counters.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0);
        Counters {
            matched: sum(counter::MATCHED),
            emitted: sum(counter::EMITTED),
            lost: sum(counter::LOST),
            counted_only: sum(counter::COUNTED_ONLY),
        }
    }
}

/// The program `name` of the object, as the kind it is declared as (raw tracepoint, kprobe...).
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    Ok(ebpf.program_mut(name).with_context(|| format!("no program {name} in the object"))?.try_into()?)
}

pub(crate) fn attach(ebpf: &mut Ebpf, program_name: &str, tracepoint: &str) -> Result<()> {
    let prog: &mut RawTracePoint = program(ebpf, program_name)?;
    prog.load().with_context(|| format!("load {program_name}"))?;
    prog.attach(tracepoint).with_context(|| format!("attach {program_name}"))?;
    Ok(())
}

fn attach_btf(ebpf: &mut Ebpf, program_name: &str, tracepoint: &str, targets: &aya::Btf) -> Result<()> {
    let prog: &mut BtfTracePoint = program(ebpf, program_name)?;
    prog.load(tracepoint, targets).with_context(|| format!("load {program_name}"))?;
    prog.attach().with_context(|| format!("attach {program_name}"))?;
    Ok(())
}

fn attach_kprobe(ebpf: &mut Ebpf, program_name: &str, function: &str) -> Result<()> {
    let prog: &mut KProbe = program(ebpf, program_name)?;
    prog.load().with_context(|| format!("load {program_name}"))?;
    prog.attach(function, 0).with_context(|| format!("attach to {function} (not in this kernel, or its module is not loaded?)"))?;
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
pub(crate) fn raise_memlock() {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}
