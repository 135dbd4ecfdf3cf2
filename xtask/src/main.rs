//! cnitrace's task runner: it orchestrates (setup, build, test, demo) and builds nothing itself; the eBPF
//! object is built by cnitrace's build.rs.

mod bench;
mod cluster;
mod demo;
mod docs;
mod install;
mod neighbour;
mod setup;
mod test;
mod vm;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build, the lab and the tests need, the VM kernels included (idempotent).
    Setup {
        /// Only what the host build and tests need: no qemu, no VM kernels.
        #[arg(long)]
        host_only: bool,
    },
    /// Set up if needed, then build the release binary (eBPF included).
    Build,
    /// Set up if needed, build, run the unit tests, then the kernel tests (root) on the host kernel and
    /// in VMs with other kernels (default: 5.10), and print the matrix.
    Test {
        /// Only kernel tests whose name contains this (repeatable: any of them).
        #[arg(long)]
        filter: Vec<String>,
        /// A VM kernel to run the kernel tests on: 5.10, 6.1, 6.12, 7.2 (repeatable; `none` for the host only).
        #[arg(long = "kernel", value_name = "VERSION")]
        kernels: Vec<String>,
        /// Every kernel of the matrix (5.10, 6.1, 6.12, 7.2).
        #[arg(long = "kernels", value_name = "all", value_parser = ["all"])]
        all: Option<String>,
        /// Skip the host kernel (only the VMs).
        #[arg(long)]
        no_host: bool,
        /// Minutes one VM (boot + suite) may take before it is stopped and reported broken (default:
        /// 60 for the kernel-dependent subset CI runs, 120 for the whole suite: 7.2 took 52.5 min here).
        #[arg(long)]
        vm_timeout: Option<u64>,
        /// VMs at once (default: one per core).
        #[arg(long, default_value_t = 0)]
        jobs: usize,
        /// CPUs of each VM (default: 1 when several VMs run at once, else up to 2).
        #[arg(long)]
        vm_cpus: Option<usize>,
        /// Run the host's suite without another cluster's namespaces and eBPF programs beside it (by
        /// default one is up for the whole run, as on a developer's host).
        #[arg(long)]
        alone: bool,
        /// Run without the real cluster's tests (`cluster::`): for a machine without Go, which builds its
        /// programs. Without this flag a missing program is an error, never a silent skip.
        #[arg(long)]
        no_cluster: bool,
        /// Instead of the suite: N generated layouts (seeds 1000..1000+N, 1–3 nodes, each with every
        /// fault it can hold) on the host kernel, with the figures per fault. Not in CI.
        #[arg(long, value_name = "N")]
        soak: Option<u64>,
    },
    /// Build, then install the binary, its shell completions (bash, zsh, fish) and its man page.
    Install {
        /// Where: PREFIX/bin, PREFIX/share/… (as `make install` puts them).
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Stage the tree under this folder instead of writing to PREFIX itself (for packaging).
        #[arg(long)]
        destdir: Option<PathBuf>,
    },
    /// The main job on the built-in lab: the seed's incident, traced.
    Demo {
        /// On the lab's real cluster (the real API server, flanneld, kube-proxy), pods by name.
        #[arg(long)]
        kubernetes: bool,
    },
    /// Regenerate docs/causes.md from the cause files and the recorded fixtures.
    Docs,
    /// What tracing costs, on the lab (root): throughput, CPU, start-up, time to verdict, capacity, RSS.
    Bench {
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// One repeat of 1 s per figure (a smoke run; the figures are noisier).
        #[arg(long)]
        quick: bool,
        /// Only the real cluster's figures (`lab up --kubernetes`): its start, the time to a verdict by
        /// pod name, `fix` by pod name.
        #[arg(long)]
        kubernetes: bool,
    },
    /// (bench helper) Send 18-byte UDP datagrams to ADDR for SECS seconds at PPS packets/s (0: as fast
    /// as one core can); prints how many were sent. Run inside a lab pod by the bench.
    #[command(hide = true)]
    UdpFlood { addr: std::net::SocketAddr, secs: f64, pps: u64 },
    /// (bench helper) Receive UDP on PORT for SECS seconds; prints how many datagrams arrived.
    #[command(hide = true)]
    UdpSink { port: u16, secs: f64 },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.command {
        Task::Setup { host_only } => setup::run(false).and_then(|_| {
            if host_only {
                return Ok(());
            }
            let all: Vec<&str> = vm::KERNELS.iter().map(|k| k.name).collect();
            if !vm::ensure(&all)? {
                println!("setup: qemu, virtme-ng and the kernels {} are in {}; nothing to do", all.join(", "), vm::cache_dir().display());
            }
            Ok(())
        }),
        Task::Build => setup::run(true).and_then(|_| build()).map(|_| ()),
        Task::Test { soak: Some(n), .. } => test::soak(n),
        Task::Test { filter, mut kernels, all, no_host, vm_timeout, jobs, vm_cpus, alone, no_cluster, soak: None } => {
            if all.is_some() {
                kernels.push("all".into());
            }
            test::run(test::Options { filter, kernels, no_host, vm_timeout_min: vm_timeout, jobs, vm_cpus, alone, no_cluster })
        }
        Task::Install { prefix, destdir } => setup::run(true).and_then(|_| build()).and_then(|bin| {
            for f in install::install(&bin, &prefix, destdir.as_deref())? {
                println!("installed {}", f.display());
            }
            Ok(())
        }),
        Task::Demo { kubernetes } => demo::run(kubernetes),
        Task::Docs => docs::run(),
        Task::Bench { json, quick, kubernetes } => bench::run(json, quick, kubernetes),
        Task::UdpFlood { addr, secs, pps } => bench::udp_flood(addr, secs, pps),
        Task::UdpSink { port, secs } => bench::udp_sink(port, secs),
    };
    if let Err(e) = r {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// `cargo build --release` of the cnitrace binary; returns its path.
pub fn build() -> Result<PathBuf> {
    let root = workspace_root();
    cargo(&["build", "--release", "-p", "cnitrace"])?;
    Ok(root.join("target/release/cnitrace"))
}

pub fn cargo(args: &[&str]) -> Result<()> {
    let st = setup::cargo_command()
        .args(args)
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin())
        .status()
        .context("run cargo")?;
    if !st.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}
