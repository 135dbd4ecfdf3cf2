//! Where an agent listens, and how that is written on a command line: the address every transport to
//! an agent starts from (a Unix socket, loopback TCP, or an agent pod through the API server's
//! port-forward).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

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
