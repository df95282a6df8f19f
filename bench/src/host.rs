//! What host mode costs memtrace itself: fifty Python processes, idle
//! (asleep, holding their start-up objects) and then busy (each making and
//! dropping objects all the time, 20,000 of them kept), watched by
//! `memtrace --all-python` at its default interval; memtrace's CPU over a
//! minute after it found them all (utime + stime from /proc/PID/stat, as a
//! share of one core) and its resident memory then and at its peak
//! (VmRSS, VmHWM).

use std::{
    fs,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use memtrace_tests::{Memtrace, Target};

use crate::workload::start_workload;

/// Processes watched.
pub const PROCESSES: usize = 50;
/// How long memtrace's CPU is measured, after it found every process.
pub const WINDOW: Duration = Duration::from_secs(60);
const IDLE: &str = "import sys, time
print('ready', flush=True)
while True:
    time.sleep(1)
";
const BUSY: &str = "import sys, time
print('ready', flush=True)
keep = [object() for _ in range(20_000)]
while True:
    for _ in range(100):
        scratch = [{'i': i} for i in range(1000)]
    time.sleep(0.01)
";

pub struct HostCost {
    pub busy: bool,
    pub processes: usize,
    /// memtrace's CPU over WINDOW, as a share of one core.
    pub cpu_share: f64,
    pub rss: u64,
    pub peak_rss: u64,
    /// Host reports written during the window.
    pub reports: usize,
}

pub fn measure(memtrace: &std::path::Path, python: &std::path::Path) -> Result<Vec<HostCost>> {
    [false, true].into_iter().map(|busy| measure_one(memtrace, python, busy)).collect()
}

fn measure_one(memtrace: &std::path::Path, python: &std::path::Path, busy: bool) -> Result<HostCost> {
    let marker = format!("memtrace-bench-host-{}", std::process::id());
    // Killed when dropped, once measured.
    let targets: Vec<Target> = (0..PROCESSES)
        .map(|_| start_workload(Command::new(python).args(["-c", if busy { BUSY } else { IDLE }, &marker])))
        .collect::<Result<_>>()?;
    let pattern = format!("{marker}$");
    let mut watching = Memtrace::try_attach(
        memtrace,
        &["--all-python", "--match", &pattern, "--format", "json"],
        Duration::from_secs(120),
    )?;
    for target in &targets[1..] {
        watching.wait_stderr(&format!("{}{} ", Memtrace::TRACING, target.pid()))?;
    }
    let pid = watching.pid();
    let started = (Instant::now(), cpu_ticks(pid)?);
    std::thread::sleep(WINDOW);
    let (elapsed, ticks) = (started.0.elapsed(), cpu_ticks(pid)? - started.1);
    let status = fs::read_to_string(format!("/proc/{pid}/status")).context("cannot read memtrace's status")?;
    let kib = |field: &str| -> Result<u64> {
        let line = status.lines().find_map(|l| l.strip_prefix(field)).with_context(|| format!("no {field}"))?;
        Ok(line.trim().trim_end_matches(" kB").trim().parse::<u64>()? * 1024)
    };
    let (rss, peak_rss) = (kib("VmRSS:")?, kib("VmHWM:")?);
    let lines = watching.stop(Duration::from_secs(60))?;
    let reports = lines.iter().filter(|l| !l.stderr && l.text.starts_with(r#"{"report":"host""#)).count();
    if reports < 2 {
        bail!("memtrace wrote {reports} host reports in {WINDOW:?}");
    }
    drop(targets);
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(HostCost {
        busy,
        processes: PROCESSES,
        cpu_share: ticks as f64 / per_second / elapsed.as_secs_f64(),
        rss,
        peak_rss,
        reports,
    })
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).context("cannot read memtrace's stat")?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("no comm in stat")?.1.split_whitespace().collect();
    // After comm: state is field 3; utime and stime are fields 14 and 15.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}
