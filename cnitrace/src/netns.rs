//! Network namespaces: entering one on the current thread, and finding every one on the host.
//!
//! A namespace switch is per thread, so [`NetNsGuard`] is `!Send` and restores the thread's namespace on
//! drop. Namespace-bound work (netlink, the probe socket) runs on its own thread via [`in_netns`].

use std::{
    collections::BTreeMap,
    fs::File,
    marker::PhantomData,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Enters a network namespace on this thread until dropped.
pub struct NetNsGuard {
    prev: File,
    _not_send: PhantomData<*const ()>,
}

impl NetNsGuard {
    pub fn enter(path: &Path) -> Result<Self> {
        let prev = File::open("/proc/thread-self/ns/net").context("open /proc/thread-self/ns/net")?;
        let target = File::open(path).with_context(|| format!("open namespace {}", path.display()))?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("enter namespace {}", path.display()))?;
        Ok(NetNsGuard { prev, _not_send: PhantomData })
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        // Failing to go back would leave this thread in the wrong namespace: nothing safe to continue with.
        setns(self.prev.as_fd(), CloneFlags::CLONE_NEWNET).expect("restore the thread's network namespace");
    }
}

/// Runs `f` on a fresh thread inside the namespace at `path`.
pub fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let _g = NetNsGuard::enter(&path)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace worker thread panicked"))?
}

/// One network namespace of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetNs {
    /// Namespace inode: what the kernel side reports.
    pub inode: u32,
    /// Display name: the `ip netns` name, "root" for the host's own, or "pid N (comm)".
    pub name: String,
    /// A path that opens it (for setns).
    pub path: PathBuf,
    pub is_root: bool,
}

/// Every network namespace reachable from here: named ones, the root one and those of running processes.
pub fn list() -> Result<Vec<NetNs>> {
    let mut by_inode: BTreeMap<u32, NetNs> = BTreeMap::new();
    // The host's namespace is init's; where init's is hidden from us (a sandbox), it is our own.
    let (root_path, root_md) = match std::fs::metadata("/proc/1/ns/net") {
        Ok(md) => (PathBuf::from("/proc/1/ns/net"), md),
        Err(_) => (PathBuf::from("/proc/self/ns/net"), std::fs::metadata("/proc/self/ns/net").context("stat /proc/self/ns/net")?),
    };
    let root_inode = root_md.ino() as u32;
    by_inode.insert(
        root_inode,
        NetNs { inode: root_inode, name: "root".into(), path: root_path, is_root: true },
    );
    if let Ok(dir) = std::fs::read_dir(NETNS_RUN_DIR) {
        for e in dir.flatten() {
            let path = e.path();
            let Ok(md) = std::fs::metadata(&path) else { continue };
            let inode = md.ino() as u32;
            let name = e.file_name().to_string_lossy().into_owned();
            by_inode.entry(inode).or_insert(NetNs { inode, name, path, is_root: false });
        }
    }
    if let Ok(proc_dir) = std::fs::read_dir("/proc") {
        for e in proc_dir.flatten() {
            let fname = e.file_name();
            let Some(pid) = fname.to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let Ok(md) = std::fs::metadata(&path) else { continue };
            let inode = md.ino() as u32;
            by_inode.entry(inode).or_insert_with(|| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                NetNs { inode, name: format!("pid {pid} ({})", comm.trim()), path, is_root: false }
            });
        }
    }
    Ok(by_inode.into_values().collect())
}

/// Path of a named namespace.
pub fn named(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}
