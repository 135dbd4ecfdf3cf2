//! plan: the vocabulary of a repair — which namespace (`Target`), which change (`Action`, as the command
//! a person would have typed), a change with its undo and why (`Step`), and what a cause proposes
//! (`Remedy`). The cause files speak it; `fix` applies it (`fix::apply`). It sits below both, so a cause
//! depends on words, not on the engine that carries them out.

use std::{net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{netns, state::NsState};

/// One change with its undo, and why.
#[derive(Clone, Debug)]
pub struct Step {
    pub action: Action,
    pub undo: Action,
    pub why: String,
}

/// What a cause proposes.
#[derive(Clone, Debug)]
pub enum Remedy {
    /// Safe to apply with `--auto`.
    Steps(Vec<Step>),
    /// Removes a rule someone wrote: only with `--allow-rule-removal`.
    RuleRemoval(Vec<Step>),
    /// No safe fix: why, and what would be needed.
    NoSafeFix(String),
}

/// The namespace an action runs in.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Target {
    /// `ip netns` name, "root", or "pid N (comm)".
    pub netns: String,
    pub path: PathBuf,
    pub is_root: bool,
}

impl Target {
    /// Not a namespace: the cluster, reached through the Kubernetes API.
    pub fn cluster() -> Target {
        Target { netns: "cluster".into(), path: PathBuf::new(), is_root: false }
    }

    pub fn of(ns: &NsState) -> Target {
        Target { netns: ns.name.clone(), path: ns.path.clone(), is_root: ns.path.as_os_str() == "/proc/1/ns/net" || ns.name == "root" }
    }
    fn named(&self) -> bool {
        !self.is_root && self.path.starts_with(netns::NETNS_RUN_DIR)
    }
    /// `ip -n NAME` (or nothing in the root namespace) for ip/bridge.
    fn ip_prefix(&self, tool: &str) -> String {
        if self.is_root {
            tool.to_string()
        } else if self.named() {
            format!("{tool} -n {}", self.netns)
        } else {
            format!("nsenter --net={} {tool}", self.path.display())
        }
    }
    /// `ip netns exec NAME` for every other tool.
    fn exec_prefix(&self, tool: &str) -> String {
        if self.is_root {
            tool.to_string()
        } else if self.named() {
            format!("ip netns exec {} {tool}", self.netns)
        } else {
            format!("nsenter --net={} {tool}", self.path.display())
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Action {
    LinkUp { ns: Target, ifname: String },
    LinkDown { ns: Target, ifname: String },
    /// Enslave to `master`, or release from any bridge when None.
    SetMaster { ns: Target, ifname: String, master: Option<String> },
    PortState { ns: Target, ifname: String, state: String },
    /// A bridge port's hairpin mode (a frame may leave by the port it came in by).
    Hairpin { ns: Target, ifname: String, on: bool },
    /// Set a link's hardware address (for a bridge: from then on its own, no longer its lowest port's).
    LinkAddress { ns: Target, ifname: String, mac: String },
    Mtu { ns: Target, ifname: String, mtu: u32 },
    /// `broadcast`: None adds the address without one (as `ip addr add` does).
    AddrAdd { ns: Target, ifname: String, addr: Ipv4Addr, prefix: u8, #[serde(default)] broadcast: Option<Ipv4Addr> },
    AddrDel { ns: Target, ifname: String, addr: Ipv4Addr, prefix: u8 },
    RouteAdd { ns: Target, dst: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>, ifname: String, onlink: bool },
    RouteDel { ns: Target, dst: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>, ifname: String, onlink: bool },
    /// A permanent neighbour entry (replace).
    NeighSet { ns: Target, ifname: String, ip: Ipv4Addr, mac: String },
    NeighDel { ns: Target, ifname: String, ip: Ipv4Addr },
    FdbAdd { ns: Target, ifname: String, mac: String, dst: Ipv4Addr },
    FdbDel { ns: Target, ifname: String, mac: String, dst: Ipv4Addr },
    Sysctl { ns: Target, key: String, value: String },
    /// iptables-restore --noflush lines for one table, e.g. "-I FORWARD 1 -s 10.244.0.0/16 -j ACCEPT".
    Iptables { ns: Target, backend: String, table: String, lines: Vec<String> },
    /// An `nft -f` transaction, e.g. "delete rule inet hardening forward handle 4".
    Nft { ns: Target, script: String },
    /// Through the Kubernetes API: delete a DaemonSet's pod on `node` and wait for its replacement to
    /// be Ready (restarting flannel on one node: flanneld rewrites what it owns from its configuration).
    /// `ns` is the node whose state it is meant to repair.
    RestartPod { ns: Target, namespace: String, pod: String, node: String, app: String },
    /// The undo of what cannot be undone: says so, changes nothing.
    NoUndo { ns: Target, what: String },
    /// Through the Kubernetes API: set one key of a ConfigMap, then restart a DaemonSet's pods as
    /// `kubectl rollout restart` does and wait for all of them to be Ready with the new configuration.
    /// Its undo is the same with the value it had.
    Reconfigure { ns: Target, namespace: String, configmap: String, key: String, value: String, daemonset: String },
}

impl Action {
    /// Goes through the Kubernetes API (restarts a node daemon's pod, or reconfigures and restarts a
    /// DaemonSet): never a node agent's to apply, and what it repairs is written again by the daemon,
    /// a moment after its pod is Ready.
    pub fn through_api(&self) -> bool {
        matches!(self, Action::RestartPod { .. } | Action::Reconfigure { .. })
    }

    pub fn target(&self) -> &Target {
        match self {
            Action::LinkUp { ns, .. }
            | Action::LinkDown { ns, .. }
            | Action::SetMaster { ns, .. }
            | Action::PortState { ns, .. }
            | Action::Hairpin { ns, .. }
            | Action::LinkAddress { ns, .. }
            | Action::Mtu { ns, .. }
            | Action::AddrAdd { ns, .. }
            | Action::AddrDel { ns, .. }
            | Action::RouteAdd { ns, .. }
            | Action::RouteDel { ns, .. }
            | Action::NeighSet { ns, .. }
            | Action::NeighDel { ns, .. }
            | Action::FdbAdd { ns, .. }
            | Action::FdbDel { ns, .. }
            | Action::Sysctl { ns, .. }
            | Action::Iptables { ns, .. }
            | Action::Nft { ns, .. }
            | Action::RestartPod { ns, .. }
            | Action::NoUndo { ns, .. }
            | Action::Reconfigure { ns, .. } => ns,
        }
    }

    /// [`Action::command`] with every line after `first` and `rest` (an iptables action holds one
    /// command per rule: a plan printed only its first line indented).
    pub fn command_lines(&self, first: &str, rest: &str) -> String {
        let cmd = self.command();
        let mut lines = cmd.lines();
        let mut out = format!("{first}{}", lines.next().unwrap_or(""));
        for l in lines {
            out.push('\n');
            out.push_str(rest);
            out.push_str(l);
        }
        out
    }

    /// The command a person would have typed (one line per command).
    pub fn command(&self) -> String {
        let route = |verb: &str, ns: &Target, dst: &Ipv4Addr, prefix: &u8, gw: &Option<Ipv4Addr>, ifname: &str, onlink: &bool| {
            let dst = if *prefix == 0 { "default".to_string() } else { format!("{dst}/{prefix}") };
            let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
            format!("{} route {verb} {dst}{via} dev {ifname}{}", ns.ip_prefix("ip"), if *onlink { " onlink" } else { "" })
        };
        match self {
            Action::LinkUp { ns, ifname } => format!("{} link set {ifname} up", ns.ip_prefix("ip")),
            Action::LinkDown { ns, ifname } => format!("{} link set {ifname} down", ns.ip_prefix("ip")),
            Action::SetMaster { ns, ifname, master: Some(m) } => format!("{} link set {ifname} master {m}", ns.ip_prefix("ip")),
            Action::SetMaster { ns, ifname, master: None } => format!("{} link set {ifname} nomaster", ns.ip_prefix("ip")),
            Action::PortState { ns, ifname, state } => {
                format!("{} link set dev {ifname} state {}", ns.ip_prefix("bridge"), port_state_number(state).unwrap_or(3))
            }
            Action::Hairpin { ns, ifname, on } => format!("{} link set dev {ifname} hairpin {}", ns.ip_prefix("bridge"), if *on { "on" } else { "off" }),
            Action::LinkAddress { ns, ifname, mac } => format!("{} link set {ifname} address {mac}", ns.ip_prefix("ip")),
            Action::Mtu { ns, ifname, mtu } => format!("{} link set {ifname} mtu {mtu}", ns.ip_prefix("ip")),
            Action::AddrAdd { ns, ifname, addr, prefix, broadcast } => format!(
                "{} addr add {addr}/{prefix}{} dev {ifname}",
                ns.ip_prefix("ip"),
                broadcast.map(|b| format!(" brd {b}")).unwrap_or_default()
            ),
            Action::AddrDel { ns, ifname, addr, prefix } => format!("{} addr del {addr}/{prefix} dev {ifname}", ns.ip_prefix("ip")),
            Action::RouteAdd { ns, dst, prefix, gateway, ifname, onlink } => route("add", ns, dst, prefix, gateway, ifname, onlink),
            Action::RouteDel { ns, dst, prefix, gateway, ifname, onlink } => route("del", ns, dst, prefix, gateway, ifname, onlink),
            Action::NeighSet { ns, ifname, ip, mac } => {
                format!("{} neigh replace {ip} lladdr {mac} dev {ifname} nud permanent", ns.ip_prefix("ip"))
            }
            Action::NeighDel { ns, ifname, ip } => format!("{} neigh del {ip} dev {ifname}", ns.ip_prefix("ip")),
            Action::FdbAdd { ns, ifname, mac, dst } => format!("{} fdb append {mac} dev {ifname} dst {dst}", ns.ip_prefix("bridge")),
            Action::FdbDel { ns, ifname, mac, dst } => format!("{} fdb del {mac} dev {ifname} dst {dst}", ns.ip_prefix("bridge")),
            Action::Sysctl { ns, key, value } => format!("{} -w {key}={value}", ns.exec_prefix("sysctl")),
            Action::Iptables { ns, backend, table, lines } => lines
                .iter()
                .map(|l| format!("{} -t {table} {l}", ns.exec_prefix(backend)))
                .collect::<Vec<_>>()
                .join("\n"),
            Action::Nft { ns, script } => format!("{} '{}'", ns.exec_prefix("nft"), script.trim()),
            Action::RestartPod { namespace, pod, node, .. } => {
                format!("kubectl -n {namespace} delete pod {pod}  # and wait for its DaemonSet's new pod on {node} to be Ready")
            }
            Action::NoUndo { what, .. } => format!("# nothing to undo: {what}"),
            Action::Reconfigure { namespace, configmap, key, value, daemonset, .. } => format!(
                "kubectl -n {namespace} patch configmap {configmap} --type merge -p '{}'\nkubectl -n {namespace} rollout restart daemonset {daemonset}  # and wait for its pods to be Ready",
                serde_json::json!({"data": {key.as_str(): value}})
            ),
        }
    }
}

/// Keep a bridge's hardware address while a port joins or leaves it. A bridge whose address nobody set
/// takes its lowest port's, and the kernel recomputes it whenever a port comes or goes: attaching a port
/// with a lower address (or detaching the lowest) changes the gateway's MAC under every other pod, whose
/// neighbour entries go on sending to the old one until they expire — measured on a 3-pod node, the
/// gateway stopped answering the other pods for seconds after a veth was re-attached, and the node check
/// rolled the repair back. Setting the address the bridge has now (the one every pod knows) stops that,
/// as the CNI bridge plugin does for the bridges it makes (cni0's `addr_assign_type` is 3, "set"). A
/// bridge whose address differs from every port's has one set already; one without an IPv4 address or
/// without other ports is nobody's gateway: they need nothing. The step's undo is itself: the address
/// stays the one it is; only the kernel's right to change it is gone (nothing in netlink gives it back).
pub fn keep_bridge_address(ns: &Target, node: &crate::state::NsState, bridge: &crate::state::Link, port: &crate::state::Link) -> Option<Step> {
    let mac = |l: &crate::state::Link| parse_mac(&l.mac);
    let own = mac(bridge)?;
    let ports: Vec<&crate::state::Link> = node.links.iter().filter(|l| l.master == Some(bridge.ifindex)).collect();
    let lowest = ports.iter().filter_map(|p| mac(p)).min();
    // Set by hand (or by the CNI bridge plugin): the kernel leaves it alone.
    if lowest.is_some_and(|l| l != own) {
        return None;
    }
    let gateway = node.addrs_of(bridge.ifindex).next().is_some();
    let others = ports.iter().any(|p| p.ifindex != port.ifindex);
    if !gateway || !others {
        return None;
    }
    let joins = !ports.iter().any(|p| p.ifindex == port.ifindex);
    let changes = if joins { mac(port).is_some_and(|m| m < own) } else { lowest == mac(port) };
    if !changes {
        return None;
    }
    let keep = Action::LinkAddress { ns: ns.clone(), ifname: bridge.name.clone(), mac: bridge.mac.clone() };
    Some(Step {
        action: keep.clone(),
        undo: keep,
        why: format!(
            "{} would otherwise take {}'s address {} and its other pods would go on sending to their gateway's old MAC {} (from now on the bridge's own, as CNI sets it; the undo keeps it)",
            bridge.name, port.name, port.mac, bridge.mac
        ),
    })
}

pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>().ok()?;
    v.try_into().ok()
}

/// A bridge port state's number, as `bridge link set … state N` takes it.
pub(crate) fn port_state_number(s: &str) -> Option<u8> {
    Some(match s {
        "disabled" => 0,
        "listening" => 1,
        "learning" => 2,
        "forwarding" => 3,
        "blocking" => 4,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab_node() -> Target {
        Target { netns: "cnitrace-storagenodet3500".into(), path: "/run/netns/cnitrace-storagenodet3500".into(), is_root: false }
    }

    #[test]
    fn commands_read_like_what_a_person_types() {
        let ns = lab_node();
        let a = Action::SetMaster { ns: ns.clone(), ifname: "veth1".into(), master: Some("cni0".into()) };
        assert_eq!(a.command(), "ip -n cnitrace-storagenodet3500 link set veth1 master cni0");
        let a = Action::RouteAdd { ns: ns.clone(), dst: "10.244.1.0".parse().unwrap(), prefix: 24, gateway: Some("10.244.1.0".parse().unwrap()), ifname: "flannel.1".into(), onlink: true };
        assert_eq!(a.command(), "ip -n cnitrace-storagenodet3500 route add 10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink");
        let a = Action::Sysctl { ns: ns.clone(), key: "net.ipv4.ip_forward".into(), value: "1".into() };
        assert_eq!(a.command(), "ip netns exec cnitrace-storagenodet3500 sysctl -w net.ipv4.ip_forward=1");
        let root = Target { netns: "root".into(), path: "/proc/1/ns/net".into(), is_root: true };
        let a = Action::LinkUp { ns: root, ifname: "cni0".into() };
        assert_eq!(a.command(), "ip link set cni0 up");
    }

    #[test]
    fn an_action_of_several_commands_is_indented_on_every_line() {
        let a = Action::Iptables {
            ns: lab_node(),
            backend: "iptables-nft".into(),
            table: "filter".into(),
            lines: vec!["-A FORWARD -s 10.244.0.0/16 -j ACCEPT".into(), "-A FORWARD -d 10.244.0.0/16 -j ACCEPT".into()],
        };
        assert_eq!(
            a.command_lines("  ", "  "),
            "  ip netns exec cnitrace-storagenodet3500 iptables-nft -t filter -A FORWARD -s 10.244.0.0/16 -j ACCEPT\n  ip netns exec cnitrace-storagenodet3500 iptables-nft -t filter -A FORWARD -d 10.244.0.0/16 -j ACCEPT"
        );
        assert_eq!(a.command_lines("apply: ", "       ").lines().nth(1).map(|l| l.starts_with("       ip netns")), Some(true));
    }

    fn link(ifindex: u32, name: &str, mac: &str, master: Option<u32>) -> crate::state::Link {
        crate::state::Link { ifindex, name: name.into(), mac: mac.into(), master, ..Default::default() }
    }

    #[test]
    fn a_bridge_keeps_its_address_only_when_the_kernel_would_change_it() {
        let ns = lab_node();
        let br = link(2, "br-x", "02:00:00:00:00:05", None);
        let (a, c) = (link(3, "a-h", "02:00:00:00:00:05", Some(2)), link(5, "c-h", "52:00:00:00:00:09", Some(2)));
        let low = link(4, "b-h", "02:00:00:00:00:01", None);
        let high = link(4, "b-h", "aa:00:00:00:00:01", None);
        let gw = crate::state::Addr { ifindex: 2, addr: "10.1.2.1".parse().unwrap(), prefix: 24, broadcast: None };
        let node = |links: Vec<crate::state::Link>| crate::state::NsState { links, addrs: vec![gw.clone()], ..Default::default() };
        let n = node(vec![br.clone(), a.clone(), c.clone(), low.clone()]);
        // The bridge has its lowest port's address: a lower one joining would take over.
        let step = keep_bridge_address(&ns, &n, &br, &low).expect("a step");
        assert_eq!(step.action.command(), "ip -n cnitrace-storagenodet3500 link set br-x address 02:00:00:00:00:05");
        assert_eq!(step.undo, step.action);
        // A higher one joining changes nothing.
        assert!(keep_bridge_address(&ns, &n, &br, &high).is_none());
        // The lowest port leaving would hand the bridge the next one's; another leaving, nothing.
        assert!(keep_bridge_address(&ns, &n, &br, &a).is_some());
        assert!(keep_bridge_address(&ns, &n, &br, &c).is_none());
        // An address set by hand (none of the ports has it) stays whatever joins.
        let set = link(2, "cni0", "0a:58:0a:f4:00:01", None);
        assert!(keep_bridge_address(&ns, &node(vec![set.clone(), c.clone()]), &set, &low).is_none());
        // Nobody's gateway: no address, or its last port leaving.
        let bare = crate::state::NsState { links: vec![br.clone(), a.clone(), c.clone()], ..Default::default() };
        assert!(keep_bridge_address(&ns, &bare, &br, &low).is_none());
        let alone = link(3, "a-h", "02:00:00:00:00:05", Some(2));
        assert!(keep_bridge_address(&ns, &node(vec![br.clone(), alone.clone()]), &br, &alone).is_none());
    }
}
