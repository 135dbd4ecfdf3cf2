//! A fix on this node, asked by a CLI on another machine through this node's agent (`POST /v1/fix`):
//! the CLI diagnosed the stitched trace and sends the remedy's steps; the agent checks that each acts in a
//! namespace of its own node, journals them on this node before each change (as a local fix does), runs
//! them, checks the node's paths before and after, and keeps the fix only when the CLI says so once its
//! re-trace across the nodes is delivered. A CLI that goes away first, an agent stopped by a signal, and
//! an agent killed and started again all end in the same place: the unverified fix rolled back from the
//! node's own journal.
//!
//! The session is one connection, a JSON object a line each way (the CLI's message, then the answer):
//! - `{"begin": {"src", "dst", "cluster": [ADDR, LEN], "others": [[NODE, ADDR, NAME]…]}}` → `{"paths",
//!   "answer"}`: the node's paths are found and checked before anything changes.
//! - `{"apply": {"cause", "steps": [{"why", "action", "undo"}…]}}` → `{"id", "lines"}` or `{"error",
//!   "lines"}` (nothing is rolled back by itself: the CLI says so next, or goes away).
//! - `{"verify": {}}` → `{"paths", "answer", "before", "wrong": […]}`: the same paths again, judged.
//! - `{"keep": NOTE}` → `{"kept": ID}`; `{"rollback": WHY}` → `{"rolled_back": ID, "lines"}`.

use std::{
    io::{BufRead, Write},
    net::Ipv4Addr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    journal::{self, Journal, Outcome},
    verify, Step,
};
use crate::{follow::Scope, plan::Action, plan::Target};

/// How long a session may sit without a word from the CLI before its fix is rolled back.
pub const IDLE: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
struct Begin {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    cluster: (Ipv4Addr, u8),
    #[serde(default)]
    others: Vec<(String, Ipv4Addr, String)>,
}

#[derive(Deserialize)]
struct WireStep {
    why: String,
    action: Action,
    undo: Action,
}

#[derive(Deserialize)]
struct Apply {
    cause: String,
    steps: Vec<WireStep>,
}

/// Whether `t` is a namespace of this node: opened by a path under /proc or /run/netns whose inode is
/// one of the node's (its own namespace or one of its pods'). The API's actions (a pod restart, a
/// ConfigMap) are not a node's to take: `fix --cluster` does those.
pub fn within(scope: &Scope, t: &Target) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let p = &t.path;
    if p.as_os_str().is_empty() {
        bail!("{} is not a namespace of this node (a change through the Kubernetes API is `fix --cluster`'s)", t.netns);
    }
    if !(p.starts_with("/proc") || p.starts_with(crate::netns::NETNS_RUN_DIR)) {
        bail!("{}: {} does not open a network namespace", t.netns, p.display());
    }
    let inode = std::fs::metadata(p).with_context(|| format!("{}: {}", t.netns, p.display()))?.ino() as u32;
    if !scope.holds(inode) {
        bail!("{} ({}) is not a namespace of this node: refused", t.netns, p.display());
    }
    Ok(())
}

/// What the CLI sends and reads.
pub trait Wire {
    fn next(&mut self) -> Result<Option<Value>>;
    fn send(&mut self, v: &Value) -> Result<()>;
}

/// A session's fix, kept or rolled back by the end of [`serve`] whatever happens.
struct Fix<'a> {
    state_dir: &'a Path,
    journal: Option<Journal>,
    paths: Vec<verify::NodePath>,
    before: Option<Vec<bool>>,
    begin: Option<Begin>,
}

impl Fix<'_> {
    fn roll_back(&mut self, why: &str) -> (Option<String>, Vec<String>, Option<String>) {
        let Some(mut j) = self.journal.take() else { return (None, Vec::new(), None) };
        j.note = why.to_string();
        let mut out = Vec::new();
        let r = j.rollback(&mut out);
        let lines = String::from_utf8_lossy(&out).lines().map(String::from).collect();
        (Some(j.id), lines, r.err().map(|e| format!("{e:#}")))
    }
}

/// Serves one fix session of the node whose namespaces are `scope` (read by `scope` for each message:
/// pods come and go). Returns when the CLI kept the fix, rolled it back, or went away (then it is
/// rolled back); `stop` (the agent's SIGTERM) rolls it back too.
pub fn serve(wire: &mut dyn Wire, scope: &dyn Fn() -> Result<(Scope, u32)>, state_dir: &Path, stop: &AtomicBool) -> Result<()> {
    let mut fix = Fix { state_dir, journal: None, paths: Vec::new(), before: None, begin: None };
    let mut last = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            fix.roll_back("the agent was stopped before the fix was verified");
            return Ok(());
        }
        let msg = match wire.next() {
            Ok(Some(m)) => m,
            Ok(None) => {
                fix.roll_back("the CLI went away before the fix was verified");
                return Ok(());
            }
            Err(e) if is_timeout(&e) => {
                if last.elapsed() > IDLE {
                    fix.roll_back("no word from the CLI for 5 minutes: not verified");
                    return Ok(());
                }
                continue;
            }
            Err(e) => {
                fix.roll_back("the CLI's connection broke before the fix was verified");
                return Err(e);
            }
        };
        last = Instant::now();
        let answer = answer(&mut fix, &msg, scope);
        let end = msg.get("keep").is_some() || msg.get("rollback").is_some();
        wire.send(&answer)?;
        if end {
            return Ok(());
        }
    }
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

fn answer(fix: &mut Fix, msg: &Value, scope: &dyn Fn() -> Result<(Scope, u32)>) -> Value {
    let r = (|| -> Result<Value> {
        if let Some(b) = msg.get("begin") {
            let b: Begin = serde_json::from_value(b.clone()).context("begin")?;
            let (_, node) = scope()?;
            fix.paths = verify::discover_node(node, b.cluster, &b.others)?;
            let before = verify::check(&fix.paths);
            let answer = before.iter().filter(|a| **a).count();
            fix.before = Some(before);
            fix.begin = Some(b);
            return Ok(json!({"paths": fix.paths.len(), "answer": answer}));
        }
        if let Some(a) = msg.get("apply") {
            let a: Apply = serde_json::from_value(a.clone()).context("apply")?;
            let Some(b) = &fix.begin else { bail!("apply before begin") };
            let (scope, _) = scope()?;
            // Every change and its undo on this node, or nothing at all.
            for s in &a.steps {
                if s.action.through_api() {
                    bail!("`{}` goes through the Kubernetes API, not a node's agent (its role reads only)", s.action.command());
                }
                within(&scope, s.action.target()).and_then(|_| within(&scope, s.undo.target())).with_context(|| format!("`{}`", s.action.command()))?;
            }
            let j = match fix.journal.as_mut() {
                Some(j) => j,
                None => fix.journal.insert(Journal::create(fix.state_dir, b.src, b.dst)?),
            };
            let steps: Vec<Step> = a.steps.into_iter().map(|s| Step { action: s.action, undo: s.undo, why: s.why }).collect();
            let mut out = Vec::new();
            let r = super::apply_steps(j, &a.cause, steps, &mut out);
            let lines: Vec<String> = String::from_utf8_lossy(&out).lines().map(String::from).collect();
            return Ok(match r {
                Ok(()) => json!({"id": j.id, "lines": lines}),
                Err(e) => json!({"id": j.id, "lines": lines, "error": format!("{e:#}")}),
            });
        }
        if msg.get("verify").is_some() {
            let Some(before) = &fix.before else { bail!("verify before begin") };
            let after = verify::check(&fix.paths);
            let touched: Vec<String> = fix.journal.iter().flat_map(|j| j.steps.iter().map(|s| s.action.target().netns.clone())).collect();
            let wrong = verify::judge(&fix.paths, before, &after, &touched);
            return Ok(json!({
                "paths": fix.paths.len(),
                "answer": after.iter().filter(|a| **a).count(),
                "before": before.iter().filter(|a| **a).count(),
                "wrong": wrong,
            }));
        }
        if let Some(note) = msg.get("keep") {
            let Some(mut j) = fix.journal.take() else { return Ok(json!({"kept": null})) };
            j.outcome = Outcome::Fixed;
            j.note = note.as_str().unwrap_or("fixed").to_string();
            j.sync()?;
            return Ok(json!({"kept": j.id}));
        }
        if let Some(why) = msg.get("rollback") {
            let (id, lines, error) = fix.roll_back(why.as_str().unwrap_or("rolled back by the CLI"));
            return Ok(json!({"rolled_back": id, "lines": lines, "error": error}));
        }
        bail!("not a fix message: {msg}")
    })();
    r.unwrap_or_else(|e| json!({"error": format!("{e:#}")}))
}

/// At an agent's start: every fix an earlier agent of this node left unverified (it was killed or the
/// machine went down mid-fix) is rolled back from its journal. Returns what it did, a line each.
pub fn recover(state_dir: &Path) -> Vec<String> {
    let mut said = Vec::new();
    let listing = match journal::list(state_dir) {
        Ok(l) => l,
        Err(e) => return vec![format!("the journal of {} cannot be read: {e:#}", state_dir.display())],
    };
    for u in &listing.unreadable {
        said.push(format!("fix {}: its journal {} cannot be read ({}); left as it is", u.id, u.path.display(), u.error));
    }
    for mut j in listing.journals.into_iter().filter(|j| j.outcome == Outcome::InProgress) {
        j.note = "unfinished when the node's agent stopped: rolled back from its journal when it started again".into();
        let mut out = Vec::new();
        let r = j.rollback(&mut out);
        said.push(format!(
            "fix {} ({} → {}) was not verified when the agent stopped: rolled back{}",
            j.id,
            j.src,
            j.dst,
            match r {
                Ok(()) => String::new(),
                Err(e) => format!(", not everything: {e:#}"),
            }
        ));
        said.extend(String::from_utf8_lossy(&out).lines().map(|l| format!("  {l}")));
    }
    said
}

/// `GET /v1/fixes`: the node's journal.
pub fn history(state_dir: &Path) -> Result<Value> {
    let l = journal::list(state_dir)?;
    Ok(json!({
        "journals": l.journals,
        "unreadable": l.unreadable.iter().map(|u| json!({"id": u.id, "path": u.path, "error": u.error})).collect::<Vec<_>>(),
    }))
}

/// `POST /v1/rollback[?id=ID]`: one fix of this node undone (the newest without an id).
pub fn rollback(state_dir: &Path, id: Option<&str>) -> Result<Value> {
    let mut j = Journal::load(state_dir, id)?;
    if j.outcome == Outcome::RolledBack {
        return Ok(json!({"id": j.id, "already": true, "lines": []}));
    }
    j.note = "rolled back on request".into();
    let mut out = Vec::new();
    let r = j.rollback(&mut out);
    let lines: Vec<String> = String::from_utf8_lossy(&out).lines().map(String::from).collect();
    match r {
        Ok(()) => Ok(json!({"id": j.id, "already": false, "lines": lines})),
        Err(e) => bail!("{e:#}; {}", lines.join("; ")),
    }
}

/// A connection's lines as a [`Wire`]. A read that times out keeps what it had of a line for the next.
pub struct Lines<R: BufRead, W: Write> {
    r: R,
    w: W,
    buf: String,
}

impl<R: BufRead, W: Write> Lines<R, W> {
    pub fn new(r: R, w: W) -> Self {
        Lines { r, w, buf: String::new() }
    }
}

impl<R: BufRead, W: Write> Wire for Lines<R, W> {
    fn next(&mut self) -> Result<Option<Value>> {
        loop {
            if self.r.read_line(&mut self.buf)? == 0 {
                return Ok(None);
            }
            if !self.buf.ends_with('\n') {
                continue;
            }
            let line = std::mem::take(&mut self.buf);
            if !line.trim().is_empty() {
                return Ok(Some(serde_json::from_str(&line).context("a line that is not JSON")?));
            }
        }
    }
    fn send(&mut self, v: &Value) -> Result<()> {
        writeln!(self.w, "{v}")?;
        self.w.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    struct Script {
        msgs: VecDeque<Value>,
        sent: Vec<Value>,
    }

    impl Wire for Script {
        fn next(&mut self) -> Result<Option<Value>> {
            Ok(self.msgs.pop_front())
        }
        fn send(&mut self, v: &Value) -> Result<()> {
            self.sent.push(v.clone());
            Ok(())
        }
    }

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("cnitrace-session-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_change_outside_the_nodes_namespaces_is_refused_and_nothing_is_journaled() {
        let scope = Scope::default();
        let me = Target { netns: "root".into(), path: "/proc/self/ns/net".into(), is_root: true };
        let e = format!("{:#}", within(&scope, &me).unwrap_err());
        assert!(e.contains("not a namespace of this node"), "{e}");
        assert!(within(&scope, &Target::cluster()).is_err());
        let e = format!("{:#}", within(&scope, &Target { netns: "x".into(), path: "/etc/passwd".into(), is_root: false }).unwrap_err());
        assert!(e.contains("does not open a network namespace"), "{e}");
        // The same namespace, when it is the node's.
        use std::os::unix::fs::MetadataExt;
        let mut mine = Scope::default();
        mine.inodes.insert(std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32);
        assert!(within(&mine, &me).is_ok());

        // Through a session: the apply is refused and the journal stays empty.
        let d = dir("refused");
        let action = Action::Sysctl { ns: me.clone(), key: "net.ipv4.ip_forward".into(), value: "1".into() };
        let undo = Action::Sysctl { ns: me, key: "net.ipv4.ip_forward".into(), value: "0".into() };
        let mut s = Script {
            msgs: VecDeque::from([
                json!({"begin": {"src": "10.1.0.2", "dst": "10.1.1.2", "cluster": ["10.1.0.0", 16], "others": []}}),
                json!({"apply": {"cause": "ip-forward-off", "steps": [{"why": "w", "action": action, "undo": undo}]}}),
            ]),
            sent: Vec::new(),
        };
        // A scope with nothing of this host, and no pods: no paths to check.
        serve(&mut s, &|| Ok((Scope::default(), 1)), &d, &AtomicBool::new(false)).expect("session");
        assert_eq!(s.sent[0]["paths"], 0);
        let e = s.sent[1]["error"].as_str().unwrap_or("");
        assert!(e.contains("not a namespace of this node") && e.contains("sysctl"), "{}", s.sent[1]);
        assert!(journal::list(&d).unwrap().journals.is_empty(), "nothing journaled");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn messages_out_of_order_are_answered_with_why() {
        let d = dir("order");
        let mut s = Script { msgs: VecDeque::from([json!({"verify": {}}), json!({"apply": {"cause": "x", "steps": []}}), json!({"hello": 1}), json!({"keep": "k"})]), sent: Vec::new() };
        serve(&mut s, &|| Ok((Scope::default(), 1)), &d, &AtomicBool::new(false)).expect("session");
        assert_eq!(s.sent[0]["error"], "verify before begin");
        assert_eq!(s.sent[1]["error"], "apply before begin");
        assert!(s.sent[2]["error"].as_str().unwrap().starts_with("not a fix message"));
        assert_eq!(s.sent[3], json!({"kept": null}), "nothing to keep");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unfinished_fix_is_rolled_back_when_the_next_agent_starts_and_a_finished_one_is_left() {
        let d = dir("recover");
        let mut open = Journal::create(&d, "10.1.0.2".parse().unwrap(), "10.1.1.2".parse().unwrap()).unwrap();
        // A step whose undo does nothing (no namespace to enter here): what matters is the journal.
        let noop = Action::NoUndo { ns: Target { netns: "root".into(), path: "/proc/self/ns/net".into(), is_root: true }, what: "test".into() };
        open.steps.push(journal::JournalStep { cause: "c".into(), why: "w".into(), action: noop.clone(), undo: noop, state: journal::StepState::Applied });
        open.sync().unwrap();
        let mut done = Journal::create(&d, "10.1.0.2".parse().unwrap(), "10.1.1.2".parse().unwrap()).unwrap();
        done.outcome = Outcome::Fixed;
        done.sync().unwrap();
        let said = recover(&d);
        assert!(said[0].contains(&open.id) && said[0].contains("rolled back"), "{said:?}");
        let l = journal::list(&d).unwrap();
        let by_id = |id: &str| l.journals.iter().find(|j| j.id == id).unwrap().outcome;
        assert_eq!(by_id(&open.id), Outcome::RolledBack);
        assert_eq!(by_id(&done.id), Outcome::Fixed, "a kept fix is left alone");
        assert!(recover(&d).is_empty(), "once");
        let _ = std::fs::remove_dir_all(&d);
    }
}
