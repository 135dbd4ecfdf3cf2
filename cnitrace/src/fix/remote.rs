//! `fix` through the nodes' agents: the pair is traced across the nodes (`stitch`), the verdict's remedy
//! is planned here as for a local fix, and each step is sent to the agent of the node whose namespace it
//! acts in — journaled and applied there ([`super::session`]). The pair is traced across the nodes
//! again; each node that changed checks its own paths against what they did before; only then does
//! every node keep its part. Anything short of that rolls back every node's part, each from its own
//! journal; `--history` and `--rollback` reach the journals through the same agents.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::{FixRequest, Step, MAX_ROUNDS};
use crate::{
    agent::{Addr, Conn},
    finding::{Ctx, Outcome as Verdict},
    follow::{FollowRequest, Report},
    inject::ProbeKind,
};

/// How long an agent may take to apply a round's steps or check its paths.
const ANSWER: Duration = Duration::from_secs(120);

/// One node's part of the fix: an open `/v1/fix` session with its agent.
struct Session {
    node: String,
    addr: Addr,
    conn: Conn,
    r: BufReader<Conn>,
    /// The fix's id in that node's journal, once something was applied there.
    id: Option<String>,
}

impl Session {
    fn open(node: &str, addr: &Addr, begin: Value) -> Result<(Session, Value)> {
        let mut conn = Conn::connect(addr)?;
        conn.write_all(format!("POST /v1/fix?node={node} HTTP/1.1\r\nHost: cnitrace-agent\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut r = BufReader::new(conn.try_clone()?);
        conn.set_read_timeout(Some(ANSWER))?;
        let code = crate::transport::read_head(&mut r, addr)?;
        if code != 200 {
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(&mut r, &mut body);
            let why = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["error"].as_str().map(String::from)).unwrap_or(body);
            bail!("{addr} answered {code}: {why}");
        }
        let mut s = Session { node: node.to_string(), addr: addr.clone(), conn, r, id: None };
        let answer = s.ask(&json!({ "begin": begin }))?;
        Ok((s, answer))
    }

    /// One message and its answer; an `error` in the answer is an error.
    fn ask(&mut self, msg: &Value) -> Result<Value> {
        writeln!(self.conn, "{msg}").with_context(|| format!("{}'s agent stopped answering", self.node))?;
        self.conn.flush()?;
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => bail!("{}'s agent ({}) stopped answering", self.node, self.addr),
            Ok(_) => {}
            Err(e) => bail!("{}'s agent ({}) stopped answering: {e}", self.node, self.addr),
        }
        let v: Value = serde_json::from_str(&line).with_context(|| format!("{} sent a line that is not JSON", self.addr))?;
        if let Some(id) = v["id"].as_str() {
            self.id = Some(id.to_string());
        }
        Ok(v)
    }
}

/// Everything the nodes applied, rolled back (each on its node); says what each did.
fn roll_back_all(sessions: &mut BTreeMap<String, Session>, why: &str, out: &mut dyn Write) -> Result<u8> {
    for (node, s) in sessions.iter_mut() {
        let Some(id) = s.id.clone() else { continue };
        writeln!(out, "rolling back fix {id} on {node} ({why}):")?;
        match s.ask(&json!({ "rollback": why })) {
            Ok(v) => {
                for l in v["lines"].as_array().into_iter().flatten() {
                    writeln!(out, "{}", l.as_str().unwrap_or(""))?;
                }
                match v["error"].as_str() {
                    Some(e) => writeln!(out, "NOT everything on {node} was restored: {e}")?,
                    None => writeln!(out, "rolled back: {node} is as it was before the fix")?,
                }
            }
            Err(e) => writeln!(
                out,
                "{e:#}: its journal holds fix {id}; the agent rolls it back itself (the CLI went away, or when it starts again), or `cnitrace fix --rollback {id} --agent {node}={}`",
                s.addr
            )?,
        }
    }
    Ok(crate::exit::DROPPED)
}

fn trace(agents: &[(String, Addr)], src: Ipv4Addr, dst: Ipv4Addr, port: Option<u16>, req: &FixRequest, agent_timeout: Duration) -> Result<Report> {
    let probe = port.map(ProbeKind::Tcp).unwrap_or(ProbeKind::Icmp);
    let f = FollowRequest { src, dst, dst_port: port, probe, count: 1, timeout: req.trace_timeout, size: None, opts: Default::default(), cluster: req.cluster.clone() };
    crate::stitch::follow(agents, &f, agent_timeout)
}

/// The node whose agent answers for the namespace a step acts in.
fn node_of(report: &Report, step: &Step) -> Option<String> {
    let t = step.action.target();
    let inode = report.states.by_inode.values().find(|ns| ns.name == t.netns && ns.path == t.path).map(|ns| ns.inode)?;
    report.stitched.as_ref()?.nodes.iter().find(|n| n.inodes.contains(&inode)).map(|n| n.node.clone())
}

/// `fix SRC DST --agent NODE=ADDR…`. Exit code as a local fix's.
pub fn run(req: &FixRequest, agents: &[(String, Addr)], agent_timeout: Duration, out: &mut dyn Write) -> Result<u8> {
    let Some((src, dst)) = req.pair else { bail!("through agents, give the pair: cnitrace fix SRC DST --agent NODE=ADDR…") };
    let port = req.dst_port;
    let mut report = trace(agents, src, dst, port, req, agent_timeout)?;
    let label = format!("{src} → {dst}{}", port.map(|p| format!(":{p}")).unwrap_or_default());
    if let Some(m) = report.stitched.as_ref().map(|s| &s.missing).filter(|m| !m.is_empty()) {
        for m in m {
            writeln!(out, "no answer from {}'s agent ({}): {}", m.node, m.agent, m.error)?;
        }
        writeln!(out, "a fix needs every node's agent: nothing was changed")?;
        return Ok(crate::exit::INCONCLUSIVE);
    }
    if report.verdict.verdict == Verdict::Delivered {
        writeln!(out, "{label}: delivered; nothing to fix")?;
        return Ok(crate::exit::OK);
    }
    crate::render::verdict_styled(&report.verdict, &crate::render::Style::for_stdout(clap::ColorChoice::Auto, false), out)?;
    if let Some(n) = report.stitched.as_ref().and_then(|s| s.died_on.as_ref()) {
        writeln!(out, "node: {n}")?;
    }
    // One pod of every node, for each node's paths to the others.
    let pods: Vec<(String, Ipv4Addr, String)> = crate::agent::ask_each(agents, |n| format!("/v1/node?node={n}"), agent_timeout)
        .into_iter()
        .zip(agents)
        .filter_map(|(a, (node, _))| {
            let a = a.ok()?;
            let first = a["pods"].as_array()?.iter().filter_map(|p| Some((p["ip"].as_str()?.parse::<Ipv4Addr>().ok()?, p["name"].as_str()?.to_string()))).min()?;
            Some((node.clone(), first.0, first.1))
        })
        .collect();
    let cluster = Ctx { trace: &report.trace, probe: &report.probe, states: &report.states }.cluster_cidr();
    let mut sessions: BTreeMap<String, Session> = BTreeMap::new();
    let mut seen: Vec<String> = Vec::new();
    for round in 1..=MAX_ROUNDS {
        let (cause, steps) = match super::next_round(&report, &mut seen, req.allow_rule_removal, out)? {
            super::Next::Apply(cause, steps) => (cause, steps),
            super::Next::Stop(why) => return roll_back_all(&mut sessions, &why, out),
        };
        // Each step goes to the node whose namespace it changes; one that is no node's is not applied.
        let mut by_node: BTreeMap<String, Vec<Step>> = BTreeMap::new();
        for st in steps {
            match node_of(&report, &st) {
                Some(n) => by_node.entry(n).or_default().push(st),
                None => {
                    writeln!(out, "\n`{}` acts in {}, which no agent answers for: nothing of it is applied", st.action.command(), st.action.target().netns)?;
                    return roll_back_all(&mut sessions, "a step on no node's agent", out);
                }
            }
        }
        writeln!(out, "\nplan (round {round}, cause {}):", cause.id)?;
        for (node, steps) in &by_node {
            writeln!(out, "  on {node}:")?;
            for st in steps {
                writeln!(out, "{}\n        # {}", st.action.command_lines("    ", "    "), st.why)?;
            }
        }
        if let Some(code) = super::consent(req.mode, round, out)? {
            return Ok(code);
        }
        for (node, steps) in by_node {
            let addr = agents.iter().find(|(n, _)| *n == node).map(|(_, a)| a.clone()).ok_or_else(|| anyhow!("no agent for {node}"))?;
            if !sessions.contains_key(&node) {
                let others: Vec<&(String, Ipv4Addr, String)> = pods.iter().filter(|(n, _, _)| *n != node).collect();
                let begin = json!({"src": src, "dst": dst, "cluster": cluster, "others": others});
                match Session::open(&node, &addr, begin) {
                    Ok((s, v)) if v.get("error").is_none() => {
                        writeln!(out, "{node}: {} of its {} paths answer before the fix", v["answer"], v["paths"])?;
                        sessions.insert(node.clone(), s);
                    }
                    Ok((_, v)) => {
                        writeln!(out, "{node}'s agent cannot fix: {}", v["error"].as_str().unwrap_or(""))?;
                        return roll_back_all(&mut sessions, "a node's agent could not begin", out);
                    }
                    Err(e) => {
                        writeln!(out, "{node}'s agent cannot fix: {e:#}")?;
                        return roll_back_all(&mut sessions, "a node's agent could not begin", out);
                    }
                }
            }
            let s = sessions.get_mut(&node).expect("opened above");
            let wire: Vec<Value> = steps.iter().map(|st| json!({"why": st.why, "action": st.action, "undo": st.undo})).collect();
            writeln!(out, "on {node}:")?;
            match s.ask(&json!({"apply": {"cause": cause.id, "steps": wire}})) {
                Ok(v) => {
                    for l in v["lines"].as_array().into_iter().flatten() {
                        writeln!(out, "{}", l.as_str().unwrap_or(""))?;
                    }
                    if let Some(e) = v["error"].as_str() {
                        writeln!(out, "applying on {node} failed: {e}")?;
                        return roll_back_all(&mut sessions, "applying failed", out);
                    }
                }
                Err(e) => {
                    // What it had applied is in its journal on that node, each step marked before it ran.
                    writeln!(out, "{e:#} while applying: the fix may be half applied on {node}")?;
                    writeln!(
                        out,
                        "  its journal there holds every step before it runs: the agent rolls the fix back when it starts again \
                         (`cnitrace fix --history --agent {node}={addr}` shows it)"
                    )?;
                    sessions.remove(&node);
                    return roll_back_all(&mut sessions, "a node's agent stopped answering mid-fix", out);
                }
            }
        }
        report = match trace(agents, src, dst, port, req, agent_timeout) {
            Ok(r) => r,
            Err(e) => {
                writeln!(out, "the re-trace failed: {e:#}")?;
                return roll_back_all(&mut sessions, "not verified: the re-trace failed", out);
            }
        };
        if report.verdict.verdict == Verdict::Delivered {
            // Every node that changed: its paths, judged against before.
            let mut whole = true;
            for (node, s) in sessions.iter_mut() {
                match s.ask(&json!({"verify": {}})) {
                    Ok(v) => {
                        writeln!(out, "\n{node}: {} of its {} paths answer ({} before the fix)", v["answer"], v["paths"], v["before"])?;
                        for w in v["wrong"].as_array().into_iter().flatten() {
                            writeln!(out, "  {}", w.as_str().unwrap_or(""))?;
                            whole = false;
                        }
                        if let Some(e) = v["error"].as_str() {
                            writeln!(out, "  cannot check: {e}")?;
                            whole = false;
                        }
                    }
                    Err(e) => {
                        writeln!(out, "{e:#}")?;
                        whole = false;
                    }
                }
            }
            if !whole {
                return roll_back_all(&mut sessions, super::NOT_WHOLE, out);
            }
            let note = format!("fixed: {}", seen.join(", "));
            let mut kept = Vec::new();
            for (node, s) in sessions.iter_mut() {
                match s.ask(&json!({ "keep": note })) {
                    Ok(v) if v["kept"].is_string() => kept.push(format!("{} on {node}", v["kept"].as_str().unwrap_or(""))),
                    Ok(v) => writeln!(out, "{node} did not keep its part: {v}")?,
                    Err(e) => writeln!(out, "{e:#} (before it kept its part: it rolls it back)")?,
                }
            }
            let undo: Vec<String> = sessions.iter().filter_map(|(n, s)| Some(format!("cnitrace fix --rollback {} --agent {n}={}", s.id.as_ref()?, s.addr))).collect();
            writeln!(out, "\nverified across the nodes: {label} is delivered now (fix {}; undo with `{}`)", kept.join(", "), undo.join("` and `"))?;
            return Ok(crate::exit::OK);
        }
        writeln!(out, "\nafter round {round}:")?;
        crate::render::verdict(&report.verdict, out)?;
    }
    roll_back_all(&mut sessions, "too many rounds", out)
}

/// `fix --history --agent …`: every node's journal.
pub fn history(agents: &[(String, Addr)], timeout: Duration, out: &mut dyn Write) -> Result<u8> {
    let answers = crate::agent::ask_each(agents, |n| format!("/v1/fixes?node={n}"), timeout);
    let mut code = crate::exit::OK;
    for ((node, addr), a) in agents.iter().zip(answers) {
        match a {
            Ok(v) => {
                let journals: Vec<super::journal::Journal> = serde_json::from_value(v["journals"].clone()).unwrap_or_default();
                if journals.is_empty() && v["unreadable"].as_array().is_none_or(|u| u.is_empty()) {
                    writeln!(out, "{node} ({addr}): no fixes yet")?;
                } else {
                    writeln!(out, "{node} ({addr}):")?;
                }
                for u in v["unreadable"].as_array().into_iter().flatten() {
                    writeln!(out, "  {}  UNREADABLE: {}", u["id"].as_str().unwrap_or(""), u["error"].as_str().unwrap_or(""))?;
                }
                for j in journals {
                    let mut causes: Vec<&str> = Vec::new();
                    for s in &j.steps {
                        if !causes.contains(&s.cause.as_str()) {
                            causes.push(&s.cause);
                        }
                    }
                    writeln!(out, "  {}  {} → {}  {:?}  {} action(s)  {}  {}", j.id, j.src, j.dst, j.outcome, j.steps.len(), causes.join(","), j.note)?;
                }
            }
            Err(e) => {
                writeln!(out, "{node} ({addr}): no answer: {e:#}")?;
                code = crate::exit::INCONCLUSIVE;
            }
        }
    }
    Ok(code)
}

/// `fix --rollback [ID] --agent …`: the fix `id` on the node whose journal holds it; without an id, the
/// newest fix of the one node given.
pub fn rollback(agents: &[(String, Addr)], id: Option<&str>, timeout: Duration, out: &mut dyn Write) -> Result<u8> {
    let (node, addr) = match id {
        None if agents.len() == 1 => agents[0].clone(),
        None => bail!("through several agents, name the fix: --rollback ID (`--history` lists each node's)"),
        Some(id) => {
            let answers = crate::agent::ask_each(agents, |n| format!("/v1/fixes?node={n}"), timeout);
            let holder = agents.iter().zip(&answers).find(|(_, a)| a.as_ref().is_ok_and(|v| v["journals"].as_array().is_some_and(|js| js.iter().any(|j| j["id"] == id))));
            match holder {
                Some((a, _)) => a.clone(),
                None => {
                    let silent: Vec<String> = agents.iter().zip(&answers).filter(|(_, a)| a.is_err()).map(|((n, _), _)| n.clone()).collect();
                    bail!("no node's journal holds fix {id}{}", if silent.is_empty() { String::new() } else { format!(" (no answer from {})", silent.join(", ")) });
                }
            }
        }
    };
    let path = format!("/v1/rollback?node={node}{}", id.map(|i| format!("&id={i}")).unwrap_or_default());
    let v = crate::agent::request(&addr, "POST", &path, timeout).with_context(|| format!("roll back on {node}"))?;
    let id = v["id"].as_str().unwrap_or("");
    if v["already"] == true {
        writeln!(out, "fix {id} on {node} was already rolled back")?;
        return Ok(crate::exit::OK);
    }
    writeln!(out, "rolled back fix {id} on {node}:")?;
    for l in v["lines"].as_array().into_iter().flatten() {
        writeln!(out, "{}", l.as_str().unwrap_or(""))?;
    }
    writeln!(out, "done")?;
    Ok(crate::exit::OK)
}
