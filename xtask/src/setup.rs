//! `cargo xtask setup`: the Debian packages and bpf-linker the project needs, installed idempotently.
//!
//! Debian's rustc-web (with the precompiled core for bpfel-unknown-none) builds the eBPF crate;
//! bpf-linker must be built against the LLVM major version that rustc uses, read from `rustc -vV`.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{bail, Context, Result};

/// Packages whose names do not depend on the machine.
const PACKAGES: &[&str] = &[
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
    "curl",
    "bpftrace",
];
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs what is missing. `quiet_if_done`: say nothing when nothing was needed (build/test/demo).
/// Returns whether anything was installed.
pub fn run(quiet_if_done: bool) -> Result<bool> {
    let t0 = Instant::now();
    let mut did = ensure_packages(PACKAGES)?;
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
    if did {
        println!("setup: done in {:.0} s", t0.elapsed().as_secs_f64());
    } else if !quiet_if_done {
        println!("setup: everything is installed (Debian rustc with LLVM {llvm}, bpf-linker {BPF_LINKER_VERSION} for LLVM {llvm}); nothing to do");
    }
    Ok(did)
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
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    require_root("install Debian packages")?;
    println!("setup: apt-get install {}", pkgs.join(" "));
    sh("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(pkgs);
    let st = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get")?;
    if !st.success() {
        bail!("apt-get install {} failed", pkgs.join(" "));
    }
    Ok(())
}

/// The LLVM major version Debian's rustc was built with ("LLVM version: 22.1.8" → "22").
fn rustc_llvm_major() -> Result<String> {
    let out = Command::new(DEBIAN_RUSTC).arg("-vV").output().context("run /usr/bin/rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_string)
        .context("`/usr/bin/rustc -vV` names no LLVM version")
}

/// The LLVM feature the installed bpf-linker was built with, from cargo's install records.
fn bpf_linker_llvm() -> Option<String> {
    let which = Command::new("bpf-linker").env("PATH", path_with_cargo_bin()).arg("--version").output().ok()?;
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
    println!("setup: cargo install bpf-linker {BPF_LINKER_VERSION} for LLVM {llvm} (about 1.5 min)");
    let prefix = format!("/usr/lib/llvm-{llvm}");
    let feature = format!("llvm-{llvm}");
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--force", "--no-default-features", "--features", &feature])
        .env("LLVM_PREFIX", &prefix)
        .env("PATH", path_with_cargo_bin())
        .status()
        .context("run cargo install")?;
    if !st.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}

fn sh(prog: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(prog).args(args).status().with_context(|| format!("run {prog}"))?;
    if !st.success() {
        bail!("`{prog} {}` failed", args.join(" "));
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    let uid = Command::new("id").arg("-u").output().context("run id -u")?;
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
    if path.split(':').any(|p| PathBuf::from(p) == cargo_bin) {
        path
    } else {
        format!("{}:{path}", cargo_bin.display())
    }
}
