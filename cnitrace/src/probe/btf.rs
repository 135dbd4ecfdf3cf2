//! What the running kernel looks like, read from its BTF: struct offsets for the programs (Rust eBPF
//! has no CO-RE), the names of `enum skb_drop_reason`, and the argument list of each tracepoint.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use btf_rs::{Btf, Type};
use cnitrace_common::Config;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> Result<Self> {
        // Mmap: types are parsed on demand, not all at once. Parsed whole, a 4.4 MB BTF took 26 MiB of
        // heap (Debian's 6.1, measured in the kernel matrix's VM): most of follow's peak memory there.
        // /sys/kernel/btf/vmlinux itself can be mapped only on recent kernels (6.18 here); elsewhere a
        // copy in memory (a memfd) can.
        let btf = Btf::from_file_with_backend(VMLINUX, btf_rs::Backend::Mmap)
            .or_else(|_| Self::mapped_copy(VMLINUX))
            .or_else(|_| Btf::from_file(VMLINUX).map_err(anyhow::Error::from))
            .with_context(|| format!("read the kernel's BTF at {VMLINUX}"))?;
        Ok(KernelBtf { btf })
    }

    /// `path` copied into a memfd and mapped from there: the kernel's BTF where its sysfs file cannot
    /// be mapped. The mapping keeps the copy alive; nothing is left in any filesystem.
    fn mapped_copy(path: &str) -> Result<Btf> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create("cnitrace-kernel-btf", MFdFlags::MFD_CLOEXEC)?;
        let mut copy = std::fs::File::from(fd);
        std::io::copy(&mut std::fs::File::open(path)?, &mut copy)?;
        let btf = Btf::from_file_with_backend(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&copy)), btf_rs::Backend::Mmap)?;
        Ok(btf)
    }

    fn struct_type(&self, name: &str) -> Option<btf_rs::Struct> {
        self.btf.resolve_types_by_name(name).ok()?.into_iter().find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
    }

    /// Follows typedefs and qualifiers to the struct/union a member is.
    fn composite_of(&self, member: &btf_rs::Member) -> Option<btf_rs::Struct> {
        let mut t = self.btf.resolve_chained_type(member).ok()?;
        loop {
            match t {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(ref x) => t = self.btf.resolve_chained_type(x).ok()?,
                Type::Const(ref x) | Type::Volatile(ref x) => t = self.btf.resolve_chained_type(x).ok()?,
                _ => return None,
            }
        }
    }

    /// Bit offset of `field` in `s`, looking through anonymous structs and unions.
    fn find_in(&self, s: &btf_rs::Struct, field: &str) -> Option<(u32, btf_rs::Member)> {
        for m in &s.members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            if name == field {
                return Some((m.bit_offset(), m.clone()));
            }
            if name.is_empty() {
                if let Some(inner) = self.composite_of(m) {
                    if let Some((off, mm)) = self.find_in(&inner, field) {
                        return Some((m.bit_offset() + off, mm));
                    }
                }
            }
        }
        None
    }

    /// Byte offset of a dotted path (`"ns.inum"`) inside struct `ty`.
    pub fn offset(&self, ty: &str, path: &str) -> Option<u32> {
        let mut s = self.struct_type(ty)?;
        let mut total = 0u32;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (off, member) = self.find_in(&s, part)?;
            total += off;
            if i + 1 < parts.len() {
                s = self.composite_of(&member)?;
            }
        }
        Some(total / 8)
    }

    /// `enum skb_drop_reason`: value → name without the `SKB_DROP_REASON_` prefix. Empty when the kernel
    /// has none (before 5.17).
    pub fn drop_reasons(&self) -> BTreeMap<u32, String> {
        let mut out = BTreeMap::new();
        let Ok(types) = self.btf.resolve_types_by_name("skb_drop_reason") else { return out };
        for t in types {
            if let Type::Enum(e) = t {
                for m in &e.members {
                    if let Ok(name) = self.btf.resolve_name(m) {
                        out.insert(m.val(), name.trim_start_matches("SKB_DROP_REASON_").to_string());
                    }
                }
            }
        }
        out
    }

    /// A tracepoint's `btf_trace_<name>` typedef (the type of its BPF program) and its type id.
    fn trace_typedef(&self, tp: &str) -> Option<(u32, btf_rs::Typedef)> {
        self.btf.resolve_ids_by_name(&format!("btf_trace_{tp}")).ok()?.into_iter().find_map(|id| match self.btf.resolve_type_by_id(id) {
            Ok(Type::Typedef(td)) => Some((id, td)),
            _ => None,
        })
    }

    /// Number of arguments of a tracepoint (from its `btf_trace_<name>` typedef, minus the context).
    pub fn tracepoint_args(&self, tp: &str) -> Option<usize> {
        let (_, td) = self.trace_typedef(tp)?;
        let Type::Ptr(ptr) = self.btf.resolve_chained_type(&td).ok()? else { return None };
        let Type::FuncProto(fp) = self.btf.resolve_chained_type(&ptr).ok()? else { return None };
        Some(fp.parameters.len().saturating_sub(1))
    }

    /// The kernel's type id of each tracepoint's `btf_trace_<name>` typedef: what a BTF tracepoint
    /// (`tp_btf`) attaches to. Tracepoints this kernel lacks are left out.
    pub fn tracepoint_type_ids(&self, tracepoints: &[&str]) -> Vec<(String, u32)> {
        tracepoints.iter().filter_map(|tp| Some((format!("btf_trace_{tp}"), self.trace_typedef(tp)?.0))).collect()
    }

    /// The programs' `Config`: every offset they read, or an error naming the one this kernel lacks.
    pub fn config(&self) -> Result<Config> {
        let need = |ty: &str, path: &str| {
            self.offset(ty, path).ok_or_else(|| anyhow!("the kernel's BTF has no {ty}.{path}"))
        };
        let opt = |ty: &str, path: &str| self.offset(ty, path).unwrap_or(Config::ABSENT);
        let mut c = Config::zeroed();
        c.skb_head = need("sk_buff", "head")?;
        c.skb_data = need("sk_buff", "data")?;
        c.skb_len = need("sk_buff", "len")?;
        c.skb_dev = need("sk_buff", "dev")?;
        c.skb_protocol = need("sk_buff", "protocol")?;
        c.skb_network_header = need("sk_buff", "network_header")?;
        // An offset from head on 64-bit kernels (sk_buff_data_t).
        c.skb_tail = opt("sk_buff", "tail");
        c.dev_ifindex = need("net_device", "ifindex")?;
        c.dev_nd_net = need("net_device", "nd_net")?;
        c.net_ns_inum = need("net", "ns.inum")?;
        c.flowi4_saddr = opt("flowi4", "saddr");
        c.flowi4_daddr = opt("flowi4", "daddr");
        c.nhc_dev = opt("fib_nh_common", "nhc_dev");
        c.neigh_primary_key = opt("neighbour", "primary_key");
        c.neigh_dev = opt("neighbour", "dev");
        c.neigh_nud_state = opt("neighbour", "nud_state");
        c.neigh_ha = opt("neighbour", "ha");
        c.nf_state_hook = opt("nf_hook_state", "hook");
        c.nf_state_pf = opt("nf_hook_state", "pf");
        c.skb_window = c.skb_fields_in_window() as u32;
        Ok(c)
    }
}

/// What aya needs to load a BTF tracepoint: an `aya::Btf` in which it finds the id of the target's
/// `btf_trace_<name>` typedef. aya would parse the whole kernel BTF for it (18 MiB of heap for this
/// host's 5.5 MB, aya-rs/aya#1172, against 20 MiB for all the rest of `follow`). A BTF type id is the
/// type's position in the BTF, so a small BTF that puts the same typedefs at the same ids serves as
/// well: the wanted typedefs at their kernel ids (`targets`), a 12-byte placeholder (a pointer to void)
/// in every position before them. The kernel never sees it — only the ids go into BPF_PROG_LOAD.
pub fn attach_targets(targets: &[(String, u32)]) -> Result<aya::Btf> {
    const BTF_KIND_PTR: u32 = 2;
    const BTF_KIND_TYPEDEF: u32 = 8;
    let last = targets.iter().map(|(_, id)| *id).max().ok_or_else(|| anyhow!("no tracepoint to attach to"))?;
    let mut strings = vec![0u8];
    let mut name_at = BTreeMap::new();
    for (name, id) in targets {
        name_at.insert(*id, strings.len() as u32);
        strings.extend_from_slice(name.as_bytes());
        strings.push(0);
    }
    let mut types = Vec::with_capacity(last as usize * 12);
    for id in 1..=last {
        let (name_off, kind) = match name_at.get(&id) {
            Some(off) => (*off, BTF_KIND_TYPEDEF),
            None => (0, BTF_KIND_PTR),
        };
        for word in [name_off, kind << 24, 0] {
            types.extend_from_slice(&word.to_ne_bytes());
        }
    }
    // struct btf_header: magic, version, flags, hdr_len, type_off, type_len, str_off, str_len.
    let mut blob = Vec::with_capacity(24 + types.len() + strings.len());
    blob.extend_from_slice(&0xeb9fu16.to_ne_bytes());
    blob.extend_from_slice(&[1, 0]);
    for word in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
        blob.extend_from_slice(&word.to_ne_bytes());
    }
    blob.extend_from_slice(&types);
    blob.extend_from_slice(&strings);
    aya::Btf::parse(&blob, aya::Endianness::default()).context("build the BTF tracepoints' attach targets")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy a kernel gets when its sysfs BTF cannot be mapped gives what the file itself gives.
    #[test]
    fn a_mapped_copy_reads_like_the_kernels_btf() {
        if !std::path::Path::new(VMLINUX).exists() {
            eprintln!("skipped: no {VMLINUX}");
            return;
        }
        let copy = KernelBtf { btf: KernelBtf::mapped_copy(VMLINUX).expect("mapped copy") };
        let direct = KernelBtf { btf: Btf::from_file(VMLINUX).expect("parsed whole") };
        assert_eq!(format!("{:?}", copy.config().expect("offsets")), format!("{:?}", direct.config().expect("offsets")));
        assert_eq!(copy.drop_reasons(), direct.drop_reasons());
        assert_eq!(copy.tracepoint_args("kfree_skb"), direct.tracepoint_args("kfree_skb"));
        assert!(!copy.drop_reasons().is_empty() || direct.tracepoint_args("kfree_skb") == Some(2));
    }

    /// aya finds each tracepoint's typedef at the id the kernel gave it, in the small stand-in BTF.
    #[test]
    fn attach_targets_carry_the_kernels_ids() {
        let targets = vec![("btf_trace_a".to_string(), 7), ("btf_trace_b".to_string(), 40_000), ("btf_trace_c".to_string(), 3)];
        let btf = attach_targets(&targets).expect("a BTF");
        for (name, id) in &targets {
            assert_eq!(btf.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Typedef).ok(), Some(*id), "{name}");
        }
        assert!(btf.id_by_type_name_kind("btf_trace_d", aya_obj::btf::BtfKind::Typedef).is_err());
        if std::path::Path::new(VMLINUX).exists() {
            let k = KernelBtf::load().expect("kernel BTF");
            let ids = k.tracepoint_type_ids(&["net_dev_start_xmit", "no_such_tracepoint"]);
            assert_eq!(ids.len(), 1, "{ids:?}");
            assert!(ids[0].1 > 0);
        }
    }
}
