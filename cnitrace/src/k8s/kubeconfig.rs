//! The node's kubeconfigs (the incident's `fix_worker_kubectl_config.sh`): each parses, names a server
//! for every context, and its client certificates are not expired or about to be. Read-only: renewing a
//! certificate is the cluster's own tooling's (`kubeadm certs renew`, the kubelet's rotation), never a
//! guess of ours.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use base64::Engine;
use kube::config::Kubeconfig;
use x509_cert::{der::DecodePem, Certificate};

/// Where nodes keep theirs: kubeadm's kubelet and admin files, the kubelet's own, k3s's.
pub const WELL_KNOWN: &[&str] = &["/etc/kubernetes/kubelet.conf", "/etc/kubernetes/admin.conf", "/var/lib/kubelet/kubeconfig", "/etc/rancher/k3s/k3s.yaml"];

/// How early an expiry is worth saying.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// One problem with one file: (finding kind, what).
pub type Problem = (&'static str, String);

/// The well-known files that exist here, then `extra` (the one in use), each once.
pub fn files(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = WELL_KNOWN.iter().map(PathBuf::from).filter(|p| p.exists()).collect();
    for e in extra {
        if e.exists() && !v.contains(e) {
            v.push(e.clone());
        }
    }
    v
}

/// Everything wrong with one kubeconfig at `now`.
pub fn check(path: &Path, now: SystemTime) -> Vec<Problem> {
    let kc = match Kubeconfig::read_from(path) {
        Ok(k) => k,
        Err(e) => return vec![("kubeconfig-invalid", format!("{}: {}", path.display(), super::kubeconfig_detail(&e)))],
    };
    let mut out = Vec::new();
    for ctx in &kc.contexts {
        let Some(c) = ctx.context.as_ref() else { continue };
        let cluster = kc.clusters.iter().find(|k| k.name == c.cluster);
        if cluster.and_then(|k| k.cluster.as_ref()).and_then(|k| k.server.as_deref()).is_none_or(str::is_empty) {
            out.push(("kubeconfig-invalid", format!("{}: context {} names cluster {:?}, which has no server", path.display(), ctx.name, c.cluster)));
        }
    }
    if let Some(cur) = kc.current_context.as_deref().filter(|c| !c.is_empty()) {
        if !kc.contexts.iter().any(|c| c.name == cur) {
            out.push(("kubeconfig-invalid", format!("{}: current-context {cur:?} is not among its contexts", path.display())));
        }
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    for user in &kc.auth_infos {
        let Some(a) = user.auth_info.as_ref() else { continue };
        let pem = match (a.client_certificate_data.as_deref(), a.client_certificate.as_deref()) {
            (Some(data), _) => match base64::engine::general_purpose::STANDARD.decode(data.trim()) {
                Ok(p) => p,
                Err(e) => {
                    out.push(("kubeconfig-invalid", format!("{}: user {}'s client-certificate-data is not base64 ({e})", path.display(), user.name)));
                    continue;
                }
            },
            (None, Some(file)) => {
                let f = dir.join(file);
                match std::fs::read(&f) {
                    Ok(p) => p,
                    Err(e) => {
                        out.push(("kubeconfig-invalid", format!("{}: user {}'s client-certificate {} cannot be read ({e})", path.display(), user.name, f.display())));
                        continue;
                    }
                }
            }
            (None, None) => continue,
        };
        match Certificate::from_pem(&pem) {
            Err(e) => out.push(("kubeconfig-invalid", format!("{}: user {}'s client certificate does not parse ({e})", path.display(), user.name))),
            Ok(cert) => {
                let not_after = cert.tbs_certificate().validity().not_after.to_system_time();
                let subject = cert.tbs_certificate().subject().to_string();
                let when = k8s_openapi::jiff::Timestamp::try_from(not_after).map(|t| t.strftime("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_default();
                if not_after <= now {
                    out.push(("kubeconfig-cert-expired", format!("{}: user {}'s client certificate ({subject}) expired {when}: the API refuses it", path.display(), user.name)));
                } else if not_after <= now + EXPIRY_WARNING {
                    let days = not_after.duration_since(now).map(|d| d.as_secs() / 86_400).unwrap_or(0);
                    out.push(("kubeconfig-cert-expiring", format!("{}: user {}'s client certificate ({subject}) expires {when}, in {days} days", path.display(), user.name)));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/kube").join(name);
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).expect("fixture certificate"))
    }

    fn kubeconfig(dir: &Path, cert_data: &str) -> PathBuf {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://192.0.2.9:6443\ncontexts:\n- name: x\n  context: {{cluster: c, user: node}}\ncurrent-context: x\nusers:\n- name: node\n  user:\n    client-certificate-data: {cert_data}\n    client-key-data: AAAA\n"
        );
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join("kubelet.conf");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn at(rfc3339: &str) -> SystemTime {
        SystemTime::from(rfc3339.parse::<k8s_openapi::jiff::Timestamp>().unwrap())
    }

    #[test]
    fn a_client_certificate_is_judged_by_its_expiry() {
        let dir = std::env::temp_dir().join(format!("cnitrace-kubeconfig-{}", std::process::id()));
        let expired = kubeconfig(&dir.join("a"), &fixture("node-cert-2025-01-01.crt"));
        let p = check(&expired, at("2026-11-30T00:00:00Z"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "kubeconfig-cert-expired");
        assert!(p[0].1.contains("user node's client certificate (") && p[0].1.contains("CN=system:node:gpu-worker-7") && p[0].1.contains(") expired 2025-01-01 00:00 UTC"), "{}", p[0].1);
        let valid = kubeconfig(&dir.join("b"), &fixture("node-cert-2036-01-01.crt"));
        assert!(check(&valid, at("2026-11-30T00:00:00Z")).is_empty());
        let soon = check(&valid, at("2035-12-20T00:00:00Z"));
        assert_eq!((soon[0].0, soon[0].1.contains("in 12 days")), ("kubeconfig-cert-expiring", true), "{soon:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_broken_kubeconfig_says_which_file_and_what() {
        let dir = std::env::temp_dir().join(format!("cnitrace-kubeconfig-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("admin.conf");
        std::fs::write(&f, "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: y\nusers: []\n").unwrap();
        let p: Vec<String> = check(&f, SystemTime::now()).into_iter().map(|(k, w)| format!("{k}: {w}")).collect();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].ends_with("context x names cluster \"c\", which has no server"), "{p:?}");
        assert!(p[1].ends_with("current-context \"y\" is not among its contexts"), "{p:?}");
        std::fs::write(&f, "clusters: [\n").unwrap();
        let p = check(&f, SystemTime::now());
        assert!(p[0].0 == "kubeconfig-invalid" && p[0].1.starts_with(&format!("{}: ", f.display())), "{p:?}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
