//! Turns a discovered target into a list of attach points: which allocator
//! functions exist in the target's own libc and interpreter, at which file
//! offset each probe goes (see placement), and the cookie that tells the
//! kernel side what each one does.

use std::path::PathBuf;

use anyhow::{Result, bail};

use memtrace_common::{NO_ARG, ProbeCookie, Reg, layer, op};

use super::{
    catalog::{
        ARENA_FUNCTION, AllocatorFn, LIBC_FUNCTIONS, POOL_NEW_FUNCTION, PYMALLOC_EXPORTED, PYMALLOC_INTERNAL,
        PYTHON_OBJECTS,
    },
    inlined::{InlinedCode, pymalloc_functions::POPPING},
    placement::{self, Placement},
};
use crate::{
    binary::elf::ElfFile,
    process::{Target, proc_maps::MappedPaths},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Program {
    AllocEntry,
    AllocReturn,
    Free,
    NewReference,
    PoolPop,
    /// `--type`: where a class's instance is allocated (a uprobe session).
    TypeAlloc,
    /// `--type` of a built-in type: where an object is born.
    TypeNewReference,
}

impl Program {
    pub const ALL: [Program; 7] = [
        Program::AllocEntry,
        Program::AllocReturn,
        Program::Free,
        Program::NewReference,
        Program::PoolPop,
        Program::TypeAlloc,
        Program::TypeNewReference,
    ];

    /// The BPF program's name in the object file.
    pub fn name(self) -> &'static str {
        match self {
            Program::AllocEntry => "alloc_entry",
            Program::AllocReturn => "alloc_return",
            Program::Free => "free_entry",
            Program::NewReference => "new_reference",
            Program::PoolPop => "pool_pop",
            Program::TypeAlloc => "type_alloc",
            Program::TypeNewReference => "type_new_reference",
        }
    }

    /// How the kernel runs it: at the entry, at the return, or at both as
    /// a uprobe session whose entry decides whether its return runs.
    pub fn kind(self) -> ProbeKind {
        match self {
            Program::AllocReturn => ProbeKind::Return,
            Program::TypeAlloc => ProbeKind::Session,
            _ => ProbeKind::Entry,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Entry,
    Return,
    Session,
}

#[derive(Clone, Debug)]
pub struct AttachPoint {
    pub program: Program,
    /// The binary as the target sees it, and as we reach it.
    pub binary: String,
    pub host_path: PathBuf,
    /// What is probed, for --verbose: a symbol, or an inlined site.
    pub symbol: String,
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

/// The interpreter's binary, and the code inlined in it: copies of
/// pymalloc's fast path (probed instead of its functions) and of
/// `_Py_NewReference` (probed besides the function).
pub struct PythonProbes<'a> {
    pub binary: ProbedBinary<'a>,
    pub inlined: &'a InlinedCode,
}

/// One probe to place: what it does, where, in which binary.
struct Resolved<'a> {
    binary: &'a ProbedBinary<'a>,
    function: AllocatorFn,
    label: String,
    vaddr: u64,
    code: &'a [u8],
}

/// Attach points for libc and, when given, the interpreter's allocator.
/// Return probes come before entry probes, so that no entry is recorded
/// whose return cannot be seen yet.
pub fn plan(paths: &MappedPaths, libc: ProbedBinary, python: Option<PythonProbes>) -> Result<Vec<AttachPoint>> {
    let mut resolved: Vec<Resolved> = LIBC_FUNCTIONS.iter().filter_map(|f| by_symbol(&libc, *f)).collect();
    let mut sites = Vec::new();
    if let Some(python) = &python {
        let binary = &python.binary;
        sites = inlined_sites(paths, binary, python.inlined);
        let new_pool = |vaddr: u64| Resolved {
            binary,
            function: POOL_NEW_FUNCTION,
            label: format!("allocate_from_new_pool@{vaddr:#x}"),
            vaddr,
            code: binary.elf.bytes_at(vaddr, 16).unwrap_or_default(),
        };
        let pymalloc: Vec<AllocatorFn> = match (&python.inlined.pymalloc, &python.inlined.function_pops) {
            // Every small block passes an inlined pop or push, or the
            // out-of-line new-pool path; function-level probes would count
            // some twice. Large blocks go to libc, which is probed.
            (Some(inlined), _) => {
                resolved.push(new_pool(inlined.new_pool));
                Vec::new()
            }
            // The pops and the new-pool path replace the probes of the
            // functions they are in; realloc and free keep theirs.
            (None, Ok(pops)) => {
                match pops.new_pool {
                    Some(vaddr) => resolved.push(new_pool(vaddr)),
                    // 3.8: pymalloc_alloc maps its arenas through it.
                    None => resolved.extend(by_symbol(binary, ARENA_FUNCTION)),
                }
                PYMALLOC_INTERNAL.iter().filter(|f| !POPPING.contains(&f.symbol)).copied().collect()
            }
            (None, Err(_)) if PYMALLOC_INTERNAL.iter().all(|f| binary.elf.symbol(f.symbol).is_some()) => {
                PYMALLOC_INTERNAL.to_vec()
            }
            (None, Err(_)) => PYMALLOC_EXPORTED.to_vec(),
        };
        // The function's entry, when calls the birth sites do not show
        // could reach it.
        let objects = if python.inlined.births.function_probed.is_some() { PYTHON_OBJECTS } else { &[] };
        resolved.extend(pymalloc.iter().chain(objects).filter_map(|f| by_symbol(binary, *f)));
    }
    let mut points = sites;
    let mut seen = Vec::new();
    let mut next_function = 0u8;
    for probe in resolved {
        // glibc's aligned_alloc is memalign: one address, one probe.
        if seen.contains(&(probe.binary.path, probe.vaddr)) {
            continue;
        }
        seen.push((probe.binary.path, probe.vaddr));
        let function = &probe.function;
        let placement = if function.entry_only() {
            let pointer = Reg::arg(function.ptr_arg);
            // Releasing NULL is a no-op, so a probe may skip that path.
            let null_is_noop = if function.op == op::NEW_REFERENCE { None } else { pointer };
            placement::entry_only(probe.code, pointer.as_slice(), null_is_noop)
        } else {
            placement::at_entry(probe.code)
        };
        let Some(file_offset) = probe.binary.elf.file_offset(probe.vaddr + placement.offset) else { continue };
        // A return probe must recognise its own entry's call among nested
        // ones; entry-only probes need no id.
        let id = if function.entry_only() {
            0
        } else {
            next_function =
                next_function.checked_add(1).ok_or_else(|| anyhow::anyhow!("too many allocator functions"))?;
            next_function
        };
        for &program in Program::for_function(function) {
            points.push(AttachPoint {
                program,
                binary: probe.binary.path.to_owned(),
                host_path: paths.host_path(probe.binary.path),
                symbol: probe.label.clone(),
                file_offset,
                cookie: function.cookie(id).to_u64(),
                placement: placement.clone(),
            });
        }
    }
    points.sort_by_key(|p| p.program != Program::AllocReturn);
    Ok(points)
}

fn by_symbol<'a>(binary: &'a ProbedBinary<'a>, function: AllocatorFn) -> Option<Resolved<'a>> {
    let symbol = binary.elf.symbol(function.symbol)?;
    let code = binary.elf.symbol_bytes(symbol).ok()?;
    Some(Resolved { binary, function, label: function.symbol.to_owned(), vaddr: symbol.vaddr, code })
}

/// Why an inlined site is probed exactly where the finder named it.
const NAMED_REGISTERS: &str = "the registers it names hold there only";
/// Why an inlined pop is probed at its increment, which the kernel
/// single-steps, rather than just past it.
const UNMOVED_POP: &str = "at the pop's increment, the registers it names hold there only: no instruction past it that the kernel emulates is provably reached from the pop alone (its function has a jump table memtrace cannot bound, or a branch into the pop's line)";

/// Probes on inlined copies of pymalloc's fast path and of
/// `_Py_NewReference`, exactly at the instruction the finder named (the
/// registers it names hold there only).
fn inlined_sites(paths: &MappedPaths, binary: &ProbedBinary, inlined: &InlinedCode) -> Vec<AttachPoint> {
    let (pops, taken, pushes) = match (&inlined.pymalloc, &inlined.function_pops) {
        (Some(p), _) => (&p.pops[..], &[][..], &p.pushes[..]),
        (None, Ok(p)) => (&[][..], &p.taken[..], &[][..]),
        (None, Err(_)) => (&[][..], &[][..], &[][..]),
    };
    // Every inlined site is pymalloc's layer and names its registers itself.
    let cookie = |op, ptr_reg, size_reg| ProbeCookie {
        op,
        layer: layer::PYMALLOC,
        size_reg,
        count_reg: NO_ARG,
        ptr_reg,
        function: 0,
    };
    // A pop is probed past itself where the kernel emulates an instruction
    // there, else at its increment.
    let taken = pops.iter().filter_map(|pop| pop.taken).chain(taken.iter().copied()).map(|taken| {
        let request = taken.request.map_or(NO_ARG, |r| r.number());
        (
            Program::PoolPop,
            taken.vaddr,
            cookie(op::POOL_TAKEN, taken.block.number(), request),
            "pymalloc block taken",
            NAMED_REGISTERS,
        )
    });
    let pops = pops.iter().filter(|pop| pop.taken.is_none()).map(|pop| {
        let request = pop.request.map_or(NO_ARG, |r| r.number());
        (Program::PoolPop, pop.vaddr, cookie(op::POOL_POP, pop.pool.number(), request), "pymalloc pop", UNMOVED_POP)
    });
    let pushes = pushes.iter().map(|push| {
        (Program::Free, push.vaddr, cookie(op::FREE, push.block.number(), NO_ARG), "pymalloc push", NAMED_REGISTERS)
    });
    let births = inlined.births.probed.iter().map(|site| {
        let cookie = cookie(op::NEW_REFERENCE, site.object.number(), NO_ARG);
        (Program::NewReference, site.vaddr, cookie, "_Py_NewReference", NAMED_REGISTERS)
    });
    taken
        .chain(pops)
        .chain(pushes)
        .chain(births)
        .filter_map(|(program, vaddr, cookie, kind, reason)| {
            let code = binary.elf.bytes_at(vaddr, 16)?;
            Some(AttachPoint {
                program,
                binary: binary.path.to_owned(),
                host_path: paths.host_path(binary.path),
                symbol: format!("{kind}@{vaddr:#x}"),
                file_offset: binary.elf.file_offset(vaddr)?,
                cookie: cookie.to_u64(),
                placement: placement::exact(code, reason),
            })
        })
        .collect()
}
