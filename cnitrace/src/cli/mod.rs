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
