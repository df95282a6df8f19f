//! The BPF maps that several programs share and userspace reads, in one
//! place so their sizes and roles can be read together, and the counters
//! every program adds to. Userspace may resize the big ones before loading
//! (`--max-allocs`); the sizes here are defaults. Scratch maps live next to
//! the code that uses them. Names are `memtrace_common::map_name`'s. The
//! kernel facts userspace fills in before loading are here too.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuHashMap, RingBuf},
};
use memtrace_common::{
    AllocInfo, AllocKey, CounterSet, KernelConfig, NativeStack, PendingCall, PythonStack, SiteKey, SiteStats, StackKey,
    TargetConfig, UnwindKey, UnwindRule, counter,
};

/// Filled in by userspace at load time, from the kernel's BTF.
#[unsafe(no_mangle)]
pub static KERNEL_CONFIG: KernelConfig =
    KernelConfig { task_fsbase: 0, task_pid: 0, task_mm: 0, mm_arg_start: 0, mm_arg_end: 0, mm_anon_rss: 0 };

/// Traced processes (by tgid) and what to collect for each. A process not
/// listed here is ignored by every program.
#[map]
pub static TARGETS: HashMap<u32, TargetConfig> = HashMap::with_max_entries(MAX_TARGETS, 0);

const MAX_TARGETS: u32 = 1024;

/// The outermost allocator call in progress on each thread (by tid). LRU so
/// that threads which die inside an allocator do not leak entries.
#[map]
pub static ACTIVE: LruHashMap<u32, PendingCall> = LruHashMap::with_max_entries(32768, 0);

/// Live allocations made since attach.
#[map]
pub static ALLOCS: HashMap<AllocKey, AllocInfo> = HashMap::with_max_entries(1 << 20, 0);

/// Per-site totals.
#[map]
pub static SITES: HashMap<SiteKey, SiteStats> = HashMap::with_max_entries(1 << 16, 0);

/// Native stacks by process and content hash (ids in `SiteKey::native_stack`).
#[map]
pub static NATIVE_STACKS: HashMap<StackKey, NativeStack> = HashMap::with_max_entries(1 << 14, 0);

/// How to unwind a native frame at each return address (and probed
/// instruction) of a traced process's code: userspace compiles them from
/// the binaries' call frame information. Tens of thousands per process, so
/// entries are allocated as userspace adds them rather than all at load.
#[map]
pub static UNWIND_RULES: HashMap<UnwindKey, UnwindRule> = HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

/// Python stacks by process and content hash (ids in `SiteKey::python_stack`).
#[map]
pub static PYTHON_STACKS: HashMap<StackKey, PythonStack> = HashMap::with_max_entries(1 << 14, 0);

/// Keys of Python stacks as they are first stored, so that userspace
/// resolves them while their code objects are alive.
#[map]
pub static NEW_PYTHON_STACKS: RingBuf = RingBuf::with_byte_size(1 << 16, 0);

/// Each new site's registers and stack bytes, with `--native` on Python.
#[map]
pub static SITE_STACKS: RingBuf = RingBuf::with_byte_size(1 << 21, 0);

/// Forks and execs of traced processes (`memtrace_common::ProcessEvent`);
/// in host mode, every process's forks, execs and exits, in a ring
/// userspace enlarges before loading (`memtrace::probes::attach`).
#[map]
pub static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 16, 0);

/// Each traced process's loss and coverage counters (see
/// `memtrace_common::counter`), per CPU. Userspace creates a process's entry
/// before it lists the process in TARGETS, so programs never insert here.
#[map]
pub static COUNTERS: PerCpuHashMap<u32, CounterSet> = PerCpuHashMap::with_max_entries(MAX_TARGETS, 0);

/// Adds one to counter `index` of the current process. The first time a
/// loss is counted on a CPU it is also logged (seen with `--verbose`).
pub fn count(index: u32) {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(set) = COUNTERS.get_ptr_mut(&pid) else { return };
    // Masked as well as checked: the verifier must see the bound on the
    // register that indexes the value.
    let index = index as usize & (counter::COUNT as usize).next_power_of_two().wrapping_sub(1);
    // SAFETY: `set` points into this CPU's value of the process's entry,
    // alive for the duration of the program.
    let Some(slot) = (unsafe { (*set).values.get_mut(index) }) else { return };
    // Read before the add: BPF's fetch-and-add needs a newer instruction set
    // than memtrace builds for. A preempting program may make a first loss
    // be logged twice, never not at all.
    let first = *slot == 0;
    // Atomic even though the slot is per-CPU: on a preemptible kernel a
    // program can be preempted by another program on the same CPU.
    atomic_add(slot, 1);
    if first && counter::is_loss(index as u32) {
        crate::diagnostics::first_loss(pid, index as u32);
    }
}

/// Adds `delta` (wrapping, so a negated value subtracts) to a u64 in a map
/// value that other CPUs update concurrently.
pub fn atomic_add(slot: *mut u64, delta: u64) {
    // The BPF target has no compare-and-swap, so core's AtomicU64 offers no
    // fetch_add; the intrinsic lowers to BPF's native atomic add.
    // SAFETY: `slot` points into a map value the kernel keeps alive for the
    // duration of the program.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(slot, delta) };
}
