//! `cnitrace lab`: the node of the incident, built in network namespaces, with faults on demand.
//!
//! Everything lives in namespaces named `<prefix>-…` (default prefix `cnitrace`); the root namespace is
//! never touched. Pods are made by the real CNI bridge plugin; flanneld is not packaged, so the lab writes
//! the VXLAN state its vxlan backend would. The same code is the kernel tests' only harness.

pub mod check;
pub mod cluster;
pub mod cni;
pub mod faults;
pub mod serve;
pub mod services;
pub mod topology;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use cnitrace_tools::{self as tools, Tool};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{netns, sys};
use topology::{Names, NODES, PODS};

/// Lab state (pids, IPAM data, which faults are on) lives under here, one folder per prefix.
pub const STATE_ROOT: &str = "/run/cnitrace/lab";
pub const DEFAULT_PREFIX: &str = "cnitrace";
/// Addresses of the second underlay link (storagenodet3500's eth2, storagenodet3501's eth2): the
/// benchmarking range, lab-only.
const SECOND_NIC_ADDRS: [&str; 2] = ["198.18.0.1/24", "198.18.0.2/24"];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    pub node: usize,
    pub ip: Ipv4Addr,
    pub host_veth: String,
    pub container_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Server {
    pub name: String,
    pub netns: String,
    pub port: u16,
    pub pid: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    pub faults: Vec<String>,
    pub pods: BTreeMap<String, PodState>,
    pub servers: Vec<Server>,
    /// How kube-proxy programs the Services on every node.
    #[serde(default)]
    pub proxy_mode: services::ProxyMode,
    /// A lab whose nodes are a real cluster's (`lab up --kubernetes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<cluster::ClusterState>,
}

/// A lab that is up (or being built).
pub struct Lab {
    pub names: Names,
    pub state: LabState,
}

impl Lab {
    pub fn node_ns(&self, i: usize) -> String {
        self.names.node(i)
    }
    pub fn pod_ns(&self, pod: &str) -> String {
        self.names.pod(pod)
    }
    pub fn external_ns(&self) -> String {
        self.names.external()
    }
    pub fn host_veth(&self, pod: &str) -> Result<&str> {
        self.state
            .pods
            .get(pod)
            .map(|p| p.host_veth.as_str())
            .ok_or_else(|| anyhow!("the lab has no pod {pod}"))
    }

    fn state_file(&self) -> PathBuf {
        self.names.state_dir().join("state.json")
    }

    fn save(&self) -> Result<()> {
        std::fs::create_dir_all(self.names.state_dir())?;
        std::fs::write(self.state_file(), serde_json::to_vec_pretty(&self.state)?)
            .context("write the lab state")
    }

    /// The lab that is up under `prefix`.
    pub fn load(prefix: &str) -> Result<Lab> {
        let names = Names::new(prefix);
        let path = names.state_dir().join("state.json");
        let data = std::fs::read(&path)
            .map_err(|_| anyhow!("no lab is up (prefix {prefix}); start one with `cnitrace lab up`"))?;
        let state = serde_json::from_slice(&data).context("read the lab state")?;
        Ok(Lab { names, state })
    }

    /// Recreates flannel.1 on node `i` with another port or VNI (the config-mismatch faults).
    pub fn rebuild_vxlan(&self, i: usize, port: u16, vni: u32) -> Result<()> {
        ip(&self.node_ns(i), &["link", "del", "flannel.1"])?;
        self.setup_vxlan(i, port, vni)
    }

    /// flannel.1 as flannel's vxlan backend writes it: the device, its /32, and per remote node the
    /// route, the permanent neighbour and the FDB entry.
    fn setup_vxlan(&self, i: usize, port: u16, vni: u32) -> Result<()> {
        let ns = self.node_ns(i);
        let node = &NODES[i];
        let (vni, port, local) = (vni.to_string(), port.to_string(), node.underlay.to_string());
        let mut ipb = Batch::ip(Some(&ns));
        let mut fdb = Batch::bridge(&ns);
        ipb.add(&["link", "add", "flannel.1", "address", node.vtep_mac, "type", "vxlan", "id", &vni, "local", &local, "dev", "eth0", "dstport", &port, "nolearning"]);
        ipb.add(&["link", "set", "flannel.1", "mtu", &topology::POD_MTU.to_string(), "up"]);
        ipb.add(&["addr", "add", &format!("{}/32", node.vtep_ip()), "dev", "flannel.1"]);
        for (j, peer) in NODES.iter().enumerate() {
            if j == i {
                continue;
            }
            let vtep = peer.vtep_ip().to_string();
            ipb.add(&["route", "add", &peer.subnet(), "via", &vtep, "dev", "flannel.1", "onlink"]);
            ipb.add(&["neigh", "replace", &vtep, "lladdr", peer.vtep_mac, "dev", "flannel.1", "nud", "permanent"]);
            fdb.add(&["fdb", "append", peer.vtep_mac, "dev", "flannel.1", "dst", &peer.underlay.to_string()]);
        }
        ipb.run()?;
        fdb.run()
    }

    /// flanneld's masquerade chain on node `i` written again whole, as a restarted flanneld syncs it (the
    /// API tests' stand-in for flannel's restart; declaring the chain flushes it first).
    pub fn resync_flannel_masquerade(&self, i: usize) -> Result<()> {
        let nat: String = flannel_rules(i).lines().skip_while(|l| *l != "*nat").filter(|l| !l.starts_with("-A POSTROUTING")).map(|l| format!("{l}\n")).collect();
        sys::run_in_stdin(&self.node_ns(i), &tools::IPTABLES_NFT_RESTORE, &["--noflush", "-w"], &nat).map(|_| ())
    }

    /// Creates a pod through the CNI bridge plugin, as the runtime does.
    pub fn add_pod(&mut self, name: &str, node: usize, addr: Ipv4Addr) -> Result<()> {
        if self.state.pods.contains_key(name) {
            bail!("pod {name} exists already");
        }
        let pod_ns = self.pod_ns(name);
        add_netns(&pod_ns, name)?;
        let container_id = format!("{}-{}", self.names.prefix, name);
        let config = self.cni_config(node);
        let call = cni::Call { node_ns: &self.node_ns(node), pod_ns: &pod_ns, container_id: &container_id, ip: addr, config: &config };
        let host_veth = match cni::add(&call) {
            Ok(v) => v,
            Err(e) => {
                let _ = del_netns(&pod_ns);
                return Err(e);
            }
        };
        ip(&pod_ns, &["link", "set", "lo", "up"])?;
        self.state.pods.insert(name.to_string(), PodState { node, ip: addr, host_veth, container_id });
        self.save()
    }

    /// A pod as the runtime makes it: its network (CNI), then its container (serving `port`, if any).
    pub fn add_pod_with_container(&mut self, name: &str, node: usize, addr: Ipv4Addr, port: Option<u16>) -> Result<()> {
        self.add_pod(name, node, addr)?;
        let ns = self.pod_ns(name);
        self.start_server(name, &ns, port, false)
    }

    /// Removes a pod through CNI DEL, then its namespace.
    pub fn del_pod(&mut self, name: &str) -> Result<()> {
        let pod = self.state.pods.get(name).cloned().ok_or_else(|| anyhow!("the lab has no pod {name}"))?;
        self.stop_servers(|s| s.name == name);
        let pod_ns = self.pod_ns(name);
        let config = self.cni_config(pod.node);
        let call = cni::Call { node_ns: &self.node_ns(pod.node), pod_ns: &pod_ns, container_id: &pod.container_id, ip: pod.ip, config: &config };
        let del = cni::del(&call);
        del_netns(&pod_ns)?;
        self.state.pods.remove(name);
        self.save()?;
        del
    }

    fn cni_config(&self, node: usize) -> String {
        let dir = self.names.state_dir().join("ipam").join(NODES[node].name);
        cni::delegate_config(&NODES[node], &dir.to_string_lossy())
    }

    /// The next free address of a node's pod subnet for `lab pod add`.
    pub fn free_ip(&self, node: usize) -> Ipv4Addr {
        let octet = NODES[node].subnet_octet;
        (30..250)
            .map(|h| Ipv4Addr::new(10, 244, octet, h))
            .find(|ip| !self.state.pods.values().any(|p| p.ip == *ip))
            .expect("a free pod address")
    }

    /// The lab's own files: certificates, the pods' resolv.conf.
    pub fn file(&self, name: &str) -> PathBuf {
        self.names.state_dir().join(name)
    }

    /// A pod's container (or the external host's server): a `lab serve` process in `ns` with the pods'
    /// resolv.conf, serving `port` (HTTPS with the lab's certificate if `tls`), recorded for `lab down`.
    fn start_server(&mut self, name: &str, ns: &str, port: Option<u16>, tls: bool) -> Result<()> {
        let exe = std::env::current_exe().context("locate the cnitrace binary")?;
        let mut cmd = Tool::netns_exec(ns, &exe);
        cmd.args(["lab", "serve", "--name", name]);
        if let Some(p) = port {
            cmd.args(["--port", &p.to_string()]);
        }
        if tls {
            cmd.arg("--tls-cert").arg(self.file("external.pem")).arg("--tls-key").arg(self.file("external-key.pem"));
        }
        if self.names.owns_pod(ns) {
            cmd.arg("--resolv-conf").arg(self.file("resolv.conf"));
        }
        let log_name = format!("{name}{}.log", port.map(|p| format!("-{p}")).unwrap_or_default());
        self.spawn(cmd, name, ns, port.unwrap_or(0), &log_name)?;
        match port {
            Some(p) => wait_listening(ns, p),
            None => Ok(()),
        }
    }

    /// Starts `cmd` in a session of its own (it outlives `lab up` and ignores the terminal's signals),
    /// output to a log in the state folder, and records it.
    fn spawn(&mut self, mut cmd: std::process::Command, name: &str, ns: &str, port: u16, log_name: &str) -> Result<()> {
        let log = std::fs::File::create(self.file(log_name))?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("start the lab's {name} in {ns}"))?;
        self.state.servers.push(Server { name: name.into(), netns: ns.into(), port, pid: child.id() });
        self.save()
    }

    /// An agent per node (`cnitrace agent`), as the DaemonSet runs one on every node: each answers for its
    /// own node only, on a socket in the lab's state folder; recorded with the lab's servers (`lab down`
    /// ends them). Returns each node's name and socket once every agent answers.
    pub fn start_agents(&mut self) -> Result<Vec<(String, PathBuf)>> {
        let exe = std::env::current_exe().context("locate the cnitrace binary")?;
        let mut agents = Vec::new();
        for (i, n) in topology::NODES.iter().enumerate() {
            let sock = self.file(&format!("agent-{}.sock", n.name));
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["agent", "--node", n.name, "--listen"]).arg(format!("unix:{}", sock.display()));
            // Its node's fix journal, with the lab's state (gone with the lab).
            cmd.arg("--state-dir").arg(self.file(&format!("agent-{}.state", n.name)));
            let ns = self.node_ns(i);
            self.spawn(cmd, &format!("agent-{}", n.name), &ns, 0, &format!("agent-{}.log", n.name))?;
            agents.push((n.name.to_string(), sock));
        }
        let deadline = Instant::now() + SERVER_START;
        for (node, sock) in &agents {
            let addr = crate::agent::Addr::Unix(sock.clone());
            while let Err(e) = crate::agent::get(&addr, "/v1/node", Duration::from_secs(2)) {
                if Instant::now() > deadline {
                    bail!("the lab's agent of {node} does not answer on {addr}: {e:#}; its log: {}", self.file(&format!("agent-{node}.log")).display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(agents)
    }

    /// The cluster DNS pod: dnsmasq answering the lab's names (and nothing else: no upstream).
    fn start_dns(&mut self) -> Result<()> {
        let ns = self.pod_ns(topology::DNS_POD);
        let mut cmd = tools::DNSMASQ.in_netns(&ns);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--user=nobody",
            "--group=nogroup",
            "--log-facility=-",
            "--log-queries",
        ]);
        cmd.arg(format!("--listen-address={}", topology::DNS_IP));
        cmd.arg(format!("--pid-file={}", self.file("dnsmasq.pid").display()));
        // Names under the cluster's domain and the lab's are answered here, NXDOMAIN when unknown.
        cmd.arg(format!("--local=/{}/", topology::CLUSTER_DOMAIN));
        cmd.arg(format!("--local=/{}/", topology::EXTERNAL_NAME.split_once('.').map(|(_, d)| d).unwrap_or(topology::EXTERNAL_NAME)));
        for (name, ip) in topology::dns_records() {
            cmd.arg(format!("--host-record={name},{ip}"));
        }
        self.spawn(cmd, topology::DNS_POD, &ns, 53, "coredns.log")?;
        let deadline = Instant::now() + SERVER_START;
        let path = netns::named(&ns);
        loop {
            let answered = netns::in_netns(&path, || Ok(crate::validate::dns::query_once(topology::DNS_IP, "kubernetes.default.svc.cluster.local", Duration::from_millis(200))))?;
            if answered.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the lab's DNS (dnsmasq in {ns}) does not answer: {:#}; its log: {}", answered.unwrap_err(), self.file("coredns.log").display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the servers `which` picks; returns the pids signalled.
    fn stop_servers(&mut self, which: impl Fn(&Server) -> bool) -> Vec<u32> {
        let (stop, keep): (Vec<_>, Vec<_>) = self.state.servers.drain(..).partition(|s| which(s));
        self.state.servers = keep;
        stop.into_iter().filter(|s| stop_server_pid(s.pid)).map(|s| s.pid).collect()
    }
}

/// `ip -n NS ...`
pub(super) fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    sys::run(&tools::IP, &full).map(|_| ())
}

/// Commands for one `ip -batch` (or `bridge -batch`) run: one process for many changes. Under emulation
/// (the kernel matrix's VMs) a process start costs ~0.1 s, and the lab is ~60 of them one by one.
pub(super) struct Batch {
    tool: &'static Tool,
    ns: Option<String>,
    force: bool,
    lines: Vec<String>,
}

impl Batch {
    /// `ip [-n NS] -batch -`
    pub(super) fn ip(ns: Option<&str>) -> Batch {
        Batch { tool: &tools::IP, ns: ns.map(str::to_string), force: false, lines: Vec::new() }
    }

    /// `bridge -n NS -batch -`
    pub(super) fn bridge(ns: &str) -> Batch {
        Batch { tool: &tools::BRIDGE, ns: Some(ns.to_string()), force: false, lines: Vec::new() }
    }

    /// Go on after a command fails (the run still fails).
    pub(super) fn force(mut self) -> Batch {
        self.force = true;
        self
    }

    /// One command; its words must not hold blanks (the batch format splits on them).
    pub(super) fn add(&mut self, args: &[&str]) {
        debug_assert!(args.iter().all(|a| !a.is_empty() && !a.contains(char::is_whitespace)), "{args:?}");
        self.lines.push(args.join(" "));
    }

    /// Runs them in order; the first that fails stops the batch and is named in the error.
    pub(super) fn run(self) -> Result<()> {
        if self.lines.is_empty() {
            return Ok(());
        }
        let mut args = Vec::new();
        if let Some(ns) = &self.ns {
            args.extend(["-n", ns.as_str()]);
        }
        if self.force {
            args.push("-force");
        }
        args.extend(["-batch", "-"]);
        let script = self.lines.join("\n") + "\n";
        sys::run_stdin(self.tool, &args, &script).map(|_| ()).with_context(|| format!("{} batch:\n{script}", self.tool.program))
    }
}

/// Sets a sysctl of namespace `ns`, from this process: /proc/sys/net shows the namespace of the thread
/// that opens it (no `ip netns exec sysctl`, two process starts per key).
pub(super) fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let (k, v) = (key.to_string(), value.to_string());
    netns::in_netns(&netns::named(ns), move || sys::write_sysctl(&k, &v)).with_context(|| format!("set {key} in {ns}"))
}

/// Is `pid` one of the lab's processes (checked before signalling it: pids are reused): a `lab serve`,
/// or a process whose command line names a file of a lab's state folder (the DNS pod's dnsmasq by its
/// pid file, a node's agent by its socket, the real cluster's programs by their certificates, data and
/// kubeconfigs, the lab's kubelet by the folder itself)?
fn is_lab_server(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            let state = format!("{STATE_ROOT}/");
            args.windows(2).any(|w| w[0] == b"lab" && w[1] == b"serve")
                || args.iter().any(|a| a.windows(state.len()).any(|w| w == state.as_bytes()))
        })
        .unwrap_or(false)
}

/// SIGTERM to `pid` if it is the lab's; whether it was.
fn stop_server_pid(pid: u32) -> bool {
    let ours = is_lab_server(pid);
    if ours {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
    ours
}

/// Waits until each of `pids` is gone, at most `within`; then SIGKILL to those left (still the lab's).
fn reap(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    let alive = |pid: &u32| std::path::Path::new(&format!("/proc/{pid}")).exists() && is_lab_server(*pid);
    while Instant::now() < deadline && pids.iter().any(alive) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids.iter().filter(|p| alive(p)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

/// How long a lab server (dnsmasq, the HTTP servers) may take to answer after its start. Returned from
/// as soon as it answers: milliseconds on a host; 3 s was not enough once in a one-CPU guest under
/// emulation beside another guest and the host suite (dnsmasq "Connection refused" at lab up).
const SERVER_START: Duration = Duration::from_secs(30);

fn wait_listening(ns: &str, port: u16) -> Result<()> {
    let deadline = Instant::now() + SERVER_START;
    let path = netns::named(ns);
    loop {
        let ok = netns::in_netns(&path, move || {
            Ok(std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok())
        })?;
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the lab's HTTP server in {ns} did not start listening on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The lab namespaces that exist under `prefix`.
pub fn existing_namespaces(prefix: &str) -> Vec<String> {
    let names = Names::new(prefix);
    let mut found: Vec<String> = std::fs::read_dir(netns::NETNS_RUN_DIR)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| names.owns(n)).collect())
        .unwrap_or_default();
    found.sort();
    found
}

/// Builds a lab whose nodes are a real cluster's ([`cluster`]). On any error, whatever was built is
/// torn down again.
pub fn up_kubernetes(prefix: &str, layout: cluster::Layout) -> Result<Lab> {
    let mut lab = fresh(prefix, LabState::default())?;
    let built = cluster::build(&mut lab, layout);
    kept_or_torn_down(lab, built, "the real cluster")
}

/// Builds the lab with `faults` on. On any error, whatever was built is torn down again.
pub fn up(prefix: &str, fault_names: &[String], proxy_mode: services::ProxyMode) -> Result<Lab> {
    let faults: Vec<&faults::Fault> = fault_names
        .iter()
        .map(|n| faults::find(n).ok_or_else(|| anyhow!("unknown fault {n:?}; `cnitrace lab list` shows them")))
        .collect::<Result<_>>()?;
    let mut lab = fresh(prefix, LabState { proxy_mode, ..Default::default() })?;
    let built = build(&mut lab, &faults);
    kept_or_torn_down(lab, built, "the lab")
}

/// A new lab under `prefix` with `state`, nothing built yet but its (empty) state folder: refused
/// without root, with a bad prefix, or while a lab is up under it.
fn fresh(prefix: &str, state: LabState) -> Result<Lab> {
    if !sys::is_root() {
        bail!("`cnitrace lab up` needs root (it creates network namespaces)");
    }
    topology::check_prefix(prefix)?;
    let existing = existing_namespaces(prefix);
    if !existing.is_empty() {
        bail!("a lab is already up under prefix {prefix} ({}); run `cnitrace lab down` first", existing.join(", "));
    }
    let names = Names::new(prefix);
    let _ = std::fs::remove_dir_all(names.state_dir());
    std::fs::create_dir_all(names.state_dir()).context("create the lab's state folder")?;
    let lab = Lab { names, state: LabState { prefix: prefix.into(), ..state } };
    lab.save()?;
    Ok(lab)
}

/// The lab if it was built; else it is torn down (kept for a look with `CNITRACE_LAB_KEEP_FAILED`).
fn kept_or_torn_down(lab: Lab, built: Result<()>, what: &str) -> Result<Lab> {
    let Err(e) = built else { return Ok(lab) };
    if std::env::var_os("CNITRACE_LAB_KEEP_FAILED").is_some() {
        return Err(e.context(format!("building {what} failed; kept for a look (CNITRACE_LAB_KEEP_FAILED)")));
    }
    let _ = down(&lab.names.prefix);
    Err(e.context(format!("building {what} failed; it was torn down again")))
}

/// One namespace of a lab's pods, made as `ip netns add` makes it, with the name cnitrace shows for it
/// (`resolve::NAMES_DIR`).
pub(crate) fn add_netns(ns: &str, shown: &str) -> Result<()> {
    sys::run(&tools::IP, &["netns", "add", ns])?;
    if let Err(e) = crate::resolve::name_namespace(ns, shown) {
        let _ = sys::run(&tools::IP, &["netns", "del", ns]);
        return Err(anyhow::Error::from(e).context(format!("name namespace {ns}")));
    }
    Ok(())
}

/// The namespace gone, and its name with it.
pub(crate) fn del_netns(ns: &str) -> Result<()> {
    crate::resolve::forget_namespace_name(ns);
    sys::run(&tools::IP, &["netns", "del", ns]).map(|_| ())
}

/// kubeadm's first prerequisite: bridged pod traffic through iptables. Built into some kernels (this
/// project's CI host), a module on Debian's stock kernels, where its sysctls exist only once it is loaded.
pub fn ensure_br_netfilter() -> Result<()> {
    if !std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        sys::run(&tools::MODPROBE, &["br_netfilter"]).context("load br_netfilter (bridged pod traffic through iptables, as on a kubeadm node)")?;
    }
    Ok(())
}

fn build(lab: &mut Lab, faults: &[&faults::Fault]) -> Result<()> {
    ensure_br_netfilter()?;
    let ext = lab.external_ns();
    let (n0, n1) = (lab.node_ns(0), lab.node_ns(1));
    // From the root namespace: the namespaces, and the veth pairs between them (created in them).
    let mut root = Batch::ip(None);
    for ns in [&n0, &n1, &ext] {
        root.add(&["netns", "add", ns]);
    }
    // Underlay: the two nodes' eth0 on one link. A second underlay link, as on dual-NIC nodes:
    // storagenodet3500 reaches storagenodet3501's address through eth2 while the way back uses eth0.
    // Asymmetric but healthy until rp_filter turns strict. Uplink: storagenodet3500's eth1 to the
    // external host.
    root.add(&["link", "add", "cnt-ul0", "netns", &n0, "type", "veth", "peer", "name", "cnt-ul1", "netns", &n1]);
    root.add(&["link", "add", "cnt-ul2", "netns", &n0, "type", "veth", "peer", "name", "cnt-ul3", "netns", &n1]);
    root.add(&["link", "add", "cnt-up0", "netns", &n0, "type", "veth", "peer", "name", "cnt-up1", "netns", &ext]);
    root.run()?;
    for (i, n) in NODES.iter().enumerate() {
        crate::resolve::name_namespace(&lab.node_ns(i), n.name)?;
    }
    for (i, ns) in [&n0, &n1].into_iter().enumerate() {
        let mut b = Batch::ip(Some(ns));
        b.add(&["link", "set", "lo", "up"]);
        b.add(&["link", "set", &format!("cnt-ul{i}"), "name", "eth0"]);
        b.add(&["addr", "add", &format!("{}/24", NODES[i].underlay), "dev", "eth0"]);
        b.add(&["link", "set", "eth0", "up"]);
        b.add(&["link", "set", &format!("cnt-ul{}", i + 2), "name", "eth2"]);
        b.add(&["addr", "add", SECOND_NIC_ADDRS[i], "dev", "eth2"]);
        b.add(&["link", "set", "eth2", "up"]);
        if i == 0 {
            let peer = format!("{}/32", NODES[1].underlay);
            let via = SECOND_NIC_ADDRS[1].split('/').next().expect("address");
            b.add(&["route", "add", &peer, "via", via, "dev", "eth2", "src", &NODES[0].underlay.to_string()]);
            b.add(&["link", "set", "cnt-up0", "name", "eth1"]);
            b.add(&["addr", "add", &format!("{}/24", topology::UPLINK_IP), "dev", "eth1"]);
            b.add(&["link", "set", "eth1", "up"]);
        }
        b.run()?;
    }
    let mut b = Batch::ip(Some(&ext));
    b.add(&["link", "set", "lo", "up"]);
    b.add(&["link", "set", "cnt-up1", "name", "eth0"]);
    b.add(&["addr", "add", &format!("{}/24", topology::EXTERNAL_IP), "dev", "eth0"]);
    b.add(&["link", "set", "eth0", "up"]);
    b.run()?;
    // ARP on eth2 from eth2's own address, as multi-homed hosts are usually set up.
    sysctl(&n0, "net.ipv4.conf.eth2.arp_announce", "2")?;

    for i in 0..NODES.len() {
        let ns = lab.node_ns(i);
        sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        // What kubeadm requires on every node.
        sysctl(&ns, "net.bridge.bridge-nf-call-iptables", "1")?;
        sys::run_in_stdin(&ns, &tools::IPTABLES_NFT_RESTORE, &["--noflush", "-w"], &flannel_rules(i))?;
        lab.setup_vxlan(i, topology::VXLAN_PORT, topology::VXLAN_VNI)?;
        services::program(lab, i, lab.state.proxy_mode, &[])?;
    }
    std::fs::write(lab.file("resolv.conf"), topology::resolv_conf()).context("write the pods' resolv.conf")?;
    serve::make_certificates(&lab.names.state_dir(), topology::EXTERNAL_NAME, topology::EXTERNAL_IP).context("make the lab's certificates")?;
    for pod in &PODS {
        lab.add_pod_with_container(pod.name, pod.node, pod.ip, pod.serves)?;
    }
    lab.add_pod(topology::DNS_POD, topology::DNS_NODE, topology::DNS_IP)?;
    lab.start_dns()?;
    lab.start_server("external", &ext, Some(topology::EXTERNAL_PORT), false)?;
    lab.start_server("external", &ext, Some(topology::EXTERNAL_TLS_PORT), true)?;
    for f in faults {
        f.apply(lab).with_context(|| format!("apply fault {}", f.name))?;
        lab.state.faults.push(f.name.to_string());
    }
    lab.save()
}

/// The iptables rules flanneld installs (forward accepts for the cluster CIDR, masquerade out of it).
fn flannel_rules(node: usize) -> String {
    let net = topology::CLUSTER_CIDR;
    let sub = NODES[node].subnet();
    format!(
        "*filter\n:FLANNEL-FWD - [0:0]\n\
         -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
         -A FLANNEL-FWD -s {net} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         -A FLANNEL-FWD -d {net} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         COMMIT\n\
         *nat\n:FLANNEL-POSTRTG - [0:0]\n\
         -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
         -A FLANNEL-POSTRTG -s {sub} -d {net} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {net} -d {sub} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {net} -d {sub} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s {net} -d {net} -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
         COMMIT\n"
    )
}

/// Tears down every piece of the lab under `prefix`: servers (by their recorded pid), namespaces (with
/// them every link, route and rule inside), the state folder. Safe to run twice, and after a crash.
pub fn down(prefix: &str) -> Result<Vec<String>> {
    if !sys::is_root() {
        bail!("`cnitrace lab down` needs root");
    }
    topology::check_prefix(prefix)?;
    let names = Names::new(prefix);
    let mut stopped = Vec::new();
    if let Ok(mut lab) = Lab::load(prefix) {
        stopped = lab.stop_servers(|_| true);
    }
    let namespaces = existing_namespaces(prefix);
    // Servers whose pid was never recorded (a crash mid-`up`, the real cluster's pods that the lab's
    // kubelet started): ours by command line and namespace; the agents and the lab's kubelet (they run
    // in the root namespace) by their command line naming this lab's state folder.
    stopped.extend(sweep_servers(&namespaces));
    stopped.extend(sweep_agents(&names.state_dir()));
    // Gone before their namespaces and files are: the real cluster's programs take a moment to stop.
    reap(&stopped, Duration::from_secs(10));
    // One process for all of them (`-force`: the rest go even if one fails); then whatever is left
    // one by one, for each its own error.
    let mut all = Batch::ip(None).force();
    for ns in &namespaces {
        all.add(&["netns", "del", ns]);
        crate::resolve::forget_namespace_name(ns);
    }
    let _ = all.run();
    let mut errors = Vec::new();
    for ns in existing_namespaces(prefix) {
        if let Err(e) = sys::run(&tools::IP, &["netns", "del", &ns]) {
            errors.push(format!("{e:#}"));
        }
    }
    let _ = std::fs::remove_dir_all(names.state_dir());
    if !errors.is_empty() {
        bail!("lab down left something behind: {}", errors.join("; "));
    }
    Ok(namespaces)
}

/// The processes whose command line names this lab's state folder (the agents' sockets, the lab's
/// kubelet's `--state`), signalled; their pids.
fn sweep_agents(state_dir: &std::path::Path) -> Vec<u32> {
    let folder = state_dir.display().to_string();
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return pids };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let names_folder = c.split(|b| *b == 0).any(|a| {
            let a = String::from_utf8_lossy(a);
            a == folder || a.starts_with(&format!("{folder}/")) || a.contains(&format!("unix:{folder}/"))
        });
        if names_folder && stop_server_pid(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn sweep_servers(namespaces: &[String]) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let inodes: Vec<u64> = namespaces
        .iter()
        .filter_map(|n| std::fs::metadata(netns::named(n)).ok().map(|m| m.ino()))
        .collect();
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return pids };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(md) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else { continue };
        if inodes.contains(&md.ino()) && stop_server_pid(pid) {
            pids.push(pid);
        }
    }
    pids
}
