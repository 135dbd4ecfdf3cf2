//! `cnitrace validate`: the incident's checks from a pod (ping, TCP, HTTP, DNS through the pod's own
//! resolver, an external HTTPS URL), each failed one followed to where its packets died — on the lab
//! (its DNS is a real dnsmasq in a pod of its own) and on a layout the lab does not build.

use std::process::{Child, Stdio};

use cnitrace_tests::{
    apiserver::{Behaviour, FakeApi, Objects},
    bin, can_run_kernel_tests, cnitrace, pod_ip, topology, HandLayout, LabGuard,
};
use serde_json::Value;

fn validate(args: &[&str]) -> (i32, Value) {
    let mut all = vec!["validate"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = cnitrace(&all);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("validate {args:?}: not JSON ({e}): {text}\nstderr: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

/// The check of that kind (the only one).
fn check<'a>(v: &'a Value, kind: &str) -> &'a Value {
    let all: Vec<&Value> = v["checks"].as_array().expect("checks").iter().filter(|c| c["check"] == kind).collect();
    assert_eq!(all.len(), 1, "one {kind} check: {v:#}");
    all[0]
}

fn ca(g: &LabGuard) -> String {
    g.lab.file("ca.pem").display().to_string()
}

#[test]
fn validate_on_a_healthy_lab_passes_every_check_through_the_pods_own_resolver() {
    if !can_run_kernel_tests("validate_on_a_healthy_lab_passes_every_check_through_the_pods_own_resolver") {
        return;
    }
    let g = LabGuard::up(&[]);
    let url = format!("https://{}/", topology::EXTERNAL_NAME);
    let (debug, ca) = (pod_ip("debug"), ca(&g));
    // The destination by the name the pod's DNS gives it (no API): as the incident's `curl jellyfin:8096`.
    let (code, v) = validate(&[&debug, "jellyfin", "--external", &url, "--cacert", &ca]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["resolver"]["nameservers"][0], topology::DNS_IP.to_string(), "the pod's resolv.conf, seen from its container: {v:#}");
    assert!(v["resolver"]["source"].as_str().unwrap().starts_with("/proc/"), "read through the container's root: {v:#}");
    for kind in ["ping", "tcp", "http", "dns", "https-external"] {
        assert_eq!(check(&v, kind)["ok"], true, "{kind}: {v:#}");
    }
    assert!(check(&v, "ping")["target"].as_str().unwrap().contains(&pod_ip("jellyfin")), "jellyfin resolved to its address: {v:#}");
    assert!(check(&v, "dns")["detail"].as_str().unwrap().starts_with("kubernetes.default.svc.cluster.local is 10.96.0.1"), "the search list: {v:#}");
    assert!(check(&v, "https-external")["detail"].as_str().unwrap().contains("HTTP 200"), "{v:#}");

    // The node's trust store does not know the lab's CA: the handshake fails, and that is not the
    // network's doing, so nothing is followed.
    let (code, v) = validate(&[&debug, "--external", &url, "--dns", "web"]);
    assert_eq!(code, 1, "{v:#}");
    let https = check(&v, "https-external");
    assert!(https["detail"].as_str().unwrap().starts_with("connected, TLS failed"), "{v:#}");
    assert!(https.get("trace").is_none() && https["not_traced"].as_str().unwrap().contains("not the network"), "{v:#}");
    assert_eq!(check(&v, "dns")["ok"], true, "web resolves: {v:#}");
    // A name nobody serves: the nameserver answered, nothing to follow.
    let (code, v) = validate(&[&debug, "--dns", "nosuch", "--no-trace"]);
    assert_eq!(code, 1, "{v:#}");
    let d = check(&v, "dns");
    assert!(d["detail"].as_str().unwrap().contains("nosuch.default.svc.cluster.local (Non-Existent Domain)"), "every search domain tried: {v:#}");
    assert!(d["not_traced"].as_str().unwrap().contains("answered"), "{v:#}");
}

#[test]
fn validate_follows_each_failed_check_to_the_drop() {
    if !can_run_kernel_tests("validate_follows_each_failed_check_to_the_drop") {
        return;
    }
    let url = format!("https://{}/", topology::EXTERNAL_NAME);
    let debug = pod_ip("debug");
    {
        // Traffic to the other node's pods dropped by a FORWARD rule: the cluster's DNS lives there.
        let g = LabGuard::up(&["iptables-drop"]);
        let (code, v) = validate(&[&debug, &pod_ip("jellyfin"), "--external", &url, "--cacert", &ca(&g)]);
        assert_eq!(code, 1, "{v:#}");
        for kind in ["ping", "tcp", "http"] {
            assert_eq!(check(&v, kind)["ok"], true, "jellyfin is on the same node: {kind}: {v:#}");
        }
        let d = check(&v, "dns");
        assert_eq!(d["ok"], false, "{v:#}");
        assert!(d["trace"]["probe"].as_str().unwrap().starts_with(&format!("udp:53 {debug} → {}", topology::DNS_IP)), "{v:#}");
        assert_eq!(d["trace"]["verdict"]["cause"], "netfilter-rule-drop", "{v:#}");
        assert_eq!(d["trace"]["verdict"]["netns"], topology::NODES[0].name, "{v:#}");
        let e = check(&v, "https-external");
        assert_eq!(e["ok"], false, "{v:#}");
        assert!(e["detail"].as_str().unwrap().starts_with("cannot resolve"), "{v:#}");
        assert!(e.get("trace").is_none(), "the DNS check already says where: {v:#}");
    }
    {
        // jellyfin's veth down on the node: ping and TCP fail and are followed; DNS and HTTPS pass.
        let g = LabGuard::up(&["veth-down-host"]);
        let (code, v) = validate(&[&debug, &pod_ip("jellyfin"), "--external", &url, "--cacert", &ca(&g)]);
        assert_eq!(code, 1, "{v:#}");
        for kind in ["ping", "tcp"] {
            let c = check(&v, kind);
            assert_eq!(c["ok"], false, "{kind}: {v:#}");
            assert_eq!(c["trace"]["verdict"]["cause"], "veth-down", "{kind}: {v:#}");
        }
        assert!(v["checks"].as_array().unwrap().iter().all(|c| c["check"] != "http"), "no HTTP without a connection: {v:#}");
        assert_eq!(check(&v, "dns")["ok"], true, "{v:#}");
        assert_eq!(check(&v, "https-external")["ok"], true, "{v:#}");
        // The text report: one line per check, the verdict under the failed ones.
        let out = cnitrace(&["validate", &debug, &pod_ip("jellyfin"), "--dns", "web"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("FAIL  ping") && text.contains("verdict: DROPPED — cause veth-down"), "{text}");
        assert!(text.contains("ok    dns") && text.contains("2 of 3 checks failed"), "{text}");
    }
}

/// Pods by name through the Kubernetes API, as on a cluster: the report names the source pod as the API
/// does, and the destination resolves to its pod's address.
#[test]
fn validate_takes_pods_by_name_through_the_api() {
    if !can_run_kernel_tests("validate_takes_pods_by_name_through_the_api") {
        return;
    }
    let _g = LabGuard::up(&[]);
    let mut o = Objects::default();
    for (i, n) in topology::NODES.iter().enumerate() {
        o.node(&format!("rack{}-node", i + 4), &n.subnet(), n.underlay, n.vtep_mac, "linux");
    }
    let ip = |name: &str| topology::pod(name).expect("lab pod").ip;
    o.pod("default", "debug-shell", "rack4-node", ip("debug"), serde_json::json!({"run": "debug-shell"}))
        .pod("media", "jellyfin-6c9f7-qx2lp", "rack4-node", ip("jellyfin"), serde_json::json!({"app": "jellyfin"}));
    let api = FakeApi::start(o, Behaviour::Normal);
    let dir = cnitrace_tests::Scratch::new("validate-api");
    let k = api.kubeconfig(&dir, None);
    let (code, v) = validate(&["default/debug-shell", "media/jellyfin-6c9f7-qx2lp", "--kubeconfig", k.to_str().unwrap()]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["src"], "default/debug-shell", "{v:#}");
    assert_eq!(check(&v, "ping")["target"], format!("media/jellyfin-6c9f7-qx2lp ({})", ip("jellyfin")), "{v:#}");
    assert!(api.writes().is_empty(), "validate only reads: {:?}", api.writes());
}

/// Processes this test started, ended by their id when dropped.
struct Started(Vec<Child>);

impl Drop for Started {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn validate_reads_the_resolver_of_a_pod_the_lab_does_not_build() {
    if !can_run_kernel_tests("validate_reads_the_resolver_of_a_pod_the_lab_does_not_build") {
        return;
    }
    // Another layout: a client and a nameserver on their own link, other addresses, another domain.
    let l = HandLayout::new("cnitrace-vh", &["client", "ns1"]);
    let (client, ns1) = (l.ns("client"), l.ns("ns1"));
    cnitrace::sys::run(&cnitrace_tools::IP, &["link", "add", "cvh0", "netns", &client, "type", "veth", "peer", "name", "cvh1", "netns", &ns1]).unwrap();
    l.ip("client", "link set lo up\nlink set cvh0 name eth0\naddr add 172.31.40.2/24 dev eth0\nlink set eth0 up");
    l.ip("ns1", "link set lo up\naddr add 172.31.40.53/24 dev cvh1\nlink set cvh1 up");
    let dir = cnitrace_tests::Scratch::new("vh");
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 172.31.40.53\nsearch prod.example.internal\noptions ndots:2\n").unwrap();
    let mut started = Started(Vec::new());
    // The client's container: its own /etc/resolv.conf in its own mount namespace.
    let container = cnitrace_tools::Tool::netns_exec(&client, &bin())
        .args(["lab", "serve", "--name", "client", "--resolv-conf"])
        .arg(&resolv)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    started.0.push(container);
    let dnsmasq = cnitrace_tools::DNSMASQ
        .in_netns(&ns1)
        .args(["--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts"])
        .args(["--bind-interfaces", "--listen-address=172.31.40.53", "--user=nobody", "--group=nogroup", "--local=/example.internal/"])
        .arg("--host-record=db.prod.example.internal,172.31.9.9")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    started.0.push(dnsmasq);
    let mut v = Value::Null;
    for _ in 0..50 {
        let (code, got) = validate(&["172.31.40.2", "--dns", "db", "--no-trace"]);
        v = got;
        if code == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(v["resolver"]["search"][0], "prod.example.internal", "{v:#}");
    assert_eq!(check(&v, "dns")["detail"], "db.prod.example.internal is 172.31.9.9 (nameserver 172.31.40.53)", "{v:#}");

    // The nameserver gone: the lookup fails at once (port unreachable) and is followed to ns1.
    let mut d = started.0.pop().unwrap();
    d.kill().unwrap();
    d.wait().unwrap();
    let (code, v) = validate(&["172.31.40.2", "--dns", "db"]);
    assert_eq!(code, 1, "{v:#}");
    let c = check(&v, "dns");
    assert!(c["detail"].as_str().unwrap().contains("172.31.40.53"), "{v:#}");
    assert!(c["trace"]["probe"].as_str().unwrap().starts_with("udp:53 172.31.40.2 → 172.31.40.53"), "{v:#}");
    // It arrived: no network cause (this link is routed, not a detached bridge port), the hop is ns1's.
    let verdict = &c["trace"]["verdict"];
    assert_eq!((verdict["verdict"].as_str(), verdict["layer"].as_str()), (Some("dropped"), Some("socket")), "{v:#}");
    cnitrace_tests::assert_reason(verdict, "NO_SOCKET", "the nameserver's closed port");
    assert!(verdict["cause"].is_null(), "{v:#}");
    assert_eq!(verdict["netns"], ns1, "{v:#}");
    assert!(verdict["explanation"].as_str().unwrap().contains("nothing listens on its port"), "{v:#}");
}
