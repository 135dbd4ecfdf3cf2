//! Running the system's own tools (ip, bridge, iptables, nft, the CNI plugins) with clear errors.

use std::{
    io::Write,
    process::{Output, Stdio},
};

use anyhow::{bail, Context, Result};
use cnitrace_tools::Tool;

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(tool: &Tool, args: &[&str]) -> Result<String> {
    let out = output(tool, args, None)?;
    check(tool, args, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with `input` on stdin.
pub fn run_stdin(tool: &Tool, args: &[&str], input: &str) -> Result<String> {
    let out = output(tool, args, Some(input))?;
    check(tool, args, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command and reports only whether it succeeded.
pub fn succeeds(tool: &Tool, args: &[&str]) -> bool {
    output(tool, args, None).map(|o| o.status.success()).unwrap_or(false)
}

/// Runs `prog args` inside the named network namespace: started from a thread that entered it (what
/// `ip netns exec` does, without its own process start and mount namespace: the tools run here speak
/// netlink or read /proc/sys/net, neither needs the namespace's /sys).
pub fn run_in(ns: &str, tool: &Tool, args: &[&str]) -> Result<String> {
    run_in_with(ns, tool, args, None)
}

pub fn run_in_stdin(ns: &str, tool: &Tool, args: &[&str], input: &str) -> Result<String> {
    run_in_with(ns, tool, args, Some(input))
}

fn run_in_with(ns: &str, tool: &Tool, args: &[&str], input: Option<&str>) -> Result<String> {
    let out = output_in_with(ns, tool, args, input)?;
    check(tool, args, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`output`] inside the named network namespace.
pub fn output_in(ns: &str, tool: &Tool, args: &[&str]) -> Result<Output> {
    output_in_with(ns, tool, args, None)
}

fn output_in_with(ns: &str, tool: &Tool, args: &[&str], input: Option<&str>) -> Result<Output> {
    let (tool, args, input) = (*tool, args.iter().map(|a| a.to_string()).collect::<Vec<_>>(), input.map(str::to_string));
    crate::netns::in_netns(&crate::netns::named(ns), move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        output(&tool, &args, input.as_deref())
    })
    .with_context(|| format!("in namespace {ns}"))
}

/// Runs a command with optional stdin and returns its raw output, whatever its exit status.
pub fn output(tool: &Tool, args: &[&str], input: Option<&str>) -> Result<Output> {
    let mut cmd = tool.command();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().with_context(|| format!("cannot run {} ({}; is it installed? `cargo xtask setup`)", tool.program, tool.used_for))?;
    if let Some(input) = input {
        child.stdin.take().expect("piped stdin").write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

fn check(tool: &Tool, args: &[&str], out: &Output) -> Result<()> {
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        let msg = if err.is_empty() { String::from_utf8_lossy(&out.stdout).trim().to_string() } else { err.to_string() };
        bail!("`{} {}` failed: {}", tool.program, args.join(" "), msg);
    }
    Ok(())
}

/// Writes a sysctl (`net.ipv4.ip_forward`) through /proc/sys, which shows the network namespace of the
/// calling thread: run it inside [`crate::netns::in_netns`] for another namespace's.
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key);
    std::fs::write(&path, format!("{value}\n")).with_context(|| format!("write {path}"))
}

/// Reads a sysctl of the calling thread's namespace, trimmed.
pub fn read_sysctl(key: &str) -> Result<String> {
    let path = sysctl_path(key);
    Ok(std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?.trim().to_string())
}

fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

/// Has `handler` (which must only store to an atomic) run on SIGINT and SIGTERM: a command that runs
/// until stopped ends in order (a verdict, probes detached, a socket removed).
pub fn on_stop_signals(handler: extern "C" fn(libc::c_int)) {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(SigHandler::Handler(handler), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handlers given here only store to an atomic.
    unsafe {
        let _ = sigaction(Signal::SIGINT, &act);
        let _ = sigaction(Signal::SIGTERM, &act);
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// An HTTP request's head (up to the blank line, 16 KiB at most) read from `s`: what the small servers
/// here read before answering (closing with unread data would reset the connection).
pub fn read_http_head(s: &mut impl std::io::Read) -> Vec<u8> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    req
}
