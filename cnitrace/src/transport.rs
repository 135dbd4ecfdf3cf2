//! Where an agent listens, and how that is written on a command line: the address every transport to
//! an agent starts from (a Unix socket, loopback TCP, or an agent pod through the API server's
//! port-forward).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};

/// Where an agent listens: a Unix socket, or a loopback TCP port — in a cluster the agent's pod has its
/// own network namespace, so its loopback is reached only through the API server's port-forward to that
/// pod (who may trace a node is who may port-forward to its agent), never from the pod network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
    /// An agent's pod reached through the API server's port-forward: `local` is this process's end of
    /// the tunnel (see [`crate::k8s::agents`]); `pod` is `NAMESPACE/NAME`, for messages.
    Forwarded { local: std::net::SocketAddr, pod: String },
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
            Addr::Forwarded { pod, .. } => write!(f, "pod {pod} (port-forward)"),
        }
    }
}

/// `unix:PATH` (or a path alone), or `tcp:127.0.0.1:PORT` (loopback only).
pub fn parse_addr(s: &str) -> Result<Addr> {
    if let Some(a) = s.strip_prefix("tcp:") {
        let a: std::net::SocketAddr = a.parse().with_context(|| format!("{s:?} is not an agent address: tcp:127.0.0.1:PORT"))?;
        if !a.ip().is_loopback() {
            bail!("{s:?}: an agent listens on loopback only (tcp:127.0.0.1:PORT; reached through port-forward), never on an address the pod network reaches");
        }
        return Ok(Addr::Tcp(a));
    }
    let path = s.strip_prefix("unix:").unwrap_or(s);
    if path.is_empty() || !path.starts_with('/') {
        bail!("{s:?} is not an agent address: unix:/PATH (an absolute socket path) or tcp:127.0.0.1:PORT");
    }
    Ok(Addr::Unix(PathBuf::from(path)))
}

/// The head of an agent's streamed answer (a `/v1/follow` or `/v1/fix` session), read from `r` up to the
/// blank line and parsed with httparse as the agent parses requests: its status code. The body follows in
/// `r`.
pub fn read_head(r: &mut impl std::io::BufRead, addr: &Addr) -> Result<u16> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).with_context(|| format!("read from {addr}"))?;
        head.extend_from_slice(&line);
        if n == 0 || line.iter().all(|b| b.is_ascii_whitespace()) {
            break;
        }
        if head.len() > 64 * 1024 {
            bail!("{addr} sent an HTTP head of over 64 KiB");
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => resp.code.ok_or_else(|| anyhow!("{addr} did not answer in HTTP")),
        _ => bail!("{addr} did not answer in HTTP"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answers_head_is_read_to_its_blank_line_and_the_body_left() {
        let addr = Addr::Unix("/run/a.sock".into());
        let mut r = std::io::Cursor::new(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/x-ndjson\r\n\r\n{\"error\":\"x\"}\n".to_vec());
        assert_eq!(read_head(&mut r, &addr).unwrap(), 403);
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut r, &mut rest).unwrap();
        assert_eq!(rest, "{\"error\":\"x\"}\n");
        assert!(read_head(&mut std::io::Cursor::new(b"SSH-2.0-x\r\n\r\n".to_vec()), &addr).is_err());
        assert!(read_head(&mut std::io::Cursor::new(Vec::new()), &addr).is_err());
    }
}
