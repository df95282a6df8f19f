//! Measured coverage: how much of pymalloc's own change in live blocks
//! since attach the probes accounted for. pymalloc's count is read from the
//! target's memory (python::pymalloc) and compared with the kernel's
//! per-layer counters, and the result is printed under every report's
//! header: where probes cannot see everything (an interpreter that inlines
//! pymalloc), the share they saw is measured, not assumed. Where the probes
//! leave blocks untracked on purpose (a size filter) or for want of room (a
//! full map), frees of those blocks count as unknown and the two counts
//! stop measuring the same thing: the note then says why instead of giving
//! a share.

use memtrace_common::layer;

use crate::{
    census::pymalloc::{Census, PymallocState},
    collect::Counters,
    process::memory::ProcessMemory,
};

/// Below this change, a percentage says nothing.
const MEANINGFUL: i64 = 1000;

pub struct Coverage {
    state: PymallocState,
    memory: ProcessMemory,
    baseline: Census,
    /// Whether the probed pymalloc layer includes the large blocks pymalloc
    /// hands to the C library (function-level probes), or only its pools
    /// (probes on inlined fast paths; the large blocks are libc's then).
    includes_raw: bool,
    /// The sizes the kernel side tracks (`--min-size`, `--max-size`).
    sizes: (u64, u64),
}

impl Coverage {
    /// Takes pymalloc's count now, as the baseline; None if it cannot be
    /// read. Blocks of `sizes` (bytes, inclusive) are tracked.
    pub fn start(state: PymallocState, pid: u32, includes_raw: bool, sizes: (u64, u64)) -> Option<Self> {
        let memory = ProcessMemory::new(pid);
        let baseline = state.census(&memory).ok()?;
        Some(Self { state, memory, baseline, includes_raw, sizes })
    }

    /// The sentence for a report, None once the target is gone.
    pub fn note(&self, counters: &Counters) -> Option<String> {
        let now = self.state.census(&self.memory).ok()?;
        let blocks = |c: &Census| (c.blocks + if self.includes_raw { c.raw_blocks } else { 0 }) as i64;
        let changed = blocks(&now) - blocks(&self.baseline);
        let said = format!("pymalloc's own count of live blocks changed by {changed:+} since attach");
        if let Some(why) = self.unaccountable(counters) {
            return Some(format!("{said}; memtrace's probes cannot account for it: {why}"));
        }
        let seen = counters.live_change(layer::PYMALLOC);
        let share = if changed.abs() >= MEANINGFUL {
            format!(" ({:.1}%)", seen as f64 * 100.0 / changed as f64)
        } else {
            String::new()
        };
        Some(format!("{said}; memtrace's probes account for {seen:+}{share}"))
    }

    /// Why the probes' count of live blocks is not pymalloc's, if they
    /// left blocks untracked.
    fn unaccountable(&self, counters: &Counters) -> Option<String> {
        let untracked = match self.sizes {
            (0, u64::MAX) => None,
            (min, u64::MAX) => Some(format!("--min-size {min} leaves smaller blocks")),
            (0, max) => Some(format!("--max-size {max} leaves larger blocks")),
            (min, max) => Some(format!("--min-size {min} and --max-size {max} leave blocks of other sizes")),
        };
        if let Some(untracked) = untracked {
            return Some(format!("{untracked} untracked, and their frees count as unknown"));
        }
        let lost = counters.untracked();
        (lost > 0).then(|| format!("{lost} allocations went untracked because a map was full (raise --max-allocs)"))
    }
}
