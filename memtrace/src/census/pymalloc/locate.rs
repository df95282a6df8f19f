//! Finds where pymalloc's state is in one CPython binary, for the census
//! (`super`) to walk: 3.8 to 3.11 keep it in statics, found by their symbols
//! or, in stripped builds, in the machine code of the exported functions
//! that read them, decoded through `binary::x86`; 3.12 and 3.13 keep it in
//! the main interpreter, at offsets from these builds' DWARF that the binary
//! must confirm.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::{Anchor, PymallocState, u64_at};
use crate::{
    binary::{
        eh_frame::CallFrames,
        elf::{ElfFile, Symbol},
        x86,
    },
    python::layouts::{self, BlockCounter, ObmallocLocation, Pymalloc},
};

/// Instructions after a load searched for a dereference of the loaded value.
const LOOKAHEAD: usize = 32;
/// POOL_BITS is 12 or 14 in 3.8 to 3.13: other masks in the code are not
/// pool rounding.
const POOL_SIZES: [u64; 2] = [1 << 12, 1 << 14];
/// Longest function part decoded: GCC's split-off parts are a few KiB.
const MAX_PART: u64 = 64 << 10;

impl PymallocState {
    /// Finds pymalloc's state for CPython `version` whose runtime is in `elf`
    /// (`load_bias` turns the file's virtual addresses into the target's),
    /// where the version's layout table says it is. None when the version is
    /// not 3.8 to 3.13 or the binary does not confirm where the state is.
    /// From 3.12 this is the main interpreter's allocator, which every
    /// interpreter shares unless created with its own.
    pub fn locate(elf: &ElfFile, load_bias: u64, version: (u8, u8)) -> Option<Self> {
        let (major, minor) = version;
        let layout = layouts::layout_for(major, minor)?.pymalloc;
        let (anchor, [arenas, maxarenas, counter], code) = match layout.state {
            ObmallocLocation::Statics => {
                let addresses = statics_from_symbols(elf, layout.counter).or_else(|| statics_from_code(elf, minor))?;
                (Anchor::Fixed, addresses.map(|a| a.wrapping_add(load_bias)), walker_code(elf, minor))
            }
            ObmallocLocation::InMainInterpreter { interpreters_main, interp_obmalloc, mgmt } => {
                let code = confirming_code(elf)?;
                let (arenas, maxarenas) = (interp_obmalloc + mgmt.arenas, interp_obmalloc + mgmt.maxarenas);
                if !code.loads.iter().any(|l| !l.rip_relative && l.address == maxarenas && l.width == 4)
                    || !code.loads.iter().any(|l| !l.rip_relative && l.address == arenas && l.width == 8 && l.pointer)
                {
                    return None;
                }
                let main = runtime_address(elf)?.wrapping_add(load_bias) + interpreters_main;
                (Anchor::Pointer(main), [arenas, maxarenas, interp_obmalloc + mgmt.raw_allocated_blocks], Some(code))
            }
            ObmallocLocation::PointedByMainInterpreter {
                main_interpreter,
                interp_obmalloc,
                runtime_size,
                interp_size,
                mgmt,
            } => {
                if !debug_offsets_sizes_match(elf, version, runtime_size, interp_size) {
                    return None;
                }
                let state = runtime_address(elf)?.wrapping_add(load_bias) + main_interpreter + interp_obmalloc;
                (Anchor::Pointer(state), [mgmt.arenas, mgmt.maxarenas, mgmt.raw_allocated_blocks], confirming_code(elf))
            }
        };
        // The code's own pool mask wins over the version's default: a build
        // without the radix tree (3.10+) uses 4 KiB pools.
        let pool_size = code.and_then(|c| c.pool_size()).unwrap_or(layout.pool_size);
        Some(Self { anchor, arenas, maxarenas, counter, layout: Pymalloc { pool_size, ..layout } })
    }
}

/// `arenas`, `maxarenas` and the block counter (file addresses) from the
/// local symbols of .symtab (pyenv and other unstripped builds).
pub fn statics_from_symbols(elf: &ElfFile, counter: BlockCounter) -> Option<[u64; 3]> {
    // Only the object that defines pymalloc has these names for its statics.
    elf.symbol("_Py_GetAllocatedBlocks")?;
    Some([elf.symbol("arenas")?.vaddr, elf.symbol("maxarenas")?.vaddr, elf.symbol(counter.symbol())?.vaddr])
}

/// The same from the machine code of the exported readers: the only static
/// u64 whose value the arena walk dereferences is `arenas`, the only static
/// u32 it loads is `maxarenas`, and the only static u64 `_Py_GetAllocatedBlocks`
/// loads and does not dereference is the counter. Anything else is ambiguous.
pub fn statics_from_code(elf: &ElfFile, minor: u8) -> Option<[u64; 3]> {
    let getter = Code::of(elf, "_Py_GetAllocatedBlocks")?;
    let walker = walker_code(elf, minor)?;
    let arenas = walker.unique_static(|l| l.width == 8 && l.pointer)?;
    let maxarenas = walker.unique_static(|l| l.width == 4)?;
    let counter = getter.unique_static(|l| l.width == 8 && !l.pointer)?;
    Some([arenas, maxarenas, counter])
}

/// The exported function that walks the arenas: `_Py_GetAllocatedBlocks`
/// from 3.9, where it counts pool by pool; 3.8's only returns a counter, and
/// only its statistics dump walks them.
pub fn walker_code(elf: &ElfFile, minor: u8) -> Option<Code> {
    Code::of(elf, if minor == 8 { "_PyObject_DebugMallocStats" } else { "_Py_GetAllocatedBlocks" })
}

/// Code of 3.12+ that reads the interpreter's allocator: the walk itself
/// when .symtab names it, else the exported statistics dump.
fn confirming_code(elf: &ElfFile) -> Option<Code> {
    Code::of(elf, "_PyInterpreterState_GetAllocatedBlocks").or_else(|| Code::of(elf, "_PyObject_DebugMallocStats"))
}

/// `_PyRuntime`'s file address: its symbol, or the section stripped builds keep it in.
fn runtime_address(elf: &ElfFile) -> Option<u64> {
    elf.symbol("_PyRuntime").map(|s| s.vaddr).or_else(|| elf.section_address(".PyRuntime"))
}

/// Whether the `_Py_DebugOffsets` initialising `_PyRuntime` in the file
/// describe a GIL build of `version` whose runtime and interpreter
/// structures have the sizes its layout table was taken from.
pub fn debug_offsets_sizes_match(elf: &ElfFile, version: (u8, u8), runtime_size: u64, interp_size: u64) -> bool {
    let runtime = match elf.symbol("_PyRuntime") {
        Some(symbol) => elf.symbol_bytes(symbol).ok(),
        None => elf.sections(&[".PyRuntime"]).into_iter().next(),
    };
    let Some(offsets) = runtime.filter(|r| r.len() >= 56) else { return false };
    // cookie, version (PY_VERSION_HEX), free_threaded, runtime_state.size
    // at 24, interpreter_state.size at 48.
    &offsets[..8] == crate::python::debug_offsets::COOKIE
        && u64_at(offsets, 8) >> 16 == u64::from(version.0) << 8 | u64::from(version.1)
        && u64_at(offsets, 16) == 0
        && u64_at(offsets, 24) == runtime_size
        && u64_at(offsets, 48) == interp_size
}

/// `mov reg, [base + displacement]` in a function.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Whether `address` is an absolute (file) address, else a displacement
    /// from a register.
    pub rip_relative: bool,
    pub address: u64,
    /// Bytes loaded.
    pub width: usize,
    /// Whether the loaded value is then used as an address.
    pub pointer: bool,
}

/// What the arena walks need from a function's machine code.
pub struct Code {
    pub loads: Vec<Load>,
    /// Pool sizes seen as `and reg, -POOL_SIZE` (rounding an arena address
    /// to its first pool).
    masks: Vec<u64>,
    /// Targets of direct jumps out of the function.
    exits: Vec<u64>,
}

impl Code {
    /// The code of `function` and of the parts it jumps to: GCC splits
    /// functions (`.part.0`, `.cold`), and 3.8's and 3.12's statistics dumps
    /// are a check of the allocator in front of a jump to the walk. A part
    /// ends where its call frame information says (stripped builds name none
    /// of them); the parts' own exits are not followed.
    pub fn of(elf: &ElfFile, function: &str) -> Option<Self> {
        let symbol = elf.symbol(function)?;
        let mut code = Self::decode(elf.symbol_bytes(symbol).ok()?, symbol.vaddr);
        for vaddr in std::mem::take(&mut code.exits) {
            let Some(size) = function_size(elf, vaddr) else { continue };
            let Ok(bytes) = elf.symbol_bytes(Symbol { vaddr, size }) else { continue };
            let part = Self::decode(bytes, vaddr);
            code.loads.extend(part.loads);
            code.masks.extend(part.masks.into_iter().filter(|m| !code.masks.contains(m)).collect::<Vec<_>>());
        }
        Some(code)
    }

    fn decode(bytes: &[u8], vaddr: u64) -> Self {
        let instructions: Vec<Instruction> = x86::decode(bytes, vaddr).collect();
        let end = vaddr.saturating_add(bytes.len() as u64);
        let mut code = Self { loads: Vec::new(), masks: Vec::new(), exits: Vec::new() };
        for (at, instruction) in instructions.iter().enumerate() {
            let is_mov_load = instruction.mnemonic() == Mnemonic::Mov
                && instruction.op0_kind() == OpKind::Register
                && instruction.op1_kind() == OpKind::Memory
                && instruction.memory_index() == Register::None;
            if is_mov_load {
                let target = instruction.op0_register().full_register();
                let rest = &instructions[at + 1..instructions.len().min(at + 1 + LOOKAHEAD)];
                code.loads.push(Load {
                    rip_relative: instruction.is_ip_rel_memory_operand(),
                    address: instruction.memory_displacement64(),
                    width: instruction.memory_size().size(),
                    pointer: x86::dereferences(rest, target),
                });
            }
            if instruction.mnemonic() == Mnemonic::And
                && matches!(instruction.op1_kind(), OpKind::Immediate32to64 | OpKind::Immediate8to64)
            {
                let size = instruction.immediate(1).wrapping_neg();
                if POOL_SIZES.contains(&size) && !code.masks.contains(&size) {
                    code.masks.push(size);
                }
            }
            if instruction.mnemonic() == Mnemonic::Jmp && instruction.op0_kind() == OpKind::NearBranch64 {
                let target = instruction.near_branch64();
                if !(vaddr..end).contains(&target) && !code.exits.contains(&target) {
                    code.exits.push(target);
                }
            }
        }
        code
    }

    /// POOL_SIZE, when the code rounds to exactly one pool size.
    pub fn pool_size(&self) -> Option<u64> {
        if let [size] = self.masks[..] { Some(size) } else { None }
    }

    /// The one static address among the loads `wanted` picks, if exactly one.
    fn unique_static(&self, wanted: impl Fn(&Load) -> bool) -> Option<u64> {
        let mut found = None;
        for load in self.loads.iter().filter(|l| l.rip_relative && wanted(l)) {
            match found {
                Some(address) if address != load.address => return None,
                _ => found = Some(load.address),
            }
        }
        found
    }
}

/// The size of the function (or function part) starting at `vaddr`, from
/// its .eh_frame entry.
fn function_size(elf: &ElfFile, vaddr: u64) -> Option<u64> {
    let (start, end) = CallFrames::of(elf)?.function_containing(vaddr)?;
    (start == vaddr && end - start <= MAX_PART).then(|| end - start)
}
