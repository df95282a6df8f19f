//! A C program compiled here, with allocation patterns whose numbers are
//! exact, traced from outside: the leaking site must come first with its
//! exact count and size, the churning site must show nothing outstanding,
//! and the target must behave the same traced and untraced, during and after
//! memtrace (also when memtrace is killed).

use std::process::Command;

use memtrace_tests::{Memtrace, Target, TempDir, compile_c, final_report, json_reports, line_of, require_root};

/// Waits for "go" on stdin before each round; each round keeps 10,000
/// blocks of 100 bytes from one line and allocates and frees 10,000 from
/// another (plus realloc, calloc and posix_memalign cases), then prints a
/// checksum of what it computed so traced and untraced runs can be compared.
const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N 10000
static char *kept[N * 8];
static int rounds;

static void say(const char *s) { write(1, s, strlen(s)); }

static int wait_go(void) {
    char buf[16];
    int n = 0;
    while (n < (int)sizeof buf) {
        if (read(0, buf + n, 1) != 1) return 0;
        if (buf[n++] == '\n') return 1;
    }
    return 1;
}

__attribute__((noinline)) static char *leak(void) {
    return malloc(100); /* LEAK */
}

__attribute__((noinline)) static unsigned churn(void) {
    char *p = malloc(100); /* CHURN */
    memset(p, 7, 100);
    unsigned sum = (unsigned char)p[50];
    free(p);
    return sum;
}

__attribute__((noinline)) static char *grow(void) {
    char *p = malloc(10);
    return realloc(p, 4000); /* REALLOC */
}

__attribute__((noinline)) static char *zeroed(void) {
    return calloc(25, 8); /* CALLOC */
}

__attribute__((noinline)) static char *aligned(void) {
    void *p = 0;
    posix_memalign(&p, 64, 256); /* MEMALIGN */
    return p;
}

int main(void) {
    unsigned long checksum = 0;
    say("ready\n");
    while (wait_go()) {
        for (int i = 0; i < N; i++) {
            char *p = leak();
            p[0] = (char)i;
            kept[rounds * N + i] = p;
            checksum += churn();
        }
        for (int i = 0; i < 100; i++) {
            kept[rounds * N + i] = grow();
            checksum += (unsigned long)(zeroed() != 0) + (unsigned long)(aligned() != 0);
        }
        rounds++;
        char line[64];
        snprintf(line, sizeof line, "done %lu\n", checksum);
        say(line);
    }
    return 0;
}
"#;

struct Built {
    _dir: TempDir,
    exe: std::path::PathBuf,
}

fn build() -> Built {
    let dir = TempDir::new("native");
    let exe = compile_c(&dir, "alloc_patterns", PROGRAM, &[]);
    Built { _dir: dir, exe }
}

/// Starts the program and waits until it is ready.
fn start(built: &Built) -> Target {
    let mut target = Target::spawn(&mut Command::new(&built.exe));
    target.expect_line("ready");
    target
}

/// One round of the program under a memtrace started with `options`,
/// stopped with SIGINT `hold` after the round: memtrace's JSON lines.
fn traced_stdout(target: &mut Target, options: &[&str], hold: std::time::Duration) -> String {
    let mut args = vec!["--format", "json"];
    args.extend_from_slice(options);
    memtrace_tests::traced_stdout(target, &args, hold)
}

const NOW: std::time::Duration = std::time::Duration::ZERO;

/// How a site of PROGRAM is printed: DWARF gives the file's full path.
fn site(built: &Built, marker: &str) -> String {
    format!("{}.c:{}", built.exe.display(), line_of(PROGRAM, marker))
}

#[test]
fn leaking_site_ranks_first_with_exact_numbers_and_churn_shows_nothing() {
    require_root();
    let built = build();
    let stdout = traced_stdout(&mut start(&built), &[], NOW);
    let report = final_report(&stdout);
    let rows = &report.rows;

    let first = &rows[0];
    assert_eq!(first.location, site(&built, "LEAK"), "report:\n{stdout}");
    assert_eq!((first.size, first.size_diff), (1_000_000, 1_000_000));
    assert_eq!((first.count, first.count_diff), (10_000, 10_000));

    let find = |marker: &str| rows.iter().find(|l| l.location == site(&built, marker));
    assert!(find("CHURN").is_none(), "the churn site has nothing outstanding:\n{stdout}");
    // realloc moves the block to its own site; the 10-byte malloc is gone.
    let realloc = find("REALLOC").expect("realloc site reported");
    assert_eq!((realloc.count, realloc.size), (100, 400_000));
    let calloc = find("CALLOC").expect("calloc site reported");
    assert_eq!((calloc.count, calloc.size), (100, 20_000));
    let memalign = find("MEMALIGN").expect("posix_memalign site reported");
    assert_eq!((memalign.count, memalign.size), (100, 25_600));
    assert_eq!(report.counters["failed-allocs"], 0);
    assert_eq!(report.losses.values().sum::<u64>(), 0, "{:?}", report.losses);
}

#[test]
fn target_output_is_the_same_traced_and_untraced_and_survives_memtrace() {
    require_root();
    let built = build();
    let untraced = {
        let mut target = start(&built);
        let mut out = Vec::new();
        for _ in 0..3 {
            target.send("go");
            out.push(target.expect_line_prefix("done "));
        }
        assert!(target.finish().success());
        out
    };

    let mut target = start(&built);
    let pid = target.pid().to_string();
    let mut traced = Vec::new();

    // Round 1 under a memtrace that exits normally.
    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "60"]);
    target.send("go");
    traced.push(target.expect_line_prefix("done "));
    memtrace.signal(libc::SIGTERM);
    let (status, stdout, _) = memtrace.finish();
    assert_eq!(status.code(), Some(0));
    assert!(stdout.contains("final report"));

    // Round 2 after memtrace left.
    target.send("go");
    traced.push(target.expect_line_prefix("done "));

    // Round 3 after a memtrace killed outright, with no chance to detach.
    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "60"]);
    memtrace.signal(libc::SIGKILL);
    let _ = memtrace.finish();
    target.send("go");
    traced.push(target.expect_line_prefix("done "));

    assert_eq!(traced, untraced);
    assert!(target.finish().success(), "target exits normally");
}

#[test]
fn target_exit_ends_tracing_with_a_final_report() {
    require_root();
    let built = build();
    let mut target = start(&built);
    let pid = target.pid().to_string();
    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "60", "--format", "json"]);
    target.send("go");
    target.expect_line_prefix("done ");
    assert!(target.finish().success());
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(3), "exit status 3 says the target exited; stderr: {stderr:?}");
    assert!(stderr.iter().any(|l| l.contains(&format!("pid {pid} exited"))), "{stderr:?}");
    // Symbolized after the process is gone, from the saved memory map.
    let rows = final_report(&stdout).rows;
    assert_eq!(rows[0].location, site(&built, "LEAK"));
    assert_eq!(rows[0].count, 10_000);
}

#[test]
fn count_and_duration_limit_the_session() {
    require_root();
    let built = build();
    let target = start(&built);
    let pid = target.pid().to_string();
    let started = std::time::Instant::now();
    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "0.3", "--count", "3", "--format", "json"]);
    let (status, stdout, _) = memtrace.finish();
    assert_eq!(status.code(), Some(0));
    let reports = json_reports(&stdout);
    let shape: Vec<(u32, bool)> = reports.iter().map(|r| (r.sequence, r.is_final)).collect();
    assert_eq!(shape, [(1, false), (2, false), (3, true)], "{stdout}");
    assert!(started.elapsed().as_secs_f64() >= 0.9);

    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "60", "--duration", "0.5", "--format", "json"]);
    let (status, stdout, _) = memtrace.finish();
    assert_eq!(status.code(), Some(0));
    assert_eq!(json_reports(&stdout).len(), 1);
}

#[test]
fn size_filters_and_top_limit_what_is_shown() {
    require_root();
    let built = build();
    let mut target = start(&built);
    // Only the 200-byte calloc and 256-byte posix_memalign blocks fit.
    let stdout = traced_stdout(&mut target, &["--min-size", "150", "--max-size", "300"], NOW);
    let rows = final_report(&stdout).rows;
    let locations: Vec<&str> = rows.iter().map(|l| l.location.as_str()).collect();
    assert_eq!(locations, [site(&built, "MEMALIGN"), site(&built, "CALLOC")], "{stdout}");

    let stdout = traced_stdout(&mut target, &["--top", "1"], NOW);
    let rows = final_report(&stdout).rows;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].location, site(&built, "LEAK"));
}

#[test]
fn older_than_hides_young_blocks() {
    require_root();
    let built = build();
    let mut target = start(&built);
    // Nothing is 1.5 s old yet: the report is empty.
    let stdout = traced_stdout(&mut target, &["--older-than", "1500"], NOW);
    assert!(final_report(&stdout).rows.is_empty(), "{stdout}");

    let stdout = traced_stdout(&mut target, &["--older-than", "300"], std::time::Duration::from_millis(600));
    let rows = final_report(&stdout).rows;
    assert_eq!(rows[0].location, site(&built, "LEAK"));
    assert_eq!(rows[0].count, 10_000);
}

/// Without frame pointers a frame-pointer walk is blind past the caller;
/// the kernel side unwinds with the binary's own unwind tables, through
/// main.
#[test]
fn native_unwinds_code_without_frame_pointers() {
    require_root();
    let dir = TempDir::new("nofp");
    // Later flags win: optimised, no frame pointers.
    let exe = compile_c(&dir, "alloc_patterns", PROGRAM, &["-O1", "-fomit-frame-pointer"]);
    let built = Built { _dir: dir, exe };
    let stdout = traced_stdout(&mut start(&built), &["--native", "--group-by", "traceback"], NOW);
    let rows = final_report(&stdout).rows;
    assert_eq!((rows[0].count, rows[0].size), (10_000, 1_000_000), "{stdout}");
    // The biggest offender's traceback, innermost first: leak's call of
    // malloc, then main's call of leak().
    let frames: Vec<String> = rows[0].frames.iter().map(|f| format!("{}:{}", f.filename, f.lineno)).collect();
    let source = format!("{}.c", built.exe.display());
    let leak = frames.iter().position(|f| *f == format!("{source}:{}", line_of(PROGRAM, "LEAK")));
    let call = frames.iter().position(|f| *f == format!("{source}:{}", line_of(PROGRAM, "char *p = leak();")));
    assert!(leak.is_some() && call.is_some() && leak < call, "{frames:?}");
}
