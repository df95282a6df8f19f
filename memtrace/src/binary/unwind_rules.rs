//! The unwind rules of one ELF file, compiled for the kernel side's
//! unwinder (`memtrace_common::UnwindRule`) from the file's call frame
//! information: one at every return address of its `.text`, taken from the
//! row of the call before it (a call that never returns may be the last
//! instruction of its function), and on demand one at any instruction (a
//! probed one, where the instruction's own row holds). Addresses are the
//! file's; where a process maps them is the caller's business. A row the
//! kernel side cannot follow (a CFA given by an expression, a return
//! address not at CFA - 8, rbp kept in another register) gives no rule: an
//! unwinding stops there and counts it.

use gimli::{CfaRule, RegisterRule, X86_64};
use memtrace_common::UnwindRule;

use super::{
    eh_frame::{CallFrames, UnwindRow},
    elf::ElfFile,
    x86::Text,
};

/// The rule at each return address of the file's `.text`, in address
/// order; empty without call frame information.
pub fn return_address_rules(elf: &ElfFile) -> Vec<(u64, UnwindRule)> {
    let (Some(frames), Some(returns)) = (CallFrames::of(elf), Text::return_addresses(elf)) else { return Vec::new() };
    let mut rows = Vec::new();
    frames.each_row(|start, end, row| rows.push((start, end, compile(row))));
    rows.sort_unstable_by_key(|&(start, ..)| start);
    returns
        .into_iter()
        .filter_map(|return_address| {
            let call = return_address - 1;
            let &(_, end, rule) = rows[..rows.partition_point(|&(start, ..)| start <= call)].last()?;
            Some((return_address, rule.filter(|_| call < end)?))
        })
        .collect()
}

/// The rule at instruction `vaddr`.
pub fn instruction_rule(elf: &ElfFile, vaddr: u64) -> Option<UnwindRule> {
    compile(&CallFrames::of(elf)?.unwind_row(vaddr)?)
}

/// `row` as the kernel side follows it, if it can.
fn compile(row: &UnwindRow) -> Option<UnwindRule> {
    let mut rule = match row.register(X86_64::RA) {
        Some(RegisterRule::Offset(-8)) => UnwindRule::default(),
        // No return address: the outermost frame.
        None | Some(RegisterRule::Undefined) => return Some(UnwindRule::outermost()),
        Some(_) => return None,
    };
    let CfaRule::RegisterAndOffset { register, offset } = *row.cfa() else { return None };
    rule.cfa_offset = i32::try_from(offset).ok()?;
    match register {
        X86_64::RSP => {}
        X86_64::RBP => rule.flags |= UnwindRule::CFA_RBP,
        _ => return None,
    }
    match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue | RegisterRule::Undefined) => {}
        Some(RegisterRule::Offset(offset)) => {
            rule.flags |= UnwindRule::RBP_SAVED;
            rule.rbp_offset = i16::try_from(offset).ok()?;
        }
        Some(_) => return None,
    }
    Some(rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::proc_maps::MemoryMap;

    /// Unwinds this very thread's stack with the rules of this test
    /// executable (and of libc, which runs the thread), reading the stack
    /// in place: every frame of the nested calls below must be found, in
    /// order, as the kernel side would find them.
    #[test]
    fn the_rules_unwind_a_real_stack_through_code_without_frame_pointers() {
        let found = outer();
        let (outer_at, inner_at) =
            (outer as fn() -> Vec<u64> as usize as u64, inner as fn() -> Vec<u64> as usize as u64);
        let position = |function: u64| found.iter().position(|&pc| pc > function && pc < function + 0x400);
        let (inner, outer) = (position(inner_at), position(outer_at));
        assert!(inner.is_some() && outer.is_some() && inner < outer, "{found:x?}");
        // Through the test harness down to the thread's start.
        assert!(found.len() > outer.unwrap() + 3, "{found:x?}");
    }

    #[inline(never)]
    fn outer() -> Vec<u64> {
        let found = inner();
        std::hint::black_box(found)
    }

    #[inline(never)]
    fn inner() -> Vec<u64> {
        let found = unwind_here();
        std::hint::black_box(found)
    }

    #[inline(never)]
    fn unwind_here() -> Vec<u64> {
        let map = MemoryMap::read(std::process::id()).unwrap();
        let mut rules = std::collections::HashMap::new();
        for mapping in map.mappings.iter().filter(|m| m.executable && m.path.starts_with('/')) {
            let elf = ElfFile::open(std::path::Path::new(&mapping.path)).unwrap();
            for (vaddr, rule) in return_address_rules(&elf) {
                if let Some(address) = elf.file_offset(vaddr).and_then(|offset| mapping.address_of(offset)) {
                    rules.insert(address, rule);
                }
            }
        }
        let (pc, rsp, rbp): (u64, u64, u64);
        // SAFETY: reads three registers into locals; touches nothing else.
        unsafe {
            std::arch::asm!("lea {pc}, [rip]", "mov {rsp}, rsp", "mov {rbp}, rbp", pc = out(reg) pc, rsp = out(reg) rsp, rbp = out(reg) rbp);
        }
        // The pc is mid-function, not a return address: its own row holds.
        let here = map.find(pc).unwrap();
        let elf = ElfFile::open(std::path::Path::new(&here.path)).unwrap();
        let vaddr = elf.vaddr_of_offset(pc - here.start + here.file_offset).unwrap();
        let mut rule = instruction_rule(&elf, vaddr).unwrap();
        let (mut rsp, mut rbp) = (rsp, rbp);
        let mut found = Vec::new();
        // SAFETY: reads this thread's own live stack, above its pointer.
        let read = |at: u64| Some(unsafe { std::ptr::read(at as *const u64) });
        while let Some((caller, cfa, caller_rbp)) = rule.caller(rsp, rbp, read) {
            found.push(caller);
            (rsp, rbp) = (cfa, caller_rbp);
            let Some(&next) = rules.get(&caller) else { break };
            rule = next;
        }
        found
    }
}
