//! Host mode's free tier (`--all-python`): every CPython process whose
//! command line matches is found, those running at start and one started
//! later, and each gets its own census reports with no probe attached;
//! the census counts exactly what each process holds, on every kind of
//! interpreter at once. Mistakes are one line.

use std::{path::Path, process::Command};

use memtrace_tests::{JsonReport, Memtrace, Target, json_reports, memtrace_bin, pyenv, require_root, run_memtrace};

/// Holds instances of its own class, `grow N` more at a time.
const SCRIPT: &str = "import sys
class Leak:
    pass
keep = []
print('ready', flush=True)
for line in sys.stdin:
    keep.extend(Leak() for _ in range(int(line.split()[1])))
    print('grown', flush=True)
";

fn python(path: &Path, marker: &str) -> Target {
    assert!(path.exists(), "{} is missing", path.display());
    let mut target = Target::spawn(Command::new(path).args(["-c", SCRIPT, marker]));
    target.expect_line("ready");
    target
}

fn leaks(report: &JsonReport) -> u64 {
    let census = report.census.as_ref().expect("a census");
    census.types.iter().find(|t| t.name == "__main__.Leak").map_or(0, |t| t.count)
}

#[test]
fn every_matching_python_is_watched_with_exact_counts() {
    require_root();
    let marker = format!("memtrace-host-test-{}", std::process::id());
    let mut targets: Vec<Target> =
        [pyenv("3.8.18"), pyenv("3.12.1"), "/usr/bin/python3.11".into()].iter().map(|p| python(p, &marker)).collect();
    // A Python that does not match is left alone.
    let other = python(&pyenv("3.12.1"), "some-other-service");
    let pattern = format!("{marker}$");
    let mut memtrace = Memtrace::attach(&[
        "--all-python",
        "--match",
        &pattern,
        "--interval",
        "0.5",
        "--format",
        "json",
        "--types-limit",
        "5",
    ]);
    for target in &targets[1..] {
        memtrace.wait_stderr(&format!("{}{} ", Memtrace::TRACING, target.pid())).unwrap();
    }
    // Started after memtrace: found at a report.
    targets.push(python(&pyenv("3.13.0"), &marker));
    memtrace.wait_stderr(&format!("{}{} ", Memtrace::TRACING, targets[3].pid())).unwrap();
    for (target, n) in targets.iter_mut().zip([1000, 2000, 3000, 4000]) {
        target.send(&format!("grow {n}"));
        target.expect_line("grown");
    }
    // Two reports after the last growth, all quiescent.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let reports = json_reports(&stdout);
    for (target, n) in targets.iter().zip([1000, 2000, 3000, 4000]) {
        let last = reports.iter().filter(|r| r.pid == target.pid()).last().expect("reports of each");
        assert!(last.is_final && !last.traced, "census only: {last:?}");
        assert_eq!(leaks(last), n, "pid {}: {:?}", target.pid(), last.census);
    }
    assert!(reports.iter().all(|r| r.pid != other.pid()), "the other Python does not match");
}

#[test]
fn no_python_yet_is_said_and_watched_for() {
    require_root();
    let (code, stdout, stderr) = run_memtrace(Command::new(memtrace_bin()).args([
        "--all-python",
        "--match",
        "no-such-program-anywhere",
        "--interval",
        "0.2",
        "--count",
        "2",
    ]));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "memtrace: no Python process matching no-such-program-anywhere yet; looking again at every report\n"
    );
}

#[test]
fn host_mode_mistakes_are_usage_errors() {
    for (args, needle) in [
        (
            &["--all-python", "--match", "("][..],
            "invalid value '(' for '--match <REGEX>': is not a regular expression: unclosed group",
        ),
        (&["--all-python", "--pid", "1"][..], "the argument '--all-python' cannot be used with '--pid <PID>'"),
        (&["--match", "x", "--pid", "1"][..], "--match narrows --all-python, which is not given"),
        (&["--all-python", "--native"][..], "the argument '--all-python' cannot be used with '--native'"),
    ] {
        let (code, _, stderr) = run_memtrace(Command::new(memtrace_bin()).args(args));
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
