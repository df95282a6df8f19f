//! Processes that change under memtrace. A child forked by a traced
//! process inherits its address space, breakpoints included, so it traps on
//! every allocation whether or not it is traced; userspace follows it as a
//! process of its own. An exec replaces a process's image under the same
//! pid: counting stops here, at once, before any allocation of the new
//! image could be charged to the old one's sites and layout, and userspace
//! ends the old image's report and plans the new one. In host mode
//! (`WATCH_EVERY_PROCESS`) every fork, exec and exit on the host is
//! announced, not only traced processes': that is how host mode finds a
//! process the moment it starts, with no polling gap, and an exec carries
//! the new command line so that a process gone before userspace could read
//! it is still named. Threads and vfork children (which share their
//! parent's memory, and exec at once) are not processes of their own, and
//! are not announced. All are raw tracepoints, which take the tracepoint's
//! own arguments: attaching one needs neither tracefs (root's alone) nor
//! more than CAP_BPF and CAP_PERFMON.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user_buf,
    },
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use memtrace_common::{PROCESS_ARGS_MAX, ProcessEvent, counter};

use crate::maps::{ACTIVE, KERNEL_CONFIG, PROCESS_EVENTS, TARGETS, count};

/// The read tried when a full one faults (see `read_args`).
const SHORT_ARGS: usize = 64;

/// include/uapi/linux/sched.h.
const CLONE_VM: u64 = 0x100;
const CLONE_THREAD: u64 = 0x10000;

/// Non-zero in host mode: announce every process, not only those in
/// TARGETS. Set by userspace before loading.
#[unsafe(no_mangle)]
static WATCH_EVERY_PROCESS: u32 = 0;

/// Events of processes that are not traced (host mode) that the ring had no
/// room for; a traced process's own are counted in its counters.
#[map]
static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

fn every_process() -> bool {
    // SAFETY: volatile so the compiler does not fold the placeholder value;
    // userspace rewrites it before loading.
    unsafe { core::ptr::read_volatile(&WATCH_EVERY_PROCESS) != 0 }
}

/// Whether `pid`'s changes are announced.
fn watched(pid: u32) -> bool {
    // SAFETY: only checks presence; the value is not kept.
    every_process() || unsafe { TARGETS.get(&pid) }.is_some()
}

/// task_newtask(struct task_struct *task, u64 clone_flags), in the
/// parent, as the new task is created.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask(ctx: RawTracePointContext) -> u32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !watched(parent) {
        return 0;
    }
    let (task, flags): (u64, u64) = (ctx.arg(0), ctx.arg(1));
    if flags & (CLONE_THREAD | CLONE_VM) != 0 {
        return 0;
    }
    // SAFETY: volatile so the compiler does not fold the placeholder value;
    // userspace rewrites it before loading.
    let pid_at = unsafe { core::ptr::read_volatile(&KERNEL_CONFIG.task_pid) };
    // SAFETY: a read of the new task at the offset the kernel's BTF gives;
    // a bad address fails the read, it does not fault.
    let Ok(child) = (unsafe { bpf_probe_read_kernel((task + pid_at) as *const u32) }) else { return 0 };
    announce(ProcessEvent::FORK, parent, child, 0);
    0
}

/// sched_process_exec(struct task_struct *p, pid_t old_pid, struct
/// linux_binprm *bprm), in the process, once its new image is in place.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> u32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: only checks presence; the value is not kept.
    if unsafe { TARGETS.get(&pid) }.is_some() {
        // Failing is harmless: the entry is then already gone.
        let _ = TARGETS.remove(&pid);
    } else if !every_process() {
        return 0;
    }
    // The one thread left (it has the process's pid as its tid) must not
    // carry the old image's thread state into the new one's frame walks.
    let _ = ACTIVE.remove(&pid);
    announce(ProcessEvent::EXEC, pid, 0, ctx.arg::<u64>(0));
    0
}

/// sched_process_exit(struct task_struct *p, bool group_dead), in each
/// exiting task: announced once per process, by its last thread, in host
/// mode only (traced processes' exits are watched with pidfds).
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(ctx: RawTracePointContext) -> u32 {
    if !every_process() || ctx.arg::<u64>(1) as u8 == 0 {
        return 0;
    }
    announce(ProcessEvent::EXIT, (bpf_get_current_pid_tgid() >> 32) as u32, 0, 0);
    0
}

/// An event the ring has no room for is counted as lost, in the process's
/// report when it is traced. `task`, for an exec in host mode, is the task
/// whose new command line the event carries.
fn announce(kind: u32, pid: u32, child: u32, task: u64) {
    let Some(mut entry) = PROCESS_EVENTS.reserve::<ProcessEvent>(0) else {
        count(counter::PROCESS_EVENT_LOST);
        if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's slot, alive for the program's run; a
            // preempting program may lose one count, never corrupt it.
            unsafe { *lost += 1 };
        }
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` is ring memory reserved for one ProcessEvent, each
    // field written before it is submitted.
    unsafe {
        (*event).kind = kind;
        (*event).pid = pid;
        (*event).child = child;
        (*event).time_ns = bpf_ktime_get_ns();
        (*event).comm = bpf_get_current_comm().unwrap_or_default();
        (*event).args_len = if task != 0 && every_process() { read_args(task, &mut (*event).args) } else { 0 };
    }
    entry.submit(0);
}

/// Copies the start of `task`'s command line (its new image's, at an exec)
/// into `args`; returns how many bytes were read.
fn read_args(task: u64, args: &mut [u8; PROCESS_ARGS_MAX]) -> u32 {
    // SAFETY: volatile so the compiler does not fold the placeholder values;
    // userspace rewrites them before loading.
    let (mm_at, start_at, end_at) = unsafe {
        (
            core::ptr::read_volatile(&KERNEL_CONFIG.task_mm),
            core::ptr::read_volatile(&KERNEL_CONFIG.mm_arg_start),
            core::ptr::read_volatile(&KERNEL_CONFIG.mm_arg_end),
        )
    };
    // SAFETY: reads of kernel memory at offsets the kernel's BTF gives; a
    // bad address fails the read, it does not fault.
    let Ok(mm) = (unsafe { bpf_probe_read_kernel((task + mm_at) as *const u64) }) else { return 0 };
    // SAFETY: as above.
    let (Ok(start), Ok(end)) = (unsafe { bpf_probe_read_kernel((mm + start_at) as *const u64) }, unsafe {
        bpf_probe_read_kernel((mm + end_at) as *const u64)
    }) else {
        return 0;
    };
    let len = end.saturating_sub(start) as usize;
    // Fixed-size reads: the verifier wants a constant length. The command
    // line, the environment and the program's path end at the top of the
    // stack, so a short one's full-buffer read can run past it and fault;
    // a shorter read is tried then.
    // SAFETY: reads the current process's own memory (the new image's
    // stack); a fault is an error, not a crash.
    if unsafe { bpf_probe_read_user_buf(start as *const u8, args) }.is_ok() {
        return len.min(PROCESS_ARGS_MAX) as u32;
    }
    let short = &mut args[..SHORT_ARGS];
    // SAFETY: as above.
    if unsafe { bpf_probe_read_user_buf(start as *const u8, short) }.is_ok() {
        return len.min(SHORT_ARGS) as u32;
    }
    0
}
