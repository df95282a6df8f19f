//! Finds, inside pymalloc's own allocation functions, the one instruction
//! every block they hand out passes, in builds that keep their symbols and
//! call the allocator through its pointer (pyenv's): one probe there, which
//! the kernel emulates, replaces an entry and a return probe. Two shapes:
//!
//! - 3.9+: the compiler inlined `pymalloc_alloc` into `_PyObject_Malloc`
//!   and `_PyObject_Calloc`. Each has one pop (the pattern of
//!   `pymalloc_fast_path`), probed just past it where the block is in a
//!   register (the `je` taken when the pool's free list ran out), whose
//!   empty-pool side calls `allocate_from_new_pool` (probed at entry and
//!   return: it hands out a new pool's first block), and no code but those
//!   pops and the realloc, still probed at entry and return, calls
//!   `allocate_from_new_pool`.
//! - 3.8: `pymalloc_alloc` stays a function (it hands out new pools' first
//!   blocks inline) returning the block or NULL; each of the two calls it
//!   once and tests the result, `call pymalloc_alloc; test %rax,%rax; je
//!   <libc>`, probed at that `je`, and nothing but them and the realloc
//!   calls it.
//!
//! In both, every other call leaves the binary (through the PLT: to libc's
//! malloc, which libc probes see, for requests over 512 bytes, or to
//! memset), and the request is in a known register at the probe. It answers
//! only what it can prove, so that memtrace never probes a guess; otherwise
//! it says why, and memtrace probes the functions' entries and returns.

use std::ops::Range;

use iced_x86::{Code, FlowControl, Mnemonic, OpKind, Register};

use super::pymalloc_fast_path::{TakenAt, pops_in};
use crate::{
    binary::{
        elf::ElfFile,
        x86::{Reg, Text, gpr, written},
    },
    probes::{catalog::ARENA_FUNCTION, placement},
    python::layouts::Layout,
};

/// The functions whose entry and return probes the probes found replace.
pub const POPPING: [&str; 2] = ["_PyObject_Malloc", "_PyObject_Calloc"];
/// The functions that may call `allocate_from_new_pool` or 3.8's
/// `pymalloc_alloc` besides them: probed at entry and return, they count
/// their own allocations, and the kernel side ignores pops and new pools
/// inside them.
const STILL_PROBED: [&str; 1] = ["_PyObject_Realloc"];
const NEW_POOL: &str = "allocate_from_new_pool";
/// 3.8's out-of-line allocator, under the names GCC gives it (with its
/// unused context argument dropped).
const ALLOC_FUNCTION: [&str; 2] = ["pymalloc_alloc", "pymalloc_alloc.constprop.0"];
/// Registers a call leaves alone (SysV): a request kept in one survives
/// the call of `pymalloc_alloc`.
const CALLEE_SAVED: [Reg; 6] = [Reg::Rbx, Reg::Rbp, Reg::R12, Reg::R13, Reg::R14, Reg::R15];

/// Where `POPPING`'s blocks are seen, in that order, and
/// `allocate_from_new_pool` where pymalloc has it (3.9+). Without it (3.8)
/// `ARENA_FUNCTION` must be probed instead: `pymalloc_alloc`, not probed,
/// maps arenas through it (3.9+ does inside `allocate_from_new_pool`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionPops {
    pub taken: Vec<TakenAt>,
    pub new_pool: Option<u64>,
}

/// The probe points of `elf`'s allocator functions, or why memtrace cannot
/// rely on them.
pub fn find(elf: &ElfFile, text: &Text, layout: &Layout) -> Result<FunctionPops, String> {
    let address = |name: &str| elf.symbol(name).map(|s| s.vaddr).ok_or_else(|| format!("no symbol {name}"));
    let functions: Vec<(&str, Range<usize>)> = POPPING
        .iter()
        .map(|&name| {
            let range = text.function_insns(address(name)?).ok_or_else(|| format!("{name} is not decoded"))?;
            Ok((name, range))
        })
        .collect::<Result<_, String>>()?;
    let (hands_out, taken, new_pool) = match elf.symbol(NEW_POOL) {
        Some(new_pool) => (new_pool.vaddr, pops(elf, text, layout, &functions, new_pool.vaddr)?, Some(new_pool.vaddr)),
        None => {
            let alloc = ALLOC_FUNCTION
                .iter()
                .find_map(|name| elf.symbol(name))
                .ok_or_else(|| format!("neither {NEW_POOL} (3.9+) nor pymalloc_alloc (3.8) is among its symbols"))?;
            address(ARENA_FUNCTION.symbol)?;
            let taken = functions
                .iter()
                .map(|(name, range)| returned_block(elf, text, name, range.clone(), alloc.vaddr))
                .collect::<Result<_, String>>()?;
            (alloc.vaddr, taken, None)
        }
    };
    // Calls to functions of this binary could hand out blocks; the PLT
    // leads out of it.
    for (name, range) in &functions {
        for k in range.clone() {
            let ins = &text.insns[k];
            match ins.flow_control() {
                FlowControl::IndirectCall => return Err(format!("{name} calls through a pointer at {:#x}", ins.ip())),
                FlowControl::Call | FlowControl::UnconditionalBranch => {
                    let Some(target) = text.direct_target(k) else { continue };
                    if text.starts_function(target) && target != hands_out {
                        return Err(format!("{name} calls {target:#x} at {:#x}", ins.ip()));
                    }
                }
                _ => {}
            }
        }
    }
    let probed: Vec<u64> = STILL_PROBED.iter().map(|name| address(name)).collect::<Result<_, _>>()?;
    for &k in text.transfers_to(hands_out) {
        let vaddr = text.insns[k].ip();
        let popping = functions.iter().any(|(_, range)| range.contains(&k));
        if !popping && !probed.iter().any(|&f| text.same_function(f, vaddr)) {
            return Err(format!("{hands_out:#x} is called at {vaddr:#x}, outside the allocator's functions"));
        }
    }
    Ok(FunctionPops { taken, new_pool })
}

/// 3.9+: the probe past each function's one pop, whose empty-pool side
/// calls `new_pool`.
fn pops(
    elf: &ElfFile,
    text: &Text,
    layout: &Layout,
    functions: &[(&str, Range<usize>)],
    new_pool: u64,
) -> Result<Vec<TakenAt>, String> {
    let mut taken = Vec::new();
    for (name, range) in functions {
        let found = pops_in(elf, text, layout, range.clone());
        let [(pop, slow_call)] = found[..] else {
            return Err(format!("{} pops of a pool's free list matched in {name}, not one", found.len()));
        };
        if slow_call.is_none_or(|(_, target)| target != new_pool) {
            return Err(format!("the empty-pool side of {name}'s pop does not call {NEW_POOL}"));
        }
        if pop.request.is_none() {
            return Err(format!("the register holding {name}'s request at its pop is unknown"));
        }
        // The pop itself, `addl $1,(%pool)`, is single-stepped, which
        // costs more than the entry and return probes it would replace.
        let Some(past) = pop.taken else {
            return Err(format!(
                "{name}'s pop at {:#x} has no instruction the kernel emulates past it, and the kernel single-steps the pop itself",
                pop.vaddr
            ));
        };
        taken.push(past);
    }
    Ok(taken)
}

/// 3.8: the `je`/`jne` that tests what `function`'s one call of `alloc`
/// returned, where the block (or NULL, for requests it leaves to libc) is
/// in rax and the request in a register the call preserved.
fn returned_block(elf: &ElfFile, text: &Text, name: &str, range: Range<usize>, alloc: u64) -> Result<TakenAt, String> {
    let calls: Vec<usize> = range.clone().filter(|&k| text.direct_target(k) == Some(alloc)).collect();
    let [call] = calls[..] else {
        return Err(format!("{name} calls pymalloc_alloc {} times, not once", calls.len()));
    };
    let (test, branch) = (call + 1, call + 2);
    let tests_result = text.insns.get(test).is_some_and(|ins| {
        ins.code() == Code::Test_rm64_r64
            && ins.op0_kind() == OpKind::Register
            && ins.op0_register() == Register::RAX
            && ins.op1_register() == Register::RAX
    });
    let ins = text.insns.get(branch).ok_or_else(|| format!("{name} ends after its call of pymalloc_alloc"))?;
    if !tests_result || !matches!(ins.mnemonic(), Mnemonic::Je | Mnemonic::Jne) || !range.contains(&branch) {
        return Err(format!("{name} does not test what pymalloc_alloc returns at {:#x}", ins.ip()));
    }
    if text.predecessors(test) != Some(vec![call]) || text.predecessors(branch) != Some(vec![test]) {
        return Err(format!("{name} branches into the test of what pymalloc_alloc returns"));
    }
    if !elf.bytes_at(ins.ip(), ins.len() as u64).is_some_and(placement::emulated) {
        return Err(format!("the kernel single-steps {name}'s test of what pymalloc_alloc returns"));
    }
    // The NULL side falls back on libc, through the PLT.
    let null_side = match ins.mnemonic() {
        Mnemonic::Je => text.index_of(ins.near_branch_target()),
        _ => Some(branch + 1),
    };
    if null_side.and_then(|k| text.call_reached(k)).is_none_or(|(_, target)| text.starts_function(target)) {
        return Err(format!("{name}'s side for requests pymalloc_alloc leaves does not call out of the binary"));
    }
    let request = request_at_call(text, range.start, call)
        .ok_or_else(|| format!("the register holding {name}'s request past its call of pymalloc_alloc is unknown"))?;
    Ok(TakenAt { vaddr: ins.ip(), block: Reg::Rax, request: Some(request) })
}

/// A callee-saved register holding, at the call at `call`, what its first
/// argument holds (pymalloc_alloc's request, in rdi), following copies on
/// the straight line from the function's entry at `entry`.
fn request_at_call(text: &Text, entry: usize, call: usize) -> Option<Reg> {
    // Which value each register holds, by register number: its own at the
    // entry, a copy's source's after `mov %src,%dst`, a new one (16 + the
    // writer's index) after any other write.
    let mut values: [usize; 16] = std::array::from_fn(|n| n);
    for k in entry..call {
        if !text.falls_through(k) {
            return None;
        }
        let ins = &text.insns[k];
        let copy = (ins.code() == Code::Mov_rm64_r64 && ins.op0_kind() == OpKind::Register)
            .then(|| Some((gpr(ins.op0_register())?, gpr(ins.op1_register())?)))
            .flatten();
        match copy {
            Some((to, from)) => values[to.number() as usize] = values[from.number() as usize],
            None => written(ins).into_iter().for_each(|reg| values[reg.number() as usize] = 16 + k),
        }
    }
    let argument = values[Reg::Rdi.number() as usize];
    CALLEE_SAVED.into_iter().find(|reg| values[reg.number() as usize] == argument)
}
