//! cnitrace against a real cluster (`lab up --kubernetes`): the API server, controller manager and
//! scheduler, flanneld and kube-proxy as DaemonSet pods, pods made by flannel's CNI plugin — every one
//! the real program, built from source. What the tests of `kube.rs` show with the test API server and
//! the lab's imitation of flannel's and kube-proxy's state, shown here on what the real ones write;
//! a repair must survive them writing their state again (a resync).

use std::time::{Duration, Instant};

use cnitrace_tests::{can_run_kernel_tests, ClusterGuard, PREFIX};
use serde_json::Value;

const NODE0: &str = "storagenodet3500";
const NODE1: &str = "storagenodet3501";

fn up(test: &str, options: &[&str]) -> Option<ClusterGuard> {
    if !can_run_kernel_tests(test) {
        return None;
    }
    ClusterGuard::up(test, options)
}

/// The verdict (the last JSON line) of `cnitrace follow SRC DST --json`, and its exit code.
fn follow(c: &ClusterGuard, src: &str, dst: &str) -> (i32, Value) {
    let (code, out) = c.cnitrace(&["follow", src, dst, "--json", "--timeout", "5"]);
    let verdict = out.lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok().filter(|v| v.get("verdict").is_some()));
    (code, verdict.unwrap_or_else(|| panic!("follow {src} {dst} gave no verdict:\n{out}")))
}

/// Until `f` holds, at most `within`; whether it did.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    f()
}

/// The pod of the DaemonSet labelled `k8s-app=APP` on `node`, Running and Ready (None while there is
/// none).
fn daemon_pod(c: &ClusterGuard, app: &str, node: &str) -> Option<String> {
    let pods = c.get(&["pods", "-A", "-l", &format!("k8s-app={app}"), "--field-selector", &format!("spec.nodeName={node}")]);
    pods["items"].as_array()?.iter().find_map(|p| {
        let ready = p["status"]["conditions"].as_array()?.iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
        (ready && p["metadata"]["deletionTimestamp"].is_null()).then(|| format!("{}/{}", p["metadata"]["namespace"].as_str().unwrap(), p["metadata"]["name"].as_str().unwrap()))
    })
}

/// The daemon `app` on `node` restarted as `kubectl delete pod` does it; waits for its replacement.
fn restart(c: &ClusterGuard, app: &str, node: &str) {
    let old = daemon_pod(c, app, node).unwrap_or_else(|| panic!("no Ready {app} pod on {node}"));
    let (ns, name) = old.split_once('/').unwrap();
    let (code, out) = c.kubectl(&["-n", ns, "delete", "pod", name, "--wait=true"]);
    assert_eq!(code, 0, "{out}");
    assert!(eventually(Duration::from_secs(60), || daemon_pod(c, app, node).is_some_and(|p| p != old)), "no new {app} pod on {node}");
}

/// flanneld and kube-proxy restarted on every node: each writes what it owns again.
fn resync(c: &ClusterGuard) {
    for node in [NODE0, NODE1] {
        restart(c, "flannel", node);
        restart(c, "kube-proxy", node);
    }
}

/// The pair delivers, at once or once the daemons have settled (within 30 s).
fn delivers(c: &ClusterGuard, src: &str, dst: &str) -> Value {
    let mut last = Value::Null;
    let ok = eventually(Duration::from_secs(30), || {
        let (_, v) = follow(c, src, dst);
        last = v;
        last["verdict"] == "delivered"
    });
    assert!(ok, "{src} → {dst} is not delivered: {last:#}");
    last
}

/// Every pod (`namespace/name`) and its uid, but those being deleted.
fn pods(c: &ClusterGuard) -> std::collections::BTreeMap<String, String> {
    let all = c.get(&["pods", "-A"]);
    all["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| (format!("{}/{}", p["metadata"]["namespace"].as_str().unwrap(), p["metadata"]["name"].as_str().unwrap()), p["metadata"]["uid"].as_str().unwrap().to_string()))
        .collect()
}

fn cluster_ip(c: &ClusterGuard, svc: &str) -> String {
    cluster_ip_in(c, "default", svc)
}

fn cluster_ip_in(c: &ClusterGuard, namespace: &str, svc: &str) -> String {
    c.get(&["-n", namespace, "service", svc])["spec"]["clusterIP"].as_str().expect("a ClusterIP").to_string()
}

/// What the cluster's programs wrote is theirs: the podCIDRs the controller manager allocated, the
/// Node annotations flanneld wrote (the VTEP MAC its device has), the EndpointSlices the controllers
/// made, the DaemonSets' pods hostNetwork with their node's address; and `lab down` leaves no process,
/// namespace or file behind.
#[test]
fn the_real_cluster_comes_up_as_its_programs_make_it_and_goes_down_leaving_nothing() {
    let outside = ["/var/lib/cni", "/run/flannel", "/etc/cni", "/var/run/kubernetes", "/etc/kube-flannel"];
    let existed: Vec<bool> = outside.iter().map(|p| std::path::Path::new(p).exists()).collect();
    let Some(c) = up("the_real_cluster_comes_up_as_its_programs_make_it_and_goes_down_leaving_nothing", &[]) else { return };
    let nodes = c.get(&["nodes"]);
    let nodes = nodes["items"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    let mut cidrs = Vec::new();
    for n in nodes {
        let name = n["metadata"]["name"].as_str().unwrap();
        let cidr = n["spec"]["podCIDR"].as_str().unwrap_or_else(|| panic!("{name} has no podCIDR"));
        assert!(cidr.starts_with("10.244.") && cidr.ends_with("/24"), "{name}: {cidr}");
        cidrs.push(cidr.to_string());
        let data: Value = serde_json::from_str(n["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"].as_str().expect("flanneld's backend-data")).unwrap();
        let link = cnitrace_tools::IP.command().args(["-n", &c.node_ns(name), "-j", "link", "show", "flannel.1"]).output().unwrap();
        let link: Value = serde_json::from_slice(&link.stdout).unwrap();
        assert_eq!(data["VtepMAC"], link[0]["address"], "{name}: flanneld's annotation names its own device's MAC");
        assert_eq!(data["VNI"], 1);
    }
    cidrs.sort();
    cidrs.dedup();
    assert_eq!(cidrs.len(), 2, "each node its own podCIDR");
    for svc in ["jellyfin", "web"] {
        let slices = c.get(&["endpointslices", "-l", &format!("kubernetes.io/service-name={svc}")]);
        let addrs: Vec<&str> = slices["items"].as_array().unwrap().iter().flat_map(|s| s["endpoints"].as_array().into_iter().flatten()).filter_map(|e| e["addresses"][0].as_str()).collect();
        assert_eq!(addrs.len(), 1, "{svc}'s EndpointSlice: {addrs:?}");
    }
    let pods = c.get(&["pods", "-A"]);
    let mut dns = 0;
    for p in pods["items"].as_array().unwrap() {
        let (ns, name) = (p["metadata"]["namespace"].as_str().unwrap(), p["metadata"]["name"].as_str().unwrap());
        match p["metadata"]["ownerReferences"][0]["kind"].as_str() {
            // flanneld's and kube-proxy's: hostNetwork, with their node's address.
            Some("DaemonSet") => {
                assert_eq!(p["spec"]["hostNetwork"], true, "{ns}/{name}");
                assert_eq!(p["status"]["podIP"], p["status"]["hostIP"], "{ns}/{name}: a hostNetwork pod has its node's address");
            }
            // CoreDNS's (kubeadm's Deployment): on the pod network, made by flannel's CNI plugin.
            Some("ReplicaSet") => {
                assert_eq!((ns, p["metadata"]["labels"]["k8s-app"].as_str()), ("kube-system", Some("kube-dns")), "{name}");
                assert!(p["status"]["podIP"].as_str().is_some_and(|ip| ip.starts_with("10.244.")) && p["spec"]["hostNetwork"].is_null(), "{name}: {p}");
                dns += 1;
            }
            _ => assert_eq!(ns, "default", "{ns}/{name}: the workload's pods are the only ones of their own"),
        }
    }
    assert_eq!(dns, 2, "CoreDNS's two replicas");
    let slices = c.get(&["endpointslices", "-n", "kube-system", "-l", "kubernetes.io/service-name=kube-dns"]);
    let ready = slices["items"].as_array().unwrap().iter().flat_map(|s| s["endpoints"].as_array().into_iter().flatten()).filter(|e| e["conditions"]["ready"] == true).count();
    assert_eq!(ready, 2, "kube-dns's EndpointSlice: {slices}");
    // Every process of the cluster: those naming its state folder (the control plane, the lab's kubelet,
    // flanneld and kube-proxy by their files), and those in its namespaces (the pods' containers).
    let state = c.state.display().to_string();
    let spaces: Vec<u64> = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{PREFIX}-")))
        .filter_map(|e| std::os::unix::fs::MetadataExt::ino(&e.metadata().ok()?).into())
        .collect();
    let named = |pid: &u32| std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| String::from_utf8_lossy(&c).replace('\0', " ")).unwrap_or_default();
    let in_lab = |pid: &u32| std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| spaces.contains(&std::os::unix::fs::MetadataExt::ino(&m)));
    let ours: Vec<u32> = all_pids().into_iter().filter(|p| named(p).contains(&state) || in_lab(p)).collect();
    let programs = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "flanneld", "kube-proxy", "lab kubelet", "lab serve"];
    for prog in programs {
        assert!(ours.iter().any(|p| named(p).contains(prog)), "no {prog} among the cluster's processes");
    }
    drop(c);
    // Gone, or a zombie its new parent has not reaped yet (the programs outlive `lab up`, so init is).
    let running = |pid: &u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !matches!(s.rsplit(')').next().and_then(|r| r.trim().chars().next()), Some('Z' | 'X')));
    let alive: Vec<String> = ours.iter().filter(|p| running(p)).map(|p| format!("{p}: {}", named(p))).collect();
    assert!(alive.is_empty(), "left running: {alive:?}");
    let netns: Vec<String> = std::fs::read_dir("/run/netns").map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&format!("{PREFIX}-"))).collect()).unwrap_or_default();
    assert!(netns.is_empty(), "namespaces left: {netns:?}");
    assert!(!std::path::Path::new(&state).exists(), "the state folder {state} is left");
    for (p, before) in outside.iter().zip(existed) {
        assert_eq!(std::path::Path::new(p).exists(), before, "{p}: the cluster wrote outside its state folder");
    }
    // The names it gave its namespaces (nodes and pods, shown without the API) went with them.
    let names: Vec<String> = std::fs::read_dir(cnitrace::resolve::NAMES_DIR)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&format!("{PREFIX}-"))).collect())
        .unwrap_or_default();
    assert!(names.is_empty(), "namespace names left: {names:?}");
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc").unwrap().flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).collect()
}

/// The incident by pod name on the real cluster: followed, and the flannel misconfiguration the
/// incident's scripts made (flannel's ConfigMap rewritten, one node's flanneld restarted with it) named
/// and repaired through the API by restarting flanneld where it differs — a repair that holds when
/// flanneld and kube-proxy write their state again. `kubectl cnitrace` as users run it.
#[test]
fn the_incident_by_pod_name_on_the_real_cluster_is_traced_fixed_and_survives_a_resync() {
    let Some(c) = up("the_incident_by_pod_name_on_the_real_cluster_is_traced_fixed_and_survives_a_resync", &[]) else { return };
    let v = delivers(&c, "default/debug", "default/jellyfin");
    let path = v["facts"].as_array().unwrap().iter().filter_map(|f| f.as_str()).find(|f| f.contains("echo request")).unwrap_or_default().to_string();
    assert!(path.contains(&format!("default/debug eth0 → {NODE0} ")) && path.ends_with("default/jellyfin eth0"), "{path}");

    // As users run it: kubectl finds the plugin on PATH.
    let dir = cnitrace_tests::Scratch::new("cluster-plugin");
    let folder: &std::path::Path = dir.as_ref();
    let plugin = folder.join("kubectl-cnitrace");
    std::os::unix::fs::symlink(cnitrace_tests::bin(), &plugin).unwrap();
    let path_env = format!("{}:{}", folder.display(), std::env::var("PATH").unwrap_or_default());
    let out = std::process::Command::new(cnitrace_tools::KUBECTL.program)
        .args(["cnitrace", "follow", "default/debug", "default/web", "--timeout", "5"])
        .env("PATH", &path_env)
        .env("KUBECONFIG", c.kubeconfig("cnitrace"))
        .env("CNITRACE_STATE_DIR", cnitrace_tests::state_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("DELIVERED") && text.contains("default/web"), "{text}{}", String::from_utf8_lossy(&out.stderr));

    // The mismatch as it happens: the ConfigMap rewritten (port 4789), flanneld restarted on one node.
    let cm = c.get(&["-n", "kube-flannel", "configmap", "kube-flannel-cfg"]);
    let mut net: Value = serde_json::from_str(cm["data"]["net-conf.json"].as_str().unwrap()).unwrap();
    net["Backend"]["Port"] = 4789.into();
    let patch = serde_json::json!({"data": {"net-conf.json": net.to_string()}}).to_string();
    let (code, out) = c.kubectl(&["-n", "kube-flannel", "patch", "configmap", "kube-flannel-cfg", "--type", "merge", "-p", &patch]);
    assert_eq!(code, 0, "{out}");
    restart(&c, "flannel", NODE1);
    let port_of = |node: &str| {
        let out = cnitrace_tools::IP.command().args(["-n", &c.node_ns(node), "-d", "-j", "link", "show", "flannel.1"]).output().unwrap();
        serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|v| v[0]["linkinfo"]["info_data"]["port"].as_u64())
    };
    assert!(eventually(Duration::from_secs(20), || port_of(NODE1) == Some(4789)), "flanneld on {NODE1} did not take port 4789");
    assert_eq!(port_of(NODE0), Some(8472));
    let (code, v) = follow(&c, "default/debug", "default/web");
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["cause"], "vxlan-config-mismatch", "{v:#}");
    assert!(v["facts"].to_string().contains(&format!("{NODE0} is the node that differs")), "{v:#}");
    // A dry run: the plan (flannel's pod on the node that differs deleted), and no pod replaced.
    let flannel0 = daemon_pod(&c, "flannel", NODE0).expect("flannel on the node");
    let before = pods(&c);
    let (_, out) = c.cnitrace(&["fix", "default/debug", "default/web"]);
    assert!(out.contains(&format!("kubectl -n kube-flannel delete pod {}", flannel0.split_once('/').unwrap().1)), "{out}");
    assert_eq!(pods(&c), before, "a dry run changed the cluster");
    let (code, out) = c.cnitrace(&["fix", "--auto", "default/debug", "default/web"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("kubectl -n kube-flannel delete pod kube-flannel-ds-") && out.contains(&format!("new pod on {NODE0}")) && out.contains("verified"), "{out}");
    assert_eq!(port_of(NODE0), Some(4789), "flanneld wrote its device again from the ConfigMap");
    // Exactly that one pod replaced; the rollback of a restart has nothing to undo.
    let after = pods(&c);
    let gone: Vec<&String> = before.keys().filter(|k| after.get(*k) != before.get(*k)).collect();
    assert_eq!(gone, [&flannel0], "the one pod the repair deleted: {after:?}");
    assert_eq!(after.len(), before.len(), "{after:?}");
    let (_, out) = c.cnitrace(&["fix", "--rollback"]);
    assert!(out.contains("nothing to undo"), "{out}");
    assert_eq!(pods(&c).len(), before.len());
    resync(&c);
    delivers(&c, "default/debug", "default/web");
    delivers(&c, "default/debug", "default/jellyfin");
}

/// Services through the real kube-proxy, in `mode`, flannel's `backend` between the nodes: a pod on the
/// other node, a ClusterIP and a NodePort delivered and named; (iptables) the nat table flushed under a
/// running kube-proxy, repaired by its restart; a Service without endpoints; kube-proxy stopped and its
/// rules removed (`kube-proxy --cleanup`).
fn services_through_the_real_kube_proxy(test: &str, mode: &str, backend: &str) {
    let Some(c) = up(test, &["--proxy-mode", mode, "--backend", backend]) else { return };
    let v = delivers(&c, "default/debug", "default/web");
    let hop = if backend == "vxlan" { format!("{NODE0} flannel.1") } else { format!("{NODE0} eth0") };
    assert!(v["facts"].to_string().contains(&hop), "{backend}: {v:#}");
    let jellyfin = format!("{}:8096", cluster_ip(&c, "jellyfin"));
    let v = delivers(&c, "default/debug", &jellyfin);
    let facts = v["facts"].to_string();
    assert!(facts.contains("Service default/jellyfin") && facts.contains(&format!("kube-proxy {mode} mode")), "{v:#}");
    let node1 = c.get(&["node", NODE1])["status"]["addresses"][0]["address"].as_str().unwrap().to_string();
    let v = delivers(&c, "default/debug", &format!("{node1}:30810"));
    assert!(v["facts"].to_string().contains("Service default/web"), "{v:#}");
    // kube-proxy's masquerade: NodePort traffic is marked for it (KUBE-MARK-MASQ, or nftables mode's
    // mark), so the endpoint's node rewrites the source too, and the answer comes back through it.
    let masqueraded = v["facts"].as_array().unwrap().iter().filter_map(|f| f.as_str()).any(|f| f.starts_with(&format!("translated on {NODE1}")) && f.contains(", src "));
    assert!(masqueraded, "the NodePort's source translated on {NODE1}: {v:#}");

    if mode == "iptables" {
        // `iptables -t nat -F` on a node, as the incident's scripts ran it, under a running kube-proxy: its
        // canary chain survives a flush, so it does not notice (its next full sync is up to an hour
        // away), while flanneld writes its masquerade rules again within 5 s. The repair is kube-proxy's
        // own restart there, never NAT rules written by hand.
        let n0 = c.node_ns(NODE0);
        assert!(cnitrace_tools::IPTABLES_NFT.in_netns(&n0).args(["-t", "nat", "-F"]).status().unwrap().success());
        let proxy = daemon_pod(&c, "kube-proxy", NODE0).expect("kube-proxy on the node");
        let (code, v) = follow(&c, "default/debug", &jellyfin);
        assert_eq!((code, v["cause"].as_str()), (1, Some("kube-proxy-rules-missing")), "{v:#}");
        assert!(v["facts"].to_string().contains(&format!("kube-proxy's pod on {NODE0}: {proxy} (Running, Ready)")), "{v:#}");
        let (code, out) = c.cnitrace(&["fix", "--auto", "default/debug", &jellyfin]);
        assert_eq!(code, 0, "{out}");
        let name = proxy.split_once('/').unwrap().1;
        assert!(out.contains(&format!("kubectl -n kube-system delete pod {name}")) && out.contains("verified: ") && !out.contains("iptables -t nat -A"), "{out}");
        delivers(&c, "default/debug", &jellyfin);
    }

    let (code, out) = c.kubectl(&["create", "service", "clusterip", "empty", "--tcp=80:80"]);
    assert_eq!(code, 0, "{out}");
    let empty = format!("{}:80", cluster_ip(&c, "empty"));
    // kube-proxy programs the new Service within its sync period.
    let mut last = Value::Null;
    let named = eventually(Duration::from_secs(20), || {
        last = follow(&c, "default/debug", &empty).1;
        last["cause"] == "service-no-endpoints"
    });
    assert!(named, "{last:#}");

    // kube-proxy gone from the nodes (its DaemonSet deleted), its rules removed as `--cleanup` does.
    let (code, out) = c.kubectl(&["-n", "kube-system", "delete", "daemonset", "kube-proxy", "--wait=true"]);
    assert_eq!(code, 0, "{out}");
    assert!(eventually(Duration::from_secs(30), || c.get(&["pods", "-n", "kube-system", "-l", "k8s-app=kube-proxy"])["items"].as_array().is_some_and(|a| a.is_empty())));
    for node in [NODE0, NODE1] {
        let out = cnitrace_tools::KUBE_PROXY.in_netns(&c.node_ns(node)).args(["--cleanup", "--proxy-mode", mode]).output().unwrap();
        assert!(out.status.success(), "kube-proxy --cleanup on {node}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (code, v) = follow(&c, "default/debug", &jellyfin);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["cause"], "kube-proxy-rules-missing", "{v:#}");
}

#[test]
fn services_through_the_real_kube_proxy_in_iptables_mode() {
    services_through_the_real_kube_proxy("services_through_the_real_kube_proxy_in_iptables_mode", "iptables", "vxlan");
}

/// nftables mode, and flannel's host-gw backend (routes through the other node's address, no VXLAN).
#[test]
fn services_through_the_real_kube_proxy_in_nftables_mode_over_host_gw() {
    services_through_the_real_kube_proxy("services_through_the_real_kube_proxy_in_nftables_mode_over_host_gw", "nftables", "host-gw");
}

/// Node faults on the state the real flanneld wrote: each named, repaired by `fix --auto`, and the
/// repair still standing after flanneld and kube-proxy are restarted on every node (a fix they would
/// undo, or that fights them, is a wrong fix).
#[test]
fn node_faults_on_what_the_real_flanneld_wrote_are_repaired_and_the_repair_survives_a_resync() {
    let Some(c) = up("node_faults_on_what_the_real_flanneld_wrote_are_repaired_and_the_repair_survives_a_resync", &[]) else { return };
    let n0 = c.node_ns(NODE0);
    let web_net = c.get(&["node", NODE1])["spec"]["podCIDR"].as_str().unwrap().to_string();
    let vtep1 = web_net.split('/').next().unwrap().to_string();
    let host_veth = |pod: &str| {
        // The host end of the pod's veth: the peer of its eth0.
        let out = cnitrace_tools::IP.command().args(["-n", &format!("{PREFIX}-pod-{pod}"), "-j", "link", "show", "eth0"]).output().unwrap();
        let idx = serde_json::from_slice::<Value>(&out.stdout).unwrap()[0]["link_index"].as_u64().unwrap();
        let out = cnitrace_tools::IP.command().args(["-n", &n0, "-j", "link", "show"]).output().unwrap();
        let links: Value = serde_json::from_slice(&out.stdout).unwrap();
        links.as_array().unwrap().iter().find(|l| l["ifindex"].as_u64() == Some(idx)).unwrap()["ifname"].as_str().unwrap().to_string()
    };
    let faults: Vec<(&str, &str, Vec<String>)> = vec![
        ("veth-down", "default/jellyfin", vec!["link".into(), "set".into(), host_veth("jellyfin"), "down".into()]),
        ("route-missing", "default/web", vec!["route".into(), "del".into(), web_net.clone()]),
        ("vxlan-neigh-missing", "default/web", vec!["neigh".into(), "del".into(), vtep1.clone(), "dev".into(), "flannel.1".into()]),
        ("vxlan-down", "default/web", vec!["link".into(), "set".into(), "flannel.1".into(), "down".into()]),
    ];
    for (cause, dst, change) in &faults {
        let mut args = vec!["-n".to_string(), n0.clone()];
        args.extend(change.iter().cloned());
        let out = cnitrace_tools::IP.command().args(&args).output().unwrap();
        assert!(out.status.success(), "{cause}: ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let (code, v) = follow(&c, "default/debug", dst);
        assert_eq!(code, 1, "{cause}: {v:#}");
        assert_eq!(v["cause"], *cause, "{cause}: {v:#}");
        let (code, out) = c.cnitrace(&["fix", "--auto", "default/debug", dst]);
        assert_eq!(code, 0, "{cause}: {out}");
        resync(&c);
        delivers(&c, "default/debug", dst);
    }
    // The seed's symptom, flannel.1 holding 0.0.0.0/32: flanneld owns that address, so the repair is
    // its restart there (the real flanneld writes its address again), not an address edited under it.
    let vtep0 = c.get(&["node", NODE0])["spec"]["podCIDR"].as_str().unwrap().split('/').next().unwrap().to_string();
    for change in [vec!["addr", "flush", "dev", "flannel.1"], vec!["addr", "add", "0.0.0.0/32", "dev", "flannel.1"]] {
        assert!(cnitrace_tools::IP.command().args(["-n", &n0]).args(&change).status().unwrap().success(), "{change:?}");
    }
    let (code, v) = follow(&c, "default/debug", "default/web");
    assert_eq!((code, v["cause"].as_str()), (1, Some("vxlan-address-invalid")), "{v:#}");
    let (code, out) = c.cnitrace(&["fix", "--auto", "default/debug", "default/web"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("kubectl -n kube-flannel delete pod kube-flannel-ds-") && !out.contains("ip addr"), "flannel's restart, no address by hand: {out}");
    let addrs = cnitrace_tools::IP.command().args(["-n", &n0, "-j", "addr", "show", "flannel.1"]).output().unwrap();
    assert!(String::from_utf8_lossy(&addrs.stdout).contains(&format!("\"local\":\"{vtep0}\"")), "flanneld wrote {vtep0} again: {}", String::from_utf8_lossy(&addrs.stdout));
    resync(&c);
    delivers(&c, "default/debug", "default/web");
    // ip_forward off: the node's own sysctl, which no daemon writes.
    cnitrace::netns::in_netns(&cnitrace::netns::named(&n0), || Ok(std::fs::write("/proc/sys/net/ipv4/ip_forward", "0")?)).unwrap();
    let (_, v) = follow(&c, "default/debug", "default/web");
    assert_eq!(v["cause"], "ip-forward-disabled", "{v:#}");
    let (code, out) = c.cnitrace(&["fix", "--auto", "default/debug", "default/web"]);
    assert_eq!(code, 0, "{out}");
    resync(&c);
    delivers(&c, "default/debug", "default/web");
}

/// kube-proxy crashing on one node (its ConfigMap names a mode it refuses; its pod restarted there), and
/// its rules gone: the real kube-proxy's pod in CrashLoopBackOff as its status says, named with the line
/// its crashed container wrote (read through the API server from the node's kubelet, as `kubectl logs
/// --previous` reads it), and no repair: restarting it would not help.
#[test]
fn a_crashing_real_kube_proxy_is_named_with_its_own_log_and_not_restarted() {
    let Some(c) = up("a_crashing_real_kube_proxy_is_named_with_its_own_log_and_not_restarted", &[]) else { return };
    let cm = c.get(&["-n", "kube-system", "configmap", "kube-proxy"]);
    let conf = cm["data"]["config.conf"].as_str().unwrap().replace("mode: iptables", "mode: ipvsx");
    let patch = serde_json::json!({"data": {"config.conf": conf}}).to_string();
    let (code, out) = c.kubectl(&["-n", "kube-system", "patch", "configmap", "kube-proxy", "--type", "merge", "-p", &patch]);
    assert_eq!(code, 0, "{out}");
    let old = daemon_pod(&c, "kube-proxy", NODE0).expect("kube-proxy on the node");
    let (code, out) = c.kubectl(&["-n", "kube-system", "delete", "pod", old.split_once('/').unwrap().1, "--wait=true"]);
    assert_eq!(code, 0, "{out}");
    let crashing = || {
        let pods = c.get(&["pods", "-n", "kube-system", "-l", "k8s-app=kube-proxy", "--field-selector", &format!("spec.nodeName={NODE0}")]);
        pods["items"].as_array().into_iter().flatten().any(|p| p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "CrashLoopBackOff")
    };
    assert!(eventually(Duration::from_secs(30), crashing), "kube-proxy on {NODE0} is not in CrashLoopBackOff");
    let pods = c.get(&["pods", "-n", "kube-system", "-l", "k8s-app=kube-proxy", "--field-selector", &format!("spec.nodeName={NODE0}")]);
    let pod = pods["items"][0]["metadata"]["name"].as_str().expect("kube-proxy's pod").to_string();
    let (code, logs) = c.kubectl(&["-n", "kube-system", "logs", &pod, "--previous", "--tail=5"]);
    assert!(code == 0 && logs.contains("ipvsx"), "kubectl logs --previous through the lab's kubelet: {logs}");
    let out = cnitrace_tools::KUBE_PROXY.in_netns(&c.node_ns(NODE0)).args(["--cleanup"]).output().unwrap();
    assert!(out.status.success());
    let jellyfin = format!("{}:8096", cluster_ip(&c, "jellyfin"));
    let (code, v) = follow(&c, "default/debug", &jellyfin);
    assert_eq!((code, v["cause"].as_str()), (1, Some("kube-proxy-rules-missing")), "{v:#}");
    let facts = v["facts"].to_string();
    assert!(facts.contains("CrashLoopBackOff") && facts.contains("ipvsx"), "the crashing pod and its own log line: {facts}");
    let (code, out) = c.cnitrace(&["fix", "--auto", "default/debug", &jellyfin]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("no safe fix") && !out.contains("delete pod"), "{out}");
}

/// `check` on the real cluster's nodes (what the API's Node objects and flannel's record say they should
/// hold, against what flanneld wrote: nothing wrong), and `watch` naming a pod's drops by the names the
/// real API gives: the pod, its node, the node that dropped them.
#[test]
fn check_and_watch_name_the_real_clusters_nodes_and_pods() {
    let Some(c) = up("check_and_watch_name_the_real_clusters_nodes_and_pods", &[]) else { return };
    let (code, out) = c.cnitrace(&["check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{NODE0}: nothing wrong")) && out.contains(&format!("{NODE1}: nothing wrong")), "{out}");
    let web = c.get(&["pod", "web"])["status"]["podIP"].as_str().unwrap().to_string();
    // A rule in the first node's FORWARD chain drops what goes to web.
    let out = cnitrace_tools::IPTABLES_NFT.in_netns(&c.node_ns(NODE0)).args(["-I", "FORWARD", "-d", &web, "-j", "DROP"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let child = std::process::Command::new(cnitrace_tests::bin())
        .args(["watch", "--json", "--interval", "0.5", "--duration", "5"])
        .env("KUBECONFIG", c.kubeconfig("cnitrace"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = cnitrace_tools::PING.in_netns(&format!("{PREFIX}-pod-debug")).args(["-c", "5", "-i", "0.2", "-W", "1", &web]).stdout(std::process::Stdio::null()).status();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let drop = lines.iter().rfind(|v| v["pod"] == "default/web").unwrap_or_else(|| panic!("web's dropped echoes: {lines:#?}"));
    assert_eq!(drop["node"], NODE1, "{drop}");
    assert_eq!(drop["netns"], NODE0, "{drop}");
    assert!(drop["total"].as_u64().unwrap_or(0) >= 5, "{drop}");
    let (code, out) = c.cnitrace(&["check"]);
    assert_eq!(code, 0, "a rule someone wrote is no node check's: {out}");
}

/// `cnitrace validate` JSON from `default/debug`: (exit code, report).
fn validate(c: &ClusterGuard, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["validate", "default/debug", "--json"];
    all.extend(args);
    let (code, out) = c.cnitrace(&all);
    let report = out.lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok().filter(|v| v.get("checks").is_some()));
    (code, report.unwrap_or_else(|| panic!("validate {args:?} gave no report:\n{out}")))
}

/// The kube-system pods of `app` (k8s-app label) and whether each is in CrashLoopBackOff.
fn crash_looping(c: &ClusterGuard, app: &str) -> Vec<bool> {
    let pods = c.get(&["pods", "-n", "kube-system", "-l", &format!("k8s-app={app}")]);
    let pods = pods["items"].as_array().cloned().unwrap_or_default();
    pods.iter().filter(|p| p["metadata"]["deletionTimestamp"].is_null()).map(|p| p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "CrashLoopBackOff").collect()
}

/// CoreDNS's pods replaced, as `kubectl rollout restart` replaces them (their Corefile read again).
fn restart_coredns(c: &ClusterGuard) {
    let (code, out) = c.kubectl(&["-n", "kube-system", "rollout", "restart", "deployment/coredns"]);
    assert_eq!(code, 0, "{out}");
}

/// `validate` on the real cluster, by pod name: ping, TCP and HTTP to jellyfin, and DNS through the
/// pod's resolv.conf as kubelet writes it (ClusterFirst: the kube-dns Service) to the real CoreDNS,
/// reached through the real kube-proxy's NAT and answering from the real API. Then the classic CoreDNS
/// incident made the real way (its Corefile forwards to itself: the `loop` plugin stops it, its pods
/// crash-loop): the DNS check fails, and its trace names the kube-dns Service without endpoints and
/// why — the pods its selector matches, crashing, and the line CoreDNS wrote. Put back, DNS answers.
#[test]
fn validate_asks_the_real_coredns_and_names_its_crash_loop() {
    let Some(c) = up("validate_asks_the_real_coredns_and_names_its_crash_loop", &[]) else { return };
    let dns_ip = cluster_ip_in(&c, "kube-system", "kube-dns");
    let checks = ["jellyfin", "--dns", "jellyfin", "--dns", "kubernetes.default"];
    let mut last = Value::Null;
    // CoreDNS answers once its kubernetes plugin has read the API.
    let healthy = |last: &mut Value| {
        eventually(Duration::from_secs(30), || {
            let (code, r) = validate(&c, &checks);
            *last = r;
            code == 0
        })
    };
    assert!(healthy(&mut last), "{last:#}");
    assert_eq!(last["resolver"]["nameservers"][0], dns_ip.as_str(), "the pod's resolv.conf names the kube-dns Service: {last:#}");
    assert_eq!(last["checks"].as_array().unwrap().len(), 5, "{last:#}");
    let jellyfin = cluster_ip(&c, "jellyfin");
    let answer = last["checks"][3]["detail"].as_str().unwrap_or_default();
    assert!(answer.contains(&jellyfin), "jellyfin's Service address, as CoreDNS read it from the API: {answer}");

    // The Corefile forwards to the pod itself: CoreDNS's loop plugin stops it, again and again.
    let cm = c.get(&["-n", "kube-system", "configmap", "coredns"]);
    let kubeadm = cm["data"]["Corefile"].as_str().unwrap().to_string();
    let looping = kubeadm.replace("forward . /etc/resolv.conf", "forward . 127.0.0.1");
    assert_ne!(looping, kubeadm, "kubeadm's Corefile forwards to the pod's resolv.conf");
    let patch = |corefile: &str| {
        let p = serde_json::json!({"data": {"Corefile": corefile}}).to_string();
        let (code, out) = c.kubectl(&["-n", "kube-system", "patch", "configmap", "coredns", "--type", "merge", "-p", &p]);
        assert_eq!(code, 0, "{out}");
    };
    patch(&looping);
    restart_coredns(&c);
    assert!(eventually(Duration::from_secs(60), || { let l = crash_looping(&c, "kube-dns"); l.len() == 2 && l.iter().all(|x| *x) }), "CoreDNS is not crash-looping");
    let (code, r) = validate(&c, &["--dns", "jellyfin"]);
    assert_eq!(code, 1, "{r:#}");
    let dns = &r["checks"][0];
    assert_eq!((dns["check"].as_str(), dns["ok"].as_bool()), (Some("dns"), Some(false)), "{r:#}");
    let v = &dns["trace"]["verdict"];
    assert_eq!(v["cause"], "service-no-endpoints", "{r:#}");
    let text = format!("{} {}", v["explanation"], v["facts"]);
    assert!(text.contains("kube-system/kube-dns") && text.contains("CrashLoopBackOff"), "the DNS Service and its crashing pods: {text}");
    assert!(text.contains("plugin/loop") && text.contains("kubectl -n kube-system logs coredns-"), "what CoreDNS wrote as it stopped, and where to read it: {text}");
    assert!(v["service"]["service"]["name"] == "kube-system/kube-dns:dns" || text.contains("kube-system/kube-dns:dns "), "the DNS probe is UDP: the Service's port dns, not dns-tcp: {text}");

    patch(&kubeadm);
    restart_coredns(&c);
    assert!(healthy(&mut last), "DNS does not answer again: {last:#}");
}

/// A pod's way out of the cluster (to the API server's address, outside the pod network) through the
/// real flanneld's masquerade rule (`--ip-masq`). A rule deleted under a running flanneld comes back by
/// itself (its iptables resync). A flanneld run without `--ip-masq` (its DaemonSet's args edited) on a
/// node whose rules are gone (a reboot): masquerade-missing, said as such, and no repair — restarting
/// flannel would not bring the rule back, and flannel's configuration is the cluster's; the args put back
/// by hand, the pod gets out again.
#[test]
fn a_pods_way_out_through_the_real_flannels_masquerade() {
    let Some(c) = up("a_pods_way_out_through_the_real_flannels_masquerade", &[]) else { return };
    let slices = c.get(&["endpointslices", "-n", "default", "-l", "kubernetes.io/service-name=kubernetes"]);
    let outside = slices["items"][0]["endpoints"][0]["addresses"][0].as_str().expect("the API server's address").to_string();
    delivers(&c, "default/debug", &outside);
    let n0 = c.node_ns(NODE0);
    let chain = || {
        let out = cnitrace_tools::IPTABLES_NFT.in_netns(&n0).args(["-t", "nat", "-S", "FLANNEL-POSTRTG"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("MASQUERADE")).count()
    };
    let flush = || assert!(cnitrace_tools::IPTABLES_NFT.in_netns(&n0).args(["-t", "nat", "-F", "FLANNEL-POSTRTG"]).status().unwrap().success());
    assert!(chain() > 0, "flanneld's masquerade rules");
    flush();
    assert!(eventually(Duration::from_secs(15), || chain() > 0), "flanneld (--ip-masq) writes its rules again by itself");

    // flannel's DaemonSet without --ip-masq, rolled out; then node 0's rules gone.
    let args = |c: &ClusterGuard| -> Vec<String> {
        let ds = c.get(&["-n", "kube-flannel", "daemonset", "kube-flannel-ds"]);
        ds["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
    };
    let at = args(&c).iter().position(|a| a == "--ip-masq").expect("kube-flannel.yml runs flanneld with --ip-masq");
    let rollout = |p: String| {
        let (code, out) = c.kubectl(&["-n", "kube-flannel", "patch", "daemonset", "kube-flannel-ds", "--type", "json", "-p", &p]);
        assert_eq!(code, 0, "{out}");
        let (code, out) = c.kubectl(&["-n", "kube-flannel", "rollout", "status", "daemonset/kube-flannel-ds", "--timeout=90s"]);
        assert_eq!(code, 0, "{out}");
    };
    rollout(format!(r#"[{{"op":"remove","path":"/spec/template/spec/containers/0/args/{at}"}}]"#));
    flush();
    let flannel = daemon_pod(&c, "flannel", NODE0).expect("flannel on the node");
    let (code, v) = follow(&c, "default/debug", &outside);
    assert_eq!((code, v["cause"].as_str()), (1, Some("masquerade-missing")), "{v:#}");
    assert!(v["facts"].to_string().contains("runs without --ip-masq"), "{v:#}");
    let (code, out) = c.cnitrace(&["fix", "--auto", "default/debug", &outside]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("no safe fix") && out.contains("add --ip-masq"), "{out}");
    assert_eq!(daemon_pod(&c, "flannel", NODE0).as_deref(), Some(flannel.as_str()), "flannel not restarted: it would not help");
    assert_eq!(chain(), 0, "no NAT rule written by hand");

    // Put back by hand, as the verdict says.
    rollout(format!(r#"[{{"op":"add","path":"/spec/template/spec/containers/0/args/{at}","value":"--ip-masq"}}]"#));
    delivers(&c, "default/debug", &outside);
}
