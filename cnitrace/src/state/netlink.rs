//! Links, addresses, routes, neighbours and FDB of the current thread's namespace, through rtnetlink.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{
            InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
            State,
        },
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteType},
        AddressFamily,
    },
    Handle, RouteMessageBuilder,
};

use super::{Addr, Fdb, Link, Neigh, NsState, Route, Vxlan};

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")
}

/// Full read: links, addresses, routes, neighbours, FDB.
pub fn read() -> Result<NsState> {
    runtime()?.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().context("open rtnetlink")?;
        tokio::spawn(conn);
        let mut st = NsState { links: links(&handle).await?, addrs: addrs(&handle).await?, ..Default::default() };
        st.routes = routes(&handle).await?;
        let (neighbours, fdb) = neighbours(&handle).await?;
        st.neighbours = neighbours;
        st.fdb = fdb;
        Ok(st)
    })
}

pub fn read_links_addrs() -> Result<NsState> {
    runtime()?.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().context("open rtnetlink")?;
        tokio::spawn(conn);
        Ok(NsState { links: links(&handle).await?, addrs: addrs(&handle).await?, ..Default::default() })
    })
}

/// Only the IPv4 routes (every table).
pub fn read_routes() -> Result<Vec<Route>> {
    runtime()?.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().context("open rtnetlink")?;
        tokio::spawn(conn);
        routes(&handle).await
    })
}

/// Only the neighbour table (IPv4).
pub fn read_neighbours() -> Result<Vec<Neigh>> {
    runtime()?.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().context("open rtnetlink")?;
        tokio::spawn(conn);
        Ok(neighbours(&handle).await?.0)
    })
}

fn mac_str(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")
}

fn oper_str(s: &State) -> String {
    match s {
        State::Up => "up",
        State::Down => "down",
        State::LowerLayerDown => "lowerlayerdown",
        State::Dormant => "dormant",
        State::NotPresent => "notpresent",
        State::Testing => "testing",
        _ => "unknown",
    }
    .to_string()
}

fn link_from(msg: LinkMessage) -> Link {
    let mut l = Link {
        ifindex: msg.header.index,
        admin_up: msg.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in msg.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::Mtu(m) => l.mtu = m,
            LinkAttribute::Address(b) => l.mac = mac_str(&b),
            LinkAttribute::Controller(m) => l.master = Some(m),
            LinkAttribute::Link(p) => l.peer_ifindex = Some(p),
            LinkAttribute::LinkNetNsId(id) => l.peer_netnsid = Some(id),
            LinkAttribute::OperState(s) => l.oper = oper_str(&s),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => {
                            l.kind = match k {
                                InfoKind::Veth => "veth".into(),
                                InfoKind::Bridge => "bridge".into(),
                                InfoKind::Vxlan => "vxlan".into(),
                                InfoKind::Dummy => "dummy".into(),
                                other => format!("{other:?}").to_lowercase(),
                            }
                        }
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            let mut vx = Vxlan { learning: true, ..Default::default() };
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => vx.vni = id,
                                    InfoVxlan::Port(p) => vx.port = p,
                                    InfoVxlan::Local(a) => vx.local = Some(a),
                                    InfoVxlan::Learning(b) => vx.learning = b,
                                    _ => {}
                                }
                            }
                            l.vxlan = Some(vx);
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(attrs)) => {
                            for x in attrs {
                                match x {
                                    InfoBridgePort::State(s) => l.port_state = Some(format!("{s:?}").to_lowercase()),
                                    InfoBridgePort::HairpinMode(on) => l.hairpin = Some(on),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    l
}

async fn links(h: &Handle) -> Result<Vec<Link>> {
    let msgs: Vec<LinkMessage> = h.link().get().execute().try_collect().await.context("dump links")?;
    Ok(msgs.into_iter().map(link_from).collect())
}

async fn addrs(h: &Handle) -> Result<Vec<Addr>> {
    let msgs: Vec<_> = h.address().get().execute().try_collect().await.context("dump addresses")?;
    let mut out = Vec::new();
    for m in msgs {
        if m.header.family != AddressFamily::Inet {
            continue;
        }
        let addr = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(v)) => Some(*v),
            _ => None,
        });
        let addr = addr.or_else(|| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(v)) => Some(*v),
                _ => None,
            })
        });
        let broadcast = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Broadcast(b) => Some(*b),
            _ => None,
        });
        if let Some(addr) = addr {
            out.push(Addr { ifindex: m.header.index, addr, prefix: m.header.prefix_len, broadcast });
        }
    }
    Ok(out)
}

async fn routes(h: &Handle) -> Result<Vec<Route>> {
    let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let msgs: Vec<_> = h.route().get(req).execute().try_collect().await.context("dump routes")?;
    let mut out = Vec::new();
    for m in msgs {
        let mut r = Route {
            table: m.header.table as u32,
            dst: Ipv4Addr::UNSPECIFIED,
            prefix: m.header.destination_prefix_length,
            gateway: None,
            oif: None,
            kind: match m.header.kind {
                RouteType::Unicast => "unicast".into(),
                RouteType::Local => "local".into(),
                RouteType::Broadcast => "broadcast".into(),
                RouteType::Unreachable => "unreachable".into(),
                RouteType::BlackHole => "blackhole".into(),
                RouteType::Prohibit => "prohibit".into(),
                other => format!("{other:?}").to_lowercase(),
            },
        };
        for a in m.attributes {
            match a {
                RouteAttribute::Table(t) => r.table = t,
                RouteAttribute::Destination(RouteAddress::Inet(d)) => r.dst = d,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(g),
                RouteAttribute::Oif(o) => r.oif = Some(o),
                _ => {}
            }
        }
        out.push(r);
    }
    Ok(out)
}

fn neigh_state(s: NeighbourState) -> String {
    match s {
        NeighbourState::Incomplete => "incomplete",
        NeighbourState::Reachable => "reachable",
        NeighbourState::Stale => "stale",
        NeighbourState::Delay => "delay",
        NeighbourState::Probe => "probe",
        NeighbourState::Failed => "failed",
        NeighbourState::Noarp => "noarp",
        NeighbourState::Permanent => "permanent",
        _ => "none",
    }
    .to_string()
}

/// The neighbours and the FDB as two dumps in a row agree on them. The kernel resumes a dump that spans
/// several reads by position (hash bucket, index in it), and the neighbour table is one for every
/// namespace: when it grows or changes between two reads of one dump (pods coming up on the node), an
/// entry can be listed twice or not at all (seen: a VTEP's permanent neighbour listed twice). A missing
/// neighbour or FDB entry is a cause (vxlan-neigh-missing, vxlan-fdb-missing) that `fix` acts on, so it
/// must not come from a torn dump: each is read again until two reads list the same entries (at most
/// `DUMP_READS`; then every entry any read listed), each entry once.
async fn neighbours(h: &Handle) -> Result<(Vec<Neigh>, Vec<Fdb>)> {
    let (mut n, mut f) = (Vec::new(), Vec::new());
    for _ in 0..DUMP_READS {
        let (neighbours, fdb) = neighbours_once(h).await?;
        n.push(neighbours);
        f.push(fdb);
        if last_two_agree(&n, neigh_key) && last_two_agree(&f, fdb_key) {
            break;
        }
    }
    Ok((settled(n, neigh_key), settled(f, fdb_key)))
}

const DUMP_READS: usize = 4;

fn neigh_key(n: &Neigh) -> (u32, Ipv4Addr) {
    (n.ifindex, n.ip)
}

fn fdb_key(f: &Fdb) -> (u32, String, Option<Ipv4Addr>) {
    (f.ifindex, f.mac.clone(), f.dst)
}

/// Whether the last two reads list the same entries (each read's repeats aside).
fn last_two_agree<T, K: Ord>(reads: &[Vec<T>], key: fn(&T) -> K) -> bool {
    let keys = |v: &[T]| v.iter().map(key).collect::<std::collections::BTreeSet<K>>();
    matches!(reads, [.., a, b] if keys(a) == keys(b))
}

/// One list from reads of the same dump: when the last two agree, the last; otherwise every entry any
/// read listed (the latest reading of each). Each entry once, in the order the kernel listed them.
fn settled<T, K: Ord + Clone>(reads: Vec<Vec<T>>, key: fn(&T) -> K) -> Vec<T> {
    let reads: Vec<Vec<T>> = if last_two_agree(&reads, key) { reads.into_iter().last().into_iter().collect() } else { reads };
    let mut at: std::collections::BTreeMap<K, usize> = std::collections::BTreeMap::new();
    let mut out: Vec<T> = Vec::new();
    for entry in reads.into_iter().flatten() {
        match at.get(&key(&entry)) {
            Some(&i) => out[i] = entry,
            None => {
                at.insert(key(&entry), out.len());
                out.push(entry);
            }
        }
    }
    out
}

async fn neighbours_once(h: &Handle) -> Result<(Vec<Neigh>, Vec<Fdb>)> {
    let v4: Vec<NeighbourMessage> =
        h.neighbours().get().set_address_family(AddressFamily::Inet).execute().try_collect().await.context("dump neighbours")?;
    let mut neighbours = Vec::new();
    for m in v4 {
        let ip = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => Some(*v),
            _ => None,
        });
        let mac = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(b) => Some(mac_str(b)),
            _ => None,
        });
        if let Some(ip) = ip {
            neighbours.push(Neigh { ifindex: m.header.ifindex, ip, mac, state: neigh_state(m.header.state) });
        }
    }
    let br: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .context("dump the FDB")?;
    let mut fdb = Vec::new();
    for m in br {
        let mac = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(b) => Some(mac_str(b)),
            _ => None,
        });
        // AF_BRIDGE entries carry the VXLAN remote as raw bytes.
        let dst = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => Some(*v),
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => Some(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            _ => None,
        });
        if let Some(mac) = mac {
            fdb.push(Fdb { ifindex: m.header.ifindex, mac, dst });
        }
    }
    Ok((neighbours, fdb))
}

/// The nsid the namespace opened by `target` has as seen from the current thread's namespace
/// (RTM_GETNSID with its fd, as `ip netns list-id` asks): what this namespace's links name in
/// IFLA_LINK_NETNSID. None where it has none here.
pub fn nsid_of(target: &std::path::Path) -> Result<Option<i32>> {
    use std::os::fd::AsRawFd;

    use futures_util::StreamExt;
    use rtnetlink::{
        packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST},
        packet_route::{
            nsid::{NsidAttribute, NsidMessage},
            RouteNetlinkMessage,
        },
    };
    let file = std::fs::File::open(target).with_context(|| format!("open namespace {}", target.display()))?;
    runtime()?.block_on(async {
        let (conn, mut handle, _) = rtnetlink::new_connection().context("open rtnetlink")?;
        tokio::spawn(conn);
        let mut msg = NsidMessage::default();
        msg.attributes = vec![NsidAttribute::Fd(file.as_raw_fd() as u32)];
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut answers = handle.request(req).context("RTM_GETNSID")?;
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    let id = m.attributes.iter().find_map(|a| if let NsidAttribute::Id(id) = a { Some(*id) } else { None });
                    return Ok(id.filter(|id| *id >= 0));
                }
                NetlinkPayload::Error(e) => return Err(anyhow::anyhow!("RTM_GETNSID: {e}")),
                _ => {}
            }
        }
        Ok(None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(ifindex: u32, ip: [u8; 4], state: &str) -> Neigh {
        Neigh { ifindex, ip: Ipv4Addr::from(ip), mac: None, state: state.into() }
    }

    #[test]
    fn reads_that_agree_give_the_last_each_entry_once() {
        // A torn dump repeated the VTEP's entry; the key sets still agree.
        let first = vec![n(5, [10, 244, 1, 0], "permanent"), n(2, [10, 244, 0, 20], "reachable")];
        let second = vec![n(5, [10, 244, 1, 0], "permanent"), n(2, [10, 244, 0, 20], "stale"), n(5, [10, 244, 1, 0], "permanent")];
        let got = settled(vec![first, second], neigh_key);
        assert_eq!(got, vec![n(5, [10, 244, 1, 0], "permanent"), n(2, [10, 244, 0, 20], "stale")]);
    }

    #[test]
    fn reads_that_never_agree_keep_every_entry_any_read_listed() {
        // Each read skipped another entry: none is claimed missing.
        let reads = vec![
            vec![n(5, [10, 244, 1, 0], "permanent")],
            vec![n(5, [10, 244, 2, 0], "permanent")],
            vec![n(5, [10, 244, 1, 0], "permanent"), n(2, [10, 244, 0, 20], "reachable")],
            vec![n(5, [10, 244, 2, 0], "permanent"), n(2, [10, 244, 0, 20], "stale")],
        ];
        let got = settled(reads, neigh_key);
        assert_eq!(got, vec![n(5, [10, 244, 1, 0], "permanent"), n(5, [10, 244, 2, 0], "permanent"), n(2, [10, 244, 0, 20], "stale")]);
    }
}
