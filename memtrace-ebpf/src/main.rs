//! memtrace's kernel side: three programs serve every allocator function.
//! `alloc_entry` notes the request of the outermost allocator call on a
//! thread, `alloc_return` turns a successful one into a tracked allocation at
//! a site (caller, native stack, Python stack), and `free_entry` releases
//! tracked blocks. Each attach point's cookie says what the function is (see
//! `memtrace_common::ProbeCookie`); only processes listed in TARGETS count.
#![no_std]
#![no_main]
// For atomic_xadd: see maps::atomic_add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod accounting;
mod diagnostics;
mod first_touch;
mod lifecycle;
mod maps;
mod python;
mod stacks;
mod type_births;

use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_get_attach_cookie},
    macros::{map, uprobe, uretprobe},
    maps::PerCpuArray,
    programs::{ProbeContext, RetProbeContext},
};
use memtrace_common::{NO_ARG, PendingCall, ProbeCookie, Reg, SiteKey, TargetConfig, counter, layer, op};

use crate::{
    accounting::{Recorded, move_block, record_alloc, record_free, restore, tracked},
    maps::{ACTIVE, TARGETS, count},
    python::python_stack,
    stacks::{copy_stack, native_stack},
};

/// The last block freed through the Python allocator on this CPU. When
/// pymalloc hands a large block back to libc, the libc free that follows is
/// part of the same release, not a free of an unknown address. Per-CPU is
/// cheap and at worst miscounts UNKNOWN_FREE when a thread migrates between
/// the two probes; accounting itself never depends on it.
#[map]
static LAST_UPPER_FREE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const MAP_ANONYMOUS: u64 = 0x20;
const PROT_NONE: u64 = 0;
/// mmap reports errors as -errno, i.e. the last page of the address space.
const MMAP_ERROR_FLOOR: u64 = -4096i64 as u64;

/// The general registers at the probe, read once with fixed offsets, by
/// hardware number (`memtrace_common::Reg`).
struct Regs([u64; 16]);

impl Regs {
    fn read(regs: *const pt_regs) -> Self {
        // Volatile: otherwise LLVM sinks the loads into `get`'s match and
        // computes a pointer into the context, which the verifier rejects
        // ("dereference of modified ctx ptr").
        // SAFETY: each `field` is a projection of the probe's pt_regs, which
        // the kernel keeps valid for the program's run.
        let r = |field: *const u64| unsafe { core::ptr::read_volatile(field) };
        // SAFETY: field projections of the kernel's pt_regs for this probe.
        unsafe {
            Self([
                r(&raw const (*regs).rax),
                r(&raw const (*regs).rcx),
                r(&raw const (*regs).rdx),
                r(&raw const (*regs).rbx),
                r(&raw const (*regs).rsp),
                r(&raw const (*regs).rbp),
                r(&raw const (*regs).rsi),
                r(&raw const (*regs).rdi),
                r(&raw const (*regs).r8),
                r(&raw const (*regs).r9),
                r(&raw const (*regs).r10),
                r(&raw const (*regs).r11),
                r(&raw const (*regs).r12),
                r(&raw const (*regs).r13),
                r(&raw const (*regs).r14),
                r(&raw const (*regs).r15),
            ])
        }
    }

    /// A match, not an index: the verifier rejects stack reads at a
    /// variable offset.
    fn get(&self, number: u8) -> u64 {
        let r = &self.0;
        match number {
            0 => r[0],
            1 => r[1],
            2 => r[2],
            3 => r[3],
            4 => r[4],
            5 => r[5],
            6 => r[6],
            7 => r[7],
            8 => r[8],
            9 => r[9],
            10 => r[10],
            11 => r[11],
            12 => r[12],
            13 => r[13],
            14 => r[14],
            15 => r[15],
            _ => 0,
        }
    }
}

/// `a * b`, or u64::MAX on overflow (an overflowing calloc fails anyway).
/// Built from 32-bit halves: LLVM turns every overflow check it recognises
/// into a 128-bit multiply, which BPF does not have.
fn saturating_mul(a: u64, b: u64) -> u64 {
    let (big, small) = if a > b { (a, b) } else { (b, a) };
    if small >> 32 != 0 {
        return u64::MAX;
    }
    let high = (big >> 32) * small;
    if high >> 32 != 0 {
        return u64::MAX;
    }
    let low = (big & 0xffff_ffff) * small;
    match (high << 32).checked_add(low) {
        Some(product) => product,
        None => u64::MAX,
    }
}

/// (tgid, tid) of the current thread and its process's configuration,
/// when the process is traced: the one TARGETS lookup of a program run.
fn traced_thread() -> Option<(u32, u32, &'static TargetConfig)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    // SAFETY: the map value outlives this program run, which is as long
    // as the reference is used.
    let target = unsafe { TARGETS.get(&pid) }?;
    Some((pid, pid_tgid as u32, target))
}

fn cookie<C: EbpfContext>(ctx: &C) -> (u64, ProbeCookie) {
    // SAFETY: plain helper call on the program's own context.
    let raw = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    (raw, ProbeCookie::from_u64(raw))
}

#[uprobe]
pub fn alloc_entry(ctx: ProbeContext) -> u32 {
    let Some((pid, tid, _)) = traced_thread() else { return 0 };
    let (raw, cookie) = cookie(&ctx);
    let thread = ACTIVE.get_ptr_mut(&tid);
    if let Some(outer) = thread {
        // SAFETY: `outer` points into this thread's ACTIVE entry.
        let outer = unsafe { &mut *outer };
        if outer.done == 0 {
            // An allocator called from inside another one: the outer call is
            // the allocation. Only a nested call of the same function must
            // be remembered, so that its return does not complete the outer.
            if ProbeCookie::from_u64(outer.cookie).function == cookie.function {
                outer.same_function_depth += 1;
            }
            return 0;
        }
    }
    let regs = Regs::read(ctx.regs);
    let mut size = regs.get(cookie.size_reg);
    if cookie.count_reg != NO_ARG {
        size = saturating_mul(size, regs.get(cookie.count_reg));
    }
    let mut call = PendingCall { size, cookie: raw, ..PendingCall::default() };
    match cookie.op {
        // File mappings are not allocations, nor are PROT_NONE reservations
        // of address space (glibc reserves 64 MiB per thread arena that
        // way, even from free(), and uncovers it bit by bit as it is used).
        op::MMAP
            if regs.get(Reg::ARGS[3].number()) & MAP_ANONYMOUS == 0 || regs.get(Reg::ARGS[2].number()) == PROT_NONE =>
        {
            return 0;
        }
        op::POSIX_MEMALIGN => call.ptr = regs.get(cookie.ptr_reg),
        op::REALLOC => {
            call.ptr = regs.get(cookie.ptr_reg);
            if call.ptr != 0 {
                match record_free(pid, call.ptr) {
                    Some(old) => {
                        call.replaced = old;
                        call.has_replaced = 1;
                    }
                    None => count(counter::UNKNOWN_FREE + cookie.layer as u32),
                }
            }
        }
        _ => {}
    }
    match thread {
        // Written in place: a thread keeps its entry from one call to the
        // next, and an LRU insert would take a fresh element every time.
        // SAFETY: this thread's own ACTIVE entry.
        Some(entry) => unsafe { *entry = PendingCall { tstate: (*entry).tstate, ..call } },
        None => {
            let _ = ACTIVE.insert(&tid, &call, 0);
        }
    }
    0
}

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    let Some((pid, tid, target)) = traced_thread() else { return 0 };
    let (_, cookie) = cookie(&ctx);
    let Some(pending) = ACTIVE.get_ptr_mut(&tid) else { return 0 };
    // SAFETY: `pending` points into this thread's ACTIVE entry, which only
    // this thread's probes touch.
    let pending = unsafe { &mut *pending };
    if pending.done != 0 || ProbeCookie::from_u64(pending.cookie).function != cookie.function {
        return 0; // a nested call of another function returning
    }
    if pending.same_function_depth > 0 {
        pending.same_function_depth -= 1;
        return 0;
    }
    pending.done = 1;
    pending.block = 0;
    if cookie.op == op::ARENA {
        return 0; // the arena's blocks are recorded as pymalloc hands them out
    }
    // Fields are read in place: copies of these map values would overflow
    // the 512-byte BPF stack.
    let (size, ptr) = (pending.size, pending.ptr);

    let ret: u64 = ctx.ret();
    let addr = match cookie.op {
        // SAFETY: reads the pointer posix_memalign stored in the caller's
        // variable; a fault reads as "no block".
        op::POSIX_MEMALIGN if ret as u32 == 0 => unsafe { bpf_probe_read_user(ptr as *const u64) }.unwrap_or(0),
        op::POSIX_MEMALIGN => 0,
        op::MMAP if ret >= MMAP_ERROR_FLOOR => 0,
        _ => ret,
    };
    if addr == 0 {
        if cookie.op == op::REALLOC && size == 0 {
            return 0; // realloc(p, 0) freed p; that was recorded at entry
        }
        count(counter::FAILED_ALLOC);
        if pending.has_replaced != 0 {
            restore(ptr, &pending.replaced);
        }
        return 0;
    }
    let size =
        if cookie.op == op::POOL_NEW { python::pool_block_size(&target.python, addr).unwrap_or(0) } else { size };
    if size < target.min_size || size > target.max_size {
        return 0;
    }
    // At a return probe the kernel has put the real return address back in
    // the instruction pointer: it is the allocator's caller.
    // SAFETY: the context is the kernel's pt_regs for this probe.
    let caller = unsafe { (*ctx.regs).rip };
    let site = SiteKey {
        pid,
        layer: cookie.layer as u32,
        caller,
        native_stack: if target.native_frames > 1 { native_stack(pid, ctx.regs, target.native_frames) } else { 0 },
        python_stack: 0,
    };
    if !record_at_site(ctx.regs, target, site, addr, size, true, &mut pending.tstate) {
        return 0;
    }
    pending.block = addr;
    pending.size = size;
    0
}

/// Records `block` as a `size`-byte allocation at `site` with the current
/// Python stack, and copies a new site's native stack for --native
/// (`at_return`: the probe is a return probe). `tstate` is the thread's
/// `PendingCall::tstate`. False when the block could not be tracked.
#[inline(always)]
fn record_at_site(
    regs: *const pt_regs,
    target: &TargetConfig,
    mut site: SiteKey,
    block: u64,
    size: u64,
    at_return: bool,
    tstate: &mut u64,
) -> bool {
    site.python_stack =
        if target.python_frames > 0 { python_stack(site.pid, &target.python, target.python_frames, tstate) } else { 0 };
    match record_alloc(block, size, site) {
        Recorded::Untracked => false,
        Recorded::AtNewSite if target.copy_stacks != 0 => {
            copy_stack(regs, at_return, &site);
            true
        }
        _ => true,
    }
}

#[uprobe]
pub fn free_entry(ctx: ProbeContext) -> u32 {
    let Some((pid, tid, _)) = traced_thread() else { return 0 };
    let (_, cookie) = cookie(&ctx);
    let addr = Regs::read(ctx.regs).get(cookie.ptr_reg);
    if addr == 0 {
        return 0;
    }
    // A block a call in progress releases (realloc's old block) was
    // already forgotten at the call's entry, so the thread's state is only
    // looked at for a block that is not known.
    let known = record_free(pid, addr).is_some();
    // SAFETY: the value is read at once, before the map can change it.
    if !known && unsafe { ACTIVE.get(&tid) }.is_some_and(|call| call.done == 0) {
        return 0; // released by an allocator call in progress (realloc)
    }
    let Some(last_upper) = LAST_UPPER_FREE.get_ptr_mut(0) else { return 0 };
    // SAFETY: this CPU's slot of LAST_UPPER_FREE, alive for the program's
    // run; a preempting program would only make UNKNOWN_FREE miscount.
    let follows_upper_free = unsafe { *last_upper } == addr;
    if cookie.layer == layer::PYMALLOC {
        // SAFETY: as above.
        unsafe { *last_upper = addr };
    }
    // munmap also releases file mappings, which were never allocations.
    if !known && cookie.op != op::MUNMAP && !(cookie.layer == layer::LIBC && follows_upper_free) {
        count(counter::UNKNOWN_FREE + cookie.layer as u32);
    }
    0
}

/// A copy of pymalloc's fast path is taking a block from a pool (at its
/// increment, or just past its pop): an allocation that no function call
/// shows.
#[uprobe]
pub fn pool_pop(ctx: ProbeContext) -> u32 {
    let Some((pid, tid, target)) = traced_thread() else { return 0 };
    let thread = ACTIVE.get_ptr_mut(&tid);
    if let Some(call) = thread {
        // SAFETY: this thread's own ACTIVE entry.
        if unsafe { (*call).done } == 0 {
            return 0; // inside an allocator call that counts itself
        }
    }
    let (_, cookie) = cookie(&ctx);
    let regs = Regs::read(ctx.regs);
    let pointer = regs.get(cookie.ptr_reg);
    let taken = match cookie.op {
        op::POOL_TAKEN => python::pool_taken(&target.python, pointer),
        _ => python::pool_pop(&target.python, pointer),
    };
    let Some((block, class_size)) = taken else { return 0 };
    // The request, where the copy keeps it in a register: a value outside
    // the block's size class would be a misread register, so the class
    // stands then, as at copies whose request was a compile-time constant.
    let request = if cookie.size_reg == NO_ARG { 0 } else { regs.get(cookie.size_reg) };
    let size = if request <= class_size && request + 16 > class_size { request } else { class_size };
    if size < target.min_size || size > target.max_size {
        return 0;
    }
    let site = SiteKey {
        pid,
        layer: cookie.layer as u32,
        // The inlined site itself: the function that allocated.
        // SAFETY: the context is the kernel's pt_regs for this probe.
        caller: unsafe { (*ctx.regs).rip },
        native_stack: if target.native_frames > 1 { native_stack(pid, ctx.regs, target.native_frames) } else { 0 },
        python_stack: 0,
    };
    // SAFETY: this thread's own ACTIVE entry.
    let mut tstate = thread.map_or(0, |call| unsafe { (*call).tstate });
    if !record_at_site(ctx.regs, target, site, block, size, false, &mut tstate) {
        return 0;
    }
    // The thread's last allocation, for new_reference to tell fresh
    // objects from reused ones.
    let done = PendingCall { done: 1, block, size, tstate, ..PendingCall::default() };
    match thread {
        // SAFETY: this thread's own ACTIVE entry.
        Some(call) => unsafe { *call = done },
        None => {
            let _ = ACTIVE.insert(&tid, &done, 0);
        }
    }
    0
}

/// `_Py_NewReference(op)`: an object is born at `op`. When its block is not
/// the one its thread just allocated, the object was taken from one of
/// CPython's free lists, and, as tracemalloc does, its block now belongs to
/// the code creating the object rather than to whoever allocated it first.
#[uprobe]
pub fn new_reference(ctx: ProbeContext) -> u32 {
    let Some((pid, tid, target)) = traced_thread() else { return 0 };
    if target.python_frames == 0 {
        return 0;
    }
    // rdi at the function's entry; the refcount store's base register in
    // an inlined copy.
    let (_, cookie) = cookie(&ctx);
    let object = Regs::read(ctx.regs).get(cookie.ptr_reg);
    let thread = ACTIVE.get_ptr_mut(&tid);
    if let Some(last) = thread {
        // SAFETY: this thread's own ACTIVE entry.
        let last = unsafe { &mut *last };
        // The first object born inside the block its thread just
        // allocated is fresh. Told without reading the object's type: an
        // object lies inside its own block (after its headers), and
        // blocks do not overlap.
        if last.done != 0 && last.block != 0 && object.wrapping_sub(last.block) < last.size {
            last.block = 0;
            return 0;
        }
    }
    let Some(block) = python::object_block(&target.python, object) else { return 0 };
    let Some(info) = tracked(pid, block) else {
        return 0; // allocated before attach, or never seen: nothing to move
    };
    // SAFETY: this thread's own ACTIVE entry.
    let mut tstate = thread.map_or(0, |last| unsafe { (*last).tstate });
    let stack = python_stack(pid, &target.python, target.python_frames, &mut tstate);
    if let Some(last) = thread {
        // SAFETY: as above.
        unsafe { (*last).tstate = tstate };
    }
    if stack != 0
        && let Some(site) = move_block(info, stack)
        && target.copy_stacks != 0
    {
        copy_stack(ctx.regs, false, &site);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// bpf_probe_read_user and bpf_probe_read_kernel are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
