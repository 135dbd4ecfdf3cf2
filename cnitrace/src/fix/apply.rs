//! apply: an `Action` carried out in the namespace it belongs to — netlink for links, addresses, routes,
//! neighbours, FDB and bridge ports; /proc/sys for sysctls; iptables-restore / nft transactions for rules.
//! Its inverse is another `Action`, computed by the cause from the state before anything changes.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{anyhow, bail, Context, Result};
use cnitrace_tools as tools;
use futures_util::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::LinkAttribute,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
        AddressFamily,
    },
    Handle, LinkUnspec, RouteMessageBuilder,
};
use crate::{netns, plan::Action, sys};

impl Action {
    /// Applies the action inside its namespace.
    pub fn apply(&self) -> Result<()> {
        // The API's, not a namespace's.
        match self {
            Action::NoUndo { .. } => return Ok(()),
            Action::RestartPod { namespace, pod, node, app, .. } => {
                let mut c = crate::k8s::connect_configured().map_err(|e| anyhow!("restart {namespace}/{pod}: {e}"))?;
                c.restart_pod(namespace, pod, node, app)?;
                return Ok(());
            }
            Action::Reconfigure { namespace, configmap, key, value, daemonset, .. } => {
                let mut c = crate::k8s::connect_configured().map_err(|e| anyhow!("reconfigure {namespace}/{configmap}: {e}"))?;
                c.reconfigure(namespace, configmap, key, value, daemonset)?;
                return Ok(());
            }
            _ => {}
        }
        let path = self.target().path.clone();
        if path.as_os_str().is_empty() {
            bail!("no namespace path recorded for {}", self.target().netns);
        }
        let me = self.clone();
        netns::in_netns(&path, move || me.apply_here()).with_context(|| format!("`{}`", self.command()))
    }

    fn apply_here(&self) -> Result<()> {
        match self {
            Action::Sysctl { key, value, .. } => sys::write_sysctl(key, value),
            Action::Iptables { backend, table, lines, .. } => {
                let restore = match backend.as_str() {
                    "iptables-nft" => &tools::IPTABLES_NFT_RESTORE,
                    "iptables-legacy" => &tools::IPTABLES_LEGACY_RESTORE,
                    other => bail!("no iptables backend {other:?}"),
                };
                let input = format!("*{table}\n{}\nCOMMIT\n", lines.join("\n"));
                sys::run_stdin(restore, &["--noflush", "-w"], &input).map(|_| ())
            }
            Action::Nft { script, .. } => sys::run_stdin(&tools::NFT, &["-f", "-"], &format!("{script}\n")).map(|_| ()),
            // Through IFLA_PROTINFO, as `bridge link set` sends it: through the link's slave data (what
            // rtnetlink's LinkBridgePort sends) the kernel does not keep a port disabled — measured, the
            // port came back forwarding, so every rollback of a port fix left it open.
            Action::PortState { ifname, state, .. } => {
                let n = crate::plan::port_state_number(state).ok_or_else(|| anyhow!("unknown bridge port state {state}"))?;
                sys::run(&tools::BRIDGE, &["link", "set", "dev", ifname, "state", &n.to_string()]).map(|_| ())
            }
            Action::Hairpin { ifname, on, .. } => sys::run(&tools::BRIDGE, &["link", "set", "dev", ifname, "hairpin", if *on { "on" } else { "off" }]).map(|_| ()),
            _ => {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let (conn, handle, _) = rtnetlink::new_connection().context("open rtnetlink")?;
                    tokio::spawn(conn);
                    self.netlink(&handle).await
                })
            }
        }
    }

    async fn netlink(&self, h: &Handle) -> Result<()> {
        match self {
            Action::LinkUp { ifname, .. } => {
                let i = index(h, ifname).await?;
                Ok(h.link().set(LinkUnspec::new_with_index(i).up().build()).execute().await?)
            }
            Action::LinkDown { ifname, .. } => {
                let i = index(h, ifname).await?;
                Ok(h.link().set(LinkUnspec::new_with_index(i).down().build()).execute().await?)
            }
            Action::SetMaster { ifname, master, .. } => {
                let i = index(h, ifname).await?;
                let msg = match master {
                    Some(m) => LinkUnspec::new_with_index(i).controller(index(h, m).await?).build(),
                    None => LinkUnspec::new_with_index(i).nocontroller().build(),
                };
                Ok(h.link().set(msg).execute().await?)
            }
            Action::LinkAddress { ifname, mac, .. } => {
                let i = index(h, ifname).await?;
                Ok(h.link().set(LinkUnspec::new_with_index(i).address(parse_mac(mac)?).build()).execute().await?)
            }
            Action::Mtu { ifname, mtu, .. } => {
                let i = index(h, ifname).await?;
                Ok(h.link().set(LinkUnspec::new_with_index(i).mtu(*mtu).build()).execute().await?)
            }
            Action::AddrAdd { ifname, addr, prefix, broadcast, .. } => {
                let i = index(h, ifname).await?;
                let mut req = h.address().add(i, IpAddr::V4(*addr), *prefix);
                // rtnetlink adds a broadcast address by itself; keep exactly the one asked for.
                let attrs = &mut req.message_mut().attributes;
                attrs.retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
                if let Some(b) = broadcast {
                    attrs.push(AddressAttribute::Broadcast(*b));
                }
                Ok(req.execute().await?)
            }
            Action::AddrDel { ifname, addr, prefix, .. } => {
                let i = index(h, ifname).await?;
                let msgs: Vec<_> = h.address().get().set_link_index_filter(i).execute().try_collect().await?;
                let msg = msgs
                    .into_iter()
                    .find(|m| {
                        m.header.prefix_len == *prefix
                            && m.attributes.iter().any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(v)) if v == addr))
                    })
                    .ok_or_else(|| anyhow!("{addr}/{prefix} is not on {ifname}"))?;
                Ok(h.address().del(msg).execute().await?)
            }
            Action::RouteAdd { dst, prefix, gateway, ifname, onlink, .. } => {
                let msg = route_msg(h, *dst, *prefix, *gateway, ifname, *onlink).await?;
                Ok(h.route().add(msg).execute().await?)
            }
            Action::RouteDel { dst, prefix, gateway, ifname, onlink, .. } => {
                let msg = route_msg(h, *dst, *prefix, *gateway, ifname, *onlink).await?;
                Ok(h.route().del(msg).execute().await?)
            }
            Action::NeighSet { ifname, ip, mac, .. } => {
                let i = index(h, ifname).await?;
                Ok(h
                    .neighbours()
                    .add(i, IpAddr::V4(*ip))
                    .link_layer_address(&parse_mac(mac)?)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await?)
            }
            Action::NeighDel { ifname, ip, .. } => {
                let i = index(h, ifname).await?;
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.ifindex = i;
                m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip)));
                Ok(h.neighbours().del(m).execute().await?)
            }
            Action::FdbAdd { ifname, mac, dst, .. } => {
                let i = index(h, ifname).await?;
                let mut req = h.neighbours().add_bridge(i, &parse_mac(mac)?).destination(IpAddr::V4(*dst)).state(NeighbourState::Permanent);
                req.message_mut().header.flags = NeighbourFlags::Own;
                Ok(req.execute().await?)
            }
            Action::FdbDel { ifname, mac, dst, .. } => {
                let i = index(h, ifname).await?;
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = i;
                m.header.flags = NeighbourFlags::Own;
                m.attributes.push(NeighbourAttribute::LinkLayerAddress(parse_mac(mac)?));
                m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*dst)));
                Ok(h.neighbours().del(m).execute().await?)
            }
            Action::Sysctl { .. } | Action::Iptables { .. } | Action::Nft { .. } | Action::PortState { .. } | Action::Hairpin { .. } | Action::RestartPod { .. } | Action::NoUndo { .. } | Action::Reconfigure { .. } => {
                unreachable!("not netlink")
            }
        }
    }
}

async fn index(h: &Handle, name: &str) -> Result<u32> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    let link = links.try_next().await.with_context(|| format!("no link {name}"))?.ok_or_else(|| anyhow!("no link {name}"))?;
    // Names are what people type; indexes are what the kernel wants.
    debug_assert!(link.attributes.iter().any(|a| matches!(a, LinkAttribute::IfName(n) if n == name)));
    Ok(link.header.index)
}

async fn route_msg(
    h: &Handle,
    dst: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    ifname: &str,
    onlink: bool,
) -> Result<rtnetlink::packet_route::route::RouteMessage> {
    let i = index(h, ifname).await?;
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, prefix).output_interface(i);
    if let Some(g) = gateway {
        b = b.gateway(g);
    }
    if onlink {
        b = b.onlink();
    }
    Ok(b.build())
}

fn parse_mac(s: &str) -> Result<Vec<u8>> {
    crate::plan::parse_mac(s).map(|m| m.to_vec()).ok_or_else(|| anyhow!("bad MAC {s}"))
}

