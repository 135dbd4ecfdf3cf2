//! `cnitrace check`: everything wrong on this host's nodes without a pair — the node checks, and with
//! the API what flanneld should have written from the Node objects and the ConfigMap — each finding
//! with its catalog cause and, where the finding alone implies it, the command that repairs it.

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;

use crate::{
    exit,
    fix::node_checks::{self, NodeFinding},
    k8s::{self, ClusterFacts, KubeArgs},
    resolve::{self, HostResolver},
    state,
};

#[derive(Args)]
pub struct CheckArgs {
    /// Only this node: its Kubernetes name, or its network namespace's name.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// One JSON object.
    #[arg(long)]
    json: bool,
    /// Ask the agent of NODE (`cnitrace agent`) at ADDR (unix:PATH) for that node's findings instead of
    /// looking here; repeat for every node. Asked in parallel, each within --agent-timeout; a node whose
    /// agent does not answer is reported as such.
    #[arg(long = "agent", value_name = "NODE=ADDR")]
    agents: Vec<String>,
    /// Seconds one agent may take to answer.
    #[arg(long, default_value = "10", value_name = "SECS")]
    agent_timeout: f64,
    #[command(flatten)]
    discovery: crate::agent::Discovery,
    /// Every node of the cluster, each through its agent (found through the API, as --agents): a node
    /// whose agent pod is missing or not Ready is reported as such, not waited on.
    #[arg(long)]
    all_nodes: bool,
}

#[derive(Serialize)]
pub struct NodeReport {
    pub node: String,
    pub netns: String,
    findings: Vec<NodeFinding>,
}

#[derive(Serialize)]
pub struct CheckReport {
    pub nodes: Vec<NodeReport>,
    /// Namespaces pods hang off that no Node of the API is: another cluster's on the same host (a
    /// second lab, kind, k3d). Named, not checked: their faults are not this cluster's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_clusters: Vec<String>,
    /// The API asked, or why none was.
    api: Option<String>,
    no_api: Option<String>,
    /// What the API did not say, each with its reason.
    api_missing: Vec<String>,
}

pub fn run(args: CheckArgs, kube: &KubeArgs) -> Result<u8> {
    if !args.agents.is_empty() || args.discovery.discover || args.all_nodes {
        return through_agents(&args, kube);
    }
    if !crate::sys::is_root() {
        bail!("`cnitrace check` needs root (it reads every network namespace's routes, neighbours and rules)");
    }
    let report = report(args.node.as_deref(), args.json, kube)?;
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
    let timeout = std::time::Duration::from_secs_f64(args.agent_timeout.max(0.1));
    let (agents, no_agent) = crate::agent::resolve_agents(&args.agents, args.discovery.discover, args.all_nodes, &args.discovery.agents_namespace, kube)?;
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

/// The findings of this host's nodes (`node`: only that one, by its Kubernetes or namespace name).
/// `quiet_api`: a missing API is only in the report (`no_api`), not said on stderr.
pub fn report(node: Option<&str>, quiet_api: bool, kube: &KubeArgs) -> Result<CheckReport> {
    let mut cluster = None;
    let (facts, no_api): (Option<ClusterFacts>, Option<String>) = match k8s::connect(kube) {
        Ok(mut c) => {
            let f = k8s::gather(&mut c, &[]);
            cluster = Some(c);
            (Some(f), None)
        }
        Err(e) => {
            // JSON carries the reason in `no_api`; a broken kubeconfig is said on stderr all the same.
            if !quiet_api || matches!(e, k8s::NoApi::BadConfig { .. }) {
                super::pair::note_no_api(&e);
            }
            (None, Some(e.to_string()))
        }
    };
    let resolver = HostResolver::scan()?;
    let names = facts.as_ref().map(|f| k8s::name_namespaces(f, &resolver)).unwrap_or_default();
    // A node is a namespace pods hang off (the root one on a real node; one per node in the lab, kind, k3d).
    let mut inodes: Vec<u32> = resolver.pods().iter().filter(|p| !p.host_addressed).map(|p| p.node.inode).collect();
    inodes.sort();
    inodes.dedup();
    // With the API's Node objects, this cluster's nodes are the namespaces they name; the rest belong to
    // another cluster on this host. (Without them every node of the host is checked.)
    let mut other_clusters = Vec::new();
    if facts.as_ref().is_some_and(|f| !f.nodes.is_empty()) {
        inodes.retain(|i| {
            let ours = names.contains_key(i);
            if !ours {
                other_clusters.extend(resolver.namespace(*i).map(|ns| ns.name.clone()));
            }
            ours
        });
    }
    let mut report = CheckReport { nodes: Vec::new(), other_clusters, api: facts.as_ref().map(|f| f.server.clone()), no_api, api_missing: facts.as_ref().map(|f| f.missing.clone()).unwrap_or_default() };
    for inode in inodes {
        let Some(ns) = resolver.namespace(inode) else { continue };
        let name = names.get(&inode).cloned().unwrap_or_else(|| resolve::display_ns(ns));
        if node.is_some_and(|want| want != name && want != ns.name) {
            continue;
        }
        let st = state::snapshot(ns)?;
        let mut findings = node_checks::check(&st, &name);
        if let Some(f) = &facts {
            findings.extend(node_checks::against_the_api(&st, &name, f));
        }
        if let (Some(c), true) = (cluster.as_mut(), names.contains_key(&inode)) {
            let (pods, missing) = node_checks::pods_not_ready(c, &name);
            findings.extend(pods);
            report.api_missing.extend(missing);
        }
        report.nodes.push(NodeReport { node: name, netns: ns.name.clone(), findings });
    }
    // This host's kubeconfigs: the node's well-known files and the one in use.
    if node.is_none() {
        let mut in_use: Vec<std::path::PathBuf> = kube.kubeconfig.iter().cloned().collect();
        if let Some(list) = std::env::var_os("KUBECONFIG") {
            in_use.extend(std::env::split_paths(&list));
        }
        if let Some(home) = std::env::var_os("HOME") {
            in_use.push(std::path::Path::new(&home).join(".kube/config"));
        }
        let now = std::time::SystemTime::now();
        let findings: Vec<NodeFinding> = k8s::kubeconfig::files(&in_use)
            .iter()
            .flat_map(|f| k8s::kubeconfig::check(f, now))
            .map(|(cause, what)| NodeFinding { node: "kubeconfigs".into(), cause, what, fix: None, trace: None })
            .collect();
        if !findings.is_empty() {
            report.nodes.push(NodeReport { node: "kubeconfigs".into(), netns: String::new(), findings });
        }
    }
    // The cluster's own findings, once, with the host's nodes (not with --node: they are no node's).
    if let (Some(f), None) = (&facts, node) {
        let cluster = node_checks::cluster_findings(f);
        if !cluster.is_empty() {
            report.nodes.push(NodeReport { node: "cluster".into(), netns: String::new(), findings: cluster });
        }
    }
    if let Some(want) = node {
        if report.nodes.is_empty() {
            bail!("no node {want:?} on this host (a node is a network namespace pods hang off)");
        }
    }
    report.api_missing.dedup();
    if !report.api_missing.is_empty() {
        eprintln!("cnitrace: from the Kubernetes API, not known: {}; the local checks go on", report.api_missing.join("; "));
    }
    Ok(report)
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
