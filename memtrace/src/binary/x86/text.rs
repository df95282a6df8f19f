//! `.text` of an ELF binary decoded into x86-64 instructions, function by
//! function, with the few questions the inlined-code finders ask of it:
//! where a straight line of code starts and ends, which instruction last
//! wrote a register, where a direct call or jump goes, and where control
//! may come to an instruction from (direct branches, and the jump tables
//! it can read and bound; a function with another indirect jump that is not
//! a tail call answers nothing). The finders
//! (`probes::inlined`) match their patterns on this; the unwind rules
//! (`binary::unwind_rules`) take its return addresses.

use std::collections::{HashMap, HashSet};

use iced_x86::{FlowControl, Instruction, Mnemonic, OpKind, Register};

use super::{addresses, decode, memory_writes, writes_register};
use crate::binary::{eh_frame::CallFrames, elf::ElfFile};

/// How many instructions around a site its pattern may spread over (the
/// copies found need three).
const WINDOW: usize = 8;
/// The most entries a jump table is read for (CPython's computed gotos
/// have 256); a switch whose range check allows more is not resolved.
const MAX_TABLE: usize = 4096;
/// How far back a table's index is followed to its bound.
const BOUND_REACH: usize = 16;

/// `.text`, decoded function by function.
pub struct Text {
    /// Every instruction of every function, in address order.
    pub insns: Vec<Instruction>,
    /// (start, end) of each function, from the FDEs, in address order.
    functions: Vec<(u64, u64)>,
    /// Target -> the direct calls and jumps to it, by instruction index.
    transfers: HashMap<u64, Vec<usize>>,
    /// Target -> the conditional branches to it, by instruction index.
    branches: HashMap<u64, Vec<usize>>,
    /// Starts of the functions that dispatch through a jump table, to
    /// instructions no decoding names.
    jumps_through_pointers: HashSet<u64>,
}

impl Text {
    /// Decodes each function the FDEs describe from its start, so that a
    /// misdecoded byte (padding, data) cannot shift the instruction
    /// boundaries of the next function. None without `.eh_frame`.
    pub fn decode(elf: &ElfFile) -> Option<Self> {
        let functions = Functions::of(elf)?;
        let mut insns = Vec::with_capacity(functions.code.len() / 4);
        functions.decode(|ins| insns.push(*ins));
        let mut text = Self {
            insns,
            functions: functions.ranges,
            transfers: HashMap::new(),
            branches: HashMap::new(),
            jumps_through_pointers: HashSet::new(),
        };
        let mut dispatches = Vec::new();
        for k in 0..text.insns.len() {
            let ins = &text.insns[k];
            if let Some(target) = text.direct_target(k) {
                text.transfers.entry(target).or_default().push(k);
            } else if ins.flow_control() == FlowControl::ConditionalBranch && ins.op0_kind() == OpKind::NearBranch64 {
                text.branches.entry(ins.near_branch_target()).or_default().push(k);
            } else if ins.flow_control() == FlowControl::IndirectBranch && !text.tail_call(k) {
                dispatches.push(k);
            }
        }
        // Jump tables are read once every direct branch is known, which the
        // bound on a table's index is proven with.
        let mut opaque = HashSet::new();
        let mut tables = Vec::new();
        for k in dispatches {
            match text.table_targets(elf, k) {
                Some(targets) => tables.push((k, targets)),
                None => opaque.extend(text.function_of(text.insns[k].ip())),
            }
        }
        for (k, targets) in tables {
            for target in targets {
                text.branches.entry(target).or_default().push(k);
            }
        }
        text.jumps_through_pointers = opaque;
        (!text.insns.is_empty()).then_some(text)
    }

    /// Every return address of `.text`: the address after each call, in
    /// address order, decoded as `decode` does but without keeping the
    /// instructions. None without `.eh_frame`.
    pub fn return_addresses(elf: &ElfFile) -> Option<Vec<u64>> {
        let functions = Functions::of(elf)?;
        let mut returns = Vec::new();
        functions.decode(|ins| {
            if matches!(ins.flow_control(), FlowControl::Call | FlowControl::IndirectCall) {
                returns.push(ins.next_ip());
            }
        });
        Some(returns)
    }

    /// The index of the instruction at `vaddr`, if one starts there.
    pub fn index_of(&self, vaddr: u64) -> Option<usize> {
        self.insns.binary_search_by_key(&vaddr, Instruction::ip).ok()
    }

    /// Whether an FDE describes a function starting at `vaddr`.
    pub fn starts_function(&self, vaddr: u64) -> bool {
        self.functions.binary_search_by_key(&vaddr, |&(start, _)| start).is_ok()
    }

    /// The instructions of the function that starts at `function`, by
    /// index.
    pub fn function_insns(&self, function: u64) -> Option<std::ops::Range<usize>> {
        let k = self.functions.binary_search_by_key(&function, |&(start, _)| start).ok()?;
        let end = self.functions[k].1;
        let first = self.index_of(function)?;
        Some(first..first + self.insns[first..].partition_point(|ins| ins.ip() < end))
    }

    /// The start of the function `vaddr` lies in.
    pub fn function_of(&self, vaddr: u64) -> Option<u64> {
        let k = self.functions.partition_point(|&(start, _)| start <= vaddr).checked_sub(1)?;
        let (start, end) = self.functions[k];
        (vaddr < end).then_some(start)
    }

    /// Where control may come to instruction `k` from: the instruction
    /// before it when that falls or calls through, and every direct branch
    /// or call to it in `.text`. None when its function also jumps through
    /// pointers, which may lead anywhere in it.
    pub fn predecessors(&self, k: usize) -> Option<Vec<usize>> {
        let ins = &self.insns[k];
        if self.jumps_through_pointers.contains(&self.function_of(ins.ip())?) {
            return None;
        }
        let mut from: Vec<usize> = self.transfers_to(ins.ip()).to_vec();
        from.extend(self.branches.get(&ins.ip()).into_iter().flatten());
        if let Some(before) = k.checked_sub(1)
            && self.insns[before].next_ip() == ins.ip()
            && matches!(
                self.insns[before].flow_control(),
                FlowControl::Next | FlowControl::Call | FlowControl::IndirectCall | FlowControl::ConditionalBranch
            )
        {
            from.push(before);
        }
        Some(from)
    }

    /// Whether the indirect jump at `k` leaves its function through a
    /// function pointer (`jmp *disp(%rip)`, or `jmp *%r` with no jump
    /// table's dispatch before it on its straight line) rather than
    /// dispatching through a jump table, which GCC computes right before
    /// the jump (`jmp *table(,%i,8)`; `movslq (%base,%i,4),%r; add
    /// %base,%r; jmp *%r`) and marks `notrack` under CET, and whose targets
    /// no decoding names. Tail calls through CPython's allocator pointers
    /// would otherwise hide every branch target of their function.
    fn tail_call(&self, k: usize) -> bool {
        let ins = &self.insns[k];
        if ins.segment_prefix() == Register::DS {
            return false; // notrack
        }
        match ins.op0_kind() {
            OpKind::Memory => ins.memory_index() == Register::None && ins.memory_base() == Register::RIP,
            OpKind::Register => {
                let start = self.line_start(k);
                let target = ins.op0_register();
                let dispatch = (start..k).rev().find(|&w| writes_register(&self.insns[w], target)).is_some_and(|w| {
                    let writer = &self.insns[w];
                    let indexed = (0..writer.op_count())
                        .any(|n| writer.op_kind(n) == OpKind::Memory && writer.memory_index() != Register::None);
                    indexed || writer.mnemonic() == Mnemonic::Add
                });
                !dispatch
            }
            _ => false,
        }
    }

    /// The targets of the jump-table dispatch at `k`, read from the table:
    /// GCC's absolute tables (`jmp *T(,%i,8)`, or `mov T(,%i,8),%r; jmp
    /// *%r`, as non-PIE code and computed gotos dispatch) and relative ones
    /// (`lea T(%rip),%b; movslq (%b,%i,4),%r; add %b,%r; jmp *%r` on one
    /// straight line, as PIC code does), as many entries as the index can
    /// take (`index_bound`). Targets may lie in other FDEs (GCC's cold
    /// parts) but must lie in `.text`. None for a dispatch whose table or
    /// bound is not found this way: its function's branch targets stay
    /// unknown.
    fn table_targets(&self, elf: &ElfFile, k: usize) -> Option<Vec<u64>> {
        let ins = &self.insns[k];
        let indexed =
            |i: &Instruction, scale: u32| i.memory_index() != Register::None && i.memory_index_scale() == scale;
        let line = self.line_start(k);
        let last_write =
            |to: usize, register: Register| (line..to).rev().find(|&w| writes_register(&self.insns[w], register));
        let (table, entry_size, load) = if ins.op0_kind() == OpKind::Memory {
            if ins.memory_base() != Register::None || !indexed(ins, 8) {
                return None;
            }
            (ins.memory_displacement64(), 8, k)
        } else {
            let target = ins.op0_register();
            let writer = last_write(k, target)?;
            let load = &self.insns[writer];
            if load.mnemonic() == Mnemonic::Mov && load.op1_kind() == OpKind::Memory {
                if load.memory_base() != Register::None || !indexed(load, 8) {
                    return None;
                }
                (load.memory_displacement64(), 8, writer)
            } else {
                // add %b,%r after movslq (%b,%i,4),%r, with %b = lea T(%rip).
                if load.mnemonic() != Mnemonic::Add || load.op1_kind() != OpKind::Register {
                    return None;
                }
                let base = load.op1_register();
                let entry = last_write(writer, target)?;
                let movslq = &self.insns[entry];
                if movslq.mnemonic() != Mnemonic::Movsxd || movslq.memory_base() != base || !indexed(movslq, 4) {
                    return None;
                }
                let lea = &self.insns[last_write(writer, base)?];
                if lea.mnemonic() != Mnemonic::Lea || !lea.is_ip_rel_memory_operand() {
                    return None;
                }
                (lea.ip_rel_memory_address(), 4, entry)
            }
        };
        let entries = self.index_bound(load)?;
        (0..entries)
            .map(|n| {
                let bytes = elf.bytes_at(table + entry_size * n, entry_size)?;
                let target = match entry_size {
                    8 => u64::from_le_bytes(bytes.try_into().ok()?),
                    _ => table.wrapping_add(i32::from_le_bytes(bytes.try_into().ok()?) as i64 as u64),
                };
                self.function_of(target).map(|_| target)
            })
            .collect()
    }

    /// How many values the index of the table read at `load` can take,
    /// following its value back along the only path to the load (through
    /// 32-bit copies, sign extensions and zero extensions): N + 1 after
    /// `cmp $N,%i; ja` (a switch's range check, on as many of the index's
    /// low bytes as the extensions kept), else 256 when it was zero-extended
    /// from a byte (computed gotos on an opcode); None otherwise, or over
    /// `MAX_TABLE`.
    fn index_bound(&self, load: usize) -> Option<u64> {
        let mut index = self.insns[load].memory_index().full_register();
        // The narrowest compare that bounds the index: a 32-bit write
        // zero-extends, a zero extension from a byte keeps one byte.
        let mut least = 4;
        let mut extended: Option<u64> = None;
        let within = |bound: u64| (bound <= MAX_TABLE as u64).then_some(bound);
        let mut k = load;
        for _ in 0..BOUND_REACH {
            let w = match self.predecessors(k).as_deref() {
                Some(&[w]) => w,
                _ => break,
            };
            let ins = &self.insns[w];
            // A call may change any caller-saved register, which iced does
            // not list as written.
            if matches!(ins.flow_control(), FlowControl::Call | FlowControl::IndirectCall) {
                break;
            }
            if ins.mnemonic() == Mnemonic::Ja && ins.next_ip() == self.insns[k].ip() {
                // Only the compare right before may have set its flags.
                let Some(c) = w.checked_sub(1).filter(|&c| self.predecessors(w).is_some_and(|p| p == [c])) else {
                    break;
                };
                let cmp = &self.insns[c];
                let bounds_index = cmp.mnemonic() == Mnemonic::Cmp
                    && cmp.op0_kind() == OpKind::Register
                    && cmp.op0_register().size() >= least
                    && cmp.op0_register().full_register() == index
                    && !matches!(cmp.op1_kind(), OpKind::Register | OpKind::Memory);
                if !bounds_index {
                    break;
                }
                let bound = cmp.immediate(1).checked_add(1)?;
                return within(extended.map_or(bound, |e| e.min(bound)));
            }
            if writes_register(ins, index) {
                let source = (ins.op1_kind() == OpKind::Register).then(|| ins.op1_register());
                match (ins.mnemonic(), source) {
                    (Mnemonic::Movzx, Some(source)) if ins.op0_register().size() >= 4 => {
                        extended = Some(1 << (8 * source.size()));
                        least = source.size();
                        index = source.full_register();
                    }
                    (Mnemonic::Movzx, None) if ins.op0_register().size() >= 4 && ins.memory_size().size() == 1 => {
                        return within(256);
                    }
                    (Mnemonic::Movsxd | Mnemonic::Mov, Some(source)) if source.size() == 4 && least == 4 => {
                        index = source.full_register();
                    }
                    _ => break,
                }
            }
            k = w;
        }
        within(extended?)
    }

    /// Whether `vaddr` lies in the function that starts at `function`.
    pub fn same_function(&self, function: u64, vaddr: u64) -> bool {
        self.functions
            .binary_search_by_key(&function, |&(start, _)| start)
            .is_ok_and(|k| vaddr >= function && vaddr < self.functions[k].1)
    }

    /// Whether control passes from instruction `k` only to `k + 1`.
    pub fn falls_through(&self, k: usize) -> bool {
        let ins = &self.insns[k];
        ins.flow_control() == FlowControl::Next && self.insns.get(k + 1).is_some_and(|n| n.ip() == ins.next_ip())
    }

    /// The first instruction of the straight line that reaches `i`, at most
    /// `WINDOW` back.
    pub fn line_start(&self, i: usize) -> usize {
        let mut start = i;
        while start > 0 && i - start < WINDOW && self.falls_through(start - 1) {
            start -= 1;
        }
        start
    }

    /// The last instruction of the straight line from `i`, at most `WINDOW`
    /// on (it may branch).
    pub fn line_end(&self, i: usize) -> usize {
        let mut end = i;
        while end - i < WINDOW && self.falls_through(end) {
            end += 1;
        }
        end
    }

    /// The last instruction in `from..to` that writes `register`.
    pub fn last_writer(&self, from: usize, to: usize, register: Register) -> Option<usize> {
        (from..to).rev().find(|&k| writes_register(&self.insns[k], register))
    }

    /// Whether an instruction in `range` may change `register`.
    pub fn writes_register(&self, range: impl IntoIterator<Item = usize>, register: Register) -> bool {
        range.into_iter().any(|k| writes_register(&self.insns[k], register))
    }

    /// Whether an instruction in `range` writes `offset(%base)`.
    pub fn writes_field(&self, range: impl IntoIterator<Item = usize>, base: Register, offset: u64) -> bool {
        range.into_iter().any(|k| memory_writes(&self.insns[k]).iter().any(|m| addresses(m, base, offset)))
    }

    /// The target of instruction `k` when it is a direct call or jump.
    pub fn direct_target(&self, k: usize) -> Option<u64> {
        let ins = &self.insns[k];
        (matches!(ins.flow_control(), FlowControl::Call | FlowControl::UnconditionalBranch)
            && ins.op0_kind() == OpKind::NearBranch64)
            .then(|| ins.near_branch_target())
    }

    /// The direct calls and jumps to `target`, by instruction index.
    pub fn transfers_to(&self, target: u64) -> &[usize] {
        self.transfers.get(&target).map_or(&[], Vec::as_slice)
    }
}

/// `.text` and the functions its FDEs describe in it.
struct Functions<'a> {
    code: &'a [u8],
    address: u64,
    /// (start, end), sorted, not overlapping.
    ranges: Vec<(u64, u64)>,
}

impl<'a> Functions<'a> {
    fn of(elf: &'a ElfFile) -> Option<Self> {
        let address = elf.section_address(".text")?;
        let code = *elf.sections(&[".text"]).first()?;
        let mut ranges = CallFrames::of(elf)?.functions()?;
        ranges.retain(|&(start, end)| start >= address && end <= address + code.len() as u64 && start < end);
        ranges.sort_unstable();
        // Overlapping FDEs would decode some bytes twice; keep the first.
        let mut covered = 0;
        ranges.retain(|&(start, end)| {
            let keep = start >= covered;
            covered = covered.max(end);
            keep
        });
        Some(Self { code, address, ranges })
    }

    /// Passes each instruction of each function, in address order, to `each`.
    fn decode(&self, mut each: impl FnMut(&Instruction)) {
        for &(start, end) in &self.ranges {
            let bytes = &self.code[(start - self.address) as usize..(end - self.address) as usize];
            decode(bytes, start).for_each(|ins| each(&ins));
        }
    }
}
