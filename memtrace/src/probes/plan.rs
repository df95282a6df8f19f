//! Turns a discovered target into a list of attach points: which allocator
//! functions exist in the target's own libc and interpreter, at which file
//! offset each probe goes (see placement), and the cookie that tells the
//! kernel side what each one does.

use std::path::PathBuf;

use anyhow::{Result, bail};

use memtrace_common::op;

use super::{
    catalog::{AllocatorFn, LIBC_FUNCTIONS, PYMALLOC_EXPORTED, PYMALLOC_INTERNAL, PYTHON_OBJECTS},
    placement::{self, ArgReg, Placement},
};
use crate::target::{Target, elf::ElfFile, maps::host_path};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    AllocEntry,
    AllocReturn,
    Free,
    NewReference,
}

impl Program {
    pub const ALL: [Program; 4] = [Program::AllocEntry, Program::AllocReturn, Program::Free, Program::NewReference];

    /// The BPF program's name in the object file.
    pub fn name(self) -> &'static str {
        match self {
            Program::AllocEntry => "alloc_entry",
            Program::AllocReturn => "alloc_return",
            Program::Free => "free_entry",
            Program::NewReference => "new_reference",
        }
    }

    /// The programs a function needs, return probes first.
    fn for_function(function: &AllocatorFn) -> &'static [Program] {
        match function.op {
            op::NEW_REFERENCE => &[Program::NewReference],
            _ if function.entry_only() => &[Program::Free],
            _ => &[Program::AllocReturn, Program::AllocEntry],
        }
    }
}

#[derive(Clone, Debug)]
pub struct AttachPoint {
    pub program: Program,
    /// The binary as the target sees it, and as we reach it.
    pub binary: String,
    pub host_path: PathBuf,
    pub symbol: &'static str,
    pub file_offset: u64,
    pub cookie: u64,
    pub placement: Placement,
}

/// A binary whose allocator functions are to be probed.
pub struct ProbedBinary<'a> {
    pub path: &'a str,
    pub elf: &'a ElfFile,
}

/// The C library the target has mapped, by the usual file names of glibc
/// and musl.
pub fn find_libc(target: &Target) -> Result<&str> {
    let found = target.map.executable_files().into_iter().find(|path| {
        let name = path.rsplit('/').next().unwrap_or(path);
        name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("ld-musl")
    });
    match found {
        Some(path) => Ok(path),
        None => bail!(
            "pid {} ({}) has no shared C library mapped (statically linked?); memtrace traces allocations through the target's libc",
            target.pid,
            target.comm
        ),
    }
}

/// Attach points for libc and, when given, the interpreter's allocator.
/// Return probes come before entry probes, so that no entry is recorded
/// whose return cannot be seen yet.
pub fn plan(pid: u32, libc: ProbedBinary, interpreter: Option<ProbedBinary>) -> Result<Vec<AttachPoint>> {
    let mut functions: Vec<(&ProbedBinary, AllocatorFn)> = LIBC_FUNCTIONS.iter().map(|f| (&libc, *f)).collect();
    if let Some(python) = &interpreter {
        let internal = PYMALLOC_INTERNAL.iter().all(|f| python.elf.symbol(f.symbol).is_some());
        let set = if internal { PYMALLOC_INTERNAL } else { PYMALLOC_EXPORTED };
        functions.extend(set.iter().chain(PYTHON_OBJECTS).map(|f| (python, *f)));
    }
    let mut points = Vec::new();
    let mut seen = Vec::new();
    for (binary, function) in functions {
        let Some(symbol) = binary.elf.symbol(function.symbol) else { continue };
        // glibc's aligned_alloc is memalign: one address, one probe.
        if seen.contains(&(binary.path, symbol.vaddr)) {
            continue;
        }
        seen.push((binary.path, symbol.vaddr));
        let index = u8::try_from(seen.len() - 1)?;
        let code = binary.elf.symbol_bytes(symbol)?;
        let placement = if function.entry_only() {
            let pointer = ArgReg::nth(function.ptr_arg);
            // Releasing NULL is a no-op, so a probe may skip that path.
            let null_is_noop = if function.op == op::NEW_REFERENCE { None } else { pointer };
            placement::entry_only(code, pointer.as_slice(), null_is_noop)
        } else {
            placement::at_entry(code)
        };
        let Some(file_offset) = binary.elf.file_offset(symbol.vaddr + placement.offset) else { continue };
        for &program in Program::for_function(&function) {
            points.push(AttachPoint {
                program,
                binary: binary.path.to_owned(),
                host_path: host_path(pid, binary.path),
                symbol: function.symbol,
                file_offset,
                cookie: function.cookie(index).to_u64(),
                placement: placement.clone(),
            });
        }
    }
    points.sort_by_key(|p| p.program != Program::AllocReturn);
    Ok(points)
}
