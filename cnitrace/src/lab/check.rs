//! The lab's paths and whether traffic flows on each: what a fault must break, and what it must not.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use cnitrace_tools as tools;
use anyhow::{bail, Result};
use serde::Serialize;

use super::{
    topology::{self, EXTERNAL_IP, EXTERNAL_PORT, HTTP_PORT},
    Lab,
};
use crate::{netns, sys};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathId {
    /// debug → jellyfin on storagenodet3500: ping and HTTP 8096.
    SameNode,
    /// debug → web on storagenodet3501 through VXLAN: ping and HTTP 8096.
    CrossNode,
    /// debug → the external host through the node's masquerade: ping and HTTP 80.
    External,
    /// debug → web with a full-size packet for debug's MTU and DF set.
    CrossNodeFullMtu,
    /// storagenodet3500 itself → web (what kubelet probes and node-local clients do).
    NodeToRemotePod,
    /// jellyfin (the same-node pair's destination) → web: ping and HTTP 8096. A repair of jellyfin that
    /// serves debug but leaves jellyfin cut from the other node shows here.
    DestinationCrossNode,
    /// debug → jellyfin's Service (ClusterIP, kube-proxy's DNAT on storagenodet3500): HTTP.
    ServiceSameNode,
    /// debug → web's Service (ClusterIP, DNAT then VXLAN): HTTP.
    ServiceCrossNode,
    /// The external host → jellyfin's NodePort on storagenodet3500's uplink address: HTTP.
    NodePort,
    /// jellyfin → its own Service (back out of the bridge port it came in by: hairpin): HTTP.
    Hairpin,
}

pub const ALL_PATHS: [PathId; 6] =
    [PathId::SameNode, PathId::CrossNode, PathId::External, PathId::CrossNodeFullMtu, PathId::NodeToRemotePod, PathId::DestinationCrossNode];

/// The Services' paths (kube-proxy's NAT), checked beside ALL_PATHS: the faults of the catalog above are
/// declared against ALL_PATHS only.
pub const SERVICE_PATHS: [PathId; 4] = [PathId::ServiceSameNode, PathId::ServiceCrossNode, PathId::NodePort, PathId::Hairpin];

impl PathId {
    pub fn name(self) -> &'static str {
        match self {
            PathId::SameNode => "same-node",
            PathId::CrossNode => "cross-node",
            PathId::External => "external",
            PathId::CrossNodeFullMtu => "cross-node-full-mtu",
            PathId::NodeToRemotePod => "node-to-remote-pod",
            PathId::DestinationCrossNode => "destination-cross-node",
            PathId::ServiceSameNode => "service-same-node",
            PathId::ServiceCrossNode => "service-cross-node",
            PathId::NodePort => "nodeport",
            PathId::Hairpin => "hairpin",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PathResult {
    pub path: PathId,
    pub ok: bool,
    /// What was tried and what failed, for people.
    pub detail: String,
}

/// Checks every pod path (ALL_PATHS); the checks run in parallel (a broken one costs a timeout).
pub fn check_all(lab: &Lab) -> Vec<PathResult> {
    check_these(lab, &ALL_PATHS)
}

/// Checks `paths` in parallel.
pub fn check_these(lab: &Lab, paths: &[PathId]) -> Vec<PathResult> {
    std::thread::scope(|s| {
        let handles: Vec<_> = paths.iter().map(|&p| s.spawn(move || check(lab, p))).collect();
        handles.into_iter().map(|h| h.join().expect("path check thread")).collect()
    })
}

pub fn check(lab: &Lab, path: PathId) -> PathResult {
    let debug = lab.pod_ns("debug");
    let jellyfin = topology::pod("jellyfin").expect("jellyfin").ip;
    let web = topology::pod("web").expect("web").ip;
    let r = match path {
        PathId::SameNode => ping(&debug, &jellyfin.to_string(), None).and_then(|_| http(&debug, SocketAddr::new(jellyfin.into(), HTTP_PORT))),
        PathId::CrossNode => ping(&debug, &web.to_string(), None).and_then(|_| http(&debug, SocketAddr::new(web.into(), HTTP_PORT))),
        PathId::External => ping(&debug, &EXTERNAL_IP.to_string(), None)
            .and_then(|_| http(&debug, SocketAddr::new(EXTERNAL_IP.into(), EXTERNAL_PORT))),
        PathId::CrossNodeFullMtu => pod_mtu(&debug).and_then(|mtu| ping(&debug, &web.to_string(), Some(mtu - 28))),
        PathId::NodeToRemotePod => ping(&lab.node_ns(0), &web.to_string(), None),
        PathId::DestinationCrossNode => {
            let jf = lab.pod_ns("jellyfin");
            ping(&jf, &web.to_string(), None).and_then(|_| http(&jf, SocketAddr::new(web.into(), HTTP_PORT)))
        }
        PathId::ServiceSameNode => http(&debug, service_addr("jellyfin")),
        PathId::ServiceCrossNode => http(&debug, service_addr("web")),
        PathId::NodePort => {
            let np = topology::service("jellyfin").expect("jellyfin's Service").node_port;
            http(&lab.external_ns(), SocketAddr::new(topology::UPLINK_IP.into(), np))
        }
        PathId::Hairpin => http(&lab.pod_ns("jellyfin"), service_addr("jellyfin")),
    };
    match r {
        Ok(()) => PathResult { path, ok: true, detail: "flows".into() },
        Err(e) => PathResult { path, ok: false, detail: format!("{e:#}") },
    }
}

/// Up to 1 s for one answer, an echo every 200 ms until it comes (`size` sets DF and the payload size):
/// the first echo of a fresh lab can race the neighbour resolution of a just-created veth, and a broken
/// path costs 1 s, not two tries of a second each.
fn ping(ns: &str, dst: &str, size: Option<u32>) -> Result<()> {
    let size_s = size.map(|s| s.to_string());
    let mut args = vec!["-n", "-q", "-c", "1", "-i", "0.2", "-w", "1"];
    if let Some(s) = &size_s {
        args.extend_from_slice(&["-M", "do", "-s", s]);
    }
    args.push(dst);
    match sys::run_in(ns, &tools::PING, &args) {
        Ok(_) => Ok(()),
        Err(e) => bail!("ping {dst}{} from {ns}: {}", size.map(|s| format!(" (size {s}, DF)")).unwrap_or_default(), last_line(&e.to_string())),
    }
}

fn last_line(s: &str) -> String {
    s.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// An HTTP GET from inside the namespace, by cnitrace itself (no curl needed).
fn http(ns: &str, addr: SocketAddr) -> Result<()> {
    let path = netns::named(ns);
    netns::in_netns(&path, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| anyhow::anyhow!("HTTP {addr}: connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| anyhow::anyhow!("HTTP {addr}: read: {e}"))?;
        if !buf.starts_with("HTTP/1.0 200") && !buf.starts_with("HTTP/1.1 200") {
            bail!("HTTP {addr}: unexpected answer {:?}", buf.lines().next().unwrap_or(""));
        }
        Ok(())
    })
}

fn service_addr(name: &str) -> SocketAddr {
    let s = topology::service(name).expect("a lab Service");
    SocketAddr::new(s.cluster_ip.into(), s.port)
}

fn pod_mtu(ns: &str) -> Result<u32> {
    let out = sys::run(&tools::IP, &["-n", ns, "-o", "link", "show", "eth0"])?;
    let mtu = out
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no mtu in `ip link show eth0` of {ns}"))?;
    Ok(mtu)
}
