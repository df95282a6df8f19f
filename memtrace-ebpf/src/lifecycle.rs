//! Traced processes that change under memtrace. A child forked by a traced
//! process inherits its address space, breakpoints included, so it traps on
//! every allocation whether or not it is traced; userspace follows it as a
//! process of its own. An exec replaces a process's image under the same
//! pid: counting stops here, at once, before any allocation of the new
//! image could be charged to the old one's sites and layout, and userspace
//! ends the old image's report and plans the new one. Threads and vfork
//! children (which share their parent's memory, and exec at once) are not
//! processes of their own, and are not announced. Both are raw tracepoints,
//! which take the tracepoint's own arguments: attaching one needs neither
//! tracefs (root's alone) nor more than CAP_BPF and CAP_PERFMON.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use memtrace_common::{ProcessEvent, counter};

use crate::maps::{ACTIVE, KERNEL_CONFIG, PROCESS_EVENTS, TARGETS, count};

/// include/uapi/linux/sched.h.
const CLONE_VM: u64 = 0x100;
const CLONE_THREAD: u64 = 0x10000;

/// task_newtask(struct task_struct *task, u64 clone_flags), in the
/// parent, as the new task is created.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask(ctx: RawTracePointContext) -> u32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: only checks presence; the value is not kept.
    if unsafe { TARGETS.get(&parent) }.is_none() {
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
    announce(ProcessEvent::FORK, parent, child);
    0
}

/// sched_process_exec, in the process, once its new image is in place.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> u32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: only checks presence; the value is not kept.
    if unsafe { TARGETS.get(&pid) }.is_none() {
        return 0;
    }
    // Failing is harmless: the entry is then already gone.
    let _ = TARGETS.remove(&pid);
    // The one thread left (it has the process's pid as its tid) must not
    // carry the old image's thread state into the new one's frame walks.
    let _ = ACTIVE.remove(&pid);
    announce(ProcessEvent::EXEC, pid, 0);
    0
}

/// An event the ring has no room for is counted as lost in the process's
/// report.
fn announce(kind: u32, pid: u32, child: u32) {
    // SAFETY: a helper without arguments.
    let time_ns = unsafe { bpf_ktime_get_ns() };
    if PROCESS_EVENTS.output::<ProcessEvent>(&ProcessEvent { kind, pid, child, _pad: 0, time_ns }, 0).is_err() {
        count(counter::PROCESS_EVENT_LOST);
    }
}
