//! Every per-version fact memtrace knows about CPython 3.8 to 3.13, as data:
//! the path from `_PyRuntime` to the thread state holding the GIL and on to
//! its innermost frame (walked by the BPF program), the fields of code,
//! bytes and str objects and the line-table format (read by userspace to
//! name a frame's file, function and line), and pymalloc's arenas, pools and
//! where its bookkeeping lives (for its count read from outside). One table
//! per minor version, each written as its difference from the one before,
//! for x86-64 Linux builds: the pthread mutexes and condition variables
//! inside `_PyRuntime` make its offsets differ on other targets. The numbers
//! are the DWARF of 3.8.18/3.9.18/3.10.13/3.11.7/3.12.1/3.13.0, which the
//! tests crate's python_layouts checks against gdb and live interpreters.

use super::linetable::LineTableFormat;

/// How a frame records its current instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstrKind {
    /// `int f_lasti`: byte offset of the last instruction (3.8, 3.9).
    LastiBytes,
    /// `int f_lasti`: code-unit index of the last instruction (3.10).
    LastiCodeUnits,
    /// `prev_instr`: pointer to the last executed code unit (3.11, 3.12).
    PrevInstrPointer,
    /// `instr_ptr`: pointer to the current code unit (3.13+).
    InstrPointer,
}

impl InstrKind {
    /// Mask for the 8 bytes the kernel reads at `frame_instr`: an `int`
    /// field shares its word with whatever follows it.
    pub const fn mask(self) -> u64 {
        match self {
            InstrKind::LastiBytes | InstrKind::LastiCodeUnits => 0xffff_ffff,
            InstrKind::PrevInstrPointer | InstrKind::InstrPointer => u64::MAX,
        }
    }
}

/// A chain of at most `N` pointer hops, `p = *(p + step)` each, held the
/// way the kernel side takes it (a fixed array and a length) so that a
/// chain built at run time from `_Py_DebugOffsets` needs no allocation.
/// It reads as the slice of its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chain<const N: usize> {
    steps: [u64; N],
    len: usize,
}

impl<const N: usize> Chain<N> {
    /// Fails to compile (in a `const`) or panics when `steps` is longer than `N`.
    pub const fn new(steps: &[u64]) -> Self {
        assert!(steps.len() <= N, "pointer chain longer than the kernel side follows");
        let mut padded = [0; N];
        let mut i = 0;
        while i < steps.len() {
            padded[i] = steps[i];
            i += 1;
        }
        Chain { steps: padded, len: steps.len() }
    }
}

impl<const N: usize> std::ops::Deref for Chain<N> {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        &self.steps[..self.len]
    }
}

/// Which Python frames one C-level call of the eval loop runs: where
/// native frames go between Python frames in a mixed (`--native`) stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalEntry {
    /// Each frame has its own C call (<=3.10).
    EveryFrame,
    /// The `is_entry` byte at this offset marks a call's first frame (3.11).
    Flag(u64),
    /// A call's first frame is the one before a C-stack shim frame (3.12+).
    BeforeShim,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: (u8, u8),
    /// From `&_PyRuntime` to the thread state of the thread holding the GIL.
    /// 3.8-3.11: `_PyRuntime.gilstate.tstate_current` (one step). 3.12/3.13:
    /// the main interpreter's GIL's `last_holder` (`_PyRuntime.interpreters.main`
    /// -> `interp->ceval.gil` (a pointer) -> `gil->last_holder`); unlike
    /// `tstate_current` it is not cleared when the GIL is released.
    pub tstate_chain: Chain<3>,
    /// Offset of `thread_id` (pthread_self() of the owning thread) in PyThreadState.
    pub tstate_thread_id: u64,
    /// From `&_PyRuntime` to the main interpreter's first thread state:
    /// `interpreters.head`, then `tstate_head` (<=3.10) or `threads.head`.
    /// The threads not holding the GIL are found along this list.
    pub threads_chain: Chain<2>,
    /// PyThreadState `next`.
    pub tstate_next: u64,
    /// From the thread state to its innermost frame: `tstate->frame` (<=3.10),
    /// `tstate->cframe->current_frame` (3.11, 3.12), `tstate->current_frame` (3.13).
    pub frame_chain: Chain<2>,
    /// `f_code` (<=3.12) or `f_executable` (3.13).
    pub frame_code: u64,
    /// `f_back` (<=3.10) or `previous`.
    pub frame_previous: u64,
    /// `f_lasti`, `prev_instr` or `instr_ptr`, as `instr_kind` says.
    pub frame_instr: u64,
    pub instr_kind: InstrKind,
    /// (offset of the `owner` byte, value meaning FRAME_OWNED_BY_CSTACK) when
    /// the version has C-stack shim frames (3.12+), which are not Python code.
    pub frame_owner_cstack: Option<(u64, u8)>,
    pub eval_entry: EvalEntry,
    pub code_filename: u64,
    pub code_name: u64,
    /// `co_qualname`, 3.11+.
    pub code_qualname: Option<u64>,
    /// An `int`.
    pub code_firstlineno: u64,
    /// `co_lnotab` (3.8, 3.9) or `co_linetable`, in `line_table`'s format.
    pub code_linetable: u64,
    pub line_table: LineTableFormat,
    /// Where the bytecode starts: for <=3.10 the offset of the `co_code`
    /// bytes-object pointer; for 3.11+ the offset of the inline
    /// `co_code_adaptive` array in the code object.
    pub code_bytecode: u64,
    /// PyBytesObject `ob_size`.
    pub bytes_size: u64,
    /// PyBytesObject `ob_sval`.
    pub bytes_data: u64,
    /// PyASCIIObject `length`, in code points.
    pub unicode_length: u64,
    /// PyASCIIObject `state`, a 32-bit bitfield: see [`UNICODE_KIND_SHIFT`].
    pub unicode_state: u64,
    /// sizeof(PyASCIIObject): where compact ASCII data starts.
    pub unicode_ascii_data: u64,
    /// sizeof(PyCompactUnicodeObject): where compact non-ASCII data starts.
    pub unicode_compact_data: u64,
    /// `_co_firsttraceable` (3.11+), an `int`: the code unit of RESUME.
    /// A frame before it is still being set up (CPython's "incomplete"
    /// frames), and tracemalloc blames its caller instead.
    pub code_firsttraceable: Option<u64>,
    /// PyTypeObject `tp_name`, a C string: the class name of a heap type,
    /// the dotted name (`collections.OrderedDict`) of a static one.
    pub type_name: u64,
    /// PyTypeObject `tp_basicsize`: its instances' size.
    pub type_basicsize: u64,
    /// PyTypeObject `tp_flags`.
    pub type_flags: u64,
    /// PyTypeObject `tp_dict`: where a class keeps its `__module__`.
    pub type_dict: u64,
    pub dict: Dict,
    /// sizeof(PyGC_Head): what precedes a GC object in its memory block.
    pub gc_head_size: u64,
    /// Type flags whose objects carry two more words before them (managed
    /// dict and weakref slots, 3.11+), as `_PyType_PreHeaderSize` counts.
    pub preheader_flags: u64,
    /// `_PyRuntime.interpreters.head`, and a PyInterpreterState's `next`.
    pub interpreters_head: u64,
    pub interp_next: u64,
    pub gc: Gc,
    pub pymalloc: Pymalloc,
}

/// A combined-table dict (Objects/dictobject.c), as a class's `tp_dict` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dict {
    /// PyDictObject `ma_keys`.
    pub keys: u64,
    /// PyDictKeysObject `dk_nentries` (a Py_ssize_t) and where `dk_indices`
    /// starts; the entries follow the indices.
    pub nentries: u64,
    pub indices: u64,
    pub table: DictTable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DictTable {
    /// <= 3.10: `dk_size` (a Py_ssize_t) at this offset; each index takes
    /// 1, 2, 4 or 8 bytes as the size needs; entries are {hash, key, value}.
    Sized(u64),
    /// 3.11+: the u8s `dk_log2_size`, `dk_log2_index_bytes` and `dk_kind` at
    /// these offsets; entries are {hash, key, value}, or {key, value} when
    /// the kind says every key is a str.
    Log2 { size: u64, index_bytes: u64, kind: u64 },
}

/// The garbage collector's lists (Modules/gcmodule.c): each generation is a
/// `struct gc_generation` whose first member is the PyGC_Head of a circular
/// list of the tracked objects, each object right after its PyGC_Head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gc {
    /// Where `struct _gc_runtime_state` is.
    pub state: GcState,
    /// Its `generations[generation_count]`, each `generation_size` bytes.
    pub generations: u64,
    pub generation_count: u64,
    pub generation_size: u64,
    /// Its `permanent_generation` (objects frozen by gc.freeze()).
    pub permanent_generation: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcState {
    /// 3.8: `_PyRuntime.gc`, at this offset; one for every interpreter.
    InRuntime(u64),
    /// 3.9+: each interpreter's own `gc`, at this offset in PyInterpreterState.
    InInterpreter(u64),
}

/// pymalloc (Objects/obmalloc.c) as a version builds it on x86-64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pymalloc {
    /// POOL_SIZE: 4 KiB before 3.10, 16 KiB since (a 3.10+ build without
    /// the radix tree keeps 4 KiB: the locator checks the code's own mask).
    pub pool_size: u64,
    /// ARENA_SIZE: 256 KiB before 3.10, 1 MiB since.
    pub arena_size: u64,
    /// ALIGNMENT_SHIFT: size classes are multiples of 16 bytes...
    pub size_class_shift: u64,
    /// ...up to SMALL_REQUEST_THRESHOLD (512), 32 classes.
    pub size_classes: u32,
    pub pool_header: PoolHeader,
    pub arena_object: ArenaObject,
    /// What `_Py_GetAllocatedBlocks` adds the pools' count to.
    pub counter: BlockCounter,
    /// Where `arenas`, `maxarenas` and the counter are.
    pub state: ObmallocLocation,
}

/// `struct arena_object`, an entry of `arenas[]`, laid out alike from 3.8
/// to 3.13.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaObject {
    /// The arena's memory, 0 for an unused entry.
    pub address: u64,
    /// Where the next pool to carve starts.
    pub pool_address: u64,
    /// u32s.
    pub nfreepools: u64,
    pub ntotalpools: u64,
    pub size: u64,
}

/// `struct pool_header`, laid out alike from 3.8 to 3.13.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolHeader {
    /// The `ref.count` union: blocks in use, a u32.
    pub ref_count: u64,
    pub freeblock: u64,
    pub nextpool: u64,
    pub arenaindex: u64,
    /// The size class index, a u32.
    pub szidx: u64,
    /// Bytes from the pool's start to its first never-used block, a u32:
    /// blocks below it are allocated unless on the `freeblock` list.
    pub nextoffset: u64,
    /// sizeof(struct pool_header) rounded to ALIGNMENT: where blocks start.
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockCounter {
    /// 3.8: `_Py_AllocatedBlocks`, every live block, small or raw.
    AllBlocks,
    /// 3.9+: `raw_allocated_blocks`, live blocks pymalloc sent to the raw
    /// allocator (requests over 512 bytes).
    RawBlocks,
}

impl BlockCounter {
    /// The counter's name, as the static is called before 3.12.
    pub const fn symbol(self) -> &'static str {
        match self {
            BlockCounter::AllBlocks => "_Py_AllocatedBlocks",
            BlockCounter::RawBlocks => "raw_allocated_blocks",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObmallocLocation {
    /// 3.8 to 3.11: statics named `arenas`, `maxarenas` and the counter's
    /// symbol, or found in the code of the exported readers when stripped.
    Statics,
    /// 3.12: `struct _obmalloc_state` embedded in PyInterpreterState at
    /// `interp_obmalloc`; the main interpreter is the pointer at
    /// `_PyRuntime + interpreters_main`.
    InMainInterpreter { interpreters_main: u64, interp_obmalloc: u64, mgmt: ObmallocMgmt },
    /// 3.13: a pointer to it at `interp_obmalloc` in the main interpreter,
    /// which is embedded in `_PyRuntime` at `main_interpreter`. Trusted only
    /// where sizeof(_PyRuntimeState) and sizeof(PyInterpreterState), as the
    /// build's `_Py_DebugOffsets` state them, are `runtime_size` and
    /// `interp_size`.
    PointedByMainInterpreter {
        main_interpreter: u64,
        interp_obmalloc: u64,
        runtime_size: u64,
        interp_size: u64,
        mgmt: ObmallocMgmt,
    },
}

/// Where `_obmalloc_state.mgmt` (3.12+) keeps `arenas`, `maxarenas` and
/// `raw_allocated_blocks`, from the state's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObmallocMgmt {
    pub arenas: u64,
    pub maxarenas: u64,
    pub raw_allocated_blocks: u64,
}

const MGMT: ObmallocMgmt = ObmallocMgmt { arenas: 0x200, maxarenas: 0x208, raw_allocated_blocks: 0x440 };

// `PyASCIIObject.state` bits, at the same places in 3.8-3.13 (interned:2,
// kind:3, compact:1, ascii:1, then ready or statically_allocated).
/// `(state >> UNICODE_KIND_SHIFT) & UNICODE_KIND_MASK` is the bytes per code point (1, 2 or 4).
pub const UNICODE_KIND_SHIFT: u32 = 2;
pub const UNICODE_KIND_MASK: u32 = 0b111;
/// Set when the characters follow the object header.
pub const UNICODE_COMPACT: u32 = 1 << 5;
/// Set when they are ASCII, and so start at `unicode_ascii_data`.
pub const UNICODE_ASCII: u32 = 1 << 6;

/// Py_TPFLAGS_MANAGED_DICT (3.11+) and Py_TPFLAGS_MANAGED_WEAKREF (3.12+).
const MANAGED_DICT: u64 = 1 << 4;
const MANAGED_WEAKREF: u64 = 1 << 3;

pub const PY38: Layout = Layout {
    version: (3, 8),
    tstate_chain: Chain::new(&[1368]),
    tstate_thread_id: 176,
    threads_chain: Chain::new(&[32, 8]),
    tstate_next: 8,
    frame_chain: Chain::new(&[24]),
    frame_code: 32,
    frame_previous: 24,
    frame_instr: 104,
    instr_kind: InstrKind::LastiBytes,
    frame_owner_cstack: None,
    eval_entry: EvalEntry::EveryFrame,
    code_filename: 104,
    code_name: 112,
    code_qualname: None,
    code_firstlineno: 40,
    code_linetable: 120,
    line_table: LineTableFormat::Lnotab,
    code_bytecode: 48,
    bytes_size: 16,
    bytes_data: 32,
    unicode_length: 16,
    unicode_state: 32,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
    code_firsttraceable: None,
    type_name: 24,
    type_basicsize: 32,
    type_flags: 168,
    type_dict: 264,
    dict: Dict { keys: 32, nentries: 32, indices: 40, table: DictTable::Sized(8) },
    gc_head_size: 16,
    preheader_flags: 0,
    interpreters_head: 32,
    interp_next: 0,
    gc: Gc {
        state: GcState::InRuntime(344),
        generations: 24,
        generation_count: 3,
        generation_size: 24,
        permanent_generation: 104,
    },
    pymalloc: Pymalloc {
        pool_size: 4 << 10,
        arena_size: 256 << 10,
        size_class_shift: 4,
        size_classes: 32,
        pool_header: PoolHeader {
            ref_count: 0,
            freeblock: 8,
            nextpool: 0x10,
            arenaindex: 0x20,
            szidx: 0x24,
            nextoffset: 0x28,
            size: 48,
        },
        arena_object: ArenaObject { address: 0, pool_address: 8, nfreepools: 16, ntotalpools: 20, size: 48 },
        counter: BlockCounter::AllBlocks,
        state: ObmallocLocation::Statics,
    },
};

/// 3.9 moved the GC state out of `_PyRuntime` into each interpreter, hence
/// the shorter first step; its block counter counts only raw blocks.
pub const PY39: Layout = Layout {
    version: (3, 9),
    tstate_chain: Chain::new(&[568]),
    gc: Gc { state: GcState::InInterpreter(616), ..PY38.gc },
    pymalloc: Pymalloc { counter: BlockCounter::RawBlocks, ..PY38.pymalloc },
    ..PY38
};

/// 3.10: `f_lasti` counts code units, PEP 626's line table, bigger pools and arenas.
pub const PY310: Layout = Layout {
    version: (3, 10),
    frame_instr: 96,
    instr_kind: InstrKind::LastiCodeUnits,
    line_table: LineTableFormat::LineTable310,
    pymalloc: Pymalloc { pool_size: 16 << 10, arena_size: 1 << 20, ..PY39.pymalloc },
    ..PY39
};

/// 3.11: frames are `_PyInterpreterFrame`s reached through the cframe, code
/// objects hold their bytecode inline and carry the location table.
pub const PY311: Layout = Layout {
    version: (3, 11),
    tstate_chain: Chain::new(&[576]),
    tstate_thread_id: 152,
    threads_chain: Chain::new(&[40, 16]),
    frame_chain: Chain::new(&[56, 8]),
    frame_previous: 48,
    frame_instr: 56,
    instr_kind: InstrKind::PrevInstrPointer,
    eval_entry: EvalEntry::Flag(68),
    code_filename: 112,
    code_name: 120,
    code_qualname: Some(128),
    code_firstlineno: 72,
    code_linetable: 136,
    line_table: LineTableFormat::Locations,
    code_bytecode: 184,
    code_firsttraceable: Some(168),
    preheader_flags: MANAGED_DICT,
    dict: Dict {
        nentries: 24,
        indices: 32,
        table: DictTable::Log2 { size: 8, index_bytes: 9, kind: 10 },
        ..PY310.dict
    },
    interpreters_head: 40,
    gc: Gc { state: GcState::InInterpreter(648), ..PY310.gc },
    ..PY310
};

/// 3.12 keeps the current thread state in a thread-local, not in
/// `_PyRuntime`, so the GIL's last holder stands in for it; C-stack shim
/// frames appear; str lost `wstr`; pymalloc moved into the interpreter.
pub const PY312: Layout = Layout {
    version: (3, 12),
    tstate_chain: Chain::new(&[48, 384, 8]),
    tstate_thread_id: 136,
    threads_chain: Chain::new(&[40, 72]),
    frame_chain: Chain::new(&[56, 0]),
    frame_code: 0,
    frame_previous: 8,
    frame_owner_cstack: Some((70, 3)),
    eval_entry: EvalEntry::BeforeShim,
    code_firstlineno: 68,
    code_bytecode: 192,
    unicode_ascii_data: 40,
    unicode_compact_data: 56,
    code_firsttraceable: Some(176),
    preheader_flags: MANAGED_DICT | MANAGED_WEAKREF,
    gc: Gc { state: GcState::InInterpreter(112), ..PY311.gc },
    pymalloc: Pymalloc {
        state: ObmallocLocation::InMainInterpreter { interpreters_main: 0x30, interp_obmalloc: 0xf78, mgmt: MGMT },
        ..PY311.pymalloc
    },
    ..PY311
};

/// 3.13: `tstate->current_frame`, `instr_ptr`, and pymalloc's state behind a
/// pointer. Also what `debug_offsets::parse` falls back on for what 3.13's
/// `_Py_DebugOffsets` does not say.
pub const PY313: Layout = Layout {
    version: (3, 13),
    tstate_chain: Chain::new(&[640, 16, 8]),
    tstate_thread_id: 152,
    threads_chain: Chain::new(&[632, 7344]),
    frame_chain: Chain::new(&[72]),
    instr_kind: InstrKind::InstrPointer,
    code_bytecode: 200,
    code_firsttraceable: Some(184),
    interpreters_head: 632,
    interp_next: 7264,
    gc: Gc { state: GcState::InInterpreter(7400), ..PY312.gc },
    pymalloc: Pymalloc {
        state: ObmallocLocation::PointedByMainInterpreter {
            main_interpreter: 0x15920,
            interp_obmalloc: 0x2a30,
            runtime_size: 0x452b8,
            interp_size: 0x2f998,
            mgmt: MGMT,
        },
        ..PY312.pymalloc
    },
    ..PY312
};

static LAYOUTS: [Layout; 6] = [PY38, PY39, PY310, PY311, PY312, PY313];

/// The table for CPython `major.minor`, or None when there is none for it
/// on this target.
pub fn layout_for(major: u8, minor: u8) -> Option<&'static Layout> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    LAYOUTS.iter().find(|layout| layout.version == (major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_has_one_table() {
        for minor in 8..=13 {
            assert_eq!(layout_for(3, minor).map(|layout| layout.version), Some((3, minor)));
        }
        for (major, minor) in [(2, 7), (3, 6), (3, 7), (3, 14), (4, 0)] {
            assert!(layout_for(major, minor).is_none(), "{major}.{minor}");
        }
    }

    #[test]
    fn chains_read_as_their_steps() {
        let chain = Chain::<3>::new(&[48, 384]);
        assert_eq!(*chain, [48, 384]);
        assert_eq!(chain, Chain::new(&[48, 384]));
        assert_ne!(chain, Chain::new(&[48, 384, 0]));
        assert_eq!(*PY311.frame_chain, [56, 8]);
    }

    #[test]
    #[should_panic(expected = "longer than the kernel side follows")]
    fn chains_refuse_too_many_steps() {
        Chain::<2>::new(&[1, 2, 3]);
    }

    #[test]
    fn the_thread_list_starts_at_the_interpreter_list() {
        for layout in &LAYOUTS {
            assert_eq!(layout.threads_chain[0], layout.interpreters_head, "{:?}", layout.version);
        }
    }

    #[test]
    fn int_instruction_fields_are_masked() {
        for layout in &LAYOUTS {
            let int_field = layout.version <= (3, 10);
            assert_eq!(layout.instr_kind.mask() == 0xffff_ffff, int_field, "{:?}", layout.version);
        }
    }

    #[test]
    fn shim_frames_exactly_from_312() {
        for layout in &LAYOUTS {
            assert_eq!(layout.frame_owner_cstack.is_some(), layout.version >= (3, 12), "{:?}", layout.version);
            assert_eq!(layout.code_qualname.is_some(), layout.version >= (3, 11), "{:?}", layout.version);
        }
    }
}
