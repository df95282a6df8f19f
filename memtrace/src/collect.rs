//! Reads the kernel side's maps into plain values: per-site totals, the
//! loss counters, stacks by id, and (for --older-than) live allocations by
//! age. Everything downstream works on these values, not on maps.

use std::collections::HashMap as StdHashMap;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use memtrace_common::{
    AllocInfo, AllocKey, NativeStack, PythonStack, SiteKey, SiteStackCopy, SiteStats, counter, layer,
};

use crate::probes::attach::Tracer;

/// The kernel side's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; counter::COUNT as usize]);

impl Counters {
    pub fn get(&self, index: u32) -> u64 {
        self.0[index as usize]
    }

    /// A per-layer counter summed over layers.
    pub fn all_layers(&self, first: u32) -> u64 {
        (0..layer::COUNT as u32).map(|l| self.get(first + l)).sum()
    }

    /// How a layer's live blocks changed since attach, as far as the probes
    /// saw: allocations minus every free.
    pub fn live_change(&self, layer: u8) -> i64 {
        let layer = layer as u32;
        self.get(counter::ALLOCS_SEEN + layer) as i64
            - self.get(counter::FREES_MATCHED + layer) as i64
            - self.get(counter::UNKNOWN_FREE + layer) as i64
    }
}

fn map<'a>(tracer: &'a Tracer, name: &str) -> Result<&'a aya::maps::Map> {
    tracer.ebpf.map(name).ok_or_else(|| anyhow!("eBPF object lacks map {name}"))
}

/// Per-site totals of `pid`.
pub fn sites(tracer: &Tracer, pid: u32) -> Result<Vec<(SiteKey, SiteStats)>> {
    let sites: HashMap<&MapData, SiteKey, SiteStats> = HashMap::try_from(map(tracer, "SITES")?)?;
    let mut out = Vec::new();
    for entry in sites.iter() {
        // An entry deleted while we iterate is simply absent.
        let Ok((key, stats)) = entry else { continue };
        if key.pid == pid {
            out.push((key, stats));
        }
    }
    Ok(out)
}

pub fn counters(tracer: &Tracer) -> Result<Counters> {
    let array: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map(tracer, "COUNTERS")?)?;
    let mut out = Counters::default();
    for (i, slot) in out.0.iter_mut().enumerate() {
        let per_cpu = array.get(&(i as u32), 0).context("cannot read counters")?;
        *slot = per_cpu.iter().sum();
    }
    Ok(out)
}

pub fn native_stack(tracer: &Tracer, id: u64) -> Option<NativeStack> {
    let stacks: HashMap<&MapData, u64, NativeStack> = HashMap::try_from(map(tracer, "NATIVE_STACKS").ok()?).ok()?;
    stacks.get(&id, 0).ok()
}

pub fn python_stack(tracer: &Tracer, id: u64) -> Option<PythonStack> {
    let stacks: HashMap<&MapData, u64, PythonStack> = HashMap::try_from(map(tracer, "PYTHON_STACKS").ok()?).ok()?;
    stacks.get(&id, 0).ok()
}

/// The ring of Python stack ids as the kernel first stores them. Taken out
/// of the tracer, so that the session can wait on it.
pub fn new_python_stacks(tracer: &mut Tracer) -> Result<RingBuf<MapData>> {
    let ring =
        tracer.ebpf.take_map("NEW_PYTHON_STACKS").ok_or_else(|| anyhow!("eBPF object lacks map NEW_PYTHON_STACKS"))?;
    Ok(RingBuf::try_from(ring)?)
}

/// Drains `ring`, returning the stack ids it held.
pub fn drain_stack_ids(ring: &mut RingBuf<MapData>) -> Vec<u64> {
    let mut ids = Vec::new();
    while let Some(item) = ring.next() {
        if let Ok(bytes) = <[u8; 8]>::try_from(&*item) {
            ids.push(u64::from_ne_bytes(bytes));
        }
    }
    ids
}

/// The ring of new sites' stack copies (`--native`), taken out of the
/// tracer so that the session can wait on it.
pub fn site_stacks(tracer: &mut Tracer) -> Result<RingBuf<MapData>> {
    let ring = tracer.ebpf.take_map("SITE_STACKS").ok_or_else(|| anyhow!("eBPF object lacks map SITE_STACKS"))?;
    Ok(RingBuf::try_from(ring)?)
}

/// Drains `ring`, passing each stack copy to `each`.
pub fn drain_stack_copies(ring: &mut RingBuf<MapData>, mut each: impl FnMut(&SiteStackCopy)) {
    while let Some(item) = ring.next() {
        if item.len() == size_of::<SiteStackCopy>() {
            // SAFETY: the kernel wrote a whole SiteStackCopy (plain data) in
            // this record; it may be unaligned in the ring.
            let copy = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<SiteStackCopy>()) };
            each(&copy);
        }
    }
}

/// Ids of every Python stack stored so far.
pub fn python_stack_ids(tracer: &Tracer) -> Result<Vec<u64>> {
    let stacks: HashMap<&MapData, u64, PythonStack> = HashMap::try_from(map(tracer, "PYTHON_STACKS")?)?;
    Ok(stacks.keys().filter_map(Result::ok).collect())
}

/// Outstanding (bytes, count) per site of `pid`'s live allocations made
/// before `before_ns` (CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns).
pub fn outstanding_older_than(tracer: &Tracer, pid: u32, before_ns: u64) -> Result<StdHashMap<SiteKey, (u64, u64)>> {
    let allocs: HashMap<&MapData, AllocKey, AllocInfo> = HashMap::try_from(map(tracer, "ALLOCS")?)?;
    let mut out: StdHashMap<SiteKey, (u64, u64)> = StdHashMap::new();
    for entry in allocs.iter() {
        let Ok((key, info)) = entry else { continue };
        if key.pid == pid && info.timestamp_ns < before_ns {
            let slot = out.entry(info.site).or_default();
            slot.0 += info.size;
            slot.1 += 1;
        }
    }
    Ok(out)
}

/// Now on CLOCK_MONOTONIC, in nanoseconds.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
