//! Stacks are stored once per process, by content hash, in NATIVE_STACKS and
//! PYTHON_STACKS; a site refers to them by that hash. Unlike a BPF stack-trace
//! map, whose ids are hash buckets that silently collide (bcc memleak loses
//! stacks that way), a 64-bit content hash only fails when the map is full,
//! and that failure is counted.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST, pt_regs},
    helpers::{bpf_probe_read_user_buf, generated::bpf_get_stack},
    macros::map,
    maps::PerCpuArray,
};
use memtrace_common::{
    MAX_NATIVE_FRAMES, NativeStack, STACK_COPY_CHUNK, STACK_COPY_CHUNKS, SiteKey, SiteStackCopy, StackKey, counter,
};

use crate::maps::{NATIVE_STACKS, SITE_STACKS, count};

/// Where a native stack is built before it is interned: too big for the
/// 512-byte BPF stack.
#[map]
static NATIVE_SCRATCH: PerCpuArray<NativeStack> = PerCpuArray::with_max_entries(1, 0);

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
    match map.insert(&StackKey { pid, _pad: 0, id }, value, BPF_NOEXIST as u64) {
        Ok(()) => Interned { id, new: true },
        Err(e) if e == -EEXIST => Interned { id, new: false },
        Err(_) => {
            count(counter::STACK_MAP_FULL);
            Interned { id: 0, new: false }
        }
    }
}

/// The user stack of the current thread of `pid`, up to `depth` frames,
/// innermost (the allocator's caller) first, as an id into NATIVE_STACKS.
pub fn native_stack<C: EbpfContext>(ctx: &C, pid: u32, depth: u32) -> u64 {
    let Some(scratch) = NATIVE_SCRATCH.get_ptr_mut(0) else { return 0 };
    // SAFETY: the per-CPU scratch value lives as long as the map; no other
    // program uses it while this one runs on this CPU (programs do not nest
    // on a CPU for uprobes, and a preempting one would only garble a hash).
    let scratch = unsafe { &mut *scratch };
    // Bounded for the verifier: 1..=MAX_NATIVE_FRAMES frames.
    let depth = (depth as usize).clamp(1, MAX_NATIVE_FRAMES);
    // SAFETY: bpf_get_stack writes at most `depth * 8` bytes, which the
    // scratch value's frame array holds.
    let bytes = unsafe {
        bpf_get_stack(ctx.as_ptr(), scratch.frames.as_mut_ptr().cast(), (depth * 8) as u32, BPF_F_USER_STACK as u64)
    };
    if bytes <= 0 {
        count(counter::STACK_FAILED);
        return 0;
    }
    let len = (bytes as usize / 8).min(MAX_NATIVE_FRAMES);
    scratch.len = len as u64;
    let mut hash = 0u64;
    for i in 0..MAX_NATIVE_FRAMES {
        if i >= len {
            break;
        }
        hash = mix(hash, scratch.frames[i]);
    }
    intern(&NATIVE_STACKS, pid, hash, scratch).id
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
