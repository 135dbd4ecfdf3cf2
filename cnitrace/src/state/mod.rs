//! The node's state, as one snapshot type: what diagnosis reads next to the trace, and what `fix` will
//! compare and restore. Links, addresses, routes, neighbours and FDB come from netlink (rtnetlink) in the
//! namespace they belong to; sysctls from /proc/sys opened inside it; rule sets from the backends' own
//! save commands run inside it.

mod netlink;
pub mod rules;
pub mod services;

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::netns::{self, NetNs};
pub use rules::RuleSets;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// rtnetlink kind: "veth", "bridge", "vxlan", "" for plain devices.
    pub kind: String,
    /// IFF_UP: administratively up.
    pub admin_up: bool,
    /// Operational state: "up", "down", "lowerlayerdown", "unknown".
    pub oper: String,
    pub mtu: u32,
    pub mac: String,
    /// ifindex of the bridge this link is a port of.
    pub master: Option<u32>,
    /// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
    pub peer_ifindex: Option<u32>,
    /// The peer lives in another namespace.
    pub peer_netnsid: Option<i32>,
    /// Bridge port state, when this link is a bridge port.
    pub port_state: Option<String>,
    /// Bridge port hairpin mode, when this link is a bridge port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hairpin: Option<bool>,
    pub vxlan: Option<Vxlan>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vxlan {
    pub vni: u32,
    pub port: u16,
    pub local: Option<Ipv4Addr>,
    pub learning: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Addr {
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    /// IFA_BROADCAST, when the address has one (a restored address must look the same).
    #[serde(default)]
    pub broadcast: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    /// "unicast", "local", "broadcast", "unreachable", ...
    pub kind: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Neigh {
    pub ifindex: u32,
    pub ip: Ipv4Addr,
    pub mac: Option<String>,
    /// "reachable", "stale", "failed", "incomplete", "permanent", "noarp", ...
    pub state: String,
}

/// A bridge/VXLAN forwarding entry (AF_BRIDGE neighbour).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fdb {
    pub ifindex: u32,
    pub mac: String,
    /// VXLAN remote (underlay) address.
    pub dst: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sysctls {
    pub ip_forward: Option<u8>,
    /// net.ipv4.conf.<name>.rp_filter, including "all" and "default".
    pub rp_filter: BTreeMap<String, u8>,
    pub bridge_nf_call_iptables: Option<u8>,
}

/// One network namespace's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NsState {
    pub inode: u32,
    pub name: String,
    /// A path that opens the namespace (fix actions enter it); empty in old recordings.
    #[serde(default)]
    pub path: std::path::PathBuf,
    pub links: Vec<Link>,
    pub addrs: Vec<Addr>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neigh>,
    pub fdb: Vec<Fdb>,
    pub sysctls: Sysctls,
    pub rules: RuleSets,
}

pub const MAIN_TABLE: u32 = 254;

impl NsState {
    pub fn link(&self, ifindex: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.ifindex == ifindex)
    }
    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }
    pub fn ifname(&self, ifindex: u32) -> String {
        self.link(ifindex).map(|l| l.name.clone()).unwrap_or_else(|| format!("if{ifindex}"))
    }
    pub fn addrs_of(&self, ifindex: u32) -> impl Iterator<Item = &Addr> {
        self.addrs.iter().filter(move |a| a.ifindex == ifindex)
    }
    pub fn has_addr(&self, ip: Ipv4Addr) -> Option<&Addr> {
        self.addrs.iter().find(|a| a.addr == ip)
    }
    /// Longest-prefix match in the main table (what forwarding to `dst` would use).
    pub fn route_to(&self, dst: Ipv4Addr) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.table == MAIN_TABLE && in_prefix(dst, r.dst, r.prefix))
            .max_by_key(|r| r.prefix)
    }
    pub fn neigh(&self, ifindex: u32, ip: Ipv4Addr) -> Option<&Neigh> {
        self.neighbours.iter().find(|n| n.ifindex == ifindex && n.ip == ip)
    }
    pub fn rp_filter(&self, ifname: &str) -> u8 {
        // The kernel uses the larger of "all" and the interface's own value.
        let all = self.sysctls.rp_filter.get("all").copied().unwrap_or(0);
        let own = self.sysctls.rp_filter.get(ifname).copied().unwrap_or(0);
        all.max(own)
    }
}

pub fn in_prefix(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - prefix as u32);
    (u32::from(ip) & mask) == (u32::from(net) & mask)
}

/// Reads the state of one namespace (on a thread inside it).
pub fn snapshot(ns: &NetNs) -> Result<NsState> {
    let (inode, name, path) = (ns.inode, ns.name.clone(), ns.path.clone());
    let path_for_state = path.clone();
    netns::in_netns(&path, move || {
        let mut st = netlink::read()?;
        st.inode = inode;
        st.name = name;
        st.path = path_for_state;
        st.sysctls = read_sysctls(&st.links);
        st.rules = rules::read();
        Ok(st)
    })
}

/// Reads only links and addresses (resolution needs no more; much cheaper than a full snapshot).
pub fn links_and_addrs(ns: &NetNs) -> Result<NsState> {
    let (inode, name, path) = (ns.inode, ns.name.clone(), ns.path.clone());
    netns::in_netns(&path, move || {
        let mut st = netlink::read_links_addrs()?;
        st.inode = inode;
        st.name = name;
        Ok(st)
    })
}

fn read_u8(path: &str) -> Option<u8> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// /proc/sys/net is per namespace of the opening thread: call inside the namespace.
fn read_sysctls(links: &[Link]) -> Sysctls {
    let mut rp = BTreeMap::new();
    for name in ["all", "default"].into_iter().map(String::from).chain(links.iter().map(|l| l.name.clone())) {
        if let Some(v) = read_u8(&format!("/proc/sys/net/ipv4/conf/{name}/rp_filter")) {
            rp.insert(name, v);
        }
    }
    Sysctls {
        ip_forward: read_u8("/proc/sys/net/ipv4/ip_forward"),
        rp_filter: rp,
        bridge_nf_call_iptables: read_u8("/proc/sys/net/bridge/bridge-nf-call-iptables"),
    }
}

/// The rule sets of the current thread's namespace (call inside it).
pub fn rules_now() -> RuleSets {
    rules::read()
}

/// The nsid the namespace at `target` has as seen from the namespace at `from` (what links in `from`
/// name as their peer's IFLA_LINK_NETNSID); None where it has none there.
pub fn nsid_of(from: &std::path::Path, target: &std::path::Path) -> Result<Option<i32>> {
    let target = target.to_path_buf();
    netns::in_netns(from, move || netlink::nsid_of(&target))
}

/// The IPv4 routes of the namespace at `path`.
pub fn routes(path: &std::path::Path) -> Result<Vec<Route>> {
    netns::in_netns(path, netlink::read_routes)
}

/// The IPv4 neighbour table of the namespace at `path`.
pub fn neighbours(path: &std::path::Path) -> Result<Vec<Neigh>> {
    netns::in_netns(path, netlink::read_neighbours)
}
