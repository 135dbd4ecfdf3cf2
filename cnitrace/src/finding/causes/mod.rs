//! The cause catalog. Each cause is one file: how it is recognized from the trace and the node's state
//! (and, with the fix command, its fix and undo). Adding a cause touches its file and this table.
//! Order matters: the first cause whose evidence holds wins, so the more specific checks come first.

use super::{Ctx, Diagnosis};
use crate::plan::Remedy;

mod bridge_down;
mod hairpin_missing;
mod kube_proxy_rules_missing;
mod masquerade_missing;
mod nodeport_blocked;
mod service_no_endpoints;
mod bridge_ip_conflict;
mod bridge_port_blocked;
mod ip_forward_disabled;
mod iptables_backend_conflict;
mod mtu_mismatch;
mod neighbor_stale;
mod pod_prefix_too_wide;
mod netfilter_policy_drop;
mod netfilter_rule_drop;
mod pod_route_missing;
mod route_missing;
mod rp_filter;
mod veth_detached;
mod veth_down;
mod veth_wrong_bridge;
mod vxlan_address_invalid;
mod vxlan_config_mismatch;
mod vxlan_down;
mod vxlan_fdb_missing;
mod vxlan_neigh_missing;

pub mod netfilter;

pub struct Cause {
    /// Catalog id: part of the CLI's contract.
    pub id: &'static str,
    pub layer: &'static str,
    pub detect: fn(&Ctx) -> Option<Diagnosis>,
    /// The repair, each action with its undo (used by `fix`).
    pub fix: fn(&Ctx) -> Remedy,
}

pub static CAUSES: &[Cause] = &[
    // A Service's own causes first: each needs a Service in the trace (and nodeport-blocked, hairpin and
    // masquerade evidence the pod causes below do not look for).
    service_no_endpoints::CAUSE,
    kube_proxy_rules_missing::CAUSE,
    nodeport_blocked::CAUSE,
    hairpin_missing::CAUSE,
    masquerade_missing::CAUSE,
    pod_prefix_too_wide::CAUSE,
    pod_route_missing::CAUSE,
    bridge_down::CAUSE,
    veth_down::CAUSE,
    veth_detached::CAUSE,
    veth_wrong_bridge::CAUSE,
    bridge_port_blocked::CAUSE,
    neighbor_stale::CAUSE,
    bridge_ip_conflict::CAUSE,
    netfilter_rule_drop::CAUSE,
    iptables_backend_conflict::CAUSE,
    netfilter_policy_drop::CAUSE,
    ip_forward_disabled::CAUSE,
    rp_filter::CAUSE,
    vxlan_down::CAUSE,
    vxlan_address_invalid::CAUSE,
    vxlan_config_mismatch::CAUSE,
    route_missing::CAUSE,
    vxlan_neigh_missing::CAUSE,
    vxlan_fdb_missing::CAUSE,
    mtu_mismatch::CAUSE,
];

/// flannel-owned state on `node` is wrong and flannel runs there (the Kubernetes API says so): the repair
/// is flannel's own — its pod restarted, so flanneld writes its state again. None without the API or
/// without a Running flannel pod on that node (the caller repairs by hand then, or says what is needed).
pub fn restart_flannel(ctx: &Ctx, node: &crate::state::NsState, why: &str) -> Option<Remedy> {
    restart_daemon(ctx, node, "flannel", why)
}

/// A node DaemonSet's pod (`app`: flannel, kube-proxy) restarted through the API, so it writes what it
/// owns again; None without the API or without a Running pod of it on that node.
pub fn restart_daemon(ctx: &Ctx, node: &crate::state::NsState, app: &str, why: &str) -> Option<Remedy> {
    use crate::plan::{Action, Step, Target};
    let name = ctx.node_name(node);
    let pod = daemon_pod(ctx, node, app)?;
    let ns = Target::of(node);
    Some(Remedy::Steps(vec![Step {
        action: Action::RestartPod { ns: ns.clone(), namespace: pod.namespace.clone(), pod: pod.name.clone(), node: name, app: app.into() },
        undo: Action::NoUndo { ns, what: format!("{} was restarted; the DaemonSet's new pod replaced it", pod.full_name()) },
        why: format!("{why}: {app}, restarted, writes it again (no undo: a restart cannot be taken back)"),
    }]))
}

/// The Running pod of the node DaemonSet `app` (flannel, kube-proxy) on `node`, as the API has it.
pub fn daemon_pod<'a>(ctx: &'a Ctx, node: &crate::state::NsState, app: &str) -> Option<&'a crate::k8s::PodFacts> {
    let name = ctx.node_name(node);
    ctx.states.cluster.as_ref()?.pods.iter().find(|p| p.app.as_deref() == Some(app) && p.node.as_deref() == Some(name.as_str()) && p.phase == "Running")
}

pub fn find(id: &str) -> Option<&'static Cause> {
    CAUSES.iter().find(|c| c.id == id)
}

/// Every catalog id, in the order the docs list them.
pub fn ids() -> Vec<&'static str> {
    CAUSES.iter().map(|c| c.id).collect()
}
