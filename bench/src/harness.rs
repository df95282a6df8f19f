//! The timed runs: every configuration of every workload, round after
//! round, interleaved so that the machine's noise falls on all of them
//! alike. One run starts the workload, attaches its tracer while the
//! workload waits, lets the loop go, takes the seconds the workload itself
//! measured, stops the tracer and keeps what it counted.

use std::{collections::BTreeMap, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use memtrace_tests::{JsonReport, Line, Memtrace, Tracer};

use crate::{
    setup::{Setup, probe_count},
    workload::{RUN_TIMEOUT, start_workload},
};

/// Deep enough that `--frames 16` truncates every walk.
pub const DEEP_DEPTH: u32 = 20;
/// bpftrace compiles its program with LLVM before attaching; a loaded
/// 2-core machine can make that slow.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds between censuses while the workload runs: its loop lasts a few
/// tenths of a second untraced, so a census every second would not fall
/// inside it; twenty a second is a harder test than the one asked for.
pub const CENSUS_INTERVAL: &str = "0.05";
/// The line bpftrace's own test hook prints once every probe is attached
/// (it prints "Attaching N probes..." before it starts).
const BPFTRACE_ATTACHED: &str = "__BPFTRACE_NOTIFY_PROBES_ATTACHED";

#[derive(Clone, Copy, PartialEq)]
pub enum Config {
    Untraced,
    /// memtrace attached from outside; None leaves --frames at its default.
    Memtrace(Option<u32>),
    /// bpftrace with empty, counting probes where memtrace puts its own.
    Floor,
    /// memtrace --census-only, a census every CENSUS_INTERVAL: no probe.
    Census,
    Tracemalloc,
    Memray {
        python_allocators: bool,
    },
}

impl Config {
    pub fn label(self) -> String {
        match self {
            Config::Untraced => "untraced".into(),
            Config::Memtrace(None) => "memtrace (default: --frames 16)".into(),
            Config::Memtrace(Some(n)) => format!("memtrace --frames {n}"),
            Config::Floor => "floor: bpftrace, empty probes".into(),
            Config::Census => format!("memtrace --census-only --interval {CENSUS_INTERVAL}"),
            Config::Tracemalloc => "python -X tracemalloc=1".into(),
            Config::Memray { python_allocators: false } => "memray run".into(),
            Config::Memray { python_allocators: true } => "memray run --trace-python-allocators".into(),
        }
    }

    /// Whether the cost per probe hit and per allocation means anything:
    /// only for tracers on memtrace's attach points.
    pub fn on_probes(self) -> bool {
        matches!(self, Config::Memtrace(_) | Config::Floor)
    }
}

pub struct Workload {
    pub name: &'static str,
    pub depth: u32,
    pub configs: &'static [Config],
}

pub const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "shallow",
        depth: 1,
        configs: &[
            Config::Untraced,
            Config::Memtrace(None),
            Config::Memtrace(Some(1)),
            Config::Floor,
            Config::Census,
            Config::Tracemalloc,
            Config::Memray { python_allocators: false },
            Config::Memray { python_allocators: true },
        ],
    },
    Workload {
        name: "deep",
        depth: DEEP_DEPTH,
        configs: &[Config::Untraced, Config::Floor, Config::Memtrace(Some(1)), Config::Memtrace(None)],
    },
];

/// What one run measured besides the loop's time.
enum Measured {
    Nothing,
    Memtrace(MemtraceCounts),
    /// Hits per bpftrace probe name.
    Floor(BTreeMap<String, u64>),
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
    pub seconds: Vec<f64>,
    pub allocations: Vec<u64>,
    pub truncated: Vec<u64>,
    pub read_faults: Vec<u64>,
    pub hits: BTreeMap<String, Vec<u64>>,
    pub total_hits: Vec<u64>,
}

impl Samples {
    fn add(&mut self, seconds: f64, measured: Measured) {
        self.seconds.push(seconds);
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
        }
    }
}

/// `repeat` rounds of every configuration; the samples are indexed like
/// `WORKLOADS` and their configurations.
pub fn run(setup: &Setup, repeat: u64) -> Result<Vec<Vec<Samples>>> {
    let mut samples: Vec<Vec<Samples>> =
        WORKLOADS.iter().map(|w| w.configs.iter().map(|_| Samples::default()).collect()).collect();
    for round in 1..=repeat {
        for (workload, samples) in WORKLOADS.iter().zip(&mut samples) {
            for (&config, samples) in workload.configs.iter().zip(samples) {
                let (seconds, measured) = run_once(setup, workload, config)
                    .with_context(|| format!("{} workload, {}", workload.name, config.label()))?;
                eprintln!("bench: round {round}/{repeat}: {} / {}: {seconds:.3} s", workload.name, config.label());
                samples.add(seconds, measured);
            }
        }
    }
    Ok(samples)
}

/// A tracer attached to one run.
enum Attached {
    Memtrace(Memtrace),
    Census(Memtrace),
    Floor(Tracer),
}

fn run_once(setup: &Setup, workload: &Workload, config: Config) -> Result<(f64, Measured)> {
    let mut cmd = match config {
        Config::Tracemalloc => {
            let mut cmd = Command::new(&setup.python);
            cmd.args(["-X", "tracemalloc=1"]);
            cmd
        }
        Config::Memray { python_allocators } => {
            let mut cmd = Command::new(&setup.memray_python);
            cmd.args(["-m", "memray", "run", "--force", "-o"]).arg(&setup.memray_output);
            if python_allocators {
                cmd.arg("--trace-python-allocators");
            }
            cmd
        }
        Config::Untraced | Config::Memtrace(_) | Config::Floor | Config::Census => Command::new(&setup.python),
    };
    cmd.arg(&setup.script).arg(setup.iterations.to_string()).arg(workload.depth.to_string());
    let mut target = start_workload(&mut cmd)?;
    let attached = match config {
        Config::Memtrace(frames) => Some(Attached::Memtrace(memtrace(setup, target.pid(), frames)?)),
        Config::Census => {
            let pid = target.pid().to_string();
            let args = ["--pid", &pid, "--census-only", "--interval", CENSUS_INTERVAL, "--format", "json"];
            Some(Attached::Census(Memtrace::try_attach(&setup.memtrace, &args, ATTACH_TIMEOUT)?))
        }
        Config::Floor => Some(Attached::Floor(bpftrace(setup, target.pid())?)),
        Config::Untraced | Config::Tracemalloc | Config::Memray { .. } => None,
    };
    target.try_send("").context("cannot start the workload's loop")?;
    // memray prints lines of its own around the workload's.
    let elapsed = target.wait_line("elapsed SECONDS", RUN_TIMEOUT, |line| line.starts_with("elapsed "))?;
    let seconds =
        elapsed["elapsed ".len()..].trim().parse().with_context(|| format!("the workload printed `{elapsed}`"))?;
    let measured = match attached {
        None => Measured::Nothing,
        Some(Attached::Memtrace(memtrace)) => Measured::Memtrace(final_report_counts(&memtrace.stop(RUN_TIMEOUT)?)?),
        Some(Attached::Floor(bpftrace)) => Measured::Floor(parse_hits(&bpftrace.stop(RUN_TIMEOUT)?)?),
        Some(Attached::Census(memtrace)) => {
            memtrace.stop(RUN_TIMEOUT)?;
            Measured::Nothing
        }
    };
    let status = target.try_finish(RUN_TIMEOUT)?;
    if !status.success() {
        bail!("the workload failed after its loop: {status}");
    }
    Ok((seconds, measured))
}

fn memtrace(setup: &Setup, pid: u32, frames: Option<u32>) -> Result<Memtrace> {
    let (pid, frames) = (pid.to_string(), frames.map(|n| n.to_string()));
    let mut args = vec!["--pid", &pid, "--format", "json"];
    if let Some(n) = &frames {
        args.extend(["--frames", n]);
    }
    Memtrace::try_attach(&setup.memtrace, &args, ATTACH_TIMEOUT)
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

/// What memtrace's final report says it counted: the allocations since
/// attach, the Python stacks cut at --frames (`truncated-python-stacks`)
/// and the Python stack walks that failed on a read fault
/// (`python-reads`), from its `--format json` line.
fn final_report_counts(log: &[Line]) -> Result<MemtraceCounts> {
    let report: JsonReport = log
        .iter()
        .filter(|l| !l.stderr)
        .filter_map(|l| serde_json::from_str::<JsonReport>(&l.text).ok())
        .find(|r| r.is_final)
        .context("memtrace printed no final report")?;
    let count = |counters: &BTreeMap<String, u64>, name: &str| {
        counters.get(name).copied().with_context(|| format!("no {name} counter in memtrace's final report"))
    };
    Ok(MemtraceCounts {
        allocations: report.allocated.count,
        truncated: count(&report.counters, "truncated-python-stacks")?,
        read_faults: count(&report.losses, "python-reads")?,
    })
}
