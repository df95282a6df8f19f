//! A hostile target: a real CPython process that forges what memtrace
//! reads of it through ctypes (tests/python/hostile.py: a line table of
//! garbage, one that claims a terabyte, a code object whose file name is a
//! FIFO, a cycle on a GC list, a type name into unmapped memory) and
//! allocates in the forged code while memtrace traces it, with probes and
//! census and with `--census-only`. memtrace's report says what it could
//! not read; memtrace never hangs, never crashes: it stops on SIGINT
//! within a bound, with its final report, and the target is unharmed.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use memtrace_tests::{Memtrace, Target, pyenv, require_root};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/hostile.py");
/// From SIGINT to memtrace's exit: its final report of a small process.
const STOP_WITHIN: Duration = Duration::from_secs(20);

/// memtrace with `mode`'s flags over two rounds of the target's
/// allocations, in text (whose tracebacks show source lines, so the FIFO
/// is asked for); what it printed on stdout.
fn traced(python: &Path, mode: &[&str]) -> String {
    assert!(python.exists(), "{} is missing: it is a supported interpreter", python.display());
    let mut target = Target::spawn(Command::new(python).arg(SCRIPT));
    target.expect_line("ready");
    let pid = target.pid().to_string();
    let mut args = vec!["--pid", &pid, "--interval", "0.5", "--group-by", "traceback", "--top", "20"];
    args.extend(mode);
    let memtrace = Memtrace::attach(&args);
    for _ in 0..2 {
        target.send("go");
        target.expect_line("allocated");
    }
    target.wait_reading_stdin();
    let asked = Instant::now();
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(0), "memtrace failed on a hostile target: {stderr:?}\n{stdout}");
    assert!(took < STOP_WITHIN, "memtrace took {took:?} to stop");
    target.send("done");
    assert_eq!(target.expect_line_prefix("mended "), "mended True True", "the target is unharmed by being read");
    assert!(target.finish().success());
    stdout
}

fn census_notes(stdout: &str) {
    let notes: Vec<&str> = stdout.lines().filter(|l| l.starts_with("note: census incomplete: ")).collect();
    assert!(
        notes.iter().any(|n| n.contains("GC lists: generation 0 not counted: list changed under the reader")),
        "the cycle is reported: {notes:?}\n{stdout}"
    );
    assert!(
        notes.iter().any(|n| n.contains("objects on the GC's lists have a type that is not one")),
        "the nameless type is reported: {notes:?}\n{stdout}"
    );
    assert!(
        !stdout.lines().any(|l| l.contains("Nameless ")),
        "a type whose name cannot be read is not named:\n{stdout}"
    );
}

fn probes_and_census(python: &Path) {
    let stdout = traced(python, &[]);
    let last = stdout.rfind("final report").unwrap_or_else(|| panic!("no final report:\n{stdout}"));
    let last = &stdout[last..];
    census_notes(last);
    // The forged code's allocations are still reported, under what could
    // be read of them: the garbage table's function by its file, the
    // terabyte table's not at all, the FIFO by name, its source not read.
    let unreadable = format!("File \"{}\", line 0", memtrace::python::code::UNREADABLE_CODE);
    for shown in ["File \"/nonexistent/hostile/garbage_table.py\", line ", &unreadable] {
        assert!(last.contains(shown), "{shown} is not in the final report:\n{last}");
    }
    let lines: Vec<&str> = last.lines().collect();
    let fifo = lines.iter().position(|l| l.contains("/source.py\", line 3")).expect("the FIFO's frame");
    assert!(!lines[fifo + 1].starts_with("    "), "a FIFO is not read as source:\n{last}");
}

fn census_only(python: &Path) {
    let stdout = traced(python, &["--census-only"]);
    let last = stdout.rfind("final census").unwrap_or_else(|| panic!("no final census:\n{stdout}"));
    census_notes(&stdout[last..]);
}

#[test]
fn a_hostile_target_on_3_12_is_reported_and_never_hangs_memtrace() {
    require_root();
    probes_and_census(&pyenv("3.12.1"));
    census_only(&pyenv("3.12.1"));
}

/// 3.9's line table is `co_lnotab`; its GC state is in the interpreter.
#[test]
fn a_hostile_target_on_3_9_is_reported_and_never_hangs_memtrace() {
    require_root();
    probes_and_census(&pyenv("3.9.18"));
    census_only(&pyenv("3.9.18"));
}
