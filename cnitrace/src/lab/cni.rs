//! Pods are made the way a container runtime makes them on a flannel node: the real CNI `bridge` plugin
//! with `host-local` IPAM, fed the network config flannel delegates to, run inside the node's namespace.

use std::net::Ipv4Addr;

use cnitrace_tools as tools;
use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

use super::topology::{NodeSpec, CLUSTER_CIDR, POD_MTU};
use crate::sys;

pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// What flannel's CNI plugin hands to `bridge` (its "delegate"), for one node.
pub fn delegate_config(node: &NodeSpec, ipam_dir: &str) -> String {
    serde_json::json!({
        "cniVersion": "0.3.1",
        "name": "cbr0",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "isDefaultGateway": true,
        "hairpinMode": true,
        "ipMasq": false,
        "mtu": POD_MTU,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": node.subnet() }]],
            "routes": [{ "dst": CLUSTER_CIDR }],
            "dataDir": ipam_dir,
        }
    })
    .to_string()
}

#[derive(Deserialize)]
struct CniResult {
    #[serde(default)]
    interfaces: Vec<CniInterface>,
}

#[derive(Deserialize)]
struct CniInterface {
    name: String,
    #[serde(default)]
    sandbox: Option<String>,
}

pub struct Call<'a> {
    pub node_ns: &'a str,
    pub pod_ns: &'a str,
    pub container_id: &'a str,
    pub ip: Ipv4Addr,
    pub config: &'a str,
}

/// CNI ADD; returns the name of the host end of the pod's veth.
pub fn add(call: &Call) -> Result<String> {
    let out = invoke(call, "ADD")?;
    let res: CniResult = serde_json::from_str(&out).context("parse the bridge plugin's result")?;
    res.interfaces
        .into_iter()
        .find(|i| i.sandbox.as_deref().unwrap_or("").is_empty() && i.name.starts_with("veth"))
        .map(|i| i.name)
        .ok_or_else(|| anyhow!("the bridge plugin reported no host veth"))
}

/// CNI DEL (releases the address and removes the veth).
pub fn del(call: &Call) -> Result<()> {
    invoke(call, "DEL").map(|_| ())
}

fn invoke(call: &Call, command: &str) -> Result<String> {
    let netns_path = crate::netns::named(call.pod_ns);
    let args = format!("IgnoreUnknown=1;IP={}", call.ip);
    let netns_path = netns_path.to_string_lossy().into_owned();
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", call.container_id),
        ("CNI_NETNS", netns_path.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", CNI_BIN_DIR),
        ("CNI_ARGS", args.as_str()),
    ];
    // `ip netns exec NODE env CNI_…=… /usr/lib/cni/bridge`: the plugin as a runtime calls it, in the node.
    let mut full: Vec<String> = vec!["netns".into(), "exec".into(), call.node_ns.into(), tools::ENV.program.into()];
    full.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    full.push(tools::CNI_BRIDGE.program.into());
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let out = sys::output(&tools::IP, &full, Some(call.config))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    // The plugin reports its error as JSON on stdout: surface its own message.
    let msg = serde_json::from_str::<serde_json::Value>(&stdout)
        .ok()
        .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("{} {}", stdout.trim(), String::from_utf8_lossy(&out.stderr).trim()));
    Err(anyhow!("CNI {command} for {} failed: {msg}", call.container_id))
}
