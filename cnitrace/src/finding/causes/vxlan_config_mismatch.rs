//! vxlan-config-mismatch: the nodes' VXLAN devices disagree on the UDP port or the VNI, so the peer
//! drops the encapsulated packets (no socket on that port, or no device for that VNI).

use crate::plan::Remedy;
use super::Cause;
use crate::finding::{Ctx, Diagnosis};

pub const CAUSE: Cause = Cause { id: "vxlan-config-mismatch", layer: "vxlan", detect, fix };

fn detect(ctx: &Ctx) -> Option<Diagnosis> {
    if !ctx.cross_node() {
        return None;
    }
    let (a, b) = (ctx.src_node()?, ctx.dst_node()?);
    let (va, vb) = (ctx.vxlan_dev(a)?, ctx.vxlan_dev(b)?);
    let (xa, xb) = (va.vxlan.as_ref()?, vb.vxlan.as_ref()?);
    let (na, nb) = (ctx.node_name(a), ctx.node_name(b));
    let mut diffs = Vec::new();
    if xa.port != xb.port {
        diffs.push(format!("UDP port {} on {na} vs {} on {nb}", xa.port, xb.port));
    }
    if xa.vni != xb.vni {
        diffs.push(format!("VNI {} on {na} vs {} on {nb}", xa.vni, xb.vni));
    }
    if diffs.is_empty() {
        return None;
    }
    let mut facts = diffs.clone();
    if let Some((conf, wrong)) = against_configmap(ctx, &[(na.as_str(), xa.vni, xa.port), (nb.as_str(), xb.vni, xb.port)]) {
        facts.push(match wrong.as_slice() {
            [one] => format!("flannel's ConfigMap {} says VNI {} port {}: {one} is the node that differs", conf.source, conf.vni, conf.port),
            [] => format!("flannel's ConfigMap {} says VNI {} port {}, as both nodes have it", conf.source, conf.vni, conf.port),
            _ => format!("flannel's ConfigMap {} says VNI {} port {}: neither node has it", conf.source, conf.vni, conf.port),
        });
    }
    if let Some(d) = ctx.trace.first_drop().and_then(|d| d.drop.as_ref()) {
        if d.says("NO_SOCKET", &["__udp4_lib_rcv"]) && d.function.contains("udp") {
            facts.push(format!("the encapsulated packet reached {nb} but no socket listens on its port ({})", d.function));
        }
    }
    Some(Diagnosis {
        explanation: format!("the VXLAN devices disagree: {}; the other node cannot decapsulate what this one sends", diffs.join(", ")),
        facts,
        hop: None,
    })
}

/// flannel's ConfigMap (from the API), and the nodes among `nodes` (name, VNI, port) that disagree with it.
fn against_configmap<'a>(ctx: &'a Ctx, nodes: &[(&str, u32, u16)]) -> Option<(&'a crate::k8s::NetConf, Vec<String>)> {
    let conf = ctx.states.cluster.as_ref()?.flannel.as_ref()?;
    if conf.backend_type.as_deref().is_some_and(|t| t != "vxlan") {
        return None;
    }
    let wrong = nodes.iter().filter(|(_, vni, port)| (*vni, *port) != (conf.vni, conf.port)).map(|(n, ..)| n.to_string()).collect();
    Some((conf, wrong))
}

/// Which node is right is the cluster's configuration (flannel's ConfigMap), not this node's to guess:
/// recreating flannel.1 is flanneld's job.
fn fix(ctx: &Ctx) -> Remedy {
    let named = (|| {
        let (a, b) = (ctx.src_node()?, ctx.dst_node()?);
        let (xa, xb) = (ctx.vxlan_dev(a)?.vxlan.clone()?, ctx.vxlan_dev(b)?.vxlan.clone()?);
        let (na, nb) = (ctx.node_name(a), ctx.node_name(b));
        let (conf, wrong) = against_configmap(ctx, &[(na.as_str(), xa.vni, xa.port), (nb.as_str(), xb.vni, xb.port)])?;
        let [one] = wrong.as_slice() else { return None };
        let node = if *one == na { a } else { b };
        // The node that differs is repaired the way flannel repairs it: flanneld, restarted, recreates
        // its VXLAN device from the ConfigMap. Only where flannel runs there (else nothing would).
        let why = format!("{one} differs from flannel's ConfigMap {} (VNI {} port {})", conf.source, conf.vni, conf.port);
        Some(super::restart_flannel(ctx, node, &format!("{why}; its VXLAN device comes from the ConfigMap")).unwrap_or_else(|| {
            Remedy::NoSafeFix(format!("{why}, and no Running flannel pod on {one} is known: restart flannel there so flanneld recreates its VXLAN device"))
        }))
    })();
    if let Some(r) = named {
        return r;
    }
    Remedy::NoSafeFix(
        "the two nodes' flannel.1 disagree on port or VNI; which one is right is in flannel's ConfigMap (net-conf.json Backend). \
         Restart flanneld on the node that differs so it recreates flannel.1 (with the Kubernetes API, `fix` does: it reads the ConfigMap and restarts flannel's pod there)"
            .into(),
    )
}
