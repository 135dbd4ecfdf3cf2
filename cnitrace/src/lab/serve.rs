//! The lab's containers: the process that holds a pod's namespace (with the pod's own `/etc/resolv.conf`
//! in a mount namespace of its own, as a container runtime gives it), serving HTTP (jellyfin's 8096, the
//! external host's 80) or HTTPS (the external host's 443) when asked.

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};

pub struct Container {
    pub name: String,
    /// Serve on this port; None: only hold the namespace (a pod's pause container).
    pub port: Option<u16>,
    /// Serve HTTPS with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The pod's resolver configuration, seen by this process (and whoever looks through
    /// `/proc/PID/root`) as `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
}

/// Runs until killed.
pub fn run(c: &Container) -> Result<()> {
    if let Some(file) = &c.resolv_conf {
        own_resolv_conf(file)?;
    }
    let Some(port) = c.port else {
        loop {
            std::thread::park();
        }
    };
    let tls = c.tls.as_ref().map(|(cert, key)| server_config(cert, key)).transpose()?;
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind 0.0.0.0:{port}"))?;
    let body = format!("{}: hello from the cnitrace lab\n", c.name);
    for conn in listener.incoming() {
        let Ok(s) = conn else { continue };
        let body = body.clone();
        let tls = tls.clone();
        std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            match tls {
                Some(cfg) => {
                    let Ok(conn) = rustls::ServerConnection::new(cfg) else { return };
                    answer(rustls::StreamOwned::new(conn, s), &body);
                }
                None => answer(s, &body),
            }
        });
    }
    Ok(())
}

/// `200 OK` with a one-line body naming the server, after the whole request head (closing with unread
/// data would reset the connection).
fn answer(mut s: impl Read + Write, body: &str) {
    crate::sys::read_http_head(&mut s);
    let reply = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        body
    );
    let _ = s.write_all(reply.as_bytes());
    let _ = s.flush();
}

/// This process's own view of `/etc/resolv.conf`: a private mount namespace with `file` bound over it.
fn own_resolv_conf(file: &std::path::Path) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("a mount namespace of its own")?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).context("make / private")?;
    mount(Some(file), "/etc/resolv.conf", None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("bind {} over /etc/resolv.conf", file.display()))
}

pub(crate) fn server_config(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("read {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("read {}", key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

/// The lab's certificate authority and the external host's certificate (its name and address), written
/// to `dir` as `ca.pem`, `external.pem`, `external-key.pem`. Made at `lab up`, gone at `lab down`.
pub fn make_certificates(dir: &std::path::Path, name: &str, ip: std::net::Ipv4Addr) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "cnitrace lab CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![name.to_string()])?;
    leaf.distinguished_name.push(DnType::CommonName, name);
    leaf.subject_alt_names.push(SanType::IpAddress(ip.into()));
    let cert = leaf.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("external.pem"), cert.pem())?;
    std::fs::write(dir.join("external-key.pem"), key.serialize_pem())?;
    Ok(())
}
