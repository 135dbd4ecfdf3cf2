//! What the lab applies to its real cluster, as the installers write it: flannel's kube-flannel.yml
//! (namespace, RBAC, the `kube-flannel-cfg` ConfigMap, the `kube-flannel-ds` DaemonSet), kubeadm's
//! kube-proxy (its ConfigMap and DaemonSet, bound to `system:node-proxier`), kubeadm's CoreDNS (its RBAC,
//! Corefile, Deployment and the `kube-dns` Service), cnitrace's own user, and the incident's workload:
//! the debug pod, jellyfin and web, with their Services.
//!
//! Deliberate differences from the upstream files, all because the lab's kubelet has no container
//! runtime (ARCHITECTURE.md, "the real cluster"): flanneld is given its defaults as flags
//! (`--net-config-path`, `--subnet-file`) and flannel's CNI config its default paths (`subnetFile`,
//! `dataDir`, host-local's `dataDir`), so that the kubelet can point them into the node's folder. The
//! kubelet itself gives CoreDNS what it would find at fixed paths in its container (`kubelet::lab_corefile`:
//! its service account's kubeconfig, the pod's resolv.conf); the Corefile in the API is kubeadm's.

use serde_json::{json, Value};

use super::Layout;

pub const FLANNEL_NS: &str = "kube-flannel";
pub const FLANNEL_CM: &str = "kube-flannel-cfg";
pub const FLANNEL_DS: &str = "kube-flannel-ds";
pub const FLANNEL_IMAGE: &str = "ghcr.io/flannel-io/flannel:v0.28.11";
pub const KUBE_PROXY_IMAGE: &str = "registry.k8s.io/kube-proxy:v1.34.4";
pub const COREDNS_IMAGE: &str = "registry.k8s.io/coredns/coredns:v1.12.1";
/// The cluster's DNS domain (kubelet's `--cluster-domain`, CoreDNS's `kubernetes` zone).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// flannel's backend, as net-conf.json names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum Backend {
    Vxlan,
    HostGw,
}

impl Backend {
    pub fn net_conf_type(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
        }
    }
}

/// flannel's net-conf.json.
pub fn net_conf(layout: &Layout) -> String {
    let backend = match layout.backend {
        Backend::Vxlan => json!({"Type": "vxlan", "VNI": 1, "Port": 8472}),
        Backend::HostGw => json!({"Type": "host-gw"}),
    };
    serde_json::to_string_pretty(&json!({"Network": layout.cluster_cidr, "EnableNFTables": false, "Backend": backend})).expect("json")
}

/// flannel's cni-conf.json (a conflist: flannel, then portmap), its default paths made explicit.
pub fn cni_conf() -> String {
    serde_json::to_string_pretty(&json!({
        "name": "cbr0",
        "cniVersion": "0.3.1",
        "plugins": [
            {
                "type": "flannel",
                "subnetFile": "/run/flannel/subnet.env",
                "dataDir": "/var/lib/cni/flannel",
                "ipam": {"dataDir": "/var/lib/cni/networks"},
                "delegate": {"hairpinMode": true, "isDefaultGateway": true}
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    }))
    .expect("json")
}

pub fn flannel(layout: &Layout) -> Vec<Value> {
    let labels = json!({"tier": "node", "app": "flannel", "k8s-app": "flannel"});
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": FLANNEL_NS, "labels": {"k8s-app": "flannel", "pod-security.kubernetes.io/enforce": "privileged"}}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "flannel", "namespace": FLANNEL_NS, "labels": {"k8s-app": "flannel"}}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "flannel", "labels": {"k8s-app": "flannel"}},
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]}
            ]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "flannel", "labels": {"k8s-app": "flannel"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "flannel"},
            "subjects": [{"kind": "ServiceAccount", "name": "flannel", "namespace": FLANNEL_NS}]}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": FLANNEL_CM, "namespace": FLANNEL_NS, "labels": labels},
            "data": {"cni-conf.json": cni_conf(), "net-conf.json": net_conf(layout)}}),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": FLANNEL_DS, "namespace": FLANNEL_NS, "labels": labels},
            "spec": {
                "selector": {"matchLabels": {"app": "flannel", "k8s-app": "flannel"}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "hostNetwork": true,
                        "priorityClassName": "system-node-critical",
                        "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
                        "serviceAccountName": "flannel",
                        "initContainers": [
                            {"name": "install-cni-plugin", "image": FLANNEL_IMAGE, "command": ["cp"], "args": ["-f", "/flannel", "/opt/cni/bin/flannel"],
                             "volumeMounts": [{"name": "cni-plugin", "mountPath": "/opt/cni/bin"}]},
                            {"name": "install-cni", "image": FLANNEL_IMAGE, "command": ["cp"], "args": ["-f", "/etc/kube-flannel/cni-conf.json", "/etc/cni/net.d/10-flannel.conflist"],
                             "volumeMounts": [{"name": "cni", "mountPath": "/etc/cni/net.d"}, {"name": "flannel-cfg", "mountPath": "/etc/kube-flannel/"}]}
                        ],
                        "containers": [{
                            "name": "kube-flannel", "image": FLANNEL_IMAGE,
                            "command": ["/opt/bin/flanneld"],
                            "args": ["--ip-masq", "--kube-subnet-mgr", "--net-config-path=/etc/kube-flannel/net-conf.json", "--subnet-file=/run/flannel/subnet.env"],
                            "resources": {"requests": {"cpu": "100m", "memory": "50Mi"}},
                            "securityContext": {"privileged": false, "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}},
                            "env": [
                                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                {"name": "EVENT_QUEUE_DEPTH", "value": "5000"}
                            ],
                            "volumeMounts": [{"name": "run", "mountPath": "/run/flannel"}, {"name": "flannel-cfg", "mountPath": "/etc/kube-flannel/"},
                                             {"name": "xtables-lock", "mountPath": "/run/xtables.lock"}]
                        }],
                        "volumes": [
                            {"name": "run", "hostPath": {"path": "/run/flannel"}},
                            {"name": "cni-plugin", "hostPath": {"path": "/opt/cni/bin"}},
                            {"name": "cni", "hostPath": {"path": "/etc/cni/net.d"}},
                            {"name": "flannel-cfg", "configMap": {"name": FLANNEL_CM}},
                            {"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}}
                        ]
                    }
                }
            }}),
    ]
}

/// kube-proxy as kubeadm installs it.
pub fn kube_proxy(layout: &Layout) -> Vec<Value> {
    let config = format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
         kind: KubeProxyConfiguration\n\
         bindAddress: 0.0.0.0\n\
         clientConnection:\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n\
         clusterCIDR: {}\n\
         mode: {}\n\
         conntrack:\n  maxPerCore: 0\n  min: 0\n\
         metricsBindAddress: 127.0.0.1:10249\n",
        layout.cluster_cidr, layout.proxy_mode
    );
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt\n    server: {}\n  name: default\n\
         contexts:\n- context:\n    cluster: default\n    namespace: default\n    user: default\n  name: default\ncurrent-context: default\n\
         users:\n- name: default\n  user:\n    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token\n",
        layout.api_server
    );
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kube-proxy", "namespace": "kube-system"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "kubeadm:node-proxier"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node-proxier"},
            "subjects": [{"kind": "ServiceAccount", "name": "kube-proxy", "namespace": "kube-system"}]}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-proxy", "namespace": "kube-system", "labels": {"app": "kube-proxy"}},
            "data": {"config.conf": config, "kubeconfig.conf": kubeconfig}}),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "kube-proxy", "namespace": "kube-system", "labels": {"k8s-app": "kube-proxy"}},
            "spec": {
                "selector": {"matchLabels": {"k8s-app": "kube-proxy"}},
                "template": {
                    "metadata": {"labels": {"k8s-app": "kube-proxy"}},
                    "spec": {
                        "hostNetwork": true,
                        "priorityClassName": "system-node-critical",
                        "serviceAccountName": "kube-proxy",
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{
                            "name": "kube-proxy", "image": KUBE_PROXY_IMAGE,
                            "command": ["/usr/local/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf", "--hostname-override=$(NODE_NAME)"],
                            "securityContext": {"privileged": true},
                            "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                            "volumeMounts": [{"name": "kube-proxy", "mountPath": "/var/lib/kube-proxy"},
                                             {"name": "xtables-lock", "mountPath": "/run/xtables.lock"},
                                             {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": true}]
                        }],
                        "volumes": [
                            {"name": "kube-proxy", "configMap": {"name": "kube-proxy"}},
                            {"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}},
                            {"name": "lib-modules", "hostPath": {"path": "/lib/modules"}}
                        ]
                    }
                }
            }}),
    ]
}

/// CoreDNS as kubeadm installs it: its RBAC, the `coredns` ConfigMap with kubeadm's Corefile, the
/// Deployment (two replicas, `dnsPolicy: Default`) and the `kube-dns` Service at the tenth address of
/// the Service range.
pub fn coredns(layout: &Layout) -> anyhow::Result<Vec<Value>> {
    let corefile = format!(
        ".:53 {{\n    errors\n    health {{\n       lameduck 5s\n    }}\n    ready\n    \
         kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n       pods insecure\n       fallthrough in-addr.arpa ip6.arpa\n       ttl 30\n    }}\n    \
         prometheus :9153\n    forward . /etc/resolv.conf {{\n       max_concurrent 1000\n    }}\n    cache 30 {{\n       disable success {CLUSTER_DOMAIN}\n       disable denial {CLUSTER_DOMAIN}\n    }}\n    \
         loop\n    reload\n    loadbalance\n}}\n"
    );
    let dns = layout.dns_service_ip()?.to_string();
    let label = json!({"k8s-app": "kube-dns"});
    Ok(vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
            "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                      {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"}, "data": {"Corefile": corefile}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "coredns", "namespace": "kube-system", "labels": label},
            "spec": {
                "replicas": 2,
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                "selector": {"matchLabels": label},
                "template": {
                    "metadata": {"labels": label},
                    "spec": {
                        "priorityClassName": "system-cluster-critical",
                        "serviceAccountName": "coredns",
                        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
                            "labelSelector": {"matchExpressions": [{"key": "k8s-app", "operator": "In", "values": ["kube-dns"]}]},
                            "topologyKey": "kubernetes.io/hostname"}}]}},
                        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}, {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}],
                        "nodeSelector": {"kubernetes.io/os": "linux"},
                        "containers": [{
                            "name": "coredns", "image": COREDNS_IMAGE,
                            "resources": {"limits": {"memory": "170Mi"}, "requests": {"cpu": "100m", "memory": "70Mi"}},
                            "args": ["-conf", "/etc/coredns/Corefile"],
                            "volumeMounts": [{"name": "config-volume", "mountPath": "/etc/coredns", "readOnly": true}],
                            "ports": [{"containerPort": 53, "name": "dns", "protocol": "UDP"}, {"containerPort": 53, "name": "dns-tcp", "protocol": "TCP"},
                                      {"containerPort": 9153, "name": "metrics", "protocol": "TCP"}],
                            "livenessProbe": {"httpGet": {"path": "/health", "port": 8080, "scheme": "HTTP"}, "initialDelaySeconds": 60, "timeoutSeconds": 5},
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181, "scheme": "HTTP"}}
                        }],
                        "dnsPolicy": "Default",
                        "volumes": [{"name": "config-volume", "configMap": {"name": "coredns", "items": [{"key": "Corefile", "path": "Corefile"}]}}]
                    }
                }
            }}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system",
                "labels": {"k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true", "kubernetes.io/name": "CoreDNS"},
                "annotations": {"prometheus.io/port": "9153", "prometheus.io/scrape": "true"}},
            "spec": {"clusterIP": dns, "selector": label,
                     "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                               {"name": "metrics", "port": 9153, "protocol": "TCP"}]}}),
    ])
}

/// cnitrace's own user: what a node operator runs it as (cluster-admin, as kubeadm's admin).
pub fn cnitrace_user() -> Vec<Value> {
    vec![json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "cnitrace-lab-user"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "cnitrace"}]})]
}

/// A workload pod bound to `node` (namespace `default`), serving HTTP on `port` if any.
pub fn pod(name: &str, node: &str, port: Option<u16>) -> Value {
    let mut c = json!({"name": name, "image": "docker.io/library/busybox:1.36", "command": ["sleep", "infinity"]});
    if let Some(p) = port {
        c = json!({"name": name, "image": "docker.io/jellyfin/jellyfin:10.10.3", "ports": [{"name": "http", "containerPort": p, "protocol": "TCP"}],
                   "readinessProbe": {"tcpSocket": {"port": p}, "periodSeconds": 5}});
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
           "spec": {"nodeName": node, "containers": [c], "terminationGracePeriodSeconds": 1}})
}

/// A NodePort Service of namespace `default` selecting `app=<selects>`.
pub fn service(name: &str, selects: &str, port: u16, node_port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"type": "NodePort", "selector": {"app": selects},
                    "ports": [{"name": "http", "port": port, "targetPort": port, "nodePort": node_port, "protocol": "TCP"}]}})
}
