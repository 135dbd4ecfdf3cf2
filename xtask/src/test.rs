//! `cargo xtask test`: unit tests (no root), then the kernel tests (root: real namespaces, real eBPF).
//! The kernel tests share one kernel, so they run one at a time.

use anyhow::Result;

pub fn run(filter: Option<&str>) -> Result<()> {
    crate::setup::run(true)?;
    let bin = crate::build()?;
    // The kernel tests drive the real binary, as a user would.
    std::env::set_var("CNITRACE_BIN", &bin);
    crate::cargo(&["test", "--release", "-p", "cnitrace-common", "-p", "cnitrace", "-p", "xtask"])?;
    let mut args = vec!["test", "--release", "-p", "cnitrace-tests", "--"];
    if let Some(f) = filter {
        args.push(f);
    }
    args.push("--test-threads=1");
    // Shows the reason of every skipped kernel test (they print nothing else).
    args.push("--show-output");
    crate::cargo(&args)
}
