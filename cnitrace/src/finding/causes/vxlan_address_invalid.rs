//! vxlan-address-invalid: flannel.1 holds no address, 0.0.0.0, or not its subnet's network address /32.

use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "vxlan-address-invalid", layer: "vxlan", hop_from_state: true, detect };

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
