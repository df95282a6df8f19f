//! Where new memory was first touched (host mode's free tier): the user
//! page-fault tracepoint, for write faults (a read of untouched anonymous
//! memory maps the shared zero page, no memory) of processes whose
//! TargetConfig asks for it, charges the faulting page to the current
//! Python stack (the same walk as the allocation probes', `python`), or
//! with none to the faulting instruction. Walks cost microseconds and a
//! busy process faults tens of thousands of times a second (pymalloc hands
//! empty arenas back and maps new ones), so only growth is always walked:
//! a fault while the process's anonymous resident count is at or past its
//! high-water mark. The rest (memory given back and touched again) are
//! walked under a budget per process and second, and counted when not. A
//! page is charged once; munmap and madvise(MADV_DONTNEED/MADV_FREE) give
//! its charge back, and userspace drops a process's pages at its exit.
//! Reports call this "first touched at": a fresh page is touched by
//! whichever allocation of its size class lands there first.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_task, bpf_loop},
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::HashMap,
    programs::{RawTracePointContext, TracePointContext},
};
use memtrace_common::{
    FIRST_TOUCH_RELEASE_MAX_PAGES, FIRST_TOUCH_SAMPLES_PER_SECOND, PageKey, TargetConfig, TouchKey, TouchState, counter,
};

use crate::{
    maps::{KERNEL_CONFIG, TARGETS, atomic_add, count},
    python::python_stack,
};

/// Pages charged per place (TouchKey), and each charged page's place.
#[map]
pub static FIRST_TOUCH_SITES: HashMap<TouchKey, u64> = HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);
#[map]
pub static FIRST_TOUCH_PAGES: HashMap<PageKey, TouchKey> = HashMap::with_max_entries(1 << 21, BPF_F_NO_PREALLOC);

/// Each process's high-water mark and sampling budget.
#[map]
pub static FIRST_TOUCH_STATE: HashMap<u32, TouchState> = HashMap::with_max_entries(1024, 0);

/// arch/x86/include/asm/trap_pf.h: the fault was a write.
const PF_WRITE: u64 = 1 << 1;
const PAGE_SHIFT: u64 = 12;
const NS_PER_SECOND: u64 = 1_000_000_000;
/// include/uapi/asm-generic/mman-common.h.
const MADV_DONTNEED: u64 = 4;
const MADV_FREE: u64 = 8;
const EEXIST: i64 = 17;

/// page_fault_user(unsigned long address, struct pt_regs *regs, unsigned
/// long error_code), before the kernel handles the fault.
#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> u32 {
    let (address, regs, error_code): (u64, u64, u64) = (ctx.arg(0), ctx.arg(1), ctx.arg(2));
    if error_code & PF_WRITE == 0 {
        return 0;
    }
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the map value outlives this program run.
    let Some(target) = (unsafe { TARGETS.get(&pid) }) else { return 0 };
    if target.first_touch == 0 {
        return 0;
    }
    let page = PageKey { pid, _pad: 0, page: address >> PAGE_SHIFT };
    // SAFETY: only checks presence.
    if unsafe { FIRST_TOUCH_PAGES.get(&page) }.is_some() {
        return 0; // charged already (a copy-on-write fault, say)
    }
    if !chosen(pid) {
        return 0;
    }
    charge(pid, target, page, regs);
    0
}

/// Whether this fault is walked: growth always, the rest under the budget.
fn chosen(pid: u32) -> bool {
    let anon = anon_resident();
    let Some(state) = FIRST_TOUCH_STATE.get_ptr_mut(&pid) else { return false };
    // SAFETY: the process's own state; a fault on another of its threads
    // racing with this one may at worst walk one fault too many.
    let state = unsafe { &mut *state };
    if anon >= state.high_water {
        state.high_water = anon;
        count(counter::TOUCH_GROWTH);
        return true;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(state.window_start_ns) >= NS_PER_SECOND {
        state.window_start_ns = now;
        state.sampled = 0;
    }
    if state.sampled < FIRST_TOUCH_SAMPLES_PER_SECOND {
        state.sampled += 1;
        count(counter::TOUCH_SAMPLED);
        return true;
    }
    count(counter::TOUCH_SKIPPED);
    false
}

/// The current process's anonymous resident pages, as its mm counts them
/// globally (within a per-CPU batch of the exact count).
fn anon_resident() -> u64 {
    // SAFETY: volatile so the compiler does not fold the placeholder values;
    // userspace rewrites them before loading.
    let (mm_at, anon_at) = unsafe {
        (core::ptr::read_volatile(&KERNEL_CONFIG.task_mm), core::ptr::read_volatile(&KERNEL_CONFIG.mm_anon_rss))
    };
    // SAFETY: a helper without arguments; the task is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    // SAFETY: reads of kernel memory at offsets from BTF; a bad address
    // fails the read, it does not fault.
    let Ok(mm) = (unsafe { bpf_probe_read_kernel((task + mm_at) as *const u64) }) else { return 0 };
    // SAFETY: as above.
    let anon = unsafe { bpf_probe_read_kernel((mm + anon_at) as *const i64) }.unwrap_or(0);
    anon.max(0) as u64
}

/// Charges `page` to the current Python stack, or to the faulting
/// instruction.
fn charge(pid: u32, target: &TargetConfig, page: PageKey, regs: u64) {
    // A fault is not inside an allocator call: the thread has no
    // remembered thread state to try first, and the walk finds it.
    let mut tstate = 0;
    let stack =
        if target.python_frames > 0 { python_stack(pid, &target.python, target.python_frames, &mut tstate) } else { 0 };
    let ip = if stack != 0 {
        0
    } else {
        // SAFETY: the user registers the tracepoint was given; a bad
        // address fails the read.
        unsafe { bpf_probe_read_kernel(core::ptr::addr_of!((*(regs as *const aya_ebpf::bindings::pt_regs)).rip)) }
            .unwrap_or(0)
    };
    let key = TouchKey { pid, _pad: 0, python_stack: stack, ip };
    if FIRST_TOUCH_PAGES.insert(&page, &key, BPF_NOEXIST as u64).is_err() {
        count(counter::TOUCH_MAP_FULL);
        return;
    }
    if let Some(pages) = FIRST_TOUCH_SITES.get_ptr_mut(&key) {
        atomic_add(pages, 1);
        return;
    }
    match FIRST_TOUCH_SITES.insert(&key, &1, BPF_NOEXIST as u64) {
        Ok(()) => {}
        // Another CPU made it first.
        Err(e) if e as i64 == -EEXIST => {
            if let Some(pages) = FIRST_TOUCH_SITES.get_ptr_mut(&key) {
                atomic_add(pages, 1);
            }
        }
        Err(_) => {
            let _ = FIRST_TOUCH_PAGES.remove(&page);
            count(counter::TOUCH_MAP_FULL);
        }
    }
}

/// munmap(addr, len): every page in the range is given back.
#[tracepoint(category = "syscalls", name = "sys_enter_munmap")]
pub fn touch_munmap(ctx: TracePointContext) -> u32 {
    let Some((addr, len, _)) = syscall_args(&ctx) else { return 0 };
    release(addr, len);
    0
}

/// madvise(addr, len, advice): DONTNEED and FREE give the pages back.
#[tracepoint(category = "syscalls", name = "sys_enter_madvise")]
pub fn touch_madvise(ctx: TracePointContext) -> u32 {
    let Some((addr, len, advice)) = syscall_args(&ctx) else { return 0 };
    if advice == MADV_DONTNEED || advice == MADV_FREE {
        release(addr, len);
    }
    0
}

/// The first three arguments of a system call, at the offsets every
/// sys_enter_* tracepoint's format gives them (after the common fields and
/// the call's number); None unless the process is charged for first touch.
fn syscall_args(ctx: &TracePointContext) -> Option<(u64, u64, u64)> {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the map value outlives this program run.
    if unsafe { TARGETS.get(&pid) }?.first_touch == 0 {
        return None;
    }
    // SAFETY: reads of the tracepoint's record, within its format.
    unsafe { Some((ctx.read_at::<u64>(16).ok()?, ctx.read_at::<u64>(24).ok()?, ctx.read_at::<u64>(32).ok()?)) }
}

#[repr(C)]
struct Release {
    pid: u32,
    first: u64,
}

/// Gives back the charged pages of `[addr, addr + len)` of the current
/// process.
fn release(addr: u64, len: u64) {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let pages = len.div_ceil(1 << PAGE_SHIFT);
    if pages > FIRST_TOUCH_RELEASE_MAX_PAGES {
        count(counter::TOUCH_RELEASE_CUT);
    }
    let mut release = Release { pid, first: addr >> PAGE_SHIFT };
    // SAFETY: release_step has the callback signature bpf_loop expects,
    // and `release` outlives the call.
    unsafe {
        bpf_loop(
            pages.min(FIRST_TOUCH_RELEASE_MAX_PAGES) as u32,
            release_step as *mut core::ffi::c_void,
            (&raw mut release).cast(),
            0,
        );
    }
}

/// One page of a release. Returns 0 to go on.
extern "C" fn release_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the Release `release` gave it.
    let release = unsafe { &*ctx.cast::<Release>() };
    let page = PageKey { pid: release.pid, _pad: 0, page: release.first + index };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(key) = (unsafe { FIRST_TOUCH_PAGES.get(&page) }).copied() else { return 0 };
    let _ = FIRST_TOUCH_PAGES.remove(&page);
    if let Some(pages) = FIRST_TOUCH_SITES.get_ptr_mut(&key) {
        atomic_add(pages, 1u64.wrapping_neg());
    }
    0
}
