//! Host mode's look at one process, and the scan of /proc that looks at
//! every process: is it a CPython process whose command line matches
//! `--match`, one memtrace cannot watch (an unsupported interpreter, one
//! memtrace may not read: kept with the reason, so reports can count and
//! name it instead of dropping it silently), not Python, or not decided
//! yet (just exec'd, its dynamic loader has not mapped libpython yet). One
//! that exits while it is looked at is simply gone.

use std::{collections::BTreeMap, fs, time::Duration};

use regex::Regex;

use super::{Target, proc_maps::MemoryMap};
use crate::python::{self, Detection, Interpreter};

/// What a look at one process found.
pub enum Examined {
    Python(Target, Box<Interpreter>),
    /// A user-space process, matching, that is not Python (`--all` watches
    /// these too).
    Native(Target),
    /// Python, but not watchable, and why.
    Unsupported(String),
    /// Not matching, or a kernel thread.
    Other,
    /// Too early to say: only the program and its dynamic loader are
    /// mapped, libpython may be next.
    NotYet,
    Gone,
}

/// Looks at `pid`: its command line against `matches`, then its mappings.
pub fn examine(pid: u32, matches: Option<&Regex>) -> Examined {
    // A kernel thread or a zombie has no command line, nor has a process
    // whose memory is being torn down as it exits.
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else { return Examined::Gone };
    if raw.is_empty() {
        return if Target::is_alive(pid) && !exiting(pid) { Examined::Other } else { Examined::Gone };
    }
    if matches.is_some_and(|re| !re.is_match(&command_line(&raw))) {
        return Examined::Other;
    }
    let target = match Target::open(pid) {
        Ok(target) => target,
        Err(_) if !Target::is_alive(pid) || exiting(pid) => return Examined::Gone,
        Err(e) => return Examined::Unsupported(format!("{e:#}")),
    };
    match python::detect(&target) {
        Ok(Detection::Supported(interpreter)) => Examined::Python(target, interpreter),
        Ok(Detection::Unsupported(reason)) => Examined::Unsupported(reason),
        Ok(Detection::NotPython) if loader_at_work(&target.map) => Examined::NotYet,
        // Its mappings may have gone with its memory.
        Ok(Detection::NotPython) if exiting(pid) => Examined::Gone,
        Ok(Detection::NotPython) => Examined::Native(target),
        // Gone while it was read: not a process any more.
        Err(_) if !Target::is_alive(pid) => Examined::Gone,
        Err(e) => Examined::Unsupported(format!("{e:#}")),
    }
}

/// A command line as /proc/PID/cmdline holds it (NUL-separated), as one
/// line.
pub fn command_line(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).replace('\0', " ").trim_end().to_owned()
}

/// Whether the dynamic loader has yet to map the program's libraries: the
/// program and the loader are its only files. Once they are mapped (the
/// loader maps every needed library before it runs any code), a process
/// without libpython is not Python.
fn loader_at_work(map: &MemoryMap) -> bool {
    let files = map.executable_files();
    files.len() <= 2 && files.iter().any(|f| f.rsplit('/').next().is_some_and(|n| n.starts_with("ld-")))
}

/// What a scan found, by pid.
#[derive(Default)]
pub struct Scan {
    /// Processes running a CPython memtrace reads.
    pub python: Vec<u32>,
    /// Python processes it cannot watch, and why.
    pub skipped: BTreeMap<u32, String>,
    /// Matching processes that are not Python.
    pub native: Vec<u32>,
    /// Processes that do not match, or kernel threads.
    pub others: Vec<u32>,
    /// Processes too young to say (see [`Examined::NotYet`]).
    pub not_yet: Vec<u32>,
}

/// Scans /proc for CPython processes whose command line `matches` (all of
/// them without a pattern), leaving out memtrace itself, `known` pids, and
/// those younger than `younger_than` (left to the kernel's announcements).
pub fn scan(matches: Option<&Regex>, known: impl Fn(u32) -> bool, younger_than: Duration) -> Scan {
    let mut scan = Scan::default();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else { return scan };
    let mut pids: Vec<u32> = entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    for pid in pids.into_iter().filter(|&pid| pid != me && !known(pid)) {
        if !younger_than.is_zero() && age(pid).is_none_or(|age| age < younger_than) {
            continue;
        }
        match examine(pid, matches) {
            Examined::Python(..) => scan.python.push(pid),
            Examined::Unsupported(reason) => {
                scan.skipped.insert(pid, reason);
            }
            Examined::Native(_) => scan.native.push(pid),
            Examined::Other => scan.others.push(pid),
            Examined::NotYet => scan.not_yet.push(pid),
            Examined::Gone => {}
        }
    }
    scan
}

/// Set in /proc/PID/stat's flags once a task has begun to exit
/// (include/linux/sched.h).
const PF_EXITING: u64 = 0x4;

/// Whether process `pid` is exiting (or gone): what fails to be read of it
/// then is not worth saying.
pub fn exiting(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return true };
    // Field 9, flags; fields after comm (which ends at the last ')') start
    // at field 3.
    let flags = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok());
    flags.is_none_or(|flags| flags & PF_EXITING != 0)
}

/// How long ago process `pid` started (was forked).
fn age(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, starttime, in clock ticks since boot; fields after comm
    // (which ends at the last ')') start at field 3.
    let ticks: u64 = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf takes a constant and returns a number.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    let now = Duration::new(now.tv_sec as u64, now.tv_nsec as u32);
    now.checked_sub(Duration::from_millis(ticks * 1000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Python started here is found, by its command line; memtrace (this
    /// test) is not Python and is never listed.
    #[test]
    fn finds_a_python_process_by_its_command_line() {
        let python = "/root/.pyenv/versions/3.12.1/bin/python";
        let mut child = std::process::Command::new(python)
            .args(["-c", "import sys; sys.stdin.read()", "discovery-marker"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let marker = Regex::new("discovery-marker").unwrap();
        // Until the interpreter is mapped, it is not Python yet.
        let found = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            scan(Some(&marker), |_| false, Duration::ZERO).python == [pid]
        });
        assert!(found, "pid {pid} found");
        assert!(
            scan(Some(&Regex::new("no-such-marker-anywhere").unwrap()), |_| false, Duration::ZERO).python.is_empty()
        );
        assert!(!scan(Some(&marker), |p| p == pid, Duration::ZERO).python.contains(&pid));
        // Left to the kernel's announcements while it is young.
        assert!(scan(Some(&marker), |_| false, Duration::from_secs(3600)).python.is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
