//! Snapshots and their differences, with tracemalloc's semantics. A
//! snapshot maps each whole traceback to the size and count of its
//! outstanding blocks, ungrouped, as collected; a writer groups it
//! (`Snapshot::group`: by line, file or traceback, tracemalloc's
//! `key_type`) and `Grouped::compare_to` pairs two groupings and sorts like
//! `tracemalloc.Snapshot.compare_to`. Plain values, no eBPF.

use std::{cmp::Ordering, collections::HashMap};

/// One frame of a traceback: where it is as reports print it (file and
/// line), and what else is known of it (its function; for native code its
/// module and address) for the writers that show more (JSON, pprof).
/// A frame *is* its file and line, as in tracemalloc: equality, hashing
/// and order look at nothing else, so two return addresses on one line
/// are one frame (keeping the details of the first one seen) and no report
/// ever prints two rows that read alike.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Frame {
    /// Source file, or for native code without line information the
    /// symbol and module (`malloc+0x1c (libc.so.6)`).
    pub filename: String,
    /// 0 when unknown.
    pub lineno: u32,
    /// The function: co_qualname for Python (co_name before 3.11), the
    /// symbol for native code; None when unknown.
    #[serde(default)]
    pub function: Option<String>,
    /// The Python function's first line (co_firstlineno).
    #[serde(default)]
    pub first_lineno: Option<u32>,
    /// For native code, where the instruction is.
    #[serde(default)]
    pub native: Option<NativeLocation>,
}

/// Where a native frame's return address is: in which mapped file, at
/// which address of the process and which offset of the file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NativeLocation {
    /// The file as the process maps it (its path inside a container).
    pub module: String,
    pub address: u64,
    pub offset: u64,
}

impl Frame {
    /// A frame known only by its file and line.
    pub fn at(filename: impl Into<String>, lineno: u32) -> Self {
        Self { filename: filename.into(), lineno, ..Self::default() }
    }

    fn identity(&self) -> (&str, u32) {
        (&self.filename, self.lineno)
    }
}

impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
    }
}

impl Eq for Frame {}

impl std::hash::Hash for Frame {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.identity().hash(state)
    }
}

impl Ord for Frame {
    fn cmp(&self, other: &Self) -> Ordering {
        self.identity().cmp(&other.identity())
    }
}

impl PartialOrd for Frame {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.filename, self.lineno)
    }
}

/// Frames from the innermost (where the allocation happened) outwards.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Traceback(pub Vec<Frame>);

impl Traceback {
    /// Frames from the oldest call to the allocation, the order in which
    /// tracemalloc prints and compares them.
    pub fn oldest_first(&self) -> impl Iterator<Item = &Frame> {
        self.0.iter().rev()
    }
}

impl std::fmt::Display for Traceback {
    /// tracemalloc prints a traceback as its oldest frame.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.last() {
            Some(frame) => frame.fmt(f),
            None => f.write_str("<unknown>:0"),
        }
    }
}

impl Ord for Traceback {
    fn cmp(&self, other: &Self) -> Ordering {
        self.oldest_first().cmp(other.oldest_first())
    }
}

impl PartialOrd for Traceback {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What a snapshot groups by (tracemalloc's `key_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    /// The innermost frame's file and line.
    Lineno,
    /// The innermost frame's file.
    Filename,
    /// The whole traceback.
    Traceback,
}

impl GroupBy {
    pub const ALL: [GroupBy; 3] = [GroupBy::Lineno, GroupBy::Filename, GroupBy::Traceback];

    /// tracemalloc's name for it.
    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Lineno => "lineno",
            GroupBy::Filename => "filename",
            GroupBy::Traceback => "traceback",
        }
    }

    pub fn key(self, traceback: &Traceback) -> Traceback {
        let innermost = traceback.0.first().cloned();
        match self {
            GroupBy::Lineno => Traceback(innermost.into_iter().collect()),
            GroupBy::Filename => Traceback(innermost.map(|f| Frame::at(f.filename, 0)).into_iter().collect()),
            GroupBy::Traceback => traceback.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stat {
    pub size: u64,
    pub count: u64,
}

impl Stat {
    fn add(&mut self, other: Stat) {
        self.size += other.size;
        self.count += other.count;
    }
}

/// Outstanding blocks by whole traceback.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub stats: HashMap<Traceback, Stat>,
}

impl Snapshot {
    /// Adds up (traceback, size, count) entries; equal tracebacks merge.
    pub fn from_entries(entries: impl IntoIterator<Item = (Traceback, Stat)>) -> Self {
        let mut stats: HashMap<Traceback, Stat> = HashMap::new();
        for (traceback, stat) in entries {
            stats.entry(traceback).or_default().add(stat);
        }
        Self { stats }
    }

    pub fn total(&self) -> Stat {
        let mut total = Stat::default();
        self.stats.values().for_each(|s| total.add(*s));
        total
    }

    /// The snapshot grouped by `group_by`.
    pub fn group(&self, group_by: GroupBy) -> Grouped {
        let mut stats: HashMap<Traceback, Stat> = HashMap::new();
        for (traceback, stat) in &self.stats {
            stats.entry(group_by.key(traceback)).or_default().add(*stat);
        }
        Grouped { stats }
    }
}

/// A snapshot grouped by one key type: key traceback -> size and count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grouped {
    pub stats: HashMap<Traceback, Stat>,
}

impl Grouped {
    /// Differences from `old`, biggest change first (tracemalloc's
    /// `Snapshot.compare_to`): groups only in `old` appear with size 0.
    pub fn compare_to(&self, old: &Grouped) -> Vec<StatDiff> {
        let mut diffs: Vec<StatDiff> = self
            .stats
            .iter()
            .map(|(traceback, new)| {
                let before = old.stats.get(traceback).copied().unwrap_or_default();
                StatDiff::new(traceback.clone(), *new, before)
            })
            .chain(
                old.stats
                    .iter()
                    .filter(|(traceback, _)| !self.stats.contains_key(*traceback))
                    .map(|(traceback, before)| StatDiff::new(traceback.clone(), Stat::default(), *before)),
            )
            .collect();
        diffs.sort_by(|a, b| b.sort_key().cmp(&a.sort_key()));
        diffs
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatDiff {
    pub traceback: Traceback,
    pub size: u64,
    pub size_diff: i64,
    pub count: u64,
    pub count_diff: i64,
}

impl StatDiff {
    fn new(traceback: Traceback, new: Stat, old: Stat) -> Self {
        Self {
            traceback,
            size: new.size,
            size_diff: new.size as i64 - old.size as i64,
            count: new.count,
            count_diff: new.count as i64 - old.count as i64,
        }
    }

    /// tracemalloc's `StatisticDiff._sort_key`.
    fn sort_key(&self) -> (u64, u64, u64, u64, &Traceback) {
        (self.size_diff.unsigned_abs(), self.size, self.count_diff.unsigned_abs(), self.count, &self.traceback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tb(frames: &[(&str, u32)]) -> Traceback {
        Traceback(frames.iter().map(|&(f, l)| Frame::at(f, l)).collect())
    }

    #[test]
    fn groups_like_tracemalloc() {
        let a = tb(&[("x.py", 4), ("x.py", 8)]);
        let b = tb(&[("x.py", 4), ("x.py", 9)]);
        let c = tb(&[("y.py", 1)]);
        let snapshot = Snapshot::from_entries([
            (a.clone(), Stat { size: 10, count: 1 }),
            (b, Stat { size: 5, count: 1 }),
            (c, Stat { size: 1, count: 1 }),
            (a.clone(), Stat { size: 2, count: 1 }),
        ]);
        assert_eq!(snapshot.stats[&a], Stat { size: 12, count: 2 });
        let by_line = snapshot.group(GroupBy::Lineno);
        assert_eq!(by_line.stats[&tb(&[("x.py", 4)])], Stat { size: 17, count: 3 });
        let by_file = snapshot.group(GroupBy::Filename);
        assert_eq!(by_file.stats[&tb(&[("x.py", 0)])], Stat { size: 17, count: 3 });
        let by_tb = snapshot.group(GroupBy::Traceback);
        assert_eq!(by_tb.stats.len(), 3);
        // Printed as the oldest frame, as tracemalloc does.
        assert_eq!(a.to_string(), "x.py:8");
    }

    #[test]
    fn compare_to_sorts_by_absolute_change_and_keeps_vanished_groups() {
        let old = Snapshot::from_entries([(tb(&[("a", 1)]), Stat { size: 100, count: 2 })]);
        let new = Snapshot::from_entries([
            (tb(&[("b", 1)]), Stat { size: 50, count: 1 }),
            (tb(&[("c", 1)]), Stat { size: 70, count: 1 }),
        ]);
        let diffs = new.group(GroupBy::Lineno).compare_to(&old.group(GroupBy::Lineno));
        let order: Vec<String> = diffs.iter().map(|d| d.traceback.to_string()).collect();
        assert_eq!(order, ["a:1", "c:1", "b:1"]);
        assert_eq!((diffs[0].size, diffs[0].size_diff, diffs[0].count_diff), (0, -100, -2));
    }
}
