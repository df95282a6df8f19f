//! Unwinds a copied user stack with the binaries' own call frame
//! information (.eh_frame, found fast through .eh_frame_hdr). CPython, libc
//! and most distribution binaries keep no frame pointers, so this is how the
//! native frames between and beneath Python frames are found for
//! `--native`. It works on a copy the kernel took once per new site:
//! registers and up to 16 KiB of stack.

use std::{collections::HashMap, ops::Range};

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, Register, RegisterRule, UnwindContext, UnwindSection,
    X86_64,
};
use memtrace_common::SiteStackCopy;
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

use crate::process::proc_maps::MemoryMap;

/// Frames beyond this are not unwound (a loop in corrupt data ends here).
const MAX_FRAMES: usize = 128;

/// The registers unwinding needs: the CFA bases, the callee-saved ones the
/// CFI may restore, and the return address column.
const TRACKED: [Register; 8] =
    [X86_64::RA, X86_64::RSP, X86_64::RBP, X86_64::RBX, X86_64::R12, X86_64::R13, X86_64::R14, X86_64::R15];

struct UnwindTable {
    data: Vec<u8>,
    eh_frame: (u64, Range<usize>),
    eh_frame_hdr: Option<(u64, Range<usize>)>,
    text: u64,
    /// (vaddr, file offset, file size) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
}

impl UnwindTable {
    fn load(path: &str) -> Option<Self> {
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let section = |name: &str| {
            let s = file.section_by_name(name)?;
            let (offset, size) = s.file_range()?;
            Some((s.address(), offset as usize..(offset + size) as usize))
        };
        let eh_frame = section(".eh_frame")?;
        let eh_frame_hdr = section(".eh_frame_hdr");
        let text = file.section_by_name(".text").map_or(0, |s| s.address());
        let segments = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (s.address(), offset, size)
            })
            .collect();
        drop(file);
        Some(Self { data, eh_frame, eh_frame_hdr, text, segments })
    }

    fn vaddr_of_offset(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|&&(_, start, size)| offset >= start && offset < start + size)
            .map(|&(vaddr, start, _)| offset - start + vaddr)
    }

    /// The caller's registers, given this frame's, for code at `vaddr`.
    fn step(&self, vaddr: u64, regs: &Registers, stack: &StackCopy) -> Option<Registers> {
        let eh_frame = EhFrame::new(self.data.get(self.eh_frame.1.clone())?, LittleEndian);
        let mut bases = BaseAddresses::default().set_eh_frame(self.eh_frame.0).set_text(self.text);
        let mut context = UnwindContext::new();
        let row = match &self.eh_frame_hdr {
            Some((address, range)) => {
                bases = bases.set_eh_frame_hdr(*address);
                let header = EhFrameHdr::new(self.data.get(range.clone())?, LittleEndian).parse(&bases, 8).ok()?;
                header
                    .table()?
                    .unwind_info_for_address(&eh_frame, &bases, &mut context, vaddr, EhFrame::cie_from_offset)
                    .ok()?
                    .clone()
            }
            None => {
                eh_frame.unwind_info_for_address(&bases, &mut context, vaddr, EhFrame::cie_from_offset).ok()?.clone()
            }
        };
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
        Some(u64::from_le_bytes(self.bytes.get(at..at + 8)?.try_into().ok()?))
    }
}

pub struct Unwinder {
    /// Prefix that makes the target's paths reachable from here.
    root: Option<String>,
    tables: HashMap<String, Option<UnwindTable>>,
}

impl Unwinder {
    pub fn new(root: Option<String>) -> Self {
        Self { root, tables: HashMap::new() }
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
        if mapping.path.is_empty() {
            return None;
        }
        let path = match &self.root {
            Some(root) => format!("{root}{}", mapping.path),
            None => mapping.path.clone(),
        };
        let table = self.tables.entry(mapping.path.clone()).or_insert_with(|| UnwindTable::load(&path)).as_ref()?;
        let vaddr = table.vaddr_of_offset(pc - mapping.start + mapping.file_offset)?;
        table.step(vaddr, regs, stack)
    }
}
