//! Pods by name through the test Kubernetes API, on real namespaces: the names the API gives (not the
//! namespaces') in the timeline, the verdict, its facts and the fix; on the lab and on a generated
//! layout whose names and networks the lab does not have.

use cnitrace_tests::{
    apiserver::{Behaviour, FakeApi, Objects},
    can_run_kernel_tests, cnitrace, follow_events,
    gen::Generated,
    topology, LabGuard,
};
use serde_json::{json, Value};

fn scratch(test: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cnitrace-kube-{test}-{}", std::process::id()))
}

/// Every place a trace names a namespace: the events' `where_`, the verdict's `netns`.
fn places(events: &[Value], verdict: &Value) -> Vec<String> {
    let mut v: Vec<String> = events.iter().filter_map(|e| e["where_"].as_str().map(str::to_string)).collect();
    v.extend(verdict["netns"].as_str().map(str::to_string));
    v.sort();
    v.dedup();
    v
}

#[test]
fn lab_pods_by_name_are_named_as_kubernetes_names_them_in_follow_and_fix() {
    if !can_run_kernel_tests("lab_pods_by_name_are_named_as_kubernetes_names_them_in_follow_and_fix") {
        return;
    }
    let _lab = LabGuard::up(&["veth-down-host"]);
    // The cluster as its API describes it: names that are not the lab's namespaces'.
    let mut o = Objects::default();
    for (i, n) in topology::NODES.iter().enumerate() {
        o.node(&format!("rack{}-node", i + 4), &n.subnet(), n.underlay, n.vtep_mac, "linux");
    }
    let pod = |name: &str| topology::pod(name).expect("lab pod");
    o.pod("default", "debug-shell", "rack4-node", pod("debug").ip, json!({"run": "debug-shell"}))
        .pod("media", "jellyfin-6c9f7-qx2lp", "rack4-node", pod("jellyfin").ip, json!({"app": "jellyfin"}))
        .flannel_config("kube-flannel", r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#);
    let api = FakeApi::start(o, Behaviour::Normal);
    let dir = scratch("lab");
    let k = api.kubeconfig(&dir, Some("media"));
    let k = k.to_str().expect("utf-8 path");

    let (code, events, v) = follow_events("default/debug-shell", "jellyfin-6c9f7-qx2lp", &["--kubeconfig", k]);
    assert_eq!(code, 1, "dropped: {v}");
    assert_eq!(v["cause"], "veth-down", "{v}");
    assert_eq!(v["src_pod"], json!({"pod": "debug-shell", "namespace": "default", "node": "rack4-node"}));
    assert_eq!(v["dst_pod"], json!({"pod": "jellyfin-6c9f7-qx2lp", "namespace": "media", "node": "rack4-node"}));
    let seen = places(&events, &v);
    assert!(seen.contains(&"default/debug-shell".to_string()) && seen.contains(&"rack4-node".to_string()), "{seen:?}\n{v}");
    for lab_name in ["debug", "jellyfin", topology::NODES[0].name] {
        assert!(!seen.iter().any(|s| s == lab_name), "{lab_name} is the namespace's name, not Kubernetes': {seen:?}");
    }
    let facts = v["facts"].to_string();
    assert!(facts.contains("on rack4-node"), "the node by its Kubernetes name: {facts}");
    assert!(v["explanation"].as_str().unwrap_or("").contains("rack4-node"), "{v}");

    // The text a user reads: the pair by pod and node name.
    let out = cnitrace(&["follow", "default/debug-shell", "media/jellyfin-6c9f7-qx2lp", "--kubeconfig", k]);
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    let head = text.lines().next().unwrap_or("");
    assert!(head.contains("(default/debug-shell, netns") && head.contains("(media/jellyfin-6c9f7-qx2lp, netns") && head.contains("node rack4-node via"), "{head}");

    // fix by name: the same names, the repair verified.
    let out = cnitrace(&["fix", "default/debug-shell", "media/jellyfin-6c9f7-qx2lp", "--auto", "--kubeconfig", k]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("rack4-node") && text.contains("verified"), "{text}");
    assert!(api.writes().is_empty(), "a node repair writes nothing to the API: {:?}", api.writes());
}

/// A generated cluster (other names, other networks, CNI or hand-made pods): the pair by name across
/// nodes where there are two, each end named by its pod and node.
#[test]
fn generated_pods_by_name_across_nodes() {
    if !can_run_kernel_tests("generated_pods_by_name_across_nodes") {
        return;
    }
    // Seeds whose layouts have at least two nodes, so the pair crosses the overlay (or host-gw).
    let seed = (40..200).find(|s| Generated::drawn_nodes(*s) >= 2).expect("a two-node seed");
    let g = Generated::build(seed);
    let mut o = Objects::default();
    let k8s_node = |i: usize| format!("pool-b-{}", 900 + i);
    for (i, n) in g.nodes.iter().enumerate() {
        o.node(&k8s_node(i), &format!("{}/24", n.subnet), n.underlay, &n.vtep_mac, "linux");
    }
    let (a, b) = g.pair(true);
    o.pod("team-a", "api-7f6d5-abcde", &k8s_node(a.node), a.ip, json!({"app": "api"}))
        .pod("team-b", "db-0", &k8s_node(b.node), b.ip, json!({"app": "db"}));
    let api = FakeApi::start(o, Behaviour::Normal);
    let dir = scratch("gen");
    let k = api.kubeconfig(&dir, None);
    let (code, events, v) = follow_events("team-a/api-7f6d5-abcde", "team-b/db-0", &["--kubeconfig", k.to_str().unwrap()]);
    assert_eq!(code, 0, "{}: delivered: {v}", g.about);
    assert_eq!(v["src_pod"]["node"], k8s_node(a.node), "{v}");
    assert_eq!(v["dst_pod"]["node"], k8s_node(b.node), "{v}");
    let seen = places(&events, &v);
    for want in ["team-a/api-7f6d5-abcde".to_string(), "team-b/db-0".to_string(), k8s_node(a.node), k8s_node(b.node)] {
        assert!(seen.contains(&want), "{}: {want} in the timeline: {seen:?}", g.about);
    }
    let unknown: Vec<&String> = seen.iter().filter(|s| s.contains(&g.nodes[a.node].name) || s.contains(&a.name)).collect();
    assert!(unknown.is_empty(), "{}: namespace names where the API gave names: {unknown:?}", g.about);
}
