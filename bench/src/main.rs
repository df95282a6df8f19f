//! `cargo xtask bench [--repeat N] [--iterations N]`: what tracing costs the
//! traced process. One allocation-heavy CPython loop (bench/workload.py) is
//! timed by the script itself, untraced, under memtrace attached from
//! outside (default options and `--frames 1`), under the kernel's floor
//! (bpftrace with empty, counting probes at memtrace's own attach points,
//! learned from `memtrace --verbose`), under `python -X tracemalloc=1` and
//! under memray with and without `--trace-python-allocators`; then the same
//! loop 20 Python frames deep, for the cost of the frame walk. Every
//! configuration runs N times, interleaved so that the machine's noise falls
//! on all of them alike, and the medians go to a table on stdout and to
//! BENCHMARKS.md, which this crate regenerates wholesale. A tool that cannot
//! run fails the bench with one line: a comparison with a peer missing would
//! read as a complete one. xtask builds memtrace and then runs this crate,
//! which links memtrace's library and so cannot be part of xtask. Its jobs:
//! `setup` (tools, the memray venv, the bpftrace shim, probe discovery),
//! `harness` (the interleaved, timed runs) and `report` (medians, tables,
//! BENCHMARKS.md from bench/template.md).

mod census;
mod harness;
mod report;
mod setup;
mod workload;

use std::{fs, path::Path, process::Command, process::ExitCode};

use anyhow::{Context as _, Result, bail, ensure};
use memtrace_tests::workspace_root;

const USAGE: &str = "usage: cargo xtask bench [--repeat N] [--iterations N]";
const DEFAULT_REPEAT: u64 = 5;
/// About 0.4 s untraced on the machine this was written on.
const DEFAULT_ITERATIONS: u64 = 1_000_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let (repeat, iterations) = parse_args(args)?;
    let root = workspace_root();
    let setup = setup::prepare(&root, iterations)?;
    let samples = harness::run(&setup, repeat)?;
    let debian = Path::new("/usr/bin/python3.11");
    let census = census::measure(&setup.memtrace, &[&setup.python, debian])?;
    let results = format!("{}\n{}", report::results(&setup.points, &samples), report::census(&census));
    println!("{results}");
    let document = report::document(&setup, repeat, &results)?;
    let path = root.join("BENCHMARKS.md");
    fs::write(&path, document).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

fn parse_args(args: &[String]) -> Result<(u64, u64)> {
    let mut repeat = DEFAULT_REPEAT;
    let mut iterations = DEFAULT_ITERATIONS;
    let mut args = args.iter().filter(|a| *a != "--");
    while let Some(arg) = args.next() {
        let target = match arg.as_str() {
            "--repeat" => &mut repeat,
            "--iterations" => &mut iterations,
            other => bail!("unknown argument `{other}`; {USAGE}"),
        };
        *target = args
            .next()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &u64| n > 0)
            .with_context(|| format!("{arg} needs a positive whole number; {USAGE}"))?;
    }
    Ok((repeat, iterations))
}

/// Runs `cmd` to completion and returns its stdout; fails with its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
