//! What a user may name as an end of a trace: an address, or a pod as kubectl names it.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Ip(Ipv4Addr),
    /// A pod by name; `namespace` None means the `-n` namespace, else the context's, else `default`.
    Pod { namespace: Option<String>, name: String },
    /// A node by its Kubernetes name (`node/NAME`): the address it talks to its pods from, as the
    /// kubelet's probes do.
    Node { name: String },
    /// A Service (`svc/NAME[:PORT]`, `NAMESPACE/svc/NAME[:PORT]`): its ClusterIP and the port named (by
    /// name or number; the only one when none is).
    Service { namespace: Option<String>, name: String, port: Option<String> },
}

impl Target {
    /// `10.244.0.19`, `jellyfin`, `media/jellyfin`, `pod/jellyfin`, `media/pod/jellyfin`.
    pub fn parse(s: &str, what: &str) -> Result<Target> {
        if let Ok(ip) = s.parse::<Ipv4Addr>() {
            return Ok(Target::Ip(ip));
        }
        // Digits and dots only: a mistyped address, even where it would be a valid pod name.
        if s.contains('.') && s.chars().all(|c| c.is_ascii_digit() || c == '.') {
            bail!("{what} {s:?} is not an IPv4 address");
        }
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() == 2 && parts[0].parse::<Ipv4Addr>().is_ok() {
            bail!("{what} {s:?} is a network, not an address: give one pod address or a pod's name");
        }
        let is_pod_kind = |k: &str| matches!(k, "pod" | "pods" | "po");
        if let [kind, name] = parts.as_slice() {
            if matches!(*kind, "node" | "nodes" | "no") {
                if !dns_subdomain(name) {
                    bail!("{what} {s:?}: {name:?} is not a valid node name");
                }
                return Ok(Target::Node { name: name.to_string() });
            }
        }
        let is_svc_kind = |k: &str| matches!(k, "svc" | "service" | "services");
        let service = match parts.as_slice() {
            [kind, name] if is_svc_kind(kind) => Some((None, *name)),
            [ns, kind, name] if is_svc_kind(kind) => Some((Some(*ns), *name)),
            _ => None,
        };
        if let Some((namespace, name)) = service {
            let (name, port) = match name.split_once(':') {
                Some((n, p)) if !p.is_empty() => (n, Some(p.to_string())),
                _ => (name, None),
            };
            if let Some(ns) = namespace.filter(|ns| !dns_label(ns)) {
                bail!("{what} {s:?}: {ns:?} is not a valid namespace name (lower-case letters, digits and '-', at most 63)");
            }
            if !dns_label(name) {
                bail!("{what} {s:?}: {name:?} is not a valid Service name (lower-case letters, digits and '-', at most 63)");
            }
            return Ok(Target::Service { namespace: namespace.map(str::to_string), name: name.to_string(), port });
        }
        let (namespace, name) = match parts.as_slice() {
            [name] => (None, *name),
            [kind, name] if is_pod_kind(kind) => (None, *name),
            [ns, name] => (Some(*ns), *name),
            [ns, kind, name] if is_pod_kind(kind) => (Some(*ns), *name),
            _ => bail!("{what} {s:?} is neither an IPv4 address nor a pod (POD, NAMESPACE/POD or NAMESPACE/pod/POD)"),
        };
        if let Some(ns) = namespace {
            if !dns_label(ns) {
                bail!("{what} {s:?}: {ns:?} is not a valid namespace name (lower-case letters, digits and '-', at most 63)");
            }
        }
        if !dns_subdomain(name) {
            bail!("{what} {s:?}: {name:?} is not a valid pod name (lower-case letters, digits, '-' and '.', at most 253)");
        }
        Ok(Target::Pod { namespace: namespace.map(str::to_string), name: name.to_string() })
    }

    pub fn is_name(&self) -> bool {
        !matches!(self, Target::Ip(_))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Ip(ip) => write!(f, "{ip}"),
            Target::Pod { namespace: Some(ns), name } => write!(f, "{ns}/{name}"),
            Target::Pod { namespace: None, name } => write!(f, "{name}"),
            Target::Node { name } => write!(f, "node/{name}"),
            Target::Service { namespace, name, port } => {
                write!(f, "{}svc/{name}{}", namespace.as_ref().map(|n| format!("{n}/")).unwrap_or_default(), port.as_ref().map(|p| format!(":{p}")).unwrap_or_default())
            }
        }
    }
}

/// RFC 1123 label (a namespace's name).
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain (a pod's name).
fn dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: Option<&str>, name: &str) -> Target {
        Target::Pod { namespace: ns.map(str::to_string), name: name.into() }
    }

    #[test]
    fn addresses_and_pods_are_told_apart_as_kubectl_names_them() {
        assert_eq!(Target::parse("10.244.0.19", "destination").unwrap(), Target::Ip(Ipv4Addr::new(10, 244, 0, 19)));
        assert_eq!(Target::parse("jellyfin", "destination").unwrap(), pod(None, "jellyfin"));
        assert_eq!(Target::parse("media/jellyfin", "destination").unwrap(), pod(Some("media"), "jellyfin"));
        assert_eq!(Target::parse("pod/debug", "source").unwrap(), pod(None, "debug"));
        assert_eq!(Target::parse("media/pod/jellyfin-7d9f8-x2x.v1", "d").unwrap(), pod(Some("media"), "jellyfin-7d9f8-x2x.v1"));
        assert_eq!(Target::parse("node/gpu-worker-7", "source").unwrap(), Target::Node { name: "gpu-worker-7".into() });
        let svc = |ns: Option<&str>, name: &str, port: Option<&str>| Target::Service { namespace: ns.map(str::to_string), name: name.into(), port: port.map(str::to_string) };
        assert_eq!(Target::parse("svc/jellyfin", "destination").unwrap(), svc(None, "jellyfin", None));
        assert_eq!(Target::parse("media/svc/jellyfin:http", "destination").unwrap(), svc(Some("media"), "jellyfin", Some("http")));
        assert_eq!(Target::parse("service/jellyfin:8096", "destination").unwrap(), svc(None, "jellyfin", Some("8096")));
    }

    #[test]
    fn what_is_neither_says_why() {
        let e = |s: &str| Target::parse(s, "destination").unwrap_err().to_string();
        assert!(e("10.244.0.0/16").contains("is a network"), "{}", e("10.244.0.0/16"));
        assert!(e("10.244.0.300").contains("not an IPv4 address"));
        assert!(e("Media/jellyfin").contains("not a valid namespace name"));
        assert!(e("media/Jelly_fin").contains("not a valid pod name"));
        assert!(e("a/b/c/d").contains("neither an IPv4 address nor a pod"));
        assert!(e("svc/Jelly").contains("not a valid Service name"));
    }
}
