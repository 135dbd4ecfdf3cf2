//! Every external program cnitrace, its tasks (xtask) and its tests run, and where each one comes from.
//!
//! One table, used by every call site: a program is run through its [`Tool`] (`tool.command()`,
//! `tool.in_netns(ns)`, or the product's `sys` functions, which take a `&Tool`), never by a name
//! written at the call. `cargo xtask setup` installs what the table names, and xtask's unit tests
//! check both directions: every tool's source is something setup installs, and no call site in the
//! workspace starts a program by a literal name. A fresh machine then lacks nothing the project runs
//! (it happened: the VMs needed busybox, installed by hand once; CI stayed green on that machine only).
//!
//! Programs that something else runs for us count too (busybox for virtme-ng's initramfs, `file` and
//! `udevadm` for virtme-ng): missing, they break a run just the same.

use std::process::Command;

/// Where a program comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Debian package that `cargo xtask setup` installs.
    Apt(&'static str),
    /// A Debian package of priority `required` (Essential or in every installation): never installed
    /// by setup; xtask's test checks its priority where dpkg can tell.
    Base(&'static str),
    /// A crate `cargo install`ed by setup.
    Cargo(&'static str),
    /// A PyPI package setup installs into its virtme-ng venv.
    Pip(&'static str),
    /// The Rust toolchain that runs `cargo xtask` itself (rustup's).
    Toolchain,
    /// Part of the machine image this project runs on, not something setup can install (says where
    /// it comes from); setup reports it when it is missing, and the tests that need it say they skip.
    Machine(&'static str),
    /// Built from source by `cargo xtask setup`, from the project's Go module of that name
    /// (`xtask/cluster/<module>`: pinned versions of the real Kubernetes programs), into
    /// [`cluster_bin_dir`]. Test and lab dependencies only: the product stays Rust.
    Go(&'static str),
}

/// Where `cargo xtask setup` puts the programs it builds from Go modules ([`Source::Go`]):
/// `CNITRACE_CLUSTER_BIN` if set, else `$XDG_CACHE_HOME/cnitrace/cluster/bin` (`~/.cache/…`).
pub fn cluster_bin_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("CNITRACE_CLUSTER_BIN") {
        return d.into();
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(|| "/root".into());
    let base = std::env::var_os("XDG_CACHE_HOME").map(std::path::PathBuf::from).unwrap_or_else(|| home.join(".cache"));
    base.join("cnitrace/cluster/bin")
}

/// One external program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tool {
    /// The name looked up on PATH, or an absolute path where the program lives off PATH.
    pub program: &'static str,
    pub source: Source,
    /// Who runs it, for what: the line a missing-install error or a reviewer reads.
    pub used_for: &'static str,
}

impl Tool {
    /// A `Command` for this program.
    pub fn command(&self) -> Command {
        Command::new(self.path())
    }

    /// What is run: the program's name (looked up on PATH) or its absolute path; a program built from
    /// a Go module, in [`cluster_bin_dir`].
    pub fn path(&self) -> std::path::PathBuf {
        match self.source {
            Source::Go(_) => cluster_bin_dir().join(self.program),
            _ => self.program.into(),
        }
    }

    /// `ip netns exec NS PROGRAM`: this program inside a named network namespace, as its own process.
    pub fn in_netns(&self, ns: &str) -> Command {
        Self::netns_exec(ns, &self.path())
    }

    /// `ip netns exec NS PROGRAM` for the project's own binaries (not in the table:
    /// they are built, not installed).
    pub fn netns_exec(ns: &str, program: &std::path::Path) -> Command {
        let mut c = IP.command();
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// The program's file name (the last part of an absolute path).
    pub fn name(&self) -> &'static str {
        self.program.rsplit('/').next().unwrap_or(self.program)
    }
}

macro_rules! tools {
    ($($(#[$doc:meta])* $id:ident = $program:literal, $source:expr, $why:literal;)*) => {
        $($(#[$doc])* pub const $id: Tool = Tool { program: $program, source: $source, used_for: $why };)*
        /// Every tool above.
        pub const ALL: &[Tool] = &[$($id),*];
    };
}

use Source::*;

tools! {
    // The network, in the lab and on a node.
    IP = "ip", Apt("iproute2"), "lab topology (ip -batch), namespaces, `ip netns exec`";
    BRIDGE = "bridge", Apt("iproute2"), "lab bridge ports and VXLAN FDB (bridge -batch)";
    IPTABLES_NFT = "iptables-nft", Apt("iptables"), "lab faults in the nft backend of iptables";
    IPTABLES_NFT_SAVE = "iptables-nft-save", Apt("iptables"), "rule sets with counters (state)";
    IPTABLES_NFT_RESTORE = "iptables-nft-restore", Apt("iptables"), "lab rules; fix actions (--noflush)";
    IPTABLES_LEGACY = "iptables-legacy", Apt("iptables"), "lab faults in the legacy backend";
    IPTABLES_LEGACY_SAVE = "iptables-legacy-save", Apt("iptables"), "rule sets with counters (state)";
    IPTABLES_LEGACY_RESTORE = "iptables-legacy-restore", Apt("iptables"), "fix actions in the legacy backend";
    NFT = "nft", Apt("nftables"), "native nft rule sets (state), lab faults, fix actions (nft -f)";
    MODPROBE = "modprobe", Apt("kmod"), "lab: br_netfilter, as on a kubeadm node";
    PING = "ping", Apt("iputils-ping"), "lab path checks, the demo, tests";
    CURL = "curl", Apt("curl"), "the demo's HTTP check; VM kernel downloads";
    DNSMASQ = "dnsmasq", Apt("dnsmasq-base"), "the lab's cluster DNS (a CoreDNS-like pod the pods' resolv.conf names)";
    /// The CNI plugins flannel delegates to (the lab's pods are made by them).
    CNI_BRIDGE = "/usr/lib/cni/bridge", Apt("containernetworking-plugins"), "lab pods (CNI ADD/DEL)";
    CNI_HOST_LOCAL = "/usr/lib/cni/host-local", Apt("containernetworking-plugins"), "lab pod addresses (IPAM, called by the bridge plugin)";
    ENV = "env", Base("coreutils"), "CNI calls: the plugin's CNI_* environment inside `ip netns exec`";
    KILL = "kill", Apt("procps"), "tests and bench: SIGINT to a follow they started";

    // Building.
    /// Debian's rustc, with the precompiled core for bpfel-unknown-none.
    DEBIAN_RUSTC = "/usr/bin/rustc", Apt("rustc-web"), "builds the eBPF crate (aya-build, Toolchain::Custom(\"/usr\"))";
    DEBIAN_CARGO = "/usr/bin/cargo", Apt("cargo-web"), "builds the eBPF crate";
    BPF_LINKER = "bpf-linker", Cargo("bpf-linker"), "links the eBPF object";
    CARGO = "cargo", Toolchain, "builds and tests the workspace";
    APT_GET = "apt-get", Base("apt"), "setup";
    DPKG_QUERY = "dpkg-query", Base("dpkg"), "setup: what is installed";
    DPKG_DEB = "dpkg-deb", Base("dpkg"), "setup: VM kernel packages extracted into the cache";
    ID = "id", Base("coreutils"), "setup: root or not";

    // The kernel matrix's VMs.
    QEMU = "qemu-system-x86_64", Apt("qemu-system-x86"), "the VMs (software emulation)";
    VNG = "vng", Pip("virtme-ng"), "boots a VM kernel with the host's root shared";
    VIRTIOFSD = "virtiofsd", Cargo("virtiofsd"), "the VMs' shared root (virtiofs)";
    /// virtme-ng builds the guest's initramfs with it ("initramfs is needed, and no busybox was found").
    BUSYBOX = "busybox", Apt("busybox-static"), "virtme-ng's initramfs";
    UDEVADM = "udevadm", Apt("udev"), "virtme-ng's init in the guest";
    FILE = "file", Apt("file"), "virtme-ng reads the kernel image's version";
    DEPMOD = "depmod", Apt("kmod"), "setup: modules.dep of an extracted VM kernel";
    XZ = "xz", Apt("xz-utils"), "setup: Debian's package indexes";
    /// Debian's python3 (with python3-venv, also in setup's list, for its venv module).
    PYTHON3 = "/usr/bin/python3", Apt("python3-minimal"), "setup: the virtme-ng venv";
    TIMEOUT = "timeout", Base("coreutils"), "bounds a VM's run";
    /// In setup's venv (`CNITRACE_PY_BIN` names its bin folder for the tests).
    KUBERNETES_VALIDATE = "kubernetes-validate", Pip("kubernetes-validate"), "tests: `cnitrace deploy`'s manifests against the Kubernetes API's schemas";
    NICE = "nice", Base("coreutils"), "the VMs yield to the host's own suite";
    MOUNT = "mount", Base("mount"), "bench: tracefs for bpftrace";
    SH = "sh", Base("dash"), "pipelines in setup and bench";
    /// mawk by name: `awk` is an alternatives link no package holds.
    MKDIR = "mkdir", Base("coreutils"), "the VM guest's own scratch folder";
    AWK = "mawk", Base("mawk"), "the VM guest's memory log";

    // Tests and benchmarks.
    IPERF3 = "iperf3", Apt("iperf3"), "bulk flows in tests and bench";
    TSHARK = "tshark", Apt("tshark"), "tests: `follow --write` read back by Wireshark's own dissectors";
    CAPINFOS = "capinfos", Apt("wireshark-common"), "tests: the capture comment and interfaces of `follow --write`";
    BASH = "bash", Base("bash"), "tests: /dev/udp";
    SETPRIV = "setpriv", Base("util-linux"), "tests: cnitrace without root";
    SCRIPT = "script", Base("bsdutils"), "tests: fix's prompt on a terminal";
    TMUX = "tmux", Apt("tmux"), "tests: fix's prompt and colours in a real terminal (send-keys, capture-pane)";
    UNSHARE = "unshare", Base("util-linux"), "bench: bpftrace with its own tracefs mount";
    TASKSET = "taskset", Base("util-linux"), "bench: flows pinned to a CPU";
    BPFTRACE = "bpftrace", Apt("bpftrace"), "bench: the same hooks in bpftrace, for comparison";
    PERF = "perf", Apt("linux-perf"), "bench: the tracer's sampled share of a core";
    /// The real kubectl (v1.32 on this machine kind, from the image's google-cloud-sdk).
    KUBECTL = "kubectl", Machine("the machine image (google-cloud-sdk)"), "tests: the test API server checked by kubectl; `kubectl cnitrace` as a plugin";

    // The lab's real cluster (`cnitrace lab up --kubernetes`), built from source by setup.
    GO = "go", Machine("the machine image (Go 1.26)"), "setup: builds the real cluster's programs (xtask/cluster/*)";
    ETCD = "etcd", Go("kubernetes"), "the real cluster's store (go.etcd.io/etcd/server/v3, the release k8s.io/kubernetes pins)";
    KUBE_APISERVER = "kube-apiserver", Go("kubernetes"), "the real cluster's API server";
    KUBE_CONTROLLER_MANAGER = "kube-controller-manager", Go("kubernetes"), "the real cluster's controllers (podCIDRs, EndpointSlices, DaemonSets)";
    KUBE_SCHEDULER = "kube-scheduler", Go("kubernetes"), "the real cluster's scheduler (binds the DaemonSets' pods)";
    KUBE_PROXY = "kube-proxy", Go("kubernetes"), "the real cluster's Services, in iptables and nftables mode";
    FLANNELD = "flanneld", Go("flannel"), "the real cluster's flannel (--kube-subnet-mgr, VXLAN and host-gw)";
    /// flannel's CNI plugin (its predecessor in containernetworking/plugins v0.9.1: flannel-io/cni-plugin
    /// is not served by the module proxy here); it delegates to Debian's bridge and host-local.
    CNI_FLANNEL = "flannel", Go("cni-flannel"), "the real cluster's pods (CNI ADD/DEL as kubelet calls it)";
    COREDNS = "coredns", Go("coredns"), "the real cluster's DNS (kubeadm's CoreDNS, behind the kube-dns Service)";
    CNI_PORTMAP = "/usr/lib/cni/portmap", Apt("containernetworking-plugins"), "the real cluster's pods: the second plugin of flannel's conflist";
    CNI_LOOPBACK = "/usr/lib/cni/loopback", Apt("containernetworking-plugins"), "the real cluster's pods: their lo, as the runtime sets it up";
}

/// The real cluster's programs (`cnitrace lab up --kubernetes` runs them all).
pub const CLUSTER: &[Tool] = &[ETCD, KUBE_APISERVER, KUBE_CONTROLLER_MANAGER, KUBE_SCHEDULER, KUBE_PROXY, FLANNELD, CNI_FLANNEL, COREDNS];

/// Those of [`CLUSTER`] not built yet (their paths).
pub fn cluster_missing() -> Vec<String> {
    CLUSTER.iter().filter(|t| !t.path().is_file()).map(|t| t.path().display().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_unique() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(!ALL[i + 1..].iter().any(|b| b.program == a.program), "{} is in the table twice", a.program);
        }
    }

    #[test]
    fn in_netns_runs_the_program_through_ip() {
        let c = PING.in_netns("cnitrace-x");
        assert_eq!(c.get_program(), "ip");
        let args: Vec<_> = c.get_args().map(|a| a.to_str().expect("utf-8")).collect();
        assert_eq!(args, ["netns", "exec", "cnitrace-x", "ping"]);
    }
}
