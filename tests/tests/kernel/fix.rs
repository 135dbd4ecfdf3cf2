//! `fix` on the lab: each fault with a safe fix ends with traffic flowing; dry runs, rollbacks, crashes
//! and fixes that cannot work leave the node exactly as it was.

use std::{
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use cnitrace_tools as tools;
use cnitrace_tests::{bin, can_run_kernel_tests, check, cnitrace, config_diff, config_diff_but_port_states, faults, fix, lab_config, state_dir, LabGuard, PREFIX};

/// Faults whose cause has no safe automatic fix: fix says so and changes nothing.
const NO_SAFE_FIX: &[&str] = &["vxlan-port-mismatch", "vxlan-vni-mismatch"];
/// Faults that are a rule someone wrote: fixed only with --allow-rule-removal.
const RULE_REMOVAL: &[&str] = &["iptables-drop", "nft-drop"];

fn ip(pod: &str) -> String {
    cnitrace_tests::pod_ip(pod)
}

/// The namespaces the last fix's actions ran in, from its journal.
fn touched_namespaces() -> Vec<String> {
    let dir = state_dir().join("journal");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("journal dir").flatten() {
        let j: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).expect("journal")).expect("journal json");
        for s in j["steps"].as_array().expect("steps") {
            out.push(s["action"]["ns"]["netns"].as_str().expect("netns").to_string());
        }
    }
    out
}

#[test]
fn every_fault_with_a_safe_fix_is_fixed() {
    if !can_run_kernel_tests("every_fault_with_a_safe_fix_is_fixed") {
        return;
    }
    let mut wrong = Vec::new();
    for f in faults::FAULTS {
        let g = LabGuard::up(&[f.name]);
        let before = lab_config();
        let mut args = vec!["--auto", "--timeout", "4"];
        if RULE_REMOVAL.contains(&f.name) {
            args.push("--allow-rule-removal");
        }
        let (src, dst) = (ip(f.pair.0), ip(f.pair.1));
        args.extend_from_slice(&[&src, &dst]);
        let (code, text) = fix(&args);
        let after = lab_config();
        if NO_SAFE_FIX.contains(&f.name) {
            let diff = config_diff(&before, &after);
            if code != 1 || !text.contains("no safe fix") || !diff.is_empty() {
                wrong.push(format!("{}: a fault without safe fix must be left alone: exit {code} {diff:?}\n{text}", f.name));
            }
            continue;
        }
        let broken: Vec<_> = check::check_all(&g.lab).into_iter().filter(|r| !r.ok).map(|r| format!("{}: {}", r.path.name(), r.detail)).collect();
        if code != 0 || !broken.is_empty() {
            wrong.push(format!("{}: exit {code}, still broken {broken:?}\n{text}", f.name));
            continue;
        }
        // Only the namespaces the fix acted in may have changed.
        let touched = touched_namespaces();
        let outside: Vec<String> = config_diff_but_port_states(&before, &after).into_iter().filter(|d| !touched.iter().any(|t| d.starts_with(&format!("{t}:")))).collect();
        if !outside.is_empty() {
            wrong.push(format!("{}: changed what it did not touch: {outside:?}", f.name));
        }
    }
    assert!(wrong.is_empty(), "fix went wrong:\n{}", wrong.join("\n\n"));
}

#[test]
fn two_faults_are_fixed_in_one_run() {
    if !can_run_kernel_tests("two_faults_are_fixed_in_one_run") {
        return;
    }
    let g = LabGuard::up(&["ip-forward-off", "route-missing"]);
    let (code, text) = fix(&["--auto", &ip("debug"), &ip("web")]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("round 2"), "two faults, two rounds: {text}");
    for r in check::check_all(&g.lab) {
        assert!(r.ok, "{} after the fix: {}", r.path.name(), r.detail);
    }
}

#[test]
fn a_dry_run_changes_nothing() {
    if !can_run_kernel_tests("a_dry_run_changes_nothing") {
        return;
    }
    for fault in ["veth-detached", "forward-policy-drop", "bridge-ip-conflict"] {
        let f = faults::find(fault).expect("fault");
        let _g = LabGuard::up(&[fault]);
        let before = lab_config();
        // No terminal, no --auto: print the plan only.
        let (code, text) = fix(&[&ip(f.pair.0), &ip(f.pair.1)]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("dry run") && text.contains("plan"), "{text}");
        assert_eq!(config_diff(&before, &lab_config()), Vec::<String>::new(), "{fault}: the dry run changed the lab");
    }
}

#[test]
fn rollback_restores_the_state_before_the_fix() {
    if !can_run_kernel_tests("rollback_restores_the_state_before_the_fix") {
        return;
    }
    for fault in ["bridge-ip-conflict", "vxlan-down", "forward-policy-drop", "rp-filter-strict", "mtu-mismatch", "veth-wrong-bridge"] {
        let f = faults::find(fault).expect("fault");
        let _g = LabGuard::up(&[fault]);
        let before = lab_config();
        let (code, text) = fix(&["--auto", &ip(f.pair.0), &ip(f.pair.1)]);
        assert_eq!(code, 0, "{fault}: {text}");
        assert_ne!(config_diff(&before, &lab_config()), Vec::<String>::new(), "{fault}: the fix changed something");
        let (code, text) = fix(&["--rollback"]);
        assert_eq!(code, 0, "{fault}: {text}");
        assert_eq!(config_diff(&before, &lab_config()), Vec::<String>::new(), "{fault}: rollback is not exact");
        let (_, hist) = fix(&["--history"]);
        assert!(hist.contains("RolledBack"), "{hist}");
    }
}

/// A removed nft rule goes back in its place, not at the chain's end: the drop rule sits between two
/// others (the undo used to append it, so a rollback reordered the chain).
#[test]
fn a_removed_nft_rule_goes_back_in_its_place() {
    if !can_run_kernel_tests("a_removed_nft_rule_goes_back_in_its_place") {
        return;
    }
    let f = faults::find("nft-drop").expect("fault");
    let g = LabGuard::up(&[f.name]);
    let node = g.lab.node_ns(0);
    for rule in ["insert rule inet hardening forward ip saddr 192.0.2.99 counter accept", "add rule inet hardening forward ip daddr 192.0.2.98 counter accept"] {
        cnitrace::sys::run_in_stdin(&node, &tools::NFT, &["-f", "-"], &format!("{rule}\n")).expect("nft");
    }
    let before = lab_config();
    let (code, text) = fix(&["--auto", "--allow-rule-removal", &ip(f.pair.0), &ip(f.pair.1)]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = fix(&["--rollback"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("position"), "the undo names the rule before it: {text}");
    assert_eq!(config_diff(&before, &lab_config()), Vec::<String>::new(), "the rule is back in its place");
}

#[test]
fn a_crash_between_actions_is_rolled_back_exactly() {
    if !can_run_kernel_tests("a_crash_between_actions_is_rolled_back_exactly") {
        return;
    }
    let f = faults::find("bridge-ip-conflict").expect("fault");
    let _g = LabGuard::up(&[f.name]);
    let before = lab_config();
    let out = Command::new(bin())
        .args(["fix", "--auto", &ip(f.pair.0), &ip(f.pair.1)])
        .env("CNITRACE_STATE_DIR", state_dir())
        .env("CNITRACE_TEST_CRASH_AFTER_ACTIONS", "1")
        .output()
        .expect("run fix");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9), "the test switch kills fix after its first action: {:?}", out.status);
    assert_ne!(config_diff(&before, &lab_config()), Vec::<String>::new(), "half the fix was applied");
    let (code, text) = fix(&["--rollback"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(config_diff(&before, &lab_config()), Vec::<String>::new(), "rollback after the crash is not exact\n{text}");
}

#[test]
fn a_fix_that_cannot_work_is_rolled_back() {
    if !can_run_kernel_tests("a_fix_that_cannot_work_is_rolled_back") {
        return;
    }
    let g = LabGuard::up(&["veth-detached"]);
    let veth = g.lab.host_veth("jellyfin").expect("veth").to_string();
    let node = g.lab.node_ns(0);
    // Something on the node keeps detaching the veth (a misbehaving agent).
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let saboteur = std::thread::spawn(move || {
        while !s2.load(Ordering::SeqCst) {
            let _ = tools::IP.command().args(["-n", &node, "link", "set", &veth, "nomaster"]).output();
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let before = lab_config();
    let (code, text) = fix(&["--auto", "--timeout", "4", &ip("debug"), &ip("jellyfin")]);
    stop.store(true, Ordering::SeqCst);
    saboteur.join().expect("saboteur");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("rolled back"), "{text}");
    assert_eq!(config_diff(&before, &lab_config()), Vec::<String>::new(), "the failed fix left changes");
}

#[test]
fn a_second_fix_changes_nothing() {
    if !can_run_kernel_tests("a_second_fix_changes_nothing") {
        return;
    }
    let _g = LabGuard::up(&["vxlan-fdb-missing"]);
    let (code, text) = fix(&["--auto", &ip("debug"), &ip("web")]);
    assert_eq!(code, 0, "{text}");
    let fixed = lab_config();
    let (code, text) = fix(&["--auto"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("nothing to fix"), "{text}");
    assert_eq!(config_diff(&fixed, &lab_config()), Vec::<String>::new());
}

#[test]
fn fix_needs_root() {
    if !can_run_kernel_tests("fix_needs_root") {
        return;
    }
    let out = tools::SETPRIV
        .command()
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .args(["fix", "--auto", "10.244.0.20", "10.244.0.19"])
        .env("CNITRACE_LAB_PREFIX", PREFIX)
        .output()
        .expect("run setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn a_fix_without_a_pair_takes_the_last_follow_and_checks_the_node() {
    if !can_run_kernel_tests("a_fix_without_a_pair_takes_the_last_follow_and_checks_the_node") {
        return;
    }
    let _g = LabGuard::up(&["veth-detached", "vxlan-fdb-missing"]);
    let out = cnitrace(&["follow", &ip("debug"), &ip("jellyfin"), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let (code, text) = fix(&["--auto"]);
    assert_eq!(code, 0, "the last followed pair is fixed: {text}");
    assert!(text.contains("node checks:") && text.contains("(vxlan-fdb-missing)"), "the node's other fault is reported: {text}");
    assert!(text.contains("(veth-detached)"), "{text}");
}

#[test]
fn confirm_timeout_rolls_back_what_was_not_verified_in_time() {
    if !can_run_kernel_tests("confirm_timeout_rolls_back_what_was_not_verified_in_time") {
        return;
    }
    let _g = LabGuard::up(&["route-missing"]);
    let before = lab_config();
    // No trace can verify within a millisecond: the change must not stay.
    let (code, text) = fix(&["--auto", "--confirm-timeout", "0.001", &ip("debug"), &ip("web")]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("not verified within --confirm-timeout") && text.contains("rolled back"), "{text}");
    assert_eq!(config_diff(&before, &lab_config()), Vec::<String>::new(), "the unconfirmed fix stayed");
}

#[test]
fn on_a_terminal_fix_asks_and_a_no_changes_nothing() {
    if !can_run_kernel_tests("on_a_terminal_fix_asks_and_a_no_changes_nothing") {
        return;
    }
    let _g = LabGuard::up(&["route-missing"]);
    let before = lab_config();
    // `script` gives fix a terminal; the answer typed is "n".
    let cmd = format!("{} fix {} {}", bin().display(), ip("debug"), ip("web"));
    let mut child = tools::SCRIPT
        .command()
        .args(["-qec", &cmd, "/dev/null"])
        .env("CNITRACE_STATE_DIR", state_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run script");
    use std::io::Write;
    // Kept open until fix ends: an early EOF would end script's session.
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"n\n").expect("answer");
    let out = child.wait_with_output().expect("fix ends");
    drop(stdin);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("apply? [y/N]"), "fix asks on a terminal: {text}");
    assert!(text.contains("nothing was changed"), "{text}");
    assert_eq!(config_diff(&before, &lab_config()), Vec::<String>::new());
}

/// In a real terminal (tmux): the verdict in colour, the question, a "y" typed, the repair applied and
/// verified on screen.
#[test]
fn in_a_real_terminal_fix_asks_in_colour_and_a_yes_repairs() {
    if !can_run_kernel_tests("in_a_real_terminal_fix_asks_in_colour_and_a_yes_repairs") {
        return;
    }
    let _g = LabGuard::up(&["route-missing"]);
    let before = lab_config();
    let cmd = format!(
        "{} CNITRACE_STATE_DIR={} CNITRACE_LAB_PREFIX={} TERM=xterm-256color {} fix {} {}; sleep 60",
        tools::ENV.program,
        state_dir().display(),
        cnitrace_tests::PREFIX,
        bin().display(),
        ip("debug"),
        ip("web")
    );
    let term = cnitrace_tests::Tmux::start("fix", &cmd);
    let wait_for = |what: &str| {
        let t0 = std::time::Instant::now();
        while !term.screen(false).contains(what) {
            assert!(t0.elapsed() < std::time::Duration::from_secs(60), "waited for {what:?}; the screen:\n{}", term.screen(false));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_for("apply? [y/N]");
    let coloured = term.screen(true);
    assert!(coloured.contains("\x1b[") && coloured.contains("DROPPED"), "the verdict in colour on a terminal: {coloured}");
    assert_eq!(config_diff(&before, &lab_config()), Vec::<String>::new(), "nothing changed before the answer");
    term.keys(&["y", "Enter"]);
    wait_for("verified: ");
    let text = term.screen(false);
    assert!(!text.contains("rolled back"), "{text}");
    assert!(!config_diff(&before, &lab_config()).is_empty(), "the route is back: {text}");
}

/// follow's progress line in a real terminal: what it waits for while it waits (the ARP reply that never
/// comes, with --until-drop), gone once the verdict prints.
#[test]
fn in_a_real_terminal_follow_says_what_it_waits_for_then_clears_it() {
    if !can_run_kernel_tests("in_a_real_terminal_follow_says_what_it_waits_for_then_clears_it") {
        return;
    }
    let _g = LabGuard::up(&[faults::SEED_FAULT]);
    let cmd = format!("{} TERM=xterm-256color {} follow {} {} --until-drop; sleep 60", tools::ENV.program, bin().display(), ip("debug"), ip("jellyfin"));
    let term = cnitrace_tests::Tmux::start("follow", &cmd);
    let screen = || term.screen(false);
    let t0 = std::time::Instant::now();
    let mut saw_progress = false;
    while !screen().contains("verdict:") {
        saw_progress |= screen().contains(&format!("waiting for ARP reply from {}", ip("jellyfin")));
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "no verdict; the screen:\n{}", screen());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let text = screen();
    assert!(saw_progress, "the wait for ARP was shown while it lasted (about 3 s): {text}");
    assert!(!text.contains("waiting for ARP reply") && !text.contains("attaching the probes"), "the progress line is gone: {text}");
    // Piped (this suite's other tests), follow writes no progress at all.
    let piped = cnitrace_tests::cnitrace(&["follow", &ip("debug"), &ip("jellyfin")]);
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("waiting for"), "{}", String::from_utf8_lossy(&piped.stderr));
}

/// The node check `fix` verifies with, on the lab's real namespaces: jellyfin's eth0 brought up by hand
/// without the routes the kernel removed with it. The pair debug → jellyfin answers again; the check must
/// still name jellyfin → web, which debug reaches (issue 17: such a repair was verified on the pair).
#[test]
fn the_node_check_names_a_pod_brought_up_without_its_routes() {
    if !can_run_kernel_tests("the_node_check_names_a_pod_brought_up_without_its_routes") {
        return;
    }
    use cnitrace::{fix::verify, resolve::{Endpoint, HostResolver, Resolver}};
    let g = LabGuard::up(&["veth-down-pod"]);
    let r = HostResolver::scan().expect("scan");
    let Endpoint::Local(debug) = r.resolve(ip("debug").parse().expect("ip")).expect("resolve") else { panic!("debug is local") };
    let node = debug.node.expect("debug's node").netns.inode;
    let paths = verify::discover(&[node], ("10.244.0.0".parse().expect("net"), 16)).expect("discover");
    let names: Vec<String> = paths.iter().map(|p| p.name()).collect();
    assert_eq!(paths.len(), 6, "each of the node's two pods ↔ gateway, sibling, one pod of the other node: {names:?}");
    let before = verify::check(&paths);
    let jellyfin = g.lab.pod_ns("jellyfin");
    tools::IP.command().args(["-n", &jellyfin, "link", "set", "eth0", "up"]).status().expect("ip link set up");
    let after = verify::check(&paths);
    let wrong = verify::judge(&paths, &before, &after, std::slice::from_ref(&jellyfin));
    assert_eq!(wrong.len(), 1, "{wrong:?} (paths {names:?}, before {before:?}, after {after:?})");
    assert!(wrong[0].starts_with("jellyfin → web (10.244.1.10) fails after the repair"), "{wrong:?}");
}
