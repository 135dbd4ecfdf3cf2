//! Running the system's own tools (ip, bridge, iptables, nft, the CNI plugins) with clear errors.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use anyhow::{bail, Context, Result};

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = output(prog, args, None)?;
    check(prog, args, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with `input` on stdin.
pub fn run_stdin(prog: &str, args: &[&str], input: &str) -> Result<String> {
    let out = output(prog, args, Some(input))?;
    check(prog, args, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command and reports only whether it succeeded.
pub fn succeeds(prog: &str, args: &[&str]) -> bool {
    output(prog, args, None).map(|o| o.status.success()).unwrap_or(false)
}

/// Runs `prog args` inside the named network namespace (`ip netns exec`).
pub fn run_in(ns: &str, prog: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, prog];
    full.extend_from_slice(args);
    run("ip", &full)
}

pub fn run_in_stdin(ns: &str, prog: &str, args: &[&str], input: &str) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, prog];
    full.extend_from_slice(args);
    run_stdin("ip", &full, input)
}

/// Runs a command with optional stdin and returns its raw output, whatever its exit status.
pub fn output(prog: &str, args: &[&str], input: Option<&str>) -> Result<Output> {
    let mut cmd = Command::new(prog);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().with_context(|| format!("cannot run {prog} (is it installed? `cargo xtask setup`)"))?;
    if let Some(input) = input {
        child.stdin.take().expect("piped stdin").write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

fn check(prog: &str, args: &[&str], out: &Output) -> Result<()> {
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        let msg = if err.is_empty() { String::from_utf8_lossy(&out.stdout).trim().to_string() } else { err.to_string() };
        bail!("`{} {}` failed: {}", prog, args.join(" "), msg);
    }
    Ok(())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
