//! `cnitrace watch`: every drop on the host without a pair, grouped by pod, reason and function, as JSON
//! and as Prometheus metrics scraped the way a Prometheus server does; nothing left attached after.

use std::{
    io::{Read, Write},
    process::Stdio,
    time::{Duration, Instant},
};

use cnitrace_tests::{bin, can_run_kernel_tests, pod_ip, ProgramBaseline, wait_for_ready_file, LabGuard, Scratch};
use serde_json::Value;

#[test]
fn watch_groups_the_nodes_drops_by_pod_and_serves_them_to_prometheus() {
    if !can_run_kernel_tests("watch_groups_the_nodes_drops_by_pod_and_serves_them_to_prometheus") {
        return;
    }
    let g = LabGuard::up(&["iptables-drop"]);
    // The metrics listen inside a lab namespace (its loopback): nothing of the host's is used.
    let ext = g.lab.external_ns();
    // What this watch leaves, told from another tool's programs of the same names.
    let programs = ProgramBaseline::now();
    let scratch = Scratch::new("watch");
    let ready = scratch.join("ready");
    // Until stopped: the test ends it (SIGTERM, as a DaemonSet's pod is stopped) once the scrape shows
    // every echo; a fixed duration raced the start-up (an emulated 7.2 took longer than the sleep that
    // stood for it, and the echoes went before the counter was attached).
    let child = cnitrace_tools::Tool::netns_exec(&ext, &bin())
        .args(["watch", "--json", "--interval", "0.5", "--prometheus", "127.0.0.1:9465", "--ready-file"])
        .arg(&ready)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cnitrace watch");
    let watch_pid = child.id();
    assert!(wait_for_ready_file(&ready), "watch's counter was not attached within 60 s");
    // Five echoes from debug to web: the FORWARD rule on storagenodet3500 drops each.
    let debug = g.lab.pod_ns("debug");
    let _ = cnitrace_tools::PING.in_netns(&debug).args(["-c", "5", "-i", "0.2", "-W", "1", &pod_ip("web")]).stdout(Stdio::null()).status();
    let scrape = || {
        cnitrace::netns::in_netns(&cnitrace::netns::named(&ext), || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", 9465))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/openmetrics-text\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })
        .expect("scrape /metrics")
    };
    // Where the kernel frees a packet nftables dropped: nft_do_chain here, nf_hook_slow on a kernel
    // without drop reasons (5.10: the hook's caller frees it).
    const NETFILTER: [&str; 2] = ["nft_do_chain", "nf_hook_slow"];
    let netfilter = |f: &str| NETFILTER.contains(&f);
    let webs = |metrics: &str| -> Vec<String> {
        metrics
            .lines()
            .filter(|l| l.starts_with("cnitrace_drops_total{") && l.contains("pod=\"web\"") && NETFILTER.iter().any(|f| l.contains(&format!("function=\"{f}\""))))
            .map(str::to_string)
            .collect()
    };
    let count = |line: &str| -> f64 { line.rsplit(' ').next().unwrap().parse().unwrap() };
    // Scraped as Prometheus does, every half second, until the five echoes are counted (a reading every
    // interval; naming a new drop's function reads /proc/kallsyms, seconds under emulation).
    let t = Instant::now();
    let mut metrics = scrape();
    while !webs(&metrics).first().is_some_and(|l| count(l) >= 5.0) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        metrics = scrape();
    }
    let st = cnitrace_tools::KILL.command().args(["-TERM", &child.id().to_string()]).status().expect("kill -TERM");
    assert!(st.success());
    let out = child.wait_with_output().expect("watch ends on SIGTERM");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(metrics.starts_with("HTTP/1.1 200 OK") && metrics.contains("# TYPE cnitrace_drops counter"), "{metrics}");
    let web = webs(&metrics);
    assert_eq!(web.len(), 1, "one series for web's dropped echoes: {metrics}");
    assert!(count(&web[0]) >= 5.0, "every echo counted: {}", web[0]);

    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON lines")).collect();
    let last = lines.iter().rfind(|v| v["pod"] == "web" && v["function"].as_str().is_some_and(netfilter)).unwrap_or_else(|| panic!("web's drops: {lines:#?}"));
    assert!(last["total"].as_u64().unwrap() >= 5, "{last}");
    assert_eq!(last["netns"], "storagenodet3500", "dropped on the node, for web: {last}");
    assert!(last["what"].as_str().unwrap().contains(&format!("→ {}", pod_ip("web"))), "{last}");
    if cnitrace_tests::kernel_version() >= (5, 17) {
        assert_eq!(last["reason"], "NETFILTER_DROP", "{last}");
    }
    assert!(lines.iter().all(|v| v.get("noise").is_none()), "the noise classes are folded away without --all");
    assert_eq!(programs.settled(&[watch_pid], Duration::from_secs(10)), Vec::<String>::new(), "nothing stays attached after watch ends");
}
