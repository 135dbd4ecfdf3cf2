//! The cluster's agents, found and reached through the API: the DaemonSet's pods (by the labels
//! `cnitrace deploy` gives them), one per node, each reached through the API server's port-forward to
//! its pod — what `kubectl port-forward` does. So who may trace a node is who may create
//! `pods/portforward` on its agent (the `cnitrace-tracer` Role), and the agent listens on nothing the
//! pod network reaches (its own pod's loopback).
//!
//! Each agent gets a local end in this process (127.0.0.1, a port the kernel picks) served by a
//! background thread; every connection to it is one port-forward stream to the agent's port. The rest of
//! the CLI talks to that end as to any agent address ([`Addr::Forwarded`]).

use std::{net::SocketAddr, time::Duration};

use anyhow::{anyhow, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use super::{ApiError, Cluster, KubeArgs, PodFacts};
use crate::transport::Addr;

/// The labels of the agents' pods (see [`crate::deploy`]).
pub const SELECTOR: &str = "app.kubernetes.io/name=cnitrace,app.kubernetes.io/component=agent";

/// How long opening one port-forward may take before the agent is said unreachable.
const OPEN: Duration = Duration::from_secs(5);

/// What discovery found: the agents to ask, and the nodes that have none to ask, with why.
#[derive(Debug, Default)]
pub struct Found {
    pub agents: Vec<(String, Addr)>,
    pub missing: Vec<(String, String)>,
}

impl Cluster {
    /// The agents' pods in `namespace`, with their nodes.
    pub fn agent_pods(&mut self, namespace: &str) -> Result<Vec<PodFacts>, ApiError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let lp = ListParams::default().labels(SELECTOR);
        let list = self.call(&format!("list the agents' pods in {namespace}"), async move { api.list(&lp).await })?;
        Ok(list.items.iter().map(PodFacts::of).collect())
    }
}

/// Finds the agents through the API (`namespace`: where `cnitrace deploy` put them) and opens a
/// port-forward to each Ready one. `all_nodes`: every node of the cluster is expected to have one, and a
/// node without is reported missing. An agent pod that is not Ready, or that the API does not forward
/// to (RBAC, the pod gone), is missing with the reason, never waited on.
pub fn discover(kube: &KubeArgs, namespace: &str, all_nodes: bool, port: u16) -> Result<Found> {
    let mut c = super::connect(kube).map_err(|e| anyhow!("finding the agents needs the Kubernetes API: {e}"))?;
    let pods = c.agent_pods(namespace).map_err(|e| anyhow!("{e}"))?;
    let mut found = Found::default();
    let mut ready = Vec::new();
    for p in &pods {
        let Some(node) = p.node.clone() else { continue };
        if p.ready {
            ready.push((node, p.name.clone()));
        } else {
            let why = p.waiting.as_deref().map(|w| format!(", {w}")).unwrap_or_default();
            found.missing.push((node, format!("its agent pod {namespace}/{} is not Ready ({}{why})", p.name, p.phase)));
        }
    }
    if all_nodes {
        let nodes = c.nodes().map_err(|e| anyhow!("{e}"))?;
        for n in nodes {
            if !pods.iter().any(|p| p.node.as_deref() == Some(n.name.as_str())) {
                found.missing.push((
                    n.name.clone(),
                    format!("no agent pod on it (is `cnitrace deploy` applied in namespace {namespace}, and does the DaemonSet tolerate the node's taints?)"),
                ));
            }
        }
    }
    if ready.is_empty() {
        if pods.is_empty() {
            found.missing.sort();
            if !all_nodes {
                anyhow::bail!("no cnitrace agent pods in namespace {namespace} (deploy them: cnitrace deploy | kubectl apply -f -)");
            }
        }
        return Ok(found);
    }
    let names: Vec<String> = ready.iter().map(|(_, p)| p.clone()).collect();
    let opened = forward(kube, namespace, &names, port)?;
    for ((node, pod), end) in ready.into_iter().zip(opened) {
        match end {
            Ok(local) => found.agents.push((node, Addr::Forwarded { local, pod: format!("{namespace}/{pod}") })),
            Err(why) => found.missing.push((node, format!("its agent pod {namespace}/{pod}: {why}"))),
        }
    }
    found.missing.sort();
    Ok(found)
}

/// One local end per pod, each a port-forward to `port` of that pod, served until this process ends.
/// A pod the API does not forward to (checked once here, by opening one stream) gets the reason instead.
pub fn forward(kube: &KubeArgs, namespace: &str, pods: &[String], port: u16) -> Result<Vec<Result<SocketAddr, String>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (kube, namespace, pods) = (kube.clone(), namespace.to_string(), pods.to_vec());
    std::thread::Builder::new()
        .name("port-forward".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return drop(tx.send(Err(anyhow!("a runtime for the port-forwards: {e}")))),
            };
            rt.block_on(async move {
                let client = match client(&kube).await {
                    Ok(c) => c,
                    Err(e) => return drop(tx.send(Err(e))),
                };
                let api: Api<Pod> = Api::namespaced(client, &namespace);
                let mut ends = Vec::new();
                let mut serving = Vec::new();
                for pod in &pods {
                    match open(&api, pod, port).await {
                        Err(e) => ends.push(Err(e)),
                        Ok(()) => match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                            Ok(l) => {
                                ends.push(l.local_addr().map_err(|e| e.to_string()));
                                serving.push(tokio::spawn(serve(l, api.clone(), pod.clone(), port)));
                            }
                            Err(e) => ends.push(Err(format!("a local port for its port-forward: {e}"))),
                        },
                    }
                }
                let _ = tx.send(Ok(ends));
                for s in serving {
                    let _ = s.await;
                }
            });
        })
        .context("start the port-forward thread")?;
    rx.recv().context("the port-forward thread ended")?
}

/// A client like [`super::connect`]'s, without its read timeout: a port-forward stream may rightly be
/// quiet for longer than any one API request (a trace waiting for packets).
async fn client(kube: &KubeArgs) -> Result<kube::Client> {
    let (mut config, _) = super::config(kube).await.map_err(|e| anyhow!("{e}"))?;
    config.read_timeout = None;
    config.write_timeout = None;
    kube::Client::try_from(config).context("a client for the port-forwards")
}

/// One port-forward opened and closed: the API lets us, and the pod is there.
async fn open(api: &Api<Pod>, pod: &str, port: u16) -> Result<(), String> {
    match tokio::time::timeout(OPEN, api.portforward(pod, &[port])).await {
        Err(_) => Err(format!("the API server did not open a port-forward within {} s", OPEN.as_secs())),
        Ok(Err(kube::Error::Api(s))) if s.code == 403 => Err(format!("port-forward forbidden ({}): who may trace a node is who may create pods/portforward on its agent", s.message)),
        Ok(Err(e)) => Err(format!("port-forward refused: {e}")),
        Ok(Ok(pf)) => {
            pf.abort();
            Ok(())
        }
    }
}

/// Every connection to `l`: a new port-forward stream to the pod, bytes copied both ways until either
/// side ends.
async fn serve(l: tokio::net::TcpListener, api: Api<Pod>, pod: String, port: u16) {
    loop {
        let Ok((mut local, _)) = l.accept().await else { continue };
        let (api, pod) = (api.clone(), pod.clone());
        tokio::spawn(async move {
            let Ok(Ok(mut pf)) = tokio::time::timeout(OPEN, api.portforward(&pod, &[port])).await else { return };
            let Some(mut upstream) = pf.take_stream(port) else { return };
            let _ = tokio::io::copy_bidirectional(&mut local, &mut upstream).await;
            drop(upstream);
            pf.abort();
        });
    }
}
