//! `follow`: the pipeline end to end — resolve the pair, attach the probes, send probe traffic from the
//! source pod, collect the kernel's events, read the node's state, and decide the verdict.

use std::{
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
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
    probe::{Counters, HookStatus, Probe, ProbeOptions},
    resolve::{self, Endpoint, HostResolver, Resolver},
    state::{self, NsState},
};

/// The VXLAN ports whose inner headers the kernel side looks into (flannel's and IANA's).
pub const VXLAN_PORTS: [u16; 2] = [8472, 4789];

#[derive(Clone, Debug)]
pub struct FollowRequest {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The destination's port when one was given (`ADDR:PORT`): a Service's ClusterIP or a NodePort is
    /// looked up in kube-proxy's rules and followed through its NAT.
    pub dst_port: Option<u16>,
    pub probe: ProbeKind,
    pub count: u32,
    pub timeout: Duration,
    /// ICMP payload size; None: `count` small echoes plus one full-size echo for the source's MTU.
    pub size: Option<usize>,
    pub opts: FollowOptions,
    /// What the Kubernetes API said about the pair and the nodes (names, flannel's record), if it answered.
    pub cluster: Option<crate::k8s::ClusterFacts>,
}

/// What operators and the benchmark ask for beyond the trace itself.
#[derive(Clone, Debug, Default)]
pub struct FollowOptions {
    /// On an unanswered ARP, wait for the kernel to give up and drop the queued packet (NEIGH_FAILED,
    /// mcast_solicit × retrans_time: 3 s by default) instead of deciding after ARP_PATIENCE.
    pub until_drop: bool,
    /// Written once the probes are attached (as pwru does), holding the milliseconds it took.
    pub ready_file: Option<std::path::PathBuf>,
    /// Have the kernel count each program's runs and run time while tracing.
    pub kernel_stats: bool,
    /// Tracepoints only: do not try the optional kprobes.
    pub no_kprobes: bool,
    /// Raw tracepoints only, not their BTF versions.
    pub raw_tracepoints: bool,
    /// No hop budget in the kernel: every hop record is written even past what the timeline keeps (they
    /// are drained and counted here): what a capacity measurement needs, nothing an operator reads.
    pub all_events: bool,
    /// The programs attached with their filter off (nothing matches): the hooks' own cost, for the
    /// benchmark. Not for operators.
    pub hooks_only: bool,
    /// One line on stderr saying what follow is doing while it works (a terminal, not --json).
    pub progress: bool,
    /// Bytes of each packet record captured in the kernel (`--write`, `--snaplen`); 0: none.
    pub snaplen: u32,
    /// The network namespaces (inodes) this trace may report on: an agent's node — its own namespace and
    /// its pods' (on a real node everything the kernel has; in the lab, one node of the several one kernel
    /// holds). Events elsewhere are not kept and no state is read there. None: the whole host.
    pub scope: Option<Scope>,
    /// Ends the trace when set (an agent's client stopped it or went away). With it, follow leaves the
    /// process's signal handling alone (the agent has its own).
    pub stop: Option<Arc<AtomicBool>>,
    /// The probe's ICMP echo id, when several tracers (each node's agent) must tell this probe's echoes
    /// from any other's: the one that sends uses it, the others keep only its echoes.
    pub icmp_id: Option<u16>,
    /// Told the milliseconds start-up took once the probes are attached (an agent says "ready" to the
    /// CLI that waits for every node's probes before the first packet is sent).
    pub on_ready: Option<std::sync::mpsc::Sender<u64>>,
    /// Attached, the probe waits for this flag (the CLI says go once every node's agent is attached).
    pub go: Option<Arc<AtomicBool>>,
    /// Told each event as it is decoded, while the trace runs (an agent streams them to the CLI, which
    /// keeps what a node saw even if its agent dies before its trace ends).
    pub on_event: Option<std::sync::mpsc::Sender<TraceEvent>>,
}

/// What one node's tracer keeps: the namespaces of that node (see [`FollowOptions::scope`]).
#[derive(Clone, Debug, Default)]
pub struct Scope {
    pub inodes: std::collections::BTreeSet<u32>,
    /// What those namespaces are called (the node's name, its pods').
    pub names: std::collections::BTreeSet<String>,
}

impl Scope {
    pub fn holds(&self, inode: u32) -> bool {
        self.inodes.contains(&inode)
    }
}

/// A scope applied to records as they are decoded. A route lookup or neighbour event carries no
/// namespace: it ran where its CPU's last packet was (as [`Trace::build`] attributes it), so that is
/// decided here, before the other node's records are dropped.
#[derive(Default)]
struct ScopeFilter {
    scope: Option<Scope>,
    /// Keep a lookup nothing places (no packet on its CPU before it): the tracer that sends the probe
    /// does — such a lookup is the probe's own, made where it was sent from (its first route lookup).
    keep_unplaced: bool,
    last_on_cpu: std::collections::HashMap<u32, (u32, String)>,
}

impl ScopeFilter {
    fn admits(&mut self, e: &mut TraceEvent) -> bool {
        let Some(scope) = &self.scope else { return true };
        match e.kind {
            Kind::Route | Kind::Neigh if e.netns == 0 => match self.last_on_cpu.get(&e.cpu) {
                Some((ns, name)) => {
                    e.netns = *ns;
                    e.where_ = name.clone();
                }
                // Nothing says where it ran: the prober's, if this node sent the probe.
                None => return self.keep_unplaced,
            },
            Kind::Route | Kind::Neigh => {}
            _ => {
                self.last_on_cpu.insert(e.cpu, (e.netns, e.where_.clone()));
            }
        }
        scope.holds(e.netns)
    }
}

/// How often follow drains the ring buffer while records come or a probe of its own is out.
const POLL: Duration = Duration::from_millis(10);
/// With nothing for IDLE_AFTER and no probe of its own out, follow sleeps until the kernel wakes it
/// (a drop, every 4,096th record of a CPU) or IDLE_POLL passes. Measured on an idle lab (10 s of
/// `follow --probe none`): 4.2 ms of CPU a second at 100 polls a second.
const IDLE_AFTER: Duration = Duration::from_millis(200);
const IDLE_POLL: Duration = Duration::from_millis(100);

/// How long an ARP request of the path may go unanswered before follow decides without waiting for the
/// kernel's own give-up: an answer on one node or across an overlay takes well under a millisecond
/// (tens under emulation), and the kernel itself asks again only after retrans_time (1 s).
pub const ARP_PATIENCE: Duration = Duration::from_millis(300);

/// ARP requests of the path and their answers, as the events come in.
#[derive(Default)]
pub struct ArpWatch {
    asked: Vec<Asked>,
    answered: Vec<Ipv4Addr>,
}

/// A target first asked for: when, and where (namespace inode, pod/node name, interface).
struct Asked {
    target: Ipv4Addr,
    since: Instant,
    netns: u32,
    where_: String,
    ifname: String,
}

/// An ARP request nobody answered within ARP_PATIENCE.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ArpUnanswered {
    pub target: Ipv4Addr,
    pub netns: u32,
    pub where_: String,
    pub ifname: String,
    pub waited_ms: u64,
    /// The asking device's neighbour settings: requests before the kernel gives up, and their spacing.
    pub mcast_solicit: u64,
    pub retrans_time_ms: u64,
}

impl ArpUnanswered {
    /// Reads the asking device's neighbour settings (the kernel's defaults when they cannot be read).
    fn with_settings(mut self, ns: Option<std::path::PathBuf>) -> Self {
        let dev = self.ifname.clone();
        let setting = |key: &'static str| -> Option<u64> {
            let key = format!("net.ipv4.neigh.{dev}.{key}");
            crate::netns::in_netns(&ns.clone()?, move || crate::sys::read_sysctl(&key)).ok()?.parse().ok()
        };
        self.mcast_solicit = setting("mcast_solicit").unwrap_or(3);
        self.retrans_time_ms = setting("retrans_time_ms").unwrap_or(1000);
        self
    }

    /// What the kernel would have done had follow waited: added to a verdict that claims no drop.
    pub fn annotate(&self, v: &mut Verdict) {
        if v.verdict == finding::Outcome::Delivered || v.function.is_some() {
            return;
        }
        v.facts.push(format!(
            "the ARP request for {} from {} {} went unanswered for {} ms; the kernel keeps the packet queued and drops it \
             (NEIGH_FAILED, Destination Host Unreachable) after {} unanswered requests {} ms apart: not waited for \
             (--until-drop waits for it)",
            self.target, self.where_, self.ifname, self.waited_ms, self.mcast_solicit, self.retrans_time_ms
        ));
    }
}

impl ArpWatch {
    pub fn see(&mut self, e: &TraceEvent, now: Instant) {
        let Some(p) = e.packet.as_ref().filter(|p| p.proto == "arp" && p.src != p.dst) else { return };
        if p.key.starts_with("arp 2 ") {
            if !self.answered.contains(&p.src) {
                self.answered.push(p.src);
            }
        } else if p.key.starts_with("arp 1 ") && e.kind == Kind::Xmit && !self.asked.iter().any(|a| a.target == p.dst) {
            // The first transmit is the asker's own device.
            self.asked.push(Asked { target: p.dst, since: now, netns: e.netns, where_: e.where_.clone(), ifname: e.ifname.clone() });
        }
    }

    /// The oldest request still unanswered after `patience`.
    pub fn unanswered(&self, now: Instant, patience: Duration) -> Option<ArpUnanswered> {
        self.asked
            .iter()
            .filter(|a| !self.answered.contains(&a.target) && now.duration_since(a.since) >= patience)
            .min_by_key(|a| a.since)
            .map(|a| ArpUnanswered {
                target: a.target,
                netns: a.netns,
                where_: a.where_.clone(),
                ifname: a.ifname.clone(),
                waited_ms: now.duration_since(a.since).as_millis() as u64,
                mcast_solicit: 3,
                retrans_time_ms: 1000,
            })
    }
}

/// Events decoded and kept for the timeline; beyond this the ring is still drained and counted, so a
/// traced flood costs bounded memory. The first packets tell the story; the counters tell the volume.
pub const MAX_KEPT_EVENTS: usize = 5_000;
/// Drops kept past MAX_KEPT_EVENTS: the ones that end a long flow.
pub const MAX_KEPT_DROPS: usize = 1_000;

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
    /// The emptying of the ring that took the most records (with `counters.lost`, why they were lost).
    pub ring_peak: RingPeak,
    pub program_stats: Vec<crate::probe::ProgramStats>,
    /// Peak resident memory of this process (VmHWM).
    pub peak_rss_kib: u64,
    /// Follow decided on an ARP request nobody answered, before the kernel gave up on it.
    pub arp_unanswered: Option<ArpUnanswered>,
    /// Wall-clock time (ns since 1970) of the trace's first record, where `TraceEvent::t_ns` starts.
    #[serde(skip)]
    pub t0_unix_ns: Option<u64>,
    /// The same instant on the kernel's CLOCK_MONOTONIC (exact between tracers of one kernel).
    #[serde(skip)]
    pub t0_mono_ns: Option<u64>,
    /// Traced by the nodes' agents and stitched: each node's share and clock, the agents that did not
    /// answer, the node where the packet died.
    #[serde(skip)]
    pub stitched: Option<Stitched>,
}

/// The wall-clock time (ns since 1970) of a CLOCK_MONOTONIC reading (the kernel's `bpf_ktime_get_ns`).
fn monotonic_to_unix_ns(mono_ns: u64) -> Option<u64> {
    let now_mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let now_mono = now_mono.tv_sec() as u64 * 1_000_000_000 + now_mono.tv_nsec() as u64;
    let now_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as u64;
    Some(now_unix.saturating_sub(now_mono.saturating_sub(mono_ns)))
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_sigint() {
    crate::sys::on_stop_signals(on_sigint);
}

/// `--ready-file`: the file holds the milliseconds start-up took, written once the probes watch.
pub(crate) fn write_ready_file(path: &std::path::Path, ready_ms: u64) -> Result<()> {
    std::fs::write(path, format!("{ready_ms}\n")).with_context(|| format!("write the ready file {}", path.display()))
}

pub fn run(req: &FollowRequest) -> Result<Report> {
    let t_start = Instant::now();
    // Before anything is attached: an interrupt must end in a verdict and a clean detach. An agent's
    // trace is stopped through its own flag instead.
    if req.opts.stop.is_none() {
        catch_sigint();
    }
    let in_scope = |inode: u32| req.opts.scope.as_ref().is_none_or(|s| s.holds(inode));
    if !crate::sys::is_root() {
        return Err(FollowError::NotRoot.into());
    }
    if req.src == req.dst {
        return Err(FollowError::SameAddress(req.src).into());
    }
    let mut progress = crate::progress::Progress::new(req.opts.progress);
    progress.say(&format!("resolving {} and {}…", req.src, req.dst));
    let resolver = HostResolver::scan()?;
    let mut src = resolver.resolve(req.src)?;
    let mut dst = resolver.resolve(req.dst)?;
    if src.local().is_none_or(|l| !in_scope(l.netns.inode)) && req.probe != ProbeKind::None {
        return Err(FollowError::SourceNotHere(req.src).into());
    }
    // Kubernetes names where the API gave them: the same name in the timeline, the verdict and its facts.
    let k8s_names = req.cluster.as_ref().map(|c| crate::k8s::name_namespaces(c, &resolver)).unwrap_or_default();
    let mut names = decoder_names(&resolver);
    for (inode, name) in &k8s_names {
        names.netns.insert(*inode, name.clone());
    }
    for e in [&mut src, &mut dst] {
        rename(e, &k8s_names, req.cluster.as_ref());
    }
    let mut states = States {
        src_ip: Some(req.src),
        dst_ip: Some(req.dst),
        src_name: display(&src),
        dst_name: display(&dst),
        names: k8s_names,
        cluster: req.cluster.clone(),
        ..Default::default()
    };
    // The names the namespaces' makers gave them, beside the API's: a recording says every place as it
    // was shown when traced.
    for (ns, _) in resolver.spaces().iter().filter(|(ns, _)| !ns.is_root) {
        if let Some(shown) = names.netns.get(&ns.inode).filter(|shown| **shown != ns.name) {
            states.names.entry(ns.inode).or_insert_with(|| shown.clone());
        }
    }
    if let Some(l) = src.local().filter(|l| in_scope(l.netns.inode)) {
        states.src_pod = l.netns.inode;
        states.src_node = l.node.as_ref().map(|n| n.netns.inode);
        states.src_host_veth = l.node.as_ref().map(|n| n.host_ifindex);
    }
    if let Some(l) = dst.local().filter(|l| in_scope(l.netns.inode)) {
        states.dst_pod = Some(l.netns.inode);
        states.dst_node = l.node.as_ref().map(|n| n.netns.inode);
        states.dst_host_veth = l.node.as_ref().map(|n| n.host_ifindex);
    }
    // A Service: the node that translates it, and its endpoints here (their pods and nodes).
    let api_service = req.cluster.as_ref().is_some_and(|c| c.service_with_ip(req.dst).is_some());
    let proto = if matches!(req.probe, ProbeKind::Udp(_)) { "udp" } else { "tcp" };
    let mut service = req.dst_port.and_then(|port| crate::service::find(&resolver, &src, &dst, (port, proto), api_service, &mut states.rules_before));
    if let Some(sp) = service.as_mut() {
        if let Some(n) = states.names.get(&sp.nat_node) {
            sp.nat_node_name = n.clone();
        }
    }
    let mut extra_spaces = Vec::new();
    let mut endpoints_here = Vec::new();
    if let Some(sp) = &service {
        progress.say(&format!("{}…", sp.describe()));
        extra_spaces.push(sp.nat_node);
        for ip in sp.endpoint_ips() {
            if let Ok(crate::resolve::Endpoint::Local(l)) = resolver.resolve(ip) {
                extra_spaces.push(l.netns.inode);
                extra_spaces.extend(l.node.as_ref().map(|n| n.netns.inode));
                endpoints_here.push(l);
            }
        }
    }
    states.service = service.clone();
    let involved: Vec<u32> = {
        let mut v = vec![states.src_pod];
        v.extend([states.src_node, states.dst_pod, states.dst_node].into_iter().flatten());
        v.extend(&extra_spaces);
        v.sort();
        v.dedup();
        v.retain(|i| *i != 0 && in_scope(*i));
        v
    };
    let mut node_inodes: Vec<u32> = [states.src_node, states.dst_node].into_iter().flatten().collect();
    node_inodes.extend(service.as_ref().map(|s| s.nat_node));
    node_inodes.extend(endpoints_here.iter().filter_map(|l| l.node.as_ref().map(|n| n.netns.inode)));
    node_inodes.sort();
    node_inodes.dedup();
    node_inodes.retain(|i| !states.rules_before.contains_key(i) && in_scope(*i));
    for inode in &node_inodes {
        if let Some(ns) = resolver.namespace(*inode) {
            let path = ns.path.clone();
            if let Ok(r) = crate::netns::in_netns(&path, || Ok(state::rules_now())) {
                states.rules_before.insert(*inode, r);
            }
        }
    }

    let hops = next_hops(&resolver, &states, req.src, req.dst);
    // Each CPU writes up to the kept timeline's worth of records; past it the kernel counts hop records
    // (a bulk flow stops paying for records nobody reads) and still writes every drop.
    let budget = if req.opts.all_events { 0 } else { MAX_KEPT_EVENTS as u32 };
    let probe_opts = ProbeOptions {
        hop_budget: budget,
        kernel_stats: req.opts.kernel_stats,
        kprobes: !req.opts.no_kprobes,
        btf_tracepoints: !req.opts.raw_tracepoints,
        hooks_only: req.opts.hooks_only,
        alt_b: service.as_ref().map(|s| s.endpoint_ips()).unwrap_or_default(),
        alt_a: service.as_ref().map(|s| masquerade_sources(&resolver, s, &src)).unwrap_or_default(),
        snaplen: req.opts.snaplen,
    };
    progress.say("attaching the probes…");
    let mut probe = Probe::start(req.src, req.dst, &hops, VXLAN_PORTS, &probe_opts)?;
    let ready_ms = t_start.elapsed().as_millis() as u64;
    if let Some(path) = &req.opts.ready_file {
        write_ready_file(path, ready_ms)?;
    }
    if let Some(tx) = &req.opts.on_ready {
        let _ = tx.send(ready_ms);
    }
    names.drop_reasons = probe.drop_reasons.clone();
    names.has_reasons = probe.kfree_has_reason;
    let names_had_reasons = probe.kfree_has_reason;

    let stop_probe = Arc::new(AtomicBool::new(false));
    let icmp_id = req.opts.icmp_id.unwrap_or_else(inject::new_icmp_id);
    if let Some(go) = &req.opts.go {
        // The ring holds what comes meanwhile (nothing of the pair: nobody probes yet).
        let stopped = || INTERRUPTED.load(Ordering::SeqCst) || req.opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        let t = Instant::now();
        while !go.load(Ordering::SeqCst) && !stopped() && t.elapsed() < req.timeout + Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
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
            icmp_id,
            stop: stop_probe.clone(),
        };
        std::thread::spawn(move || inject::run(plan))
    });

    let own_echo = if req.probe == ProbeKind::Icmp && sender.is_some() { Some(icmp_id) } else { req.opts.icmp_id };
    // The timeout counts from the probes being ready: start-up is the kernel's and the machine's (tens
    // of ms here, seconds under emulation), not time the traffic had.
    let probing_since = Instant::now();
    let deadline = probing_since + req.timeout + Duration::from_millis(300);
    let mut intake = Intake { scope: ScopeFilter { scope: req.opts.scope.clone(), keep_unplaced: sender.is_some(), ..Default::default() }, ..Default::default() };
    let mut decoder = Decoder::new(names);
    let mut decoded: Vec<TraceEvent> = Vec::new();
    let mut settle_until: Option<Instant> = None;
    let mut outcome: Option<ProbeOutcome> = None;
    let mut sender = sender;
    let (mut significant_drop, mut scanned) = (false, 0);
    let mut arp = ArpWatch::default();
    let mut arp_unanswered = None;
    let mut last_record = Instant::now();
    loop {
        // Records are submitted without wakeups: poll on a short period while they come or a probe
        // runs. A passive trace with nothing for a while sleeps until the kernel wakes it (a drop, a
        // burst) or IDLE_POLL passes: 10 wakeups a second on a quiet node, not 100.
        let idle = sender.is_none() && settle_until.is_none() && last_record.elapsed() > IDLE_AFTER;
        if idle {
            probe.wait_woken(IDLE_POLL);
        } else {
            probe.wait(POLL);
        }
        if intake.run(&mut probe, &mut decoder, &mut decoded, own_echo) {
            last_record = Instant::now();
        }
        if sender.as_ref().is_some_and(|h| h.is_finished()) {
            let h = sender.take().expect("sender");
            outcome = Some(h.join().map_err(|_| anyhow::anyhow!("probe thread panicked"))??);
            settle_until.get_or_insert(Instant::now() + Duration::from_millis(100));
        }
        // Only the events decoded since the last pass need a look.
        let now = Instant::now();
        // A drop of the pair's traffic, or a route lookup for it that failed (the kernel found no way on:
        // an answer that cannot be routed back is never sent, so nothing more will come).
        significant_drop |= decoded[scanned..].iter().any(|e| (e.kind == Kind::Drop && !is_noise(e)) || crate::path::is_route_failure(e) || no_way_back(e, req.src));
        for e in &decoded[scanned..] {
            arp.see(e, now);
            if let Some(tx) = &req.opts.on_event {
                let _ = tx.send(e.clone());
            }
        }
        scanned = decoded.len();
        // A question nobody answers: the kernel holds the packet and asks again 1 s later; what the
        // request's trail and the node's state say is all the wait would add, bar the kernel's give-up.
        if !req.opts.until_drop && !significant_drop && arp_unanswered.is_none() {
            arp_unanswered = arp.unanswered(now, ARP_PATIENCE);
            if arp_unanswered.is_some() {
                settle_until = Some(now);
            }
        }
        if significant_drop && settle_until.is_none() {
            settle_until = Some(Instant::now() + Duration::from_millis(250));
        }
        // Done once things settled after the prober finished, or after a drop (the prober may still
        // be waiting out its timeout for a reply that will not come).
        let settled =
            settle_until.is_some_and(|t| Instant::now() > t) && (sender.is_none() || significant_drop || arp_unanswered.is_some());
        let stopped = INTERRUPTED.load(Ordering::SeqCst) || req.opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        if stopped || Instant::now() > deadline || settled {
            break;
        }
        let waited = probing_since.elapsed().as_millis();
        progress.say(&match arp.unanswered(now, Duration::ZERO) {
            Some(a) => format!("waiting for ARP reply from {} on {} {}… {} ms", a.target, a.where_, a.ifname, a.waited_ms),
            None if sender.is_some() => format!("probing {} → {} ({})… {waited} ms, {} events", req.src, req.dst, req.probe, decoded.len()),
            None => format!("waiting for the pair's traffic… {waited} ms, {} events", decoded.len()),
        });
    }
    progress.clear();
    let program_stats = if req.opts.kernel_stats { probe.program_stats() } else { Vec::new() };
    probe.detach();
    // Nothing new comes once detached: decode what is held.
    while intake.run(&mut probe, &mut decoder, &mut decoded, own_echo) || intake.holds() {}
    let counters = probe.counters();
    let hooks = probe.hooks.clone();
    let t0_mono_ns = decoder.t0();
    let t0_unix_ns = t0_mono_ns.and_then(monotonic_to_unix_ns);
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
    let mut trace = Trace::build(decoded);
    // Through a Service: the endpoint the trace shows chosen is the destination the causes look at.
    if let Some(sp) = states.service.as_mut() {
        sp.chosen = crate::service::chosen(sp, &mut trace);
        if let Some(ep) = sp.chosen.clone() {
            states.dst_ip = Some(*ep.addr.ip());
            if let Some(l) = endpoints_here.iter().find(|l| l.ip == *ep.addr.ip()) {
                states.dst_pod = Some(l.netns.inode);
                states.dst_node = l.node.as_ref().map(|n| n.netns.inode);
                states.dst_host_veth = l.node.as_ref().map(|n| n.host_ifindex);
                states.dst_name = l.display.clone();
                if let Some(n) = states.names.get(&l.netns.inode) {
                    states.dst_name = n.clone();
                }
            }
        }
    }
    let mut verdict = finding::diagnose(&Ctx { trace: &trace, probe: &outcome, states: &states });
    verdict.missing = finding::missing_evidence(&verdict, &hooks, names_had_reasons);
    // Decided before the kernel's give-up: say what was not waited for, with this namespace's numbers.
    let arp_unanswered = arp_unanswered.map(|a: ArpUnanswered| {
        let ns = resolver.namespace(a.netns).map(|n| n.path.clone());
        a.with_settings(ns)
    });
    if let Some(a) = &arp_unanswered {
        a.annotate(&mut verdict);
    }
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
        events_not_kept: intake.not_kept,
        ring_peak: intake.peak,
        program_stats,
        peak_rss_kib: peak_rss_kib(),
        arp_unanswered,
        t0_unix_ns,
        t0_mono_ns,
        stitched: None,
    })
}

/// The addresses a masquerade on the Service's node may give the source on its way to an endpoint (its
/// addresses on the bridge and the VXLAN device): kube-proxy masquerades NodePort traffic, traffic from
/// outside the pod network, and a pod reaching itself through its Service (hairpin).
fn masquerade_sources(resolver: &HostResolver, sp: &crate::service::ServicePath, src: &Endpoint) -> Vec<Ipv4Addr> {
    let hairpin = sp.endpoint_ips().contains(&src.ip());
    let from_a_pod = src.local().is_some_and(|l| l.node.is_some());
    if !(sp.node_port || hairpin || !from_a_pod) {
        return Vec::new();
    }
    let Some((_, st)) = resolver.spaces().iter().find(|(ns, _)| ns.inode == sp.nat_node) else { return Vec::new() };
    st.addrs
        .iter()
        .filter(|a| st.link(a.ifindex).is_some_and(|l| l.kind == "bridge" || l.kind == "vxlan"))
        .map(|a| a.addr)
        .take(2)
        .collect()
}

/// A main-table miss for the source's address (-EAGAIN: nothing in the main table, and a node's default
/// table is empty): somewhere an answer to the source cannot be routed back, so it is never sent.
fn no_way_back(e: &TraceEvent, src: Ipv4Addr) -> bool {
    e.kind == Kind::Route
        && e.route.as_ref().is_some_and(|r| r.err == -11 && r.table == crate::state::MAIN_TABLE)
        && e.packet.as_ref().is_some_and(|p| p.dst == src)
}

/// An ICMP echo of the pair with another id than this run's own probes.
fn foreign_echo(e: &TraceEvent, own: Option<u16>) -> bool {
    match (own, e.packet.as_ref().and_then(|p| p.echo_id)) {
        (Some(own), Some(id)) => id != own,
        _ => false,
    }
}

/// The gateways the pair's packets resolve on the way: each pod's and each node's route towards the
/// other end (the node's is the remote VTEP on flannel.1 across nodes).
fn next_hops(resolver: &HostResolver, states: &States, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<Ipv4Addr> {
    let mut hops = Vec::new();
    for (inode, to) in [(Some(states.src_pod), dst), (states.src_node, dst), (states.dst_pod, src), (states.dst_node, src)] {
        let Some(ns) = inode.and_then(|i| resolver.namespace(i)) else { continue };
        let routes = NsState { routes: state::routes(&ns.path).unwrap_or_default(), ..Default::default() };
        if let Some(gw) = routes.route_to(to).and_then(|r| r.gateway) {
            if !hops.contains(&gw) {
                hops.push(gw);
            }
        }
    }
    hops
}

/// Records on their way from the ring buffer to the timeline. Decoding can be slow: naming a drop's
/// function reads /proc/kallsyms (~50 ms here), and a ping flood (--all-events) filled the 4 MiB ring
/// in 47 ms: the first drop of the flood cost half its records. So the ring is emptied while a new
/// location is looked up and between small batches of decoding, and a hop record the timeline cannot
/// keep any more is counted as it leaves the ring instead of being held. Drops are held (up to
/// MAX_HELD_DROPS): noise drops (a flood's echo replies freed at ping_rcv) must not crowd out the one
/// that ends the trace before they are told apart.
#[derive(Default)]
struct Intake {
    raw: std::collections::VecDeque<crate::probe::Record>,
    /// Records drained but not kept (over MAX_KEPT_EVENTS, or noise).
    not_kept: u64,
    /// Another node's records are not kept (an agent's trace).
    scope: ScopeFilter,
    /// When the ring was last emptied (and the reader's CPU time then), and the most records one emptying
    /// took.
    last_take: Option<(Instant, Duration)>,
    peak: RingPeak,
}

/// The emptying of the ring that took the most records, and what came before it. With records lost,
/// it tells a reader kept from the CPU (a long wait, little of it on the CPU: seen in a one-CPU guest,
/// where a ping flood held the reader off for 420 ms with 5 ms on the CPU) from records that came
/// faster than the reader's period could take them (a short wait).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RingPeak {
    pub records: u64,
    /// From the end of the emptying before to the start of this one.
    pub waited_ms: u64,
    /// How long that emptying took (records that came meanwhile were taken too).
    pub emptying_ms: u64,
    /// Of both, how long the reader ran (its thread's CPU time): far less, and it was kept from the
    /// CPU; about as much, and its own work took that long.
    pub on_cpu_ms: u64,
    /// What the reader did meanwhile.
    pub away: Away,
}

/// This thread's CPU time.
fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map(Duration::from).unwrap_or_default()
}

/// What the reader did between two emptyings of the ring (named by where the second one is).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Away {
    /// Slept its period (or until woken) and looked at what it had.
    #[default]
    Waiting,
    /// Named new functions from /proc/kallsyms (the ring is emptied every 2 ms meanwhile).
    NamingFunctions,
    /// Decoded a batch of records.
    Decoding,
}

impl Away {
    pub fn describe(self) -> &'static str {
        match self {
            Away::Waiting => "waiting for records",
            Away::NamingFunctions => "naming new functions from /proc/kallsyms",
            Away::Decoding => "decoding records",
        }
    }
}

/// Records decoded between two emptyings of the ring.
const DECODE_BATCH: usize = 256;
/// How long one call decodes before it lets follow look at its clock.
const DECODE_TIME: Duration = Duration::from_millis(100);
/// Records held for decoding at most (6 MiB), drops included: past it, drops too are counted only.
const MAX_HELD_DROPS: usize = 65_536;

impl Intake {
    fn holds(&self) -> bool {
        !self.raw.is_empty()
    }

    /// Empties the ring; true if anything came.
    fn take(&mut self, probe: &mut Probe, kept: usize, away: Away) -> bool {
        // Away: from the end of the last emptying (records that come while it empties are taken too) to
        // the start of this one.
        let (now, cpu) = (Instant::now(), thread_cpu_time());
        let (waited, on_cpu) = self.last_take.map_or((Duration::ZERO, Duration::ZERO), |t| (now - t.0, cpu.saturating_sub(t.1)));
        let mut n = 0u64;
        probe.drain(|r| {
            n += 1;
            let held = kept + self.raw.len();
            let drop = r.event.header.kind == cnitrace_common::EventKind::Drop as u32;
            if held < MAX_KEPT_EVENTS || (drop && self.raw.len() < MAX_HELD_DROPS) {
                self.raw.push_back(r);
            } else {
                self.not_kept += 1;
            }
        });
        let (end, end_cpu) = (Instant::now(), thread_cpu_time());
        let on_cpu = on_cpu + end_cpu.saturating_sub(cpu);
        self.last_take = Some((end, end_cpu));
        if n > self.peak.records {
            self.peak = RingPeak { records: n, waited_ms: waited.as_millis() as u64, emptying_ms: (end - now).as_millis() as u64, on_cpu_ms: on_cpu.as_millis() as u64, away };
        }
        n > 0
    }

    /// What the ring holds into `kept` (see [`keep`]), for up to DECODE_TIME (a flood of drops could
    /// outrun decoding, and the caller must still see its deadline); what is left stays held for the
    /// next call. True if anything came.
    fn run(&mut self, probe: &mut Probe, decoder: &mut Decoder, kept: &mut Vec<TraceEvent>, own_echo: Option<u16>) -> bool {
        let mut got = self.take(probe, kept.len(), Away::Waiting);
        let until = Instant::now() + DECODE_TIME;
        while !self.raw.is_empty() && Instant::now() < until {
            let n = self.raw.len().min(DECODE_BATCH);
            let unnamed = decoder.unnamed_locations(self.raw.iter().take(n).map(|r| &r.event));
            if !unnamed.is_empty() {
                let names = std::thread::scope(|s| {
                    let lookup = s.spawn(|| crate::probe::kallsyms::resolve(&unnamed));
                    while !lookup.is_finished() {
                        self.take(probe, kept.len(), Away::NamingFunctions);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    lookup.join().unwrap_or_default()
                });
                decoder.learn_functions(&unnamed, names);
                got |= self.take(probe, kept.len(), Away::NamingFunctions);
            }
            keep(decoder, self.raw.drain(..n), kept, &mut self.not_kept, own_echo, &mut self.scope);
            got |= self.take(probe, kept.len(), Away::Decoding);
        }
        got
    }
}

/// Decodes raw records into `kept` up to MAX_KEPT_EVENTS, and past it the drops that are not noise, up to
/// MAX_KEPT_DROPS more (a drop after a long flow is the verdict: a raw ping's echo replies, freed at
/// ping_rcv, must not crowd it out); counts the rest. Echoes of the pair with another id than this run's
/// probes (an earlier run's, still queued on a failing neighbour entry) are not this run's evidence: they
/// neither end it nor enter its trace.
fn keep(
    decoder: &mut Decoder,
    raw: impl Iterator<Item = crate::probe::Record>,
    kept: &mut Vec<TraceEvent>,
    not_kept: &mut u64,
    own_echo: Option<u16>,
    scope: &mut ScopeFilter,
) {
    for r in raw {
        if kept.len() < MAX_KEPT_EVENTS {
            if let Some(e) = decoder.decode_record(&r).filter(|e| !foreign_echo(e, own_echo)).and_then(|mut e| scope.admits(&mut e).then_some(e)) {
                kept.push(e);
            }
            continue;
        }
        let late_drop = r.event.header.kind == cnitrace_common::EventKind::Drop as u32 && kept.len() < MAX_KEPT_EVENTS + MAX_KEPT_DROPS;
        // Only a drop is decoded here: past the timeline, hop records are counted, not read.
        match late_drop.then(|| decoder.decode_record(&r)).flatten().filter(|e| !is_noise(e) && !foreign_echo(e, own_echo)).and_then(|mut e| scope.admits(&mut e).then_some(e)) {
            Some(e) => kept.push(e),
            None => *not_kept += 1,
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
    /// follow stopped on an unanswered ARP request (not waiting for the kernel's give-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arp_unanswered: Option<ArpUnanswered>,
    /// Wall-clock time (ns since 1970) of the first record (what a capture written from it is dated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t0_unix_ns: Option<u64>,
    /// The same instant on the tracing kernel's CLOCK_MONOTONIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t0_mono_ns: Option<u64>,
}

impl Recording {
    pub fn of(r: &Report) -> Recording {
        Recording {
            events: r.trace.events.clone(),
            probe: r.probe.clone(),
            states: r.states.clone(),
            arp_unanswered: r.arp_unanswered.clone(),
            t0_unix_ns: r.t0_unix_ns,
            t0_mono_ns: r.t0_mono_ns,
        }
    }

    /// Diagnoses the recorded trace and state again.
    pub fn replay(&self) -> Verdict {
        self.diagnose().1
    }

    /// The timeline built from the recorded events (a Service's endpoint marked as follow marks it) and
    /// its verdict.
    pub fn diagnose(&self) -> (Trace, Verdict) {
        let mut trace = Trace::build(self.events.clone());
        if let Some(sp) = &self.states.service {
            crate::service::chosen(sp, &mut trace);
        }
        let mut v = finding::diagnose(&Ctx { trace: &trace, probe: &self.probe, states: &self.states });
        if let Some(a) = &self.arp_unanswered {
            a.annotate(&mut v);
        }
        (trace, v)
    }

    /// The fix plan for the recorded verdict (nothing is applied).
    pub fn plan(&self) -> Option<(String, crate::plan::Remedy)> {
        let verdict = self.replay();
        let trace = Trace::build(self.events.clone());
        let ctx = Ctx { trace: &trace, probe: &self.probe, states: &self.states };
        let cause = crate::finding::causes::find(verdict.cause.as_deref()?)?;
        Some((cause.id.to_string(), (cause.fix)(&ctx)))
    }
}

fn display(e: &Endpoint) -> String {
    match e {
        Endpoint::Local(l) => l.display.clone(),
        Endpoint::Remote(ip) => ip.to_string(),
    }
}

/// An endpoint named as Kubernetes names it: the pod (`namespace/name`) and its node.
fn rename(e: &mut Endpoint, names: &std::collections::BTreeMap<u32, String>, cluster: Option<&crate::k8s::ClusterFacts>) {
    let Endpoint::Local(l) = e else { return };
    if let Some(n) = names.get(&l.netns.inode) {
        l.display = n.clone();
    }
    if let Some(node) = l.node.as_mut() {
        if let Some(n) = names.get(&node.netns.inode) {
            node.display = n.clone();
        }
    }
    l.pod = cluster.and_then(|c| c.pod_with_ip(l.ip)).cloned();
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


/// How the stitched trace came together: each node's share, its clock, and who did not answer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stitched {
    pub nodes: Vec<NodeShare>,
    /// Nodes whose agent did not answer or stopped answering: the trace has nothing of them.
    pub missing: Vec<MissingAgent>,
    /// The node where the pair's packet died (the verdict's drop), when one did.
    pub died_on: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeShare {
    pub node: String,
    pub agent: String,
    /// Sent the probe (its pod is the source) or watched.
    pub role: &'static str,
    pub events: usize,
    /// Where this node's first event sits on the source node's clock (ns; negative: before it).
    pub offset_ns: i64,
    /// What placed it: "one kernel with NODE", "wall clock", "wall clock, moved N ns by causality".
    pub clock: String,
    /// The namespaces it answers for (inodes of the stitched trace): a fix's action in one of them is
    /// this node's to apply.
    #[serde(skip)]
    pub inodes: Vec<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MissingAgent {
    pub node: String,
    pub agent: String,
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Packet;

    fn arp(op: u8, src: [u8; 4], dst: [u8; 4], kind: Kind) -> TraceEvent {
        let (src, dst) = (Ipv4Addr::from(src), Ipv4Addr::from(dst));
        TraceEvent {
            t_ns: 0,
            kind,
            netns: 7,
            where_: "debug".into(),
            ifindex: 2,
            ifname: "eth0".into(),
            cpu: 0,
            skb: 1,
            packet: Some(Packet {
                proto: "arp".into(),
                src,
                dst,
                what: String::new(),
                len: 28,
                outer: None,
                icmp_error: false,
                key: format!("arp {op} {src}>{dst}"),
                echo_id: None,
            }),
            drop: None,
            route: None,
            neigh: None,
            func: None,
            bytes: None,
        }
    }

    #[test]
    fn an_arp_request_is_unanswered_only_after_the_patience_and_without_a_reply() {
        let t0 = Instant::now();
        let mut w = ArpWatch::default();
        // Seen on the bridge first would not be the asker: only a transmit counts.
        w.see(&arp(1, [10, 244, 0, 20], [10, 244, 0, 19], Kind::Receive), t0);
        assert!(w.unanswered(t0 + Duration::from_secs(5), ARP_PATIENCE).is_none());
        w.see(&arp(1, [10, 244, 0, 20], [10, 244, 0, 19], Kind::Xmit), t0);
        assert!(w.unanswered(t0 + Duration::from_millis(299), ARP_PATIENCE).is_none(), "not yet");
        let u = w.unanswered(t0 + Duration::from_millis(300), ARP_PATIENCE).expect("unanswered");
        assert_eq!((u.target, u.where_.as_str(), u.ifname.as_str(), u.waited_ms), (Ipv4Addr::new(10, 244, 0, 19), "debug", "eth0", 300));
        // The owner's reply settles it.
        w.see(&arp(2, [10, 244, 0, 19], [10, 244, 0, 20], Kind::Receive), t0);
        assert!(w.unanswered(t0 + Duration::from_secs(5), ARP_PATIENCE).is_none());
        // A gratuitous ARP (announcing its own address) asks nobody.
        let mut w = ArpWatch::default();
        w.see(&arp(1, [10, 244, 0, 19], [10, 244, 0, 19], Kind::Xmit), t0);
        assert!(w.unanswered(t0 + Duration::from_secs(5), ARP_PATIENCE).is_none());
    }
}
