//! `cnitrace validate`: the incident's validation from the source pod — ping, TCP and HTTP to a port,
//! DNS through the pod's own resolver, an external HTTP(S) URL — each check run from inside the pod's
//! network namespace, and every check the network failed followed with the probes, so the report says
//! where its packets died.
//!
//! check → (failed on the network) → follow → verdict, per check.

pub mod dns;
pub mod web;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::{
    finding::Verdict,
    follow::{self, FollowRequest},
    inject::{self, ProbeKind},
    resolve::{HostResolver, Resolver},
};

/// What to check, made addresses (names resolved by the caller, except the external URL's host, which
/// the pod's own resolver resolves).
#[derive(Clone, Debug)]
pub struct Request {
    pub src: Ipv4Addr,
    pub dst: Option<Dest>,
    pub port: u16,
    /// Names to resolve through the pod's resolver.
    pub dns: Vec<String>,
    pub external: Option<Url>,
    /// Ask this nameserver instead of the one the pod's resolv.conf names.
    pub nameserver: Option<Ipv4Addr>,
    pub trust: web::TlsTrust,
    /// Each check's patience.
    pub timeout: Duration,
    /// Follow the failed checks (off: the checks alone, no eBPF).
    pub trace: bool,
    pub cluster: Option<crate::k8s::ClusterFacts>,
    /// How the API was reached for `cluster`: asked again for the Services behind the pod's nameservers.
    pub kube: crate::k8s::KubeArgs,
}

/// The destination of the ping, TCP and HTTP checks.
#[derive(Clone, Debug)]
pub struct Dest {
    pub ip: Ipv4Addr,
    /// What the user called it (the address, a pod's name, a DNS name).
    pub name: String,
    /// The HTTP Host header: the DNS name the pod resolved, else the address.
    pub host: String,
}

/// An http:// or https:// URL, as much of it as a GET needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub text: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl std::str::FromStr for Url {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Url, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{s:?}: give an http:// or https:// URL")),
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| format!("{s:?}: no host"))?.to_string();
        if host.starts_with('[') {
            return Err(format!("{s:?}: IPv6 is not supported"));
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path_and_query().map(|p| p.as_str().to_string()).filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into());
        Ok(Url { text: s.to_string(), tls, host, port, path })
    }
}

/// One check's result.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// ping, tcp, http, dns, http-external, https-external.
    pub check: String,
    pub target: String,
    pub ok: bool,
    /// What happened, in words (the answer, or why there was none).
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<f64>,
    /// The failed check followed: where its packets died.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<Traced>,
    /// Why a failed check was not followed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_traced: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Traced {
    /// What was followed: `icmp 10.244.0.20 → 10.244.0.19`.
    pub probe: String,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub src: String,
    pub src_ip: Ipv4Addr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolver: Option<dns::ResolverConf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolver_error: Option<String>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.checks.iter().filter(|c| !c.ok).count()
    }
}

/// What a failed check leaves to follow: the packets to trace, or why none.
enum Follow {
    Probe(Ipv4Addr, ProbeKind),
    No(String),
}

pub fn run(req: &Request) -> Result<Report> {
    if !crate::sys::is_root() {
        bail!("`cnitrace validate` needs root (it enters the pod's network namespace and loads eBPF programs for the failed checks)");
    }
    let resolver = HostResolver::scan()?;
    let (local, ns) = source(&resolver, req.src)?;
    let k8s_names = req.cluster.as_ref().map(|c| crate::k8s::name_namespaces(c, &resolver)).unwrap_or_default();
    let src_name = k8s_names.get(&local.netns.inode).cloned().unwrap_or_else(|| local.display.clone());
    let (conf, resolver_error) = match dns::pod_resolver_with(&ns, req.nameserver) {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let mut req = req.clone();
    if let (Some(facts), Some(c)) = (req.cluster.as_mut(), &conf) {
        add_dns_services(facts, &c.nameservers, &req.kube);
    }
    let req = &req;
    let path = ns.path.clone();
    let mut checks: Vec<(Check, Follow)> = Vec::new();

    if let Some(d) = &req.dst {
        let (dst, name) = (&d.ip, &d.name);
        let shown = if *name == dst.to_string() { name.clone() } else { format!("{name} ({dst})") };
        checks.push(ping(&path, *dst, &shown, req.timeout)?);
        let addr = SocketAddr::from((*dst, req.port));
        let t = req.timeout;
        let tcp = crate::netns::in_netns(&path, move || Ok(web::connect(addr, t).map(|(_, d)| d)))?;
        let target = format!("{name}:{}", req.port);
        let tcp_ok = tcp.is_ok();
        checks.push(match tcp {
            Ok(d) => (ok("tcp", &target, "connected".into(), d), Follow::No(String::new())),
            Err(f) => (failed("tcp", &target, f.words()), Follow::Probe(*dst, ProbeKind::Tcp(req.port))),
        });
        if tcp_ok {
            let host = d.host.clone();
            let started = Instant::now();
            let got = crate::netns::in_netns(&path, move || Ok(web::get(addr, &host, "/", None, t)))?;
            checks.push(http_check("http", &format!("http://{name}:{}/", req.port), got, started.elapsed(), (*dst, req.port)));
        }
    }

    // Nameservers that stayed silent are not waited for again.
    let mut silent: Vec<(Ipv4Addr, String)> = Vec::new();
    for name in &req.dns {
        let (c, f, l) = dns_check(&path, conf.as_ref(), resolver_error.as_deref(), name, req.timeout)?;
        silent.extend(l.map(|l| l.silent).unwrap_or_default());
        checks.push((c, f));
    }
    let all_silent = conf.as_ref().is_some_and(|c| c.nameservers.iter().all(|n| silent.iter().any(|(s, _)| s == n)));

    if let Some(url) = &req.external {
        let kind = if url.tls { "https-external" } else { "http-external" };
        let addr = match url.host.parse::<Ipv4Addr>() {
            Ok(ip) => Ok(ip),
            Err(_) => match &conf {
                Some(_) if all_silent => Err((
                    format!("cannot resolve {}: {}", url.host, silent.iter().map(|(s, e)| format!("nameserver {s}: {e}")).collect::<Vec<_>>().join("; ")),
                    Follow::No("the name did not resolve (see the dns check)".into()),
                )),
                None => Err((format!("cannot resolve {}: {}", url.host, resolver_error.as_deref().unwrap_or("no resolver")), Follow::No("the pod's resolver is unknown".into()))),
                Some(c) => {
                    let (c2, host, t) = (c.clone(), url.host.clone(), req.timeout);
                    let l = crate::netns::in_netns(&path, move || Ok(dns::lookup(&c2, &host, t)))?;
                    match l.found {
                        Some((_, addrs)) => Ok(addrs[0]),
                        None => Err((format!("cannot resolve {}: {}", url.host, lookup_words(&l)), Follow::No("the name did not resolve (see the dns check)".into()))),
                    }
                }
            },
        };
        match addr {
            Err((why, f)) => checks.push((failed(kind, &url.text, why), f)),
            Ok(ip) => {
                let sock = SocketAddr::from((ip, url.port));
                let (host, path_q, trust, t) = (url.host.clone(), url.path.clone(), url.tls.then(|| req.trust.clone()), req.timeout);
                let started = Instant::now();
                let got = crate::netns::in_netns(&path, move || Ok(web::get(sock, &host, &path_q, trust.as_ref(), t)))?;
                let (mut c, f) = http_check(kind, &url.text, got, started.elapsed(), (ip, url.port));
                if url.host.parse::<Ipv4Addr>().is_err() {
                    c.detail = format!("{} ({} is {ip})", c.detail, url.host);
                }
                checks.push((c, f));
            }
        }
    }

    // The failed checks followed, each distinct probe once.
    let mut traced: Vec<((Ipv4Addr, ProbeKind), Result<Traced, String>)> = Vec::new();
    let mut out = Vec::new();
    for (mut c, f) in checks {
        if !c.ok {
            match f {
                Follow::No(why) => c.not_traced = Some(why).filter(|w| !w.is_empty()),
                Follow::Probe(..) if !req.trace => c.not_traced = Some("--no-trace".into()),
                Follow::Probe(dst, kind) => {
                    if !traced.iter().any(|(k, _)| *k == (dst, kind)) {
                        let t = trace(req, dst, kind);
                        traced.push(((dst, kind), t));
                    }
                    match &traced.iter().find(|(k, _)| *k == (dst, kind)).expect("traced").1 {
                        Ok(t) => c.trace = Some(t.clone()),
                        Err(e) => c.not_traced = Some(format!("the trace failed: {e}")),
                    }
                }
            }
        }
        out.push(c);
    }
    Ok(Report { src: src_name, src_ip: req.src, resolver: conf, resolver_error, checks: out })
}

fn ok(check: &str, target: &str, detail: String, took: Duration) -> Check {
    Check { check: check.into(), target: target.into(), ok: true, detail, ms: Some(took.as_secs_f64() * 1e3), trace: None, not_traced: None }
}

fn failed(check: &str, target: &str, detail: String) -> Check {
    Check { check: check.into(), target: target.into(), ok: false, detail, ms: None, trace: None, not_traced: None }
}

fn ping(path: &std::path::Path, dst: Ipv4Addr, name: &str, timeout: Duration) -> Result<(Check, Follow)> {
    let started = Instant::now();
    let plan = inject::ProbePlan {
        netns: path.to_path_buf(),
        dst,
        kind: ProbeKind::Icmp,
        sizes: vec![56],
        wait: timeout,
        icmp_id: inject::new_icmp_id(),
        stop: Default::default(),
    };
    let o = inject::run(plan)?;
    Ok(if o.answered > 0 {
        (ok("ping", name, "echo reply".into(), started.elapsed()), Follow::No(String::new()))
    } else {
        let why = o
            .send_error
            .clone()
            .or_else(|| o.icmp_errors.first().cloned())
            .unwrap_or_else(|| format!("no reply in {} ms", timeout.as_millis()));
        (failed("ping", name, why), Follow::Probe(dst, ProbeKind::Icmp))
    })
}

fn http_check(kind: &str, target: &str, got: std::result::Result<web::Status, web::Failure>, took: Duration, to: (Ipv4Addr, u16)) -> (Check, Follow) {
    match got {
        Ok(s) if s.code < 400 => (ok(kind, target, format!("HTTP {} {}", s.code, s.reason), took), Follow::No(String::new())),
        Ok(s) => (
            failed(kind, target, format!("HTTP {} {}", s.code, s.reason)),
            Follow::No("the network delivered: the server itself answered with an error".into()),
        ),
        Err(f @ web::Failure::Connect(_)) => (failed(kind, target, f.words()), Follow::Probe(to.0, ProbeKind::Tcp(to.1))),
        Err(f) => (failed(kind, target, f.words()), Follow::No("the connection was made: not the network".into())),
    }
}

fn dns_check(path: &std::path::Path, conf: Option<&dns::ResolverConf>, why_none: Option<&str>, name: &str, timeout: Duration) -> Result<(Check, Follow, Option<dns::Lookup>)> {
    let Some(conf) = conf else {
        let c = failed("dns", name, format!("the pod's resolver is unknown: {}", why_none.unwrap_or("?")));
        return Ok((c, Follow::No("nothing to follow without a nameserver".into()), None));
    };
    let (c, n) = (conf.clone(), name.to_string());
    let started = Instant::now();
    let l = crate::netns::in_netns(path, move || Ok(dns::lookup(&c, &n, timeout)))?;
    let (check, follow) = match (&l.found, l.server) {
        (Some((fqdn, addrs)), Some(server)) => {
            let list = addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
            (ok("dns", name, format!("{fqdn} is {list} (nameserver {server})"), started.elapsed()), Follow::No(String::new()))
        }
        (None, Some(_)) => (failed("dns", name, lookup_words(&l)), Follow::No("the nameserver answered: the name is not known there".into())),
        _ => {
            let first = conf.nameservers[0];
            (failed("dns", name, lookup_words(&l)), Follow::Probe(first, ProbeKind::Udp(53)))
        }
    };
    Ok((check, follow, Some(l)))
}

fn lookup_words(l: &dns::Lookup) -> String {
    let mut parts = Vec::new();
    if !l.not_found.is_empty() {
        parts.push(format!("not found: {}", l.not_found.join(", ")));
    }
    for (s, e) in &l.silent {
        parts.push(format!("nameserver {s}: {e}"));
    }
    if parts.is_empty() {
        "no answer".into()
    } else {
        parts.join("; ")
    }
}

/// Follows one failed check's packets: the same trace as `cnitrace follow SRC DST --probe KIND`.
fn trace(req: &Request, dst: Ipv4Addr, kind: ProbeKind) -> std::result::Result<Traced, String> {
    let f = FollowRequest {
        src: req.src,
        dst,
        // A TCP or DNS check to a Service's address (the kube-dns Service) is followed through
        // kube-proxy's NAT, as `follow --probe` follows it.
        dst_port: match kind {
            ProbeKind::Tcp(p) | ProbeKind::Udp(p) => Some(p),
            _ => None,
        },
        probe: kind,
        count: 1,
        timeout: Duration::from_secs(5),
        size: Some(56),
        opts: follow::FollowOptions::default(),
        cluster: req.cluster.clone(),
    };
    match follow::run(&f) {
        Ok(r) => Ok(Traced { probe: format!("{kind} {} → {dst}", req.src), verdict: r.verdict }),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// The Services behind the pod's nameservers (the kube-dns Service), beside the pair's: a DNS check
/// that fails is followed through kube-proxy's NAT to them, and its verdict says what the API says of
/// them. Best effort: without them the verdict still names the rule.
fn add_dns_services(facts: &mut crate::k8s::ClusterFacts, nameservers: &[Ipv4Addr], kube: &crate::k8s::KubeArgs) {
    let unknown: Vec<Ipv4Addr> = nameservers.iter().copied().filter(|ip| facts.service_with_ip(*ip).is_none() && facts.pod_with_ip(*ip).is_none()).collect();
    if unknown.is_empty() {
        return;
    }
    let Ok(mut c) = crate::k8s::connect(kube) else { return };
    for ip in unknown {
        match c.services_with_ip(ip) {
            Ok(s) => facts.services.extend(s),
            Err(e) => facts.missing.push(e.to_string()),
        }
    }
}

/// The source pod on this host and its network namespace: where every check starts.
fn source(resolver: &HostResolver, src: Ipv4Addr) -> Result<(crate::resolve::LocalEndpoint, crate::netns::NetNs)> {
    let e = resolver.resolve(src)?;
    let local = e.local().cloned().ok_or_else(|| anyhow!("{src} is on no pod of this host: the checks must start in its network namespace; run cnitrace on its node"))?;
    let ns = local.netns.ns.clone().context("the source's namespace")?;
    Ok((local, ns))
}

/// `name` resolved the way the pod at `src` resolves it (its resolv.conf, or `nameserver`).
pub fn resolve_from_pod(src: Ipv4Addr, name: &str, nameserver: Option<Ipv4Addr>, timeout: Duration) -> Result<Ipv4Addr> {
    let resolver = HostResolver::scan()?;
    let (_, ns) = source(&resolver, src)?;
    let conf = dns::pod_resolver_with(&ns, nameserver)
        .map_err(|e| anyhow!("{name} is not an address, there is no Kubernetes API to find a pod of that name, and {src}'s resolver is unknown: {e:#}"))?;
    let n = name.to_string();
    let l = crate::netns::in_netns(&ns.path, move || Ok(dns::lookup(&conf, &n, timeout)))?;
    match l.found {
        Some((_, addrs)) => Ok(addrs[0]),
        None => bail!("{name}: no pod of that name without the Kubernetes API, and the source pod's DNS does not resolve it ({})", lookup_words(&l)),
    }
}

/// `--cacert` as given, checked.
pub fn ca_file(p: &std::path::Path) -> Result<PathBuf> {
    if !p.is_file() {
        bail!("--cacert {}: no such file", p.display());
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_what_a_get_needs() {
        let u: Url = "https://external.cnitrace.test/health?x=1".parse().expect("url");
        assert_eq!((u.tls, u.host.as_str(), u.port, u.path.as_str()), (true, "external.cnitrace.test", 443, "/health?x=1"));
        let u: Url = "http://198.51.100.10:8080".parse().expect("url");
        assert_eq!((u.tls, u.port, u.path.as_str()), (false, 8080, "/"));
        assert!("ftp://x/".parse::<Url>().unwrap_err().contains("http:// or https://"));
        assert!("example.com".parse::<Url>().is_err(), "no scheme");
    }
}
