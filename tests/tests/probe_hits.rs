//! How many probe traps an allocation costs, counted, not timed: each of
//! memtrace's programs' run count (`bpf_stats`), divided
//! by the allocations memtrace reports on a fixed workload. Each
//! interpreter's bound is what it costs today (issue 11 aims at 2), so a
//! change that adds a trap per allocation fails here.

use std::{path::Path, process::Command};

use memtrace_tests::{
    Memtrace, Target,
    bpf_stats::{self, probe_hits},
    final_report, pyenv, require_root,
};

/// 20,000 bytes objects kept in a list, and a dict of 20,000 str.
const WORKLOAD: &str = "import sys
keep = []
print('ready', flush=True)
sys.stdin.readline()
for i in range(20000):
    keep.append(bytes(100))
d = {}
for i in range(20000):
    d[i] = str(i)
print('done', flush=True)
sys.stdin.readline()
";

fn hits_per_allocation(python: &Path) -> f64 {
    assert!(python.exists(), "{} is missing", python.display());
    let _stats = bpf_stats::enable();
    let mut target = Target::spawn(Command::new(python).args(["-c", WORKLOAD]));
    target.expect_line("ready");
    let pid = target.pid().to_string();
    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "60", "--format", "json"]);
    target.send("go");
    target.expect_line("done");
    let hits = probe_hits(memtrace.pid());
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let allocations = final_report(&stdout).allocated.count;
    assert!(allocations >= 60_000, "the workload's allocations were seen: {allocations}");
    let total: u64 = hits.values().sum();
    let ratio = total as f64 / allocations as f64;
    eprintln!("{}: {total} probe hits ({hits:?}) for {allocations} allocations: {ratio:.2}", python.display());
    ratio
}

/// Today: an entry and a return probe on every allocation, _Py_NewReference
/// on every object (1.2 per allocation here), and the frees (0.4).
#[test]
fn pyenv_builds_trap_at_most_four_times_per_allocation() {
    require_root();
    for version in ["3.8.18", "3.12.1", "3.13.0"] {
        let ratio = hits_per_allocation(&pyenv(version));
        assert!(ratio <= 4.0, "CPython {version}: {ratio:.2} probe hits per allocation");
    }
}

/// Debian's LTO build is probed inside the allocator, one trap per block
/// (see probes/inlined), plus _Py_NewReference and the frees.
#[test]
fn debian_python_traps_at_most_three_times_per_allocation() {
    require_root();
    let ratio = hits_per_allocation(Path::new("/usr/bin/python3.11"));
    assert!(ratio <= 3.0, "Debian's python3.11: {ratio:.2} probe hits per allocation");
}
