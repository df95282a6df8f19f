//! Every mistake a user can make gets one clear line on stderr and a
//! non-zero exit status: never a panic, a backtrace or a silent success.

use std::process::Command;

use memtrace_tests::{Target, TempDir, compile_c, memtrace_bin, require_root, run_memtrace};

/// Asserts a single-line error with `needle` and exit status 1.
fn assert_one_line_error(result: (Option<i32>, String, String), needle: &str) {
    let (code, stdout, stderr) = result;
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert_eq!(stdout, "", "nothing on stdout");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line: {stderr:?}");
    assert!(lines[0].starts_with("memtrace: "), "{stderr:?}");
    assert!(lines[0].contains(needle), "{:?} should mention {needle:?}", lines[0]);
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
}

const SLEEPER: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) { puts("ready"); fflush(stdout); char c; read(0, &c, 1); return 0; }
"#;

/// A program that waits, built with `flags`, running and ready.
fn sleeper(dir: &TempDir, flags: &[&str]) -> Target {
    let exe = compile_c(dir, "sleeper", SLEEPER, flags);
    let mut target = Target::spawn(&mut Command::new(&exe));
    target.expect_line("ready");
    target
}

#[test]
fn pid_that_does_not_exist() {
    require_root();
    // pid_max is at most 2^22; this pid cannot exist.
    let result = run_memtrace(Command::new(memtrace_bin()).args(["--pid", "4194305"]));
    assert_one_line_error(result, "no process with pid 4194305");
}

#[test]
fn kernel_thread() {
    require_root();
    // pid 2 is kthreadd on every Linux.
    let result = run_memtrace(Command::new(memtrace_bin()).args(["--pid", "2"]));
    assert_one_line_error(result, "is a kernel thread");
}

#[test]
fn no_privileges() {
    require_root();
    let dir = TempDir::new("noprivs");
    let target = sleeper(&dir, &[]);
    // Run memtrace as nobody, with no capabilities.
    let result = run_memtrace(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
            .arg(memtrace_bin())
            .args(["--pid", &target.pid().to_string()]),
    );
    assert_one_line_error(result, "insufficient privileges");
}

#[test]
fn statically_linked_target() {
    require_root();
    let dir = TempDir::new("static");
    let target = sleeper(&dir, &["-static"]);
    let result = run_memtrace(Command::new(memtrace_bin()).args(["--pid", &target.pid().to_string()]));
    assert_one_line_error(result, "no shared C library mapped (statically linked?)");
}

/// Runs memtrace in a private mount namespace after the shell command
/// `setup`, which mounts over what memtrace would read there.
fn run_in_namespace(setup: &str, pid: u32) -> (Option<i32>, String, String) {
    run_memtrace(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("{setup} && exec {} --pid {pid}", memtrace_bin().display())),
    )
}

/// memtrace where `hide` is covered by an empty tmpfs: what it sees on a
/// kernel without that feature.
fn run_with_hidden(hide: &str, pid: u32) -> (Option<i32>, String, String) {
    run_in_namespace(&format!("mount -t tmpfs none {hide}"), pid)
}

#[test]
fn kernel_older_than_6_6() {
    require_root();
    let dir = TempDir::new("oldkernel");
    let target = sleeper(&dir, &[]);
    let release = dir.0.join("osrelease");
    std::fs::write(&release, "6.1.0-28-amd64\n").unwrap();
    let setup = format!("mount --bind '{}' /proc/sys/kernel/osrelease", release.display());
    assert_one_line_error(run_in_namespace(&setup, target.pid()), "Linux 6.1.0-28-amd64 is too old");
}

#[test]
fn kernel_without_btf() {
    require_root();
    let dir = TempDir::new("nobtf");
    let target = sleeper(&dir, &[]);
    assert_one_line_error(run_with_hidden("/sys/kernel/btf", target.pid()), "this kernel has no BTF");
}

#[test]
fn kernel_without_uprobes() {
    require_root();
    let dir = TempDir::new("nouprobes");
    let target = sleeper(&dir, &[]);
    assert_one_line_error(
        run_with_hidden("/sys/bus/event_source/devices", target.pid()),
        "this kernel has no uprobe support",
    );
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [&["--pid", "abc"][..], &["--pid", "1", "--interval", "0"], &["--pid", "1", "--frames", "0"], &[]] {
        let (code, _, stderr) = run_memtrace(Command::new(memtrace_bin()).args(args));
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"));
    }
}

/// Runs memtrace with `args`: a usage error, exit status 2, whose first line
/// says `needle` (clap's own layout: "error: ..." then a hint).
fn assert_usage_error(args: &[&str], needle: &str) {
    let (code, stdout, stderr) = run_memtrace(Command::new(memtrace_bin()).args(args));
    assert_eq!(code, Some(2), "{args:?}: {stderr}");
    assert_eq!(stdout, "", "{args:?}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: ") && first.contains(needle), "{args:?}: {first:?} should say {needle:?}");
    assert!(!stderr.contains("panicked"));
}

#[test]
fn options_that_make_no_sense_say_what_is_wrong() {
    let cases: &[(&[&str], &str)] = &[
        (&["--pid", "1", "--top", "0"], "invalid value '0' for '--top <N>': must be a number of groups, at least 1"),
        (&["--pid", "1", "--types-limit", "0"], "must be a number of types, at least 1"),
        (&["--pid", "1", "--min-size", "1000", "--max-size", "10"], "--min-size 1000 is above --max-size 10"),
        (&["--pid", "1", "--interval", "-1"], "invalid value '-1' for '--interval <SECS>': must be a positive number"),
        (&["--pid", "1", "--duration", "1e300"], "must be a positive number of seconds, at most 31536000"),
        (&["--pid", "-1"], "invalid value '-1' for '--pid <PID>': must be a process id, a whole number above 0"),
        (&["--pid", "0"], "must be a process id"),
        (&["--pid", "1,-2"], "invalid value '-2' for '--pid <PID>'"),
        (&["--pid", "1", "--count", "-1"], "must be a number of reports, at least 1"),
        (&["--pid", "1", "--frames", "33"], "must be a number of frames from 1 to 32"),
        (&["--pid", "1", "--min-size", "-5"], "invalid value '-5' for '--min-size <BYTES>': must be a number of bytes"),
        (&["--pid", "1", "--max-allocs", "1000"], "must be a number of blocks, at least 1024"),
        (&["--pid", "1", "--census-only", "--native"], "'--census-only' cannot be used with '--native'"),
        (&["--pid", "1", "--census-only", "--frames", "4"], "'--census-only' cannot be used with '--frames <N>'"),
        (
            &["--pid", "1", "--census-only", "--min-size", "8"],
            "'--census-only' cannot be used with '--min-size <BYTES>'",
        ),
        (
            &["--pid", "1", "--census-only", "--pprof", "x.pb.gz"],
            "'--census-only' cannot be used with '--pprof <FILE>'",
        ),
        (&["show", "x.json", "--top", "-1"], "invalid value '-1' for '--top <N>'"),
    ];
    for (args, needle) in cases {
        assert_usage_error(args, needle);
    }
}

#[test]
fn help_says_each_limit() {
    let (code, stdout, _) = run_memtrace(Command::new(memtrace_bin()).arg("--help"));
    assert_eq!(code, Some(0));
    let help = stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.contains("Live allocations memtrace can track at once, at least 1024"), "{stdout}");
    assert!(help.contains("Groups shown per report (at least 1)"), "{stdout}");
}

const THREADED: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *wait_stdin(void *arg) { char c; read(0, &c, 1); return arg; }
int main(void) {
    pthread_t thread;
    pthread_create(&thread, 0, wait_stdin, 0);
    puts("ready");
    fflush(stdout);
    pthread_join(thread, 0);
    return 0;
}
"#;

/// /proc answers for a thread id as for a pid; memtrace refuses it and
/// names the process to trace instead.
#[test]
fn thread_id_names_its_process() {
    require_root();
    let dir = TempDir::new("tid");
    let exe = compile_c(&dir, "threaded", THREADED, &["-pthread"]);
    let mut target = Target::spawn(&mut Command::new(&exe));
    target.expect_line("ready");
    let pid = target.pid();
    let tid = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse::<u32>().unwrap())
        .find(|&tid| tid != pid)
        .expect("a second thread");
    let result = run_memtrace(Command::new(memtrace_bin()).args(["--pid", &tid.to_string()]));
    assert_one_line_error(
        result,
        &format!(
            "pid {tid} (threaded) is a thread of process {pid} (threaded); memtrace traces whole processes: use --pid {pid}"
        ),
    );
}
