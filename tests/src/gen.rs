//! Layouts the lab does not build, generated from a seed: one node in a namespace of its own with 2–4
//! pods on a bridge, every name, subnet and interface order drawn from the seed — node names as kind, k3d
//! and minikube give them or random ones, pod subnets anywhere in 10.0.0.0/8 and 172.16.0.0/12, bridges
//! called cni0, cbr0 or anything, veths named as CNI names them or as a person would, and a few other
//! interfaces made first so indexes land elsewhere. The same seed always gives the same layout (the seed
//! is printed with every failure).

use std::net::Ipv4Addr;

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
}

/// One generated node and its pods, built; torn down when dropped.
pub struct Generated {
    pub seed: u64,
    pub layout: HandLayout,
    pub node: String,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub pods: Vec<GenPod>,
    /// What was drawn, in words (printed with a failure).
    pub about: String,
}

impl Generated {
    pub fn build(seed: u64) -> Generated {
        let mut r = Rng::new(seed);
        let node = match r.below(4) {
            0 => "kind-worker".to_string(),
            1 => format!("k3d-{}-agent-{}", r.word(), r.below(3)),
            2 => "minikube-m02".to_string(),
            _ => r.word(),
        };
        let bridge = match r.below(3) {
            0 => "cni0".to_string(),
            1 => "cbr0".to_string(),
            _ => format!("br-{}", r.hex(6)),
        };
        let net = if r.below(2) == 0 {
            Ipv4Addr::new(10, r.below(256) as u8, r.below(256) as u8, 0)
        } else {
            Ipv4Addr::new(172, 16 + r.below(16) as u8, r.below(256) as u8, 0)
        };
        let o = net.octets();
        let gateway = Ipv4Addr::new(o[0], o[1], o[2], 1);
        let npods = 2 + r.below(3) as usize;
        let cni_style = r.below(2) == 0;
        let mut pods: Vec<GenPod> = Vec::new();
        for i in 0..npods {
            let name = format!("{}{i}", r.word());
            let host_veth = if cni_style { format!("veth{}", r.hex(8)) } else { format!("{}-h", &name[..name.len().min(10)]) };
            pods.push(GenPod { ip: Ipv4Addr::new(o[0], o[1], o[2], 10 + i as u8 * 7 + r.below(5) as u8), name, host_veth });
        }
        let prefix_ns = format!("cnitrace-g{}", seed % 100_000);
        let mut names: Vec<&str> = vec![node.as_str()];
        names.extend(pods.iter().map(|p| p.name.as_str()));
        let layout = HandLayout::new(&prefix_ns, &names);
        // Other interfaces first, so the pods' indexes differ from layout to layout.
        let fillers = r.below(4);
        for i in 0..fillers {
            layout.ip(&node, &format!("link add filler{i}a type veth peer name filler{i}b"));
        }
        let mut script = format!("link add {bridge} type bridge\naddr add {gateway}/24 dev {bridge}\nlink set {bridge} up");
        if r.below(2) == 0 {
            // The bridge made after the pods' veths, as when cni0 is recreated.
            script = String::new();
        }
        layout.ip(&node, &script);
        for p in &pods {
            layout.ip(&node, &format!("link add {} type veth peer name eth0 netns {}", p.host_veth, layout.ns(&p.name)));
        }
        if script.is_empty() {
            layout.ip(&node, &format!("link add {bridge} type bridge\naddr add {gateway}/24 dev {bridge}\nlink set {bridge} up"));
        }
        for p in &pods {
            layout.ip(&node, &format!("link set {} master {bridge}\nlink set {} up", p.host_veth, p.host_veth));
            layout.ip(&p.name, &format!("addr add {}/24 dev eth0\nlink set eth0 up\nlink set lo up\nroute add default via {gateway}", p.ip));
        }
        let about = format!(
            "seed {seed}: node {node} ({}), bridge {bridge} {gateway}/24, {} fillers first, {} veths, pods {}",
            layout.ns(&node),
            fillers,
            if cni_style { "CNI-style" } else { "hand-named" },
            pods.iter().map(|p| format!("{} {} ({})", p.name, p.ip, p.host_veth)).collect::<Vec<_>>().join(", ")
        );
        Generated { seed, layout, node, bridge, gateway, prefix: 24, pods, about }
    }

    /// Every namespace of the layout, full names.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.layout.ns(&self.node)).chain(self.pods.iter().map(|p| self.layout.ns(&p.name))).collect()
    }
}

/// A fault a one-node layout can hold, on the pair (pods[0] → pods[1]): its name, the cause follow must
/// name, and the hop's interface.
pub struct GenFault {
    pub name: &'static str,
    pub cause: &'static str,
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
}

pub const FAULTS: &[GenFault] = &[
    GenFault { name: "veth-detached", cause: "veth-detached", apply: |g| g.layout.ip(&g.node, &format!("link set {} nomaster", g.pods[1].host_veth)), hop: |g| g.pods[1].host_veth.clone() },
    GenFault { name: "veth-down-host", cause: "veth-down", apply: |g| g.layout.ip(&g.node, &format!("link set {} down", g.pods[1].host_veth)), hop: |g| g.pods[1].host_veth.clone() },
    GenFault { name: "veth-down-pod", cause: "veth-down", apply: |g| g.layout.ip(&g.pods[1].name, "link set eth0 down"), hop: |_| "eth0".into() },
    // The kernel drops the source's frame at the bridge's ingress port (br_handle_frame): that port is the hop.
    GenFault { name: "bridge-down", cause: "bridge-down", apply: |g| g.layout.ip(&g.node, &format!("link set {} down", g.bridge)), hop: |g| g.pods[0].host_veth.clone() },
    GenFault {
        name: "bridge-port-blocked",
        cause: "bridge-port-blocked",
        apply: |g| {
            let ns = g.layout.ns(&g.node);
            cnitrace::sys::run(&cnitrace_tools::BRIDGE, &["-n", &ns, "link", "set", "dev", &g.pods[1].host_veth, "state", "0"]).unwrap_or_else(|e| panic!("{e:#}"));
        },
        hop: |g| g.pods[1].host_veth.clone(),
    },
    GenFault {
        name: "neighbor-stale",
        cause: "neighbor-stale",
        apply: |g| g.layout.ip(&g.pods[0].name, &format!("neigh replace {} lladdr 02:00:5e:00:53:01 dev eth0 nud permanent", g.pods[1].ip)),
        // Where the misaddressed frame dies depends on the bridge's FDB: not asserted.
        hop: |_| String::new(),
    },
];
