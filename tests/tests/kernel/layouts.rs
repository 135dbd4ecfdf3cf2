//! Layouts the lab does not build, made by hand with `ip` the way kind, k3d or a person would: other
//! names, other subnets, interfaces made in the same order on two nodes so their indexes collide.

use cnitrace::resolve::{Endpoint, HostResolver, Resolver};
use cnitrace_tests::{can_run_kernel_tests, HandLayout};

/// Two nodes on one host, each with a bridge and one pod, built in the same order: node-a's veth and
/// node-b's have the same ifindex, and so do the pods' eth0. Each pod must be placed on its own node
/// (issue 17: resolved by ifindex pairs alone, the source pod of a cross-node pair landed on the other
/// node, and every verdict and fix after it was about the wrong node).
#[test]
fn pods_of_two_nodes_with_colliding_interface_indexes_are_placed_on_their_own_nodes() {
    if !can_run_kernel_tests("pods_of_two_nodes_with_colliding_interface_indexes_are_placed_on_their_own_nodes") {
        return;
    }
    let l = HandLayout::new("cnitrace-t17", &["kind-worker", "kind-worker2", "pod-a", "pod-b"]);
    for (node, pod, subnet) in [("kind-worker", "pod-a", "10.200.1"), ("kind-worker2", "pod-b", "10.200.2")] {
        l.ip(node, &format!(
            "link add cbr0 type bridge
             link set cbr0 up
             addr add {subnet}.1/24 dev cbr0
             link add vethcafe0001 type veth peer name eth0 netns {}
             link set vethcafe0001 master cbr0 up",
            l.ns(pod)
        ));
        l.ip(pod, &format!("addr add {subnet}.5/24 dev eth0\nlink set eth0 up\nlink set lo up"));
    }
    let index = |ns: &str, dev: &str| -> u32 {
        let out = cnitrace::sys::run(&cnitrace_tools::IP, &["-n", &l.ns(ns), "-o", "link", "show", dev]).expect("ip link show");
        out.split(':').next().and_then(|i| i.trim().parse().ok()).expect("an ifindex")
    };
    assert_eq!(index("kind-worker", "vethcafe0001"), index("kind-worker2", "vethcafe0001"), "the layout makes the host veths' indexes collide");
    assert_eq!(index("pod-a", "eth0"), index("pod-b", "eth0"), "and the pods' eth0");

    let r = HostResolver::scan().expect("scan the host's namespaces");
    for (ip, node) in [("10.200.1.5", "kind-worker"), ("10.200.2.5", "kind-worker2")] {
        let Endpoint::Local(e) = r.resolve(ip.parse().expect("ip")).expect("resolve") else { panic!("{ip} is on this host") };
        let side = e.node.unwrap_or_else(|| panic!("{ip} has a node"));
        assert_eq!(side.netns.name, l.ns(node), "{ip} sits on {node}");
        assert_eq!(side.host_veth, "vethcafe0001");
    }
}
