//! Another cluster on the same host, up while the host's kernel suite runs: the host a developer has
//! (a kind cluster, a second lab) rather than an empty one. Two flannel-like nodes in namespaces of their
//! own (`cnitrace-oc-…`) with the lab's device names (cni0, flannel.1, VNI 1, port 8472) and pods in the
//! lab's own /16 (10.244.8.0/24 and 10.244.9.0/24: the cluster-CIDR filter alone cannot tell them
//! apart), a node fault of its own (forwarding off on its worker: `check` would report it if it counted
//! that cluster), and a `cnitrace watch` holding cnitrace's own kfree_skb program for the whole run
//! (what a test counts must be its own programs, not every program of that name).
//!
//! Nothing leaves its namespaces: no route, address or rule of the root namespace is touched. Torn down
//! when dropped (the suite failed or not), and swept at the start of the next run if a killed run left it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cnitrace_tools as tools;

/// The namespace prefix: never the lab's (`cnitrace`, `cnitrace-test`) nor a generated layout's.
pub const PREFIX: &str = "cnitrace-oc";

const NODES: [(&str, &str, &str, &str); 2] = [
    // (node, underlay address, pod subnet's first three octets, VTEP MAC)
    ("kind-control-plane", "172.18.0.2", "10.244.8", "0e:0c:00:00:08:01"),
    ("kind-worker", "172.18.0.3", "10.244.9", "0e:0c:00:00:09:01"),
];

pub struct OtherCluster {
    watch: Option<Child>,
    ready: PathBuf,
}

fn ns(name: &str) -> String {
    format!("{PREFIX}-{name}")
}

fn ip_batch(netns: Option<&str>, script: &str) -> Result<()> {
    let mut cmd = tools::IP.command();
    if let Some(n) = netns {
        cmd.args(["-n", n]);
    }
    let mut child = cmd.args(["-batch", "-"]).stdin(Stdio::piped()).spawn().context("run ip -batch")?;
    std::io::Write::write_all(child.stdin.as_mut().expect("piped"), script.as_bytes())?;
    let st = child.wait()?;
    if !st.success() {
        bail!("ip -batch in {netns:?} failed:\n{script}");
    }
    Ok(())
}

/// The namespaces of a run that was killed before its teardown, and its watch.
pub fn sweep(ready: &Path) {
    if let Ok(out) = tools::IP.command().args(["netns", "list"]).output() {
        for name in String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(&format!("{PREFIX}-")) {
                let _ = tools::IP.command().args(["netns", "del", name]).status();
            }
        }
    }
    // Our watch is the one whose --ready-file is ours: no other process is signalled.
    let marker = ready.as_os_str().as_encoded_bytes().to_vec();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.contains(&&b"watch"[..]) && args.contains(&marker.as_slice()) {
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let _ = std::fs::remove_file(ready);
}

impl OtherCluster {
    /// Builds it and starts its watch (`cnitrace` at `bin`); `dir` keeps the watch's log and ready file.
    pub fn up(bin: &Path, dir: &Path) -> Result<OtherCluster> {
        let ready = dir.join("other-cluster.ready");
        sweep(&ready);
        let mut me = OtherCluster { watch: None, ready };
        me.build().context("build the other cluster")?;
        let log = std::fs::File::create(dir.join("other-cluster-watch.log"))?;
        let child = Command::new(bin)
            .args(["watch", "--json", "--interval", "60", "--ready-file"])
            .arg(&me.ready)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start the other cluster's cnitrace watch")?;
        me.watch = Some(child);
        let t = Instant::now();
        while !me.ready.exists() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the other cluster's watch did not attach within 60 s (its log: {})", dir.join("other-cluster-watch.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("xtask: another cluster beside the suite: nodes {} and {} (pods 10.244.8.0/24, 10.244.9.0/24, namespaces {PREFIX}-*), its cnitrace watch attached", NODES[0].0, NODES[1].0);
        Ok(me)
    }

    fn build(&self) -> Result<()> {
        for (node, ..) in NODES {
            let status = tools::IP.command().args(["netns", "add", &ns(node)]).status()?;
            if !status.success() {
                bail!("ip netns add {}", ns(node));
            }
        }
        // The underlay: one veth between the two nodes, eth0 on each (kind's nodes on docker's network).
        ip_batch(None, &format!("link add oc-underlay0 netns {} type veth peer name oc-underlay1 netns {}", ns(NODES[0].0), ns(NODES[1].0)))?;
        for (i, (node, underlay, subnet, mac)) in NODES.iter().enumerate() {
            let n = ns(node);
            let (other_underlay, other_subnet, other_mac) = (NODES[1 - i].1, NODES[1 - i].2, NODES[1 - i].3);
            ip_batch(
                Some(&n),
                &format!(
                    "link set oc-underlay{i} name eth0
                     addr add {underlay}/16 dev eth0
                     link set eth0 up
                     link set lo up
                     link add cni0 type bridge
                     addr add {subnet}.1/24 dev cni0
                     link set cni0 up
                     link add flannel.1 type vxlan id 1 local {underlay} dev eth0 dstport 8472 nolearning
                     link set flannel.1 address {mac}
                     addr add {subnet}.0/32 dev flannel.1
                     link set flannel.1 up
                     route add {other_subnet}.0/24 via {other_subnet}.0 dev flannel.1 onlink
                     neigh add {other_subnet}.0 lladdr {other_mac} dev flannel.1 nud permanent"
                ),
            )?;
            let st = tools::BRIDGE.command().args(["-n", &n, "fdb", "append", other_mac, "dev", "flannel.1", "dst", other_underlay]).status()?;
            if !st.success() {
                bail!("bridge fdb append in {n}");
            }
            // Two pods per node, their namespaces named as a CNI runtime names them.
            for k in 0..2u32 {
                let pod = format!("{PREFIX}-cni-{}{k}", &mac[12..].replace(':', ""));
                let veth = format!("veth0c{}{k}", &subnet[7..]);
                let status = tools::IP.command().args(["netns", "add", &pod]).status()?;
                if !status.success() {
                    bail!("ip netns add {pod}");
                }
                ip_batch(Some(&n), &format!("link add {veth} type veth peer name eth0 netns {pod}\nlink set {veth} master cni0 up"))?;
                ip_batch(
                    Some(&pod),
                    &format!("addr add {subnet}.{}/24 dev eth0\nlink set eth0 up\nlink set lo up\nroute add default via {subnet}.1\nroute add 10.244.0.0/16 via {subnet}.1", 4 + k),
                )?;
            }
            let fwd = if i == 0 { "1" } else { "0" };
            let st = tools::SH.in_netns(&n).args(["-c", &format!("echo {fwd} > /proc/sys/net/ipv4/ip_forward")]).status()?;
            if !st.success() {
                bail!("sysctl in {n}");
            }
        }
        Ok(())
    }
}

impl Drop for OtherCluster {
    fn drop(&mut self) {
        if let Some(mut w) = self.watch.take() {
            unsafe { libc::kill(w.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while w.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = w.kill();
            let _ = w.wait();
        }
        sweep(&self.ready);
    }
}
