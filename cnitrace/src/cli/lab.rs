use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::{
    exit,
    lab::{self, check, faults, topology, Lab, DEFAULT_PREFIX},
};

#[derive(Args)]
pub struct LabArgs {
    /// Name prefix of every namespace of the lab (lets two labs, e.g. a test's, stay apart).
    #[arg(long, global = true, default_value = DEFAULT_PREFIX, env = "CNITRACE_LAB_PREFIX")]
    prefix: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab, with zero or more faults on.
    Up {
        /// A fault from `cnitrace lab list`; repeat to combine.
        #[arg(long = "fault", value_name = "NAME")]
        faults: Vec<String>,
        /// How kube-proxy programs the Services: iptables (through iptables-nft), iptables-legacy, or
        /// nftables.
        #[arg(long, default_value = "iptables", value_name = "MODE")]
        proxy_mode: lab::services::ProxyMode,
        /// Start an agent (`cnitrace agent`) for each node, as the DaemonSet runs one on every node; its
        /// socket is printed as the `--agent NODE=ADDR` that `follow` and `check` take.
        #[arg(long)]
        agents: bool,
        /// The nodes as nodes of a real cluster: the API server, controller manager, scheduler,
        /// flanneld, kube-proxy and CNI plugins built from source by `cargo xtask setup`; the pods are
        /// Kubernetes pods (no faults: inject them with the API or by hand).
        #[arg(long, conflicts_with_all = ["faults", "agents"])]
        kubernetes: bool,
        /// With --kubernetes: flannel's backend.
        #[arg(long, default_value = "vxlan", requires = "kubernetes")]
        backend: lab::cluster::Backend,
    },
    /// Tear everything of the lab down: namespaces, links, rules, processes.
    Down,
    /// What is up, which faults are on, and which paths flow.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The faults, one line each.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add or remove a pod through the CNI plugin, as the runtime does.
    Pod {
        #[command(subcommand)]
        command: PodCommand,
    },
    /// (internal) kubelet's part in the real cluster of `lab up --kubernetes`, for every node.
    #[command(hide = true)]
    Kubelet {
        /// The lab's state folder.
        #[arg(long)]
        state: std::path::PathBuf,
    },
    /// (internal) A lab container: holds a pod's namespace with the pod's resolv.conf, serves HTTP(S).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        #[arg(long)]
        resolv_conf: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum PodCommand {
    Add {
        name: String,
        /// Node index: 0 = storagenodet3500, 1 = storagenodet3501.
        #[arg(long, default_value_t = 0)]
        node: usize,
    },
    Del {
        name: String,
    },
}

pub fn run(args: LabArgs) -> Result<u8> {
    let prefix = args.prefix.as_str();
    match args.command {
        LabCommand::Up { kubernetes: true, proxy_mode, backend, .. } => {
            let mode = match proxy_mode {
                lab::services::ProxyMode::Nftables => "nftables",
                lab::services::ProxyMode::IptablesNft => "iptables",
                other => anyhow::bail!("kube-proxy has no {} mode: iptables or nftables", other.name()),
            };
            let lab = lab::up_kubernetes(prefix, lab::cluster::Layout::incident(mode, backend))?;
            println!("lab up: prefix {prefix}, a real cluster");
            lab::cluster::print(&lab)?;
        }
        LabCommand::Kubelet { state } => lab::cluster::kubelet::run(prefix, &state)?,
        LabCommand::Up { faults, proxy_mode, agents, .. } => {
            let mut lab = lab::up(prefix, &faults, proxy_mode)?;
            let agents = if agents {
                match lab.start_agents() {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = lab::down(prefix);
                        return Err(e.context("starting the agents failed; the lab was torn down again"));
                    }
                }
            } else {
                Vec::new()
            };
            println!("lab up: prefix {prefix}");
            print_layout(&lab);
            for (node, sock) in &agents {
                println!("agent of {node}: --agent {node}=unix:{}", sock.display());
            }
            if lab.state.faults.is_empty() {
                println!("faults: none");
            } else {
                for f in &lab.state.faults {
                    let fault = faults::find(f).expect("applied faults are known");
                    println!("fault: {f} — {}", fault.summary);
                }
            }
        }
        LabCommand::Down => {
            let removed = lab::down(prefix)?;
            if removed.is_empty() {
                println!("lab down: nothing was up under prefix {prefix}");
            } else {
                println!("lab down: removed {}", removed.join(", "));
            }
        }
        LabCommand::Status { json } => {
            let lab = Lab::load(prefix)?;
            if lab.state.kubernetes.is_some() {
                // A real cluster: its pods and addresses are the API's, not the seed lab's paths.
                if json {
                    println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "state": lab.state }))?);
                } else {
                    lab::cluster::print(&lab)?;
                }
                return Ok(exit::OK);
            }
            let every: Vec<check::PathId> = check::ALL_PATHS.iter().chain(&check::SERVICE_PATHS).copied().collect();
            let results = check::check_these(&lab, &every);
            if json {
                let v = serde_json::json!({ "state": lab.state, "paths": results });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_layout(&lab);
                println!("faults: {}", if lab.state.faults.is_empty() { "none".into() } else { lab.state.faults.join(", ") });
                for r in results {
                    println!("  {:<20} {:<6} {}", r.path.name(), if r.ok { "ok" } else { "BROKEN" }, if r.ok { "" } else { &r.detail });
                }
            }
        }
        LabCommand::List { json } => {
            for f in faults::FAULTS.iter().chain(faults::SERVICE_FAULTS) {
                if json {
                    let ip = |p: &str| topology::lab_target(p).unwrap_or_default();
                    let v = serde_json::json!({
                        "name": f.name, "cause": f.cause, "summary": f.summary,
                        "breaks": f.breaks, "src": ip(f.pair.0), "dst": ip(f.pair.1),
                    });
                    println!("{v}");
                } else {
                    println!("{:<26} {:<24} {}", f.name, f.cause, f.summary);
                }
            }
        }
        LabCommand::Pod { command } => {
            let mut lab = Lab::load(prefix)?;
            anyhow::ensure!(lab.state.kubernetes.is_none(), "this lab is a real cluster: create pods through its API (kubectl apply, with spec.nodeName), and its kubelet makes their network");
            match command {
                PodCommand::Add { name, node } => {
                    anyhow::ensure!(node < topology::NODES.len(), "no node {node}: the lab has nodes 0 and 1");
                    let ip = lab.free_ip(node);
                    lab.add_pod_with_container(&name, node, ip, None)?;
                    println!("pod {name} added on {}: {ip}, host veth {}", topology::NODES[node].name, lab.host_veth(&name)?);
                }
                PodCommand::Del { name } => {
                    lab.del_pod(&name)?;
                    println!("pod {name} removed");
                }
            }
        }
        LabCommand::Serve { name, port, tls_cert, tls_key, resolv_conf } => {
            let c = lab::serve::Container { name, port, tls: tls_cert.zip(tls_key), resolv_conf };
            lab::serve::run(&c).context("lab container")?;
        }
    }
    Ok(exit::OK)
}

fn print_layout(lab: &Lab) {
    for (i, n) in topology::NODES.iter().enumerate() {
        println!("node {} (netns {}): cni0 {} underlay {}", n.name, lab.node_ns(i), n.gateway(), n.underlay);
    }
    for (name, p) in &lab.state.pods {
        println!("  pod {name:<10} {:<13} netns {:<28} host veth {}", p.ip.to_string(), lab.pod_ns(name), p.host_veth);
    }
    println!("external (netns {}): {}:{}", lab.external_ns(), topology::EXTERNAL_IP, topology::EXTERNAL_PORT);
    for s in &topology::SERVICES {
        println!(
            "service default/{:<9} {}:{} NodePort {} → {} (kube-proxy: {})",
            s.name,
            s.cluster_ip,
            s.port,
            s.node_port,
            s.selects.join(", "),
            lab.state.proxy_mode.name()
        );
    }
}
