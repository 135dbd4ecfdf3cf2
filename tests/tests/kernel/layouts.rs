//! Layouts the lab does not build, made by hand with `ip` the way kind, k3d or a person would: other
//! names, other subnets, interfaces made in the same order on two nodes so their indexes collide.

use cnitrace::resolve::{Endpoint, HostResolver, Resolver};
use cnitrace_tests::{can_run_kernel_tests, HandLayout};

/// Two nodes on one host, each with a bridge and one pod, built in the same order: node-a's veth and
/// node-b's have the same ifindex, and so do the pods' eth0. Each pod must be placed on its own node
/// (issue 17: resolved by ifindex pairs alone, the source pod of a cross-node pair landed on the other
/// node, and every verdict and fix after it was about the wrong node).
#[test]
fn pods_of_two_nodes_with_colliding_interface_indexes_are_placed_on_their_own_nodes() {
    if !can_run_kernel_tests("pods_of_two_nodes_with_colliding_interface_indexes_are_placed_on_their_own_nodes") {
        return;
    }
    let l = HandLayout::new("cnitrace-t17", &["kind-worker", "kind-worker2", "pod-a", "pod-b"]);
    for (node, pod, subnet) in [("kind-worker", "pod-a", "10.200.1"), ("kind-worker2", "pod-b", "10.200.2")] {
        l.ip(node, &format!(
            "link add cbr0 type bridge
             link set cbr0 up
             addr add {subnet}.1/24 dev cbr0
             link add vethcafe0001 type veth peer name eth0 netns {}
             link set vethcafe0001 master cbr0 up",
            l.ns(pod)
        ));
        l.ip(pod, &format!("addr add {subnet}.5/24 dev eth0\nlink set eth0 up\nlink set lo up"));
    }
    let index = |ns: &str, dev: &str| -> u32 {
        let out = cnitrace::sys::run(&cnitrace_tools::IP, &["-n", &l.ns(ns), "-o", "link", "show", dev]).expect("ip link show");
        out.split(':').next().and_then(|i| i.trim().parse().ok()).expect("an ifindex")
    };
    assert_eq!(index("kind-worker", "vethcafe0001"), index("kind-worker2", "vethcafe0001"), "the layout makes the host veths' indexes collide");
    assert_eq!(index("pod-a", "eth0"), index("pod-b", "eth0"), "and the pods' eth0");

    let r = HostResolver::scan().expect("scan the host's namespaces");
    for (ip, node) in [("10.200.1.5", "kind-worker"), ("10.200.2.5", "kind-worker2")] {
        let Endpoint::Local(e) = r.resolve(ip.parse().expect("ip")).expect("resolve") else { panic!("{ip} is on this host") };
        let side = e.node.unwrap_or_else(|| panic!("{ip} has a node"));
        assert_eq!(side.netns.name, l.ns(node), "{ip} sits on {node}");
        assert_eq!(side.host_veth, "vethcafe0001");
    }
}

/// A Service on a layout the lab does not build — k3s's Service range (10.43.0.0/16), a bridge named
/// `br-k8s`, pods in 172.21.3.0/24, a port that differs from its target port (443 → 6443), kube-proxy in
/// nftables mode under other chain hashes — is followed to its endpoint; emptied of endpoints, it is
/// named as such.
#[test]
fn a_service_on_a_layout_the_lab_does_not_build_is_followed_to_its_endpoint() {
    if !can_run_kernel_tests("a_service_on_a_layout_the_lab_does_not_build_is_followed_to_its_endpoint") {
        return;
    }
    let l = HandLayout::new("cnitrace-t19", &["k3s-agent", "client", "apiserver"]);
    bridged_pods(&l, "k3s-agent", "br-k8s", "172.21.3", &[("client", "172.21.3.7", "vethc1"), ("apiserver", "172.21.3.40", "vetha1")]);
    forwarding_node(&l, "k3s-agent");
    // The API server's port, listening in its pod.
    listen_in(&l, "apiserver", 6443);
    let rules = |endpoints: bool| {
        let (svc, ep) = ("service-ZX3Q0P1K-kube-system/metrics/tcp/https", "endpoint-7HD2KQ9A-kube-system/metrics/tcp/https__172.21.3.40/6443");
        let mut t = "table ip kube-proxy {\n comment \"rules for kube-proxy\"\n\
             map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n\
             map no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict; }\n\
             chain reject-chain { reject; }\n\
             chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n\
             chain service-endpoints-check { ip daddr . meta l4proto . th dport vmap @no-endpoint-services; }\n\
             chain nat-prerouting { type nat hook prerouting priority -100; policy accept; jump services; }\n\
             chain filter-forward { type filter hook forward priority -110; policy accept; ct state new jump service-endpoints-check; }\n\
             chain cluster-ips-check { ip daddr 10.43.0.0/16 drop comment \"Drop traffic to unallocated ClusterIPs\"; }\n".to_string();
        if endpoints {
            t += &format!(" chain {ep} {{ meta l4proto tcp dnat to 172.21.3.40:6443; }}\n chain {svc} {{ numgen random mod 1 vmap {{ 0 : goto {ep} }}; }}\n}}\n");
            t += &format!("add element ip kube-proxy service-ips {{ 10.43.12.34 . tcp . 443 : goto {svc} }}\n");
        } else {
            t += "}\nadd element ip kube-proxy no-endpoint-services { 10.43.12.34 . tcp . 443 comment \"kube-system/metrics:https\" : goto reject-chain }\n";
        }
        let ns = l.ns("k3s-agent");
        let _ = cnitrace::sys::run_in_stdin(&ns, &cnitrace_tools::NFT, &["-f", "-"], "table ip kube-proxy {}\ndelete table ip kube-proxy\n");
        cnitrace::sys::run_in_stdin(&ns, &cnitrace_tools::NFT, &["-f", "-"], &t).unwrap_or_else(|e| panic!("{e:#}"));
    };
    rules(true);
    let (code, v) = cnitrace_tests::follow("172.21.3.7", "10.43.12.34:443", &["--timeout", "3"]);
    assert_eq!((code, v["verdict"].as_str()), (0, Some("delivered")), "{v}");
    assert_eq!(v["service"]["name"], "kube-system/metrics:https", "{v}");
    assert_eq!(v["service"]["endpoint"], "172.21.3.40:6443", "{v}");
    assert!(v["service"]["translations"].to_string().contains("dst 10.43.12.34:443 → 172.21.3.40:6443 by endpoint-7HD2KQ9A"), "{v}");

    rules(false);
    let (code, v) = cnitrace_tests::follow("172.21.3.7", "10.43.12.34:443", &["--timeout", "2"]);
    assert_eq!((code, v["cause"].as_str()), (1, Some("service-no-endpoints")), "{v}");
    assert!(v["explanation"].as_str().is_some_and(|e| e.contains("kube-system/metrics:https (10.43.12.34:443) has no endpoints")), "{v}");
}

/// kube-proxy's rules half gone, no API (issue 35): on a layout the lab does not build (k3s's Service
/// range, a bridge `br-pods`, pods in 172.22.4.0/24, the node's own address 192.168.77.10), the Service's rules as
/// kube-proxy's iptables mode writes them, then `iptables -t nat -F KUBE-SERVICES` (kube-proxy died
/// after a partial cleanup): the ClusterIP and the NodePort are kube-proxy-rules-missing, proven by the
/// chains left behind. Then nftables mode with its service map emptied while the service chain remains.
#[test]
fn kube_proxy_rules_half_gone_are_named_from_the_chains_left_behind() {
    if !can_run_kernel_tests("kube_proxy_rules_half_gone_are_named_from_the_chains_left_behind") {
        return;
    }
    let l = HandLayout::new("cnitrace-t35k", &["k3s-server", "shop", "api"]);
    bridged_pods(&l, "k3s-server", "br-pods", "172.22.4", &[("shop", "172.22.4.7", "vethshop1"), ("api", "172.22.4.40", "vethapi1")]);
    // The node's own address, where its NodePorts are.
    l.ip("k3s-server", "addr add 192.168.77.10/24 dev br-pods");
    let node = l.ns("k3s-server");
    forwarding_node(&l, "k3s-server");
    listen_in(&l, "api", 6443);
    // What kube-proxy's iptables mode writes for one Service with a NodePort (its chain hashes, comments
    // and masquerade rule, as on a k3s node whose cluster CIDR is 172.22.0.0/16).
    let (svc, ext, sep) = ("KUBE-SVC-QZ3MBCDP4ZNWTLUE", "KUBE-EXT-QZ3MBCDP4ZNWTLUE", "KUBE-SEP-V7TJ2JNKAXHX4BFK");
    let name = "kube-system/metrics-server:https";
    let rules = format!(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:{svc} - [0:0]\n:{ext} - [0:0]\n:{sep} - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-SERVICES -d 10.43.7.7/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 443 -j {svc}\n\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A KUBE-NODEPORTS -p tcp -m comment --comment \"{name}\" -m tcp --dport 31443 -j {ext}\n\
         -A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
         -A {ext} -j {svc}\n\
         -A {svc} ! -s 172.22.0.0/16 -d 10.43.7.7/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 443 -j KUBE-MARK-MASQ\n\
         -A {svc} -m comment --comment \"{name} -> 172.22.4.40:6443\" -j {sep}\n\
         -A {sep} -s 172.22.4.40/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n\
         -A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination 172.22.4.40:6443\nCOMMIT\n"
    );
    cnitrace::sys::run_in_stdin(&node, &cnitrace_tools::IPTABLES_NFT_RESTORE, &[], &rules).unwrap_or_else(|e| panic!("{e:#}"));
    let (code, v) = cnitrace_tests::follow("172.22.4.7", "10.43.7.7:443", &["--timeout", "3"]);
    assert_eq!((code, v["verdict"].as_str()), (0, Some("delivered")), "the rules as kube-proxy wrote them work: {v}");

    // kube-proxy died after a partial cleanup: KUBE-SERVICES emptied, its chains left.
    cnitrace::sys::run_in(&node, &cnitrace_tools::IPTABLES_NFT, &["-t", "nat", "-F", "KUBE-SERVICES"]).expect("flush");
    for dst in ["10.43.7.7:443", "192.168.77.10:31443"] {
        let (code, v) = cnitrace_tests::follow("172.22.4.7", dst, &["--timeout", "3"]);
        assert_eq!((code, v["cause"].as_str()), (1, Some("kube-proxy-rules-missing")), "{dst}: {v}");
        let explanation = v["explanation"].as_str().unwrap_or("");
        assert!(explanation.contains("Service kube-system/metrics-server:https") && explanation.contains("half gone"), "{dst}: {v}");
        assert!(v["facts"].to_string().contains(&format!("still holds kube-proxy's chain {svc}")), "{dst}: {v}");
        assert!(v["facts"].to_string().contains("KUBE-SERVICES has no rule for it"), "{dst}: {v}");
    }
    // A port of the node no Service ever had is not called a NodePort.
    let (_, v) = cnitrace_tests::follow("172.22.4.7", "192.168.77.10:31444", &["--timeout", "2"]);
    assert_ne!(v["cause"], "kube-proxy-rules-missing", "{v}");

    // nftables mode: the service map emptied, the service chain left.
    cnitrace::sys::run_in(&node, &cnitrace_tools::IPTABLES_NFT, &["-t", "nat", "-F"]).expect("flush nat");
    cnitrace::sys::run_in(&node, &cnitrace_tools::IPTABLES_NFT, &["-t", "nat", "-X"]).expect("delete the chains");
    let (chain, ep) = ("service-QZ3MBCDP-kube-system/metrics-server/tcp/https", "endpoint-V7TJ2JNK-kube-system/metrics-server/tcp/https__172.22.4.40/6443");
    let table = format!(
        "table ip kube-proxy {{\n comment \"rules for kube-proxy\"\n\
         map service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}\n\
         chain mark-for-masquerade {{ meta mark set meta mark | 0x00004000; }}\n\
         chain services {{ ip daddr . meta l4proto . th dport vmap @service-ips; }}\n\
         chain nat-prerouting {{ type nat hook prerouting priority -100; policy accept; jump services; }}\n\
         chain {ep} {{ ip saddr 172.22.4.40 jump mark-for-masquerade; meta l4proto tcp dnat to 172.22.4.40:6443; }}\n\
         chain {chain} {{ ip daddr 10.43.7.7 tcp dport 443 ip saddr != 172.22.0.0/16 jump mark-for-masquerade; numgen random mod 1 vmap {{ 0 : goto {ep} }}; }}\n}}\n"
    );
    cnitrace::sys::run_in_stdin(&node, &cnitrace_tools::NFT, &["-f", "-"], &table).unwrap_or_else(|e| panic!("{e:#}"));
    let (code, v) = cnitrace_tests::follow("172.22.4.7", "10.43.7.7:443", &["--timeout", "3"]);
    assert_eq!((code, v["cause"].as_str()), (1, Some("kube-proxy-rules-missing")), "nftables mode: {v}");
    assert!(v["facts"].to_string().contains("the service-ips map of table ip kube-proxy has no element for it"), "{v}");
}

/// An nft rule of the `arp` family in a pod's own namespace (issue 35): the ARP requests for its address
/// dropped at its input. On a layout the lab does not build, it is named by table, chain, rule and handle
/// at the pod's eth0 — the same place when the trace sees only the source give up on the address
/// (NEIGH_FAILED in the source: its one request went out before the trace), the kernel's drop site then
/// said apart.
#[test]
fn an_arp_rule_in_a_pod_is_named_at_the_pod_however_the_kernel_freed_the_packet() {
    if !can_run_kernel_tests("an_arp_rule_in_a_pod_is_named_at_the_pod_however_the_kernel_freed_the_packet") {
        return;
    }
    let l = HandLayout::new("cnitrace-t35a", &["edge", "alpha", "beta"]);
    bridged_pods(&l, "edge", "lan0", "172.30.5", &[("alpha", "172.30.5.7", "vethalpha"), ("beta", "172.30.5.9", "vethbeta")]);
    let rules = "table arp t {\n chain in {\n  type filter hook input priority 0;\n  drop\n }\n}\n";
    cnitrace::sys::run_in_stdin(&l.ns("beta"), &cnitrace_tools::NFT, &["-f", "-"], rules).unwrap_or_else(|e| panic!("{e:#}"));
    let (code, v) = cnitrace_tests::follow("172.30.5.7", "172.30.5.9", &["--timeout", "3"]);
    assert_eq!((code, v["cause"].as_str()), (1, Some("netfilter-rule-drop")), "{v}");
    assert_eq!((v["netns"].as_str(), v["ifname"].as_str()), (Some(l.ns("beta").as_str()), Some("eth0")), "{v}");
    assert!(v["explanation"].as_str().is_some_and(|e| e.contains("nft table arp t chain in: `drop` (handle")), "{v}");
    assert_eq!(v["dropped_at"]["netns"], l.ns("beta"), "the request freed at beta's arp input: {v}");

    // One request, three seconds before alpha gives up; it goes out before the trace starts, so the
    // trace sees only alpha's give-up (its echoes freed in neigh_invalidate).
    let alpha = l.ns("alpha");
    cnitrace::netns::in_netns(&cnitrace::netns::named(&alpha), || {
        cnitrace::sys::write_sysctl("net.ipv4.neigh.eth0.mcast_solicit", "1")?;
        cnitrace::sys::write_sysctl("net.ipv4.neigh.eth0.retrans_time_ms", "3000")
    })
    .expect("alpha's neighbour settings");
    cnitrace_tests::await_no_pending_arp_in(&alpha);
    let _ = cnitrace_tools::PING.in_netns(&alpha).args(["-c", "1", "-W", "1", "172.30.5.9"]).stdout(std::process::Stdio::null()).status();
    let (code, v) = cnitrace_tests::follow("172.30.5.7", "172.30.5.9", &["--until-drop", "--timeout", "8"]);
    assert_eq!((code, v["cause"].as_str()), (1, Some("netfilter-rule-drop")), "{v}");
    assert_eq!((v["netns"].as_str(), v["ifname"].as_str()), (Some(l.ns("beta").as_str()), Some("eth0")), "the same place: {v}");
    assert_eq!(v["dropped_at"]["netns"], alpha, "the kernel freed it in alpha: {v}");
    assert!(v["facts"].to_string().contains("drops the ARP requests arriving on eth0"), "{v}");
}

/// A node `node` with a bridge `bridge` at `SUBNET.1/24` and a pod per `(pod, address, host veth)` on
/// it, each routing through the bridge's address.
fn bridged_pods(l: &HandLayout, node: &str, bridge: &str, subnet: &str, pods: &[(&str, &str, &str)]) {
    l.ip(node, &format!("link add {bridge} type bridge\nlink set {bridge} up\naddr add {subnet}.1/24 dev {bridge}\nlink set lo up"));
    for (pod, addr, veth) in pods {
        l.ip(node, &format!("link add {veth} type veth peer name eth0 netns {}\nlink set {veth} master {bridge} up", l.ns(pod)));
        l.ip(pod, &format!("addr add {addr}/24 dev eth0\nlink set eth0 up\nlink set lo up\nroute add default via {subnet}.1"));
    }
}

/// The node forwards, and bridged traffic passes its iptables (as on every Kubernetes node).
fn forwarding_node(l: &HandLayout, node: &str) {
    cnitrace::lab::ensure_br_netfilter().expect("br_netfilter");
    cnitrace::netns::in_netns(&cnitrace::netns::named(&l.ns(node)), || {
        cnitrace::sys::write_sysctl("net.ipv4.ip_forward", "1")?;
        cnitrace::sys::write_sysctl("net.bridge.bridge-nf-call-iptables", "1")
    })
    .expect("the node's sysctls");
}

/// A TCP port listening in `pod` (the socket belongs to the namespace it was made in), accepting and
/// closing every connection.
fn listen_in(l: &HandLayout, pod: &str, port: u16) {
    let listener = cnitrace::netns::in_netns(&cnitrace::netns::named(&l.ns(pod)), move || Ok(std::net::TcpListener::bind(("0.0.0.0", port))?)).expect("listen");
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            drop(s);
        }
    });
}
