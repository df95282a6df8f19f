//! Host mode's `--escalate`: which watched process to trace for a while,
//! with which tier, and what that cost it. A process whose private memory
//! has been growing for [`GROWING_FOR`] reports is traced for `--window`
//! seconds, one process at a time and each at most once: by its growing
//! class's births (`--type`, the targeted tier) when the type growing
//! fastest is a class of its own (a qualified name, `module.Class`), or by
//! exact tracing (every allocation, tracemalloc's report) when what grows
//! is built-in objects or not objects at all. The window's cost is its
//! probe hits (the kernel's run counts of memtrace's programs, only this
//! process being probed) times the cost of a hit measured by the bench.

use std::{collections::BTreeSet, time::Duration};

use crate::report::{
    HostReport,
    host::Standing,
    trend::{Verdict, WINDOW},
};

/// Reports a process must have been growing for before it is traced: a
/// whole verdict window, so that a leak, not a busy moment, is traced.
pub const GROWING_FOR: usize = WINDOW;

/// What one probe hit costs the traced process, in nanoseconds: memtrace's
/// defaults on the pyperformance subset, BENCHMARKS.md ("ns / hit", the
/// geomean over the subset). Kept with the bench's figures.
pub const NS_PER_HIT: f64 = 2245.0;

/// How a process is traced during its window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The births of one class (`--type`).
    Type(String),
    /// Every allocation.
    Exact,
}

impl Tier {
    pub fn describe(&self) -> String {
        match self {
            Tier::Type(name) => format!("the births of {name} (--type {name})"),
            Tier::Exact => "exact tracing of every allocation".into(),
        }
    }
}

/// The process to escalate after `report`, if any: the fastest growing one
/// that has grown for `GROWING_FOR` reports of `interval`, not escalated
/// before, still running; with the tier that fits what grows in it.
pub fn candidate(report: &HostReport, escalated: &BTreeSet<u32>, interval: Duration) -> Option<(u32, Tier)> {
    let long_enough = interval * GROWING_FOR as u32;
    let grown_since = report.time.checked_sub(long_enough)?;
    report
        .processes
        .iter()
        .filter(|s| !s.exited && !escalated.contains(&s.process.pid))
        .filter(|s| s.trend.is_some_and(|t| t.verdict == Verdict::Growing))
        .find(|s| s.growing_since.is_some_and(|since| since <= grown_since))
        .map(|s| (s.process.pid, tier_for(s)))
}

/// `--type` for a class of the program's own that grows, exact tracing
/// otherwise.
fn tier_for(standing: &Standing) -> Tier {
    let growing_class =
        standing.types.iter().find(|t| t.trend.is_some_and(|t| t.verdict == Verdict::Growing) && t.name.contains('.'));
    match (standing.process.interpreter.is_some(), growing_class) {
        (true, Some(class)) => Tier::Type(class.name.clone()),
        _ => Tier::Exact,
    }
}

/// The sentence a window's report ends with: how long, what it probed, and
/// what that cost the process.
pub fn cost_note(tier: &Tier, window: Duration, hits: u64) -> String {
    let cost = Duration::from_secs_f64(hits as f64 * NS_PER_HIT / 1e9);
    let share = cost.as_secs_f64() / window.as_secs_f64().max(1e-9);
    format!(
        "escalated from host mode (--escalate) for {:.0} s: {}; {hits} probe hits, about {:.0} ms of the process's time ({:.1}% of the window) at {NS_PER_HIT:.0} ns per hit (BENCHMARKS.md)",
        window.as_secs_f64(),
        tier.describe(),
        cost.as_secs_f64() * 1e3,
        100.0 * share,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{
        ProcessInfo,
        host::TypeStanding,
        trend::{Trend, Verdict},
    };
    use std::time::SystemTime;

    fn standing(pid: u32, since_secs: Option<u64>, types: Vec<TypeStanding>) -> Standing {
        let growing = Trend { verdict: Verdict::Growing, slope: 1000.0, grew: 7, intervals: 7 };
        Standing {
            process: ProcessInfo {
                pid,
                ns_pid: pid,
                comm: "python".into(),
                interpreter: Some("CPython 3.12.1".into()),
                cgroup: None,
            },
            in_container: false,
            exited: false,
            watched_since: SystemTime::UNIX_EPOCH,
            memory: None,
            memory_at_start: None,
            heap: None,
            trend: since_secs.map(|_| growing),
            growing_since: since_secs.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
            census_at: None,
            types,
            first_touched: vec![],
        }
    }

    #[test]
    fn the_longest_grower_not_escalated_yet_with_its_class() {
        let growing = Some(Trend { verdict: Verdict::Growing, slope: 5.0, grew: 7, intervals: 7 });
        let class = TypeStanding { name: "__main__.Leak".into(), count: 100, change: 100, trend: growing };
        let dict = TypeStanding { name: "dict".into(), count: 100, change: 100, trend: growing };
        let report = |processes| HostReport {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(100),
            sequence: 10,
            is_final: false,
            processes,
            skipped: vec![],
            vanished: vec![],
        };
        let interval = Duration::from_secs(10);
        // Growing for 90 s, 20 s, not at all: only the first has grown for
        // eight reports of 10 s.
        let r = report(vec![
            standing(1, Some(10), vec![class.clone()]),
            standing(2, Some(80), vec![]),
            standing(3, None, vec![]),
        ]);
        assert_eq!(candidate(&r, &BTreeSet::new(), interval), Some((1, Tier::Type("__main__.Leak".into()))));
        assert_eq!(candidate(&r, &BTreeSet::from([1]), interval), None);
        let r = report(vec![standing(4, Some(0), vec![dict])]);
        assert_eq!(candidate(&r, &BTreeSet::new(), interval), Some((4, Tier::Exact)), "a built-in type: exact");
    }

    #[test]
    fn the_note_says_what_the_window_cost() {
        let note = cost_note(&Tier::Exact, Duration::from_secs(60), 1_000_000);
        assert!(
            note.contains("1000000 probe hits, about 2245 ms of the process's time (3.7% of the window)"),
            "{note}"
        );
    }
}
