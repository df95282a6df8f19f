//! The timed runs: every configuration of every workload, round after
//! round, interleaved so that the machine's noise falls on all of them
//! alike. One run starts the workload, attaches its tracer while the
//! workload waits, lets the timed part go (the loop, which the workload
//! times itself, or the service's requests, which the bench's client
//! times), stops the tracer and keeps what it counted.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use memtrace_tests::{JsonReport, Line, Memtrace, Target, Tracer, free_port};

use crate::{
    program_stats::{Counting, RunTime},
    service,
    setup::{Setup, attached_probes, probe_count},
    workload::{Kind, RUN_TIMEOUT, Workload, start_workload},
};

/// bpftrace compiles its program with LLVM before attaching; a loaded
/// 2-core machine can make that slow.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds between censuses under `--census-only`: once a second, as an
/// operator watching a process would run it.
pub const CENSUS_INTERVAL: &str = "1";
/// How many times its untraced size a census run does (and its untraced
/// baseline): a workload's timed part lasts a few tenths of a second
/// untraced, and a census every second must fall inside it several times.
pub const CENSUS_SPAN: u64 = 10;
/// The line bpftrace's own test hook prints once every probe is attached
/// (it prints "Attaching N probes..." before it starts).
const BPFTRACE_ATTACHED: &str = "__BPFTRACE_NOTIFY_PROBES_ATTACHED";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Config {
    Untraced,
    /// memtrace attached from outside; None leaves --frames at its default.
    Memtrace(Option<u32>),
    /// bpftrace with empty, counting probes where memtrace puts its own.
    Floor,
    /// Untraced, CENSUS_SPAN times as long: what Census is compared with.
    CensusBaseline,
    /// memtrace --census-only, a census every CENSUS_INTERVAL: no probe.
    Census,
    /// memtrace --all-python finding the workload by its command line,
    /// every CENSUS_INTERVAL: host mode's free tier.
    AllPython,
    Tracemalloc,
    Memray {
        python_allocators: bool,
    },
    /// memtrace --type of a class the benchmark creates often, or rarely
    /// (TYPE_CLASSES): it runs only on the benchmarks named there.
    Type {
        often: bool,
    },
}

/// The classes `--type` is measured with: per pyperformance benchmark, one
/// it creates often and one it creates rarely. raytrace makes a Vector for
/// every step of every ray, and one Canvas per loop.
pub const TYPE_CLASSES: [(&str, &str, &str); 1] = [("raytrace", "Vector", "Canvas")];

impl Config {
    /// Every configuration, in the order runs and tables take them.
    pub const ALL: [Config; 12] = [
        Config::Untraced,
        Config::Memtrace(None),
        Config::Memtrace(Some(1)),
        Config::Floor,
        Config::CensusBaseline,
        Config::Census,
        Config::AllPython,
        Config::Tracemalloc,
        Config::Memray { python_allocators: false },
        Config::Memray { python_allocators: true },
        Config::Type { often: true },
        Config::Type { often: false },
    ];

    /// Its name on the command line (`--configs`); the census's baseline
    /// goes with it.
    pub fn name(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::Memtrace(None) => "memtrace",
            Config::Memtrace(Some(_)) => "frames1",
            Config::Floor => "floor",
            Config::CensusBaseline | Config::Census => "census",
            Config::AllPython => "all-python",
            Config::Tracemalloc => "tracemalloc",
            Config::Memray { python_allocators: false } => "memray",
            Config::Memray { python_allocators: true } => "memray-python-allocators",
            Config::Type { often: true } => "type-often",
            Config::Type { often: false } => "type-rare",
        }
    }

    /// The class `--type` traces in benchmark `benchmark`, for a Type
    /// configuration that runs there.
    pub fn traced_class(self, benchmark: &str) -> Option<&'static str> {
        let Config::Type { often } = self else { return None };
        let &(_, frequent, rare) = TYPE_CLASSES.iter().find(|(b, _, _)| *b == benchmark)?;
        Some(if often { frequent } else { rare })
    }

    pub fn label(self) -> String {
        match self {
            Config::Untraced => "untraced".into(),
            Config::Memtrace(None) => "memtrace (default: --frames 16)".into(),
            Config::Memtrace(Some(n)) => format!("memtrace --frames {n}"),
            Config::Floor => "floor: bpftrace, empty probes".into(),
            Config::CensusBaseline => format!("untraced, {CENSUS_SPAN}× as long"),
            Config::Census => format!("memtrace --census-only --interval {CENSUS_INTERVAL}, {CENSUS_SPAN}× as long"),
            Config::AllPython => format!("memtrace --all-python --interval {CENSUS_INTERVAL}, {CENSUS_SPAN}× as long"),
            Config::Tracemalloc => "python -X tracemalloc=1".into(),
            Config::Memray { python_allocators: false } => "memray run".into(),
            Config::Memray { python_allocators: true } => "memray run --trace-python-allocators".into(),
            Config::Type { often: true } => "memtrace --type, a class created often".into(),
            Config::Type { often: false } => "memtrace --type, a class created rarely".into(),
        }
    }

    /// Its name as a table's column heading, where the label is too long.
    pub fn column(self) -> String {
        match self {
            Config::Memtrace(None) => "memtrace".into(),
            Config::Memtrace(Some(n)) => format!("--frames {n}"),
            Config::Floor => "floor".into(),
            Config::CensusBaseline => format!("untraced {CENSUS_SPAN}×"),
            Config::Census => format!("--census-only {CENSUS_SPAN}×"),
            Config::AllPython => format!("--all-python {CENSUS_SPAN}×"),
            Config::Tracemalloc => "tracemalloc".into(),
            Config::Type { often: true } => "--type often".into(),
            Config::Type { often: false } => "--type rare".into(),
            _ => self.label(),
        }
    }

    /// Whether the cost per probe hit and per allocation means anything:
    /// only for tracers on memtrace's attach points.
    pub fn on_probes(self) -> bool {
        matches!(self, Config::Memtrace(_) | Config::Floor)
    }

    /// How many times its workload's untraced size one run of it does; its
    /// seconds are kept divided by it.
    pub fn span(self) -> u64 {
        match self {
            Config::CensusBaseline | Config::Census | Config::AllPython => CENSUS_SPAN,
            _ => 1,
        }
    }

    /// What its time is compared with: its baseline, where it has one
    /// other than the plain untraced run.
    pub fn baseline(self) -> Config {
        match self {
            Config::Census | Config::AllPython => Config::CensusBaseline,
            _ => Config::Untraced,
        }
    }
}

/// What one run measured besides its time.
enum Measured {
    Nothing,
    Memtrace(MemtraceCounts),
    /// Hits per bpftrace probe name.
    Floor(BTreeMap<String, u64>),
    /// Censuses memtrace reported before it was stopped.
    Census(u64),
}

/// What memtrace counted over one run.
struct MemtraceCounts {
    allocations: u64,
    truncated: u64,
    read_faults: u64,
}

/// Every run of one configuration of one workload.
#[derive(Default)]
pub struct Samples {
    /// Per untraced-size run (see [`Config::span`]).
    pub seconds: Vec<f64>,
    pub allocations: Vec<u64>,
    pub truncated: Vec<u64>,
    pub read_faults: Vec<u64>,
    pub hits: BTreeMap<String, Vec<u64>>,
    pub total_hits: Vec<u64>,
    pub censuses: Vec<u64>,
    /// The tracer's BPF programs over the timed part, by program name
    /// (configurations on memtrace's probes only).
    pub programs: BTreeMap<String, Vec<RunTime>>,
}

impl Samples {
    fn add(&mut self, seconds: f64, measured: Measured, programs: BTreeMap<String, RunTime>) {
        self.seconds.push(seconds);
        for (name, time) in programs {
            self.programs.entry(name).or_default().push(time);
        }
        match measured {
            Measured::Nothing => {}
            Measured::Memtrace(c) => {
                self.allocations.push(c.allocations);
                self.truncated.push(c.truncated);
                self.read_faults.push(c.read_faults);
            }
            Measured::Floor(hits) => {
                self.total_hits.push(hits.values().sum());
                for (probe, count) in hits {
                    self.hits.entry(probe).or_default().push(count);
                }
            }
            Measured::Census(n) => self.censuses.push(n),
        }
    }
}

/// `repeat` rounds of every configuration of every workload; the samples
/// are indexed like `workloads` and their configurations.
pub fn run(setup: &Setup, workloads: &[Workload], repeat: u64) -> Result<Vec<Vec<Samples>>> {
    let mut samples: Vec<Vec<Samples>> =
        workloads.iter().map(|w| w.configs.iter().map(|_| Samples::default()).collect()).collect();
    let start = Instant::now();
    for round in 1..=repeat {
        for (workload, samples) in workloads.iter().zip(&mut samples) {
            for (&config, samples) in workload.configs.iter().zip(samples) {
                let run_start = Instant::now();
                let (seconds, measured, programs) = run_once(setup, workload, config)
                    .with_context(|| format!("{} workload, {}", workload.name, config.label()))?;
                eprintln!(
                    "bench: round {round}/{repeat}: {} / {}: {seconds:.3} s (the run took {:.1} s)",
                    workload.name,
                    config.label(),
                    run_start.elapsed().as_secs_f64()
                );
                samples.add(seconds, measured, programs);
            }
        }
        let per_round = start.elapsed().as_secs_f64() / round as f64;
        eprintln!(
            "bench: {round} of {repeat} rounds in {:.1} min; about {:.1} min to go",
            start.elapsed().as_secs_f64() / 60.0,
            per_round * (repeat - round) as f64 / 60.0
        );
    }
    Ok(samples)
}

/// A tracer attached to one run.
enum Attached {
    Memtrace(Memtrace),
    Census(Memtrace),
    Floor(Tracer),
    /// `--type`: its probes are not the floor's.
    Type(Memtrace),
}

fn run_once(setup: &Setup, workload: &Workload, config: Config) -> Result<(f64, Measured, BTreeMap<String, RunTime>)> {
    let size = workload.size * config.span();
    let port = free_port();
    let mut cmd = interpreter(setup, config);
    cmd.args(workload.args(&setup.bench_dir, size, port));
    let mut target = start_workload(&mut cmd)?;
    if workload.kind == Kind::Flask {
        service::warm_up(port)?;
    }
    let pid = target.pid().to_string();
    let attached = match config {
        Config::Memtrace(frames) => {
            let frames = frames.map(|n| n.to_string());
            let mut args = vec!["--pid", &pid, "--format", "json"];
            if let Some(n) = &frames {
                args.extend(["--frames", n]);
            }
            Some(Attached::Memtrace(Memtrace::try_attach(&setup.memtrace, &args, ATTACH_TIMEOUT)?))
        }
        Config::Census => {
            let args = ["--pid", &pid, "--census-only", "--interval", CENSUS_INTERVAL, "--format", "json"];
            Some(Attached::Census(Memtrace::try_attach(&setup.memtrace, &args, ATTACH_TIMEOUT)?))
        }
        Config::AllPython => {
            // Found as host mode finds any process: by its command line.
            let command_line =
                format!("{} {}", setup.venv_python.display(), workload.args(&setup.bench_dir, size, port).join(" "));
            let pattern = format!("^{}$", regex::escape(&command_line));
            let args = ["--all-python", "--match", &pattern, "--interval", CENSUS_INTERVAL, "--format", "json"];
            Some(Attached::Census(Memtrace::try_attach(&setup.memtrace, &args, ATTACH_TIMEOUT)?))
        }
        Config::Floor => Some(Attached::Floor(bpftrace(setup, target.pid())?)),
        Config::Type { .. } => {
            let class = config.traced_class(&workload.name).context("no class to trace in this workload")?;
            let args = ["--pid", &pid, "--type", class, "--format", "json"];
            Some(Attached::Type(Memtrace::try_attach(&setup.memtrace, &args, ATTACH_TIMEOUT)?))
        }
        Config::Untraced | Config::CensusBaseline | Config::Tracemalloc | Config::Memray { .. } => None,
    };
    // Kept on the floor's runs as well as memtrace's: the statistics add
    // the same clock reads to every program run, the floor's included.
    let counting = match &attached {
        Some(Attached::Memtrace(memtrace)) => Some(Counting::start(memtrace.pid())?),
        Some(Attached::Floor(bpftrace)) => Some(Counting::start(bpftrace.pid())?),
        Some(Attached::Census(_) | Attached::Type(_)) | None => None,
    };
    let seconds = match workload.kind {
        Kind::Flask => service::time_requests(port, size)?,
        Kind::Micro { .. } | Kind::Pyperformance => timed_loop(&mut target)?,
    };
    let programs = counting.map(Counting::finish).transpose()?.unwrap_or_default();
    let measured = match attached {
        None => Measured::Nothing,
        Some(Attached::Memtrace(memtrace)) => {
            Measured::Memtrace(final_report_counts(setup, &memtrace.stop(RUN_TIMEOUT)?)?)
        }
        Some(Attached::Floor(bpftrace)) => Measured::Floor(parse_hits(&bpftrace.stop(RUN_TIMEOUT)?)?),
        Some(Attached::Census(memtrace)) => Measured::Census(censuses(&memtrace.stop(RUN_TIMEOUT)?)),
        Some(Attached::Type(memtrace)) => {
            memtrace.stop(RUN_TIMEOUT)?;
            Measured::Nothing
        }
    };
    let status = target.try_finish(RUN_TIMEOUT)?;
    if !status.success() {
        bail!("the workload failed after its timed part: {status}");
    }
    Ok((seconds / config.span() as f64, measured, programs))
}

/// The interpreter as `config` runs it: the venv's python (the benchmarked
/// interpreter with the bench's packages), under tracemalloc or memray.
fn interpreter(setup: &Setup, config: Config) -> Command {
    let mut cmd = Command::new(&setup.venv_python);
    match config {
        Config::Tracemalloc => {
            cmd.args(["-X", "tracemalloc=1"]);
        }
        Config::Memray { python_allocators } => {
            cmd.args(["-m", "memray", "run", "--force", "-o"]).arg(&setup.memray_output);
            if python_allocators {
                cmd.arg("--trace-python-allocators");
            }
        }
        Config::Untraced
        | Config::Memtrace(_)
        | Config::Floor
        | Config::CensusBaseline
        | Config::Census
        | Config::AllPython
        | Config::Type { .. } => {}
    }
    cmd
}

/// Starts the workload's loop and returns the seconds it measured.
fn timed_loop(target: &mut Target) -> Result<f64> {
    target.try_send("").context("cannot start the workload's loop")?;
    // memray prints lines of its own around the workload's.
    let elapsed = target.wait_line("elapsed SECONDS", RUN_TIMEOUT, |line| line.starts_with("elapsed "))?;
    elapsed["elapsed ".len()..].trim().parse().with_context(|| format!("the workload printed `{elapsed}`"))
}

fn bpftrace(setup: &Setup, pid: u32) -> Result<Tracer> {
    let mut cmd = Command::new("bpftrace");
    cmd.arg("--unsafe")
        .arg("-p")
        .arg(pid.to_string())
        .arg(&setup.floor_program)
        .env("LD_PRELOAD", &setup.shim)
        .env("BPFTRACE_SHIM_PID", pid.to_string())
        .env(BPFTRACE_ATTACHED, "1");
    let mut tracer = Tracer::start(&mut cmd, "bpftrace")?;
    tracer.wait_attached(ATTACH_TIMEOUT, |l| l.stderr && l.text == BPFTRACE_ATTACHED)?;
    let probes = probe_count(&setup.points);
    let attaching = format!("Attaching {probes} probes...");
    if !tracer.log.iter().any(|l| l.text == attaching) {
        bail!("bpftrace did not attach the {probes} probes memtrace uses: {}", tracer.last_error());
    }
    Ok(tracer)
}

/// `@[uprobe:/path:offset]: count` lines, printed when bpftrace stops.
fn parse_hits(log: &[Line]) -> Result<BTreeMap<String, u64>> {
    let hits: BTreeMap<String, u64> = log
        .iter()
        .filter(|l| !l.stderr)
        .filter_map(|l| {
            let (probe, count) = l.text.strip_prefix("@[")?.rsplit_once("]: ")?;
            Some((probe.to_owned(), count.trim().parse().ok()?))
        })
        .collect();
    if hits.is_empty() {
        bail!("bpftrace printed no probe counts");
    }
    Ok(hits)
}

fn json_reports(log: &[Line]) -> impl Iterator<Item = JsonReport> + '_ {
    log.iter().filter(|l| !l.stderr).filter_map(|l| serde_json::from_str::<JsonReport>(&l.text).ok())
}

/// The censuses of the reports memtrace printed while the workload ran
/// (its final one is printed once stopped).
fn censuses(log: &[Line]) -> u64 {
    json_reports(log).filter(|r| !r.is_final && r.census.is_some()).count() as u64
}

/// What memtrace's final report says it counted: the allocations since
/// attach, the Python stacks cut at --frames (`truncated-python-stacks`)
/// and the Python stack walks that failed on a read fault
/// (`python-reads`), from its `--format json` line. Its probes must be the
/// floor's, or the two would not measure the same traps.
fn final_report_counts(setup: &Setup, log: &[Line]) -> Result<MemtraceCounts> {
    let attached = log.iter().filter(|l| l.stderr).find_map(|l| attached_probes(&l.text));
    let floor = probe_count(&setup.points);
    if attached != Some(floor) {
        bail!(
            "memtrace attached {attached:?} probes to this workload, the floor {floor}: the floor is not on memtrace's attach points"
        );
    }
    let report = json_reports(log).find(|r| r.is_final).context("memtrace printed no final report")?;
    let count = |counters: &BTreeMap<String, u64>, name: &str| {
        counters.get(name).copied().with_context(|| format!("no {name} counter in memtrace's final report"))
    };
    Ok(MemtraceCounts {
        allocations: report.allocated.count,
        truncated: count(&report.counters, "truncated-python-stacks")?,
        read_faults: count(&report.losses, "python-reads")?,
    })
}
