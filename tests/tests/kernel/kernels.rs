//! What differs between kernels: the optional kprobes (used where the kernel takes them, skipped with a
//! reason where it does not) and the evidence an older kernel cannot give. These are the tests the VM
//! matrix exists for; on a kernel without kprobes the kprobe tests skip with the reason cnitrace gave.

use cnitrace_tests::{can_run_kernel_tests, faults, follow, follow_events, hook, kernel_version, LabGuard};

fn ip(pod: &str) -> String {
    cnitrace_tests::pod_ip(pod)
}

/// Events of one kprobe'd function that refused the packet.
fn refusals<'a>(events: &'a [serde_json::Value], function: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["func"]["function"] == function && e["func"]["ret"].as_i64().is_some_and(|r| r < 0)).collect()
}

/// Some(reason) when cnitrace said the kprobe on `function` is unavailable here.
fn kprobe_skipped(v: &serde_json::Value, function: &str) -> Option<String> {
    if let Some(all) = hook(v, "kprobe/*") {
        return Some(all["reason"].as_str().expect("a skipped hook has a reason").to_string());
    }
    let h = hook(v, &format!("kprobe+kretprobe/{function}")).or_else(|| hook(v, &format!("kprobe/{function}")))?;
    (h["attached"] != true).then(|| h["reason"].as_str().expect("a skipped hook has a reason").to_string())
}

#[test]
fn every_hook_is_attached_or_says_why_not() {
    if !can_run_kernel_tests("every_hook_is_attached_or_says_why_not") {
        return;
    }
    let f = faults::find("veth-detached").expect("fault");
    let _g = LabGuard::up(&[f.name]);
    // Each trace waits for the source to give up on ARP (--until-drop), and the second starts once the
    // first one's last queued packet is freed too: otherwise whether an earlier trace's queued echo is
    // freed inside the later one's window (and so where the verdict puts the drop) depends on timing,
    // not on the hooks.
    let (_, v) = follow(&ip(f.pair.0), &ip(f.pair.1), &["--count", "1", "--until-drop"]);
    cnitrace_tests::await_no_pending_arp(f.pair.0);
    let hooks = v["hooks"].as_array().expect("hooks in the verdict");
    let attached = |v: &serde_json::Value, h: &str| hook(v, h).is_some_and(|h| h["attached"] == true);
    // The busiest hooks as BTF tracepoints (every kernel here has BTF, 5.10 on), the rest raw.
    for busy in ["tp_btf/net_dev_start_xmit", "tp_btf/netif_receive_skb", "tp_btf/fib_table_lookup"] {
        assert!(attached(&v, busy), "{busy}: {v}");
    }
    assert!(attached(&v, "raw_tp/kfree_skb"), "{v}");
    // Asked for raw tracepoints only, the same hooks attach raw and the verdict is the same.
    let (_, raw) = follow(&ip(f.pair.0), &ip(f.pair.1), &["--count", "1", "--until-drop", "--raw-tracepoints"]);
    for essential in ["raw_tp/net_dev_start_xmit", "raw_tp/netif_receive_skb", "raw_tp/kfree_skb"] {
        assert!(attached(&raw, essential), "{essential}: {raw}");
    }
    assert!(hook(&raw, "tp_btf/net_dev_start_xmit").is_none(), "{raw}");
    for key in ["verdict", "cause", "netns", "ifname", "function"] {
        assert_eq!(raw[key], v[key], "{key}: raw tracepoints {raw}\nBTF tracepoints {v}");
    }
    for h in hooks {
        if h["attached"] != true {
            let why = h["reason"].as_str().unwrap_or("");
            assert!(!why.is_empty() && !why.contains('\n'), "a hook that did not attach says why in one line: {h}");
        }
    }
    // Turned off, no kprobe is tried.
    let (_, v) = follow(&ip(f.pair.0), &ip(f.pair.1), &["--count", "1", "--no-kprobes"]);
    assert!(kprobe_skipped(&v, "nf_hook_slow").is_some_and(|r| r.contains("--no-kprobes")), "{v}");
}

/// `cnitrace hooks` (no lab, no pair) says the same as a trace does: which hooks load here and why the
/// others do not.
#[test]
fn hooks_lists_what_follow_would_load() {
    if !can_run_kernel_tests("hooks_lists_what_follow_would_load") {
        return;
    }
    let run = |args: &[&str]| {
        let out = cnitrace_tests::cnitrace(&[&["hooks", "--json"], args].concat());
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("one JSON object")
    };
    let v = run(&[]);
    let attached = |v: &serde_json::Value, h: &str| hook(v, h).is_some_and(|h| h["attached"] == true);
    for busy in ["tp_btf/net_dev_start_xmit", "tp_btf/netif_receive_skb", "tp_btf/fib_table_lookup", "raw_tp/kfree_skb"] {
        assert!(attached(&v, busy), "{busy}: {v}");
    }
    for h in v["hooks"].as_array().expect("hooks") {
        if h["attached"] != true {
            let why = h["reason"].as_str().unwrap_or("");
            assert!(!why.is_empty() && !why.contains('\n'), "a refused hook says why in one line: {h}");
        }
    }
    // The kernel's drop reasons: 5.17 and later pass them to kfree_skb.
    let (major, minor) = kernel_version();
    assert_eq!(v["drop_reasons"], (major, minor) >= (5, 17), "{v}");
    // Where kprobes exist each one is listed on its own, else one line says why none is tried.
    let kprobes_here = std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
    assert_eq!(hook(&v, "kprobe/*").is_none(), kprobes_here, "{v}");
    let raw = run(&["--raw-tracepoints", "--no-kprobes"]);
    assert!(attached(&raw, "raw_tp/net_dev_start_xmit") && hook(&raw, "tp_btf/net_dev_start_xmit").is_none(), "{raw}");
    assert!(kprobe_skipped(&raw, "nf_hook_slow").is_some_and(|r| r.contains("--no-kprobes")), "{raw}");
}

#[test]
fn kprobes_name_the_netfilter_hook_that_dropped() {
    if !can_run_kernel_tests("kprobes_name_the_netfilter_hook_that_dropped") {
        return;
    }
    let f = faults::find("forward-policy-drop").expect("fault");
    let _g = LabGuard::up(&[f.name]);
    let (_, events, v) = follow_events(&ip(f.pair.0), &ip(f.pair.1), &["--count", "1"]);
    assert_eq!(v["cause"], f.cause, "{v}");
    if let Some(why) = kprobe_skipped(&v, "nf_hook_slow") {
        println!("SKIPPED kprobes_name_the_netfilter_hook_that_dropped: {why}");
        return;
    }
    // The drop's skb: its last nf_hook_slow entry is the hook that dropped it.
    let drop = events.iter().find(|e| e["kind"] == "drop" && e["where_"] == "storagenodet3500").unwrap_or_else(|| panic!("a drop on the node: {v}"));
    let hooks: Vec<&serde_json::Value> = events.iter().filter(|e| e["skb"] == drop["skb"] && e["func"]["function"] == "nf_hook_slow").collect();
    assert_eq!(hooks.last().map(|e| &e["func"]["detail"]), Some(&serde_json::json!("FORWARD (ipv4)")), "{hooks:?}");
    let facts = v["facts"].as_array().expect("facts");
    assert!(facts.iter().any(|x| x.as_str().is_some_and(|s| s.starts_with("kprobe: the packet was in netfilter hook FORWARD (ipv4) on storagenodet3500"))), "{v}");
}

#[test]
fn kprobes_give_the_reverse_path_checks_own_answer() {
    if !can_run_kernel_tests("kprobes_give_the_reverse_path_checks_own_answer") {
        return;
    }
    let f = faults::find("rp-filter-strict").expect("fault");
    let _g = LabGuard::up(&[f.name]);
    let (_, events, v) = follow_events(&ip(f.pair.0), &ip(f.pair.1), &["--count", "1"]);
    assert_eq!(v["cause"], f.cause, "{v}");
    if let Some(why) = kprobe_skipped(&v, "fib_validate_source") {
        println!("SKIPPED kprobes_give_the_reverse_path_checks_own_answer: {why}");
        return;
    }
    let refused = refusals(&events, "fib_validate_source");
    assert!(!refused.is_empty(), "fib_validate_source's return shows the refusal: {v}");
    assert_eq!(refused[0]["where_"], "storagenodet3501", "{}", refused[0]);
    // The packets crossed the bridge and were forwarded by IP and encapsulated on the way.
    for seen in ["br_forward", "ip_forward", "vxlan_xmit"] {
        assert!(events.iter().any(|e| e["func"]["function"] == seen), "{seen} on the path: {v}");
    }
}

#[test]
fn without_drop_reasons_the_verdict_says_what_it_rests_on() {
    if !can_run_kernel_tests("without_drop_reasons_the_verdict_says_what_it_rests_on") {
        return;
    }
    let f = faults::find("forward-policy-drop").expect("fault");
    let _g = LabGuard::up(&[f.name]);
    let (_, v) = follow(&ip(f.pair.0), &ip(f.pair.1), &["--count", "1"]);
    assert_eq!(v["cause"], f.cause, "{v}");
    // nf_hook_slow frees what a hook dropped; newer kernels name nft_do_chain, the rule evaluation.
    assert!(v["function"] == "nf_hook_slow" || v["function"].as_str().is_some_and(|f| f.starts_with("nft_")), "the location names the function on every kernel: {v}");
    let missing: Vec<&str> = v["missing"].as_array().map(|a| a.iter().filter_map(|m| m.as_str()).collect()).unwrap_or_default();
    let says_no_reason = missing.iter().any(|m| m.starts_with("drop reason:"));
    // kfree_skb has carried a reason since 5.17.
    if kernel_version() < (5, 17) {
        assert!(says_no_reason, "a kernel without drop reasons says so: {v}");
        assert!(v["reason"].as_str().is_some_and(|r| r.starts_with("unknown")), "{v}");
    } else {
        assert!(!says_no_reason, "this kernel has drop reasons: {v}");
        assert_eq!(v["reason"], "NETFILTER_DROP", "{v}");
    }
}
