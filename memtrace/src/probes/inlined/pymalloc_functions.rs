//! Finds pymalloc's block pop inside its own allocation functions, in
//! builds that keep their symbols and call the allocator through its
//! pointer (pyenv's): there the compiler inlined `pymalloc_alloc` into
//! `_PyObject_Malloc` and `_PyObject_Calloc`, and one probe at its
//! `++pool->ref.count`, where the block is `*(pool + 8)` and the request is
//! in a register, replaces an entry and a return probe. It matches the pop
//! pattern of `pymalloc_fast_path` and answers only what it can prove, so
//! that memtrace never probes a guess: each function has exactly one pop,
//! whose request register is known and whose empty-pool side calls
//! `allocate_from_new_pool` (3.9+; probed at entry and return, it hands out
//! a new pool's first block), every other call leaves the binary (through
//! the PLT: to libc's malloc, which libc probes see, for requests over 512
//! bytes, or to memset), and no code but those pops and the realloc, still
//! probed at entry and return, calls `allocate_from_new_pool`. Otherwise it
//! says why, and memtrace probes the functions' entries and returns.

use iced_x86::FlowControl;

use super::pymalloc_fast_path::{PopSite, pops_in};
use crate::{
    binary::{elf::ElfFile, x86::Text},
    python::layouts::Layout,
};

/// The functions whose entry and return probes the pops replace.
pub const POPPING: [&str; 2] = ["_PyObject_Malloc", "_PyObject_Calloc"];
/// The functions that may call `allocate_from_new_pool` besides them:
/// probed at entry and return, they count their own allocations, and the
/// kernel side ignores pops and new pools inside them.
const STILL_PROBED: [&str; 1] = ["_PyObject_Realloc"];
const NEW_POOL: &str = "allocate_from_new_pool";

/// The pops inside `POPPING`, in that order, and `allocate_from_new_pool`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionPops {
    pub pops: Vec<PopSite>,
    pub new_pool: u64,
}

/// The pops of `elf`'s allocator functions, or why memtrace cannot rely on
/// them.
pub fn find(elf: &ElfFile, text: &Text, layout: &Layout) -> Result<FunctionPops, String> {
    let address = |name: &str| elf.symbol(name).map(|s| s.vaddr).ok_or_else(|| format!("no symbol {name}"));
    let functions: Vec<u64> = POPPING.iter().map(|name| address(name)).collect::<Result<_, _>>()?;
    let new_pool = address(NEW_POOL).map_err(|e| {
        format!("{e} (before 3.9 pymalloc hands out a new pool's first block inline, where no pop shows it)")
    })?;
    let mut pops = Vec::new();
    let mut slow_calls = Vec::new();
    for (name, function) in POPPING.into_iter().zip(functions) {
        let range = text.function_insns(function).ok_or_else(|| format!("{name} is not decoded"))?;
        let found = pops_in(text, layout, range.clone());
        let [(pop, slow_call)] = found[..] else {
            return Err(format!("{} pops of a pool's free list matched in {name}, not one", found.len()));
        };
        let Some((slow_call, _)) = slow_call.filter(|&(_, target)| target == new_pool) else {
            return Err(format!("the empty-pool side of {name}'s pop does not call {NEW_POOL}"));
        };
        if pop.request.is_none() {
            return Err(format!("the register holding {name}'s request at its pop is unknown"));
        }
        for k in range {
            let ins = &text.insns[k];
            match ins.flow_control() {
                FlowControl::IndirectCall => return Err(format!("{name} calls through a pointer at {:#x}", ins.ip())),
                FlowControl::Call | FlowControl::UnconditionalBranch => {
                    let Some(target) = text.direct_target(k) else { continue };
                    // Calls to functions of this binary could hand out
                    // blocks; the PLT leads out of it.
                    if text.starts_function(target) && !(target == new_pool && k == slow_call) {
                        return Err(format!("{name} calls {target:#x} at {:#x}", ins.ip()));
                    }
                }
                _ => {}
            }
        }
        pops.push(pop);
        slow_calls.push(slow_call);
    }
    let probed: Vec<u64> = STILL_PROBED.iter().map(|name| address(name)).collect::<Result<_, _>>()?;
    for &k in text.transfers_to(new_pool) {
        let vaddr = text.insns[k].ip();
        if !slow_calls.contains(&k) && !probed.iter().any(|&f| text.same_function(f, vaddr)) {
            return Err(format!("{NEW_POOL} is called at {vaddr:#x}, outside the allocator's functions"));
        }
    }
    Ok(FunctionPops { pops, new_pool })
}
