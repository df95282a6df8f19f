//! The coverage note compares pymalloc's own count of live blocks with the
//! probes'. Where the probes leave blocks untracked (a size filter, a full
//! map of live blocks), the two stop measuring the same thing: the note must
//! say why instead of giving a share (it said 631.2% and -48.5%).

use std::process::Command;

use memtrace_tests::{JsonReport, Memtrace, Target, WORKLOADS, final_report, pyenv, require_root, workload_site};

/// memtrace with `options` over one run of workload `workload` on CPython
/// 3.12: its exit status, final report and the note about pymalloc's count.
fn coverage_note(workload: &str, options: &[&str]) -> (Option<i32>, JsonReport, String) {
    let python = pyenv("3.12.1");
    assert!(python.exists(), "{} is a supported interpreter", python.display());
    let mut target = Target::spawn(Command::new(&python).args([WORKLOADS, "plain", workload]));
    target.expect_line("ready");
    let pid = target.pid().to_string();
    let mut args = vec!["--pid", &pid, "--interval", "60", "--format", "json"];
    args.extend_from_slice(options);
    let memtrace = Memtrace::attach(&args);
    target.send("go");
    target.expect_line("done");
    memtrace.signal(libc::SIGINT);
    let (status, stdout, _) = memtrace.finish();
    let report = final_report(&stdout);
    let note = report.notes.iter().find(|n| n.starts_with("pymalloc's own count")).cloned();
    (status.code(), report, note.unwrap_or_else(|| panic!("no coverage note in {stdout}")))
}

#[test]
fn a_size_filter_is_named_instead_of_a_share() {
    require_root();
    let (code, report, note) = coverage_note("bytes_kept", &["--min-size", "1000"]);
    assert_eq!(code, Some(0));
    assert!(
        note.ends_with(
            "memtrace's probes cannot account for it: --min-size 1000 leaves smaller blocks untracked, and their frees count as unknown"
        ),
        "{note}"
    );
    assert!(!note.contains('%'), "{note}");
    let row = report.rows.iter().find(|r| r.location == workload_site("bytes-kept")).expect("the kept bytes");
    assert_eq!((row.count, row.size), (1000, 1000 * 1033), "what the filter keeps is counted exactly");
}

#[test]
fn a_full_map_is_named_instead_of_a_share() {
    require_root();
    // Some 30,000 blocks stay live; 1024 fit.
    let (code, report, note) = coverage_note("nested_lists", &["--max-allocs", "1024"]);
    assert_eq!(code, Some(4), "exit status 4: a map was full");
    let lost = report.losses["alloc-map-full"];
    assert!(lost > 0, "{report:?}");
    assert!(
        note.ends_with(&format!(
            "memtrace's probes cannot account for it: {lost} allocations went untracked because a map was full (raise --max-allocs)"
        )),
        "{note}"
    );
}
