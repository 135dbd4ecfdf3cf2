//! `fix`: plan → apply → verify. The diagnosis names a cause, the cause's file says how to repair it,
//! every action is journaled with its undo before it runs, the pair is traced again, the node's paths
//! are checked again (`verify`), and if the fix did not help — or left a path of the node worse, or a
//! repaired pod short of what its siblings reach — everything is rolled back.

mod apply;
pub mod cluster;
pub mod journal;
pub mod node_checks;
pub mod remote;
pub mod session;
pub mod verify;

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::plan::{Action, Remedy, Step, Target};
use journal::{Journal, JournalStep, Outcome, StepState};

use crate::{
    finding::{causes, Ctx, Outcome as Verdict},
    follow::{self, FollowRequest, Report},
    inject::ProbeKind,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Print the plan, change nothing.
    DryRun,
    /// Ask on the terminal.
    Ask,
    Auto,
}

pub struct FixRequest {
    pub pair: Option<(Ipv4Addr, Ipv4Addr)>,
    /// The destination's port when the pair's destination is a Service (`ADDR:PORT`).
    pub dst_port: Option<u16>,
    pub mode: Mode,
    pub allow_rule_removal: bool,
    pub confirm_timeout: Option<Duration>,
    pub state_dir: PathBuf,
    pub trace_timeout: Duration,
    /// What the Kubernetes API said (names, flannel's record), carried into every trace of the fix.
    pub cluster: Option<crate::k8s::ClusterFacts>,
}

/// Rounds of diagnose → fix → verify: two faults at once take two rounds; a fault whose repair reveals
/// the next missing piece (flannel.1 down loses its routes and neighbours) takes a few.
pub const MAX_ROUNDS: usize = 5;

/// The pair of the most recent `follow`, remembered for `fix --auto` without a pair.
#[derive(Serialize, Deserialize)]
struct LastFollow {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    /// The destination's port (a Service: ClusterIP or NodePort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

pub fn remember_pair(state_dir: &Path, src: Ipv4Addr, dst: Ipv4Addr, port: Option<u16>) {
    let _ = std::fs::create_dir_all(state_dir);
    let _ = std::fs::write(state_dir.join("last-follow.json"), serde_json::to_vec(&LastFollow { src, dst, port }).unwrap_or_default());
}

pub fn last_pair(state_dir: &Path) -> Result<(Ipv4Addr, Ipv4Addr, Option<u16>)> {
    let p = state_dir.join("last-follow.json");
    let data = std::fs::read(&p).map_err(|_| anyhow!("no pair given and no earlier `cnitrace follow` on this host: give SRC DST"))?;
    let l: LastFollow = serde_json::from_slice(&data).context("read the last follow's pair")?;
    Ok((l.src, l.dst, l.port))
}

/// One trace of the pair: ICMP, or TCP to the destination's port (a Service's traffic is TCP to it).
fn trace(src: Ipv4Addr, dst: Ipv4Addr, port: Option<u16>, timeout: Duration, cluster: &Option<crate::k8s::ClusterFacts>) -> Result<Report> {
    let probe = port.map(ProbeKind::Tcp).unwrap_or(ProbeKind::Icmp);
    follow::run(&FollowRequest { src, dst, dst_port: port, probe, count: 1, timeout, size: None, opts: Default::default(), cluster: cluster.clone() })
}

/// The remedy for a report's verdict.
pub fn remedy(report: &Report) -> Option<(&'static causes::Cause, Remedy)> {
    let ctx = Ctx { trace: &report.trace, probe: &report.probe, states: &report.states };
    plan(&ctx, report.verdict.cause.as_deref()?)
}

/// What the cause `id` proposes for the traced pair.
pub fn plan(ctx: &Ctx, id: &str) -> Option<(&'static causes::Cause, Remedy)> {
    let cause = causes::find(id)?;
    Some((cause, (cause.fix)(ctx)))
}

/// Exit code of a fix: 0 fixed / nothing to fix, 1 not fixed (dry run, refused, rolled back).
pub fn run(req: &FixRequest, out: &mut dyn Write) -> Result<u8> {
    if !crate::sys::is_root() {
        bail!("`cnitrace fix` needs root");
    }
    let (src, dst, port) = match req.pair {
        Some((s, d)) => (s, d, req.dst_port),
        None => last_pair(&req.state_dir)?,
    };
    remember_pair(&req.state_dir, src, dst, port);
    let report = trace(src, dst, port, req.trace_timeout, &req.cluster)?;
    if req.pair.is_none() {
        report_node_checks(&report, out)?;
    }
    if report.verdict.verdict == Verdict::Delivered {
        writeln!(out, "{}: delivered; nothing to fix", pair_label(&report))?;
        return Ok(crate::exit::OK);
    }
    crate::render::verdict_styled(&report.verdict, &crate::render::Style::for_stdout(clap::ColorChoice::Auto, false), out)?;
    // The node's paths, found from its own state; which of them answer is read right before the first
    // change (a dry run or a "no" sends nothing).
    let nodes: Vec<u32> = [report.states.src_node, report.states.dst_node].into_iter().flatten().collect();
    let cluster = Ctx { trace: &report.trace, probe: &report.probe, states: &report.states }.cluster_cidr();
    let paths = verify::discover(&nodes, cluster).unwrap_or_default();
    let mut before: Option<Vec<bool>> = None;
    let mut journal: Option<Journal> = None;
    let mut seen_causes: Vec<String> = Vec::new();
    let mut report = report;
    let started = Instant::now();
    for round in 1..=MAX_ROUNDS {
        let (cause, steps) = match next_round(&report, &mut seen_causes, req.allow_rule_removal, out)? {
            Next::Apply(cause, steps) => (cause, steps),
            Next::Stop(why) => return finish_unfixed(journal, out, &why),
        };
        let restarts = steps.iter().any(|s| s.action.through_api());
        writeln!(out, "\nplan (round {round}, cause {}):", cause.id)?;
        for st in &steps {
            writeln!(out, "{}\n      # {}", st.action.command_lines("  ", "  "), st.why)?;
        }
        if let Some(code) = consent(req.mode, round, out)? {
            return Ok(code);
        }
        let before = before.get_or_insert_with(|| verify::check(&paths));
        let j = match journal.as_mut() {
            Some(j) => j,
            None => journal.insert(Journal::create(&req.state_dir, src, dst)?),
        };
        if let Err(e) = apply_steps(j, cause.id, steps, out) {
            writeln!(out, "applying failed: {e:#}; rolling back")?;
            j.rollback(out)?;
            return Ok(crate::exit::DROPPED);
        }
        settle_neighbours(&report);
        report = trace(src, dst, port, req.trace_timeout, &req.cluster)?;
        if restarts {
            report = await_resync(report, cause.id, out, || trace(src, dst, port, req.trace_timeout, &req.cluster))?;
        }
        let late = req.confirm_timeout.is_some_and(|t| started.elapsed() > t);
        if report.verdict.verdict == Verdict::Delivered && !late {
            let after = verify::check(&paths);
            let j = journal.as_mut().expect("journal of an applied fix");
            if !node_is_whole(&paths, before, &after, j, "the pair flows, but the node is not whole after the fix", out)? {
                return finish_unfixed(journal, out, NOT_WHOLE);
            }
            let Some(after) = the_rest_of_the_fault(&paths, before, after, &seen_causes, j, req.trace_timeout, &req.cluster, out)? else {
                return finish_unfixed(journal, out, NOT_WHOLE);
            };
            writeln!(out, "\nnode paths: {} of {} answer ({} before the fix)", after.iter().filter(|a| **a).count(), paths.len(), before.iter().filter(|a| **a).count())?;
            let j = journal.as_mut().expect("journal of an applied fix");
            j.outcome = Outcome::Fixed;
            j.note = format!("fixed: {}", seen_causes.join(", "));
            j.sync()?;
            writeln!(out, "\nverified: {} is delivered now (fix {}; undo with `cnitrace fix --rollback {}`)", pair_label(&report), j.id, j.id)?;
            return Ok(crate::exit::OK);
        }
        if late {
            writeln!(out, "\nnot verified within --confirm-timeout")?;
            return finish_unfixed(journal, out, "not verified within the confirm timeout");
        }
        writeln!(out, "\nafter round {round}:")?;
        crate::render::verdict(&report.verdict, out)?;
    }
    finish_unfixed(journal, out, "too many rounds")
}

/// What a round of a fix does next, decided from the trace.
pub(crate) enum Next {
    /// Apply these steps, the remedy of this cause.
    Apply(&'static causes::Cause, Vec<Step>),
    /// The fix ends here, unfixed (what it applied is rolled back), for this reason.
    Stop(String),
}

/// The rules that decide a round, the same whatever carries the fix out (this host, or the nodes'
/// agents): a drop no catalog cause explains, a cause that is still there after its own fix, a rule
/// someone wrote without --allow-rule-removal, and a cause with no safe fix each end the fix (and what it
/// applied is rolled back); otherwise the cause's steps are applied. Says why on `out`.
pub(crate) fn next_round(report: &Report, seen: &mut Vec<String>, allow_rule_removal: bool, out: &mut dyn Write) -> Result<Next> {
    let Some((cause, remedy)) = remedy(report) else {
        writeln!(out, "\nno catalog cause explains this drop: nothing to apply")?;
        return Ok(Next::Stop("the drop has no known cause".into()));
    };
    if seen.iter().any(|c| c == cause.id) {
        writeln!(out, "\n{} is still there after its fix: the fix did not help", cause.id)?;
        return Ok(Next::Stop(format!("{} came back after its fix", cause.id)));
    }
    seen.push(cause.id.to_string());
    match remedy {
        Remedy::Steps(s) => Ok(Next::Apply(cause, s)),
        Remedy::RuleRemoval(s) if allow_rule_removal => Ok(Next::Apply(cause, s)),
        Remedy::RuleRemoval(s) => {
            writeln!(out, "\nthe drop comes from a rule someone wrote; cnitrace removes it only with --allow-rule-removal:")?;
            for st in &s {
                writeln!(out, "{}", st.action.command_lines("  ", "  "))?;
            }
            Ok(Next::Stop("rule removal not allowed".into()))
        }
        Remedy::NoSafeFix(why) => {
            writeln!(out, "\nno safe fix for {}: {why}", cause.id)?;
            Ok(Next::Stop(format!("no safe fix for {}", cause.id)))
        }
    }
}

/// Whether the plan just printed may be applied: a dry run ends here, and so does a "no" to the
/// question a terminal is asked before the first round (`Some`: the exit code the fix ends with).
pub(crate) fn consent(mode: Mode, round: usize, out: &mut dyn Write) -> Result<Option<u8>> {
    match mode {
        Mode::DryRun => {
            writeln!(out, "\ndry run: nothing was changed (run with --auto to apply, or on a terminal to be asked)")?;
            Ok(Some(crate::exit::DROPPED))
        }
        Mode::Ask if round == 1 && !confirmed(out, "apply?")? => Ok(Some(crate::exit::DROPPED)),
        _ => Ok(None),
    }
}

/// How long a restarted daemon may take to write again what it owns, after its pod is Ready: flannel's
/// DaemonSet has no readiness probe, so its pod is Ready when flanneld starts, and flanneld rewrites its
/// VXLAN device only once its informers have synced (1.3 s after its start on the lab's real cluster,
/// `lab up --kubernetes`; the trace that verified it at once saw the old device and rolled back a right
/// fix).
pub(crate) const RESYNC: Duration = Duration::from_secs(20);

/// After a restart: while the trace still shows the cause the restart was to repair, trace again (once
/// a second, within [`RESYNC`]); the first other verdict, or the last, is the fix's.
pub(crate) fn await_resync(mut report: Report, cause: &str, out: &mut dyn Write, mut trace: impl FnMut() -> Result<Report>) -> Result<Report> {
    let t0 = Instant::now();
    let same = |r: &Report| r.verdict.verdict != Verdict::Delivered && remedy(r).is_some_and(|(c, _)| c.id == cause);
    if same(&report) {
        writeln!(out, "waiting for the restarted daemon to write its state again (up to {} s)", RESYNC.as_secs())?;
    }
    while same(&report) && t0.elapsed() < RESYNC {
        std::thread::sleep(Duration::from_secs(1));
        report = trace()?;
    }
    Ok(report)
}

/// Why a fix whose node got worse is rolled back.
const NOT_WHOLE: &str = "a path of the node is worse, or a repaired pod short of its siblings";

/// The node judged after a change against the state before the fix: what got worse is printed under
/// `heading`; true when nothing did.
fn node_is_whole(paths: &[verify::NodePath], before: &[bool], after: &[bool], j: &Journal, heading: &str, out: &mut dyn Write) -> Result<bool> {
    let touched: Vec<String> = j.steps.iter().map(|s| s.action.target().netns.clone()).collect();
    let wrong = verify::judge(paths, before, after, &touched);
    if !wrong.is_empty() {
        writeln!(out, "\n{heading}:")?;
        for w in &wrong {
            writeln!(out, "  {w}")?;
        }
    }
    Ok(wrong.is_empty())
}

/// The same fault on the node's other paths. A fault can break more than the pair: a VXLAN device taken
/// down loses the routes and neighbours of every remote node with it, and the pair's repair restores
/// the one remote node the pair goes to. Each node path that failed before the fix and still fails is
/// traced; where its cause is one this fix already repaired (the same fault, on another path), its
/// remedy is applied into the same journal, at most a few rounds a path. Any other cause is named and
/// left alone (not what this fix set out to repair). Then the node is judged again: `None` when it must
/// be rolled back, else the paths' answers now.
fn the_rest_of_the_fault(
    paths: &[verify::NodePath],
    before: &[bool],
    mut after: Vec<bool>,
    seen_causes: &[String],
    j: &mut Journal,
    timeout: Duration,
    cluster: &Option<crate::k8s::ClusterFacts>,
    out: &mut dyn Write,
) -> Result<Option<Vec<bool>>> {
    const ROUNDS_PER_PATH: usize = 3;
    let mut left_alone: Vec<String> = Vec::new();
    let mut changed = false;
    for (i, p) in paths.iter().enumerate() {
        if before[i] || after[i] {
            continue;
        }
        for _ in 0..ROUNDS_PER_PATH {
            let r = trace(p.from_ip, p.to, None, timeout, cluster)?;
            if r.verdict.verdict == Verdict::Delivered {
                break;
            }
            let Some((cause, Remedy::Steps(steps))) = remedy(&r) else {
                left_alone.push(format!("{} (no cause with a safe fix)", p.name()));
                break;
            };
            if !seen_causes.iter().any(|c| c == cause.id) {
                left_alone.push(format!("{} ({}: not what this fix repaired)", p.name(), cause.id));
                break;
            }
            writeln!(out, "\nthe same fault on {} ({}):", p.name(), cause.id)?;
            apply_steps(j, cause.id, steps, out)?;
            changed = true;
        }
    }
    if changed {
        after = verify::check(paths);
        if !node_is_whole(paths, before, &after, j, "the node is not whole after repairing the rest of the fault", out)? {
            return Ok(None);
        }
    }
    for l in &left_alone {
        writeln!(out, "still failing, left alone: {l}")?;
    }
    Ok(Some(after))
}

/// A neighbour resolution the source started before the fix (while the path was broken) may still be
/// running: packets queued on it now would die with it, or be released together with the diagnosis's
/// own queued echoes (a verification that raced them was rolled back once, dropped in netfilter on the
/// far node). Let it end first (at most the kernel's three probe intervals), so the verification starts a
/// resolution of its own. Since follow decides ARP failures early, this wait is about 1 s of what `fix`
/// takes on them (veth-detached 2.4 s in all in `cargo xtask bench`; faults without ARP 1.7 s).
fn settle_neighbours(report: &Report) {
    let Some(src) = report.src.local() else { return };
    let Some(path) = src.netns.ns.as_ref().map(|n| n.path.clone()) else { return };
    let deadline = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < deadline {
        let pending = crate::state::neighbours(&path)
            .map(|ns| ns.iter().any(|n| n.ifindex == src.ifindex && matches!(n.state.as_str(), "incomplete" | "probe")))
            .unwrap_or(false);
        if !pending {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Node checks on the nodes of the pair (without a pair, `fix --auto` looks at the whole node too).
/// `src → dst`, each by its pod name where there is one (`default/debug (10.244.0.20)`).
fn pair_label(r: &Report) -> String {
    let one = |name: &str, ip: Option<Ipv4Addr>| match ip {
        Some(ip) if name != ip.to_string() && !name.is_empty() => format!("{name} ({ip})"),
        Some(ip) => ip.to_string(),
        None => name.to_string(),
    };
    let dst = one(&r.states.dst_name, r.states.dst_ip);
    match &r.states.service {
        Some(sp) => format!("{} → Service {} ({}{})", one(&r.states.src_name, r.states.src_ip), sp.name(), sp.asked, if sp.chosen.is_some() { format!(", endpoint {dst}") } else { String::new() }),
        None => format!("{} → {dst}", one(&r.states.src_name, r.states.src_ip)),
    }
}

fn report_node_checks(report: &Report, out: &mut dyn Write) -> Result<()> {
    let ctx = Ctx { trace: &report.trace, probe: &report.probe, states: &report.states };
    let mut any = false;
    for node in ctx.nodes() {
        for f in node_checks::check(node, &ctx.node_name(node)) {
            if !any {
                writeln!(out, "node checks:")?;
                any = true;
            }
            writeln!(out, "  {}: {} ({})", f.node, f.what, f.cause)?;
        }
    }
    if !any {
        writeln!(out, "node checks: nothing wrong on {}", ctx.nodes().iter().map(|n| ctx.node_name(n)).collect::<Vec<_>>().join(", "))?;
    }
    Ok(())
}

pub(crate) fn apply_steps(j: &mut Journal, cause: &str, steps: Vec<Step>, out: &mut dyn Write) -> Result<()> {
    let crash_after: Option<usize> = std::env::var("CNITRACE_TEST_CRASH_AFTER_ACTIONS").ok().and_then(|v| v.parse().ok());
    for st in steps {
        j.steps.push(JournalStep { cause: cause.into(), why: st.why, action: st.action.clone(), undo: st.undo, state: StepState::Applying });
        j.sync()?;
        writeln!(out, "{}", st.action.command_lines("apply: ", "       "))?;
        st.action.apply()?;
        let last = j.steps.len() - 1;
        j.steps[last].state = StepState::Applied;
        j.sync()?;
        // Test-only: die between two actions, as a crash or kill -9 would.
        if crash_after.is_some_and(|n| j.steps.iter().filter(|s| s.state == StepState::Applied).count() >= n) {
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        }
    }
    Ok(())
}

/// Asks on the terminal; anything but "y" is a no, said as "nothing was changed".
pub(crate) fn confirmed(out: &mut dyn Write, question: &str) -> Result<bool> {
    write!(out, "\n{question} [y/N] ")?;
    out.flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    let yes = answer.trim().eq_ignore_ascii_case("y");
    if !yes {
        writeln!(out, "nothing was changed")?;
    }
    Ok(yes)
}

pub(crate) fn finish_unfixed(journal: Option<Journal>, out: &mut dyn Write, why: &str) -> Result<u8> {
    if let Some(mut j) = journal {
        writeln!(out, "rolling back fix {} ({why}):", j.id)?;
        j.note = why.to_string();
        j.rollback(out)?;
        writeln!(out, "rolled back: the node is as it was before the fix")?;
    }
    Ok(crate::exit::DROPPED)
}

/// `fix --rollback [ID]`.
pub fn rollback(state_dir: &Path, id: Option<&str>, out: &mut dyn Write) -> Result<u8> {
    if !crate::sys::is_root() {
        bail!("`cnitrace fix --rollback` needs root");
    }
    let mut j = Journal::load(state_dir, id)?;
    if j.outcome == Outcome::RolledBack {
        writeln!(out, "fix {} was already rolled back", j.id)?;
        return Ok(crate::exit::OK);
    }
    writeln!(out, "rolling back fix {} ({} → {}):", j.id, j.src, j.dst)?;
    j.note = "rolled back on request".into();
    j.rollback(out)?;
    writeln!(out, "done")?;
    Ok(crate::exit::OK)
}

/// `fix --history`.
pub fn history(state_dir: &Path, out: &mut dyn Write) -> Result<u8> {
    let journal::Listing { journals, unreadable } = journal::list(state_dir)?;
    if journals.is_empty() && unreadable.is_empty() {
        writeln!(out, "no fixes yet")?;
    }
    for u in &unreadable {
        writeln!(out, "{}  UNREADABLE: {}: {}", u.id, u.path.display(), u.error)?;
    }
    for j in journals {
        let causes: Vec<&str> = j.steps.iter().map(|s| s.cause.as_str()).fold(Vec::new(), |mut v, c| {
            if !v.contains(&c) {
                v.push(c);
            }
            v
        });
        writeln!(out, "{}  {} → {}  {:?}  {} action(s)  {}  {}", j.id, j.src, j.dst, j.outcome, j.steps.len(), causes.join(","), j.note)?;
    }
    Ok(crate::exit::OK)
}
