//! `cnitrace deploy`: the manifests that run an agent on every node of a cluster, for this version.
//!
//! - Namespace `cnitrace`; ServiceAccount `cnitrace-agent`; a ClusterRole that only reads what the agent
//!   looks at (nodes, pods and their logs, Services and EndpointSlices, flannel's ConfigMap) and its
//!   binding. The agent changes nothing through the API.
//! - DaemonSet `cnitrace-agent`: on every node (tolerates every taint), hostPID (the host's network
//!   namespace is init's, the pods' are their processes'), its own network namespace — it listens on
//!   127.0.0.1 there, which nothing of the pod network reaches: a user reaches it through the API
//!   server's port-forward to the agent's pod, so who may trace a node is who may port-forward to its
//!   agent. Capabilities instead of privileged: BPF and PERFMON (load and attach the probes), NET_ADMIN
//!   (netlink, rules), SYS_ADMIN (setns into the pods' namespaces), SYS_PTRACE (open other processes'
//!   namespaces), SYS_RESOURCE (the locked-memory limit kernels before 5.11 charge maps to). Host
//!   mounts: BTF, bpffs, tracefs, /run/netns, /var/lib/cni, the xtables lock, and the node's fix journal
//!   (`/var/lib/cnitrace/agent`, a host folder: a fix applied by one agent pod is rolled back by the next
//!   one on that node if it was never verified, across a restart, an update or a node reboot).
//! - Role `cnitrace-tracer` (get/list the agents' pods, create pods/portforward) bound to the group
//!   `cnitrace:tracers`: the users who may trace.
//!
//! Printed as YAML documents, each written in JSON (JSON is YAML): `cnitrace deploy | kubectl apply -f -`,
//! and `kubectl delete -f -` of the same removes everything. Or through the API directly:
//! `cnitrace deploy --apply` (server-side apply) and `cnitrace undeploy` (which deletes only objects
//! labelled as cnitrace's).

use serde_json::{json, Value};

/// Where the agent listens inside its pod (loopback of its own network namespace).
pub const AGENT_PORT: u16 = 7390;
pub const AGENT_NAME: &str = "cnitrace-agent";
pub const TRACERS_GROUP: &str = "cnitrace:tracers";
/// The node's fix journal: a host folder, so it outlives the agent's pod.
pub const AGENT_STATE_DIR: &str = "/var/lib/cnitrace/agent";

pub struct Options {
    pub namespace: String,
    pub image: String,
}

impl Default for Options {
    fn default() -> Self {
        Options { namespace: "cnitrace".into(), image: default_image() }
    }
}

/// The image of this version.
pub fn default_image() -> String {
    format!("ghcr.io/cnitrace/cnitrace:v{}", env!("CARGO_PKG_VERSION"))
}

/// Every object, in the order `kubectl apply` needs them (the namespace first).
pub fn manifests(o: &Options) -> Vec<Value> {
    let ns = o.namespace.as_str();
    let labels = json!({"app.kubernetes.io/name": "cnitrace", "app.kubernetes.io/component": "agent", "app.kubernetes.io/version": env!("CARGO_PKG_VERSION")});
    let meta = |name: &str| json!({"name": name, "namespace": ns, "labels": labels});
    let host = |name: &str, path: &str, kind: &str| json!({"name": name, "hostPath": {"path": path, "type": kind}});
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(AGENT_NAME)}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": AGENT_NAME, "labels": labels},
            "rules": [
                {"apiGroups": [""], "resources": ["nodes", "pods", "services"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": AGENT_NAME, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": AGENT_NAME},
            "subjects": [{"kind": "ServiceAccount", "name": AGENT_NAME, "namespace": ns}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta("cnitrace-tracer"),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
                {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": meta("cnitrace-tracer"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cnitrace-tracer"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": TRACERS_GROUP}],
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": meta(AGENT_NAME),
            "spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/name": "cnitrace", "app.kubernetes.io/component": "agent"}},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": AGENT_NAME,
                        "hostPID": true,
                        "priorityClassName": "system-node-critical",
                        "tolerations": [{"operator": "Exists"}],
                        "nodeSelector": {"kubernetes.io/os": "linux"},
                        "containers": [{
                            "name": "agent",
                            "image": o.image,
                            "args": ["agent", "--node", "$(NODE_NAME)", "--listen", format!("tcp:127.0.0.1:{AGENT_PORT}"), "--state-dir", AGENT_STATE_DIR],
                            "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                            // Ready once it serves (its journal recovered): what `--agents` waits for.
                            // An exec probe: the agent listens on its pod's loopback only, which the
                            // kubelet's own TCP and HTTP probes do not reach.
                            "readinessProbe": {
                                "exec": {"command": ["/usr/local/bin/cnitrace", "agent", "--ready", "--listen", format!("tcp:127.0.0.1:{AGENT_PORT}")]},
                                "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3,
                            },
                            "securityContext": {
                                "privileged": false,
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "runAsUser": 0,
                                "capabilities": {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"]},
                                "seccompProfile": {"type": "Unconfined"},
                                "appArmorProfile": {"type": "Unconfined"},
                            },
                            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}},
                            "volumeMounts": [
                                {"name": "btf", "mountPath": "/sys/kernel/btf", "readOnly": true},
                                {"name": "bpffs", "mountPath": "/sys/fs/bpf"},
                                {"name": "tracefs", "mountPath": "/sys/kernel/tracing"},
                                {"name": "netns", "mountPath": "/run/netns", "readOnly": true, "mountPropagation": "HostToContainer"},
                                {"name": "cni", "mountPath": "/var/lib/cni", "readOnly": true},
                                {"name": "xtables-lock", "mountPath": "/run/xtables.lock"},
                                {"name": "state", "mountPath": "/run/cnitrace"},
                                {"name": "journal", "mountPath": AGENT_STATE_DIR},
                            ],
                        }],
                        "volumes": [
                            host("btf", "/sys/kernel/btf", "Directory"),
                            host("bpffs", "/sys/fs/bpf", "Directory"),
                            host("tracefs", "/sys/kernel/tracing", "Directory"),
                            host("netns", "/run/netns", "DirectoryOrCreate"),
                            host("cni", "/var/lib/cni", "DirectoryOrCreate"),
                            host("xtables-lock", "/run/xtables.lock", "FileOrCreate"),
                            {"name": "state", "emptyDir": {}},
                            host("journal", AGENT_STATE_DIR, "DirectoryOrCreate"),
                        ],
                    },
                },
            },
        }),
    ]
}

/// The manifests as YAML documents (each in JSON, which is YAML).
pub fn render(o: &Options) -> String {
    let mut out = format!("# cnitrace {} — agents on every node. Apply: cnitrace deploy | kubectl apply -f -\n", env!("CARGO_PKG_VERSION"));
    for m in manifests(o) {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string_pretty(&m).expect("JSON"));
        out.push('\n');
    }
    out
}

/// The label every object of the manifests carries: what `undeploy` checks before it deletes one.
pub const OWNER_LABEL: (&str, &str) = ("app.kubernetes.io/name", "cnitrace");

/// `cnitrace deploy --apply`: every object applied through the API (server-side apply), in order; one
/// line each. A namespace that is there already and is not cnitrace's (`--namespace kube-system`) is
/// used as it is: neither labelled nor, later, deleted.
pub fn apply(cluster: &mut crate::k8s::Cluster, o: &Options, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    use crate::k8s::manifests::{labelled, title, Applied};
    writeln!(out, "cnitrace {} → {} ({})", env!("CARGO_PKG_VERSION"), cluster.server, cluster.source)?;
    for m in manifests(o) {
        if m["kind"] == "Namespace" {
            if let Some(ns) = cluster.get_object(&m)? {
                if !labelled(&ns, OWNER_LABEL) {
                    writeln!(out, "  {:<52} exists, not cnitrace's: used as it is", title(&m))?;
                    continue;
                }
            }
        }
        let did = cluster.apply_object(&m).map_err(|e| e.context(format!("deploy stopped at {}", title(&m))))?;
        let said = match did {
            Applied::Created => "created",
            Applied::Configured => "configured",
            Applied::Unchanged => "unchanged",
        };
        writeln!(out, "  {:<52} {said}", title(&m))?;
    }
    let selector = format!("{}={}", OWNER_LABEL.0, OWNER_LABEL.1);
    writeln!(out, "The agents start on every node: kubectl get pods -n {} -l {selector} -o wide", o.namespace)?;
    Ok(())
}

/// `cnitrace undeploy`: every object of the manifests deleted, in the reverse order (the DaemonSet
/// before its RBAC, the namespace last), each only if it carries [`OWNER_LABEL`]. With `dry_run`,
/// what would be deleted, and nothing is.
pub fn remove(cluster: &mut crate::k8s::Cluster, o: &Options, dry_run: bool, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    use crate::k8s::manifests::{labelled, title, Removed};
    writeln!(out, "cnitrace {} → {} ({}){}", env!("CARGO_PKG_VERSION"), cluster.server, cluster.source, if dry_run { " (dry run: nothing is deleted)" } else { "" })?;
    for m in manifests(o).iter().rev() {
        let said = if dry_run {
            match cluster.get_object(m)? {
                None => "not there".to_string(),
                Some(now) if labelled(&now, OWNER_LABEL) => "would be deleted".to_string(),
                Some(_) => format!("kept: not labelled {}={}", OWNER_LABEL.0, OWNER_LABEL.1),
            }
        } else {
            match cluster.delete_object(m, OWNER_LABEL).map_err(|e| e.context(format!("undeploy stopped at {}", title(m))))? {
                Removed::Deleted if m["kind"] == "DaemonSet" => "deleted (each agent ends as its pod stops, rolling back a fix it was still verifying)".to_string(),
                Removed::Deleted if m["kind"] == "Namespace" => "deleted (the API removes what is left in it)".to_string(),
                Removed::Deleted => "deleted".to_string(),
                Removed::Absent => "not there".to_string(),
                Removed::NotOurs { label } => format!("kept: not labelled {label}"),
            }
        };
        writeln!(out, "  {:<52} {said}", title(m))?;
    }
    writeln!(out, "Each node keeps its fix journal in {AGENT_STATE_DIR} (a host folder: `cnitrace fix --history --journal-dir {AGENT_STATE_DIR}` on the node reads it): remove it there if it is not wanted.")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemonset(o: &Options) -> Value {
        manifests(o).into_iter().find(|m| m["kind"] == "DaemonSet").expect("a DaemonSet")
    }

    #[test]
    fn the_agent_runs_on_every_node_with_capabilities_not_privileged_and_listens_on_loopback_only() {
        let ds = daemonset(&Options::default());
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]), "every node, whatever its taints");
        assert_eq!(pod["hostPID"], true);
        assert!(pod.get("hostNetwork").is_none(), "its own network namespace: its loopback is its own");
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["privileged"], false);
        let caps: Vec<&str> = c["securityContext"]["capabilities"]["add"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        for need in ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"] {
            assert!(caps.contains(&need), "{need}");
        }
        let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let listen = args[args.iter().position(|a| *a == "--listen").unwrap() + 1];
        assert!(crate::agent::parse_addr(listen).is_ok(), "the agent takes its own listen address: {listen}");
        assert!(listen.starts_with("tcp:127.0.0.1:"));
        // Its readiness probe asks that very address, with the binary the image installs.
        let probe: Vec<&str> = c["readinessProbe"]["exec"]["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(probe, ["/usr/local/bin/cnitrace", "agent", "--ready", "--listen", listen]);
        assert!(include_str!("../../deploy/Containerfile").contains(" /usr/local/bin/cnitrace\n"), "the image has the binary where the probe runs it");
        assert_eq!(c["image"], format!("ghcr.io/cnitrace/cnitrace:v{}", env!("CARGO_PKG_VERSION")));
        let mounts: Vec<&str> = c["volumeMounts"].as_array().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
        for need in ["/sys/kernel/btf", "/sys/fs/bpf", "/run/netns", "/var/lib/cni", "/run/xtables.lock"] {
            assert!(mounts.contains(&need), "{need}");
        }
        // The fix journal the agent is told to use is the host's folder, not the pod's (gone with it).
        let state = args[args.iter().position(|a| *a == "--state-dir").unwrap() + 1];
        let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == state).expect("the journal is mounted");
        let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).expect("its volume");
        assert_eq!(volume["hostPath"]["path"], state, "{volume}");
        assert!(mount.get("readOnly").is_none(), "written");
    }

    #[test]
    fn the_agent_reads_and_the_tracers_may_port_forward_and_nothing_more() {
        let all = manifests(&Options { namespace: "tools".into(), image: "registry.local/cnitrace:dev".into() });
        let role = all.iter().find(|m| m["kind"] == "ClusterRole").unwrap();
        for rule in role["rules"].as_array().unwrap() {
            for verb in rule["verbs"].as_array().unwrap() {
                assert!(["get", "list", "watch"].contains(&verb.as_str().unwrap()), "the agent only reads: {rule}");
            }
        }
        let tracer = all.iter().find(|m| m["kind"] == "Role").unwrap();
        assert_eq!(tracer["metadata"]["namespace"], "tools");
        assert!(tracer["rules"].as_array().unwrap().iter().any(|r| r["resources"] == json!(["pods/portforward"]) && r["verbs"] == json!(["create"])));
        assert!(all.iter().filter(|m| m["kind"] != "Namespace" && m["kind"] != "ClusterRole" && m["kind"] != "ClusterRoleBinding").all(|m| m["metadata"]["namespace"] == "tools"));
        assert_eq!(all[0]["kind"], "Namespace", "the namespace first");
        assert_eq!(daemonset(&Options { namespace: "tools".into(), image: "registry.local/cnitrace:dev".into() })["spec"]["template"]["spec"]["containers"][0]["image"], "registry.local/cnitrace:dev");
    }
}
