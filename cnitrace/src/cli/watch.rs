use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::{
    probe::{kallsyms, watch::Watcher},
    watch::{self, Group, Namer},
};

#[derive(Args)]
pub struct WatchArgs {
    /// Seconds between two readings of the kernel's counts.
    #[arg(long, default_value = "1", value_name = "SECS", value_parser = super::trace_timeout)]
    interval: Duration,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long, value_name = "SECS", value_parser = super::trace_timeout)]
    duration: Option<Duration>,
    /// JSON Lines: every group that changed, each period.
    #[arg(long)]
    json: bool,
    /// Also show the noise classes (TCP duplicates, ping replies after their socket, queue purges, IPv6
    /// and multicast nobody joined on an IPv4 pod network).
    #[arg(long)]
    all: bool,
    /// Serve the counts as Prometheus metrics at ADDR (`cnitrace_drops_total`, by node, pod, reason,
    /// function), e.g. 127.0.0.1:9465.
    #[arg(long, value_name = "ADDR")]
    prometheus: Option<std::net::SocketAddr>,
    /// Write FILE once the drop counter is attached; it holds the milliseconds start-up took (as
    /// `follow --ready-file`: a script sends its traffic after it, not after a guessed sleep).
    #[arg(long, value_name = "FILE")]
    ready_file: Option<std::path::PathBuf>,
    /// Colour and a live table on a terminal: auto, always, never.
    #[arg(long, value_enum, default_value_t = clap::ColorChoice::Auto, value_name = "WHEN")]
    color: clap::ColorChoice,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    node: String,
    pod: String,
    netns: String,
    reason: String,
    function: String,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn run(args: WatchArgs, kube: &crate::k8s::KubeArgs) -> Result<u8> {
    if !crate::sys::is_root() {
        bail!("`cnitrace watch` needs root (it loads an eBPF program)");
    }
    crate::sys::on_stop_signals(on_signal);
    let metrics = match args.prometheus {
        Some(addr) => Some(serve_metrics(addr)?),
        None => None,
    };
    let t_start = Instant::now();
    let watcher = Watcher::start()?;
    if let Some(path) = &args.ready_file {
        crate::follow::write_ready_file(path, t_start.elapsed().as_millis() as u64)?;
    }
    let live = !args.json && std::io::stdout().is_terminal();
    let style = crate::render::Style::for_stdout(args.color, false);
    let started = Instant::now();
    let mut functions: HashMap<u64, String> = HashMap::new();
    // Pods by their Kubernetes names where the API answers (asked again with every rescan: pods come and
    // go); a node without one names them by what it shows.
    let mut cluster = match crate::k8s::connect(kube) {
        Ok(c) => Some(c),
        Err(e) => {
            if !args.json || matches!(e, crate::k8s::NoApi::BadConfig { .. }) {
                crate::k8s::note_no_api(&e);
            }
            None
        }
    };
    let mut namer = Namer::scan(cluster.as_mut());
    let mut named_at = Instant::now();
    let mut before: Vec<Group> = Vec::new();
    eprintln!("cnitrace: watching every drop on this host ({} on kfree_skb{}); Ctrl-C ends", watcher.program, if watcher.has_reasons { "" } else { ", no drop reasons on this kernel" });
    let mut out = std::io::stdout().lock();
    loop {
        let deadline = Instant::now() + args.interval;
        while Instant::now() < deadline && !STOP.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50).min(args.interval));
        }
        let counts = watcher.counts();
        let unknown: Vec<u64> = counts.iter().map(|(k, _)| k.location).filter(|l| !functions.contains_key(l)).collect();
        if !unknown.is_empty() {
            functions.extend(kallsyms::resolve(&unknown));
        }
        if named_at.elapsed() > Duration::from_secs(10) {
            namer = Namer::scan(cluster.as_mut());
            named_at = Instant::now();
        }
        let now = watch::with_rates(watch::group(&counts, &namer, &functions, |c| watcher.reason_name(c)), &before, args.interval);
        if let Some(family) = &metrics {
            for g in &now {
                let prev = before.iter().find(|b| watch::same(b, g)).map(|b| b.total).unwrap_or(0);
                let labels = DropLabels { node: g.node.clone().unwrap_or_else(|| g.netns.clone()), pod: g.pod.clone(), netns: g.netns.clone(), reason: g.reason.clone(), function: g.function.clone() };
                family.get_or_create(&labels).inc_by(g.total.saturating_sub(prev));
            }
        }
        let t = started.elapsed().as_secs_f64();
        let shown: Vec<&Group> = now.iter().filter(|g| args.all || g.noise.is_none()).collect();
        if args.json {
            for g in shown.iter().filter(|g| g.rate > 0.0) {
                let mut v = serde_json::to_value(g)?;
                v["t"] = serde_json::json!((t * 1000.0).round() / 1000.0);
                writeln!(out, "{v}")?;
            }
        } else if live {
            table(&mut out, &now, &shown, t, &style)?;
        } else {
            for g in shown.iter().filter(|g| g.rate > 0.0) {
                writeln!(out, "{t:>8.1} s  +{:<6} {:<24} {:<26} {:<22} {} {}  (total {}, {:.1}/s)", (g.rate * args.interval.as_secs_f64()).round(), g.pod, g.reason, g.function, g.netns, g.ifname, g.total, g.rate)?;
            }
        }
        out.flush()?;
        before = now;
        if STOP.load(std::sync::atomic::Ordering::SeqCst) || args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    Ok(crate::exit::OK)
}

/// The live view: the groups by rate, then total, a screen at a time.
fn table(out: &mut impl Write, all: &[Group], shown: &[&Group], t: f64, style: &crate::render::Style) -> Result<()> {
    let mut rows: Vec<&&Group> = shown.iter().collect();
    rows.sort_by(|a, b| b.rate.total_cmp(&a.rate).then(b.total.cmp(&a.total)));
    write!(out, "\x1b[H\x1b[2J")?;
    writeln!(out, "cnitrace watch — every drop on this host, {t:.0} s (Ctrl-C ends)\n")?;
    writeln!(out, "{:>9} {:>8}  {:<28} {:<26} {:<24} where", "rate/s", "total", "pod", "reason", "function")?;
    for g in rows.iter().take(40) {
        let line = format!("{:>9.1} {:>8}  {:<28} {:<26} {:<24} {} {}", g.rate, g.total, g.pod, g.reason, g.function, g.netns, g.ifname);
        writeln!(out, "{}", if g.rate > 0.0 { style.paint_drop(&line) } else { line })?;
    }
    let folded: u64 = all.iter().filter(|g| g.noise.is_some()).map(|g| g.total).sum();
    if folded > 0 && shown.len() < all.len() {
        writeln!(out, "\n{folded} more drops of the noise classes (IPv6 and unjoined multicast on an IPv4 pod network, TCP duplicates, ping replies after their socket, queue purges): --all shows them")?;
    }
    Ok(())
}

/// `/metrics` on `addr`, from a thread of its own; the returned family is what the loop counts into.
fn serve_metrics(addr: std::net::SocketAddr) -> Result<Family<DropLabels, Counter>> {
    let family = Family::<DropLabels, Counter>::default();
    let mut registry = Registry::default();
    registry.register("cnitrace_drops", "Packets the kernel dropped on this node, by node, pod, reason and function (cnitrace watch)", family.clone());
    let registry = Arc::new(Mutex::new(registry));
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("--prometheus {addr}: bind"))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = crate::sys::read_http_head(&mut s);
            let path_ok = req.starts_with(b"GET /metrics ") || req.starts_with(b"GET / ");
            let mut body = String::new();
            let status = if path_ok && prometheus_client::encoding::text::encode(&mut body, &registry.lock().expect("registry")).is_ok() {
                "200 OK"
            } else {
                body = "not found: the metrics are at /metrics\n".into();
                "404 Not Found"
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body.as_bytes()));
        }
    });
    Ok(family)
}
