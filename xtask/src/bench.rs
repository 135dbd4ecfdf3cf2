//! `cargo xtask bench`: what tracing costs, measured side by side on the lab, interleaved (A B A B …)
//! so the ratios hold on a noisy machine. Targets are printed beside the figures; nothing here fails on a
//! missed target — the table says it.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use cnitrace_tools as tools;
use serde_json::{json, Value};

mod samples;
use samples::{Recorder, Samples};

const PREFIX: &str = "cnitrace-bench";
const DEBUG: &str = "10.244.0.20";
const JELLYFIN: &str = "10.244.0.19";
const WEB: &str = "10.244.1.10";
const EXTERNAL: &str = "198.51.100.10";
/// The core both iperf3 ends run on (and the profiler watches).
const FLOW_CPU: u32 = 0;
/// Both iperf3 ends on CPU 0 (`-A 0,0`): the flow is bound by one core, so every nanosecond the kernel
/// spends in a tracer's programs on its packets shows in its throughput, and the tracer's own process
/// gets the other core as it would on a node. Unpinned, the same no-tracer run ranged 1.4–10.5 Gbit/s
/// here in five tries (the two iperf3 ends and the scheduler fighting over 2 vCPUs); pinned, 7.0–10.8.
const IPERF_CPUS: &str = "0,0";
/// Repeats whose full-rate runs are also sampled by perf (the first ones; the median of three).
const SAMPLED_REPEATS: usize = 3;
/// The capacity flood's UDP port on jellyfin.
const FLOOD_PORT: u16 = 9099;

struct Bench {
    bin: PathBuf,
    tmp: PathBuf,
    repeats: usize,
    secs: u32,
}

fn ns(name: &str) -> String {
    format!("{PREFIX}-{name}")
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

fn stats(v: &[f64]) -> Value {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({ "median": median(v), "min": min, "max": max, "n": v.len() })
}

/// CPU seconds a process's live threads have run so far, in nanoseconds from the scheduler
/// (/proc/PID/task/*/schedstat). /proc/PID/stat counts 10 ms ticks: a tracer that used 3 ms of a 2-s
/// run showed as 0 or 10 ms, up to 4 % of the flow's own CPU at 1 Gbit/s — noise in every CPU ratio.
fn process_cpu_s(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    let ns: u64 = tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()))
        .sum();
    ns as f64 / 1e9
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    None,
    /// follow's programs attached with their filter off: what any tracer on these hooks pays.
    HooksOnly,
    FollowUnrelated,
    FollowSharedEnd,
    FollowTraced,
    BpftraceUnrelated,
    BpftraceTraced,
    /// `cnitrace watch`: the drop counter alone, on every drop of the host.
    Watch,
}

const MODES: [Mode; 8] =
    [Mode::None, Mode::HooksOnly, Mode::FollowUnrelated, Mode::FollowSharedEnd, Mode::FollowTraced, Mode::BpftraceUnrelated, Mode::BpftraceTraced, Mode::Watch];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "no tracer",
            Mode::HooksOnly => "follow's hooks, filter off",
            Mode::FollowUnrelated => "follow, unrelated pair",
            Mode::FollowSharedEnd => "follow, pair sharing one end",
            Mode::FollowTraced => "follow, this flow",
            Mode::BpftraceUnrelated => "bpftrace, unrelated pair",
            Mode::BpftraceTraced => "bpftrace, this flow",
            Mode::Watch => "watch (every drop of the host)",
        }
    }
}

/// A pair with no address in common with the flow debug → `dst`: the other pod of the two flows and the
/// external host. A pair sharing one end with the flow (`FollowSharedEnd`: dst ↔ external) is another
/// case: every packet of the flow carries an address of the pair and takes the tracking-map lookup a
/// possibly NATed packet of the pair needs.
fn unrelated_pair(dst: &str) -> (&'static str, &'static str) {
    (if dst == WEB { JELLYFIN } else { WEB }, EXTERNAL)
}

/// A tracer running in the background for one measurement; stopped with SIGINT, then reaped.
struct Tracer {
    child: Child,
    json_out: Option<PathBuf>,
}

impl Tracer {
    /// CPU the tracer process used so far.
    fn cpu_s(&self) -> f64 {
        process_cpu_s(self.child.id())
    }

    /// Did the tracer end on its own (follow at a verdict) before it was asked to stop? A traced run whose
    /// follow stopped early measures no tracer for the rest of the flow.
    fn ended(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    fn stop(mut self) -> Result<Option<Value>> {
        let _ = tools::KILL.command().args(["-INT", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let Some(path) = self.json_out else { return Ok(None) };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        Ok(text.lines().last().and_then(|l| serde_json::from_str(l).ok()))
    }
}

/// The expert's hand-written equivalent: the same tracepoints, the same address filter, counting.
fn bpftrace_script(a: &str, b: &str) -> String {
    let hex = |ip: &str| -> u32 {
        let o: Vec<u32> = ip.split('.').map(|x| x.parse().expect("octet")).collect();
        // Network order read as a little-endian u32.
        o[0] | o[1] << 8 | o[2] << 16 | o[3] << 24
    };
    let (a, b) = (hex(a), hex(b));
    let filter = |skb: &str| {
        format!(
            "$s = (struct sk_buff *){skb}; $ip = (struct iphdr *)($s->head + $s->network_header); \
             if (($ip->saddr == {a} && $ip->daddr == {b}) || ($ip->saddr == {b} && $ip->daddr == {a})) {{ @[probe] = count(); }}"
        )
    };
    format!(
        "tracepoint:net:net_dev_start_xmit {{ {} }}\n\
         tracepoint:net:net_dev_queue {{ {} }}\n\
         tracepoint:net:netif_receive_skb {{ {} }}\n\
         tracepoint:skb:kfree_skb {{ {} }}\n\
         tracepoint:skb:consume_skb {{ {} }}\n",
        filter("args->skbaddr"),
        filter("args->skbaddr"),
        filter("args->skbaddr"),
        filter("args->skbaddr"),
        filter("args->skbaddr")
    )
}

impl Bench {
    fn cnitrace(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(&self.bin).args(args).env("CNITRACE_LAB_PREFIX", PREFIX).env("CNITRACE_STATE_DIR", self.tmp.join("state")).output().context("run cnitrace")
    }

    fn lab_up(&self, faults: &[&str]) -> Result<()> {
        self.lab_up_with(faults, &[])
    }

    fn lab_up_with(&self, faults: &[&str], options: &[&str]) -> Result<()> {
        let _ = self.cnitrace(&["lab", "down"]);
        let mut args = vec!["lab", "up"];
        args.extend_from_slice(options);
        for f in faults {
            args.extend_from_slice(&["--fault", f]);
        }
        let out = self.cnitrace(&args)?;
        if !out.status.success() {
            bail!("lab up {faults:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn start_follow(&self, src: &str, dst: &str, extra: &[&str]) -> Result<Tracer> {
        let ready = self.tmp.join("ready");
        let _ = std::fs::remove_file(&ready);
        let out = self.tmp.join(format!("follow-{}.json", std::process::id()));
        let child = Command::new(&self.bin)
            .args(["follow", src, dst, "--probe", "none", "--timeout", "120", "--json", "--ready-file"])
            .arg(&ready)
            .args(extra)
            .stdout(std::fs::File::create(&out)?)
            .stderr(Stdio::null())
            .spawn()
            .context("start follow")?;
        let t0 = Instant::now();
        while !ready.exists() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("follow did not get ready");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Tracer { child, json_out: Some(out) })
    }

    /// `cnitrace watch --json`, ready once it says it is watching (its program is attached by then).
    fn start_watch(&self) -> Result<Tracer> {
        let mut child = Command::new(&self.bin).args(["watch", "--json"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().context("start watch")?;
        let stderr = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stderr).lines();
        let line = lines.next().ok_or_else(|| anyhow!("watch exited before attaching"))??;
        if !line.contains("watching") {
            bail!("watch: {line}");
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Tracer { child, json_out: None })
    }

    fn start_bpftrace(&self, a: &str, b: &str) -> Result<Tracer> {
        // bpftrace reads tracepoint formats from tracefs: mount it in a private mount namespace only.
        let script = format!("{} -t tracefs nodev /sys/kernel/tracing && exec {} -e \"$0\"", tools::MOUNT.program, tools::BPFTRACE.program);
        let mut child = tools::UNSHARE
            .command()
            .args(["-m", tools::SH.program, "-c", &script, &bpftrace_script(a, b)])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start bpftrace")?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        // bpftrace says "Attaching N probes..." once its programs are in.
        let line = lines.next().ok_or_else(|| anyhow!("bpftrace exited before attaching"))??;
        if !line.starts_with("Attaching") {
            bail!("bpftrace: {line}");
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Tracer { child, json_out: None })
    }

    fn start_mode(&self, mode: Mode, dst: &str) -> Result<Option<Tracer>> {
        let (ua, ub) = unrelated_pair(dst);
        Ok(match mode {
            Mode::None => None,
            Mode::HooksOnly => Some(self.start_follow(ua, ub, &["--hooks-only"])?),
            Mode::FollowUnrelated => Some(self.start_follow(ua, ub, &[])?),
            Mode::FollowSharedEnd => Some(self.start_follow(dst, EXTERNAL, &[])?),
            Mode::FollowTraced => Some(self.start_follow(DEBUG, dst, &[])?),
            Mode::BpftraceUnrelated => Some(self.start_bpftrace(ua, ub)?),
            Mode::BpftraceTraced => Some(self.start_bpftrace(DEBUG, dst)?),
            Mode::Watch => Some(self.start_watch()?),
        })
    }

    /// One iperf3 run from debug to `dst`: bits/s and bytes received, CPU s of both iperf3 ends, and where
    /// the flow's core spent its time when `rec` samples it. The kernel's packet work on veth runs in the
    /// sender's and receiver's context, so iperf3's own accounting holds it; /proc/stat's tick sampling
    /// in this VM missed most of it (2 jiffies for 2 s at 1 Gbit/s).
    fn iperf(&self, dst: &str, rate: Option<&str>, rec: Option<&Recorder>) -> Result<Flow> {
        let secs = self.secs.to_string();
        let debug = ns("pod-debug");
        let mut cmd = tools::IPERF3.in_netns(&debug);
        cmd.args(["-c", dst, "-t", &secs, "-J", "-A", IPERF_CPUS]);
        if let Some(r) = rate {
            cmd.args(["-b", r]);
        }
        if let Some(rec) = rec {
            cmd = rec.command(FLOW_CPU, &cmd);
        }
        let out = cmd.output().context("run iperf3")?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
        if let Some(e) = v.get("error") {
            bail!("iperf3: {e}");
        }
        let sum = &v["end"]["sum_received"];
        let util = &v["end"]["cpu_utilization_percent"];
        let secs = sum["seconds"].as_f64().unwrap_or(self.secs as f64);
        let cpu = (util["host_total"].as_f64().unwrap_or(0.0) + util["remote_total"].as_f64().unwrap_or(0.0)) / 100.0 * secs;
        Ok(Flow {
            bps: sum["bits_per_second"].as_f64().unwrap_or(0.0),
            bytes: sum["bytes"].as_f64().unwrap_or(0.0),
            cpu_s: cpu,
            samples: rec.map(|r| r.samples()).transpose()?,
        })
    }
}

/// One iperf3 run.
struct Flow {
    bps: f64,
    bytes: f64,
    cpu_s: f64,
    samples: Option<Samples>,
}

fn start_iperf_servers() -> Result<Vec<PathBuf>> {
    let mut pids = Vec::new();
    for pod in ["pod-jellyfin", "pod-web"] {
        let pidfile = std::env::temp_dir().join(format!("{PREFIX}-{pod}-iperf3.pid"));
        let st = tools::IPERF3
            .in_netns(&ns(pod))
            .args(["-s", "-D", "-I"])
            .arg(&pidfile)
            .status()
            .context("start iperf3 -s")?;
        if !st.success() {
            bail!("iperf3 -s in {pod} failed");
        }
        pids.push(pidfile);
    }
    std::thread::sleep(Duration::from_millis(200));
    Ok(pids)
}

fn stop_iperf_servers(pidfiles: &[PathBuf]) {
    for p in pidfiles {
        if let Ok(pid) = std::fs::read_to_string(p) {
            let pid = pid.trim().trim_end_matches('\0');
            // Only the iperf3 servers this benchmark started, by the pid they wrote.
            if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "iperf3") {
                let _ = tools::KILL.command().arg(pid).status();
            }
        }
        let _ = std::fs::remove_file(p);
    }
}

pub fn run(json_out: bool, quick: bool, kubernetes_only: bool) -> Result<()> {
    crate::setup::run(true)?;
    // The profiler for the sampled shares; only the benchmark needs it.
    crate::setup::ensure_packages(crate::setup::BENCH_PACKAGES)?;
    let bin = crate::build()?;
    let tmp = std::env::temp_dir().join("cnitrace-bench");
    std::fs::create_dir_all(&tmp)?;
    // Seven interleaved repeats: with three, one noisy repeat moved a median by several points here (the
    // same no-tracer run varies ±10 % from one run to the next); seven keep the run near 8 minutes.
    let b = Bench { bin, tmp, repeats: if quick { 1 } else { 7 }, secs: if quick { 1 } else { 2 } };
    let t_all = Instant::now();
    if kubernetes_only {
        let r = kubernetes(&b);
        let _ = b.cnitrace(&["lab", "down"]);
        let mut r = r?;
        r["bench_seconds"] = json!(t_all.elapsed().as_secs_f64().round());
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let result = (|| -> Result<Value> {
        b.lab_up(&[])?;
        let servers = start_iperf_servers()?;
        let r = measure(&b);
        stop_iperf_servers(&servers);
        let mut report = r?;
        report.as_object_mut().expect("object").extend(verdicts(&b)?.as_object().expect("object").clone());
        report.as_object_mut().expect("object").extend(agents(&b, quick)?.as_object().expect("object").clone());
        report.as_object_mut().expect("object").extend(kubernetes(&b)?.as_object().expect("object").clone());
        Ok(report)
    })();
    let _ = b.cnitrace(&["lab", "down"]);
    let mut report = result?;
    report["bench_seconds"] = json!(t_all.elapsed().as_secs_f64().round());
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Jiffies of all CPUs so far: (stolen by the hypervisor, all).
fn cpu_jiffies() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is in user already.
    (f.get(7).copied().unwrap_or(0), f.iter().take(8).sum())
}

fn measure(b: &Bench) -> Result<Value> {
    let mut out = json!({});
    // How much of the machine the hypervisor gave to others while we measured: a figure to read the
    // throughput ratios by (they move by several points between runs of the same code here).
    let jiffies0 = cpu_jiffies();
    let mut flows = serde_json::Map::new();
    let mut peak_rss_kib = 0u64;
    let mut kernel: BTreeMap<String, Value> = BTreeMap::new();
    let mut shares = json!({});
    let (mut top_share_unrel, mut top_share_traced) = (0.0f64, 0.0f64);
    let (mut top_shared, mut top_hooks, mut top_watch) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let mut top_share_hooks = 0.0f64;
    // The tracer's sampled share of the flow's core, per mode: the higher median of the two paths.
    let mut top_sampled: BTreeMap<Mode, f64> = BTreeMap::new();
    let rec = Recorder::new(&b.tmp);
    // Runs, per mode, whose tracer had ended before the flow did.
    let mut ended_early: BTreeMap<Mode, u32> = BTreeMap::new();
    let (mut top_unrel, mut top_traced, mut top_bt_unrel, mut top_bt_traced, mut top_cpu_unrel, mut top_cpu_traced) =
        (f64::INFINITY, f64::INFINITY, f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY);
    for (path, dst) in [("same-node", JELLYFIN), ("cross-node", WEB)] {
        // Throughput ratios (max rate) and CPU per GB (fixed rate), each repeat interleaving every mode.
        let mut thr: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
        let mut cpu: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
        let mut sampled: BTreeMap<Mode, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
        for r in 0..b.repeats {
            // Each repeat starts one mode further on: no mode always runs first, or right after bpftrace
            // (a fixed order put the no-tracer run first in every repeat, so drift within a repeat
            // counted against every tracer).
            let mut got: BTreeMap<Mode, (f64, Option<f64>)> = BTreeMap::new();
            for k in 0..MODES.len() {
                let mode = MODES[(k + r) % MODES.len()];
                let tracer = b.start_mode(mode, dst)?;
                // Sampled in the first repeats only: a share moves by about a point between repeats
                // (throughput by ±15 %), and perf costs a second a run (98 of them took the whole
                // benchmark to 596 s of its 600).
                let full = b.iperf(dst, None, (r < SAMPLED_REPEATS).then_some(&rec))?;
                if let Some(s) = &full.samples {
                    let per = sampled.entry(mode).or_default();
                    per.entry("tracer").or_default().push(s.share());
                    for kind in ["programs", "dispatch", "helpers"] {
                        per.entry(kind).or_default().push(s.kind_share(kind));
                    }
                }
                // The floor's cost in CPU is the kernel share below; its fixed-rate run would only add
                // 30 s to a run that must stay under 10 minutes.
                let cpu_per_gb = if matches!(mode, Mode::HooksOnly | Mode::Watch) {
                    None
                } else {
                    let t_cpu0 = tracer.as_ref().map(|t| t.cpu_s()).unwrap_or(0.0);
                    let paced = b.iperf(dst, Some("1G"), None)?;
                    let cpu_s = paced.cpu_s + (tracer.as_ref().map(|t| t.cpu_s()).unwrap_or(0.0) - t_cpu0).max(0.0);
                    Some(cpu_s / (paced.bytes / 1e9).max(1e-9))
                };
                if let Some(mut t) = tracer {
                    if t.ended() {
                        *ended_early.entry(mode).or_insert(0) += 1;
                    }
                    if let Some(v) = t.stop()? {
                        peak_rss_kib = peak_rss_kib.max(v["peak_rss_kib"].as_u64().unwrap_or(0));
                    }
                }
                got.insert(mode, (full.bps, cpu_per_gb));
            }
            let (base_thr, base_cpu) = got[&Mode::None];
            let base_cpu = base_cpu.expect("measured");
            for (mode, (bps, cpu_per_gb)) in got {
                let (t, c) = if mode == Mode::None { (bps / 1e9, cpu_per_gb) } else { (bps / base_thr, cpu_per_gb.map(|c| c / base_cpu)) };
                thr.entry(mode).or_default().push(t);
                if let Some(c) = c {
                    cpu.entry(mode).or_default().push(c);
                }
            }
        }
        let mut f = serde_json::Map::new();
        for mode in MODES {
            let mut m = json!({
                "throughput": stats(&thr[&mode]),
                "unit": if mode == Mode::None { "Gbit/s and CPU s/GB" } else { "ratio to no tracer" },
            });
            if let Some(c) = cpu.get(&mode) {
                m["cpu_per_gb"] = stats(c);
            }
            if let Some(per) = sampled.get(&mode) {
                m["sampled_share"] = json!(per.iter().map(|(k, v)| (k.to_string(), stats(v))).collect::<serde_json::Map<_, _>>());
                let top = top_sampled.entry(mode).or_insert(0.0);
                *top = top.max(median(&per["tracer"]));
            }
            f.insert(mode.name().into(), m);
        }
        flows.insert(path.into(), Value::Object(f));
        top_unrel = top_unrel.min(median(&thr[&Mode::FollowUnrelated]));
        top_shared = top_shared.min(median(&thr[&Mode::FollowSharedEnd]));
        top_hooks = top_hooks.min(median(&thr[&Mode::HooksOnly]));
        top_watch = top_watch.min(median(&thr[&Mode::Watch]));
        top_traced = top_traced.min(median(&thr[&Mode::FollowTraced]));
        top_bt_unrel = top_bt_unrel.min(median(&thr[&Mode::BpftraceUnrelated]));
        top_bt_traced = top_bt_traced.min(median(&thr[&Mode::BpftraceTraced]));
        top_cpu_unrel = top_cpu_unrel.max(median(&cpu[&Mode::FollowUnrelated]));
        top_cpu_traced = top_cpu_traced.max(median(&cpu[&Mode::FollowTraced]));

        // The kernel's own cost per program: unmatched (an unrelated pair) and matched (this flow), and
        // their sum as a share of the CPU the flow itself used: what the tracer takes from the flow,
        // measured by the kernel rather than read off a noisy throughput. At full rate, as the
        // throughput ratios are: at a fixed 300 Mbit/s the same programs were 2.8 % of the flow's CPU
        // where at full rate they are 5 % (paced, the flow spends more CPU per packet elsewhere).
        // Also: unmatched with raw tracepoints only (what the BTF tracepoints save), a pair that shares
        // one end with the flow, and the programs with their filter off (the hooks' own cost; with
        // stats on, which add two clock reads a run).
        let (ua, ub) = unrelated_pair(dst);
        for (kind, src, to, extra) in [
            ("unmatched", ua, ub, None),
            ("unmatched raw_tp", ua, ub, Some("--raw-tracepoints")),
            ("shared end", dst, EXTERNAL, None),
            ("matched", DEBUG, dst, None),
            ("hooks only", ua, ub, Some("--hooks-only")),
        ] {
            let mut args = vec!["--kernel-stats"];
            args.extend(extra);
            let t = b.start_follow(src, to, &args)?;
            let flow_cpu_s = b.iperf(dst, None, None)?.cpu_s;
            let v = t.stop()?.ok_or_else(|| anyhow!("follow --kernel-stats gave no verdict"))?;
            let mut bpf_ns = 0.0;
            for p in v["program_stats"].as_array().cloned().unwrap_or_default() {
                let (n, ns_total) = (p["run_count"].as_f64().unwrap_or(0.0), p["run_time_ns"].as_f64().unwrap_or(0.0));
                bpf_ns += ns_total;
                let e = kernel.entry(p["program"].as_str().unwrap_or("?").to_string()).or_insert_with(|| json!({}));
                e[format!("{path} {kind} ns/run")] = json!(if n > 0.0 { (ns_total / n).round() } else { 0.0 });
                e[format!("{path} {kind} runs")] = json!(n);
            }
            let share = bpf_ns / 1e9 / flow_cpu_s.max(1e-9);
            shares[format!("{path} {kind}")] = json!((share * 1e4).round() / 1e4);
            match kind {
                "unmatched" => top_share_unrel = top_share_unrel.max(share),
                "matched" => top_share_traced = top_share_traced.max(share),
                "hooks only" => top_share_hooks = top_share_hooks.max(share),
                _ => {}
            }
        }
    }
    let jiffies1 = cpu_jiffies();
    out["steal_share"] = json!(((jiffies1.0 - jiffies0.0) as f64 / (jiffies1.1 - jiffies0.1).max(1) as f64 * 1e4).round() / 1e4);
    out["flows"] = Value::Object(flows);
    out["kernel_ns_per_run"] = serde_json::to_value(kernel)?;
    out["kernel_share"] = shares;
    out["unrelated_kernel_share"] = json!((top_share_unrel * 1e4).round() / 1e4);
    out["traced_kernel_share"] = json!((top_share_traced * 1e4).round() / 1e4);
    out["hooks_only_kernel_share"] = json!((top_share_hooks * 1e4).round() / 1e4);
    out["hooks_only_flow_ratio"] = json!(top_hooks);
    out["watch_flow_ratio"] = json!(top_watch);
    for (mode, key) in [
        (Mode::None, "no_tracer_sampled_share"),
        (Mode::HooksOnly, "hooks_only_sampled_share"),
        (Mode::FollowUnrelated, "unrelated_sampled_share"),
        (Mode::FollowSharedEnd, "shared_end_sampled_share"),
        (Mode::FollowTraced, "traced_sampled_share"),
        (Mode::BpftraceUnrelated, "bpftrace_unrelated_sampled_share"),
        (Mode::BpftraceTraced, "bpftrace_traced_sampled_share"),
        (Mode::Watch, "watch_sampled_share"),
    ] {
        out[key] = json!(top_sampled.get(&mode).map(|s| (s * 1e4).round() / 1e4));
    }
    out["unrelated_flow_ratio"] = json!(top_unrel);
    out["shared_end_flow_ratio"] = json!(top_shared);
    out["traced_flow_ratio"] = json!(top_traced);
    out["bpftrace_unrelated_ratio"] = json!(top_bt_unrel);
    out["bpftrace_traced_ratio"] = json!(top_bt_traced);
    out["unrelated_cpu_ratio"] = json!(top_cpu_unrel);
    out["traced_cpu_ratio"] = json!(top_cpu_traced);
    // follow runs per mode (both paths, full and paced flows) that had reached a verdict and exited before
    // the flow ended: 0 when every figure above measured a tracer that was there for the whole flow.
    let early = |m: &Mode| ended_early.get(m).copied().unwrap_or(0);
    out["tracer_ended_early"] = json!(MODES.iter().filter(|m| **m != Mode::None).map(|m| (m.name(), early(m))).collect::<BTreeMap<_, _>>());
    out["traced_runs_ended_early"] = json!(early(&Mode::FollowTraced));

    // Event capacity: a flood of matched packets (18-byte UDP datagrams, six events each on the way),
    // every event counted. The sender (`xtask udp-flood`, a send loop) on CPU 0 carries the whole path in
    // its own softirq work; the receiver (`xtask udp-sink`, a deep queue) on CPU 1 with the tracer's
    // consumer. iperf3 was the sender before: beyond ~90 Mbit/s of 64-byte datagrams the rate it
    // delivered collapsed (0.78 M events/s at most), so it measured iperf3, not the tracer.
    let mut floods = Vec::new();
    let mut lossless: f64 = 0.0;
    let mut accounted = true;
    let xtask = std::env::current_exe().context("the xtask binary")?;
    let secs = b.secs as f64;
    for pps in [50_000u64, 100_000, 150_000, 0] {
        let sink = tools::TASKSET
            .in_netns(&ns("pod-jellyfin"))
            .args(["-c", "1"])
            .arg(&xtask)
            .args(["udp-sink", &FLOOD_PORT.to_string(), &(secs + 1.0).to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .context("start the UDP sink")?;
        std::thread::sleep(Duration::from_millis(100));
        let t = b.start_follow(DEBUG, JELLYFIN, &["--all-events"])?;
        // Let follow go idle first (nothing for 200 ms: it sleeps until the kernel wakes it): the
        // flood must wake it before the ring (43,690 records, 40 ms of the fastest flood) fills.
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let sent = tools::TASKSET
            .in_netns(&ns("pod-debug"))
            .args(["-c", "0"])
            .arg(&xtask)
            .args(["udp-flood", &format!("{JELLYFIN}:{FLOOD_PORT}"), &secs.to_string(), &pps.to_string()])
            .output()
            .context("run the UDP flood")?;
        let dur = t0.elapsed().as_secs_f64();
        let v = t.stop()?.ok_or_else(|| anyhow!("flood follow gave no verdict"))?;
        let received = sink.wait_with_output().map(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<u64>().unwrap_or(0)).unwrap_or(0);
        let sent: u64 = String::from_utf8_lossy(&sent.stdout).trim().parse().unwrap_or(0);
        let c = &v["counters"];
        let (m, e, l) = (c["matched"].as_u64().unwrap_or(0), c["emitted"].as_u64().unwrap_or(0), c["lost"].as_u64().unwrap_or(0));
        peak_rss_kib = peak_rss_kib.max(v["peak_rss_kib"].as_u64().unwrap_or(0));
        accounted &= m == e + l;
        // A drop of the pair (the receiver's queue overflowing) ends follow's watch early: such a
        // flood says nothing about capacity.
        let whole = v["verdict"] != "dropped";
        let per_s = e as f64 / dur;
        if l == 0 && whole {
            lossless = lossless.max(per_s);
        }
        floods.push(json!({
            "pps": if pps == 0 { "max".to_string() } else { pps.to_string() },
            "sent": sent, "received": received,
            "matched": m, "emitted": e, "lost": l, "seconds": dur, "emitted_per_s": per_s.round(),
            "watched_to_the_end": whole,
        }));
    }
    out["floods"] = json!(floods);
    out["events_per_s_lossless"] = json!(lossless.round());
    out["lost_accounted"] = json!(accounted);

    // Start-up: process start to probes attached (ready file), measured from outside.
    let mut ready = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let t = b.start_follow(DEBUG, JELLYFIN, &[])?;
        ready.push(t0.elapsed().as_secs_f64() * 1e3);
        t.stop()?;
    }
    out["ready"] = stats(&ready);
    out["ready_ms"] = json!(median(&ready).round());
    out["rss_mib"] = json!((peak_rss_kib as f64 / 1024.0 * 10.0).round() / 10.0);
    Ok(out)
}

/// The lab's agents (`lab up --agents`): their pids, by the socket under the bench lab's state folder.
fn agent_pids() -> Vec<u32> {
    let socket = format!("unix:/run/cnitrace/lab/{PREFIX}/");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                        args.windows(2).any(|w| w[0] == b"--listen" && w[1].starts_with(socket.as_bytes()))
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// (CPU ticks used so far, resident KiB, open file descriptors) of `pid`.
fn usage(pid: u32) -> (u64, u64, usize) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's closing parenthesis: state is field 3; utime and stime are 14 and 15.
    let rest: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = rest.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0) + rest.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (ticks, rss, fds)
}

/// The agents: what an idle one costs its node (CPU, memory: nothing is attached while nobody traces),
/// and what stitching a trace from each node's agent adds to the time to verdict, against `follow` on
/// the host (both nodes are one kernel in the lab: the same events either way).
fn agents(b: &Bench, quick: bool) -> Result<Value> {
    let mut per = serde_json::Map::new();
    let mut worst_extra: f64 = 0.0;
    let mut idle = json!({});
    for (case, faults) in [("healthy", &[][..]), ("rp-filter-strict", &["rp-filter-strict"][..])] {
        b.lab_up_with(faults, &["--agents"])?;
        let pids = agent_pids();
        if pids.len() != 2 {
            bail!("lab up --agents: {} agents found, expected 2", pids.len());
        }
        if case == "healthy" {
            // Idle: nobody traces.
            let secs = if quick { 3.0 } else { 10.0 };
            let before: Vec<_> = pids.iter().map(|p| usage(*p)).collect();
            std::thread::sleep(Duration::from_secs_f64(secs));
            let after: Vec<_> = pids.iter().map(|p| usage(*p)).collect();
            let ticks_per_s = 100.0; // USER_HZ on Linux
            let cpu = before.iter().zip(&after).map(|(a, z)| (z.0 - a.0) as f64 / ticks_per_s / secs * 100.0).fold(0.0, f64::max);
            let rss = after.iter().map(|u| u.1).max().unwrap_or(0);
            idle = json!({ "agent_idle_cpu_pct": (cpu * 100.0).round() / 100.0, "agent_idle_rss_mib": (rss as f64 / 1024.0 * 10.0).round() / 10.0, "agent_idle_fds": after.iter().map(|u| u.2).max() });
        }
        let agent_args: Vec<String> =
            ["storagenodet3500", "storagenodet3501"].iter().map(|n| format!("--agent={n}=unix:/run/cnitrace/lab/{PREFIX}/agent-{n}.sock")).collect();
        let timed = |extra: &[&str]| -> Result<(f64, Value)> {
            let mut args = vec!["follow", DEBUG, WEB, "--json", "--timeout", "2"];
            args.extend_from_slice(extra);
            let t0 = Instant::now();
            let out = b.cnitrace(&args)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let v: Value = String::from_utf8_lossy(&out.stdout).lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
            Ok((ms, v))
        };
        // The caches warm once, then interleaved.
        timed(&[])?;
        let (mut here, mut through) = (Vec::new(), Vec::new());
        let mut verdicts = (Value::Null, Value::Null);
        for _ in 0..if quick { 2 } else { 5 } {
            let (ms, v) = timed(&[])?;
            here.push(ms);
            verdicts.0 = v["cause"].clone();
            let a: Vec<&str> = agent_args.iter().map(String::as_str).collect();
            let (ms, v) = timed(&a)?;
            through.push(ms);
            verdicts.1 = v["cause"].clone();
        }
        let extra = median(&through) - median(&here);
        worst_extra = worst_extra.max(extra);
        let after: Vec<_> = pids.iter().map(|p| usage(*p)).collect();
        per.insert(
            case.into(),
            json!({
                "host_ms": median(&here).round(), "agents_ms": median(&through).round(), "extra_ms": extra.round(),
                "cause_host": verdicts.0, "cause_agents": verdicts.1,
                "agent_rss_mib_after": (after.iter().map(|u| u.1).max().unwrap_or(0) as f64 / 1024.0 * 10.0).round() / 10.0,
                "agent_fds_after": after.iter().map(|u| u.2).max(),
            }),
        );
    }
    let mut out = json!({ "stitched": per, "stitched_extra_ms": worst_extra.round() });
    out.as_object_mut().expect("object").extend(idle.as_object().expect("object").clone());
    Ok(out)
}

/// On the lab's real cluster (`lab up --kubernetes`): how long it takes to come up, the time to a
/// verdict by pod name (the API asked on the way) beside the same pair by address, healthy and with the
/// incident's veth detached, and `fix --auto` by pod name end to end. Null where the cluster's programs
/// are not built.
fn kubernetes(b: &Bench) -> Result<Value> {
    if !tools::cluster_missing().is_empty() {
        return Ok(json!({"kubernetes": null}));
    }
    let _ = b.cnitrace(&["lab", "down"]);
    let t0 = Instant::now();
    let out = b.cnitrace(&["lab", "up", "--kubernetes"])?;
    if !out.status.success() {
        bail!("lab up --kubernetes: {}", String::from_utf8_lossy(&out.stderr));
    }
    let up_s = t0.elapsed().as_secs_f64();
    // The lab's state folder (cnitrace::lab::STATE_ROOT/<prefix>).
    let state = std::path::Path::new("/run/cnitrace/lab").join(PREFIX);
    let kubeconfig = state.join("cnitrace.kubeconfig");
    let run = |args: &[&str]| -> Result<(f64, Value, bool)> {
        let t0 = Instant::now();
        let out = Command::new(&b.bin).args(args).env("KUBECONFIG", &kubeconfig).env("CNITRACE_STATE_DIR", b.tmp.join("state")).output()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let v = String::from_utf8_lossy(&out.stdout).lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
        Ok((ms, v, out.status.success()))
    };
    let addr = |pod: &str| -> Result<String> {
        let ns = format!("{PREFIX}-pod-{pod}");
        let out = tools::IP.command().args(["-n", &ns, "-j", "-4", "addr", "show", "eth0"]).output()?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        v[0]["addr_info"][0]["local"].as_str().map(str::to_string).context("the pod's address")
    };
    let (debug, jellyfin) = (addr("debug")?, addr("jellyfin")?);
    let mut figures = serde_json::Map::new();
    let time = |label: &str, args: &[&str], figures: &mut serde_json::Map<String, Value>| -> Result<()> {
        let mut ms = Vec::new();
        let mut last = Value::Null;
        for _ in 0..b.repeats.max(3) {
            let (t, v, _) = run(args)?;
            ms.push(t);
            last = v;
        }
        figures.insert(label.into(), json!({"ms": median(&ms).round(), "verdict": last["verdict"], "cause": last["cause"]}));
        Ok(())
    };
    time("healthy, by pod name", &["follow", "default/debug", "default/jellyfin", "--json"], &mut figures)?;
    time("healthy, by address", &["follow", &debug, &jellyfin, "--json"], &mut figures)?;
    let node = format!("{PREFIX}-storagenodet3500");
    let veth = crate::demo::host_veth(&node, &format!("{PREFIX}-pod-jellyfin"))?;
    let detach = || tools::IP.command().args(["-n", &node, "link", "set", &veth, "nomaster"]).status();
    detach()?;
    time("veth-detached, by pod name", &["follow", "default/debug", "default/jellyfin", "--json"], &mut figures)?;
    time("veth-detached, by address", &["follow", &debug, &jellyfin, "--json"], &mut figures)?;
    let mut fix_ms = Vec::new();
    let mut fixed = true;
    for _ in 0..3 {
        detach()?;
        let (t, _, ok) = run(&["fix", "--auto", "default/debug", "default/jellyfin"])?;
        fix_ms.push(t);
        fixed &= ok;
    }
    let _ = b.cnitrace(&["lab", "down"]);
    Ok(json!({"kubernetes": {"up_s": (up_s * 10.0).round() / 10.0, "verdict_ms": figures, "fix_ms": median(&fix_ms).round(), "fixed": fixed}}))
}

/// Time to verdict for every lab fault, and `fix --auto` end to end.
fn verdicts(b: &Bench) -> Result<Value> {
    let list = b.cnitrace(&["lab", "list", "--json"])?;
    let faults: Vec<Value> = String::from_utf8_lossy(&list.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut per = serde_json::Map::new();
    let mut worst: f64 = 0.0;
    for f in &faults {
        let name = f["name"].as_str().unwrap_or_default();
        b.lab_up(&[name])?;
        let t0 = Instant::now();
        let out = b.cnitrace(&["follow", f["src"].as_str().unwrap_or_default(), f["dst"].as_str().unwrap_or_default(), "--json"])?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let v: Value = String::from_utf8_lossy(&out.stdout).lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
        worst = worst.max(ms);
        per.insert(name.into(), json!({ "ms": ms.round(), "cause": v["cause"], "reason": v["reason"] }));
    }
    let mut fixes = serde_json::Map::new();
    let mut fix_ms = Vec::new();
    for name in ["veth-detached", "route-missing", "forward-policy-drop"] {
        let f = faults.iter().find(|f| f["name"] == name).ok_or_else(|| anyhow!("no fault {name}"))?;
        b.lab_up(&[name])?;
        let t0 = Instant::now();
        let out = b.cnitrace(&["fix", "--auto", f["src"].as_str().unwrap_or_default(), f["dst"].as_str().unwrap_or_default()])?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        fix_ms.push(ms);
        fixes.insert(name.into(), json!({ "ms": ms.round(), "fixed": out.status.success() }));
    }
    Ok(json!({
        "verdict_ms": per,
        "verdict_ms_max": worst.round(),
        "fixes": fixes,
        "fix_ms": median(&fix_ms).round(),
    }))
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    println!("cnitrace bench ({} s)\n", r["bench_seconds"]);
    println!("{:<44} {:>10} {:>10} {:>10}   target", "throughput / CPU per GB", "median", "min", "max");
    for (path, modes) in r["flows"].as_object().into_iter().flatten() {
        for (mode, v) in modes.as_object().into_iter().flatten() {
            let target = match mode.as_str() {
                "follow, unrelated pair" => "≥ 0.98",
                "follow, pair sharing one end" | "follow's hooks, filter off" => "(not a target)",
                "follow, this flow" => "≥ 0.90",
                "watch (every drop of the host)" => "≥ 0.99",
                _ => "",
            };
            let t = &v["throughput"];
            println!("{:<44} {:>10} {:>10} {:>10}   {target}", format!("{path}: {mode}"), f(&t["median"]), f(&t["min"]), f(&t["max"]));
            let s = &v["sampled_share"]["tracer"];
            if !s.is_null() {
                println!("{:<44} {:>10} {:>10} {:>10}", "    tracer's share of the core (sampled)", f(&s["median"]), f(&s["min"]), f(&s["max"]));
            }
            let c = &v["cpu_per_gb"];
            if !c.is_null() {
                println!("{:<44} {:>10} {:>10} {:>10}", "    CPU per GB", f(&c["median"]), f(&c["min"]), f(&c["max"]));
            }
        }
    }
    println!();
    for (k, target) in [
        ("unrelated_flow_ratio", "≥ 0.98, ≥ bpftrace"),
        ("traced_flow_ratio", "≥ 0.90, ≥ bpftrace"),
        ("shared_end_flow_ratio", "a pair sharing one end"),
        ("hooks_only_flow_ratio", "the floor: follow's hooks with the filter off"),
        ("watch_flow_ratio", "≥ 0.99: `cnitrace watch` on an unrelated bulk flow"),
        ("watch_sampled_share", "watch's code / the flow's busy core"),
        ("bpftrace_unrelated_ratio", ""),
        ("bpftrace_traced_ratio", ""),
        ("unrelated_cpu_ratio", "lower is better"),
        ("unrelated_kernel_share", "programs' time / the flow's CPU"),
        ("traced_kernel_share", ""),
        ("hooks_only_kernel_share", "the floor (stats on)"),
        ("unrelated_sampled_share", "tracer code / the flow's busy core, sampled by perf"),
        ("hooks_only_sampled_share", "the floor: entering programs that return at once"),
        ("shared_end_sampled_share", ""),
        ("traced_sampled_share", ""),
        ("bpftrace_unrelated_sampled_share", ""),
        ("bpftrace_traced_sampled_share", ""),
        ("no_tracer_sampled_share", "no tracer: the classifier's zero"),
        ("traced_cpu_ratio", "lower is better"),
        ("traced_runs_ended_early", "0: the traced follow ran for the whole flow"),
        ("ready_ms", "≤ 200"),
        ("verdict_ms_max", "≤ 1000"),
        ("fix_ms", "≤ 3000"),
        ("agent_idle_cpu_pct", "an idle agent: % of one core (nothing attached)"),
        ("agent_idle_rss_mib", "an idle agent's resident memory"),
        ("stitched_extra_ms", "time to verdict through the agents − on the host"),
        ("events_per_s_lossless", "≥ 1000000"),
        ("lost_accounted", "true"),
        ("rss_mib", "≤ 32"),
        ("steal_share", "CPU the hypervisor gave elsewhere while measuring"),
    ] {
        println!("{k:<28} {:>14}   {target}", r[k].to_string());
    }
    println!("\nverdict time per fault (ms):");
    for (k, v) in r["verdict_ms"].as_object().into_iter().flatten() {
        println!("  {k:<28} {:>6}  {} {}", v["ms"], v["cause"], v["reason"]);
    }
    println!("\nthrough the agents (median ms): {}", r["stitched"]);
    println!("\nkernel ns per program run:");
    for (k, v) in r["kernel_ns_per_run"].as_object().into_iter().flatten() {
        println!("  {k:<22} {v}");
    }
    println!("\nfloods: {}", r["floods"]);
    println!("\nthe real cluster (lab up --kubernetes): {}", r["kubernetes"]);
}


/// The flood's sender: iperf3 could not send 64-byte datagrams faster than ~90 Mbit/s here (beyond it the
/// delivered rate collapsed), a plain send loop on one core gets further. Paced in batches of 64.
pub fn udp_flood(addr: std::net::SocketAddr, secs: f64, pps: u64) -> Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("bind")?;
    sock.connect(addr).context("connect")?;
    let payload = [0u8; 18];
    let t0 = Instant::now();
    let end = Duration::from_secs_f64(secs);
    let mut sent: u64 = 0;
    loop {
        for _ in 0..64 {
            if sock.send(&payload).is_ok() {
                sent += 1;
            }
        }
        let el = t0.elapsed();
        if el >= end {
            break;
        }
        if pps > 0 {
            let due = Duration::from_secs_f64(sent as f64 / pps as f64);
            if due > el {
                std::thread::sleep(due - el);
            }
        }
    }
    println!("{sent}");
    Ok(())
}

/// The flood's receiver: reads until SECS have passed with nothing left to read.
pub fn udp_sink(port: u16, secs: f64) -> Result<()> {
    let sock = std::net::UdpSocket::bind(("0.0.0.0", port)).context("bind")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    // A deep receive queue (root may go past rmem_max): a burst the reader misses is queued, not dropped
    // (a drop of the pair would end the tracer's watch, as it should).
    {
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 64 << 20;
        // SAFETY: a plain setsockopt on an fd we own, with a c_int option value.
        let r = unsafe {
            libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&size as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
        };
        if r != 0 {
            bail!("SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
        }
    }
    let t0 = Instant::now();
    let mut buf = [0u8; 2048];
    let mut got: u64 = 0;
    while t0.elapsed() < Duration::from_secs_f64(secs) {
        if sock.recv(&mut buf).is_ok() {
            got += 1;
        }
    }
    println!("{got}");
    Ok(())
}
