//! Processes that change while traced. A forked child inherits its
//! parent's breakpoints, so it pays for them whether or not it is traced:
//! memtrace follows it as a process of its own, with exact counts from the
//! moment it says it traces it. A process that execs gets a final report
//! for its former image (with the former image's blocks) and a new plan
//! for the new one, whose Python lines are read with the new image's
//! layout: nothing of the old image leaks into the new one's reports.

use std::{path::Path, process::Command};

use memtrace_tests::{JsonReport, Memtrace, Row, Target, json_reports, pyenv, require_root, workspace_root};

fn script() -> String {
    workspace_root().join("tests/python/lifecycle.py").display().to_string()
}

fn marked(marker: &str) -> String {
    let source = std::fs::read_to_string(script()).unwrap();
    let tag = format!("# MARK:{marker}");
    let line = source.lines().position(|l| l.ends_with(&tag)).unwrap() + 1;
    format!("{}:{line}", script())
}

fn row<'a>(report: &'a JsonReport, marker: &str) -> Option<&'a Row> {
    report.rows.iter().find(|r| r.location == marked(marker))
}

/// `n` objects from the line, each `object` bytes: the count is the
/// objects' and the list's few resizes.
fn assert_objects(report: &JsonReport, marker: &str, n: u64, object: u64) {
    let row = row(report, marker).unwrap_or_else(|| panic!("{marker} is reported: {report:#?}"));
    assert!((n..n + 40).contains(&row.count), "{marker}: count {} for {n} objects", row.count);
    assert!(row.size >= n * object && row.size < n * object + (1 << 20), "{marker}: size {}", row.size);
}

fn final_of(reports: &[JsonReport], pid: u32, which: usize) -> &JsonReport {
    reports
        .iter()
        .filter(|r| r.pid == pid && r.is_final)
        .nth(which)
        .unwrap_or_else(|| panic!("final report {which} of {pid}"))
}

/// The fork workload: parent and child each reported on their own.
fn fork(python: &Path) {
    assert!(python.exists(), "{} is missing", python.display());
    let mut target = Target::spawn(Command::new(python).args([&script(), "fork"]));
    target.expect_line("ready");
    let parent = target.pid();
    let mut memtrace = Memtrace::attach(&["--pid", &parent.to_string(), "--interval", "60", "--format", "json"]);
    target.send("go");
    let child: u32 = target.expect_line_prefix("child ")["child ".len()..].parse().unwrap();
    memtrace.wait_stderr(&format!("{}{child} ", Memtrace::TRACING)).unwrap();
    target.send("go");
    target.expect_line("child-done");
    target.send("exit");
    target.expect_line("done");
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    assert!(
        stderr.iter().any(|l| l
            == &format!("memtrace: pid {child} exited; the final report above covers its whole life since attach")),
        "{stderr:?}"
    );
    let reports = json_reports(&stdout);
    let (child_report, parent_report) = (final_of(&reports, child, 0), final_of(&reports, parent, 0));
    assert_objects(child_report, "child", 20_000, 133);
    assert!(
        child_report.notes.iter().any(|n| n.starts_with(&format!("forked from pid {parent}, traced from "))),
        "{:?}",
        child_report.notes
    );
    assert!(row(child_report, "parent").is_none(), "the parent's blocks are not the child's");
    assert_objects(parent_report, "parent", 10_000, 233);
    assert!(row(parent_report, "child").is_none(), "the child's blocks are not the parent's");
    for report in [child_report, parent_report] {
        assert!(report.losses.values().all(|&v| v == 0), "{:?}", report.losses);
    }
}

/// The exec workload: one final report per image, each with its own lines.
fn exec(python: &Path) {
    assert!(python.exists(), "{} is missing", python.display());
    let mut target = Target::spawn(Command::new(python).args([&script(), "exec"]));
    target.expect_line("ready");
    let pid = target.pid();
    let mut memtrace = Memtrace::attach(&["--pid", &pid.to_string(), "--interval", "60", "--format", "json"]);
    target.send("go");
    target.expect_line("before-done");
    target.send("exec");
    target.expect_line("after");
    memtrace.wait_stderr(&format!("memtrace: pid {pid} exec'd")).unwrap();
    memtrace.wait_stderr(&format!("{}{pid} ", Memtrace::TRACING)).unwrap();
    target.send("go");
    target.expect_line("after-done");
    // Reported while it lives: Python frees everything when it exits.
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let reports = json_reports(&stdout);
    let (former, new) = (final_of(&reports, pid, 0), final_of(&reports, pid, 1));
    assert!(former.notes.iter().any(|n| n.contains("replaced its image (exec)")), "{:?}", former.notes);
    assert_objects(former, "before", 10_000, 133);
    assert!(row(former, "after").is_none());
    assert_objects(new, "after", 10_000, 333);
    assert!(row(new, "before").is_none(), "the former image's blocks are gone with it");
    assert!(new.notes.iter().any(|n| n.starts_with("a new image (exec), traced from ")), "{:?}", new.notes);
    assert!(new.losses.values().all(|&v| v == 0), "the new image is read with its own layout: {:?}", new.losses);
}

macro_rules! interpreter {
    ($name:ident, $python:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn a_forked_child_is_followed_and_reported_on_its_own() {
                require_root();
                fork(&$python);
            }

            #[test]
            fn an_exec_ends_the_former_image_and_traces_the_new_one() {
                require_root();
                exec(&$python);
            }
        }
    };
}

interpreter!(cpython_3_8, pyenv("3.8.18"));
interpreter!(cpython_3_12, pyenv("3.12.1"));
interpreter!(debian_python_3_11, std::path::PathBuf::from("/usr/bin/python3.11"));
