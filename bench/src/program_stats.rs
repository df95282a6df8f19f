//! Where a tracer's time goes inside the kernel: the run time and run count
//! of each of its BPF programs, from the kernel's own statistics
//! (BPF_ENABLE_STATS), over one timed part. The programs are the ones the
//! tracer's process holds (a `prog_id` in /proc/PID/fdinfo of a program or
//! link fd), so that another tracer on the machine does not mix in; the
//! kernel keeps the statistics per program, over all its attach points.

use std::{collections::BTreeMap, collections::BTreeSet, fs, os::fd::OwnedFd};

use anyhow::{Context as _, Result};
use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};

/// One program's totals: nanoseconds spent in it and times it ran.
#[derive(Clone, Copy, Default, Debug)]
pub struct RunTime {
    pub ns: u64,
    pub runs: u64,
}

/// Statistics being kept for one tracer over one timed part; the kernel
/// keeps them while any holder of an enabling fd keeps it open.
pub struct Counting {
    _enabled: OwnedFd,
    pid: u32,
    start: BTreeMap<u32, (String, RunTime)>,
}

impl Counting {
    /// Turns the statistics on and notes where the programs of the tracer
    /// `pid` stand.
    pub fn start(pid: u32) -> Result<Self> {
        let enabled = enable_stats(Stats::RunTime).context("cannot enable the kernel's BPF run-time statistics")?;
        let start = programs(pid)?;
        Ok(Self { _enabled: enabled, pid, start })
    }

    /// What each program (by name) ran since `start`; the statistics go
    /// off again unless someone else keeps them on.
    pub fn finish(self) -> Result<BTreeMap<String, RunTime>> {
        let mut spent: BTreeMap<String, RunTime> = BTreeMap::new();
        for (id, (name, now)) in programs(self.pid)? {
            let before = self.start.get(&id).map_or_else(RunTime::default, |(_, t)| *t);
            let total = spent.entry(name).or_default();
            total.ns += now.ns.saturating_sub(before.ns);
            total.runs += now.runs.saturating_sub(before.runs);
        }
        Ok(spent)
    }
}

/// The programs process `pid` holds, by id: name and statistics so far.
fn programs(pid: u32) -> Result<BTreeMap<u32, (String, RunTime)>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        // An fd closed since the listing has no fdinfo any more.
        let Ok(info) = fs::read_to_string(entry.with_context(|| format!("cannot list {dir}"))?.path()) else {
            continue;
        };
        ids.extend(info.lines().filter_map(|l| l.strip_prefix("prog_id:")?.trim().parse::<u32>().ok()));
    }
    let mut out = BTreeMap::new();
    for program in loaded_programs() {
        // A program unloaded during the listing is no longer the tracer's.
        let Ok(program) = program else { continue };
        if ids.contains(&program.id()) {
            let name = program.name_as_str().unwrap_or("?").to_owned();
            let time = RunTime { ns: program.run_time().as_nanos() as u64, runs: program.run_count() };
            out.insert(program.id(), (name, time));
        }
    }
    Ok(out)
}
