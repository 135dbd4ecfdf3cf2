//! The node checks of this host, without a pair: every node namespace's own checks, and with the API
//! what flanneld should have written from the Node objects and the ConfigMap, the pods that are not
//! Ready, the cluster's own findings and the host's kubeconfigs. `cnitrace check` prints it; the agent
//! serves it (`/v1/check`).

use anyhow::{bail, Result};
use serde::Serialize;

use crate::{
    fix::node_checks::{self, NodeFinding},
    k8s::{self, ClusterFacts, KubeArgs},
    resolve::{self, HostResolver},
    state,
};

#[derive(Serialize)]
pub struct NodeReport {
    pub node: String,
    pub netns: String,
    pub findings: Vec<NodeFinding>,
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
                k8s::note_no_api(&e);
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
