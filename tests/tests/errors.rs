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
