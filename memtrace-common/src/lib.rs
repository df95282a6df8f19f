//! The plain data both sides of memtrace agree on: BPF map keys and values,
//! the per-target configuration userspace writes for the kernel side, the
//! probe cookie that tells one BPF program which allocator function fired, and
//! the loss counters. Everything here is `#[repr(C)]`, `Copy` and `no_std`;
//! behaviour lives in `memtrace-ebpf` (kernel) and `memtrace` (userspace).
#![no_std]

/// What an allocator function does, as far as accounting is concerned.
/// Stored in [`ProbeCookie::op`].
pub mod op {
    /// Returns a new block of `size` bytes (times `count` when a count
    /// argument is given): malloc, calloc, memalign, PyObject_Malloc, ...
    pub const ALLOC: u8 = 0;
    /// Resizes the block at `ptr` to `size` (times `count`) bytes.
    pub const REALLOC: u8 = 1;
    /// posix_memalign: returns 0 and stores the block through `ptr`.
    pub const POSIX_MEMALIGN: u8 = 2;
    /// Releases the block at `ptr`.
    pub const FREE: u8 = 3;
    /// mmap: an allocation only when anonymous (flags in argument 3) and
    /// accessible (protection in argument 2).
    pub const MMAP: u8 = 4;
    /// munmap(ptr, size).
    pub const MUNMAP: u8 = 5;
    /// CPython's `_Py_NewReference(ptr)`: an object is (re)born at `ptr`,
    /// possibly in a block taken from a free list rather than an allocator.
    pub const NEW_REFERENCE: u8 = 6;
    /// An inlined copy of pymalloc's fast path takes a block from the pool
    /// in register `ptr`: the block is the pool's `freeblock`, its size the
    /// pool's size class.
    pub const POOL_POP: u8 = 7;
    /// pymalloc's `allocate_from_new_pool`: returns the first block of a new
    /// pool, its size the pool's size class.
    pub const POOL_NEW: u8 = 8;
    /// A copy of pymalloc's fast path has taken the block in register `ptr`
    /// from its pool (probed past the pop, where the kernel emulates the
    /// instruction): its size is the pool's size class.
    pub const POOL_TAKEN: u8 = 9;
    /// CPython 3.8's arena allocator, `_PyObject_ArenaMmap`, which its
    /// out-of-line `pymalloc_alloc` calls: what it maps holds pools, whose
    /// blocks are the allocations, so nothing inside it is recorded.
    pub const ARENA: u8 = 10;
}

/// An x86-64 general register, numbered by its hardware encoding (rax 0,
/// rcx 1, ..., r15 15): the number x86 instructions encode and the kernel
/// side's register file (read from pt_regs) is indexed by. Cookies carry the
/// number, [`Reg::number`], since the kernel side picks registers at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reg {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
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

impl Reg {
    /// Integer arguments in the SysV order.
    pub const ARGS: [Reg; 6] = [Reg::Rdi, Reg::Rsi, Reg::Rdx, Reg::Rcx, Reg::R8, Reg::R9];

    /// The hardware number.
    pub const fn number(self) -> u8 {
        self as u8
    }

    /// The `n`th integer argument, counting from 0; None from the seventh
    /// on, which travels on the stack (and for [`NO_ARG`]).
    pub fn arg(n: u8) -> Option<Reg> {
        Self::ARGS.get(usize::from(n)).copied()
    }

    /// The 64-bit name, as AT&T syntax spells it after its `%`.
    pub const fn name(self) -> &'static str {
        match self {
            Reg::Rax => "rax",
            Reg::Rcx => "rcx",
            Reg::Rdx => "rdx",
            Reg::Rbx => "rbx",
            Reg::Rsp => "rsp",
            Reg::Rbp => "rbp",
            Reg::Rsi => "rsi",
            Reg::Rdi => "rdi",
            Reg::R8 => "r8",
            Reg::R9 => "r9",
            Reg::R10 => "r10",
            Reg::R11 => "r11",
            Reg::R12 => "r12",
            Reg::R13 => "r13",
            Reg::R14 => "r14",
            Reg::R15 => "r15",
        }
    }
}

/// Which allocator layer a probed function belongs to. A site's layer says
/// whose accounting its numbers follow (tracemalloc counts the Python layer).
pub mod layer {
    pub const LIBC: u8 = 0;
    pub const PYMALLOC: u8 = 1;
    pub const MMAP: u8 = 2;
    pub const COUNT: usize = 3;
}

/// Marks an argument or register slot the function does not have.
pub const NO_ARG: u8 = 0xff;

/// The BPF cookie of every allocator probe. One entry program, one return
/// program and one free program serve all allocator functions: the verifier
/// rejects reading `ctx.arg(i)` with a run-time `i`, so the programs read
/// the registers and pick the ones this cookie names (by [`Reg::number`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeCookie {
    pub op: u8,
    pub layer: u8,
    pub size_reg: u8,
    pub count_reg: u8,
    pub ptr_reg: u8,
    /// Index of the function in userspace's probe plan; lets a return probe
    /// recognise the call its entry probe started.
    pub function: u8,
}

impl ProbeCookie {
    pub const fn to_u64(self) -> u64 {
        (self.op as u64)
            | (self.layer as u64) << 8
            | (self.size_reg as u64) << 16
            | (self.count_reg as u64) << 24
            | (self.ptr_reg as u64) << 32
            | (self.function as u64) << 40
    }

    pub const fn from_u64(v: u64) -> Self {
        Self {
            op: v as u8,
            layer: (v >> 8) as u8,
            size_reg: (v >> 16) as u8,
            count_reg: (v >> 24) as u8,
            ptr_reg: (v >> 32) as u8,
            function: (v >> 40) as u8,
        }
    }
}

/// The outermost allocator call of one thread: in progress between its
/// entry and return probes, then done. Calls made from inside one in
/// progress (PyObject_Malloc falling through to malloc, realloc calling
/// malloc) are not allocations of their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingCall {
    /// Non-zero once the call has returned.
    pub done: u64,
    /// The block a done call returned, until an object is born in it: an
    /// object initialised in the block its thread just allocated is new,
    /// not reused from a free list.
    pub block: u64,
    pub size: u64,
    /// The block being resized (realloc) or where the result is stored
    /// (posix_memalign).
    pub ptr: u64,
    pub cookie: u64,
    /// Calls of the same function nested inside this one whose returns must
    /// not complete it.
    pub same_function_depth: u64,
    /// realloc forgets the old block at entry (once the call is under way
    /// another thread may be handed the same address); when the call fails
    /// the block is still live and this record is put back.
    pub replaced: AllocInfo,
    pub has_replaced: u64,
    /// The thread's Python thread state as the last frame walk found it, 0
    /// before one: checked first, it spares the walk the search through
    /// the interpreter's structures. It outlives the calls, which write
    /// the other fields in place.
    pub tstate: u64,
}

/// A live allocation: (process, address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub pid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// Where an allocation was made. `caller` is the return address into the
/// code that called the allocator, always present; the stack ids are 0 when
/// that kind of stack was not collected or could not be.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteKey {
    pub pid: u32,
    pub layer: u32,
    pub caller: u64,
    /// Id of the stack in NATIVE_STACKS (with `pid`, its [`StackKey`]), 0 if none.
    pub native_stack: u64,
    /// Id of the stack in PYTHON_STACKS (with `pid`, its [`StackKey`]), 0 if none.
    pub python_stack: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocInfo {
    pub size: u64,
    pub timestamp_ns: u64,
    pub site: SiteKey,
}

/// Per-site totals, updated with atomic adds by every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteStats {
    /// Allocated since attach and not yet freed.
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    /// Allocated since attach, freed or not.
    pub total_bytes: u64,
    pub total_count: u64,
}

/// A stack's key in NATIVE_STACKS and PYTHON_STACKS, and what
/// NEW_PYTHON_STACKS announces: the stack's content hash within its process.
/// Stacks hold addresses, which mean something only in their own process,
/// so two processes never share one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackKey {
    pub pid: u32,
    pub _pad: u32,
    /// The id a `SiteKey` holds; never 0.
    pub id: u64,
}

/// Deepest native stack kept per site.
pub const MAX_NATIVE_FRAMES: usize = 32;

/// An address in one process's code, the key of UNWIND_RULES.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnwindKey {
    pub pid: u32,
    pub _pad: u32,
    pub pc: u64,
}

/// How to find the caller of a frame stopped at one code address (a return
/// address, or a probed instruction), compiled by userspace from the
/// binary's call frame information for the kernel side, which unwinds
/// stacks without frame pointers with it. The canonical frame address (CFA)
/// is rsp or rbp plus `cfa_offset`; the return address is at CFA - 8 (the
/// x86-64 psABI); rbp was saved at CFA + `rbp_offset` when
/// [`UnwindRule::RBP_SAVED`] is set, and is unchanged otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRule {
    pub cfa_offset: i32,
    pub rbp_offset: i16,
    pub flags: u16,
}

impl UnwindRule {
    /// The CFA is rbp-based (a frame-pointer frame), not rsp-based.
    pub const CFA_RBP: u16 = 1;
    pub const RBP_SAVED: u16 = 2;
    /// The outermost frame (`_start`, a thread's start): no caller.
    pub const OUTERMOST: u16 = 4;

    pub const fn outermost() -> Self {
        Self { cfa_offset: 0, rbp_offset: 0, flags: Self::OUTERMOST }
    }

    /// The caller's (pc, rsp, rbp) from this frame's `rsp` and `rbp`, with
    /// `read` fetching a word of the stack; None at the outermost frame, or
    /// when a read fails or the stack would not grow towards its base.
    /// One definition for both sides: the kernel side unwinds with it, and
    /// userspace's tests check it against real stacks.
    #[inline(always)]
    pub fn caller(&self, rsp: u64, rbp: u64, mut read: impl FnMut(u64) -> Option<u64>) -> Option<(u64, u64, u64)> {
        if self.flags & Self::OUTERMOST != 0 {
            return None;
        }
        let base = if self.flags & Self::CFA_RBP != 0 { rbp } else { rsp };
        let cfa = base.wrapping_add(self.cfa_offset as i64 as u64);
        // A caller's frame lies above its callee's.
        if cfa <= rsp {
            return None;
        }
        let pc = read(cfa - 8)?;
        let rbp = if self.flags & Self::RBP_SAVED != 0 {
            read(cfa.wrapping_add(self.rbp_offset as i64 as u64))?
        } else {
            rbp
        };
        Some((pc, cfa, rbp))
    }
}
/// Deepest Python stack kept per site (`--frames` is capped here).
pub const MAX_PYTHON_FRAMES: usize = 32;

/// User-space return addresses, innermost (the allocator's caller) first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NativeStack {
    pub len: u64,
    pub frames: [u64; MAX_NATIVE_FRAMES],
}

/// One Python frame as the kernel sees it: no strings, only what userspace
/// needs to find the source line later.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PythonFrame {
    /// Address of the code object in the target.
    pub code: u64,
    /// The frame's instruction position as the interpreter stores it
    /// (byte or code-unit index, or a pointer into the bytecode; the
    /// interpreter layout says which).
    pub instr: u64,
    /// Fields of the code object folded together, so a freed code object
    /// whose address is reused by another function gives another stack.
    pub code_tag: u64,
    /// [`PythonFrame::ENTRY`] or 0.
    pub flags: u64,
}

impl PythonFrame {
    /// The first frame a C-level call of the eval loop ran: where native
    /// frames go between Python frames in a mixed stack.
    pub const ENTRY: u64 = 1;
}

/// Folds a code object's first line number and the addresses of its name
/// and file name into one word. Computed by the kernel at each allocation
/// and by userspace before trusting a cached resolution of that address.
pub const fn code_tag(firstlineno: u32, name: u64, filename: u64) -> u64 {
    (firstlineno as u64) ^ name.rotate_left(20) ^ filename.rotate_left(42)
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PythonStack {
    pub len: u32,
    /// Non-zero when the walk stopped at the frame limit with frames left.
    pub truncated: u32,
    pub frames: [PythonFrame; MAX_PYTHON_FRAMES],
}

/// How to find and walk the Python frames of one interpreter, as offsets.
/// Userspace fills it from the interpreter's version table or its
/// `_Py_DebugOffsets`; the kernel follows it without knowing versions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PythonWalk {
    /// Address of `_PyRuntime` in the target.
    pub runtime: u64,
    /// Pointer chain from `runtime` to the thread state of the thread that
    /// holds the GIL: `p = *(p + chain[i])` for each step.
    pub tstate_chain: [u64; 3],
    pub tstate_chain_len: u64,
    /// Offset of `thread_id` (pthread_self of its thread) in the thread state.
    pub tstate_thread_id: u64,
    /// Pointer chain from `runtime` to the first thread state of the main
    /// interpreter, and the offset of a thread state's `next`: how to find a
    /// thread that does not hold the GIL (in a C call that released it).
    pub threads_chain: [u64; 2],
    pub tstate_next: u64,
    /// Pointer chain from the thread state to its innermost frame.
    pub frame_chain: [u64; 2],
    pub frame_chain_len: u64,
    /// The frame bytes that hold the fields below, copied at once; the
    /// fields' offsets are relative to the window's start.
    pub frame_window: Window,
    pub frame_code: u64,
    pub frame_previous: u64,
    pub frame_instr: u64,
    /// Mask applied to the 8 bytes read at `frame_instr` (an `int` field
    /// needs the low 32 bits).
    pub frame_instr_mask: u64,
    /// Offset of the frame's owner byte, or `NO_OFFSET`.
    pub frame_owner: u64,
    /// Owner value of frames that belong to the C stack (entry shims), which
    /// are skipped; the Python frame before one is an entry frame.
    pub frame_owner_cstack: u64,
    /// Offset of the frame's `is_entry` flag byte, or `NO_OFFSET`.
    pub frame_is_entry: u64,
    /// Non-zero when every frame is run by its own C call of the eval loop.
    pub every_frame_is_entry: u64,
    /// The code object bytes that hold the fields folded into
    /// [`PythonFrame::code_tag`], copied at once, and those fields' offsets
    /// relative to the window: first line number (4 bytes), name and file
    /// name (8 bytes each).
    pub code_window: Window,
    pub code_tag_fields: [u64; 3],
    /// To find an object's memory block from its address: `tp_flags` in its
    /// type, the size of the GC header before GC objects, and the type flags
    /// that put two more words before it.
    pub type_flags: u64,
    pub gc_head_size: u64,
    pub preheader_flags: u64,
    /// pymalloc's pools, for blocks taken at inlined sites: a pool is the
    /// block's address masked by `pool_mask`, its next free block is the
    /// pointer at `pool_freeblock`, its size class index is the u32 at
    /// `pool_szidx`, and a class holds `(index + 1) << size_class_shift`
    /// bytes.
    pub pool_mask: u64,
    pub pool_freeblock: u64,
    pub pool_szidx: u64,
    pub size_class_shift: u64,
}

pub const NO_OFFSET: u64 = u64::MAX;

/// Bytes `[start, start + len)` of an object, copied with one read: a read
/// of user memory costs about the same for 8 bytes as for 100, so a frame's
/// fields are fetched together rather than one by one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub len: u64,
}

/// The widest window the kernel side copies.
pub const WINDOW_MAX: usize = 128;

/// What userspace asks of the kernel side for one traced process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetConfig {
    /// Allocations outside [min_size, max_size] are not tracked.
    pub min_size: u64,
    pub max_size: u64,
    /// Native frames per site, unwound by the kernel side with the
    /// process's UNWIND_RULES: 1 keeps only the caller.
    pub native_frames: u32,
    /// Python frames per site: 0 when the target is not a supported CPython.
    pub python_frames: u32,
    /// Non-zero to send each new site's registers and stack bytes to
    /// userspace, which unwinds them deeper than the kernel side does, to
    /// merge native frames with Python's (`--native` on Python).
    pub copy_stacks: u32,
    /// Non-zero to charge the process's new resident pages to the Python
    /// stack that first touched them (host mode's free tier).
    pub first_touch: u32,
    pub python: PythonWalk,
}

/// A type whose objects' births are traced (`--type`), in one process:
/// WATCHED_TYPES's key. The kernel side compares an object's type with it
/// before doing anything else.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WatchedTypeKey {
    pub pid: u32,
    pub _pad: u32,
    /// The type object's address in the process.
    pub type_object: u64,
}

/// How big a watched type's objects are, as the allocator was asked for
/// them: `size`, plus `item_size` per item of a variable-sized object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchedType {
    pub size: u64,
    pub item_size: u64,
}

/// A call that allocates an instance of a watched class, between its entry
/// and its return: by thread and by the stack pointer at entry, so that
/// nested calls keep their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BirthKey {
    pub tid: u32,
    pub _pad: u32,
    pub entry_sp: u64,
}

/// A place new resident pages were first touched from, the key of
/// FIRST_TOUCH_SITES: the Python stack (an id in PYTHON_STACKS), or with
/// none the faulting instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TouchKey {
    pub pid: u32,
    pub _pad: u32,
    pub python_stack: u64,
    /// The faulting instruction when there is no Python stack, else 0.
    pub ip: u64,
}

/// A charged page of a process, the key of FIRST_TOUCH_PAGES.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PageKey {
    pub pid: u32,
    pub _pad: u32,
    pub page: u64,
}

/// How one process's faults are chosen for a walk: growth past its
/// resident high-water mark always, the rest under a budget per second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TouchState {
    /// The most anonymous resident pages seen at a fault.
    pub high_water: u64,
    pub window_start_ns: u64,
    /// Faults below the high-water mark walked in the current window.
    pub sampled: u64,
}

/// Faults below the high-water mark walked per process and second.
pub const FIRST_TOUCH_SAMPLES_PER_SECOND: u64 = 100;

/// Pages a munmap or madvise gives back that are looked up one by one;
/// beyond them (64 MiB) charged pages stay charged, and are counted.
pub const FIRST_TOUCH_RELEASE_MAX_PAGES: u64 = 1 << 14;

/// Stack bytes copied per new site for userspace unwinding, in chunks that
/// stop at the first unreadable one (the top of the stack).
pub const STACK_COPY_CHUNK: usize = 512;
pub const STACK_COPY_CHUNKS: usize = 32;

/// A new site's registers at the allocator's return, and the stack above
/// them: enough for userspace to unwind through code without frame
/// pointers using the binaries' own unwind tables.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SiteStackCopy {
    pub site: SiteKey,
    /// rip, rsp, rbp, rbx, r12, r13, r14, r15: the caller's, since the
    /// callee has returned and restored them.
    pub regs: [u64; 8],
    /// Non-zero when rip is a return address (a return probe), zero when
    /// it is the probed instruction itself.
    pub rip_is_return: u64,
    /// Bytes of `stack` that were read, from rsp up.
    pub len: u64,
    pub stack: [u8; STACK_COPY_CHUNK * STACK_COPY_CHUNKS],
}

/// Kernel-wide facts userspace learns from BTF before loading.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelConfig {
    /// Offset of `thread.fsbase` in `struct task_struct`: on x86-64 the
    /// user-space thread pointer, which is what pthread_self() returns.
    pub task_fsbase: u64,
    /// Offset of `pid` in `struct task_struct`: a task's id, its
    /// process's for the child of a fork.
    pub task_pid: u64,
    /// Offsets of `mm` in `struct task_struct` and of `arg_start` and
    /// `arg_end` in `struct mm_struct`: where a process's command line lies
    /// in its memory, read at its exec in host mode so that one that exits
    /// before it could be read can still be named and matched.
    pub task_mm: u64,
    pub mm_arg_start: u64,
    pub mm_arg_end: u64,
    /// Offset in `struct mm_struct` of the global part of its count of
    /// anonymous resident pages (`rss_stat[MM_ANONPAGES].count`), which
    /// lags the exact count by at most a per-CPU batch.
    pub mm_anon_rss: u64,
}

/// A traced process changed: it forked a child process, replaced its image
/// (exec) or exited; in host mode, any process did. What PROCESS_EVENTS
/// carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    /// [`ProcessEvent::FORK`], [`ProcessEvent::EXEC`] or [`ProcessEvent::EXIT`].
    pub kind: u32,
    /// The process (the parent, for a fork).
    pub pid: u32,
    /// The new child process, for a fork.
    pub child: u32,
    /// Bytes of `args` read, for an exec in host mode.
    pub args_len: u32,
    /// bpf_ktime_get_ns when it happened.
    pub time_ns: u64,
    /// The process's name (the task's `comm`, NUL-padded) after the event.
    pub comm: [u8; 16],
    /// The start of the new image's command line, NUL-separated as in
    /// /proc/PID/cmdline: host mode's exec events only.
    pub args: [u8; PROCESS_ARGS_MAX],
}

/// The most of a command line an exec event carries.
pub const PROCESS_ARGS_MAX: usize = 256;

impl ProcessEvent {
    pub const FORK: u32 = 0;
    pub const EXEC: u32 = 1;
    /// The process's last thread exited (host mode only).
    pub const EXIT: u32 = 2;
}

impl Default for ProcessEvent {
    fn default() -> Self {
        Self { kind: 0, pid: 0, child: 0, args_len: 0, time_ns: 0, comm: [0; 16], args: [0; PROCESS_ARGS_MAX] }
    }
}

/// One process's counters, per CPU in COUNTERS: indexed by [`counter`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CounterSet {
    pub values: [u64; counter::COUNT as usize],
}

impl Default for CounterSet {
    fn default() -> Self {
        Self { values: [0; counter::COUNT as usize] }
    }
}

/// The names of the BPF maps userspace opens, as the kernel side declares
/// them (aya names a map after its static). A test checks each against the
/// built object.
pub mod map_name {
    pub const TARGETS: &str = "TARGETS";
    pub const ALLOCS: &str = "ALLOCS";
    pub const SITES: &str = "SITES";
    pub const NATIVE_STACKS: &str = "NATIVE_STACKS";
    pub const PYTHON_STACKS: &str = "PYTHON_STACKS";
    pub const NEW_PYTHON_STACKS: &str = "NEW_PYTHON_STACKS";
    pub const SITE_STACKS: &str = "SITE_STACKS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const PROCESS_EVENTS: &str = "PROCESS_EVENTS";
    pub const EVENTS_LOST: &str = "EVENTS_LOST";
    pub const FIRST_TOUCH_SITES: &str = "FIRST_TOUCH_SITES";
    pub const FIRST_TOUCH_PAGES: &str = "FIRST_TOUCH_PAGES";
    pub const FIRST_TOUCH_STATE: &str = "FIRST_TOUCH_STATE";
    pub const UNWIND_RULES: &str = "UNWIND_RULES";
    pub const WATCHED_TYPES: &str = "WATCHED_TYPES";
    pub const ALL: [&str; 15] = [
        TARGETS,
        ALLOCS,
        SITES,
        NATIVE_STACKS,
        PYTHON_STACKS,
        NEW_PYTHON_STACKS,
        SITE_STACKS,
        COUNTERS,
        PROCESS_EVENTS,
        UNWIND_RULES,
        EVENTS_LOST,
        WATCHED_TYPES,
        FIRST_TOUCH_SITES,
        FIRST_TOUCH_PAGES,
        FIRST_TOUCH_STATE,
    ];
}

/// Indexes into each process's [`CounterSet`] in COUNTERS. Everything the kernel side
/// could not account is counted here and shown in every report.
pub mod counter {
    /// Allocations not tracked because ALLOCS was full.
    pub const ALLOC_MAP_FULL: u32 = 0;
    /// Allocations not tracked because SITES was full.
    pub const SITE_MAP_FULL: u32 = 1;
    /// Stacks not kept because a stack map was full (site keeps its caller).
    pub const STACK_MAP_FULL: u32 = 2;
    /// Native stacks cut short: their unwinding reached code it has no rule
    /// for (mapped since the rules were made, or without call frame
    /// information) or stack it could not read. The site keeps the frames
    /// found so far, so callers that differ only beyond them share it.
    pub const UNWIND_STOPPED: u32 = 3;
    /// Allocator calls that returned NULL: not allocations.
    pub const FAILED_ALLOC: u32 = 4;
    /// Reads of the target's memory that faulted during a Python walk.
    pub const PYTHON_READ_FAULT: u32 = 5;
    /// Python stacks cut at the frame limit.
    pub const PYTHON_TRUNCATED: u32 = 6;
    /// An address allocated twice without a free seen in between; the first
    /// allocation is treated as freed.
    pub const MISSED_FREE: u32 = 7;
    /// Allocations by a thread that was not running Python code (no GIL):
    /// attributed to native frames only. Not a loss.
    pub const NO_PYTHON_THREAD: u32 = 8;
    /// New sites whose stack could not be sent to userspace for unwinding
    /// (its ring was full): they show fewer native frames.
    pub const STACK_COPY_LOST: u32 = 9;
    /// By layer (add the layer): allocations seen, frees matched to them,
    /// and frees of addresses not allocated since attach. Together they say
    /// how a layer's live blocks changed since attach, which is checked
    /// against the allocator's own count where memtrace can read it.
    pub const ALLOCS_SEEN: u32 = 10;
    pub const FREES_MATCHED: u32 = ALLOCS_SEEN + super::layer::COUNT as u32;
    pub const UNKNOWN_FREE: u32 = FREES_MATCHED + super::layer::COUNT as u32;
    /// Forks and execs of the process that could not be announced (their
    /// ring was full): a child not followed, an exec seen late.
    pub const PROCESS_EVENT_LOST: u32 = UNKNOWN_FREE + super::layer::COUNT as u32;
    /// First touch (host mode): page faults walked because they took the
    /// process past its resident high-water mark, those below it walked
    /// under the per-process budget, those below it not walked (over the
    /// budget: their pages are not charged), pages not charged because the
    /// page map was full, and given-back pages not looked up (a release
    /// larger than FIRST_TOUCH_RELEASE_MAX_PAGES).
    pub const TOUCH_GROWTH: u32 = PROCESS_EVENT_LOST + 1;
    pub const TOUCH_SAMPLED: u32 = TOUCH_GROWTH + 1;
    pub const TOUCH_SKIPPED: u32 = TOUCH_SAMPLED + 1;
    pub const TOUCH_MAP_FULL: u32 = TOUCH_SKIPPED + 1;
    pub const TOUCH_RELEASE_CUT: u32 = TOUCH_MAP_FULL + 1;
    pub const COUNT: u32 = TOUCH_RELEASE_CUT + 1;

    /// The counters of what could not be accounted, in the order reports
    /// print them.
    pub const LOSSES: [u32; 7] = [
        ALLOC_MAP_FULL,
        SITE_MAP_FULL,
        STACK_MAP_FULL,
        UNWIND_STOPPED,
        PYTHON_READ_FAULT,
        STACK_COPY_LOST,
        PROCESS_EVENT_LOST,
    ];

    /// A match rather than a search of LOSSES: it runs in BPF programs.
    pub fn is_loss(index: u32) -> bool {
        matches!(
            index,
            ALLOC_MAP_FULL
                | SITE_MAP_FULL
                | STACK_MAP_FULL
                | UNWIND_STOPPED
                | PYTHON_READ_FAULT
                | STACK_COPY_LOST
                | PROCESS_EVENT_LOST
        )
    }

    /// The name reports and logs give a counter; the per-layer ones are
    /// named for what they sum to.
    pub const fn name(index: u32) -> &'static str {
        match index {
            ALLOC_MAP_FULL => "alloc-map-full",
            SITE_MAP_FULL => "site-map-full",
            STACK_MAP_FULL => "stack-map-full",
            UNWIND_STOPPED => "unwind-stops",
            FAILED_ALLOC => "failed-allocs",
            PYTHON_READ_FAULT => "python-reads",
            PYTHON_TRUNCATED => "truncated-python-stacks",
            MISSED_FREE => "missed-frees",
            NO_PYTHON_THREAD => "no-python-thread",
            STACK_COPY_LOST => "native-copies",
            PROCESS_EVENT_LOST => "process-events",
            TOUCH_GROWTH => "growth-faults-walked",
            TOUCH_SAMPLED => "faults-sampled",
            TOUCH_SKIPPED => "faults-skipped",
            TOUCH_MAP_FULL => "page-map-full",
            TOUCH_RELEASE_CUT => "release-cut",
            i if i >= UNKNOWN_FREE && i < COUNT => "unknown-frees",
            i if i >= FREES_MATCHED && i < UNKNOWN_FREE => "frees-matched",
            i if i >= ALLOCS_SEEN && i < FREES_MATCHED => "allocs-seen",
            _ => "unknown-counter",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type here is #[repr(C)], Copy, made of integers only, and
    // has no padding the kernel could leave uninitialised.
    unsafe impl aya::Pod for super::PendingCall {}
    unsafe impl aya::Pod for super::AllocKey {}
    unsafe impl aya::Pod for super::SiteKey {}
    unsafe impl aya::Pod for super::ProcessEvent {}
    unsafe impl aya::Pod for super::AllocInfo {}
    unsafe impl aya::Pod for super::SiteStats {}
    unsafe impl aya::Pod for super::NativeStack {}
    unsafe impl aya::Pod for super::PythonFrame {}
    unsafe impl aya::Pod for super::PythonStack {}
    unsafe impl aya::Pod for super::PythonWalk {}
    unsafe impl aya::Pod for super::Window {}
    unsafe impl aya::Pod for super::TargetConfig {}
    unsafe impl aya::Pod for super::KernelConfig {}
    unsafe impl aya::Pod for super::SiteStackCopy {}
    unsafe impl aya::Pod for super::StackKey {}
    unsafe impl aya::Pod for super::CounterSet {}
    unsafe impl aya::Pod for super::UnwindKey {}
    unsafe impl aya::Pod for super::UnwindRule {}
    unsafe impl aya::Pod for super::WatchedTypeKey {}
    unsafe impl aya::Pod for super::WatchedType {}
    unsafe impl aya::Pod for super::TouchKey {}
    unsafe impl aya::Pod for super::PageKey {}
    unsafe impl aya::Pod for super::TouchState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_round_trips() {
        let c = ProbeCookie {
            op: op::REALLOC,
            layer: layer::PYMALLOC,
            size_reg: Reg::Rdx.number(),
            count_reg: NO_ARG,
            ptr_reg: Reg::Rsi.number(),
            function: 17,
        };
        assert_eq!(ProbeCookie::from_u64(c.to_u64()), c);
    }

    #[test]
    fn argument_registers_in_sysv_order() {
        assert_eq!(Reg::arg(0), Some(Reg::Rdi));
        assert_eq!(Reg::arg(1), Some(Reg::Rsi));
        assert_eq!(Reg::arg(5), Some(Reg::R9));
        assert_eq!(Reg::arg(6), None);
        assert_eq!(Reg::arg(NO_ARG), None);
    }
}
