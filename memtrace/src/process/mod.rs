//! Discovery: the process to trace, validated before anything is attached.
//! A user's mistakes (a pid that does not exist, a kernel thread, a
//! statically linked program) are found here and named in one sentence.

pub mod memory;
pub mod proc_maps;
pub mod source;

use std::fs;

use anyhow::{Result, bail};

use self::proc_maps::MemoryMap;

/// Set in /proc/PID/stat's flags for kernel threads (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

pub struct Target {
    pub pid: u32,
    /// The pid inside the process's own pid namespace (what it calls
    /// itself in a container); equal to `pid` outside one.
    pub ns_pid: u32,
    /// The command name, for report headers.
    pub comm: String,
    pub map: MemoryMap,
}

impl Target {
    pub fn open(pid: u32) -> Result<Self> {
        let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat,
            Err(_) => bail!("no process with pid {pid}"),
        };
        // comm may contain spaces and parentheses: it ends at the last ')'.
        let (comm, rest) = stat
            .split_once('(')
            .and_then(|(_, s)| s.rsplit_once(')'))
            .ok_or_else(|| anyhow::anyhow!("cannot parse /proc/{pid}/stat"))?;
        // Fields after comm: state ppid pgrp session tty_nr tpgid flags ...
        let flags: u64 = rest.split_whitespace().nth(6).and_then(|f| f.parse().ok()).unwrap_or(0);
        if flags & PF_KTHREAD != 0 {
            bail!("pid {pid} ({comm}) is a kernel thread; memtrace traces user-space processes");
        }
        let map = MemoryMap::read(pid)?;
        if map.mappings.is_empty() {
            bail!("pid {pid} ({comm}) has no memory map (a zombie or a kernel thread?)");
        }
        let ns_pid = match fs::read_to_string(format!("/proc/{pid}/status")) {
            Ok(status) => ns_pid(&status)
                .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/status has no NSpid line memtrace can read"))?,
            Err(_) => bail!("no process with pid {pid}"),
        };
        Ok(Self { pid, ns_pid, comm: comm.to_owned(), map })
    }

    /// Whether the process still exists (and is not a zombie).
    pub fn is_alive(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])))
            .is_some_and(|dead| !dead)
    }
}

/// The last pid of status's `NSpid:` line: the process's pid in the
/// innermost pid namespace it belongs to (Linux 4.1 and later list one pid
/// per nested namespace, outermost first).
fn ns_pid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_namespace_names_the_pid() {
        assert_eq!(ns_pid("Name:\tpython\nNSpid:\t24733\nNSpgid:\t1\n"), Some(24733));
        assert_eq!(ns_pid("NSpid:\t24733\t41\t7\n"), Some(7));
        assert_eq!(ns_pid("Name:\tpython\n"), None);
        let me = Target::open(std::process::id()).unwrap();
        assert_eq!(me.ns_pid, me.pid, "the tests run outside a container");
    }
}
