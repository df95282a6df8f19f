//! Counts, from outside and at any moment, the blocks CPython's small-object
//! allocator (pymalloc) has live, the way `sys.getallocatedblocks()` does
//! inside the target: every arena in `arenas[]`, every pool header carved
//! from it, `ref.count` blocks of `(szidx + 1) * 16` bytes each, plus the
//! count of larger requests pymalloc passed to the raw allocator. It is the
//! measured side of memtrace's coverage line for interpreters whose pymalloc
//! fast path is inlined (Debian's LTO python3.11): how much pymalloc grew,
//! against what the probes saw. 3.8 to 3.11 keep this state in statics,
//! found by their symbols or, in stripped builds, in the machine code of the
//! exported functions that read them; 3.12 and 3.13 keep it in the main
//! interpreter, at offsets from these builds' DWARF that the binary must
//! confirm. Reads are not synchronised with the target: a census taken
//! while it allocates may be off by what changed during the walk, and one
//! that finds the structures inconsistent (an arena created or freed under
//! it) is retried, then reported as an error, never as a number.

use std::io;

use iced_x86::{Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};

use crate::binary::eh_frame::CallFrames;
use crate::python::layouts;
use crate::{
    binary::elf::{ElfFile, Symbol},
    process::memory::ProcessMemory,
};

/// `struct arena_object` (x86-64, 3.8 to 3.13): `uintptr_t address` at 0,
/// `block *pool_address` at 8, `uint nfreepools` at 16, `uint ntotalpools`
/// at 20, then three pointers; 48 bytes.
const ARENA_OBJECT_SIZE: usize = 48;
/// `struct pool_header`: `ref.count` (u32) at 0, `arenaindex` at 0x20,
/// `szidx` at 0x24; the bytes up to and including `szidx` are read.
const POOL_HEADER_READ: usize = 0x28;
const POOL_ARENAINDEX: usize = 0x20;
const POOL_SZIDX: usize = 0x24;
/// sizeof(struct pool_header), rounded to ALIGNMENT: where a pool's blocks start.
const POOL_OVERHEAD: u64 = 48;
/// ALIGNMENT is 16 on 64-bit builds since 3.8, and SMALL_REQUEST_THRESHOLD
/// is 512: 32 size classes (`usedpools` has 2 * 32 entries in the DWARF).
const ALIGNMENT_SHIFT: u32 = 4;
const SIZE_CLASSES: u32 = 32;
/// `arenas[]` starts with INITIAL_ARENA_OBJECTS entries and doubles, so
/// `maxarenas` is a power of two from 16; past 2^20 entries (48 MiB to read,
/// 256 GiB of arenas) it is taken for garbage.
const INITIAL_ARENA_OBJECTS: u32 = 16;
const MAX_ARENAS: u32 = 1 << 20;
/// Walks tried before an inconsistent state is reported.
const ATTEMPTS: usize = 4;
/// Instructions after a load searched for a dereference of the loaded value.
const LOOKAHEAD: usize = 32;
/// POOL_BITS is 12 or 14 in 3.8 to 3.13: other masks in the code are not
/// pool rounding.
const POOL_SIZES: [u64; 2] = [1 << 12, 1 << 14];
/// Longest function part decoded: GCC's split-off parts are a few KiB.
const MAX_PART: u64 = 64 << 10;

/// 3.12 and 3.13 (x86-64, non-debug, GIL builds) keep the allocator in the
/// interpreter (`struct _obmalloc_state`, whose `mgmt` holds `arenas` at
/// +0x200, `maxarenas` at +0x208 and `raw_allocated_blocks` at +0x440).
/// 3.12 embeds it in PyInterpreterState at +0xf78 and its main interpreter
/// is `_PyRuntime.interpreters.main` (+0x30); 3.13 points to it from
/// PyInterpreterState +0x2a30, in the main interpreter embedded in
/// `_PyRuntime` at +0x15920. DWARF of 3.12.1 and 3.13.0.
const MGMT_ARENAS: u64 = 0x200;
const MGMT_MAXARENAS: u64 = 0x208;
const MGMT_RAW_ALLOCATED_BLOCKS: u64 = 0x440;
const PY312_INTERPRETERS_MAIN: u64 = 0x30;
const PY312_INTERP_OBMALLOC: u64 = 0xf78;
const PY313_MAIN_INTERPRETER: u64 = 0x15920;
const PY313_INTERP_OBMALLOC: u64 = 0x2a30;
/// sizeof(_PyRuntimeState) and sizeof(PyInterpreterState) of 3.13.0, as its
/// `_Py_DebugOffsets` (at the start of `_PyRuntime`) state them: a 3.13
/// whose structures have these sizes is taken to have the offsets above.
const PY313_RUNTIME_SIZE: u64 = 0x452b8;
const PY313_INTERP_SIZE: u64 = 0x2f998;

/// Where pymalloc's bookkeeping is in one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PymallocState {
    anchor: Anchor,
    /// `arenas` (a pointer to `struct arena_object[maxarenas]`), `maxarenas`
    /// (u32) and the block counter (u64): addresses, or offsets from the
    /// anchor's pointer.
    arenas: u64,
    maxarenas: u64,
    counter: u64,
    counter_kind: Counter,
    pool_size: u64,
    arena_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Anchor {
    /// The fields are at fixed addresses (3.8 to 3.11's statics).
    Fixed,
    /// The fields are offsets from the pointer stored at this address
    /// (3.12's main interpreter, 3.13's main allocator state), which the
    /// target sets while starting up.
    Pointer(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counter {
    /// 3.9+: `raw_allocated_blocks`, live blocks pymalloc sent to the raw
    /// allocator (requests over 512 bytes).
    Raw,
    /// 3.8: `_Py_AllocatedBlocks`, every live block, small or raw.
    All,
}

/// pymalloc's live blocks at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Small blocks allocated from pools.
    pub blocks: u64,
    /// Their bytes, by size class (the request rounded up to 16).
    pub bytes: u64,
    /// Blocks over 512 bytes pymalloc handed to the raw allocator (malloc).
    pub raw_blocks: u64,
}

impl PymallocState {
    /// Finds pymalloc's state for CPython `version` whose runtime is in `elf`
    /// (`load_bias` turns the file's virtual addresses into the target's).
    /// None when the version is not 3.8 to 3.13 or the binary does not
    /// confirm where the state is. From 3.12 this is the main interpreter's
    /// allocator, which every interpreter shares unless created with its own.
    pub fn locate(elf: &ElfFile, load_bias: u64, version: (u8, u8)) -> Option<Self> {
        let (3, minor @ 8..=13) = version else { return None };
        let pool_size = layouts::layout_for(3, minor)?.pool_size;
        // ARENA_SIZE is 256 KiB before 3.10, 1 MiB on 64-bit builds since.
        let arena_size = if minor < 10 { 256 << 10 } else { 1 << 20 };
        let (anchor, [arenas, maxarenas, counter], code) = match minor {
            8..=11 => {
                let addresses = statics_from_symbols(elf, minor).or_else(|| statics_from_code(elf, minor))?;
                (Anchor::Fixed, addresses.map(|a| a.wrapping_add(load_bias)), walker_code(elf, minor))
            }
            12 => {
                let code = confirming_code(elf)?;
                let (arenas, maxarenas) = (PY312_INTERP_OBMALLOC + MGMT_ARENAS, PY312_INTERP_OBMALLOC + MGMT_MAXARENAS);
                if !code.loads.iter().any(|l| !l.rip_relative && l.address == maxarenas && l.width == 4)
                    || !code.loads.iter().any(|l| !l.rip_relative && l.address == arenas && l.width == 8 && l.pointer)
                {
                    return None;
                }
                let main = runtime_address(elf)?.wrapping_add(load_bias) + PY312_INTERPRETERS_MAIN;
                (
                    Anchor::Pointer(main),
                    [arenas, maxarenas, PY312_INTERP_OBMALLOC + MGMT_RAW_ALLOCATED_BLOCKS],
                    Some(code),
                )
            }
            _ => {
                if !py313_sizes_match(elf) {
                    return None;
                }
                let state =
                    runtime_address(elf)?.wrapping_add(load_bias) + PY313_MAIN_INTERPRETER + PY313_INTERP_OBMALLOC;
                (Anchor::Pointer(state), [MGMT_ARENAS, MGMT_MAXARENAS, MGMT_RAW_ALLOCATED_BLOCKS], confirming_code(elf))
            }
        };
        // The code's own pool mask wins over the version's default: a build
        // without the radix tree (3.10+) uses 4 KiB pools.
        let pool_size = code.and_then(|c| c.pool_size()).unwrap_or(pool_size);
        let counter_kind = if minor == 8 { Counter::All } else { Counter::Raw };
        Some(Self { anchor, arenas, maxarenas, counter, counter_kind, pool_size, arena_size })
    }

    /// Walks the arenas and pools now.
    pub fn census(&self, memory: &ProcessMemory) -> io::Result<Census> {
        let mut why = "";
        for _ in 0..ATTEMPTS {
            match self.walk(memory) {
                Ok(census) => return Ok(census),
                Err(Miss::Io(error)) => return Err(error),
                Err(Miss::Inconsistent(reason)) => why = reason,
            }
        }
        Err(io::Error::new(io::ErrorKind::InvalidData, format!("pymalloc's state is not consistent: {why}")))
    }

    fn walk(&self, memory: &ProcessMemory) -> Result<Census, Miss> {
        let base = match self.anchor {
            Anchor::Fixed => 0,
            Anchor::Pointer(at) => match memory.read_u64(at)? {
                0 => return Err(Miss::Inconsistent("the interpreter has no allocator yet")),
                base => base,
            },
        };
        let maxarenas = memory.read_u32(base.wrapping_add(self.maxarenas))?;
        let arenas = memory.read_u64(base.wrapping_add(self.arenas))?;
        let counter = memory.read_u64(base.wrapping_add(self.counter))?;
        if counter > i64::MAX as u64 {
            return Err(Miss::Inconsistent("the block counter is negative"));
        }
        let mut census = Census::default();
        // No arena yet (or the allocator is not pymalloc): nothing to walk.
        if maxarenas != 0 {
            if !maxarenas.is_power_of_two() || !(INITIAL_ARENA_OBJECTS..=MAX_ARENAS).contains(&maxarenas) || arenas == 0
            {
                return Err(Miss::Inconsistent("maxarenas or arenas is implausible"));
            }
            // arenas[] is reallocated as it grows: a failed read is a race.
            let table = memory
                .read_vec(arenas, maxarenas as usize * ARENA_OBJECT_SIZE)
                .map_err(|_| Miss::Inconsistent("arenas[] could not be read"))?;
            for (index, object) in table.chunks_exact(ARENA_OBJECT_SIZE).enumerate() {
                self.count_arena(memory, index, object, &mut census)?;
            }
        }
        census.raw_blocks = match self.counter_kind {
            Counter::Raw => counter,
            Counter::All => counter.saturating_sub(census.blocks),
        };
        Ok(census)
    }

    /// Adds the live blocks of the arena `object` describes, checking it
    /// against how new_arena() and the pool carving in obmalloc.c set it up.
    fn count_arena(
        &self,
        memory: &ProcessMemory,
        index: usize,
        object: &[u8],
        census: &mut Census,
    ) -> Result<(), Miss> {
        let address = u64_at(object, 0);
        if address == 0 {
            return Ok(());
        }
        let pool_address = u64_at(object, 8);
        let (nfreepools, ntotalpools) = (u64::from(u32_at(object, 16)), u64::from(u32_at(object, 20)));
        let pool_size = self.pool_size;
        // Pools start at the first pool-aligned address; an unaligned arena
        // loses one pool to the alignment.
        let excess = address % pool_size;
        let first = address.checked_add((pool_size - excess) % pool_size).ok_or(Miss::Inconsistent("arena address"))?;
        let pools = self.arena_size / pool_size - u64::from(excess != 0);
        let end = first.checked_add(pools * pool_size).ok_or(Miss::Inconsistent("arena address"))?;
        if ntotalpools != pools
            || nfreepools > ntotalpools
            || !(first..=end).contains(&pool_address)
            || !(pool_address - first).is_multiple_of(pool_size)
            // The pools not carved yet are free ones.
            || (end - pool_address) / pool_size > nfreepools
        {
            return Err(Miss::Inconsistent("an arena's pool bookkeeping does not add up"));
        }
        let mut header = [0; POOL_HEADER_READ];
        for pool in (first..pool_address).step_by(pool_size as usize) {
            // An arena freed since arenas[] was read is unmapped.
            memory.read(pool, &mut header).map_err(|_| Miss::Inconsistent("a pool header could not be read"))?;
            if u32_at(&header, POOL_ARENAINDEX) as usize != index {
                return Err(Miss::Inconsistent("a pool names another arena"));
            }
            let count = u64::from(u32_at(&header, 0));
            if count == 0 {
                continue;
            }
            let szidx = u32_at(&header, POOL_SZIDX);
            if szidx >= SIZE_CLASSES {
                return Err(Miss::Inconsistent("a pool has no size class"));
            }
            let size = u64::from(szidx + 1) << ALIGNMENT_SHIFT;
            if count > (pool_size - POOL_OVERHEAD) / size {
                return Err(Miss::Inconsistent("a pool holds more blocks than fit"));
            }
            census.blocks += count;
            census.bytes += count * size;
        }
        Ok(())
    }
}

enum Miss {
    /// The target's statics could not be read: it is gone.
    Io(io::Error),
    /// What was read does not fit together, most likely because the target
    /// changed it during the walk.
    Inconsistent(&'static str),
}

impl From<io::Error> for Miss {
    fn from(error: io::Error) -> Self {
        Miss::Io(error)
    }
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// The name of the block counter `_Py_GetAllocatedBlocks` starts from.
fn counter_name(minor: u8) -> &'static str {
    if minor == 8 { "_Py_AllocatedBlocks" } else { "raw_allocated_blocks" }
}

/// `arenas`, `maxarenas` and the block counter (file addresses) from the
/// local symbols of .symtab (pyenv and other unstripped builds).
fn statics_from_symbols(elf: &ElfFile, minor: u8) -> Option<[u64; 3]> {
    // Only the object that defines pymalloc has these names for its statics.
    elf.symbol("_Py_GetAllocatedBlocks")?;
    Some([elf.symbol("arenas")?.vaddr, elf.symbol("maxarenas")?.vaddr, elf.symbol(counter_name(minor))?.vaddr])
}

/// The same from the machine code of the exported readers: the only static
/// u64 whose value the arena walk dereferences is `arenas`, the only static
/// u32 it loads is `maxarenas`, and the only static u64 `_Py_GetAllocatedBlocks`
/// loads and does not dereference is the counter. Anything else is ambiguous.
fn statics_from_code(elf: &ElfFile, minor: u8) -> Option<[u64; 3]> {
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
fn walker_code(elf: &ElfFile, minor: u8) -> Option<Code> {
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

/// Whether the `_Py_DebugOffsets` initialising 3.13's `_PyRuntime` in the
/// file describe a GIL build whose runtime and interpreter structures have
/// 3.13.0's sizes.
fn py313_sizes_match(elf: &ElfFile) -> bool {
    let runtime = match elf.symbol("_PyRuntime") {
        Some(symbol) => elf.symbol_bytes(symbol).ok(),
        None => elf.sections(&[".PyRuntime"]).into_iter().next(),
    };
    let Some(offsets) = runtime.filter(|r| r.len() >= 56) else { return false };
    // cookie, version (PY_VERSION_HEX), free_threaded, runtime_state.size
    // at 24, interpreter_state.size at 48.
    &offsets[..8] == crate::python::debug_offsets::COOKIE
        && u64_at(offsets, 8) >> 16 == 0x030d
        && u64_at(offsets, 16) == 0
        && u64_at(offsets, 24) == PY313_RUNTIME_SIZE
        && u64_at(offsets, 48) == PY313_INTERP_SIZE
}

/// `mov reg, [base + displacement]` in a function.
#[derive(Clone, Copy, Debug)]
struct Load {
    /// Whether `address` is an absolute (file) address, else a displacement
    /// from a register.
    rip_relative: bool,
    address: u64,
    width: usize,
    /// Whether the loaded value is then used as an address.
    pointer: bool,
}

/// What the arena walks need from a function's machine code.
struct Code {
    loads: Vec<Load>,
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
    fn of(elf: &ElfFile, function: &str) -> Option<Self> {
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
        let instructions: Vec<Instruction> =
            Decoder::with_ip(64, bytes, vaddr, DecoderOptions::NONE).into_iter().collect();
        let end = vaddr.saturating_add(bytes.len() as u64);
        let mut info = InstructionInfoFactory::new();
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
                    pointer: dereferences(&mut info, rest, target),
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
    fn pool_size(&self) -> Option<u64> {
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

/// Whether `register` is used as a memory operand's base in `code`
/// (straight-line, as decoded) before something overwrites it. Only real
/// accesses count: `lea` and long `nop`s have memory operands too.
fn dereferences(info: &mut InstructionInfoFactory, code: &[Instruction], register: Register) -> bool {
    for instruction in code {
        let info = info.info(instruction);
        if info
            .used_memory()
            .iter()
            .any(|m| m.access() != OpAccess::NoMemAccess && m.base().full_register() == register)
        {
            return true;
        }
        if info
            .used_registers()
            .iter()
            .any(|r| r.access() == OpAccess::Write && r.register().full_register() == register)
        {
            return false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader},
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use super::*;
    use crate::process::proc_maps::{MemoryMap, host_path};

    const PYENV: &str = "/root/.pyenv/versions";

    fn libpython(version: &str) -> ElfFile {
        let minor = version.rsplit_once('.').unwrap().0;
        let path = format!("{PYENV}/{version}/lib/libpython{minor}.so.1.0");
        ElfFile::open(Path::new(&path)).unwrap_or_else(|e| panic!("CPython {version} is missing: {e}"))
    }

    /// Keeps 100,000 16-byte objects and 100 raw (1,000-byte) blocks, writes
    /// its own count and waits on stdin. Raw `os` calls rather than
    /// `sys.stdout`, whose text layer allocates and frees differently with
    /// the hash seed.
    const SCRIPT: &str = "import os, sys
small = [object() for _ in range(100_000)]
large = [bytes(1000) for _ in range(100)]
count = sys.getallocatedblocks()
os.write(1, b'%d\\n' % count)
os.read(0, 1)
";

    /// A started interpreter, killed when dropped.
    struct Target(Child);

    impl Drop for Target {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Starts `python` on [`SCRIPT`] and returns it with the count it printed.
    fn start(python: &str) -> (Target, u64) {
        assert!(Path::new(python).exists(), "{python} is missing");
        let child = Command::new(python)
            .args(["-S", "-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {python}: {e}"));
        let mut target = Target(child);
        let mut line = String::new();
        BufReader::new(target.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let count = line.trim().parse().unwrap_or_else(|_| panic!("{python} printed {line:?}"));
        // Between its write and its read the target still frees and
        // allocates; blocked in read(0, ...) it does neither.
        let syscall = format!("/proc/{}/syscall", target.0.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with("0 0x0 ")) {
            assert!(Instant::now() < deadline, "{python} never blocked reading stdin");
            std::thread::sleep(Duration::from_millis(5));
        }
        (target, count)
    }

    /// pymalloc's state in the running `pid`: the first mapped binary named
    /// like Python in which `locate` finds it, moved by that binary's bias;
    /// with that binary (as reachable from here) and bias.
    fn locate_in(pid: u32, version: (u8, u8)) -> (PymallocState, PathBuf, u64) {
        let map = MemoryMap::read(pid).unwrap();
        for path in map.executable_files().into_iter().filter(|p| p.contains("python")) {
            let binary = host_path(pid, path);
            let elf = ElfFile::open(&binary).unwrap();
            let bias = map
                .mappings
                .iter()
                .filter(|m| m.path == path)
                .find_map(|m| Some(m.start.wrapping_sub(elf.vaddr_of_offset(m.file_offset)?)))
                .unwrap();
            if let Some(state) = PymallocState::locate(&elf, bias, version) {
                return (state, binary, bias);
            }
        }
        panic!("no pymalloc state found in {pid}");
    }

    /// The census equals the target's own `sys.getallocatedblocks()` plus
    /// two blocks allocated after it counted and live while it waits: the
    /// int `count` and the 1-byte bytes object os.read reads into (the
    /// formatted line is freed after the write). The idle target allocates
    /// nothing else. Returns the target, still waiting, and what was found.
    fn census_matches(python: &str, version: (u8, u8)) -> (Target, Census, PathBuf, u64) {
        let (target, printed) = start(python);
        let (state, binary, bias) = locate_in(target.0.id(), version);
        let census = state.census(&ProcessMemory::new(target.0.id())).unwrap();
        eprintln!("{python}: {state:?} {census:?}, the target counted {printed}");
        assert_eq!(census.blocks + census.raw_blocks, printed + 2, "{python}: {census:?} against {printed}");
        assert!(census.blocks >= 100_000 && census.bytes >= 16 * census.blocks, "{census:?}");
        assert!((100..1_000).contains(&census.raw_blocks), "{census:?}");
        (target, census, binary, bias)
    }

    /// [`census_matches`] for a pyenv build, found by its symbols; then the
    /// same census from a stripped copy of its libpython (.dynsym only, as
    /// distributions ship it), found from the code.
    fn pyenv_matches(version: &str) {
        let minor: u8 = version.split('.').nth(1).unwrap().parse().unwrap();
        let (target, census, binary, bias) =
            census_matches(&format!("{PYENV}/{version}/bin/python3.{minor}"), (3, minor));
        let stripped = std::env::temp_dir().join(format!("memtrace-pymalloc-{}-{version}.so", std::process::id()));
        let status = Command::new("strip").arg("--strip-all").arg("-o").arg(&stripped).arg(&binary).status();
        assert!(status.expect("strip (binutils) is missing").success());
        let elf = ElfFile::open(&stripped).unwrap();
        std::fs::remove_file(&stripped).unwrap();
        assert!(elf.symbol("_PyObject_Malloc").is_none(), "{version}: still has local symbols");
        let state = PymallocState::locate(&elf, bias, (3, minor)).expect("found from the code");
        assert_eq!(state.census(&ProcessMemory::new(target.0.id())).unwrap(), census, "{version} stripped");
    }

    #[test]
    fn debian_lto_python_3_11_by_decoding() {
        let elf = ElfFile::open(Path::new("/usr/bin/python3.11")).expect("Debian's python3.11 is missing");
        assert!(statics_from_symbols(&elf, 11).is_none(), "stripped: the statics must come from the code");
        assert!(statics_from_code(&elf, 11).is_some());
        census_matches("/usr/bin/python3.11", (3, 11));
    }

    #[test]
    fn pyenv_3_8() {
        pyenv_matches("3.8.18");
    }

    #[test]
    fn pyenv_3_9() {
        pyenv_matches("3.9.18");
    }

    #[test]
    fn pyenv_3_10() {
        pyenv_matches("3.10.13");
    }

    #[test]
    fn pyenv_3_11() {
        pyenv_matches("3.11.7");
    }

    #[test]
    fn pyenv_3_12() {
        pyenv_matches("3.12.1");
    }

    #[test]
    fn pyenv_3_13() {
        pyenv_matches("3.13.0");
    }

    /// A target allocating and freeing arenas as fast as it can is counted
    /// or refused as inconsistent, never anything else.
    #[test]
    fn a_busy_target_is_counted_or_refused() {
        let python = format!("{PYENV}/3.11.7/bin/python3.11");
        let churn = "import os\nkeep = []\nos.write(1, b'started\\n')\n\
                     while True:\n    keep.append([object() for _ in range(50_000)])\n    del keep[:-5]\n";
        let child = Command::new(&python)
            .args(["-S", "-c", churn])
            .stdout(Stdio::piped())
            .spawn()
            .expect("CPython 3.11.7 is missing");
        let mut target = Target(child);
        let pid = target.0.id();
        BufReader::new(target.0.stdout.as_mut().unwrap()).read_line(&mut String::new()).unwrap();
        let (state, ..) = locate_in(pid, (3, 11));
        let memory = ProcessMemory::new(pid);
        let (mut counted, mut refused) = (0, 0);
        for _ in 0..200 {
            match state.census(&memory) {
                Ok(census) => {
                    assert!(census.blocks > 0 && census.bytes >= 16 * census.blocks, "{census:?}");
                    counted += 1;
                }
                Err(error) => {
                    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
                    refused += 1;
                }
            }
        }
        eprintln!("busy target: {counted} censuses, {refused} refused");
        assert!(counted > 0);
    }

    /// The decoder finds in unstripped builds what their symbols say, so it
    /// is right where only the code is left.
    #[test]
    fn code_agrees_with_symbols() {
        for (version, minor) in [("3.8.18", 8), ("3.9.18", 9), ("3.10.13", 10), ("3.11.7", 11)] {
            let elf = libpython(version);
            let symbols = statics_from_symbols(&elf, minor).unwrap();
            assert_eq!(statics_from_code(&elf, minor), Some(symbols), "{version}");
            let expected = layouts::layout_for(3, minor).unwrap().pool_size;
            assert_eq!(walker_code(&elf, minor).unwrap().pool_size(), Some(expected), "{version}");
        }
    }

    /// The 3.12 offsets are those of the interpreter's own walk and of the
    /// exported statistics dump that confirms them in stripped builds; the
    /// 3.13 ones are those of its own walk.
    #[test]
    fn interpreter_offsets_are_the_codes() {
        let py312 = libpython("3.12.1");
        for function in ["_PyInterpreterState_GetAllocatedBlocks", "_PyObject_DebugMallocStats"] {
            let code = Code::of(&py312, function).unwrap();
            let has =
                |address, width| code.loads.iter().any(|l| !l.rip_relative && l.address == address && l.width == width);
            assert!(has(PY312_INTERP_OBMALLOC + MGMT_ARENAS, 8) && has(PY312_INTERP_OBMALLOC + MGMT_MAXARENAS, 4));
        }
        for (elf, function) in
            [(&py312, "_PyObject_DebugMallocStats"), (&libpython("3.13.0"), "_PyObject_DebugMallocStats")]
        {
            assert!(matches!(Code::of(elf, function).unwrap().pool_size(), None | Some(16384)));
        }
        let walk = Code::of(&py312, "_PyInterpreterState_GetAllocatedBlocks").unwrap();
        assert!(walk.loads.iter().any(|l| l.address == PY312_INTERP_OBMALLOC + MGMT_RAW_ALLOCATED_BLOCKS));
        assert_eq!(walk.pool_size(), Some(16384));

        let py313 = libpython("3.13.0");
        assert!(py313_sizes_match(&py313));
        let walk = Code::of(&py313, "_PyInterpreterState_GetAllocatedBlocks").unwrap();
        let load =
            |address, width| walk.loads.iter().find(|l| !l.rip_relative && l.address == address && l.width == width);
        assert!(load(PY313_INTERP_OBMALLOC, 8).is_some_and(|l| l.pointer));
        for (offset, width) in [(MGMT_ARENAS, 8), (MGMT_MAXARENAS, 4), (MGMT_RAW_ALLOCATED_BLOCKS, 8)] {
            assert!(load(offset, width).is_some(), "{offset:#x}");
        }
        // 3.12's confirmation does not pass for 3.13, nor 3.13's for 3.12.
        assert!(PymallocState::locate(&py313, 0, (3, 12)).is_none());
        assert!(PymallocState::locate(&py312, 0, (3, 13)).is_none());
    }

    #[test]
    fn nothing_outside_python_or_its_versions() {
        let libc = ElfFile::open(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
        for minor in 8..=13 {
            assert!(PymallocState::locate(&libc, 0, (3, minor)).is_none());
        }
        let py311 = libpython("3.11.7");
        assert!(PymallocState::locate(&py311, 0, (3, 11)).is_some());
        assert!(PymallocState::locate(&py311, 0, (3, 7)).is_none());
        assert!(PymallocState::locate(&py311, 0, (3, 14)).is_none());
        assert!(PymallocState::locate(&py311, 0, (2, 7)).is_none());
    }

    /// A state pointing at memory that is not pymalloc's (this test's own)
    /// is refused, not counted: a `maxarenas` that is no power of two, then
    /// a plausible one over an arena table of garbage.
    #[test]
    fn garbage_is_an_error() {
        let garbage = [0x41_u8; 16 * ARENA_OBJECT_SIZE];
        let me = ProcessMemory::new(std::process::id());
        for maxarenas in [24, 16] {
            let statics: [u64; 3] = [garbage.as_ptr() as u64, maxarenas, 7];
            let at = std::hint::black_box(&statics).as_ptr() as u64;
            let state = PymallocState {
                anchor: Anchor::Fixed,
                arenas: at,
                maxarenas: at + 8,
                counter: at + 16,
                counter_kind: Counter::Raw,
                pool_size: 16384,
                arena_size: 1 << 20,
            };
            assert_eq!(state.census(&me).unwrap_err().kind(), io::ErrorKind::InvalidData);
        }
        std::hint::black_box(&garbage);
    }
}
