//! What a census costs memtrace: processes holding a known population (a
//! million instances of a class, each with an int of its own) are
//! censused four times by `memtrace --census-only`, which times each census
//! itself; the median, per million objects counted, on each interpreter.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Result, bail};
use memtrace_tests::{JsonReport, Memtrace};

use crate::workload::start_workload;

/// Objects of the class the population script keeps.
const INSTANCES: u64 = 1_000_000;
/// Keeps the instances, then waits on stdin (the bench's workload protocol).
const POPULATION: &str = "import sys
class MyObject:
    def __init__(self, i): self.i = i
keep = [MyObject(i) for i in range(1_000_000)]
print('ready', flush=True)
sys.stdin.readline()
";

pub struct CensusCost {
    pub python: String,
    /// Objects one census counted: on the GC's lists and in pymalloc's pools.
    pub objects: u64,
    /// Each census's own time, in milliseconds.
    pub took_ms: Vec<u64>,
}

pub fn measure(memtrace: &Path, pythons: &[&Path]) -> Result<Vec<CensusCost>> {
    pythons.iter().map(|python| measure_one(memtrace, python)).collect()
}

fn measure_one(memtrace: &Path, python: &Path) -> Result<CensusCost> {
    // Killed when dropped, once the censuses are done.
    let target = start_workload(Command::new(python).args(["-c", POPULATION]))?;
    let pid = target.pid().to_string();
    let args = ["--pid", &pid, "--census-only", "--interval", "0.3", "--count", "4", "--format", "json"];
    let census = Memtrace::try_attach(memtrace, &args, Duration::from_secs(120))?;
    // It stops by itself after --count reports.
    let (status, stdout, _) = census.finish();
    drop(target);
    if !status.success() {
        bail!("memtrace --census-only failed on {}: {status}", python.display());
    }
    let reports: Vec<JsonReport> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let censuses: Vec<_> = reports.iter().filter_map(|r| r.census.as_ref()).collect();
    let Some(last) = censuses.last() else { bail!("memtrace printed no census of {}", python.display()) };
    if !last.incomplete.is_empty() || last.gc_tracked < INSTANCES {
        bail!("the census of {} is not of the population: {:?}", python.display(), last);
    }
    Ok(CensusCost {
        python: python.display().to_string(),
        objects: last.gc_tracked + last.gc_permanent + last.untracked,
        took_ms: censuses.iter().map(|c| c.took_ms).collect(),
    })
}
