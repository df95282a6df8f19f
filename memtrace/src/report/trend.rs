//! Verdicts on sites and on object types: whether a group's outstanding
//! bytes (or a type's count of objects) are growing, on a plateau, churning
//! or being freed, decided from the last [`WINDOW`] reports, and each
//! group's peak at reports since attach. The rule is plain arithmetic on
//! (time, value) points so that any mode that takes periodic snapshots or
//! censuses (one process, or host mode later) shares it.
//!
//! The rule, over the last `WINDOW` reports (K = 8) of one group:
//! - no verdict with fewer than [`MIN_REPORTS`] (4) points: three intervals
//!   are the least that tell a trend from one busy moment;
//! - **freed**: the group has nothing outstanding now, or it shrank in at
//!   least [`STEADY_SHARE`] (3/4) of the intervals with a negative slope;
//! - **growing**: the least-squares slope of bytes over seconds is positive
//!   and the group grew in at least 3/4 of the intervals;
//! - **churn**: it both grew and shrank within the window (busy, not
//!   steadily retaining);
//! - **plateau**: anything else (unchanged, or an occasional step).
//!
//! A group that churns grows in about half its intervals and cannot pass
//! the 3/4 bar; one that leaks on every interval passes it even when it
//! also frees some of what it allocates.

use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

use crate::{
    census::ObjectCensus,
    snapshot::{GroupBy, Snapshot, Traceback},
};

/// Reports a verdict looks back over (K).
pub const WINDOW: usize = 8;
/// Reports needed before any verdict.
pub const MIN_REPORTS: usize = 4;
/// Share of intervals that must move one way for "growing" or "freed".
pub const STEADY_SHARE: f64 = 0.75;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Growing,
    Plateau,
    Churn,
    Freed,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Growing => "growing",
            Verdict::Plateau => "plateau",
            Verdict::Churn => "churn",
            Verdict::Freed => "freed",
        }
    }
}

/// One group's trend over the window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trend {
    pub verdict: Verdict,
    /// Least-squares slope of outstanding bytes, per second.
    pub slope: f64,
    /// Intervals of the window in which the group grew, and their number.
    pub grew: usize,
    pub intervals: usize,
}

/// The verdict on (seconds, outstanding bytes) points, oldest first.
pub fn trend(points: &[(f64, u64)]) -> Option<Trend> {
    if points.len() < MIN_REPORTS {
        return None;
    }
    let intervals = points.len() - 1;
    let steps = points.windows(2).map(|w| w[1].1.cmp(&w[0].1));
    let grew = steps.clone().filter(|s| s.is_gt()).count();
    let shrank = steps.filter(|s| s.is_lt()).count();
    let slope = slope(points);
    let steady = |n: usize| n as f64 >= STEADY_SHARE * intervals as f64;
    let verdict = if points.last().is_some_and(|p| p.1 == 0) || (steady(shrank) && slope < 0.0) {
        Verdict::Freed
    } else if steady(grew) && slope > 0.0 {
        Verdict::Growing
    } else if grew > 0 && shrank > 0 {
        Verdict::Churn
    } else {
        Verdict::Plateau
    };
    Some(Trend { verdict, slope, grew, intervals })
}

fn slope(points: &[(f64, u64)]) -> f64 {
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, y) in points {
        num += (t - mean_t) * (y as f64 - mean_y);
        den += (t - mean_t) * (t - mean_t);
    }
    if den == 0.0 { 0.0 } else { num / den }
}

/// What one process's reports so far say beyond the current snapshot: its
/// last `WINDOW` snapshots and every group's peak at reports. Peaks are
/// sampled when reports are taken, so a group that rose and fell between
/// two reports has a lower peak here than it had.
#[derive(Clone, Debug, Default)]
pub struct History {
    window: VecDeque<(SystemTime, Snapshot)>,
    /// Per grouping, as `GroupBy::ALL` orders them.
    peaks: [HashMap<Traceback, u64>; 3],
}

impl History {
    /// Adds the snapshot of a report taken at `time`.
    pub fn push(&mut self, time: SystemTime, snapshot: &Snapshot) {
        for (group_by, peaks) in GroupBy::ALL.into_iter().zip(&mut self.peaks) {
            for (key, stat) in snapshot.group(group_by).stats {
                let peak = peaks.entry(key).or_default();
                *peak = (*peak).max(stat.size);
            }
        }
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back((time, snapshot.clone()));
    }

    /// The largest outstanding size of `key`'s group at any report.
    pub fn peak(&self, group_by: GroupBy, key: &Traceback) -> Option<u64> {
        self.peaks[index(group_by)].get(key).copied()
    }

    /// Every group's trend over the window, for groups that have one.
    pub fn trends(&self, group_by: GroupBy) -> HashMap<Traceback, Trend> {
        let Some((start, _)) = self.window.front() else { return HashMap::new() };
        let columns: Vec<(f64, HashMap<Traceback, u64>)> = self
            .window
            .iter()
            .map(|(time, snapshot)| {
                let secs = time.duration_since(*start).unwrap_or_default().as_secs_f64();
                (secs, snapshot.group(group_by).stats.into_iter().map(|(k, s)| (k, s.size)).collect())
            })
            .collect();
        let keys: std::collections::HashSet<&Traceback> = columns.iter().flat_map(|(_, c)| c.keys()).collect();
        keys.into_iter()
            .filter_map(|key| {
                let points: Vec<(f64, u64)> =
                    columns.iter().map(|(t, c)| (*t, c.get(key).copied().unwrap_or(0))).collect();
                trend(&points).map(|t| (key.clone(), t))
            })
            .collect()
    }
}

/// One process's last `WINDOW` censuses, as object counts by type name.
#[derive(Clone, Debug, Default)]
pub struct TypeHistory {
    window: VecDeque<(SystemTime, HashMap<String, u64>)>,
    /// The first census's counts, which host reports count growth from.
    first: Option<HashMap<String, u64>>,
}

impl TypeHistory {
    pub fn push(&mut self, time: SystemTime, objects: &ObjectCensus) {
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        let counts: HashMap<String, u64> = objects.types.iter().map(|t| (t.name.clone(), t.count())).collect();
        self.first.get_or_insert_with(|| counts.clone());
        self.window.push_back((time, counts));
    }

    /// The latest census: when it was taken, and its counts by type.
    pub fn latest(&self) -> Option<(SystemTime, &HashMap<String, u64>)> {
        self.window.back().map(|(time, counts)| (*time, counts))
    }

    pub fn first_counts(&self) -> Option<&HashMap<String, u64>> {
        self.first.as_ref()
    }

    /// Every type's trend over the window (its slope in objects per second).
    pub fn trends(&self) -> HashMap<String, Trend> {
        let Some((start, _)) = self.window.front() else { return HashMap::new() };
        let names: std::collections::HashSet<&String> = self.window.iter().flat_map(|(_, c)| c.keys()).collect();
        names
            .into_iter()
            .filter_map(|name| {
                let points: Vec<(f64, u64)> = self
                    .window
                    .iter()
                    .map(|(time, counts)| {
                        let secs = time.duration_since(*start).unwrap_or_default().as_secs_f64();
                        (secs, counts.get(name).copied().unwrap_or(0))
                    })
                    .collect();
                trend(&points).map(|t| (name.clone(), t))
            })
            .collect()
    }
}

/// Points a [`SeriesHistory`] keeps: an hour at host mode's 10 s interval.
pub const SERIES_POINTS: usize = 360;

/// One measure's history (a process's private memory, in host mode): the
/// last [`SERIES_POINTS`] (time, value) points. Its trend is the rule's,
/// over the last `WINDOW` points; [`SeriesHistory::growing_since`] looks
/// further back, for how long the growth has held.
#[derive(Clone, Debug, Default)]
pub struct SeriesHistory {
    points: VecDeque<(SystemTime, u64)>,
}

impl SeriesHistory {
    pub fn push(&mut self, time: SystemTime, value: u64) {
        if self.points.len() == SERIES_POINTS {
            self.points.pop_front();
        }
        self.points.push_back((time, value));
    }

    pub fn first(&self) -> Option<(SystemTime, u64)> {
        self.points.front().copied()
    }

    /// The trend over the last `WINDOW` points.
    pub fn trend(&self) -> Option<Trend> {
        let recent = self.points.len().saturating_sub(WINDOW);
        trend(&Self::seconds(self.points.range(recent..)))
    }

    /// When a growing measure started growing: the oldest point from which
    /// every stretch of `WINDOW` points up to now is itself growing, so a
    /// leak that held for an hour says so even though its verdict only
    /// looks at the last window. None unless the latest window grows.
    pub fn growing_since(&self) -> Option<SystemTime> {
        let points: Vec<(SystemTime, u64)> = self.points.iter().copied().collect();
        let growing = |from: usize| {
            let to = (from + WINDOW).min(points.len());
            trend(&Self::seconds(points[from..to].iter())).is_some_and(|t| t.verdict == Verdict::Growing)
        };
        let last = points.len().checked_sub(WINDOW.min(points.len()))?;
        if !growing(last) {
            return None;
        }
        let mut since = last;
        while since > 0 && growing(since - 1) {
            since -= 1;
        }
        Some(points[since].0)
    }

    /// Seconds since the first of `points`, for the rule.
    fn seconds<'p>(points: impl Iterator<Item = &'p (SystemTime, u64)>) -> Vec<(f64, u64)> {
        let mut start = None;
        points
            .map(|&(time, value)| {
                let start = *start.get_or_insert(time);
                (time.duration_since(start).unwrap_or_default().as_secs_f64(), value)
            })
            .collect()
    }
}

fn index(group_by: GroupBy) -> usize {
    GroupBy::ALL.iter().position(|g| *g == group_by).expect("ALL lists every grouping")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Frame, Stat};

    fn verdict(sizes: &[u64]) -> Option<Verdict> {
        let points: Vec<(f64, u64)> = sizes.iter().enumerate().map(|(i, &s)| (i as f64, s)).collect();
        trend(&points).map(|t| t.verdict)
    }

    #[test]
    fn the_rule_on_plain_series() {
        assert_eq!(verdict(&[100, 200, 300]), None, "too few reports");
        assert_eq!(verdict(&[100, 200, 300, 400, 500]), Some(Verdict::Growing));
        // A leak that also frees now and then is still growing.
        assert_eq!(verdict(&[100, 200, 300, 250, 400, 500, 600, 700]), Some(Verdict::Growing));
        assert_eq!(verdict(&[0, 100_000, 0, 100_000, 100_000, 0, 100_000, 100_000]), Some(Verdict::Churn));
        assert_eq!(verdict(&[500, 500, 500, 500]), Some(Verdict::Plateau));
        assert_eq!(verdict(&[100, 500, 500, 500, 500]), Some(Verdict::Plateau));
        assert_eq!(verdict(&[500, 400, 300, 200]), Some(Verdict::Freed));
        assert_eq!(verdict(&[500, 500, 500, 0]), Some(Verdict::Freed));
    }

    #[test]
    fn slope_is_bytes_per_second() {
        let points = [(0.0, 1000), (0.5, 1500), (1.0, 2000), (1.5, 2500)];
        let t = trend(&points).unwrap();
        assert!((t.slope - 1000.0).abs() < 1e-9, "{t:?}");
        assert_eq!((t.grew, t.intervals), (3, 3));
    }

    /// A churning group never reads as growing, whatever phase the reports
    /// catch it in: between two reports it can only go up after going down.
    #[test]
    fn churn_never_grows() {
        for phase in 0..64u32 {
            let sizes: Vec<u64> = (0..WINDOW as u32).map(|i| u64::from((phase >> (i % 6)) & 1) * 4096).collect();
            assert_ne!(verdict(&sizes), Some(Verdict::Growing), "{sizes:?}");
        }
    }

    #[test]
    fn a_series_says_since_when_it_grows() {
        let t0 = SystemTime::UNIX_EPOCH;
        let at = |i: u64| t0 + std::time::Duration::from_secs(10 * i);
        let mut series = SeriesHistory::default();
        // Flat for 20 points, then up by 4 KiB every point for 20.
        for i in 0..40u64 {
            series.push(at(i), (1 << 20) + if i < 20 { 0 } else { (i - 19) * 4096 });
        }
        let trend = series.trend().unwrap();
        assert_eq!(trend.verdict, Verdict::Growing);
        assert!((trend.slope - 409.6).abs() < 1e-6, "{trend:?}");
        // The oldest window that grows in 3/4 of its intervals (6 of 7)
        // holds one flat step: it starts at point 18.
        assert_eq!(series.growing_since(), Some(at(18)));
        series.push(at(40), 1 << 20);
        for i in 41..50 {
            series.push(at(i), 1 << 20);
        }
        assert_ne!(series.trend().unwrap().verdict, Verdict::Growing);
        assert_eq!(series.growing_since(), None);
        let mut short = SeriesHistory::default();
        short.push(t0, 1);
        assert_eq!((short.trend(), short.growing_since()), (None, None));
    }

    #[test]
    fn history_keeps_the_window_and_peaks_per_grouping() {
        let tb = |l: u32, outer: u32| Traceback(vec![Frame::at("a.py", l), Frame::at("a.py", outer)]);
        let mut history = History::default();
        let t0 = SystemTime::UNIX_EPOCH;
        for i in 0..10u64 {
            // Line 1 grows from two callers; line 2 rises once and falls.
            let snapshot = Snapshot::from_entries([
                (tb(1, 10), Stat { size: 100 * i, count: i }),
                (tb(1, 11), Stat { size: 100 * i, count: i }),
                (tb(2, 10), Stat { size: if i == 1 { 7000 } else { 10 }, count: 1 }),
            ]);
            history.push(t0 + std::time::Duration::from_secs(i), &snapshot);
        }
        assert_eq!(history.window.len(), WINDOW);
        let line = |l| Traceback(vec![Frame::at("a.py", l)]);
        assert_eq!(history.peak(GroupBy::Lineno, &line(1)), Some(1800));
        assert_eq!(history.peak(GroupBy::Traceback, &tb(1, 10)), Some(900));
        assert_eq!(history.peak(GroupBy::Lineno, &line(2)), Some(7000));
        let trends = history.trends(GroupBy::Lineno);
        assert_eq!(trends[&line(1)].verdict, Verdict::Growing);
        assert!((trends[&line(1)].slope - 200.0).abs() < 1e-9);
        // Its spike at the second report has left the window.
        assert_eq!(trends[&line(2)].verdict, Verdict::Plateau);
    }
}
