//! The Kubernetes API, where there is one: pods and nodes by name, and flannel's own record of the
//! cluster (Node annotations, the `kube-flannel-cfg` ConfigMap). Optional at run time: every local
//! capability works without it, and a missing, unreachable or forbidden API costs one line and at most
//! [`API_BUDGET`] of waiting, never the command.
//!
//! Configuration is found the way kubectl finds it: `--kubeconfig`, then `KUBECONFIG` (a list, merged;
//! files that do not exist are skipped, as kubectl does), then `~/.kube/config`, then the pod's service
//! account when running in a cluster.

pub mod agents;
pub mod facts;
pub mod kubeconfig;
pub mod manifests;
mod target;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kube::{
    api::{Api, ListParams},
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};
use thiserror::Error;

pub use facts::{parse_cidr, ClusterFacts, NetConf, NodeFacts, PodFacts, ServiceFacts};
pub use target::Target;

/// The most any command waits for the API in all (connect and every request together): an API that is
/// down or slow must not hold up a trace.
pub const API_BUDGET: Duration = Duration::from_secs(2);

/// Where flannel's ConfigMap lives: the current manifests' namespace, then the older one.
pub const FLANNEL_CONFIGMAP: &str = "kube-flannel-cfg";
pub const FLANNEL_NAMESPACES: [&str; 2] = ["kube-flannel", "kube-system"];

/// How to reach the API (the global options, as kubectl has them).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KubeArgs {
    /// The kubeconfig file to use (else KUBECONFIG, else ~/.kube/config, else the pod's service account).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace of pods given by name alone (default: the context's, else `default`).
    #[arg(long, short = 'n', global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

/// Why there is no API to ask. Everything but [`NoApi::BadConfig`] is a normal state of a node.
#[derive(Clone, Debug, Error)]
pub enum NoApi {
    #[error("no Kubernetes API configured (no --kubeconfig, KUBECONFIG, ~/.kube/config, and not in a pod)")]
    NotConfigured,
    #[error("kubeconfig {file}: {detail}")]
    BadConfig { file: String, detail: String },
    #[error("the Kubernetes API at {server} did not answer: {detail}")]
    Unreachable { server: String, detail: String },
    #[error("the Kubernetes API at {server} did not answer within {} s", API_BUDGET.as_secs_f32())]
    TimedOut { server: String },
    #[error("the Kubernetes API at {server} refused: {detail}")]
    Refused { server: String, detail: String },
}

/// One failed request: the API as a whole may still be fine (a 404 for one object, a 403 for one kind).
#[derive(Clone, Debug, Error)]
pub enum ApiError {
    #[error("{0}")]
    NoApi(NoApi),
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("forbidden to {what}: {message}")]
    Forbidden { what: String, message: String },
    #[error("{what}: the API answered {code} {message}")]
    Other { what: String, code: u16, message: String },
}

/// A client with a budget: after the first sign that the API is down, every later request fails at
/// once with the same reason instead of waiting again.
pub struct Cluster {
    client: Client,
    rt: tokio::runtime::Runtime,
    /// The server's URL, for messages.
    pub server: String,
    /// Where the configuration came from (file and context, or "in-cluster").
    pub source: String,
    pub default_namespace: String,
    deadline: Instant,
    down: Option<NoApi>,
}

/// How this process reaches the API, set once by the CLI: a repair that acts through the API (a pod
/// restarted), applied or undone deep in `fix`, connects the same way the command did.
static CONFIGURED: std::sync::OnceLock<KubeArgs> = std::sync::OnceLock::new();

pub fn configure(args: &KubeArgs) {
    let _ = CONFIGURED.set(args.clone());
}

/// [`connect`] with the command's own options.
pub fn connect_configured() -> Result<Cluster, NoApi> {
    connect(CONFIGURED.get().unwrap_or(&KubeArgs::default()))
}

/// How long a restarted DaemonSet pod may take to be replaced and Ready (flanneld starts in seconds;
/// an image pull can take longer).
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(120);

/// Reads the configuration (no request yet). `Err(NotConfigured)` when there is none at all.
pub fn connect(args: &KubeArgs) -> Result<Cluster, NoApi> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| NoApi::Unreachable { server: "-".into(), detail: e.to_string() })?;
    let (config, source) = rt.block_on(config(args))?;
    let server = config.cluster_url.to_string().trim_end_matches('/').to_string();
    let default_namespace = config.default_namespace.clone();
    let client = rt.block_on(async { Client::try_from(config) }).map_err(|e| NoApi::BadConfig { file: source.clone(), detail: e.to_string() })?;
    Ok(Cluster { client, rt, server, source, default_namespace, deadline: Instant::now() + API_BUDGET, down: None })
}

/// `--kubeconfig` > `KUBECONFIG` > `~/.kube/config` > in-cluster, as kubectl.
async fn config(args: &KubeArgs) -> Result<(Config, String), NoApi> {
    let options = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
    let files: Vec<PathBuf> = match (&args.kubeconfig, std::env::var_os("KUBECONFIG")) {
        (Some(f), _) => vec![f.clone()],
        (None, Some(list)) => std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty() && p.exists()).collect(),
        (None, None) => home_config().into_iter().collect(),
    };
    let mut config = if files.is_empty() {
        if args.context.is_some() {
            return Err(NoApi::BadConfig { file: "(none)".into(), detail: "--context needs a kubeconfig, and none was found".into() });
        }
        let c = Config::incluster().map_err(|_| NoApi::NotConfigured)?;
        (c, "in-cluster service account".to_string())
    } else {
        let names = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(":");
        let mut merged = Kubeconfig::default();
        for f in &files {
            let one = Kubeconfig::read_from(f).map_err(|e| NoApi::BadConfig { file: f.display().to_string(), detail: kubeconfig_detail(&e) })?;
            merged = merged.merge(one).map_err(|e| NoApi::BadConfig { file: names.clone(), detail: kubeconfig_detail(&e) })?;
        }
        let context = args.context.clone().or_else(|| merged.current_context.clone()).unwrap_or_default();
        let c = Config::from_custom_kubeconfig(merged, &options).await.map_err(|e| NoApi::BadConfig { file: names.clone(), detail: kubeconfig_detail(&e) })?;
        (c, format!("{names} (context {context})"))
    };
    config.0.connect_timeout = Some(API_BUDGET);
    config.0.read_timeout = Some(API_BUDGET);
    config.0.write_timeout = Some(API_BUDGET);
    // One attempt per request: a retry would wait past the budget.
    config.0.default_retry = false;
    Ok(config)
}

fn home_config() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".kube/config");
    p.exists().then_some(p)
}

/// The error and every cause under it, on one line (the YAML parser's says which field and where).
fn kubeconfig_detail(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

impl Cluster {
    /// A fresh budget, and the API asked again even if it was down: for a command that runs for hours
    /// (`watch`) and reads the API again now and then.
    pub fn renew_budget(&mut self) {
        self.deadline = Instant::now() + API_BUDGET;
        self.down = None;
    }

    /// Runs one request within what is left of the budget; marks the API down on a transport failure.
    fn call<T>(&mut self, what: &str, fut: impl std::future::Future<Output = Result<T, kube::Error>>) -> Result<T, ApiError> {
        if let Some(d) = &self.down {
            return Err(ApiError::NoApi(d.clone()));
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        let out = self.rt.block_on(async { tokio::time::timeout(left, fut).await });
        match out {
            Err(_) => Err(self.mark_down(NoApi::TimedOut { server: self.server.clone() })),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(kube::Error::Api(s))) => Err(match s.code {
                404 => ApiError::NotFound { what: what.to_string() },
                403 => ApiError::Forbidden { what: what.to_string(), message: s.message.clone() },
                401 => self.mark_down(NoApi::Refused { server: self.server.clone(), detail: format!("401 Unauthorized ({})", s.message) }),
                code => ApiError::Other { what: what.to_string(), code, message: s.message.clone() },
            }),
            Ok(Err(e)) => {
                let detail = kubeconfig_detail(&e);
                let down = if detail.contains("timed out") || detail.contains("deadline") {
                    NoApi::TimedOut { server: self.server.clone() }
                } else {
                    NoApi::Unreachable { server: self.server.clone(), detail }
                };
                Err(self.mark_down(down))
            }
        }
    }

    fn mark_down(&mut self, why: NoApi) -> ApiError {
        self.down = Some(why.clone());
        ApiError::NoApi(why)
    }

    /// Why the API stopped answering, once it has.
    pub fn down(&self) -> Option<&NoApi> {
        self.down.as_ref()
    }

    pub fn pod(&mut self, namespace: &str, name: &str) -> Result<PodFacts, ApiError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let name = name.to_string();
        let pod = self.call(&format!("pod {namespace}/{name}"), async move { api.get(&name).await })?;
        Ok(PodFacts::of(&pod))
    }

    /// Deletes a DaemonSet's pod on `node` and waits for its replacement there to be Ready (what
    /// restarting flannel on one node is). Returns the new pod's name. No undo: the old pod is gone.
    pub fn restart_pod(&mut self, namespace: &str, name: &str, node: &str, app: &str) -> anyhow::Result<String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let n = name.to_string();
        self.write(&format!("delete pod {namespace}/{name}"), Duration::from_secs(10), async move { api.delete(&n, &Default::default()).await.map(|_| ()) })?;
        let t0 = Instant::now();
        loop {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
            let pods = self.write("list the replacement", Duration::from_secs(10), async move { api.list(&lp).await })?;
            let new = pods.items.iter().map(PodFacts::of).find(|p| p.name != name && p.app.as_deref() == Some(app) && p.ready);
            if let Some(p) = new {
                return Ok(p.name);
            }
            if t0.elapsed() > RESTART_TIMEOUT {
                anyhow::bail!("no Ready replacement for {namespace}/{name} on {node} within {} s", RESTART_TIMEOUT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Sets `key` of a ConfigMap, restarts a DaemonSet's pods (`kubectl rollout restart`: a new
    /// `restartedAt` annotation on its pod template) and waits until every pod it owns is a new one and
    /// Ready. The ConfigMap's old value is the caller's to keep (the undo is this with it).
    pub fn reconfigure(&mut self, namespace: &str, configmap: &str, key: &str, value: &str, daemonset: &str) -> anyhow::Result<()> {
        use kube::api::{Patch, PatchParams};
        let owner = format!("DaemonSet/{daemonset}");
        let before: std::collections::BTreeSet<String> = self.ds_pods(namespace, &owner)?.into_iter().map(|p| p.name).collect();
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({"data": {key: value}});
        let cm = configmap.to_string();
        self.write(&format!("patch configmap {namespace}/{configmap}"), Duration::from_secs(10), async move {
            cms.patch(&cm, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
        })?;
        let dss: Api<k8s_openapi::api::apps::v1::DaemonSet> = Api::namespaced(self.client.clone(), namespace);
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}}}});
        let ds = daemonset.to_string();
        self.write(&format!("rollout restart daemonset {namespace}/{daemonset}"), Duration::from_secs(10), async move {
            dss.patch(&ds, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
        })?;
        let t0 = Instant::now();
        loop {
            let now = self.ds_pods(namespace, &owner)?;
            if now.len() >= before.len() && !now.is_empty() && now.iter().all(|p| p.ready && !before.contains(&p.name)) {
                return Ok(());
            }
            if t0.elapsed() > RESTART_TIMEOUT {
                anyhow::bail!("{namespace}/{daemonset}'s pods were not all replaced and Ready within {} s", RESTART_TIMEOUT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The controller (`name` of its DaemonSet) of the pods labelled `app` in `namespace`.
    pub fn owner_of_app(&mut self, namespace: &str, app: &str) -> anyhow::Result<Option<String>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let list = self.write(&format!("list the {app} pods"), Duration::from_secs(10), async move { api.list(&ListParams::default()).await })?;
        Ok(list.items.iter().map(PodFacts::of).filter(|p| p.app.as_deref() == Some(app)).find_map(|p| p.owner?.strip_prefix("DaemonSet/").map(str::to_string)))
    }

    fn ds_pods(&mut self, namespace: &str, owner: &str) -> anyhow::Result<Vec<PodFacts>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let list = self.write(&format!("list the pods of {owner}"), Duration::from_secs(10), async move { api.list(&ListParams::default()).await })?;
        Ok(list.items.iter().map(PodFacts::of).filter(|p| p.owner.as_deref() == Some(owner)).collect())
    }

    /// A request of a repair: its own timeout, not the diagnosis' budget.
    fn write<T>(&mut self, what: &str, timeout: Duration, fut: impl std::future::Future<Output = Result<T, kube::Error>>) -> anyhow::Result<T> {
        match self.rt.block_on(async { tokio::time::timeout(timeout, fut).await }) {
            Err(_) => anyhow::bail!("{what}: the API at {} did not answer within {} s", self.server, timeout.as_secs()),
            Ok(Err(kube::Error::Api(s))) => anyhow::bail!("{what}: the API answered {} {}", s.code, s.message),
            Ok(Err(e)) => anyhow::bail!("{what}: {}", kubeconfig_detail(&e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// A Service by name, with the pods its selector matches.
    pub fn service(&mut self, namespace: &str, name: &str) -> Result<ServiceFacts, ApiError> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let n = name.to_string();
        let svc = self.call(&format!("service {namespace}/{name}"), async move { api.get(&n).await })?;
        let mut f = ServiceFacts::of(&svc);
        f.selected = self.selected_pods(&f)?;
        Ok(f)
    }

    /// The Services whose ClusterIP is `ip` (one, in a sane cluster), with the pods they select.
    pub fn services_with_ip(&mut self, ip: Ipv4Addr) -> Result<Vec<ServiceFacts>, ApiError> {
        let api: Api<Service> = Api::all(self.client.clone());
        let list = self.call("list services", async move { api.list(&ListParams::default()).await })?;
        let mut out = Vec::new();
        for s in list.items.iter().map(ServiceFacts::of).filter(|s| s.cluster_ip == Some(ip)) {
            let mut s = s;
            s.selected = self.selected_pods(&s)?;
            out.push(s);
        }
        Ok(out)
    }

    fn selected_pods(&mut self, s: &ServiceFacts) -> Result<Vec<PodFacts>, ApiError> {
        if s.selector.is_empty() {
            return Ok(Vec::new());
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &s.namespace);
        let lp = ListParams::default().labels(&s.selector_text());
        let list = self.call(&format!("list the pods service {} selects", s.full_name()), async move { api.list(&lp).await })?;
        let mut pods: Vec<PodFacts> = list.items.iter().map(PodFacts::of).collect();
        // Those that crashed, why (their last line), for the first few: a Service whose pods crash
        // has no endpoints because of what they wrote. Best effort: a log refused leaves the state.
        for p in pods.iter_mut().filter(|p| !p.ready && (p.restarts > 0 || p.waiting.as_deref() == Some("CrashLoopBackOff"))).take(MAX_LOGS) {
            let _ = self.read_last_log(p);
        }
        Ok(pods)
    }

    /// The last line `p`'s first container wrote (the crashed one's, when it restarted).
    pub fn read_last_log(&mut self, p: &mut PodFacts) -> Result<(), ApiError> {
        let Some(c) = p.containers.first().cloned() else { return Ok(()) };
        let log = self.logs(&p.namespace, &p.name, &c, p.restarts > 0, 20)?;
        p.last_log = log.lines().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_string());
        Ok(())
    }

    /// The pods with this address (a pod IP, or every host-network pod of a node for a node address).
    pub fn pods_with_ip(&mut self, ip: Ipv4Addr) -> Result<Vec<PodFacts>, ApiError> {
        self.list_pods(&format!("status.podIP={ip}"), &format!("pods with IP {ip}"))
    }

    /// The pods scheduled on a node.
    pub fn pods_on(&mut self, node: &str) -> Result<Vec<PodFacts>, ApiError> {
        self.list_pods(&format!("spec.nodeName={node}"), &format!("pods on node {node}"))
    }

    fn list_pods(&mut self, fields: &str, what: &str) -> Result<Vec<PodFacts>, ApiError> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(fields);
        let list = self.call(&format!("list {what}"), async move { api.list(&lp).await })?;
        Ok(list.items.iter().map(PodFacts::of).collect())
    }

    /// The last `lines` lines of a container's log; `previous`: of the container that ran before (the
    /// one that crashed, for a pod in CrashLoopBackOff).
    pub fn logs(&mut self, namespace: &str, pod: &str, container: &str, previous: bool, lines: i64) -> Result<String, ApiError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let lp = kube::api::LogParams { container: Some(container.to_string()), previous, tail_lines: Some(lines), ..Default::default() };
        let (pod, what) = (pod.to_string(), format!("log of {namespace}/{pod} ({container})"));
        self.call(&what, async move { api.logs(&pod, &lp).await })
    }

    pub fn nodes(&mut self) -> Result<Vec<NodeFacts>, ApiError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let list = self.call("list nodes", async move { api.list(&ListParams::default()).await })?;
        Ok(list.items.iter().map(NodeFacts::of).collect())
    }

    /// flannel's `net-conf.json`, from the first of its namespaces that has the ConfigMap.
    pub fn flannel_config(&mut self) -> Result<Option<NetConf>, ApiError> {
        for ns in FLANNEL_NAMESPACES {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
            match self.call(&format!("configmap {ns}/{FLANNEL_CONFIGMAP}"), async move { api.get(FLANNEL_CONFIGMAP).await }) {
                Ok(cm) => return Ok(NetConf::of(&cm, ns)),
                Err(ApiError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// The one line a command says when there is no API to ask. None configured at all is the normal state
/// of a node without a kubeconfig (and of the lab): said to a person at a terminal, not to every script.
pub fn note_no_api(e: &NoApi) {
    use std::io::IsTerminal;
    match e {
        NoApi::NotConfigured if std::io::stderr().is_terminal() => eprintln!("cnitrace: {e}: pods are named by their network namespaces"),
        NoApi::NotConfigured => {}
        _ => eprintln!("cnitrace: {e}; pods are named by their network namespaces, the local diagnosis goes on"),
    }
}

/// How many crashed pods of one Service have their logs read.
const MAX_LOGS: usize = 3;

/// What one command learns from the API for a trace: the nodes, the pods with the pair's addresses,
/// flannel's configuration; and what it could not learn, each with its reason. Within [`API_BUDGET`].
pub fn gather(cluster: &mut Cluster, pair: &[Ipv4Addr]) -> ClusterFacts {
    let mut f = ClusterFacts { server: cluster.server.clone(), ..Default::default() };
    match cluster.nodes() {
        Ok(n) => f.nodes = n,
        Err(e) => f.missing.push(e.to_string()),
    }
    for ip in pair {
        match cluster.pods_with_ip(*ip) {
            Ok(p) => f.pods.extend(p.into_iter().filter(|p| !f.pods.iter().any(|q| q.namespace == p.namespace && q.name == p.name)).collect::<Vec<_>>()),
            Err(e) => f.missing.push(e.to_string()),
        }
    }
    // flannel's and kube-proxy's pods on the pair's nodes: a repair that restarts flannel needs to know
    // them, and a verdict on the iptables backends names a kube-proxy that is not Ready.
    let mut nodes: Vec<String> = f.pods.iter().filter_map(|p| p.node.clone()).collect();
    nodes.sort();
    nodes.dedup();
    for node in nodes {
        match cluster.pods_on(&node) {
            Ok(p) => {
                for mut p in p.into_iter().filter(|p| matches!(p.app.as_deref(), Some("flannel") | Some("kube-proxy"))) {
                    // A daemon that is not Ready: the last line its container wrote (the crashed one's).
                    if !p.ready {
                        if let Err(e) = cluster.read_last_log(&mut p) {
                            f.missing.push(e.to_string());
                        }
                    }
                    f.pods.push(p);
                }
            }
            Err(e) => f.missing.push(e.to_string()),
        }
    }
    match cluster.flannel_config() {
        Ok(c) => f.flannel = c,
        Err(e) => f.missing.push(e.to_string()),
    }
    // An address of the pair no pod holds may be a Service's ClusterIP.
    let unknown: Vec<Ipv4Addr> = pair.iter().copied().filter(|ip| f.pod_with_ip(*ip).is_none() && !f.nodes.iter().any(|n| n.internal_ip == Some(*ip))).collect();
    for ip in &unknown {
        match cluster.services_with_ip(*ip) {
            Ok(s) => f.services.extend(s.into_iter().filter(|s| !f.services.iter().any(|t| t.namespace == s.namespace && t.name == s.name)).collect::<Vec<_>>()),
            Err(e) => f.missing.push(e.to_string()),
        }
    }
    f.missing.dedup();
    f
}

/// What names a whole host's pods (`watch`): the nodes, and every pod on the nodes this host holds (a
/// real node: itself; the lab: each node namespace). Within [`API_BUDGET`].
pub fn gather_host(cluster: &mut Cluster, resolver: &crate::resolve::HostResolver) -> ClusterFacts {
    cluster.renew_budget();
    let mut f = ClusterFacts { server: cluster.server.clone(), ..Default::default() };
    match cluster.nodes() {
        Ok(n) => f.nodes = n,
        Err(e) => f.missing.push(e.to_string()),
    }
    let named = name_namespaces(&f, resolver);
    let mut nodes: Vec<String> = resolver.pods().iter().filter(|p| !p.host_addressed).filter_map(|p| named.get(&p.node.inode).cloned()).collect();
    nodes.sort();
    nodes.dedup();
    for node in nodes.into_iter().filter(|n| f.nodes.iter().any(|k| k.name == *n)) {
        match cluster.pods_on(&node) {
            Ok(p) => f.pods.extend(p),
            Err(e) => f.missing.push(e.to_string()),
        }
    }
    f.missing.dedup();
    f
}

/// Kubernetes names for this host's network namespaces: a pod's namespace by the pod holding its
/// address (`namespace/name`); a node's (the root namespace on a real node, a namespace of its own in
/// the lab or kind) by the Node whose InternalIP it holds, else whose pod network holds its bridge's
/// address. A namespace the API says nothing about keeps its own name.
pub fn name_namespaces(facts: &ClusterFacts, resolver: &crate::resolve::HostResolver) -> std::collections::BTreeMap<u32, String> {
    let mut names = std::collections::BTreeMap::new();
    let node_ns: std::collections::BTreeSet<u32> = resolver.pods().iter().filter(|p| !p.host_addressed).map(|p| p.node.inode).collect();
    for (ns, st) in resolver.spaces() {
        let addrs = || st.addrs.iter().filter(|a| st.link(a.ifindex).is_some_and(|l| l.name != "lo"));
        // A Node's address names its node first: the pods that share it (hostNetwork) are the node's.
        let by_ip = addrs().find_map(|a| facts.nodes.iter().find(|n| n.internal_ip == Some(a.addr)));
        let is_node = node_ns.contains(&ns.inode) || ns.is_root;
        if let (Some(n), true) = (by_ip, is_node) {
            names.insert(ns.inode, n.name.clone());
            continue;
        }
        if let Some(p) = addrs().find_map(|a| facts.pod_with_ip(a.addr)) {
            names.insert(ns.inode, p.full_name());
            continue;
        }
        // A node's namespace can look like a pod's too (its underlay veth has an address and a peer
        // elsewhere, as in the lab): a node is a namespace that pods hang off, or the root.
        if !is_node {
            continue;
        }
        let by_bridge = || {
            addrs()
                .filter(|a| st.link(a.ifindex).is_some_and(|l| l.kind == "bridge"))
                .find_map(|a| facts.node_for_pod_ip(a.addr))
        };
        if let Some(n) = by_bridge() {
            names.insert(ns.inode, n.name.clone());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        netns::NetNs,
        resolve::{HostResolver, NsIds},
        state::{Addr, Link, NsState},
    };

    struct Ids(BTreeMap<(u32, u32), i32>);
    impl NsIds for Ids {
        fn nsid(&self, from: &NetNs, target: &NetNs) -> Option<i32> {
            self.0.get(&(from.inode, target.inode)).copied()
        }
    }

    fn space(inode: u32, name: &str, links: Vec<Link>, addrs: Vec<(u32, &str)>) -> (NetNs, NsState) {
        let n = NetNs { inode, name: name.into(), path: format!("/run/netns/{name}").into(), is_root: false };
        let addrs = addrs.into_iter().map(|(ifindex, a)| Addr { ifindex, addr: a.parse().unwrap(), prefix: 24, broadcast: None }).collect();
        (n, NsState { inode, name: name.into(), links, addrs, ..Default::default() })
    }

    fn link(ifindex: u32, name: &str, kind: &str) -> Link {
        Link { ifindex, name: name.into(), kind: kind.into(), admin_up: true, ..Default::default() }
    }

    fn veth(ifindex: u32, name: &str, peer: u32, master: Option<u32>) -> Link {
        Link { peer_ifindex: Some(peer), peer_netnsid: Some(0), master, ..link(ifindex, name, "veth") }
    }

    /// Two nodes' namespaces and a pod each; the API knows one pod and both nodes by names that are
    /// not the namespaces'.
    #[test]
    fn namespaces_take_the_names_the_api_gives_and_keep_theirs_otherwise() {
        let r = HostResolver::from_spaces(
            vec![
                // The nodes' underlay is a veth pair between their namespaces (as in the lab): each node
                // looks like a pod of the other.
                space(10, "ns-node-1", vec![link(5, "cbr0", "bridge"), veth(7, "vethaa", 2, Some(5)), veth(3, "eth0", 3, None)], vec![(5, "172.20.3.1"), (3, "192.168.9.1")]),
                space(20, "ns-node-2", vec![link(5, "cbr0", "bridge"), veth(7, "vethbb", 2, Some(5)), veth(3, "eth0", 3, None)], vec![(5, "172.20.4.1"), (3, "192.168.9.2")]),
                space(11, "ns-pod-a", vec![veth(2, "eth0", 7, None)], vec![(2, "172.20.3.19")]),
                space(21, "ns-pod-b", vec![veth(2, "eth0", 7, None)], vec![(2, "172.20.4.10")]),
            ],
            Box::new(Ids([((11, 10), 0), ((21, 20), 0), ((10, 11), 0), ((20, 21), 0), ((10, 20), 0), ((20, 10), 0)].into_iter().collect())),
        );
        let node = |name: &str, cidr: &str| NodeFacts { name: name.into(), pod_cidrs: vec![cidr.into()], ..Default::default() };
        let facts = ClusterFacts {
            nodes: vec![node("gpu-worker-7", "172.20.3.0/24"), node("edge-2", "172.20.4.0/24")],
            pods: vec![PodFacts { namespace: "media".into(), name: "jellyfin-x".into(), ip: Some("172.20.3.19".parse().unwrap()), ..Default::default() }],
            ..Default::default()
        };
        let names = name_namespaces(&facts, &r);
        assert_eq!(names.get(&11).map(String::as_str), Some("media/jellyfin-x"));
        assert_eq!(names.get(&10).map(String::as_str), Some("gpu-worker-7"));
        assert_eq!(names.get(&20).map(String::as_str), Some("edge-2"));
        assert_eq!(names.get(&21), None, "a pod the API does not know keeps its namespace's name");
    }

    /// Nodes on a switch (a namespace with a bridge whose veth ports carry no address — the real
    /// cluster's underlay in the lab, kind's nodes on docker's bridge) look like the switch's pods: a
    /// namespace pods hang off is a node, never a pod (`watch` once counted a node's drops as the
    /// "pod" storagenodet3500 of "node" underlay).
    #[test]
    fn nodes_on_a_switch_are_nodes_not_its_pods() {
        let r = HostResolver::from_spaces(
            vec![
                space(1, "underlay", vec![link(9, "switch", "bridge"), veth(10, "port0", 3, Some(9)), veth(11, "port1", 3, Some(9))], vec![]),
                space(20, "node-a", vec![link(5, "cni0", "bridge"), veth(7, "vethaa", 2, Some(5)), veth(3, "eth0", 10, None)], vec![(5, "10.244.0.1"), (3, "203.0.113.1")]),
                space(30, "node-b", vec![link(5, "cni0", "bridge"), veth(7, "vethbb", 2, Some(5)), veth(3, "eth0", 11, None)], vec![(5, "10.244.1.1"), (3, "203.0.113.2")]),
                space(21, "pod-a", vec![veth(2, "eth0", 7, None)], vec![(2, "10.244.0.5")]),
                space(31, "pod-b", vec![veth(2, "eth0", 7, None)], vec![(2, "10.244.1.5")]),
            ],
            Box::new(Ids([((20, 1), 0), ((1, 20), 0), ((30, 1), 1), ((1, 30), 1), ((21, 20), 0), ((20, 21), 0), ((31, 30), 0), ((30, 31), 0)].into_iter().collect())),
        );
        let pods: Vec<(u32, u32)> = r.pods().iter().filter(|p| !p.host_addressed).map(|p| (p.netns.inode, p.node.inode)).collect();
        assert_eq!(pods, vec![(21, 20), (31, 30)], "the pods and their nodes, not the nodes as the switch's pods");
    }

    /// On a real node the node is the root namespace, and its address is also the podIP of every
    /// hostNetwork pod there (flanneld's, kube-proxy's): the namespace is the node, named by its Node,
    /// even where a pod's spec did not say hostNetwork — and such a pod is never "the pod with that
    /// address" (a fix once named the node `kube-flannel/kube-flannel-ds-…` and found no flannel on it).
    #[test]
    fn a_node_is_never_named_after_the_pods_that_share_its_address() {
        let mut root = space(1, "root", vec![link(5, "cni0", "bridge"), veth(7, "veth1", 2, Some(5)), link(2, "ens3", "device")], vec![(5, "10.244.3.1"), (2, "172.31.4.20")]);
        root.0.is_root = true;
        let r = HostResolver::from_spaces(
            vec![root, space(11, "cni-1234", vec![veth(2, "eth0", 7, None)], vec![(2, "10.244.3.9")])],
            Box::new(Ids([((11, 1), 0), ((1, 11), 0)].into_iter().collect())),
        );
        let pod = |ns: &str, name: &str, ip: &str, host: bool| PodFacts { namespace: ns.into(), name: name.into(), ip: Some(ip.parse().unwrap()), host_network: host, node: Some("ip-172-31-4-20".into()), ..Default::default() };
        let facts = ClusterFacts {
            nodes: vec![NodeFacts { name: "ip-172-31-4-20".into(), internal_ip: Some("172.31.4.20".parse().unwrap()), pod_cidrs: vec!["10.244.3.0/24".into()], ..Default::default() }],
            pods: vec![
                pod("kube-flannel", "kube-flannel-ds-x7k2p", "172.31.4.20", true),
                // An API that leaves hostNetwork out of what it returns (an old recording, a proxy).
                pod("kube-system", "kube-proxy-9fzq1", "172.31.4.20", false),
                pod("media", "jellyfin-0", "10.244.3.9", false),
            ],
            ..Default::default()
        };
        let names = name_namespaces(&facts, &r);
        assert_eq!(names.get(&1).map(String::as_str), Some("ip-172-31-4-20"));
        assert_eq!(names.get(&11).map(String::as_str), Some("media/jellyfin-0"));
        assert!(facts.pod_with_ip("172.31.4.20".parse().unwrap()).is_none(), "the node's address is no pod's");
    }
}
