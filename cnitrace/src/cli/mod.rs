//! The only place clap appears: raw arguments become resolved, typed requests before any command runs.

pub mod check;
mod fix;
mod follow;
mod lab;
mod pair;
mod validate;
mod watch;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::exit;

#[derive(Parser)]
#[command(name = "cnitrace", version, about = "Follows the packets between two pods through the kernel, names where and why they die, and repairs it.")]
#[command(after_help = "Exit codes: 0 delivered / success, 1 dropped (drop point found), 2 usage or environment error, 3 inconclusive.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    kube: crate::k8s::KubeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Follow the packets between two pods through the kernel and name where and why they die.
    Follow(follow::FollowArgs),
    /// Diagnose the pair, apply the matching fix, verify by tracing again, roll back if it did not help.
    Fix(fix::FixArgs),
    /// Everything wrong on this host's nodes, without a pair: node checks, and with the Kubernetes API
    /// what flannel should have written (routes, VTEP neighbours, FDB) and its ConfigMap.
    Check(check::CheckArgs),
    /// The incident's validation from a pod: ping, TCP and HTTP to a destination, DNS through the pod's
    /// own resolver, an external URL; every failed check followed to where its packets died.
    Validate(validate::ValidateArgs),
    /// Every drop on this host as it happens, no pair: grouped by pod, reason and function, with rates
    /// (a live table on a terminal, --json, --prometheus ADDR). Only the drop tracepoint is attached.
    Watch(watch::WatchArgs),
    /// Build, break and inspect the built-in lab: a flannel node in network namespaces.
    Lab(lab::LabArgs),
    /// Serve one node's checks to the CLI of other machines (`check --agent NODE=ADDR`), on a Unix
    /// socket: the node's own service, as a DaemonSet runs it on every node.
    Agent {
        /// The node it answers for: its Kubernetes name, or its network namespace's name (the lab).
        #[arg(long, value_name = "NAME", required_unless_present = "ready")]
        node: Option<String>,
        /// Where it listens: unix:PATH, or tcp:127.0.0.1:PORT (loopback only: in its pod, reached
        /// through the API server's port-forward).
        #[arg(long, value_name = "ADDR", default_value = "unix:/run/cnitrace/agent.sock")]
        listen: String,
        /// Where the fixes made on this node are journaled (on the host: a fix an agent left
        /// unverified is rolled back by the next agent from it).
        #[arg(long, value_name = "DIR", default_value = "/var/lib/cnitrace/agent")]
        state_dir: std::path::PathBuf,
        /// Serve nothing: ask the agent listening at --listen for its node and exit 0 if it answers
        /// (the DaemonSet's readiness probe), 1 if it does not.
        #[arg(long)]
        ready: bool,
    },
    /// Print the manifests that run an agent on every node (DaemonSet, its least-privilege RBAC, the
    /// tracers' Role): `cnitrace deploy | kubectl apply -f -`; or apply them through the API (--apply).
    Deploy {
        /// The namespace of the agents.
        #[arg(long, default_value = "cnitrace")]
        namespace: String,
        /// The agents' image (this version's by default).
        #[arg(long)]
        image: Option<String>,
        /// Apply them through the Kubernetes API (server-side apply, field manager `cnitrace`) instead
        /// of printing them.
        #[arg(long)]
        apply: bool,
    },
    /// Remove what `deploy` made, through the Kubernetes API: each object of the manifests that
    /// carries cnitrace's label, the namespace last.
    Undeploy {
        /// The namespace of the agents.
        #[arg(long, default_value = "cnitrace")]
        namespace: String,
        /// Say what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Diagnose a recording (`follow --record`) again, without root or kernel.
    Replay {
        file: std::path::PathBuf,
        #[arg(long)]
        json: bool,
        /// Also print what `fix` would do for it: each action as the command a person would type, with
        /// its undo (nothing is applied).
        #[arg(long)]
        plan: bool,
        /// Write the recorded packets to FILE.pcapng, as `follow --write` does (the recording must hold
        /// their bytes: `follow --record … --write …` or `--snaplen`).
        #[arg(short = 'w', long, value_name = "FILE.pcapng")]
        write: Option<std::path::PathBuf>,
    },
    /// Which probes load on this kernel, which are refused, and why (loads them matching nothing, then
    /// unloads them).
    Hooks {
        /// Tracepoints only, as `follow --no-kprobes`.
        #[arg(long)]
        no_kprobes: bool,
        /// Raw tracepoints only, as `follow --raw-tracepoints`.
        #[arg(long)]
        raw_tracepoints: bool,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the shell completion script for bash, zsh or fish (`cargo xtask install` installs them).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), generated from these very options.
    Man,
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
    crate::k8s::configure(&cli.kube);
    let result = match cli.command {
        Command::Follow(args) => follow::run(args, &cli.kube),
        Command::Fix(args) => fix::run(args, &cli.kube),
        Command::Check(args) => check::run(args, &cli.kube),
        Command::Validate(args) => validate::run(args, &cli.kube),
        Command::Watch(args) => watch::run(args, &cli.kube),
        Command::Lab(args) => lab::run(args),
        Command::Agent { listen, ready: true, .. } => agent_ready(&listen),
        Command::Agent { node, listen, state_dir, ready: false } => agent(node.as_deref().unwrap_or_default(), &listen, &state_dir, &cli.kube),
        Command::Deploy { namespace, image, apply: false } => {
            let o = crate::deploy::Options { namespace, image: image.unwrap_or_else(crate::deploy::default_image) };
            print!("{}", crate::deploy::render(&o));
            Ok(exit::OK)
        }
        Command::Deploy { namespace, image, apply: true } => {
            let o = crate::deploy::Options { namespace, image: image.unwrap_or_else(crate::deploy::default_image) };
            through_api(&cli.kube, "deploy --apply", "cnitrace deploy | kubectl apply -f -", |c| crate::deploy::apply(c, &o, &mut std::io::stdout()))
        }
        Command::Undeploy { namespace, dry_run } => {
            let o = crate::deploy::Options { namespace, ..Default::default() };
            through_api(&cli.kube, "undeploy", "cnitrace deploy | kubectl delete -f -", |c| crate::deploy::remove(c, &o, dry_run, &mut std::io::stdout()))
        }
        Command::Replay { file, json, plan, write } => replay(&file, json, plan, write.as_deref()),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "cnitrace", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Man => man(&mut std::io::stdout()).map(|_| exit::OK),
        Command::Hooks { no_kprobes, raw_tracepoints, json } => hooks(no_kprobes, raw_tracepoints, json),
    };
    match result {
        Ok(code) => exit::code(code),
        Err(e) => {
            eprintln!("cnitrace: {e:#}");
            exit::code(exit::USAGE)
        }
    }
}

/// `cnitrace hooks`: the probes `follow` would load, loaded with a filter that matches nothing
/// (0.0.0.0 both ways, programs off), listed, unloaded.
fn hooks(no_kprobes: bool, raw_tracepoints: bool, json: bool) -> anyhow::Result<u8> {
    use crate::probe::{Probe, ProbeOptions};
    if !crate::sys::is_root() {
        anyhow::bail!("`cnitrace hooks` needs root (it loads the eBPF programs)");
    }
    let opts = ProbeOptions { hop_budget: 0, kernel_stats: false, kprobes: !no_kprobes, btf_tracepoints: !raw_tracepoints, hooks_only: true, alt_a: Vec::new(), alt_b: Vec::new(), snaplen: 0 };
    let none = std::net::Ipv4Addr::UNSPECIFIED;
    let mut probe = Probe::start(none, none, &[], crate::follow::VXLAN_PORTS, &opts)?;
    probe.detach();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    if json {
        let v = serde_json::json!({
            "kernel": release,
            "drop_reasons": probe.kfree_has_reason,
            "drop_reason_names": probe.drop_reasons.len(),
            "hooks": probe.hooks,
        });
        println!("{v}");
        return Ok(exit::OK);
    }
    let mut out = std::io::stdout().lock();
    render_hooks(&release, &probe, &mut out)?;
    Ok(exit::OK)
}

fn render_hooks(release: &str, probe: &crate::probe::Probe, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let attached = probe.hooks.iter().filter(|h| h.attached).count();
    writeln!(out, "kernel {release}: {attached} of {} hooks load", probe.hooks.len())?;
    writeln!(
        out,
        "drop reasons: {}",
        if probe.kfree_has_reason { format!("yes ({} names from the kernel's BTF)", probe.drop_reasons.len()) } else { "no (kfree_skb without a reason: verdicts rest on the drop's function)".into() }
    )?;
    let width = probe.hooks.iter().map(|h| h.hook.len()).max().unwrap_or(4);
    for h in &probe.hooks {
        let state = if h.attached { "loads" } else { "refused" };
        match &h.reason {
            Some(why) => writeln!(out, "  {:width$}  {state:7}  {why}", h.hook)?,
            None => writeln!(out, "  {:width$}  {state}", h.hook)?,
        }
    }
    Ok(())
}

/// The manual page: the top command's, then one section per subcommand (its own options), so `man
/// cnitrace` holds all of them.
/// A command that only acts through the Kubernetes API: without one, says so and what to run instead.
fn through_api(kube: &crate::k8s::KubeArgs, what: &str, instead: &str, run: impl FnOnce(&mut crate::k8s::Cluster) -> anyhow::Result<()>) -> anyhow::Result<u8> {
    let mut cluster = crate::k8s::connect(kube).map_err(|e| anyhow::anyhow!("{what} needs the Kubernetes API: {e} (without it: {instead})"))?;
    run(&mut cluster)?;
    Ok(exit::OK)
}

fn man(out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut buf = Vec::new();
        let name = format!("cnitrace {}", sub.get_name());
        let sub = sub.clone().name(name.clone());
        let man = clap_mangen::Man::new(sub.clone());
        man.render_name_section(&mut buf)?;
        man.render_synopsis_section(&mut buf)?;
        man.render_description_section(&mut buf)?;
        man.render_options_section(&mut buf)?;
        if sub.get_subcommands().any(|c| c.get_name() != "help") {
            man.render_subcommands_section(&mut buf)?;
        }
        // One page: each subcommand a section of its own, its parts subsections.
        let heading = name.to_uppercase();
        let text: String = String::from_utf8_lossy(&buf)
            .lines()
            .map(|l| match l.strip_prefix(".SH ") {
                Some("NAME") => format!(".SH \"{heading}\""),
                Some(rest) => format!(".SS {rest}"),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        page.extend_from_slice(text.as_bytes());
        page.push(b'\n');
    }
    out.write_all(&page)?;
    Ok(())
}

fn agent(node: &str, listen: &str, state_dir: &std::path::Path, kube: &crate::k8s::KubeArgs) -> anyhow::Result<u8> {
    if !crate::sys::is_root() {
        anyhow::bail!("`cnitrace agent` needs root (it reads its node's namespaces, as `check` does)");
    }
    crate::agent::serve(&crate::agent::parse_addr(listen)?, node, state_dir, kube)?;
    Ok(exit::OK)
}

/// `agent --ready`: the agent at `listen` answers for its node within 3 s (it has recovered its
/// journal and serves).
fn agent_ready(listen: &str) -> anyhow::Result<u8> {
    let addr = crate::agent::parse_addr(listen)?;
    match crate::agent::get(&addr, "/v1/node", std::time::Duration::from_secs(3)) {
        Ok(v) => {
            println!("ready: the agent at {addr} serves node {}", v["node"].as_str().unwrap_or("?"));
            Ok(exit::OK)
        }
        Err(e) => {
            println!("not ready: the agent at {addr}: {e:#}");
            Ok(1)
        }
    }
}

fn replay(file: &std::path::Path, json: bool, plan: bool, write: Option<&std::path::Path>) -> anyhow::Result<u8> {
    use anyhow::Context;
    use std::io::Write;
    let data = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let rec: crate::follow::Recording = serde_json::from_slice(&data).with_context(|| format!("{} is not a recording", file.display()))?;
    let v = rec.replay();
    if let Some(path) = write {
        let snaplen = rec.events.iter().filter_map(|e| e.bytes.as_ref().map(|b| b.0.len() as u32)).max();
        let Some(snaplen) = snaplen else {
            anyhow::bail!("{} holds no packet bytes: record with `follow --record FILE --write FILE.pcapng` (or --snaplen)", file.display())
        };
        let t0 = std::time::Duration::from_nanos(rec.t0_unix_ns.unwrap_or(0));
        let title = format!("cnitrace replay {}", file.display());
        crate::pcapng::write(path, &rec.events, t0, snaplen, &crate::pcapng::verdict_comment(&title, &v))?;
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&v)?)?;
    } else {
        crate::render::verdict(&v, &mut out)?;
    }
    if plan && !json {
        match rec.plan() {
            None => writeln!(out, "\nfix: no catalog cause, nothing to apply")?,
            Some((cause, crate::plan::Remedy::NoSafeFix(why))) => writeln!(out, "\nfix: no safe fix for {cause}: {why}")?,
            Some((cause, remedy)) => {
                let (steps, only) = match remedy {
                    crate::plan::Remedy::RuleRemoval(s) => (s, " (only with --allow-rule-removal: it removes a rule someone wrote)"),
                    crate::plan::Remedy::Steps(s) => (s, ""),
                    crate::plan::Remedy::NoSafeFix(_) => unreachable!("matched above"),
                };
                writeln!(out, "\nfix (cause {cause}){only}:")?;
                for st in &steps {
                    writeln!(out, "{}\n      # {}", st.action.command_lines("  ", "  "), st.why)?;
                }
                writeln!(out, "undo (`cnitrace fix --rollback`), last action first:")?;
                for st in steps.iter().rev() {
                    writeln!(out, "{}", st.undo.command_lines("  ", "  "))?;
                }
            }
        }
    }
    Ok(v.exit_code())
}


/// `ADDR:PORT` (or `NAME:PORT`) → the destination and its port; anything else stays whole.
pub fn split_port(dst: &str) -> anyhow::Result<(&str, Option<u16>)> {
    match dst.rsplit_once(':') {
        Some((addr, port)) if !addr.is_empty() && !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => {
            let port: u16 = port.parse().map_err(|_| anyhow::anyhow!("{port} is not a port"))?;
            anyhow::ensure!(port != 0, "port 0 is not a destination");
            Ok((addr, Some(port)))
        }
        _ => Ok((dst, None)),
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
    fn completions_and_the_man_page_know_every_subcommand() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "cnitrace", &mut buf);
            let text = String::from_utf8(buf).expect("utf-8");
            for sub in ["follow", "fix", "lab", "replay"] {
                assert!(text.contains(sub), "{shell:?} completion lacks {sub}");
            }
            assert!(text.contains("allow-rule-removal"), "{shell:?} completes fix's options");
        }
        let mut page = Vec::new();
        man(&mut page).expect("man page");
        let page = String::from_utf8(page).expect("utf-8");
        assert!(page.starts_with(".ie") || page.contains(".TH cnitrace"), "roff: {}", &page[..page.len().min(200)]);
        for needle in ["CNITRACE FOLLOW", "CNITRACE FIX", "\\-\\-allow\\-rule\\-removal", "\\-\\-timeout"] {
            assert!(page.contains(needle), "the man page lacks {needle}");
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

/// How `check`, `follow` and `fix` reach the nodes' agents (`cnitrace agent`) instead of working on this
/// host: each named, or found through the Kubernetes API.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AgentArgs {
    /// Through the agent of NODE (`cnitrace agent`) at ADDR (unix:PATH, or tcp:127.0.0.1:PORT); repeat for
    /// every node. Each works on its own node: `check` reads it, `follow` traces what its kernel sees (the
    /// source's agent sends the probe; the timeline is stitched), `fix` applies and journals there the steps
    /// that change its namespaces (`--history` and `--rollback` reach those journals). Asked in parallel;
    /// a node whose agent does not answer is reported as such.
    #[arg(long = "agent", value_name = "NODE=ADDR")]
    pub agents: Vec<String>,
    /// Seconds an agent may take to answer and to attach its probes.
    #[arg(long, default_value = "10", value_name = "SECS")]
    pub agent_timeout: f64,
    /// Find every node's agent through the Kubernetes API (the pods of `cnitrace deploy`) and reach each
    /// through the API server's port-forward to its pod; an `--agent NODE=ADDR` replaces its node's.
    #[arg(long = "agents")]
    pub discover: bool,
    /// The namespace of the agents' pods.
    #[arg(long, default_value = "cnitrace", value_name = "NAMESPACE")]
    pub agents_namespace: String,
}

impl AgentArgs {
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.agent_timeout.max(0.1))
    }

    /// Are agents asked at all (named or to be found)?
    pub fn any(&self) -> bool {
        !self.agents.is_empty() || self.discover
    }

    /// The agents to ask, and the nodes that have none to ask, with why (`all_nodes`: every node of the
    /// cluster is expected to have one).
    pub fn resolve(&self, all_nodes: bool, kube: &crate::k8s::KubeArgs) -> anyhow::Result<(Vec<(String, crate::agent::Addr)>, Vec<(String, String)>)> {
        crate::agent::resolve_agents(&self.agents, self.discover, all_nodes, &self.agents_namespace, kube)
    }
}
