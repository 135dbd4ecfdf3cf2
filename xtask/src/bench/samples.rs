//! What a tracer takes from a flow, sampled: the kernel's profiler (perf, `cpu-clock`: this VM has no
//! PMU) on the flow's core during a full-rate run, and the share of that core's busy samples that land
//! in tracer code. Throughput moves ±15 % between identical runs here; this share by about a point
//! (how a run's packets split between the cores moves it too), and it needs no BPF_ENABLE_STATS, whose
//! clock reads made a program that returns at once look 100 ns long.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use cnitrace_tools as tools;

/// Samples a second: 8,000 in a 2-s run, so a 3 % share is ~240 samples (± 0.2 points).
const FREQ: &str = "4000";

/// Where a tracer's time goes, by the symbol a sample landed in. Call and return thunks (this kernel's
/// Spectre mitigations) are left out: the kernel's own code calls them too, so the shares are a lower
/// bound, by 0.2–0.5 points here.
const KINDS: [(&str, &[&str]); 3] = [
    // JITed BPF programs: follow's and bpftrace's.
    ("programs", &["bpf_prog_"]),
    // From the tracepoint to the program: BTF/raw tracepoints (bpf_trace_runN) and the perf-event
    // tracepoints bpftrace attaches to.
    (
        "dispatch",
        &[
            "bpf_trace_run",
            "__bpf_trace_",
            "trace_call_bpf",
            "perf_trace_",
            "perf_tp_event",
            "perf_swevent_event",
            "perf_swevent_get_recursion_context",
            "perf_swevent_put_recursion_context",
        ],
    ),
    // Helpers the programs call and the maps behind them.
    (
        "helpers",
        &[
            "bpf_probe_read_kernel",
            "copy_from_kernel_nofault",
            "bpf_ringbuf_",
            "__bpf_ringbuf_",
            "bpf_ktime_get_ns",
            "bpf_get_smp_processor_id",
            "bpf_map_",
            "htab_",
            "__htab_",
            "bpf_lru_",
            "percpu_array_",
            "array_map_",
        ],
    ),
];

/// An idle core halts in one of these.
const IDLE: [&str; 7] = ["pv_native_safe_halt", "native_safe_halt", "default_idle", "acpi_idle", "intel_idle", "poll_idle", "mwait_idle"];

fn kind_of(sym: &str) -> Option<&'static str> {
    KINDS.iter().find(|(_, prefixes)| prefixes.iter().any(|p| sym.starts_with(p))).map(|(k, _)| *k)
}

/// Sample counts of one run.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    /// Samples on the core while it was not idle.
    pub busy: u64,
    pub by_kind: BTreeMap<&'static str, u64>,
}

impl Samples {
    /// Counts the symbols samples landed in (`perf script -F ip,sym`, second column).
    pub fn count<'a>(symbols: impl IntoIterator<Item = &'a str>) -> Samples {
        let mut s = Samples::default();
        for sym in symbols {
            if IDLE.iter().any(|i| sym.starts_with(i)) {
                continue;
            }
            s.busy += 1;
            if let Some(k) = kind_of(sym) {
                *s.by_kind.entry(k).or_default() += 1;
            }
        }
        s
    }

    /// The tracer's share of the busy core.
    pub fn share(&self) -> f64 {
        self.of(self.by_kind.values().sum())
    }

    /// One kind's share of the busy core.
    pub fn kind_share(&self, kind: &str) -> f64 {
        self.of(self.by_kind.get(kind).copied().unwrap_or(0))
    }

    fn of(&self, n: u64) -> f64 {
        if self.busy == 0 {
            return f64::NAN;
        }
        n as f64 / self.busy as f64
    }
}

/// A `perf record` of one CPU for as long as a command runs.
pub struct Recorder {
    data: PathBuf,
}

impl Recorder {
    pub fn new(dir: &Path) -> Recorder {
        Recorder { data: dir.join(format!("perf-{}.data", std::process::id())) }
    }

    /// `cmd` under `perf record` of CPU `cpu` (its stdout is the command's).
    pub fn command(&self, cpu: u32, cmd: &Command) -> Command {
        let mut c = tools::PERF.command();
        // No build-id collection or cache (-B -N): nothing here needs them, and they cost time each run.
        c.args(["record", "-q", "-B", "-N", "-e", "cpu-clock", "-F", FREQ, "-C", &cpu.to_string(), "-o"]).arg(&self.data).arg("--").arg(cmd.get_program()).args(cmd.get_args());
        c
    }

    /// The samples of the last recorded run (the file is removed).
    pub fn samples(&self) -> Result<Samples> {
        let out = tools::PERF.command().args(["script", "-F", "ip,sym", "-i"]).arg(&self.data).output().context("run perf script")?;
        let _ = std::fs::remove_file(&self.data);
        if !out.status.success() {
            bail!("perf script: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // " ffffffff821f4dab pv_native_safe_halt": an address, then the symbol ("[unknown]" if none).
        Ok(Samples::count(text.lines().filter_map(|l| l.split_whitespace().nth(1))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracer_samples_are_counted_by_kind_and_idle_ones_not_at_all() {
        let s = Samples::count([
            "pv_native_safe_halt",
            "_copy_to_iter",
            "bpf_prog_76c17b9b3d123ab2_tp_net_dev_start_xmit",
            "bpf_trace_run2",
            "bpf_probe_read_kernel",
            "bpf_lsm_file_permission",
            "[unknown]",
            "perf_trace_net_dev_start_xmit",
        ]);
        assert_eq!(s.busy, 7);
        assert_eq!(s.by_kind.get("programs"), Some(&1));
        assert_eq!(s.by_kind.get("dispatch"), Some(&2));
        assert_eq!(s.by_kind.get("helpers"), Some(&1));
        assert!((s.share() - 4.0 / 7.0).abs() < 1e-9);
        // An LSM hook is the kernel's, not a tracer's.
        assert_eq!(kind_of("bpf_lsm_file_permission"), None);
    }

    #[test]
    fn a_run_with_no_busy_sample_has_no_share() {
        assert!(Samples::count(["pv_native_safe_halt"]).share().is_nan());
    }
}
