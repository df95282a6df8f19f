//! The text report, memtrace's default output: a header line (time,
//! process, totals, every loss counter), the notes, then the top-N groups in
//! tracemalloc's `compare_to` format; with traceback grouping, each group's
//! traceback in the layout of tracemalloc's `Traceback.format()`, with the
//! source lines a [`SourceLines`] gives. The census follows: the process's
//! memory, its objects' totals, and its types in objgraph's `show_growth()`
//! format. Without probes (`--census-only`) the census is the report.
//! After the groups, one `growing:` line per group whose verdict is growing
//! (see `trend`), once there are enough reports. In host mode the host
//! report (see `host`) replaces the processes' own: a header counting what
//! is watched, then each process ranked by growth, a few lines each.

use std::{collections::HashMap, io::Write, time::SystemTime};

use super::{
    CensusChange, HostReport, Report, View, Writer,
    format::{format_size, growth_lines, stat_diff_line, type_growth},
    host::Standing,
    model::{Counters, FirstTouch},
    trend::{Trend, Verdict},
};
use crate::snapshot::GroupBy;

/// Source text by file and line, as the process sees its files.
pub trait SourceLines {
    /// Line `lineno` of `filename` in process `pid`, stripped as linecache
    /// + `.strip()` do; None for blank lines and unreadable files.
    fn line(&mut self, pid: u32, filename: &str, lineno: u32) -> Option<String>;
}

pub struct TextWriter<W, S> {
    out: W,
    sources: S,
    view: View,
    /// Host mode: the host report stands for the processes' own reports.
    host: bool,
}

impl<W: Write, S: SourceLines> TextWriter<W, S> {
    pub fn new(out: W, sources: S, view: View) -> Self {
        Self { out, sources, view, host: false }
    }

    /// A writer of host reports (with many processes, one report ranking
    /// them replaces one report each), and of the reports of `--escalate`'s
    /// windows.
    pub fn for_host(out: W, sources: S, view: View) -> Self {
        Self { host: true, ..Self::new(out, sources, view) }
    }

    fn write_traced(&mut self, report: &Report) -> std::io::Result<()> {
        let out = &mut self.out;
        let now = report.current.total();
        let before = report.previous.total();
        let fields = |counters: &Counters| {
            counters.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>().join(" ")
        };
        writeln!(
            out,
            "[{}] memtrace pid {} ({}) {}{}: outstanding {} in {} blocks ({}, {:+} blocks); allocated since attach {} in {} blocks | lost: {} | {}",
            clock_time(report.time),
            report.process.pid,
            report.process.comm,
            if report.is_final { "final report " } else { "report " },
            report.sequence,
            format_size(now.size as f64, false),
            now.count,
            format_size(now.size as f64 - before.size as f64, true),
            now.count as i64 - before.count as i64,
            format_size(report.allocated.size as f64, false),
            report.allocated.count,
            fields(&report.losses),
            fields(&report.counters),
        )?;
        for note in &report.notes {
            writeln!(out, "note: {note}")?;
        }
        let rows = report.rows(self.view.group_by);
        for diff in rows.iter().take(self.view.top) {
            writeln!(out, "{}", stat_diff_line(diff))?;
            if self.view.group_by == GroupBy::Traceback {
                for frame in diff.traceback.oldest_first() {
                    writeln!(out, "  File \"{}\", line {}", frame.filename, frame.lineno)?;
                    if let Some(text) = self.sources.line(report.process.pid, &frame.filename, frame.lineno) {
                        writeln!(out, "    {text}")?;
                    }
                }
            }
        }
        let group_by = self.view.group_by;
        let trends = report.history.trends(group_by);
        let growing = rows
            .iter()
            .filter_map(|d| Some((d, trends.get(&d.traceback)?)))
            .filter(|(_, t)| t.verdict == Verdict::Growing);
        for (diff, trend) in growing.take(self.view.top) {
            writeln!(
                out,
                "growing: {} by {}/s over the last {} reports, in {} of {} intervals; peak at reports {}",
                diff.traceback,
                format_size(trend.slope, true),
                trend.intervals + 1,
                trend.grew,
                trend.intervals,
                format_size(report.history.peak(group_by, &diff.traceback).unwrap_or(diff.size) as f64, false),
            )?;
        }
        Ok(())
    }

    /// The "first touched at" section: the top groups by growth of the
    /// resident pages they first touched.
    fn write_first_touch(&mut self, touch: &FirstTouch) -> std::io::Result<()> {
        let out = &mut self.out;
        let counters = touch.counters.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>();
        writeln!(
            out,
            "first touched at (new resident pages, by the line that first touched them): {}",
            counters.join(" ")
        )?;
        for diff in touch.rows(self.view.group_by).iter().take(self.view.top) {
            writeln!(
                out,
                "{}: {} ({}) in {} pages ({:+})",
                diff.traceback,
                format_size(diff.size as f64, false),
                format_size(diff.size_diff as f64, true),
                diff.count,
                diff.count_diff
            )?;
        }
        Ok(())
    }

    /// `--census-only`'s header: the process and its memory.
    fn write_census_header(&mut self, report: &Report) -> std::io::Result<()> {
        writeln!(
            self.out,
            "[{}] memtrace pid {} ({}) {}census {}",
            clock_time(report.time),
            report.process.pid,
            report.process.comm,
            if report.is_final { "final " } else { "" },
            report.sequence,
        )?;
        for note in &report.notes {
            writeln!(self.out, "note: {note}")?;
        }
        Ok(())
    }

    fn write_census(&mut self, change: &CensusChange, trends: &HashMap<String, Trend>) -> std::io::Result<()> {
        let (now, before) = (&change.now, &change.before);
        let out = &mut self.out;
        let signed = |a: u64, b: Option<u64>| format_size(a as f64 - b.unwrap_or(a) as f64, true);
        if let Some(memory) = now.memory {
            let old = before.memory;
            write!(
                out,
                "memory: rss {} ({}), anonymous {} ({}), swap {}",
                format_size(memory.rss as f64, false),
                signed(memory.rss, old.map(|m| m.rss)),
                format_size(memory.anonymous as f64, false),
                signed(memory.anonymous, old.map(|m| m.anonymous)),
                format_size(memory.swap as f64, false),
            )?;
            if let Some(heap) = now.heap {
                let blocks_before = before.heap.map_or(heap.blocks, |h| h.blocks);
                write!(
                    out,
                    "; Python heap {} in {} blocks ({:+} blocks), {} blocks above pymalloc's limit",
                    format_size(heap.bytes as f64, false),
                    heap.blocks,
                    heap.blocks as i64 - blocks_before as i64,
                    heap.raw_blocks,
                )?;
            }
            writeln!(out)?;
        }
        let Some(objects) = &now.objects else { return Ok(()) };
        let tracked_before = before.objects.as_ref().map_or(objects.gc_tracked, |o| o.gc_tracked);
        let untracked_before = before.objects.as_ref().map_or(objects.untracked, |o| o.untracked);
        writeln!(
            out,
            "objects: {} ({:+}) on the GC's lists, {} permanent; {} ({:+}) untracked in pymalloc's pools; census took {} ms",
            objects.gc_tracked,
            objects.gc_tracked as i64 - tracked_before as i64,
            objects.gc_permanent,
            objects.untracked,
            objects.untracked as i64 - untracked_before as i64,
            objects.took.as_millis(),
        )?;
        for why in &objects.incomplete {
            writeln!(out, "note: census incomplete: {why}")?;
        }
        let rows = type_growth(objects, before.objects.as_ref());
        let shown = &rows[..rows.len().min(self.view.types)];
        for line in growth_lines(shown) {
            writeln!(out, "{line}")?;
        }
        let growing =
            shown.iter().filter_map(|r| Some((r, trends.get(&r.name)?))).filter(|(_, t)| t.verdict == Verdict::Growing);
        for (row, trend) in growing {
            writeln!(
                out,
                "growing: {} by {:+.0} objects/min over the last {} censuses, in {} of {} intervals",
                row.name,
                trend.slope * 60.0,
                trend.intervals + 1,
                trend.grew,
                trend.intervals,
            )?;
        }
        Ok(())
    }
}

impl<W: Write, S: SourceLines> Writer for TextWriter<W, S> {
    fn write(&mut self, report: &Report) -> std::io::Result<()> {
        // In host mode, only an --escalate window's report is printed.
        if self.host && !(report.traced && report.is_final) {
            return Ok(());
        }
        if report.traced {
            self.write_traced(report)?;
        } else {
            self.write_census_header(report)?;
        }
        if let Some(change) = &report.census {
            self.write_census(change, &report.type_trends)?;
        }
        if let Some(touch) = &report.first_touch {
            self.write_first_touch(touch)?;
        }
        writeln!(self.out)?;
        self.out.flush()
    }

    fn write_host(&mut self, report: &HostReport) -> std::io::Result<()> {
        if self.host { self.write_host_report(report) } else { Ok(()) }
    }
}

impl<W: Write, S: SourceLines> TextWriter<W, S> {
    /// The host report: a header counting what is watched, then each
    /// process, fastest growing first, then what could not be watched.
    fn write_host_report(&mut self, report: &HostReport) -> std::io::Result<()> {
        let out = &mut self.out;
        writeln!(
            out,
            "[{}] memtrace host {}report {}: {} watched ({} in containers), {} skipped",
            clock_time(report.time),
            if report.is_final { "final " } else { "" },
            report.sequence,
            plural(report.processes.len(), "process", "processes"),
            report.in_containers(),
            report.skipped.len(),
        )?;
        for (rank, standing) in report.processes.iter().take(self.view.top).enumerate() {
            let process = &standing.process;
            let interpreter = process.interpreter.as_deref().map(|i| format!(" {i}")).unwrap_or_default();
            let exited = if standing.exited { "exited; " } else { "" };
            writeln!(
                out,
                "{:>2}. pid {} ({}){interpreter}: {exited}{}",
                rank + 1,
                process.pid,
                process.comm,
                standing_verdict(standing)
            )?;
            if standing.in_container {
                writeln!(
                    out,
                    "    container: cgroup {}, pid {} inside",
                    process.cgroup.as_deref().unwrap_or("unknown"),
                    process.ns_pid
                )?;
            }
            if let Some(memory) = standing.memory {
                let start = standing.memory_at_start.unwrap_or(memory);
                let change = |now: u64, then: u64| format_size(now as f64 - then as f64, true);
                write!(
                    out,
                    "    memory: rss {} ({} since {}), anonymous {} ({}), swap {}",
                    format_size(memory.rss as f64, false),
                    change(memory.rss, start.rss),
                    clock_time(standing.watched_since),
                    format_size(memory.anonymous as f64, false),
                    change(memory.anonymous, start.anonymous),
                    format_size(memory.swap as f64, false),
                )?;
                if let Some(heap) = standing.heap {
                    write!(out, "; Python heap {} in {} blocks", format_size(heap.bytes as f64, false), heap.blocks)?;
                }
                writeln!(out)?;
            }
            if let Some(at) = standing.census_at {
                let types: Vec<String> = standing
                    .types
                    .iter()
                    .map(|t| {
                        let growing = t
                            .trend
                            .filter(|t| t.verdict == Verdict::Growing)
                            .map(|t| format!(", growing {:+.0}/min", t.slope * 60.0))
                            .unwrap_or_default();
                        format!("{} {} ({:+}{growing})", t.name, t.count, t.change)
                    })
                    .collect();
                let types = if types.is_empty() { "none grew".to_owned() } else { types.join(", ") };
                writeln!(
                    out,
                    "    types since {} (census at {}): {types}",
                    clock_time(standing.watched_since),
                    clock_time(at)
                )?;
            }
            if !standing.first_touched.is_empty() {
                let lines: Vec<String> = standing
                    .first_touched
                    .iter()
                    .map(|(line, stat)| {
                        format!("{line} {} in {} pages", format_size(stat.size as f64, false), stat.count)
                    })
                    .collect();
                writeln!(out, "    first touched at: {}", lines.join(", "))?;
            }
        }
        if report.processes.len() > self.view.top {
            writeln!(out, "    ... and {} more (--top)", report.processes.len() - self.view.top)?;
        }
        for skipped in &report.skipped {
            writeln!(out, "skipped: pid {} ({}): {}", skipped.pid, skipped.comm, skipped.reason)?;
        }
        for vanished in &report.vanished {
            writeln!(out, "missed: pid {} ({}): {}", vanished.pid, vanished.comm, vanished.reason)?;
        }
        writeln!(out)?;
        out.flush()
    }
}

/// "growing by +12.0 KiB/min since 12:29:20, in 7 of 7 intervals", and
/// the other verdicts, of a process's private memory.
fn standing_verdict(standing: &Standing) -> String {
    let Some(trend) = standing.trend else {
        return format!("watching (a verdict needs {} reports)", super::trend::MIN_REPORTS);
    };
    let per_minute = format_size(trend.slope * 60.0, true);
    let intervals = format!("in {} of {} intervals", trend.grew, trend.intervals);
    match trend.verdict {
        Verdict::Growing => {
            let since = standing.growing_since.map(|t| format!(" since {}", clock_time(t))).unwrap_or_default();
            format!("growing by {per_minute}/min{since}, {intervals}")
        }
        Verdict::Churn => format!("churn (grew {intervals}, {per_minute}/min overall)"),
        Verdict::Plateau => "plateau".into(),
        Verdict::Freed => format!("shrinking by {}/min", format_size(-trend.slope * 60.0, false)),
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// HH:MM:SS in local time.
fn clock_time(time: SystemTime) -> String {
    let secs = time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: all zeroes is a valid `tm`, which localtime_r overwrites.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r fills the tm we pass and reads only `secs`.
    unsafe { libc::localtime_r(&secs, &mut tm) };
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        report::ProcessInfo,
        snapshot::{Frame, NativeLocation, Snapshot, Stat, Traceback},
    };

    /// Gives one made-up source line.
    struct OneLine;

    impl SourceLines for OneLine {
        fn line(&mut self, _pid: u32, filename: &str, lineno: u32) -> Option<String> {
            (lineno == 27).then(|| format!("source of {filename}:{lineno}"))
        }
    }

    /// A report of a leak at line 16, one block freed at a native site and
    /// one new at line 20, shared with the JSON writer's tests.
    pub(crate) fn sample(is_final: bool) -> Report {
        let python = |lineno, function: &str, first_lineno| Frame {
            function: Some(function.into()),
            first_lineno: Some(first_lineno),
            ..Frame::at("/w/app.py", lineno)
        };
        let leak = Traceback(vec![python(16, "handle_request", 14), python(27, "main", 25), python(33, "<module>", 1)]);
        let new = Traceback(vec![python(20, "Cache.add", 19), python(33, "<module>", 1)]);
        let native = Traceback(vec![Frame {
            function: Some("malloc".into()),
            native: Some(NativeLocation {
                module: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
                address: 0x7f00_0009_a01c,
                offset: 0x9a01c,
            }),
            ..Frame::at("malloc+0x1c (libc.so.6)", 0)
        }]);
        Report {
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_764_571_025),
            process: ProcessInfo { pid: 24733, ns_pid: 24733, comm: "python".into(), interpreter: Some("CPython 3.12.1".into()), cgroup: Some("/system.slice/app.service".into()) },
            sequence: 2,
            is_final,
            allocated: Stat { size: 5_200_000, count: 42_790 },
            losses: vec![("alloc-map-full".into(), 0), ("python-reads".into(), 3)],
            counters: vec![("unknown-frees".into(), 1)],
            notes: vec!["pymalloc's own count of live blocks changed by +25500 since attach; memtrace's probes account for +25500 (100.0%)".into()],
            traced: true,
            census: None,
            history: Default::default(),
            type_trends: Default::default(),
            first_touch: None,
            current: Snapshot::from_entries([
                (leak.clone(), Stat { size: 3_708_000, count: 51_734 }),
                (new, Stat { size: 40, count: 1 }),
            ]),
            previous: Snapshot::from_entries([
                (leak, Stat { size: 1_850_000, count: 25_501 }),
                (native, Stat { size: 64, count: 1 }),
            ]),
        }
    }

    /// The text of the sample under each grouping is what memtrace printed
    /// before the report model existed, byte for byte (its clock aside).
    #[test]
    fn matches_the_reports_memtrace_always_printed() {
        let mut out = Vec::new();
        for group_by in GroupBy::ALL {
            let report = sample(group_by == GroupBy::Traceback);
            TextWriter::new(&mut out, OneLine, View { group_by, top: 10, types: 10 }).write(&report).unwrap();
        }
        let clock = format!("[{}]", clock_time(sample(false).time));
        let golden = include_str!("testdata/golden.txt").replace("[06:37:05]", &clock);
        assert_eq!(String::from_utf8(out).unwrap(), golden);
    }

    #[test]
    fn top_limits_the_groups() {
        let mut out = Vec::new();
        TextWriter::new(&mut out, OneLine, View { group_by: GroupBy::Lineno, top: 1, types: 10 })
            .write(&sample(false))
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().filter(|l| l.contains(": size=")).count(), 1, "{text}");
    }

    /// The first-touch section: its counters, then the top groups by growth
    /// of their pages, in the order and limit of the view.
    #[test]
    fn first_touch_is_a_section_of_its_own() {
        let mut report = sample(false);
        let line = |lineno| Traceback(vec![Frame::at("/w/app.py", lineno)]);
        report.first_touch = Some(FirstTouch {
            now: Snapshot::from_entries([
                (line(16), Stat { size: 40 * 4096, count: 40 }),
                (line(20), Stat { size: 3 * 4096, count: 3 }),
            ]),
            before: Snapshot::from_entries([(line(16), Stat { size: 10 * 4096, count: 10 })]),
            counters: vec![("growth-faults-walked".into(), 43), ("faults-skipped".into(), 7)],
        });
        let mut out = Vec::new();
        TextWriter::new(&mut out, OneLine, View { group_by: GroupBy::Lineno, top: 1, types: 10 })
            .write(&report)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let section: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("first touched at")).take(2).collect();
        assert_eq!(
            section,
            [
                "first touched at (new resident pages, by the line that first touched them): growth-faults-walked=43 faults-skipped=7",
                "/w/app.py:16: 160 KiB (+120 KiB) in 40 pages (+30)",
            ],
            "{text}"
        );
    }
}
