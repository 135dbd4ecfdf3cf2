//! `cnitrace check`: everything wrong on this host's nodes without a pair — the node checks, and with
//! the API what flanneld should have written from the Node objects and the ConfigMap — each finding
//! with its catalog cause and, where the finding alone implies it, the command that repairs it.

use anyhow::{bail, Result};
use clap::Args;

use crate::{exit, k8s::KubeArgs};

#[derive(Args)]
pub struct CheckArgs {
    /// Only this node: its Kubernetes name, or its network namespace's name.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// One JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    agent: super::AgentArgs,
    /// Every node of the cluster, each through its agent (found through the API, as --agents): a node
    /// whose agent pod is missing or not Ready is reported as such, not waited on.
    #[arg(long)]
    all_nodes: bool,
}

pub fn run(args: CheckArgs, kube: &KubeArgs) -> Result<u8> {
    if args.agent.any() || args.all_nodes {
        return through_agents(&args, kube);
    }
    if !crate::sys::is_root() {
        bail!("`cnitrace check` needs root (it reads every network namespace's routes, neighbours and rules)");
    }
    let report = crate::check::report(args.node.as_deref(), args.json, kube)?;
    let found = report.nodes.iter().map(|n| n.findings.len()).sum::<usize>();
    let v = serde_json::to_value(&report)?;
    if args.json {
        println!("{v}");
    } else {
        render(&v, &mut std::io::stdout().lock())?;
    }
    Ok(if found == 0 { exit::OK } else { exit::DROPPED })
}

/// `check --agent NODE=ADDR …`: each node's findings from its agent, asked in parallel.
/// `--agents` / `--all-nodes`: the agents found through the API too, each through port-forward.
fn through_agents(args: &CheckArgs, kube: &KubeArgs) -> Result<u8> {
    let timeout = args.agent.timeout();
    let (agents, no_agent) = args.agent.resolve(args.all_nodes, kube)?;
    // Each agent is asked for the node it was named for: an agent that serves another refuses.
    let answers = crate::agent::ask_each(&agents, |node| format!("/v1/check?node={node}"), timeout);
    let mut nodes = Vec::new();
    let mut missing: Vec<serde_json::Value> = no_agent.iter().map(|(node, why)| serde_json::json!({"node": node, "agent": null, "error": why})).collect();
    for ((node, addr), answer) in agents.iter().zip(answers) {
        match answer {
            Ok(v) => nodes.extend(v["nodes"].as_array().cloned().unwrap_or_default()),
            Err(e) => missing.push(serde_json::json!({"node": node, "agent": addr.to_string(), "error": format!("{e:#}")})),
        }
    }
    let found = nodes.iter().map(|n| n["findings"].as_array().map_or(0, Vec::len)).sum::<usize>();
    let v = serde_json::json!({"nodes": nodes, "agents_missing": missing});
    if args.json {
        println!("{v}");
    } else {
        render(&v, &mut std::io::stdout().lock())?;
    }
    Ok(if found == 0 && missing.is_empty() { exit::OK } else { exit::DROPPED })
}

/// The report as a person reads it (from its JSON: a local report and the agents' merged one alike).
fn render(r: &serde_json::Value, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let nodes = r["nodes"].as_array().cloned().unwrap_or_default();
    let missing = r["agents_missing"].as_array().cloned().unwrap_or_default();
    if nodes.is_empty() && missing.is_empty() {
        writeln!(out, "no node with pods on this host")?;
    }
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    for n in &nodes {
        let findings = n["findings"].as_array().cloned().unwrap_or_default();
        if findings.is_empty() {
            writeln!(out, "{}: nothing wrong", s(&n["node"]))?;
            continue;
        }
        writeln!(out, "{}: {} finding{}", s(&n["node"]), findings.len(), if findings.len() == 1 { "" } else { "s" })?;
        let w = findings.iter().map(|f| s(&f["cause"]).len()).max().unwrap_or(0);
        for f in &findings {
            writeln!(out, "  {:<w$}  {}", s(&f["cause"]), s(&f["what"]))?;
            if let Some(cmd) = f["fix"].as_str() {
                writeln!(out, "  {:<w$}  fix:   {cmd}", "")?;
            }
            if let Some(cmd) = f["trace"].as_str() {
                writeln!(out, "  {:<w$}  trace: {cmd}  (the kubelet's probe path)", "")?;
            }
        }
    }
    for m in &missing {
        match m["agent"].as_str() {
            Some(agent) => writeln!(out, "{}: NOT CHECKED — its agent at {agent} did not answer: {}", s(&m["node"]), s(&m["error"]))?,
            None => writeln!(out, "{}: NOT CHECKED — {}", s(&m["node"]), s(&m["error"]))?,
        }
    }
    if let Some(others) = r["other_clusters"].as_array().filter(|o| !o.is_empty()) {
        let names: Vec<String> = others.iter().map(s).collect();
        writeln!(out, "not checked: {} (pods hang off them, but no Node of the API is them: another cluster's)", names.join(", "))?;
    }
    match (r["api"].as_str(), r["no_api"].as_str()) {
        (Some(server), _) => writeln!(out, "checked against the Kubernetes API at {server}")?,
        (None, Some(why)) => writeln!(out, "local checks only: {why}")?,
        _ => {}
    }
    Ok(())
}
