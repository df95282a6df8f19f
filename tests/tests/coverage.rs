//! The coverage note compares pymalloc's own count of live blocks with the
//! probes'. Where the probes leave blocks untracked (a size filter, a full
//! map of live blocks), the two stop measuring the same thing: the note must
//! say why instead of giving a share (it said 631.2% and -48.5%).

use std::process::Command;

use memtrace_tests::{
    JsonReport, Target, WORKLOADS, assert_bytes_kept_counted, memtrace_command, pyenv, require_root, traced_round,
};

/// memtrace with `options` over one run of workload `workload` on CPython
/// 3.12, to exit with `status`: its final report and the note about
/// pymalloc's count.
fn coverage_note(workload: &str, options: &[&str], status: i32) -> (JsonReport, String) {
    let python = pyenv("3.12.1");
    assert!(python.exists(), "{} is a supported interpreter", python.display());
    let mut target = Target::spawn(Command::new(&python).args([WORKLOADS, "plain", workload]));
    let report = traced_round(&mut target, status, |args| {
        let mut memtrace = memtrace_command(args);
        memtrace.args(options);
        memtrace
    });
    let note = report.notes.iter().find(|n| n.starts_with("pymalloc's own count")).cloned();
    let note = note.unwrap_or_else(|| panic!("no coverage note in {report:?}"));
    (report, note)
}

#[test]
fn a_size_filter_is_named_instead_of_a_share() {
    require_root();
    let (report, note) = coverage_note("bytes_kept", &["--min-size", "1000"], 0);
    assert!(
        note.ends_with(
            "memtrace's probes cannot account for it: --min-size 1000 leaves smaller blocks untracked, and their frees count as unknown"
        ),
        "{note}"
    );
    assert!(!note.contains('%'), "{note}");
    assert_bytes_kept_counted(&report);
}

#[test]
fn a_full_map_is_named_instead_of_a_share() {
    require_root();
    // Some 30,000 blocks stay live; 1024 fit.
    // Exit status 4: a map was full.
    let (report, note) = coverage_note("nested_lists", &["--max-allocs", "1024"], 4);
    let lost = report.losses["alloc-map-full"];
    assert!(lost > 0, "{report:?}");
    assert!(
        note.ends_with(&format!(
            "memtrace's probes cannot account for it: {lost} allocations went untracked because a map was full (raise --max-allocs)"
        )),
        "{note}"
    );
}
