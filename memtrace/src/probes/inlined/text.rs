//! `.text` of an ELF binary decoded into x86-64 instructions, function by
//! function, with the few questions the inlined-code finders ask of it:
//! where a straight line of code starts and ends, which instruction last
//! wrote a register, where a direct call or jump goes. The finders
//! (`pymalloc`, `new_reference`) match their patterns on this.

use std::collections::HashMap;

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, OpKind, Register,
    UsedMemory,
};

use crate::binary::{eh_frame::CallFrames, elf::ElfFile};

/// How many instructions around a site its pattern may spread over (the
/// copies found need three).
const WINDOW: usize = 8;

/// An x86-64 general register other than rsp, numbered by its hardware
/// encoding, as `memtrace_common::reg` and the BPF side's register file
/// (read from pt_regs) number them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    /// The hardware number (rax 0, rcx 1, ..., r15 15).
    pub fn number(self) -> u8 {
        self as u8
    }

    pub(super) fn of(register: Register) -> Option<Self> {
        Some(match register {
            Register::RAX => Self::Rax,
            Register::RCX => Self::Rcx,
            Register::RDX => Self::Rdx,
            Register::RBX => Self::Rbx,
            Register::RBP => Self::Rbp,
            Register::RSI => Self::Rsi,
            Register::RDI => Self::Rdi,
            Register::R8 => Self::R8,
            Register::R9 => Self::R9,
            Register::R10 => Self::R10,
            Register::R11 => Self::R11,
            Register::R12 => Self::R12,
            Register::R13 => Self::R13,
            Register::R14 => Self::R14,
            Register::R15 => Self::R15,
            _ => return None,
        })
    }
}

/// `.text`, decoded function by function.
pub(super) struct Text {
    /// Every instruction of every function, in address order.
    pub(super) insns: Vec<Instruction>,
    /// (start, end) of each function, from the FDEs, in address order.
    pub(super) functions: Vec<(u64, u64)>,
    /// Target -> the direct calls and jumps to it, by instruction index.
    pub(super) transfers: HashMap<u64, Vec<usize>>,
}

impl Text {
    /// Decodes each function the FDEs describe from its start, so that a
    /// misdecoded byte (padding, data) cannot shift the instruction
    /// boundaries of the next function. None without `.eh_frame`.
    pub(super) fn decode(elf: &ElfFile) -> Option<Self> {
        let text_address = elf.section_address(".text")?;
        let code = *elf.sections(&[".text"]).first()?;
        let mut functions = CallFrames::of(elf)?.functions()?;
        functions
            .retain(|&(start, end)| start >= text_address && end <= text_address + code.len() as u64 && start < end);
        functions.sort_unstable();
        // Overlapping FDEs would decode some bytes twice; keep the first.
        let mut covered = 0;
        functions.retain(|&(start, end)| {
            let keep = start >= covered;
            covered = covered.max(end);
            keep
        });
        let mut insns = Vec::with_capacity(code.len() / 4);
        for &(start, end) in &functions {
            let bytes = &code[(start - text_address) as usize..(end - text_address) as usize];
            insns.extend(Decoder::with_ip(64, bytes, start, DecoderOptions::NONE));
        }
        let mut text = Self { insns, functions, transfers: HashMap::new() };
        for k in 0..text.insns.len() {
            if let Some(target) = text.direct_target(k) {
                text.transfers.entry(target).or_default().push(k);
            }
        }
        (!text.insns.is_empty()).then_some(text)
    }

    pub(super) fn index_of(&self, vaddr: u64) -> Option<usize> {
        self.insns.binary_search_by_key(&vaddr, Instruction::ip).ok()
    }

    pub(super) fn starts_function(&self, vaddr: u64) -> bool {
        self.functions.binary_search_by_key(&vaddr, |&(start, _)| start).is_ok()
    }

    /// Whether `vaddr` lies in the function that starts at `function`.
    pub(super) fn same_function(&self, function: u64, vaddr: u64) -> bool {
        self.functions
            .binary_search_by_key(&function, |&(start, _)| start)
            .is_ok_and(|k| vaddr >= function && vaddr < self.functions[k].1)
    }

    /// Whether control passes from instruction `k` only to `k + 1`.
    pub(super) fn falls_through(&self, k: usize) -> bool {
        let ins = &self.insns[k];
        ins.flow_control() == FlowControl::Next && self.insns.get(k + 1).is_some_and(|n| n.ip() == ins.next_ip())
    }

    /// The first instruction of the straight line that reaches `i`, at most
    /// `WINDOW` back.
    pub(super) fn line_start(&self, i: usize) -> usize {
        let mut start = i;
        while start > 0 && i - start < WINDOW && self.falls_through(start - 1) {
            start -= 1;
        }
        start
    }

    /// The last instruction of the straight line from `i`, at most `WINDOW`
    /// on (it may branch).
    pub(super) fn line_end(&self, i: usize) -> usize {
        let mut end = i;
        while end - i < WINDOW && self.falls_through(end) {
            end += 1;
        }
        end
    }

    /// The last instruction in `from..to` that writes `register`.
    pub(super) fn last_writer(&self, from: usize, to: usize, register: Register) -> Option<usize> {
        (from..to).rev().find(|&k| writes_register(&self.insns[k], register))
    }

    pub(super) fn writes_register(&self, range: impl IntoIterator<Item = usize>, register: Register) -> bool {
        range.into_iter().any(|k| writes_register(&self.insns[k], register))
    }

    pub(super) fn writes_field(&self, range: impl IntoIterator<Item = usize>, base: Register, offset: u64) -> bool {
        range.into_iter().any(|k| memory_writes(&self.insns[k]).iter().any(|m| addresses(m, base, offset)))
    }

    /// The target of instruction `k` when it is a direct call or jump.
    pub(super) fn direct_target(&self, k: usize) -> Option<u64> {
        let ins = &self.insns[k];
        (matches!(ins.flow_control(), FlowControl::Call | FlowControl::UnconditionalBranch)
            && ins.op0_kind() == OpKind::NearBranch64)
            .then(|| ins.near_branch_target())
    }

    pub(super) fn transfers_to(&self, target: u64) -> &[usize] {
        self.transfers.get(&target).map_or(&[], Vec::as_slice)
    }
}

/// For `mov disp(%base),%register` (64-bit, no index): (base, disp).
pub(super) fn load64(ins: &Instruction, register: Register) -> Option<(Register, u64)> {
    (ins.code() == Code::Mov_r64_rm64
        && ins.op0_register() == register
        && ins.op1_kind() == OpKind::Memory
        && ins.memory_index() == Register::None
        && ins.segment_prefix() == Register::None)
        .then(|| (ins.memory_base(), ins.memory_displacement64()))
}

/// For `mov %value,disp(%base)` (64-bit, no index): (value, disp).
pub(super) fn store64(ins: &Instruction, base: Register) -> Option<(Register, u64)> {
    (ins.code() == Code::Mov_rm64_r64
        && ins.op0_kind() == OpKind::Memory
        && ins.memory_base() == base
        && ins.memory_index() == Register::None
        && ins.segment_prefix() == Register::None)
        .then(|| (ins.op1_register(), ins.memory_displacement64()))
}

pub(super) fn writes(access: OpAccess) -> bool {
    matches!(access, OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite)
}

pub(super) fn writes_register(ins: &Instruction, register: Register) -> bool {
    InstructionInfoFactory::new()
        .info(ins)
        .used_registers()
        .iter()
        .any(|used| writes(used.access()) && used.register().full_register() == register)
}

pub(super) fn memory_writes(ins: &Instruction) -> Vec<UsedMemory> {
    InstructionInfoFactory::new().info(ins).used_memory().iter().filter(|m| writes(m.access())).copied().collect()
}

/// Whether `memory` is `offset(%base)`.
pub(super) fn addresses(memory: &UsedMemory, base: Register, offset: u64) -> bool {
    memory.base() == base
        && memory.index() == Register::None
        && memory.segment() != Register::FS
        && memory.segment() != Register::GS
        && memory.displacement() == offset
}
