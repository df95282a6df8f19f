//! The bench's workload (bench/workload.py) as a process: it prints
//! `ready`, starts its loop on a line on stdin, prints `elapsed SECONDS`,
//! then waits for stdin to close. Setup runs it to learn memtrace's probes;
//! the harness runs it to time them.

use std::{process::Command, time::Duration};

use anyhow::Result;
use memtrace_tests::Target;

/// Longer than any workload start, loop or tracer detach takes: past it, a
/// run has hung and fails the bench rather than stall it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(600);

pub fn start_workload(cmd: &mut Command) -> Result<Target> {
    let mut target = Target::try_spawn(cmd)?;
    target.wait_line("ready", RUN_TIMEOUT, |line| line == "ready")?;
    Ok(target)
}
