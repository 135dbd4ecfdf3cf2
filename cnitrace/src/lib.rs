//! cnitrace: follows the packets between two pods through the kernel, names where and why they die,
//! and repairs it.
//!
//! The pipeline, one module per stage:
//! `probe` (eBPF programs, loaded and attached) → `event` (raw records decoded once) → `path`
//! (per-packet timelines) → `finding` (the verdict: drop point + cause) → `plan` (the repair's
//! vocabulary) → apply / verify (the `fix` command). `state` is the node's state read through netlink, `resolve` turns addresses into
//! pods and namespaces, `k8s` asks the Kubernetes API (when there is one) for names and flannel's record, `inject` sends the probe traffic, `lab` builds the broken node in namespaces.

pub mod agent;
pub mod check;
pub mod cli;
pub mod deploy;
pub mod event;
pub mod exit;
pub mod finding;
pub mod fix;
pub mod follow;
pub mod inject;
pub mod k8s;
pub mod lab;
pub mod netns;
pub mod path;
pub mod pcapng;
pub mod plan;
pub mod probe;
pub mod progress;
pub mod render;
pub mod resolve;
pub mod service;
pub mod state;
pub mod stitch;
pub mod sys;
pub mod transport;
pub mod validate;
pub mod watch;

/// The eBPF object built by build.rs from cnitrace-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cnitrace-ebpf"));
