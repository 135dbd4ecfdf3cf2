//! The Kubernetes client against the test API server (no root, no kernel): names, flannel's record,
//! and every way the API can fail — down, silent, forbidden, a bad kubeconfig — each a clear line,
//! bounded in time, the local work unaffected. The real kubectl checks the server speaks the API.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use cnitrace::k8s::{self, ApiError, KubeArgs, NoApi};
use cnitrace_tests::apiserver::{write_kubeconfig, Behaviour, FakeApi, Objects};
use serde_json::json;

/// A cluster unlike the lab: other names, other networks, a Windows node.
fn cluster() -> Objects {
    let mut o = Objects::default();
    o.node("gpu-worker-7", "172.20.3.0/24", Ipv4Addr::new(172, 31, 9, 17), "5a:1e:00:00:07:07", "linux")
        .node("edge-2", "172.20.4.0/24", Ipv4Addr::new(172, 31, 9, 18), "5a:1e:00:00:07:08", "linux")
        .node("win-build-1", "172.20.5.0/24", Ipv4Addr::new(172, 31, 9, 30), "5a:1e:00:00:07:09", "windows")
        .pod("media", "jellyfin-5d8f7c9b4-x7k2p", "gpu-worker-7", Ipv4Addr::new(172, 20, 3, 19), json!({"app": "jellyfin"}))
        .pod("default", "debug", "gpu-worker-7", Ipv4Addr::new(172, 20, 3, 20), json!({"run": "debug"}))
        .pod("shop", "web-0", "edge-2", Ipv4Addr::new(172, 20, 4, 10), json!({"app": "web"}))
        .flannel_config("kube-flannel", r#"{"Network": "172.20.0.0/16", "EnableNFTables": false, "Backend": {"Type": "vxlan", "VNI": 4096, "Port": 4789}}"#);
    o
}

fn scratch(test: &str) -> cnitrace_tests::Scratch {
    cnitrace_tests::Scratch::new(&format!("kube-{test}"))
}

fn args(kubeconfig: PathBuf) -> KubeArgs {
    KubeArgs { kubeconfig: Some(kubeconfig), ..Default::default() }
}

#[test]
fn pods_and_nodes_come_by_name_with_flannels_record() {
    let api = FakeApi::start(cluster(), Behaviour::Normal);
    let dir = scratch("names");
    let mut c = k8s::connect(&args(api.kubeconfig(&dir, None))).expect("configured");
    let p = c.pod("media", "jellyfin-5d8f7c9b4-x7k2p").expect("the pod");
    assert_eq!((p.ip, p.node.as_deref(), p.ready), (Some(Ipv4Addr::new(172, 20, 3, 19)), Some("gpu-worker-7"), true));
    let e = c.pod("media", "jellyfin").unwrap_err();
    assert!(matches!(e, ApiError::NotFound { .. }), "{e}");
    assert_eq!(e.to_string(), "pod media/jellyfin not found");

    let f = k8s::gather(&mut c, &[Ipv4Addr::new(172, 20, 3, 20), Ipv4Addr::new(172, 20, 4, 10)]);
    assert!(f.missing.is_empty(), "{:?}", f.missing);
    let names: Vec<String> = f.pods.iter().map(|p| p.full_name()).collect();
    assert_eq!(names, ["default/debug", "shop/web-0"]);
    let n = f.node_for_pod_ip(Ipv4Addr::new(172, 20, 4, 10)).expect("web's node");
    assert_eq!((n.name.as_str(), n.vtep_mac.as_deref(), n.public_ip), ("edge-2", Some("5a:1e:00:00:07:08"), Some(Ipv4Addr::new(172, 31, 9, 18))));
    assert_eq!(f.node("win-build-1").and_then(|n| n.os.as_deref()), Some("windows"));
    let net = f.flannel.expect("flannel's ConfigMap");
    assert_eq!((net.source.as_str(), net.network.as_deref(), net.vni, net.port), ("kube-flannel/kube-flannel-cfg", Some("172.20.0.0/16"), 4096, 4789));

    // The exact requests: a pod looked up by its address with a field selector, never a list of all pods.
    let seen = api.seen();
    let paths: Vec<String> = seen.iter().map(|s| format!("{} {}{}", s.method, s.path, if s.query.is_empty() { String::new() } else { format!("?{}", s.query) })).collect();
    assert!(paths.iter().any(|p| p == "GET /api/v1/pods?&fieldSelector=status.podIP%3D172.20.3.20" || p == "GET /api/v1/pods?fieldSelector=status.podIP%3D172.20.3.20"), "{paths:#?}");
    assert!(paths.iter().all(|p| !p.ends_with("/api/v1/pods")), "no unfiltered pod list: {paths:#?}");
    assert!(api.writes().is_empty(), "reading wrote: {:?}", api.writes());
}

#[test]
fn an_api_that_is_down_costs_one_line_and_no_wait() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = scratch("down");
    let mut c = k8s::connect(&args(write_kubeconfig(&dir, &format!("http://127.0.0.1:{port}"), None))).expect("configured");
    let t0 = Instant::now();
    let f = k8s::gather(&mut c, &[Ipv4Addr::new(172, 20, 3, 20)]);
    assert!(t0.elapsed() < Duration::from_secs(5), "gathering from a closed port took {:?}", t0.elapsed());
    assert_eq!(f.missing.len(), 1, "one reason, said once: {:?}", f.missing);
    assert!(f.missing[0].contains(&format!("127.0.0.1:{port} did not answer")), "{}", f.missing[0]);
    assert!(matches!(c.down(), Some(NoApi::Unreachable { .. })), "{:?}", c.down());
}

#[test]
fn a_silent_api_is_given_up_on_within_the_budget() {
    let api = FakeApi::start(cluster(), Behaviour::Silent);
    let dir = scratch("silent");
    let mut c = k8s::connect(&args(api.kubeconfig(&dir, None))).expect("configured");
    let t0 = Instant::now();
    let f = k8s::gather(&mut c, &[Ipv4Addr::new(172, 20, 3, 20), Ipv4Addr::new(172, 20, 4, 10)]);
    let took = t0.elapsed();
    // The budget is 2 s for everything together; a bound well above it still proves it is kept
    // (unbounded, four requests would wait 4 × the client's own timeouts).
    assert!(took < Duration::from_secs(4), "a silent API held the command {took:?}");
    assert!(took >= k8s::API_BUDGET - Duration::from_millis(100), "gave up before the budget: {took:?}");
    assert_eq!(f.missing, [format!("the Kubernetes API at {} did not answer within 2 s", api.url())]);
    assert_eq!(api.seen().len(), 1, "after the first timeout nothing more is asked");
}

#[test]
fn a_forbidden_api_says_what_was_refused() {
    let api = FakeApi::start(cluster(), Behaviour::Forbidden);
    let dir = scratch("forbidden");
    let mut c = k8s::connect(&args(api.kubeconfig(&dir, None))).expect("configured");
    let e = c.pod("media", "jellyfin-5d8f7c9b4-x7k2p").unwrap_err();
    assert!(matches!(e, ApiError::Forbidden { .. }), "{e}");
    assert!(e.to_string().starts_with("forbidden to pod media/jellyfin-5d8f7c9b4-x7k2p: "), "{e}");
    let f = k8s::gather(&mut c, &[Ipv4Addr::new(172, 20, 3, 20)]);
    assert!(f.missing.iter().any(|m| m.starts_with("forbidden to list nodes")), "{:?}", f.missing);
    assert!(c.down().is_none(), "a 403 is an answer: the API is up");
}

#[test]
fn a_bad_kubeconfig_names_the_file_and_what_is_wrong() {
    let dir = scratch("bad");
    let cases: [(&str, &str, &[&str]); 3] = [
        ("not yaml", "clusters: [\n  - name: x\n", &["parse kubeconfig"]),
        ("no server", "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\nusers:\n- name: u\n  user: {}\n", &["cluster url is missing"]),
        ("no such context", "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\ncurrent-context: gone\nusers: []\n", &["gone"]),
    ];
    for (what, text, needles) in cases {
        let f = dir.join(what.replace(' ', "-"));
        std::fs::write(&f, text).unwrap();
        let e = match k8s::connect(&args(f.clone())) {
            Err(e) => e,
            Ok(_) => panic!("{what}: accepted"),
        };
        let msg = e.to_string();
        assert!(matches!(e, NoApi::BadConfig { .. }), "{what}: {msg}");
        assert!(msg.starts_with(&format!("kubeconfig {}: ", f.display())), "{what}: names the file: {msg}");
        for n in needles {
            assert!(msg.contains(n), "{what}: {msg} lacks {n:?}");
        }
    }
    // --context that the file lacks.
    let api = FakeApi::start(Objects::default(), Behaviour::Normal);
    let k = api.kubeconfig(&dir, None);
    let e = k8s::connect(&KubeArgs { kubeconfig: Some(k), context: Some("prod".into()), namespace: None }).err().expect("unknown context refused");
    assert!(e.to_string().contains("prod"), "{e}");
}

#[test]
fn kubeconfig_is_found_as_kubectl_finds_it() {
    let api = FakeApi::start(cluster(), Behaviour::Normal);
    let dir = scratch("find");
    let k = api.kubeconfig(&dir, Some("media"));
    // KUBECONFIG as a list: a missing file is skipped, as kubectl does. (This test's own process
    // environment: the kube tests run one process per test binary, this one alone touches it.)
    let list = std::env::join_paths([dir.join("absent"), k.clone()]).unwrap();
    std::env::set_var("KUBECONFIG", &list);
    let c = k8s::connect(&KubeArgs::default());
    std::env::remove_var("KUBECONFIG");
    let c = c.expect("found through KUBECONFIG");
    assert_eq!(c.server, api.url());
    assert_eq!(c.default_namespace, "media", "the context's namespace is the default for bare pod names");
    assert!(c.source.contains(&k.display().to_string()), "{}", c.source);
}

/// The real kubectl reads the server: discovery, lists, one object, a ConfigMap key.
#[test]
fn kubectl_reads_the_test_server() {
    if !on_path("kubectl") {
        println!("SKIPPED kubectl_reads_the_test_server: kubectl is not on PATH (it comes with the machine image)");
        return;
    }
    let api = FakeApi::start(cluster(), Behaviour::Normal);
    let dir = scratch("kubectl");
    let k = api.kubeconfig(&dir, None);
    let kubectl = |a: &[&str]| {
        let out = cnitrace_tools::KUBECTL.command().env("KUBECONFIG", &k).env("HOME", &dir).args(a).output().expect("run kubectl");
        assert!(out.status.success(), "kubectl {a:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let v: serde_json::Value = serde_json::from_str(&kubectl(&["get", "nodes", "-o", "json"])).expect("node list JSON");
    let nodes: Vec<&str> = v["items"].as_array().unwrap().iter().map(|n| n["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["gpu-worker-7", "edge-2", "win-build-1"]);
    assert_eq!(kubectl(&["get", "pods", "-A", "-o", "name"]).lines().count(), 3);
    assert_eq!(kubectl(&["get", "pods", "-n", "media", "--field-selector", "spec.nodeName=gpu-worker-7", "-o", "name"]).trim(), "pod/jellyfin-5d8f7c9b4-x7k2p");
    assert_eq!(kubectl(&["get", "pod", "web-0", "-n", "shop", "-o", "jsonpath={.status.podIP}"]), "172.20.4.10");
    let conf = kubectl(&["get", "configmap", "kube-flannel-cfg", "-n", "kube-flannel", "-o", "jsonpath={.data.net-conf\\.json}"]);
    assert!(conf.contains("\"VNI\": 4096"), "{conf}");
    assert!(kubectl(&["api-resources"]).contains("daemonsets"));
    assert!(kubectl(&["version", "-o", "json"]).contains("v1.32.4"));
}

/// A PATH on which kubectl finds `bin` as its plugin `kubectl-cnitrace` (a link in `dir/bin`), as a user
/// who installed it has.
fn plugin_path(dir: &std::path::Path, bin: &std::path::Path) -> String {
    let plugins = dir.join("bin");
    std::fs::create_dir_all(&plugins).unwrap();
    let _ = std::fs::remove_file(plugins.join("kubectl-cnitrace"));
    std::os::unix::fs::symlink(bin, plugins.join("kubectl-cnitrace")).unwrap();
    format!("{}:{}", plugins.display(), std::env::var("PATH").unwrap_or_default())
}

/// As users run it: `kubectl cnitrace …` finds `kubectl-cnitrace` on PATH. Without root, the names
/// are resolved through the API and follow stops at the root check: the plugin path and the name
/// resolution, end to end, through kubectl.
#[test]
fn kubectl_runs_cnitrace_as_a_plugin() {
    if !on_path("kubectl") {
        println!("SKIPPED kubectl_runs_cnitrace_as_a_plugin: kubectl is not on PATH (it comes with the machine image)");
        return;
    }
    let bin = cnitrace_tests::bin();
    if !bin.exists() {
        println!("SKIPPED kubectl_runs_cnitrace_as_a_plugin: no cnitrace binary at {}", bin.display());
        return;
    }
    let api = FakeApi::start(cluster(), Behaviour::Normal);
    let dir = scratch("plugin");
    let path = plugin_path(&dir, &bin);
    let k = api.kubeconfig(&dir, Some("media"));
    let out = cnitrace_tools::KUBECTL
        .command()
        .env("PATH", &path)
        .env("KUBECONFIG", &k)
        .args(["cnitrace", "follow", "default/debug", "jellyfin-5d8f7c9b4-x7k2p", "--timeout", "1"])
        .output()
        .expect("kubectl cnitrace");
    let err = String::from_utf8_lossy(&out.stderr);
    if is_root() {
        // The names were looked up through the API; the pods are not on this host (the test cluster's
        // addresses are nowhere here), which is the line that ends it.
        let seen: Vec<String> = api.seen().iter().map(|s| s.path.clone()).collect();
        assert!(seen.contains(&"/api/v1/namespaces/default/pods/debug".to_string()), "{seen:#?}\n{err}");
        assert!(seen.contains(&"/api/v1/namespaces/media/pods/jellyfin-5d8f7c9b4-x7k2p".to_string()), "the context's namespace for a bare name: {seen:#?}");
        assert!(err.contains("172.20.3.20 is on no pod of this host"), "{err}");
    } else {
        assert!(err.contains("needs root"), "{err}");
    }
    assert_eq!(out.status.code(), Some(2), "{err}");
    let help = cnitrace_tools::KUBECTL.command().env("PATH", &path).args(["plugin", "list"]).output().expect("kubectl plugin list");
    assert!(String::from_utf8_lossy(&help.stdout).contains("kubectl-cnitrace"), "{}", String::from_utf8_lossy(&help.stdout));
}

/// A name needs the API; an address does not: exit 2 with the reason for the first, the local work for
/// the second.
#[test]
fn a_name_without_an_api_is_a_usage_error_an_address_is_not() {
    let bin = cnitrace_tests::bin();
    if !bin.exists() {
        println!("SKIPPED a_name_without_an_api_is_a_usage_error_an_address_is_not: no cnitrace binary at {}", bin.display());
        return;
    }
    let dir = scratch("noapi");
    let bad = dir.join("broken-kubeconfig");
    std::fs::write(&bad, "clusters: [\n").unwrap();
    let run = |a: &[&str]| {
        let out = std::process::Command::new(&bin).env("HOME", &dir).env_remove("KUBECONFIG").env_remove("KUBERNETES_SERVICE_HOST").args(a).output().expect("run cnitrace");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    if !is_root() {
        println!("SKIPPED the API half of a_name_without_an_api_is_a_usage_error_an_address_is_not: follow checks root first");
        let (code, err) = run(&["follow", "media/jellyfin", "10.1.2.3"]);
        assert_eq!(code, Some(2), "{err}");
        return;
    }
    let (code, err) = run(&["follow", "media/jellyfin", "10.1.2.3", "--kubeconfig", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("media/jellyfin needs the Kubernetes API") && err.contains(&format!("kubeconfig {}", bad.display())), "{err}");
    let (code, err) = run(&["follow", "debug", "10.1.2.3"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no Kubernetes API configured"), "{err}");
    // Addresses: the API is only enrichment; one line, then the command goes on (to the trace, where
    // 10.1.2.4 is on no pod here). Not root: refused first, nothing asked.
    let (code, err) = run(&["follow", "10.1.2.4", "10.1.2.3", "--kubeconfig", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    if is_root() {
        assert_eq!(err.lines().filter(|l| l.contains("kubeconfig")).count(), 1, "one line about the API: {err}");
        assert!(err.contains("the local diagnosis goes on") && err.contains("10.1.2.4 is on no pod of this host"), "{err}");
    } else {
        assert!(err.contains("needs root") && err.lines().count() == 1, "{err}");
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).exists()))
}

fn is_root() -> bool {
    cnitrace::sys::is_root()
}

/// A mixed Linux/Windows cluster on flannel's default backend (VXLAN VNI 1, port 8472), which Windows
/// nodes cannot join: `check` names it; `fix --cluster` plans the ConfigMap patch and the DaemonSet
/// restart, writes nothing in a dry run, applies with `--auto` (exactly two writes: the ConfigMap, the
/// DaemonSet's template), waits for every flannel pod to be replaced and Ready, verifies by reading the
/// cluster again; `--rollback` puts the ConfigMap back byte for byte and restarts flannel again.
#[test]
fn a_mixed_os_cluster_gets_flannels_windows_backend_and_can_have_it_back() {
    let bin = cnitrace_tests::bin();
    if !is_root() || !bin.exists() {
        println!("SKIPPED a_mixed_os_cluster_gets_flannels_windows_backend_and_can_have_it_back: needs root (fix) and the cnitrace binary");
        return;
    }
    let original = "{\n  \"Network\": \"172.20.0.0/16\",\n  \"EnableNFTables\": false,\n  \"Backend\": {\n    \"Type\": \"vxlan\"\n  }\n}\n";
    let mut o = Objects::default();
    o.node("lin-1", "172.20.3.0/24", Ipv4Addr::new(172, 31, 9, 17), "5a:1e:00:00:07:07", "linux")
        .node("win-1", "172.20.5.0/24", Ipv4Addr::new(172, 31, 9, 30), "5a:1e:00:00:07:09", "windows")
        .flannel_pod("lin-1", Ipv4Addr::new(172, 31, 9, 17))
        .flannel_daemonset()
        .flannel_config("kube-flannel", original);
    let api = FakeApi::start(o, Behaviour::Normal);
    let dir = scratch("mixed-os");
    let k = api.kubeconfig(&dir, None);
    let run = |a: &[&str]| {
        let out = std::process::Command::new(&bin).env("CNITRACE_STATE_DIR", dir.join("state")).arg("--kubeconfig").arg(&k).args(a).output().expect("run cnitrace");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let net_conf = || {
        let cm = cnitrace_tools::KUBECTL.command().env("KUBECONFIG", &k).env("HOME", &dir).args(["get", "configmap", "kube-flannel-cfg", "-n", "kube-flannel", "-o", "json"]).output();
        match cm {
            Ok(out) if out.status.success() => serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["data"]["net-conf.json"].as_str().unwrap().to_string(),
            // Without kubectl, the server's own answer.
            _ => {
                let mut c = k8s::connect(&args(k.clone())).unwrap();
                let f = k8s::gather(&mut c, &[]);
                f.flannel.unwrap().raw
            }
        }
    };

    let (code, text) = run(&["fix", "--cluster"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("Windows node win-1 cannot join flannel's vxlan VNI 1 port 8472") && text.contains("kubectl -n kube-flannel patch configmap kube-flannel-cfg --type merge"), "{text}");
    assert!(text.contains("dry run: nothing was changed"), "{text}");
    assert!(api.writes().is_empty(), "a dry run wrote: {:?}", api.writes());

    let (code, text) = run(&["fix", "--cluster", "--auto"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("verified: flannel's configuration is what Windows nodes need"), "{text}");
    let writes: Vec<String> = api.writes().iter().map(|w| format!("{} {}", w.method, w.path)).collect();
    assert_eq!(writes, ["PATCH /api/v1/namespaces/kube-flannel/configmaps/kube-flannel-cfg", "PATCH /apis/apps/v1/namespaces/kube-flannel/daemonsets/kube-flannel-ds"]);
    assert!(api.writes()[1].body.contains("kubectl.kubernetes.io/restartedAt"), "{}", api.writes()[1].body);
    let now: serde_json::Value = serde_json::from_str(&net_conf()).unwrap();
    assert_eq!(now["Backend"], serde_json::json!({"Type": "vxlan", "VNI": 4096, "Port": 4789}));
    assert_eq!((now["Network"].as_str(), now["EnableNFTables"].as_bool()), (Some("172.20.0.0/16"), Some(false)));

    let (code, text) = run(&["fix", "--rollback"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(net_conf(), original, "the ConfigMap back byte for byte");
    assert_eq!(api.writes().len(), 4, "the rollback: the ConfigMap, then flannel restarted again: {:?}", api.writes());
}

/// `check` reads the kubeconfig in use (and the node's well-known ones): an expired client certificate
/// is named with its subject and date, whether or not the API could be reached with it.
#[test]
fn check_names_an_expired_client_certificate() {
    let bin = cnitrace_tests::bin();
    if !is_root() || !bin.exists() {
        println!("SKIPPED check_names_an_expired_client_certificate: needs root (check) and the cnitrace binary");
        return;
    }
    use base64::Engine;
    let cert = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube/node-cert-2025-01-01.crt")).unwrap();
    let dir = scratch("expired");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let k = dir.join("kubelet.conf");
    std::fs::write(
        &k,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: x\n  context: {{cluster: c, user: node}}\ncurrent-context: x\nusers:\n- name: node\n  user:\n    client-certificate-data: {}\n",
            base64::engine::general_purpose::STANDARD.encode(cert)
        ),
    )
    .unwrap();
    let out = std::process::Command::new(&bin).env("HOME", &dir).env_remove("KUBECONFIG").args(["check", "--json", "--kubeconfig"]).arg(&k).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let kc = v["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "kubeconfigs").unwrap_or_else(|| panic!("{v}"));
    // (The machine's own well-known kubeconfigs, if it has any, are listed too: find ours.)
    let f = kc["findings"].as_array().unwrap().iter().find(|f| f["what"].as_str().unwrap_or("").starts_with(&k.display().to_string())).unwrap_or_else(|| panic!("{v}"));
    assert_eq!(f["cause"], "kubeconfig-cert-expired", "{v}");
    assert!(f["what"].as_str().unwrap().contains("CN=system:node:gpu-worker-7") && f["what"].as_str().unwrap().contains("expired 2025-01-01"), "{f}");
    assert_eq!(out.status.code(), Some(1));
}

/// kubernetes-validate from setup's venv (`CNITRACE_PY_BIN`, set by `cargo xtask test`; else the default
/// cache folder), else from PATH.
fn kubernetes_validate() -> std::process::Command {
    let program = cnitrace_tools::KUBERNETES_VALIDATE.program;
    let default_cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("cnitrace/vm/venv/bin"));
    let dirs = std::env::var_os("CNITRACE_PY_BIN").map(PathBuf::from).into_iter().chain(default_cache);
    match dirs.map(|d| d.join(program)).find(|p| p.exists()) {
        Some(p) => std::process::Command::new(p),
        None if on_path(program) => cnitrace_tools::KUBERNETES_VALIDATE.command(),
        None => panic!("{program} is not installed: `cargo xtask setup` installs it (pip, into its venv)"),
    }
}

/// `cnitrace deploy` prints manifests the Kubernetes API's own schemas accept (v1.32, strict: no field
/// the API does not know), with another namespace and image too; `deploy/cnitrace.yaml` in the
/// repository is exactly what this version prints; and `kubectl cnitrace deploy` is the same.
#[test]
fn deploy_prints_manifests_the_api_schemas_accept() {
    let bin = cnitrace_tests::bin();
    if !bin.exists() {
        println!("SKIPPED deploy_prints_manifests_the_api_schemas_accept: no cnitrace binary at {}", bin.display());
        return;
    }
    let dir = scratch("deploy");
    let mut kinds = Vec::new();
    for extra in [&[][..], &["--namespace", "node-tools", "--image", "registry.example.internal/cnitrace:dev"][..]] {
        let out = std::process::Command::new(&bin).arg("deploy").args(extra).output().expect("cnitrace deploy");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let file = dir.join("deploy.yaml");
        std::fs::write(&file, &out.stdout).unwrap();
        let v = kubernetes_validate().args(["--strict", "-k", "1.32.0"]).arg(&file).output().expect("run kubernetes-validate");
        let report = format!("{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
        assert!(v.status.success(), "{extra:?}: {report}");
        kinds = report.lines().filter(|l| l.contains(" passed for resource ")).map(|l| l.split(" resource ").nth(1).unwrap_or("").split('/').next().unwrap_or("").to_string()).collect();
        if extra.is_empty() {
            let committed = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/cnitrace.yaml")).expect("deploy/cnitrace.yaml");
            assert!(committed == out.stdout, "deploy/cnitrace.yaml is not what this version prints: `cnitrace deploy > deploy/cnitrace.yaml`");
        } else {
            assert!(String::from_utf8_lossy(&out.stdout).contains("registry.example.internal/cnitrace:dev"));
        }
    }
    assert_eq!(kinds, ["namespace", "serviceaccount", "clusterrole", "clusterrolebinding", "role", "rolebinding", "daemonset"], "every object validated");
    if on_path("kubectl") {
        let path = plugin_path(&dir, &bin);
        let out = cnitrace_tools::KUBECTL.command().env("PATH", &path).args(["cnitrace", "deploy"]).output().expect("kubectl cnitrace deploy");
        let direct = std::process::Command::new(&bin).arg("deploy").output().unwrap();
        assert!(out.status.success() && out.stdout == direct.stdout, "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The agents' pods by their labels, each reached through the API's port-forward (the test server speaks
/// its WebSocket protocol and carries the stream to a socket standing in for the agent's port): a whole
/// request and its answer go through; a node whose agent pod is not Ready, or that has none, is said
/// so; an API that refuses the listing says what was refused.
#[test]
fn agents_are_found_by_their_labels_and_answer_through_port_forward() {
    let dir = scratch("agents");
    // Stands in for an agent on its pod's port: answers one HTTP request with its node.
    let sock = dir.join("agent.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && std::io::Read::read(&mut c, &mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            let path = String::from_utf8_lossy(&head).split_whitespace().nth(1).unwrap_or("").to_string();
            let body = json!({"node": "w1", "asked": path}).to_string();
            let _ = std::io::Write::write_all(&mut c, format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes());
        }
    });
    let labels = json!({"app.kubernetes.io/name": "cnitrace", "app.kubernetes.io/component": "agent"});
    let mut o = Objects::default();
    o.node("w1", "10.244.1.0/24", Ipv4Addr::new(192, 0, 2, 11), "aa:bb:cc:00:01:01", "linux")
        .node("w2", "10.244.2.0/24", Ipv4Addr::new(192, 0, 2, 12), "aa:bb:cc:00:01:02", "linux")
        .node("w3", "10.244.3.0/24", Ipv4Addr::new(192, 0, 2, 13), "aa:bb:cc:00:01:03", "linux")
        .pod("cnitrace", "cnitrace-agent-a", "w1", Ipv4Addr::new(10, 244, 1, 9), labels.clone())
        .pod_not_ready("cnitrace", "cnitrace-agent-b", "w2", Ipv4Addr::new(10, 244, 2, 9), labels, Some("CrashLoopBackOff"), 4, "")
        .pod("cnitrace", "not-an-agent", "w3", Ipv4Addr::new(10, 244, 3, 9), json!({"app": "web"}));
    let api = FakeApi::start(o, Behaviour::Normal);
    api.forward("cnitrace", "cnitrace-agent-a", &sock);
    let kube = args(api.kubeconfig(&dir, None));
    let found = k8s::agents::discover(&kube, "cnitrace", true, 7390).expect("discovery");
    assert_eq!(found.agents.len(), 1, "{found:?}");
    assert_eq!(found.agents[0].0, "w1");
    assert_eq!(found.agents[0].1.to_string(), "pod cnitrace/cnitrace-agent-a (port-forward)");
    let v = cnitrace::agent::get(&found.agents[0].1, "/v1/node", std::time::Duration::from_secs(5)).expect("an answer through the port-forward");
    assert_eq!(v, json!({"node": "w1", "asked": "/v1/node"}));
    // Twice: each connection is its own port-forward stream.
    let v = cnitrace::agent::get(&found.agents[0].1, "/v1/check?node=w1", std::time::Duration::from_secs(5)).expect("again");
    assert_eq!(v["asked"], "/v1/check?node=w1");
    let missing: Vec<String> = found.missing.iter().map(|(n, why)| format!("{n}: {why}")).collect();
    assert_eq!(missing.len(), 2, "{missing:?}");
    assert!(missing[0].starts_with("w2: its agent pod cnitrace/cnitrace-agent-b is not Ready") && missing[0].contains("CrashLoopBackOff"), "{missing:?}");
    assert!(missing[1].starts_with("w3: no agent pod on it"), "{missing:?}");
    let asked: Vec<String> = api.seen().into_iter().map(|s| format!("{} {}?{}", s.method, s.path, s.query)).collect();
    assert!(asked.iter().any(|a| a.starts_with("GET /api/v1/namespaces/cnitrace/pods?") && a.contains("labelSelector=app.kubernetes.io%2Fname%3Dcnitrace")), "{asked:?}");
    assert!(asked.iter().any(|a| a.starts_with("GET /api/v1/namespaces/cnitrace/pods/cnitrace-agent-a/portforward?") && a.contains("ports=7390")), "{asked:?}");
    assert!(!asked.iter().any(|a| a.contains("cnitrace-agent-b/portforward")), "a pod that is not Ready is not asked: {asked:?}");
    // Only the agents' pods asked, without a list of nodes: none is missing for lack of a pod.
    let found = k8s::agents::discover(&kube, "cnitrace", false, 7390).expect("discovery");
    assert!(found.missing.iter().all(|(n, _)| n == "w2"), "{:?}", found.missing);

    let refused = FakeApi::start(Objects::default(), Behaviour::Forbidden);
    let e = k8s::agents::discover(&args(refused.kubeconfig(&dir.join("refused"), None)), "cnitrace", true, 7390).unwrap_err();
    assert!(format!("{e:#}").contains("forbidden to list the agents' pods in cnitrace"), "{e:#}");
}

/// `cnitrace deploy --apply` makes every object of the manifests through the API (server-side apply)
/// and a second run changes nothing; the real kubectl sees what it made; `undeploy --dry-run` deletes
/// nothing, `undeploy` deletes it all (the namespace last) and is safe to run again. Into a namespace
/// cnitrace did not make, the namespace is used as it is and kept by undeploy with what else is in it.
/// Without an API, both say what to run instead.
#[test]
fn deploy_applies_through_the_api_and_undeploy_removes_only_what_it_made() {
    let bin = cnitrace_tests::bin();
    if !bin.exists() {
        println!("SKIPPED deploy_applies_through_the_api_and_undeploy_removes_only_what_it_made: no cnitrace binary at {}", bin.display());
        return;
    }
    let mut objects = cluster();
    objects.flannel_pod("gpu-worker-7", Ipv4Addr::new(172, 31, 9, 17));
    let api = FakeApi::start(objects, Behaviour::Normal);
    let dir = scratch("undeploy");
    let k = api.kubeconfig(&dir, None);
    let run = |a: &[&str]| {
        let out = std::process::Command::new(&bin).args(a).arg("--kubeconfig").arg(&k).output().expect("run cnitrace");
        (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let lines_with = |text: &str, word: &str| text.lines().filter(|l| l.trim_end().ends_with(word) || l.contains(&format!(" {word} ("))).count();
    let manifests: Vec<serde_json::Value> = {
        let out = std::process::Command::new(&bin).arg("deploy").output().expect("cnitrace deploy");
        String::from_utf8_lossy(&out.stdout).split("\n---\n").skip(1).map(|d| serde_json::from_str(d).expect("a manifest")).collect()
    };
    assert_eq!(manifests.len(), 7);

    let (code, text) = run(&["deploy", "--apply"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(lines_with(&text, "created"), 7, "{text}");
    let applies: Vec<_> = api.writes().into_iter().filter(|w| w.method == "PATCH").collect();
    assert_eq!(applies.len(), 7, "one server-side apply per object");
    assert!(applies.iter().all(|w| w.query.contains("fieldManager=cnitrace") && w.query.contains("force=true")), "{applies:?}");
    for m in &manifests {
        let path = object_path(m);
        let got: serde_json::Value = api_get(&api, &path);
        for key in ["spec", "rules", "roleRef", "subjects"] {
            assert_eq!(got[key], m[key], "{path}: {key} as applied");
        }
        assert_eq!(got["metadata"]["labels"], m["metadata"]["labels"], "{path}");
    }
    let (code, text) = run(&["deploy", "--apply"]);
    assert_eq!((code, lines_with(&text, "unchanged")), (Some(0), 7), "{text}");

    if on_path("kubectl") {
        let kubectl = |a: &[&str]| {
            let out = cnitrace_tools::KUBECTL.command().env("KUBECONFIG", &k).env("HOME", &dir).args(a).output().expect("run kubectl");
            (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        };
        let (ok, seen) = kubectl(&["get", "daemonset,serviceaccount,role,rolebinding", "-n", "cnitrace", "-o", "name"]);
        assert!(ok, "{seen}");
        let mut seen: Vec<&str> = seen.lines().collect();
        seen.sort();
        assert_eq!(
            seen,
            ["daemonset.apps/cnitrace-agent", "role.rbac.authorization.k8s.io/cnitrace-tracer", "rolebinding.rbac.authorization.k8s.io/cnitrace-tracer", "serviceaccount/cnitrace-agent"]
        );
        let (ok, img) = kubectl(&["get", "ds", "cnitrace-agent", "-n", "cnitrace", "-o", "jsonpath={.spec.template.spec.containers[0].image}"]);
        assert!(ok && img.starts_with("ghcr.io/cnitrace/cnitrace:v"), "{img}");
    }

    let before = api.writes().len();
    let (code, text) = run(&["undeploy", "--dry-run"]);
    assert_eq!((code, lines_with(&text, "would be deleted")), (Some(0), 7), "{text}");
    assert_eq!(api.writes().len(), before, "a dry run writes nothing");

    let (code, text) = run(&["undeploy"]);
    assert_eq!((code, lines_with(&text, "deleted")), (Some(0), 7), "{text}");
    let deletes: Vec<String> = api.writes().into_iter().filter(|w| w.method == "DELETE").map(|w| w.path).collect();
    assert_eq!(deletes.first().map(String::as_str), Some("/apis/apps/v1/namespaces/cnitrace/daemonsets/cnitrace-agent"), "the agents first: {deletes:?}");
    assert_eq!(deletes.last().map(String::as_str), Some("/api/v1/namespaces/cnitrace"), "the namespace last: {deletes:?}");
    for m in &manifests {
        assert!(api_status(&api, &object_path(m)) == 404, "{} is gone", object_path(m));
    }
    assert!(text.contains("/var/lib/cnitrace/agent"), "the journal left on each node is said: {text}");
    let (code, text) = run(&["undeploy"]);
    assert_eq!((code, lines_with(&text, "not there")), (Some(0), 7), "{text}");

    // What users apply with kubectl from the printed manifests, undeploy removes as well.
    if on_path("kubectl") {
        let file = dir.join("deploy.yaml");
        std::fs::write(&file, std::process::Command::new(&bin).arg("deploy").output().expect("cnitrace deploy").stdout).unwrap();
        // --validate=false: validation downloads the OpenAPI documents, which this server does not serve
        // (the schemas are checked offline, by deploy_prints_manifests_the_api_schemas_accept).
        let out = cnitrace_tools::KUBECTL.command().env("KUBECONFIG", &k).env("HOME", &dir).args(["apply", "--server-side", "--validate=false", "-f"]).arg(&file).output().expect("kubectl apply");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && said.lines().filter(|l| l.ends_with("serverside-applied")).count() == 7, "{said}{}", String::from_utf8_lossy(&out.stderr));
        let (code, text) = run(&["undeploy"]);
        assert_eq!((code, lines_with(&text, "deleted")), (Some(0), 7), "{text}");
    }

    // Into a namespace that was there before: neither labelled nor deleted, and what else is in it stays.
    let (code, text) = run(&["deploy", "--apply", "--namespace", "kube-flannel"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("namespace/kube-flannel") && text.contains("exists, not cnitrace's"), "{text}");
    assert_eq!(lines_with(&text, "created"), 6, "{text}");
    let (code, text) = run(&["undeploy", "--namespace", "kube-flannel"]);
    assert_eq!((code, lines_with(&text, "deleted")), (Some(0), 6), "{text}");
    assert!(text.lines().any(|l| l.contains("namespace/kube-flannel") && l.contains("kept: not labelled")), "{text}");
    assert_eq!(api_status(&api, "/api/v1/namespaces/kube-flannel/configmaps/kube-flannel-cfg"), 200, "flannel's ConfigMap stays");
    assert!(!api.writes().iter().any(|w| w.method == "DELETE" && w.path == "/api/v1/namespaces/kube-flannel"));

    // No API: what to run instead.
    let (code, text) = {
        let out = std::process::Command::new(&bin).args(["undeploy"]).env("KUBECONFIG", dir.join("none")).env("HOME", &dir).output().expect("run cnitrace");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert_ne!(code, Some(0));
    assert!(text.contains("needs the Kubernetes API") && text.contains("kubectl delete -f -"), "{text}");
}

/// The API path of a manifest's object.
fn object_path(m: &serde_json::Value) -> String {
    let av = m["apiVersion"].as_str().unwrap();
    let base = if av == "v1" { "/api/v1".to_string() } else { format!("/apis/{av}") };
    let plural = format!("{}s", m["kind"].as_str().unwrap().to_lowercase());
    let name = m["metadata"]["name"].as_str().unwrap();
    match (m["kind"].as_str(), m["metadata"]["namespace"].as_str()) {
        (Some("Namespace"), _) => format!("{base}/namespaces/{name}"),
        (_, Some(ns)) => format!("{base}/namespaces/{ns}/{plural}/{name}"),
        (_, None) => format!("{base}/{plural}/{name}"),
    }
}

/// One GET of the test server, as JSON (and its status).
fn get_raw(api: &FakeApi, path: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api.addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

fn api_get(api: &FakeApi, path: &str) -> serde_json::Value {
    let (code, v) = get_raw(api, path);
    assert_eq!(code, 200, "GET {path}: {v}");
    v
}

fn api_status(api: &FakeApi, path: &str) -> u16 {
    get_raw(api, path).0
}
