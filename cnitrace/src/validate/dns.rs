//! DNS as the pod sees it: the resolver configuration from the pod's own view of `/etc/resolv.conf`,
//! and A queries sent from inside the pod's network namespace the way its libc would (search list,
//! ndots, each nameserver in turn).

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use serde::Serialize;

use crate::netns::NetNs;

/// A pod's resolver configuration and where it was read.
#[derive(Clone, Debug, Serialize)]
pub struct ResolverConf {
    pub nameservers: Vec<Ipv4Addr>,
    pub search: Vec<String>,
    pub ndots: u32,
    /// The file it came from (`/proc/PID/root/etc/resolv.conf` for a container's view).
    pub source: String,
}

impl ResolverConf {
    pub fn parse(text: &[u8], source: String) -> Result<Self> {
        let c = resolv_conf::Config::parse(text).map_err(|e| anyhow!("{source}: {e}"))?;
        let nameservers: Vec<Ipv4Addr> = c
            .nameservers
            .iter()
            .filter_map(|n| match n {
                resolv_conf::ScopedIp::V4(a) => Some(*a),
                resolv_conf::ScopedIp::V6(..) => None,
            })
            .collect();
        if nameservers.is_empty() {
            bail!("{source} names no IPv4 nameserver");
        }
        Ok(ResolverConf { nameservers, search: c.get_search().cloned().unwrap_or_default(), ndots: c.ndots, source })
    }

    /// The names libc asks for, in order: with fewer than `ndots` dots the search list first, then the
    /// name as given; with more (or a trailing dot) the name first.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        if let Some(abs) = name.strip_suffix('.') {
            return vec![abs.to_string()];
        }
        let searched = self.search.iter().map(|d| format!("{name}.{}", d.trim_end_matches('.')));
        if name.matches('.').count() as u32 >= self.ndots {
            std::iter::once(name.to_string()).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(name.to_string())).collect()
        }
    }
}

/// Where the pod's `/etc/resolv.conf` is, seen from here: for a namespace `ip netns` named,
/// `/etc/netns/NAME/resolv.conf` if present (what `ip netns exec` shows its commands); else the view of a
/// process of the namespace that lives in a mount namespace of its own (a container:
/// `/proc/PID/root/etc/resolv.conf`); the root namespace (host network) has the host's.
pub fn pod_resolver(ns: &NetNs) -> Result<ResolverConf> {
    if ns.is_root {
        return read(PathBuf::from("/etc/resolv.conf"));
    }
    if ns.path.starts_with(crate::netns::NETNS_RUN_DIR) {
        if let Some(name) = ns.path.file_name() {
            let p = PathBuf::from("/etc/netns").join(name).join("resolv.conf");
            if p.exists() {
                return read(p);
            }
        }
    }
    let own_mnt = std::fs::metadata("/proc/self/ns/mnt").map(|m| m.ino()).ok();
    let mut seen = 0;
    for pid in processes_in(ns.inode as u64) {
        seen += 1;
        let mnt = std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino()).ok();
        if mnt.is_none() || mnt == own_mnt {
            continue;
        }
        let p = PathBuf::from(format!("/proc/{pid}/root/etc/resolv.conf"));
        if let Ok(c) = read(p) {
            return Ok(c);
        }
    }
    if seen == 0 {
        bail!("no process runs in the pod's network namespace, so its /etc/resolv.conf cannot be seen (give the resolver with --nameserver)")
    }
    bail!("none of the {seen} processes in the pod's network namespace has an /etc/resolv.conf of its own (give the resolver with --nameserver)")
}

/// The pod's resolver with `--nameserver` laid over it: that nameserver instead of the pod's (the
/// pod's search list kept), or alone when the pod's resolv.conf cannot be seen.
pub fn pod_resolver_with(ns: &NetNs, nameserver: Option<Ipv4Addr>) -> Result<ResolverConf> {
    match (pod_resolver(ns), nameserver) {
        (Ok(mut c), Some(n)) => {
            c.nameservers = vec![n];
            Ok(c)
        }
        (Ok(c), None) => Ok(c),
        (Err(_), Some(n)) => Ok(ResolverConf { nameservers: vec![n], search: Vec::new(), ndots: 1, source: "--nameserver".into() }),
        (Err(e), None) => Err(e),
    }
}

fn read(p: PathBuf) -> Result<ResolverConf> {
    let text = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
    ResolverConf::parse(&text, p.display().to_string())
}

fn processes_in(netns_inode: u64) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == netns_inode))
        .collect();
    pids.sort_unstable();
    pids
}

/// One answer to one question.
#[derive(Clone, Debug)]
pub struct Answer {
    pub code: ResponseCode,
    pub addrs: Vec<Ipv4Addr>,
}

/// One A query to `server`, on this thread's network namespace; an error when nothing came back in time
/// (or the send failed: no route, unreachable).
pub fn query_once(server: Ipv4Addr, name: &str, timeout: Duration) -> Result<Answer> {
    let fqdn = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).with_context(|| format!("{name:?} is not a DNS name"))?;
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(fqdn, RecordType::A));
    let id = msg.metadata.id;
    let sock = UdpSocket::bind(("0.0.0.0", 0)).context("a UDP socket")?;
    sock.connect(SocketAddr::from((server, 53)))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send(&msg.to_vec()?).map_err(|e| anyhow!("send to {server}:53: {e}"))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                bail!("no answer from {server}:53 in {} ms", timeout.as_millis())
            }
            // An ICMP error for the connected socket: port or host unreachable.
            Err(e) => bail!("{server}:53: {e}"),
        };
        let Ok(reply) = Message::from_vec(&buf[..n]) else { continue };
        if reply.metadata.id != id {
            if std::time::Instant::now() > deadline {
                bail!("no answer from {server}:53 in {} ms", timeout.as_millis());
            }
            continue;
        }
        let addrs = reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        return Ok(Answer { code: reply.metadata.response_code, addrs });
    }
}

/// How a lookup ended.
#[derive(Clone, Debug, Serialize)]
pub struct Lookup {
    /// The name that answered (after the search list), and its addresses.
    pub found: Option<(String, Vec<Ipv4Addr>)>,
    /// The nameserver that answered last.
    pub server: Option<Ipv4Addr>,
    /// Nameservers that did not answer at all, with what happened.
    pub silent: Vec<(Ipv4Addr, String)>,
    /// Names the servers said do not exist (or have no A record).
    pub not_found: Vec<String>,
}

/// The lookup libc would do for `name` (on this thread's network namespace): each candidate name, each
/// nameserver in turn until one answers.
pub fn lookup(conf: &ResolverConf, name: &str, timeout: Duration) -> Lookup {
    let mut out = Lookup { found: None, server: None, silent: Vec::new(), not_found: Vec::new() };
    for cand in conf.candidates(name) {
        let mut answered = false;
        for ns in &conf.nameservers {
            if out.silent.iter().any(|(s, _)| s == ns) {
                continue;
            }
            match query_once(*ns, &cand, timeout) {
                Ok(a) => {
                    answered = true;
                    out.server = Some(*ns);
                    if a.code == ResponseCode::NoError && !a.addrs.is_empty() {
                        out.found = Some((cand, a.addrs));
                        return out;
                    }
                    out.not_found.push(format!("{cand} ({})", if a.code == ResponseCode::NoError { "no A record".to_string() } else { a.code.to_string() }));
                    break;
                }
                Err(e) => out.silent.push((*ns, format!("{e:#}"))),
            }
        }
        if !answered && out.silent.len() == conf.nameservers.len() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> ResolverConf {
        ResolverConf::parse(text.as_bytes(), "test".into()).expect("parses")
    }

    #[test]
    fn the_search_list_comes_first_below_ndots_as_libc_does() {
        let c = conf("search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n");
        assert_eq!(c.nameservers, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(
            c.candidates("jellyfin"),
            ["jellyfin.default.svc.cluster.local", "jellyfin.svc.cluster.local", "jellyfin.cluster.local", "jellyfin"]
        );
        assert_eq!(c.candidates("kubernetes.default")[1], "kubernetes.default.svc.cluster.local");
        assert_eq!(c.candidates("example.com.").len(), 1, "a trailing dot is absolute");
        let c = conf("nameserver 192.0.2.53\nsearch lan\noptions ndots:1\n");
        assert_eq!(c.candidates("www.example.com"), ["www.example.com", "www.example.com.lan"]);
    }

    #[test]
    fn a_resolv_conf_without_an_ipv4_nameserver_is_said_so() {
        let e = ResolverConf::parse(b"search cluster.local\nnameserver fd00::10\n", "/proc/7/root/etc/resolv.conf".into()).unwrap_err();
        assert!(format!("{e}").contains("/proc/7/root/etc/resolv.conf names no IPv4 nameserver"), "{e}");
    }
}
