//! `follow`: the pipeline end to end — resolve the pair, attach the probes, send probe traffic from the
//! source pod, collect the kernel's events, read the node's state, and decide the verdict.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;
use thiserror::Error;

use crate::{
    event::{self, Decoder, Kind, TraceEvent},
    finding::{self, Ctx, States, Verdict},
    inject::{self, ProbeKind, ProbeOutcome, ProbePlan},
    path::{is_noise, Trace},
    probe::{Counters, HookStatus, Probe},
    resolve::{self, Endpoint, HostResolver, Resolver},
    state,
};

/// The VXLAN ports whose inner headers the kernel side looks into (flannel's and IANA's).
pub const VXLAN_PORTS: [u16; 2] = [8472, 4789];

#[derive(Clone, Debug)]
pub struct FollowRequest {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub probe: ProbeKind,
    pub count: u32,
    pub timeout: Duration,
    /// ICMP payload size; None: `count` small echoes plus one full-size echo for the source's MTU.
    pub size: Option<usize>,
    pub opts: FollowOptions,
}

/// What operators and the benchmark ask for beyond the trace itself.
#[derive(Clone, Debug, Default)]
pub struct FollowOptions {
    /// Written once the probes are attached (as pwru does), holding the milliseconds it took.
    pub ready_file: Option<std::path::PathBuf>,
    /// Have the kernel count each program's runs and run time while tracing.
    pub kernel_stats: bool,
    /// Tracepoints only: do not try the optional kprobes.
    pub no_kprobes: bool,
}

/// Events decoded and kept for the timeline; beyond this the ring is still drained and counted, so a
/// traced flood costs bounded memory. The first packets tell the story; the counters tell the volume.
pub const MAX_KEPT_EVENTS: usize = 5_000;

/// Errors the CLI maps to exit code 2 with one line.
#[derive(Debug, Error)]
pub enum FollowError {
    #[error("`cnitrace follow` needs root (it loads eBPF programs and enters network namespaces)")]
    NotRoot,
    #[error("source and destination are the same address ({0})")]
    SameAddress(Ipv4Addr),
    #[error("{0} is on no pod of this host: probe traffic must start here (use --probe none to wait for real traffic)")]
    SourceNotHere(Ipv4Addr),
}

#[derive(Serialize)]
pub struct Report {
    pub src: Endpoint,
    pub dst: Endpoint,
    pub trace: Trace,
    pub verdict: Verdict,
    pub counters: Counters,
    pub hooks: Vec<HookStatus>,
    pub probe: ProbeOutcome,
    #[serde(skip)]
    pub states: States,
    pub elapsed_ms: u64,
    /// Start to probes attached.
    pub ready_ms: u64,
    /// Records drained from the ring buffer but not kept (over MAX_KEPT_EVENTS).
    pub events_not_kept: u64,
    pub program_stats: Vec<crate::probe::ProgramStats>,
    /// Peak resident memory of this process (VmHWM).
    pub peak_rss_kib: u64,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_sigint() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(SigHandler::Handler(on_sigint), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let _ = sigaction(Signal::SIGINT, &act);
        let _ = sigaction(Signal::SIGTERM, &act);
    }
}

pub fn run(req: &FollowRequest) -> Result<Report> {
    let t_start = Instant::now();
    // Before anything is attached: an interrupt must end in a verdict and a clean detach.
    catch_sigint();
    if !crate::sys::is_root() {
        return Err(FollowError::NotRoot.into());
    }
    if req.src == req.dst {
        return Err(FollowError::SameAddress(req.src).into());
    }
    let resolver = HostResolver::scan()?;
    let src = resolver.resolve(req.src)?;
    let dst = resolver.resolve(req.dst)?;
    if src.local().is_none() && req.probe != ProbeKind::None {
        return Err(FollowError::SourceNotHere(req.src).into());
    }
    let names = decoder_names(&resolver);
    let mut states = States {
        src_ip: Some(req.src),
        dst_ip: Some(req.dst),
        src_name: display(&src),
        dst_name: display(&dst),
        ..Default::default()
    };
    if let Some(l) = src.local() {
        states.src_pod = l.netns.inode;
        states.src_node = l.node.as_ref().map(|n| n.netns.inode);
        states.src_host_veth = l.node.as_ref().map(|n| n.host_ifindex);
    }
    if let Some(l) = dst.local() {
        states.dst_pod = Some(l.netns.inode);
        states.dst_node = l.node.as_ref().map(|n| n.netns.inode);
        states.dst_host_veth = l.node.as_ref().map(|n| n.host_ifindex);
    }
    let involved: Vec<u32> = {
        let mut v = vec![states.src_pod];
        v.extend([states.src_node, states.dst_pod, states.dst_node].into_iter().flatten());
        v.sort();
        v.dedup();
        v.retain(|i| *i != 0);
        v
    };
    let node_inodes: Vec<u32> = [states.src_node, states.dst_node].into_iter().flatten().collect();
    for inode in &node_inodes {
        if let Some(ns) = resolver.namespace(*inode) {
            let path = ns.path.clone();
            if let Ok(r) = crate::netns::in_netns(&path, || Ok(state::rules_now())) {
                states.rules_before.insert(*inode, r);
            }
        }
    }

    let mut probe = Probe::start(req.src, req.dst, VXLAN_PORTS, req.opts.kernel_stats, !req.opts.no_kprobes)?;
    let ready_ms = t_start.elapsed().as_millis() as u64;
    if let Some(path) = &req.opts.ready_file {
        std::fs::write(path, format!("{ready_ms}\n")).with_context(|| format!("write the ready file {}", path.display()))?;
    }
    let mut names = names;
    names.drop_reasons = probe.drop_reasons.clone();
    names.has_reasons = probe.kfree_has_reason;
    let names_had_reasons = probe.kfree_has_reason;

    let stop_probe = std::sync::Arc::new(AtomicBool::new(false));
    // Probe traffic on its own thread; the kernel's events are collected meanwhile.
    let sender = src.local().filter(|_| req.probe != ProbeKind::None).map(|l| {
        let mtu = resolver
            .spaces()
            .iter()
            .find(|(ns, _)| ns.inode == l.netns.inode)
            .and_then(|(_, st)| st.link(l.ifindex))
            .map(|link| link.mtu as usize)
            .unwrap_or(1500);
        let sizes = match req.size {
            Some(s) => vec![s; req.count.max(1) as usize],
            None => {
                let mut v = vec![56; req.count.max(1) as usize];
                v.push(mtu.saturating_sub(28));
                v
            }
        };
        let plan = ProbePlan {
            netns: l.netns.ns.as_ref().expect("local namespace").path.clone(),
            dst: req.dst,
            kind: req.probe,
            sizes,
            wait: req.timeout,
            icmp_id: inject::new_icmp_id(),
            stop: stop_probe.clone(),
        };
        std::thread::spawn(move || inject::run(plan))
    });

    // The timeout counts from the probes being ready: start-up is the kernel's and the machine's (tens
    // of ms here, seconds under emulation), not time the traffic had.
    let deadline = Instant::now() + req.timeout + Duration::from_millis(300);
    let mut raw = Vec::new();
    let mut decoder = Decoder::new(names);
    let mut decoded: Vec<TraceEvent> = Vec::new();
    let mut settle_until: Option<Instant> = None;
    let mut outcome: Option<ProbeOutcome> = None;
    let mut sender = sender;
    let mut not_kept: u64 = 0;
    let (mut significant_drop, mut scanned) = (false, 0);
    loop {
        // Records are submitted without wakeups: poll on a short period instead.
        probe.wait(Duration::from_millis(10));
        probe.drain(&mut raw);
        keep(&mut decoder, &mut raw, &mut decoded, &mut not_kept);
        if sender.as_ref().is_some_and(|h| h.is_finished()) {
            let h = sender.take().expect("sender");
            outcome = Some(h.join().map_err(|_| anyhow::anyhow!("probe thread panicked"))??);
            settle_until.get_or_insert(Instant::now() + Duration::from_millis(100));
        }
        // Only the events decoded since the last pass need a look.
        significant_drop |= decoded[scanned..].iter().any(|e| e.kind == Kind::Drop && !is_noise(e));
        scanned = decoded.len();
        if significant_drop && settle_until.is_none() {
            settle_until = Some(Instant::now() + Duration::from_millis(250));
        }
        // Done once things settled after the prober finished, or after a drop (the prober may still
        // be waiting out its timeout for a reply that will not come).
        let settled = settle_until.is_some_and(|t| Instant::now() > t) && (sender.is_none() || significant_drop);
        if INTERRUPTED.load(Ordering::SeqCst) || Instant::now() > deadline || settled {
            break;
        }
    }
    let program_stats = if req.opts.kernel_stats { probe.program_stats() } else { Vec::new() };
    probe.detach();
    probe.drain(&mut raw);
    keep(&mut decoder, &mut raw, &mut decoded, &mut not_kept);
    let counters = probe.counters();
    let hooks = probe.hooks.clone();
    drop(probe);
    // Stopped early on a drop: tell the prober, and take what its socket saw.
    stop_probe.store(true, Ordering::SeqCst);
    let outcome = match (outcome, sender) {
        (Some(o), _) => o,
        (None, Some(h)) => h.join().map_err(|_| anyhow::anyhow!("probe thread panicked"))??,
        (None, None) => ProbeOutcome::default(),
    };

    // The node's state after the probe: counters that moved are part of the evidence.
    for inode in &involved {
        if let Some(ns) = resolver.namespace(*inode) {
            if let Ok(st) = state::snapshot(ns) {
                states.by_inode.insert(*inode, st);
            }
        }
    }
    // Echoes of the pair that are not this run's (queued before it started) are not its evidence.
    if let Some(id) = outcome.icmp_id {
        decoded.retain(|e| e.packet.as_ref().is_none_or(|p| p.echo_id.is_none_or(|x| x == id)));
    }
    let trace = Trace::build(decoded);
    let mut verdict = finding::diagnose(&Ctx { trace: &trace, probe: &outcome, states: &states });
    verdict.missing = finding::missing_evidence(&verdict, &hooks, names_had_reasons);
    Ok(Report {
        src,
        dst,
        trace,
        verdict,
        counters,
        hooks,
        probe: outcome,
        states,
        elapsed_ms: t_start.elapsed().as_millis() as u64,
        ready_ms,
        events_not_kept: not_kept,
        program_stats,
        peak_rss_kib: peak_rss_kib(),
    })
}

/// Decodes raw records into `kept` up to MAX_KEPT_EVENTS; counts the rest.
fn keep(decoder: &mut Decoder, raw: &mut Vec<cnitrace_common::Event>, kept: &mut Vec<TraceEvent>, not_kept: &mut u64) {
    for r in raw.drain(..) {
        if kept.len() >= MAX_KEPT_EVENTS {
            *not_kept += 1;
        } else if let Some(e) = decoder.decode(&r) {
            kept.push(e);
        }
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// Everything diagnosis reads, as one JSON document: `follow --record` writes it, the unit tests replay
/// it without root (recorded fixtures of every lab fault).
#[derive(Serialize, serde::Deserialize)]
pub struct Recording {
    pub events: Vec<TraceEvent>,
    pub probe: ProbeOutcome,
    pub states: States,
}

impl Recording {
    pub fn of(r: &Report) -> Recording {
        Recording { events: r.trace.events.clone(), probe: r.probe.clone(), states: r.states.clone() }
    }

    /// Diagnoses the recorded trace and state again.
    pub fn replay(&self) -> Verdict {
        let trace = Trace::build(self.events.clone());
        finding::diagnose(&Ctx { trace: &trace, probe: &self.probe, states: &self.states })
    }

    /// The fix plan for the recorded verdict (nothing is applied).
    pub fn plan(&self) -> Option<(String, crate::fix::Remedy)> {
        let verdict = self.replay();
        let trace = Trace::build(self.events.clone());
        let ctx = Ctx { trace: &trace, probe: &self.probe, states: &self.states };
        crate::fix::plan(&ctx, verdict.cause.as_deref()?).map(|(c, r)| (c.id.to_string(), r))
    }
}

fn display(e: &Endpoint) -> String {
    match e {
        Endpoint::Local(l) => l.display.clone(),
        Endpoint::Remote(ip) => ip.to_string(),
    }
}

fn decoder_names(r: &HostResolver) -> event::Names {
    let mut n = event::Names::default();
    for (ns, st) in r.spaces() {
        n.netns.insert(ns.inode, resolve::display_ns(ns));
        for l in &st.links {
            n.ifnames.insert((ns.inode, l.ifindex), l.name.clone());
        }
    }
    n
}

