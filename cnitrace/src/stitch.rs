//! `follow` through the nodes' agents: each node's agent traces what its own kernel sees of the pair (its
//! namespaces only: the node's and its pods'), the source's agent sends the probe once every other node's
//! probes are attached, and the CLI stitches their recordings into one timeline — the same packet across
//! encapsulation and nodes by its identity (the packet key: addresses, protocol, ICMP id/seq, TCP port) —
//! and diagnoses it as `replay` diagnoses a recording: the same code, the same verdict form.
//!
//! Clocks: agents on one kernel (the same boot id: the lab's nodes) share CLOCK_MONOTONIC and are placed
//! exactly. Across machines their wall clocks place them first, then causality corrects the offset: a
//! packet seen on two nodes is seen first on the node that holds its source address (a request leaves
//! before it arrives, and so does its answer). Each node's offset and its basis are reported.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    agent::{Addr, Conn},
    event::TraceEvent,
    finding::{ctx::States, Outcome},
    follow::{FollowRequest, Recording, Report},
    inject::ProbeKind,
    probe::{Counters, HookStatus},
    resolve::Endpoint,
};

/// What one node's agent sent at the end of its trace.
#[derive(Deserialize)]
struct Part {
    node: String,
    #[serde(default)]
    boot_id: String,
    /// What its namespaces are called: the node's name and its pods'.
    #[serde(default)]
    namespaces: Vec<String>,
    /// Their namespace inodes, as its kernel numbers them.
    #[serde(default)]
    inodes: Vec<u32>,
    report: PartReport,
    recording: Recording,
}

#[derive(Deserialize)]
struct PartReport {
    src: Endpoint,
    dst: Endpoint,
    verdict: crate::finding::Verdict,
    counters: Counters,
    hooks: Vec<HookStatus>,
    ready_ms: u64,
    events_not_kept: u64,
    /// Absent from an agent older than the field.
    #[serde(default)]
    ring_peak: crate::follow::RingPeak,
}

pub use crate::follow::{MissingAgent, NodeShare, Stitched};

/// A message from one agent's stream.
enum Msg {
    Ready,
    /// One event of the agent's node, as it happened.
    Event(Box<TraceEvent>),
    Final(Box<Part>),
    Failed(String),
}

/// One `/v1/follow` stream: its reader thread sends [`Msg`]s; `stop` says so (the agent ends its trace
/// and sends what it has).
struct Stream {
    conn: Conn,
}

impl Stream {
    fn open(idx: usize, addr: &Addr, path: &str, tx: mpsc::Sender<(usize, Msg)>) -> Result<Stream> {
        let mut conn = Conn::connect(addr)?;
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: cnitrace-agent\r\nConnection: close\r\n\r\n").as_bytes())?;
        let reader = conn.try_clone()?;
        let addr = addr.clone();
        std::thread::spawn(move || {
            let msg = read_stream(reader, &addr, |m| {
                let _ = tx.send((idx, m));
            });
            if let Err(e) = msg {
                let _ = tx.send((idx, Msg::Failed(format!("{e:#}"))));
            }
        });
        Ok(Stream { conn })
    }

    fn stop(&self) {
        // A line, not a half-close: through a port-forward a half-close ends the whole stream.
        if self.conn.say("stop\n").is_err() {
            self.conn.shutdown_write();
        }
    }
}

/// Reads one agent's answer: the HTTP head, then a JSON object a line.
fn read_stream(conn: Conn, addr: &Addr, mut send: impl FnMut(Msg)) -> Result<()> {
    let mut r = BufReader::new(conn);
    let code = crate::transport::read_head(&mut r, addr)?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("{addr} closed the connection before its trace ended");
        }
        let v: Value = serde_json::from_str(&line).with_context(|| format!("{addr} sent a line that is not JSON"))?;
        if let Some(e) = v["error"].as_str() {
            bail!("{addr} answered {code}: {e}");
        }
        if v.get("ready_ms").is_some() {
            send(Msg::Ready);
            continue;
        }
        if let Some(e) = v.get("event") {
            if let Ok(e) = serde_json::from_value::<TraceEvent>(e.clone()) {
                send(Msg::Event(Box::new(e)));
            }
            continue;
        }
        let part: Part = serde_json::from_value(v).with_context(|| format!("{addr} sent a trace this CLI cannot read (another version?)"))?;
        send(Msg::Final(Box::new(part)));
        return Ok(());
    }
}

/// `follow` through `agents`: every node traced by its own agent, stitched into one report.
pub fn follow(agents: &[(String, Addr)], req: &FollowRequest, agent_timeout: Duration) -> Result<Report> {
    let t_start = Instant::now();
    // Which node holds the source (its agent sends the probe) and which the destination.
    let about = crate::agent::ask_each(agents, |node| format!("/v1/node?node={node}"), agent_timeout);
    let mut missing = Vec::new();
    let mut live: Vec<(usize, Vec<Ipv4Addr>)> = Vec::new();
    for (i, answer) in about.into_iter().enumerate() {
        let (node, addr) = &agents[i];
        match answer {
            Ok(v) => {
                let pods = v["pods"].as_array().map(|a| a.iter().filter_map(|p| p["ip"].as_str()?.parse().ok()).collect()).unwrap_or_default();
                live.push((i, pods));
            }
            Err(e) => missing.push(MissingAgent { node: node.clone(), agent: addr.to_string(), error: format!("{e:#}") }),
        }
    }
    let holder = |ip: Ipv4Addr| live.iter().find(|(_, pods)| pods.contains(&ip)).map(|(i, _)| *i);
    // The node whose agent sends the probe (none: every node watches for real traffic).
    let source = holder(req.src).filter(|_| req.probe != ProbeKind::None);
    if source.is_none() && req.probe != ProbeKind::None {
        let asked: Vec<&str> = agents.iter().map(|(n, _)| n.as_str()).collect();
        let silent: Vec<&str> = missing.iter().map(|m| m.node.as_str()).collect();
        bail!(
            "{} is a pod of none of the nodes whose agents answered ({}){}: the probe must start on the source's node",
            req.src,
            asked.join(", "),
            if silent.is_empty() { String::new() } else { format!("; no answer from {}", silent.join(", ")) }
        );
    }
    let pods_of: BTreeMap<usize, Vec<Ipv4Addr>> = live.iter().cloned().collect();
    let icmp_id = (req.probe == ProbeKind::Icmp).then(crate::inject::new_icmp_id);
    let mut path = format!("/v1/follow?src={}&dst={}&probe={}&count={}&timeout_ms={}", req.src, req.dst, req.probe, req.count, req.timeout.as_millis());
    if let Some(s) = req.size {
        path += &format!("&size={s}");
    }
    if let Some(id) = icmp_id {
        path += &format!("&icmp_id={id}");
    }
    if req.opts.no_kprobes {
        path += "&no_kprobes=1";
    }
    if req.opts.until_drop {
        path += "&until_drop=1";
    }

    // Every node attaches at once; the source's agent holds its probe until the CLI says go, once every
    // node's probes are attached (a packet must not pass a node before it watches).
    let (tx, rx) = mpsc::channel::<(usize, Msg)>();
    let mut streams: BTreeMap<usize, Stream> = BTreeMap::new();
    let mut done: BTreeMap<usize, Part> = BTreeMap::new();
    let fail = |i: usize, e: String, missing: &mut Vec<MissingAgent>| {
        missing.push(MissingAgent { node: agents[i].0.clone(), agent: agents[i].1.to_string(), error: e });
    };
    let order: Vec<usize> = live.iter().map(|(i, _)| *i).collect();
    for &i in &order {
        let (node, addr) = &agents[i];
        let hold = if Some(i) == source { "&hold=1" } else { "" };
        match Stream::open(i, addr, &format!("{path}&node={node}{hold}"), tx.clone()) {
            Ok(s) => {
                streams.insert(i, s);
            }
            Err(e) => fail(i, format!("{e:#}"), &mut missing),
        }
    }
    let mut ready: Vec<usize> = Vec::new();
    // What each node's agent sent while its trace ran: what is known of a node whose agent dies.
    let mut seen: BTreeMap<usize, Known> = BTreeMap::new();
    let deadline = Instant::now() + agent_timeout;
    while streams.keys().any(|i| !ready.contains(i) && !done.contains_key(i)) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((j, Msg::Ready)) => ready.push(j),
            Ok((j, Msg::Event(e))) => seen.entry(j).or_default().see(*e),
            Ok((j, Msg::Final(p))) => {
                done.insert(j, *p);
            }
            Ok((j, Msg::Failed(e))) => {
                streams.remove(&j);
                fail(j, e, &mut missing);
            }
            Err(_) => {
                let late: Vec<usize> = streams.keys().copied().filter(|i| !ready.contains(i) && !done.contains_key(i)).collect();
                for i in late {
                    if let Some(st) = streams.remove(&i) {
                        st.stop();
                    }
                    fail(i, format!("its probes were not attached within {:.1} s", agent_timeout.as_secs_f64()), &mut missing);
                }
            }
        }
    }
    if let Some(st) = source.and_then(|s| streams.get_mut(&s)) {
        let _ = st.conn.write_all(b"go\n");
    }
    if let Some(s) = source {
        if !streams.contains_key(&s) && !done.contains_key(&s) {
            let why = missing.iter().find(|m| m.node == agents[s].0).map(|m| m.error.clone()).unwrap_or_default();
            for st in streams.values() {
                st.stop();
            }
            bail!("the source's node {} could not trace: {why}", agents[s].0);
        }
    }
    // `--ready-file` as on one node: written once every node that answered watches (a script starts its
    // traffic then).
    if let Some(file) = req.opts.ready_file.as_ref().filter(|_| !ready.is_empty()) {
        crate::follow::write_ready_file(file, t_start.elapsed().as_millis() as u64)?;
    }
    // The trace runs. The source's verdict, or a drop any node saw, ends it for every node.
    let deadline = Instant::now() + req.timeout + agent_timeout + Duration::from_secs(1);
    let mut stopping = false;
    while done.len() + missing_among(&missing, agents, &order) < order.len() {
        let Ok((j, msg)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            for (i, _) in streams.iter().filter(|(i, _)| !done.contains_key(i)) {
                fail(*i, format!("stopped answering during the trace; {}", known_before(seen.get(i))), &mut missing);
            }
            break;
        };
        match msg {
            Msg::Ready => {}
            Msg::Event(e) => seen.entry(j).or_default().see(*e),
            Msg::Final(p) => {
                let ends = Some(j) == source || p.report.verdict.verdict == Outcome::Dropped;
                done.insert(j, *p);
                if ends && !stopping {
                    stopping = true;
                    for (i, st) in &streams {
                        if !done.contains_key(i) {
                            st.stop();
                        }
                    }
                }
            }
            Msg::Failed(e) => {
                if !done.contains_key(&j) {
                    fail(j, format!("stopped answering during the trace: {e}; {}", known_before(seen.get(&j))), &mut missing);
                }
            }
        }
    }
    for st in streams.values() {
        st.stop();
    }
    if done.is_empty() {
        bail!("no agent returned a trace: {}", missing.iter().map(|m| format!("{}: {}", m.node, m.error)).collect::<Vec<_>>().join("; "));
    }
    let parts: Vec<(usize, Part)> = done.into_iter().collect();
    let mut report = stitch(parts, source, &pods_of, agents, req)?;
    if let Some(s) = report.stitched.as_mut() {
        s.missing = missing;
    }
    report.elapsed_ms = t_start.elapsed().as_millis() as u64;
    Ok(report)
}

/// What a node's agent had sent before it stopped answering (its events are not in the stitched
/// timeline: without its state and clock they cannot be placed or judged), in words: how many, and
/// the last of the pair's packets and any drop it saw.
fn known_before(known: Option<&Known>) -> String {
    let say = |e: &TraceEvent| {
        let what = e.packet.as_ref().map(|p| format!(" {}", p.what)).unwrap_or_default();
        let drop = e.drop.as_ref().map(|d| format!(" in {} ({})", d.function, d.reason)).unwrap_or_default();
        format!("{} {}: {}{what}{drop}", e.where_, e.ifname, format!("{:?}", e.kind).to_lowercase())
    };
    match known.and_then(|k| Some((k, k.last.as_ref()?))) {
        None => "nothing of this node is in it (it had sent no event)".into(),
        Some((k, last)) => {
            let mut s = format!("before, it had sent {} event{} of its node, not in the timeline; the last: {}", k.count, if k.count == 1 { "" } else { "s" }, say(last));
            if let Some(d) = k.drop.as_ref().filter(|d| *d != last) {
                s += &format!("; a drop: {}", say(d));
            }
            s
        }
    }
}

/// What one node's agent has streamed so far, as much as [`known_before`] says of it.
#[derive(Default)]
struct Known {
    count: usize,
    last: Option<TraceEvent>,
    drop: Option<TraceEvent>,
}

impl Known {
    fn see(&mut self, e: TraceEvent) {
        self.count += 1;
        if e.kind == crate::event::Kind::Drop {
            self.drop = Some(e.clone());
        }
        self.last = Some(e);
    }
}

/// The stitched trace's counters. Each agent's probes count what its kernel matched, whatever node
/// the packet was on: the agents of one kernel (the lab's nodes on one host) each counted the same
/// packets, so a kernel counts once (the most any of its agents counted); kernels add up. Records lost
/// are each agent's own ring buffer's: they add up everywhere. A part without a boot id is a kernel of
/// its own.
fn kernel_counters<'a>(parts: impl Iterator<Item = (&'a str, &'a Counters)>) -> Counters {
    let mut by_kernel: BTreeMap<String, Counters> = BTreeMap::new();
    let mut lost = 0;
    for (k, (boot_id, c)) in parts.enumerate() {
        let kernel = if boot_id.is_empty() { format!("part-{k}") } else { boot_id.to_string() };
        let e = by_kernel.entry(kernel).or_default();
        e.matched = e.matched.max(c.matched);
        e.emitted = e.emitted.max(c.emitted);
        e.counted_only = e.counted_only.max(c.counted_only);
        lost += c.lost;
    }
    let mut total = Counters { lost, ..Default::default() };
    for c in by_kernel.values() {
        total.matched += c.matched;
        total.emitted += c.emitted;
        total.counted_only += c.counted_only;
    }
    total
}

/// Namespace inodes are numbered by each kernel: two machines both have their root namespace at
/// 4026531840, and their pods' may collide too. The parts of one kernel (the reference's, or the lab's
/// nodes on one host) keep their numbers; each other kernel's are renumbered where they collide, the
/// same way in everything of its part (events, states, the pair, its list of namespaces), so the
/// stitched trace tells the machines' namespaces apart.
fn renumber(parts: &mut [(usize, Part)]) {
    use std::collections::{BTreeSet, HashMap};
    // Which kernel each number of the stitched trace belongs to.
    let mut owner: HashMap<u32, String> = HashMap::new();
    let mut kernels: HashMap<String, HashMap<u32, u32>> = HashMap::new();
    let inodes_of = |p: &Part| -> BTreeSet<u32> {
        let st = &p.recording.states;
        let mut all: BTreeSet<u32> = p.inodes.iter().copied().collect();
        all.extend(st.by_inode.keys().chain(st.rules_before.keys()).chain(st.names.keys()));
        all.extend([st.src_pod].into_iter().chain(st.src_node).chain(st.dst_pod).chain(st.dst_node));
        all.extend(st.service.as_ref().map(|s| s.nat_node));
        all.extend(p.recording.events.iter().map(|e| e.netns));
        for ep in [&p.report.src, &p.report.dst] {
            if let Some(l) = ep.local() {
                all.insert(l.netns.inode);
                all.extend(l.node.as_ref().map(|n| n.netns.inode));
            }
        }
        all.remove(&0);
        all
    };
    for (k, (_, p)) in parts.iter_mut().enumerate() {
        let own = inodes_of(p);
        // A part without a boot id is a kernel of its own.
        let kernel = if p.boot_id.is_empty() { format!("part-{k}") } else { p.boot_id.clone() };
        let map = kernels.entry(kernel.clone()).or_default();
        for i in own {
            if map.contains_key(&i) {
                continue;
            }
            let to = if owner.get(&i).is_none_or(|o| *o == kernel) {
                i
            } else {
                // A number no kernel of the trace uses, from the top down (above any inode the kernel
                // hands out in practice: proc inodes start at 0xF0000000 and count up).
                let mut n = u32::MAX;
                while owner.contains_key(&n) {
                    n -= 1;
                }
                n
            };
            owner.insert(to, kernel.clone());
            map.insert(i, to);
        }
        if map.iter().all(|(a, b)| a == b) {
            continue;
        }
        let m = |i: u32| map.get(&i).copied().unwrap_or(i);
        let st = &mut p.recording.states;
        st.by_inode = std::mem::take(&mut st.by_inode)
            .into_iter()
            .map(|(i, mut ns)| {
                ns.inode = m(ns.inode);
                (m(i), ns)
            })
            .collect();
        st.rules_before = std::mem::take(&mut st.rules_before).into_iter().map(|(i, r)| (m(i), r)).collect();
        st.names = std::mem::take(&mut st.names).into_iter().map(|(i, n)| (m(i), n)).collect();
        st.src_pod = if st.src_pod == 0 { 0 } else { m(st.src_pod) };
        st.src_node = st.src_node.map(m);
        st.dst_pod = st.dst_pod.map(m);
        st.dst_node = st.dst_node.map(m);
        if let Some(sv) = st.service.as_mut() {
            sv.nat_node = m(sv.nat_node);
        }
        for e in &mut p.recording.events {
            e.netns = m(e.netns);
        }
        for ep in [&mut p.report.src, &mut p.report.dst] {
            if let Endpoint::Local(l) = ep {
                l.netns.inode = m(l.netns.inode);
                if let Some(n) = l.node.as_mut() {
                    n.netns.inode = m(n.netns.inode);
                }
            }
        }
        p.inodes = p.inodes.iter().map(|i| m(*i)).collect();
    }
}

fn missing_among(missing: &[MissingAgent], agents: &[(String, Addr)], order: &[usize]) -> usize {
    order.iter().filter(|i| missing.iter().any(|m| m.node == agents[**i].0)).count()
}

/// One report from the nodes' parts: events placed on the source node's clock, the nodes' states
/// merged, diagnosed as a recording is.
fn stitch(mut parts: Vec<(usize, Part)>, source: Option<usize>, pods_of: &BTreeMap<usize, Vec<Ipv4Addr>>, agents: &[(String, Addr)], req: &FollowRequest) -> Result<Report> {
    // The reference clock: the source's node (or the first that answered, for a passive trace).
    let r = parts.iter().position(|(i, _)| Some(*i) == source).unwrap_or(0);
    parts.swap(0, r);
    renumber(&mut parts);
    let placed = place(&parts.iter().map(|(i, p)| (p, pods_of.get(i).map(Vec::as_slice).unwrap_or(&[]))).collect::<Vec<_>>());
    let mut shares = Vec::new();
    let mut events: Vec<TraceEvent> = Vec::new();
    let mut shifted: Vec<Vec<(i128, TraceEvent)>> = Vec::new();
    for (k, ((i, p), (offset, clock))) in parts.iter().zip(&placed).enumerate() {
        let same_kernel = p.boot_id == parts[0].1.boot_id && !p.boot_id.is_empty();
        shifted.push(
            p.recording
                .events
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    // Another kernel's socket buffers are other objects, whatever their address.
                    if !same_kernel {
                        e.skb ^= (k as u64) << 48;
                    }
                    (e.t_ns as i128 + *offset as i128, e)
                })
                .collect(),
        );
        shares.push(NodeShare {
            node: p.node.clone(),
            agent: agents[*i].1.to_string(),
            role: if Some(*i) == source { "sent the probe" } else { "watched" },
            events: p.recording.events.len(),
            offset_ns: *offset,
            clock: clock.clone(),
            inodes: p.inodes.clone(),
        });
    }
    let min = shifted.iter().flatten().map(|(t, _)| *t).min().unwrap_or(0).min(0);
    for list in shifted {
        events.extend(list.into_iter().map(|(t, mut e)| {
            e.t_ns = (t - min) as u64;
            e
        }));
    }
    events.sort_by_key(|e| e.t_ns);

    let first = &parts[0].1;
    let mut states: States = first.recording.states.clone();
    for (_, p) in &parts[1..] {
        let s = &p.recording.states;
        states.by_inode.extend(s.by_inode.clone());
        states.rules_before.extend(s.rules_before.clone());
        states.names.extend(s.names.clone());
        if states.src_pod == 0 && s.src_pod != 0 {
            (states.src_pod, states.src_node, states.src_host_veth, states.src_name) = (s.src_pod, s.src_node, s.src_host_veth, s.src_name.clone());
        }
        if states.dst_pod.is_none() && s.dst_pod.is_some() {
            (states.dst_pod, states.dst_node, states.dst_host_veth, states.dst_name) = (s.dst_pod, s.dst_node, s.dst_host_veth, s.dst_name.clone());
        }
        if states.service.is_none() {
            states.service = s.service.clone();
        }
    }
    if states.cluster.is_none() {
        states.cluster = req.cluster.clone();
    }
    let recording = Recording {
        events,
        probe: first.recording.probe.clone(),
        states,
        arp_unanswered: parts.iter().find_map(|(_, p)| p.recording.arp_unanswered.clone()),
        t0_unix_ns: first.recording.t0_unix_ns.map(|t| (t as i128 + min) as u64),
        t0_mono_ns: first.recording.t0_mono_ns.map(|t| (t as i128 + min) as u64),
    };
    let (trace, mut verdict) = recording.diagnose();
    // What a node's kernel could not give is said by its own agent for its own drop.
    if let Some(f) = &verdict.function {
        if let Some((_, p)) = parts.iter().find(|(_, p)| p.report.verdict.function.as_ref() == Some(f)) {
            verdict.missing = p.report.verdict.missing.clone();
        }
    }
    let died_on = (verdict.verdict == Outcome::Dropped)
        .then_some(verdict.netns.as_ref())
        .flatten()
        .and_then(|w| parts.iter().find(|(_, p)| p.namespaces.contains(w) || p.recording.events.iter().any(|e| &e.where_ == w)))
        .map(|(_, p)| p.node.clone());
    // The pair as the nodes that hold them see it.
    let holds = |ep: &Endpoint| ep.local().is_some_and(|l| l.node.is_some());
    let src = parts.iter().map(|(_, p)| &p.report.src).find(|e| holds(e)).unwrap_or(&first.report.src).clone();
    let dst = parts.iter().map(|(_, p)| &p.report.dst).find(|e| holds(e)).unwrap_or(&first.report.dst).clone();
    let counters = kernel_counters(parts.iter().map(|(_, p)| (p.boot_id.as_str(), &p.report.counters)));
    Ok(Report {
        src,
        dst,
        trace,
        verdict,
        counters,
        hooks: first.report.hooks.clone(),
        probe: recording.probe.clone(),
        states: recording.states,
        elapsed_ms: 0,
        ready_ms: parts.iter().map(|(_, p)| p.report.ready_ms).max().unwrap_or(0),
        events_not_kept: parts.iter().map(|(_, p)| p.report.events_not_kept).sum(),
        ring_peak: parts.iter().map(|(_, p)| p.report.ring_peak).max_by_key(|r| r.records).unwrap_or_default(),
        program_stats: Vec::new(),
        peak_rss_kib: 0,
        arp_unanswered: recording.arp_unanswered,
        t0_unix_ns: recording.t0_unix_ns,
        t0_mono_ns: recording.t0_mono_ns,
        stitched: Some(Stitched { nodes: shares, missing: Vec::new(), died_on }),
    })
}

/// Where each part's first event sits on the first part's clock (ns), and what placed it. `parts[k].1`:
/// the addresses of the pods of that part's node.
fn place(parts: &[(&Part, &[Ipv4Addr])]) -> Vec<(i64, String)> {
    let Some((reference, _)) = parts.first() else { return Vec::new() };
    let first_seen = |p: &Part| {
        let mut m: BTreeMap<String, (u64, Ipv4Addr)> = BTreeMap::new();
        for e in &p.recording.events {
            if let Some(pk) = &e.packet {
                m.entry(pk.key.clone()).or_insert((e.t_ns, pk.src));
            }
        }
        m
    };
    let ref_seen = first_seen(reference);
    let mut out = vec![(0, format!("the source's node ({})", reference.node))];
    for (p, pods) in &parts[1..] {
        let same_kernel = !p.boot_id.is_empty() && p.boot_id == reference.boot_id;
        if same_kernel {
            if let (Some(a), Some(b)) = (p.recording.t0_mono_ns, reference.recording.t0_mono_ns) {
                out.push((a as i64 - b as i64, format!("one kernel with {} (monotonic clock)", reference.node)));
                continue;
            }
        }
        let wall = match (p.recording.t0_unix_ns, reference.recording.t0_unix_ns) {
            (Some(a), Some(b)) => a as i64 - b as i64,
            _ => 0,
        };
        // A packet is seen first on the node that holds its source address.
        let (mut low, mut high) = (i64::MIN, i64::MAX);
        for (key, (t, src)) in first_seen(p) {
            let Some((t_ref, _)) = ref_seen.get(&key) else { continue };
            let bound = *t_ref as i64 - t as i64;
            if pods.contains(&src) {
                high = high.min(bound);
            } else if parts[0].1.contains(&src) {
                low = low.max(bound);
            }
        }
        let offset = wall.clamp(low.min(high), high.max(low));
        let clock = if offset == wall { "wall clock (causality agrees)".to_string() } else { format!("wall clock, moved {} µs by causality", (offset - wall) / 1000) };
        out.push((offset, clock));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: u64, key: &str, src: &str, dst: &str, where_: &str) -> TraceEvent {
        serde_json::from_value(serde_json::json!({
            "t_ns": t, "kind": "receive", "netns": 1, "where_": where_, "ifindex": 2, "ifname": "eth0", "cpu": 0, "skb": 1,
            "packet": {"proto": "icmp", "src": src, "dst": dst, "what": "echo", "len": 84, "icmp_error": false, "key": key},
        }))
        .unwrap()
    }

    fn part(node: &str, boot: &str, mono: u64, unix: u64, events: Vec<TraceEvent>) -> Part {
        serde_json::from_value(serde_json::json!({
            "node": node, "boot_id": boot,
            "report": {"src": {"Remote": "10.1.0.5"}, "dst": {"Remote": "10.1.1.7"}, "verdict": {"verdict": "delivered", "cause": null, "layer": null, "function": null, "reason": null, "ifname": null, "netns": null, "explanation": "", "facts": []},
                       "counters": {"matched": 0, "emitted": 0, "lost": 0, "counted_only": 0}, "hooks": [], "ready_ms": 1, "events_not_kept": 0},
            "recording": {"events": events, "probe": {"sent": 1, "answered": 1, "icmp_errors": [], "send_error": null, "sizes": [], "answered_each": []},
                          "states": States::default(), "t0_unix_ns": unix, "t0_mono_ns": mono},
        }))
        .unwrap()
    }

    #[test]
    fn one_kernel_places_nodes_by_its_monotonic_clock() {
        let a = part("a", "boot-1", 1_000_000, 5_000_000, vec![ev(0, "req", "10.1.0.5", "10.1.1.7", "a")]);
        let b = part("b", "boot-1", 1_250_000, 9_999_999_999, vec![ev(0, "req", "10.1.0.5", "10.1.1.7", "b")]);
        let placed = place(&[(&a, &["10.1.0.5".parse().unwrap()]), (&b, &["10.1.1.7".parse().unwrap()])]);
        assert_eq!(placed[1].0, 250_000, "the wall clocks do not matter on one kernel: {placed:?}");
        assert!(placed[1].1.starts_with("one kernel with a"));
    }

    #[test]
    fn across_kernels_causality_corrects_a_wall_clock_that_is_off() {
        let src: Ipv4Addr = "10.1.0.5".parse().unwrap();
        let dst: Ipv4Addr = "10.1.1.7".parse().unwrap();
        // On a: the request leaves at 0, the reply arrives at 900 µs. On b (its first event = the request
        // arriving): the reply leaves 400 µs after it. b's wall clock says it started 2 ms *before* a.
        let a = part("a", "boot-a", 0, 10_000_000, vec![ev(0, "req", "10.1.0.5", "10.1.1.7", "a"), ev(900_000, "rep", "10.1.1.7", "10.1.0.5", "a")]);
        let b = part("b", "boot-b", 0, 8_000_000, vec![ev(0, "req", "10.1.0.5", "10.1.1.7", "b"), ev(400_000, "rep", "10.1.1.7", "10.1.0.5", "b")]);
        let placed = place(&[(&a, &[src]), (&b, &[dst])]);
        // The request arrived after it left (offset ≥ 0), the reply left before it arrived (≤ 500 µs).
        assert_eq!(placed[1].0, 0, "{placed:?}");
        assert!(placed[1].1.contains("moved 2000 µs by causality"), "{placed:?}");
        // A wall clock within the bounds is kept.
        let b = part("b", "boot-b", 0, 10_300_000, b.recording.events.clone());
        let placed = place(&[(&a, &[src]), (&b, &[dst])]);
        assert_eq!(placed[1].0, 300_000);
        assert!(placed[1].1.contains("causality agrees"));
    }

    #[test]
    fn one_kernels_agents_count_its_packets_once_and_kernels_add_up() {
        let c = |matched, emitted, lost, counted_only| Counters { matched, emitted, lost, counted_only };
        let lab = [("k1", c(40, 38, 1, 0)), ("k1", c(41, 39, 2, 5))];
        let t = kernel_counters(lab.iter().map(|(b, c)| (*b, c)));
        assert_eq!((t.matched, t.emitted, t.lost, t.counted_only), (41, 39, 3, 5));
        let machines = [("k1", c(40, 38, 0, 0)), ("k2", c(7, 7, 1, 0)), ("", c(3, 3, 0, 0))];
        let t = kernel_counters(machines.iter().map(|(b, c)| (*b, c)));
        assert_eq!((t.matched, t.emitted, t.lost), (50, 48, 1));
    }

    /// Two machines: both roots are init_net (4026531840) and a pod namespace number repeats; on one
    /// kernel (the lab's two nodes) a shared number is one namespace and stays.
    #[test]
    fn each_kernels_namespaces_stay_apart_and_one_kernels_stay_together() {
        let root = 4026531840u32;
        let mut a = part("a", "boot-a", 0, 0, vec![ev(0, "req", "10.1.0.5", "10.1.1.7", "a")]);
        let mut b = part("b", "boot-b", 0, 0, vec![ev(0, "req", "10.1.0.5", "10.1.1.7", "b")]);
        for (p, pod) in [(&mut a, 4026532300u32), (&mut b, 4026532300u32)] {
            p.inodes = vec![root, pod];
            p.recording.events[0].netns = root;
            for (i, name) in [(root, "host"), (pod, "pod")] {
                p.recording.states.by_inode.insert(i, crate::state::NsState { inode: i, name: format!("{}-{name}", p.node), ..Default::default() });
            }
            p.recording.states.dst_node = Some(root);
        }
        let mut parts = vec![(0, a), (1, b)];
        renumber(&mut parts);
        let (a, b) = (&parts[0].1, &parts[1].1);
        assert_eq!(a.inodes, vec![root, 4026532300], "the reference keeps its numbers");
        assert!(b.inodes.iter().all(|i| !a.inodes.contains(i)), "{:?} vs {:?}", b.inodes, a.inodes);
        let b_root = b.inodes[0];
        assert_eq!(b.recording.events[0].netns, b_root);
        assert_eq!(b.recording.states.dst_node, Some(b_root));
        assert_eq!(b.recording.states.by_inode[&b_root].name, "b-host");
        assert_eq!(b.recording.states.by_inode[&b_root].inode, b_root);
        let mut merged = a.recording.states.by_inode.clone();
        merged.extend(b.recording.states.by_inode.clone());
        assert_eq!(merged.len(), 4, "four namespaces, none hidden by another machine's");

        // One kernel: the same numbers are the same namespaces.
        let mut c = part("c", "boot-a", 0, 0, vec![ev(0, "req", "10.1.0.5", "10.1.1.7", "c")]);
        c.inodes = vec![root, 4026532400];
        let mut parts = vec![parts.remove(0), (2, c)];
        renumber(&mut parts);
        assert_eq!(parts[1].1.inodes, vec![root, 4026532400]);
    }
}
