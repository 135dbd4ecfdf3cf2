//! `cnitrace agent`: one node's own service — it answers for its node only, on a Unix socket (in a
//! cluster, reached through the API server's port-forward to its pod: who may ask a node is who may
//! port-forward to its agent, and nothing of the pod network can reach it). The CLI asks each node's
//! agent (`--agent NODE=ADDR`) in parallel, each within a timeout, and says which node did not answer.
//!
//! The protocol is HTTP/1.1 with JSON bodies, one request per connection:
//! - `GET /v1/node` → `{"node": NAME}`
//! - `GET /v1/check[?node=NAME]` → that node's `check` report; another node's name is refused (403).
//!
//! This is the first part of the agent of issue 20: `check` across nodes. `follow` and `fix` through
//! the agents (a stitched timeline, a remedy run where its cause is) build on it.

use std::{
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Where an agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `unix:PATH` (or a path alone).
pub fn parse_addr(s: &str) -> Result<Addr> {
    let path = s.strip_prefix("unix:").unwrap_or(s);
    if path.is_empty() || !path.starts_with('/') {
        bail!("{s:?} is not an agent address: unix:/PATH (an absolute socket path)");
    }
    Ok(Addr::Unix(PathBuf::from(path)))
}

/// `NODE=ADDR`.
pub fn parse_agent(s: &str) -> Result<(String, Addr)> {
    let Some((node, addr)) = s.split_once('=') else { bail!("--agent {s:?}: NODE=ADDR (e.g. node-1=unix:/run/cnitrace/agent.sock)") };
    if node.is_empty() {
        bail!("--agent {s:?}: the node's name is missing");
    }
    Ok((node.to_string(), parse_addr(addr)?))
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
    let deadline = Instant::now() + timeout;
    let Addr::Unix(sock) = addr;
    let mut s = UnixStream::connect(sock).with_context(|| format!("connect to {addr}"))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: cnitrace-agent\r\nConnection: close\r\n\r\n").as_bytes())?;
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

/// Serves `node` on the socket at `path` until SIGINT or SIGTERM. The node must be one of this host's
/// (`check --node` finds it); the socket is the caller's only (mode 0600) and removed at the end.
pub fn serve(path: &Path, node: &str, kube: &crate::k8s::KubeArgs) -> Result<()> {
    // The node is checked once before anything listens: an agent for a node it cannot see is a mistake.
    // It answers to the name it was given, the node's display name and its namespace's name.
    let first = crate::cli::check::report(Some(node), true, kube).with_context(|| format!("agent for node {node}"))?;
    let mut names = vec![node.to_string()];
    for n in &first.nodes {
        names.extend([n.node.clone(), n.netns.clone()].into_iter().filter(|x| !x.is_empty()));
    }
    names.dedup();
    let names = &names;
    crate::sys::on_stop_signals(on_signal);
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            bail!("{} exists and is not a socket: not replacing it", path.display());
        }
        // A socket nobody answers on is an earlier agent's; one that answers is another agent's.
        if UnixStream::connect(path).is_ok() {
            bail!("an agent already listens on unix:{}", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("listen on unix:{}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    listener.set_nonblocking(true)?;
    eprintln!("cnitrace agent: node {node}, listening on unix:{}", path.display());
    let result = std::thread::scope(|s| -> Result<()> {
        while !STOP.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((conn, _)) => {
                    s.spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let _ = handle(conn, names, kube);
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e).context("accept"),
            }
        }
        Ok(())
    });
    let _ = std::fs::remove_file(path);
    result
}

fn handle(mut conn: UnixStream, names: &[String], kube: &crate::k8s::KubeArgs) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let head = crate::sys::read_http_head(&mut conn);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let (method, path) = match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => (req.method.unwrap_or("").to_string(), req.path.unwrap_or("").to_string()),
        _ => return respond(&mut conn, 400, &json!({"error": "not an HTTP request"})),
    };
    let (code, body) = route(&method, &path, names, |n| crate::cli::check::report(Some(n), true, kube).and_then(|r| Ok(serde_json::to_value(r)?)));
    respond(&mut conn, code, &body)
}

/// What the agent of the node called `names` (the first as it was started) answers to `method path`;
/// `check` runs the node's checks.
fn route(method: &str, path: &str, names: &[String], check: impl FnOnce(&str) -> Result<Value>) -> (u16, Value) {
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
        "/v1/node" => (200, json!({"node": node})),
        "/v1/check" => match check(node) {
            Ok(v) => (200, v),
            Err(e) => (500, json!({"error": format!("{e:#}")})),
        },
        _ => (404, json!({"error": format!("no {p} here: /v1/node, /v1/check")})),
    }
}

fn respond(conn: &mut UnixStream, code: u16, body: &Value) -> Result<()> {
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
        assert_eq!(parse_agent("n1=unix:/s").unwrap(), ("n1".to_string(), Addr::Unix("/s".into())));
        assert!(parse_agent("unix:/s").is_err());
        assert!(parse_agent("=unix:/s").is_err());
    }

    #[test]
    fn an_agent_answers_for_its_node_only() {
        let check = |n: &str| Ok(json!({"nodes": [{"node": n}]}));
        let n1 = ["n1".to_string(), "lab-n1".to_string()];
        assert_eq!(route("GET", "/v1/node", &n1, check), (200, json!({"node": "n1"})));
        assert_eq!(route("GET", "/v1/check", &n1, check).1["nodes"][0]["node"], "n1");
        assert_eq!(route("GET", "/v1/check?node=n1", &n1, check).0, 200);
        assert_eq!(route("GET", "/v1/check?node=lab-n1", &n1, check).0, 200, "its namespace's name is its name too");
        let (code, body) = route("GET", "/v1/check?node=n2", &n1, |_| panic!("another node's checks never run"));
        assert_eq!(code, 403);
        assert!(body["error"].as_str().unwrap().contains("serves node n1 only"));
        assert_eq!(route("POST", "/v1/check", &n1, check).0, 405);
        assert_eq!(route("GET", "/v1/fix", &n1, check).0, 404);
        assert_eq!(route("GET", "/v1/check", &n1, |_| anyhow::bail!("no such node")).0, 500);
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
