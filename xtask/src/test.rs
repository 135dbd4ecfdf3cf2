//! `cargo xtask test`: unit tests (no root), then the kernel tests (root: real namespaces, real eBPF) on
//! the host kernel and on each VM kernel asked for, then the matrix: kernel × test → pass / FAIL /
//! skipped with its reason, and the time each kernel took.
//! The kernel tests share one kernel, so they run one at a time (in each VM as on the host).

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};

use crate::vm::{self, Column, Outcome};

pub struct Options {
    pub filter: Vec<String>,
    /// VM kernels to run besides the host; empty means the default set.
    pub kernels: Vec<String>,
    pub no_host: bool,
    /// Minutes one VM may take (boot + suite) before it is stopped.
    pub vm_timeout_min: Option<u64>,
    /// VMs run at once (0: one per core).
    pub jobs: usize,
    pub vm_cpus: Option<usize>,
    /// The host's suite without another cluster beside it.
    pub alone: bool,
    /// Without the real cluster's tests.
    pub no_cluster: bool,
}

pub fn run(o: Options) -> Result<()> {
    crate::setup::run(true)?;
    // The real cluster's tests run on every machine that can build its programs: a missing one (no Go)
    // stops the run here rather than let those tests skip unseen in a green CI.
    let missing = cnitrace_tools::cluster_missing();
    if !o.no_host && !o.no_cluster && !missing.is_empty() {
        bail!(
            "the real cluster's programs are not built ({}): `cargo xtask setup` builds them with Go (on PATH or in /usr/local/go/bin); \
             `cargo xtask test --no-cluster` runs without the real cluster's tests",
            missing.join(", ")
        );
    }
    let kernels: Vec<String> = if o.kernels.is_empty() {
        vm::DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect()
    } else if o.kernels.iter().any(|k| k == "all") {
        vm::KERNELS.iter().map(|k| k.name.to_string()).collect()
    } else if o.kernels.iter().any(|k| k == "none") {
        Vec::new()
    } else {
        o.kernels.clone()
    };
    for k in &kernels {
        vm::spec(k)?;
    }
    let bin = crate::build()?;
    crate::cargo(&["test", "--release", "-p", "cnitrace-common", "-p", "cnitrace-tools", "-p", "cnitrace", "-p", "xtask"])?;
    // The Kubernetes client against the test API server, the real kubectl, `kubectl cnitrace` (no
    // kernel needed: once, on the host, whatever the kernels asked for).
    std::env::set_var("CNITRACE_BIN", &bin);
    // Setup's Python tools (kubernetes-validate) for the deploy manifests' test.
    std::env::set_var("CNITRACE_PY_BIN", crate::setup::venv().join("bin"));
    crate::cargo(&["test", "--release", "-p", "cnitrace-tests", "--test", "kube"])?;
    // A snapshot of both binaries: a rebuild while a VM runs (minutes under emulation) must not change
    // what the guest executes.
    // One folder per run: two runs at once do not share binaries either.
    let logs = crate::workspace_root().join("target/kernel-tests");
    sweep_snapshots(&logs);
    let snap = Snapshot(logs.join(format!("bin-{}", std::process::id())));
    std::fs::create_dir_all(&snap.0)?;
    let (bin, test_bin) = (snapshot(&bin, &snap.0)?, snapshot(&kernel_test_binary()?, &snap.0)?);
    let mut args: Vec<String> = o.filter.clone();
    if o.no_cluster {
        args.extend(["--skip".into(), "cluster::".into()]);
    }
    // --show-output: the reason of every skipped kernel test (they print nothing else).
    args.extend(["--test-threads=1".into(), "--show-output".into()]);
    // Without --kernel (CI): the VM runs the tests whose outcome depends on the kernel; the rest of the
    // suite (rollback, journal, CLI behaviour) is the same code on any kernel and runs on the host.
    let mut vm_args = args.clone();
    let subset = o.kernels.is_empty() && o.filter.is_empty();
    // The whole suite (`--kernel V`, no filter) under emulation takes close to an hour on 2 cores.
    let whole_suite = !o.kernels.is_empty() && o.filter.is_empty();
    let vm_timeout = Duration::from_secs(o.vm_timeout_min.unwrap_or(if whole_suite { 120 } else { 60 }) * 60);
    if subset {
        vm_args = vm::DEFAULT_FILTERS.iter().map(|f| f.to_string()).chain(args.iter().cloned()).collect();
        println!("xtask: VM kernels {}: the kernel-dependent tests ({}); `--kernel V` runs the whole suite there", kernels.join(", "), vm::DEFAULT_FILTERS.join(" "));
    }

    if !kernels.is_empty() {
        let names: Vec<&str> = kernels.iter().map(String::as_str).collect();
        vm::ensure(&names)?;
    }
    // The kernel tests drive the real binary, as a user would.
    std::env::set_var("CNITRACE_BIN", &bin);
    // The host's suite runs beside the VMs: it is mostly waiting (ARP give-ups, probes, timeouts) while a
    // guest under emulation is CPU work, and they share nothing (each kernel its own namespaces, the
    // guest's scratch space in its own RAM). Serially, CI spent the host's ~10 minutes before the
    // 5.10 guest started.
    let host_prefix = if kernels.is_empty() { "" } else { "[host] " };
    // The guest's work is mostly one command after another: one emulated CPU per VM and one VM per
    // host core does more in the same time than two CPUs for one VM (measured: a 2-CPU guest kept the
    // host at ~115 % of one core).
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // One run per kernel; with a core to spare per part, each kernel's tests in parts, each a one-CPU
    // guest of its own, their results one column: CI's subset in its measured halves
    // (vm::DEFAULT_SHARDS), the whole suite by modules (vm::split_suite). A guest of several CPUs must
    // run them on one host thread (multi-threaded emulation broke kernel text patching: issue 16), which
    // costs ×1.4; two one-CPU guests side by side do not.
    let parts: Vec<(String, Vec<String>)> = if subset {
        vm::DEFAULT_SHARDS.iter().map(|s| (s.join(" "), s.iter().map(|f| f.to_string()).collect())).collect()
    } else if whole_suite && o.vm_cpus.is_none_or(|c| c == 1) {
        // Each part's filters are its modules (`fix::`): the guest's command goes on its kernel's
        // command line, where the tests' names do not fit (a part named test by test hung at boot).
        let tests = list_tests(&test_bin)?;
        let parts = vm::split_suite(&tests, 2);
        for (modules, names) in &parts {
            let selected = tests.iter().filter(|t| modules.iter().any(|m| t.contains(m.as_str()))).count();
            if selected != names.len() {
                bail!("the filters {modules:?} select {selected} tests, not their {} own: a module's name is inside another test's name", names.len());
            }
        }
        parts.into_iter().map(|(modules, _)| (modules.join(" "), modules)).collect()
    } else {
        Vec::new()
    };
    let runs: Vec<(String, Option<(usize, usize, String)>, Vec<String>)> = kernels
        .iter()
        .flat_map(|k| {
            if parts.len() > 1 && kernels.len() * parts.len() <= cores {
                parts
                    .iter()
                    .enumerate()
                    .map(|(i, (about, filters))| (k.clone(), Some((i, parts.len(), about.clone())), filters.iter().cloned().chain(args.iter().cloned()).collect()))
                    .collect::<Vec<_>>()
            } else {
                vec![(k.clone(), None, vm_args.clone())]
            }
        })
        .collect();
    let jobs = if o.jobs == 0 { cores } else { o.jobs }.clamp(1, runs.len().max(1));
    let cpus = o.vm_cpus.unwrap_or(if jobs == 1 { cores.min(2) } else { 1 });
    // The host's suite runs beside another cluster (its namespaces, its pods in the same /16, its own
    // cnitrace watch): what the tests count and check must be their own cluster's (issue 35).
    let _neighbour = if o.no_host || o.alone { None } else { Some(crate::neighbour::OtherCluster::up(&bin, &logs)?) };
    let queue = std::sync::Mutex::new(runs.iter().collect::<std::collections::VecDeque<_>>());
    let done = std::sync::Mutex::new(Vec::new());
    let host = std::thread::scope(|s| {
        let host = (!o.no_host).then(|| s.spawn(|| vm::run_host(&test_bin, &args, &logs.join("host.log"), host_prefix)));
        for _ in 0..jobs {
            s.spawn(|| loop {
                let Some((k, shard, vm_args)) = queue.lock().expect("queue").pop_front() else { break };
                let name = match shard {
                    Some((i, _, _)) => format!("{k}-{}", i + 1),
                    None => k.clone(),
                };
                let r = vm::kernel(k).and_then(|kernel| {
                    let part = shard.as_ref().map(|(i, n, about)| format!(", part {} of {n}: {about}", i + 1)).unwrap_or_default();
                    let threads = if cpus > 1 { " on one host thread" } else { "" };
                    println!("\n=== kernel {} ({}; {}) in a VM: qemu, software emulation, {cpus} CPU{threads}{part} ===", kernel.name, kernel.release, vm::spec(k)?.why);
                    vm::run_suite(&kernel, &test_bin, &bin, vm_args, &logs.join(format!("{name}.log")), vm_timeout, cpus)
                });
                done.lock().expect("results").push((k.clone(), shard, r));
            });
        }
        host.map(|h| h.join().expect("the host's test runner panicked"))
    });
    let mut columns = Vec::new();
    if let Some(h) = host {
        columns.push(h?);
    }
    let mut done = done.into_inner().expect("results");
    done.sort_by_key(|(k, shard, _)| (kernels.iter().position(|x| x == k), shard.as_ref().map(|s| s.0)));
    for (_, _, r) in done {
        let c = r?;
        match columns.iter_mut().find(|x: &&mut vm::Column| x.kernel == c.kernel) {
            Some(x) => x.merge(c),
            None => columns.push(c),
        }
    }
    drop(snap);
    let report = matrix(&columns);
    println!("\n{report}");
    std::fs::write(logs.join("matrix.txt"), &report)?;
    std::fs::write(logs.join("matrix.json"), matrix_json(&columns).to_string())?;
    let failed: Vec<String> = columns
        .iter()
        .flat_map(|c| {
            let broken = c.broken.as_ref().map(|b| format!("{}: {b}", c.kernel));
            let fails = c.results.iter().filter(|(_, o)| matches!(o, Outcome::Fail(_))).map(move |(t, _)| format!("{} on {}", t, c.kernel));
            broken.into_iter().chain(fails)
        })
        .collect();
    if !failed.is_empty() {
        bail!("{} kernel test run(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask test --soak N`: the generated-layout test over N seeds on the host kernel.
pub fn soak(n: u64) -> Result<()> {
    crate::setup::run(true)?;
    let bin = crate::build()?;
    let test_bin = kernel_test_binary()?;
    let st = std::process::Command::new(&test_bin)
        .args(["generated::", "--test-threads=1", "--nocapture"])
        .env("CNITRACE_BIN", &bin)
        .env("CNITRACE_GEN_SEEDS", n.to_string())
        .status()
        .context("run the generated layouts")?;
    if !st.success() {
        bail!("the soak found cases that went wrong (listed above as MISS)");
    }
    Ok(())
}

/// A run's own copy of the binaries, removed when the run ends however it ends (a guest that broke
/// returns early with an error).
struct Snapshot(PathBuf);

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the binaries' copies of runs that are no longer alive (stopped by a signal: 35 MB each). A
/// copy's folder is named after its run's process id; a live run's is left alone.
fn sweep_snapshots(logs: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(logs) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(snapshot_pid) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The process id in a snapshot folder's name (`bin-<pid>`), if it is one.
fn snapshot_pid(name: &str) -> Option<u32> {
    name.strip_prefix("bin-")?.parse().ok()
}

fn snapshot(bin: &std::path::Path, dir: &std::path::Path) -> Result<PathBuf> {
    let to = dir.join(bin.file_name().context("a binary's name")?);
    let tmp = to.with_extension("new");
    std::fs::copy(bin, &tmp).with_context(|| format!("copy {}", bin.display()))?;
    std::fs::rename(&tmp, &to)?;
    Ok(to)
}

/// The kernel test binary (one self-contained binary: the same file runs on the host and in the VMs).
/// Every kernel test's name, as the test binary lists them (no root, no kernel needed).
fn list_tests(test_bin: &std::path::Path) -> Result<Vec<String>> {
    let out = std::process::Command::new(test_bin).args(["--list", "--format", "terse"]).output().context("list the kernel tests")?;
    if !out.status.success() {
        bail!("{} --list: {}", test_bin.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.strip_suffix(": test")).map(str::to_string).collect())
}

fn kernel_test_binary() -> Result<PathBuf> {
    let out = crate::setup::cargo_command()
        .args(["test", "--release", "-p", "cnitrace-tests", "--test", "kernel", "--no-run", "--message-format=json"])
        .current_dir(crate::workspace_root())
        .env("PATH", crate::setup::path_with_cargo_bin())
        .output()
        .context("build the kernel tests")?;
    if !out.status.success() {
        bail!("building the kernel tests failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "kernel")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo named no kernel test executable")
}

fn cell(o: Option<&Outcome>) -> &'static str {
    match o {
        Some(Outcome::Pass) => "pass",
        Some(Outcome::Fail(_)) => "FAIL",
        Some(Outcome::Skipped(_)) => "skipped",
        None => "-",
    }
}

/// The matrix as text: one row per test, one column per kernel, then the reasons and the times.
pub fn matrix(columns: &[Column]) -> String {
    let mut tests: Vec<&str> = Vec::new();
    for c in columns {
        for (t, _) in &c.results {
            if !tests.contains(&t.as_str()) {
                tests.push(t);
            }
        }
    }
    let width = tests.iter().map(|t| t.len()).max().unwrap_or(4).max(4);
    let head: Vec<String> = columns.iter().map(|c| format!("{:>15}", c.kernel)).collect();
    let mut s = format!("kernel test matrix (outcome, seconds)\n{:width$}  {}\n", "test", head.join(" "));
    for t in &tests {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| {
                let o = cell(c.results.iter().find(|(n, _)| n == t).map(|(_, o)| o));
                let secs = c.seconds.iter().find(|(n, _)| n == t).map(|(_, s)| format!("{s:.0} s")).unwrap_or_default();
                format!("{:>15}", format!("{o} {secs}"))
            })
            .collect();
        s.push_str(&format!("{t:width$}  {}\n", cells.join(" ")));
    }
    s.push('\n');
    for c in columns {
        let n = |f: fn(&Outcome) -> bool| c.results.iter().filter(|(_, o)| f(o)).count();
        s.push_str(&format!(
            "{:>6} {:<24} {:>3} pass {:>3} fail {:>3} skipped  {:>6.1} min{}\n",
            c.kernel,
            c.release,
            n(|o| *o == Outcome::Pass),
            n(|o| matches!(o, Outcome::Fail(_))),
            n(|o| matches!(o, Outcome::Skipped(_))),
            c.elapsed.as_secs_f64() / 60.0,
            c.broken.as_ref().map(|b| format!("  RUN BROKEN: {b}")).unwrap_or_default()
        ));
        for (t, o) in &c.results {
            match o {
                Outcome::Fail(m) => s.push_str(&format!("         FAIL {t}: {m}\n")),
                Outcome::Skipped(m) => s.push_str(&format!("         skipped {t}: {m}\n")),
                Outcome::Pass => {}
            }
        }
    }
    s
}

fn matrix_json(columns: &[Column]) -> serde_json::Value {
    let cols: Vec<serde_json::Value> = columns
        .iter()
        .map(|c| {
            let results: serde_json::Map<String, serde_json::Value> = c
                .results
                .iter()
                .map(|(t, o)| {
                    let v = match o {
                        Outcome::Pass => serde_json::json!({"outcome": "pass"}),
                        Outcome::Fail(m) => serde_json::json!({"outcome": "fail", "why": m}),
                        Outcome::Skipped(m) => serde_json::json!({"outcome": "skipped", "why": m}),
                    };
                    (t.clone(), v)
                })
                .collect();
            let times: serde_json::Map<String, serde_json::Value> = c.seconds.iter().map(|(t, s)| (t.clone(), serde_json::json!((s * 10.0).round() / 10.0))).collect();
            serde_json::json!({"kernel": c.kernel, "release": c.release, "seconds": c.elapsed.as_secs(), "broken": c.broken, "results": results, "test_seconds": times})
        })
        .collect();
    serde_json::Value::Array(cols)
}

#[cfg(test)]
mod tests {
    use super::snapshot_pid;

    #[test]
    fn only_a_runs_binaries_folder_is_swept() {
        assert_eq!(snapshot_pid("bin-31048"), Some(31048));
        for other in ["5.10-1.log", "bin-", "bin-x", "binaries", "matrix.txt"] {
            assert_eq!(snapshot_pid(other), None, "{other}");
        }
    }
}
