//! `cnitrace lab up --kubernetes`: the lab's nodes as the nodes of a real cluster.
//!
//! The programs are the real ones, built from their sources by `cargo xtask setup` (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, flanneld, flannel's CNI plugin,
//! Debian's reference plugins). Layout, all in the lab's namespaces:
//! - `<prefix>-underlay`: the switch (a bridge) every node's and the control plane's eth0 hang off;
//! - `<prefix>-control-plane`: etcd (on its own loopback), the API server on the underlay, the controller
//!   manager (`--allocate-node-cidrs`: the nodes' podCIDRs are its) and the scheduler;
//! - `<prefix>-<node>`: a node; flanneld and kube-proxy run there as the DaemonSets' hostNetwork pods;
//! - `<prefix>-pod-<name>`: a pod's network, made by flannel's CNI plugin.
//!
//! kubelet's part (registering the nodes, renewing their leases, running the pods bound to them,
//! writing their status, restarting crashed containers, removing deleted pods) is played by the lab:
//! [`kubelet`], one resident process for all nodes, which also forwards a loopback port of the host to
//! the API server (the host has no route into the lab: nothing is added to the root namespace).

pub mod kubelet;
pub mod manifests;
pub mod pki;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use cnitrace_tools as tools;
use kube::Api;
use serde::{Deserialize, Serialize};

use super::{sysctl, topology, Batch, Lab};
pub use manifests::Backend;

/// The cluster's underlay: TEST-NET-3, lab-only. Not the seed lab's TEST-NET-1: a host may use that one
/// itself (this project's CI machines have 192.0.2.2 on their own eth0), and an address held both by the
/// host and by a node makes the node's pods' traffic ambiguous to name.
pub const UNDERLAY: [u8; 3] = [203, 0, 113];
/// The control plane's address on the underlay.
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], 100);
pub const API_PORT: u16 = 6443;
/// kube-proxy's mode on every node.
pub const PROXY_MODES: [&str; 2] = ["iptables", "nftables"];

/// One node of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub underlay: Ipv4Addr,
}

/// A pod of the workload: its name, node (an index into the nodes) and HTTP port.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub node: usize,
    pub port: Option<u16>,
}

/// What the cluster is made of; saved with the lab's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Layout {
    pub nodes: Vec<NodeSpec>,
    pub pods: Vec<PodSpec>,
    /// (Service, the app it selects, port, NodePort)
    pub services: Vec<(String, String, u16, u16)>,
    pub underlay_if: String,
    pub underlay_prefix: u8,
    pub cluster_cidr: String,
    pub service_cidr: String,
    /// How the nodes reach the API server: `https://CONTROL_PLANE_IP:API_PORT`.
    pub api_server: String,
    pub proxy_mode: String,
    pub backend: Backend,
}

impl Layout {
    /// The incident's cluster: its two nodes, the debug pod and jellyfin on the first, web on the second.
    pub fn incident(proxy_mode: &str, backend: Backend) -> Layout {
        let nodes = topology::NODES
            .iter()
            .enumerate()
            .map(|(i, n)| NodeSpec { name: n.name.into(), underlay: Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], i as u8 + 1) })
            .collect();
        let pods = topology::PODS.iter().map(|p| PodSpec { name: p.name.into(), node: p.node, port: p.serves }).collect();
        let services = topology::SERVICES.iter().map(|s| (s.name.to_string(), s.selects[0].to_string(), s.port, s.node_port)).collect();
        Layout {
            nodes,
            pods,
            services,
            underlay_if: "eth0".into(),
            underlay_prefix: 24,
            cluster_cidr: topology::CLUSTER_CIDR.into(),
            service_cidr: topology::SERVICE_CIDR.into(),
            api_server: format!("https://{CONTROL_PLANE_IP}:{API_PORT}"),
            proxy_mode: proxy_mode.into(),
            backend,
        }
    }

    /// The `kubernetes` Service's ClusterIP: the first address of the Service range.
    pub fn kubernetes_service_ip(&self) -> Result<Ipv4Addr> {
        let (net, _) = crate::k8s::parse_cidr(&self.service_cidr).ok_or_else(|| anyhow!("bad Service range {}", self.service_cidr))?;
        Ok(Ipv4Addr::from(u32::from(net) + 1))
    }

    /// The kube-dns Service's ClusterIP: the tenth address of the Service range, as kubeadm sets it.
    pub fn dns_service_ip(&self) -> Result<Ipv4Addr> {
        let (net, _) = crate::k8s::parse_cidr(&self.service_cidr).ok_or_else(|| anyhow!("bad Service range {}", self.service_cidr))?;
        Ok(Ipv4Addr::from(u32::from(net) + 10))
    }
}

/// The real cluster's part of the lab's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterState {
    pub layout: Layout,
    /// The API as the host reaches it: the kubelet's forward of a loopback port.
    pub api_local: String,
}

/// The lab's files of the cluster.
pub struct Files {
    pub dir: PathBuf,
}

impl Files {
    pub fn new(lab: &Lab) -> Files {
        Files { dir: lab.names.state_dir() }
    }
    pub fn pki(&self, name: &str) -> PathBuf {
        self.dir.join("pki").join(name)
    }
    /// kubeconfigs by identity (admin, cnitrace, controller-manager, scheduler, node-NAME) towards
    /// the underlay address (the control plane's processes) or the host's forward (everyone else).
    pub fn kubeconfig(&self, who: &str) -> PathBuf {
        self.dir.join(format!("{who}.kubeconfig"))
    }
    pub fn api_port(&self) -> PathBuf {
        self.dir.join("api-port")
    }
    /// A node's own folder: what its hostPath volumes point at (`/run/flannel`, `/etc/cni/net.d`...).
    pub fn node_root(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }
}

/// Namespace names of the cluster's own parts.
pub use super::topology::{control_plane_ns, underlay_ns};

/// Builds the cluster into `lab` (its state folder exists, nothing else yet).
pub fn build(lab: &mut Lab, layout: Layout) -> Result<()> {
    let missing = tools::cluster_missing();
    if !missing.is_empty() {
        bail!("the real cluster's programs are not built ({}): run `cargo xtask setup`", missing.join(", "));
    }
    super::ensure_br_netfilter()?;
    let prefix = lab.names.prefix.clone();
    let files = Files::new(lab);
    network(lab, &layout)?;
    let pki = certificates(&layout, &files)?;
    let cp = control_plane_ns(&prefix);
    start_etcd(lab, &files, &cp)?;
    start_apiserver(lab, &layout, &files, &cp)?;
    // The kubelet (and the host's way to the API) next: everything after talks to the API through it.
    let api_local = start_kubelet(lab, &files)?;
    for (who, user, groups) in [("admin", "kubernetes-admin", &["system:masters"][..]), ("cnitrace", "cnitrace", &[][..])] {
        pki.kubeconfig(&pki::Identity { file: who, user, groups }, &api_local, &files.kubeconfig(who))?;
    }
    lab.state.kubernetes = Some(ClusterState { layout: layout.clone(), api_local: api_local.clone() });
    lab.save()?;
    let admin = Admin::connect(&files)?;
    wait_api_ready(&admin, &files)?;
    start_controllers(lab, &layout, &files, &cp)?;
    apply(&admin, &layout)?;
    wait_settled(&admin, &files, &layout)
}

/// The underlay switch, the control plane and the nodes, with their links and addresses.
fn network(lab: &Lab, layout: &Layout) -> Result<()> {
    let prefix = &lab.names.prefix;
    let (ul, cp) = (underlay_ns(prefix), control_plane_ns(prefix));
    let mut root = Batch::ip(None);
    let mut members: Vec<(String, Ipv4Addr)> = vec![(cp.clone(), CONTROL_PLANE_IP)];
    members.extend(layout.nodes.iter().map(|n| (format!("{prefix}-{}", n.name), n.underlay)));
    root.add(&["netns", "add", &ul]);
    for (ns, _) in &members {
        root.add(&["netns", "add", ns]);
    }
    for (i, (ns, _)) in members.iter().enumerate() {
        root.add(&["link", "add", &format!("cnt-k{i}"), "netns", ns, "type", "veth", "peer", "name", &format!("port{i}"), "netns", &ul]);
    }
    root.run()?;
    // Without the API, each node is shown by its name (with it, the API names them).
    for n in &layout.nodes {
        crate::resolve::name_namespace(&format!("{prefix}-{}", n.name), &n.name)?;
    }
    let mut sw = Batch::ip(Some(&ul));
    sw.add(&["link", "set", "lo", "up"]);
    sw.add(&["link", "add", "switch", "type", "bridge"]);
    sw.add(&["link", "set", "switch", "up"]);
    for i in 0..members.len() {
        sw.add(&["link", "set", &format!("port{i}"), "master", "switch"]);
        sw.add(&["link", "set", &format!("port{i}"), "up"]);
    }
    sw.run()?;
    for (i, (ns, addr)) in members.iter().enumerate() {
        let mut b = Batch::ip(Some(ns));
        b.add(&["link", "set", "lo", "up"]);
        b.add(&["link", "set", &format!("cnt-k{i}"), "name", &layout.underlay_if]);
        b.add(&["addr", "add", &format!("{addr}/{}", layout.underlay_prefix), "dev", &layout.underlay_if]);
        b.add(&["link", "set", &layout.underlay_if, "up"]);
        // A node's default route, as every real node has one (the kubernetes Service's ClusterIP is
        // routed by it before kube-proxy's DNAT): through the underlay's router, the control plane.
        if *addr != CONTROL_PLANE_IP {
            b.add(&["route", "add", "default", "via", &CONTROL_PLANE_IP.to_string(), "dev", &layout.underlay_if]);
        }
        b.run()?;
    }
    for n in &layout.nodes {
        let ns = format!("{prefix}-{}", n.name);
        sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        sysctl(&ns, "net.bridge.bridge-nf-call-iptables", "1")?;
        std::fs::create_dir_all(Files::new(lab).node_root(&n.name))?;
    }
    Ok(())
}

fn certificates(layout: &Layout, files: &Files) -> Result<pki::Pki> {
    let pki = pki::Pki::create(&files.dir)?;
    let addrs: Vec<IpAddr> = vec![CONTROL_PLANE_IP.into(), layout.kubernetes_service_ip()?.into(), Ipv4Addr::LOCALHOST.into()];
    pki.server("apiserver", "kube-apiserver", &pki::apiserver_names(&addrs, topology::CLUSTER_DOMAIN))?;
    pki.client(&pki::Identity { file: "apiserver-kubelet-client", user: "kube-apiserver-kubelet-client", groups: &["system:masters"] })?;
    let on_underlay = &layout.api_server;
    pki.kubeconfig(&pki::Identity { file: "controller-manager", user: "system:kube-controller-manager", groups: &[] }, on_underlay, &files.kubeconfig("controller-manager"))?;
    pki.kubeconfig(&pki::Identity { file: "scheduler", user: "system:kube-scheduler", groups: &[] }, on_underlay, &files.kubeconfig("scheduler"))?;
    // Each node's kubelet (the lab's kubelet reaches the API through its forward, not this address),
    // and its serving certificate (the API server reads logs from it).
    for n in &layout.nodes {
        let (file, user) = (format!("node-{}", n.name), format!("system:node:{}", n.name));
        pki.kubeconfig(&pki::Identity { file: &file, user: &user, groups: &["system:nodes"] }, on_underlay, &files.kubeconfig(&file))?;
        pki.server(&format!("node-{}-serving", n.name), &n.name, &[n.underlay.to_string(), n.name.clone()])?;
    }
    Ok(pki)
}

fn start_etcd(lab: &mut Lab, files: &Files, cp: &str) -> Result<()> {
    let mut cmd = tools::ETCD.in_netns(cp);
    let data = files.dir.join("etcd");
    cmd.arg(format!("--data-dir={}", data.display()));
    cmd.args([
        "--name=lab",
        "--listen-client-urls=http://127.0.0.1:2379",
        "--advertise-client-urls=http://127.0.0.1:2379",
        "--listen-peer-urls=http://127.0.0.1:2380",
        "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        "--initial-cluster=lab=http://127.0.0.1:2380",
        // A lab's store: nothing to keep across a power cut, and fsync is most of etcd's latency.
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]);
    lab.spawn(cmd, "etcd", cp, 2379, "etcd.log")?;
    wait_port(cp, Ipv4Addr::LOCALHOST, 2379, Duration::from_secs(30), &files.dir.join("etcd.log"))
}

fn start_apiserver(lab: &mut Lab, layout: &Layout, files: &Files, cp: &str) -> Result<()> {
    let p = |n: &str| files.pki(n).display().to_string();
    let mut cmd = tools::KUBE_APISERVER.in_netns(cp);
    cmd.args([
        "--etcd-servers=http://127.0.0.1:2379".to_string(),
        format!("--advertise-address={CONTROL_PLANE_IP}"),
        "--bind-address=0.0.0.0".into(),
        format!("--secure-port={API_PORT}"),
        format!("--tls-cert-file={}", p("apiserver.crt")),
        format!("--tls-private-key-file={}", p("apiserver.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        format!("--kubelet-client-certificate={}", p("apiserver-kubelet-client.crt")),
        format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
        format!("--kubelet-certificate-authority={}", p("ca.crt")),
        "--kubelet-preferred-address-types=InternalIP".into(),
        format!("--service-account-issuer=https://kubernetes.default.svc.{}", topology::CLUSTER_DOMAIN),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        format!("--service-cluster-ip-range={}", layout.service_cidr),
        "--service-node-port-range=30000-32767".into(),
        "--authorization-mode=Node,RBAC".into(),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        // Its own serving folder, in the lab's (the default is /var/run/kubernetes).
        format!("--cert-dir={}", files.dir.join("apiserver-certs").display()),
        "--v=1".into(),
    ]);
    lab.spawn(cmd, "kube-apiserver", cp, API_PORT, "kube-apiserver.log")?;
    wait_port(cp, CONTROL_PLANE_IP, API_PORT, Duration::from_secs(90), &files.dir.join("kube-apiserver.log"))
}

fn start_kubelet(lab: &mut Lab, files: &Files) -> Result<String> {
    let exe = std::env::current_exe().context("locate the cnitrace binary")?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["lab", "kubelet", "--prefix", &lab.names.prefix, "--state"]).arg(&files.dir);
    // It runs in the host's own namespace (its forward listens on the host's loopback).
    lab.spawn(cmd, "kubelet", "root", 0, "kubelet.log")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(port) = std::fs::read_to_string(files.api_port()) {
            if let Ok(port) = port.trim().parse::<u16>() {
                return Ok(format!("https://127.0.0.1:{port}"));
            }
        }
        if Instant::now() > deadline {
            bail!("the lab's kubelet did not start; its log: {}", files.dir.join("kubelet.log").display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_controllers(lab: &mut Lab, layout: &Layout, files: &Files, cp: &str) -> Result<()> {
    let p = |n: &str| files.pki(n).display().to_string();
    let mut cm = tools::KUBE_CONTROLLER_MANAGER.in_netns(cp);
    cm.args(control_plane_args(files, "controller-manager")).args([
        "--allocate-node-cidrs=true".to_string(),
        format!("--cluster-cidr={}", layout.cluster_cidr),
        "--node-cidr-mask-size=24".into(),
        format!("--service-cluster-ip-range={}", layout.service_cidr),
        format!("--root-ca-file={}", p("ca.crt")),
        format!("--service-account-private-key-file={}", p("sa.key")),
        "--use-service-account-credentials=true".into(),
        "--controllers=*".into(),
    ]);
    lab.spawn(cm, "kube-controller-manager", cp, 10257, "kube-controller-manager.log")?;
    let mut sched = tools::KUBE_SCHEDULER.in_netns(cp);
    sched.args(control_plane_args(files, "scheduler"));
    lab.spawn(sched, "kube-scheduler", cp, 10259, "kube-scheduler.log")
}

/// What the controller manager and the scheduler (`who`) both take: their kubeconfig for the API and
/// for checking who calls them, loopback only, no leader election (one of each), a serving folder of
/// their own in the lab's (not /var/run/kubernetes).
fn control_plane_args(files: &Files, who: &str) -> Vec<String> {
    let kubeconfig = files.kubeconfig(who).display().to_string();
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".into(),
        "--leader-elect=false".into(),
        format!("--cert-dir={}", files.dir.join(format!("{who}-certs")).display()),
        "--v=1".into(),
    ]
}

/// Waits until something accepts TCP at `addr:port` inside `ns`.
fn wait_port(ns: &str, addr: Ipv4Addr, port: u16, within: Duration, log: &Path) -> Result<()> {
    let deadline = Instant::now() + within;
    let path = crate::netns::named(ns);
    loop {
        let ok = crate::netns::in_netns(&path, move || Ok(std::net::TcpStream::connect_timeout(&(addr, port).into(), Duration::from_millis(200)).is_ok()))?;
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}:{port} in {ns} after {} s; its log: {}", within.as_secs(), log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The admin's client, on a runtime of its own (the lab's CLI is synchronous).
pub struct Admin {
    pub rt: tokio::runtime::Runtime,
    pub client: kube::Client,
}

impl Admin {
    pub fn connect(files: &Files) -> Result<Admin> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let path = files.kubeconfig("admin");
        let client = rt.block_on(kubelet::client_from(&path))?;
        Ok(Admin { rt, client })
    }
}

fn wait_api_ready(admin: &Admin, files: &Files) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r: Result<String> = admin.rt.block_on(async {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            Ok(admin.client.request_text(req).await?)
        });
        match r {
            Ok(t) if t.trim() == "ok" => return Ok(()),
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => bail!("the API server is not ready after 90 s ({other:?}); its log: {}", files.dir.join("kube-apiserver.log").display()),
        }
    }
}

/// Server-side apply of every manifest, as the admin.
fn apply(admin: &Admin, layout: &Layout) -> Result<()> {
    let mut objects = manifests::cnitrace_user();
    objects.extend(manifests::flannel(layout));
    objects.extend(manifests::kube_proxy(layout));
    objects.extend(manifests::coredns(layout)?);
    for p in &layout.pods {
        objects.push(manifests::pod(&p.name, &layout.nodes[p.node].name, p.port));
    }
    for (name, selects, port, node_port) in &layout.services {
        objects.push(manifests::service(name, selects, *port, *node_port));
    }
    admin.rt.block_on(async {
        for o in objects {
            // What the controllers make first (a namespace's `default` service account, which pods
            // need) may not be there yet: asked again, as an installer's retry would.
            let deadline = Instant::now() + Duration::from_secs(60);
            while let Err(e) = kubelet::apply(&admin.client, &o).await {
                if Instant::now() > deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        anyhow::Ok(())
    })
}

/// How long the cluster may take from its manifests to every pod Running (flanneld's and kube-proxy's
/// start, the workload's CNI ADD): seconds on a host.
const SETTLE: Duration = Duration::from_secs(120);

/// Until every node has its podCIDR and every pod is Running and Ready.
fn wait_settled(admin: &Admin, files: &Files, layout: &Layout) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let pending = admin.rt.block_on(kubelet::not_settled(&admin.client, layout))?;
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster did not settle within {} s: {}; logs in {}", SETTLE.as_secs(), pending.join("; "), files.dir.display());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What `lab up --kubernetes` prints: where the API is, the kubeconfigs, the nodes and the pods as the
/// API has them.
pub fn print(lab: &Lab) -> Result<()> {
    let c = lab.state.kubernetes.as_ref().context("not a real cluster's lab")?;
    let files = Files::new(lab);
    println!("API server: {} in {} (from this host: {})", c.layout.api_server, control_plane_ns(&lab.names.prefix), c.api_local);
    println!("kubeconfig: {} (cnitrace's: {})", files.kubeconfig("admin").display(), files.kubeconfig("cnitrace").display());
    let admin = Admin::connect(&files)?;
    let (nodes, pods) = admin.rt.block_on(async {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.client.clone());
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(admin.client.clone());
        anyhow::Ok((nodes.list(&Default::default()).await?.items, pods.list(&Default::default()).await?.items))
    })?;
    for n in nodes {
        let f = crate::k8s::NodeFacts::of(&n);
        println!("node {} (netns {}-{}): {} podCIDR {}", f.name, lab.names.prefix, f.name, f.internal_ip.map(|i| i.to_string()).unwrap_or_default(), f.pod_cidrs.join(","));
    }
    for p in pods {
        let f = crate::k8s::PodFacts::of(&p);
        println!("  pod {:<45} {:<12} {:<16} {}", f.full_name(), f.node.clone().unwrap_or_default(), f.ip.map(|i| i.to_string()).unwrap_or_default(), f.state());
    }
    println!("flannel: {} backend; kube-proxy: {} mode", c.layout.backend.net_conf_type(), c.layout.proxy_mode);
    Ok(())
}
