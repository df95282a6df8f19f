//! Native stacks, unwound here with the rules userspace compiled from the
//! binaries' call frame information, and stack copies for userspace's own
//! deeper unwinding (`--native` on Python). Stacks are stored once per
//! process, by content hash, in NATIVE_STACKS and PYTHON_STACKS; a site
//! refers to them by that hash. Unlike a BPF stack-trace map, whose ids are
//! hash buckets that silently collide (bcc memleak loses stacks that way), a
//! 64-bit content hash only fails when the map is full, and that failure is
//! counted.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::map,
    maps::PerCpuArray,
};
use memtrace_common::{
    MAX_NATIVE_FRAMES, NativeStack, STACK_COPY_CHUNK, STACK_COPY_CHUNKS, SiteKey, SiteStackCopy, StackKey, UnwindKey,
    UnwindRule, counter,
};

use crate::maps::{NATIVE_STACKS, SITE_STACKS, UNWIND_RULES, count};

/// Where a native stack is built before it is interned: too big for the
/// 512-byte BPF stack.
#[map]
static NATIVE_SCRATCH: PerCpuArray<NativeStack> = PerCpuArray::with_max_entries(1, 0);

/// Stack bytes read at once while unwinding: a read costs about the same
/// for 8 bytes as for 512, and the next frames' slots mostly lie in the
/// same read.
const WINDOW_WORDS: usize = 64;
/// How far below the slot asked for a window starts: the saved rbp lies
/// below the return address.
const WINDOW_BELOW: u64 = 128;

#[map]
static STACK_WINDOW: PerCpuArray<[u64; WINDOW_WORDS]> = PerCpuArray::with_max_entries(1, 0);

const EEXIST: i32 = 17;

/// Mixes one word into a running hash (a multiply-xorshift step: cheap in
/// BPF and good enough to make collisions among a few thousand stacks
/// practically impossible).
pub fn mix(hash: u64, word: u64) -> u64 {
    let h = (hash ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

/// A stack id for a site key, and whether the stack is new to its map.
pub struct Interned {
    pub id: u64,
    pub new: bool,
}

/// Stores `value` of process `pid` under `hash` unless an equal stack is
/// already there. The id is 0 when the map is full.
pub fn intern<V>(map: &aya_ebpf::maps::HashMap<StackKey, V>, pid: u32, hash: u64, value: &V) -> Interned {
    // 0 means "no stack" in a SiteKey.
    let id = if hash == 0 { 1 } else { hash };
    let key = StackKey { pid, _pad: 0, id };
    // Looked up first: most stacks are known, and a lookup takes no lock.
    // SAFETY: only checks presence.
    if unsafe { map.get(&key) }.is_some() {
        return Interned { id, new: false };
    }
    match map.insert(&key, value, BPF_NOEXIST as u64) {
        Ok(()) => Interned { id, new: true },
        Err(e) if e == -EEXIST => Interned { id, new: false },
        Err(_) => {
            count(counter::STACK_MAP_FULL);
            Interned { id: 0, new: false }
        }
    }
}

/// The native stack of the current thread of `pid` at a probe with
/// registers `regs`, up to `depth` frames, innermost (the allocator's caller,
/// or the probed instruction) first, as an id into NATIVE_STACKS. Unwound
/// with the process's UNWIND_RULES, since most code keeps no frame pointers:
/// a frame-pointer walk (bpf_get_stack) loses every caller of a function
/// that does not keep one, and then callers that differ share a site.
pub fn native_stack(pid: u32, regs: *const pt_regs, depth: u32) -> u64 {
    let (Some(scratch), Some(window)) = (NATIVE_SCRATCH.get_ptr_mut(0), STACK_WINDOW.get_ptr_mut(0)) else { return 0 };
    // SAFETY: the per-CPU scratch values live as long as their maps; no
    // other program uses them while this one runs on this CPU (programs do
    // not nest on a CPU for uprobes, and a preempting one would only garble
    // a hash).
    let (scratch, words) = unsafe { (&mut *scratch, &mut *window) };
    let mut window = Window { words, base: 0, valid: false };
    // SAFETY: the kernel's pt_regs for this probe.
    let (mut pc, mut rsp, mut rbp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    let depth = (depth as usize).clamp(1, MAX_NATIVE_FRAMES);
    scratch.frames[0] = pc;
    let mut len = 1;
    let mut hash = mix(0, pc);
    // Bounded for the verifier: at most MAX_NATIVE_FRAMES frames.
    for i in 1..MAX_NATIVE_FRAMES {
        if i >= depth {
            break;
        }
        // SAFETY: the rule is copied out at once.
        let Some(rule) = (unsafe { UNWIND_RULES.get(&UnwindKey { pid, _pad: 0, pc }) }).copied() else {
            count(counter::UNWIND_STOPPED);
            break;
        };
        let Some((caller, cfa, caller_rbp)) = rule.caller(rsp, rbp, |at| window.read(at)) else {
            if rule.flags & UnwindRule::OUTERMOST == 0 {
                count(counter::UNWIND_STOPPED);
            }
            break;
        };
        // Some outermost frames say so with a null return address instead.
        if caller == 0 {
            break;
        }
        (pc, rsp, rbp) = (caller, cfa, caller_rbp);
        scratch.frames[i] = pc;
        len = i + 1;
        hash = mix(hash, pc);
    }
    scratch.len = len as u64;
    intern(&NATIVE_STACKS, pid, hash, scratch).id
}

/// The stack words last read, from `base`.
struct Window<'a> {
    words: &'a mut [u64; WINDOW_WORDS],
    base: u64,
    valid: bool,
}

impl Window<'_> {
    /// The stack word at `at`, from the window when it holds it, else read
    /// with a new window around it, or alone where a window would reach
    /// past the stack's top. None when it cannot be read.
    fn read(&mut self, at: u64) -> Option<u64> {
        let offset = at.wrapping_sub(self.base);
        if self.valid && offset & 7 == 0 && offset < (WINDOW_WORDS * 8) as u64 {
            // Masked after a volatile read: LLVM folds the two tests above
            // into one mask test, which does not bound the index for the
            // verifier ("math between map_value pointer and register with
            // unbounded min value").
            // SAFETY: reads a local.
            let index = unsafe { core::ptr::read_volatile(&(offset / 8)) } as usize & (WINDOW_WORDS - 1);
            return Some(self.words[index]);
        }
        let base = at.saturating_sub(WINDOW_BELOW);
        // SAFETY: the window's words as bytes, all of them written by the
        // read or the window marked invalid.
        let bytes = unsafe { core::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), WINDOW_WORDS * 8) };
        // SAFETY: reads the target's stack; a fault is an error, not a crash.
        if unsafe { bpf_probe_read_user_buf(base as *const u8, bytes) }.is_ok() {
            self.base = base;
            self.valid = true;
            return self.words.get((WINDOW_BELOW / 8) as usize).copied();
        }
        self.valid = false;
        // SAFETY: as above, one word.
        unsafe { bpf_probe_read_user(at as *const u64) }.ok()
    }
}

/// Sends a probe's registers and the stack above them to userspace for
/// unwinding. Read in chunks, stopping at the first one that faults: past
/// the top of the stack, or paged out.
pub fn copy_stack(regs: *const pt_regs, rip_is_return: bool, site: &SiteKey) {
    let Some(mut entry) = SITE_STACKS.reserve::<SiteStackCopy>(0) else {
        count(counter::STACK_COPY_LOST);
        return;
    };
    let out = entry.as_mut_ptr();
    // SAFETY: `out` is ring buffer memory reserved for one SiteStackCopy,
    // written field by field before it is submitted; `regs` is the kernel's
    // pt_regs for this probe.
    unsafe {
        let regs = &*regs;
        (*out).site = *site;
        (*out).regs = [regs.rip, regs.rsp, regs.rbp, regs.rbx, regs.r12, regs.r13, regs.r14, regs.r15];
        (*out).rip_is_return = rip_is_return as u64;
        let mut len = 0;
        for i in 0..STACK_COPY_CHUNKS {
            let Some(chunk) = (*out).stack.get_mut(i * STACK_COPY_CHUNK..(i + 1) * STACK_COPY_CHUNK) else { break };
            if bpf_probe_read_user_buf((regs.rsp as usize + i * STACK_COPY_CHUNK) as *const u8, chunk).is_err() {
                break;
            }
            len += STACK_COPY_CHUNK;
        }
        (*out).len = len as u64;
    }
    entry.submit(0);
}
