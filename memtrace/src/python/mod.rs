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
use memtrace_common::{NO_OFFSET, PythonWalk};

use self::{
    layouts::{EvalEntry, Layout},
    version::Version,
};
use crate::target::{Target, elf::ElfFile, maps::host_path, memory::ProcessMemory};

pub struct Interpreter {
    /// The binary holding the runtime, as the target sees it.
    pub path: String,
    pub elf: ElfFile,
    pub version: Version,
    /// Address of `_PyRuntime` in the target.
    pub runtime: u64,
    pub layout: Layout,
}

pub enum Detection {
    NotPython,
    /// A CPython memtrace cannot walk, with the reason in a sentence.
    Unsupported(String),
    Supported(Interpreter),
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
        let Ok(elf) = ElfFile::open(&host_path(target.pid, path)) else { continue };
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
    let Some(runtime) = runtime_address(target, path, &elf) else {
        return unsupported("has no _PyRuntime that memtrace can locate (memtrace reads CPython 3.8 to 3.13)");
    };
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
    Detection::Supported(Interpreter { path: path.to_owned(), elf, version, runtime, layout })
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

/// Where `_PyRuntime` is in the target: its symbol (or the `.PyRuntime`
/// section of stripped builds) moved by the binary's load bias. It may lie
/// in .bss, which has no file offset, so the bias comes from any mapping of
/// the file.
fn runtime_address(target: &Target, path: &str, elf: &ElfFile) -> Option<u64> {
    let vaddr = elf.symbol("_PyRuntime").map(|s| s.vaddr).or_else(|| elf.section_address(".PyRuntime"))?;
    let bias = target
        .map
        .mappings
        .iter()
        .filter(|m| m.path == path)
        .find_map(|m| Some(m.start.wrapping_sub(elf.vaddr_of_offset(m.file_offset)?)))?;
    Some(vaddr.wrapping_add(bias))
}

impl Interpreter {
    /// The frame-walk recipe for the kernel side.
    pub fn walk(&self) -> PythonWalk {
        let l = &self.layout;
        let mut walk = PythonWalk {
            runtime: self.runtime,
            tstate_chain_len: l.tstate_chain.len() as u64,
            tstate_thread_id: l.tstate_thread_id,
            tstate_next: l.tstate_next,
            frame_chain_len: l.frame_chain.len() as u64,
            frame_code: l.frame_code,
            frame_previous: l.frame_previous,
            frame_instr: l.frame_instr,
            frame_instr_mask: l.instr_kind.mask(),
            frame_owner: l.frame_owner_cstack.map_or(NO_OFFSET, |(offset, _)| offset),
            frame_owner_cstack: l.frame_owner_cstack.map_or(0, |(_, value)| value as u64),
            frame_is_entry: match l.eval_entry {
                EvalEntry::Flag(offset) => offset,
                EvalEntry::EveryFrame | EvalEntry::BeforeShim => NO_OFFSET,
            },
            every_frame_is_entry: u64::from(l.eval_entry == EvalEntry::EveryFrame),
            code_tag_fields: [l.code_firstlineno, l.code_name, l.code_filename],
            type_flags: l.type_flags,
            gc_head_size: l.gc_head_size,
            preheader_flags: l.preheader_flags,
            ..PythonWalk::default()
        };
        walk.tstate_chain[..l.tstate_chain.len()].copy_from_slice(&l.tstate_chain);
        walk.threads_chain.copy_from_slice(&l.threads_chain);
        walk.frame_chain[..l.frame_chain.len()].copy_from_slice(&l.frame_chain);
        walk
    }

    pub fn code_resolver(&self, pid: u32) -> code::CodeResolver {
        code::CodeResolver::new(ProcessMemory::new(pid), self.layout, self.version)
    }
}
