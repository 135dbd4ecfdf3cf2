//! A local HTTP server that speaks enough of the Kubernetes API, in its real JSON, for the kube client
//! and for the real kubectl: discovery (`/version`, `/api`, `/apis`, the resource lists), Nodes, Pods
//! (with field and label selectors), ConfigMaps, DaemonSets, the agents' RBAC objects, pod logs,
//! server-side apply and delete of any of them, and a pod's port-forward (the
//! WebSocket protocol `v4.channel.k8s.io` the API server speaks, each stream carried to a local socket
//! the test names: an agent's). It records every request, so a
//! test asserts on what was asked (and that a dry run wrote nothing). It can also misbehave the ways a
//! real API does: answer nothing (slow), refuse (403), or not be there at all.
//!
//! It lives with the tests: the product never serves the API.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use serde_json::{json, Value};

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Normal,
    /// Accepts connections and never answers (an overloaded or half-dead API server).
    Silent,
    /// 403 to every resource request (discovery still answers), as for a user without RBAC.
    Forbidden,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
}

/// The cluster's objects, by resource ("nodes", "pods", "configmaps", "daemonsets").
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub by_kind: BTreeMap<&'static str, Vec<Value>>,
}

impl Objects {
    pub fn add(&mut self, kind: &'static str, obj: Value) -> &mut Self {
        self.by_kind.entry(kind).or_default().push(obj);
        self
    }

    /// A Node as the kubelet and flanneld leave it: podCIDR(s), InternalIP, the OS label, Ready, and
    /// flannel's backend annotations.
    pub fn node(&mut self, name: &str, pod_cidr: &str, internal_ip: Ipv4Addr, vtep_mac: &str, os: &str) -> &mut Self {
        self.add(
            "nodes",
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {
                    "name": name, "uid": uid(name), "resourceVersion": "1000", "creationTimestamp": "2026-11-01T00:00:00Z",
                    "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": os, "kubernetes.io/arch": "amd64"},
                    "annotations": {
                        "flannel.alpha.coreos.com/backend-type": "vxlan",
                        "flannel.alpha.coreos.com/backend-data": format!("{{\"VNI\":1,\"VtepMAC\":\"{vtep_mac}\"}}"),
                        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                        "flannel.alpha.coreos.com/public-ip": internal_ip.to_string(),
                        "node.alpha.kubernetes.io/ttl": "0"
                    }
                },
                "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": internal_ip.to_string()}, {"type": "Hostname", "address": name}],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                                    "lastHeartbeatTime": "2026-11-30T00:00:00Z", "lastTransitionTime": "2026-11-01T00:00:00Z"}],
                    "nodeInfo": {"kubeletVersion": "v1.32.4", "osImage": "Debian GNU/Linux 12 (bookworm)", "kernelVersion": "6.18.0",
                                 "containerRuntimeVersion": "containerd://1.7.24", "operatingSystem": os, "architecture": "amd64",
                                 "machineID": "", "systemUUID": "", "bootID": "", "kubeProxyVersion": ""}
                }
            }),
        )
    }

    /// A running, Ready pod with one container.
    pub fn pod(&mut self, namespace: &str, name: &str, node: &str, ip: Ipv4Addr, labels: Value) -> &mut Self {
        self.add(
            "pods",
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "uid": uid(&format!("{namespace}/{name}")), "resourceVersion": "2000",
                             "creationTimestamp": "2026-11-29T10:00:00Z", "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
                "status": {
                    "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}], "hostIP": "",
                    "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
                    "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0, "image": "registry.k8s.io/pause:3.10",
                                            "imageID": "", "state": {"running": {"startedAt": "2026-11-29T10:00:05Z"}}}],
                    "startTime": "2026-11-29T10:00:00Z"
                }
            }),
        )
    }

    /// A pod that is not Ready: its container waiting for `waiting` (e.g. CrashLoopBackOff) after
    /// `restarts` restarts, or running but failing its readiness probe (`waiting` None); `log` is what
    /// its container wrote (served at .../log).
    #[allow(clippy::too_many_arguments)]
    pub fn pod_not_ready(&mut self, namespace: &str, name: &str, node: &str, ip: Ipv4Addr, labels: Value, waiting: Option<&str>, restarts: u32, log: &str) -> &mut Self {
        self.pod(namespace, name, node, ip, labels);
        let pod = self.by_kind.get_mut("pods").and_then(|v| v.last_mut()).expect("the pod just added");
        pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}, {"type": "ContainersReady", "status": "False"}]);
        let state = match waiting {
            Some(reason) => json!({"waiting": {"reason": reason, "message": "back-off 5m0s restarting failed container"}}),
            None => json!({"running": {"startedAt": "2026-11-29T10:00:05Z"}}),
        };
        pod["status"]["containerStatuses"] = json!([{"name": "main", "ready": false, "restartCount": restarts, "image": "registry.k8s.io/pause:3.10", "imageID": "", "state": state}]);
        pod["x-log"] = Value::String(log.to_string());
        self
    }

    /// A ClusterIP Service with one TCP port (`port_name`), a NodePort if given, selecting `selector`.
    #[allow(clippy::too_many_arguments)]
    pub fn service(&mut self, namespace: &str, name: &str, cluster_ip: Ipv4Addr, port_name: &str, port: u16, node_port: Option<u16>, selector: Value) -> &mut Self {
        let mut p = json!({"name": port_name, "protocol": "TCP", "port": port, "targetPort": port});
        if let Some(np) = node_port {
            p["nodePort"] = json!(np);
        }
        self.add(
            "services",
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": namespace, "uid": uid(&format!("svc/{namespace}/{name}")), "resourceVersion": "2100",
                             "creationTimestamp": "2026-11-29T10:00:00Z"},
                "spec": {"type": if node_port.is_some() { "NodePort" } else { "ClusterIP" }, "clusterIP": cluster_ip.to_string(),
                         "clusterIPs": [cluster_ip.to_string()], "ports": [p], "selector": selector, "sessionAffinity": "None",
                         "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster", "externalTrafficPolicy": "Cluster"},
                "status": {"loadBalancer": {}}
            }),
        )
    }

    /// flannel's pod on `node`, as its DaemonSet (`kube-flannel/kube-flannel-ds`) makes it: host network,
    /// labels app=flannel, owned by the DaemonSet (deleting it makes the server start a replacement).
    pub fn flannel_pod(&mut self, node: &str, node_ip: Ipv4Addr) -> &mut Self {
        let name = format!("kube-flannel-ds-{}", &uid(node)[..5]);
        self.pod("kube-flannel", &name, node, node_ip, json!({"app": "flannel", "k8s-app": "flannel", "tier": "node"}));
        let pod = self.by_kind.get_mut("pods").and_then(|v| v.last_mut()).expect("the pod just added");
        pod["spec"]["hostNetwork"] = json!(true);
        pod["metadata"]["generateName"] = json!("kube-flannel-ds-");
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "kube-flannel-ds", "uid": uid("kube-flannel-ds"), "controller": true, "blockOwnerDeletion": true}]);
        pod["spec"]["containers"] = json!([{"name": "kube-flannel", "image": "ghcr.io/flannel-io/flannel:v0.26.4"}]);
        pod["status"]["containerStatuses"][0]["name"] = json!("kube-flannel");
        self
    }

    /// kube-proxy's pod on `node`, as its DaemonSet (`kube-system/kube-proxy`) makes it: host network,
    /// label k8s-app=kube-proxy, owned by the DaemonSet (deleting it makes the server start a replacement).
    pub fn kube_proxy_pod(&mut self, node: &str, node_ip: Ipv4Addr) -> &mut Self {
        let name = format!("kube-proxy-{}", &uid(&format!("kp{node}"))[..5]);
        self.pod("kube-system", &name, node, node_ip, json!({"k8s-app": "kube-proxy"}));
        let pod = self.by_kind.get_mut("pods").and_then(|v| v.last_mut()).expect("the pod just added");
        pod["spec"]["hostNetwork"] = json!(true);
        pod["metadata"]["generateName"] = json!("kube-proxy-");
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "kube-proxy", "uid": uid("kube-proxy"), "controller": true, "blockOwnerDeletion": true}]);
        pod["spec"]["containers"] = json!([{"name": "kube-proxy", "image": "registry.k8s.io/kube-proxy:v1.32.4"}]);
        pod["status"]["containerStatuses"][0]["name"] = json!("kube-proxy");
        self
    }

    /// flannel's DaemonSet (`kube-flannel/kube-flannel-ds`): PATCHing its pod template (a rollout
    /// restart) makes the server replace every pod it owns.
    pub fn flannel_daemonset(&mut self) -> &mut Self {
        self.add(
            "daemonsets",
            json!({
                "apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": "kube-flannel-ds", "namespace": "kube-flannel", "uid": uid("kube-flannel-ds"), "generation": 1,
                             "labels": {"app": "flannel", "k8s-app": "flannel", "tier": "node"}},
                "spec": {"selector": {"matchLabels": {"app": "flannel"}},
                         "template": {"metadata": {"labels": {"app": "flannel", "tier": "node"}},
                                      "spec": {"hostNetwork": true, "containers": [{"name": "kube-flannel", "image": "ghcr.io/flannel-io/flannel:v0.26.4"}]}}},
                "status": {"currentNumberScheduled": 0, "desiredNumberScheduled": 0, "numberMisscheduled": 0, "numberReady": 0, "observedGeneration": 1}
            }),
        )
    }

    /// flannel's ConfigMap with this `net-conf.json`.
    pub fn flannel_config(&mut self, namespace: &str, net_conf: &str) -> &mut Self {
        self.add(
            "configmaps",
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "kube-flannel-cfg", "namespace": namespace, "uid": uid("kube-flannel-cfg"), "resourceVersion": "300",
                             "labels": {"app": "flannel", "tier": "node"}},
                "data": {"cni-conf.json": "{\"name\":\"cbr0\",\"cniVersion\":\"0.3.1\",\"plugins\":[{\"type\":\"flannel\",\"delegate\":{\"hairpinMode\":true,\"isDefaultGateway\":true}},{\"type\":\"portmap\",\"capabilities\":{\"portMappings\":true}}]}",
                         "net-conf.json": net_conf}
            }),
        )
    }
}

fn uid(seed: &str) -> String {
    let h = seed.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", h >> 32, (h >> 16) & 0xffff, h & 0xfff, (h >> 20) & 0xfff, h & 0xffffffffffff)
}

/// Called (off the server's thread) when a DaemonSet's pod is deleted, before its replacement is
/// Ready: what the restarted program would do on its node (a test's stand-in for flanneld).
pub type OnRestart = Arc<dyn Fn(&str, &str) + Send + Sync>;

struct State {
    objects: Objects,
    behaviour: Behaviour,
    seen: Vec<Seen>,
    on_restart: Option<OnRestart>,
    replacements: u32,
    /// Where a pod's port-forward goes ("NAMESPACE/NAME" → a Unix socket): its container's port.
    forwards: BTreeMap<String, PathBuf>,
    /// The last resourceVersion given (every write of an object takes the next).
    version: u64,
}

/// The running server; stops when dropped.
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    pub fn start(objects: Objects, behaviour: Behaviour) -> FakeApi {
        Self::start_with(objects, behaviour, None)
    }

    /// `start`, with what happens on a node when one of its DaemonSet pods is restarted (pod name, node).
    pub fn start_with(objects: Objects, behaviour: Behaviour, on_restart: Option<OnRestart>) -> FakeApi {
        let state = Arc::new(Mutex::new(State { objects, behaviour, seen: Vec::new(), on_restart, replacements: 0, forwards: BTreeMap::new(), version: 5000 }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local address");
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        conn = listener.accept() => {
                            let Ok((stream, _)) = conn else { continue };
                            let st = st.clone();
                            tokio::spawn(async move {
                                let svc = service_fn(move |req| handle(st.clone(), addr, req));
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                    .with_upgrades()
                                    .await;
                            });
                        }
                    }
                }
            });
        });
        FakeApi { addr, state, stop: Some(stop), thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("state").seen.clone()
    }

    /// The requests that would change something (anything but GET).
    pub fn writes(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.method != "GET").collect()
    }

    /// A port-forward to pod `namespace/name` reaches `socket` (whatever port is asked: the pod's one
    /// listening port). A pod without one refuses, as a container with nothing on the port does.
    pub fn forward(&self, namespace: &str, name: &str, socket: &Path) {
        self.state.lock().expect("state").forwards.insert(format!("{namespace}/{name}"), socket.to_path_buf());
    }

    /// A kubeconfig for this server in `dir` (context `fake`, namespace `ns` when given).
    pub fn kubeconfig(&self, dir: &Path, ns: Option<&str>) -> PathBuf {
        write_kubeconfig(dir, &self.url(), ns)
    }
}

/// A kubeconfig naming `server` (any URL: a closed port makes a down API).
pub fn write_kubeconfig(dir: &Path, server: &str, ns: Option<&str>) -> PathBuf {
    let ns_line = ns.map(|n| format!("\n    namespace: {n}")).unwrap_or_default();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester{ns_line}\ncurrent-context: fake\nusers:\n- name: tester\n  user:\n    token: test-token\n"
    );
    std::fs::create_dir_all(dir).expect("kubeconfig dir");
    let path = dir.join("kubeconfig");
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(code: StatusCode, v: Value) -> Reply {
    Response::builder().status(code).header("content-type", "application/json").body(Full::new(Bytes::from(v.to_string()))).expect("response")
}

fn status(code: u16, reason: &str, message: String) -> Reply {
    reply(
        StatusCode::from_u16(code).expect("code"),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

async fn handle(st: Arc<Mutex<State>>, addr: SocketAddr, req: Request<Incoming>) -> Result<Reply, std::convert::Infallible> {
    if req.uri().path().ends_with("/portforward") {
        return Ok(portforward::upgrade(st, req));
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = req.into_body().collect().await.map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned()).unwrap_or_default();
    let behaviour = {
        let mut s = st.lock().expect("state");
        s.seen.push(Seen { method: method.clone(), path: path.clone(), query: query.clone(), body: body.clone() });
        s.behaviour
    };
    if behaviour == Behaviour::Silent {
        // Never answers; the connection is closed when the server stops.
        std::future::pending::<()>().await;
    }
    if let Some(d) = discovery(&path, addr) {
        return Ok(reply(StatusCode::OK, d));
    }
    if behaviour == Behaviour::Forbidden {
        let what = path.trim_start_matches("/api/v1/").to_string();
        return Ok(status(403, "Forbidden", format!("{what} is forbidden: User \"system:serviceaccount:default:tester\" cannot get resource \"{what}\" at the cluster scope")));
    }
    if method == "DELETE" {
        return Ok(delete(st, &path).await);
    }
    if method == "PATCH" && content_type.starts_with("application/apply-patch") {
        return Ok(server_side_apply(st, &path, &body));
    }
    if method == "PATCH" {
        return Ok(patch(st, &path, &body));
    }
    if method != "GET" {
        return Ok(status(405, "MethodNotAllowed", format!("{method} is not served by this test server")));
    }
    let params = parse_query(&query);
    let s = st.lock().expect("state");
    Ok(resource(&s.objects, &path, &params))
}

/// DELETE of a pod: gone at once; a DaemonSet's pod gets a replacement on the same node, Ready after
/// the test's stand-in for the restarted program has run (as a DaemonSet controller and the kubelet).
async fn delete(st: Arc<Mutex<State>>, path: &str) -> Reply {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["api", "v1", "namespaces", ns, "pods", name] = parts.as_slice() else {
        return delete_object(st, path);
    };
    let (gone, hook) = {
        let mut s = st.lock().expect("state");
        let pods = s.objects.by_kind.entry("pods").or_default();
        let Some(i) = pods.iter().position(|p| p["metadata"]["namespace"] == *ns && p["metadata"]["name"] == *name) else {
            return status(404, "NotFound", format!("pods \"{name}\" not found"));
        };
        (pods.remove(i), s.on_restart.clone())
    };
    let owned = gone["metadata"]["ownerReferences"].as_array().is_some_and(|o| o.iter().any(|r| r["kind"] == "DaemonSet"));
    if owned {
        let (st2, gone2) = (st.clone(), gone.clone());
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let node = gone2["spec"]["nodeName"].as_str().unwrap_or("").to_string();
            let old = gone2["metadata"]["name"].as_str().unwrap_or("").to_string();
            if let Some(h) = hook {
                let _ = tokio::task::spawn_blocking(move || h(&old, &node)).await;
            }
            let mut s = st2.lock().expect("state");
            s.replacements += 1;
            let mut new = gone2.clone();
            let base = gone2["metadata"]["generateName"].as_str().unwrap_or("replaced-").to_string();
            new["metadata"]["name"] = json!(format!("{base}r{:04}", s.replacements));
            new["metadata"]["uid"] = json!(uid(&format!("{base}{}", s.replacements)));
            s.objects.by_kind.entry("pods").or_default().push(new);
        });
    }
    reply(StatusCode::OK, gone)
}

/// The object a path names: its resource (one this server keeps), namespace and name.
struct Named {
    kind: &'static str,
    ns: Option<String>,
    name: String,
    api_version: String,
}

/// The resources this server keeps, by their plural (a path's) and their kind.
const KINDS: [(&str, &str); 12] = [
    ("nodes", "Node"),
    ("pods", "Pod"),
    ("configmaps", "ConfigMap"),
    ("services", "Service"),
    ("namespaces", "Namespace"),
    ("serviceaccounts", "ServiceAccount"),
    ("daemonsets", "DaemonSet"),
    ("clusterroles", "ClusterRole"),
    ("clusterrolebindings", "ClusterRoleBinding"),
    ("roles", "Role"),
    ("rolebindings", "RoleBinding"),
    ("endpointslices", "EndpointSlice"),
];

/// `/api/v1/...` or `/apis/GROUP/VERSION/...`: the group/version and the rest of the path.
fn split_group(path: &str) -> Option<(String, Vec<String>)> {
    let parts: Vec<String> = path.trim_matches('/').split('/').map(str::to_string).collect();
    match parts.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["api", "v1", ..] => Some(("v1".into(), parts[2..].to_vec())),
        ["apis", g, v, ..] => Some((format!("{g}/{v}"), parts[3..].to_vec())),
        _ => None,
    }
}

fn named(path: &str) -> Option<Named> {
    let (api_version, rest) = split_group(path)?;
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let (ns, plural, name) = match rest.as_slice() {
        ["namespaces", ns, kind, name] => (Some(ns.to_string()), *kind, *name),
        ["namespaces", name] => (None, "namespaces", *name),
        [kind, name] => (None, *kind, *name),
        _ => return None,
    };
    let kind = KINDS.iter().find(|(p, _)| *p == plural)?.0;
    Some(Named { kind, ns, name: name.to_string(), api_version })
}

fn is(o: &Value, n: &Named) -> bool {
    o["metadata"]["name"].as_str() == Some(n.name.as_str()) && o["metadata"]["namespace"].as_str() == n.ns.as_deref()
}

/// Server-side apply (`application/apply-patch+yaml`, sent as JSON, which is YAML): the object is
/// created if it is not there, else the applied fields are merged in; its resourceVersion changes only
/// when something did. The body must name the same object the path does, as the real API insists.
fn server_side_apply(st: Arc<Mutex<State>>, path: &str, body: &str) -> Reply {
    let Some(n) = named(path) else {
        return status(404, "NotFound", format!("the server could not find the requested resource ({path})"));
    };
    let Ok(applied) = serde_json::from_str::<Value>(body) else {
        return status(400, "BadRequest", "the applied configuration is not JSON".into());
    };
    if applied["metadata"]["name"].as_str() != Some(n.name.as_str()) || applied["apiVersion"].as_str() != Some(n.api_version.as_str()) {
        return status(400, "BadRequest", format!("the applied configuration does not match {path}: {}", applied["metadata"]));
    }
    let mut s = st.lock().expect("state");
    s.version += 1;
    let version = s.version.to_string();
    let objs = s.objects.by_kind.entry(n.kind).or_default();
    let out = match objs.iter_mut().find(|o| is(o, &n)) {
        Some(obj) => {
            let mut new = obj.clone();
            merge_patch(&mut new, &applied);
            if new != *obj {
                new["metadata"]["resourceVersion"] = json!(version);
                *obj = new;
            }
            obj.clone()
        }
        None => {
            let mut new = applied.clone();
            if let Some(ns) = &n.ns {
                new["metadata"]["namespace"] = json!(ns);
            }
            new["metadata"]["uid"] = json!(uid(&format!("{path}{version}")));
            new["metadata"]["resourceVersion"] = json!(version);
            new["metadata"]["creationTimestamp"] = json!("2026-12-01T00:00:00Z");
            objs.push(new.clone());
            new
        }
    };
    reply(StatusCode::OK, out)
}

/// DELETE of any other object: gone at once; a namespace takes everything in it along (what the
/// namespace controller does, without the time it takes).
fn delete_object(st: Arc<Mutex<State>>, path: &str) -> Reply {
    let Some(n) = named(path) else {
        return status(405, "MethodNotAllowed", format!("DELETE {path} is not served by this test server"));
    };
    let mut s = st.lock().expect("state");
    let objs = s.objects.by_kind.entry(n.kind).or_default();
    let Some(i) = objs.iter().position(|o| is(o, &n)) else {
        return status(404, "NotFound", format!("{} \"{}\" not found", n.kind, n.name));
    };
    let gone = objs.remove(i);
    if n.kind == "namespaces" {
        for v in s.objects.by_kind.values_mut() {
            v.retain(|o| o["metadata"]["namespace"].as_str() != Some(n.name.as_str()));
        }
    }
    reply(StatusCode::OK, gone)
}

/// PATCH (JSON merge patch, RFC 7386) of a ConfigMap or a DaemonSet; a DaemonSet's pods are all
/// replaced after it (its template changed: what `kubectl rollout restart` causes).
fn patch(st: Arc<Mutex<State>>, path: &str, body: &str) -> Reply {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, ns, name) = match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "configmaps", name] => ("configmaps", *ns, *name),
        ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name] => ("daemonsets", *ns, *name),
        _ => return status(405, "MethodNotAllowed", format!("PATCH {path} is not served by this test server")),
    };
    let Ok(p) = serde_json::from_str::<Value>(body) else {
        return status(400, "BadRequest", "the patch is not JSON".into());
    };
    let mut s = st.lock().expect("state");
    let objs = s.objects.by_kind.entry(kind).or_default();
    let Some(obj) = objs.iter_mut().find(|o| o["metadata"]["namespace"] == ns && o["metadata"]["name"] == name) else {
        return status(404, "NotFound", format!("{kind} \"{name}\" not found"));
    };
    merge_patch(obj, &p);
    let patched = obj.clone();
    if kind == "daemonsets" {
        let owned: Vec<Value> = s.objects.by_kind.get("pods").map(|v| v.iter().filter(|p| owned_by(p, name)).cloned().collect()).unwrap_or_default();
        let st2 = st.clone();
        drop(s);
        for pod in owned {
            let pod_path = format!("/api/v1/namespaces/{ns}/pods/{}", pod["metadata"]["name"].as_str().unwrap_or(""));
            let st3 = st2.clone();
            tokio::spawn(async move {
                let _ = delete(st3, &pod_path).await;
            });
        }
    }
    reply(StatusCode::OK, patched)
}

fn owned_by(pod: &Value, ds: &str) -> bool {
    pod["metadata"]["ownerReferences"].as_array().is_some_and(|o| o.iter().any(|r| r["kind"] == "DaemonSet" && r["name"] == ds))
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (unescape(k), unescape(v))).or(Some((unescape(kv), String::new()))))
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let v = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?');
                out.push(v);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The discovery documents kubectl and kube-rs read before anything else.
fn discovery(path: &str, addr: SocketAddr) -> Option<Value> {
    let res = |name: &str, kind: &str, namespaced: bool, verbs: &[&str], short: &[&str]| {
        json!({"name": name, "singularName": kind.to_lowercase(), "namespaced": namespaced, "kind": kind, "verbs": verbs, "shortNames": short})
    };
    let rw = ["create", "delete", "get", "list", "patch", "update", "watch"];
    Some(match path {
        "/version" => json!({"major": "1", "minor": "32", "gitVersion": "v1.32.4", "gitCommit": "0000000000000000000000000000000000000000",
                             "gitTreeState": "clean", "buildDate": "2026-04-01T00:00:00Z", "goVersion": "go1.23.8", "compiler": "gc", "platform": "linux/amd64"}),
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}]}),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}], "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}},
            {"name": "rbac.authorization.k8s.io", "versions": [{"groupVersion": "rbac.authorization.k8s.io/v1", "version": "v1"}],
             "preferredVersion": {"groupVersion": "rbac.authorization.k8s.io/v1", "version": "v1"}}]}),
        "/api/v1" => json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            res("nodes", "Node", false, &rw, &["no"]),
            res("pods", "Pod", true, &rw, &["po"]),
            {"name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"]},
            res("configmaps", "ConfigMap", true, &rw, &["cm"]),
            res("services", "Service", true, &rw, &["svc"]),
            res("namespaces", "Namespace", false, &rw, &["ns"]),
            res("serviceaccounts", "ServiceAccount", true, &rw, &["sa"])]}),
        "/apis/apps/v1" => json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": [
            res("daemonsets", "DaemonSet", true, &rw, &["ds"])]}),
        "/apis/rbac.authorization.k8s.io/v1" => json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "rbac.authorization.k8s.io/v1", "resources": [
            res("clusterroles", "ClusterRole", false, &rw, &[]),
            res("clusterrolebindings", "ClusterRoleBinding", false, &rw, &[]),
            res("roles", "Role", true, &rw, &[]),
            res("rolebindings", "RoleBinding", true, &rw, &[])]}),
        _ => return None,
    })
}

/// GET of a collection (optionally in a namespace, with selectors) or of one object.
fn resource(objects: &Objects, path: &str, params: &BTreeMap<String, String>) -> Reply {
    // /api/v1/<kind>[/<name>] or /api/v1/namespaces/<ns>/<kind>[/<name>[/log]]; /apis/GROUP/VERSION/... likewise.
    let Some((api_version, rest)) = split_group(path) else {
        return status(404, "NotFound", format!("the server could not find the requested resource ({path})"));
    };
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let rest = rest.as_slice();
    let (ns, kind, name, sub) = match rest {
        ["namespaces", ns, kind, name, sub] => (Some(*ns), *kind, Some(*name), Some(*sub)),
        ["namespaces", ns, kind, name] => (Some(*ns), *kind, Some(*name), None),
        ["namespaces", ns, kind] => (Some(*ns), *kind, None, None),
        ["namespaces", name] => (None, "namespaces", Some(*name), None),
        [kind, name] => (None, *kind, Some(*name), None),
        [kind] => (None, *kind, None, None),
        _ => return status(404, "NotFound", format!("the server could not find the requested resource ({path})")),
    };
    let all: Vec<Value> = if kind == "namespaces" {
        // The namespaces made through the API as they are; any other one an object is in, as it
        // would be.
        let made: Vec<Value> = objects.by_kind.get("namespaces").cloned().unwrap_or_default();
        let mut names: Vec<String> = objects.by_kind.values().flatten().filter_map(|o| o["metadata"]["namespace"].as_str().map(str::to_string)).collect();
        names.extend(["default", "kube-system"].map(String::from));
        names.retain(|n| !made.iter().any(|m| m["metadata"]["name"] == n.as_str()));
        names.sort();
        names.dedup();
        made.into_iter().chain(names.iter().map(|n| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}, "status": {"phase": "Active"}}))).collect()
    } else {
        objects.by_kind.iter().find(|(k, _)| **k == kind).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    let in_ns = |o: &&Value| ns.is_none() || o["metadata"]["namespace"].as_str() == ns;
    if let Some(name) = name {
        let Some(obj) = all.iter().filter(in_ns).find(|o| o["metadata"]["name"].as_str() == Some(name)) else {
            return status(404, "NotFound", format!("{kind} \"{name}\" not found"));
        };
        return match sub {
            None => reply(StatusCode::OK, obj.clone()),
            Some("log") => Response::builder()
                .status(200)
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from(obj["x-log"].as_str().unwrap_or("").to_string())))
                .expect("log"),
            Some(other) => status(404, "NotFound", format!("{kind}/{other} is not served by this test server")),
        };
    }
    let fields = params.get("fieldSelector").cloned().unwrap_or_default();
    let labels = params.get("labelSelector").cloned().unwrap_or_default();
    let items: Vec<Value> = all.iter().filter(in_ns).filter(|o| selects(o, &fields, &labels)).cloned().collect();
    let list_kind = items.first().and_then(|o| o["kind"].as_str()).map(|k| format!("{k}List")).unwrap_or_else(|| "List".into());
    reply(StatusCode::OK, json!({"kind": list_kind, "apiVersion": api_version, "metadata": {"resourceVersion": "5000"}, "items": items}))
}

/// `fieldSelector` (a=b,c=d on the paths the API supports for these kinds) and `labelSelector` (k=v).
fn selects(o: &Value, fields: &str, labels: &str) -> bool {
    let field_ok = fields.split(',').filter(|f| !f.is_empty()).all(|f| {
        let Some((k, v)) = f.split_once('=') else { return false };
        let (k, v, negate) = match k.strip_suffix('!') {
            Some(k) => (k, v, true),
            None => (k, v.trim_start_matches('='), false),
        };
        let got = match k {
            "metadata.name" => o["metadata"]["name"].as_str(),
            "metadata.namespace" => o["metadata"]["namespace"].as_str(),
            "spec.nodeName" => o["spec"]["nodeName"].as_str(),
            "status.podIP" => o["status"]["podIP"].as_str(),
            "status.phase" => o["status"]["phase"].as_str(),
            _ => return false,
        };
        (got == Some(v)) != negate
    });
    let label_ok = labels.split(',').filter(|l| !l.is_empty()).all(|l| match l.split_once('=') {
        Some((k, v)) => o["metadata"]["labels"][k].as_str() == Some(v.trim_start_matches('=')),
        None => !o["metadata"]["labels"][l].is_null(),
    });
    field_ok && label_ok
}

/// `pods/NAME/portforward` over WebSocket, as the API server serves it (`v4.channel.k8s.io`): for the
/// one port asked, channel 0 carries its data and channel 1 its errors; each channel's first frame is
/// the port (2 bytes, little-endian); every frame starts with its channel's byte.
mod portforward {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role, Message};

    const PROTOCOL: &str = "v4.channel.k8s.io";

    pub fn upgrade(st: Arc<Mutex<State>>, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let (behaviour, target, pod_known) = {
            let mut s = st.lock().expect("state");
            s.seen.push(Seen { method: req.method().to_string(), path: path.clone(), query: query.clone(), body: String::new() });
            let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
            let (ns, name) = match parts.as_slice() {
                ["api", "v1", "namespaces", ns, "pods", name, "portforward"] => (ns.to_string(), name.to_string()),
                _ => (String::new(), String::new()),
            };
            let known = s.objects.by_kind.get("pods").into_iter().flatten().any(|p| p["metadata"]["namespace"] == ns.as_str() && p["metadata"]["name"] == name.as_str());
            (s.behaviour, s.forwards.get(&format!("{ns}/{name}")).cloned(), known.then_some((ns, name)))
        };
        if behaviour == Behaviour::Forbidden {
            return status(403, "Forbidden", format!("pods \"{}\" is forbidden: User \"tester\" cannot create resource \"pods/portforward\"", path.rsplit('/').nth(1).unwrap_or("")));
        }
        let Some((ns, name)) = pod_known else { return status(404, "NotFound", format!("pods \"{}\" not found", path.rsplit('/').nth(1).unwrap_or(""))) };
        let port: u16 = match parse_query(&query).get("ports").map(|p| p.parse()) {
            Some(Ok(p)) => p,
            _ => return status(400, "BadRequest", "exactly one port is forwarded by this test server: ?ports=PORT".into()),
        };
        let h = req.headers();
        let offered = h.get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).unwrap_or("");
        let (Some(key), true) = (h.get("sec-websocket-key").cloned(), offered.split(',').any(|p| p.trim() == PROTOCOL)) else {
            return status(400, "BadRequest", format!("a WebSocket upgrade offering {PROTOCOL} is needed (SPDY is not served here)"));
        };
        let accept = derive_accept_key(key.as_bytes());
        tokio::spawn(async move {
            let Ok(upgraded) = hyper::upgrade::on(req).await else { return };
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(hyper_util::rt::TokioIo::new(upgraded), Role::Server, None).await;
            carry(ws, port, target, &format!("{ns}/{name}")).await;
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", accept)
            .header("sec-websocket-protocol", PROTOCOL)
            .body(Full::new(Bytes::new()))
            .expect("response")
    }

    fn frame(channel: u8, data: &[u8]) -> Message {
        let mut v = Vec::with_capacity(data.len() + 1);
        v.push(channel);
        v.extend_from_slice(data);
        Message::Binary(v.into())
    }

    async fn carry<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(ws: tokio_tungstenite::WebSocketStream<S>, port: u16, target: Option<PathBuf>, pod: &str) {
        let (mut tx, mut rx) = ws.split();
        let p = port.to_le_bytes();
        if tx.send(frame(0, &p)).await.is_err() || tx.send(frame(1, &p)).await.is_err() {
            return;
        }
        let conn = match &target {
            Some(t) => tokio::net::UnixStream::connect(t).await.map_err(|e| e.to_string()),
            None => Err("connection refused".to_string()),
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("error forwarding port {port} to pod {pod}: failed to connect to localhost:{port}: {e}");
                let _ = tx.send(frame(1, msg.as_bytes())).await;
                let _ = tx.close().await;
                return;
            }
        };
        let (mut r, mut w) = conn.into_split();
        let up = async {
            while let Some(Ok(m)) = rx.next().await {
                match m {
                    Message::Binary(b) if b.first() == Some(&0) => {
                        // The write stays out of the match guard: a guard with a side effect reads as a test.
                        let sent = w.write_all(&b[1..]).await;
                        if sent.is_err() {
                            break;
                        }
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            let _ = w.shutdown().await;
        };
        let down = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(frame(0, &buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = tx.close().await;
        };
        // The pod's side ending ends the stream (as the kubelet's does); the client's close ends ours.
        tokio::select! {
            _ = down => {}
            _ = up => {}
        }
    }
}
