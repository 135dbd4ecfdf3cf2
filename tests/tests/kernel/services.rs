//! Services: follow through kube-proxy's NAT in each proxy mode (iptables through either backend,
//! nftables) to the endpoint, each Service fault diagnosed, and the fixes that exist applied, verified
//! and rolled back byte-identical.

use cnitrace_tests::{can_run_kernel_tests, check, config_diff, faults, fix, follow, lab_config, topology, LabGuard};

const MODES: [&str; 3] = ["iptables", "iptables-legacy", "nftables"];

fn target(name: &str) -> String {
    topology::lab_target(name).unwrap_or_else(|| panic!("no lab target {name}"))
}

fn broken(g: &LabGuard) -> Vec<&'static str> {
    let every: Vec<check::PathId> = check::ALL_PATHS.iter().chain(&check::SERVICE_PATHS).copied().collect();
    let mut v: Vec<&str> = check::check_these(&g.lab, &every).into_iter().filter(|r| !r.ok).map(|r| r.path.name()).collect();
    v.sort();
    v
}

#[test]
fn a_healthy_service_is_followed_through_its_nat_to_the_endpoint_in_every_proxy_mode() {
    if !can_run_kernel_tests("a_healthy_service_is_followed_through_its_nat_to_the_endpoint_in_every_proxy_mode") {
        return;
    }
    let mut wrong = Vec::new();
    for mode in MODES {
        let g = LabGuard::up_with(&[], &["--proxy-mode", mode]);
        assert!(broken(&g).is_empty(), "{mode}: the healthy lab's paths flow: {:?}", broken(&g));
        // ClusterIP on the same node, across VXLAN, a NodePort from outside, a pod through its own Service.
        for (src, dst, endpoint, masquerade) in [
            ("debug", "svc/jellyfin", "10.244.0.19:8096", false),
            ("debug", "svc/web", "10.244.1.10:8096", false),
            ("external", "nodeport/jellyfin", "10.244.0.19:8096", true),
            ("external", "nodeport/web", "10.244.1.10:8096", true),
            ("jellyfin", "svc/jellyfin", "10.244.0.19:8096", true),
        ] {
            let (code, v) = follow(&target(src), &target(dst), &["--timeout", "3"]);
            let svc = &v["service"];
            let asked = target(dst);
            let dnat = format!("dst {asked} → {endpoint}");
            let ok = code == 0
                && v["verdict"] == "delivered"
                && svc["endpoint"] == endpoint
                && svc["asked"] == asked.as_str()
                && v["explanation"].as_str().is_some_and(|e| e.contains(&format!("({asked} → {endpoint})")))
                && svc["translations"].as_array().is_some_and(|t| t.iter().any(|n| n.as_str().is_some_and(|n| n.contains(&dnat))))
                && svc["rule"].as_str().is_some_and(|r| r.starts_with(if mode == "nftables" { "endpoint-" } else { "KUBE-SEP-" }))
                && (!masquerade || svc["translations"].as_array().is_some_and(|t| t.iter().any(|n| n.as_str().is_some_and(|n| n.contains("src ")))));
            if !ok {
                wrong.push(format!("{mode} {src} → {dst}: exit {code} {v}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn every_service_fault_is_diagnosed_in_every_proxy_mode() {
    if !can_run_kernel_tests("every_service_fault_is_diagnosed_in_every_proxy_mode") {
        return;
    }
    let mut wrong = Vec::new();
    for mode in MODES {
        for f in faults::SERVICE_FAULTS {
            let g = LabGuard::up_with(&[f.name], &["--proxy-mode", mode]);
            let mut expected: Vec<&str> = f.breaks.iter().map(|p| p.name()).collect();
            expected.sort();
            let got = broken(&g);
            if got != expected {
                wrong.push(format!("{mode} {}: broke {got:?}, expected {expected:?}", f.name));
            }
            let (code, v) = follow(&target(f.pair.0), &target(f.pair.1), &["--timeout", "2"]);
            if code != 1 || v["cause"] != f.cause || v["netns"].is_null() {
                wrong.push(format!("{mode} {}: exit {code}, expected cause {}: {v}", f.name, f.cause));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn service_fixes_repair_what_they_can_and_roll_back_byte_identical_in_every_proxy_mode() {
    if !can_run_kernel_tests("service_fixes_repair_what_they_can_and_roll_back_byte_identical_in_every_proxy_mode") {
        return;
    }
    let mut wrong = Vec::new();
    for (mode, f) in MODES.iter().flat_map(|m| faults::SERVICE_FAULTS.iter().map(move |f| (*m, f))) {
        let g = LabGuard::up_with(&[f.name], &["--proxy-mode", mode]);
        let (src, dst) = (target(f.pair.0), target(f.pair.1));
        let before = lab_config();
        // A dry run (no terminal, no --auto) prints the plan and changes nothing.
        let (code, text) = fix(&[&src, &dst]);
        let diff = config_diff(&before, &lab_config());
        if code != 1 || !diff.is_empty() {
            wrong.push(format!("{mode} {}: dry run: exit {code}, changed {diff:?}\n{text}", f.name));
            continue;
        }
        let (code, text) = fix(&["--auto", "--allow-rule-removal", "--timeout", "2", &src, &dst]);
        let safe = matches!(f.cause, "hairpin-missing" | "nodeport-blocked");
        if !safe {
            let diff = config_diff(&before, &lab_config());
            if code != 1 || !text.contains("no safe fix") || !diff.is_empty() {
                wrong.push(format!("{mode} {}: no safe fix here (no API in the lab): exit {code}, changed {diff:?}\n{text}", f.name));
            }
            continue;
        }
        let still = broken(&g);
        if code != 0 || !still.is_empty() || !text.contains("verified:") {
            wrong.push(format!("{mode} {}: exit {code}, still broken {still:?}\n{text}", f.name));
            continue;
        }
        let (code, text) = fix(&["--rollback"]);
        let diff = config_diff(&before, &lab_config());
        if code != 0 || !diff.is_empty() {
            wrong.push(format!("{mode} {}: rollback: exit {code}, differs from the fault's state in {diff:?}\n{text}", f.name));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}
