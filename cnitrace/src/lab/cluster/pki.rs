//! The real cluster's certificates and kubeconfigs, of the lab's own CA (kubeadm's set, smaller): the
//! API server's serving certificate, one client certificate per identity (admin, the controller
//! manager, the scheduler, each node's kubelet, the API server towards the kubelets, cnitrace), and the
//! service-account signing key. Everything is written into the lab's state folder.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// A client identity: the file stem, the user (CN) and its groups (O).
pub struct Identity<'a> {
    pub file: &'a str,
    pub user: &'a str,
    pub groups: &'a [&'a str],
}

impl Pki {
    /// A new CA in `dir/pki` (ca.crt, ca.key) and the service-account key pair (sa.key, sa.pub).
    pub fn create(dir: &Path) -> Result<Pki> {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).context("create the cluster's pki folder")?;
        let key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        ca.distinguished_name.push(DnType::CommonName, "cnitrace lab kubernetes CA");
        let cert = ca.self_signed(&key)?;
        std::fs::write(dir.join("ca.crt"), cert.pem())?;
        std::fs::write(dir.join("ca.key"), key.serialize_pem())?;
        let sa = KeyPair::generate()?;
        std::fs::write(dir.join("sa.key"), sa.serialize_pem())?;
        std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
        Ok(Pki { dir, issuer: Issuer::new(ca, key) })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A serving certificate for `names` (DNS names or addresses): `<file>.crt`, `<file>.key`.
    pub fn server(&self, file: &str, cn: &str, names: &[String]) -> Result<()> {
        let mut p = CertificateParams::new(names.to_vec())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(file, p)
    }

    /// A client certificate: `<file>.crt`, `<file>.key`.
    pub fn client(&self, id: &Identity) -> Result<()> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, id.user);
        for g in id.groups {
            p.distinguished_name.push(DnType::OrganizationName, *g);
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(id.file, p)
    }

    fn sign(&self, file: &str, mut p: CertificateParams) -> Result<()> {
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        std::fs::write(self.dir.join(format!("{file}.crt")), cert.pem())?;
        std::fs::write(self.dir.join(format!("{file}.key")), key.serialize_pem())?;
        Ok(())
    }

    /// A kubeconfig for the identity `id` (its certificate made first) against `server`, at `path`.
    pub fn kubeconfig(&self, id: &Identity, server: &str, path: &Path) -> Result<()> {
        self.client(id)?;
        let cfg = kubeconfig(server, &self.path("ca.crt"), Credentials::Cert { cert: &self.path(&format!("{}.crt", id.file)), key: &self.path(&format!("{}.key", id.file)) }, id.user);
        std::fs::write(path, serde_json::to_vec_pretty(&cfg)?).with_context(|| format!("write {}", path.display()))
    }
}

pub enum Credentials<'a> {
    Cert { cert: &'a Path, key: &'a Path },
    TokenFile(&'a Path),
}

/// A kubeconfig (JSON, which kubectl and every client read as they read YAML).
pub fn kubeconfig(server: &str, ca: &Path, creds: Credentials, user: &str) -> serde_json::Value {
    let user_entry = match creds {
        Credentials::Cert { cert, key } => serde_json::json!({"client-certificate": cert, "client-key": key}),
        Credentials::TokenFile(t) => serde_json::json!({"tokenFile": t}),
    };
    serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "cnitrace-lab", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": "cnitrace-lab", "context": {"cluster": "cnitrace-lab", "user": user}}],
        "current-context": "cnitrace-lab",
    })
}

/// The names the API server answers to: its addresses, the `kubernetes` Service's ClusterIP and names.
pub fn apiserver_names(addrs: &[IpAddr], domain: &str) -> Vec<String> {
    let mut n: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    n.push("localhost".into());
    for d in ["kubernetes", "kubernetes.default", "kubernetes.default.svc"] {
        n.push(d.into());
    }
    n.push(format!("kubernetes.default.svc.{domain}"));
    n
}
