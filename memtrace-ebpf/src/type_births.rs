//! `--type`: the births of one type's objects, and nothing else. A class's
//! instances are allocated by `PyType_GenericAlloc(type, nitems)`, probed as
//! a uprobe session (`type_alloc`): its entry compares the type argument
//! with the process's watched types and, for any other type, returns
//! non-zero so that the kernel sets no return probe; for a watched one the
//! return records the new object. Built-in types are not allocated there,
//! so their births are seen where every object is born, `_Py_NewReference`
//! (`type_new_reference`), which fires on free-list reuse too. Either way
//! the type is tested before any frame walk, and a birth is an ALLOCS
//! record (replacing whatever was recorded at that address: every birth
//! of the type is seen) plus its site's allocated totals. No free is
//! probed: userspace takes liveness from the object census.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, generated::bpf_get_attach_cookie},
    macros::{map, uprobe},
    maps::{HashMap, LruHashMap},
    programs::ProbeContext,
};
use memtrace_common::{
    AllocInfo, AllocKey, BirthKey, ProbeCookie, SiteKey, SiteStats, WatchedType, WatchedTypeKey, counter, layer,
};

use crate::{
    Regs,
    maps::{ALLOCS, SITES, TARGETS, atomic_add, count},
    python::python_stack,
    saturating_mul,
};

/// The types whose births are traced, per process; userspace fills it in as
/// it finds them in the census.
#[map]
pub static WATCHED_TYPES: HashMap<WatchedTypeKey, WatchedType> = HashMap::with_max_entries(1024, 0);

/// Allocations of a watched class in progress: the size the entry computed.
/// LRU so that a call that never returns cannot leak an entry.
#[map]
static BIRTHS: LruHashMap<BirthKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// A session entry's "set no return probe".
const NO_RETURN: u32 = 1;
const EEXIST: i32 = 17;

/// `PyType_GenericAlloc(type, nitems)`, at its entry and, for a watched
/// type, at its return. The kernel runs one program for both; a return is
/// recognised by its stack pointer, the entry's plus the popped return
/// address, which no nested call shares. Written out rather than with
/// `#[uprobe]`, whose wrapper returns 0 whatever the program returns, and
/// a session entry's return value is what says whether its return runs.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn type_alloc(ctx: *mut core::ffi::c_void) -> u32 {
    session(ProbeContext::new(ctx))
}

fn session(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // SAFETY: the kernel's pt_regs for this probe.
    let (sp, type_object, nitems, returned) =
        unsafe { ((*ctx.regs).rsp, (*ctx.regs).rdi, (*ctx.regs).rsi, (*ctx.regs).rax) };
    let returning = BirthKey { tid, _pad: 0, entry_sp: sp.wrapping_sub(8) };
    // SAFETY: the value is copied out before the map can change it.
    if let Some(size) = unsafe { BIRTHS.get(&returning) }.copied() {
        let _ = BIRTHS.remove(&returning);
        if returned != 0 {
            record_birth(ctx.regs, pid, returned, size);
        }
        return 0;
    }
    // SAFETY: the value is copied out before the map can change it.
    let Some(watched) = (unsafe { WATCHED_TYPES.get(&WatchedTypeKey { pid, _pad: 0, type_object }) }).copied() else {
        return NO_RETURN;
    };
    let size = watched.size.saturating_add(saturating_mul(watched.item_size, nitems));
    if BIRTHS.insert(&BirthKey { tid, _pad: 0, entry_sp: sp }, &size, 0).is_err() {
        return NO_RETURN;
    }
    0
}

/// `_Py_NewReference(op)` or an inlined copy (the cookie names the register
/// holding the object): an object is born, fresh or from a free list.
#[uprobe]
pub fn type_new_reference(ctx: ProbeContext) -> u32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: plain helper call on the program's own context.
    let cookie = ProbeCookie::from_u64(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let object = Regs::read(ctx.regs).get(cookie.ptr_reg);
    // SAFETY: reads the target's memory; a fault reads as no type.
    let Ok(type_object) = (unsafe { bpf_probe_read_user((object + 8) as *const u64) }) else { return 0 };
    // SAFETY: the value is copied out before the map can change it.
    let Some(watched) = (unsafe { WATCHED_TYPES.get(&WatchedTypeKey { pid, _pad: 0, type_object }) }).copied() else {
        return 0;
    };
    let mut size = watched.size;
    if watched.item_size != 0 {
        // ob_size follows ob_type in a variable-sized object.
        // SAFETY: as above.
        let items = unsafe { bpf_probe_read_user((object + 16) as *const u64) }.unwrap_or(0);
        size = size.saturating_add(saturating_mul(watched.item_size, items));
    }
    record_birth(ctx.regs, pid, object, size);
    0
}

/// Records the birth of `object`, `size` bytes, at the current Python
/// stack: a new ALLOCS record at its address and one more allocation in its
/// site's totals (the outstanding ones are the census's to count).
fn record_birth(regs: *const pt_regs, pid: u32, object: u64, size: u64) {
    // SAFETY: the map value outlives this program run.
    let Some(target) = (unsafe { TARGETS.get(&pid) }) else { return };
    // A birth is not inside an allocator call, so the thread has no
    // remembered thread state to try first: the walk finds it.
    let mut tstate = 0;
    let site = SiteKey {
        pid,
        layer: layer::PYMALLOC as u32,
        // SAFETY: the context is the kernel's pt_regs for this probe.
        caller: unsafe { (*regs).rip },
        native_stack: 0,
        python_stack: python_stack(pid, &target.python, target.python_frames, &mut tstate),
    };
    // SAFETY: a helper without arguments.
    let info = AllocInfo { size, timestamp_ns: unsafe { bpf_ktime_get_ns() }, site };
    if ALLOCS.insert(&AllocKey { pid, _pad: 0, addr: object }, &info, 0).is_err() {
        count(counter::ALLOC_MAP_FULL);
        return;
    }
    count(counter::ALLOCS_SEEN + site.layer);
    let add = |stats: *mut SiteStats| {
        // SAFETY: `stats` points into a SITES value, alive for this run.
        unsafe {
            atomic_add(&raw mut (*stats).total_bytes, size);
            atomic_add(&raw mut (*stats).total_count, 1);
        }
    };
    if let Some(stats) = SITES.get_ptr_mut(&site) {
        return add(stats);
    }
    let fresh = SiteStats { outstanding_bytes: 0, outstanding_count: 0, total_bytes: size, total_count: 1 };
    match SITES.insert(&site, &fresh, BPF_NOEXIST as u64) {
        Ok(()) => {}
        // Another CPU created it between our lookup and insert.
        Err(e) if e == -EEXIST => {
            if let Some(stats) = SITES.get_ptr_mut(&site) {
                add(stats);
            }
        }
        Err(_) => count(counter::SITE_MAP_FULL),
    }
}
