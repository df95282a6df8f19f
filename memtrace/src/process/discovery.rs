//! Host mode's discovery: every CPython process on the host (every
//! process, with `--all`), found by a scan of /proc (at start, and again at
//! every report, so that one started later is found within an interval),
//! narrowed by `--match` on its command line. A process that is Python but cannot be watched (an unsupported
//! interpreter, one memtrace may not read) is kept with the reason, so
//! reports can count and name it instead of dropping it silently; one that
//! exits while it is looked at is simply not there.

use std::{collections::BTreeMap, fs};

use regex::Regex;

use super::Target;
use crate::python::{self, Detection};

/// What a scan found, by pid.
#[derive(Default)]
pub struct Scan {
    /// Processes running a CPython memtrace reads (or any, with `native`).
    pub watchable: Vec<u32>,
    /// Python processes it cannot watch, and why.
    pub skipped: BTreeMap<u32, String>,
}

/// Scans /proc for CPython processes whose command line `matches` (all of
/// them without a pattern), and with `native` for the other processes as
/// well, leaving out memtrace itself and `known` pids.
pub fn scan(matches: Option<&Regex>, native: bool, known: impl Fn(u32) -> bool) -> Scan {
    let mut scan = Scan::default();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else { return scan };
    let mut pids: Vec<u32> = entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    for pid in pids.into_iter().filter(|&pid| pid != me && !known(pid)) {
        // A kernel thread or a zombie has no command line.
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if raw.is_empty() {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if matches.is_some_and(|re| !re.is_match(cmdline.trim_end())) {
            continue;
        }
        let Ok(target) = Target::open(pid) else { continue };
        match python::detect(&target) {
            Ok(Detection::Supported(_)) => scan.watchable.push(pid),
            Ok(Detection::Unsupported(reason)) => {
                scan.skipped.insert(pid, reason);
            }
            Ok(Detection::NotPython) if native => scan.watchable.push(pid),
            Ok(Detection::NotPython) => {}
            // Gone while it was read: not a process any more.
            Err(_) if !Target::is_alive(pid) => {}
            Err(e) => {
                scan.skipped.insert(pid, format!("{e:#}"));
            }
        }
    }
    scan
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
        // Until the interpreter is mapped, it is not Python yet.
        let found = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            scan(Some(&Regex::new("discovery-marker").unwrap()), false, |_| false).watchable == [pid]
        });
        assert!(found, "pid {pid} found");
        assert!(scan(Some(&Regex::new("no-such-marker-anywhere").unwrap()), false, |_| false).watchable.is_empty());
        assert!(!scan(Some(&Regex::new("discovery-marker").unwrap()), false, |p| p == pid).watchable.contains(&pid));
        // With --all, a native process is watched too; without, it is not.
        let mut sleeper = std::process::Command::new("sleep").args(["30", "discovery-marker-native"]).spawn().unwrap();
        let native = Regex::new("discovery-marker-native").unwrap();
        assert_eq!(scan(Some(&native), true, |_| false).watchable, [sleeper.id()]);
        assert!(scan(Some(&native), false, |_| false).watchable.is_empty());
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
