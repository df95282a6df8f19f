//! Probe traps counted, not timed: the kernel's BPF run-time statistics
//! (switched on while the descriptor [`enable`] returns is open) give each
//! BPF program its run count, read from the descriptors of the process
//! holding them in /proc/PID/fdinfo.

use std::{
    collections::BTreeMap,
    os::fd::{FromRawFd as _, OwnedFd},
};

/// BPF_ENABLE_STATS with BPF_STATS_RUN_TIME (include/uapi/linux/bpf.h):
/// statistics are kept while the returned descriptor is open.
pub fn enable() -> OwnedFd {
    let attr = [0u8; 128];
    // SAFETY: bpf(2) reads `size` bytes of a zeroed attr (type 0: run time).
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 32, attr.as_ptr(), attr.len()) };
    assert!(fd >= 0, "BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Run counts of the uprobe programs (kprobe type) process `pid` holds, by
/// program id.
pub fn probe_hits(pid: u32) -> BTreeMap<u32, u64> {
    let mut hits = BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else { continue };
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(":")).map(|v| v.trim().to_owned())
        };
        if field("prog_type").as_deref() == Some("2")
            && let (Some(id), Some(count)) = (field("prog_id"), field("run_cnt"))
        {
            hits.insert(id.parse().unwrap(), count.parse().unwrap());
        }
    }
    hits
}
