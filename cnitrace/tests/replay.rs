//! Diagnosis on recorded traces and state snapshots of every lab fault (no root, no kernel): each
//! fixture was written by `cnitrace follow --record` on the lab with that one fault on.

use std::path::PathBuf;

use cnitrace::{
    finding::{causes, Outcome},
    follow::Recording,
    lab::faults,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load(name: &str) -> Recording {
    let path = fixtures().join(format!("{name}.json"));
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("read fixture {}: {e}", path.display()));
    serde_json::from_slice(&data).unwrap_or_else(|e| panic!("parse fixture {}: {e}", path.display()))
}

#[test]
fn every_lab_fault_is_diagnosed_as_its_cause() {
    let mut wrong = Vec::new();
    for f in faults::FAULTS.iter().chain(faults::SERVICE_FAULTS) {
        let v = load(f.name).replay();
        if v.verdict != Outcome::Dropped || v.cause.as_deref() != Some(f.cause) {
            wrong.push(format!("{}: got {:?} {:?}, expected dropped {}", f.name, v.verdict, v.cause, f.cause));
        }
        assert!(v.netns.is_some() && v.ifname.is_some(), "{}: the verdict names the hop where it died", f.name);
        assert!(!v.facts.is_empty(), "{}: the verdict gives its facts", f.name);
    }
    assert!(wrong.is_empty(), "misdiagnosed:\n{}", wrong.join("\n"));
}

#[test]
fn every_verdict_with_a_cause_points_to_its_guide() {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/causes.md")).expect("docs/causes.md");
    for f in faults::FAULTS.iter().chain(faults::SERVICE_FAULTS) {
        let v = load(f.name).replay();
        assert_eq!(v.doc.as_deref(), Some(format!("docs/causes.md#{}", f.cause).as_str()), "{}", f.name);
        assert!(guide.contains(&format!("## `{}`", f.cause)), "docs/causes.md has no section for {} (run `cargo xtask docs`)", f.cause);
    }
    assert_eq!(load("healthy-same-node").replay().doc, None, "no cause, no guide");
}

#[test]
fn every_catalog_cause_has_a_lab_fault() {
    for id in causes::ids() {
        assert!(faults::FAULTS.iter().chain(faults::SERVICE_FAULTS).any(|f| f.cause == id), "cause {id} has no lab fault reproducing it");
    }
}

#[test]
fn healthy_pairs_are_delivered() {
    for name in ["healthy-same-node", "healthy-cross-node", "healthy-external", "healthy-service-cross-node", "healthy-nodeport"] {
        let v = load(name).replay();
        assert_eq!(v.verdict, Outcome::Delivered, "{name}: {v:?}");
        assert_eq!(v.cause, None, "{name}");
    }
}

#[test]
fn the_seed_incident_shows_the_arp_failure() {
    // Recorded by default: follow decided once the ARP request went unanswered; the hop is the port
    // the request never reached, and no drop is claimed before the kernel made one.
    let v = load(faults::SEED_FAULT).replay();
    assert_eq!(v.cause.as_deref(), Some("veth-detached"));
    assert_eq!(v.function, None, "{v:?}");
    assert_eq!(v.netns.as_deref(), Some("storagenodet3500"));
    assert!(v.ifname.as_deref().is_some_and(|i| i.starts_with("veth")), "{v:?}");
    assert!(v.facts.iter().any(|f| f.contains("has no master")), "{:?}", v.facts);
    assert!(v.facts.iter().any(|f| f.contains("reached cni0 but was never sent to")), "{:?}", v.facts);
    assert!(
        v.facts.iter().any(|f| f.contains("went unanswered") && f.contains("after 3 unanswered requests 1000 ms apart")),
        "what the kernel would do, from the pod's own settings: {:?}",
        v.facts
    );
    // Recorded with --until-drop: the source pod's own give-up, as the seed saw it.
    let v = load(&format!("until-drop/{}", faults::SEED_FAULT)).replay();
    assert_eq!(v.cause.as_deref(), Some("veth-detached"));
    assert_eq!(v.reason.as_deref(), Some("NEIGH_FAILED"), "the source gave up on ARP: {v:?}");
    assert_eq!(v.function.as_deref(), Some("neigh_invalidate"));
    // The fault's place is the same as the early verdict's (issue 35: `where` moved with the way the
    // kernel freed the packet); the kernel's drop site, the source pod, is said on its own.
    assert_eq!(v.netns.as_deref(), Some("storagenodet3500"));
    assert!(v.ifname.as_deref().is_some_and(|i| i.starts_with("veth")), "{v:?}");
    let site = v.dropped_at.as_ref().expect("the kernel's drop site");
    assert_eq!((site.netns.as_str(), site.ifname.as_str(), site.function.as_str()), ("debug", "eth0", "neigh_invalidate"), "{v:?}");
}

/// One fault, one `where`: for every ARP fault the early verdict (the request unanswered) and the one
/// waited out to the kernel's drop name the same place; the drop site is the waited one's `dropped_at`.
#[test]
fn one_fault_has_one_where_however_the_kernel_freed_the_packet() {
    let dir = fixtures().join("until-drop");
    for entry in std::fs::read_dir(&dir).expect("until-drop fixtures") {
        let name = entry.expect("entry").path().file_stem().expect("stem").to_string_lossy().to_string();
        let (early, waited) = (load(&name).replay(), load(&format!("until-drop/{name}")).replay());
        // Each recording is of a lab of its own: a host veth's name is drawn anew (its role is compared).
        let role = |i: &Option<String>| i.as_deref().map(|i| if i.starts_with("veth") { "veth…" } else { i }).map(str::to_string);
        assert_eq!((&early.netns, role(&early.ifname)), (&waited.netns, role(&waited.ifname)), "{name}: early {early:?}\nwaited {waited:?}");
        assert!(waited.dropped_at.is_some(), "{name}: the kernel's drop is said: {waited:?}");
    }
}

/// The ARP faults recorded with `--until-drop` (the kernel's NEIGH_FAILED after ~3 s): the same cause as
/// the early verdict, from a trace that also holds the kernel's give-up.
#[test]
fn arp_faults_waited_out_to_the_kernels_drop_give_the_same_cause() {
    let dir = fixtures().join("until-drop");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("until-drop fixtures") {
        let name = entry.expect("entry").path().file_stem().expect("stem").to_string_lossy().to_string();
        let f = faults::find(&name).unwrap_or_else(|| panic!("{name}: no such lab fault"));
        let v = load(&format!("until-drop/{name}")).replay();
        assert_eq!((v.verdict, v.cause.as_deref()), (Outcome::Dropped, Some(f.cause)), "{name}: {v:?}");
        assert!(v.function.is_some(), "{name}: the kernel's own drop: {v:?}");
        n += 1;
    }
    assert_eq!(n, 8, "one per ARP fault");
}

#[test]
fn a_netfilter_drop_without_moved_counters_gets_no_guessed_cause() {
    let mut rec = load("iptables-drop");
    // The same drop, but the rule sets show nothing that counted it.
    for st in rec.states.by_inode.values_mut() {
        st.rules = Default::default();
    }
    rec.states.rules_before.clear();
    let v = rec.replay();
    assert_eq!(v.verdict, Outcome::Dropped);
    assert_eq!(v.cause, None, "no rule or policy is proven to have dropped it: {v:?}");
    assert_eq!(v.reason.as_deref(), Some("NETFILTER_DROP"));
    assert_eq!(v.layer.as_deref(), Some("netfilter"));
}

#[test]
fn a_rule_drop_names_backend_table_chain_and_rule() {
    let v = load("iptables-drop").replay();
    assert!(
        v.explanation.contains("iptables-nft") && v.explanation.contains("FORWARD") && v.explanation.contains("-d 10.244.1.0/24 -j DROP"),
        "{}",
        v.explanation
    );
    let v = load("nft-drop").replay();
    assert!(v.explanation.contains("nft") && v.explanation.contains("hardening") && v.explanation.contains("forward"), "{}", v.explanation);
}

#[test]
fn every_fault_gets_the_remedy_its_cause_allows() {
    use cnitrace::fix::Remedy;
    for f in faults::FAULTS.iter().chain(faults::SERVICE_FAULTS) {
        let (cause, remedy) = load(f.name).plan().unwrap_or_else(|| panic!("{}: no plan", f.name));
        assert_eq!(cause, f.cause);
        match (f.cause, remedy) {
            ("vxlan-config-mismatch", Remedy::NoSafeFix(why)) => assert!(why.contains("ConfigMap"), "{why}"),
            // Not the node's to repair, or kube-proxy's/flannel's own to write (no API in the lab: no restart).
            ("service-no-endpoints", Remedy::NoSafeFix(why)) => assert!(why.contains("endpointslices"), "{why}"),
            ("kube-proxy-rules-missing", Remedy::NoSafeFix(why)) => assert!(why.contains("restart kube-proxy"), "{why}"),
            ("masquerade-missing", Remedy::NoSafeFix(why)) => assert!(why.contains("restart flannel"), "{why}"),
            ("nodeport-blocked", Remedy::RuleRemoval(steps)) => {
                assert_eq!(steps.len(), 1, "{}: one rule", f.name);
                assert!(steps[0].undo.command().contains("-i eth1"), "{}", steps[0].undo.command());
            }
            ("netfilter-rule-drop", Remedy::RuleRemoval(steps)) => {
                assert_eq!(steps.len(), 1, "{}: one rule", f.name);
                // The undo puts back exactly the rule that was removed.
                assert!(steps[0].undo.command().contains("10.244.1.0/24"), "{}", steps[0].undo.command());
            }
            (_, Remedy::Steps(steps)) => {
                assert!(!steps.is_empty(), "{}: a plan with no step", f.name);
                for s in &steps {
                    let (a, u) = (s.action.command(), s.undo.command());
                    assert!(a.starts_with("ip ") || a.starts_with("bridge "), "{}: `{a}` is what a person types", f.name);
                    assert_ne!(a, u, "{}: the undo differs from the action", f.name);
                }
            }
            (c, r) => panic!("{}: cause {c} got {r:?}", f.name),
        }
    }
}

#[test]
fn the_seed_fix_reattaches_jellyfins_veth_to_cni0() {
    let rec = load(faults::SEED_FAULT);
    let (_, remedy) = rec.plan().expect("plan");
    let cnitrace::fix::Remedy::Steps(steps) = remedy else { panic!("a safe fix") };
    assert_eq!(steps.len(), 1);
    let cmd = steps[0].action.command();
    assert!(cmd.starts_with("ip -n cnitrace-storagenodet3500 link set veth") && cmd.ends_with(" master cni0"), "{cmd}");
    assert!(steps[0].undo.command().ends_with(" nomaster"), "{}", steps[0].undo.command());
}

/// The kernel flushed jellyfin's routes when its eth0 went down: bringing the link up is not the whole
/// repair (issue 17: the pair verified, jellyfin cut from the other node and the outside).
#[test]
fn a_pod_end_brought_up_gets_its_routes_back() {
    let (_, remedy) = load("veth-down-pod").plan().expect("plan");
    let cnitrace::fix::Remedy::Steps(steps) = remedy else { panic!("a safe fix") };
    let cmds: Vec<String> = steps.iter().map(|s| s.action.command()).collect();
    assert_eq!(
        cmds,
        [
            "ip -n cnitrace-pod-jellyfin link set eth0 up",
            "ip -n cnitrace-pod-jellyfin route add default via 10.244.0.1 dev eth0",
            "ip -n cnitrace-pod-jellyfin route add 10.244.0.0/16 via 10.244.0.1 dev eth0",
        ]
    );
}

/// Recorded in a VM on Debian's 5.10 kernel (`cargo xtask test --kernel 5.10` boots the same one),
/// whose kfree_skb carries no drop reason: every cause is still named, from the function that
/// dropped, the trail and the node's state.
#[test]
fn every_lab_fault_recorded_on_5_10_without_drop_reasons_is_diagnosed_as_its_cause() {
    let mut wrong = Vec::new();
    for f in faults::FAULTS {
        let rec = load(&format!("kernel-5.10/{}", f.name));
        for e in rec.events.iter().filter_map(|e| e.drop.as_ref()) {
            assert_eq!(e.reason_code, 0, "{}: recorded on a kernel without drop reasons", f.name);
        }
        let v = rec.replay();
        if v.verdict != Outcome::Dropped || v.cause.as_deref() != Some(f.cause) {
            wrong.push(format!("{}: got {:?} {:?}, expected dropped {}", f.name, v.verdict, v.cause, f.cause));
        }
    }
    assert!(wrong.is_empty(), "misdiagnosed on 5.10:\n{}", wrong.join("\n"));
}

/// On 5.10 a raw ping's echo reply, handed to the raw socket, is freed by icmp_rcv without a reason:
/// that is delivery, not the drop point (the kernel's real drop for mtu-mismatch is ip_forward).
#[test]
fn on_5_10_a_delivered_echo_reply_freed_by_icmp_rcv_is_not_the_drop_point() {
    let rec = load("kernel-5.10/mtu-mismatch");
    let freed_by_icmp_rcv = rec.events.iter().any(|e| e.drop.as_ref().is_some_and(|d| d.function == "icmp_rcv"));
    assert!(freed_by_icmp_rcv, "the fixture holds the reply freed by icmp_rcv");
    let v = rec.replay();
    assert_eq!(v.cause.as_deref(), Some("mtu-mismatch"));
    assert_eq!(v.function.as_deref().and_then(|f| f.split('.').next()), Some("ip_forward"), "{v:?}");
}

/// A NO_SOCKET drop is noise only where a raw ping's reply ends; at the VXLAN port it is the drop point.
#[test]
fn a_vxlan_packet_with_no_socket_is_the_drop_point_not_noise() {
    let v = load("vxlan-port-mismatch").replay();
    assert_eq!((v.function.as_deref(), v.reason.as_deref()), (Some("__udp4_lib_rcv"), Some("NO_SOCKET")), "{v:?}");
}

/// An ARP request nobody answered is a drop even when no catalog cause explains it (issue 17): the
/// seed incident's trace, with the recorded state changed so that jellyfin's veth looks attached (no
/// cause matches any more). Before, this was INCONCLUSIVE with whichever port happened to be last.
#[test]
fn an_unanswered_arp_with_no_known_cause_is_a_drop_at_the_hop_the_trail_proves() {
    let mut rec = load(faults::SEED_FAULT);
    let node = rec.states.dst_node.expect("jellyfin's node");
    let veth = rec.states.dst_host_veth.expect("jellyfin's host veth");
    let st = rec.states.by_inode.get_mut(&node).expect("the node's state");
    let bridge = st.link_by_name("cni0").expect("cni0").ifindex;
    st.links.iter_mut().find(|l| l.ifindex == veth).expect("the veth").master = Some(bridge);
    let v = rec.replay();
    assert_eq!(v.verdict, Outcome::Dropped, "{v:?}");
    assert_eq!(v.exit_code(), 1);
    assert_eq!(v.cause, None, "no cause is guessed: {v:?}");
    assert_eq!((v.function.as_deref(), v.reason.as_deref()), (None, None), "no kernel drop is claimed: {v:?}");
    assert_eq!(v.layer.as_deref(), Some("neighbour"));
    assert!(v.explanation.contains("ARP request for 10.244.0.19") && v.explanation.contains("never reached jellyfin"), "{}", v.explanation);
    // The furthest it got: the node's bridge (jellyfin's veth is no port of it in the real trace).
    assert_eq!((v.netns.as_deref(), v.ifname.as_deref()), (Some("storagenodet3500"), Some("cni0")), "{v:?}");
    assert!(v.explanation.contains("last seen on storagenodet3500 cni0"), "{}", v.explanation);
    assert!(v.facts.iter().any(|f| f.starts_with("ARP request for 10.244.0.19 seen at: debug eth0 → storagenodet3500 veth")), "{:?}", v.facts);
}

/// A native nft drop rule without a counter (what firewalld and most hand-written rule sets look like):
/// the nft-drop trace with the counter taken out of the recorded rule sets. Before, nothing moved, and
/// the verdict was `NETFILTER_DROP at nft_do_chain`, cause unknown (issue 17).
#[test]
fn an_nft_drop_rule_without_a_counter_is_named_by_evaluating_the_rule_set() {
    let mut rec = load("nft-drop");
    let uncount = |s: &mut String| *s = s.replace("ip daddr 10.244.1.0/24 counter packets 2 bytes 1534 drop", "ip daddr 10.244.1.0/24 drop").replace("ip daddr 10.244.1.0/24 counter packets 0 bytes 0 drop", "ip daddr 10.244.1.0/24 drop");
    for st in rec.states.by_inode.values_mut() {
        st.rules.nft.as_mut().map(uncount);
    }
    for rs in rec.states.rules_before.values_mut() {
        rs.nft.as_mut().map(uncount);
    }
    let all: String = rec.states.by_inode.values().filter_map(|s| s.rules.nft.clone()).collect();
    assert!(all.contains("ip daddr 10.244.1.0/24 drop # handle") && !all.contains("1534 drop"), "the fixture's rule lost its counter");
    let v = rec.replay();
    assert_eq!((v.verdict, v.cause.as_deref()), (Outcome::Dropped, Some("netfilter-rule-drop")), "{v:?}");
    let fact = v.facts.iter().find(|f| f.contains("found by evaluating")).unwrap_or_else(|| panic!("how it was found: {:?}", v.facts));
    for part in ["table inet hardening", "chain forward", "hook forward priority filter + 10", "`ip daddr 10.244.1.0/24 drop`", "handle 2"] {
        assert!(fact.contains(part), "{part}: {fact}");
    }
    let (_, remedy) = rec.plan().expect("plan");
    let cnitrace::fix::Remedy::RuleRemoval(steps) = remedy else { panic!("a rule removal") };
    assert_eq!(steps[0].action.command(), "ip netns exec cnitrace-storagenodet3500 nft 'delete rule inet hardening forward handle 2'");
}

#[test]
fn a_service_is_followed_through_its_nat_to_the_endpoint() {
    for (name, asked, endpoint) in [("healthy-service-cross-node", "10.96.40.10:8096", "10.244.1.10:8096"), ("healthy-nodeport", "198.51.100.1:30896", "10.244.0.19:8096")] {
        let rec = load(name);
        let v = rec.replay();
        assert_eq!(v.verdict, Outcome::Delivered, "{name}");
        assert!(v.explanation.contains(&format!("({asked} → {endpoint})")), "{name}: {}", v.explanation);
        let sp = rec.states.service.as_ref().expect("a Service in the recording");
        assert_eq!(sp.chosen.as_ref().map(|e| e.addr.to_string()).as_deref(), Some(endpoint), "{name}");
        // The translation the timeline shows, named by the rule that chose the endpoint.
        let trace = cnitrace::path::Trace::build(rec.events.clone());
        let mut trace = trace;
        cnitrace::service::chosen(sp, &mut trace);
        let dnat = trace.translations().into_iter().find(|n| n.dnat() && n.dst.0 == asked).expect("the DNAT in the trace");
        assert_eq!(dnat.dst.1, endpoint, "{name}");
        assert!(dnat.by.as_deref().is_some_and(|b| b.starts_with("KUBE-SEP-")), "{name}: {dnat:?}");
    }
    // From outside, through a NodePort: kube-proxy's masquerade gives the source the node's address.
    let rec = load("healthy-nodeport");
    let mut trace = cnitrace::path::Trace::build(rec.events.clone());
    cnitrace::service::chosen(rec.states.service.as_ref().unwrap(), &mut trace);
    assert!(trace.translations().iter().any(|n| n.snat() && n.src.0.starts_with("198.51.100.10:") && n.src.1.starts_with("10.244.0.1:")), "{:?}", trace.translations());
}
