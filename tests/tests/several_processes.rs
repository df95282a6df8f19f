//! One memtrace tracing several processes at once: each gets its own
//! reports, counters and stacks, also when the processes are the same
//! program with the same addresses, whose stacks hash alike.

use std::process::Command;

use memtrace_tests::{JsonReport, Memtrace, Target, TempDir, compile_c, json_reports, line_of, require_root};

/// Keeps `argv[1]` 64-byte blocks from one line, one round per "go".
const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    for (int i = 0; i < n; i++) {
        char *p = malloc(64); /* LEAK */
        memset(p, 1, 64);
    }
    printf("done\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {}
    return 0;
}
"#;

/// Keeps `sys.argv[1]` bytes objects from one line.
const SCRIPT: &str = "import sys
keep = []
print('ready', flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[1])):
    keep.append(bytes(100))
print('done', flush=True)
sys.stdin.readline()
";

/// Runs each target's round under one memtrace and returns each pid's
/// final report. The first pid is named twice, as a user may: it must be
/// probed once, or its counts would double.
fn trace_together(targets: &mut [Target]) -> Vec<JsonReport> {
    let pids: Vec<String> = targets.iter().map(|t| t.pid().to_string()).collect();
    let list = format!("{},{}", pids.join(","), pids[0]);
    let memtrace = Memtrace::attach(&["--pid", &list, "--interval", "60", "--format", "json"]);
    for target in targets.iter_mut() {
        target.send("go");
        target.expect_line("done");
    }
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let reports = json_reports(&stdout);
    pids.iter()
        .map(|pid| {
            let mine: Vec<&JsonReport> = reports.iter().filter(|r| r.pid.to_string() == *pid).collect();
            assert_eq!(mine.len(), 1, "one final report for {pid}:\n{stdout}");
            assert!(mine[0].is_final);
            mine[0].clone()
        })
        .collect()
}

/// The same C program twice, leaking different counts: each process's
/// report holds its own count exactly, not the sum.
#[test]
fn two_native_processes_get_their_own_reports() {
    require_root();
    let dir = TempDir::new("two");
    let exe = compile_c(&dir, "leak_n", PROGRAM, &[]);
    let site = format!("{}.c:{}", exe.display(), line_of(PROGRAM, "LEAK"));
    let mut targets: Vec<Target> = ["3000", "7000"]
        .iter()
        .map(|n| {
            let mut target = Target::spawn(Command::new(&exe).arg(n));
            target.expect_line("ready");
            target
        })
        .collect();
    let reports = trace_together(&mut targets);
    for (report, expected) in reports.iter().zip([3000, 7000]) {
        assert_eq!(report.rows[0].location, site, "{report:?}");
        assert_eq!((report.rows[0].count, report.rows[0].size), (expected, 64 * expected), "{report:?}");
        assert_eq!(report.outstanding.count, expected, "{report:?}");
    }
}

/// Two CPython processes with the same addresses (no ASLR) run the same
/// script, so their Python stacks have the same contents: each must still
/// be resolved in, and counted for, its own process.
#[test]
fn two_python_processes_with_the_same_addresses() {
    require_root();
    let python = "/root/.pyenv/versions/3.12.1/bin/python3.12";
    let dir = TempDir::new("two-python");
    let script = dir.0.join("keep.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let mut targets: Vec<Target> = ["2000", "5000"]
        .iter()
        .map(|n| {
            let mut target = Target::spawn(Command::new("setarch").args(["x86_64", "-R", python]).arg(&script).arg(n));
            target.expect_line("ready");
            target
        })
        .collect();
    let maps = |t: &Target| std::fs::read_to_string(format!("/proc/{}/maps", t.pid())).unwrap();
    let first_line = |maps: String| maps.lines().find(|l| l.contains("libpython")).unwrap().to_owned();
    assert_eq!(first_line(maps(&targets[0])), first_line(maps(&targets[1])), "setarch -R gives both one layout");
    let reports = trace_together(&mut targets);
    let line = format!("{}:6", script.display());
    for (report, expected) in reports.iter().zip([2000, 5000]) {
        let row = report.rows.iter().find(|r| r.location == line).unwrap_or_else(|| panic!("{line}: {report:?}"));
        // The bytes objects and the list's item array, which grows in place.
        assert!((expected..=expected + 2).contains(&row.count), "{row:?}");
        assert_eq!(report.rows[0].location, line, "{report:?}");
    }
}
