//! What the bench runs, and the process protocol they share: every workload
//! is a Python script that prints `ready` and then waits, so that a tracer
//! attaches before the timed part starts. The microbenchmark
//! (bench/workload.py) and each pyperformance benchmark
//! (bench/pyperformance_loop.py) then start their loop on a line on stdin,
//! print `elapsed SECONDS` and wait for stdin to close; the web service
//! (bench/flask_app.py) serves until stdin closes while the bench's own
//! client times its requests. Setup runs the microbenchmark to learn
//! memtrace's probes and calibrates the pyperformance loops; the harness
//! runs them all to time them.

use std::{path::Path, process::Command, time::Duration};

use anyhow::Result;
use memtrace_tests::Target;

use crate::harness::Config;

/// Longer than any workload start, loop or tracer detach takes: past it, a
/// run has hung and fails the bench rather than stall it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// Deep enough that `--frames 16` truncates every walk.
pub const DEEP_DEPTH: u32 = 20;

/// The pyperformance benchmarks of the subset, by pyperformance's names.
pub const PYPERFORMANCE: [&str; 11] = [
    "float",
    "json_dumps",
    "json_loads",
    "deepcopy",
    "go",
    "deltablue",
    "richards",
    "raytrace",
    "chaos",
    "nbody",
    "xml_etree",
];

/// The parts of the bench, each with its own section in BENCHMARKS.md.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Group {
    /// bench/workload.py, shallow and deep.
    Micro,
    /// The pyperformance subset.
    Pyperformance,
    /// The Flask app under a fixed client.
    Flask,
    /// What one census costs memtrace (no timed target).
    Census,
    /// What host mode costs memtrace watching fifty processes.
    Host,
    /// How often first touch names the leaking line (no timed target).
    FirstTouch,
}

#[derive(Clone, PartialEq)]
pub enum Kind {
    /// `bench/workload.py ITERATIONS DEPTH`.
    Micro { depth: u32 },
    /// `bench/pyperformance_loop.py NAME LOOPS`.
    Pyperformance,
    /// `bench/flask_app.py PORT`, sent `size` requests.
    Flask,
}

/// One workload and the configurations it runs under.
pub struct Workload {
    pub name: String,
    pub kind: Kind,
    /// Loop iterations, pyperformance loops or requests in one run untraced.
    pub size: u64,
    pub configs: Vec<Config>,
}

impl Workload {
    pub fn group(&self) -> Group {
        match self.kind {
            Kind::Micro { .. } => Group::Micro,
            Kind::Pyperformance => Group::Pyperformance,
            Kind::Flask => Group::Flask,
        }
    }

    /// The script and its arguments, for a run of `size`; `port` is the
    /// service's.
    pub fn args(&self, bench_dir: &Path, size: u64, port: u16) -> Vec<String> {
        let script = |name: &str| bench_dir.join(name).display().to_string();
        match self.kind {
            Kind::Micro { depth } => vec![script("workload.py"), size.to_string(), depth.to_string()],
            Kind::Pyperformance => vec![script("pyperformance_loop.py"), self.name.clone(), size.to_string()],
            Kind::Flask => vec![script("flask_app.py"), port.to_string()],
        }
    }

    /// Its configuration that `matches`, when it runs one.
    pub fn position(&self, matches: impl Fn(Config) -> bool) -> Option<usize> {
        self.configs.iter().position(|&c| matches(c))
    }
}

pub fn start_workload(cmd: &mut Command) -> Result<Target> {
    let mut target = Target::try_spawn(cmd)?;
    target.wait_line("ready", RUN_TIMEOUT, |line| line == "ready")?;
    Ok(target)
}

/// What to run: the selected groups' workloads, each under every
/// configuration in `configs` it has (the deep microbenchmark only under
/// the probing ones: it measures the frame walk). `loops` holds the
/// calibrated loop count of each selected pyperformance benchmark.
pub fn workloads(
    groups: &[Group],
    configs: &[Config],
    iterations: u64,
    loops: &[(String, u64)],
    requests: u64,
) -> Vec<Workload> {
    let mut out = Vec::new();
    let mut add = |name: &str, kind: Kind, size: u64, keep: &dyn Fn(Config) -> bool| {
        let configs = configs.iter().copied().filter(|&c| keep(c)).collect();
        out.push(Workload { name: name.into(), kind, size, configs });
    };
    if groups.contains(&Group::Micro) {
        add("shallow", Kind::Micro { depth: 1 }, iterations, &|c| !matches!(c, Config::Type { .. }));
        add("deep", Kind::Micro { depth: DEEP_DEPTH }, iterations, &|c| c == Config::Untraced || c.on_probes());
    }
    if groups.contains(&Group::Pyperformance) {
        for (name, loops) in loops {
            add(name, Kind::Pyperformance, *loops, &|c| {
                !matches!(c, Config::Type { .. }) || c.traced_class(name).is_some()
            });
        }
    }
    if groups.contains(&Group::Flask) {
        add("flask", Kind::Flask, requests, &|c| !matches!(c, Config::Type { .. }));
    }
    out
}
