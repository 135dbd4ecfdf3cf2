//! The real Kubernetes programs of the lab's cluster (`cnitrace lab up --kubernetes`), built from their
//! sources at pinned versions: each of the project's Go modules under `xtask/cluster/` requires one
//! upstream release (its go.mod and go.sum are committed) and names the programs it builds as `tool`s.
//!
//! A build runs `go build` per program into [`cnitrace_tools::cluster_bin_dir`] and then writes a stamp
//! naming the module files it was built from; while the stamp matches and every program is there, setup
//! runs nothing (a cached run costs the stamp check). Go's own caches (`~/go/pkg/mod`, `~/.cache/go-build`)
//! make a rebuild after a change cheap.

use std::{path::PathBuf, time::Instant};

use anyhow::{bail, Context, Result};
use cnitrace_tools::{self as tools, Source, Tool};

/// One program: the tool it is, and the Go package `go build` makes it from (in its tool's module).
pub struct Program {
    pub tool: &'static Tool,
    pub package: &'static str,
}

pub const PROGRAMS: &[Program] = &[
    Program { tool: &tools::ETCD, package: "go.etcd.io/etcd/server/v3" },
    Program { tool: &tools::KUBE_APISERVER, package: "k8s.io/kubernetes/cmd/kube-apiserver" },
    Program { tool: &tools::KUBE_CONTROLLER_MANAGER, package: "k8s.io/kubernetes/cmd/kube-controller-manager" },
    Program { tool: &tools::KUBE_SCHEDULER, package: "k8s.io/kubernetes/cmd/kube-scheduler" },
    Program { tool: &tools::KUBE_PROXY, package: "k8s.io/kubernetes/cmd/kube-proxy" },
    Program { tool: &tools::FLANNELD, package: "github.com/flannel-io/flannel" },
    Program { tool: &tools::CNI_FLANNEL, package: "github.com/containernetworking/plugins/plugins/meta/flannel" },
    Program { tool: &tools::COREDNS, package: "github.com/coredns/coredns" },
];

fn module_of(t: &Tool) -> &'static str {
    match t.source {
        Source::Go(m) => m,
        _ => unreachable!("a cluster program comes from a Go module"),
    }
}

pub fn module_dir(module: &str) -> PathBuf {
    crate::workspace_root().join("xtask/cluster").join(module)
}

/// What a build is made from: each module's go.mod and go.sum, as they are now.
fn fingerprint(module: &str) -> Result<String> {
    let dir = module_dir(module);
    let mut s = String::new();
    for f in ["go.mod", "go.sum"] {
        let text = std::fs::read_to_string(dir.join(f)).with_context(|| format!("read {}", dir.join(f).display()))?;
        s.push_str(&format!("== {f}\n{text}"));
    }
    Ok(s)
}

fn stamp(module: &str) -> PathBuf {
    tools::cluster_bin_dir().join(format!(".built-from-{module}"))
}

/// Is everything of `module` built from its module files as they are now?
fn up_to_date(module: &str) -> bool {
    let built = std::fs::read_to_string(stamp(module)).ok();
    built.is_some_and(|b| fingerprint(module).is_ok_and(|f| f == b))
        && PROGRAMS.iter().filter(|p| module_of(p.tool) == module).all(|p| p.tool.path().is_file())
}

/// Where the machine image installs Go. A non-interactive shell (CI's `bash .ci/run`) does not read the
/// ~/.bashrc that puts it on PATH, so setup looks there too rather than skip the real cluster.
const GO_HOME_BIN: &str = "/usr/local/go/bin";

/// The `go` that answers: PATH's, else the image's.
pub fn go_program() -> Option<PathBuf> {
    let answers = |p: &std::path::Path| std::process::Command::new(p).arg("version").output().is_ok_and(|o| o.status.success());
    [PathBuf::from(tools::GO.program), PathBuf::from(GO_HOME_BIN).join(tools::GO.program)].into_iter().find(|p| answers(p))
}

/// Builds what is missing or stale; returns whether anything was built.
pub fn ensure() -> Result<bool> {
    let mut modules: Vec<&str> = PROGRAMS.iter().map(|p| module_of(p.tool)).collect();
    modules.dedup();
    let stale: Vec<&str> = modules.into_iter().filter(|m| !up_to_date(m)).collect();
    if stale.is_empty() {
        return Ok(false);
    }
    let Some(go) = go_program() else {
        // Said once here; the real cluster's tests skip with the same reason.
        println!("setup: go is not on PATH nor in {GO_HOME_BIN}: the real cluster's programs ({}) are not built", stale.join(", "));
        return Ok(false);
    };
    let bin = tools::cluster_bin_dir();
    for module in stale {
        let t0 = Instant::now();
        for p in PROGRAMS.iter().filter(|p| module_of(p.tool) == module) {
            let out = p.tool.path();
            std::fs::create_dir_all(out.parent().expect("a folder")).with_context(|| format!("create {}", bin.display()))?;
            println!("setup: go build {} → {}", p.package, out.display());
            let st = std::process::Command::new(&go)
                .args(["build", "-o"])
                .arg(&out)
                .arg(p.package)
                .current_dir(module_dir(module))
                // The Go of the machine, never a toolchain download; no VCS stamping (a module, not a checkout).
                .env("GOTOOLCHAIN", "local")
                .env("GOFLAGS", "-buildvcs=false -mod=readonly")
                .status()
                .context("run go build")?;
            if !st.success() {
                bail!("go build {} (module xtask/cluster/{module}) failed", p.package);
            }
        }
        std::fs::write(stamp(module), fingerprint(module)?)?;
        println!("setup: the cluster's {module} programs built in {:.0} s", t0.elapsed().as_secs_f64());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every Go-built tool of the table is built here, from a module the project has, whose go.mod
    /// names it as a tool (so `go mod tidy` keeps what it needs).
    #[test]
    fn every_go_built_program_is_built_from_a_module_that_names_it() {
        for t in tools::ALL.iter().filter(|t| matches!(t.source, Source::Go(_))) {
            let p = PROGRAMS.iter().find(|p| p.tool.program == t.program).unwrap_or_else(|| panic!("{} is built by nobody", t.program));
            let gomod = std::fs::read_to_string(module_dir(module_of(t)).join("go.mod")).expect("the module's go.mod");
            let tools_named = gomod.split("tool").skip(1).any(|s| s.contains(p.package));
            assert!(tools_named, "xtask/cluster/{}/go.mod does not name {} as a tool", module_of(t), p.package);
            assert!(module_dir(module_of(t)).join("go.sum").exists());
        }
    }
}
