use std::{io::IsTerminal, path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use clap::Args;

use crate::fix::{self, journal, FixRequest, Mode};

#[derive(Args)]
pub struct FixArgs {
    /// Source pod: address or name, as for follow (default: the pair of the most recent `follow` here).
    src: Option<String>,
    /// Destination: address or pod name; ADDR:PORT for a Service (its ClusterIP, or a node's NodePort).
    dst: Option<String>,
    /// Apply without asking (otherwise: ask on a terminal, only print the plan elsewhere).
    #[arg(long)]
    auto: bool,
    /// Undo a previous fix exactly (default: the last one).
    #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "")]
    rollback: Option<String>,
    /// List past fixes.
    #[arg(long)]
    history: bool,
    /// Repair the cluster, not a pair: what `check` lists for the cluster as a whole (flannel's backend
    /// for Windows nodes), through the Kubernetes API; journaled like any fix.
    #[arg(long, conflicts_with_all = ["src", "dst"])]
    cluster: bool,
    /// Allow removing an explicit DROP/REJECT rule someone wrote.
    #[arg(long)]
    allow_rule_removal: bool,
    /// Roll back unless the pair is verified delivered within SECS of the first change.
    #[arg(long, value_name = "SECS")]
    confirm_timeout: Option<f64>,
    /// Where the journal lives (default /var/lib/cnitrace, or $CNITRACE_STATE_DIR).
    #[arg(long, value_name = "DIR")]
    journal_dir: Option<PathBuf>,
    #[command(flatten)]
    agent: super::AgentArgs,
    /// Seconds each trace waits for an answer or a drop.
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = super::trace_timeout)]
    timeout: Duration,
}

pub fn run(args: FixArgs, kube: &crate::k8s::KubeArgs) -> Result<u8> {
    let state_dir = journal::state_dir(args.journal_dir.as_deref());
    let mut out = std::io::stdout().lock();
    let (agents, no_agent) = args.agent.resolve(false, kube)?;
    for (node, why) in &no_agent {
        std::io::Write::write_fmt(&mut out, format_args!("{node}: no agent to ask: {why}\n"))?;
    }
    if !agents.is_empty() {
        return through_agents(args, &agents, kube, &mut out);
    }
    if args.history {
        return fix::history(&state_dir, &mut out);
    }
    if let Some(id) = &args.rollback {
        return fix::rollback(&state_dir, (!id.is_empty()).then_some(id.as_str()), &mut out);
    }
    if !crate::sys::is_root() {
        bail!("`cnitrace fix` needs root");
    }
    let mode = mode_of(args.auto);
    if args.cluster {
        let req = FixRequest { pair: None, dst_port: None, mode, allow_rule_removal: false, confirm_timeout: None, state_dir, trace_timeout: args.timeout, cluster: None };
        return fix::cluster::run(&req, &mut out);
    }
    let mut dst_port = None;
    let (pair, cluster) = match (&args.src, &args.dst) {
        (Some(s), Some(d)) => {
            let (d, port) = super::split_port(d)?;
            let p = super::pair::resolve(s, d, kube)?;
            dst_port = port.or(p.dst_port);
            (Some((p.src, p.dst)), p.cluster)
        }
        // The last follow's pair, named by the API as it was then (fix::run says why if there is none).
        (None, None) => match fix::last_pair(&state_dir) {
            Ok((s, d, _)) => (None, super::pair::resolve(&s.to_string(), &d.to_string(), kube)?.cluster),
            Err(_) => (None, None),
        },
        _ => bail!("give both SRC and DST, or neither (the pair of the last follow)"),
    };
    if let Some((s, d)) = pair {
        if s == d {
            bail!("source and destination are the same address ({s})");
        }
    }
    let req = FixRequest {
        pair,
        dst_port,
        mode,
        allow_rule_removal: args.allow_rule_removal,
        confirm_timeout: args.confirm_timeout.map(Duration::from_secs_f64),
        state_dir,
        trace_timeout: args.timeout,
        cluster,
    };
    fix::run(&req, &mut out)
}

/// `fix … --agent NODE=ADDR…`: the agents need root on their nodes; this CLI only reaches their sockets.
fn through_agents(args: FixArgs, agents: &[(String, crate::agent::Addr)], kube: &crate::k8s::KubeArgs, out: &mut dyn std::io::Write) -> Result<u8> {
    let timeout = args.agent.timeout();
    if args.journal_dir.is_some() || args.cluster || args.confirm_timeout.is_some() {
        bail!("--journal-dir, --cluster and --confirm-timeout are for a fix on this host, not through agents (each node journals its own part)");
    }
    if args.history {
        return crate::fix::remote::history(agents, timeout, out);
    }
    if let Some(id) = &args.rollback {
        return crate::fix::remote::rollback(agents, (!id.is_empty()).then_some(id.as_str()), timeout, out);
    }
    let (Some(s), Some(d)) = (&args.src, &args.dst) else { bail!("through agents, give the pair: cnitrace fix SRC DST --agent NODE=ADDR…") };
    let (d, port) = super::split_port(d)?;
    let p = super::pair::resolve(s, d, kube)?;
    if p.src == p.dst {
        bail!("source and destination are the same address ({})", p.src);
    }
    let mode = mode_of(args.auto);
    let req = FixRequest {
        pair: Some((p.src, p.dst)),
        dst_port: port.or(p.dst_port),
        mode,
        allow_rule_removal: args.allow_rule_removal,
        confirm_timeout: None,
        state_dir: PathBuf::new(),
        trace_timeout: args.timeout,
        cluster: p.cluster,
    };
    crate::fix::remote::run(&req, agents, timeout, out)
}

/// `--auto` applies; a terminal is asked; anything else (a pipe, a script) gets the plan only.
fn mode_of(auto: bool) -> Mode {
    if auto {
        Mode::Auto
    } else if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        Mode::Ask
    } else {
        Mode::DryRun
    }
}
