//! `cnitrace agent`: one node's own service — it answers for its node only, on a Unix socket (in a
//! cluster, reached through the API server's port-forward to its pod: who may ask a node is who may
//! port-forward to its agent, and nothing of the pod network can reach it). The CLI asks each node's
//! agent (`--agent NODE=ADDR`) in parallel, each within a timeout, and says which node did not answer.
//!
//! The protocol is HTTP/1.1 with JSON bodies, one request per connection:
//! - `GET /v1/node` → `{"node": NAME, "pods": [{"ip", "name"}], "boot_id"}`: the node and its pods now.
//! - `GET /v1/check[?node=NAME]` → that node's `check` report; another node's name is refused (403).
//! - `GET /v1/follow?src=A&dst=B[&probe=icmp|tcp:P|udp:P|none][&count=N][&size=N][&timeout_ms=N]
//!   [&icmp_id=N][&no_kprobes=1][&until_drop=1][&node=NAME]` → `application/x-ndjson`, one object a
//!   line as it happens: `{"ready_ms"}` once the probes are attached, `{"event"}` for each event of
//!   its namespaces as it is decoded, then `{"node", "boot_id",
//!   "report", "recording"}` — what this node's kernel saw of the pair (only its own namespaces), its
//!   state, and its clock — or `{"error"}`. The agent sends the probe when the source is one of its pods;
//!   otherwise it watches. The trace ends at its own verdict, at its timeout, or when the client shuts
//!   down its side of the connection (or goes away): the probes are attached per request and detached
//!   after it, so an idle agent has nothing in the kernel. With `hold=1` the probe waits, once attached,
//!   for the client's line `go` (the CLI attaches every node at once and says go when all are ready).
//!   The client's line `stop` (or its going away) ends the trace; the agent then sends its last line.
//!
//! - `GET /v1/fixes` → the node's fix journal; `POST /v1/rollback[?id=ID]` → one of its fixes undone.
//! - `POST /v1/fix` → one fix on this node, a JSON object a line each way ([`crate::fix::session`]):
//!   the CLI sends the steps of the remedy it diagnosed, the agent journals and applies them on its node
//!   (its own namespaces only), checks its paths, and keeps the fix only when the CLI says so.

use std::{
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub use crate::transport::{parse_addr, Addr};

/// One connection to or from an agent.
pub enum Conn {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

impl Conn {
    pub fn connect(addr: &Addr) -> Result<Conn> {
        Ok(match addr {
            Addr::Unix(p) => Conn::Unix(UnixStream::connect(p).with_context(|| format!("connect to {addr}"))?),
            Addr::Tcp(a) | Addr::Forwarded { local: a, .. } => {
                Conn::Tcp(std::net::TcpStream::connect_timeout(a, Duration::from_secs(5)).with_context(|| format!("connect to {addr}"))?)
            }
        })
    }
    pub fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }
    /// Writes `line` through a shared reference (a stream's other side reads on another thread).
    pub fn say(&self, line: &str) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => (&*s).write_all(line.as_bytes()),
            Conn::Tcp(s) => (&*s).write_all(line.as_bytes()),
        }
    }
    pub fn shutdown_write(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
    }
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(t),
            Conn::Tcp(s) => s.set_write_timeout(t),
        }
    }
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_nonblocking(on),
            Conn::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// Where an agent listens, bound.
enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(std::net::TcpListener),
}

impl Listener {
    /// Binds `addr`. A Unix socket nobody answers on is an earlier agent's and is replaced; one that
    /// answers is another agent's. The socket is the caller's only (mode 0600).
    fn bind(addr: &Addr) -> Result<Listener> {
        let l = match addr {
            Addr::Tcp(a) => Listener::Tcp(std::net::TcpListener::bind(a).with_context(|| format!("listen on {addr}"))?),
            Addr::Forwarded { .. } => bail!("an agent listens on its own address, not on a port-forward"),
            Addr::Unix(path) => {
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !m.file_type().is_socket() {
                        bail!("{} exists and is not a socket: not replacing it", path.display());
                    }
                    if UnixStream::connect(path).is_ok() {
                        bail!("an agent already listens on unix:{}", path.display());
                    }
                    std::fs::remove_file(path)?;
                }
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let l = UnixListener::bind(path).with_context(|| format!("listen on unix:{}", path.display()))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Listener::Unix(l, path.clone())
            }
        };
        match &l {
            Listener::Unix(u, _) => u.set_nonblocking(true)?,
            Listener::Tcp(t) => t.set_nonblocking(true)?,
        }
        Ok(l)
    }

    /// Sleeps until a connection waits or `timeout` passes (a signal ends it early): an idle agent wakes
    /// up only to look at its stop flag.
    fn wait(&self, timeout: Duration) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let fd = match self {
            Listener::Unix(u, _) => u.as_fd(),
            Listener::Tcp(t) => t.as_fd(),
        };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::try_from(timeout.as_millis() as i32).unwrap_or(PollTimeout::NONE));
    }

    fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Unix(u, _) => u.accept().map(|(c, _)| Conn::Unix(c)),
            Listener::Tcp(t) => t.accept().map(|(c, _)| Conn::Tcp(c)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `NODE=ADDR`.
pub fn parse_agent(s: &str) -> Result<(String, Addr)> {
    let Some((node, addr)) = s.split_once('=') else { bail!("--agent {s:?}: NODE=ADDR (e.g. node-1=unix:/run/cnitrace/agent.sock)") };
    if node.is_empty() {
        bail!("--agent {s:?}: the node's name is missing");
    }
    Ok((node.to_string(), parse_addr(addr)?))
}

/// The agents a command asks: those found through the API when `discover` (every Ready agent pod of
/// `namespace`, through port-forward; `all_nodes`: every node expected to have one), then each
/// `--agent NODE=ADDR` given, which replaces the found one of its node. Also the nodes that have no
/// agent to ask, with why.
pub fn resolve_agents(explicit: &[String], discover: bool, all_nodes: bool, namespace: &str, kube: &crate::k8s::KubeArgs) -> Result<(Vec<(String, Addr)>, Vec<(String, String)>)> {
    let given: Vec<(String, Addr)> = explicit.iter().map(|a| parse_agent(a)).collect::<Result<_>>()?;
    if !discover && !all_nodes {
        return Ok((given, Vec::new()));
    }
    let found = crate::k8s::agents::discover(kube, namespace, all_nodes, crate::deploy::AGENT_PORT)?;
    let mut agents: Vec<(String, Addr)> = found.agents.into_iter().filter(|(n, _)| !given.iter().any(|(g, _)| g == n)).collect();
    agents.extend(given.iter().cloned());
    agents.sort_by(|a, b| a.0.cmp(&b.0));
    let missing = found.missing.into_iter().filter(|(n, _)| !given.iter().any(|(g, _)| g == n)).collect();
    Ok((agents, missing))
}

/// Agents asked at once at most.
const CONCURRENCY: usize = 8;

/// `GET path` from every agent, at most [`CONCURRENCY`] at once, each within `timeout`; answers in the
/// order of `agents`.
pub fn ask_all(agents: &[(String, Addr)], path: &str, timeout: Duration) -> Vec<Result<Value>> {
    ask_each(agents, |_| path.to_string(), timeout)
}

/// [`ask_all`] with a path per node (`path(node)`).
pub fn ask_each(agents: &[(String, Addr)], path: impl Fn(&str) -> String + Sync, timeout: Duration) -> Vec<Result<Value>> {
    let mut out = Vec::with_capacity(agents.len());
    for chunk in agents.chunks(CONCURRENCY) {
        let answers: Vec<Result<Value>> = std::thread::scope(|s| {
            let path = &path;
            let handles: Vec<_> = chunk.iter().map(|(node, addr)| s.spawn(move || get(addr, &path(node), timeout))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the request's thread panicked")))).collect()
        });
        out.extend(answers);
    }
    out
}

/// One request to one agent: the JSON it answered, or why there is none (not listening, no answer
/// within `timeout`, an error it returned).
pub fn get(addr: &Addr, path: &str, timeout: Duration) -> Result<Value> {
    request(addr, "GET", path, timeout)
}

/// [`get`] with another method (`POST /v1/rollback`).
pub fn request(addr: &Addr, method: &str, path: &str, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    let mut s = Conn::connect(addr)?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: cnitrace-agent\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer from {addr} within {:.1} s", timeout.as_secs_f64());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                bail!("no answer from {addr} within {:.1} s", timeout.as_secs_f64())
            }
            Err(e) => return Err(e).with_context(|| format!("read from {addr}")),
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(&buf).with_context(|| format!("{addr} did not answer in HTTP"))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => bail!("{addr} closed the connection in the middle of its answer"),
    };
    let code = resp.code.unwrap_or(0);
    let body: Value = serde_json::from_slice(&buf[head..]).with_context(|| format!("{addr} answered {code} without JSON"))?;
    if code != 200 {
        bail!("{addr} answered {code}: {}", body["error"].as_str().unwrap_or("(no reason)"));
    }
    Ok(body)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// This node: the names it answers to (the first as it was started) and its network namespace's name.
struct Node {
    names: Vec<String>,
    netns: String,
    /// Where the fixes on this node are journaled.
    state_dir: PathBuf,
}

/// The namespaces of the node whose namespace is called `netns` now — its own and its pods' (pods come
/// and go: read for each request) — and its pods' addresses and names.
pub fn scope_of(netns: &str) -> Result<(crate::follow::Scope, Vec<(std::net::Ipv4Addr, String)>)> {
    node_scope(netns).map(|(s, pods, _)| (s, pods))
}

/// [`scope_of`] and the node's own namespace inode.
fn node_scope(netns: &str) -> Result<(crate::follow::Scope, Vec<(std::net::Ipv4Addr, String)>, u32)> {
    let resolver = crate::resolve::HostResolver::scan()?;
    let Some(node) = resolver.spaces().iter().map(|(ns, _)| ns).find(|ns| ns.name == netns) else {
        bail!("this node's network namespace {netns} is gone");
    };
    let mut scope = crate::follow::Scope::default();
    scope.inodes.insert(node.inode);
    scope.names.insert(crate::resolve::display_ns(node));
    let mut pods = Vec::new();
    // A veth whose host end holds an address is a link to another host (an uplink), not a pod.
    for p in resolver.pods().into_iter().filter(|p| p.node.inode == node.inode && !p.host_addressed) {
        scope.inodes.insert(p.netns.inode);
        scope.names.insert(p.display.clone());
        pods.push((p.ip, p.display));
    }
    pods.sort();
    Ok((scope, pods, node.inode))
}

/// The running kernel's boot id: two agents that report the same one trace with one clock.
pub fn boot_id() -> String {
    // Test-only: an agent of the lab (one kernel) that says it runs on another machine, so the stitch's
    // path for several kernels (clocks by causality, namespaces renumbered) runs on real traces.
    if let Ok(fake) = std::env::var("CNITRACE_TEST_BOOT_ID") {
        return fake;
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Serves `node` at `addr` until SIGINT or SIGTERM. The node must be one of this host's (`check --node`
/// finds it); a Unix socket is the caller's only (mode 0600) and removed at the end.
pub fn serve(addr: &Addr, node: &str, state_dir: &Path, kube: &crate::k8s::KubeArgs) -> Result<()> {
    // Every request is served by threads of its own, and glibc gives each new thread an arena of its
    // own (up to 8 per core), which it keeps: over hundreds of traces that is resident memory that only
    // grows. Two arenas are plenty for an agent that serves a few requests at a time.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any request thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    // The node is checked once before anything listens: an agent for a node it cannot see is a mistake.
    // It answers to the name it was given, the node's display name and its namespace's name.
    let first = crate::check::report(Some(node), true, kube).with_context(|| format!("agent for node {node}"))?;
    let mut names = vec![node.to_string()];
    for n in &first.nodes {
        names.extend([n.node.clone(), n.netns.clone()].into_iter().filter(|x| !x.is_empty()));
    }
    names.dedup();
    let Some(netns) = first.nodes.first().map(|n| n.netns.clone()) else { bail!("agent for node {node}: no such node on this host") };
    let node = &Node { names, netns, state_dir: state_dir.to_path_buf() };
    crate::sys::on_stop_signals(on_signal);
    let listener = Listener::bind(addr)?;
    // Only one agent serves a node (the socket says so): a fix still in progress in the journal is one
    // an earlier agent never saw verified.
    for line in crate::fix::session::recover(state_dir) {
        eprintln!("cnitrace agent: {line}");
    }
    eprintln!("cnitrace agent: node {}, listening on {addr}, journal in {}", node.names[0], state_dir.display());
    let result = std::thread::scope(|s| -> Result<()> {
        while !STOP.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok(conn) => {
                    s.spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let _ = handle(conn, node, kube);
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => listener.wait(Duration::from_millis(500)),
                Err(e) => return Err(e).context("accept"),
            }
        }
        Ok(())
    });
    drop(listener);
    result
}

fn handle(mut conn: Conn, node: &Node, kube: &crate::k8s::KubeArgs) -> Result<()> {
    let names = &node.names;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let head = crate::sys::read_http_head(&mut conn);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let (method, path, body_start) = match req.parse(&head) {
        Ok(httparse::Status::Complete(n)) => (req.method.unwrap_or("").to_string(), req.path.unwrap_or("").to_string(), n),
        _ => return respond(&mut conn, 400, &json!({"error": "not an HTTP request"})),
    };
    if method == "POST" {
        let q = query(&path);
        if let Some(other) = q.iter().find(|(k, _)| *k == "node").map(|(_, v)| *v).filter(|n| !names.iter().any(|x| x == n)) {
            return respond(&mut conn, 403, &json!({"error": format!("this agent serves node {} only, not {other}", names[0])}));
        }
        match path.split('?').next() {
            Some("/v1/fix") => return fix_session(conn, node, head[body_start..].to_vec()),
            Some("/v1/rollback") => {
                let id = q.iter().find(|(k, _)| *k == "id").map(|(_, v)| *v);
                return match crate::fix::session::rollback(&node.state_dir, id) {
                    Ok(v) => respond(&mut conn, 200, &v),
                    Err(e) => respond(&mut conn, 500, &json!({"error": format!("{e:#}")})),
                };
            }
            _ => {}
        }
    }
    if method == "GET" && path.split('?').next() == Some("/v1/fixes") {
        return match crate::fix::session::history(&node.state_dir) {
            Ok(v) => respond(&mut conn, 200, &v),
            Err(e) => respond(&mut conn, 500, &json!({"error": format!("{e:#}")})),
        };
    }
    if method == "GET" && path.split('?').next() == Some("/v1/follow") {
        let q = query(&path);
        if let Some(other) = q.iter().find(|(k, _)| *k == "node").map(|(_, v)| *v).filter(|n| !names.iter().any(|x| x == n)) {
            return respond(&mut conn, 403, &json!({"error": format!("this agent serves node {} only, not {other}", names[0])}));
        }
        let req = match follow_request(&q) {
            Ok(r) => r,
            Err(e) => return respond(&mut conn, 400, &json!({"error": format!("{e:#}")})),
        };
        return follow_stream(conn, node, req);
    }
    let (code, body) = route(&method, &path, names, |n| crate::check::report(Some(n), true, kube).and_then(|r| Ok(serde_json::to_value(r)?)), || {
        let (_, pods) = scope_of(&node.netns)?;
        Ok(json!({
            "node": names[0],
            "pods": pods.iter().map(|(ip, name)| json!({"ip": ip.to_string(), "name": name})).collect::<Vec<_>>(),
            "boot_id": boot_id(),
        }))
    });
    respond(&mut conn, code, &body)
}

/// `a=1&b=2` of a request path.
fn query(path: &str) -> Vec<(&str, &str)> {
    path.split_once('?').map(|(_, q)| q.split('&').filter_map(|kv| kv.split_once('=')).collect()).unwrap_or_default()
}

/// The trace a `/v1/follow` query asks for (no system access).
fn follow_request(q: &[(&str, &str)]) -> Result<crate::follow::FollowRequest> {
    use crate::inject::ProbeKind;
    let get = |k: &str| q.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let num = |k: &str, default: u64| -> Result<u64> { get(k).map(|v| v.parse::<u64>().with_context(|| format!("{k}={v}: not a number"))).unwrap_or(Ok(default)) };
    let addr = |k: &str| -> Result<std::net::Ipv4Addr> {
        let v = get(k).with_context(|| format!("{k} is missing"))?;
        v.parse().with_context(|| format!("{k}={v}: not an IPv4 address"))
    };
    let probe: ProbeKind = get("probe").unwrap_or("icmp").parse().map_err(|e: String| anyhow::anyhow!("probe: {e}"))?;
    let count = num("count", 1)?;
    if !(1..=100).contains(&count) {
        bail!("count must be between 1 and 100");
    }
    let timeout = Duration::from_millis(num("timeout_ms", 5_000)?.clamp(100, 120_000));
    let size = get("size").map(|v| v.parse::<usize>().with_context(|| format!("size={v}"))).transpose()?;
    if size.is_some_and(|s| s > 65_000) {
        bail!("size must be at most 65000 bytes");
    }
    let icmp_id = get("icmp_id").map(|v| v.parse::<u16>().with_context(|| format!("icmp_id={v}"))).transpose()?;
    let go = (get("hold") == Some("1")).then(|| std::sync::Arc::new(AtomicBool::new(false)));
    let dst_port = match probe {
        ProbeKind::Tcp(p) | ProbeKind::Udp(p) => Some(p),
        _ => None,
    };
    let opts = crate::follow::FollowOptions {
        no_kprobes: get("no_kprobes") == Some("1"),
        until_drop: get("until_drop") == Some("1"),
        icmp_id,
        go,
        ..Default::default()
    };
    Ok(crate::follow::FollowRequest { src: addr("src")?, dst: addr("dst")?, dst_port, probe, count: count as u32, timeout, size, opts, cluster: None })
}

/// Runs one trace for the client on `conn`, limited to this node's namespaces, and streams it (see the
/// module's protocol). The client stops it by shutting down its side of the connection; a client that
/// goes away stops it the same way, and SIGTERM to the agent stops every trace in flight.
fn follow_stream(mut conn: Conn, node: &Node, mut req: crate::follow::FollowRequest) -> Result<()> {
    use std::sync::{mpsc, Arc};
    let (scope, pods) = match scope_of(&node.netns) {
        Ok(s) => s,
        Err(e) => return respond(&mut conn, 500, &json!({"error": format!("{e:#}")})),
    };
    // The source is not one of this node's pods: this node watches.
    if !pods.iter().any(|(ip, _)| *ip == req.src) {
        req.probe = crate::inject::ProbeKind::None;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let namespaces = scope.names.clone();
    let inodes = scope.inodes.clone();
    req.opts.scope = Some(scope);
    req.opts.stop = Some(stop.clone());
    req.opts.on_ready = Some(ready_tx);
    let (event_tx, event_rx) = mpsc::channel();
    req.opts.on_event = Some(event_tx);
    conn.set_read_timeout(None)?;
    let watcher = conn.try_clone()?;
    {
        // The client's side: a line `go` releases a held probe; its end (or the client's) stops the trace.
        let stop = stop.clone();
        let go = req.opts.go.clone();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(watcher);
            let mut line = String::new();
            while matches!(std::io::BufRead::read_line(&mut lines, &mut line), Ok(n) if n > 0) {
                // `stop`: said, not a half-close — a port-forward (WebSocket) has no half-close, and
                // the stream must stay open for the agent's last line.
                if line.trim() == "stop" {
                    break;
                }
                if line.trim() == "go" {
                    if let Some(g) = &go {
                        g.store(true, Ordering::SeqCst);
                    }
                }
                line.clear();
            }
            stop.store(true, Ordering::SeqCst);
        });
    }
    conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n")?;
    let worker = std::thread::spawn(move || crate::follow::run(&req));
    loop {
        if STOP.load(Ordering::SeqCst) {
            stop.store(true, Ordering::SeqCst);
        }
        // Each event as it is decoded (the CLI keeps them should this agent die before its last line).
        let mut said = false;
        for e in event_rx.try_iter() {
            writeln!(conn, "{}", json!({ "event": e }))?;
            said = true;
        }
        match ready_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(ms) => {
                writeln!(conn, "{}", json!({"ready_ms": ms}))?;
                said = true;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !worker.is_finished() => {}
            Err(_) => break,
        }
        if said {
            conn.flush()?;
        }
    }
    let last = match worker.join() {
        Ok(Ok(report)) => json!({
            "node": node.names[0],
            "boot_id": boot_id(),
            "namespaces": namespaces,
            "inodes": inodes,
            "report": {
                "src": report.src,
                "dst": report.dst,
                "verdict": report.verdict,
                "counters": report.counters,
                "hooks": report.hooks,
                "elapsed_ms": report.elapsed_ms,
                "ready_ms": report.ready_ms,
                "events_not_kept": report.events_not_kept,
                "ring_peak": report.ring_peak,
                "peak_rss_kib": report.peak_rss_kib,
            },
            "recording": crate::follow::Recording::of(&report),
        }),
        Ok(Err(e)) => json!({"error": format!("{e:#}")}),
        Err(_) => json!({"error": "the trace's thread panicked"}),
    };
    writeln!(conn, "{last}")?;
    conn.flush()?;
    Ok(())
}

/// One fix on this node for the CLI on `conn` (see [`crate::fix::session`]); `early` is what came after
/// the request's head in its first read.
fn fix_session(conn: Conn, node: &Node, early: Vec<u8>) -> Result<()> {
    let mut w = conn.try_clone()?;
    w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n")?;
    w.flush()?;
    // Short reads, so a stopped agent rolls back without waiting for the CLI's next word.
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut wire = crate::fix::session::Lines::new(std::io::BufReader::new(std::io::Cursor::new(early).chain(conn)), w);
    let scope = || node_scope(&node.netns).map(|(s, _, inode)| (s, inode));
    crate::fix::session::serve(&mut wire, &scope, &node.state_dir, &STOP)
}

/// What the agent of the node called `names` (the first as it was started) answers to `method path`;
/// `check` runs the node's checks.
fn route(method: &str, path: &str, names: &[String], check: impl FnOnce(&str) -> Result<Value>, about: impl FnOnce() -> Result<Value>) -> (u16, Value) {
    let node = names.first().map(String::as_str).unwrap_or("");
    if method != "GET" {
        return (405, json!({"error": format!("{method} is not served: GET only")}));
    }
    let (p, query) = path.split_once('?').unwrap_or((path, ""));
    let asked = query.split('&').find_map(|kv| kv.strip_prefix("node="));
    if let Some(other) = asked.filter(|n| !names.iter().any(|x| x == n)) {
        return (403, json!({"error": format!("this agent serves node {node} only, not {other}")}));
    }
    match p {
        "/v1/node" => match about() {
            Ok(v) => (200, v),
            Err(e) => (500, json!({"error": format!("{e:#}")})),
        },
        "/v1/check" => match check(node) {
            Ok(v) => (200, v),
            Err(e) => (500, json!({"error": format!("{e:#}")})),
        },
        _ => (404, json!({"error": format!("no {p} here: GET /v1/node, /v1/check, /v1/follow, /v1/fixes; POST /v1/fix, /v1/rollback")})),
    }
}

fn respond(conn: &mut Conn, code: u16, body: &Value) -> Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let body = body.to_string();
    write!(conn, "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    conn.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_agents_parse_and_bad_ones_say_why() {
        assert_eq!(parse_addr("unix:/run/a.sock").unwrap(), Addr::Unix("/run/a.sock".into()));
        assert_eq!(parse_addr("/run/a.sock").unwrap().to_string(), "unix:/run/a.sock");
        assert!(parse_addr("unix:relative").is_err());
        assert!(parse_addr("10.0.0.1:9000").is_err());
        assert_eq!(parse_addr("tcp:127.0.0.1:7390").unwrap().to_string(), "tcp:127.0.0.1:7390");
        let e = format!("{:#}", parse_addr("tcp:0.0.0.0:7390").unwrap_err());
        assert!(e.contains("loopback only"), "{e}");
        assert!(parse_addr("tcp:10.244.0.5:7390").is_err());
        assert_eq!(parse_agent("n1=unix:/s").unwrap(), ("n1".to_string(), Addr::Unix("/s".into())));
        assert!(parse_agent("unix:/s").is_err());
        assert!(parse_agent("=unix:/s").is_err());
    }

    #[test]
    fn an_agent_answers_for_its_node_only() {
        let check = |n: &str| Ok(json!({"nodes": [{"node": n}]}));
        let about = || Ok(json!({"node": "n1", "pods": []}));
        let n1 = ["n1".to_string(), "lab-n1".to_string()];
        assert_eq!(route("GET", "/v1/node", &n1, check, about), (200, json!({"node": "n1", "pods": []})));
        assert_eq!(route("GET", "/v1/check", &n1, check, about).1["nodes"][0]["node"], "n1");
        assert_eq!(route("GET", "/v1/check?node=n1", &n1, check, about).0, 200);
        assert_eq!(route("GET", "/v1/check?node=lab-n1", &n1, check, about).0, 200, "its namespace's name is its name too");
        let (code, body) = route("GET", "/v1/check?node=n2", &n1, |_| panic!("another node's checks never run"), about);
        assert_eq!(code, 403);
        assert!(body["error"].as_str().unwrap().contains("serves node n1 only"));
        assert_eq!(route("POST", "/v1/check", &n1, check, about).0, 405);
        assert_eq!(route("GET", "/v1/fix", &n1, check, about).0, 404);
        assert_eq!(route("GET", "/v1/check", &n1, |_| anyhow::bail!("no such node"), about).0, 500);
        assert_eq!(route("GET", "/v1/node", &n1, check, || anyhow::bail!("its namespace is gone")).0, 500);
    }

    #[test]
    fn a_follow_query_becomes_the_request_or_says_what_is_wrong() {
        use crate::inject::ProbeKind;
        let q = query("/v1/follow?src=10.1.0.5&dst=10.1.1.7&probe=tcp:8096&count=2&timeout_ms=3000&icmp_id=77&no_kprobes=1");
        let r = follow_request(&q).unwrap();
        assert_eq!((r.src, r.dst), ("10.1.0.5".parse().unwrap(), "10.1.1.7".parse().unwrap()));
        assert_eq!((r.probe, r.dst_port, r.count, r.timeout), (ProbeKind::Tcp(8096), Some(8096), 2, Duration::from_secs(3)));
        assert_eq!(r.opts.icmp_id, Some(77));
        assert!(r.opts.no_kprobes && !r.opts.until_drop);
        let defaults = follow_request(&query("/v1/follow?src=10.1.0.5&dst=10.1.1.7")).unwrap();
        assert_eq!((defaults.probe, defaults.count, defaults.timeout), (ProbeKind::Icmp, 1, Duration::from_secs(5)));
        for (bad, says) in [
            ("/v1/follow?dst=10.1.1.7", "src is missing"),
            ("/v1/follow?src=web&dst=10.1.1.7", "not an IPv4 address"),
            ("/v1/follow?src=10.1.0.5&dst=10.1.1.7&count=0", "count must be"),
            ("/v1/follow?src=10.1.0.5&dst=10.1.1.7&probe=sctp", "probe"),
            ("/v1/follow?src=10.1.0.5&dst=10.1.1.7&icmp_id=70000", "icmp_id"),
        ] {
            let e = format!("{:#}", follow_request(&query(bad)).unwrap_err());
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_socket_nobody_answers_on_is_said_at_once() {
        let dir = std::env::temp_dir().join(format!("cnitrace-agent-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let silent = dir.join("silent.sock");
        // Listening but never answering: the timeout, not a hang.
        let _l = UnixListener::bind(&silent).unwrap();
        let t0 = Instant::now();
        let agents = vec![("a".to_string(), Addr::Unix(silent.clone())), ("b".to_string(), Addr::Unix(dir.join("none.sock")))];
        let r = ask_all(&agents, "/v1/node", Duration::from_millis(300));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(format!("{:#}", r[0].as_ref().unwrap_err()).contains("no answer"), "{:?}", r[0]);
        assert!(format!("{:#}", r[1].as_ref().unwrap_err()).contains("connect"), "{:?}", r[1]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
