//! `cargo xtask setup`: everything the build, the lab, the tests, the VMs and the bench run, installed
//! idempotently. Every install list of the project is here, and the unit tests check them against
//! `cnitrace_tools::ALL`, the table of every external program the workspace runs: a program whose
//! package is dropped from these lists fails `cargo xtask test` before anything else runs.
//!
//! Debian's rustc-web (with the precompiled core for bpfel-unknown-none) builds the eBPF crate;
//! bpf-linker must be built against the LLVM major version that rustc uses, read from `rustc -vV`.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{bail, Context, Result};
use cnitrace_tools::{self as tools, Tool};

/// What building cnitrace, the lab and the host's kernel tests need.
pub const HOST_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "iproute2",
    "iptables",
    "nftables",
    "iputils-ping",
    "iperf3",
    "containernetworking-plugins",
    "procps",
    "kmod",
    "curl",
    "bpftrace",
    // The lab's DNS server: the binary only (the `dnsmasq` package would also start a system service).
    "dnsmasq-base",
    // The terminal tests (fix's prompt, colours) run in a real terminal.
    "tmux",
    // `follow --write` is read back by Wireshark's own dissectors (tshark; capinfos is wireshark-common's).
    "tshark",
    "wireshark-common",
    // Setup's Python venv (kubernetes-validate for the deploy manifests; virtme-ng for the VMs).
    "python3-minimal",
    "python3-venv",
];
/// What the kernel matrix's VMs need on the host: qemu (TCG), busybox (virtme-ng's initramfs), udev
/// (virtme-ng's init), kmod (depmod for the extracted modules), file (virtme-ng reads the image's
/// version with it), xz-utils (Debian's package indexes), Debian's python3 with its venv module
/// (virtme-ng's venv), and the
/// libraries virtiofsd builds against.
pub const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "udev", "kmod", "file", "xz-utils", "python3-minimal", "python3-venv", "libseccomp-dev", "libcap-ng-dev"];
/// What `cargo xtask bench` needs besides the host's: perf, for the tracer's sampled share.
pub const BENCH_PACKAGES: &[&str] = &["linux-perf"];
/// `cargo install`s: (crate, version). bpf-linker's LLVM feature is chosen at install time.
pub const CARGO_INSTALLS: &[(&str, &str)] = &[("bpf-linker", "0.13.0"), ("virtiofsd", "1.14.0")];
/// pip installs into setup's venv (in the VM cache folder): (package, version).
pub const PIP_INSTALLS: &[(&str, &str)] = &[("virtme-ng", "1.42"), ("kubernetes-validate", "1.37.0")];
/// Of PIP_INSTALLS, what the host's tests need (the rest: the VMs).
pub const HOST_PIP: &[&str] = &["kubernetes-validate"];

/// Where setup keeps what it fetched for the VMs and its Python tools (`CNITRACE_VM_CACHE`, else
/// `~/.cache/cnitrace/vm`).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CNITRACE_VM_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| home().join(".cache"));
    base.join("cnitrace/vm")
}

/// Setup's Python venv: its `bin` holds the programs of PIP_INSTALLS.
pub fn venv() -> std::path::PathBuf {
    cache_dir().join("venv")
}

/// pip-installs each of `pkgs` (of PIP_INSTALLS) whose program is not in the venv yet; true if any was.
pub fn ensure_pip(pkgs: &[&str]) -> Result<bool> {
    let mut did = false;
    for pkg in pkgs {
        let (_, version) = PIP_INSTALLS.iter().find(|(p, _)| p == pkg).with_context(|| format!("{pkg} is not in PIP_INSTALLS"))?;
        let program = tools::ALL.iter().find(|t| matches!(t.source, cnitrace_tools::Source::Pip(p) if p == *pkg)).map(|t| t.program).unwrap_or(pkg);
        if venv().join("bin").join(program).exists() {
            continue;
        }
        std::fs::create_dir_all(cache_dir())?;
        if !venv().join("bin/pip").exists() {
            // Debian's python3 (python3-venv is in HOST_PACKAGES): the same on every machine of this kind.
            if !tools::PYTHON3.command().args(["-m", "venv"]).arg(venv()).status().context("python3 -m venv")?.success() {
                bail!("could not create a Python venv at {}", venv().display());
            }
        }
        let spec = format!("{pkg}=={version}");
        println!("setup: pip install {spec} into {}", venv().display());
        let st = std::process::Command::new(venv().join("bin/pip")).args(["install", "-q", &spec]).status().context("run pip")?;
        if !st.success() {
            bail!("pip install {spec} failed");
        }
        did = true;
    }
    Ok(did)
}

pub fn cargo_version(krate: &str) -> &'static str {
    CARGO_INSTALLS.iter().find(|(k, _)| *k == krate).map(|(_, v)| *v).expect("a crate of CARGO_INSTALLS")
}

/// Installs what is missing. `quiet_if_done`: say nothing when nothing was needed (build/test/demo).
/// Returns whether anything was installed.
pub fn run(quiet_if_done: bool) -> Result<bool> {
    let t0 = Instant::now();
    let mut did = ensure_packages(HOST_PACKAGES)?;
    let llvm = rustc_llvm_major()?;
    let llvm_dev = format!("llvm-{llvm}-dev");
    if !installed(&llvm_dev) {
        apt_install(&[&llvm_dev])?;
        did = true;
    }
    if bpf_linker_llvm().as_deref() != Some(llvm.as_str()) {
        install_bpf_linker(&llvm)?;
        did = true;
    }
    did |= ensure_pip(HOST_PIP)?;
    did |= crate::cluster::ensure()?;
    let linker = cargo_version("bpf-linker");
    // What the machine image must bring (setup cannot install it): said once, and the tests that need
    // it skip with the same reason.
    for t in tools::ALL {
        if let cnitrace_tools::Source::Machine(from) = t.source {
            // Go answers from the image's own folder too (crate::cluster::go_program).
            let found_elsewhere = t.program == tools::GO.program && crate::cluster::go_program().is_some();
            if !on_path(t.program) && !found_elsewhere {
                println!("setup: {} is not on PATH (it comes with {from}): {} will be skipped", t.program, t.used_for);
            }
        }
    }
    if did {
        println!("setup: done in {:.0} s", t0.elapsed().as_secs_f64());
    } else if !quiet_if_done {
        println!("setup: everything is installed (Debian rustc with LLVM {llvm}, bpf-linker {linker} for LLVM {llvm}); nothing to do");
    }
    Ok(did)
}

/// Is `program` an executable file in one of PATH's folders?
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)))
}

/// Installs the packages of `pkgs` that are missing; returns whether it installed any.
pub fn ensure_packages(pkgs: &[&str]) -> Result<bool> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    apt_install(&missing)?;
    Ok(true)
}

fn installed(pkg: &str) -> bool {
    tools::DPKG_QUERY
        .command()
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    require_root("install Debian packages")?;
    println!("setup: apt-get install {}", pkgs.join(" "));
    sh(&tools::APT_GET, &["update", "-qq"])?;
    let mut wanted: Vec<String> = pkgs.iter().map(|p| p.to_string()).collect();
    let mut downgrades = false;
    let removed = apt_removals(&wanted);
    if !removed.is_empty() {
        // A package the machine has from elsewhere (a backport) can break what we install from the
        // release: seen, the image's qemu-utils 10.0 breaks Debian 12's qemu-system-common, and apt
        // removed it. Asking for the release's own version of each keeps the program (older) instead.
        let release = os_codename();
        let keep: Vec<String> = removed.iter().map(|(p, _)| format!("{p}/{release}")).collect();
        let with_keep: Vec<String> = wanted.iter().cloned().chain(keep).collect();
        let list = removed.iter().map(|(p, v)| format!("{p} {v}")).collect::<Vec<_>>().join(", ");
        if release.is_empty() || !apt_removals(&with_keep).is_empty() {
            println!("setup: NOTE: to install {} apt removes {list} from this machine", pkgs.join(" "));
        } else {
            let names = removed.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>().join(" ");
            println!("setup: NOTE: installing {} would make apt remove this machine's {list} (they conflict); {release}'s own {names} is installed in its place instead: the programs stay, at {release}'s version", pkgs.join(" "));
            wanted = with_keep;
            downgrades = true;
        }
    }
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    if downgrades {
        args.push("--allow-downgrades");
    }
    args.extend(wanted.iter().map(String::as_str));
    let st = tools::APT_GET.command().args(&args).env("DEBIAN_FRONTEND", "noninteractive").status().context("run apt-get")?;
    if !st.success() {
        bail!("apt-get install {} failed", pkgs.join(" "));
    }
    Ok(())
}

/// The packages (and their versions) `apt-get install PKGS` would remove, from a simulated run.
fn apt_removals(pkgs: &[String]) -> Vec<(String, String)> {
    let Ok(out) = tools::APT_GET.command().args(["-s", "install", "--no-install-recommends"]).args(pkgs).output() else { return Vec::new() };
    parse_removals(&String::from_utf8_lossy(&out.stdout))
}

/// `Remv qemu-utils [1:10.0.2+ds-2]` lines of `apt-get -s`.
fn parse_removals(sim: &str) -> Vec<(String, String)> {
    sim.lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .map(|r| {
            let (name, rest) = r.split_once(' ').unwrap_or((r, ""));
            (name.to_string(), rest.trim().trim_start_matches('[').split(']').next().unwrap_or("").to_string())
        })
        .collect()
}

/// The release's codename ("bookworm"), from /etc/os-release.
fn os_codename() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default()
}

/// The LLVM major version Debian's rustc was built with ("LLVM version: 22.1.8" → "22").
fn rustc_llvm_major() -> Result<String> {
    let out = tools::DEBIAN_RUSTC.command().arg("-vV").output().context("run /usr/bin/rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_string)
        .context("`/usr/bin/rustc -vV` names no LLVM version")
}

/// The LLVM feature the installed bpf-linker was built with, from cargo's install records.
fn bpf_linker_llvm() -> Option<String> {
    let which = tools::BPF_LINKER.command().env("PATH", path_with_cargo_bin()).arg("--version").output().ok()?;
    if !which.status.success() {
        return None;
    }
    let home = std::env::var("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|_| home().join(".cargo"));
    let record = std::fs::read_to_string(home.join(".crates2.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&record).ok()?;
    let installs = v.get("installs")?.as_object()?;
    let (_, entry) = installs.iter().find(|(k, _)| k.starts_with("bpf-linker "))?;
    entry.get("features")?.as_array()?.iter().filter_map(|f| f.as_str()).find_map(|f| f.strip_prefix("llvm-")).map(str::to_string)
}

fn install_bpf_linker(llvm: &str) -> Result<()> {
    let version = cargo_version("bpf-linker");
    println!("setup: cargo install bpf-linker {version} for LLVM {llvm} (about 1.5 min)");
    let prefix = format!("/usr/lib/llvm-{llvm}");
    let feature = format!("llvm-{llvm}");
    let st = cargo_command()
        .args(["install", &format!("bpf-linker@{version}"), "--locked", "--force", "--no-default-features", "--features", &feature])
        .env("LLVM_PREFIX", &prefix)
        .env("PATH", path_with_cargo_bin())
        .status()
        .context("run cargo install")?;
    if !st.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}

/// The cargo running this task (`CARGO`), else the toolchain's on PATH.
pub fn cargo_command() -> Command {
    match std::env::var_os("CARGO") {
        Some(c) => Command::new(c),
        None => tools::CARGO.command(),
    }
}

fn sh(tool: &Tool, args: &[&str]) -> Result<()> {
    let st = tool.command().args(args).status().with_context(|| format!("run {}", tool.program))?;
    if !st.success() {
        bail!("`{} {}` failed", tool.program, args.join(" "));
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    let uid = tools::ID.command().arg("-u").output().context("run id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("setup needs root to {what}: run `sudo cargo xtask setup`");
    }
    Ok(())
}

pub fn home() -> PathBuf {
    std::env::var("HOME").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/root"))
}

/// PATH with cargo's bin folder in it (bpf-linker lives there; CI's PATH may lack it).
pub fn path_with_cargo_bin() -> String {
    let cargo_bin = std::env::var("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|_| home().join(".cargo")).join("bin");
    let path = std::env::var("PATH").unwrap_or_default();
    if path.split(':').any(|p| std::path::Path::new(p) == cargo_bin) {
        path
    } else {
        format!("{}:{path}", cargo_bin.display())
    }
}

/// The tools whose source none of `apt`, `cargo`, `pip` installs, each as a line saying what is missing.
#[cfg(test)]
fn uncovered(table: &[Tool], apt: &[&str], cargo: &[&str], pip: &[&str]) -> Vec<String> {
    use cnitrace_tools::Source;
    table
        .iter()
        .filter_map(|t| {
            let (covered, from) = match t.source {
                Source::Apt(p) => (apt.contains(&p), format!("Debian package {p}")),
                Source::Cargo(c) => (cargo.contains(&c), format!("cargo install {c}")),
                Source::Pip(p) => (pip.contains(&p), format!("pip install {p}")),
                Source::Base(_) | Source::Toolchain | Source::Machine(_) | Source::Go(_) => (true, String::new()),
            };
            (!covered).then(|| format!("{} ({}) needs {from}, which `cargo xtask setup` does not install", t.program, t.used_for))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use cnitrace_tools::Source;

    use super::*;

    fn all_apt() -> Vec<&'static str> {
        HOST_PACKAGES.iter().chain(VM_PACKAGES).chain(BENCH_PACKAGES).copied().collect()
    }

    fn cargo_crates() -> Vec<&'static str> {
        CARGO_INSTALLS.iter().map(|(c, _)| *c).collect()
    }

    fn pip_packages() -> Vec<&'static str> {
        PIP_INSTALLS.iter().map(|(p, _)| *p).collect()
    }

    #[test]
    fn every_program_the_project_runs_is_installed_by_setup() {
        let missing = uncovered(tools::ALL, &all_apt(), &cargo_crates(), &pip_packages());
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    #[test]
    fn a_package_dropped_from_setup_is_named() {
        let apt: Vec<&str> = all_apt().into_iter().filter(|p| *p != "busybox-static").collect();
        let missing = uncovered(tools::ALL, &apt, &cargo_crates(), &pip_packages());
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(missing[0].starts_with("busybox (virtme-ng's initramfs) needs Debian package busybox-static"), "{}", missing[0]);
        let missing = uncovered(tools::ALL, &all_apt(), &["bpf-linker"], &pip_packages());
        assert!(missing.iter().any(|m| m.starts_with("virtiofsd ")), "{missing:?}");
    }

    /// The table's word checked against dpkg's own: each installed package holds its program, and a
    /// base package really is part of every Debian system. Where dpkg or a package is absent it says
    /// so; `cargo xtask test` runs after setup, so there every Apt package is checked.
    #[test]
    fn where_a_package_is_installed_it_holds_the_program() {
        if tools::DPKG_QUERY.command().arg("--version").output().is_err() {
            println!("SKIPPED where_a_package_is_installed_it_holds_the_program: no dpkg on this machine");
            return;
        }
        let (mut checked, mut absent) = (0, Vec::new());
        for t in tools::ALL {
            let pkg = match t.source {
                Source::Apt(p) | Source::Base(p) => p,
                _ => continue,
            };
            let files = tools::DPKG_QUERY.command().args(["-L", pkg]).output().expect("dpkg-query -L");
            if !files.status.success() {
                absent.push(pkg);
                continue;
            }
            let files = String::from_utf8_lossy(&files.stdout);
            let holds = files.lines().any(|f| if t.program.starts_with('/') { f == t.program } else { f.ends_with(&format!("bin/{}", t.program)) });
            assert!(holds, "Debian package {pkg} holds no {} (the table says it provides it)", t.program);
            if let Source::Base(p) = t.source {
                let prio = tools::DPKG_QUERY.command().args(["-W", "-f=${Essential} ${Priority}", p]).output().expect("dpkg-query -W");
                let prio = String::from_utf8_lossy(&prio.stdout).to_string();
                assert!(prio.starts_with("yes") || prio.ends_with("required"), "{p} is neither Essential nor required ({prio}): setup must install it");
            }
            checked += 1;
        }
        println!("checked {checked} tools against dpkg; packages not installed here: {absent:?}");
    }

    /// Every call site goes through the table: no program started by a name written at the call.
    #[test]
    fn no_call_site_names_a_program() {
        let root = crate::workspace_root();
        let mut bad = Vec::new();
        let mut stack: Vec<PathBuf> = ["cnitrace", "xtask", "tests"].iter().map(|d| root.join(d)).collect();
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).expect("read a source folder").filter_map(|e| e.ok()).map(|e| e.path()));
                continue;
            }
            if p.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).expect("read a source file");
            for (i, line) in text.lines().enumerate() {
                // The patterns, split so this file does not match itself.
                let literal_program = line.contains(concat!("Command::new", "(\""));
                let netns_exec = line.contains(concat!("\"netns\", ", "\"exec\""));
                if literal_program || netns_exec {
                    bad.push(format!("{}:{}: {}", p.strip_prefix(&root).unwrap_or(&p).display(), i + 1, line.trim()));
                }
            }
        }
        assert!(bad.is_empty(), "programs started without cnitrace_tools (use tools::X.command() / .in_netns(ns)):\n{}", bad.join("\n"));
    }

    #[test]
    fn apt_removals_are_read_from_a_simulated_run() {
        let sim = "Inst kmod (30+20221128-1 Debian:12.15/oldstable [amd64])\nRemv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]\n";
        assert_eq!(parse_removals(sim), vec![("qemu-utils".to_string(), "1:10.0.2+ds-2+deb13u1~bpo12+1".to_string())]);
    }
}
