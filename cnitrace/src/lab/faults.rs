//! The fault catalog: each fault breaks exactly one thing, the way it breaks on real nodes, and names the
//! cause `follow` must report for it and the lab paths it must break (the rest must keep working).

use cnitrace_tools as tools;
use anyhow::Result;

use super::{
    check::PathId::{self, *},
    services,
    topology::NODES,
    ip, sysctl, Lab,
};
use crate::sys;

pub struct Fault {
    pub name: &'static str,
    /// The cause id of `follow`'s catalog this fault produces.
    pub cause: &'static str,
    pub summary: &'static str,
    /// The lab paths this fault breaks; every other path keeps working.
    pub breaks: &'static [PathId],
    /// The (source pod, destination pod) pair that shows it best.
    pub pair: (&'static str, &'static str),
    apply: fn(&Lab) -> Result<()>,
}

impl Fault {
    pub fn apply(&self, lab: &Lab) -> Result<()> {
        (self.apply)(lab)
    }
}

/// The seed's incident: debug cannot reach jellyfin on the same node, "Destination Host Unreachable".
pub const SEED_FAULT: &str = "veth-detached";

pub fn find(name: &str) -> Option<&'static Fault> {
    FAULTS.iter().chain(SERVICE_FAULTS).find(|f| f.name == name)
}

fn bridge(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    sys::run(&tools::BRIDGE, &full).map(|_| ())
}


const SAME: (&str, &str) = ("debug", "jellyfin");
const CROSS: (&str, &str) = ("debug", "web");

pub static FAULTS: &[Fault] = &[
    Fault {
        name: "bridge-down",
        cause: "bridge-down",
        summary: "cni0 is administratively down on storagenodet3500",
        breaks: &[SameNode, CrossNode, External, CrossNodeFullMtu, DestinationCrossNode],
        pair: SAME,
        apply: |lab| ip(&lab.node_ns(0), &["link", "set", "cni0", "down"]),
    },
    Fault {
        name: "veth-down-host",
        cause: "veth-down",
        summary: "the host end of jellyfin's veth is down",
        breaks: &[SameNode, DestinationCrossNode],
        pair: SAME,
        apply: |lab| ip(&lab.node_ns(0), &["link", "set", lab.host_veth("jellyfin")?, "down"]),
    },
    Fault {
        name: "veth-down-pod",
        cause: "veth-down",
        summary: "jellyfin's eth0 (the pod end of its veth) is down",
        breaks: &[SameNode, DestinationCrossNode],
        pair: SAME,
        apply: |lab| ip(&lab.pod_ns("jellyfin"), &["link", "set", "eth0", "down"]),
    },
    Fault {
        name: "veth-detached",
        cause: "veth-detached",
        summary: "jellyfin's host veth is no longer a port of cni0 (what deleting cni0 leaves behind)",
        breaks: &[SameNode, DestinationCrossNode],
        pair: SAME,
        apply: |lab| ip(&lab.node_ns(0), &["link", "set", lab.host_veth("jellyfin")?, "nomaster"]),
    },
    Fault {
        name: "veth-wrong-bridge",
        cause: "veth-wrong-bridge",
        summary: "jellyfin's host veth is a port of another bridge (docker0)",
        breaks: &[SameNode, DestinationCrossNode],
        pair: SAME,
        apply: |lab| {
            let node = lab.node_ns(0);
            ip(&node, &["link", "add", "docker0", "type", "bridge"])?;
            ip(&node, &["link", "set", "docker0", "up"])?;
            ip(&node, &["link", "set", lab.host_veth("jellyfin")?, "master", "docker0"])
        },
    },
    Fault {
        name: "bridge-port-blocked",
        cause: "bridge-port-blocked",
        summary: "cni0's port for jellyfin is not forwarding (port state disabled)",
        breaks: &[SameNode, DestinationCrossNode],
        pair: SAME,
        apply: |lab| bridge(&lab.node_ns(0), &["link", "set", "dev", lab.host_veth("jellyfin")?, "state", "0"]),
    },
    Fault {
        name: "bridge-ip-conflict",
        cause: "bridge-ip-conflict",
        summary: "cni0 holds 10.88.0.1/16 instead of the pods' gateway 10.244.0.1/24 (new pods fail too)",
        breaks: &[CrossNode, External, CrossNodeFullMtu, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| {
            let node = lab.node_ns(0);
            ip(&node, &["addr", "del", "10.244.0.1/24", "dev", "cni0"])?;
            ip(&node, &["addr", "add", "10.88.0.1/16", "dev", "cni0"])
        },
    },
    Fault {
        name: "forward-policy-drop",
        cause: "netfilter-policy-drop",
        summary: "br_netfilter on and FORWARD policy DROP (what Docker does), no accept for the pod network",
        breaks: &[SameNode, CrossNode, External, CrossNodeFullMtu, DestinationCrossNode],
        pair: SAME,
        apply: |lab| {
            let node = lab.node_ns(0);
            sysctl(&node, "net.bridge.bridge-nf-call-iptables", "1")?;
            sys::run_in(&node, &tools::IPTABLES_NFT, &["-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"])?;
            sys::run_in(&node, &tools::IPTABLES_NFT, &["-P", "FORWARD", "DROP"]).map(|_| ())
        },
    },
    Fault {
        name: "iptables-drop",
        cause: "netfilter-rule-drop",
        summary: "an explicit iptables DROP rule in FORWARD for traffic to storagenodet3501's pods",
        breaks: &[CrossNode, CrossNodeFullMtu, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| {
            sys::run_in(&lab.node_ns(0), &tools::IPTABLES_NFT, &["-I", "FORWARD", "1", "-d", "10.244.1.0/24", "-j", "DROP"]).map(|_| ())
        },
    },
    Fault {
        name: "nft-drop",
        cause: "netfilter-rule-drop",
        summary: "an explicit native nftables drop rule in a forward hook for storagenodet3501's pods",
        breaks: &[CrossNode, CrossNodeFullMtu, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| {
            sys::run_in_stdin(
                &lab.node_ns(0),
                &tools::NFT,
                &["-f", "-"],
                "table inet hardening {\n chain forward {\n  type filter hook forward priority filter + 10; policy accept;\n  ip daddr 10.244.1.0/24 counter drop\n }\n}\n",
            )
            .map(|_| ())
        },
    },
    Fault {
        name: "iptables-backend-conflict",
        cause: "iptables-backend-conflict",
        summary: "flannel's accept rules live in iptables-nft while iptables-legacy holds FORWARD policy DROP",
        breaks: &[SameNode, CrossNode, External, CrossNodeFullMtu, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| sys::run_in(&lab.node_ns(0), &tools::IPTABLES_LEGACY, &["-P", "FORWARD", "DROP"]).map(|_| ()),
    },
    Fault {
        name: "ip-forward-off",
        cause: "ip-forward-disabled",
        summary: "net.ipv4.ip_forward = 0 on storagenodet3500",
        breaks: &[CrossNode, External, CrossNodeFullMtu, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| sysctl(&lab.node_ns(0), "net.ipv4.ip_forward", "0"),
    },
    Fault {
        name: "rp-filter-strict",
        cause: "rp-filter",
        summary: "strict rp_filter on storagenodet3501, which receives storagenodet3500's VXLAN on eth2 but routes back by eth0",
        breaks: &[CrossNode, CrossNodeFullMtu, NodeToRemotePod, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| sysctl(&lab.node_ns(1), "net.ipv4.conf.all.rp_filter", "1"),
    },
    Fault {
        name: "route-missing",
        cause: "route-missing",
        summary: "storagenodet3500 has no route to storagenodet3501's pod subnet 10.244.1.0/24",
        breaks: &[CrossNode, CrossNodeFullMtu, NodeToRemotePod, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| ip(&lab.node_ns(0), &["route", "del", "10.244.1.0/24"]),
    },
    Fault {
        name: "pod-routes-missing",
        cause: "pod-route-missing",
        summary: "the debug pod lost its default and cluster routes",
        breaks: &[CrossNode, External, CrossNodeFullMtu],
        pair: CROSS,
        apply: |lab| {
            let pod = lab.pod_ns("debug");
            ip(&pod, &["route", "del", "default"])?;
            ip(&pod, &["route", "del", super::topology::CLUSTER_CIDR])
        },
    },
    Fault {
        name: "pod-prefix-wide",
        cause: "pod-prefix-too-wide",
        summary: "the debug pod holds 10.244.0.20/16 instead of /24 (as the incident's pods did) and no cluster route: other nodes' pods look on-link",
        breaks: &[CrossNode, CrossNodeFullMtu],
        pair: CROSS,
        apply: |lab| {
            // What host-local with a /16 subnet gives: the /16 address, a default route, no cluster
            // route (here: the wide address added first, so the default route stays).
            let pod = lab.pod_ns("debug");
            ip(&pod, &["route", "del", super::topology::CLUSTER_CIDR])?;
            ip(&pod, &["addr", "add", "10.244.0.20/16", "dev", "eth0"])?;
            ip(&pod, &["addr", "del", "10.244.0.20/24", "dev", "eth0"])
        },
    },
    Fault {
        name: "neighbor-stale",
        cause: "neighbor-stale",
        summary: "the debug pod holds a permanent neighbour entry for jellyfin with a wrong MAC",
        breaks: &[SameNode],
        pair: SAME,
        apply: |lab| {
            ip(&lab.pod_ns("debug"), &["neigh", "replace", "10.244.0.19", "lladdr", "02:00:00:de:ad:01", "dev", "eth0", "nud", "permanent"])
        },
    },
    Fault {
        name: "vxlan-down",
        cause: "vxlan-down",
        summary: "flannel.1 is down on storagenodet3500",
        breaks: &[CrossNode, CrossNodeFullMtu, NodeToRemotePod, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| ip(&lab.node_ns(0), &["link", "set", "flannel.1", "down"]),
    },
    Fault {
        name: "vxlan-fdb-missing",
        cause: "vxlan-fdb-missing",
        summary: "flannel.1 on storagenodet3500 lost the FDB entry for storagenodet3501's VTEP",
        breaks: &[CrossNode, CrossNodeFullMtu, NodeToRemotePod, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| {
            let dst = NODES[1].underlay.to_string();
            bridge(&lab.node_ns(0), &["fdb", "del", NODES[1].vtep_mac, "dev", "flannel.1", "dst", &dst])
        },
    },
    Fault {
        name: "vxlan-neigh-missing",
        cause: "vxlan-neigh-missing",
        summary: "flannel.1 on storagenodet3500 lost the neighbour entry for storagenodet3501's VTEP",
        breaks: &[CrossNode, CrossNodeFullMtu, NodeToRemotePod, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| ip(&lab.node_ns(0), &["neigh", "del", &NODES[1].vtep_ip().to_string(), "dev", "flannel.1"]),
    },
    Fault {
        name: "vxlan-port-mismatch",
        cause: "vxlan-config-mismatch",
        summary: "storagenodet3501's flannel.1 listens on UDP 4789 instead of 8472",
        breaks: &[CrossNode, CrossNodeFullMtu, NodeToRemotePod, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| lab.rebuild_vxlan(1, 4789, super::topology::VXLAN_VNI),
    },
    Fault {
        name: "vxlan-vni-mismatch",
        cause: "vxlan-config-mismatch",
        summary: "storagenodet3501's flannel.1 uses VNI 2 instead of 1",
        breaks: &[CrossNode, CrossNodeFullMtu, NodeToRemotePod, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| lab.rebuild_vxlan(1, super::topology::VXLAN_PORT, 2),
    },
    Fault {
        name: "vxlan-address-zero",
        cause: "vxlan-address-invalid",
        summary: "flannel.1 on storagenodet3500 holds 0.0.0.0/32 instead of 10.244.0.0/32",
        breaks: &[CrossNode, CrossNodeFullMtu, NodeToRemotePod, DestinationCrossNode],
        pair: CROSS,
        apply: |lab| {
            let node = lab.node_ns(0);
            ip(&node, &["addr", "del", "10.244.0.0/32", "dev", "flannel.1"])?;
            ip(&node, &["addr", "add", "0.0.0.0/32", "dev", "flannel.1"])
        },
    },
    Fault {
        name: "mtu-mismatch",
        cause: "mtu-mismatch",
        summary: "the debug pod's veth has MTU 1500 while the VXLAN path carries 1450",
        breaks: &[CrossNodeFullMtu],
        pair: CROSS,
        apply: |lab| {
            ip(&lab.node_ns(0), &["link", "set", lab.host_veth("debug")?, "mtu", "1500"])?;
            ip(&lab.pod_ns("debug"), &["link", "set", "eth0", "mtu", "1500"])
        },
    },
];

/// Faults of the Services' paths (kube-proxy's NAT, hairpin, masquerade). Their pairs name Services as
/// `svc/NAME` (its ClusterIP:port) or `nodeport/NAME`, and `external` (see `topology::lab_target`); the
/// paths they break are among ALL_PATHS and SERVICE_PATHS.
pub static SERVICE_FAULTS: &[Fault] = &[
    Fault {
        name: "service-no-endpoints",
        cause: "service-no-endpoints",
        summary: "jellyfin's Service has no endpoints (its pod is not Ready): kube-proxy rejects its traffic on every node",
        breaks: &[ServiceSameNode, NodePort, Hairpin],
        pair: ("debug", "svc/jellyfin"),
        apply: |lab| {
            for i in 0..NODES.len() {
                services::program(lab, i, lab.state.proxy_mode, &["jellyfin".to_string()])?;
            }
            Ok(())
        },
    },
    Fault {
        name: "kube-proxy-rules-missing",
        cause: "kube-proxy-rules-missing",
        summary: "storagenodet3500 has none of kube-proxy's rules (kube-proxy not running there); storagenodet3501 has them",
        breaks: &[ServiceSameNode, ServiceCrossNode, NodePort, Hairpin],
        pair: ("debug", "svc/jellyfin"),
        apply: |lab| services::remove(lab, 0, lab.state.proxy_mode),
    },
    Fault {
        name: "hairpin-off",
        cause: "hairpin-missing",
        summary: "hairpin mode is off on jellyfin's cni0 port: jellyfin cannot reach itself through its Service",
        breaks: &[Hairpin],
        pair: ("jellyfin", "svc/jellyfin"),
        apply: |lab| bridge(&lab.node_ns(0), &["link", "set", "dev", lab.host_veth("jellyfin")?, "hairpin", "off"]),
    },
    Fault {
        name: "masquerade-missing",
        cause: "masquerade-missing",
        summary: "flannel's MASQUERADE rule for the pod network is gone on storagenodet3500: pods cannot reach the outside",
        breaks: &[External],
        pair: ("debug", "external"),
        apply: |lab| {
            let net = super::topology::CLUSTER_CIDR;
            let rule = format!("-D FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 -m comment --comment flanneld-masq -j MASQUERADE --random-fully");
            let mut args: Vec<String> = vec!["-t".into(), "nat".into()];
            args.extend(rule.split_whitespace().map(|w| if w == "flanneld-masq" { "flanneld masq".to_string() } else { w.to_string() }));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            sys::run_in(&lab.node_ns(0), &tools::IPTABLES_NFT, &args).map(|_| ())
        },
    },
    Fault {
        name: "nodeport-blocked",
        cause: "nodeport-blocked",
        summary: "a firewall rule on storagenodet3500 drops new connections forwarded in from its uplink (eth1): NodePorts are unreachable from outside",
        breaks: &[NodePort],
        pair: ("external", "nodeport/jellyfin"),
        apply: |lab| {
            sys::run_in(&lab.node_ns(0), &tools::IPTABLES_NFT, &["-I", "FORWARD", "1", "-i", "eth1", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"]).map(|_| ())
        },
    },
];
