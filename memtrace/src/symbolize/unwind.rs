//! Unwinds a copied user stack with the binaries' own call frame
//! information (their .eh_frame rows, from `binary::eh_frame`). CPython, libc
//! and most distribution binaries keep no frame pointers, so this is how the
//! native frames between and beneath Python frames are found for
//! `--native`. It works on a copy the kernel took once per new site:
//! registers and up to 16 KiB of stack.

use std::collections::HashMap;

use gimli::{CfaRule, Register, RegisterRule, X86_64};
use memtrace_common::SiteStackCopy;

use crate::{
    binary::{
        eh_frame::{CallFrames, UnwindRow},
        elf::ElfFile,
    },
    process::proc_maps::{MappedPaths, MemoryMap},
};

/// Frames beyond this are not unwound (a loop in corrupt data ends here).
const MAX_FRAMES: usize = 128;

/// The registers unwinding needs: the CFA bases, the callee-saved ones the
/// CFI may restore, and the return address column.
const TRACKED: [Register; 8] =
    [X86_64::RA, X86_64::RSP, X86_64::RBP, X86_64::RBX, X86_64::R12, X86_64::R13, X86_64::R14, X86_64::R15];

/// The caller's registers, given this frame's and the unwind row for its
/// code.
fn caller(row: &UnwindRow, regs: &Registers, stack: &StackCopy) -> Option<Registers> {
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => regs.get(*register)?.checked_add_signed(*offset)?,
        // Expressions appear in PLT stubs and signal frames; stop there.
        CfaRule::Expression(_) => return None,
    };
    let mut caller = Registers::default();
    for register in TRACKED {
        let value = match row.register(register) {
            // Callee-saved registers the CFI does not mention keep their
            // value; an unmentioned return address ends the stack.
            None if register == X86_64::RA => None,
            None | Some(RegisterRule::SameValue) => regs.get(register),
            Some(RegisterRule::Offset(offset)) => stack.read(cfa.checked_add_signed(offset)?),
            Some(RegisterRule::ValOffset(offset)) => cfa.checked_add_signed(offset),
            Some(RegisterRule::Register(other)) => regs.get(other),
            Some(_) => None,
        };
        caller.set(register, value);
    }
    caller.set(X86_64::RSP, Some(cfa));
    Some(caller)
}

#[derive(Clone, Copy, Default)]
struct Registers([Option<u64>; 8]);

impl Registers {
    fn slot(register: Register) -> Option<usize> {
        TRACKED.iter().position(|&r| r == register)
    }

    fn get(&self, register: Register) -> Option<u64> {
        self.0[Self::slot(register)?]
    }

    fn set(&mut self, register: Register, value: Option<u64>) {
        if let Some(slot) = Self::slot(register) {
            self.0[slot] = value;
        }
    }
}

/// The copied stack: `bytes` as they were from address `base` up.
struct StackCopy<'a> {
    base: u64,
    bytes: &'a [u8],
}

impl StackCopy<'_> {
    fn read(&self, address: u64) -> Option<u64> {
        let at = usize::try_from(address.checked_sub(self.base)?).ok()?;
        Some(u64::from_le_bytes(self.bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
    }
}

pub struct Unwinder {
    /// How the target's mapped files are reached from here.
    paths: MappedPaths,
    /// Each mapped file, by the target's path; None when it cannot be read.
    files: HashMap<String, Option<ElfFile>>,
}

impl Unwinder {
    pub fn new(paths: MappedPaths) -> Self {
        Self { paths, files: HashMap::new() }
    }

    /// The return addresses of the copied stack, innermost first, starting
    /// with the frame the registers belong to.
    pub fn unwind(&mut self, map: &MemoryMap, copy: &SiteStackCopy) -> Vec<u64> {
        let [rip, rsp, rbp, rbx, r12, r13, r14, r15] = copy.regs;
        let len = (copy.len as usize).min(copy.stack.len());
        let stack = StackCopy { base: rsp, bytes: &copy.stack[..len] };
        let mut regs = Registers::default();
        for (register, value) in TRACKED.iter().zip([rip, rsp, rbp, rbx, r12, r13, r14, r15]) {
            regs.set(*register, Some(value));
        }
        let mut pcs = vec![rip];
        // A return address points after its call: look up the call itself.
        let mut lookup = if copy.rip_is_return != 0 { rip.saturating_sub(1) } else { rip };
        while pcs.len() < MAX_FRAMES {
            let Some(caller) = self.step(map, lookup, &regs, &stack) else { break };
            match caller.get(X86_64::RA) {
                Some(ra) if ra != 0 && caller.get(X86_64::RSP) > regs.get(X86_64::RSP) => {
                    pcs.push(ra);
                    lookup = ra - 1;
                    regs = caller;
                }
                _ => break,
            }
        }
        pcs
    }

    fn step(&mut self, map: &MemoryMap, pc: u64, regs: &Registers, stack: &StackCopy) -> Option<Registers> {
        let mapping = map.find(pc)?;
        // A return address forged into data (a file mapped without
        // execute, such as a device) is no code to unwind through.
        if mapping.path.is_empty() || !mapping.executable {
            return None;
        }
        let path = self.paths.host_path(&mapping.path);
        let elf = self.files.entry(mapping.path.clone()).or_insert_with(|| ElfFile::open(&path).ok()).as_ref()?;
        let vaddr = elf.vaddr_of_offset((pc - mapping.start).wrapping_add(mapping.file_offset))?;
        caller(&CallFrames::of(elf)?.unwind_row(vaddr)?, regs, stack)
    }
}
