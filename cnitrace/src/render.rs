//! Text and JSON renderings of a `follow` report, from the same model.

use std::io::Write;

use anyhow::Result;

use crate::{
    event::{Kind, TraceEvent},
    finding::Outcome,
    follow::Report,
    resolve::Endpoint,
};

fn endpoint(e: &Endpoint) -> String {
    match e {
        Endpoint::Local(l) => {
            let node = l
                .node
                .as_ref()
                .map(|n| format!(", node {} via {}", n.display, n.host_veth))
                .unwrap_or_default();
            format!("{} ({}, netns {}, {}{node})", l.ip, l.display, l.netns.name, l.ifname)
        }
        Endpoint::Remote(ip) => format!("{ip} (not on this host)"),
    }
}

fn what(e: &TraceEvent) -> String {
    match e.kind {
        Kind::Xmit => "xmit".into(),
        Kind::Receive => "receive".into(),
        Kind::Queue => "queue".into(),
        Kind::Consume => "consumed".into(),
        Kind::Drop => {
            let d = e.drop.as_ref().expect("drop info");
            format!("DROP {} at {}", d.reason, d.function)
        }
        Kind::Route => {
            let r = e.route.as_ref().expect("route info");
            let p = e.packet.as_ref();
            let dst = p.map(|p| p.dst.to_string()).unwrap_or_default();
            if r.err == 0 {
                format!("route {dst}: table {} → {}", r.table, r.oif.clone().unwrap_or_else(|| "?".into()))
            } else {
                format!("route {dst}: table {} miss (err {})", r.table, r.err)
            }
        }
        Kind::Func => {
            let f = e.func.as_ref().expect("func info");
            let mut s = f.function.clone();
            if !f.detail.is_empty() {
                s.push_str(&format!(" {}", f.detail));
            }
            if let Some(v) = &f.verdict {
                s.push_str(&format!(" → {v}"));
            }
            s
        }
        Kind::Neigh => {
            let n = e.neigh.as_ref().expect("neigh info");
            if n.lladdr == "00:00:00:00:00:00" {
                format!("neighbour {} {}", n.ip, n.state)
            } else {
                format!("neighbour {} {} {}", n.ip, n.state, n.lladdr)
            }
        }
    }
}

/// How text is written: every event or the hops that matter, with colour or without.
#[derive(Clone, Copy, Debug, Default)]
pub struct Style {
    /// Every event (`-v`); else the terse timeline.
    pub verbose: bool,
    pub color: bool,
}

impl Style {
    /// For standard output: colour with `--color always`, or `auto` on a terminal unless `NO_COLOR` is set
    /// (no-color.org) or the terminal is dumb.
    pub fn for_stdout(choice: clap::ColorChoice, verbose: bool) -> Style {
        use std::io::IsTerminal;
        let color = match choice {
            clap::ColorChoice::Always => true,
            clap::ColorChoice::Never => false,
            clap::ColorChoice::Auto => {
                std::io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::env::var("TERM").is_ok_and(|t| t != "dumb")
            }
        };
        Style { verbose, color }
    }

    /// A drop's line: red where colour is on.
    pub fn paint_drop(&self, text: &str) -> String {
        self.paint(text, RED)
    }

    fn paint(&self, text: &str, style: anstyle::Style) -> String {
        if self.color {
            format!("{}{text}{}", style.render(), style.render_reset())
        } else {
            text.to_string()
        }
    }
}

const RED: anstyle::Style = anstyle::AnsiColor::Red.on_default().bold();
const GREEN: anstyle::Style = anstyle::AnsiColor::Green.on_default().bold();
const YELLOW: anstyle::Style = anstyle::AnsiColor::Yellow.on_default().bold();
const BOLD: anstyle::Style = anstyle::Style::new().bold();
const DIM: anstyle::Style = anstyle::Style::new().dimmed();

/// `width`: the widest place name of the trace (pods named `namespace/name` run long).
fn line(e: &TraceEvent, width: usize, style: &Style) -> String {
    let encap = e.packet.as_ref().and_then(|p| p.outer.as_ref()).map(|o| format!("  [vxlan {} → {} vni {}]", o.src, o.dst, o.vni)).unwrap_or_default();
    let text = format!("  {:>9.3} ms  {:<width$} {:<14} {}{encap}", e.t_ns as f64 / 1e6, e.where_, e.ifname, what(e));
    match e.kind {
        Kind::Drop if !crate::path::is_noise(e) => style.paint(&text, RED),
        _ => text,
    }
}

/// The hops of one packet a person needs: where it went, where it turned back, where it died — not the
/// loopback legs of the probe's own ICMP errors, queueing, the copies freed after delivery, the noise
/// drops `follow` already discounts, nor the same hop twice in a row.
pub fn terse(events: &[TraceEvent]) -> Vec<&TraceEvent> {
    let mut kept: Vec<&TraceEvent> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let keep = match e.kind {
            Kind::Drop => !crate::path::is_noise(e),
            _ if e.ifname == "lo" => false,
            Kind::Queue => false,
            // The last consume is the delivery; earlier ones are clones freed on the way.
            Kind::Consume => i + 1 == events.len(),
            _ => true,
        };
        let repeat = kept.last().is_some_and(|p| p.where_ == e.where_ && p.ifname == e.ifname && p.kind == e.kind);
        if keep && !repeat {
            kept.push(e);
        }
    }
    kept
}

/// Route lookups and neighbour changes worth a line in the terse timeline: what failed.
fn control_matters(e: &TraceEvent) -> bool {
    match (&e.route, &e.neigh) {
        (Some(r), _) => r.err != 0,
        (_, Some(n)) => n.state.split('|').any(|s| s == "failed" || s == "incomplete"),
        _ => false,
    }
}

pub fn text(r: &Report, style: &Style, out: &mut impl Write) -> Result<()> {
    match &r.states.service {
        Some(sp) => writeln!(out, "follow {} → {} (Service {}, translated on {})", endpoint(&r.src), sp.asked, sp.name(), sp.nat_node_name)?,
        None => writeln!(out, "follow {} → {}", endpoint(&r.src), endpoint(&r.dst))?,
    }
    let attached = r.hooks.iter().filter(|h| h.attached).count();
    let missing: Vec<String> = r.hooks.iter().filter(|h| !h.attached).map(|h| format!("{}: {}", h.hook, h.reason.clone().unwrap_or_default())).collect();
    writeln!(out, "hooks: {attached} attached{}", if missing.is_empty() { String::new() } else { format!("; unavailable: {}", missing.join("; ")) })?;
    let width = r.trace.events.iter().chain(&r.trace.control).map(|e| e.where_.chars().count()).max().unwrap_or(0).max(18);
    let mut hidden = 0;
    for p in &r.trace.packets {
        let events: Vec<&TraceEvent> = if style.verbose { p.events.iter().collect() } else { terse(&p.events) };
        hidden += p.events.len() - events.len();
        if events.is_empty() {
            continue;
        }
        writeln!(out, "\n{}", style.paint(&p.what, BOLD))?;
        // A translation prints before the first hop shown with the new addresses.
        let mut nat = p.nat.iter().peekable();
        for e in events {
            while let Some(n) = nat.next_if(|n| n.t_ns <= e.t_ns) {
                writeln!(out, "{}", style.paint(&format!("  {:>12}  {:<width$} {}", "", n.where_, n.describe()), YELLOW))?;
            }
            writeln!(out, "{}", line(e, width, style))?;
        }
        for n in nat {
            writeln!(out, "{}", style.paint(&format!("  {:>12}  {:<width$} {}", "", n.where_, n.describe()), YELLOW))?;
        }
    }
    // The local table (255) is consulted before the main one for every packet: only its hits matter.
    let control: Vec<&TraceEvent> =
        r.trace.control.iter().filter(|e| e.route.as_ref().is_none_or(|x| x.table != 255)).filter(|e| style.verbose || control_matters(e)).collect();
    hidden += r.trace.control.len() - control.len();
    if !control.is_empty() {
        writeln!(out, "\n{}", style.paint(if style.verbose { "route lookups and neighbours" } else { "failed route lookups and neighbours" }, BOLD))?;
        for e in control.iter().take(30) {
            writeln!(out, "{}", line(e, width, style))?;
        }
    }
    if hidden > 0 && !style.verbose {
        writeln!(out, "{}", style.paint(&format!("  ({hidden} more events; -v shows every one)"), DIM))?;
    }
    writeln!(out)?;
    verdict_styled(&r.verdict, style, out)?;
    if let Some(s) = &r.stitched {
        if let Some(n) = &s.died_on {
            writeln!(out, "  {} {}", style.paint("node:", BOLD), style.paint(n, BOLD))?;
        }
        for n in &s.nodes {
            writeln!(out, "  agent {} ({}): {}, {} events, clock: {}", n.node, n.agent, n.role, n.events, n.clock)?;
        }
        for m in &s.missing {
            writeln!(out, "{}", style.paint(&format!("  agent {} ({}): NOT TRACED — {}", m.node, m.agent, m.error), RED))?;
        }
    }
    writeln!(
        out,
        "events: {} matched, {} emitted, {} lost{}; ready in {} ms, {} ms in all",
        r.counters.matched,
        r.counters.emitted,
        r.counters.lost,
        match (r.events_not_kept, r.counters.counted_only) {
            (0, 0) => String::new(),
            (n, k) => format!(" ({n} drained but not kept, {k} more hop records counted in the kernel)"),
        },
        r.ready_ms,
        r.elapsed_ms
    )?;
    if r.counters.lost > 0 {
        // Why the ring overflowed: a reader kept away long, or records faster than its period.
        writeln!(
            out,
            "  {} records lost to a full ring: at its fullest the reader took {} records, {} ms after it last emptied it ({}), in {} ms; it was on the CPU {} ms of those {} ms",
            r.counters.lost,
            r.ring_peak.records,
            r.ring_peak.waited_ms,
            r.ring_peak.away.describe(),
            r.ring_peak.emptying_ms,
            r.ring_peak.on_cpu_ms,
            r.ring_peak.waited_ms + r.ring_peak.emptying_ms,
        )?;
    }
    Ok(())
}

/// JSON Lines: one object per event, then the verdict object last.
pub fn json(r: &Report, out: &mut impl Write) -> Result<()> {
    for e in &r.trace.events {
        let mut v = serde_json::to_value(e)?;
        v["type"] = "event".into();
        writeln!(out, "{v}")?;
    }
    let mut v = serde_json::to_value(&r.verdict)?;
    v["type"] = "verdict".into();
    v["counters"] = serde_json::to_value(r.counters)?;
    v["elapsed_ms"] = r.elapsed_ms.into();
    v["ready_ms"] = r.ready_ms.into();
    v["events_not_kept"] = r.events_not_kept.into();
    v["ring_peak"] = serde_json::to_value(r.ring_peak)?;
    v["peak_rss_kib"] = r.peak_rss_kib.into();
    v["hooks"] = serde_json::to_value(&r.hooks)?;
    if !r.program_stats.is_empty() {
        v["program_stats"] = serde_json::to_value(&r.program_stats)?;
    }
    if let Some(sp) = &r.states.service {
        v["service"] = serde_json::json!({
            "name": sp.name(),
            "asked": sp.asked.to_string(),
            "node_port": sp.node_port,
            "translated_on": sp.nat_node_name,
            "backend": sp.service.as_ref().map(|s| s.backend.clone()),
            "endpoints": sp.service.as_ref().map(|s| s.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
            "endpoint": sp.chosen.as_ref().map(|e| e.addr.to_string()),
            "rule": sp.chosen.as_ref().map(|e| e.chain.clone()),
            "translations": r.trace.translations().iter().map(|n| n.describe()).collect::<Vec<_>>(),
            "left_over": sp.left_over,
        });
    }
    if let Some(s) = &r.stitched {
        v["agents"] = serde_json::to_value(s)?;
        v["node"] = serde_json::to_value(&s.died_on)?;
    }
    v["src"] = serde_json::to_value(&r.src)?;
    v["dst"] = serde_json::to_value(&r.dst)?;
    // The pair as Kubernetes names it, where the API said.
    if let Some(c) = &r.states.cluster {
        for (key, ip) in [("src_pod", r.src.ip()), ("dst_pod", r.dst.ip())] {
            if let Some(p) = c.pod_with_ip(ip) {
                v[key] = serde_json::json!({ "pod": p.name, "namespace": p.namespace, "node": p.node });
            }
        }
    }
    writeln!(out, "{v}")?;
    Ok(())
}

/// The verdict block: cause, where, why, facts.
pub fn verdict(v: &crate::finding::Verdict, out: &mut (impl Write + ?Sized)) -> Result<()> {
    verdict_styled(v, &Style::default(), out)
}

pub fn verdict_styled(v: &crate::finding::Verdict, style: &Style, out: &mut (impl Write + ?Sized)) -> Result<()> {
    match v.verdict {
        Outcome::Delivered => writeln!(out, "verdict: {}", style.paint("DELIVERED", GREEN))?,
        Outcome::Dropped => writeln!(
            out,
            "verdict: {} — cause {} (layer {})",
            style.paint("DROPPED", RED),
            style.paint(&v.cause.clone().unwrap_or_else(|| "unknown".into()), BOLD),
            v.layer.clone().unwrap_or_else(|| "?".into())
        )?,
        Outcome::Inconclusive => writeln!(out, "verdict: {}", style.paint("INCONCLUSIVE", YELLOW))?,
    }
    if v.verdict != Outcome::Delivered {
        // The fault's place, then the kernel's drop site on a line of its own: one fault reads the same
        // whichever way the kernel happened to free its packet.
        let at = [v.netns.clone(), v.ifname.clone()].into_iter().flatten().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(", ");
        if !at.is_empty() {
            writeln!(out, "  where: {}", style.paint(&at, BOLD))?;
        }
        if let Some(d) = &v.dropped_at {
            let place = [d.netns.as_str(), d.ifname.as_str()].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
            writeln!(out, "  drop:  {} ({}) on {place}", d.function, d.reason)?;
        }
    }
    writeln!(out, "  why:   {}", v.explanation)?;
    for f in &v.facts {
        writeln!(out, "   - {f}")?;
    }
    for m in &v.missing {
        writeln!(out, "  missing on this kernel: {m}")?;
    }
    if let Some(d) = &v.doc {
        writeln!(out, "  guide: {d}")?;
    }
    Ok(())
}
