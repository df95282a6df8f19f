//! Discovery of a CPython interpreter inside a target: which mapped binary
//! holds the runtime (`_PyRuntime` in the executable or in libpython), its
//! version as the binary states it, where the runtime lives in the target,
//! and the structure layout that goes with that version. An interpreter
//! memtrace cannot walk is reported as unsupported, never guessed at.

pub mod code;
pub mod debug_offsets;
pub mod layouts;
pub mod linetable;
pub mod version;

use anyhow::Result;
use memtrace_common::{NO_OFFSET, PythonWalk, WINDOW_MAX, Window};

use self::{
    layouts::{EvalEntry, Layout},
    version::Version,
};
use crate::{
    binary::elf::ElfFile,
    census::pymalloc::PymallocState,
    privileges::{self, Need},
    process::{
        Target,
        memory::{AddressSpace as _, ProcessMemory},
    },
};

pub struct Interpreter {
    /// The binary holding the runtime, as the target sees it.
    pub path: String,
    pub elf: ElfFile,
    pub version: Version,
    /// Address of `_PyRuntime` in the target.
    pub runtime: u64,
    pub layout: Layout,
    /// Where pymalloc keeps its own count, when memtrace can read it.
    pub pymalloc: Option<PymallocState>,
}

pub enum Detection {
    NotPython,
    /// A CPython memtrace cannot walk, with the reason in a sentence.
    Unsupported(String),
    Supported(Box<Interpreter>),
}

/// Symbols every CPython 2.x/3.x exports, to recognise interpreters whose
/// runtime memtrace cannot read.
const ANY_CPYTHON: &[&str] = &["Py_Initialize", "PyEval_SaveThread"];

pub fn detect(target: &Target) -> Result<Detection> {
    // The interpreter lives in the executable or in libpython; either name
    // contains "python" (python3.12, libpython3.12.so.1.0, python3.13t).
    let candidates = target
        .map
        .executable_files()
        .into_iter()
        .filter(|p| p.rsplit('/').next().is_some_and(|n| n.contains("python")));
    for path in candidates {
        let elf = match ElfFile::open(&target.paths.host_path(path)) {
            Ok(elf) => elf,
            // Going on would trace a Python process as a native one, and say nothing.
            Err(e) if privileges::is_refusal(&e) => return privileges::explain(Err(e), Need::Binaries),
            Err(_) => continue,
        };
        if !ANY_CPYTHON.iter().any(|s| elf.symbol(s).is_some()) {
            continue;
        }
        return Ok(inspect(target, path, elf));
    }
    Ok(Detection::NotPython)
}

fn inspect(target: &Target, path: &str, elf: ElfFile) -> Detection {
    let Some(version) = version_of(&elf) else {
        return Detection::Unsupported(format!("{path} looks like CPython but its version cannot be read"));
    };
    let unsupported = |why: &str| Detection::Unsupported(format!("CPython {version} {why}"));
    let (Some(bias), Some(runtime)) = (load_bias(target, path, &elf), runtime_vaddr(&elf)) else {
        return unsupported("has no _PyRuntime that memtrace can locate (memtrace reads CPython 3.8 to 3.13)");
    };
    let runtime = runtime.wrapping_add(bias);
    let layout = if debug_offsets::applies(version.major, version.minor) {
        let bytes = ProcessMemory::new(target.pid).read_vec(runtime, debug_offsets::LEN);
        match bytes.map_err(|e| e.to_string()).and_then(|b| debug_offsets::parse(&b).map_err(|e| e.to_string())) {
            Ok(layout) => layout,
            Err(why) => return unsupported(&format!("is not supported: {why}")),
        }
    } else {
        match layouts::layout_for(version.major, version.minor) {
            Some(layout) => *layout,
            None => return unsupported("is not supported (memtrace reads CPython 3.8 to 3.13)"),
        }
    };
    if walk_recipe(&layout, runtime).is_none() {
        return unsupported("lays out its frames wider than memtrace reads in one copy");
    }
    let pymalloc = PymallocState::locate(&elf, bias, (version.major, version.minor));
    Detection::Supported(Box::new(Interpreter { path: path.to_owned(), elf, version, runtime, layout, pymalloc }))
}

/// The version the binary states: `Py_Version` (3.11+), else the
/// PY_VERSION string its code confirms.
fn version_of(elf: &ElfFile) -> Option<Version> {
    if let Some(symbol) = elf.symbol("Py_Version") {
        let bytes = elf.symbol_bytes(symbol).ok()?;
        return Version::from_hex(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?));
    }
    let rodata = elf.sections(&[".rodata"]).concat();
    let text = elf.sections(&[".text"]).concat();
    Version::from_version_string(&rodata, &text)
}

/// The kernel's walk recipe for `layout`, or None when a window of fields
/// would be wider than the kernel copies at once.
fn walk_recipe(layout: &Layout, runtime: u64) -> Option<PythonWalk> {
    let l = layout;
    let owner = l.frame_owner_cstack.map(|(offset, _)| offset);
    let is_entry = match l.eval_entry {
        EvalEntry::Flag(offset) => Some(offset),
        EvalEntry::EveryFrame | EvalEntry::BeforeShim => None,
    };
    let (frame_window, [code, previous, instr, owner, is_entry]) = window([
        Some((l.frame_code, 8)),
        Some((l.frame_previous, 8)),
        Some((l.frame_instr, 8)),
        owner.map(|o| (o, 1)),
        is_entry.map(|o| (o, 1)),
    ])?;
    let (code_window, [line, name, file]) =
        window([Some((l.code_firstlineno, 4)), Some((l.code_name, 8)), Some((l.code_filename, 8))])?;
    let mut walk = PythonWalk {
        runtime,
        tstate_chain_len: l.tstate_chain.len() as u64,
        tstate_thread_id: l.tstate_thread_id,
        tstate_next: l.tstate_next,
        frame_chain_len: l.frame_chain.len() as u64,
        frame_window,
        frame_code: code,
        frame_previous: previous,
        frame_instr: instr,
        frame_instr_mask: l.instr_kind.mask(),
        frame_owner: owner,
        frame_owner_cstack: l.frame_owner_cstack.map_or(0, |(_, value)| value as u64),
        frame_is_entry: is_entry,
        every_frame_is_entry: u64::from(l.eval_entry == EvalEntry::EveryFrame),
        code_window,
        code_tag_fields: [line, name, file],
        type_flags: l.type_flags,
        gc_head_size: l.gc_head_size,
        preheader_flags: l.preheader_flags,
        pool_mask: !(l.pymalloc.pool_size - 1),
        pool_freeblock: l.pymalloc.pool_header.freeblock,
        pool_szidx: l.pymalloc.pool_header.szidx,
        size_class_shift: l.pymalloc.size_class_shift,
        ..PythonWalk::default()
    };
    walk.tstate_chain[..l.tstate_chain.len()].copy_from_slice(&l.tstate_chain);
    walk.threads_chain.copy_from_slice(&l.threads_chain);
    walk.frame_chain[..l.frame_chain.len()].copy_from_slice(&l.frame_chain);
    Some(walk)
}

/// The smallest window holding every present (offset, size) field, and
/// each field's offset within it (`NO_OFFSET` for absent ones); None when
/// wider than the kernel copies.
fn window<const N: usize>(fields: [Option<(u64, u64)>; N]) -> Option<(Window, [u64; N])> {
    let present = fields.iter().flatten();
    let start = present.clone().map(|&(offset, _)| offset).min()?;
    // 3.13's offsets are read from the target: one past the address space
    // is no window.
    let end =
        present.map(|&(offset, size)| offset.checked_add(size)).collect::<Option<Vec<u64>>>()?.into_iter().max()?;
    if end - start > WINDOW_MAX as u64 {
        return None;
    }
    Some((Window { start, len: end - start }, fields.map(|f| f.map_or(NO_OFFSET, |(offset, _)| offset - start))))
}

/// What to add to the binary's virtual addresses to get the target's: from
/// any mapping of the file (statics may lie in .bss, which has no file
/// offset to map).
pub(crate) fn load_bias(target: &Target, path: &str, elf: &ElfFile) -> Option<u64> {
    target
        .map
        .mappings
        .iter()
        .filter(|m| m.path == path)
        .find_map(|m| Some(m.start.wrapping_sub(elf.vaddr_of_offset(m.file_offset)?)))
}

/// Where `_PyRuntime` is in the binary: its symbol, or the `.PyRuntime`
/// section of stripped builds.
fn runtime_vaddr(elf: &ElfFile) -> Option<u64> {
    elf.symbol("_PyRuntime").map(|s| s.vaddr).or_else(|| elf.section_address(".PyRuntime"))
}

impl Interpreter {
    /// The frame-walk recipe for the kernel side.
    pub fn walk(&self) -> PythonWalk {
        walk_recipe(&self.layout, self.runtime).expect("checked when the interpreter was detected")
    }

    pub fn code_resolver(&self, pid: u32) -> code::CodeResolver {
        code::CodeResolver::new(ProcessMemory::new(pid), self.layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_fits_the_kernels_windows() {
        for minor in 8..=13 {
            let layout = layouts::layout_for(3, minor).unwrap();
            let walk = walk_recipe(layout, 0).unwrap_or_else(|| panic!("3.{minor} does not fit"));
            // Fields land where the layout says, relative to their window.
            assert_eq!(walk.frame_window.start + walk.frame_instr, layout.frame_instr);
            assert_eq!(walk.code_window.start + walk.code_tag_fields[0], layout.code_firstlineno);
        }
    }

    #[test]
    fn windows_span_their_fields() {
        let (w, at) = window([Some((56, 8)), None, Some((0, 8)), Some((70, 1))]).unwrap();
        assert_eq!((w, at), (Window { start: 0, len: 71 }, [56, NO_OFFSET, 0, 70]));
        assert!(window([Some((0, 8)), Some((200, 8))]).is_none());
        assert!(window([Some((0, 8)), Some((u64::MAX - 3, 8))]).is_none(), "past the address space");
    }
}
