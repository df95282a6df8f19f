//! Every BPF map of memtrace, in one place so their sizes and roles can be
//! read together. Userspace may resize the big ones before loading
//! (`--max-allocs`); the sizes here are defaults.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use memtrace_common::{
    AllocInfo, AllocKey, NativeStack, PendingCall, PythonStack, SiteKey, SiteStats, TargetConfig, counter,
};

use crate::python::WalkState;

/// Traced processes (by tgid) and what to collect for each. A process not
/// listed here is ignored by every program.
#[map]
pub static TARGETS: HashMap<u32, TargetConfig> = HashMap::with_max_entries(1024, 0);

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

/// Native stacks by content hash (ids in `SiteKey::native_stack`).
#[map]
pub static NATIVE_STACKS: HashMap<u64, NativeStack> = HashMap::with_max_entries(1 << 14, 0);

/// Python stacks by content hash (ids in `SiteKey::python_stack`).
#[map]
pub static PYTHON_STACKS: HashMap<u64, PythonStack> = HashMap::with_max_entries(1 << 14, 0);

/// Ids of Python stacks as they are first stored, so that userspace
/// resolves them while their code objects are alive.
#[map]
pub static NEW_PYTHON_STACKS: RingBuf = RingBuf::with_byte_size(1 << 16, 0);

/// Each new site's registers and stack bytes, with `--native`.
#[map]
pub static SITE_STACKS: RingBuf = RingBuf::with_byte_size(1 << 21, 0);

/// Loss and coverage counters, see `memtrace_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Scratch space for building stacks: too big for the 512-byte BPF stack.
#[map]
pub static NATIVE_SCRATCH: PerCpuArray<NativeStack> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static WALK_SCRATCH: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(1, 0);

/// The last block freed through the Python allocator on this CPU. When
/// pymalloc hands a large block back to libc, the libc free that follows is
/// part of the same release, not a free of an unknown address. Per-CPU is
/// cheap and at worst miscounts UNKNOWN_FREE when a thread migrates between
/// the two probes; accounting itself never depends on it.
#[map]
pub static LAST_UPPER_FREE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Atomic even though the slot is per-CPU: on a preemptible kernel a
        // program can be preempted by another program on the same CPU.
        atomic_add(slot, 1);
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
