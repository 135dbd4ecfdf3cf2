//! `cargo xtask demo`: the seed's incident on the built-in lab — debug (10.244.0.20) cannot reach
//! jellyfin (10.244.0.19) on storagenodet3500 — shown failing, traced, fixed, and shown working.

use std::process::Command;

use anyhow::{bail, Context, Result};
use cnitrace_tools::{self as tools, Tool};

const FAULT: &str = "veth-detached";

pub fn run() -> Result<()> {
    crate::setup::run(true)?;
    let bin = crate::build()?;
    let cnitrace = |args: &[&str]| -> Result<i32> {
        println!("\n$ sudo cnitrace {}", args.join(" "));
        let st = Command::new(&bin).args(args).status().context("run cnitrace")?;
        Ok(st.code().unwrap_or(-1))
    };
    let shell = |ns: &str, tool: &Tool, args: &[&str]| -> Result<i32> {
        println!("\n$ ip netns exec {ns} {} {}", tool.name(), args.join(" "));
        let st = tool.in_netns(ns).args(args).status().context("run ip netns exec")?;
        Ok(st.code().unwrap_or(-1))
    };
    let _ = Command::new(&bin).args(["lab", "down"]).output();
    if cnitrace(&["lab", "up", "--fault", FAULT])? != 0 {
        bail!("the lab did not come up");
    }
    let result = (|| -> Result<()> {
        println!("\n# The incident: the debug pod cannot reach jellyfin on the same node.");
        shell("cnitrace-pod-debug", &tools::PING, &["-c", "2", "-W", "1", "10.244.0.19"])?;
        println!("\n# cnitrace follows the packets through the kernel and names where and why they die.");
        cnitrace(&["follow", "10.244.0.20", "10.244.0.19"])?;
        println!("\n# cnitrace repairs it, traces again to prove it, and keeps a journal to undo it.");
        if cnitrace(&["fix", "--auto"])? != 0 {
            bail!("the fix did not verify");
        }
        println!("\n# The pods talk again.");
        if shell("cnitrace-pod-debug", &tools::PING, &["-c", "2", "-W", "1", "10.244.0.19"])? != 0 {
            bail!("ping still fails after the fix");
        }
        if shell("cnitrace-pod-debug", &tools::CURL, &["-sS", "-m", "3", "http://10.244.0.19:8096/"])? != 0 {
            bail!("HTTP to jellyfin still fails after the fix");
        }
        println!("\n# The incident's validation, from the debug pod: jellyfin by the name its DNS gives, DNS through");
        println!("# the pod's own resolver, an external HTTPS site (the lab's, with the lab's CA).");
        // The lab's CA: its state folder (cnitrace::lab::STATE_ROOT) under the default prefix.
        let ca = "/run/cnitrace/lab/cnitrace/ca.pem";
        if cnitrace(&["validate", "10.244.0.20", "jellyfin", "--external", "https://external.cnitrace.test/", "--cacert", ca])? != 0 {
            bail!("validate failed after the fix");
        }
        cnitrace(&["fix", "--history"])?;
        Ok(())
    })();
    cnitrace(&["lab", "down"])?;
    result
}
