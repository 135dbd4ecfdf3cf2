//! `cargo xtask docs`: regenerates docs/causes.md from the cause files and the recorded fixtures, so the
//! examples there are what cnitrace really prints.

use std::{fmt::Write as _, process::Command};

use anyhow::{Context, Result};

pub fn run() -> Result<()> {
    let bin = crate::build()?;
    let root = crate::workspace_root();
    let list = Command::new(&bin).args(["lab", "list", "--json"]).output().context("cnitrace lab list")?;
    let faults: Vec<serde_json::Value> =
        String::from_utf8_lossy(&list.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut causes: Vec<String> = Vec::new();
    for f in &faults {
        let c = f["cause"].as_str().unwrap_or_default().to_string();
        if !causes.contains(&c) {
            causes.push(c);
        }
    }
    let mut md = String::from(
        "# Causes\n\nEvery cause `cnitrace follow` can name (the `cause` field of the verdict), how it is recognized, the lab\n\
         fault that reproduces it, what `follow` printed for that fault, and what `fix` does about it with its undo\n\
         (`cargo xtask docs` regenerates this page from the recorded fixtures in `tests/fixtures/`). Each verdict's\n\
         `doc` field (`guide:` in the text) points here. A drop that fits none of them is reported with cause null\n\
         and every fact found.\n",
    );
    for cause in &causes {
        let file = root.join("cnitrace/src/finding/causes").join(format!("{}.rs", cause.replace('-', "_")));
        let text = std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        let about: Vec<&str> = text.lines().take_while(|l| l.starts_with("//!")).map(|l| l.trim_start_matches("//!").trim()).collect();
        let _ = write!(md, "\n## `{cause}`\n\n{}\n\n", about.join(" "));
        for f in faults.iter().filter(|f| f["cause"] == cause.as_str()) {
            let name = f["name"].as_str().unwrap_or_default();
            let _ = writeln!(md, "Lab: `cnitrace lab up --fault {name}` — {}.", f["summary"].as_str().unwrap_or_default());
        }
        let first = faults.iter().find(|f| f["cause"] == cause.as_str()).and_then(|f| f["name"].as_str()).unwrap_or_default();
        let fixture = root.join("tests/fixtures").join(format!("{first}.json"));
        let out = Command::new(&bin).args(["replay", "--plan"]).arg(&fixture).output().context("cnitrace replay")?;
        let out = String::from_utf8_lossy(&out.stdout);
        let (seen, fix) = out.split_once("\nfix").map(|(a, b)| (a.to_string(), format!("fix{b}"))).unwrap_or((out.to_string(), String::new()));
        let src = faults.iter().find(|f| f["name"] == first).map(|f| (f["src"].as_str().unwrap_or_default().to_string(), f["dst"].as_str().unwrap_or_default().to_string())).unwrap_or_default();
        let _ = write!(md, "\nWhat you see:\n\n```\n$ sudo cnitrace follow {} {}\n…\n{}```\n", src.0, src.1, seen.trim_end_matches('\n').to_string() + "\n");
        if !fix.is_empty() {
            let _ = write!(
                md,
                "\nThe fix (`sudo cnitrace fix {} {}`; each line is also the command to type by hand, in the namespace it names — on a real node, drop the `ip netns exec`/`-n` part):\n\n```\n{fix}```\n",
                src.0, src.1
            );
        }
    }
    let path = root.join("docs/causes.md");
    std::fs::create_dir_all(path.parent().expect("docs dir"))?;
    std::fs::write(&path, md)?;
    println!("wrote {}", path.display());
    Ok(())
}
