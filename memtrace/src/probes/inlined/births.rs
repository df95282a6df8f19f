//! Where memtrace must see an object born. tracemalloc moves a block's
//! traceback to the line that revives it from a free list, which only
//! `_Py_NewReference` sees; but most births follow an allocation on the
//! same line, where moving changes nothing, and a probe on the function
//! would trap on every object. This module takes every birth site of the
//! binary, the calls of `_Py_NewReference` (directly or through the PLT)
//! and its inlined copies (`new_reference`), and follows the object's
//! register back through the code (copies, spills to the stack, jumps
//! into the cold parts GCC splits off): a site where, on every path, the
//! object is what an allocator function just returned, or what an inlined
//! pop handed out, needs no probe. The others are probed at the site
//! itself, and the function's entry only when a call could escape this
//! count (its address is taken): memtrace proves a site fresh or probes it.
//!
//! Calls from other binaries (extension modules, such as `_asyncio` and
//! `_datetime`, which call `_Py_NewReference` through their own PLT) are
//! not seen once the function's entry is not probed: their revived
//! objects keep the line of their first allocation.

use std::collections::HashSet;

use iced_x86::{Code, FlowControl, OpKind, Register};

use super::{
    new_reference::{InlinedNewReferences, NewReferenceSite},
    pymalloc_fast_path::{InlinedPymalloc, allocator_table},
};
use crate::binary::{
    elf::ElfFile,
    x86::{Reg, Text, decode, gpr, memory_writes, register, writes_register, written},
};

const FUNCTION: &str = "_Py_NewReference";

/// Functions whose return value is a block just allocated at the caller's
/// line (or moved there, by realloc), across the versions, and libc's,
/// which pymalloc's copies inlined into callers fall back on for large
/// blocks: an object born in it is fresh.
const ALLOCATORS: &[&str] = &[
    "PyObject_Malloc",
    "PyObject_Calloc",
    "PyObject_Realloc",
    "_PyObject_GC_Malloc",
    "_PyObject_GC_Calloc",
    "_PyObject_GC_Resize",
    "gc_alloc",
    "PyMem_RawMalloc",
    "PyMem_RawCalloc",
    "malloc",
    "calloc",
    "realloc",
];

/// How many (instruction, register) states a site's backward walk may
/// visit before it gives up and the site is probed.
const BUDGET: usize = 400;

/// The birth sites to probe, and whether `_Py_NewReference`'s entry must
/// be probed too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Births {
    /// In address order.
    pub probed: Vec<NewReferenceSite>,
    /// How many sites were proven to follow an allocation.
    pub fresh: usize,
    /// Why the function's entry is probed, when it is.
    pub function_probed: Option<String>,
}

/// The birth sites of `elf` that need a probe, from its inlined copies
/// `inlined` and the calls of `_Py_NewReference`.
pub fn find(elf: &ElfFile, text: &Text, inlined: &InlinedNewReferences, pymalloc: Option<&InlinedPymalloc>) -> Births {
    let function = elf.symbol(FUNCTION).map(|s| s.vaddr);
    let plt_slot = elf.plt_slot(FUNCTION);
    let mut allocators: HashSet<u64> = ALLOCATORS
        .iter()
        .flat_map(|&name| elf.symbol(name).map(|s| s.vaddr).into_iter().chain(plt_stub(elf, text, name)))
        .collect();
    let mut block_loads = HashSet::new();
    if let Some(pymalloc) = pymalloc {
        allocators.insert(pymalloc.new_pool);
        block_loads.extend(pymalloc.pops.iter().map(|pop| pop.block_load));
    }
    // The malloc, calloc and realloc pointers of each domain, which the
    // guards of an LTO build call through when they hold no default.
    let slots = ["PyObject_Malloc", "PyMem_Malloc", "PyMem_RawMalloc"]
        .iter()
        .filter_map(|name| allocator_table(elf, name))
        .flat_map(|(slot, _)| [slot, slot + 8, slot + 16])
        .collect();
    let allocators = Allocations { functions: allocators, block_loads, slots };
    let mut sites: Vec<(usize, Reg)> =
        inlined.sites.iter().filter_map(|site| Some((text.index_of(site.vaddr)?, site.object))).collect();
    let stub = plt_slot.and_then(|_| plt_stub(elf, text, FUNCTION));
    for target in function.into_iter().chain(stub) {
        sites.extend(text.transfers_to(target).iter().map(|&k| (k, Reg::Rdi)));
    }
    let mut births = Births { function_probed: why_function_probed(elf, text, function), ..Births::default() };
    for (k, object) in sites {
        if follows_allocation(text, k, object, &allocators) {
            births.fresh += 1;
        } else {
            births.probed.push(NewReferenceSite { vaddr: text.insns[k].ip(), object });
        }
    }
    births.probed.sort_by_key(|s| s.vaddr);
    births.probed.dedup();
    births
}

/// Why `_Py_NewReference`'s entry must still be probed, if it must: calls
/// the sites do not show could reach it.
fn why_function_probed(elf: &ElfFile, text: &Text, function: Option<u64>) -> Option<String> {
    let function = function?;
    if elf.got_slot(FUNCTION).is_some() {
        return Some(format!("the GOT holds the address of {FUNCTION}"));
    }
    if let Some(ins) = text.insns.iter().find(|ins| {
        ins.flow_control() == FlowControl::Next
            && ((ins.is_ip_rel_memory_operand() && ins.ip_rel_memory_address() == function)
                || (0..ins.op_count())
                    .any(|n| ins.op_kind(n) == OpKind::Immediate32to64 && ins.immediate(n) == function))
    }) {
        return Some(format!("the code takes the address of {FUNCTION} at {:#x}", ins.ip()));
    }
    None
}

/// The PLT stub through which the binary calls its own exported function
/// `name`: a `jmp *slot(%rip)` (after an `endbr64` with IBT) through the
/// slot of `name`'s JUMP_SLOT relocation, found among the targets of the
/// calls that lead out of `.text`'s functions.
fn plt_stub(elf: &ElfFile, text: &Text, name: &str) -> Option<u64> {
    let slot = elf.plt_slot(name)?;
    let mut targets: Vec<u64> = text
        .insns
        .iter()
        .filter(|ins| ins.flow_control() == FlowControl::Call && ins.op0_kind() == OpKind::NearBranch64)
        .map(|ins| ins.near_branch_target())
        .filter(|&t| !text.starts_function(t))
        .collect();
    targets.sort_unstable();
    targets.dedup();
    targets.into_iter().find(|&target| {
        let Some(code) = elf.bytes_at(target, 16) else { return false };
        decode(code, target).take(2).find(|ins| ins.code() != Code::Endbr64).is_some_and(|ins| {
            ins.code() == Code::Jmp_rm64 && ins.is_ip_rel_memory_operand() && ins.ip_rel_memory_address() == slot
        })
    })
}

/// What hands out a block just allocated: the allocator functions (and
/// PLT stubs) whose return value it is, and the loads of the block of
/// pymalloc's pops inlined into callers.
struct Allocations {
    functions: HashSet<u64>,
    block_loads: HashSet<u64>,
    /// The allocator domains' function pointers (`_PyObject.malloc`...).
    slots: HashSet<u64>,
}

/// What a backward walk looks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wanted {
    /// A block just allocated.
    Block,
    /// A pointer loaded from an allocator domain's slot, called to allocate.
    Allocator,
}

/// Whether, on every path to instruction `site`, the object in `object`
/// there is a block `allocators` just handed out.
fn follows_allocation(text: &Text, site: usize, object: Reg, allocators: &Allocations) -> bool {
    traces_to(text, site, object, allocators, Wanted::Block)
}

/// Whether, on every path to instruction `site`, the value in `reg` there
/// is what `wanted` asks for.
fn traces_to(text: &Text, site: usize, object: Reg, allocators: &Allocations, wanted: Wanted) -> bool {
    let mut stack = vec![(site, Place::Register(object))];
    let mut seen = HashSet::new();
    while let Some((k, reg)) = stack.pop() {
        if !seen.insert((k, reg)) {
            continue;
        }
        if seen.len() > BUDGET || (text.starts_function(text.insns[k].ip()) && !is_cold_part(text, k)) {
            return false; // the walk is too long, or the object came in as an argument
        }
        let Some(from) = text.predecessors(k) else { return false };
        // Unreachable (padding after a return): no path comes this way.
        if from.is_empty() {
            continue;
        }
        for p in from {
            let before = match reg {
                Place::Register(reg) => before(text, p, reg, allocators, wanted),
                Place::Stack(offset) => before_in_stack(&text.insns[p], offset),
            };
            match before {
                Before::Same(place) => stack.push((p, place)),
                Before::Allocated => {}
                Before::Unknown => return false,
            }
        }
    }
    true
}

/// Where a walk's value is after an instruction.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Place {
    Register(Reg),
    /// Spilled to `offset(%rsp)` (around a call, say).
    Stack(u64),
}

/// Where the value `reg` holds after instruction `p` was before it.
enum Before {
    /// There.
    Same(Place),
    /// Nowhere: `p` called an allocator, which returned it.
    Allocated,
    /// Somewhere this walk does not follow (a load: a free list, perhaps).
    Unknown,
}

fn before(text: &Text, p: usize, reg: Reg, allocators: &Allocations, wanted: Wanted) -> Before {
    let ins = &text.insns[p];
    let loads_slot = ins.code() == Code::Mov_r64_rm64
        && ins.is_ip_rel_memory_operand()
        && allocators.slots.contains(&ins.ip_rel_memory_address());
    let origin = match wanted {
        Wanted::Block => allocators.block_loads.contains(&ins.ip()),
        Wanted::Allocator => loads_slot,
    };
    if origin && written(ins).contains(&reg) {
        return Before::Allocated;
    }
    let register = register(reg);
    match ins.flow_control() {
        FlowControl::Call | FlowControl::IndirectCall => {
            return match reg {
                Reg::Rax if wanted == Wanted::Block && calls_allocator(text, p, allocators) => Before::Allocated,
                // Kept across calls by the ABI.
                Reg::Rbx | Reg::Rbp | Reg::R12 | Reg::R13 | Reg::R14 | Reg::R15 => Before::Same(Place::Register(reg)),
                _ => Before::Unknown,
            };
        }
        _ if !writes_register(ins, register) => return Before::Same(Place::Register(reg)),
        _ => {}
    }
    let source = match ins.code() {
        // A copy, or the object's address from its block's (past a GC
        // header): either way the same allocation.
        Code::Mov_r64_rm64 | Code::Mov_rm64_r64
            if ins.op0_kind() == OpKind::Register && ins.op1_kind() == OpKind::Register =>
        {
            ins.op1_register()
        }
        Code::Lea_r64_m if ins.memory_index() == Register::None && !ins.is_ip_rel_memory_operand() => ins.memory_base(),
        // A reload of a spill.
        Code::Mov_r64_rm64 if stack_slot(ins).is_some() => {
            return stack_slot(ins).map_or(Before::Unknown, |offset| Before::Same(Place::Stack(offset)));
        }
        _ => return Before::Unknown,
    };
    match gpr(source) {
        Some(source) if source != Reg::Rsp => Before::Same(Place::Register(source)),
        _ => Before::Unknown,
    }
}

/// For an instruction whose memory operand is `offset(%rsp)`: the offset.
fn stack_slot(ins: &iced_x86::Instruction) -> Option<u64> {
    (ins.op_kinds().any(|kind| kind == OpKind::Memory)
        && ins.memory_base() == Register::RSP
        && ins.memory_index() == Register::None
        && ins.segment_prefix() == Register::None)
        .then(|| ins.memory_displacement64())
}

/// Where the value spilled to `offset(%rsp)` after instruction `ins` was
/// before it: in the register `ins` spills, or still there when `ins`
/// leaves the slot and the stack pointer alone (a call returns with both).
fn before_in_stack(ins: &iced_x86::Instruction, offset: u64) -> Before {
    if ins.code() == Code::Mov_rm64_r64 && stack_slot(ins) == Some(offset) {
        return match gpr(ins.op1_register()) {
            Some(source) if source != Reg::Rsp => Before::Same(Place::Register(source)),
            _ => Before::Unknown,
        };
    }
    let calls = matches!(ins.flow_control(), FlowControl::Call | FlowControl::IndirectCall);
    let moves_stack = !calls && writes_register(ins, Register::RSP);
    let writes_slot = memory_writes(ins)
        .iter()
        .any(|m| m.base() == Register::RSP && m.index() == Register::None && m.displacement().abs_diff(offset) < 8);
    if moves_stack || (!calls && writes_slot) { Before::Unknown } else { Before::Same(Place::Stack(offset)) }
}

/// Whether call `p` calls an allocator: directly, or through a domain's
/// pointer (`call *%reg` with the pointer loaded from its slot).
fn calls_allocator(text: &Text, p: usize, allocators: &Allocations) -> bool {
    let ins = &text.insns[p];
    if let Some(target) = text.direct_target(p) {
        return allocators.functions.contains(&target);
    }
    match ins.op0_kind() {
        OpKind::Register => {
            gpr(ins.op0_register()).is_some_and(|pointer| traces_to(text, p, pointer, allocators, Wanted::Allocator))
        }
        OpKind::Memory => ins.is_ip_rel_memory_operand() && allocators.slots.contains(&ins.ip_rel_memory_address()),
        _ => false,
    }
}

/// Whether the function starting at instruction `k` is a part its compiler
/// split off (GCC's `.cold`), entered from the rest with the rest's
/// registers: no call leads to it, and a conditional branch does (tail
/// calls are unconditional).
fn is_cold_part(text: &Text, k: usize) -> bool {
    let called =
        text.transfers_to(text.insns[k].ip()).iter().any(|&t| text.insns[t].flow_control() == FlowControl::Call);
    !called
        && text
            .predecessors(k)
            .is_some_and(|from| from.iter().any(|&p| text.insns[p].flow_control() == FlowControl::ConditionalBranch))
}
