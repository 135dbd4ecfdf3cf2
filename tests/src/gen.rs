//! Layouts the lab does not build, generated from a seed: 1–3 nodes, each in a namespace of its own with
//! 1–4 pods on a bridge (2–4 on the first), every name, subnet and interface order drawn from the seed —
//! node names as kind, k3d and minikube give them or random ones, a cluster network anywhere in
//! 10.0.0.0/8 and 172.16.0.0/12 with a /24 per node, bridges called cni0, cbr0 or anything, pods made by
//! the real CNI `bridge` + `host-local` plugins or by hand with veths named as CNI names them or as a
//! person would, a few other interfaces made first so indexes land elsewhere, and between the nodes an
//! underlay (one link for two nodes, a switch for three, as kind's nodes hang off docker's bridge) with
//! flannel's VXLAN (port 8472 and VNI 1, or 4789 and another VNI, the device named `flannel.<VNI>` as
//! flannel names it) or flannel's host-gw backend (routes via the other node's underlay address). The
//! same seed always gives the same layout (the seed is printed with every failure).

use std::{net::Ipv4Addr, os::unix::fs::MetadataExt, path::PathBuf};

use crate::HandLayout;

/// splitmix64: small, good enough for drawing layouts, the same everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// In `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<'a, T>(&mut self, of: &'a [T]) -> &'a T {
        &of[self.below(of.len() as u64) as usize]
    }
    fn hex(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from_digit(self.below(16) as u32, 16).expect("a hex digit")).collect()
    }
    fn word(&mut self) -> String {
        const SYL: &[&str] = &["ka", "ri", "mo", "tesu", "ne", "lo", "vi", "dra", "pa", "zu", "gen", "tor"];
        (0..2 + self.below(2)).map(|_| *self.pick(SYL)).collect()
    }
}

#[derive(Clone, Debug)]
pub struct GenPod {
    /// Its name in words and its namespace's short name (under the layout's prefix).
    pub name: String,
    pub ip: Ipv4Addr,
    pub host_veth: String,
    /// Index into [`Generated::nodes`].
    pub node: usize,
}

#[derive(Clone, Debug)]
pub struct GenNode {
    /// Its name, and its namespace's short name.
    pub name: String,
    pub bridge: String,
    /// The node's pod subnet (/24) and its gateway (.1, on the bridge).
    pub subnet: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// The underlay interface and address.
    pub uplink: String,
    pub underlay: Ipv4Addr,
    pub vtep_mac: String,
    /// Pods made by the CNI plugins (else by hand).
    pub cni: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Vxlan { dev: String, port: u16, vni: u32 },
    HostGw,
}

/// A generated cluster and its pods, built; torn down when dropped.
pub struct Generated {
    pub seed: u64,
    pub layout: HandLayout,
    pub nodes: Vec<GenNode>,
    pub backend: Backend,
    /// flannel's `Network`.
    pub cluster: (Ipv4Addr, u8),
    pub pods: Vec<GenPod>,
    /// The underlay's switch namespace (three nodes), by short name.
    pub switch: Option<String>,
    /// flanneld's FORWARD accepts for the cluster network in iptables-nft on every node (as flannel
    /// writes them), or no rules at all.
    pub flannel_rules: bool,
    /// What was drawn, in words (printed with a failure).
    pub about: String,
    ipam_dir: PathBuf,
}

const UNDERLAY_NAMES: &[&str] = &["eth0", "ens3", "enp0s8"];

fn node_name(r: &mut Rng, i: usize, first: &str) -> String {
    if i == 0 {
        return match r.below(4) {
            0 => "kind-worker".to_string(),
            1 => format!("k3d-{}-agent-{}", r.word(), r.below(3)),
            2 => "minikube-m02".to_string(),
            _ => r.word(),
        };
    }
    // The others as the same tool names them.
    if first == "kind-worker" {
        format!("kind-worker{}", i + 1)
    } else if let Some((cluster, n)) = first.strip_prefix("k3d-").and_then(|r| r.split_once("-agent-")) {
        format!("k3d-{cluster}-agent-{}", n.parse::<usize>().unwrap_or(0) + i)
    } else if first == "minikube-m02" {
        format!("minikube-m0{}", i + 2)
    } else {
        format!("{}{i}", r.word())
    }
}

impl Generated {
    /// How many nodes `build(seed)` draws, without building anything.
    pub fn drawn_nodes(seed: u64) -> usize {
        Self::draw_nodes(&mut Rng::new(seed))
    }

    fn draw_nodes(r: &mut Rng) -> usize {
        1 + r.below(3) as usize
    }

    pub fn build(seed: u64) -> Generated {
        let mut r = Rng::new(seed);
        let nnodes = Self::draw_nodes(&mut r);
        let bridge = match r.below(3) {
            0 => "cni0".to_string(),
            1 => "cbr0".to_string(),
            _ => format!("br-{}", r.hex(6)),
        };
        let (a, b) = if r.below(2) == 0 { (10, r.below(256) as u8) } else { (172, 16 + r.below(16) as u8) };
        let cluster = (Ipv4Addr::new(a, b, 0, 0), 16);
        let backend = match (nnodes, r.below(3)) {
            (1, _) | (_, 0) => Backend::Vxlan { dev: "flannel.1".into(), port: 8472, vni: 1 },
            (_, 1) => {
                let vni = *r.pick(&[4096, 2, 7, 100]);
                Backend::Vxlan { dev: format!("flannel.{vni}"), port: 4789, vni }
            }
            _ => Backend::HostGw,
        };
        let mtu = if matches!(backend, Backend::Vxlan { .. }) { 1450 } else { 1500 };
        let underlay_net = Ipv4Addr::new(192, 168, r.below(256) as u8, 0);
        let uplink = r.pick(UNDERLAY_NAMES).to_string();
        let cni_style = r.below(2) == 0;
        let mut nodes: Vec<GenNode> = Vec::new();
        let mut thirds: Vec<u8> = Vec::new();
        let mut first = String::new();
        for i in 0..nnodes {
            let name = node_name(&mut r, i, &first);
            if i == 0 {
                first = name.clone();
            }
            let mut c = r.below(256) as u8;
            while thirds.contains(&c) {
                c = c.wrapping_add(1);
            }
            thirds.push(c);
            let subnet = Ipv4Addr::new(a, b, c, 0);
            let u = underlay_net.octets();
            nodes.push(GenNode {
                name,
                bridge: bridge.clone(),
                subnet,
                gateway: Ipv4Addr::new(a, b, c, 1),
                uplink: uplink.clone(),
                underlay: Ipv4Addr::new(u[0], u[1], u[2], 10 + i as u8),
                vtep_mac: format!("0e:{}:{}:{}:{}:{}", r.hex(2), r.hex(2), r.hex(2), r.hex(2), r.hex(2)),
                cni: r.below(2) == 0,
            });
        }
        let mut pods: Vec<GenPod> = Vec::new();
        for (n, node) in nodes.iter().enumerate() {
            let count = if n == 0 { 2 + r.below(3) } else { 1 + r.below(3) } as usize;
            let o = node.subnet.octets();
            for i in 0..count {
                let name = format!("{}{}", r.word(), pods.len());
                let host_veth = if cni_style { format!("veth{}", r.hex(8)) } else { format!("{}-h", &name[..name.len().min(10)]) };
                let ip = Ipv4Addr::new(o[0], o[1], o[2], 10 + i as u8 * 7 + r.below(5) as u8);
                pods.push(GenPod { name, ip, host_veth, node: n });
            }
        }
        let prefix_ns = format!("cnitrace-g{}", seed % 100_000);
        let switch = (nnodes == 3).then(|| "underlay".to_string());
        let mut names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        names.extend(pods.iter().map(|p| p.name.as_str()));
        names.extend(switch.as_deref());
        let layout = HandLayout::new(&prefix_ns, &names);
        let ipam_dir = std::env::temp_dir().join(format!("{prefix_ns}-ipam"));
        let _ = std::fs::remove_dir_all(&ipam_dir);
        let mut about_nodes = Vec::new();
        for node in &nodes {
            // Other interfaces first, so the pods' indexes differ from layout to layout.
            let fillers = r.below(4);
            for i in 0..fillers {
                layout.ip(&node.name, &format!("link add filler{i}a type veth peer name filler{i}b"));
            }
            layout.ip(&node.name, "link set lo up");
            set_sysctl(&layout.ns(&node.name), "net.ipv4.ip_forward", "1");
            about_nodes.push(format!(
                "{} ({}) {}/24 on {}{}, {} fillers first, underlay {} {}",
                node.name,
                layout.ns(&node.name),
                node.subnet,
                node.bridge,
                if node.cni { " pods by CNI" } else { "" },
                fillers,
                node.uplink,
                node.underlay
            ));
        }
        // The underlay: one link between two nodes, a switch (a bridge in a namespace of its own) for three.
        match nnodes {
            2 => layout.ip(
                &nodes[0].name,
                &format!("link add {} type veth peer name {} netns {}", nodes[0].uplink, nodes[1].uplink, layout.ns(&nodes[1].name)),
            ),
            3 => {
                let sw = switch.as_deref().expect("a switch");
                layout.ip(sw, "link add sw type bridge\nlink set sw up\nlink set lo up");
                for (i, node) in nodes.iter().enumerate() {
                    layout.ip(sw, &format!("link add sw-p{i} type veth peer name {} netns {}", node.uplink, layout.ns(&node.name)));
                    layout.ip(sw, &format!("link set sw-p{i} master sw\nlink set sw-p{i} up"));
                }
            }
            _ => {}
        }
        if nnodes > 1 {
            for node in &nodes {
                layout.ip(&node.name, &format!("addr add {}/24 dev {}\nlink set {} up", node.underlay, node.uplink, node.uplink));
            }
        }
        // flannel's backend: the VXLAN device on every node (also alone), the routes to the others.
        for (i, node) in nodes.iter().enumerate() {
            match &backend {
                Backend::Vxlan { dev, port, vni } => vxlan_on(&layout, &nodes, i, dev, *port, *vni),
                Backend::HostGw => {
                    for other in nodes.iter().filter(|o| o.name != node.name) {
                        layout.ip(&node.name, &format!("route add {}/24 via {} dev {}", other.subnet, other.underlay, node.uplink));
                    }
                }
            }
        }
        // The pods.
        let bridge_first = r.below(2) == 0;
        // Drawn last: the draws before it, and so the layouts of earlier seeds, stay as they were.
        let flannel_rules = r.below(2) == 0;
        if flannel_rules {
            let net = format!("{}/{}", cluster.0, cluster.1);
            let rules = format!(
                "*filter\n:FLANNEL-FWD - [0:0]\n\
                 -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
                 -A FLANNEL-FWD -s {net} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
                 -A FLANNEL-FWD -d {net} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
                 COMMIT\n"
            );
            for node in &nodes {
                cnitrace::sys::run_in_stdin(&layout.ns(&node.name), &cnitrace_tools::IPTABLES_NFT_RESTORE, &["--noflush", "-w"], &rules)
                    .unwrap_or_else(|e| panic!("seed {seed}: flannel's rules: {e:#}"));
            }
        }
        for (n, node) in nodes.iter().enumerate() {
            let mine: Vec<usize> = (0..pods.len()).filter(|k| pods[*k].node == n).collect();
            let make_bridge = format!("link add {} type bridge\naddr add {}/24 dev {}\nlink set {} up", node.bridge, node.gateway, node.bridge, node.bridge);
            if node.cni {
                let config = serde_json::json!({
                    "cniVersion": "0.3.1",
                    "name": "cbr0",
                    "type": "bridge",
                    "bridge": node.bridge,
                    "isGateway": true,
                    "isDefaultGateway": true,
                    "hairpinMode": true,
                    "ipMasq": false,
                    "mtu": mtu,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": format!("{}/24", node.subnet) }]],
                        "routes": [{ "dst": format!("{}/{}", cluster.0, cluster.1) }],
                        "dataDir": ipam_dir.join(&node.name),
                    }
                })
                .to_string();
                for k in mine {
                    let p = &pods[k];
                    let call = cnitrace::lab::cni::Call {
                        node_ns: &layout.ns(&node.name),
                        pod_ns: &layout.ns(&p.name),
                        container_id: &format!("{prefix_ns}-{}", p.name),
                        ip: p.ip,
                        config: &config,
                    };
                    // The plugin names the veth.
                    pods[k].host_veth = cnitrace::lab::cni::add(&call).unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
                }
                continue;
            }
            if bridge_first {
                layout.ip(&node.name, &make_bridge);
            }
            for p in mine.iter().map(|k| &pods[*k]) {
                layout.ip(&node.name, &format!("link add {} type veth peer name eth0 netns {}", p.host_veth, layout.ns(&p.name)));
            }
            if !bridge_first {
                // The bridge made after the pods' veths, as when cni0 is recreated.
                layout.ip(&node.name, &make_bridge);
            }
            for p in mine.iter().map(|k| &pods[*k]) {
                layout.ip(&node.name, &format!("link set {} master {}\nlink set {} mtu {mtu}\nlink set {} up", p.host_veth, node.bridge, p.host_veth, p.host_veth));
                layout.ip(
                    &p.name,
                    &format!("addr add {}/24 dev eth0\nlink set eth0 mtu {mtu}\nlink set eth0 up\nlink set lo up\nroute add default via {}", p.ip, node.gateway),
                );
            }
        }
        let about = format!(
            "seed {seed}: cluster {}/{}, {}, {} veths,{} nodes [{}], pods {}",
            cluster.0,
            cluster.1,
            match &backend {
                Backend::Vxlan { dev, port, vni } => format!("vxlan {dev} port {port} VNI {vni}"),
                Backend::HostGw => "host-gw".to_string(),
            },
            if cni_style { "CNI-style" } else { "hand-named" },
            if flannel_rules { " flannel's FORWARD rules," } else { "" },
            about_nodes.join("; "),
            pods.iter().map(|p| format!("{} {} ({} on {})", p.name, p.ip, p.host_veth, nodes[p.node].name)).collect::<Vec<_>>().join(", ")
        );
        Generated { seed, layout, nodes, backend, cluster, pods, switch, flannel_rules, about, ipam_dir }
    }

    /// Every namespace of the layout, full names.
    pub fn namespaces(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .chain(self.pods.iter().map(|p| p.name.as_str()))
            .chain(self.switch.as_deref())
            .map(|n| self.layout.ns(n))
            .collect()
    }

    /// The nodes' network namespace inodes.
    pub fn node_inodes(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| std::fs::metadata(cnitrace::netns::named(&self.layout.ns(&n.name))).ok())
            .map(|m| m.ino() as u32)
            .collect()
    }

    /// The pods of node `n`.
    pub fn pods_on(&self, n: usize) -> Vec<&GenPod> {
        self.pods.iter().filter(|p| p.node == n).collect()
    }

    /// The pair a fault is traced on: two pods of the first node, or the first pods of the first two.
    pub fn pair(&self, cross: bool) -> (&GenPod, &GenPod) {
        if cross {
            (self.pods_on(0)[0], self.pods_on(1)[0])
        } else {
            let on = self.pods_on(0);
            (on[0], on[1])
        }
    }
}

impl Drop for Generated {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.ipam_dir);
    }
}

/// flannel's VXLAN device on node `i` as its vxlan backend writes it: the device, its /32, and per other
/// node the route, the permanent neighbour and the FDB entry.
fn vxlan_on(layout: &HandLayout, nodes: &[GenNode], i: usize, dev: &str, port: u16, vni: u32) {
    let node = &nodes[i];
    let via = if nodes.len() > 1 { format!(" dev {}", node.uplink) } else { String::new() };
    layout.ip(
        &node.name,
        &format!(
            "link add {dev} address {} type vxlan id {vni} local {} dstport {port} nolearning{via}\nlink set {dev} mtu 1450\nlink set {dev} up\naddr add {}/32 dev {dev}",
            node.vtep_mac, node.underlay, node.subnet
        ),
    );
    for other in nodes.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, o)| o) {
        layout.ip(
            &node.name,
            &format!("route add {}/24 via {} dev {dev} onlink\nneigh replace {} lladdr {} dev {dev} nud permanent", other.subnet, other.subnet, other.subnet, other.vtep_mac),
        );
        run_bridge(&layout.ns(&node.name), &["fdb", "append", &other.vtep_mac, "dev", dev, "dst", &other.underlay.to_string()]);
    }
}

/// The second node's VXLAN device made again with another port or VNI (named flannel.<VNI> as flannel names it).
fn vxlan_differs(g: &Generated, port_differs: bool) {
    let Backend::Vxlan { dev, port, vni } = &g.backend else { return };
    g.layout.ip(&g.nodes[1].name, &format!("link del {dev}"));
    let (port, vni) = if port_differs { (if *port == 8472 { 4789 } else { 8472 }, *vni) } else { (*port, vni + 1) };
    let dev = if port_differs { dev.clone() } else { format!("flannel.{vni}") };
    vxlan_on(&g.layout, &g.nodes, 1, &dev, port, vni);
}

fn nft(ns: &str, set: &str) {
    cnitrace::sys::run_in_stdin(ns, &cnitrace_tools::NFT, &["-f", "-"], set).unwrap_or_else(|e| panic!("nft in {ns}: {e:#}\n{set}"));
}

fn iptables(ns: &str, args: &[&str]) {
    cnitrace::sys::run_in(ns, &cnitrace_tools::IPTABLES_NFT, args).unwrap_or_else(|e| panic!("iptables {args:?}: {e:#}"));
}

fn set_sysctl(ns: &str, key: &'static str, value: &'static str) {
    cnitrace::netns::in_netns(&cnitrace::netns::named(ns), move || cnitrace::sys::write_sysctl(key, value)).unwrap_or_else(|e| panic!("{ns}: {key}: {e:#}"));
}

fn run_bridge(ns: &str, args: &[&str]) {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    cnitrace::sys::run(&cnitrace_tools::BRIDGE, &full).unwrap_or_else(|e| panic!("bridge {full:?}: {e:#}"));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FixKind {
    Repair,
    RuleRemoval,
    NoSafeFix,
}

/// Which layouts a fault needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Two pods on one node (every layout).
    OneNode,
    /// Two nodes, any backend.
    TwoNodes,
    /// Two nodes joined by VXLAN.
    Vxlan,
    /// Two nodes joined by host-gw routes.
    HostGw,
    /// Two nodes holding flannel's FORWARD rules.
    FlannelRules,
}

/// A fault a layout can hold, on the pair [`Generated::pair`]: its name, the cause follow must name, and
/// the hop (`node`: the namespace, by the index of its node, and the interface; empty = not asserted).
pub struct GenFault {
    pub name: &'static str,
    pub cause: &'static str,
    pub needs: Needs,
    /// What `fix --auto` must do: repair it, repair it only with --allow-rule-removal (a rule someone
    /// wrote), or refuse and change nothing (no safe fix).
    pub fix: FixKind,
    apply: fn(&Generated),
    hop: fn(&Generated) -> String,
}

impl GenFault {
    pub fn apply(&self, g: &Generated) {
        (self.apply)(g)
    }
    pub fn hop(&self, g: &Generated) -> String {
        (self.hop)(g)
    }
    pub fn cross(&self) -> bool {
        self.needs != Needs::OneNode
    }
    /// Where the packet dies is the first node's own doing (its forwarding, routes, VXLAN device or
    /// rules), so `follow` must name it there; the pods' own faults die in the pod, a config mismatch on
    /// the second node.
    pub fn at_first_node(&self) -> bool {
        matches!(
            self.name,
            "ip-forward-off"
                | "route-missing"
                | "vxlan-down"
                | "vxlan-fdb-missing"
                | "vxlan-neigh-missing"
                | "forward-policy-drop"
                | "iptables-drop"
                | "nft-drop"
                | "nft-bridge-drop"
                | "nft-netdev-drop"
                | "iptables-backend-conflict"
        )
    }
    /// Can `g` hold this fault?
    pub fn fits(&self, g: &Generated) -> bool {
        match self.needs {
            Needs::OneNode => true,
            Needs::TwoNodes => g.nodes.len() > 1,
            Needs::Vxlan => g.nodes.len() > 1 && matches!(g.backend, Backend::Vxlan { .. }),
            Needs::HostGw => g.nodes.len() > 1 && g.backend == Backend::HostGw,
            Needs::FlannelRules => g.nodes.len() > 1 && g.flannel_rules,
        }
    }
}

fn vxlan_dev(g: &Generated) -> String {
    match &g.backend {
        Backend::Vxlan { dev, .. } => dev.clone(),
        Backend::HostGw => String::new(),
    }
}

pub const FAULTS: &[GenFault] = &[
    GenFault { name: "veth-detached", cause: "veth-detached", needs: Needs::OneNode, fix: FixKind::Repair, apply: |g| g.layout.ip(&g.nodes[0].name, &format!("link set {} nomaster", g.pair(false).1.host_veth)), hop: |g| g.pair(false).1.host_veth.clone() },
    GenFault { name: "veth-down-host", cause: "veth-down", needs: Needs::OneNode, fix: FixKind::Repair, apply: |g| g.layout.ip(&g.nodes[0].name, &format!("link set {} down", g.pair(false).1.host_veth)), hop: |g| g.pair(false).1.host_veth.clone() },
    GenFault { name: "veth-down-pod", cause: "veth-down", needs: Needs::OneNode, fix: FixKind::Repair, apply: |g| g.layout.ip(&g.pair(false).1.name, "link set eth0 down"), hop: |_| "eth0".into() },
    // The fault's place is the bridge that is down (the kernel drops the source's frame at its ingress
    // port, br_handle_frame: that is the verdict's `dropped_at`).
    GenFault { name: "bridge-down", cause: "bridge-down", needs: Needs::OneNode, fix: FixKind::Repair, apply: |g| g.layout.ip(&g.nodes[0].name, &format!("link set {} down", g.nodes[0].bridge)), hop: |g| g.nodes[0].bridge.clone() },
    GenFault {
        name: "bridge-port-blocked",
        cause: "bridge-port-blocked",
        needs: Needs::OneNode,
        fix: FixKind::Repair,
        apply: |g| run_bridge(&g.layout.ns(&g.nodes[0].name), &["link", "set", "dev", &g.pair(false).1.host_veth, "state", "0"]),
        hop: |g| g.pair(false).1.host_veth.clone(),
    },
    GenFault {
        name: "neighbor-stale",
        cause: "neighbor-stale",
        needs: Needs::OneNode,
        fix: FixKind::Repair,
        apply: |g| g.layout.ip(&g.pair(false).0.name, &format!("neigh replace {} lladdr 02:00:5e:00:53:01 dev eth0 nud permanent", g.pair(false).1.ip)),
        // Where the misaddressed frame dies depends on the bridge's FDB: not asserted.
        hop: |_| String::new(),
    },
    // Cross-node: the first node's side of the way to the second.
    GenFault {
        name: "ip-forward-off",
        cause: "ip-forward-disabled",
        needs: Needs::TwoNodes,
        fix: FixKind::Repair,
        apply: |g| set_sysctl(&g.layout.ns(&g.nodes[0].name), "net.ipv4.ip_forward", "0"),
        hop: |_| String::new(),
    },
    GenFault {
        name: "route-missing",
        cause: "route-missing",
        needs: Needs::TwoNodes,
        fix: FixKind::Repair,
        apply: |g| g.layout.ip(&g.nodes[0].name, &format!("route del {}/24", g.nodes[1].subnet)),
        hop: |_| String::new(),
    },
    GenFault { name: "vxlan-down", cause: "vxlan-down", needs: Needs::Vxlan, fix: FixKind::Repair, apply: |g| g.layout.ip(&g.nodes[0].name, &format!("link set {} down", vxlan_dev(g))), hop: |_| String::new() },
    GenFault {
        name: "vxlan-fdb-missing",
        cause: "vxlan-fdb-missing",
        needs: Needs::Vxlan,
        fix: FixKind::Repair,
        apply: |g| run_bridge(&g.layout.ns(&g.nodes[0].name), &["fdb", "del", &g.nodes[1].vtep_mac, "dev", &vxlan_dev(g), "dst", &g.nodes[1].underlay.to_string()]),
        hop: |_| String::new(),
    },
    GenFault {
        name: "vxlan-neigh-missing",
        cause: "vxlan-neigh-missing",
        needs: Needs::Vxlan,
        fix: FixKind::Repair,
        apply: |g| g.layout.ip(&g.nodes[0].name, &format!("neigh del {} dev {}", g.nodes[1].subnet, vxlan_dev(g))),
        hop: |_| String::new(),
    },
    GenFault {
        name: "veth-wrong-bridge",
        cause: "veth-wrong-bridge",
        needs: Needs::OneNode,
        fix: FixKind::Repair,
        apply: |g| g.layout.ip(&g.nodes[0].name, &format!("link add docker0 type bridge\nlink set docker0 up\nlink set {} master docker0", g.pair(false).1.host_veth)),
        hop: |_| "docker0".into(),
    },
    GenFault {
        name: "bridge-ip-conflict",
        cause: "bridge-ip-conflict",
        needs: Needs::TwoNodes,
        fix: FixKind::Repair,
        apply: |g| {
            let n = &g.nodes[0];
            // Another network's gateway (podman's default), never the cluster's own.
            let other = if g.cluster.0.octets()[..2] == [10, 88] { "10.89.0.1/16" } else { "10.88.0.1/16" };
            g.layout.ip(&n.name, &format!("addr del {}/24 dev {}\naddr add {other} dev {}", n.gateway, n.bridge, n.bridge));
        },
        hop: |_| String::new(),
    },
    GenFault {
        name: "pod-routes-missing",
        cause: "pod-route-missing",
        needs: Needs::TwoNodes,
        fix: FixKind::Repair,
        apply: |g| {
            let p = g.pair(true).0;
            g.layout.ip(&p.name, "route del default");
            if g.nodes[p.node].cni {
                g.layout.ip(&p.name, &format!("route del {}/{}", g.cluster.0, g.cluster.1));
            }
        },
        hop: |_| String::new(),
    },
    GenFault {
        name: "pod-prefix-wide",
        cause: "pod-prefix-too-wide",
        needs: Needs::TwoNodes,
        fix: FixKind::Repair,
        apply: |g| {
            // What host-local with the cluster's prefix as the pod subnet gives: the wide address, no
            // cluster route (the wide address added first, so the default route stays).
            let p = g.pair(true).0;
            if g.nodes[p.node].cni {
                g.layout.ip(&p.name, &format!("route del {}/{}", g.cluster.0, g.cluster.1));
            }
            g.layout.ip(&p.name, &format!("addr add {}/{} dev eth0\naddr del {}/24 dev eth0", p.ip, g.cluster.1, p.ip));
        },
        hop: |_| String::new(),
    },
    GenFault {
        name: "forward-policy-drop",
        cause: "netfilter-policy-drop",
        needs: Needs::TwoNodes,
        fix: FixKind::Repair,
        apply: |g| {
            // What Docker does to FORWARD, on a node whose flannel rules are gone (or never were).
            let ns = g.layout.ns(&g.nodes[0].name);
            if g.flannel_rules {
                iptables(&ns, &["-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"]);
            }
            iptables(&ns, &["-P", "FORWARD", "DROP"]);
        },
        hop: |_| String::new(),
    },
    GenFault {
        name: "iptables-drop",
        cause: "netfilter-rule-drop",
        needs: Needs::TwoNodes,
        fix: FixKind::RuleRemoval,
        apply: |g| iptables(&g.layout.ns(&g.nodes[0].name), &["-I", "FORWARD", "1", "-d", &format!("{}/24", g.nodes[1].subnet), "-j", "DROP"]),
        hop: |_| String::new(),
    },
    GenFault {
        name: "nft-drop",
        cause: "netfilter-rule-drop",
        needs: Needs::TwoNodes,
        fix: FixKind::RuleRemoval,
        apply: |g| {
            // With a counter on even seeds, without one (as firewalld writes them) on odd ones.
            let counter = if g.seed % 2 == 0 { "counter " } else { "" };
            let set = format!(
                "table inet hardening {{\n chain forward {{\n  type filter hook forward priority filter + 10; policy accept;\n  ip daddr {}/24 {counter}drop\n }}\n}}\n",
                g.nodes[1].subnet
            );
            cnitrace::sys::run_in_stdin(&g.layout.ns(&g.nodes[0].name), &cnitrace_tools::NFT, &["-f", "-"], &set).unwrap_or_else(|e| panic!("nft: {e:#}"));
        },
        hop: |_| String::new(),
    },
    // nft rules of the families beyond ip/inet (issue 35), each with a counter on even seeds and
    // without one on odd ones: named by table, chain, rule and handle, removed only with
    // --allow-rule-removal and put back in place by the rollback.
    GenFault {
        name: "nft-arp-drop",
        cause: "netfilter-rule-drop",
        needs: Needs::OneNode,
        fix: FixKind::RuleRemoval,
        apply: |g| {
            // arptables' kind of rule, in the destination pod's own namespace: the ARP requests it is
            // asked dropped at its input, so nobody ever learns its address.
            let counter = if g.seed % 2 == 0 { "counter " } else { "" };
            let set = format!("table arp guard {{\n chain in {{\n  type filter hook input priority 0; policy accept;\n  arp operation request {counter}drop\n }}\n}}\n");
            nft(&g.layout.ns(&g.pair(false).1.name), &set);
        },
        hop: |_| "eth0".into(),
    },
    GenFault {
        name: "nft-bridge-drop",
        cause: "netfilter-rule-drop",
        needs: Needs::OneNode,
        fix: FixKind::RuleRemoval,
        apply: |g| {
            // ebtables-nft's table: `bridge filter`, the name iptables-nft uses in family ip.
            let counter = if g.seed % 2 == 0 { "counter " } else { "" };
            let set = format!(
                "table bridge filter {{\n chain FORWARD {{\n  type filter hook forward priority -200; policy accept;\n  ip daddr {} {counter}drop\n }}\n}}\n",
                g.pair(false).1.ip
            );
            nft(&g.layout.ns(&g.nodes[0].name), &set);
        },
        hop: |_| String::new(),
    },
    GenFault {
        name: "nft-netdev-drop",
        cause: "netfilter-rule-drop",
        needs: Needs::OneNode,
        fix: FixKind::RuleRemoval,
        apply: |g| {
            // An ingress filter on the source's host veth (tc's place, in nft).
            let counter = if g.seed % 2 == 0 { "counter " } else { "" };
            let (src, dst) = g.pair(false);
            let set = format!(
                "table netdev edge {{\n chain ingress-{} {{\n  type filter hook ingress device \"{}\" priority 0; policy accept;\n  ip daddr {} {counter}drop\n }}\n}}\n",
                src.host_veth, src.host_veth, dst.ip
            );
            nft(&g.layout.ns(&g.nodes[0].name), &set);
        },
        hop: |g| g.pair(false).0.host_veth.clone(),
    },
    GenFault {
        name: "vxlan-address-zero",
        cause: "vxlan-address-invalid",
        needs: Needs::Vxlan,
        fix: FixKind::Repair,
        apply: |g| g.layout.ip(&g.nodes[0].name, &format!("addr del {}/32 dev {}\naddr add 0.0.0.0/32 dev {}", g.nodes[0].subnet, vxlan_dev(g), vxlan_dev(g))),
        hop: |_| String::new(),
    },
    GenFault {
        name: "mtu-mismatch",
        cause: "mtu-mismatch",
        needs: Needs::Vxlan,
        fix: FixKind::Repair,
        apply: |g| {
            let p = g.pair(true).0;
            g.layout.ip(&g.nodes[0].name, &format!("link set {} mtu 1500", p.host_veth));
            g.layout.ip(&p.name, "link set eth0 mtu 1500");
        },
        hop: |_| String::new(),
    },
    GenFault { name: "vxlan-port-mismatch", cause: "vxlan-config-mismatch", needs: Needs::Vxlan, fix: FixKind::NoSafeFix, apply: |g| vxlan_differs(g, true), hop: |_| String::new() },
    GenFault { name: "vxlan-vni-mismatch", cause: "vxlan-config-mismatch", needs: Needs::Vxlan, fix: FixKind::NoSafeFix, apply: |g| vxlan_differs(g, false), hop: |_| String::new() },
    GenFault {
        name: "iptables-backend-conflict",
        cause: "iptables-backend-conflict",
        needs: Needs::FlannelRules,
        fix: FixKind::Repair,
        // flannel's accepts live in iptables-nft; iptables-legacy's FORWARD policy drops all the same.
        apply: |g| {
            cnitrace::sys::run_in(&g.layout.ns(&g.nodes[0].name), &cnitrace_tools::IPTABLES_LEGACY, &["-P", "FORWARD", "DROP"])
                .unwrap_or_else(|e| panic!("iptables-legacy: {e:#}"));
        },
        hop: |_| String::new(),
    },
];
