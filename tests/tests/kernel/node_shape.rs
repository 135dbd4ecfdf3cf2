//! The real node's shape: on a node the host end of every pod's veth, the pods' bridge and the rules live
//! in the *root* namespace. The lab never builds that — the host's root namespace is off limits — but
//! inside a kernel-matrix VM the root namespace is the guest's own (`CNITRACE_IN_VM`, set by the VM
//! harness): there the node is built, broken, traced, fixed, dry-run and rolled back. Elsewhere the test
//! skips, saying why.

use cnitrace_tests::{bin, can_run_kernel_tests, state_dir, HandLayout};
use cnitrace_tools as tools;

/// The root namespace's pieces this test adds (the pods' bridge), removed when dropped, also on panic.
struct RootBridge(&'static str);

impl Drop for RootBridge {
    fn drop(&mut self) {
        let _ = tools::IP.command().args(["link", "del", self.0]).output();
    }
}

fn root_ip(args: &[&str]) {
    cnitrace::sys::run(&tools::IP, args).unwrap_or_else(|e| panic!("{e:#}"));
}

fn master_of(dev: &str) -> Option<String> {
    let out = cnitrace::sys::run(&tools::IP, &["-o", "link", "show", dev]).unwrap_or_else(|e| panic!("{e:#}"));
    out.split_whitespace().skip_while(|w| *w != "master").nth(1).map(str::to_string)
}

fn cnitrace(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(bin()).args(args).env("CNITRACE_STATE_DIR", state_dir()).output().expect("run cnitrace");
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_node_whose_host_side_is_the_root_namespace_is_traced_fixed_and_rolled_back() {
    let test = "a_node_whose_host_side_is_the_root_namespace_is_traced_fixed_and_rolled_back";
    if !can_run_kernel_tests(test) {
        return;
    }
    if std::env::var_os("CNITRACE_IN_VM").is_none() {
        println!("SKIPPED {test}: builds in the root namespace, which only a kernel-matrix VM's guest may change (`cargo xtask test` runs it there)");
        return;
    }
    let _ = std::fs::remove_dir_all(state_dir());
    let pods = HandLayout::new("cnitrace-shape", &["pod-a", "pod-b"]);
    let _bridge = RootBridge("cni0");
    root_ip(&["link", "add", "cni0", "type", "bridge"]);
    root_ip(&["addr", "add", "10.244.7.1/24", "dev", "cni0"]);
    root_ip(&["link", "set", "cni0", "up"]);
    for (i, pod) in ["pod-a", "pod-b"].iter().enumerate() {
        let veth = format!("vethshape{i}");
        root_ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pods.ns(pod)]);
        root_ip(&["link", "set", &veth, "master", "cni0", "up"]);
        pods.ip(pod, &format!("addr add 10.244.7.1{i}/24 dev eth0\nlink set eth0 up\nlink set lo up\nroute add default via 10.244.7.1"));
    }
    // The seed incident on this node: pod-b's host veth is no port of cni0.
    root_ip(&["link", "set", "vethshape1", "nomaster"]);

    let (code, out) = cnitrace(&["follow", "10.244.7.10", "10.244.7.11", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.lines().rfind(|l| l.starts_with('{')).unwrap_or("{}")).expect("the verdict");
    assert_eq!(code, 1, "{out}");
    assert_eq!(v["cause"], "veth-detached", "{v}");
    assert_eq!(v["ifname"], "vethshape1", "the hop is the host veth in the root namespace: {v}");

    // A dry run changes nothing; --auto repairs and verifies; --rollback puts the node back exactly.
    let (code, out) = cnitrace(&["fix", "10.244.7.10", "10.244.7.11"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("dry run: nothing was changed"), "{out}");
    assert_eq!(master_of("vethshape1"), None, "the dry run changed nothing");
    let (code, out) = cnitrace(&["fix", "--auto", "10.244.7.10", "10.244.7.11"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ip link set vethshape1 master cni0"), "the command as typed in the root namespace: {out}");
    assert_eq!(master_of("vethshape1").as_deref(), Some("cni0"));
    let (code, out) = cnitrace(&["fix", "--rollback"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(master_of("vethshape1"), None, "rolled back exactly: {out}");
}
