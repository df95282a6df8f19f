//! Command-line options. Names follow bcc memleak and tracemalloc where they
//! have one (`--top`, `--older-than`, `--group-by lineno`).

use std::time::Duration;

use clap::{Parser, ValueEnum, builder::PossibleValue};

use crate::snapshot::GroupBy;

/// Finds what grows, and where, in a running process: traces its libc and
/// CPython allocator calls with eBPF, without restarting or modifying it, and
/// prints tracemalloc-style reports of what is still allocated since attach.
#[derive(Parser, Debug)]
#[command(name = "memtrace", version)]
pub struct Options {
    /// Process to trace; repeat it, or separate pids with commas, to trace
    /// several at once (each gets its own reports).
    #[arg(long = "pid", short = 'p', value_name = "PID", value_delimiter = ',', required = true)]
    pub pids: Vec<u32>,

    /// Seconds between reports.
    #[arg(long, short = 'i', value_name = "SECS", default_value_t = 5.0, value_parser = positive_seconds)]
    pub interval: f64,

    /// Stop after this many reports (the last one is the final report).
    #[arg(long, short = 'c', value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub count: Option<u32>,

    /// Stop after this many seconds.
    #[arg(long, short = 'd', value_name = "SECS", value_parser = positive_seconds)]
    pub duration: Option<f64>,

    /// Groups shown per report.
    #[arg(long, short = 'T', value_name = "N", default_value_t = 10)]
    pub top: usize,

    /// Ignore allocations smaller than this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub min_size: u64,

    /// Ignore allocations larger than this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = u64::MAX, hide_default_value = true)]
    pub max_size: u64,

    /// Count only blocks that have been outstanding for at least this many
    /// milliseconds (hides short-lived churn).
    #[arg(long, short = 'o', value_name = "MS")]
    pub older_than: Option<u64>,

    /// How allocations are grouped: by line of the innermost frame, by its
    /// file, or by whole traceback (printed like tracemalloc's
    /// Traceback.format()).
    #[arg(long, value_enum, default_value_t = GroupBy::Lineno)]
    pub group_by: GroupBy,

    /// Python frames kept per allocation (1 is the cheapest); native frames
    /// kept per allocation when there are no Python frames.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub frames: u32,

    /// Show native frames too: the C code between and beneath the Python
    /// frames (extension functions, libc), unwound with the binaries' own
    /// unwind tables, like memray --native. Best with --group-by traceback.
    #[arg(long)]
    pub native: bool,

    /// Live allocations memtrace can track at once; allocations beyond it
    /// are counted as lost (alloc-map-full) in every report.
    #[arg(long, value_name = "N", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_allocs: u32,

    /// Attach no probe: every interval report only the process's memory and
    /// its object census (as gc.get_objects() and objgraph.show_growth()
    /// would), read from its memory, at no cost to it.
    #[arg(long)]
    pub census_only: bool,

    /// Types shown per census, biggest growth first.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub types_limit: usize,

    /// How reports are written to stdout: text (tracemalloc's format) or
    /// json (one object per report per process, one per line).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Print the probe placements chosen and other diagnostics, the kernel
    /// side's included, to stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

impl ValueEnum for GroupBy {
    fn value_variants<'a>() -> &'a [Self] {
        &GroupBy::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let help = match self {
            GroupBy::Lineno => "The innermost frame's file and line",
            GroupBy::Filename => "The innermost frame's file",
            GroupBy::Traceback => "The whole traceback",
        };
        Some(PossibleValue::new(self.name()).help(help))
    }
}

impl Options {
    /// What of each report the writers show.
    pub fn view(&self) -> crate::report::View {
        crate::report::View { group_by: self.group_by, top: self.top, types: self.types_limit }
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.interval)
    }

    pub fn duration(&self) -> Option<Duration> {
        self.duration.map(Duration::from_secs_f64)
    }
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}
