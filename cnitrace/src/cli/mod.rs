//! The only place clap appears: raw arguments become resolved, typed requests before any command runs.

mod fix;
mod follow;
mod lab;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::exit;

#[derive(Parser)]
#[command(name = "cnitrace", version, about = "Follows the packets between two pods through the kernel, names where and why they die, and repairs it.")]
#[command(after_help = "Exit codes: 0 delivered / success, 1 dropped (drop point found), 2 usage or environment error, 3 inconclusive.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Follow the packets between two pods through the kernel and name where and why they die.
    Follow(follow::FollowArgs),
    /// Diagnose the pair, apply the matching fix, verify by tracing again, roll back if it did not help.
    Fix(fix::FixArgs),
    /// Build, break and inspect the built-in lab: a flannel node in network namespaces.
    Lab(lab::LabArgs),
    /// Diagnose a recording (`follow --record`) again, without root or kernel.
    Replay {
        file: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// `--timeout SECS`: more than 0, at most 600 (the longest any trace waits).
fn trace_timeout(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs > 0.0 && secs <= 600.0 {
        Ok(std::time::Duration::from_secs_f64(secs))
    } else {
        Err(format!("{s} s is out of range: give more than 0 and at most 600 seconds"))
    }
}

/// Parses, runs, and maps the outcome to the documented exit code. Errors are printed once, as a chain.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
            let _ = e.print();
            return exit::code(code);
        }
    };
    let result = match cli.command {
        Command::Follow(args) => follow::run(args),
        Command::Fix(args) => fix::run(args),
        Command::Lab(args) => lab::run(args),
        Command::Replay { file, json } => replay(&file, json),
    };
    match result {
        Ok(code) => exit::code(code),
        Err(e) => {
            eprintln!("cnitrace: {e:#}");
            exit::code(exit::USAGE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_error(args: &[&str]) -> String {
        match Cli::try_parse_from(args) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_timeout_out_of_range_says_the_range_it_needs() {
        for cmd in [&["cnitrace", "follow", "10.0.0.1", "10.0.0.2"][..], &["cnitrace", "fix", "10.0.0.1", "10.0.0.2"]] {
            for bad in ["0", "-0.5", "601"] {
                let e = usage_error(&[cmd, &[&format!("--timeout={bad}")]].concat());
                assert!(e.contains("give more than 0 and at most 600 seconds"), "{cmd:?} --timeout {bad}: {e}");
            }
            assert!(usage_error(&[cmd, &["--timeout", "soon"]].concat()).contains("not a number of seconds"));
            assert!(Cli::try_parse_from([cmd, &["--timeout", "0.5"]].concat()).is_ok());
        }
    }
}

fn replay(file: &std::path::Path, json: bool) -> anyhow::Result<u8> {
    use anyhow::Context;
    let data = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let rec: crate::follow::Recording = serde_json::from_slice(&data).with_context(|| format!("{} is not a recording", file.display()))?;
    let v = rec.replay();
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        crate::render::verdict(&v, &mut std::io::stdout().lock())?;
    }
    Ok(v.exit_code())
}
