//! The lab's cluster: two flannel nodes, their pods and an "internet", with the names the namespaces get.

use std::net::Ipv4Addr;

/// The pod network flannel manages (`Network` in flannel's net-conf.json).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// VXLAN as flannel's vxlan backend sets it up.
pub const VXLAN_VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;
pub const POD_MTU: u32 = 1450;
/// The external host ("the internet"): documentation range TEST-NET-2, lab-only.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const EXTERNAL_PORT: u16 = 80;
/// Node 0's uplink address towards the external host.
pub const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The external host's HTTPS (a certificate from the lab's own CA, `ca.pem` in the lab's state folder).
pub const EXTERNAL_TLS_PORT: u16 = 443;
/// The external host's name in the lab's DNS (`.test`: reserved, resolves nowhere else).
pub const EXTERNAL_NAME: &str = "external.cnitrace.test";
/// Pods serve HTTP here (jellyfin's port).
pub const HTTP_PORT: u16 = 8096;
/// The cluster's DNS, where CoreDNS would run: a pod of its own on the second node, served by dnsmasq,
/// named in every lab pod's `/etc/resolv.conf` as the kubelet writes it for `dnsPolicy: ClusterFirst`.
pub const DNS_POD: &str = "coredns";
pub const DNS_NODE: usize = 1;
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 53);
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The kubernetes Service's ClusterIP: a name the lab's DNS answers (nothing serves it: the lab has no
/// API server).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The Service network (kube-apiserver's `--service-cluster-ip-range`, kubeadm's default).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// A Service of namespace `default` with one TCP port, its NodePort, and the pods it selects.
pub struct ServiceSpec {
    pub name: &'static str,
    pub port_name: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: u16,
    pub target_port: u16,
    /// The pods it selects (by name): its endpoints while they are Ready.
    pub selects: &'static [&'static str],
}

/// jellyfin as users reach it, and web on the other node.
pub const SERVICES: [ServiceSpec; 2] = [
    ServiceSpec { name: "jellyfin", port_name: "http", cluster_ip: Ipv4Addr::new(10, 96, 12, 7), port: 8096, node_port: 30896, target_port: HTTP_PORT, selects: &["jellyfin"] },
    ServiceSpec { name: "web", port_name: "http", cluster_ip: Ipv4Addr::new(10, 96, 40, 10), port: 8096, node_port: 30810, target_port: HTTP_PORT, selects: &["web"] },
];

pub fn service(name: &str) -> Option<&'static ServiceSpec> {
    SERVICES.iter().find(|s| s.name == name)
}

pub struct NodeSpec {
    pub name: &'static str,
    /// The node's pod subnet: 10.244.N.0/24.
    pub subnet_octet: u8,
    /// Underlay address: TEST-NET-1, lab-only.
    pub underlay: Ipv4Addr,
    /// flannel.1's MAC (flannel records it in the node's `flannel.alpha.coreos.com/backend-data`).
    pub vtep_mac: &'static str,
}

impl NodeSpec {
    pub fn subnet(&self) -> String {
        format!("10.244.{}.0/24", self.subnet_octet)
    }
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet_octet, 1)
    }
    /// flannel.1's address: the subnet's network address as /32.
    pub fn vtep_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet_octet, 0)
    }
}

pub struct PodSpec {
    pub name: &'static str,
    /// Index into [`NODES`].
    pub node: usize,
    pub ip: Ipv4Addr,
    /// HTTP port served from inside the pod, if any.
    pub serves: Option<u16>,
}

pub const NODES: [NodeSpec; 2] = [
    NodeSpec {
        name: "storagenodet3500",
        subnet_octet: 0,
        underlay: Ipv4Addr::new(192, 0, 2, 1),
        vtep_mac: "0e:c1:7a:00:00:01",
    },
    NodeSpec {
        name: "storagenodet3501",
        subnet_octet: 1,
        underlay: Ipv4Addr::new(192, 0, 2, 2),
        vtep_mac: "0e:c1:7a:00:00:02",
    },
];

pub const PODS: [PodSpec; 3] = [
    PodSpec { name: "debug", node: 0, ip: Ipv4Addr::new(10, 244, 0, 20), serves: None },
    PodSpec { name: "jellyfin", node: 0, ip: Ipv4Addr::new(10, 244, 0, 19), serves: Some(HTTP_PORT) },
    PodSpec { name: "web", node: 1, ip: Ipv4Addr::new(10, 244, 1, 10), serves: Some(HTTP_PORT) },
];

/// A lab pod's `/etc/resolv.conf` (namespace `default`), as the kubelet writes it for ClusterFirst.
pub fn resolv_conf() -> String {
    format!("search default.svc.{d} svc.{d} {d}\nnameserver {DNS_IP}\noptions ndots:5\n", d = CLUSTER_DOMAIN)
}

/// The names the lab's DNS answers: the pods as headless Services of namespace `default`, the
/// kubernetes Service, the external host.
pub fn dns_records() -> Vec<(String, Ipv4Addr)> {
    let mut r: Vec<(String, Ipv4Addr)> = PODS.iter().map(|p| (format!("{}.default.svc.{CLUSTER_DOMAIN}", p.name), p.ip)).collect();
    r.push((format!("kubernetes.default.svc.{CLUSTER_DOMAIN}"), KUBERNETES_SERVICE_IP));
    for s in &SERVICES {
        r.push((format!("{}-svc.default.svc.{CLUSTER_DOMAIN}", s.name), s.cluster_ip));
    }
    r.push((EXTERNAL_NAME.to_string(), EXTERNAL_IP));
    r
}

/// A lab end as the fault catalog names it, made what `follow` takes: a pod's address, `svc/NAME` (its
/// ClusterIP:port), `nodeport/NAME` (storagenodet3500's uplink address and the Service's NodePort), or
/// `external` (the external host).
pub fn lab_target(name: &str) -> Option<String> {
    if let Some(s) = name.strip_prefix("svc/").and_then(service) {
        return Some(format!("{}:{}", s.cluster_ip, s.port));
    }
    if let Some(s) = name.strip_prefix("nodeport/").and_then(service) {
        return Some(format!("{UPLINK_IP}:{}", s.node_port));
    }
    if name == "external" {
        return Some(EXTERNAL_IP.to_string());
    }
    pod(name).map(|p| p.ip.to_string())
}

pub fn pod(name: &str) -> Option<&'static PodSpec> {
    PODS.iter().find(|p| p.name == name)
}

/// A lab prefix is a namespace-name part without `-pod-` in it: `<prefix>-pod-…` is then one lab's pods
/// only, whatever other labs run beside it.
pub fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !prefix.is_empty() && prefix.len() <= 40 && prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') && !prefix.contains("-pod-"),
        "lab prefix {prefix:?}: letters, digits, '-' and '_', at most 40, and no \"-pod-\" in it"
    );
    Ok(())
}

/// Namespace names of one lab, all under one prefix so `lab down` can find every piece.
#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Names { prefix: prefix.to_string() }
    }
    pub fn node(&self, i: usize) -> String {
        format!("{}-{}", self.prefix, NODES[i].name)
    }
    pub fn pod(&self, pod: &str) -> String {
        format!("{}-pod-{}", self.prefix, pod)
    }
    pub fn external(&self) -> String {
        format!("{}-external", self.prefix)
    }
    /// Is this namespace name one of this lab's?
    ///
    /// Exactly its own names: a lab under prefix `cnitrace` must not take `cnitrace-test-…` (another lab,
    /// a test's, on the same kernel) for its own — `lab down` once removed a running test's namespaces so.
    pub fn owns(&self, ns: &str) -> bool {
        (0..NODES.len()).any(|i| ns == self.node(i))
            || ns == self.external()
            || self.owns_pod(ns)
            || ns == control_plane_ns(&self.prefix)
            || ns == underlay_ns(&self.prefix)
    }
    /// Is this namespace one of this lab's pods (`<prefix>-pod-NAME`)? Unambiguous because no prefix
    /// holds `-pod-` ([`check_prefix`]).
    pub fn owns_pod(&self, ns: &str) -> bool {
        ns.strip_prefix(&format!("{}-pod-", self.prefix)).is_some_and(|name| !name.is_empty())
    }
    pub fn state_dir(&self) -> std::path::PathBuf {
        std::path::Path::new(super::STATE_ROOT).join(&self.prefix)
    }
}

/// The real cluster's control-plane namespace (`lab up --kubernetes`): etcd and the API server.
pub fn control_plane_ns(prefix: &str) -> String {
    format!("{prefix}-control-plane")
}

/// The real cluster's underlay switch namespace.
pub fn underlay_ns(prefix: &str) -> String {
    format!("{prefix}-underlay")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lab_owns_its_own_namespaces_not_those_of_a_longer_prefix() {
        let lab = Names::new("cnitrace");
        for ns in ["cnitrace-storagenodet3500", "cnitrace-storagenodet3501", "cnitrace-external", "cnitrace-pod-debug", "cnitrace-pod-coredns"] {
            assert!(lab.owns(ns), "{ns}");
        }
        let test = Names::new("cnitrace-test");
        for ns in ["cnitrace-test-storagenodet3500", "cnitrace-test-external", "cnitrace-test-pod-debug", "cnitrace-t19-k3s-agent", "cnitrace-pod"] {
            assert!(!lab.owns(ns), "{ns} is not lab cnitrace's");
        }
        assert!(test.owns("cnitrace-test-pod-web") && !test.owns("cnitrace-pod-web"));
        assert!(lab.owns("cnitrace-pod-my-pod-1"), "a pod's own name may hold -pod-");
        // A prefix that would make one lab's pods look like another's is refused.
        assert!(check_prefix("cnitrace-pod-x").is_err() && check_prefix("").is_err() && check_prefix("a b").is_err());
        assert!(check_prefix("cnitrace-t19").is_ok());
    }
}

