//! The two ends of a trace as the user named them (addresses or pods), made addresses; and what the
//! Kubernetes API knows about them, when it answers.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use crate::k8s::{self, ApiError, ClusterFacts, KubeArgs, PodFacts, Target};

pub struct Pair {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The destination's port, when it was named as a Service (`svc/NAME[:PORT]`).
    pub dst_port: Option<u16>,
    pub cluster: Option<ClusterFacts>,
}

/// Parses both ends; asks the API for pods given by name (required then) and for the names and flannel
/// facts of the rest (optional: without an API, one line on stderr and the local work goes on).
pub fn resolve(src: &str, dst: &str, kube: &KubeArgs) -> Result<Pair> {
    if matches!(Target::parse(src, "source")?, Target::Service { .. }) {
        bail!("source {src:?} is a Service: traffic starts in a pod (or a node); give one");
    }
    let (ends, cluster) = resolve_ends(&[(src, "source"), (dst, "destination")], kube)?;
    Ok(Pair { src: ends[0].0, dst: ends[1].0, dst_port: ends[1].1, cluster })
}

/// Each `(text, role)` made an address (in order), with what the API knows about them all.
pub fn resolve_all(targets: &[(&str, &str)], kube: &KubeArgs) -> Result<(Vec<Ipv4Addr>, Option<ClusterFacts>)> {
    let (ends, cluster) = resolve_ends(targets, kube)?;
    Ok((ends.into_iter().map(|(ip, _)| ip).collect(), cluster))
}

/// Each `(text, role)` made an address and, for a Service, its port.
fn resolve_ends(targets: &[(&str, &str)], kube: &KubeArgs) -> Result<(Vec<(Ipv4Addr, Option<u16>)>, Option<ClusterFacts>)> {
    let parsed: Vec<Target> = targets.iter().map(|(t, role)| Target::parse(t, role)).collect::<Result<_>>()?;
    let mut cluster = match k8s::connect(kube) {
        Ok(c) => Some(c),
        Err(e) => {
            if let Some(named) = parsed.iter().find(|t| t.is_name()) {
                bail!("{named} needs the Kubernetes API to find the pod: {e}");
            }
            k8s::note_no_api(&e);
            None
        }
    };
    let mut known = Vec::new();
    let mut services = Vec::new();
    let mut ip_of = |t: &Target, cluster: &mut Option<k8s::Cluster>| -> Result<(Ipv4Addr, Option<u16>)> {
        match t {
            Target::Ip(ip) => Ok((*ip, None)),
            Target::Service { namespace, name, port } => {
                let c = cluster.as_mut().expect("connected when a name is given");
                let ns = namespace.clone().or_else(|| kube.namespace.clone()).unwrap_or_else(|| c.default_namespace.clone());
                let svc = c.service(&ns, name).map_err(|e| anyhow::anyhow!("cannot find service {ns}/{name}: {e}"))?;
                let Some(ip) = svc.cluster_ip else { bail!("service {ns}/{name} has no ClusterIP (headless, or ExternalName): follow one of its pods") };
                let p = svc.port(port.as_deref()).ok_or_else(|| {
                    let have = svc.ports.iter().map(|p| format!("{}{}", p.name.as_ref().map(|n| format!("{n}=")).unwrap_or_default(), p.port)).collect::<Vec<_>>().join(", ");
                    match port {
                        Some(want) => anyhow::anyhow!("service {ns}/{name} has no port {want} (it has {have})"),
                        None => anyhow::anyhow!("service {ns}/{name} has several ports ({have}): name one, svc/{name}:PORT"),
                    }
                })?;
                let port = p.port;
                services.push(svc);
                Ok((ip, Some(port)))
            }
            Target::Pod { namespace, name } => {
                let c = cluster.as_mut().expect("connected when a name is given");
                let ns = namespace.clone().or_else(|| kube.namespace.clone()).unwrap_or_else(|| c.default_namespace.clone());
                let pod = c.pod(&ns, name).map_err(|e| match e {
                    ApiError::NoApi(why) => anyhow::anyhow!("cannot find pod {ns}/{name}: {why}"),
                    other => anyhow::anyhow!("{other}"),
                })?;
                let ip = pod_ip(&pod)?;
                known.push(pod);
                Ok((ip, None))
            }
            Target::Node { name } => {
                let c = cluster.as_mut().expect("connected when a name is given");
                let nodes = c.nodes().map_err(|e| anyhow::anyhow!("cannot find node {name}: {e}"))?;
                let node = nodes.iter().find(|n| n.name == *name).ok_or_else(|| anyhow::anyhow!("node {name} not found"))?;
                node_address(node).map(|a| (a, None))
            }
        }
    };
    let ends: Vec<(Ipv4Addr, Option<u16>)> = parsed.iter().map(|t| ip_of(t, &mut cluster)).collect::<Result<_>>()?;
    let ips: Vec<Ipv4Addr> = ends.iter().map(|(ip, _)| *ip).collect();
    let facts = cluster.as_mut().map(|c| {
        let mut f = k8s::gather(c, &ips);
        for s in services.drain(..) {
            if !f.services.iter().any(|t| t.namespace == s.namespace && t.name == s.name) {
                f.services.push(s);
            }
        }
        for p in known.drain(..) {
            if !f.pods.iter().any(|q| q.namespace == p.namespace && q.name == p.name) {
                f.pods.push(p);
            }
        }
        if !f.missing.is_empty() {
            eprintln!("cnitrace: from the Kubernetes API, not known: {}; the local diagnosis goes on", f.missing.join("; "));
        }
        f
    });
    Ok((ends, facts))
}

/// The address a node talks to its pods from, on this host: its bridge's address in its pod network
/// (the source the kernel picks for the kubelet's probes), else its InternalIP where this host holds it.
fn node_address(node: &k8s::NodeFacts) -> Result<Ipv4Addr> {
    let resolver = crate::resolve::HostResolver::scan()?;
    let held = |want: &dyn Fn(&crate::state::Link, Ipv4Addr) -> bool| {
        resolver.spaces().iter().find_map(|(_, st)| st.addrs.iter().find(|a| st.link(a.ifindex).is_some_and(|l| want(l, a.addr))).map(|a| a.addr))
    };
    if let Some(a) = held(&|l, a| l.kind == "bridge" && node.holds_pod_ip(a)) {
        return Ok(a);
    }
    if let Some(a) = node.internal_ip.and_then(|ip| held(&|_, a| a == ip)) {
        return Ok(a);
    }
    bail!(
        "node {} is not this host: none of its addresses is here (pod network {}, InternalIP {}); run cnitrace on that node",
        node.name,
        node.pod_cidrs.join(", "),
        node.internal_ip.map(|i| i.to_string()).unwrap_or_else(|| "unknown".into())
    )
}

fn pod_ip(p: &PodFacts) -> Result<Ipv4Addr> {
    match p.ip {
        Some(ip) => Ok(ip),
        None => bail!("pod {} has no IPv4 address yet (phase {}{})", p.full_name(), p.phase, p.node.as_ref().map(|n| format!(", node {n}")).unwrap_or_default()),
    }
}

