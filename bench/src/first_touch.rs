//! How often first touch names the leak: bench/first_touch.py leaks from
//! one line while it churns (one object at a time in another size class;
//! whole lists in another class, which empties pools that the leak then
//! reuses; whole lists in the leak's own class), watched by `memtrace
//! --census-only` (the free tier: census and first touch) for REPORTS
//! reports; counted is how many reports rank the leaking line first among
//! the places that first touched new resident pages since the report
//! before, and the faults walked and skipped.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use memtrace_tests::{JsonReport, Memtrace};

use crate::workload::start_workload;

/// The churns bench/first_touch.py runs, with what each says.
pub const MODES: [(&str, &str); 3] = [
    ("transient", "churn in another size class, one object at a time"),
    ("separate", "churn in another size class, whole lists (pools emptied)"),
    ("same", "churn in the leak's own size class, whole lists"),
];
/// Reports per workload, and how many first ones are left out (the
/// interpreter's start-up).
const REPORTS: u32 = 20;
const WARM_UP: usize = 2;
const INTERVAL: &str = "0.5";

pub struct Accuracy {
    pub mode: &'static str,
    pub what: &'static str,
    pub reports: usize,
    /// Reports that rank the leaking line first.
    pub leak_first: usize,
    /// The place most often first otherwise, and how often.
    pub instead: Option<(String, usize)>,
    /// The last report's first-touch counters.
    pub counters: BTreeMap<String, u64>,
}

pub fn measure(memtrace: &Path, python: &Path, bench_dir: &Path) -> Result<Vec<Accuracy>> {
    let script = bench_dir.join("first_touch.py");
    let source = std::fs::read_to_string(&script).with_context(|| format!("cannot read {}", script.display()))?;
    let line = source.lines().position(|l| l.contains("# the leak")).context("no leak line in first_touch.py")? + 1;
    let leak = format!("{}:{line}", script.display());
    MODES.iter().map(|&(mode, what)| measure_one(memtrace, python, &script, &leak, mode, what)).collect()
}

fn measure_one(
    memtrace: &Path,
    python: &Path,
    script: &Path,
    leak: &str,
    mode: &'static str,
    what: &'static str,
) -> Result<Accuracy> {
    // Killed when dropped, once the reports are in.
    let target = start_workload(Command::new(python).arg(script).arg(mode))?;
    let pid = target.pid().to_string();
    let count = REPORTS.to_string();
    let args = ["--pid", &pid, "--census-only", "--interval", INTERVAL, "--count", &count, "--format", "json"];
    let watching = Memtrace::try_attach(memtrace, &args, Duration::from_secs(120))?;
    let (status, stdout, _) = watching.finish();
    drop(target);
    if !status.success() {
        bail!("memtrace --census-only failed on the {mode} workload: {status}");
    }
    let reports: Vec<JsonReport> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let firsts: Vec<Option<String>> = reports
        .iter()
        .skip(WARM_UP)
        .map(|r| r.first_touch.as_ref().and_then(|t| t.rows.first()).map(|row| row.location.clone()))
        .collect();
    let Some(counters) = reports.last().and_then(|r| r.first_touch.as_ref()).map(|t| t.counters.clone()) else {
        bail!("memtrace reported no first touch of the {mode} workload (it needs CAP_BPF and CAP_PERFMON)");
    };
    let mut others: BTreeMap<String, usize> = BTreeMap::new();
    for first in firsts.iter().flatten().filter(|f| *f != leak) {
        *others.entry(first.clone()).or_default() += 1;
    }
    Ok(Accuracy {
        mode,
        what,
        reports: firsts.len(),
        leak_first: firsts.iter().filter(|f| f.as_deref() == Some(leak)).count(),
        instead: others.into_iter().max_by_key(|(_, n)| *n),
        counters,
    })
}
