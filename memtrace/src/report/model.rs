//! The report: what memtrace found in one process at one moment, as a
//! plain value that every writer reads. It keeps the whole ungrouped
//! snapshot and the previous report's, so that each writer groups and
//! compares as its format needs (lines for text, whole tracebacks for
//! profiles), and the history of earlier reports that verdicts and peaks
//! come from.

use std::{borrow::Cow, time::SystemTime};

use std::collections::HashMap;

use super::trend::{History, Trend};
use crate::{
    census::Census,
    snapshot::{GroupBy, Snapshot, Stat, StatDiff},
};

/// (name, value) pairs in print order; the names are memtrace's own
/// unless read back from a saved snapshot.
pub type Counters = Vec<(Cow<'static, str>, u64)>;

/// The process a report is about.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    /// The pid inside the process's own pid namespace; `pid` outside
    /// containers.
    pub ns_pid: u32,
    /// The command name.
    pub comm: String,
    /// "CPython 3.12.1", when memtrace reads its interpreter.
    pub interpreter: Option<String>,
    /// Its cgroup (v2) path, which names a container: `/system.slice/
    /// docker-<id>.scope`; None when unreadable.
    #[serde(default)]
    pub cgroup: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Report {
    pub time: SystemTime,
    pub process: ProcessInfo,
    /// 1 for the first report of the process.
    pub sequence: u32,
    /// The last report of the session, or of the process's life.
    pub is_final: bool,
    /// Allocated since attach, freed or not.
    pub allocated: Stat,
    /// (name, value) of every loss counter, in print order.
    pub losses: Counters,
    /// (name, value) of counters that are not losses (frees of blocks
    /// allocated before attach, allocator calls that failed, ...).
    pub counters: Counters,
    /// Sentences about what the probes or the census cannot see.
    pub notes: Vec<String>,
    /// Whether probes counted allocations (not `--census-only`): without
    /// them the snapshots are empty and the totals zero.
    pub traced: bool,
    /// Outstanding blocks now, and at the previous report (at attach, for
    /// the first).
    pub current: Snapshot,
    pub previous: Snapshot,
    /// The census now and at the previous report (at attach, for the first).
    pub census: Option<CensusChange>,
    /// Each type's trend over the last censuses; empty before there are
    /// enough, and for a report rebuilt from saved snapshots.
    pub type_trends: HashMap<String, Trend>,
    /// The reports so far, this one included; empty for a report rebuilt
    /// from saved snapshots, which then has no verdicts or peaks.
    pub history: History,
    /// Where its resident memory was first touched (the free tier, when
    /// the kernel side charges its page faults).
    pub first_touch: Option<FirstTouch>,
}

/// Resident pages by the traceback that first touched them, now and at the
/// previous report: in each [`Stat`], `size` is bytes and `count` pages.
/// First touch is not allocation: a fresh page is charged to whichever
/// allocation first landed on it.
#[derive(Clone, Debug, Default)]
pub struct FirstTouch {
    pub now: Snapshot,
    pub before: Snapshot,
    /// How faults were chosen for a walk, and what was not charged.
    pub counters: Counters,
}

impl FirstTouch {
    /// The groups of `group_by`, biggest growth since the previous report
    /// first.
    pub fn rows(&self, group_by: GroupBy) -> Vec<StatDiff> {
        self.now.group(group_by).compare_to(&self.before.group(group_by))
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CensusChange {
    pub now: Census,
    pub before: Census,
}

impl CensusChange {
    /// What the next report compares with: this census, or when it read
    /// only the process's memory (host mode's censuses wait their turn),
    /// its memory with the latest census's objects and heap.
    pub fn carried_on(self) -> Census {
        match self.now.objects {
            Some(_) => self.now,
            None => Census {
                memory: self.now.memory,
                heap: self.now.heap.or(self.before.heap),
                objects: self.before.objects,
            },
        }
    }
}

impl Report {
    /// The groups of `group_by` with their changes since the previous
    /// report, biggest change first (tracemalloc's `compare_to`).
    pub fn rows(&self, group_by: GroupBy) -> Vec<StatDiff> {
        self.current.group(group_by).compare_to(&self.previous.group(group_by))
    }
}
