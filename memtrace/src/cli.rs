//! Command-line options, and the one place that turns them into the
//! outputs a session writes. Names follow bcc memleak and tracemalloc where
//! they have one (`--top`, `--older-than`, `--group-by lineno`).

use std::{net::SocketAddr, ops::RangeInclusive, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum, builder::PossibleValue, error::ErrorKind};
use regex::Regex;

use crate::{
    filter::Filters,
    process::source::SourceFiles,
    report::{
        self, Output, Writer, check_writable, flamegraph::FlamegraphWriter, json::JsonWriter, pprof::PprofWriter,
        prometheus::MetricsServer, saved::SnapshotSaver, text::TextWriter, timeline::TimelineWriter,
    },
    snapshot::GroupBy,
    symbolize::allocators::AllocatorFrames,
    type_births::TypeName,
};

/// Finds what grows, and where, in a running process: traces its libc and
/// CPython allocator calls with eBPF, without restarting or modifying it, and
/// prints tracemalloc-style reports of what is still allocated since attach.
///
/// Without a subcommand, traces the processes given with --pid.
#[derive(Parser, Debug)]
#[command(name = "memtrace", version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: Options,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Compares two snapshots saved with --save: the report of NEW with its
    /// changes since OLD, as the live report would have printed it.
    Diff {
        /// The earlier snapshot (DIR/PID-SEQUENCE.json).
        old: PathBuf,
        /// The later snapshot, whose report is printed.
        new: PathBuf,
        #[command(flatten)]
        view: View,
    },
    /// Prints a snapshot saved with --save as a report of everything
    /// outstanding in it (its changes counted from nothing).
    Show {
        /// A snapshot saved with --save (DIR/PID-SEQUENCE.json).
        snapshot: PathBuf,
        #[command(flatten)]
        view: View,
    },
}

/// How reports are grouped and printed, live and from saved snapshots.
#[derive(Args, Debug, Clone)]
pub struct View {
    /// Groups shown per report (at least 1).
    #[arg(long, short = 'T', value_name = "N", default_value_t = 10, allow_negative_numbers = true,
          value_parser = whole::<usize>(1..=u32::MAX.into(), "a number of groups, at least 1"))]
    pub top: usize,

    /// How allocations are grouped: by line of the innermost frame, by its
    /// file, or by whole traceback (printed like tracemalloc's
    /// Traceback.format()).
    #[arg(long, value_enum, default_value_t = GroupBy::Lineno)]
    pub group_by: GroupBy,

    /// How reports are written to stdout: text (tracemalloc's format) or
    /// json (one object per report per process, one per line).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Types shown per census, biggest growth first (at least 1).
    #[arg(long, value_name = "N", default_value_t = 10, allow_negative_numbers = true,
          value_parser = whole::<usize>(1..=u32::MAX.into(), "a number of types, at least 1"))]
    pub types_limit: usize,
}

impl View {
    /// What of each report the writers show.
    pub fn report(&self) -> report::View {
        report::View { group_by: self.group_by, top: self.top, types: self.types_limit }
    }

    /// The writer of reports to stdout, with source lines from `sources`;
    /// in text, of host reports only when `host`.
    pub fn stdout_writer(&self, sources: SourceFiles, host: bool) -> Output {
        let out = std::io::stdout();
        let writer: Box<dyn Writer> = match self.format {
            Format::Text if host => Box::new(TextWriter::for_host(out, sources, self.report())),
            Format::Text => Box::new(TextWriter::new(out, sources, self.report())),
            Format::Json => Box::new(JsonWriter::new(out, self.report())),
        };
        Output { name: "stdout".into(), writer }
    }
}

#[derive(Args, Debug)]
pub struct Options {
    /// Process to trace; repeat it, or separate pids with commas, to trace
    /// several at once (each gets its own reports). A thread id is refused,
    /// with its process's pid.
    #[arg(long = "pid", short = 'p', value_name = "PID", value_delimiter = ',', required_unless_present_any = ["all_python", "all"],
          allow_negative_numbers = true, value_parser = whole::<u32>(1..=u32::MAX.into(), "a process id, a whole number above 0"))]
    pub pids: Vec<u32>,

    /// Seconds between reports [default: 5; 10 with --all-python or --all].
    #[arg(long, short = 'i', value_name = "SECS", allow_negative_numbers = true, value_parser = positive_seconds)]
    pub interval: Option<f64>,

    /// Watch every CPython process on the host at no cost to them: no
    /// probe, only each one's memory and object census (as --census-only),
    /// every interval; a process started later is found at the next
    /// report. Refused with --pid and with the options of --census-only.
    #[arg(long, conflicts_with_all = PROBE_OPTIONS, conflicts_with = "pids")]
    pub all_python: bool,

    /// As --all-python, for every process on the host: native processes
    /// get their memory over time (RSS, anonymous, swapped), Python ones
    /// their census as well.
    #[arg(long, conflicts_with_all = PROBE_OPTIONS, conflicts_with_all = ["pids", "all_python"])]
    pub all: bool,

    /// In host mode, trace a process whose private memory has grown for 8
    /// reports, for --window seconds, one process at a time and each at
    /// most once: the births of its growing class (as --type) when a class
    /// of its own grows, else every allocation (exact tracing); then print
    /// that report, with what the window cost it, and detach. Off by
    /// default: during its window a process pays what tracing costs (see
    /// BENCHMARKS.md), where host mode alone costs it nothing.
    #[arg(long)]
    pub escalate: bool,

    /// How long an --escalate window lasts, in seconds [default: 60].
    #[arg(long, value_name = "SECS", requires = "escalate", allow_negative_numbers = true, value_parser = positive_seconds)]
    pub window: Option<f64>,

    /// With --all-python or --all, only the processes whose command line
    /// (its arguments joined by spaces) matches this regular expression.
    #[arg(long = "match", value_name = "REGEX", value_parser = regex_arg)]
    pub matching: Option<Regex>,

    /// Stop after this many reports (the last one is the final report).
    #[arg(long, short = 'c', value_name = "N", allow_negative_numbers = true,
          value_parser = whole::<u32>(1..=u32::MAX.into(), "a number of reports, at least 1"))]
    pub count: Option<u32>,

    /// Stop after this many seconds.
    #[arg(long, short = 'd', value_name = "SECS", allow_negative_numbers = true, value_parser = positive_seconds)]
    pub duration: Option<f64>,

    /// Ignore allocations smaller than this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0, allow_negative_numbers = true,
          value_parser = whole::<u64>(0..=u64::MAX, "a number of bytes"))]
    pub min_size: u64,

    /// Ignore allocations larger than this many bytes (at least --min-size).
    #[arg(long, value_name = "BYTES", default_value_t = u64::MAX, hide_default_value = true,
          allow_negative_numbers = true, value_parser = whole::<u64>(0..=u64::MAX, "a number of bytes"))]
    pub max_size: u64,

    /// Count only blocks that have been outstanding for at least this many
    /// milliseconds (hides short-lived churn).
    #[arg(long, short = 'o', value_name = "MS", allow_negative_numbers = true,
          value_parser = whole::<u64>(0..=u64::MAX / 1_000_000, "a number of milliseconds"))]
    pub older_than: Option<u64>,

    #[command(flatten)]
    pub view: View,

    /// Python frames kept per allocation (1 is the cheapest); native frames
    /// kept per allocation, from the first frame of the program's own
    /// code, when there are no Python frames.
    #[arg(long, value_name = "N", default_value_t = 16, allow_negative_numbers = true,
          value_parser = whole::<u32>(1..=32, "a number of frames from 1 to 32"))]
    pub frames: u32,

    /// Show native frames too: the C code between and beneath the Python
    /// frames (extension functions, libc), unwound with the binaries' own
    /// unwind tables, like memray --native. Best with --group-by traceback.
    /// Programs that are not Python always get their native frames.
    #[arg(long)]
    pub native: bool,

    /// Treat functions whose qualified name matches this glob (`xmalloc`,
    /// `my_pool::*`) as allocators, as valgrind's massif does: a native
    /// traceback then starts at the first frame outside them. Repeatable;
    /// adds to the built-in list (operator new, the C, C++ and Rust
    /// standard libraries, CPython's allocator layers).
    #[arg(long, value_name = "GLOB")]
    pub alloc_fn: Vec<String>,

    /// Live allocations memtrace can track at once, at least 1024;
    /// allocations beyond it are counted as lost (alloc-map-full) in every
    /// report.
    #[arg(long, value_name = "N", default_value_t = 1 << 20, allow_negative_numbers = true,
          value_parser = whole::<u32>(1024..=u32::MAX.into(), "a number of blocks, at least 1024"))]
    pub max_allocs: u32,

    /// Attach no probe: every interval report only the process's memory and
    /// its object census (as gc.get_objects() and objgraph.show_growth()
    /// would), read from its memory, at no cost to it. Refused with the
    /// options about what probes count or write: --frames, --native,
    /// --min-size, --max-size, --older-than, --max-allocs, --include,
    /// --exclude, --filter-all-frames, --pprof, --flamegraph,
    /// --flamegraph-diff.
    #[arg(long, conflicts_with_all = PROBE_OPTIONS)]
    pub census_only: bool,

    /// Trace only the births of one type's objects: a class by its name
    /// (MyObject), qualified by its module (mymodule.MyObject) where the
    /// bare name is ambiguous, or a built-in type (dict). The report is
    /// tracemalloc's, of that type's objects alone; the object census says
    /// which are alive, so no free is probed. A class costs one trap per
    /// instance of any class created (two for this one's); a built-in type
    /// one trap per object of any type created. Refused with --census-only,
    /// --all-python, --native, --min-size, --max-size, --older-than.
    #[arg(long = "type", value_name = "NAME", value_parser = TypeName::parse,
          conflicts_with_all = ["census_only", "all_python", "all", "native", "min_size", "max_size", "older_than"])]
    pub type_name: Option<TypeName>,

    /// Keep only allocations made in files matching this glob
    /// (tracemalloc's Filter: fnmatch on the innermost frame's file name);
    /// repeat it to keep any of several.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,

    /// Drop allocations made in files matching this glob; repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,

    /// Match --include and --exclude against every frame of a traceback,
    /// not only the innermost.
    #[arg(long)]
    pub filter_all_frames: bool,

    /// Also write a pprof heap profile (gzipped protobuf) of what is
    /// outstanding, replaced at every report, for go tool pprof, Pyroscope
    /// or Parca.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,

    /// Also write an SVG flame graph of outstanding bytes by traceback,
    /// replaced at every report.
    #[arg(long, value_name = "FILE.svg")]
    pub flamegraph: Option<PathBuf>,

    /// Also write a differential SVG flame graph of outstanding bytes by
    /// traceback, red where they grew since the previous report and blue
    /// where they shrank, replaced at every report.
    #[arg(long, value_name = "FILE.svg")]
    pub flamegraph_diff: Option<PathBuf>,

    /// Also plot memory over time (RSS, Python heap, outstanding bytes),
    /// per process and for the top groups, replaced at every report: SVG,
    /// or PNG if FILE ends in .png.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics while tracing.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Save every report's whole snapshot, tracebacks and all, as
    /// DIR/PID-SEQUENCE.json, for `memtrace diff` and `memtrace show`.
    #[arg(long, value_name = "DIR")]
    pub save: Option<PathBuf>,

    /// Print the probe placements chosen and other diagnostics, the kernel
    /// side's included, to stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// The options that say what probes count, or write what they counted:
/// with `--census-only` there is nothing for them to act on.
const PROBE_OPTIONS: [&str; 12] = [
    "frames",
    "native",
    "min_size",
    "max_size",
    "older_than",
    "max_allocs",
    "include",
    "exclude",
    "filter_all_frames",
    "pprof",
    "flamegraph",
    "flamegraph_diff",
];

/// Parses the command line, and exits with a usage error (status 2) when
/// it makes no sense.
pub fn parse() -> Cli {
    let cli = Cli::parse();
    if cli.command.is_none()
        && let Err(message) = cli.trace.check()
    {
        Cli::command().error(ErrorKind::ArgumentConflict, message).exit();
    }
    cli
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
    /// What no single option's parser can see: options that contradict
    /// each other.
    fn check(&self) -> Result<(), String> {
        if self.min_size > self.max_size {
            return Err(format!(
                "--min-size {} is above --max-size {}: no allocation could be tracked",
                self.min_size, self.max_size
            ));
        }
        if self.escalate && !self.host_mode() {
            return Err("--escalate traces growing processes in host mode: give --all-python, --all, or --census-only with several pids".into());
        }
        if self.matching.is_some() && !self.host_wide() {
            return Err("--match narrows --all-python or --all, neither of which is given".into());
        }
        Ok(())
    }

    /// Every output the options ask for, stdout's first, each checked now
    /// (files writable, address valid and free) so that a mistake shows
    /// before anything is traced.
    pub fn outputs(&self) -> Result<Vec<Output>> {
        let View { group_by, top, .. } = self.view;
        let mut outputs = vec![self.view.stdout_writer(SourceFiles::default(), self.host_mode())];
        let mut file = |option: &str, path: &PathBuf, writer: Box<dyn Writer>| -> Result<()> {
            let name = format!("--{option} {}", path.display());
            check_writable(path).with_context(|| format!("cannot write {name}"))?;
            outputs.push(Output { name, writer });
            Ok(())
        };
        if let Some(path) = &self.pprof {
            file("pprof", path, Box::new(PprofWriter::new(path.clone())))?;
        }
        if let Some(path) = &self.flamegraph {
            file("flamegraph", path, Box::new(FlamegraphWriter::new(path.clone())))?;
        }
        if let Some(path) = &self.flamegraph_diff {
            file("flamegraph-diff", path, Box::new(FlamegraphWriter::differential(path.clone())))?;
        }
        if let Some(path) = &self.timeline {
            let writer = TimelineWriter::new(path.clone(), group_by, top)
                .with_context(|| format!("cannot plot --timeline {}", path.display()))?;
            file("timeline", path, Box::new(writer))?;
        }
        if let Some(dir) = &self.save {
            let saver =
                SnapshotSaver::new(dir.clone()).with_context(|| format!("cannot save to --save {}", dir.display()))?;
            outputs.push(Output { name: format!("--save {}", dir.display()), writer: Box::new(saver) });
        }
        if let Some(addr) = &self.listen {
            let parsed: SocketAddr = addr
                .parse()
                .map_err(|_| anyhow::anyhow!("--listen {addr:?} is not an address and port such as 127.0.0.1:9464"))?;
            let server =
                MetricsServer::start(parsed, self.view.report()).with_context(|| format!("cannot listen on {addr}"))?;
            outputs.push(Output { name: format!("--listen {addr}"), writer: Box::new(server) });
        }
        Ok(outputs)
    }

    pub fn filters(&self) -> Result<Filters> {
        Filters::new(&self.include, &self.exclude, self.filter_all_frames)
    }

    pub fn allocator_frames(&self) -> Result<AllocatorFrames> {
        AllocatorFrames::new(&self.alloc_fn)
    }

    pub fn interval(&self) -> Duration {
        let default = if self.host_wide() { 10.0 } else { 5.0 };
        Duration::from_secs_f64(self.interval.unwrap_or(default))
    }

    /// Host mode: many processes at the free tier, reported together,
    /// ranked by growth (`--all-python`, or `--census-only` over several
    /// pids).
    pub fn host_mode(&self) -> bool {
        self.host_wide() || (self.census_only && self.pids.len() > 1)
    }

    /// Whether the processes are found on the host rather than given.
    pub fn host_wide(&self) -> bool {
        self.all_python || self.all
    }

    /// Whether no probe is attached: `--census-only`, or host mode's free tier.
    pub fn probes_off(&self) -> bool {
        self.census_only || self.host_wide()
    }

    /// How long an `--escalate` window lasts.
    pub fn window(&self) -> Duration {
        Duration::from_secs_f64(self.window.unwrap_or(60.0))
    }

    pub fn duration(&self) -> Option<Duration> {
        self.duration.map(Duration::from_secs_f64)
    }
}

fn regex_arg(s: &str) -> Result<Regex, String> {
    let why = |e: regex::Error| e.to_string().lines().last().unwrap_or("").trim_start_matches("error: ").to_owned();
    Regex::new(s).map_err(|e| format!("is not a regular expression: {}", why(e)))
}

/// Seconds, above 0 and at most a year (a longer timer would overflow
/// the clock).
fn positive_seconds(s: &str) -> Result<f64, String> {
    const YEAR: f64 = 365.0 * 24.0 * 3600.0;
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= YEAR => Ok(v),
        _ => Err(format!("must be a positive number of seconds, at most {YEAR}")),
    }
}

/// A parser of whole numbers in `range`, whose error says they must be
/// `what`.
fn whole<T: TryFrom<u64>>(
    range: RangeInclusive<u64>,
    what: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |s| {
        s.parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .and_then(|n| T::try_from(n).ok())
            .ok_or_else(|| format!("must be {what}"))
    }
}
