use std::{net::Ipv4Addr, time::Duration};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{
    follow::{self, FollowRequest},
    inject::ProbeKind,
    render,
};

#[derive(Args)]
pub struct FollowArgs {
    /// Source pod: its address, or its name as kubectl has it (POD, NAMESPACE/POD; needs the API).
    /// Probe traffic starts in its network namespace.
    src: String,
    /// Destination: an address (a pod here, a pod on another node, or anything beyond) or a pod's name;
    /// ADDR:PORT for a Service — its ClusterIP and port, or a node's address and a NodePort — or a Service
    /// by name (svc/NAME[:PORT], NAMESPACE/svc/NAME; needs the API), followed through kube-proxy's NAT to
    /// the endpoint (probe: tcp:PORT).
    dst: String,
    /// Probe traffic: icmp (the default), tcp:PORT, udp:PORT, or none (wait for real traffic). With
    /// DST as ADDR:PORT: tcp:PORT.
    #[arg(long)]
    probe: Option<ProbeKind>,
    /// Number of probes (plus one full-size echo when --size is not given).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Seconds to wait for an answer or a drop.
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = super::trace_timeout)]
    timeout: Duration,
    /// ICMP payload size in bytes (MTU problems); sent with DF.
    #[arg(long)]
    size: Option<usize>,
    /// JSON Lines: one object per event, the verdict object last.
    #[arg(long)]
    json: bool,
    /// Write FILE once the probes are attached (through agents: on every node that answered); it holds
    /// the milliseconds start-up took.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<std::path::PathBuf>,
    /// Report the kernel's own run count and time of each program (BPF_ENABLE_STATS while tracing).
    #[arg(long)]
    kernel_stats: bool,
    /// On an unanswered ARP, wait until the kernel gives up and drops the queued packet (NEIGH_FAILED,
    /// about 3 s) to show its drop point, instead of deciding from the ARP trail after 300 ms.
    #[arg(long)]
    until_drop: bool,
    /// Have the kernel write every hop record even past the 5,000 per CPU the timeline can keep (by
    /// default it only counts them from then on; drops are always written). For capacity measurements.
    #[arg(long)]
    all_events: bool,
    /// Tracepoints only: do not try the optional kprobes (netfilter verdicts, rp_filter, bridge, VXLAN).
    #[arg(long)]
    no_kprobes: bool,
    /// Attach the busiest hooks as raw tracepoints, not as BTF tracepoints (`tp_btf`, the default
    /// where the kernel takes them: one helper call less per packet on the node).
    #[arg(long)]
    raw_tracepoints: bool,
    /// Attach every program with its filter off, so nothing matches: what the hooks alone cost the
    /// node (for `cargo xtask bench`).
    #[arg(long, hide = true)]
    hooks_only: bool,
    /// Every event of the trace (by default: the hops that matter — no loopback legs of the probe's own
    /// ICMP errors, no queueing, no repeats).
    #[arg(short, long)]
    verbose: bool,
    /// Colour: auto (on a terminal, unless NO_COLOR is set), always, never.
    #[arg(long, value_enum, default_value_t = clap::ColorChoice::Auto, value_name = "WHEN")]
    color: clap::ColorChoice,
    /// Also write the trace, the probe's outcome and the node's state to FILE (a replayable fixture).
    #[arg(long, value_name = "FILE")]
    record: Option<std::path::PathBuf>,
    /// Also write the traced packets to FILE.pcapng for Wireshark or tshark: each packet's first bytes
    /// (captured in the kernel), one interface per namespace and device of its hops, the hop, its
    /// direction and — for a drop — the kernel's function and drop reason in the packet's comment.
    #[arg(short = 'w', long, value_name = "FILE.pcapng")]
    write: Option<std::path::PathBuf>,
    /// Bytes of each packet to capture (from its network header) for --write and --record.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(1..=cnitrace_common::MAX_SNAPLEN as i64))]
    snaplen: Option<u32>,
    #[command(flatten)]
    agent: super::AgentArgs,
}

impl FollowArgs {
    /// The pair (made addresses) and the raw options → a validated request (no system access here).
    /// The destination without its port, and the port (`10.96.12.7:8096`).
    fn dst_and_port(&self) -> Result<(&str, Option<u16>)> {
        super::split_port(&self.dst)
    }

    fn probe_kind(&self) -> Result<ProbeKind> {
        let (_, port) = self.dst_and_port()?;
        match (self.probe, port) {
            (None, None) => Ok(ProbeKind::Icmp),
            (None, Some(p)) => Ok(ProbeKind::Tcp(p)),
            (Some(k @ (ProbeKind::Tcp(q) | ProbeKind::Udp(q))), Some(p)) if q != p => {
                bail!("--probe {k} and destination port {p} disagree: give the port once")
            }
            (Some(ProbeKind::Icmp), Some(p)) => bail!("--probe icmp has no port, but the destination names port {p}"),
            (Some(k), _) => Ok(k),
        }
    }

    pub fn request(&self, src: Ipv4Addr, dst: Ipv4Addr, cluster: Option<crate::k8s::ClusterFacts>) -> Result<FollowRequest> {
        if self.count == 0 || self.count > 100 {
            bail!("--count must be between 1 and 100");
        }
        if self.size.is_some_and(|s| s > 65_000) {
            bail!("--size must be at most 65000 bytes");
        }
        let opts = follow::FollowOptions {
            ready_file: self.ready_file.clone(),
            kernel_stats: self.kernel_stats,
            no_kprobes: self.no_kprobes,
            raw_tracepoints: self.raw_tracepoints,
            until_drop: self.until_drop,
            all_events: self.all_events,
            hooks_only: self.hooks_only,
            progress: !self.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            snaplen: match (self.snaplen, &self.write) {
                (Some(n), _) => n,
                (None, Some(_)) => crate::pcapng::DEFAULT_SNAPLEN,
                (None, None) => 0,
            },
            ..Default::default()
        };
        let probe = self.probe_kind()?;
        let dst_port = match probe {
            ProbeKind::Tcp(p) | ProbeKind::Udp(p) => Some(p),
            _ => None,
        };
        Ok(FollowRequest { src, dst, dst_port, probe, count: self.count, timeout: self.timeout, size: self.size, opts, cluster })
    }
}

pub fn run(args: FollowArgs, kube: &crate::k8s::KubeArgs) -> Result<u8> {
    // Options and root first: neither waits for the API.
    args.request(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, None)?;
    let (agents, no_agent) = args.agent.resolve(false, kube)?;
    for (node, why) in &no_agent {
        eprintln!("cnitrace: {node} is not traced: {why}");
    }
    if !agents.is_empty() && (args.kernel_stats || args.hooks_only || args.all_events || args.raw_tracepoints) {
        bail!("--kernel-stats, --all-events and --raw-tracepoints are for a trace on this host, not through agents");
    }
    // Through agents, the agents need root on their nodes; this CLI only reaches their sockets.
    if agents.is_empty() && !crate::sys::is_root() {
        return Err(follow::FollowError::NotRoot.into());
    }
    let pair = super::pair::resolve(&args.src, args.dst_and_port()?.0, kube)?;
    let mut req = args.request(pair.src, pair.dst, pair.cluster)?;
    // `svc/NAME[:PORT]`: the port the API gave, probed over TCP unless --probe said otherwise.
    if let (Some(p), None) = (pair.dst_port, req.dst_port) {
        req.dst_port = Some(p);
        if args.probe.is_none() {
            req.probe = ProbeKind::Tcp(p);
        }
    }
    let report = if agents.is_empty() {
        let r = follow::run(&req)?;
        // `fix --auto` without a pair repairs what was followed last.
        crate::fix::remember_pair(&crate::fix::journal::state_dir(None), req.src, req.dst, req.dst_port);
        r
    } else {
        crate::stitch::follow(&agents, &req, args.agent.timeout())?
    };
    if let Some(path) = &args.record {
        let rec = follow::Recording::of(&report);
        std::fs::write(path, serde_json::to_vec(&rec)?).with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &args.write {
        let title = format!("cnitrace follow {} {}", args.src, args.dst);
        let t0 = Duration::from_nanos(report.t0_unix_ns.unwrap_or(0));
        let snaplen = req.opts.snaplen;
        crate::pcapng::write(path, &report.trace.events, t0, snaplen, &crate::pcapng::verdict_comment(&title, &report.verdict))?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        render::json(&report, &mut out)?;
    } else {
        render::text(&report, &render::Style::for_stdout(args.color, args.verbose), &mut out)?;
    }
    Ok(report.verdict.exit_code())
}
