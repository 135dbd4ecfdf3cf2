//! Helpers for the kernel tests: a lab that tears itself down (also when a test panics), the cnitrace
//! binary, and skipping with a printed reason where a test cannot run.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::{Mutex, MutexGuard},
};

pub use cnitrace::lab::{check, faults, topology, Lab};

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
    let mut args = vec!["follow", src, dst, "--json"];
    args.extend_from_slice(extra);
    let out = cnitrace(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| panic!("follow printed nothing; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("verdict line is not JSON ({e}): {last}"));
    assert_eq!(v["type"], "verdict", "the last line is the verdict: {last}");
    (out.status.code().unwrap_or(-1), v)
}

/// cnitrace's eBPF programs currently loaded in the kernel (names as the kernel truncates them).
pub fn loaded_cnitrace_programs() -> usize {
    const OURS: &[&str] = &["net_dev_start_x", "netif_receive_s", "net_dev_queue", "kfree_skb_reaso", "kfree_skb_legac", "consume_skb", "fib_table_looku", "neigh_update", "neigh_timer_han"];
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| p.name_as_str().is_some_and(|n| OURS.contains(&n)))
        .count()
}

pub fn cnitrace(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("CNITRACE_LAB_PREFIX", PREFIX)
        .output()
        .expect("run the cnitrace binary (build it first: cargo xtask test does)")
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
        let kernel = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
        // A previous run that was killed may have left its lab: start clean.
        let _ = cnitrace(&["lab", "down"]);
        let mut args = vec!["lab", "up"];
        for f in faults {
            args.extend_from_slice(&["--fault", f]);
        }
        let out = cnitrace(&args);
        assert!(out.status.success(), "lab up {faults:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        let lab = Lab::load(PREFIX).expect("the lab state after lab up");
        LabGuard { lab, _kernel: kernel }
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

/// What the lab under `PREFIX` left behind: namespaces, its state folder, and which of `server_pids`
/// still run as lab servers.
pub fn leftovers(server_pids: &[u32]) -> Vec<String> {
    let mut left: Vec<String> = cnitrace::lab::existing_namespaces(PREFIX);
    let state = PathBuf::from(cnitrace::lab::STATE_ROOT).join(PREFIX);
    if state.exists() {
        left.push(state.display().to_string());
    }
    for pid in server_pids {
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("lab serve") {
                left.push(format!("process {pid}: {cmd}"));
            }
        }
    }
    left
}
