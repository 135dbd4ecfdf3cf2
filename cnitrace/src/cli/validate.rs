use std::{io::Write, net::Ipv4Addr, time::Duration};

use anyhow::{bail, Result};
use clap::Args;

use crate::{
    k8s::{self, Target},
    render,
    validate::{self, web::TlsTrust, Url},
};

/// The names a pod resolves when no --dns is given: what every cluster's DNS serves.
const DEFAULT_DNS: &str = "kubernetes.default";

#[derive(Args)]
pub struct ValidateArgs {
    /// Source pod: its address or its name (POD, NAMESPACE/POD; needs the API). The checks run from
    /// inside its network namespace.
    src: String,
    /// Destination: an address, a pod's name (with the API), or without the API a name the source pod
    /// resolves through its own DNS (a Service's name). Checked with ping, TCP and HTTP.
    dst: Option<String>,
    /// The destination's TCP port for the TCP and HTTP checks.
    #[arg(long, default_value_t = 8096)]
    port: u16,
    /// A name to resolve through the pod's resolver (repeat; default: kubernetes.default).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// An http:// or https:// URL to GET from the pod (its host resolved by the pod's resolver).
    #[arg(long, value_name = "URL")]
    external: Option<Url>,
    /// Ask this nameserver, not the one the pod's resolv.conf names.
    #[arg(long, value_name = "IP")]
    nameserver: Option<Ipv4Addr>,
    /// Trust this CA (PEM) for https, besides the node's trust store.
    #[arg(long, value_name = "FILE")]
    cacert: Option<std::path::PathBuf>,
    /// Accept any certificate for https (curl's -k).
    #[arg(long, short = 'k')]
    insecure: bool,
    /// Seconds each check may take.
    #[arg(long, default_value = "2", value_name = "SECS", value_parser = super::trace_timeout)]
    timeout: Duration,
    /// The checks alone: do not follow the failed ones with the eBPF probes.
    #[arg(long)]
    no_trace: bool,
    /// One JSON object: the pod, its resolver, every check (with the verdict of a traced failure).
    #[arg(long)]
    json: bool,
}

pub fn run(args: ValidateArgs, kube: &k8s::KubeArgs) -> Result<u8> {
    if !crate::sys::is_root() {
        bail!("`cnitrace validate` needs root (it enters the pod's network namespace and loads eBPF programs for the failed checks)");
    }
    let trust = TlsTrust { ca_file: args.cacert.as_deref().map(validate::ca_file).transpose()?, insecure: args.insecure };
    let dst_target = args.dst.as_deref().map(|d| Target::parse(d, "destination")).transpose()?;
    // A bare name and no API: the pod's own DNS says what it is (a Service's name, as the pod's
    // applications would use it).
    let by_dns = match &dst_target {
        Some(Target::Pod { namespace: None, name }) if k8s::connect(kube).is_err() => Some(name.clone()),
        _ => None,
    };
    let (src_ip, dst, cluster) = match (&args.dst, &by_dns) {
        (Some(_), Some(name)) => {
            let (ips, cluster) = super::pair::resolve_all(&[(&args.src, "source")], kube)?;
            let ip = validate::resolve_from_pod(ips[0], name, args.nameserver, args.timeout)?;
            (ips[0], Some(validate::Dest { ip, name: name.clone(), host: name.clone() }), cluster)
        }
        (Some(d), None) => {
            let (ips, cluster) = super::pair::resolve_all(&[(&args.src, "source"), (d, "destination")], kube)?;
            (ips[0], Some(validate::Dest { ip: ips[1], name: d.clone(), host: ips[1].to_string() }), cluster)
        }
        (None, _) => {
            let (ips, cluster) = super::pair::resolve_all(&[(&args.src, "source")], kube)?;
            (ips[0], None, cluster)
        }
    };
    let req = validate::Request {
        src: src_ip,
        dst,
        port: args.port,
        dns: if args.dns.is_empty() { vec![DEFAULT_DNS.to_string()] } else { args.dns.clone() },
        external: args.external.clone(),
        nameserver: args.nameserver,
        trust,
        timeout: args.timeout,
        trace: !args.no_trace,
        cluster,
        kube: kube.clone(),
    };
    let report = validate::run(&req)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        text(&report, &mut out)?;
    }
    Ok(if report.failed() == 0 { crate::exit::OK } else { crate::exit::DROPPED })
}

fn text(r: &validate::Report, out: &mut impl Write) -> Result<()> {
    let from = if r.src == r.src_ip.to_string() { r.src.clone() } else { format!("{} ({})", r.src, r.src_ip) };
    writeln!(out, "validate from {from}")?;
    match (&r.resolver, &r.resolver_error) {
        (Some(c), _) => writeln!(
            out,
            "  resolver: nameserver {}{} (from {})",
            c.nameservers.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "),
            if c.search.is_empty() { String::new() } else { format!(", search {}", c.search.join(" ")) },
            c.source
        )?,
        (None, Some(e)) => writeln!(out, "  resolver: unknown — {e}")?,
        (None, None) => {}
    }
    let width = r.checks.iter().map(|c| c.target.chars().count()).max().unwrap_or(0);
    for c in &r.checks {
        let took = c.ms.map(|m| format!(" ({m:.1} ms)")).unwrap_or_default();
        writeln!(out, "  {:<4}  {:<14} {:<width$}  {}{took}", if c.ok { "ok" } else { "FAIL" }, c.check, c.target, c.detail)?;
        if let Some(t) = &c.trace {
            writeln!(out, "        followed ({}):", t.probe)?;
            let mut block = Vec::new();
            render::verdict(&t.verdict, &mut block)?;
            for line in String::from_utf8_lossy(&block).lines() {
                writeln!(out, "        {line}")?;
            }
        } else if let Some(why) = &c.not_traced {
            writeln!(out, "        not followed: {why}")?;
        }
    }
    let failed = r.failed();
    if failed == 0 {
        writeln!(out, "all {} checks passed", r.checks.len())?;
    } else {
        writeln!(out, "{failed} of {} checks failed", r.checks.len())?;
    }
    Ok(())
}
