//! What the running kernel offers, checked before anything is loaded so
//! that each shortfall is one sentence (privileges are `privileges`'s), and
//! the kernel facts the BPF side needs, from BTF: where a task keeps its
//! user-space thread pointer (`task_struct.thread.fsbase`), its id
//! (`task_struct.pid`) and where its command line lies (`task_struct.mm`,
//! `mm_struct.arg_start`, `arg_end`) and its count of anonymous resident
//! pages (`mm_struct.rss_stat`).

use std::fs;

use anyhow::{Context as _, Result, anyhow, bail};
use memtrace_common::KernelConfig;

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe/type";
const OSRELEASE: &str = "/proc/sys/kernel/osrelease";
/// The first Linux with uprobe_multi links, which memtrace attaches with.
const OLDEST_KERNEL: (u32, u32) = (6, 6);

/// Fails unless the kernel is new enough and has BTF and the uprobe event
/// source.
pub fn check_kernel() -> Result<()> {
    let release = fs::read_to_string(OSRELEASE).with_context(|| format!("cannot read {OSRELEASE}"))?;
    let release = release.trim();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < OLDEST_KERNEL {
        bail!(
            "Linux {release} is too old: memtrace needs {}.{} or later (it attaches uprobe_multi links)",
            OLDEST_KERNEL.0,
            OLDEST_KERNEL.1
        );
    }
    if fs::metadata(BTF_PATH).is_err() {
        bail!(
            "this kernel has no BTF ({BTF_PATH} is missing); memtrace needs a kernel built with CONFIG_DEBUG_INFO_BTF"
        );
    }
    if fs::metadata(UPROBE_PMU).is_err() {
        bail!("this kernel has no uprobe support ({UPROBE_PMU} is missing); memtrace needs CONFIG_UPROBE_EVENTS");
    }
    Ok(())
}

/// What the kernel side needs to know of this kernel before it is loaded,
/// from its BTF.
pub fn config() -> Result<KernelConfig> {
    let data = fs::read(BTF_PATH).with_context(|| format!("cannot read {BTF_PATH}"))?;
    let btf = Btf::parse(&data).ok_or_else(|| anyhow!("cannot parse {BTF_PATH}"))?;
    Ok(KernelConfig {
        task_fsbase: btf.offset("task_struct", &["thread", "fsbase"])?,
        task_pid: btf.offset("task_struct", &["pid"])?,
        task_mm: btf.offset("task_struct", &["mm"])?,
        mm_arg_start: btf.offset("mm_struct", &["arg_start"])?,
        mm_arg_end: btf.offset("mm_struct", &["arg_end"])?,
        // rss_stat is an array of percpu_counter by MM_* index
        // (include/linux/mm_types_task.h: MM_FILEPAGES, MM_ANONPAGES, ...).
        mm_anon_rss: btf.offset("mm_struct", &["rss_stat"])?
            + MM_ANONPAGES * btf.size_of("percpu_counter")?
            + btf.offset("percpu_counter", &["count"])?,
    })
}

/// The index of anonymous pages in `mm_struct.rss_stat`.
const MM_ANONPAGES: u64 = 1;

/// Offset in `struct task_struct` of the member `path` names (`thread`,
/// then its `fsbase`), from the kernel's BTF.
pub fn task_struct_offset(path: &[&str]) -> Result<u64> {
    let data = fs::read(BTF_PATH).with_context(|| format!("cannot read {BTF_PATH}"))?;
    Btf::parse(&data).ok_or_else(|| anyhow!("cannot parse {BTF_PATH}"))?.offset("task_struct", path)
}

/// Just enough of the BTF format (Documentation/bpf/btf.rst) to find struct
/// members: type records are walked once and indexed by id.
struct Btf<'a> {
    types: Vec<&'a [u8]>,
    strings: &'a [u8],
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        if data.get(0..2)? != [0x9f, 0xeb] {
            return None;
        }
        let header_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let type_section = data.get(header_len + type_off..header_len + type_off + type_len)?;
        let strings = data.get(header_len + str_off..header_len + str_off + str_len)?;
        // Type ids start at 1; id 0 is void.
        let mut types = vec![&type_section[..0]];
        let mut at = 0;
        while at < type_section.len() {
            let info = u32_at(type_section, at + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let extra = match kind {
                1 | 14 | 17 => 4,     // int, var, decl_tag
                3 => 12,              // array
                4 | 5 => 12 * vlen,   // struct, union members
                6 | 13 => 8 * vlen,   // enum, func_proto params
                15 | 19 => 12 * vlen, // datasec, enum64
                _ => 0,
            };
            let end = at + 12 + extra;
            types.push(type_section.get(at..end)?);
            at = end;
        }
        Some(Self { types, strings })
    }

    /// Offset in struct `name` of the member `path` names.
    fn offset(&self, name: &str, path: &[&str]) -> Result<u64> {
        let found = self.struct_named(name).ok_or_else(|| anyhow!("BTF has no struct {name}"))?;
        let (mut offset, mut within) = (0, found);
        for member in path {
            let (at, member_type) =
                self.member(within, member).ok_or_else(|| anyhow!("BTF: {name} has no member {}", path.join(".")))?;
            (offset, within) = (offset + at, member_type);
        }
        Ok(offset)
    }

    /// The size in bytes of struct `name`.
    fn size_of(&self, name: &str) -> Result<u64> {
        let id = self.struct_named(name).ok_or_else(|| anyhow!("BTF has no struct {name}"))?;
        Ok(u64::from(u32_at(self.types[id as usize], 8).unwrap_or(0)))
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn kind(record: &[u8]) -> u32 {
        u32_at(record, 4).map_or(0, |info| (info >> 24) & 0x1f)
    }

    fn struct_named(&self, name: &str) -> Option<u32> {
        (1..self.types.len() as u32).find(|&id| {
            let t = self.types[id as usize];
            Self::kind(t) == KIND_STRUCT && self.name(u32_at(t, 0).unwrap_or(0)) == name.as_bytes()
        })
    }

    /// Skips typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            let Some(t) = self.types.get(id as usize) else { break };
            match Self::kind(t) {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = u32_at(t, 8).unwrap_or(0)
                }
                _ => break,
            }
        }
        id
    }

    /// (byte offset, type id) of member `name` of struct/union `id`,
    /// looking through anonymous members.
    fn member(&self, id: u32, name: &str) -> Option<(u64, u32)> {
        let t = *self.types.get(self.resolve(id) as usize)?;
        let kind = Self::kind(t);
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return None;
        }
        let kind_flag = u32_at(t, 4)? >> 31 != 0;
        let vlen = (u32_at(t, 4)? & 0xffff) as usize;
        for i in 0..vlen {
            let m = 12 + 12 * i;
            let (name_off, member_type, raw_offset) = (u32_at(t, m)?, u32_at(t, m + 4)?, u32_at(t, m + 8)?);
            // With kind_flag the top 8 bits hold a bitfield size.
            let bits = if kind_flag { raw_offset & 0x00ff_ffff } else { raw_offset };
            let offset = u64::from(bits / 8);
            let member_name = self.name(name_off);
            if member_name == name.as_bytes() {
                return Some((offset, member_type));
            }
            if member_name.is_empty()
                && let Some((inner, inner_type)) = self.member(member_type, name)
            {
                return Some((offset + inner, inner_type));
            }
        }
        None
    }
}
