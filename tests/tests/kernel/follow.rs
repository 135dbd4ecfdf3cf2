//! `follow` on the lab: every fault gives its cause, healthy pairs are delivered, passive mode sees real
//! traffic, bad input exits 2, and nothing of the tracer stays in the kernel after it ends.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cnitrace::finding::causes;
use cnitrace_tools as tools;
use cnitrace_tests::{assert_reason, bin, can_run_kernel_tests, cnitrace, cnitrace_programs_of, faults, follow, topology, ProgramBaseline, LabGuard, PassiveFollow, PREFIX};

fn ip(pod: &str) -> String {
    cnitrace_tests::pod_ip(pod)
}

#[test]
fn every_fault_is_followed_to_its_cause() {
    if !can_run_kernel_tests("every_fault_is_followed_to_its_cause") {
        return;
    }
    let mut wrong = Vec::new();
    for f in faults::FAULTS {
        let _g = LabGuard::up(&[f.name]);
        let (code, v) = follow(&ip(f.pair.0), &ip(f.pair.1), &[]);
        let layer = causes::find(f.cause).expect("catalog cause").layer;
        let ok = code == 1
            && v["verdict"] == "dropped"
            && v["cause"] == f.cause
            && v["layer"] == layer
            && v["netns"].as_str().is_some_and(|s| !s.is_empty())
            && v["ifname"].as_str().is_some_and(|s| !s.is_empty());
        if !ok {
            wrong.push(format!("{}: exit {code}, verdict {} cause {} layer {} at {} {}", f.name, v["verdict"], v["cause"], v["layer"], v["netns"], v["ifname"]));
        }
    }
    assert!(wrong.is_empty(), "faults followed to the wrong verdict:\n{}", wrong.join("\n"));
}

#[test]
fn the_drop_point_is_the_kernels_own() {
    if !can_run_kernel_tests("the_drop_point_is_the_kernels_own") {
        return;
    }
    // (fault, where, interface, function, reason) as the kernel reports them on this path.
    let cases = [
        ("bridge-down", "storagenodet3500", "br_handle_frame", "BRIDGE_INGRESS_STP_STATE"),
        ("ip-forward-off", "storagenodet3500", "ip_error", "IP_INADDRERRORS"),
        ("route-missing", "storagenodet3500", "ip_error", "IP_INNOROUTES"),
        ("vxlan-fdb-missing", "storagenodet3500", "vxlan_xmit", "NO_TX_TARGET"),
        // 7.2 frees it in udp_rcv itself (__udp4_lib_rcv is folded into it there).
        ("vxlan-port-mismatch", "storagenodet3501", "__udp4_lib_rcv|udp_rcv", "NO_SOCKET"),
        // The frame to the wrong MAC is flooded to the bridge's other port: jellyfin, whose MAC it is not,
        // frees it (OTHERHOST).
        ("neighbor-stale", "jellyfin", "ip_rcv_core", "OTHERHOST"),
        ("rp-filter-strict", "storagenodet3501", "ip_rcv_finish_core", "IP_RPFILTER"),
        ("mtu-mismatch", "storagenodet3500", "ip_forward", "PKT_TOO_BIG"),
    ];
    for (fault, netns, function, reason) in cases {
        let f = faults::find(fault).expect("fault");
        let _g = LabGuard::up(&[fault]);
        let (_, v) = follow(&ip(f.pair.0), &ip(f.pair.1), &[]);
        assert_reason(&v, reason, fault);
        // The symbol may carry a compiler suffix on some builds (ip_rcv_finish_core.constprop.0 on 6.1);
        // where kernels differ, the names each uses are listed, `|` between them.
        let got = v["function"].as_str().unwrap_or("");
        let base = got.split('.').next().unwrap_or("");
        assert!(function.split('|').any(|f| f == base), "{fault}: expected {function}, got {got}: {v}");
        // The kernel's drop site is said on its own (`where`, netns/ifname, is the fault's place).
        assert!(netns.split('|').any(|n| v["dropped_at"]["netns"] == n), "{fault}: dropped in {netns}: {v}");
        assert_eq!(v["dropped_at"]["function"], got, "{fault}: {v}");
    }
}

#[test]
fn the_seed_incident_is_an_arp_failure_at_jellyfins_detached_veth() {
    if !can_run_kernel_tests("the_seed_incident_is_an_arp_failure_at_jellyfins_detached_veth") {
        return;
    }
    let g = LabGuard::up(&[faults::SEED_FAULT]);
    let veth = g.lab.host_veth("jellyfin").expect("jellyfin's host veth");
    // By default follow decides once the ARP request has gone unanswered: it names the port the
    // request never reached and says what the kernel will do with the queued echo.
    let (code, v) = follow("10.244.0.20", "10.244.0.19", &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["cause"], "veth-detached");
    assert_eq!((v["netns"].as_str(), v["ifname"].as_str()), (Some("storagenodet3500"), Some(veth)), "{v}");
    assert!(v["function"].is_null(), "no drop happened yet, none is claimed: {v}");
    let facts = v["facts"].to_string();
    assert!(facts.contains(&format!("{veth}, the host end of jellyfin's eth0 on storagenodet3500, has no master")), "{facts}");
    assert!(facts.contains(&format!("reached cni0 but was never sent to {veth}")), "{facts}");
    assert!(facts.contains("the ARP request for 10.244.0.19 from debug eth0 went unanswered"), "{facts}");
    assert!(facts.contains("after 3 unanswered requests 1000 ms apart"), "the pod's own neighbour settings: {facts}");

    // Waiting for the kernel shows the seed's own symptom: the source pod gives up on ARP and drops its
    // queued echo (Destination Host Unreachable).
    let (code, v) = follow("10.244.0.20", "10.244.0.19", &["--until-drop"]);
    assert_eq!(code, 1);
    assert_eq!(v["cause"], "veth-detached");
    assert_eq!(v["function"], "neigh_invalidate", "the source gave up on ARP: {v}");
    assert_reason(&v, "NEIGH_FAILED", "the seed incident");
    assert_eq!(v["dropped_at"]["netns"], "debug", "the packet died in the source pod, as the seed saw it: {v}");
    assert_eq!((v["netns"].as_str(), v["ifname"].as_str()), (Some("storagenodet3500"), Some(veth)), "the fault's place, as the early verdict said it: {v}");
    let facts = v["facts"].to_string();
    assert!(facts.contains(&format!("{veth}, the host end of jellyfin's eth0 on storagenodet3500, has no master")), "{facts}");
    assert!(facts.contains("host unreachable"), "the source got Destination Host Unreachable: {facts}");

    // The text a person reads: terse by default — the ICMP error's loopback legs in the source pod left
    // out, the drop kept — every event with -v; colour only when asked for (this output is piped).
    let text = |extra: &[&str]| {
        let mut args = vec!["follow", "10.244.0.20", "10.244.0.19", "--until-drop"];
        args.extend_from_slice(extra);
        String::from_utf8_lossy(&cnitrace(&args).stdout).into_owned()
    };
    let on_lo = |t: &str| t.lines().filter(|l| l.split_whitespace().nth(3) == Some("lo")).count();
    let (terse, verbose) = (text(&[]), text(&["-v"]));
    assert!(on_lo(&verbose) > 0, "the ICMP error travels the source's loopback: {verbose}");
    assert_eq!(on_lo(&terse), 0, "{terse}");
    assert!(terse.contains("DROP NEIGH_FAILED at neigh_invalidate") || terse.contains("at neigh_invalidate"), "the drop stays: {terse}");
    assert!(terse.lines().count() < verbose.lines().count() && terse.contains("-v shows every one"), "{terse}");
    assert!(!terse.contains('\x1b') && !verbose.contains('\x1b'), "no colour into a pipe");
    let coloured = text(&["--color", "always"]);
    assert!(coloured.contains("\x1b[") && coloured.contains("DROPPED"), "{coloured}");
}

#[test]
fn healthy_pairs_are_delivered() {
    if !can_run_kernel_tests("healthy_pairs_are_delivered") {
        return;
    }
    let _g = LabGuard::up(&[]);
    for dst in [ip("jellyfin"), ip("web"), topology::EXTERNAL_IP.to_string()] {
        let (code, v) = follow(&ip("debug"), &dst, &[]);
        assert_eq!((code, v["verdict"].as_str()), (0, Some("delivered")), "debug → {dst}: {v}");
        assert!(v["cause"].is_null());
    }
    let (code, v) = follow(&ip("debug"), &ip("jellyfin"), &["--probe", "tcp:8096"]);
    assert_eq!((code, v["verdict"].as_str()), (0, Some("delivered")), "tcp probe: {v}");
}

#[test]
fn passive_mode_sees_real_traffic() {
    if !can_run_kernel_tests("passive_mode_sees_real_traffic") {
        return;
    }
    for (faults, expect_code, expect_cause) in [(vec![], 0, None), (vec!["route-missing"], 1, Some("route-missing"))] {
        let g = LabGuard::up(&faults);
        let f = PassiveFollow::start("10.244.0.20", "10.244.1.10", 4);
        let _ = tools::PING.in_netns(&g.lab.pod_ns("debug")).args(["-c", "2", "-i", "0.2", "-W", "1", "10.244.1.10"]).output();
        let (code, v) = f.finish();
        assert_eq!(code, Some(expect_code), "passive {faults:?}: {v}");
        assert_eq!(v["cause"].as_str(), expect_cause, "passive {faults:?}: {v}");
    }
}

#[test]
fn bad_input_exits_2_with_one_line() {
    if !can_run_kernel_tests("bad_input_exits_2_with_one_line") {
        return;
    }
    let _g = LabGuard::up(&[]);
    let cases: &[&[&str]] = &[
        &["follow", "10.244.0.256", "10.244.0.19"],
        &["follow", "10.244.0.0/24", "10.244.0.19"],
        &["follow", "jellyfin", "10.244.0.19"],
        &["follow", "10.244.0.20", "10.244.0.20"],
        &["follow", "10.244.9.9", "10.244.0.19"],
        &["follow", "10.244.0.20"],
        &["follow", "10.244.0.20", "10.244.0.19", "--probe", "tcp:0"],
    ];
    for args in cases {
        let out = cnitrace(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("verdict"), "{args:?}");
    }
    // Not root: refused before touching anything.
    let out = tools::SETPRIV
        .command()
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .args(["follow", "10.244.0.20", "10.244.0.19"])
        .output()
        .expect("run setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "not root: {err}");
    assert!(err.contains("needs root") && err.lines().count() == 1, "one clear line: {err}");
}

#[test]
fn nothing_remains_in_the_kernel_after_follow_ends() {
    if !can_run_kernel_tests("nothing_remains_in_the_kernel_after_follow_ends") {
        return;
    }
    let _g = LabGuard::up(&[faults::SEED_FAULT]);
    // Counted by what this follow holds and leaves, not by name alone: another cnitrace on the host
    // (another lab's agents, a `watch`) has programs of the same names.
    let programs = ProgramBaseline::now();
    // follow masks /sys/kernel/btf in a mount namespace of its own while aya's loader is made: the
    // host's mounts must not see it, at any moment.
    let mounts = || std::fs::read_to_string("/proc/1/mountinfo").expect("init's mounts");
    let host_mounts = mounts();
    for signal in [None, Some("INT"), Some("KILL")] {
        let mut child = Command::new(bin())
            .args(["follow", "10.244.0.20", "10.244.0.19", "--timeout", "10"])
            .env("CNITRACE_LAB_PREFIX", PREFIX)
            .stdout(Stdio::null())
            .spawn()
            .expect("start follow");
        // Wait until its programs are in the kernel (seconds under emulation: generous bounds, no timing claim).
        let t0 = Instant::now();
        let pid = child.id();
        while cnitrace_programs_of(&[pid]) == 0 && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(cnitrace_programs_of(&[pid]) > 0, "follow attached its programs");
        assert_eq!(mounts(), host_mounts, "follow changed the host's mounts");
        if let Some(sig) = signal {
            tools::KILL.command().args([&format!("-{sig}"), &child.id().to_string()]).status().expect("kill");
        }
        let st = child.wait().expect("follow ends");
        if signal == Some("INT") {
            assert!(matches!(st.code(), Some(0..=3)), "SIGINT ends follow with a verdict, not a crash: {st:?}");
        }
        assert_eq!(programs.settled(&[pid], Duration::from_secs(30)), Vec::<String>::new(), "programs left after follow ended by {signal:?}");
        assert_eq!(mounts(), host_mounts, "mounts left after follow ended by {signal:?}");
    }
}

#[test]
fn a_bulk_flow_is_counted_past_the_kept_timeline_and_a_later_drop_still_comes_through() {
    if !can_run_kernel_tests("a_bulk_flow_is_counted_past_the_kept_timeline_and_a_later_drop_still_comes_through") {
        return;
    }
    let g = LabGuard::up(&[]);
    let f = PassiveFollow::start("10.244.0.20", "10.244.0.19", 60);
    // 2,000 echoes and their replies: well past the 5,000 events follow keeps. Then the datagram's drop
    // must be seen although hop records are only counted by now.
    flood_then_a_closed_port(&g, 2000);
    let (code, v) = f.finish();
    let [m, e, l, k] = counters(&v);
    assert_eq!(m, e + l, "every written record accounted: {v}");
    assert!(k > 5_000, "the flood's hop records past the timeline were counted in the kernel: {v}");
    assert!(e < 20_000, "and not written: {v}");
    assert_the_datagrams_drop_ended_it(code, &v);
}

#[test]
fn a_healthy_bulk_tcp_flow_shows_no_drop() {
    if !can_run_kernel_tests("a_healthy_bulk_tcp_flow_shows_no_drop") {
        return;
    }
    let g = LabGuard::up(&[]);
    // TCP frees most of its data where no tracepoint fires, leaving their skbs' addresses in the tracking
    // map; unrelated skbs soon reuse them. Dropped (IPv6 multicast at ip6_mc_input, neighbour
    // solicitations vxlan_xmit has no target for), such an skb ended this trace as the pair's drop in
    // four runs of four within 0.8 s before the headers were allowed to win over the map (both ends on one
    // CPU, as in `cargo xtask bench`; unpinned, TCP's own drops of old segments came first).
    let web = g.lab.pod_ns("web");
    let server = tools::IPERF3.in_netns(&web).args(["-s", "-1", "-A", "0"]).stdout(std::process::Stdio::null()).spawn().expect("iperf3 -s");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let f = PassiveFollow::start("10.244.0.20", "10.244.1.10", 60);
    let debug = g.lab.pod_ns("debug");
    let flow = tools::IPERF3
        .in_netns(&debug)
        .args(["-c", "10.244.1.10", "-t", "6", "-A", "0,0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("iperf3 -c");
    // Stopped in the middle of the bulk transfer: its end is not part of the question (on 5.10, a
    // segment reaching web after iperf3 closed its socket was dropped by tcp_v4_rcv, rightly so).
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let (_, v) = f.interrupt();
    let flow = flow.wait_with_output().expect("iperf3 -c ends");
    assert!(flow.status.success(), "{}", String::from_utf8_lossy(&flow.stderr));
    let _ = server.wait_with_output();
    println!("verdict: {} {} {} after {} ms", v["verdict"], v["function"], v["reason"], v["elapsed_ms"]);
    // TCP discarding a segment it already had (TCP_OLD_DATA: a retransmission that arrived twice) is
    // not the pair's traffic dying either; it ended one run in three here before it counted as noise.
    assert_eq!(v["verdict"], "delivered", "a healthy bulk flow shows no drop: {v}");
}

/// `ping -f` of `echoes` from debug to jellyfin, then one datagram to a closed port on jellyfin (the
/// kernel drops it: no socket).
fn flood_then_a_closed_port(g: &LabGuard, echoes: u32) {
    let debug = g.lab.pod_ns("debug");
    let flood = tools::PING.in_netns(&debug).args(["-q", "-f", "-c", &echoes.to_string(), "10.244.0.19"]).output().expect("ping -f");
    assert!(flood.status.success(), "{}", String::from_utf8_lossy(&flood.stderr));
    let udp = tools::BASH.in_netns(&debug).args(["-c", "echo x > /dev/udp/10.244.0.19/9"]).output().expect("udp");
    assert!(udp.status.success());
}

/// matched, emitted, lost, counted only.
fn counters(v: &serde_json::Value) -> [u64; 4] {
    ["matched", "emitted", "lost", "counted_only"].map(|k| v["counters"][k].as_u64().unwrap_or_else(|| panic!("counters.{k}: {v}")))
}

fn assert_the_datagrams_drop_ended_it(code: Option<i32>, v: &serde_json::Value) {
    assert_eq!(code, Some(1), "{v}");
    let function = v["function"].as_str().unwrap_or("");
    assert!(function.contains("udp"), "the drop of the datagram is the verdict: {v}");
}

#[test]
fn a_burst_while_the_idle_reader_sleeps_is_drained_without_loss() {
    if !can_run_kernel_tests("a_burst_while_the_idle_reader_sleeps_is_drained_without_loss") {
        return;
    }
    let g = LabGuard::up(&[]);
    // Every record written (no budget): 8,000 echoes make over 100,000 records, more than twice what
    // the 4 MiB ring holds, in about 0.1 s on the host.
    let f = PassiveFollow::start_with("10.244.0.20", "10.244.0.19", 60, &["--all-events"]);
    // Nothing for a second: the reader now sleeps until the kernel wakes it (or 100 ms pass).
    std::thread::sleep(std::time::Duration::from_secs(1));
    flood_then_a_closed_port(&g, 8000);
    let (code, v) = f.finish();
    let [m, e, l, _] = counters(&v);
    assert_eq!(m, e + l, "every record accounted: {v}");
    assert!(e > 43_690, "more records than the ring holds: {v}");
    // The emptying that took the most records (what tells a starved reader from a too-fast flood when
    // records are lost): some of the flood at once, never more than the ring holds. A figure for the
    // log too (a run shows it with --show-output).
    let peak = v["ring_peak"]["records"].as_u64().unwrap_or(0);
    println!("burst: {m} matched, {e} emitted, {l} lost; the fullest ring: {}", v["ring_peak"]);
    assert!(peak > 0 && peak <= 43_690, "ring_peak: {v}");
    // The kernel wakes the sleeping reader every 4,096 records of a CPU, and the ring is emptied while
    // the first drop's function is looked up in /proc/kallsyms (~50 ms: half the flood was lost to it).
    // Known to fail in a one-CPU 7.2 guest (6 runs of 34 alone, 2026-12-07): the flood held the reader
    // off the CPU ~400 ms (ring_peak: 5 ms of 431 on the CPU) and the ring filled; the host and 5.10
    // guests do not.
    assert_eq!(l, 0, "no record lost: {v}");
    // Among the flood's 8,000 noise drops (echo replies at ping_rcv).
    assert_the_datagrams_drop_ended_it(code, &v);
}

/// A native nft drop rule without a counter statement, written by hand on a healthy lab (what firewalld
/// and most hand-written rule sets look like): follow names the rule — table, family, chain, hook,
/// priority, handle — found by evaluating the node's rule set against the dropped packet (issue 17: it
/// said NETFILTER_DROP at nft_do_chain, cause unknown, because rules were matched by counters moving).
#[test]
fn an_nft_drop_rule_without_a_counter_is_named() {
    if !can_run_kernel_tests("an_nft_drop_rule_without_a_counter_is_named") {
        return;
    }
    let g = LabGuard::up(&[]);
    let rules = "table inet handwritten {\n chain guard {\n  type filter hook forward priority filter + 5; policy accept;\n  ip daddr 10.244.1.0/24 drop\n }\n}\n";
    let node = g.lab.node_ns(0);
    let mut child = tools::NFT.in_netns(&node).args(["-f", "-"]).stdin(Stdio::piped()).spawn().expect("nft -f");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), rules.as_bytes()).expect("write the rules");
    drop(child.stdin.take());
    assert!(child.wait().expect("nft").success(), "the rule set loads");
    let (code, v) = follow("10.244.0.20", "10.244.1.10", &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["cause"], "netfilter-rule-drop", "{v}");
    let facts = v["facts"].as_array().expect("facts");
    let fact = facts.iter().filter_map(|f| f.as_str()).find(|f| f.contains("found by evaluating")).unwrap_or_else(|| panic!("how the rule was found: {v}"));
    for part in ["table inet handwritten", "chain guard", "hook forward priority filter + 5", "`ip daddr 10.244.1.0/24 drop`", "handle "] {
        assert!(fact.contains(part), "{part}: {fact}");
    }
}

/// `follow` started and stopped again and again while a bulk flow crosses the path it probes: attaching
/// and detaching the programs (and, where the kernel has them, the kprobes) under load leaves the kernel
/// running and the flow unharmed. `extra`: more arguments for each follow.
fn attach_and_detach_under_a_bulk_flow(extra: &[&str]) {
    // Enough to have crashed a guest whose CPUs the emulator ran on a thread each (see xtask's vm.rs),
    // few enough for a one-CPU guest, where a follow starts in ~25 s beside the flow.
    const CYCLES: u32 = 6;
    let g = LabGuard::up(&[]);
    let web = g.lab.pod_ns("web");
    let mut server = tools::IPERF3.in_netns(&web).args(["-s", "-A", "0"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    let debug = g.lab.pod_ns("debug");
    let mut flow = tools::IPERF3
        .in_netns(&debug)
        .args(["-c", "10.244.1.10", "-t", "600", "-A", "0,0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 -c");
    let t0 = Instant::now();
    let mut cycles = 0;
    while cycles < CYCLES && t0.elapsed() < Duration::from_secs(150) {
        let f = PassiveFollow::start_with("10.244.0.20", "10.244.1.10", 60, extra);
        std::thread::sleep(Duration::from_millis(200 + 150 * (cycles % 4) as u64));
        let (code, v) = f.interrupt();
        assert!(code.is_some(), "follow ended by a signal: {v}");
        cycles += 1;
    }
    let alive = flow.try_wait().expect("iperf3 -c").is_none();
    let _ = flow.kill();
    let _ = flow.wait();
    let _ = server.kill();
    let _ = server.wait();
    println!("{cycles} attach/detach cycles during the flow in {:.0?}", t0.elapsed());
    assert!(alive, "the flow ended during {cycles} attach/detach cycles");
    assert!(cycles >= 3, "only {cycles} cycles in {:.0?}", t0.elapsed());
}

#[test]
fn attaching_and_detaching_under_a_bulk_flow_leaves_the_kernel_running() {
    if !can_run_kernel_tests("attaching_and_detaching_under_a_bulk_flow_leaves_the_kernel_running") {
        return;
    }
    attach_and_detach_under_a_bulk_flow(&[]);
}

/// tshark's fields of every frame of `file` (tab-separated), flannel's VXLAN port decoded as VXLAN.
fn tshark(file: &std::path::Path, fields: &[&str], filter: &str) -> Vec<Vec<String>> {
    let mut args = vec!["-r".to_string(), file.display().to_string(), "-d".into(), "udp.port==8472,vxlan".into(), "-T".into(), "fields".into()];
    for f in fields {
        args.extend(["-e".to_string(), f.to_string()]);
    }
    if !filter.is_empty() {
        args.extend(["-Y".to_string(), filter.to_string()]);
    }
    let out = tools::TSHARK.command().args(&args).output().expect("run tshark");
    assert!(out.status.success(), "tshark {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.split('\t').map(str::to_string).collect()).collect()
}

#[test]
fn the_trace_is_written_as_pcapng_that_wireshark_reads_hop_by_hop() {
    if !can_run_kernel_tests("the_trace_is_written_as_pcapng_that_wireshark_reads_hop_by_hop") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cnitrace-pcapng-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let (dropped, healthy, short, rec) = (dir.join("drop.pcapng"), dir.join("healthy.pcapng"), dir.join("short.pcapng"), dir.join("drop.json"));
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();

    // A drop: the capture ends where the kernel dropped the packet, and says so in its comment.
    {
        let _g = LabGuard::up(&["iptables-drop"]);
        let (code, events, v) = cnitrace_tests::follow_events(&ip("debug"), &ip("web"), &["--write", dropped.to_str().unwrap(), "--record", rec.to_str().unwrap()]);
        assert_eq!((code, v["cause"].as_str()), (1, Some("netfilter-rule-drop")), "{v}");
        let with_bytes = events.iter().filter(|e| e["bytes"].is_string()).count();
        let frames = tshark(&dropped, &["frame.number", "frame.interface_name", "frame.comment", "ip.src", "ip.dst", "icmp.type", "frame.time_epoch", "frame.cap_len", "frame.len"], "");
        assert_eq!(frames.len(), with_bytes, "one frame per record with bytes: {frames:?}");
        assert!(frames.len() >= 4, "{frames:?}");
        let drops: Vec<_> = frames.iter().filter(|f| f[2].starts_with("DROPPED")).collect();
        assert!(!drops.is_empty(), "a frame says it was dropped: {frames:?}");
        for d in &drops {
            let (function, reason) = (v["function"].as_str().unwrap(), v["reason"].as_str().unwrap());
            assert!(d[2].contains(function) && d[2].contains(reason), "the drop's comment names {function} and {reason}: {d:?}");
            assert_eq!((d[1].as_str(), d[3].as_str(), d[4].as_str(), d[5].as_str()), ("storagenodet3500/cni0", "10.244.0.20", "10.244.1.10", "8"), "{d:?}");
        }
        // The first hop is the pod's own interface, outbound; times are the trace's, in wall-clock time.
        assert!(frames.iter().any(|f| f[1] == "debug/eth0" && f[2].contains("transmit")), "{frames:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
        for f in &frames {
            let t: f64 = f[6].parse().expect("epoch time");
            assert!(t >= started - 1.0 && t <= now + 1.0, "frame time {t} within the test ({started}..{now})");
            assert!(f[7].parse::<u32>().unwrap() <= 16 + 128, "the default snaplen: {f:?}");
        }
        // The full-size echo is longer on the wire than captured.
        assert!(frames.iter().any(|f| f[8].parse::<u32>().unwrap() > 1400 && f[7].parse::<u32>().unwrap() == 16 + 128), "{frames:?}");
        let info = tools::CAPINFOS.command().arg(&dropped).output().expect("capinfos");
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(info.contains("Capture comment:") && info.contains("netfilter-rule-drop"), "the verdict is the capture's comment:\n{info}");
        assert!(info.contains("Name = storagenodet3500/cni0") && info.contains("Name = debug/eth0"), "one interface per hop:\n{info}");
    }
    // The recording holds the bytes: replay writes the same packets, without root or kernel.
    let replayed = dir.join("replayed.pcapng");
    let out = std::process::Command::new(bin()).args(["replay", rec.to_str().unwrap(), "--write", replayed.to_str().unwrap()]).output().expect("replay");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let fields = ["frame.interface_name", "frame.comment", "frame.time_epoch", "frame.cap_len", "ip.id"];
    assert_eq!(tshark(&replayed, &fields, ""), tshark(&dropped, &fields, ""), "replay --write gives the same capture");

    // Across nodes: VXLAN between the nodes, the pair inside it.
    {
        let _g = LabGuard::up(&[]);
        let (code, _, v) = cnitrace_tests::follow_events(&ip("debug"), &ip("web"), &["--write", healthy.to_str().unwrap()]);
        assert_eq!(code, 0, "{v}");
        let vxlan = tshark(&healthy, &["frame.interface_name", "vxlan.vni", "ip.src", "ip.dst"], "vxlan && icmp");
        assert!(!vxlan.is_empty(), "the underlay hops decode as VXLAN");
        assert!(vxlan.iter().all(|f| f[1] == "1" && f[2].contains("10.244.") && f[3].contains("10.244.")), "inner packets of the pair: {vxlan:?}");
        let replies = tshark(&healthy, &["frame.interface_name"], "icmp.type == 0 && ip.src == 10.244.1.10");
        assert!(replies.iter().any(|f| f[0] == "debug/eth0"), "the echo reply back at the source: {replies:?}");
        // --snaplen: fewer bytes per packet.
        let (code, _, _) = cnitrace_tests::follow_events(&ip("debug"), &ip("web"), &["--write", short.to_str().unwrap(), "--snaplen", "40"]);
        assert_eq!(code, 0);
        let short_frames = tshark(&short, &["frame.cap_len"], "");
        assert!(!short_frames.is_empty() && short_frames.iter().all(|f| f[0].parse::<u32>().unwrap() <= 16 + 40), "{short_frames:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
