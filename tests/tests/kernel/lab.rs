//! The lab itself: healthy paths flow, each fault breaks exactly its paths, and down leaves nothing.

use cnitrace_tests::{can_run_kernel_tests, check, cnitrace, faults, leftovers, LabGuard};

fn broken_paths(lab: &cnitrace_tests::Lab) -> Vec<&'static str> {
    check::check_all(lab).into_iter().filter(|r| !r.ok).map(|r| r.path.name()).collect()
}

#[test]
fn healthy_lab_every_path_flows() {
    if !can_run_kernel_tests("healthy_lab_every_path_flows") {
        return;
    }
    let g = LabGuard::up(&[]);
    for r in check::check_all(&g.lab) {
        assert!(r.ok, "{} should flow on the healthy lab: {}", r.path.name(), r.detail);
    }
}

#[test]
fn each_fault_breaks_exactly_its_paths() {
    if !can_run_kernel_tests("each_fault_breaks_exactly_its_paths") {
        return;
    }
    let mut wrong = Vec::new();
    for f in faults::FAULTS {
        let g = LabGuard::up(&[f.name]);
        let mut broken = broken_paths(&g.lab);
        let mut expected: Vec<&str> = f.breaks.iter().map(|p| p.name()).collect();
        broken.sort();
        expected.sort();
        if broken != expected {
            wrong.push(format!("{}: broke {broken:?}, expected {expected:?}", f.name));
        }
    }
    assert!(wrong.is_empty(), "faults that broke the wrong paths:\n{}", wrong.join("\n"));
}

#[test]
fn faults_combine() {
    if !can_run_kernel_tests("faults_combine") {
        return;
    }
    let g = LabGuard::up(&["veth-detached", "route-missing"]);
    assert_eq!(g.lab.state.faults, vec!["veth-detached", "route-missing"]);
    let broken = broken_paths(&g.lab);
    for p in ["same-node", "cross-node"] {
        assert!(broken.contains(&p), "{p} should be broken by the two faults, broken: {broken:?}");
    }
    assert!(!broken.contains(&"external"), "external should still flow: {broken:?}");
}

#[test]
fn lab_down_leaves_nothing() {
    if !can_run_kernel_tests("lab_down_leaves_nothing") {
        return;
    }
    let pids: Vec<u32> = {
        let g = LabGuard::up(&["nft-drop", "iptables-backend-conflict"]);
        g.lab.state.servers.iter().map(|s| s.pid).collect()
    };
    // Every pod's container (debug, jellyfin, web), the cluster DNS, the external host's HTTP and HTTPS.
    assert_eq!(pids.len(), 6, "the lab's processes");
    let left = leftovers(&pids);
    assert!(left.is_empty(), "lab down left: {left:?}");
}

#[test]
fn lab_down_after_a_panicking_test_leaves_nothing() {
    if !can_run_kernel_tests("lab_down_after_a_panicking_test_leaves_nothing") {
        return;
    }
    let pids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let p2 = pids.clone();
    let r = std::thread::spawn(move || {
        let g = LabGuard::up(&["bridge-down"]);
        p2.lock().unwrap().extend(g.lab.state.servers.iter().map(|s| s.pid));
        panic!("a test failing half-way");
    })
    .join();
    assert!(r.is_err(), "the thread panicked");
    let left = leftovers(&pids.lock().unwrap());
    assert!(left.is_empty(), "a panicking test left: {left:?}");
}

#[test]
fn pod_add_fails_on_bridge_ip_conflict_and_works_when_healthy() {
    if !can_run_kernel_tests("pod_add_fails_on_bridge_ip_conflict_and_works_when_healthy") {
        return;
    }
    {
        let _g = LabGuard::up(&["bridge-ip-conflict"]);
        let out = cnitrace(&["lab", "pod", "add", "newpod"]);
        assert_eq!(out.status.code(), Some(2), "pod add must fail while cni0 has the wrong address");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("already has an IP address different from 10.244.0.1/24"), "the CNI plugin's own error: {err}");
    }
    let g = LabGuard::up(&[]);
    let out = cnitrace(&["lab", "pod", "add", "newpod"]);
    assert!(out.status.success(), "pod add on a healthy lab: {}", String::from_utf8_lossy(&out.stderr));
    let lab = cnitrace_tests::Lab::load(cnitrace_tests::PREFIX).expect("lab state");
    assert!(lab.state.pods.contains_key("newpod"));
    let out = cnitrace(&["lab", "pod", "del", "newpod"]);
    assert!(out.status.success(), "pod del: {}", String::from_utf8_lossy(&out.stderr));
    drop(g);
}
