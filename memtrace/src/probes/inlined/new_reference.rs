//! Finds the copies of `_Py_NewReference` inlined into CPython's callers.
//! An object taken from a free list (a tuple, a float, a list, a dict) is
//! reborn without an allocator call; only `_Py_NewReference` sees it, and
//! memtrace moves its block to the line that revived it there. CPython 3.8
//! defines it `static inline`, and LTO builds (Debian's python3.11) inline
//! the function into the free-list paths, so its entry probe misses those
//! births. Every copy, in 3.8 to 3.11, starts by testing
//! `_Py_tracemalloc_config.tracing` and, on the path where tracemalloc is
//! off, sets the new reference count: `movq $1,(%op)`. This module finds
//! each read of `tracing`, follows its branch to that store, and names the
//! store and its register. A read whose store it cannot find is left out,
//! and its births stay where the block was last allocated, as without it.

use iced_x86::{Code, ConditionCode, FlowControl, Instruction, OpKind, Register};

use super::text::{Gpr, Text, writes_register};
use crate::binary::elf::ElfFile;

/// `struct _PyTraceMalloc_Config { int initialized; int tracing; ... }`,
/// from 3.8 to 3.11; 3.12 moved it into `_PyRuntime` and made
/// `_Py_NewReference` a function again everywhere.
const TRACEMALLOC_CONFIG: &str = "_Py_tracemalloc_config";
const TRACING: u64 = 4;

/// How many instructions may lie between the read of `tracing` and its
/// branch, or between the branch and the reference count store (the copies
/// found need at most four).
const NEAR: usize = 8;

/// An inlined `_Py_NewReference`, probed at its `ob_refcnt = 1`: there
/// `object` holds the object being born.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewReferenceSite {
    pub vaddr: u64,
    pub object: Gpr,
}

/// The inlined copies found, and how many instructions refer to `tracing`:
/// the copies' tests plus tracemalloc's own code and the odd unmatched copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InlinedNewReferences {
    /// In address order, each store once.
    pub sites: Vec<NewReferenceSite>,
    pub tracing_references: usize,
}

/// Where code finds `_Py_tracemalloc_config.tracing`: at its address, or
/// (position-independent code) at `TRACING` past the address a GOT slot
/// holds.
struct Tracing {
    address: u64,
    got_slot: Option<u64>,
}

/// The inlined `_Py_NewReference` copies in `elf`, outside the out-of-line
/// function (which is probed by its symbol). Empty for 3.12 and later.
pub(super) fn find(elf: &ElfFile, text: &Text) -> InlinedNewReferences {
    let Some(config) = elf.symbol(TRACEMALLOC_CONFIG) else { return InlinedNewReferences::default() };
    let tracing = Tracing { address: config.vaddr + TRACING, got_slot: elf.got_slot(TRACEMALLOC_CONFIG) };
    let function = elf.symbol("_Py_NewReference").map(|s| s.vaddr);
    let mut found = InlinedNewReferences::default();
    for k in 0..text.insns.len() {
        let Some(read) = reads_tracing(text, k, &tracing) else { continue };
        found.tracing_references += 1;
        if let Some(site) = tests_value(text, read)
            .and_then(|flags| untraced_path(text, flags))
            .and_then(|start| refcount_store(text, start))
            && !function.is_some_and(|f| text.same_function(f, site.vaddr))
        {
            found.sites.push(site);
        }
    }
    found.sites.sort_by_key(|s| s.vaddr);
    found.sites.dedup();
    found
}

/// When instruction `k` starts a read of `tracing`, the instruction that
/// reads it: `k` itself, or, when `k` loads the GOT slot into a register,
/// the access through that register later on the same straight line.
fn reads_tracing(text: &Text, k: usize, tracing: &Tracing) -> Option<usize> {
    let ins = &text.insns[k];
    if !ins.is_ip_rel_memory_operand() {
        return None;
    }
    if ins.ip_rel_memory_address() == tracing.address {
        return Some(k);
    }
    if ins.code() != Code::Mov_r64_rm64 || Some(ins.ip_rel_memory_address()) != tracing.got_slot {
        return None;
    }
    let config = ins.op0_register();
    next_on_line(
        text,
        k,
        |next| {
            next.op_kinds().any(|kind| kind == OpKind::Memory)
                && next.memory_base() == config
                && next.memory_index() == Register::None
                && next.memory_displacement64() == TRACING
        },
        |next| writes_register(next, config),
    )
}

/// The instruction that sets the flags from `tracing`, read by instruction
/// `read`: `cmpl $0,<tracing>` itself, or the `test %r,%r` of a
/// `mov <tracing>,%r` later on the same straight line.
fn tests_value(text: &Text, read: usize) -> Option<usize> {
    let ins = &text.insns[read];
    match ins.code() {
        Code::Cmp_rm32_imm8 if ins.immediate(1) == 0 => Some(read),
        Code::Mov_r32_rm32 => {
            let register = ins.op0_register();
            next_on_line(
                text,
                read,
                |test| {
                    test.code() == Code::Test_rm32_r32
                        && test.op0_kind() == OpKind::Register
                        && test.op0_register() == register
                        && test.op1_register() == register
                },
                // The value or the flags are gone.
                |test| writes_register(test, register.full_register()) || test.rflags_modified() != 0,
            )
        }
        _ => None,
    }
}

/// The first instruction after `from`, on its straight line and within
/// `NEAR`, that `wanted` accepts, unless one that `spoils` comes first.
fn next_on_line(
    text: &Text,
    from: usize,
    wanted: impl Fn(&Instruction) -> bool,
    spoils: impl Fn(&Instruction) -> bool,
) -> Option<usize> {
    for k in from + 1..=text.line_end(from).min(from + NEAR) {
        let ins = &text.insns[k];
        if wanted(ins) {
            return Some(k);
        }
        if spoils(ins) {
            return None;
        }
    }
    None
}

/// The first instruction of the path taken when `tracing` was zero at the
/// flags set by instruction `flags`: the target of a `je`, or what follows a
/// `jne`, with no flag change in between.
fn untraced_path(text: &Text, flags: usize) -> Option<usize> {
    let branch = next_on_line(
        text,
        flags,
        |ins| ins.flow_control() == FlowControl::ConditionalBranch,
        |ins| ins.rflags_modified() != 0,
    )?;
    let ins = &text.insns[branch];
    match ins.condition_code() {
        ConditionCode::e => text.index_of(ins.near_branch_target()),
        ConditionCode::ne => text.insns.get(branch + 1).filter(|n| n.ip() == ins.next_ip()).map(|_| branch + 1),
        _ => None,
    }
}

/// The `movq $1,(%reg)` the straight line from `start` reaches within
/// `NEAR` instructions, through direct jumps.
fn refcount_store(text: &Text, start: usize) -> Option<NewReferenceSite> {
    let mut k = start;
    for _ in 0..NEAR {
        let ins = text.insns.get(k)?;
        if let Some(object) = sets_refcount_to_one(ins) {
            return Some(NewReferenceSite { vaddr: ins.ip(), object });
        }
        k = match ins.flow_control() {
            FlowControl::Next if text.falls_through(k) => k + 1,
            FlowControl::UnconditionalBranch => text.index_of(text.direct_target(k)?)?,
            _ => return None,
        };
    }
    None
}

/// For `movq $1,(%reg)`, which sets `ob_refcnt` (offset 0): the register.
fn sets_refcount_to_one(ins: &Instruction) -> Option<Gpr> {
    (ins.code() == Code::Mov_rm64_imm32
        && ins.op0_kind() == OpKind::Memory
        && ins.memory_index() == Register::None
        && ins.segment_prefix() == Register::None
        && ins.memory_displacement64() == 0
        && ins.immediate(1) == 1)
        .then(|| Gpr::of(ins.memory_base()))
        .flatten()
}
