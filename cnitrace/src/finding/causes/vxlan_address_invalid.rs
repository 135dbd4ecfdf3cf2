//! vxlan-address-invalid: flannel.1 holds no address, 0.0.0.0, or not its subnet's network address /32.

use crate::plan::{Action, Remedy, Step, Target};
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "vxlan-address-invalid", layer: "vxlan", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.cross_node() {
        return None;
    }
    for node in ctx.nodes() {
        let Some(vx) = ctx.vxlan_dev(node) else { continue };
        let addrs: Vec<_> = node.addrs_of(vx.ifindex).collect();
        let bad = addrs.is_empty() || addrs.iter().any(|a| a.addr.is_unspecified() || a.addr.octets()[3] != 0 || a.prefix != 32);
        if !bad {
            continue;
        }
        let held = addrs.iter().map(|a| format!("{}/{}", a.addr, a.prefix)).collect::<Vec<_>>().join(", ");
        let name = ctx.node_name(node);
        return Some(Diagnosis {
            explanation: format!(
                "{} on {name} holds {} instead of its pod subnet's network address as /32 (what flannel writes)",
                vx.name,
                if held.is_empty() { "no address".into() } else { held.clone() }
            ),
            facts: vec![
                format!("{} addresses on {name}: {}", vx.name, if held.is_empty() { "none".into() } else { held }),
                "flannel gives flannel.1 <subnet>.0/32; packets the node itself sends to other nodes' pods take their source from it".into(),
            ],
            hop: Some((name, vx.name.clone())),
        });
    }
    None
}

/// flannel.1 gets its subnet's network address as /32; wrong ones go (undo: the reverse).
fn fix(ctx: &Ctx) -> Remedy {
    for node in ctx.nodes() {
        let Some(vx) = ctx.vxlan_dev(node) else { continue };
        let Some(br) = ctx.pods_bridge(node) else { continue };
        let Some(subnet) = node.addrs_of(br.ifindex).next() else {
            return Remedy::NoSafeFix(format!("{}'s pod subnet is unknown (its bridge has no address)", ctx.node_name(node)));
        };
        let mask = u32::MAX << (32 - subnet.prefix as u32);
        let want = std::net::Ipv4Addr::from(u32::from(subnet.addr) & mask);
        let addrs: Vec<_> = node.addrs_of(vx.ifindex).collect();
        if addrs.iter().any(|a| a.addr == want && a.prefix == 32) && addrs.len() == 1 {
            continue;
        }
        // flannel runs there: its own restart writes the address (the seed's scripts restarted flannel
        // for this); by hand only where flannel is not known to run.
        if let Some(r) = super::restart_flannel(ctx, node, &format!("{} on {} does not hold {want}/32, which flannel gives it", vx.name, ctx.node_name(node))) {
            return r;
        }
        let ns = Target::of(node);
        let mut steps: Vec<Step> = addrs
            .iter()
            .filter(|a| !(a.addr == want && a.prefix == 32))
            .map(|a| Step {
                action: Action::AddrDel { ns: ns.clone(), ifname: vx.name.clone(), addr: a.addr, prefix: a.prefix },
                undo: Action::AddrAdd { ns: ns.clone(), ifname: vx.name.clone(), addr: a.addr, prefix: a.prefix, broadcast: a.broadcast },
                why: format!("{}/{} is not what flannel gives {}", a.addr, a.prefix, vx.name),
            })
            .collect();
        if !addrs.iter().any(|a| a.addr == want) {
            steps.push(Step {
                action: Action::AddrAdd { ns: ns.clone(), ifname: vx.name.clone(), addr: want, prefix: 32, broadcast: None },
                undo: Action::AddrDel { ns, ifname: vx.name.clone(), addr: want, prefix: 32 },
                why: format!("flannel gives {} the network address of {}/{} as /32", vx.name, want, subnet.prefix),
            });
        }
        return Remedy::Steps(steps);
    }
    Remedy::NoSafeFix("flannel.1's address looks right now".into())
}
