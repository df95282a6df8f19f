//! What memtrace needs to be allowed, in one place: its capabilities are
//! checked before anything is read or loaded, and where the kernel refuses
//! an operation anyway (capabilities held in a user namespace, which count
//! for nothing outside it; a binary in a directory this user cannot
//! search) the refusal becomes the same kind of sentence, saying what is
//! needed, instead of the system call's bare error.
//!
//! Measured on Linux 6.18: CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE trace a
//! process whose binaries the user can read (maps are created, programs and
//! BTF loaded, uprobe_multi links made, memory read); CAP_SYS_ADMIN is not
//! needed. Binaries the user cannot read (a pyenv Python under /root) also
//! need CAP_DAC_READ_SEARCH. `--census-only` needs CAP_SYS_PTRACE alone.

use std::{fs, io};

use anyhow::{Context as _, Result, anyhow};

/// Capability bits (include/uapi/linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What an operation needs, as the privilege line says it.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// Loading eBPF programs, attaching uprobes, reading the target.
    Tracing,
    /// Reading the target's memory and /proc files (`--census-only`).
    Reading,
    /// Reading the target's binaries from disk.
    Binaries,
}

impl Need {
    fn sentence(self) -> &'static str {
        match self {
            Need::Tracing => {
                "memtrace needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE, in the host's user namespace) to load eBPF programs and read the target's memory; try sudo"
            }
            Need::Reading => {
                "memtrace needs root (or CAP_SYS_PTRACE, in the target's user namespace) to read the target's memory; try sudo"
            }
            Need::Binaries => {
                "memtrace reads the target's binaries: run it as root, as a user who can read them, or with CAP_DAC_READ_SEARCH too"
            }
        }
    }
}

/// Fails unless this process holds the capabilities `need` asks for.
pub fn check(need: Need) -> Result<()> {
    let effective = effective_capabilities()?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    let enough = match need {
        Need::Tracing => (has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) && has(CAP_SYS_PTRACE),
        Need::Reading | Need::Binaries => has(CAP_SYS_PTRACE),
    };
    if enough { Ok(()) } else { Err(anyhow!("insufficient privileges: {}", need.sentence())) }
}

/// Whether `error` is the kernel refusing an operation for want of
/// privilege (EPERM or EACCES somewhere in its causes).
pub fn is_refusal(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::PermissionDenied))
}

/// `result`, or, when the kernel refused it for want of privilege, the
/// privilege line: what was refused, and what memtrace needs or why what
/// it holds was not enough.
pub fn explain<T>(result: Result<T>, need: Need) -> Result<T> {
    result.map_err(|error| {
        if !is_refusal(&error) {
            return error;
        }
        let why = match need {
            Need::Tracing | Need::Reading if check(need).is_ok() && !in_initial_user_namespace() => {
                format!("memtrace's capabilities are a user namespace's, which count for nothing outside it; {}", need.sentence())
            }
            Need::Tracing | Need::Reading if check(need).is_ok() => {
                "memtrace holds the capabilities it needs, so a security policy forbids it (a security module, or a process that made itself undumpable)".to_owned()
            }
            _ => need.sentence().to_owned(),
        };
        anyhow!("insufficient privileges: {error}: permission denied; {why}")
    })
}

/// Whether this process's user namespace is the host's (its uid map is the
/// identity over every uid).
fn in_initial_user_namespace() -> bool {
    fs::read_to_string("/proc/self/uid_map").is_ok_and(|map| map.split_whitespace().eq(["0", "0", "4294967295"]))
}

fn effective_capabilities() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_permission_errors_become_the_privilege_line() {
        let denied =
            || Err::<(), _>(anyhow::Error::from(io::Error::from_raw_os_error(libc::EPERM)).context("cannot x"));
        let line = explain(denied(), Need::Binaries).unwrap_err().to_string();
        assert!(line.starts_with("insufficient privileges: cannot x: permission denied; memtrace reads"), "{line}");
        // The tests run as root, on the host: whatever refused, it was not
        // for want of capabilities.
        let line = explain(denied(), Need::Tracing).unwrap_err().to_string();
        assert!(
            line.ends_with(
                "so a security policy forbids it (a security module, or a process that made itself undumpable)"
            ),
            "{line}"
        );
        let missing = Err::<(), _>(anyhow::Error::from(io::Error::from_raw_os_error(libc::ENOENT)).context("cannot y"));
        assert_eq!(
            format!("{:#}", explain(missing, Need::Reading).unwrap_err()),
            "cannot y: No such file or directory (os error 2)"
        );
    }
}
