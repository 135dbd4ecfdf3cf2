//! `cargo xtask demo`: the seed's incident on the built-in lab — debug (10.244.0.20) cannot reach
//! jellyfin (10.244.0.19) on storagenodet3500 — shown failing, traced, fixed, and shown working.
//! `--kubernetes`: the same incident on the lab's real cluster, by pod name, with the real flanneld and
//! kube-proxy running (and restarted after the fix, to show the repair stands).

use std::process::Command;

use anyhow::{bail, Context, Result};
use cnitrace_tools::{self as tools, Tool};

const FAULT: &str = "veth-detached";

pub fn run(kubernetes: bool) -> Result<()> {
    if kubernetes {
        return run_kubernetes();
    }
    crate::setup::run(true)?;
    let bin = crate::build()?;
    let cnitrace = |args: &[&str]| -> Result<i32> {
        println!("\n$ sudo cnitrace {}", args.join(" "));
        let st = Command::new(&bin).args(args).status().context("run cnitrace")?;
        Ok(st.code().unwrap_or(-1))
    };
    let shell = |ns: &str, tool: &Tool, args: &[&str]| -> Result<i32> {
        println!("\n$ ip netns exec {ns} {} {}", tool.name(), args.join(" "));
        let st = tool.in_netns(ns).args(args).status().context("run ip netns exec")?;
        Ok(st.code().unwrap_or(-1))
    };
    let _ = Command::new(&bin).args(["lab", "down"]).output();
    if cnitrace(&["lab", "up", "--fault", FAULT])? != 0 {
        bail!("the lab did not come up");
    }
    let result = (|| -> Result<()> {
        println!("\n# The incident: the debug pod cannot reach jellyfin on the same node.");
        shell("cnitrace-pod-debug", &tools::PING, &["-c", "2", "-W", "1", "10.244.0.19"])?;
        println!("\n# cnitrace follows the packets through the kernel and names where and why they die.");
        cnitrace(&["follow", "10.244.0.20", "10.244.0.19"])?;
        println!("\n# cnitrace repairs it, traces again to prove it, and keeps a journal to undo it.");
        if cnitrace(&["fix", "--auto"])? != 0 {
            bail!("the fix did not verify");
        }
        println!("\n# The pods talk again.");
        if shell("cnitrace-pod-debug", &tools::PING, &["-c", "2", "-W", "1", "10.244.0.19"])? != 0 {
            bail!("ping still fails after the fix");
        }
        if shell("cnitrace-pod-debug", &tools::CURL, &["-sS", "-m", "3", "http://10.244.0.19:8096/"])? != 0 {
            bail!("HTTP to jellyfin still fails after the fix");
        }
        println!("\n# The incident's validation, from the debug pod: jellyfin by the name its DNS gives, DNS through");
        println!("# the pod's own resolver, an external HTTPS site (the lab's, with the lab's CA).");
        // The lab's CA: its state folder (cnitrace::lab::STATE_ROOT) under the default prefix.
        let ca = "/run/cnitrace/lab/cnitrace/ca.pem";
        if cnitrace(&["validate", "10.244.0.20", "jellyfin", "--external", "https://external.cnitrace.test/", "--cacert", ca])? != 0 {
            bail!("validate failed after the fix");
        }
        cnitrace(&["fix", "--history"])?;
        Ok(())
    })();
    cnitrace(&["lab", "down"])?;
    result
}

/// The lab's real cluster (the default prefix's state folder holds its kubeconfigs).
const STATE: &str = "/run/cnitrace/lab/cnitrace";

fn run_kubernetes() -> Result<()> {
    crate::setup::run(true)?;
    let bin = crate::build()?;
    let kubeconfig = format!("{STATE}/cnitrace.kubeconfig");
    let admin = format!("{STATE}/admin.kubeconfig");
    // `kubectl cnitrace …` as users run it: the plugin found on PATH.
    let plugins = std::env::temp_dir().join("cnitrace-demo-plugin");
    std::fs::create_dir_all(&plugins)?;
    let _ = std::fs::remove_file(plugins.join("kubectl-cnitrace"));
    std::os::unix::fs::symlink(&bin, plugins.join("kubectl-cnitrace"))?;
    let path = format!("{}:{}", plugins.display(), std::env::var("PATH").unwrap_or_default());
    let kubectl = |args: &[&str], user: &str| -> Result<i32> {
        println!("\n$ kubectl {}", args.join(" "));
        let st = tools::KUBECTL.command().args(args).env("KUBECONFIG", user).env("PATH", &path).status().context("run kubectl")?;
        Ok(st.code().unwrap_or(-1))
    };
    let _ = Command::new(&bin).args(["lab", "down"]).output();
    println!("\n$ sudo cnitrace lab up --kubernetes");
    if !Command::new(&bin).args(["lab", "up", "--kubernetes"]).status()?.success() {
        bail!("the real cluster did not come up");
    }
    let result = (|| -> Result<()> {
        kubectl(&["get", "pods", "-A", "-o", "wide"], &admin)?;
        println!("\n# The incident: jellyfin's veth falls off cni0 on storagenodet3500 (veth-detached).");
        let veth = host_veth("cnitrace-storagenodet3500", "cnitrace-pod-jellyfin")?;
        println!("$ ip -n cnitrace-storagenodet3500 link set {veth} nomaster");
        if !tools::IP.command().args(["-n", "cnitrace-storagenodet3500", "link", "set", &veth, "nomaster"]).status()?.success() {
            bail!("could not detach {veth}");
        }
        println!("\n# cnitrace follows the pods by name through the kernel and names where and why they die.");
        kubectl(&["cnitrace", "follow", "default/debug", "default/jellyfin"], &kubeconfig)?;
        println!("\n# It repairs it, traces again to prove it, and keeps a journal to undo it.");
        if kubectl(&["cnitrace", "fix", "--auto", "default/debug", "default/jellyfin"], &kubeconfig)? != 0 {
            bail!("the fix did not verify");
        }
        println!("\n# flanneld and kube-proxy restarted on the node (they write their state again): the repair stands.");
        for ns in ["kube-flannel", "kube-system"] {
            kubectl(&["-n", ns, "delete", "pods", "--field-selector", "spec.nodeName=storagenodet3500", "--wait=true"], &admin)?;
        }
        kubectl(&["wait", "-A", "--for=condition=Ready", "pods", "--all", "--timeout=60s"], &admin)?;
        if kubectl(&["cnitrace", "follow", "default/debug", "default/jellyfin"], &kubeconfig)? != 0 {
            bail!("the pair is not delivered after flanneld and kube-proxy wrote their state again");
        }
        Ok(())
    })();
    let _ = Command::new(&bin).args(["lab", "down"]).status();
    result
}

/// The host end (in `node`) of the eth0 of the pod whose namespace is `pod`.
pub fn host_veth(node: &str, pod: &str) -> Result<String> {
    let json = |args: &[&str]| -> Result<serde_json::Value> { Ok(serde_json::from_slice(&tools::IP.command().args(args).output()?.stdout)?) };
    let eth0 = json(&["-n", pod, "-j", "link", "show", "eth0"])?;
    let peer = eth0[0]["link_index"].as_u64().context("eth0's peer")?;
    let links = json(&["-n", node, "-j", "link", "show"])?;
    links.as_array().into_iter().flatten().find(|l| l["ifindex"].as_u64() == Some(peer)).and_then(|l| l["ifname"].as_str()).map(str::to_string).context("the host veth")
}
