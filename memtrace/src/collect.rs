//! Reads the kernel side's maps into plain values: a process's per-site
//! totals and counters, stacks by key, and (for --older-than) live
//! allocations by age; and drains the rings through which the kernel
//! announces new stacks and processes that fork or exec. Everything downstream works on these values, never
//! on maps.

use std::collections::HashMap as StdHashMap;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use memtrace_common::{
    AllocInfo, AllocKey, CounterSet, NativeStack, ProcessEvent, PythonStack, SiteKey, SiteStackCopy, SiteStats,
    StackKey, TouchKey, counter, layer, map_name,
};

use crate::probes::attach::Tracer;

/// One process's kernel-side counters, summed over CPUs.
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

    /// Allocations the kernel side could not track because a map was full.
    pub fn untracked(&self) -> u64 {
        self.get(counter::ALLOC_MAP_FULL) + self.get(counter::SITE_MAP_FULL)
    }

    /// First touch's counters: faults walked as growth and under the
    /// budget, faults skipped, pages not charged.
    pub fn first_touch(&self) -> Vec<(&'static str, u64)> {
        [
            counter::TOUCH_GROWTH,
            counter::TOUCH_SAMPLED,
            counter::TOUCH_SKIPPED,
            counter::TOUCH_MAP_FULL,
            counter::TOUCH_RELEASE_CUT,
        ]
        .iter()
        .map(|&c| (counter::name(c), self.get(c)))
        .collect()
    }

    /// Every loss counter, named as reports name them, in print order.
    pub fn losses(&self) -> Vec<(&'static str, u64)> {
        counter::LOSSES.iter().map(|&c| (counter::name(c), self.get(c))).collect()
    }

    /// Counters that are not losses but say how to read a report: stacks cut
    /// at the frame limit, frees of blocks allocated before attach, misses,
    /// allocator calls that failed.
    pub fn notable(&self) -> Vec<(&'static str, u64)> {
        vec![
            (counter::name(counter::PYTHON_TRUNCATED), self.get(counter::PYTHON_TRUNCATED)),
            (counter::name(counter::UNKNOWN_FREE), self.all_layers(counter::UNKNOWN_FREE)),
            (counter::name(counter::MISSED_FREE), self.get(counter::MISSED_FREE)),
            (counter::name(counter::FAILED_ALLOC), self.get(counter::FAILED_ALLOC)),
        ]
    }
}

fn map<'a>(tracer: &'a Tracer, name: &str) -> Result<&'a aya::maps::Map> {
    tracer.ebpf.map(name).ok_or_else(|| anyhow!("eBPF object lacks map {name}"))
}

/// Per-site totals of `pid`.
pub fn sites(tracer: &Tracer, pid: u32) -> Result<Vec<(SiteKey, SiteStats)>> {
    let sites: HashMap<&MapData, SiteKey, SiteStats> = HashMap::try_from(map(tracer, map_name::SITES)?)?;
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

/// `pid`'s pages charged by first touch, by place.
pub fn first_touch(tracer: &Tracer, pid: u32) -> Result<Vec<(TouchKey, u64)>> {
    let sites: HashMap<&MapData, TouchKey, u64> = HashMap::try_from(map(tracer, map_name::FIRST_TOUCH_SITES)?)?;
    Ok(sites.iter().filter_map(Result::ok).filter(|(key, _)| key.pid == pid).collect())
}

/// `pid`'s counters; all zero before the process is traced.
pub fn counters(tracer: &Tracer, pid: u32) -> Result<Counters> {
    let sets: PerCpuHashMap<&MapData, u32, CounterSet> = PerCpuHashMap::try_from(map(tracer, map_name::COUNTERS)?)?;
    let mut out = Counters::default();
    let per_cpu = match sets.get(&pid, 0) {
        Ok(per_cpu) => per_cpu,
        Err(aya::maps::MapError::KeyNotFound) => return Ok(out),
        Err(e) => return Err(e).context("cannot read counters"),
    };
    for set in per_cpu.iter() {
        for (total, value) in out.0.iter_mut().zip(set.values) {
            *total += value;
        }
    }
    Ok(out)
}

pub fn native_stack(tracer: &Tracer, key: StackKey) -> Option<NativeStack> {
    let stacks: HashMap<&MapData, StackKey, NativeStack> =
        HashMap::try_from(map(tracer, map_name::NATIVE_STACKS).ok()?).ok()?;
    stacks.get(&key, 0).ok()
}

pub fn python_stack(tracer: &Tracer, key: StackKey) -> Option<PythonStack> {
    let stacks: HashMap<&MapData, StackKey, PythonStack> =
        HashMap::try_from(map(tracer, map_name::PYTHON_STACKS).ok()?).ok()?;
    stacks.get(&key, 0).ok()
}

/// Keys of every Python stack stored so far, of every process.
pub fn python_stack_keys(tracer: &Tracer) -> Result<Vec<StackKey>> {
    let stacks: HashMap<&MapData, StackKey, PythonStack> = HashMap::try_from(map(tracer, map_name::PYTHON_STACKS)?)?;
    Ok(stacks.keys().filter_map(Result::ok).collect())
}

/// The ring of Python stack keys as the kernel first stores them. Taken out
/// of the tracer, so that the session can wait on it.
pub fn new_python_stacks(tracer: &mut Tracer) -> Result<RingBuf<MapData>> {
    take_ring(tracer, map_name::NEW_PYTHON_STACKS)
}

/// The ring of new sites' stack copies (`--native`), taken out of the
/// tracer so that the session can wait on it.
pub fn site_stacks(tracer: &mut Tracer) -> Result<RingBuf<MapData>> {
    take_ring(tracer, map_name::SITE_STACKS)
}

/// The ring of traced processes' forks and execs, taken out of the tracer
/// so that the session can wait on it.
pub fn process_events(tracer: &mut Tracer) -> Result<RingBuf<MapData>> {
    take_ring(tracer, map_name::PROCESS_EVENTS)
}

/// Host mode's announcements of untraced processes that the process ring
/// had no room for, summed over CPUs.
pub fn events_lost(tracer: &Tracer) -> Result<u64> {
    let lost: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map(tracer, map_name::EVENTS_LOST)?)?;
    Ok(lost.get(&0, 0)?.iter().sum())
}

/// Drains `ring`, returning the events it held, oldest first.
pub fn drain_process_events(ring: &mut RingBuf<MapData>) -> Vec<ProcessEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.extend(read_record::<ProcessEvent>(&item));
    }
    events
}

fn take_ring(tracer: &mut Tracer, name: &str) -> Result<RingBuf<MapData>> {
    let ring = tracer.ebpf.take_map(name).ok_or_else(|| anyhow!("eBPF object lacks map {name}"))?;
    Ok(RingBuf::try_from(ring)?)
}

/// Drains `ring`, returning the stack keys it held.
pub fn drain_stack_keys(ring: &mut RingBuf<MapData>) -> Vec<StackKey> {
    let mut keys = Vec::new();
    while let Some(item) = ring.next() {
        if let Some(key) = read_record::<StackKey>(&item) {
            keys.push(key);
        }
    }
    keys
}

/// Drains `ring`, passing each stack copy to `each`.
pub fn drain_stack_copies(ring: &mut RingBuf<MapData>, mut each: impl FnMut(&SiteStackCopy)) {
    while let Some(item) = ring.next() {
        if let Some(copy) = read_record::<SiteStackCopy>(&item) {
            each(&copy);
        }
    }
}

/// A ring record holding exactly one `T`.
fn read_record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    // SAFETY: the length is checked, T is plain data (Pod) for which any
    // bytes are a value, and the record may be unaligned in the ring.
    (bytes.len() == size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Outstanding (bytes, count) per site of `pid`'s live allocations made
/// before `before_ns` (CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns).
pub fn outstanding_older_than(tracer: &Tracer, pid: u32, before_ns: u64) -> Result<StdHashMap<SiteKey, (u64, u64)>> {
    let allocs: HashMap<&MapData, AllocKey, AllocInfo> = HashMap::try_from(map(tracer, map_name::ALLOCS)?)?;
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

/// Every live-block record of `pid`: with `--type`, its births.
pub fn allocations(tracer: &Tracer, pid: u32) -> Result<Vec<(AllocKey, AllocInfo)>> {
    let allocs: HashMap<&MapData, AllocKey, AllocInfo> = HashMap::try_from(map(tracer, map_name::ALLOCS)?)?;
    Ok(allocs.iter().filter_map(Result::ok).filter(|(key, _)| key.pid == pid).collect())
}

/// Now on CLOCK_MONOTONIC, in nanoseconds.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
