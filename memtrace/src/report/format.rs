//! The formats Python developers already know, byte for byte:
//! tracemalloc's `_format_size` and `StatisticDiff.__str__`, and objgraph's
//! `show_growth()` lines, so that memtrace's lines read exactly like theirs.

use std::collections::{HashMap, HashSet};

use crate::{census::ObjectCensus, snapshot::StatDiff};

/// tracemalloc's `_format_size(size, sign)`: B below 10 KiB, then KiB, MiB,
/// ..., with one decimal when fewer than 100 units.
pub fn format_size(size: f64, sign: bool) -> String {
    let mut size = size;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if size.abs() < 100.0 && unit != "B" {
            return if sign { format!("{size:+.1} {unit}") } else { format!("{size:.1} {unit}") };
        }
        if size.abs() < 10.0 * 1024.0 || unit == "TiB" {
            return if sign { format!("{size:+.0} {unit}") } else { format!("{size:.0} {unit}") };
        }
        size /= 1024.0;
    }
    unreachable!("the TiB branch always returns")
}

/// `path:line: size=2235 KiB (+2235 KiB), count=29981 (+29981), average=76 B`
pub fn stat_diff_line(diff: &StatDiff) -> String {
    let mut line = format!(
        "{}: size={} ({}), count={} ({:+})",
        diff.traceback,
        format_size(diff.size as f64, false),
        format_size(diff.size_diff as f64, true),
        diff.count,
        diff.count_diff
    );
    if diff.count != 0 {
        line.push_str(&format!(", average={}", format_size(diff.size as f64 / diff.count as f64, false)));
    }
    line
}

/// A type's count now and its change, as the census compares them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeGrowth {
    pub name: String,
    pub count: u64,
    pub change: i64,
}

/// Every type of `now` or `before`, biggest growth first, then biggest
/// count (objgraph's `show_growth` order, and what it leaves out: nothing).
pub fn type_growth(now: &ObjectCensus, before: Option<&ObjectCensus>) -> Vec<TypeGrowth> {
    // By name: a process may have thousands of types, compared every report.
    let before_counts: HashMap<&str, u64> =
        before.map_or_else(HashMap::new, |b| b.types.iter().map(|t| (t.name.as_str(), t.count())).collect());
    let count_before = |name: &str| before_counts.get(name).copied().unwrap_or(0);
    let mut rows: Vec<TypeGrowth> = now
        .types
        .iter()
        .map(|t| TypeGrowth {
            name: t.name.clone(),
            count: t.count(),
            change: t.count() as i64 - count_before(&t.name) as i64,
        })
        .collect();
    if let Some(before) = before {
        let now_names: HashSet<&str> = now.types.iter().map(|t| t.name.as_str()).collect();
        let gone = before.types.iter().filter(|b| !now_names.contains(b.name.as_str()));
        rows.extend(gone.map(|b| TypeGrowth { name: b.name.clone(), count: 0, change: -(b.count() as i64) }));
    }
    rows.sort_by(|a, b| b.change.cmp(&a.change).then(b.count.cmp(&a.count)).then_with(|| a.name.cmp(&b.name)));
    rows
}

/// objgraph's `show_growth()` lines: `'%-*s%9d %+9d' % (width, name, count, delta)`,
/// the names padded to the longest shown.
pub fn growth_lines(rows: &[TypeGrowth]) -> Vec<String> {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    rows.iter().map(|r| format!("{:<width$}{:>9} {:>+9}", r.name, r.count, r.change)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Frame, Traceback};

    #[test]
    fn sizes_match_tracemalloc() {
        // Expected values printed by CPython 3.12's tracemalloc._format_size.
        let cases: &[(f64, &str, &str)] = &[
            (0.0, "0 B", "+0 B"),
            (99.5, "100 B", "+100 B"),
            (10239.0, "10239 B", "+10239 B"),
            (10240.0, "10.0 KiB", "+10.0 KiB"),
            (10752.0, "10.5 KiB", "+10.5 KiB"),
            (102400.0, "100 KiB", "+100 KiB"),
            (5819596.8, "5683 KiB", "+5683 KiB"),
            (-5000.0, "-5000 B", "-5000 B"),
            (133.5, "134 B", "+134 B"),
            (134.5, "134 B", "+134 B"),
            (102348.8, "100.0 KiB", "+100.0 KiB"),
        ];
        for &(size, plain, signed) in cases {
            assert_eq!(format_size(size, false), plain, "{size}");
            assert_eq!(format_size(size, true), signed, "{size}");
        }
    }

    #[test]
    fn line_matches_tracemalloc() {
        let diff = StatDiff {
            traceback: Traceback(vec![Frame::at("/tmp/tm.py", 4)]),
            size: 141_000,
            size_diff: 141_000,
            count: 1001,
            count_diff: 1001,
        };
        assert_eq!(stat_diff_line(&diff), "/tmp/tm.py:4: size=138 KiB (+138 KiB), count=1001 (+1001), average=141 B");
    }

    #[test]
    fn growth_reads_like_objgraph() {
        use crate::census::TypeCount;
        let census = |types: &[(&str, u64)]| ObjectCensus {
            types: types.iter().map(|&(n, c)| TypeCount { name: n.into(), tracked: c, untracked: 0 }).collect(),
            ..ObjectCensus::default()
        };
        let before = census(&[("dict", 5000), ("function", 3000), ("weakref", 10)]);
        let now = census(&[("dict", 5123), ("function", 3000), ("MyObject", 10000)]);
        let rows = type_growth(&now, Some(&before));
        // Printed by objgraph 3.6's show_growth() format string.
        assert_eq!(
            growth_lines(&rows),
            [
                "MyObject    10000    +10000",
                "dict         5123      +123",
                "function     3000        +0",
                "weakref         0       -10",
            ]
        );
        assert_eq!(type_growth(&now, None)[0], TypeGrowth { name: "MyObject".into(), count: 10000, change: 10000 });
    }
}
