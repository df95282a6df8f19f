//! tracemalloc's number formatting, byte for byte: `_format_size` and
//! `StatisticDiff.__str__`, so that memtrace's lines read exactly like the
//! ones Python developers already know.

use crate::snapshot::StatDiff;

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
            traceback: Traceback(vec![Frame { filename: "/tmp/tm.py".into(), lineno: 4 }]),
            size: 141_000,
            size_diff: 141_000,
            count: 1001,
            count_diff: 1001,
        };
        assert_eq!(stat_diff_line(&diff), "/tmp/tm.py:4: size=138 KiB (+138 KiB), count=1001 (+1001), average=141 B");
    }
}
