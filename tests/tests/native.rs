//! A C program compiled here, with allocation patterns whose numbers are
//! exact, traced from outside: the leaking site must come first with its
//! exact count and size, the churning site must show nothing outstanding,
//! and the target must behave the same traced and untraced, during and after
//! memtrace (also when memtrace is killed).

use std::process::Command;

use memtrace_tests::{Memtrace, Target, TempDir, compile_c, final_report, line_of, require_root};

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
/// stopped with SIGINT `hold` after the round: memtrace's stdout.
fn traced_round(target: &mut Target, options: &[&str], hold: std::time::Duration) -> String {
    let pid = target.pid().to_string();
    let mut args = vec!["--pid", &pid, "--interval", "60"];
    args.extend_from_slice(options);
    let memtrace = Memtrace::attach(&args);
    target.send("go");
    target.expect_line_prefix("done ");
    std::thread::sleep(hold);
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "stderr: {stderr:?}");
    stdout
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
    let stdout = traced_round(&mut start(&built), &[], NOW);
    let (header, lines) = final_report(&stdout);

    let first = &lines[0];
    assert_eq!(first.location, site(&built, "LEAK"), "report:\n{stdout}");
    assert_eq!((first.size.as_str(), first.size_diff.as_str()), ("977 KiB", "+977 KiB"));
    assert_eq!((first.count, first.count_diff), (10_000, 10_000));
    assert_eq!(first.average.as_deref(), Some("100 B"));

    let find = |marker: &str| lines.iter().find(|l| l.location == site(&built, marker));
    assert!(find("CHURN").is_none(), "the churn site has nothing outstanding:\n{stdout}");
    // realloc moves the block to its own site; the 10-byte malloc is gone.
    let realloc = find("REALLOC").expect("realloc site reported");
    assert_eq!((realloc.count, realloc.size.as_str()), (100, "391 KiB"));
    let calloc = find("CALLOC").expect("calloc site reported");
    assert_eq!((calloc.count, calloc.size.as_str()), (100, "19.5 KiB"));
    let memalign = find("MEMALIGN").expect("posix_memalign site reported");
    assert_eq!((memalign.count, memalign.size.as_str()), (100, "25.0 KiB"));
    assert!(header.contains("failed-allocs=0"), "{header}");
    assert!(header.contains(" alloc-map-full=0"), "{header}");
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
    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "60"]);
    target.send("go");
    target.expect_line_prefix("done ");
    assert!(target.finish().success());
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(3), "exit status 3 says the target exited; stderr: {stderr:?}");
    assert!(stderr.iter().any(|l| l.contains(&format!("pid {pid} exited"))), "{stderr:?}");
    // Symbolized after the process is gone, from the saved memory map.
    let (_, lines) = final_report(&stdout);
    assert_eq!(lines[0].location, site(&built, "LEAK"));
    assert_eq!(lines[0].count, 10_000);
}

#[test]
fn count_and_duration_limit_the_session() {
    require_root();
    let built = build();
    let target = start(&built);
    let pid = target.pid().to_string();
    let started = std::time::Instant::now();
    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "0.3", "--count", "3"]);
    let (status, stdout, _) = memtrace.finish();
    assert_eq!(status.code(), Some(0));
    let reports = memtrace_tests::reports(&stdout);
    assert_eq!(reports.len(), 3, "{stdout}");
    assert!(reports[2].0.contains("final report 3"), "{}", reports[2].0);
    assert!(started.elapsed().as_secs_f64() >= 0.9);

    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "60", "--duration", "0.5"]);
    let (status, stdout, _) = memtrace.finish();
    assert_eq!(status.code(), Some(0));
    assert_eq!(memtrace_tests::reports(&stdout).len(), 1);
}

#[test]
fn size_filters_and_top_limit_what_is_shown() {
    require_root();
    let built = build();
    let mut target = start(&built);
    // Only the 200-byte calloc and 256-byte posix_memalign blocks fit.
    let stdout = traced_round(&mut target, &["--min-size", "150", "--max-size", "300"], NOW);
    let (_, lines) = final_report(&stdout);
    let locations: Vec<&str> = lines.iter().map(|l| l.location.as_str()).collect();
    assert_eq!(locations, [site(&built, "MEMALIGN"), site(&built, "CALLOC")], "{stdout}");

    let stdout = traced_round(&mut target, &["--top", "1"], NOW);
    let (_, lines) = final_report(&stdout);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].location, site(&built, "LEAK"));
}

#[test]
fn older_than_hides_young_blocks() {
    require_root();
    let built = build();
    let mut target = start(&built);
    // Nothing is 1.5 s old yet: the report is empty.
    let stdout = traced_round(&mut target, &["--older-than", "1500"], NOW);
    let (_, lines) = final_report(&stdout);
    assert!(lines.is_empty(), "{stdout}");

    let stdout = traced_round(&mut target, &["--older-than", "300"], std::time::Duration::from_millis(600));
    let (_, lines) = final_report(&stdout);
    assert_eq!(lines[0].location, site(&built, "LEAK"));
    assert_eq!(lines[0].count, 10_000);
}

/// Without frame pointers the kernel's stack walk is blind past the
/// caller; --native unwinds the copied stack with the binary's own unwind
/// tables, through main.
#[test]
fn native_unwinds_code_without_frame_pointers() {
    require_root();
    let dir = TempDir::new("nofp");
    // Later flags win: optimised, no frame pointers.
    let exe = compile_c(&dir, "alloc_patterns", PROGRAM, &["-O1", "-fomit-frame-pointer"]);
    let built = Built { _dir: dir, exe };
    let stdout = traced_round(&mut start(&built), &["--native", "--group-by", "traceback"], NOW);
    let (_, lines) = final_report(&stdout);
    assert_eq!((lines[0].count, lines[0].size.as_str()), (10_000, "977 KiB"), "{stdout}");
    // The biggest offender's traceback, oldest first: main's call of leak(),
    // then leak's call of malloc.
    let frames: Vec<&str> =
        stdout.lines().skip_while(|l| !l.contains("count=10000")).skip(1).take_while(|l| l.starts_with("  ")).collect();
    let text = frames.join("\n");
    let call = format!("File \"{}.c\", line {}", built.exe.display(), line_of(PROGRAM, "char *p = leak();"));
    let leak = format!("File \"{}.c\", line {}", built.exe.display(), line_of(PROGRAM, "LEAK"));
    let (at_call, at_leak) = (text.find(&call), text.find(&leak));
    assert!(at_call.is_some() && at_leak.is_some() && at_call < at_leak, "{text}");
}
