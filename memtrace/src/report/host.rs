//! Host mode's report (`--all-python`, `--all`, `--census-only` over
//! several pids): at every interval, the processes watched ranked by how
//! their private memory grows, each with its verdict, growth rate and since
//! when, its memory now and since it was first seen, and its fastest
//! growing object types and the lines where its resident pages were first
//! touched; then the processes that cannot be watched, each
//! with its reason. A plain value, like [`super::Report`], that writers
//! turn into their formats.

use std::time::SystemTime;

use super::{
    ProcessInfo,
    trend::{SeriesHistory, Trend, TypeHistory, Verdict},
};
use crate::{
    census::{memory::Memory, pymalloc},
    snapshot::{GroupBy, Snapshot, Stat, Traceback},
};

#[derive(Clone, Debug)]
pub struct HostReport {
    pub time: SystemTime,
    /// 1 for the first host report.
    pub sequence: u32,
    pub is_final: bool,
    /// Fastest growing first (see [`rank`]).
    pub processes: Vec<Standing>,
    /// By pid.
    pub skipped: Vec<Skipped>,
    /// Processes that exited before they could be read, since the previous
    /// host report.
    pub vanished: Vec<Skipped>,
}

impl HostReport {
    pub fn in_containers(&self) -> usize {
        self.processes.iter().filter(|p| p.in_container).count()
    }
}

/// A process memtrace finds but cannot watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub pid: u32,
    pub comm: String,
    pub reason: String,
}

/// Where one watched process stands.
#[derive(Clone, Debug)]
pub struct Standing {
    pub process: ProcessInfo,
    /// In another pid or mount namespace than memtrace's.
    pub in_container: bool,
    /// It exited since the previous host report; this is its last standing.
    pub exited: bool,
    /// When memtrace first saw it.
    pub watched_since: SystemTime,
    pub memory: Option<Memory>,
    /// At `watched_since`.
    pub memory_at_start: Option<Memory>,
    pub heap: Option<pymalloc::Census>,
    /// The trend of its private memory (anonymous and swapped).
    pub trend: Option<Trend>,
    pub growing_since: Option<SystemTime>,
    /// When its latest object census was taken (host mode censuses large
    /// processes less often), and the types that grew by then: the fastest
    /// growing first, then those that grew most since its first census.
    pub census_at: Option<SystemTime>,
    pub types: Vec<TypeStanding>,
    /// Where its resident pages were first touched (bytes and pages), by
    /// line, the most first; empty without first-touch accounting.
    pub first_touched: Vec<(Traceback, Stat)>,
}

/// One object type of a process.
#[derive(Clone, Debug, PartialEq)]
pub struct TypeStanding {
    pub name: String,
    pub count: u64,
    /// Since the process's first census.
    pub change: i64,
    pub trend: Option<Trend>,
}

/// What the session keeps of one process for host reports.
#[derive(Clone, Debug, Default)]
pub struct Watch {
    pub private_memory: SeriesHistory,
    pub memory_at_start: Option<Memory>,
    pub memory: Option<Memory>,
    pub heap: Option<pymalloc::Census>,
}

impl Watch {
    pub fn record(&mut self, time: SystemTime, memory: Option<Memory>, heap: Option<pymalloc::Census>) {
        if let Some(memory) = memory {
            self.memory_at_start.get_or_insert(memory);
            self.private_memory.push(time, memory.anonymous + memory.swap);
            self.memory = Some(memory);
        }
        if heap.is_some() {
            self.heap = heap;
        }
    }
}

impl Standing {
    /// `process`'s standing from what was recorded of it: its memory in
    /// `watch`, its censuses in `types`, of which the `top` types that grew
    /// most are kept.
    pub fn new(
        process: ProcessInfo,
        in_container: bool,
        exited: bool,
        watch: &Watch,
        types: &TypeHistory,
        first_touch: Option<&Snapshot>,
        top: usize,
    ) -> Self {
        let trends = types.trends();
        let census = types.latest();
        let start = types.first_counts();
        let mut rows: Vec<TypeStanding> = census
            .map(|(_, counts)| {
                counts
                    .iter()
                    .map(|(name, &count)| TypeStanding {
                        name: name.clone(),
                        count,
                        change: count as i64 - start.and_then(|s| s.get(name)).copied().unwrap_or(0) as i64,
                        trend: trends.get(name).copied(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let growing_rate = |t: &TypeStanding| t.trend.filter(|t| t.verdict == Verdict::Growing).map(|t| t.slope);
        rows.sort_by(|a, b| {
            growing_rate(b)
                .partial_cmp(&growing_rate(a))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(b.change.cmp(&a.change))
                .then(b.count.cmp(&a.count))
                .then_with(|| a.name.cmp(&b.name))
        });
        // What grew: types that hold as many objects as ever are not news.
        rows.retain(|t| t.change > 0 || growing_rate(t).is_some());
        rows.truncate(top);
        Self {
            process,
            in_container,
            exited,
            watched_since: watch.private_memory.first().map_or_else(SystemTime::now, |(t, _)| t),
            memory: watch.memory,
            memory_at_start: watch.memory_at_start,
            heap: watch.heap,
            trend: watch.private_memory.trend(),
            growing_since: watch.private_memory.growing_since(),
            census_at: census.map(|(time, _)| time),
            types: rows,
            first_touched: first_touch.map_or_else(Vec::new, |touched| {
                let mut lines: Vec<(Traceback, Stat)> = touched.group(GroupBy::Lineno).stats.into_iter().collect();
                lines.sort_by(|a, b| b.1.size.cmp(&a.1.size).then_with(|| a.0.cmp(&b.0)));
                lines.truncate(top);
                lines
            }),
        }
    }
}

/// A process's verdict as host reports say it: its memory shrinks, where
/// a site's or a type's is freed.
pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Freed => "shrinking",
        other => other.name(),
    }
}

/// Orders `processes` for the report: growing ones first, fastest first;
/// then churning, on a plateau, shrinking, and those without a verdict yet;
/// each by its slope, then by pid.
pub fn rank(processes: &mut [Standing]) {
    let class = |s: &Standing| match s.trend.map(|t| t.verdict) {
        Some(Verdict::Growing) => 0,
        Some(Verdict::Churn) => 1,
        Some(Verdict::Plateau) => 2,
        Some(Verdict::Freed) => 3,
        None => 4,
    };
    let slope = |s: &Standing| s.trend.map_or(0.0, |t| t.slope);
    processes.sort_by(|a, b| {
        class(a)
            .cmp(&class(b))
            .then(slope(b).partial_cmp(&slope(a)).unwrap_or(std::cmp::Ordering::Equal))
            .then(a.process.pid.cmp(&b.process.pid))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn standing(pid: u32, series: &[u64]) -> Standing {
        let mut watch = Watch::default();
        for (i, &v) in series.iter().enumerate() {
            let memory = Memory { rss: v, anonymous: v, swap: 0 };
            watch.record(SystemTime::UNIX_EPOCH + Duration::from_secs(i as u64 * 10), Some(memory), None);
        }
        let info = ProcessInfo { pid, ns_pid: pid, comm: "python".into(), interpreter: None, cgroup: None };
        Standing::new(info, false, false, &watch, &TypeHistory::default(), None, 10)
    }

    #[test]
    fn growing_processes_come_first_fastest_first() {
        let mut processes = vec![
            standing(1, &[100; 8]),
            standing(2, &[100, 200, 300, 400, 500, 600, 700, 800]),
            standing(3, &[100, 900, 100, 900, 100, 900, 100, 900]),
            standing(4, &[100, 300, 500, 700, 900, 1100, 1300, 1500]),
            standing(5, &[100, 200]),
        ];
        rank(&mut processes);
        let order: Vec<u32> = processes.iter().map(|p| p.process.pid).collect();
        assert_eq!(order, [4, 2, 3, 1, 5]);
        assert_eq!(processes[0].growing_since, Some(SystemTime::UNIX_EPOCH));
        assert_eq!(processes[0].memory_at_start.map(|m| m.rss), Some(100));
        assert_eq!(processes[3].trend.map(|t| t.verdict), Some(Verdict::Plateau));
        assert_eq!(processes[2].trend.map(|t| t.verdict), Some(Verdict::Churn));
    }
}
