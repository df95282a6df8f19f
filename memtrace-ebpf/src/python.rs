//! The CPython frame walk. Finds the thread state of the thread holding the
//! GIL, checks that it is the current thread, and follows its frame chain,
//! keeping per frame only the code object address, the instruction position
//! and a tag of the code object's identity; strings are read by userspace
//! later. Every offset comes from the target's `PythonWalk`: this file knows
//! no interpreter versions.

use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf,
        generated::{bpf_get_current_task, bpf_loop},
    },
    macros::map,
    maps::PerCpuArray,
};
use memtrace_common::{
    MAX_PYTHON_FRAMES, NO_OFFSET, PythonFrame, PythonStack, PythonWalk, StackKey, WINDOW_MAX, Window, code_tag, counter,
};

use crate::{
    maps::{KERNEL_CONFIG, NEW_PYTHON_STACKS, PYTHON_STACKS, count},
    stacks::{intern, mix},
};

/// The walk in progress on each CPU (see [`WalkState`]).
#[map]
static WALK_SCRATCH: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(1, 0);

fn read<T: Copy>(addr: u64) -> Result<T, ()> {
    // SAFETY: bpf_probe_read_user copies from the target's address space and
    // fails cleanly on an unmapped or paged-out address.
    unsafe { bpf_probe_read_user(addr as *const T) }.map_err(|_| count(counter::PYTHON_READ_FAULT))
}

/// The user-space thread pointer of the current thread: what
/// `pthread_self()` returns, and what CPython stores as `thread_id`.
fn current_thread_pointer() -> u64 {
    // SAFETY: volatile so the compiler does not fold the placeholder value;
    // userspace rewrites it before loading.
    let offset = unsafe { core::ptr::read_volatile(&KERNEL_CONFIG.task_fsbase) };
    // SAFETY: a helper without arguments; the task pointer is only read
    // through bpf_probe_read_kernel below.
    let task = unsafe { bpf_get_current_task() };
    // SAFETY: reads kernel memory of the current task at an offset taken
    // from BTF; a bad offset yields an error, not a fault.
    unsafe { bpf_probe_read_kernel((task + offset) as *const u64) }.unwrap_or(0)
}

/// Follows `p = *(p + offsets[i])` for the first `len` offsets.
fn follow(mut p: u64, offsets: &[u64], len: u64) -> Result<u64, ()> {
    for (i, offset) in offsets.iter().enumerate() {
        if i as u64 >= len || p == 0 {
            break;
        }
        p = read::<u64>(p + offset)?;
    }
    Ok(p)
}

/// Threads searched for one that does not hold the GIL.
const MAX_THREADS: u32 = 128;

/// The current thread's thread state, 0 if it runs no Python. Usually it
/// holds the GIL (one chain of reads finds it); a thread in a C call that
/// released the GIL (ctypes, I/O) is found along the interpreter's thread
/// list. A thread is matched by its thread id `me`, which is its thread
/// pointer: any other thread's frames would be the wrong ones to blame.
fn current_tstate(walk: &PythonWalk, me: u64) -> u64 {
    if let Ok(holder) = follow(walk.runtime, &walk.tstate_chain, walk.tstate_chain_len)
        && holder != 0
        && read::<u64>(holder + walk.tstate_thread_id) == Ok(me)
    {
        return holder;
    }
    let Ok(first) = follow(walk.runtime, &walk.threads_chain, walk.threads_chain.len() as u64) else { return 0 };
    let mut search =
        ThreadSearch { next: first, me, found: 0, thread_id: walk.tstate_thread_id, tstate_next: walk.tstate_next };
    // SAFETY: find_thread_step has the callback signature bpf_loop expects,
    // and `search` outlives the call.
    unsafe {
        bpf_loop(MAX_THREADS, find_thread_step as *mut core::ffi::c_void, (&raw mut search).cast(), 0);
    }
    search.found
}

#[repr(C)]
struct ThreadSearch {
    next: u64,
    me: u64,
    found: u64,
    thread_id: u64,
    tstate_next: u64,
}

/// One thread state of the list. Returns 0 to go on, 1 to stop.
extern "C" fn find_thread_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the ThreadSearch current_tstate gave it.
    let search = unsafe { &mut *ctx.cast::<ThreadSearch>() };
    if search.next == 0 {
        return 1;
    }
    match read::<u64>(search.next + search.thread_id) {
        Ok(id) if id == search.me => {
            search.found = search.next;
            return 1;
        }
        Ok(_) => {}
        Err(()) => return 1,
    }
    search.next = read::<u64>(search.next + search.tstate_next).unwrap_or(0);
    0
}

/// Thread state bytes read at once: from the thread id to the first step
/// towards the innermost frame, or the other way round, in every layout.
const TSTATE_WINDOW: usize = 256;

/// The walk between `bpf_loop` steps. It lives in a per-CPU map value, not
/// on the BPF stack: a PythonStack does not fit in 512 bytes, and a map
/// value is reachable from the step callback without pointer juggling.
#[repr(C)]
pub struct WalkState {
    walk: PythonWalk,
    frame: u64,
    max_frames: u64,
    stack: PythonStack,
    frame_bytes: [u8; WINDOW_MAX],
    code_bytes: [u8; WINDOW_MAX],
    tstate_bytes: [u8; TSTATE_WINDOW],
}

/// The innermost frame of thread state `tstate` if it is the thread state
/// of thread `me`: its thread id and its first pointer towards the frame
/// copied with one read (they lie within TSTATE_WINDOW of each other in
/// every layout memtrace knows; where they did not, every walk would take
/// the long way). None when it is not `me`'s (the thread state was freed,
/// or reused by another thread), or cannot be read. A thread that keeps
/// two thread states (an embedder swapping them) is walked in the one it
/// last ran Python in, which only the long way would notice.
fn own_frame(walk: &PythonWalk, tstate: u64, me: u64, buf: &mut [u8; TSTATE_WINDOW]) -> Option<u64> {
    let first = *walk.frame_chain.first()?;
    if walk.frame_chain_len == 0 {
        return None;
    }
    let start = walk.tstate_thread_id.min(first);
    let end = walk.tstate_thread_id.max(first) + 8;
    let len = (end - start) as usize;
    let buf = buf.get_mut(..len)?;
    // SAFETY: bpf_probe_read_user_buf copies from the target's address space
    // and fails cleanly on an unmapped address. A failure is not counted as
    // a fault: a thread state that went away is looked for afresh.
    unsafe { bpf_probe_read_user_buf((tstate + start) as *const u8, buf) }.ok()?;
    let at = |offset: u64| -> Option<u64> {
        let at = (offset - start) as usize;
        Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
    };
    if at(walk.tstate_thread_id)? != me {
        return None;
    }
    let step = at(first)?;
    let rest = walk.frame_chain.get(1..)?;
    follow(step, rest, walk.frame_chain_len - 1).ok()
}

/// Copies `window` of the object at `object` into `buf`.
fn read_window(object: u64, window: &Window, buf: &mut [u8; WINDOW_MAX]) -> Result<(), ()> {
    let len = (window.len as usize).min(WINDOW_MAX);
    let Some(buf) = buf.get_mut(..len) else { return Err(()) };
    // SAFETY: bpf_probe_read_user_buf copies from the target's address space
    // and fails cleanly on an unmapped address.
    unsafe { bpf_probe_read_user_buf((object + window.start) as *const u8, buf) }
        .map_err(|_| count(counter::PYTHON_READ_FAULT))
}

/// `N` bytes at `at` in a window. The offset is masked as well as checked:
/// the verifier must see the bound on the exact register used.
fn field<const N: usize>(buf: &[u8; WINDOW_MAX], at: u64) -> Option<[u8; N]> {
    let at = (at as usize) & (WINDOW_MAX - 1);
    buf.get(at..at + N)?.try_into().ok()
}

fn word(buf: &[u8; WINDOW_MAX], at: u64) -> Option<u64> {
    field::<8>(buf, at).map(u64::from_le_bytes)
}

/// Walks the current thread's Python frames, innermost first, up to
/// `max_frames`, and returns the id of the stack among process `pid`'s in
/// PYTHON_STACKS; 0 when the thread is not running Python code (no GIL, a C
/// thread, start-up) or the walk found nothing. `tstate` is the thread
/// state the thread's last walk found (0 for none), tried first, and is
/// updated to this walk's.
pub fn python_stack(pid: u32, walk: &PythonWalk, max_frames: u32, tstate: &mut u64) -> u64 {
    let Some(state) = WALK_SCRATCH.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU scratch, alive as long as the map (see native_stack).
    let state = unsafe { &mut *state };
    let me = current_thread_pointer();
    let known = if *tstate != 0 { own_frame(walk, *tstate, me, &mut state.tstate_bytes) } else { None };
    let frame = match known {
        Some(frame) => frame,
        None => {
            *tstate = current_tstate(walk, me);
            if *tstate == 0 {
                count(counter::NO_PYTHON_THREAD);
                return 0;
            }
            let Ok(frame) = follow(*tstate, &walk.frame_chain, walk.frame_chain_len) else {
                return 0;
            };
            frame
        }
    };
    state.walk = *walk;
    state.frame = frame;
    state.max_frames = (max_frames as u64).min(MAX_PYTHON_FRAMES as u64);
    state.stack.len = 0;
    state.stack.truncated = 0;
    // The frame loop runs under bpf_loop so that the verifier checks one step
    // instead of every path through MAX_PYTHON_FRAMES unrolled iterations,
    // which exceeds its 1M-instruction budget. Twice the frame limit leaves
    // room for skipped C-stack shim frames between the kept ones.
    // SAFETY: walk_step has the callback signature bpf_loop expects.
    unsafe { bpf_loop(2 * MAX_PYTHON_FRAMES as u32, walk_step as *mut core::ffi::c_void, core::ptr::null_mut(), 0) };
    let len = state.stack.len as usize;
    if len == 0 {
        return 0;
    }
    // Hashed once complete: a shim frame marks the frame before it.
    let mut hash = state.stack.truncated as u64;
    for i in 0..MAX_PYTHON_FRAMES {
        if i >= len {
            break;
        }
        let f = &state.stack.frames[i];
        hash = mix(mix(mix(mix(hash, f.code), f.instr), f.code_tag), f.flags);
    }
    let interned = intern(&PYTHON_STACKS, pid, hash, &state.stack);
    if interned.new {
        // Userspace must read the stack's code objects before they can be
        // freed (a module body's code dies as soon as it has run). If the
        // ring is full, its periodic sweep finds the stack a little later.
        let _ = NEW_PYTHON_STACKS.output::<StackKey>(&StackKey { pid, _pad: 0, id: interned.id }, 0);
    }
    interned.id
}

/// One frame of the walk. Returns 0 to go on, 1 to stop.
extern "C" fn walk_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(state) = WALK_SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: per-CPU scratch set up by python_stack on this CPU.
    let state = unsafe { &mut *state };
    let frame = state.frame;
    if frame == 0 {
        return 1;
    }
    let len = state.stack.len as usize;
    if len as u64 >= state.max_frames {
        state.stack.truncated = 1;
        count(counter::PYTHON_TRUNCATED);
        return 1;
    }
    let walk = &state.walk;
    if read_window(frame, &walk.frame_window, &mut state.frame_bytes).is_err() {
        return 1;
    }
    let bytes = &state.frame_bytes;
    let Some(next) = word(bytes, walk.frame_previous) else { return 1 };
    state.frame = next;
    if walk.frame_owner != NO_OFFSET {
        match field::<1>(bytes, walk.frame_owner) {
            Some([owner]) if owner as u64 == walk.frame_owner_cstack => {
                // The eval loop pushed this shim when C code called it: the
                // Python frame just kept was the first that call ran.
                if len > 0 {
                    // Masked as well as checked: LLVM rebuilds the address
                    // from `len`, and the verifier must see a bounded index.
                    let previous = (len - 1) & (MAX_PYTHON_FRAMES - 1);
                    if let Some(previous) = state.stack.frames.get_mut(previous) {
                        previous.flags |= PythonFrame::ENTRY;
                    }
                }
                return 0;
            }
            Some(_) => {}
            None => return 1,
        }
    }
    let (Some(code), Some(instr)) = (word(bytes, walk.frame_code), word(bytes, walk.frame_instr)) else { return 1 };
    let entry = walk.every_frame_is_entry != 0
        || (walk.frame_is_entry != NO_OFFSET && field::<1>(bytes, walk.frame_is_entry).is_some_and(|[e]| e != 0));
    if read_window(code, &walk.code_window, &mut state.code_bytes).is_err() {
        return 1;
    }
    let [line, name, file] = walk.code_tag_fields;
    let tag = match (field::<4>(&state.code_bytes, line), word(&state.code_bytes, name), word(&state.code_bytes, file))
    {
        (Some(line), Some(name), Some(file)) => code_tag(u32::from_le_bytes(line), name, file),
        _ => return 1,
    };
    let f = PythonFrame {
        code,
        instr: instr & walk.frame_instr_mask,
        code_tag: tag,
        flags: if entry { PythonFrame::ENTRY } else { 0 },
    };
    let Some(slot) = state.stack.frames.get_mut(len) else { return 1 };
    *slot = f;
    state.stack.len += 1;
    0
}

/// The size of the size class of the pymalloc pool holding `block`.
pub fn pool_block_size(walk: &PythonWalk, block: u64) -> Option<u64> {
    let index = read::<u32>((block & walk.pool_mask) + walk.pool_szidx).ok()?;
    Some((index as u64 + 1) << walk.size_class_shift)
}

/// The block and size an inlined pymalloc fast path is taking from `pool`:
/// the pool's `freeblock`, checked to lie in that pool.
pub fn pool_pop(walk: &PythonWalk, pool: u64) -> Option<(u64, u64)> {
    let block = read::<u64>(pool + walk.pool_freeblock).ok()?;
    if block & walk.pool_mask != pool {
        return None;
    }
    Some((block, pool_block_size(walk, block)?))
}

/// The size of `block`, which a fast path has just taken from its pool.
pub fn pool_taken(walk: &PythonWalk, block: u64) -> Option<(u64, u64)> {
    if block == 0 {
        return None;
    }
    Some((block, pool_block_size(walk, block)?))
}

/// Unchanged since CPython 2.2.
const PY_TPFLAGS_HAVE_GC: u64 = 1 << 14;

/// The memory block holding the object at `object`: GC objects, and 3.11+
/// objects with managed dicts or weakrefs, are preceded by headers inside
/// their block (`_PyType_PreHeaderSize`).
pub fn object_block(walk: &PythonWalk, object: u64) -> Option<u64> {
    // ob_type follows ob_refcnt.
    let type_object = read::<u64>(object + 8).ok()?;
    let flags = read::<u64>(type_object + walk.type_flags).ok()?;
    let mut before = 0;
    if flags & PY_TPFLAGS_HAVE_GC != 0 {
        before += walk.gc_head_size;
    }
    if flags & walk.preheader_flags != 0 {
        before += 16;
    }
    Some(object - before)
}
