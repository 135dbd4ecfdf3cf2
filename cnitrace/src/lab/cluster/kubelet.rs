//! kubelet's part in the lab's real cluster, played by the lab (`cnitrace lab kubelet`, one resident
//! process for every node): what the real cluster's programs need from a kubelet, and no more.
//!
//! Per node, as that node's kubelet (its own certificate: `system:node:NAME`, under the API server's
//! Node authorizer):
//! - registers the Node (InternalIP, capacity, Ready) and renews its Lease, so the controllers treat it
//!   as a live node (the controller manager gives it its podCIDR, the scheduler binds DaemonSet pods);
//! - runs the pods bound to it. There is no container runtime: a container is a process. flanneld and
//!   kube-proxy are the programs built from source; flannel's `cp` init containers are file copies; any
//!   other container is `cnitrace lab serve` (an HTTP server on its containerPort, or idle). A volume is
//!   a folder: a ConfigMap's keys, the service account's token (TokenRequest, as kubelet asks for it),
//!   a hostPath in the node's folder. Programs are told those folders where the container would have
//!   had the mount: every path under a mount, in the command, the environment and the ConfigMap files,
//!   is rewritten to the folder. flanneld, which would read its token from the fixed in-cluster path,
//!   gets the same credentials as a kubeconfig (`--kubeconfig-file`);
//! - gives a pod its network by calling the CNI plugins of the node's first conflist in its
//!   `/etc/cni/net.d` (written there by flannel's `install-cni` init container) as libcni does: each
//!   plugin in turn, with the previous result, `CNI_ARGS` as kubelet sets them; DEL in reverse;
//! - writes the pod's status (podIP, hostIP, Running, Ready; a hostNetwork pod has its node's address);
//!   restarts a container that exits (10 s doubling to 5 min, `CrashLoopBackOff` while it waits);
//!   removes a pod whose object is deleted, and confirms the deletion.
//!
//! It also forwards a loopback port of the host to the API server (`api-port` in the state folder), the
//! host's only way into the lab: it adds nothing to the root namespace's interfaces or routes.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use cnitrace_tools::{self as tools, Tool};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::{DynamicObject, GroupVersionKind},
    Client, Config,
};
use serde_json::{json, Value};

use super::{control_plane_ns, manifests, pki, ClusterState, Files, Layout, API_PORT, CONTROL_PLANE_IP};


/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<Client> {
    client_via(path, None).await
}

/// A client from a kubeconfig file, through `server` instead of the file's own if given.
async fn client_via(path: &Path, server: Option<&str>) -> Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("read {}", path.display()))?;
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    if let Some(s) = server {
        config.cluster_url = s.parse()?;
    }
    Ok(Client::try_from(config)?)
}

/// Server-side apply of one manifest.
pub async fn apply(client: &Client, obj: &Value) -> Result<()> {
    let api_version = obj["apiVersion"].as_str().context("apiVersion")?;
    let kind = obj["kind"].as_str().context("kind")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk).await.with_context(|| format!("discover {api_version} {kind}"))?;
    let name = obj["metadata"]["name"].as_str().context("metadata.name")?;
    let api: Api<DynamicObject> = match (caps.scope, obj["metadata"]["namespace"].as_str()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    };
    api.patch(name, &PatchParams::apply("cnitrace-lab").force(), &Patch::Apply(obj))
        .await
        .with_context(|| format!("apply {kind} {name}"))?;
    Ok(())
}

/// What keeps the cluster from being settled: a node without its podCIDR or not Ready, a pod of the
/// layout's namespaces not Running and Ready, a node without its flannel or kube-proxy pod.
pub async fn not_settled(client: &Client, layout: &Layout) -> Result<Vec<String>> {
    let mut pending = Vec::new();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let nodes = nodes.list(&ListParams::default()).await?;
    for n in &layout.nodes {
        match nodes.items.iter().find(|k| k.metadata.name.as_deref() == Some(&n.name)) {
            None => pending.push(format!("node {} not registered", n.name)),
            Some(k) if k.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_none() => pending.push(format!("node {} has no podCIDR", n.name)),
            Some(_) => {}
        }
    }
    let pods: Api<Pod> = Api::all(client.clone());
    let pods = pods.list(&ListParams::default()).await?;
    for n in &layout.nodes {
        for app in ["flannel", "kube-proxy"] {
            let has = pods.items.iter().any(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&n.name)
                    && p.metadata.labels.as_ref().is_some_and(|l| l.get("k8s-app").map(String::as_str) == Some(app))
            });
            if !has {
                pending.push(format!("no {app} pod on {}", n.name));
            }
        }
    }
    for p in &pods.items {
        let f = crate::k8s::PodFacts::of(p);
        if !(f.phase == "Running" && f.ready) {
            pending.push(format!("pod {} is {}", f.full_name(), f.state()));
        }
    }
    Ok(pending)
}

/// The resident process: the API forward and every node's kubelet. Runs until killed.
pub fn run(prefix: &str, state: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let files = Files { dir: state.to_path_buf() };
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(forward(listener, control_plane_ns(prefix)));
        std::fs::write(files.api_port(), port.to_string())?;
        let api_local = format!("https://127.0.0.1:{port}");
        // The cluster's layout is saved by `lab up` once the API answers; wait for it.
        let cluster = loop {
            if let Ok(lab) = crate::lab::Lab::load(prefix) {
                if let Some(c) = lab.state.kubernetes {
                    break c;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut tasks = Vec::new();
        for n in &cluster.layout.nodes {
            // Its own identity (`lab up` wrote it), through the forward.
            let client = client_via(&files.kubeconfig(&format!("node-{}", n.name)), Some(&api_local)).await?;
            serve_logs(&files, prefix, &n.name, n.underlay)?;
            let k = Kubelet::new(prefix, &files, &cluster, &n.name, client);
            tasks.push(tokio::spawn(k.run()));
        }
        for t in tasks {
            if let Err(e) = t.await? {
                eprintln!("kubelet: {e:#}");
            }
        }
        anyhow::Ok(())
    })
}

/// Every connection to the host's loopback port, carried to the API server inside the control plane's
/// namespace (the socket is opened there, on a thread that entered it).
async fn forward(listener: tokio::net::TcpListener, cp: String) {
    let path = crate::netns::named(&cp);
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { continue };
        let path = path.clone();
        tokio::spawn(async move {
            let connected = tokio::task::spawn_blocking(move || {
                crate::netns::in_netns(&path, || Ok(std::net::TcpStream::connect((CONTROL_PLANE_IP, API_PORT))?))
            })
            .await;
            let Ok(Ok(out)) = connected else { return };
            if out.set_nonblocking(true).is_err() {
                return;
            }
            let Ok(mut out) = tokio::net::TcpStream::from_std(out) else { return };
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
        });
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// One container's process.
struct Proc {
    name: String,
    image: String,
    child: Option<Child>,
    restarts: u32,
    started_at: String,
    /// While it waits to be started again after an exit.
    backoff_until: Option<Instant>,
    last_exit: Option<(i32, String)>,
    command: Vec<String>,
    env: Vec<(String, String)>,
    ns: String,
    log: PathBuf,
}

/// A pod this kubelet runs.
struct Local {
    namespace: String,
    name: String,
    netns: Option<String>,
    sandbox: String,
    ip: Ipv4Addr,
    cni_result: Option<Value>,
    procs: Vec<Proc>,
    /// Its startTime.
    started: String,
    /// Its status as it is now is not in the API yet (new, changed, or a write that failed).
    unwritten: bool,
}

struct Kubelet {
    prefix: String,
    node: String,
    node_ns: String,
    node_ip: Ipv4Addr,
    files: PathBuf,
    root: PathBuf,
    layout: Layout,
    client: Client,
    pods: BTreeMap<String, Local>,
    /// Why a pod could not start yet, by uid (said once per reason in the log).
    waiting: BTreeMap<String, String>,
}

impl Kubelet {
    fn new(prefix: &str, files: &Files, cluster: &ClusterState, node: &str, client: Client) -> Kubelet {
        let spec = cluster.layout.nodes.iter().find(|n| n.name == node).expect("a node of the layout");
        Kubelet {
            prefix: prefix.into(),
            node: node.into(),
            node_ns: format!("{prefix}-{node}"),
            node_ip: spec.underlay,
            files: files.dir.clone(),
            root: files.node_root(node),
            layout: cluster.layout.clone(),
            client,
            pods: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }

    async fn run(mut self) -> Result<()> {
        // The node's upstream resolver: the underlay's router, which serves no DNS (names outside the
        // cluster resolve nowhere in the lab, and no query leaves it).
        let node = self.node_resolv_conf();
        std::fs::create_dir_all(node.parent().expect("a folder"))?;
        std::fs::write(&node, format!("nameserver {CONTROL_PLANE_IP}\n"))?;
        self.register().await.with_context(|| format!("register node {}", self.node))?;
        let mut lease_at = Instant::now() - Duration::from_secs(60);
        loop {
            if lease_at.elapsed() >= Duration::from_secs(10) {
                match self.renew_lease().await {
                    Ok(()) => lease_at = Instant::now(),
                    Err(e) => eprintln!("kubelet {}: lease: {e:#}", self.node),
                }
            }
            if let Err(e) = self.sync().await {
                eprintln!("kubelet {}: {e:#}", self.node);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn register(&self) -> Result<()> {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                                                        "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64"}},
        }))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": self.node_ip.to_string()}, {"type": "Hostname", "address": self.node}],
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi"},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status (the cnitrace lab's)", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "lastHeartbeatTime": now(), "lastTransitionTime": now()}
            ],
            "nodeInfo": {"kubeletVersion": "v1.34.4", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
                         "osImage": "cnitrace lab", "kernelVersion": kernel_release(), "containerRuntimeVersion": "cnitrace-lab://0",
                         "machineID": "", "systemUUID": "", "bootID": ""}
        }});
        nodes.patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&status)).await?;
        Ok(())
    }

    async fn renew_lease(&self) -> Result<()> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string();
        let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                           "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": now}});
        match leases.get_opt(&self.node).await? {
            None => {
                leases.create(&PostParams::default(), &serde_json::from_value(lease)?).await?;
            }
            Some(_) => {
                leases.patch(&self.node, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"renewTime": now}}))).await?;
            }
        }
        Ok(())
    }

    async fn sync(&mut self) -> Result<()> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        let bound = pods.list(&lp).await?.items;
        // Gone from the API: stopped and removed here.
        let live: Vec<String> = bound.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        let gone: Vec<String> = self.pods.keys().filter(|u| !live.contains(u)).cloned().collect();
        for uid in gone {
            if let Some(l) = self.pods.remove(&uid) {
                self.stop(l);
            }
        }
        for p in bound {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            let (ns, name) = (p.metadata.namespace.clone().unwrap_or_default(), p.metadata.name.clone().unwrap_or_default());
            if p.metadata.deletion_timestamp.is_some() {
                if let Some(l) = self.pods.remove(&uid) {
                    self.stop(l);
                }
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                let dp = DeleteParams { grace_period_seconds: Some(0), preconditions: Some(kube::api::Preconditions { uid: Some(uid.clone()), resource_version: None }), ..Default::default() };
                let _ = api.delete(&name, &dp).await;
                continue;
            }
            if !self.pods.contains_key(&uid) {
                match self.start(&p).await {
                    Ok(l) => {
                        self.waiting.remove(&uid);
                        self.pods.insert(uid.clone(), l);
                    }
                    Err(e) => {
                        let why = format!("{e:#}");
                        if self.waiting.get(&uid) != Some(&why) {
                            eprintln!("kubelet {}: pod {ns}/{name} cannot start yet: {why}", self.node);
                            self.waiting.insert(uid.clone(), why);
                        }
                        continue;
                    }
                }
            }
            let changed = self.tend(&uid);
            if changed {
                let l = &self.pods[&uid];
                let status = self.status(&p, l);
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                if let Err(e) = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await {
                    eprintln!("kubelet {}: status of {ns}/{name}: {e}", self.node);
                } else if let Some(l) = self.pods.get_mut(&uid) {
                    l.unwritten = false;
                }
            }
        }
        Ok(())
    }

    /// Reaps exited containers, starts those whose back-off is over; true when the status is to be
    /// written (it changed, or its last write did not make it).
    fn tend(&mut self, uid: &str) -> bool {
        let l = self.pods.get_mut(uid).expect("a local pod");
        let mut changed = l.unwritten;
        for p in &mut l.procs {
            if let Some(c) = &mut p.child {
                if let Ok(Some(st)) = c.try_wait() {
                    let code = st.code().unwrap_or(128 + nix_signal(&st));
                    p.child = None;
                    p.last_exit = Some((code, now()));
                    let backoff = Duration::from_secs((10u64 << p.restarts.min(5)).min(300));
                    p.backoff_until = Some(Instant::now() + backoff);
                    changed = true;
                }
            } else if p.backoff_until.is_some_and(|t| Instant::now() >= t) {
                p.backoff_until = None;
                p.restarts += 1;
                // The last run's output stays readable as `--previous`.
                let _ = std::fs::rename(&p.log, p.log.with_extension("previous.log"));
                if let Err(e) = spawn(p) {
                    eprintln!("kubelet: restart {}: {e:#}", p.name);
                }
                changed = true;
            }
        }
        l.unwritten = changed;
        changed
    }

    fn status(&self, pod: &Pod, l: &Local) -> Value {
        let running = l.procs.iter().all(|p| p.child.is_some());
        let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }, "lastTransitionTime": now()});
        let containers: Vec<Value> = l
            .procs
            .iter()
            .map(|p| {
                let state = match &p.child {
                    Some(_) => json!({"running": {"startedAt": p.started_at}}),
                    None if p.backoff_until.is_some() => {
                        json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off restarting failed container {} in pod {}_{}", p.name, l.name, l.namespace)}})
                    }
                    None => json!({"waiting": {"reason": "ContainerCreating"}}),
                };
                let mut s = json!({"name": p.name, "image": p.image, "imageID": "", "ready": p.child.is_some(), "started": p.child.is_some(),
                                   "restartCount": p.restarts, "state": state,
                                   "containerID": format!("cnitrace-lab://{}", p.child.as_ref().map(|c| c.id()).unwrap_or(0))});
                if let Some((code, at)) = &p.last_exit {
                    s["lastState"] = json!({"terminated": {"exitCode": code, "reason": "Error", "finishedAt": at}});
                }
                s
            })
            .collect();
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
        let ip = if host_network { self.node_ip } else { l.ip };
        json!({"status": {
            "phase": "Running",
            "hostIP": self.node_ip.to_string(), "hostIPs": [{"ip": self.node_ip.to_string()}],
            "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "startTime": l.started,
            "conditions": [cond("PodReadyToStartContainers", true), cond("Initialized", true), cond("Ready", running), cond("ContainersReady", running), cond("PodScheduled", true)],
            "containerStatuses": containers,
        }})
    }

    /// The pod's network (unless hostNetwork), its volumes, its init containers, then its containers.
    async fn start(&self, pod: &Pod) -> Result<Local> {
        let spec = pod.spec.as_ref().context("a pod without spec")?;
        let (ns, name) = (pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let host_network = spec.host_network.unwrap_or(false);
        let dir = self.files.join("kubelet").join(&self.node).join(&uid);
        let mounts = self.volumes(pod, &dir).await?;
        let sandbox: String = uid.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        let (netns, ip, cni_result) = if host_network {
            (None, self.node_ip, None)
        } else {
            let conflist = self.conflist()?;
            let netns = format!("{}-pod-{name}", self.prefix);
            crate::lab::add_netns(&netns, &name)?;
            crate::sys::run(&tools::IP, &["-n", &netns, "link", "set", "lo", "up"])?;
            let cni = Cni { kubelet: self, netns: &netns, sandbox: &sandbox, namespace: &ns, name: &name, uid: &uid };
            match cni.add(&conflist) {
                Ok((ip, result)) => (Some(netns), ip, Some(result)),
                Err(e) => {
                    let _ = crate::lab::del_netns(&netns);
                    return Err(e);
                }
            }
        };
        let mut local = Local { namespace: ns.clone(), name: name.clone(), netns: netns.clone(), sandbox, ip, cni_result, procs: Vec::new(), started: now(), unwritten: true };
        // Where the log endpoint finds the pod's container logs by its name.
        let index = self.files.join("kubelet").join(&self.node).join("by-name");
        std::fs::create_dir_all(&index)?;
        let link = index.join(format!("{ns}_{name}"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&dir, &link)?;
        let run_ns = netns.clone().unwrap_or_else(|| self.node_ns.clone());
        let env_base = self.env_base(pod, ip)?;
        let resolv_conf = self.resolv_conf(pod, &dir)?;
        let result: Result<()> = (|| {
            for c in spec.init_containers.iter().flatten() {
                let m = container_mounts(c, &mounts);
                let argv = expand(&argv(c), &env_of(c, &env_base));
                init(&argv, &m).with_context(|| format!("init container {}", c.name))?;
            }
            for c in &spec.containers {
                let m = container_mounts(c, &mounts);
                let env = env_of(c, &env_base);
                let argv: Vec<String> = expand(&argv(c), &env).iter().map(|a| translate(a, &m)).collect();
                let command = self.program(&name, c, argv, &m, &resolv_conf)?;
                let env = env.into_iter().map(|(k, v)| (k, translate(&v, &m))).collect();
                let log = dir.join(format!("{}.log", c.name));
                let mut p = Proc { name: c.name.clone(), image: c.image.clone().unwrap_or_default(), child: None, restarts: 0, started_at: now(), backoff_until: None, last_exit: None, command, env, ns: run_ns.clone(), log };
                spawn(&mut p)?;
                local.procs.push(p);
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.stop(local);
            return Err(e);
        }
        Ok(local)
    }

    /// The program a container runs here, with its arguments.
    fn program(&self, pod: &str, c: &Container, argv: Vec<String>, mounts: &[(String, PathBuf)], resolv_conf: &Path) -> Result<Vec<String>> {
        let first = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a).to_string()).unwrap_or_default();
        let tool: Option<&Tool> = match first.as_str() {
            "flanneld" => Some(&tools::FLANNELD),
            "kube-proxy" => Some(&tools::KUBE_PROXY),
            "coredns" => Some(&tools::COREDNS),
            _ => None,
        };
        // In-cluster credentials, which flanneld and CoreDNS would read from the fixed token path: the
        // kubeconfig the kubelet wrote into the pod's service account folder.
        let sa = translate(SA_DIR, mounts);
        let in_cluster = (sa != SA_DIR).then(|| Path::new(&sa).join("kubeconfig"));
        if first == "coredns" {
            if let Some(conf) = argv.windows(2).find(|w| w[0].trim_start_matches('-') == "conf").map(|w| PathBuf::from(&w[1])) {
                let text = std::fs::read_to_string(&conf).with_context(|| format!("CoreDNS's Corefile {}", conf.display()))?;
                std::fs::write(&conf, lab_corefile(&text, resolv_conf, in_cluster.as_deref()))?;
            }
        }
        if let Some(t) = tool {
            let mut cmd = vec![t.path().display().to_string()];
            cmd.extend(argv.into_iter().skip(1));
            if let (Some(k), "flanneld") = (&in_cluster, first.as_str()) {
                cmd.push(format!("--kubeconfig-file={}", k.display()));
            }
            return Ok(cmd);
        }
        let exe = std::env::current_exe().context("locate the cnitrace binary")?;
        let mut cmd = vec![exe.display().to_string(), "lab".into(), "serve".into(), "--name".into(), pod.into()];
        cmd.extend(["--resolv-conf".into(), resolv_conf.display().to_string()]);
        if let Some(port) = c.ports.iter().flatten().next() {
            cmd.extend(["--port".into(), port.container_port.to_string()]);
        }
        Ok(cmd)
    }

    /// The pod's `/etc/resolv.conf`, as kubelet writes it: for `dnsPolicy: ClusterFirst` (the default)
    /// the cluster's DNS (the kube-dns Service) with the pod's namespace's search list; for `Default`, and
    /// for a hostNetwork pod, the node's own.
    fn resolv_conf(&self, pod: &Pod, dir: &Path) -> Result<PathBuf> {
        let spec = pod.spec.as_ref().context("spec")?;
        let node = self.node_resolv_conf();
        let cluster_first = spec.dns_policy.as_deref().unwrap_or("ClusterFirst") == "ClusterFirst" && !spec.host_network.unwrap_or(false);
        if !cluster_first {
            return Ok(node);
        }
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let file = dir.join("resolv.conf");
        let d = manifests::CLUSTER_DOMAIN;
        std::fs::write(&file, format!("search {ns}.svc.{d} svc.{d} {d}\nnameserver {}\noptions ndots:5\n", self.layout.dns_service_ip()?))?;
        Ok(file)
    }

    /// The node's own /etc/resolv.conf (written at the kubelet's start).
    fn node_resolv_conf(&self) -> PathBuf {
        self.root.join("etc/resolv.conf")
    }

    /// The environment every container of the pod gets: the downward API's fields, the `kubernetes`
    /// Service's address.
    fn env_base(&self, pod: &Pod, ip: Ipv4Addr) -> Result<BTreeMap<String, String>> {
        let mut e = BTreeMap::new();
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
        e.insert("metadata.name".into(), pod.metadata.name.clone().unwrap_or_default());
        e.insert("metadata.namespace".into(), pod.metadata.namespace.clone().unwrap_or_default());
        e.insert("spec.nodeName".into(), self.node.clone());
        e.insert("spec.serviceAccountName".into(), pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default());
        e.insert("status.hostIP".into(), self.node_ip.to_string());
        e.insert("status.podIP".into(), if host_network { self.node_ip } else { ip }.to_string());
        e.insert("=KUBERNETES_SERVICE_HOST".into(), self.layout.kubernetes_service_ip()?.to_string());
        e.insert("=KUBERNETES_SERVICE_PORT".into(), "443".into());
        Ok(e)
    }

    /// The node's CNI config: the first conflist (by name) in its /etc/cni/net.d, as the runtime picks it.
    fn conflist(&self) -> Result<Value> {
        let dir = self.root.join("etc/cni/net.d");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "conflist"));
        names.sort();
        let first = names.first().ok_or_else(|| anyhow!("network plugin not ready: no CNI configuration in {}", dir.display()))?;
        let mut conf: Value = serde_json::from_slice(&std::fs::read(first)?).with_context(|| format!("parse {}", first.display()))?;
        // The plugins read their files (flannel's subnet.env, the IPAM's leases) in the node's filesystem:
        // its folder here.
        self.node_paths(&mut conf);
        Ok(conf)
    }

    /// Every absolute path among the strings of `v` made the node folder's.
    fn node_paths(&self, v: &mut Value) {
        match v {
            Value::String(s) if s.starts_with('/') => *s = self.host_path(s).display().to_string(),
            Value::Array(a) => a.iter_mut().for_each(|x| self.node_paths(x)),
            Value::Object(o) => o.values_mut().for_each(|x| self.node_paths(x)),
            _ => {}
        }
    }

    /// Every volume of the pod as a folder; returns (volume name, folder).
    async fn volumes(&self, pod: &Pod, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let spec = pod.spec.as_ref().context("spec")?;
        let mut out = Vec::new();
        for v in spec.volumes.iter().flatten() {
            let folder = dir.join("volumes").join(&v.name);
            if let Some(h) = &v.host_path {
                out.push((v.name.clone(), self.host_path(&h.path)));
                continue;
            }
            std::fs::create_dir_all(&folder)?;
            if let Some(cm) = &v.config_map {
                for (k, val) in self.config_map(&ns, &cm.name).await? {
                    std::fs::write(folder.join(k), val)?;
                }
            }
            if let Some(p) = &v.projected {
                for s in p.sources.iter().flatten() {
                    if let Some(t) = &s.service_account_token {
                        let sa = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
                        let token = self.token(&ns, &sa, pod, t.expiration_seconds.unwrap_or(3607)).await?;
                        std::fs::write(folder.join(&t.path), token)?;
                    }
                    if let Some(cm) = &s.config_map {
                        let data = self.config_map(&ns, &cm.name).await?;
                        for item in cm.items.iter().flatten() {
                            if let Some(val) = data.get(&item.key) {
                                std::fs::write(folder.join(&item.path), val)?;
                            }
                        }
                    }
                    if s.downward_api.is_some() {
                        std::fs::write(folder.join("namespace"), &ns)?;
                    }
                }
                // What rest.InClusterConfig would build from this folder, for programs given a kubeconfig:
                // the kubernetes Service's address — but for a hostNetwork pod (flanneld), the API server's
                // own, as kubeadm's kube-proxy kubeconfig names it. Started beside kube-proxy, flanneld's
                // first SYN to the Service could leave before kube-proxy's rules exist; its conntrack
                // entry then keeps every retry un-translated until the 30 s dial timeout, and the lab's
                // start took 54 s instead of 13 (measured 2026-12-08).
                if folder.join("token").exists() {
                    let host_network = spec.host_network.unwrap_or(false);
                    let server = if host_network { self.layout.api_server.clone() } else { format!("https://{}:443", self.layout.kubernetes_service_ip()?) };
                    let cfg = pki::kubeconfig(&server, &folder.join("ca.crt"), pki::Credentials::TokenFile(&folder.join("token")), "in-cluster");
                    std::fs::write(folder.join("kubeconfig"), serde_json::to_vec_pretty(&cfg)?)?;
                }
            }
            out.push((v.name.clone(), folder));
        }
        // ConfigMap files name paths of the container (a kubeconfig's token file): rewritten once every
        // volume has its folder.
        for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            let m = container_mounts(c, &out);
            for vm in c.volume_mounts.iter().flatten() {
                let Some(v) = spec.volumes.iter().flatten().find(|v| v.name == vm.name) else { continue };
                if v.config_map.is_none() {
                    continue;
                }
                let folder = dir.join("volumes").join(&v.name);
                for e in std::fs::read_dir(&folder)?.flatten() {
                    let text = std::fs::read_to_string(e.path())?;
                    std::fs::write(e.path(), translate(&text, &m))?;
                }
            }
        }
        Ok(out)
    }

    /// A hostPath: the node's own folder, but for what every node shares with the host (the kernel's
    /// modules, the xtables lock).
    fn host_path(&self, path: &str) -> PathBuf {
        // Shared with the host, or already in the lab's folder (a path a container's mount rewrote).
        if ["/lib/modules", "/run/xtables.lock"].contains(&path) || Path::new(path).starts_with(&self.files) {
            return PathBuf::from(path);
        }
        let p = self.root.join(path.trim_start_matches('/'));
        let _ = std::fs::create_dir_all(&p);
        p
    }

    async fn config_map(&self, ns: &str, name: &str) -> Result<BTreeMap<String, String>> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let cm = api.get(name).await.with_context(|| format!("configmap {ns}/{name}"))?;
        Ok(cm.data.unwrap_or_default())
    }

    async fn token(&self, ns: &str, sa: &str, pod: &Pod, expiration: i64) -> Result<String> {
        let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [], "expirationSeconds": expiration.max(600),
                     "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.metadata.name, "uid": pod.metadata.uid}}});
        let url = format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token");
        let r = http::Request::post(url).header("content-type", "application/json").body(serde_json::to_vec(&req)?)?;
        let v: Value = self.client.request(r).await.with_context(|| format!("token of service account {ns}/{sa}"))?;
        v["status"]["token"].as_str().map(str::to_string).ok_or_else(|| anyhow!("no token in the TokenRequest's answer"))
    }

    /// Stops a pod: its processes (TERM, then KILL after 5 s), its network (CNI DEL), its namespace.
    fn stop(&self, mut l: Local) {
        for p in &mut l.procs {
            if let Some(c) = &mut p.child {
                let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(netns) = &l.netns {
            if let Ok(conflist) = self.conflist() {
                let cni = Cni { kubelet: self, netns, sandbox: &l.sandbox, namespace: &l.namespace, name: &l.name, uid: "" };
                if let Err(e) = cni.del(&conflist, l.cni_result.as_ref()) {
                    eprintln!("kubelet {}: CNI DEL of {}/{}: {e:#}", self.node, l.namespace, l.name);
                }
            }
            let _ = crate::lab::del_netns(netns);
        }
    }
}

/// kubelet's log endpoint on the node's address, port 10250 (HTTPS with the node's serving
/// certificate), as the API server reaches it for `kubectl logs`: `/containerLogs/NS/POD/CONTAINER`
/// with `tailLines` and `previous`. It does not check who asks (a real kubelet authorizes the API
/// server's client certificate).
fn serve_logs(files: &Files, prefix: &str, node: &str, addr: Ipv4Addr) -> Result<()> {
    let tls = crate::lab::serve::server_config(&files.pki(&format!("node-{node}-serving.crt")), &files.pki(&format!("node-{node}-serving.key")))?;
    let ns_path = crate::netns::named(&format!("{prefix}-{node}"));
    let listener = crate::netns::in_netns(&ns_path, move || Ok(std::net::TcpListener::bind((addr, 10250))?))?;
    let logs = files.dir.join("kubelet").join(node).join("by-name");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(s) = conn else { continue };
            let (tls, logs) = (tls.clone(), logs.clone());
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(conn) = rustls::ServerConnection::new(tls) else { return };
                let mut s = rustls::StreamOwned::new(conn, s);
                let head = crate::sys::read_http_head(&mut s);
                let (status, body) = container_log(&logs, &head);
                let reply = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                use std::io::Write;
                let _ = s.write_all(reply.as_bytes());
                let _ = s.write_all(body.as_bytes());
                let _ = s.flush();
            });
        }
    });
    Ok(())
}

/// The answer to one request of the log endpoint.
fn container_log(logs: &Path, head: &[u8]) -> (&'static str, String) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else { return ("400 Bad Request", "bad request\n".into()) };
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["containerLogs", ns, pod, container] = parts.as_slice() else { return ("404 Not Found", format!("no such endpoint: {path}\n")) };
    let q = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(&format!("{k}=")));
    let previous = q("previous") == Some("true");
    // `previous`: the run before the current one; before a first restart, the run that just ended.
    let dir = logs.join(format!("{ns}_{pod}"));
    let file = Some(dir.join(format!("{container}.previous.log"))).filter(|f| previous && f.exists()).unwrap_or_else(|| dir.join(format!("{container}.log")));
    let Ok(text) = std::fs::read_to_string(&file) else {
        return ("404 Not Found", format!("{}container \"{container}\" in pod \"{pod}\" has no log\n", if previous { "previous terminated " } else { "" }));
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = q("tailLines").and_then(|n| n.parse::<usize>().ok()).unwrap_or(lines.len()).min(lines.len());
    ("200 OK", lines[lines.len() - tail..].iter().map(|l| format!("{l}\n")).collect())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn nix_signal(st: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.signal().unwrap_or(0)
}

/// Starts a container's process in its namespace, in a session of its own, its output to its log.
fn spawn(p: &mut Proc) -> Result<()> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&p.log).with_context(|| format!("open {}", p.log.display()))?;
    let mut cmd = Tool::netns_exec(&p.ns, Path::new(&p.command[0]));
    cmd.args(&p.command[1..]).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in &p.env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    p.child = Some(cmd.spawn().with_context(|| format!("start container {} ({})", p.name, p.command[0]))?);
    p.started_at = now();
    Ok(())
}

/// A container's command line as Kubernetes composes it: `command` (else its image's entrypoint), then
/// `args`.
fn argv(c: &Container) -> Vec<String> {
    let entrypoint = c.command.is_none().then(|| entrypoint(c.image.as_deref().unwrap_or_default())).flatten().map(|e| vec![e.to_string()]);
    c.command.clone().or(entrypoint).into_iter().flatten().chain(c.args.iter().flatten().cloned()).collect()
}

/// The ENTRYPOINT of the images whose containers give only `args`.
fn entrypoint(image: &str) -> Option<&'static str> {
    (image.split(':').next() == manifests::COREDNS_IMAGE.split(':').next()).then_some("/coredns")
}

/// Where a pod's service account's token and CA are (the projected volume the API server adds).
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// kubeadm's Corefile as the lab runs it: without a runtime CoreDNS cannot find its in-cluster
/// credentials at their fixed path nor the pod's `/etc/resolv.conf`, so its `kubernetes` block is given
/// the kubeconfig the kubelet wrote from the pod's token, and `/etc/resolv.conf` is the pod's file.
pub fn lab_corefile(text: &str, resolv_conf: &Path, kubeconfig: Option<&Path>) -> String {
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(&line.replace("/etc/resolv.conf", &resolv_conf.display().to_string()));
        out.push('\n');
        let t = line.trim();
        if let (Some(k), true) = (kubeconfig, t.starts_with("kubernetes ") && t.ends_with('{')) {
            out.push_str(&format!("       kubeconfig {}\n", k.display()));
        }
    }
    out
}

/// The container's environment: its `env` (values and downward-API fields) and the pod's.
fn env_of(c: &Container, base: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = base.iter().filter_map(|(k, v)| k.strip_prefix('=').map(|k| (k.to_string(), v.clone()))).collect();
    for e in c.env.iter().flatten() {
        let v = match (&e.value, e.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
            (Some(v), _) => v.clone(),
            (None, Some(f)) => base.get(&f.field_path).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        env.push((e.name.clone(), v));
    }
    env
}

/// `$(VAR)` references expanded, as kubelet does in command and args.
fn expand(argv: &[String], env: &[(String, String)]) -> Vec<String> {
    argv.iter()
        .map(|a| {
            let mut s = a.clone();
            for (k, v) in env {
                s = s.replace(&format!("$({k})"), v);
            }
            s
        })
        .collect()
}

/// The container's mounts: (mountPath without a trailing '/', folder), longest first.
fn container_mounts(c: &Container, volumes: &[(String, PathBuf)]) -> Vec<(String, PathBuf)> {
    let mut m: Vec<(String, PathBuf)> = c
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|vm| {
            let folder = volumes.iter().find(|(n, _)| *n == vm.name)?.1.clone();
            let folder = match &vm.sub_path {
                Some(s) if !s.is_empty() => folder.join(s),
                _ => folder,
            };
            Some((vm.mount_path.trim_end_matches('/').to_string(), folder))
        })
        .collect();
    m.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    m
}

/// Every path under a mount rewritten to the mount's folder (longest mount first; a path that is the
/// mount itself or under it: `/etc/kube-flannel` in `--net-config-path=/etc/kube-flannel/net-conf.json`).
pub fn translate(text: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for (mp, folder) in mounts {
            if rest.starts_with(mp.as_str()) {
                let after = &rest[mp.len()..];
                let boundary = after.is_empty() || after.starts_with(['/', '"', '\'', ' ', '\n', ',', ':']);
                let folder = folder.display().to_string();
                if boundary && mp.as_str() != folder {
                    out.push_str(&folder);
                    rest = after;
                    continue 'scan;
                }
            }
        }
        let ch = rest.chars().next().expect("not empty");
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

/// Files in the images the lab's init containers copy from: flannel's CNI plugin (`/flannel`).
fn image_file(path: &str) -> Option<PathBuf> {
    (path == "/flannel").then(|| tools::CNI_FLANNEL.path())
}

/// An init container: flannel's are `cp -f SRC DST`; anything else is refused (the lab's kubelet has
/// no runtime to run it in).
fn init(argv: &[String], mounts: &[(String, PathBuf)]) -> Result<()> {
    let args: Vec<&String> = argv.iter().skip(1).filter(|a| !a.starts_with('-')).collect();
    match (argv.first().map(String::as_str), args.as_slice()) {
        (Some("cp"), [src, dst]) => {
            let from = image_file(src).unwrap_or_else(|| PathBuf::from(translate(src, mounts)));
            let to = PathBuf::from(translate(dst, mounts));
            if to == Path::new(dst.as_str()) {
                bail!("cp to {dst}: not under a volume of the container");
            }
            std::fs::copy(&from, &to).with_context(|| format!("cp {} {}", from.display(), to.display()))?;
            Ok(())
        }
        _ => bail!("init container {argv:?}: the lab's kubelet runs only `cp SRC DST` init containers"),
    }
}

/// A CNI call for one pod, as libcni makes it.
struct Cni<'a> {
    kubelet: &'a Kubelet,
    netns: &'a str,
    sandbox: &'a str,
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
}

impl Cni<'_> {
    /// ADD through every plugin of the conflist; the pod's address and the last result.
    fn add(&self, conflist: &Value) -> Result<(Ipv4Addr, Value)> {
        let mut prev: Option<Value> = None;
        for plugin in conflist["plugins"].as_array().context("a conflist without plugins")? {
            prev = Some(self.exec("ADD", conflist, plugin, prev.as_ref())?);
        }
        let result = prev.context("a conflist without plugins")?;
        let ip = result["ips"]
            .as_array()
            .and_then(|ips| ips.iter().find_map(|i| i["address"].as_str()?.split('/').next()?.parse::<Ipv4Addr>().ok()))
            .ok_or_else(|| anyhow!("the CNI result holds no IPv4 address: {result}"))?;
        Ok((ip, result))
    }

    /// DEL through the plugins in reverse order.
    fn del(&self, conflist: &Value, result: Option<&Value>) -> Result<()> {
        let mut first_err = None;
        for plugin in conflist["plugins"].as_array().into_iter().flatten().rev() {
            if let Err(e) = self.exec("DEL", conflist, plugin, result) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn exec(&self, command: &str, list: &Value, plugin: &Value, prev: Option<&Value>) -> Result<Value> {
        let kind = plugin["type"].as_str().context("a plugin without type")?;
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        if plugin["capabilities"]["portMappings"].as_bool() == Some(true) {
            conf["runtimeConfig"] = json!({"portMappings": []});
        }
        let k = self.kubelet;
        let bin_dirs = format!("{}:{}", k.root.join("opt/cni/bin").display(), super::super::cni::CNI_BIN_DIR);
        let plugin_path = std::env::split_paths(&bin_dirs).map(|d| d.join(kind)).find(|p| p.is_file()).ok_or_else(|| anyhow!("CNI plugin {kind} not found in {bin_dirs}"))?;
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}", self.namespace, self.name, self.sandbox, self.uid);
        let mut cmd = tools::ENV.in_netns(&k.node_ns);
        cmd.arg(format!("CNI_COMMAND={command}"))
            .arg(format!("CNI_CONTAINERID={}", self.sandbox))
            .arg(format!("CNI_NETNS={}", crate::netns::named(self.netns).display()))
            .arg("CNI_IFNAME=eth0")
            .arg(format!("CNI_PATH={bin_dirs}"))
            .arg(format!("CNI_ARGS={args}"))
            .arg(&plugin_path);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("run a CNI plugin")?;
        {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let msg = serde_json::from_str::<Value>(&stdout).ok().and_then(|v| v["msg"].as_str().map(str::to_string)).unwrap_or_else(|| format!("{} {}", stdout.trim(), String::from_utf8_lossy(&out.stderr).trim()));
            bail!("CNI {command} ({kind}) for {}/{}: {msg}", self.namespace, self.name);
        }
        if command == "DEL" || stdout.trim().is_empty() {
            return Ok(prev.cloned().unwrap_or(Value::Null));
        }
        serde_json::from_str(&stdout).with_context(|| format!("parse the {kind} plugin's result"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_a_mount_are_rewritten_and_others_are_not() {
        let m = vec![
            ("/var/run/secrets/kubernetes.io/serviceaccount".to_string(), PathBuf::from("/lab/sa")),
            ("/etc/kube-flannel".to_string(), PathBuf::from("/lab/cfg")),
            ("/run/flannel".to_string(), PathBuf::from("/lab/node/run/flannel")),
        ];
        assert_eq!(translate("--net-config-path=/etc/kube-flannel/net-conf.json", &m), "--net-config-path=/lab/cfg/net-conf.json");
        assert_eq!(translate("--subnet-file=/run/flannel/subnet.env", &m), "--subnet-file=/lab/node/run/flannel/subnet.env");
        assert_eq!(translate("    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token\n", &m), "    tokenFile: /lab/sa/token\n");
        // Not under a mount: a longer name that only starts the same, and a path elsewhere.
        assert_eq!(translate("/run/flannel-v6/x /etc/kube-flannel2 /opt/bin/flanneld", &m), "/run/flannel-v6/x /etc/kube-flannel2 /opt/bin/flanneld");
    }

    #[test]
    fn the_lab_corefile_gives_coredns_its_credentials_and_the_pods_resolv_conf() {
        let kubeadm = ".:53 {\n    kubernetes cluster.local in-addr.arpa ip6.arpa {\n       pods insecure\n    }\n    forward . /etc/resolv.conf {\n       max_concurrent 1000\n    }\n}\n";
        let lab = lab_corefile(kubeadm, Path::new("/lab/node/etc/resolv.conf"), Some(Path::new("/lab/sa/kubeconfig")));
        assert_eq!(
            lab,
            ".:53 {\n    kubernetes cluster.local in-addr.arpa ip6.arpa {\n       kubeconfig /lab/sa/kubeconfig\n       pods insecure\n    }\n    forward . /lab/node/etc/resolv.conf {\n       max_concurrent 1000\n    }\n}\n"
        );
        let c: Container = serde_json::from_value(json!({"name": "coredns", "image": manifests::COREDNS_IMAGE, "args": ["-conf", "/etc/coredns/Corefile"]})).unwrap();
        assert_eq!(argv(&c), ["/coredns", "-conf", "/etc/coredns/Corefile"]);
    }

    #[test]
    fn commands_expand_the_containers_variables() {
        let env = vec![("NODE_NAME".to_string(), "edge-4".to_string())];
        assert_eq!(expand(&["--hostname-override=$(NODE_NAME)".into(), "$(OTHER)".into()], &env), vec!["--hostname-override=edge-4", "$(OTHER)"]);
    }
}
