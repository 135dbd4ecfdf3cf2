//! The kernel side of `cnitrace watch`: one program on `kfree_skb` counting every drop of the node in a
//! per-CPU map by (location, namespace, interface, reason, addresses); read and summed on demand.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::{maps::PerCpuHashMap, maps::MapData, Ebpf};
use cnitrace_common::DropKey;

pub struct Watcher {
    _ebpf: Ebpf,
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    /// The kernel's drop reason names by number (empty before 5.17).
    pub drop_reasons: BTreeMap<u32, String>,
    pub has_reasons: bool,
    /// The program attached, for `hooks`-like reporting.
    pub program: &'static str,
}

impl Watcher {
    /// Loads and attaches the drop counter; nothing else of cnitrace's programs is attached.
    pub fn start() -> Result<Watcher> {
        super::raise_memlock();
        let mut loader = super::loader_without_kernel_btf();
        let kbtf = super::btf::KernelBtf::load()?;
        let mut cfg = kbtf.config()?;
        cfg.enabled = 1;
        let has_reasons = kbtf.tracepoint_args("kfree_skb").unwrap_or(2) >= 3;
        let drop_reasons = kbtf.drop_reasons();
        drop(kbtf);
        let mut ebpf = loader.override_global("CONFIG", &cfg, true).load(crate::EBPF_OBJECT).context("load the eBPF object")?;
        let program = if has_reasons { "watch_drop_reason" } else { "watch_drop_legacy" };
        super::attach(&mut ebpf, program, "kfree_skb").context("attach the drop counter to kfree_skb")?;
        let drops = PerCpuHashMap::try_from(ebpf.take_map("DROPS").context("DROPS map")?)?;
        Ok(Watcher { _ebpf: ebpf, drops, drop_reasons, has_reasons, program })
    }

    /// Every entry's count since start, summed over CPUs.
    pub fn counts(&self) -> Vec<(DropKey, u64)> {
        self.drops.iter().filter_map(|r| r.ok()).map(|(k, per_cpu)| (k, per_cpu.iter().sum())).collect()
    }

    /// The reason's name as the kernel spells it (`NETFILTER_DROP`), "unknown" without reasons.
    pub fn reason_name(&self, code: u32) -> String {
        if !self.has_reasons {
            return "unknown (no reason on this kernel)".into();
        }
        self.drop_reasons.get(&code).cloned().unwrap_or_else(|| format!("reason {code}"))
    }
}
