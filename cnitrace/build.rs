//! Builds the eBPF programs (cnitrace-ebpf) with Debian's Rust toolchain and bpf-linker, so that the one
//! `cnitrace` binary embeds them. `cargo xtask setup` installs both.

use std::path::Path;

fn main() {
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cnitrace-ebpf");
    let ebpf_dir = ebpf_dir.canonicalize().expect("cnitrace-ebpf next to cnitrace");
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-changed=../cnitrace-common/src");

    // Debian's rustc-web (its own LLVM, the bpf core library from libstd-rust-web-dev-bpf) builds the
    // eBPF crate; rustup's toolchains here have no rust-src.
    let toolchain = std::env::var("CNITRACE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".into());
    println!("cargo:rerun-if-env-changed=CNITRACE_EBPF_TOOLCHAIN");
    if let Some(missing) = missing_tool(&toolchain) {
        eprintln!(
            "error: cannot build the eBPF programs: {missing}.\n       Run `cargo xtask setup` once (it installs Debian's Rust toolchain for the bpf target and bpf-linker)."
        );
        std::process::exit(1);
    }
    let pkg = aya_build::Package {
        name: "cnitrace-ebpf",
        root_dir: ebpf_dir.to_str().expect("utf-8 path"),
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([pkg], aya_build::Toolchain::Custom(&toolchain)) {
        eprintln!("error: building the eBPF programs failed: {e:#}\n       If the toolchain is incomplete, run `cargo xtask setup`.");
        std::process::exit(1);
    }
}

fn missing_tool(toolchain: &str) -> Option<String> {
    let rustc = Path::new(toolchain).join("bin/rustc");
    if !rustc.exists() {
        return Some(format!("{} is missing (Debian package rustc-web)", rustc.display()));
    }
    let bpf_core = Path::new(toolchain).join("lib/rustlib/bpfel-unknown-none");
    if !bpf_core.exists() {
        return Some(format!(
            "{} is missing (Debian package libstd-rust-web-dev-bpf)",
            bpf_core.display()
        ));
    }
    let linker_ok = cnitrace_tools::BPF_LINKER.command().arg("--version").output().map(|o| o.status.success());
    if !matches!(linker_ok, Ok(true)) {
        return Some("bpf-linker is not on PATH".into());
    }
    None
}
