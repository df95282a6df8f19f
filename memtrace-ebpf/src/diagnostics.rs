//! The kernel side's diagnostics, through aya-log: rare events a user
//! debugging memtrace wants to see as they happen, such as the first loss of
//! each kind on a CPU. Userspace turns logging off (AYA_LOG_LEVEL 0) unless
//! `--verbose`, and nothing here is reached on the per-allocation path but
//! after a counter's first increment, so it costs nothing when off.

use aya_log_ebpf::warn;
use memtrace_common::counter;

/// Kept out of line: the log record's encoding is long, and inlined into
/// every counting site it would bloat each program the verifier checks.
#[inline(never)]
pub fn first_loss(pid: u32, index: u32) {
    // aya-log's records need no probe context: its ring buffer is a map.
    warn!(&(), "pid {}: first {} on this CPU", pid, counter::name(index));
}
