//! `--format json`: one JSON object per report per process, on one line,
//! for log pipelines, `jq` and programs (memtrace's own tests and bench read
//! memtrace this way), and in host mode one [`JsonHostReport`] per interval
//! after them. [`JsonReport`] is the document, field by field as the README
//! documents it; both read back with serde as well as they write.

use std::{collections::BTreeMap, io::Write, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::{
    HostReport, Report, View, Writer,
    format::type_growth,
    host::{self, Standing},
    model::Counters,
};
use crate::{
    census::{memory::Memory, pymalloc},
    snapshot::{Frame, Stat, StatDiff},
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsonReport {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub pid: u32,
    /// The pid inside the process's own pid namespace (a container's);
    /// equal to `pid` outside one.
    pub ns_pid: u32,
    pub comm: String,
    /// "CPython 3.12.1", or null for a native process.
    pub interpreter: Option<String>,
    /// The process's cgroup v2 path, which names its container; null when
    /// unreadable.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// 1 for the process's first report.
    pub sequence: u32,
    #[serde(rename = "final")]
    pub is_final: bool,
    /// "lineno", "filename" or "traceback": what the rows group by.
    pub group_by: String,
    /// Allocated since attach and not freed, and its change since the
    /// previous report.
    pub outstanding: Size,
    pub outstanding_change: Change,
    /// Allocated since attach, freed or not.
    pub allocated: Size,
    /// Every loss counter by name: what could not be accounted.
    pub losses: BTreeMap<String, u64>,
    /// Counters that are not losses but say how to read the report.
    pub counters: BTreeMap<String, u64>,
    pub notes: Vec<String>,
    /// Whether probes counted allocations; false under `--census-only`,
    /// where the totals and rows are empty.
    pub traced: bool,
    /// The top groups, biggest change first.
    pub rows: Vec<Row>,
    /// The process's memory as the kernel counts it, in bytes.
    pub memory: Option<MemoryJson>,
    /// pymalloc's own count of its live blocks.
    pub heap: Option<HeapJson>,
    /// The object census.
    pub census: Option<CensusJson>,
    /// Where new resident memory was first touched (the free tier).
    #[serde(default)]
    pub first_touch: Option<FirstTouchJson>,
}

/// Resident pages by the group that first touched them, biggest growth
/// first; `size` is bytes, `count` pages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FirstTouchJson {
    pub rows: Vec<Row>,
    /// How faults were chosen for a walk, and what was not charged.
    pub counters: BTreeMap<String, u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryJson {
    pub rss: u64,
    pub anonymous: u64,
    pub swap: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapJson {
    /// Blocks in pymalloc's pools, and their bytes by size class.
    pub blocks: u64,
    pub bytes: u64,
    /// Blocks pymalloc passed to malloc (over 512 bytes).
    pub raw_blocks: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CensusJson {
    /// Objects on the GC's generations (`len(gc.get_objects())`) and on
    /// its permanent generation.
    pub gc_tracked: u64,
    pub gc_permanent: u64,
    /// Objects the GC does not track, found in pymalloc's pools.
    pub untracked: u64,
    pub took_ms: u64,
    /// Why the census is partial, if it is.
    pub incomplete: Vec<String>,
    /// The top types, biggest growth first.
    pub types: Vec<TypeJson>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TypeJson {
    pub name: String,
    pub count: u64,
    /// Since the previous report (since attach, for the first).
    pub change: i64,
    /// Of `count`, those on the GC's lists and those found in the pools.
    pub tracked: u64,
    pub untracked: u64,
    /// `growing`, `plateau`, `churn` or `freed` over the last censuses
    /// (the rule of `trend`), once there are enough; and the slope.
    pub verdict: Option<String>,
    pub slope_objects_per_minute: Option<f64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub size: u64,
    pub count: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub size: i64,
    pub count: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The group as tracemalloc prints it (`app.py:6`).
    pub location: String,
    /// The group's frames, innermost (where the allocation was made) first:
    /// one frame for lineno and filename grouping.
    pub frames: Vec<Frame>,
    pub size: u64,
    pub size_diff: i64,
    pub count: u64,
    pub count_diff: i64,
    /// The group's largest outstanding size at any report since attach
    /// (sampled at reports, not between them); null when unknown.
    #[serde(default)]
    pub peak_at_reports: Option<u64>,
    /// "growing", "plateau", "churn" or "freed" (see report/trend.rs), null
    /// before there are enough reports.
    #[serde(default)]
    pub verdict: Option<String>,
    /// Least-squares slope of the group's outstanding bytes over the last
    /// reports, in bytes per second; null with the verdict.
    #[serde(default)]
    pub slope_bytes_per_second: Option<f64>,
}

impl JsonReport {
    pub fn new(report: &Report, view: View) -> Self {
        let (now, before) = (report.current.total(), report.previous.total());
        let census = report.census.as_ref();
        let named = |counters: &Counters| counters.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        Self {
            time: epoch_seconds(report.time),
            pid: report.process.pid,
            ns_pid: report.process.ns_pid,
            comm: report.process.comm.clone(),
            interpreter: report.process.interpreter.clone(),
            cgroup: report.process.cgroup.clone(),
            sequence: report.sequence,
            is_final: report.is_final,
            group_by: view.group_by.name().to_owned(),
            outstanding: Size::of(now),
            outstanding_change: Change {
                size: now.size as i64 - before.size as i64,
                count: now.count as i64 - before.count as i64,
            },
            allocated: Size::of(report.allocated),
            losses: named(&report.losses),
            counters: named(&report.counters),
            notes: report.notes.clone(),
            traced: report.traced,
            rows: {
                let trends = report.history.trends(view.group_by);
                let rows = report.rows(view.group_by);
                rows.iter()
                    .take(view.top)
                    .map(|diff| {
                        let trend = trends.get(&diff.traceback);
                        Row {
                            peak_at_reports: report.history.peak(view.group_by, &diff.traceback),
                            verdict: trend.map(|t| t.verdict.name().to_owned()),
                            slope_bytes_per_second: trend.map(|t| t.slope),
                            ..Row::of(diff)
                        }
                    })
                    .collect()
            },
            memory: census.and_then(|c| c.now.memory).map(MemoryJson::of),
            heap: census.and_then(|c| c.now.heap).map(HeapJson::of),
            first_touch: report.first_touch.as_ref().map(|touch| FirstTouchJson {
                rows: touch.rows(view.group_by).iter().take(view.top).map(Row::of).collect(),
                counters: named(&touch.counters),
            }),
            census: census.and_then(|c| {
                let objects = c.now.objects.as_ref()?;
                let types = type_growth(objects, c.before.objects.as_ref())
                    .into_iter()
                    .take(view.types)
                    .map(|row| {
                        let found = objects.types.iter().find(|t| t.name == row.name);
                        let trend = report.type_trends.get(&row.name);
                        TypeJson {
                            verdict: trend.map(|t| t.verdict.name().to_owned()),
                            slope_objects_per_minute: trend.map(|t| t.slope * 60.0),
                            tracked: found.map_or(0, |t| t.tracked),
                            untracked: found.map_or(0, |t| t.untracked),
                            name: row.name,
                            count: row.count,
                            change: row.change,
                        }
                    })
                    .collect();
                Some(CensusJson {
                    gc_tracked: objects.gc_tracked,
                    gc_permanent: objects.gc_permanent,
                    untracked: objects.untracked,
                    took_ms: objects.took.as_millis() as u64,
                    incomplete: objects.incomplete.clone(),
                    types,
                })
            }),
        }
    }
}

/// Host mode's report, one line per interval after the processes' own
/// lines; `"report": "host"` tells it from theirs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsonHostReport {
    /// Always "host".
    pub report: String,
    pub time: f64,
    pub sequence: u32,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub watched: usize,
    pub in_containers: usize,
    /// Ranked: growing first, fastest first.
    pub processes: Vec<JsonStanding>,
    pub skipped: Vec<JsonSkipped>,
    /// Processes that exited before they could be read, since the previous
    /// host report.
    pub missed: Vec<JsonSkipped>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsonStanding {
    pub pid: u32,
    pub ns_pid: u32,
    pub comm: String,
    pub interpreter: Option<String>,
    pub cgroup: Option<String>,
    pub in_container: bool,
    pub exited: bool,
    /// Of its private memory (anonymous and swapped): "growing",
    /// "plateau", "churn" or "shrinking"; null before enough reports.
    pub verdict: Option<String>,
    pub slope_bytes_per_second: Option<f64>,
    /// Seconds since the Unix epoch, while growing.
    pub growing_since: Option<f64>,
    pub watched_since: f64,
    pub memory: Option<MemoryJson>,
    pub memory_at_start: Option<MemoryJson>,
    pub heap: Option<HeapJson>,
    /// When its latest object census was taken.
    pub census_time: Option<f64>,
    /// Its top types, growing ones first; `change` is since its first census.
    pub types: Vec<JsonTypeStanding>,
    /// Where its resident pages were first touched, by line, the most first.
    #[serde(default)]
    pub first_touched: Vec<JsonTouched>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsonTouched {
    pub location: String,
    pub bytes: u64,
    pub pages: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsonTypeStanding {
    pub name: String,
    pub count: u64,
    pub change: i64,
    pub verdict: Option<String>,
    pub slope_objects_per_minute: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonSkipped {
    pub pid: u32,
    pub comm: String,
    pub reason: String,
}

impl JsonHostReport {
    pub fn new(report: &HostReport, view: View) -> Self {
        let standing = |s: &Standing| JsonStanding {
            pid: s.process.pid,
            ns_pid: s.process.ns_pid,
            comm: s.process.comm.clone(),
            interpreter: s.process.interpreter.clone(),
            cgroup: s.process.cgroup.clone(),
            in_container: s.in_container,
            exited: s.exited,
            verdict: s.trend.map(|t| host::verdict_name(t.verdict).to_owned()),
            slope_bytes_per_second: s.trend.map(|t| t.slope),
            growing_since: s.growing_since.map(epoch_seconds),
            watched_since: epoch_seconds(s.watched_since),
            memory: s.memory.map(MemoryJson::of),
            memory_at_start: s.memory_at_start.map(MemoryJson::of),
            heap: s.heap.map(HeapJson::of),
            census_time: s.census_at.map(epoch_seconds),
            types: s
                .types
                .iter()
                .map(|t| JsonTypeStanding {
                    name: t.name.clone(),
                    count: t.count,
                    change: t.change,
                    verdict: t.trend.map(|t| t.verdict.name().to_owned()),
                    slope_objects_per_minute: t.trend.map(|t| t.slope * 60.0),
                })
                .collect(),
            first_touched: s
                .first_touched
                .iter()
                .map(|(line, stat)| JsonTouched { location: line.to_string(), bytes: stat.size, pages: stat.count })
                .collect(),
        };
        Self {
            report: "host".into(),
            time: epoch_seconds(report.time),
            sequence: report.sequence,
            is_final: report.is_final,
            watched: report.processes.len(),
            in_containers: report.in_containers(),
            processes: report.processes.iter().take(view.top).map(standing).collect(),
            skipped: report.skipped.iter().map(JsonSkipped::of).collect(),
            missed: report.vanished.iter().map(JsonSkipped::of).collect(),
        }
    }
}

impl JsonSkipped {
    fn of(s: &host::Skipped) -> Self {
        Self { pid: s.pid, comm: s.comm.clone(), reason: s.reason.clone() }
    }
}

fn epoch_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl MemoryJson {
    fn of(m: Memory) -> Self {
        Self { rss: m.rss, anonymous: m.anonymous, swap: m.swap }
    }
}

impl HeapJson {
    fn of(h: pymalloc::Census) -> Self {
        Self { blocks: h.blocks, bytes: h.bytes, raw_blocks: h.raw_blocks }
    }
}

impl Size {
    fn of(stat: Stat) -> Self {
        Self { size: stat.size, count: stat.count }
    }
}

impl Row {
    fn of(diff: &StatDiff) -> Self {
        Self {
            location: diff.traceback.to_string(),
            frames: diff.traceback.0.clone(),
            size: diff.size,
            size_diff: diff.size_diff,
            count: diff.count,
            count_diff: diff.count_diff,
            peak_at_reports: None,
            verdict: None,
            slope_bytes_per_second: None,
        }
    }
}

pub struct JsonWriter<W> {
    out: W,
    view: View,
}

impl<W: Write> JsonWriter<W> {
    pub fn new(out: W, view: View) -> Self {
        Self { out, view }
    }
}

impl<W: Write> Writer for JsonWriter<W> {
    fn write(&mut self, report: &Report) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, &JsonReport::new(report, self.view))?;
        writeln!(self.out)?;
        self.out.flush()
    }

    fn write_host(&mut self, report: &HostReport) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, &JsonHostReport::new(report, self.view))?;
        writeln!(self.out)?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{report::text::tests::sample, snapshot::GroupBy};

    fn view(group_by: GroupBy, top: usize) -> View {
        View { group_by, top, types: 10 }
    }

    #[test]
    fn one_line_per_report_that_reads_back() {
        let mut out = Vec::new();
        let mut writer = JsonWriter::new(&mut out, view(GroupBy::Traceback, 10));
        writer.write(&sample(false)).unwrap();
        writer.write(&sample(true)).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first: JsonReport = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first, JsonReport::new(&sample(false), view(GroupBy::Traceback, 10)));
        assert!(!first.is_final && serde_json::from_str::<JsonReport>(lines[1]).unwrap().is_final);
        assert_eq!((first.pid, first.sequence, first.time), (24733, 2, 1_764_571_025.0));
        assert_eq!(first.outstanding, Size { size: 3_708_040, count: 51_735 });
        assert_eq!(first.outstanding_change, Change { size: 1_857_976, count: 26_233 });
        assert_eq!(first.losses["python-reads"], 3);
        assert_eq!(first.counters["unknown-frees"], 1);
        // The leak first; its innermost frame first; printed as its oldest.
        let leak = &first.rows[0];
        assert_eq!((leak.location.as_str(), leak.count, leak.count_diff), ("/w/app.py:33", 51_734, 26_233));
        let lines: Vec<u32> = leak.frames.iter().map(|f| f.lineno).collect();
        assert_eq!(lines, [16, 27, 33]);
        assert_eq!(leak.frames[0].function.as_deref(), Some("handle_request"));
        assert_eq!(leak.frames[0].first_lineno, Some(14));
        assert!(text.contains(r#""function":"handle_request","first_lineno":14,"native":null"#), "{text}");
        assert_eq!(first.rows.len(), 3);
        assert!(text.contains(r#""final":true"#), "{text}");
    }

    #[test]
    fn rows_follow_the_grouping_and_the_top() {
        let by_line = JsonReport::new(&sample(false), view(GroupBy::Lineno, 2));
        let locations: Vec<&str> = by_line.rows.iter().map(|r| r.location.as_str()).collect();
        assert_eq!(locations, ["/w/app.py:16", "malloc+0x1c (libc.so.6):0"]);
        assert_eq!(by_line.group_by, "lineno");
        assert_eq!(by_line.rows[1].size_diff, -64);
        let native = by_line.rows[1].frames[0].native.as_ref().expect("a native frame's location");
        assert_eq!(
            (native.module.as_str(), native.address, native.offset),
            ("/usr/lib/x86_64-linux-gnu/libc.so.6", 0x7f00_0009_a01c, 0x9a01c)
        );
    }
}
