//! Helpers for the kernel tests: a lab that tears itself down (also when a test panics), the cnitrace
//! binary, and skipping with a printed reason where a test cannot run.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::{Mutex, MutexGuard},
};

pub use cnitrace::lab::{check, faults, topology, Lab};

pub mod apiserver;
pub mod gen;

/// This suite's own lab prefix: never the user's `cnitrace` lab.
pub const PREFIX: &str = "cnitrace-test";

/// The kernel is shared: one lab at a time, even if the harness runs tests in parallel.
static KERNEL: Mutex<()> = Mutex::new(());

/// The cnitrace binary under test: `CNITRACE_BIN` (set by `cargo xtask test`, or in a VM), else the
/// release build next to this workspace.
pub fn bin() -> PathBuf {
    std::env::var_os("CNITRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/cnitrace"))
}

/// Runs `cnitrace follow SRC DST --json ...`: the exit code and the verdict object (the last line).
pub fn follow(src: &str, dst: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let (code, _, verdict) = follow_events(src, dst, extra);
    (code, verdict)
}

/// Like [`follow`], with every event object before the verdict.
pub fn follow_events(src: &str, dst: &str, extra: &[&str]) -> (i32, Vec<serde_json::Value>, serde_json::Value) {
    let mut args = vec!["follow", src, dst, "--json"];
    args.extend_from_slice(extra);
    let out = cnitrace(&args);
    let mut lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let verdict = lines.pop().unwrap_or_else(|| panic!("follow printed nothing; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(verdict["type"], "verdict", "the last line is the verdict: {verdict}");
    (out.status.code().unwrap_or(-1), lines, verdict)
}

/// `follow --probe none` running in the background, its probes attached (start-up takes seconds under
/// emulation): the test makes the traffic, then `finish` waits for the verdict.
pub struct PassiveFollow(std::process::Child);

/// Waits up to 60 s for a `--ready-file` (follow's, watch's) to appear; true if it did. Start-up is
/// tens of ms here, seconds under emulation.
pub fn wait_for_ready_file(path: &std::path::Path) -> bool {
    let t0 = std::time::Instant::now();
    while !path.exists() && t0.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    path.exists()
}

impl PassiveFollow {
    pub fn start(src: &str, dst: &str, timeout_s: u32) -> PassiveFollow {
        Self::start_with(src, dst, timeout_s, &[])
    }

    /// `start` with more arguments for follow.
    pub fn start_with(src: &str, dst: &str, timeout_s: u32, extra: &[&str]) -> PassiveFollow {
        let ready = state_dir().with_extension("passive-ready");
        let _ = std::fs::remove_file(&ready);
        let child = std::process::Command::new(bin())
            .args(["follow", src, dst, "--probe", "none", "--timeout", &timeout_s.to_string(), "--json", "--ready-file"])
            .arg(&ready)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start follow");
        wait_for_ready_file(&ready);
        // Read once: nothing of the test stays in TMPDIR.
        let _ = std::fs::remove_file(&ready);
        PassiveFollow(child)
    }

    /// Stops the follow as Ctrl-C would (it ends with the verdict of what it saw), then `finish`.
    pub fn interrupt(self) -> (Option<i32>, serde_json::Value) {
        let st = cnitrace_tools::KILL.command().args(["-INT", &self.0.id().to_string()]).status().expect("kill -INT");
        assert!(st.success(), "the follow this test started is still there to stop");
        self.finish()
    }

    /// Exit code and verdict object.
    pub fn finish(self) -> (Option<i32>, serde_json::Value) {
        let out = self.0.wait_with_output().expect("follow ends");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v = serde_json::from_str(stdout.lines().last().expect("verdict")).expect("json");
        (out.status.code(), v)
    }
}

/// The running kernel's (major, minor).
pub fn kernel_version() -> (u32, u32) {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut it = r.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Checks a verdict's drop reason against the one expected on the newest kernels, as far as this
/// kernel can say it: the same name where its `enum skb_drop_reason` has it; "unknown…" where kfree_skb
/// has no reason (before 5.17; the verdict must then list the missing reason); and where the kernel has
/// reasons but not this one (it was added later), whatever reason the kernel gave, which must not be empty.
pub fn assert_reason(v: &serde_json::Value, expected: &str, what: &str) {
    static REASONS: std::sync::OnceLock<std::collections::BTreeMap<u32, String>> = std::sync::OnceLock::new();
    let reasons = REASONS.get_or_init(|| cnitrace::probe::btf::KernelBtf::load().map(|b| b.drop_reasons()).unwrap_or_default());
    let got = v["reason"].as_str().unwrap_or("");
    if kernel_version() < (5, 17) {
        assert!(got.starts_with("unknown"), "{what}: no drop reasons on this kernel, got {got:?}: {v}");
        let missing = v["missing"].to_string();
        assert!(missing.contains("drop reason"), "{what}: the verdict says the reason is missing: {v}");
    } else if reasons.values().any(|r| r == expected) {
        assert_eq!(got, expected, "{what}: {v}");
    } else {
        assert!(!got.is_empty() && !got.starts_with("unknown"), "{what}: this kernel has reasons, though not {expected}: {v}");
        println!("note {what}: this kernel has no {expected}; it said {got}");
    }
}

/// The hook statuses a follow reported, by name.
pub fn hook<'a>(verdict: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    verdict["hooks"].as_array()?.iter().find(|h| h["hook"] == name)
}

/// cnitrace's eBPF program names, as the kernel truncates them.
const OUR_PROGRAMS: &[&str] = &[
    "net_dev_start_x", "netif_receive_s", "kfree_skb_reaso", "kfree_skb_legac", "consume_skb", "fib_table_looku", "neigh_update", "neigh_timer_han",
    "tp_net_dev_star", "tp_netif_receiv", "tp_fib_table_lo",
    "kp_nf_hook_slow", "kp_fib_validate", "kr_fib_validate", "kp_br_forward", "kp_ip_forward", "kp_vxlan_xmit", "kp_vxlan_rcv",
    "watch_drop_reas", "watch_drop_lega",
];

/// The ids of the programs each process holds, through its program and link fds (`prog_id:` in their
/// fdinfo), for every process of the host.
fn program_holders() -> std::collections::BTreeMap<u32, Vec<u32>> {
    let mut held: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    let Ok(procs) = std::fs::read_dir("/proc") else { return held };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else { continue };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else { continue };
            for id in info.lines().filter_map(|l| l.strip_prefix("prog_id:")).filter_map(|v| v.trim().parse().ok()) {
                held.entry(id).or_default().push(pid);
            }
        }
    }
    held
}

/// cnitrace's programs (by name) loaded now: (id, name).
fn cnitrace_programs_now() -> Vec<(u32, String)> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter_map(|p| p.name_as_str().filter(|n| OUR_PROGRAMS.contains(n)).map(|n| (p.id(), n.to_string())))
        .collect()
}

/// cnitrace's programs held by these processes (the test's own agents, its follow): another cnitrace
/// on the same host (another lab's agents, a developer's `watch`) holds its programs in processes of
/// its own and is not counted.
pub fn cnitrace_programs_of(pids: &[u32]) -> usize {
    let held = program_holders();
    cnitrace_programs_now().iter().filter(|(id, _)| held.get(id).is_some_and(|h| h.iter().any(|p| pids.contains(p)))).count()
}

/// What a test must not leave loaded: cnitrace's programs loaded since `ProgramBaseline::now()` that no
/// process holds (pinned, or left attached) or that the given processes of the test's still hold.
/// Another tool's — held by its own processes, or loaded before the test began — are not the test's.
pub struct ProgramBaseline(u32);

impl ProgramBaseline {
    pub fn now() -> ProgramBaseline {
        ProgramBaseline(aya::programs::loaded_programs().filter_map(|p| p.ok()).map(|p| p.id()).max().unwrap_or(0))
    }

    /// The programs left: `"id name (held by pids)"` each.
    pub fn left(&self, ours: &[u32]) -> Vec<String> {
        let held = program_holders();
        cnitrace_programs_now()
            .into_iter()
            .filter(|(id, _)| *id > self.0)
            .filter(|(id, _)| held.get(id).is_none_or(|h| h.iter().any(|p| ours.contains(p))))
            .map(|(id, name)| format!("{id} {name} (held by {:?})", held.get(&id).cloned().unwrap_or_default()))
            .collect()
    }

    /// Waits (at most `within`) until nothing is left; what is left then.
    pub fn settled(&self, ours: &[u32], within: std::time::Duration) -> Vec<String> {
        let t = std::time::Instant::now();
        loop {
            let left = self.left(ours);
            if left.is_empty() || t.elapsed() >= within {
                return left;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// A lab pod's address.
pub fn pod_ip(pod: &str) -> String {
    topology::pod(pod).expect("lab pod").ip.to_string()
}

/// Waits (at most 6 s) until the lab pod `pod` holds no packet for an unresolved address: no neighbour
/// entry of its namespace is INCOMPLETE. A trace that ends on an unanswered ARP leaves its prober's
/// last packet queued, and the kernel frees it (neigh_invalidate) up to 3 s later — inside the next
/// trace's window, where it would be that trace's drop. Two traces to compare start from the same state
/// after this.
pub fn await_no_pending_arp(pod: &str) {
    await_no_pending_arp_in(&topology::Names::new(PREFIX).pod(pod))
}

/// [`await_no_pending_arp`] for any namespace, by name.
pub fn await_no_pending_arp_in(ns: &str) {
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(6) {
        let out = cnitrace::sys::output_in(ns, &cnitrace_tools::IP, &["-4", "neigh", "show", "nud", "incomplete"]);
        if out.is_ok_and(|o| o.stdout.iter().all(u8::is_ascii_whitespace)) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A real terminal for a test: a tmux server on a socket of the test's own, one session running `cmd` in a
/// 220×60 pane; the server is killed when dropped (no one else's tmux is touched).
pub struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    pub fn start(what: &str, cmd: &str) -> Tmux {
        let t = Tmux { socket: format!("cnitrace-test-{what}-{}", std::process::id()), session: what.to_string() };
        let out = t.run(&["new-session", "-d", "-s", what, "-x", "220", "-y", "60", cmd]);
        assert!(out.status.success(), "tmux: {}", String::from_utf8_lossy(&out.stderr));
        t
    }

    pub fn run(&self, args: &[&str]) -> Output {
        cnitrace_tools::TMUX.command().args(["-L", &self.socket]).args(args).output().expect("run tmux")
    }

    /// The pane's text (with `escapes`, its colours as escape sequences), scrollback included.
    pub fn screen(&self, escapes: bool) -> String {
        let mut a = vec!["capture-pane", "-p", "-t", &self.session, "-S", "-200"];
        if escapes {
            a.push("-e");
        }
        String::from_utf8_lossy(&self.run(&a).stdout).into_owned()
    }

    pub fn keys(&self, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", &self.session];
        a.extend_from_slice(keys);
        self.run(&a);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// A test's scratch folder under TMPDIR (`cnitrace-<what>-<pid>`), removed when dropped, also on panic.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("cnitrace-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        Scratch(p)
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where this suite's fix journals go (never the host's /var/lib/cnitrace).
pub fn state_dir() -> PathBuf {
    std::env::temp_dir().join("cnitrace-test-state")
}

pub fn cnitrace(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("CNITRACE_LAB_PREFIX", PREFIX)
        .env("CNITRACE_STATE_DIR", state_dir())
        .output()
        .expect("run the cnitrace binary (build it first: cargo xtask test does)")
}

/// `cnitrace fix ARGS…` on this suite's lab: its exit code and what it printed (stdout, then stderr).
pub fn fix(args: &[&str]) -> (i32, String) {
    let mut full = vec!["fix"];
    full.extend_from_slice(args);
    let out = cnitrace(&full);
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Returns false (after printing why) when kernel tests cannot run here.
pub fn can_run_kernel_tests(test: &str) -> bool {
    if !cnitrace::sys::is_root() {
        println!("SKIPPED {test}: needs root (network namespaces, eBPF)");
        return false;
    }
    if !bin().exists() {
        println!("SKIPPED {test}: no cnitrace binary at {} (run `cargo xtask test`)", bin().display());
        return false;
    }
    true
}

/// A lab that is up for one test and goes down when dropped, also on panic.
pub struct LabGuard {
    pub lab: Lab,
    _kernel: MutexGuard<'static, ()>,
}

impl LabGuard {
    pub fn up(faults: &[&str]) -> LabGuard {
        Self::up_with(faults, &[])
    }

    /// With more `lab up` options (`--proxy-mode nftables`).
    pub fn up_with(faults: &[&str], options: &[&str]) -> LabGuard {
        let kernel = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
        // A previous run that was killed may have left its lab: start clean.
        let _ = cnitrace(&["lab", "down"]);
        let _ = std::fs::remove_dir_all(state_dir());
        let mut args = vec!["lab", "up"];
        args.extend_from_slice(options);
        for f in faults {
            args.extend_from_slice(&["--fault", f]);
        }
        let out = cnitrace(&args);
        assert!(out.status.success(), "lab up {faults:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        let lab = Lab::load(PREFIX).expect("the lab state after lab up");
        LabGuard { lab, _kernel: kernel }
    }
}

impl LabGuard {
    /// The process ids of the lab's agents (`lab up --agents`).
    pub fn agent_pids(&self) -> Vec<u32> {
        self.lab.state.servers.iter().filter(|s| s.name.starts_with("agent-")).map(|s| s.pid).collect()
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let out = cnitrace(&["lab", "down"]);
        if !out.status.success() && !std::thread::panicking() {
            panic!("lab down failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// A real cluster (`lab up --kubernetes`: the API server, controller manager, scheduler, flanneld,
/// kube-proxy and CNI plugins built from source) up for one test, down when dropped, also on panic.
pub struct ClusterGuard {
    /// The lab's state folder: its kubeconfigs (`admin`, `cnitrace`), logs and node folders.
    pub state: PathBuf,
    _kernel: MutexGuard<'static, ()>,
}

impl ClusterGuard {
    /// None (after printing why) where the cluster's programs are not built (`cargo xtask setup`
    /// builds them where Go is).
    pub fn up(test: &str, options: &[&str]) -> Option<ClusterGuard> {
        let missing = cnitrace_tools::cluster_missing();
        if !missing.is_empty() {
            println!("SKIPPED {test}: the real cluster's programs are not built ({}; `cargo xtask setup` builds them)", missing.join(", "));
            return None;
        }
        let kernel = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
        let _ = cnitrace(&["lab", "down"]);
        let _ = std::fs::remove_dir_all(state_dir());
        let mut args = vec!["lab", "up", "--kubernetes"];
        args.extend_from_slice(options);
        let out = cnitrace(&args);
        assert!(out.status.success(), "lab up --kubernetes {options:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let state = Lab::load(PREFIX).expect("the lab state after lab up").names.state_dir();
        Some(ClusterGuard { state, _kernel: kernel })
    }

    pub fn kubeconfig(&self, who: &str) -> PathBuf {
        self.state.join(format!("{who}.kubeconfig"))
    }

    /// The real kubectl as the cluster's admin: its exit code and stdout (stderr appended on failure).
    pub fn kubectl(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(cnitrace_tools::KUBECTL.program).arg("--kubeconfig").arg(self.kubeconfig("admin")).args(args).output().expect("run kubectl");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            text.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        (out.status.code().unwrap_or(-1), text)
    }

    /// `kubectl get … -o json`, parsed.
    pub fn get(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["get"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["-o", "json"]);
        let (code, out) = self.kubectl(&full);
        assert_eq!(code, 0, "kubectl {full:?}: {out}");
        serde_json::from_str(&out).expect("kubectl's JSON")
    }

    /// cnitrace ARGS with the kubeconfig of the lab's cnitrace user: exit code, stdout then stderr.
    pub fn cnitrace(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(bin())
            .args(args)
            .env("CNITRACE_LAB_PREFIX", PREFIX)
            .env("CNITRACE_STATE_DIR", state_dir())
            .env("KUBECONFIG", self.kubeconfig("cnitrace"))
            .output()
            .expect("run cnitrace");
        (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    /// The network namespace of node `node` (its Kubernetes name).
    pub fn node_ns(&self, node: &str) -> String {
        format!("{PREFIX}-{node}")
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let out = cnitrace(&["lab", "down"]);
        if !out.status.success() && !std::thread::panicking() {
            panic!("lab down failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Namespaces a test builds by hand with `ip` (layouts the lab does not build: other names, other
/// subnets, interface orders), deleted when dropped, also on panic. Holds the kernel like a lab does.
pub struct HandLayout {
    prefix: String,
    names: Vec<String>,
    _kernel: MutexGuard<'static, ()>,
}

impl HandLayout {
    /// Namespaces `<prefix>-<name>` for each name (leftovers of an earlier killed run removed first).
    pub fn new(prefix: &str, names: &[&str]) -> HandLayout {
        let kernel = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
        let l = HandLayout { prefix: prefix.to_string(), names: names.iter().map(|n| format!("{prefix}-{n}")).collect(), _kernel: kernel };
        for n in &l.names {
            let _ = cnitrace::sys::run(&cnitrace_tools::IP, &["netns", "del", n]);
            cnitrace::sys::run(&cnitrace_tools::IP, &["netns", "add", n]).unwrap_or_else(|e| panic!("{e:#}"));
        }
        l
    }

    /// The full namespace name of `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// `ip -n <ns> ARGS…`, one command a line of `script` (words split on spaces), panicking on failure.
    pub fn ip(&self, name: &str, script: &str) {
        let ns = self.ns(name);
        for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut args = vec!["-n", ns.as_str()];
            args.extend(line.split_whitespace());
            cnitrace::sys::run(&cnitrace_tools::IP, &args).unwrap_or_else(|e| panic!("{e:#}"));
        }
    }
}

impl Drop for HandLayout {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = cnitrace::sys::run(&cnitrace_tools::IP, &["netns", "del", n]);
        }
    }
}

/// What the lab under `PREFIX` left behind: namespaces, its state folder, and which of `server_pids`
/// still run as lab servers (its containers, its DNS).
pub fn leftovers(server_pids: &[u32]) -> Vec<String> {
    let mut left: Vec<String> = cnitrace::lab::existing_namespaces(PREFIX);
    let state = PathBuf::from(cnitrace::lab::STATE_ROOT).join(PREFIX);
    if state.exists() {
        left.push(state.display().to_string());
    }
    for pid in server_pids {
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("lab serve") || cmd.contains("dnsmasq") {
                left.push(format!("process {pid}: {cmd}"));
            }
        }
    }
    left
}


/// The configuration of one lab namespace, as text: links, addresses, routes, permanent neighbours,
/// FDB, bridge ports, every rule set and the sysctls fixes touch. What traffic changes by itself
/// (learned neighbours and FDB entries, counters) is left out.
pub fn ns_config(ns: &str) -> String {
    // Few processes: a process start costs ~0.1 s in the matrix's VMs, and the fix tests take this
    // snapshot of every lab namespace twice per fault.
    let text = |out: Result<Output, _>| out.map(|o: Output| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let batch = |prog: &cnitrace_tools::Tool, opts: &[&str], script: &str| {
        let mut args = vec!["-n", ns];
        args.extend_from_slice(opts);
        args.extend(["-batch", "-"]);
        cnitrace::sys::run_stdin(prog, &args, script).unwrap_or_else(|e| panic!("{e:#}"))
    };
    // Permanent neighbours and FDB entries come out in the kernel's hash-table order, which a repair that
    // re-adds one entry may change for entries it never touched (seen on 5.10: a node's two VTEP
    // neighbours swapped places after a rollback elsewhere): as sets, in order.
    // A dump the kernel resumes across reads can list an entry twice or skip it when its table changes
    // meanwhile (other namespaces' neighbours share one table): read until two reads agree, as
    // cnitrace's own state reading does (seen on 5.10: a snapshot one line longer than the other, the
    // same lines).
    let agreed = |prog: &cnitrace_tools::Tool, opts: &[&str], script: &str| {
        let mut last = batch(prog, opts, script);
        for _ in 0..3 {
            let again = batch(prog, opts, script);
            if again == last {
                break;
            }
            last = again;
        }
        last
    };
    let mut s = in_order_where(&agreed(&cnitrace_tools::IP, &["-4", "-d"], "link show\naddr show\nroute show table all\nneigh show nud permanent\n"), permanent_neighbour);
    // `-d`: a port's flags (hairpin, learning, flood…) on an indented line of their own, joined to it.
    let bridge = agreed(&cnitrace_tools::BRIDGE, &["-d"], "link show\nfdb show\n");
    let bridge = bridge.lines().fold(String::new(), |mut acc, l| {
        if l.starts_with(char::is_whitespace) {
            acc.push_str(l.trim_end());
        } else {
            if !acc.is_empty() {
                acc.push('\n');
            }
            acc.push_str(l.trim_end());
        }
        acc
    });
    // Ports ("7: vethX: ...") all; of the FDB only the permanent entries and the VXLAN destinations
    // (learned ones come and go with traffic).
    // Multicast entries ("33:33:ff:…") follow the addresses IPv6 configures by itself a moment after a
    // link comes up: derived, not configuration.
    let port = |l: &str| l.split_whitespace().next().is_some_and(|w| w.ends_with(':'));
    let multicast = |l: &str| u8::from_str_radix(l.get(..2).unwrap_or("00"), 16).is_ok_and(|b| b & 1 == 1);
    let kept = bridge.lines().filter(|l| port(l) || ((l.contains("permanent") || l.contains("dst")) && !multicast(l))).collect::<Vec<_>>().join("\n");
    s += &in_order_where(&kept, |l| !port(l));
    s += "\n";
    for save in [&cnitrace_tools::IPTABLES_NFT_SAVE, &cnitrace_tools::IPTABLES_LEGACY_SAVE] {
        s += &text(cnitrace::sys::output_in(ns, save, &[])).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
    }
    let nft = text(cnitrace::sys::output_in(ns, &cnitrace_tools::NFT, &["list", "ruleset"]));
    // Counter values move with traffic; the rule does not.
    s += &nft.lines().map(cnitrace::finding::causes::netfilter::strip_counter).collect::<Vec<_>>().join("\n");
    let keys = ["net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter", "net.bridge.bridge-nf-call-iptables"];
    let path = cnitrace::netns::named(ns);
    s += &cnitrace::netns::in_netns(&path, move || {
        Ok(keys.iter().map(|k| format!("{k} = {}", cnitrace::sys::read_sysctl(k).unwrap_or_default())).collect::<Vec<_>>().join("\n"))
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    normalize(&s)
}

/// A permanent neighbour's line of `ip neigh show` (iproute2 ends it with a space: "… PERMANENT ").
fn permanent_neighbour(l: &str) -> bool {
    l.contains(" lladdr ") && l.trim_end().ends_with("PERMANENT")
}

/// `text` with the lines `pick` says yes to sorted among themselves, each sorted line in one of their places.
/// Each picked line once, too: a dump of a table that changes while it is dumped (a hash table resized)
/// can list an entry twice (seen once under load: a VTEP neighbour repeated), and the kernel holds one
/// entry per address and device.
fn in_order_where(text: &str, pick: impl Fn(&str) -> bool) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut picked: Vec<&str> = lines.iter().copied().filter(|l| pick(l)).collect();
    picked.sort_unstable();
    picked.dedup();
    let mut sorted = picked.into_iter();
    let lines: Vec<&str> = lines.iter().filter_map(|l| if pick(l) { sorted.next() } else { Some(*l) }).collect();
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Drops what moves by itself from a dump: timers, carrier and operational state (the admin flag UP
/// stays), the `linkdown` mark routes get from carrier.
fn normalize(dump: &str) -> String {
    dump.lines()
        .map(|l| {
            let mut prev = String::new();
            let kept = without_values(l, |w| {
                // "state UP" after the qdisc is operational state; "*_timer N" counts down by itself.
                let drop = w.ends_with("_timer") || (w == "state" && (prev == "noqueue" || prev == "noop" || prev.starts_with("qdisc")));
                prev = w.to_string();
                drop
            });
            kept.split_whitespace()
                .filter(|w| *w != "linkdown" && !(w.starts_with('[') && w.ends_with(']') && w.contains(':')))
                .map(|w| w.replace("NO-CARRIER,", "").replace(",LOWER_UP", "").replace(",M-DOWN", ""))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `line` without each word `key` says yes to, nor the value that follows it.
fn without_values(line: &str, mut key: impl FnMut(&str) -> bool) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut skip = false;
    for w in line.split_whitespace() {
        if skip {
            skip = false;
        } else if key(w) {
            skip = true;
        } else {
            out.push(w);
        }
    }
    out.join(" ")
}

/// Like [`config_diff`], but a bridge port's state may differ: the kernel disables and re-enables ports
/// as their carrier comes and goes, a consequence rather than a change.
pub fn config_diff_but_port_states(a: &std::collections::BTreeMap<String, String>, b: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    let strip = |m: &std::collections::BTreeMap<String, String>| -> std::collections::BTreeMap<String, String> {
        m.iter()
            .map(|(k, v)| {
                let v = v.lines().map(|l| without_values(l, |w| w == "state")).collect::<Vec<_>>().join("\n");
                (k.clone(), v)
            })
            .collect()
    };
    config_diff(&strip(a), &strip(b))
}

/// Every lab namespace's configuration, by namespace name.
pub fn lab_config() -> std::collections::BTreeMap<String, String> {
    cnitrace::lab::existing_namespaces(PREFIX).into_iter().map(|ns| {
        let c = ns_config(&ns);
        (ns, c)
    }).collect()
}

/// The namespaces whose configuration differs between two snapshots.
pub fn config_diff(a: &std::collections::BTreeMap<String, String>, b: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (ns, ca) in a {
        match b.get(ns) {
            Some(cb) if cb == ca => {}
            Some(cb) => {
                let la: Vec<&str> = ca.lines().collect();
                let lb: Vec<&str> = cb.lines().collect();
                let only_a: Vec<&&str> = la.iter().filter(|l| !lb.contains(l)).take(3).collect();
                let only_b: Vec<&&str> = lb.iter().filter(|l| !la.contains(l)).take(3).collect();
                if only_a.is_empty() && only_b.is_empty() {
                    // The same lines, in another order or another number of times: those repeated a
                    // different number of times, else the first that differs.
                    let count = |ls: &[&str], l: &str| ls.iter().filter(|x| **x == l).count();
                    let recounted: Vec<String> = la
                        .iter()
                        .chain(&lb)
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .filter(|l| count(&la, l) != count(&lb, l))
                        .map(|l| format!("{l:?} {}× before, {}× after", count(&la, l), count(&lb, l)))
                        .collect();
                    let at = la.iter().zip(&lb).position(|(x, y)| x != y).unwrap_or(la.len().min(lb.len()));
                    out.push(format!(
                        "{ns}: the same lines, reordered or repeated ({} lines before, {} after); repeated otherwise: {recounted:?}; first difference, line {at}: before {:?} after {:?}",
                        la.len(),
                        lb.len(),
                        la.get(at),
                        lb.get(at)
                    ));
                } else {
                    out.push(format!("{ns}: before {only_a:?} after {only_b:?}"));
                }
            }
            None => out.push(format!("{ns}: gone")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_neighbours_are_compared_as_a_set() {
        // As iproute2 prints them: each line ends with a space. Until this test, the pick missed every
        // line and a rollback that reordered the kernel's hash table failed the byte-for-byte check.
        let a = "1: lo\n10.11.28.0 dev flannel.1 lladdr 0e:7c:51:8c:67:32 PERMANENT \n10.11.150.0 dev flannel.1 lladdr 0e:1e:0a:8b:31:e8 PERMANENT \n";
        let b = "1: lo\n10.11.150.0 dev flannel.1 lladdr 0e:1e:0a:8b:31:e8 PERMANENT \n10.11.28.0 dev flannel.1 lladdr 0e:7c:51:8c:67:32 PERMANENT \n";
        assert_eq!(in_order_where(a, permanent_neighbour), in_order_where(b, permanent_neighbour));
        assert!(in_order_where(a, permanent_neighbour).starts_with("1: lo\n"), "other lines stay in place");
    }
}
