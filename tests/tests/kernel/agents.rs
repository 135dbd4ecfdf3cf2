//! `cnitrace agent`: one per lab node, each answering for its node only; `check --agent` asks them all
//! and reports exactly what `check` on the host reports, node by node; an agent killed is a node said
//! unchecked within the timeout, not a hang.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cnitrace_tests::{bin, can_run_kernel_tests, cnitrace, topology, LabGuard, Scratch};
use serde_json::Value;

/// An agent this test started, ended by its id.
struct Agent(Child);

impl Agent {
    fn start(node: &str, sock: &std::path::Path) -> Agent {
        let child = Command::new(bin())
            .args(["agent", "--node", node, "--listen", &format!("unix:{}", sock.display())])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cnitrace agent");
        // Listening: a connection is taken (a socket file alone may be a killed agent's).
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(sock).is_err() && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(std::os::unix::net::UnixStream::connect(sock).is_ok(), "the agent for {node} listens");
        Agent(child)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn check_json(args: &[&str]) -> (i32, Value) {
    let out = cnitrace(&[&["check", "--json"][..], args].concat());
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("check --json ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn check_through_each_nodes_agent_equals_the_hosts_own_and_a_dead_agent_is_named() {
    if !can_run_kernel_tests("check_through_each_nodes_agent_equals_the_hosts_own_and_a_dead_agent_is_named") {
        return;
    }
    // A finding on each node.
    let g = LabGuard::up(&["ip-forward-off", "rp-filter-strict"]);
    let dir = Scratch::new("agents");
    let (n0, n1) = (topology::NODES[0].name, topology::NODES[1].name);
    let (s0, s1) = (dir.join("n0.sock"), dir.join("n1.sock"));
    // One by its node's name, one by its namespace's (what the lab's DaemonSet would be given).
    let a0 = Agent::start(n0, &s0);
    let mut a1 = Some(Agent::start(&g.lab.node_ns(1), &s1));
    let agents = [format!("{n0}=unix:{}", s0.display()), format!("{n1}=unix:{}", s1.display())];
    let agent_args: Vec<&str> = agents.iter().flat_map(|a| ["--agent", a.as_str()]).collect();

    let (code, here) = check_json(&[]);
    assert_eq!(code, 1, "{here}");
    let (code, through) = check_json(&agent_args);
    assert_eq!(code, 1, "{through}");
    let nodes = |v: &Value| -> Vec<Value> { v["nodes"].as_array().unwrap().iter().filter(|n| n["node"] == n0 || n["node"] == n1).cloned().collect() };
    assert_eq!(nodes(&through), nodes(&here), "each node's findings through its agent are the host's own");
    assert_eq!(nodes(&through).len(), 2);
    assert!(through["agents_missing"].as_array().unwrap().is_empty(), "{through}");

    // An agent answers for its node only.
    let out = cnitrace(&["check", "--json", "--agent", &format!("{n1}=unix:{}", s0.display())]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let missing = v["agents_missing"].as_array().unwrap();
    assert_eq!(missing.len(), 1, "{v}");
    assert!(missing[0]["error"].as_str().unwrap().contains("403") && missing[0]["error"].as_str().unwrap().contains("serves node"), "{v}");

    // Killed (SIGKILL): its node is said unchecked, at once; the other node's findings still come.
    drop(a1.take());
    let t0 = Instant::now();
    let (code, v) = check_json(&[&agent_args[..], &["--agent-timeout", "3"]].concat());
    assert!(t0.elapsed() < Duration::from_secs(10), "not hung on: {:?}", t0.elapsed());
    assert_eq!(code, 1);
    assert_eq!(nodes(&v).len(), 1, "{v}");
    assert_eq!(v["nodes"][0]["node"], n0);
    assert_eq!(v["agents_missing"][0]["node"], n1, "{v}");
    let text = String::from_utf8_lossy(&cnitrace(&[&["check"][..], &agent_args[..]].concat()).stdout).into_owned();
    assert!(text.contains(&format!("{n1}: NOT CHECKED — its agent at unix:{}", s1.display())), "{text}");
    drop(a0);
    // Ended, an agent leaves no socket behind... except when killed: the next one replaces it.
    let a1 = Agent::start(n1, &s1);
    let (_, v) = check_json(&agent_args);
    assert!(v["agents_missing"].as_array().unwrap().len() == 1 && nodes(&v).len() == 1 && v["nodes"][0]["node"] == n1, "{v}");
    // Stopped as a DaemonSet's pod is (SIGTERM): it ends in order and takes its socket with it.
    let mut a1 = a1;
    let st = cnitrace_tools::KILL.command().args(["-TERM", &a1.0.id().to_string()]).status().expect("kill -TERM");
    assert!(st.success());
    let code = a1.0.wait().expect("the agent ends");
    assert!(code.success(), "{code:?}");
    assert!(!s1.exists(), "its socket is removed");
    // An agent for a node this host does not have does not start.
    let out = cnitrace(&["agent", "--node", "no-such-node", "--listen", &format!("unix:{}", dir.join("x.sock").display())]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node \"no-such-node\""));
}
