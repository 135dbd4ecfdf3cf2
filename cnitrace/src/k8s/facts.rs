//! What the API says, reduced to what a diagnosis uses; serialisable, so a recording replays with the
//! same names and the same evidence without the API.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use serde::{Deserialize, Serialize};

use crate::state::in_prefix;

/// flannel's annotations on a Node (written by flanneld when it registers the node's lease).
pub const ANN_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const ANN_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const ANN_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub phase: String,
    pub ready: bool,
    pub host_network: bool,
    /// `app.kubernetes.io/name` / `app` / `k8s-app` label: flannel's and kube-proxy's pods are found by it.
    #[serde(default)]
    pub app: Option<String>,
    /// Why a container waits (`CrashLoopBackOff`, `ImagePullBackOff`...), the first that does.
    #[serde(default)]
    pub waiting: Option<String>,
    /// Restarts of all its containers together.
    #[serde(default)]
    pub restarts: u32,
    /// Its containers' names (logs are read per container).
    #[serde(default)]
    pub containers: Vec<String>,
    /// Its controller, `Kind/name` (`DaemonSet/kube-flannel-ds`).
    #[serde(default)]
    pub owner: Option<String>,
    /// The last line its (crashed) container wrote, read for a node daemon (kube-proxy, flannel) that is
    /// not Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_log: Option<String>,
    /// A node daemon's (hostNetwork pod's) first container's command line, command then args, as its
    /// spec gives them: the flags flanneld runs with (`--ip-masq`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

impl PodFacts {
    pub fn of(p: &Pod) -> PodFacts {
        let spec = p.spec.as_ref();
        let status = p.status.as_ref();
        let labels = p.metadata.labels.as_ref();
        PodFacts {
            namespace: p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: p.metadata.name.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            ip: status.and_then(|s| s.pod_ip.as_deref()).and_then(|s| s.parse().ok()),
            phase: status.and_then(|s| s.phase.clone()).unwrap_or_else(|| "Unknown".into()),
            ready: ready(status.and_then(|s| s.conditions.as_ref()).map(|c| c.iter().map(|c| (c.type_.as_str(), c.status.as_str())))),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            app: labels.and_then(|l| ["app.kubernetes.io/name", "app", "k8s-app"].iter().find_map(|k| l.get(*k).cloned())),
            waiting: status
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.iter().find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())),
            restarts: status.and_then(|s| s.container_statuses.as_ref()).map(|cs| cs.iter().map(|c| c.restart_count.max(0) as u32).sum()).unwrap_or(0),
            containers: spec.map(|s| s.containers.iter().map(|c| c.name.clone()).collect()).unwrap_or_default(),
            owner: p
                .metadata
                .owner_references
                .as_ref()
                .and_then(|o| o.iter().find(|r| r.controller == Some(true)).or(o.first()))
                .map(|r| format!("{}/{}", r.kind, r.name)),
            last_log: None,
            command: spec
                .filter(|s| s.host_network == Some(true))
                .and_then(|s| s.containers.first())
                .map(|c| c.command.iter().flatten().chain(c.args.iter().flatten()).cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// Does its command line set the boolean flag `flag` (Go's flag syntax: `-f`, `--f`, `--f=true`)?
    /// None when the command line is not known.
    pub fn flag_set(&self, flag: &str) -> Option<bool> {
        if self.command.is_empty() {
            return None;
        }
        let mut set = false;
        for a in &self.command {
            let a = a.trim_start_matches('-');
            match a.split_once('=') {
                None if a == flag => set = true,
                Some((f, v)) if f == flag => set = matches!(v, "true" | "1" | "t" | "T" | "TRUE" | "True"),
                _ => {}
            }
        }
        Some(set)
    }

    /// Its state in the words `kubectl get pods` uses: the waiting reason, else the phase, and Ready or not.
    pub fn state(&self) -> String {
        let what = self.waiting.clone().unwrap_or_else(|| self.phase.clone());
        let restarts = if self.restarts > 0 { format!(", {} restarts", self.restarts) } else { String::new() };
        format!("{what}{}{restarts}", if self.ready { ", Ready" } else { ", not Ready" })
    }

    /// `namespace/name`, as kubectl and every output of cnitrace name a pod.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeFacts {
    pub name: String,
    /// `spec.podCIDRs` (or `spec.podCIDR`), as written.
    pub pod_cidrs: Vec<String>,
    pub internal_ip: Option<Ipv4Addr>,
    /// `kubernetes.io/os`.
    pub os: Option<String>,
    pub ready: bool,
    pub flannel_backend: Option<String>,
    /// The VXLAN device's MAC flanneld registered (`backend-data` {"VNI":…, "VtepMAC":…}).
    pub vtep_mac: Option<String>,
    pub vtep_vni: Option<u32>,
    /// The address other nodes send the overlay to.
    pub public_ip: Option<Ipv4Addr>,
}

impl NodeFacts {
    pub fn of(n: &Node) -> NodeFacts {
        let ann = n.metadata.annotations.clone().unwrap_or_default();
        let spec = n.spec.as_ref();
        let mut pod_cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if let Some(c) = spec.and_then(|s| s.pod_cidr.clone()) {
            if !pod_cidrs.contains(&c) {
                pod_cidrs.insert(0, c);
            }
        }
        let data: Option<serde_json::Value> = ann.get(ANN_BACKEND_DATA).and_then(|d| serde_json::from_str(d).ok());
        NodeFacts {
            name: n.metadata.name.clone().unwrap_or_default(),
            pod_cidrs,
            internal_ip: n
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP").and_then(|a| a.address.parse().ok())),
            os: n.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/os").cloned()),
            ready: ready(n.status.as_ref().and_then(|s| s.conditions.as_ref()).map(|c| c.iter().map(|c| (c.type_.as_str(), c.status.as_str())))),
            flannel_backend: ann.get(ANN_BACKEND_TYPE).cloned(),
            vtep_mac: data.as_ref().and_then(|d| d.get("VtepMAC")).and_then(|v| v.as_str()).map(str::to_string),
            vtep_vni: data.as_ref().and_then(|d| d.get("VNI")).and_then(|v| v.as_u64()).map(|v| v as u32),
            public_ip: ann.get(ANN_PUBLIC_IP).and_then(|s| s.parse().ok()),
        }
    }

    /// The node's IPv4 pod networks.
    pub fn pod_nets(&self) -> Vec<(Ipv4Addr, u8)> {
        self.pod_cidrs.iter().filter_map(|c| parse_cidr(c)).collect()
    }

    /// Is `ip` in one of this node's pod networks?
    pub fn holds_pod_ip(&self, ip: Ipv4Addr) -> bool {
        self.pod_nets().iter().any(|(net, len)| in_prefix(ip, *net, *len))
    }
}

/// A `Ready` condition that is `True` among (type, status) pairs (pods and nodes say it alike).
fn ready<'a>(conditions: Option<impl Iterator<Item = (&'a str, &'a str)>>) -> bool {
    conditions.is_some_and(|mut c| c.any(|(t, s)| t == "Ready" && s == "True"))
}

pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, l) = s.split_once('/')?;
    let len: u8 = l.parse().ok().filter(|l| *l <= 32)?;
    Some((a.parse().ok()?, len))
}

/// flannel's `net-conf.json` (the ConfigMap's key), the parts a diagnosis uses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConf {
    /// Where it was read: `namespace/name`.
    pub source: String,
    pub network: Option<String>,
    pub backend_type: Option<String>,
    /// flannel's defaults when absent: VNI 1, port 8472 (the kernel's default would be 4789 otherwise).
    pub vni: u32,
    pub port: u16,
    pub direct_routing: bool,
    /// The JSON as written, for evidence and for a journal that must restore it.
    pub raw: String,
}

impl NetConf {
    pub fn of(cm: &ConfigMap, namespace: &str) -> Option<NetConf> {
        let raw = cm.data.as_ref()?.get("net-conf.json")?.clone();
        let mut c = NetConf::parse(&raw)?;
        c.source = format!("{namespace}/{}", cm.metadata.name.clone().unwrap_or_default());
        Some(c)
    }

    /// Parses net-conf.json; None when it is not JSON at all.
    pub fn parse(raw: &str) -> Option<NetConf> {
        let v: serde_json::Value = serde_json::from_str(raw).ok()?;
        let backend = v.get("Backend");
        let get_u64 = |k: &str| backend.and_then(|b| b.get(k)).and_then(|x| x.as_u64());
        Some(NetConf {
            source: String::new(),
            network: v.get("Network").and_then(|x| x.as_str()).map(str::to_string),
            backend_type: backend.and_then(|b| b.get("Type")).and_then(|x| x.as_str()).map(str::to_string),
            vni: get_u64("VNI").map(|x| x as u32).unwrap_or(1),
            port: get_u64("Port").map(|x| x as u16).unwrap_or(8472),
            direct_routing: backend.and_then(|b| b.get("DirectRouting")).and_then(|x| x.as_bool()).unwrap_or(false),
            raw: raw.to_string(),
        })
    }
}

/// Everything one command learned from the API, and what it could not learn (each with its reason).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterFacts {
    pub server: String,
    pub nodes: Vec<NodeFacts>,
    pub pods: Vec<PodFacts>,
    pub flannel: Option<NetConf>,
    pub missing: Vec<String>,
    /// Services the trace went to (by ClusterIP), with the pods their selectors match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceFacts>,
}

/// A Service as the API has it, and the pods its selector matches (Ready or not: its endpoints are the
/// Ready ones).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceFacts {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePortFacts>,
    /// `k=v` pairs; empty: a Service without a selector (its endpoints are managed by hand).
    pub selector: Vec<(String, String)>,
    pub selected: Vec<PodFacts>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServicePortFacts {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
    pub node_port: Option<u16>,
}

impl ServiceFacts {
    pub fn of(s: &Service) -> ServiceFacts {
        let spec = s.spec.as_ref();
        ServiceFacts {
            namespace: s.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: s.metadata.name.clone().unwrap_or_default(),
            cluster_ip: spec.and_then(|s| s.cluster_ip.as_deref()).and_then(|ip| ip.parse().ok()),
            ports: spec
                .and_then(|s| s.ports.as_ref())
                .map(|ps| {
                    ps.iter()
                        .map(|p| ServicePortFacts {
                            name: p.name.clone(),
                            port: p.port.clamp(0, 65535) as u16,
                            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                            node_port: p.node_port.map(|n| n.clamp(0, 65535) as u16),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            selector: spec.and_then(|s| s.selector.as_ref()).map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default(),
            selected: Vec::new(),
        }
    }

    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The port `want` names (its name or number); the only one when none is named.
    pub fn port(&self, want: Option<&str>) -> Option<&ServicePortFacts> {
        match want {
            Some(w) => self.ports.iter().find(|p| p.name.as_deref() == Some(w) || p.port.to_string() == w),
            None if self.ports.len() == 1 => self.ports.first(),
            None => None,
        }
    }

    /// `app=jellyfin,tier=media`
    pub fn selector_text(&self) -> String {
        self.selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }
}

impl ClusterFacts {
    /// The pod (not host-network) with this address.
    pub fn pod_with_ip(&self, ip: Ipv4Addr) -> Option<&PodFacts> {
        self.pods.iter().find(|p| p.ip == Some(ip) && !self.host_addressed(p))
    }

    /// Does the pod have its node's address — a hostNetwork pod (flanneld's, kube-proxy's), whether or
    /// not its spec says so? Such a pod is its node's, never a name for the node or its namespace.
    pub fn host_addressed(&self, p: &PodFacts) -> bool {
        p.host_network || p.ip.is_some_and(|ip| self.nodes.iter().any(|n| n.internal_ip == Some(ip)))
    }

    /// The node whose pod network holds `ip`.
    pub fn node_for_pod_ip(&self, ip: Ipv4Addr) -> Option<&NodeFacts> {
        self.nodes.iter().find(|n| n.holds_pod_ip(ip))
    }

    /// flannel's pod on a node (its DaemonSet's), Running.
    pub fn flannel_pod_on(&self, node: &str) -> Option<&PodFacts> {
        self.pods.iter().find(|p| p.app.as_deref() == Some("flannel") && p.node.as_deref() == Some(node) && p.phase == "Running")
    }

    pub fn node(&self, name: &str) -> Option<&NodeFacts> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The Service with this ClusterIP.
    pub fn service_with_ip(&self, ip: Ipv4Addr) -> Option<&ServiceFacts> {
        self.services.iter().find(|s| s.cluster_ip == Some(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_conf_takes_flannels_defaults_where_the_backend_is_silent() {
        let c = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#).unwrap();
        assert_eq!((c.network.as_deref(), c.backend_type.as_deref(), c.vni, c.port, c.direct_routing), (Some("10.244.0.0/16"), Some("vxlan"), 1, 8472, false));
        let c = NetConf::parse(r#"{"Network": "10.42.0.0/16", "Backend": {"Type": "vxlan", "VNI": 4096, "Port": 4789, "DirectRouting": true}}"#).unwrap();
        assert_eq!((c.vni, c.port, c.direct_routing), (4096, 4789, true));
        assert!(NetConf::parse("Network: 10.0.0.0/8").is_none());
    }

    #[test]
    fn a_node_reads_its_flannel_annotations_and_pod_networks() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "w1", "labels": {"kubernetes.io/os": "linux"}, "annotations": {
                ANN_BACKEND_TYPE: "vxlan",
                ANN_BACKEND_DATA: "{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:00:00:01\"}",
                ANN_PUBLIC_IP: "192.168.56.11"}},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "Hostname", "address": "w1"}, {"type": "InternalIP", "address": "192.168.56.11"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let f = NodeFacts::of(&n);
        assert_eq!(f.pod_cidrs, ["10.244.1.0/24"]);
        assert_eq!((f.vtep_mac.as_deref(), f.vtep_vni, f.public_ip), (Some("aa:bb:cc:00:00:01"), Some(1), Some(Ipv4Addr::new(192, 168, 56, 11))));
        assert!(f.ready && f.holds_pod_ip(Ipv4Addr::new(10, 244, 1, 9)) && !f.holds_pod_ip(Ipv4Addr::new(10, 244, 0, 9)));
        assert_eq!(f.internal_ip, Some(Ipv4Addr::new(192, 168, 56, 11)));
    }
}
