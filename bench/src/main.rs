//! `cargo xtask bench [OPTIONS]`: what tracing costs the traced process.
//! Three parts, each timed untraced, under memtrace attached from outside
//! (default options, `--frames 1`, `--census-only`), under the kernel's
//! floor (bpftrace with empty, counting probes at memtrace's own attach
//! points, learned from `memtrace --verbose`), under `python -X
//! tracemalloc=1` and under memray with and without
//! `--trace-python-allocators`: an allocation-heavy CPython loop
//! (bench/workload.py, also 20 Python frames deep for the cost of the frame
//! walk), a subset of pyperformance's benchmarks, each one's own function
//! in a loop in one process (bench/pyperformance_loop.py), and a Flask app
//! under a fixed client (bench/flask_app.py, bench/src/service.rs); then
//! what a census costs memtrace itself, what host mode costs it watching
//! fifty processes, and how often first touch names a leaking line
//! (bench/first_touch.py, bench/src/first_touch.rs). Every configuration runs N
//! times, interleaved so that the machine's noise falls on all of them
//! alike, and the medians go to tables on stdout and to BENCHMARKS.md,
//! which this crate regenerates wholesale. A tool that cannot run fails the
//! bench with one line: a comparison with a peer missing would read as a
//! complete one. xtask builds memtrace and then runs this crate, which
//! links memtrace's library and so cannot be part of xtask. Its jobs:
//! `setup` (tools, the venv, the bpftrace shim, probe discovery,
//! calibration), `workload` (what runs), `harness` (the interleaved, timed
//! runs), `service` (the web client), `census` (the census's own cost),
//! `host` (host mode's own cost) and
//! `report` (medians, tables, BENCHMARKS.md from bench/template.md).

mod census;
mod first_touch;
mod harness;
mod host;
mod program_stats;
mod report;
mod service;
mod setup;
mod workload;

use std::{fs, path::Path, path::PathBuf, process::Command, process::ExitCode};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use memtrace_tests::workspace_root;

use crate::{
    harness::Config,
    workload::{Group, PYPERFORMANCE},
};

/// What tracing costs the traced process; writes BENCHMARKS.md.
#[derive(Parser)]
#[command(name = "cargo xtask bench")]
struct Options {
    /// Runs of every configuration, interleaved.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
    /// Loop iterations of the microbenchmark (about 0.3 s untraced).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    iterations: u64,
    /// Requests the client sends the Flask app per run.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Parts to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Group>,
    /// pyperformance benchmarks to run, comma-separated (default: the whole
    /// subset).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(PYPERFORMANCE))]
    benchmarks: Vec<String>,
    /// Configurations to run besides untraced, comma-separated: memtrace,
    /// frames1, floor, census, all-python, tracemalloc, memray,
    /// memray-python-allocators (default: all).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(config_names()))]
    configs: Vec<String>,
    /// Where the document goes [default: BENCHMARKS.md for a whole run,
    /// target/bench/BENCHMARKS.md for a partial one].
    #[arg(long)]
    output: Option<PathBuf>,
}

fn config_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = Config::ALL.iter().map(|c| c.name()).collect();
    names.dedup();
    names
}

fn main() -> ExitCode {
    let options = Options::parse();
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: &Options) -> Result<()> {
    let whole = options.only.is_empty() && options.benchmarks.is_empty() && options.configs.is_empty();
    let groups = if options.only.is_empty() {
        vec![Group::Micro, Group::Pyperformance, Group::Flask, Group::Census, Group::Host, Group::FirstTouch]
    } else {
        options.only.clone()
    };
    let benchmarks: Vec<String> = match (groups.contains(&Group::Pyperformance), options.benchmarks.is_empty()) {
        (false, true) => vec![],
        (false, false) => bail!("--benchmarks chooses pyperformance benchmarks, but --only leaves pyperformance out"),
        (true, true) => PYPERFORMANCE.iter().map(|&b| b.to_owned()).collect(),
        (true, false) => options.benchmarks.clone(),
    };
    let configs: Vec<Config> = Config::ALL
        .into_iter()
        .filter(|c| {
            *c == Config::Untraced || options.configs.is_empty() || options.configs.iter().any(|n| n == c.name())
        })
        .collect();
    let root = workspace_root();
    let setup = setup::prepare(&root, &benchmarks)?;
    let workloads = workload::workloads(&groups, &configs, options.iterations, &setup.loops, options.requests);
    let samples = harness::run(&setup, &workloads, options.repeat)?;
    let census_costs = match groups.contains(&Group::Census) {
        true => Some(census::measure(&setup.memtrace, &[&setup.python, Path::new("/usr/bin/python3.11")])?),
        false => None,
    };
    let host_costs = match groups.contains(&Group::Host) {
        true => Some(host::measure(&setup.memtrace, &setup.python)?),
        false => None,
    };
    let accuracy = match groups.contains(&Group::FirstTouch) {
        true => Some(first_touch::measure(&setup.memtrace, &setup.python, &setup.bench_dir)?),
        false => None,
    };
    let parts = report::results(
        &workloads,
        &samples,
        &setup.points,
        census_costs.as_deref(),
        host_costs.as_deref(),
        accuracy.as_deref(),
    );
    for part in &parts {
        if let Some(text) = &part.text {
            println!("## {}\n\n{text}\n", part.title);
        }
    }
    let scope = report::Scope { repeat: options.repeat, iterations: options.iterations, requests: options.requests };
    let document = report::document(&setup, &scope, &parts)?;
    let path = match (&options.output, whole) {
        (Some(path), _) => path.clone(),
        (None, true) => root.join("BENCHMARKS.md"),
        (None, false) => root.join("target/bench/BENCHMARKS.md"),
    };
    fs::write(&path, document).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

/// Runs `cmd` to completion and returns its stdout; fails with its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
