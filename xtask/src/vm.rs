//! Other kernels, in VMs: Debian's stock kernel packages booted under qemu by virtme-ng, with the host's
//! root shared read-only (writes land in the guest's RAM), running the same kernel test binary.
//!
//! Only software emulation (TCG) works on this project's machines, so the VM is slow but real: the
//! guest kernel is the one under test, with its own verifier, tracepoints, kprobes and fentry.
//! Everything lives in one cache folder (`CNITRACE_VM_CACHE`, else `~/.cache/cnitrace/vm`): the
//! virtme-ng venv and one folder per kernel with the extracted package. Nothing is installed into the
//! host's /boot or /lib/modules.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cnitrace_tools::{self as tools, Tool};

/// The matrix: one Debian release per kernel line, the suites to look in (security first: newer).
pub struct KernelSpec {
    pub name: &'static str,
    /// (archive, suite)
    suites: &'static [(&'static str, &'static str)],
    pub why: &'static str,
}

const DEBIAN: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";

pub const KERNELS: &[KernelSpec] = &[
    KernelSpec { name: "5.10", suites: &[(SECURITY, "bullseye-security"), (DEBIAN, "bullseye")], why: "bullseye: kfree_skb without a drop reason" },
    KernelSpec { name: "6.1", suites: &[(SECURITY, "bookworm-security"), (DEBIAN, "bookworm")], why: "bookworm: drop reasons, the most common LTS on nodes" },
    KernelSpec { name: "6.12", suites: &[(SECURITY, "trixie-security"), (DEBIAN, "trixie")], why: "trixie" },
    KernelSpec { name: "7.2", suites: &[(DEBIAN, "sid")], why: "sid: the newest Debian kernel" },
];

/// What `cargo xtask test` boots besides the host kernel when no `--kernel` is given (CI runs this):
/// the oldest, whose kfree_skb has no drop reason, so the degraded path is proven on every run.
pub const DEFAULT_KERNELS: &[&str] = &["5.10"];

/// The tests a default run (CI) gives the VM: every cause followed and fixed, the kernel's own drop
/// points, the seed incident, healthy paths, each fault breaking its paths, what differs by kernel, and
/// the real node's shape (host side in the root namespace: only a guest may build it).
pub const DEFAULT_FILTERS: &[&str] = &["follow::", "kernels::", "fix::every_fault", "lab::each_fault", "node_shape::"];

/// [`DEFAULT_FILTERS`] in two halves of about the same time under emulation, each run by a guest of its
/// own (one CPU each) when there are cores to spare. Measured on 5.10, one CPU, beside the host suite:
/// every fault fixed 1,218 s, each fault breaking its paths 235 s | follow:: 1,335 s, kernels:: 74 s,
/// node_shape:: 27 s.
pub const DEFAULT_SHARDS: &[&[&str]] = &[&["fix::every_fault", "lab::each_fault"], &["follow::", "kernels::", "node_shape::"]];

/// What the kernel command line (2,048 bytes on x86) leaves for the guest's command once virtme-ng's
/// own parameters are on it (measured: 700–800 bytes with this project's paths).
const MAX_GUEST_COMMAND_B64: usize = 1200;

/// Seconds per test of each module in the whole suite on 5.10 under emulation, one CPU (the matrix of
/// 2026-12-06, `target/kernel-tests/matrix.txt`: module total / tests). Counting tests alone put agents
/// (its 120-trace soak: 964 s), generated (one test, 876 s) and follow in one guest: 54 min beside 22.
/// By these weights it ran as 43 + 36 and 37 + 35 min (2026-12-07, two runs of the whole suite).
const SECONDS_PER_TEST: &[(&str, usize)] = &[
    ("agents", 160),
    ("generated", 876),
    ("services", 178),
    ("fix", 48),
    ("follow", 45),
    ("lab", 20),
    ("kube", 14),
    ("validate", 12),
    ("node_shape", 12),
    ("watch", 10),
    ("kernels", 6),
    ("layouts", 5),
];
/// A module not measured yet.
const UNMEASURED_SECONDS: usize = 30;

/// The whole suite (`--kernel V`, no filter) in `n` parts for as many one-CPU guests side by side: whole
/// modules (a module's tests share their labs' kind and cost), the longest first onto the lightest part,
/// each weighed by its tests' count times the seconds one of its tests took on 5.10 in a one-CPU guest
/// (`SECONDS_PER_TEST`). Returns each part's modules and its tests' exact names; every test is in
/// exactly one part.
pub fn split_suite(tests: &[String], n: usize) -> Vec<(Vec<String>, Vec<String>)> {
    let weight = |module: &str| SECONDS_PER_TEST.iter().find(|(m, _)| *m == module).map_or(UNMEASURED_SECONDS, |(_, s)| *s);
    let mut modules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in tests {
        let module = t.split("::").next().unwrap_or(t).to_string();
        modules.entry(module).or_default().push(t.clone());
    }
    let mut by_cost: Vec<(String, Vec<String>)> = modules.into_iter().collect();
    by_cost.sort_by_key(|(m, ts)| std::cmp::Reverse(ts.len() * weight(m)));
    let mut parts: Vec<(usize, Vec<String>, Vec<String>)> = (0..n.max(1)).map(|_| (0, Vec::new(), Vec::new())).collect();
    for (m, ts) in by_cost {
        let lightest = parts.iter_mut().min_by_key(|p| p.0).expect("a part");
        lightest.0 += ts.len() * weight(&m);
        lightest.1.push(format!("{m}::"));
        lightest.2.extend(ts);
    }
    parts.into_iter().filter(|p| !p.2.is_empty()).map(|(_, m, t)| (m, t)).collect()
}

// The Rust virtiofsd (setup's CARGO_INSTALLS; Debian 12 has none, and qemu's old C one is not used by
// virtme-ng): with it the guest's shared root is virtiofs with caching instead of uncached 9p. Measured
// on 6.1 under TCG: `cnitrace --version` 0.87 s → 0.10 s and `lab up` 11.1 s → 8.2 s.

pub fn spec(name: &str) -> Result<&'static KernelSpec> {
    KERNELS.iter().find(|k| k.name == name).with_context(|| {
        format!("no kernel {name:?} in the matrix; known: {}", KERNELS.iter().map(|k| k.name).collect::<Vec<_>>().join(", "))
    })
}

pub use crate::setup::cache_dir;

/// A kernel ready to boot.
pub struct Kernel {
    pub name: String,
    /// `uname -r` inside the guest.
    pub release: String,
    pub vmlinuz: PathBuf,
}

/// Installs what booting needs (idempotent): the host packages, virtme-ng, and the kernels asked for.
/// Returns whether anything was installed.
pub fn ensure(kernels: &[&str]) -> Result<bool> {
    let mut did = crate::setup::ensure_packages(crate::setup::VM_PACKAGES)?;
    did |= ensure_runner()?;
    for k in kernels {
        did |= ensure_kernel(spec(k)?)?.1;
    }
    Ok(did)
}

/// A kernel already in the cache (`ensure` puts it there).
pub fn kernel(name: &str) -> Result<Kernel> {
    let spec = spec(name)?;
    cached_kernel(spec, &cache_dir().join("kernels").join(spec.name)).with_context(|| format!("kernel {name} is not in {}: run `cargo xtask setup`", cache_dir().display()))
}

fn venv() -> PathBuf {
    crate::setup::venv()
}

fn virtiofsd_root() -> PathBuf {
    cache_dir().join("virtiofsd")
}

fn ensure_runner() -> Result<bool> {
    let mut did = false;
    if !virtiofsd_root().join("bin").join(tools::VIRTIOFSD.program).exists() {
        let krate = format!("virtiofsd@{}", crate::setup::cargo_version("virtiofsd"));
        println!("setup: cargo install {krate} into {} (about 1 min)", virtiofsd_root().display());
        let st = crate::setup::cargo_command()
            .args(["install", &krate, "--locked", "--root"])
            .arg(virtiofsd_root())
            .env("PATH", crate::setup::path_with_cargo_bin())
            .status()
            .context("run cargo install")?;
        if !st.success() {
            bail!("cargo install {krate} failed");
        }
        did = true;
    }
    did |= crate::setup::ensure_pip(&["virtme-ng"])?;
    Ok(did)
}

/// Downloads and extracts the newest `linux-image-<line>.*-amd64` package of the kernel's suites.
/// The generic flavour: the cloud one lacks 9p, which virtme-ng's shared root needs.
fn ensure_kernel(spec: &KernelSpec) -> Result<(Kernel, bool)> {
    let dir = cache_dir().join("kernels").join(spec.name);
    if let Some(k) = cached_kernel(spec, &dir) {
        return Ok((k, false));
    }
    let t0 = Instant::now();
    let parts = newest_package(spec)?;
    let package = parts.iter().map(|(_, f)| f.as_str()).collect::<Vec<_>>().join(" ");
    println!("setup: kernel {} ← {package}", spec.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let root = dir.join("root");
    for (url, _) in &parts {
        let deb = dir.join("part.deb");
        run(&tools::CURL, &["-sSf", "--retry", "3", "-o", path_str(&deb)?, url])?;
        run(&tools::DPKG_DEB, &["-x", path_str(&deb)?, path_str(&root)?])?;
        std::fs::remove_file(&deb)?;
    }
    let release = release_in(&root)?;
    // The package's postinst would run depmod; virtme-ng needs modules.dep to pick 9p, virtio, overlay.
    run(&tools::DEPMOD, &["-b", path_str(&modules_base(&root))?, &release])?;
    std::fs::write(dir.join("package"), &package)?;
    println!("setup: kernel {} ({release}) ready in {:.0} s", spec.name, t0.elapsed().as_secs_f64());
    let k = cached_kernel(spec, &dir).context("the extracted kernel package has no vmlinuz")?;
    Ok((k, true))
}

fn cached_kernel(spec: &KernelSpec, dir: &Path) -> Option<Kernel> {
    if !dir.join("package").exists() {
        return None;
    }
    let root = dir.join("root");
    let release = release_in(&root).ok()?;
    // /boot, or next to the modules (where newer packages put it).
    let vmlinuz = [root.join(format!("boot/vmlinuz-{release}")), modules_base(&root).join(format!("lib/modules/{release}/vmlinuz"))].into_iter().find(|p| p.exists())?;
    let deps = modules_base(&root).join(format!("lib/modules/{release}/modules.dep"));
    (vmlinuz.exists() && deps.exists()).then(|| Kernel { name: spec.name.to_string(), release, vmlinuz })
}

/// Where `lib/modules` is: the package root, or its `usr` (merged-/usr packages, trixie and later).
fn modules_base(root: &Path) -> PathBuf {
    if root.join("lib/modules").exists() {
        root.to_path_buf()
    } else {
        root.join("usr")
    }
}

fn release_in(root: &Path) -> Result<String> {
    let modules = modules_base(root).join("lib/modules");
    let entry = std::fs::read_dir(&modules)
        .with_context(|| format!("read {}", modules.display()))?
        .filter_map(|e| e.ok())
        .next()
        .context("no module folder in the kernel package")?;
    Ok(entry.file_name().to_string_lossy().into_owned())
}

/// The packages that make up the newest generic amd64 image of this kernel line, as (URL, file name):
/// the image package itself and, where Debian splits it (sid), the `linux-binary-*` (vmlinuz) and
/// `linux-modules-*` packages it depends on.
fn newest_package(spec: &KernelSpec) -> Result<Vec<(String, String)>> {
    let prefix = format!("linux-image-{}.", spec.name);
    for (archive, suite) in spec.suites {
        let index = format!("{archive}/dists/{suite}/main/binary-amd64/Packages.xz");
        let out = tools::SH
            .command()
            .args(["-c", &format!("{} -sSf --retry 3 '{index}' | {} -dc", tools::CURL.program, tools::XZ.program)])
            .output()
            .context("download a Debian package index")?;
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // name → (file, depends), and the image packages in index order (later = newer ABI).
        let mut files: std::collections::HashMap<&str, (&str, &str)> = std::collections::HashMap::new();
        let mut images = Vec::new();
        for stanza in text.split("\n\n") {
            let field = |f: &str| stanza.lines().find_map(|l| l.strip_prefix(f)).unwrap_or("");
            let (name, file, deps) = (field("Package: "), field("Filename: "), field("Depends: "));
            if name.is_empty() || file.is_empty() {
                continue;
            }
            files.insert(name, (file, deps));
            if name.starts_with(&prefix) && name.ends_with("-amd64") && !name.contains("cloud") && !name.contains("-rt-") {
                images.push(name);
            }
        }
        let Some(image) = images.last() else { continue };
        let (file, deps) = files[image];
        let mut parts = vec![file];
        for dep in deps.split(',').map(|d| d.trim().split(' ').next().unwrap_or("")) {
            if dep.starts_with("linux-binary-") || dep.starts_with("linux-modules-") {
                parts.push(files.get(dep).with_context(|| format!("{image} needs {dep}, which {suite} does not list"))?.0);
            }
        }
        return Ok(parts.into_iter().map(|f| (format!("{archive}/{f}"), f.rsplit('/').next().unwrap_or(f).to_string())).collect());
    }
    bail!("no linux-image-{}.*-amd64 package in {:?}", spec.name, spec.suites.iter().map(|s| s.1).collect::<Vec<_>>())
}

/// How one test ended on one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skipped(String),
}

/// One kernel's column of the matrix.
pub struct Column {
    pub kernel: String,
    pub release: String,
    pub results: Vec<(String, Outcome)>,
    /// Seconds each test took (between consecutive result lines; tests run one at a time).
    pub seconds: Vec<(String, f64)>,
    pub elapsed: Duration,
    /// Set when the run itself broke (boot failure, timeout) rather than a test.
    pub broken: Option<String>,
}

impl Column {
    /// Another run of the same kernel (a part of the suite in a guest of its own) into this column: its
    /// results after these, the longer of the two times (they ran side by side), both breakages.
    pub fn merge(&mut self, other: Column) {
        self.results.extend(other.results);
        self.seconds.extend(other.seconds);
        self.elapsed = self.elapsed.max(other.elapsed);
        self.broken = match (self.broken.take(), other.broken) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
    }
}

/// The guest's scratch space: on its own /run tmpfs, nothing the host can change under it.
const GUEST_TMP: &str = "/run/cnitrace-guest-tmp";

/// How often the guest logs its memory to the console (the suite's writes live in the guest's RAM).
const MEMORY_EVERY_S: u32 = 20;

/// Boots `kernel` and runs the kernel test binary inside it; streams the guest's output and returns
/// the column. `timeout` bounds the whole boot + suite. The guest's stderr (virtme-ng's and the
/// kernel's console: `--verbose`) is always kept beside the log, with a memory line every
/// [`MEMORY_EVERY_S`] s, so a guest that dies says why in the matrix.
/// qemu's arguments for a guest of `cpus` CPUs: one host thread runs them all (`thread=single`) when
/// there are several. Under multi-threaded TCG (qemu's default, a host thread per CPU) a kprobe
/// inserted or removed while the other CPU runs the code it patches crashed the 5.10 guest: a jump to
/// address 0 in whatever the other CPU ran (`RIP: 0010:0x0` in iperf3's softirq: nf_hook_slow,
/// udp_queue_rcv_one_skb, skb_release_head_state, iptunnel_xmit, br_nf_hook_thresh — one each time).
/// `follow` attached and detached 12 times during an iperf3 flow: with kprobes, multi-threaded TCG
/// died within a minute in 3 runs of 3, with kprobe jump optimisation off too (int3 patching alone);
/// tracepoints only (`--no-kprobes`) ran clean, as did one host thread for two CPUs (2 runs) and a
/// one-CPU guest. The kernel's code patching relies on the other CPU seeing the new bytes once
/// the patching CPU's IPI returns; emulated with a thread per CPU, it did not. This was the "VM that
/// dies" of the whole-suite runs on 5.10, 6.12 and 7.2 (always during the bulk TCP test: the only one
/// that ends a follow in the middle of a flow).
fn single_threaded_tcg(cpus: usize) -> Vec<String> {
    if cpus > 1 {
        vec!["--qemu-opts=-accel tcg,thread=single".to_string()]
    } else {
        Vec::new()
    }
}

pub fn run_suite(kernel: &Kernel, test_bin: &Path, cnitrace_bin: &Path, args: &[String], log: &Path, timeout: Duration, cpus: usize) -> Result<Column> {
    let vng = venv().join("bin").join(tools::VNG.program);
    // Inside the guest: the same binaries from the read-only shared root, state in the guest's RAM. Its
    // scratch space (TMPDIR) is a folder on the guest's own /run tmpfs: virtme-ng's /tmp is an overlay on
    // the host's live /tmp, and when the host changed a folder under it (the host's kernel tests recreate
    // /tmp/cnitrace-test-state) the guest's next write there failed with ESTALE ("Stale file handle":
    // seen, every fix of a 5.10 run). /tmp itself stays visible: the workspace, and the binaries, may
    // live under it (a tmpfs mounted over /tmp hid them: "not found").
    let mut guest = format!(
        "{mkdir} -p {GUEST_TMP} || exit 97; export TMPDIR={GUEST_TMP}; \
         ( while :; do set -- $({awk} '/^(MemTotal|MemAvailable|Shmem):/{{print $2}}' /proc/meminfo); echo \"cnitrace-vm: memory total $1 kB available $2 kB shmem $3 kB\" >&2; sleep {MEMORY_EVERY_S}; done ) & \
         export CNITRACE_BIN={} CNITRACE_IN_VM=1; echo \"cnitrace-vm: kernel $(uname -r)\"; {}",
        sh_quote(path_str(cnitrace_bin)?),
        sh_quote(path_str(test_bin)?),
        awk = tools::AWK.program,
        mkdir = tools::MKDIR.program,
    );
    for a in args {
        guest.push(' ');
        guest.push_str(&sh_quote(a));
    }
    // virtme-ng hands the command to the guest on the kernel's command line, base64-encoded, beside its
    // own parameters (~700 bytes); x86's command line holds 2,048 bytes and the rest is cut: a guest
    // given too long a command booted and then waited forever (seen: a part named test by test).
    if guest.len().div_ceil(3) * 4 > MAX_GUEST_COMMAND_B64 {
        bail!(
            "the guest's command is {} bytes ({} in base64): more than the kernel command line leaves for it ({MAX_GUEST_COMMAND_B64} bytes in base64); give fewer or shorter filters",
            guest.len(),
            guest.len().div_ceil(3) * 4
        );
    }
    let path = format!("{}:{}:{}", venv().join("bin").display(), virtiofsd_root().join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let t0 = Instant::now();
    // Niced: the host's own suite runs beside the guests and has timings to keep (an unanswered ARP
    // request is decided after 300 ms); a guest under emulation takes what the host leaves.
    let mut child = tools::NICE
        .command()
        .args(["-n", "10"])
        .arg(tools::TIMEOUT.program)
        .args(["--kill-after=20", &format!("{}", timeout.as_secs())])
        .arg(&vng)
        .args(["--run", path_str(&kernel.vmlinuz)?, "--disable-kvm", "--cpus", &cpus.to_string(), "--memory", GUEST_MEMORY, "--cwd", "/"])
        .args(single_threaded_tcg(cpus))
        .arg("--verbose")
        .arg("--")
        .arg(&guest)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Piped, never inherited: when our stderr is a file, virtme-ng's console handling truncated it
        // (seen: a CI log redirected to a file lost everything before the VM's output).
        .stderr(Stdio::piped())
        .spawn()
        .context("start virtme-ng")?;
    let stderr = child.stderr.take().expect("piped");
    let name = kernel.name.clone();
    let forward = std::thread::spawn(move || {
        let mut kept = String::new();
        for line in BufReader::new(stderr).split(b'\n').map_while(|l| l.ok()) {
            let line = String::from_utf8_lossy(&line);
            // The kernel's own lines ("[  12.345678] …") and the memory readings go to the console file
            // only: thousands of them would bury the test output.
            if !line.starts_with("cnitrace-vm: memory") && !kernel_line(&line) {
                eprintln!("[{name}] {line}");
            }
            kept.push_str(&line);
            kept.push('\n');
        }
        kept
    });
    // A part of the suite says which (`[5.10-2]`), as its log is named.
    let tag = log.file_stem().and_then(|s| s.to_str()).unwrap_or(&kernel.name).to_string();
    let (text, clock) = stream(child.stdout.take().expect("piped"), &format!("[{tag}] "));
    let status = child.wait()?;
    let console = forward.join().unwrap_or_default();
    let console_log = log.with_extension("console.log");
    std::fs::write(&console_log, &console)?;
    let elapsed = t0.elapsed();
    std::fs::write(log, &text)?;
    let results = parse_libtest(&text);
    let booted = text.contains("cnitrace-vm: kernel");
    let broken = if status.code() == Some(124) {
        Some(format!("timed out after {} s", timeout.as_secs()))
    } else if !booted {
        Some(format!("the VM did not boot or run the suite (exit {:?}); see {}", status.code(), log.display()))
    } else if results.is_empty() {
        Some(format!("no test ran (exit {:?}); see {}", status.code(), log.display()))
    } else {
        stopped_early(&text).map(|s| format!("{s} (exit {:?}); see {}", status.code(), log.display()))
    };
    let broken = broken.map(|b| format!("{b}; {}", why_the_guest_ended(&console, &console_log)));
    Ok(Column { kernel: kernel.name.clone(), release: kernel.release.clone(), results, seconds: clock.seconds, elapsed, broken })
}

/// A line of the kernel's console: "[  427.857411] device … entered promiscuous mode".
fn kernel_line(line: &str) -> bool {
    // Seconds and six digits of microseconds, as printk writes them.
    line.strip_prefix('[').and_then(|r| r.split_once(']')).and_then(|(t, _)| t.trim().split_once('.')).is_some_and(|(s, us)| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) && us.len() == 6 && us.chars().all(|c| c.is_ascii_digit())
    })
}

/// The guest's memory (`--memory`): its RAM also holds every write of the suite (the shared root is
/// read-only; writes land in a tmpfs overlay).
const GUEST_MEMORY: &str = "2G";

/// What the console says about a guest that ended early: the kernel's or virtme-ng's own words where
/// they name a cause (out of memory, a panic, an oops, virtiofsd), and the last memory line.
pub fn why_the_guest_ended(console: &str, path: &Path) -> String {
    const SIGNS: &[&str] = &["Out of memory", "oom-kill", "Kernel panic", "BUG:", "Oops", "general protection", "virtiofsd", "Traceback", "Error", "error:"];
    let said: Vec<&str> = console.lines().filter(|l| SIGNS.iter().any(|s| l.contains(s))).take(3).collect();
    let memory = console.lines().rev().find_map(|l| l.strip_prefix("cnitrace-vm: memory ")).and_then(|m| {
        let n: Vec<u64> = m.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        (n.len() == 3).then(|| format!("last memory reading: {} MiB available of {} MiB, {} MiB in tmpfs", n[1] / 1024, n[0] / 1024, n[2] / 1024))
    });
    let mut parts = Vec::new();
    if said.is_empty() {
        parts.push("the console names no cause".to_string());
    } else {
        parts.push(format!("console: {}", said.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" | ")));
    }
    parts.extend(oops(console));
    parts.extend(memory);
    parts.push(format!("console kept in {}", path.display()));
    parts.join("; ")
}

/// A kernel oops in a few words: who ran (the "Comm:" of its CPU line), where (RIP) and the first frames
/// of its call trace, innermost first — the three header lines alone (CI: "BUG: kernel NULL pointer
/// dereference" and nothing else) named no function to look at.
fn oops(console: &str) -> Option<String> {
    let lines: Vec<&str> = console.lines().collect();
    let start = lines.iter().position(|l| l.contains("BUG:") || l.contains("Oops:") || l.contains("general protection"))?;
    // The text after the "[  748.928272] " stamp.
    let body = |l: &str| l.split_once("] ").map(|(_, b)| b).unwrap_or(l).trim().to_string();
    let rest = &lines[start..];
    let comm = rest.iter().find_map(|l| l.split_once(" Comm: ").map(|(_, c)| c.split_whitespace().next().unwrap_or("").to_string()));
    let rip = rest.iter().find(|l| l.contains("RIP: ")).map(|l| body(l));
    let trace = rest.iter().position(|l| l.contains("Call Trace:")).map(|at| {
        rest[at + 1..]
            .iter()
            .map(|l| body(l))
            .take_while(|b| !b.starts_with("Modules linked in") && !b.starts_with("---[") && !b.starts_with("RIP: "))
            .filter(|b| b.contains("+0x"))
            .take(8)
            .map(|b| b.trim_start_matches("? ").split('+').next().unwrap_or("").to_string())
            .collect::<Vec<_>>()
            .join(" < ")
    });
    let mut out = Vec::new();
    out.extend(comm.map(|c| format!("in {c}")));
    out.extend(rip);
    out.extend(trace.filter(|t| !t.is_empty()).map(|t| format!("call trace {t}")));
    (!out.is_empty()).then(|| format!("oops: {}", out.join(", ")))
}

/// Runs the kernel test binary on the host kernel, streaming and parsing its output like a VM's.
pub fn run_host(test_bin: &Path, args: &[String], log: &Path, prefix: &str) -> Result<Column> {
    let t0 = Instant::now();
    let mut child = Command::new(test_bin).args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("run the kernel tests")?;
    let (text, clock) = stream(child.stdout.take().expect("piped"), prefix);
    let status = child.wait()?;
    std::fs::write(log, &text)?;
    let results = parse_libtest(&text);
    let broken = if results.is_empty() && !status.success() {
        Some(format!("the test binary failed before any test (exit {:?})", status.code()))
    } else {
        stopped_early(&text).map(|s| format!("{s} (exit {:?})", status.code()))
    };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    Ok(Column { kernel: "host".into(), release, results, seconds: clock.seconds, elapsed: t0.elapsed(), broken })
}

/// Prints a test binary's output as it comes (each line after `prefix`), keeps it, and times its tests.
fn stream(out: impl std::io::Read, prefix: &str) -> (String, TestClock) {
    let mut text = String::new();
    let mut clock = TestClock::new();
    // Bytes, not UTF-8 lines: one odd byte from a guest console must not end the stream.
    for line in BufReader::new(out).split(b'\n').map_while(|l| l.ok()) {
        let line = String::from_utf8_lossy(&line).into_owned();
        println!("{prefix}{line}");
        clock.line(&line);
        text.push_str(&line);
        text.push('\n');
    }
    (text, clock)
}

/// Times tests from the output as it streams: libtest prints a test's result line when it ends, and
/// the kernel tests run one at a time, so a test took the time since the previous result line (the
/// first one also holds the boot).
struct TestClock {
    last: Instant,
    seconds: Vec<(String, f64)>,
}

impl TestClock {
    fn new() -> Self {
        TestClock { last: Instant::now(), seconds: Vec::new() }
    }

    fn line(&mut self, line: &str) {
        if line.starts_with("running ") {
            self.last = Instant::now();
        }
        let Some((name, _)) = line.strip_prefix("test ").and_then(|r| r.split_once(" ... ")) else { return };
        let now = Instant::now();
        self.seconds.push((name.to_string(), now.duration_since(self.last).as_secs_f64()));
        self.last = now;
    }
}

/// A run that ended before libtest's summary line (a guest that died, a binary that was killed): what it
/// was doing. Its finished tests still count, but the run must not pass: the rest never ran. Seen: a
/// 7.2 guest ended during a test after three had passed, and the matrix showed 3 pass, 0 fail.
pub fn stopped_early(text: &str) -> Option<String> {
    if text.lines().any(|l| l.starts_with("test result: ")) {
        return None;
    }
    let running = text.lines().rev().find_map(|l| l.strip_prefix("test ").and_then(|r| r.trim_end().strip_suffix(" ...")));
    Some(match running {
        Some(t) => format!("the run ended during {t}, before the suite's end"),
        None => "the run ended before the suite's end".to_string(),
    })
}

/// Test outcomes from libtest's output: `test NAME ... ok|FAILED|ignored`, the first panic line of each
/// failure, and the `SKIPPED name: reason` lines the kernel tests print when they cannot run.
pub fn parse_libtest(text: &str) -> Vec<(String, Outcome)> {
    let mut results: Vec<(String, Outcome)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("test ") else { continue };
        let Some((name, verdict)) = rest.split_once(" ... ") else { continue };
        let outcome = match verdict.trim() {
            "ok" => Outcome::Pass,
            "FAILED" => Outcome::Fail(String::new()),
            v if v.starts_with("ignored") => Outcome::Skipped(v.trim_start_matches("ignored").trim_start_matches(", ").to_string()),
            _ => continue,
        };
        results.push((name.to_string(), outcome));
    }
    // Failure reasons: the line after "---- NAME stdout ----" that says where it panicked, and the message.
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = l.strip_prefix("---- ").and_then(|r| r.strip_suffix(" stdout ----")) else { continue };
        let msg = lines[i + 1..]
            .iter()
            .take_while(|l| !l.starts_with("---- ") && !l.starts_with("failures:"))
            .skip_while(|l| !l.contains("panicked at"))
            .nth(1)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        if let Some((_, Outcome::Fail(m))) = results.iter_mut().find(|(n, _)| n == name) {
            *m = msg;
        }
    }
    for l in &lines {
        let Some(rest) = l.trim().strip_prefix("SKIPPED ") else { continue };
        let Some((short, reason)) = rest.split_once(": ") else { continue };
        if let Some((_, o)) = results.iter_mut().find(|(n, o)| *o == Outcome::Pass && n.rsplit("::").next() == Some(short)) {
            *o = Outcome::Skipped(reason.to_string());
        }
    }
    results
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

fn run(tool: &Tool, args: &[&str]) -> Result<()> {
    let st = tool.command().args(args).status().with_context(|| format!("run {}", tool.program))?;
    if !st.success() {
        bail!("`{} {}` failed", tool.program, args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_console_lines_are_told_apart() {
        assert!(kernel_line("[  427.857411] device vethe09a07cd entered promiscuous mode"));
        assert!(!kernel_line("[5.10] running 16 tests"));
        assert!(!kernel_line("running 16 tests"));
        assert!(!kernel_line("[] x"));
    }

    #[test]
    fn a_guest_that_died_says_why() {
        let console = "cnitrace-vm: memory total 2000000 kB available 1500000 kB shmem 10240 kB\n\
                       [  601.2] Out of memory: Killed process 412 (kernel-1234) total-vm:1kB\n\
                       cnitrace-vm: memory total 2000000 kB available 20480 kB shmem 1024000 kB\n";
        let why = why_the_guest_ended(console, Path::new("/x/5.10.console.log"));
        assert_eq!(
            why,
            "console: [  601.2] Out of memory: Killed process 412 (kernel-1234) total-vm:1kB; last memory reading: 20 MiB available of 1953 MiB, 1000 MiB in tmpfs; console kept in /x/5.10.console.log"
        );
        assert!(why_the_guest_ended("", Path::new("c")).starts_with("the console names no cause"));
    }

    #[test]
    fn the_whole_suite_splits_into_parts_of_whole_modules_each_test_once() {
        let tests: Vec<String> = ["fix::a", "fix::b", "follow::a", "follow::b", "follow::c", "lab::a", "kube::a", "agents::a", "agents::b", "kernels::a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let parts = split_suite(&tests, 2);
        assert_eq!(parts.len(), 2);
        let mut all: Vec<&String> = parts.iter().flat_map(|(_, t)| t).collect();
        all.sort();
        let mut want: Vec<&String> = tests.iter().collect();
        want.sort();
        assert_eq!(all, want, "every test once");
        for (modules, names) in &parts {
            assert!(names.iter().all(|t| modules.iter().any(|m| t.starts_with(m.as_str()))), "{modules:?} {names:?}");
        }
        // agents (2 × 160 s) outweighs the rest (follow 3 × 45, fix 2 × 48, …): a part of its own.
        let part_of = |t: &str| parts.iter().position(|(_, n)| n.iter().any(|x| x == t));
        assert_eq!(parts[part_of("agents::a").unwrap()].1.len(), 2, "{parts:?}");
        assert_eq!(part_of("fix::a"), part_of("follow::a"));
        assert_eq!(split_suite(&tests[..1], 2).len(), 1, "no empty guest");
    }

    #[test]
    fn the_halves_of_the_subset_are_the_subset_each_test_once() {
        let mut halves: Vec<&str> = DEFAULT_SHARDS.iter().flat_map(|s| s.iter().copied()).collect();
        let mut whole: Vec<&str> = DEFAULT_FILTERS.to_vec();
        halves.sort();
        whole.sort();
        assert_eq!(halves, whole);
    }

    #[test]
    fn an_oops_names_its_task_place_and_frames() {
        let console = "[  748.926649] BUG: kernel NULL pointer dereference, address: 0000000000000000\n\
                       [  748.928272] Oops: 0010 [#1] SMP NOPTI\n\
                       [  748.928900] CPU: 1 PID: 812 Comm: iperf3 Not tainted 5.10.0-46-amd64 #1 Debian 5.10.237-1\n\
                       [  748.929500] RIP: 0010:0x0\n\
                       [  748.930000] Call Trace:\n\
                       [  748.930100]  <IRQ>\n\
                       [  748.930200]  ? skb_release_head_state+0x4e/0xa0\n\
                       [  748.930300]  __kfree_skb+0xe/0x20\n\
                       [  748.930400]  tcp_rcv_established+0x2d5/0x640\n\
                       [  748.930500] Modules linked in: veth bridge\n";
        assert_eq!(
            oops(console).as_deref(),
            Some("oops: in iperf3, RIP: 0010:0x0, call trace skb_release_head_state < __kfree_skb < tcp_rcv_established")
        );
        assert_eq!(oops("[ 1.0] all fine\n"), None);
    }

    #[test]
    fn a_run_that_ends_before_the_summary_is_broken() {
        let died = "running 3 tests\ntest fix::a ... ok\ntest follow::b ... ";
        assert_eq!(stopped_early(died).as_deref(), Some("the run ended during follow::b, before the suite's end"));
        let finished = "running 1 test\ntest fix::a ... ok\n\ntest result: ok. 1 passed; 0 failed\n";
        assert_eq!(stopped_early(finished), None);
    }

    #[test]
    fn libtest_output_becomes_outcomes() {
        let out = "\
running 3 tests
test fix::a ... ok
test follow::b ... FAILED
test lab::c ... ok
test lab::d ... ignored, needs a bridge

successes:

---- lab::c stdout ----
SKIPPED c: no fentry here

failures:

---- follow::b stdout ----

thread 'follow::b' (251) panicked at tests/src/lib.rs:96:9:
lab up failed: boom

failures:
    follow::b
";
        let r = parse_libtest(out);
        assert_eq!(r[0], ("fix::a".into(), Outcome::Pass));
        assert_eq!(r[1], ("follow::b".into(), Outcome::Fail("lab up failed: boom".into())));
        assert_eq!(r[2], ("lab::c".into(), Outcome::Skipped("no fentry here".into())));
        assert_eq!(r[3], ("lab::d".into(), Outcome::Skipped("needs a bridge".into())));
    }
}
