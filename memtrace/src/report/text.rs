//! The text report: a header line (time, process, totals, every loss
//! counter), optional coverage notes, then the top-N groups in tracemalloc's
//! `compare_to` format; with traceback grouping, each group's traceback in
//! the layout of tracemalloc's `Traceback.format()`.

use std::{collections::HashMap, io::Write, time::SystemTime};

use super::format::{format_size, stat_diff_line};
use crate::snapshot::{GroupBy, Snapshot, Stat};

/// What a report says about its process and the collection itself.
pub struct Header<'a> {
    pub time: SystemTime,
    pub pid: u32,
    pub comm: &'a str,
    pub sequence: u32,
    pub is_final: bool,
    /// Allocated since attach, freed or not.
    pub allocated: Stat,
    /// (name, value) of every loss counter, in print order.
    pub losses: Vec<(&'static str, u64)>,
    /// (name, value) of counters that are not losses (frees of blocks
    /// allocated before attach, allocator calls that failed, ...).
    pub other: Vec<(&'static str, u64)>,
    /// Sentences about what the probes cannot see, printed under the header.
    pub notes: &'a [String],
}

pub struct TextReport<'a> {
    pub header: Header<'a>,
    pub current: &'a Snapshot,
    pub previous: &'a Snapshot,
    pub group_by: GroupBy,
    pub top: usize,
}

impl TextReport<'_> {
    /// `source` gives the text of a file's line (for tracebacks).
    pub fn write(
        &self,
        out: &mut impl Write,
        source: &mut dyn FnMut(&str, u32) -> Option<String>,
    ) -> std::io::Result<()> {
        let h = &self.header;
        let now = self.current.total();
        let before = self.previous.total();
        let fields = |counters: &[(&str, u64)]| {
            counters.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>().join(" ")
        };
        writeln!(
            out,
            "[{}] memtrace pid {} ({}) {}{}: outstanding {} in {} blocks ({}, {:+} blocks); allocated since attach {} in {} blocks | lost: {} | {}",
            clock_time(h.time),
            h.pid,
            h.comm,
            if h.is_final { "final report " } else { "report " },
            h.sequence,
            format_size(now.size as f64, false),
            now.count,
            format_size(now.size as f64 - before.size as f64, true),
            now.count as i64 - before.count as i64,
            format_size(h.allocated.size as f64, false),
            h.allocated.count,
            fields(&h.losses),
            fields(&h.other),
        )?;
        for note in h.notes {
            writeln!(out, "note: {note}")?;
        }
        for diff in self.current.compare_to(self.previous).iter().take(self.top) {
            writeln!(out, "{}", stat_diff_line(diff))?;
            if self.group_by == GroupBy::Traceback {
                for frame in diff.traceback.oldest_first() {
                    writeln!(out, "  File \"{}\", line {}", frame.filename, frame.lineno)?;
                    if let Some(text) = source(&frame.filename, frame.lineno) {
                        writeln!(out, "    {text}")?;
                    }
                }
            }
        }
        writeln!(out)?;
        out.flush()
    }
}

/// Reads source lines as the target sees its files (through
/// /proc/PID/root), caching each file once.
pub struct SourceFiles {
    root: String,
    files: HashMap<String, Option<Vec<String>>>,
}

impl SourceFiles {
    pub fn new(pid: u32) -> Self {
        Self { root: format!("/proc/{pid}/root"), files: HashMap::new() }
    }

    /// Line `lineno` of `filename`, stripped as linecache + `.strip()` do;
    /// None for blank lines and unreadable files.
    pub fn line(&mut self, filename: &str, lineno: u32) -> Option<String> {
        let lines = self.files.entry(filename.to_owned()).or_insert_with(|| {
            let path = if filename.starts_with('/') { format!("{}{filename}", self.root) } else { filename.to_owned() };
            std::fs::read_to_string(path).ok().map(|text| text.lines().map(str::to_owned).collect())
        });
        let text = lines.as_ref()?.get((lineno as usize).checked_sub(1)?)?.trim();
        (!text.is_empty()).then(|| text.to_owned())
    }
}

/// HH:MM:SS in local time.
fn clock_time(time: SystemTime) -> String {
    let secs = time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r fills the tm we pass and reads only `secs`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&secs, &mut tm) };
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}
