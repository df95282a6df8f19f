//! Host mode's account of every process on the host, kept from the
//! kernel's fork, exec and exit announcements: which are being looked at
//! (just started: pending until their interpreter is mapped), which are
//! not Python (until they exec), which are Python but cannot be watched.
//! Whatever was Python and exited before memtrace could read it is counted
//! and named, never silently dropped. The session watches what this finds;
//! a /proc scan at every report is only a safety net, and what it finds
//! that the announcements missed is counted.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use memtrace_common::ProcessEvent;
use regex::Regex;

use super::discovery::{self, Examined, command_line};

/// How long a process that looks like a dynamically linked program still
/// being loaded is looked at again before it is taken as not Python.
const PENDING_AT_MOST: Duration = Duration::from_secs(2);

/// Processes younger than this are left to the announcements by the
/// safety-net scan: theirs may still be on the way.
const SCAN_SPARES: Duration = Duration::from_secs(1);

/// A process announced but not decided yet.
struct Pending {
    since: Instant,
    /// Its command line as its exec announced it, else its name.
    name: String,
    /// Whether it would count as a (matching) Python process if it
    /// vanished before it could be read.
    looks_python: bool,
}

/// What host mode has seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCounts {
    /// Python processes the kernel announced (forks and execs) once they
    /// were found to be Python, whether or not they could be watched.
    pub announced: u64,
    /// Python processes that exited before they could be read.
    pub vanished: u64,
    /// Python processes the safety-net scan found that no announcement had.
    pub missed: u64,
    /// Announcements the kernel's ring had no room for.
    pub events_lost: u64,
}

/// What to do about a process.
pub enum Decision {
    /// With its interpreter, or none for a native process (`--all`).
    Watch(crate::process::Target, Option<Box<crate::python::Interpreter>>),
    /// Python that cannot be watched: said once.
    Skip(u32, String),
    /// Exited before it could be read: said, and counted.
    Vanished(u32, String),
}

#[derive(Default)]
pub struct Host {
    matching: Option<Regex>,
    /// `--all`: native processes are watched too.
    native: bool,
    pending: BTreeMap<u32, Pending>,
    /// Not (matching) Python, until they exec.
    others: HashSet<u32>,
    /// Python processes that cannot be watched, and why.
    skipped: BTreeMap<u32, String>,
    pub counts: HostCounts,
}

impl Host {
    pub fn new(matching: Option<Regex>, native: bool) -> Self {
        Self { matching, native, ..Self::default() }
    }

    /// Whether `pid` is accounted for here.
    fn knows(&self, pid: u32) -> bool {
        self.pending.contains_key(&pid) || self.others.contains(&pid) || self.skipped.contains_key(&pid)
    }

    /// The scan of /proc: at start everything, later (`safety_net`) what
    /// no announcement told of, counted as missed when it is Python.
    /// Returns the processes to watch: Python, and with `--all` native.
    pub fn scan(&mut self, watched: impl Fn(u32) -> bool, safety_net: bool) -> (Vec<u32>, Vec<Decision>) {
        let spare = if safety_net { SCAN_SPARES } else { Duration::ZERO };
        let mut scan = discovery::scan(self.matching.as_ref(), |pid| watched(pid) || self.knows(pid), spare);
        self.others.extend(scan.others);
        if self.native {
            scan.python.append(&mut scan.native);
        } else {
            self.others.extend(scan.native);
        }
        for pid in scan.not_yet {
            self.pending.insert(pid, Pending { since: Instant::now(), name: String::new(), looks_python: false });
        }
        let mut decisions = Vec::new();
        for (pid, reason) in scan.skipped {
            self.skipped.insert(pid, reason.clone());
            decisions.push(Decision::Skip(pid, reason));
        }
        if safety_net {
            self.counts.missed += scan.python.len() as u64;
        }
        (scan.python, decisions)
    }

    /// Takes in one announcement. A watched process's exec is the session's
    /// to end first; here it becomes pending like any other.
    pub fn announced(&mut self, event: &ProcessEvent, watched: impl Fn(u32) -> bool) -> Option<Decision> {
        let comm = String::from_utf8_lossy(event.comm.split(|&b| b == 0).next().unwrap_or_default()).into_owned();
        match event.kind {
            ProcessEvent::FORK => {
                let (parent, child) = (event.pid, event.child);
                // A child runs its parent's image until it execs.
                if self.others.contains(&parent) {
                    self.others.insert(child);
                } else if let Some(reason) = self.skipped.get(&parent).cloned() {
                    self.skipped.insert(child, reason.clone());
                    return Some(Decision::Skip(child, reason));
                } else {
                    let looks_python = watched(parent) || self.pending.get(&parent).is_some_and(|p| p.looks_python);
                    self.pending.insert(child, Pending { since: Instant::now(), name: comm, looks_python });
                }
                None
            }
            ProcessEvent::EXEC => {
                let pid = event.pid;
                self.others.remove(&pid);
                self.skipped.remove(&pid);
                let args = &event.args[..(event.args_len as usize).min(event.args.len())];
                let name = if args.is_empty() { comm.clone() } else { command_line(args) };
                let program = name.split(' ').next().unwrap_or_default().rsplit('/').next().unwrap_or_default();
                let looks_python = (comm.contains("python") || program.contains("python"))
                    && self.matching.as_ref().is_none_or(|re| re.is_match(&name));
                self.pending.insert(pid, Pending { since: Instant::now(), name, looks_python });
                None
            }
            ProcessEvent::EXIT => {
                let pid = event.pid;
                self.others.remove(&pid);
                self.skipped.remove(&pid);
                self.pending.remove(&pid).and_then(|p| self.vanished(pid, p))
            }
            _ => None,
        }
    }

    /// Whether any process waits to be looked at again.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The pending processes, to be [`Host::examine`]d.
    pub fn pending(&self) -> Vec<u32> {
        self.pending.keys().copied().collect()
    }

    /// Looks at pending process `pid` again: a decision, or none yet (or
    /// none needed: not Python).
    pub fn examine(&mut self, pid: u32) -> Option<Decision> {
        let examined = discovery::examine(pid, self.matching.as_ref());
        let pending = self.pending.get(&pid)?;
        match examined {
            Examined::NotYet if pending.since.elapsed() < PENDING_AT_MOST => None,
            Examined::Native(target) if self.native => {
                self.pending.remove(&pid);
                Some(Decision::Watch(target, None))
            }
            Examined::NotYet | Examined::Other | Examined::Native(_) => {
                self.pending.remove(&pid);
                self.others.insert(pid);
                None
            }
            Examined::Gone => {
                let pending = self.pending.remove(&pid)?;
                self.vanished(pid, pending)
            }
            Examined::Unsupported(reason) => {
                self.pending.remove(&pid);
                self.skipped.insert(pid, reason.clone());
                Some(Decision::Skip(pid, reason))
            }
            Examined::Python(target, interpreter) => {
                self.pending.remove(&pid);
                self.counts.announced += 1;
                Some(Decision::Watch(target, Some(interpreter)))
            }
        }
    }

    /// A watched process that exited before it could be read.
    pub fn watch_failed(&mut self, pid: u32, name: &str) -> Decision {
        self.counts.vanished += 1;
        Decision::Vanished(pid, name.to_owned())
    }

    fn vanished(&mut self, pid: u32, pending: Pending) -> Option<Decision> {
        if !pending.looks_python {
            return None;
        }
        self.counts.vanished += 1;
        Some(Decision::Vanished(pid, pending.name))
    }
}
