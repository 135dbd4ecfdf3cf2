//! Probe traffic, sent by cnitrace itself from inside the source pod's namespace (a thread that entered
//! it): ICMP echoes on a raw socket, a TCP connect, or a UDP datagram. What the socket saw back (replies,
//! ICMP errors, send errors) is kept as evidence next to the trace.

use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "port")]
pub enum ProbeKind {
    Icmp,
    Tcp(u16),
    Udp(u16),
    None,
}

/// As the command line spells it: `icmp`, `tcp:8096`, `udp:53`, `none`.
impl std::fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeKind::Icmp => write!(f, "icmp"),
            ProbeKind::Tcp(port) => write!(f, "tcp:{port}"),
            ProbeKind::Udp(port) => write!(f, "udp:{port}"),
            ProbeKind::None => write!(f, "none"),
        }
    }
}

impl std::str::FromStr for ProbeKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("bad port {p:?}"));
        match s.split_once(':') {
            None if s == "icmp" => Ok(ProbeKind::Icmp),
            None if s == "none" => Ok(ProbeKind::None),
            Some(("tcp", p)) => Ok(ProbeKind::Tcp(port(p)?)),
            Some(("udp", p)) => Ok(ProbeKind::Udp(port(p)?)),
            _ => Err(format!("{s:?}: expected icmp, tcp:PORT, udp:PORT or none")),
        }
    }
}

/// What the probe's own socket observed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProbeOutcome {
    pub sent: u32,
    /// Answers from the destination (echo replies, an accepted connection).
    pub answered: u32,
    /// ICMP errors that came back, in words ("host unreachable from 10.244.0.20").
    pub icmp_errors: Vec<String>,
    /// A send that failed locally (no route, message too long...).
    pub send_error: Option<String>,
    /// Payload sizes sent, in order.
    pub sizes: Vec<usize>,
    /// Per probe: answered or not (same order as `sizes`).
    pub answered_each: Vec<bool>,
    /// The ICMP echo id of this run's probes.
    #[serde(default)]
    pub icmp_id: Option<u16>,
}

pub struct ProbePlan {
    pub netns: PathBuf,
    pub dst: Ipv4Addr,
    pub kind: ProbeKind,
    /// ICMP payload sizes, one echo each.
    pub sizes: Vec<usize>,
    pub wait: Duration,
    /// Identifies this run's echoes (the trace keeps only these: older queued probes are not ours).
    pub icmp_id: u16,
    /// Set by the caller once it has seen enough: stop waiting for answers.
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Runs the probe on a thread inside the source namespace; returns when answered or after `wait`.
pub fn run(plan: ProbePlan) -> Result<ProbeOutcome> {
    let path = plan.netns.clone();
    crate::netns::in_netns(&path, move || match plan.kind {
        ProbeKind::Icmp => icmp(&plan),
        ProbeKind::Tcp(port) => tcp(plan.dst, port, plan.wait, &plan.stop),
        ProbeKind::Udp(port) => udp(plan.dst, port),
        ProbeKind::None => Ok(ProbeOutcome::default()),
    })
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], 0]) };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo(id: u16, seq: u16, size: usize) -> Vec<u8> {
    let mut p = vec![0u8; 8 + size];
    p[0] = 8;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p[8..].iter_mut().enumerate() {
        *b = b"cnitrace"[i % 8];
    }
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

fn icmp_error_words(ty: u8, code: u8, mtu: u16) -> String {
    match (ty, code) {
        (3, 0) => "net unreachable".into(),
        (3, 1) => "host unreachable".into(),
        (3, 3) => "port unreachable".into(),
        (3, 4) => format!("fragmentation needed, next-hop MTU {mtu}"),
        (3, 13) => "communication administratively prohibited".into(),
        (11, _) => "time exceeded".into(),
        (t, c) => format!("ICMP type {t} code {c}"),
    }
}

fn icmp(plan: &ProbePlan) -> Result<ProbeOutcome> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP) };
    if fd < 0 {
        bail!("open a raw ICMP socket: {}", std::io::Error::last_os_error());
    }
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // DF on every probe: a path that cannot carry the size must say so, not fragment.
    let pmtu: libc::c_int = libc::IP_PMTUDISC_PROBE;
    unsafe {
        libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, &pmtu as *const _ as *const libc::c_void, 4);
    }
    let id = plan.icmp_id;
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(plan.dst.octets()) },
        sin_zero: [0; 8],
    };
    let mut out = ProbeOutcome { sizes: plan.sizes.clone(), answered_each: vec![false; plan.sizes.len()], icmp_id: Some(id), ..Default::default() };
    let t_end = Instant::now() + plan.wait;
    for (i, size) in plan.sizes.iter().enumerate() {
        let pkt = echo(id, i as u16 + 1, *size);
        let r = unsafe {
            libc::sendto(fd, pkt.as_ptr() as *const _, pkt.len(), 0, &dst as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_in>() as u32)
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            out.send_error.get_or_insert(format!("sending a {size}-byte echo failed: {e}"));
        } else {
            out.sent += 1;
        }
        if i + 1 < plan.sizes.len() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if out.sent == 0 {
        return Ok(out);
    }
    let mut buf = [0u8; 2048];
    while Instant::now() < t_end && out.answered < out.sent && !plan.stop.load(std::sync::atomic::Ordering::SeqCst) {
        let left = t_end.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().clamp(1, 20) as i32;
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut _, buf.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            continue;
        }
        let pkt = &buf[..n as usize];
        let ihl = ((pkt[0] & 0x0f) as usize) * 4;
        if pkt.len() < ihl + 8 {
            continue;
        }
        let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        let icmp = &pkt[ihl..];
        match icmp[0] {
            0 if src == plan.dst && u16::from_be_bytes([icmp[4], icmp[5]]) == id => {
                let seq = u16::from_be_bytes([icmp[6], icmp[7]]) as usize;
                if seq >= 1 && seq <= out.answered_each.len() && !out.answered_each[seq - 1] {
                    out.answered_each[seq - 1] = true;
                    out.answered += 1;
                }
            }
            3 | 11 if icmp.len() >= 8 + 20 + 8 => {
                // The quoted packet must be one of ours.
                let q = &icmp[8..];
                let qihl = ((q[0] & 0x0f) as usize) * 4;
                let qdst = Ipv4Addr::new(q[16], q[17], q[18], q[19]);
                if qdst == plan.dst && q.len() >= qihl + 8 && u16::from_be_bytes([q[qihl + 4], q[qihl + 5]]) == id {
                    let mtu = u16::from_be_bytes([icmp[6], icmp[7]]);
                    let words = format!("{} from {src}", icmp_error_words(icmp[0], icmp[1], mtu));
                    if !out.icmp_errors.contains(&words) {
                        out.icmp_errors.push(words);
                    }
                    if out.icmp_errors.len() as u32 + out.answered >= out.sent {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// One TCP connect, given up when `wait` passes or the caller says it has seen enough (`stop`: a drop
/// settled the trace — a SYN the kernel will retransmit for a minute need not be waited out).
fn tcp(dst: Ipv4Addr, port: u16, wait: Duration, stop: &std::sync::atomic::AtomicBool) -> Result<ProbeOutcome> {
    use nix::{
        errno::Errno,
        poll::{poll, PollFd, PollFlags, PollTimeout},
        sys::socket::{connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn},
    };
    use std::os::fd::{AsFd, AsRawFd};
    let mut out = ProbeOutcome { sent: 1, sizes: vec![0], answered_each: vec![false], ..Default::default() };
    let refused = |e: i32| format!("connect to {dst}:{port}: {}", std::io::Error::from_raw_os_error(e));
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None).context("a TCP socket")?;
    match connect(fd.as_raw_fd(), &SockaddrIn::from(std::net::SocketAddrV4::new(dst, port))) {
        Ok(()) => {
            out.answered = 1;
            out.answered_each[0] = true;
            return Ok(out);
        }
        Err(Errno::EINPROGRESS) => {}
        Err(e) => {
            out.send_error = Some(refused(e as i32));
            return Ok(out);
        }
    }
    let t_end = Instant::now() + wait;
    while Instant::now() < t_end && !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
        if poll(&mut fds, PollTimeout::from(50u16)).unwrap_or(0) == 0 {
            continue;
        }
        match getsockopt(&fd, sockopt::SocketError).unwrap_or(0) {
            0 => {
                out.answered = 1;
                out.answered_each[0] = true;
            }
            e => out.send_error = Some(refused(e)),
        }
        return Ok(out);
    }
    Ok(out)
}

fn udp(dst: Ipv4Addr, port: u16) -> Result<ProbeOutcome> {
    let s = UdpSocket::bind(("0.0.0.0", 0)).context("bind a UDP socket")?;
    let mut out = ProbeOutcome { sizes: vec![8], answered_each: vec![false], ..Default::default() };
    match s.send_to(b"cnitrace", (dst, port)) {
        Ok(_) => out.sent = 1,
        Err(e) => out.send_error = Some(format!("send to {dst}:{port}: {e}")),
    }
    Ok(out)
}

/// A fresh echo id per run: two traces in a row (fix's verification) must not see each other's echoes.
pub fn new_icmp_id() -> u16 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    ((std::process::id() ^ nanos ^ (nanos >> 16)) & 0xffff) as u16
}
