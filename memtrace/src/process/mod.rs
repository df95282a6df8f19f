//! Discovery: the process to trace, validated before anything is attached.
//! A user's mistakes (a pid that does not exist, a kernel thread, a thread
//! id given for its process, a statically linked program) are found here
//! and named in one sentence.

pub mod discovery;
pub mod files;
pub mod host;
pub mod memory;
pub mod proc_maps;
pub mod source;

use std::fs;

use anyhow::{Result, bail};

use self::proc_maps::{MappedPaths, MemoryMap};
use crate::privileges::{self, Need};

/// Set in /proc/PID/stat's flags for kernel threads (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

pub struct Target {
    pub pid: u32,
    /// The pid inside the process's own pid namespace (what it calls
    /// itself in a container); equal to `pid` outside one.
    pub ns_pid: u32,
    /// The command name, for report headers.
    pub comm: String,
    /// Its cgroup v2 path (a container's name); None when unreadable.
    pub cgroup: Option<String>,
    /// In another pid or mount namespace than memtrace's: a container's.
    pub in_container: bool,
    pub map: MemoryMap,
    /// How the files its map names are reached from here.
    pub paths: MappedPaths,
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
        let status = match fs::read_to_string(format!("/proc/{pid}/status")) {
            Ok(status) => status,
            Err(_) => bail!("no process with pid {pid}"),
        };
        // /proc answers for thread ids too, though it lists only processes.
        let tgid = status_field(&status, "Tgid:").and_then(|t| t.parse::<u32>().ok());
        if let Some(tgid) = tgid.filter(|&tgid| tgid != pid) {
            let process = fs::read_to_string(format!("/proc/{tgid}/comm")).unwrap_or_default();
            bail!(
                "pid {pid} ({comm}) is a thread of process {tgid} ({}); memtrace traces whole processes: use --pid {tgid}",
                process.trim()
            );
        }
        let map = privileges::explain(MemoryMap::read(pid), Need::Reading)?;
        if map.mappings.is_empty() {
            bail!("pid {pid} ({comm}) has no memory map (a zombie or a kernel thread?)");
        }
        let ns_pid =
            ns_pid(&status).ok_or_else(|| anyhow::anyhow!("/proc/{pid}/status has no NSpid line memtrace can read"))?;
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok().and_then(|c| cgroup_path(&c));
        let namespace = |pid: &str, kind: &str| fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
        let in_container =
            ["pid", "mnt"].iter().any(|kind| namespace(&pid.to_string(), kind) != namespace("self", kind));
        Ok(Self { pid, ns_pid, comm: comm.to_owned(), cgroup, in_container, map, paths: MappedPaths::of(pid) })
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
    status_field(status, "NSpid:")?.split_whitespace().last()?.parse().ok()
}

/// The value of /proc/PID/status's line `name`, trimmed.
fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim)
}

/// The cgroup that names the process's container, from /proc/PID/cgroup:
/// the unified (v2) hierarchy's path, unless that is the root and a v1
/// hierarchy has the process somewhere else (hybrid hosts, where container
/// runtimes still use v1): then that one's, with its hierarchy's name.
fn cgroup_path(cgroup: &str) -> Option<String> {
    let hierarchies: Vec<(&str, &str)> =
        cgroup.lines().filter_map(|l| l.split_once(':')).filter_map(|(_, rest)| rest.split_once(':')).collect();
    let unified = hierarchies.iter().find(|(controllers, _)| controllers.is_empty()).map(|(_, path)| *path);
    match hierarchies.iter().find(|(controllers, path)| !controllers.is_empty() && *path != "/") {
        Some((controllers, path)) if unified.is_none_or(|u| u == "/") => Some(format!("{controllers}:{path}")),
        _ => unified.map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup_is_where_the_process_is_not_at_the_root() {
        let text = "12:memory:/docker/abc\n0::/system.slice/docker-abc.scope\n";
        assert_eq!(cgroup_path(text).as_deref(), Some("/system.slice/docker-abc.scope"));
        let hybrid = "9:name=systemd:/\n4:memory:/docker/abc\n1:cpu:/\n0::/\n";
        assert_eq!(cgroup_path(hybrid).as_deref(), Some("memory:/docker/abc"));
        assert_eq!(cgroup_path("4:cpu:/\n0::/\n").as_deref(), Some("/"));
        assert_eq!(cgroup_path("4:cpu:/x\n").as_deref(), Some("cpu:/x"));
        assert_eq!(cgroup_path(""), None);
        let me = Target::open(std::process::id()).unwrap();
        assert!(me.cgroup.is_some(), "every Linux since 2.6.24 has /proc/PID/cgroup");
    }

    #[test]
    fn the_innermost_namespace_names_the_pid() {
        assert_eq!(ns_pid("Name:\tpython\nNSpid:\t24733\nNSpgid:\t1\n"), Some(24733));
        assert_eq!(ns_pid("NSpid:\t24733\t41\t7\n"), Some(7));
        assert_eq!(ns_pid("Name:\tpython\n"), None);
        let me = Target::open(std::process::id()).unwrap();
        assert_eq!(me.ns_pid, me.pid, "the tests run outside a container");
        assert!(!me.in_container);
    }
}
