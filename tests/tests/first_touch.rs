//! Where new memory was first touched (the free tier: no probe, the user
//! page-fault tracepoint and the frame walk): a Python leak in a size class
//! of its own is charged to its line ahead of a busier churn in another
//! class, and a native program's pages are charged, exactly, to the
//! function that wrote them first, and given back by munmap and
//! madvise(MADV_DONTNEED).

use std::{process::Command, time::Duration};

use memtrace_tests::{
    JsonReport, Memtrace, Target, TempDir, compile_c, json_reports, line_of, pyenv, require_root, workspace_root,
};

fn first_touch_rows(report: &JsonReport) -> Vec<(String, u64)> {
    report.first_touch.as_ref().map_or(Vec::new(), |t| t.rows.iter().map(|r| (r.location.clone(), r.count)).collect())
}

/// bench/first_touch.py's `transient` workload: 300-byte bytes objects
/// (pymalloc's 336-byte class, which nothing else there uses) leaked at a
/// steady rate, and short strings (another class) churned twenty times as
/// often, one at a time. A churn that emptied whole pools would hand them
/// to the leak and take the fresh pages itself: the bias the bench
/// measures with its other modes.
#[test]
fn a_leak_in_its_own_size_class_is_first_touched_at_its_line() {
    require_root();
    let script = workspace_root().join("bench/first_touch.py");
    let source = std::fs::read_to_string(&script).unwrap();
    let marker = format!("memtrace-first-touch-{}", std::process::id());
    let pattern = format!("{marker}$");
    let mut memtrace = Memtrace::start(&["--all-python", "--match", &pattern, "--interval", "0.5", "--format", "json"]);
    memtrace.wait_stderr("memtrace: no Python process matching").unwrap();
    let mut target =
        Target::spawn(Command::new(pyenv("3.12.1")).args([script.to_str().unwrap(), "transient", &marker]));
    target.expect_line("ready");
    memtrace.wait_stderr(&format!("{}{} ", Memtrace::TRACING, target.pid())).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let leak = format!("{}:{}", script.display(), line_of(&source, "# the leak"));
    let reports: Vec<JsonReport> = json_reports(&stdout).into_iter().filter(|r| r.pid == target.pid()).collect();
    assert!(reports.len() >= 5, "{} reports", reports.len());
    // Once it has grown for a while, every report names the leak first.
    for report in &reports[2..] {
        let rows = first_touch_rows(report);
        assert_eq!(rows.first().map(|r| r.0.as_str()), Some(leak.as_str()), "report {}: {rows:?}", report.sequence);
    }
    let counters = &reports.last().unwrap().first_touch.as_ref().unwrap().counters;
    assert!(counters["growth-faults-walked"] > 0, "{counters:?}");
}

/// Maps and writes PAGES pages from one function, then gives half back
/// with munmap and the other half with madvise(MADV_DONTNEED).
const TOUCHER: &str = r#"#include <stdio.h>
#include <unistd.h>
#include <sys/mman.h>
#define PAGES 1000
static void step(const char *said) {
    char line[16];
    printf("%s\n", said);
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) _exit(1);
}
__attribute__((noinline)) void touch_pages(char *p, long n) {
    for (long i = 0; i < n; i++)
        p[i * 4096] = 1; /* first touch */
}
int main(void) {
    char *p = mmap(0, PAGES * 4096L, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    step("ready");
    touch_pages(p, PAGES);
    step("touched");
    munmap(p, PAGES / 2 * 4096L);
    step("unmapped");
    madvise(p + PAGES / 2 * 4096L, PAGES / 2 * 4096L, MADV_DONTNEED);
    step("advised");
    return 0;
}
"#;

#[test]
fn a_native_programs_pages_are_charged_exactly_and_given_back() {
    require_root();
    let dir = TempDir::new("first-touch-native");
    let exe = compile_c(&dir, "toucher", TOUCHER, &[]);
    let mut target = Target::spawn(&mut Command::new(&exe));
    target.expect_line("ready");
    let pid = target.pid().to_string();
    let memtrace = Memtrace::attach(&["--pid", &pid, "--census-only", "--interval", "0.2", "--format", "json"]);
    // Each step is seen by a report or two before the next.
    for (send, then) in [("go", "touched"), ("go", "unmapped"), ("go", "advised")] {
        std::thread::sleep(Duration::from_millis(600));
        target.send(send);
        target.expect_line(then);
        target.wait_reading_stdin();
    }
    std::thread::sleep(Duration::from_millis(600));
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let site = format!("{}:{}", dir.0.join("toucher.c").display(), line_of(TOUCHER, "/* first touch */"));
    let mut seen: Vec<u64> = json_reports(&stdout)
        .iter()
        .map(|r| first_touch_rows(r).into_iter().find(|(location, _)| *location == site).map_or(0, |(_, pages)| pages))
        .collect();
    seen.dedup();
    // A report may catch the writes half done.
    let all = seen.iter().position(|&pages| pages == 1000).unwrap_or_else(|| panic!("{seen:?}"));
    assert!(seen[..all].is_sorted(), "pages charged to {site}, report by report: {seen:?}");
    assert_eq!(seen[all..], [1000, 500, 0], "pages charged to {site}, report by report");
}
