//! TCP and HTTP(S) as a pod's client sees them: a connect, then one GET (through TLS for https), on the
//! thread's network namespace. Which stage failed decides whether the network is to blame.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

/// Where a request stopped.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "stage", content = "error")]
pub enum Failure {
    /// No connection: the network (or nothing listening) — worth a trace.
    Connect(String),
    /// Connected, but the TLS handshake failed (certificate, protocol): not the network.
    Tls(String),
    /// Connected, but no HTTP answer came (or not one we could read).
    Http(String),
}

impl Failure {
    pub fn words(&self) -> String {
        match self {
            Failure::Connect(e) => format!("no connection: {e}"),
            Failure::Tls(e) => format!("connected, TLS failed: {e}"),
            Failure::Http(e) => format!("connected, no HTTP answer: {e}"),
        }
    }
}

/// How the client checks the server's certificate.
#[derive(Clone, Debug, Default)]
pub struct TlsTrust {
    /// Extra roots (PEM), besides the node's trust store.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate (curl's -k).
    pub insecure: bool,
}

/// A TCP connect within `timeout`: Ok(time it took).
pub fn connect(addr: SocketAddr, timeout: Duration) -> std::result::Result<(TcpStream, Duration), Failure> {
    let t0 = Instant::now();
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => Ok((s, t0.elapsed())),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => {
            Err(Failure::Connect(format!("no answer from {addr} in {} ms", timeout.as_millis())))
        }
        Err(e) => Err(Failure::Connect(format!("{addr}: {e}"))),
    }
}

/// The status line of a response.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub code: u16,
    pub reason: String,
}

/// GET `path` from `addr`, `host` in the Host header (and the TLS server name for https).
pub fn get(addr: SocketAddr, host: &str, path: &str, tls: Option<&TlsTrust>, timeout: Duration) -> std::result::Result<Status, Failure> {
    let (stream, _) = connect(addr, timeout)?;
    let deadline = Some(timeout);
    stream.set_read_timeout(deadline).and_then(|_| stream.set_write_timeout(deadline)).map_err(|e| Failure::Http(e.to_string()))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: cnitrace\r\nAccept: */*\r\nConnection: close\r\n\r\n");
    match tls {
        None => exchange(stream, &request),
        Some(trust) => {
            let cfg = client_config(trust).map_err(|e| Failure::Tls(format!("{e:#}")))?;
            let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| Failure::Tls(format!("{host:?}: {e}")))?;
            let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| Failure::Tls(e.to_string()))?;
            let mut tls = rustls::StreamOwned::new(conn, stream);
            // The handshake first, so a certificate problem is told apart from an HTTP one.
            while tls.conn.is_handshaking() {
                tls.conn.complete_io(&mut tls.sock).map_err(|e| Failure::Tls(e.to_string()))?;
            }
            exchange(tls, &request)
        }
    }
}

fn exchange(mut s: impl Read + Write, request: &str) -> std::result::Result<Status, Failure> {
    s.write_all(request.as_bytes()).and_then(|_| s.flush()).map_err(|e| Failure::Http(format!("send the request: {e}")))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if head.is_empty() => return Err(Failure::Http(e.to_string())),
            Err(_) => break,
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                return Ok(Status { code: resp.code.unwrap_or(0), reason: resp.reason.unwrap_or("").to_string() });
            }
            Ok(httparse::Status::Partial) if head.len() < 64 * 1024 => continue,
            Ok(httparse::Status::Partial) => return Err(Failure::Http("a response head over 64 KiB".into())),
            Err(e) => return Err(Failure::Http(format!("not an HTTP response: {e}"))),
        }
    }
    Err(Failure::Http(if head.is_empty() { "the server closed the connection without a word".into() } else { "the response ended inside its head".into() }))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(trust: &TlsTrust) -> Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    if trust.insecure {
        return Ok(Arc::new(builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider()))).with_no_client_auth()));
    }
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(file) = &trust.ca_file {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let certs = CertificateDer::pem_file_iter(file)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("read the CA file {}", file.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(anyhow!("{} holds no usable certificate", file.display()));
        }
    }
    if roots.is_empty() {
        return Err(anyhow!("no trusted certificate authority: the node's store is empty (give --cacert FILE, or --insecure)"));
    }
    Ok(Arc::new(builder.with_root_certificates(roots).with_no_client_auth()))
}

/// `--insecure`: any certificate is accepted (the handshake's signatures are still checked).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_line_is_read_and_a_silent_close_is_named() {
        let io = |reply: &[u8]| std::io::Cursor::new(reply.to_vec());
        struct Duplex(std::io::Cursor<Vec<u8>>);
        impl Read for Duplex {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                // One byte at a time: the head is parsed across reads.
                self.0.read(&mut b[..1])
            }
        }
        impl Write for Duplex {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let s = exchange(Duplex(io(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")), "GET / HTTP/1.1\r\n\r\n").expect("a status");
        assert_eq!((s.code, s.reason.as_str()), (503, "Service Unavailable"));
        let e = exchange(Duplex(io(b"")), "GET / HTTP/1.1\r\n\r\n").unwrap_err();
        assert_eq!(e, Failure::Http("the server closed the connection without a word".into()));
        let e = exchange(Duplex(io(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")), "x").unwrap_err();
        assert!(matches!(e, Failure::Http(ref m) if m.starts_with("not an HTTP response")), "{e:?}");
    }
}
