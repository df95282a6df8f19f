//! Host mode's free tier (`--all-python`): every CPython process whose
//! command line matches is found, those running at start and one started
//! later, and each gets its own census reports with no probe attached;
//! the census counts exactly what each process holds, on every kind of
//! interpreter at once. Mistakes are one line.

use std::{path::Path, process::Command};

use memtrace_tests::{
    JsonReport, Memtrace, Target, ensure_package, json_reports, memtrace_bin, pyenv, require_root, run_memtrace,
};

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
        "memtrace: no Python process matching no-such-program-anywhere yet; watching for new ones\n\
         memtrace: host mode: 0 Python processes started since memtrace started, 0 of them exited before they could be read; 0 found by the /proc scan that the kernel's announcements missed; 0 announcements lost\n"
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

/// Leaks `sys.argv[1]` instances of its own class once told to, then lives
/// on for a few seconds and exits.
const SHORT_LIVED: &str = "import sys, time
class Leak:
    pass
print('ready', flush=True)
sys.stdin.readline()
keep = [Leak() for _ in range(int(sys.argv[1]))]
print('leaked', flush=True)
time.sleep(4.5)
";

const INTERVAL_SECS: f64 = 3.0;

/// A process started after memtrace is watched from its start, announced
/// by the kernel's exec tracepoint rather than found at the next report;
/// it lives five seconds, and a report shows exactly what it leaked, as
/// growth since its start.
#[test]
fn a_process_started_later_is_watched_from_its_start() {
    require_root();
    let marker = format!("memtrace-host-late-{}", std::process::id());
    let interval = INTERVAL_SECS.to_string();
    let pattern = format!("{marker}$");
    let mut memtrace =
        Memtrace::start(&["--all-python", "--match", &pattern, "--interval", &interval, "--format", "json"]);
    memtrace.wait_stderr("memtrace: no Python process matching").unwrap();
    let waiting = std::time::Instant::now();
    let mut target = Target::spawn(Command::new(pyenv("3.12.1")).args(["-c", SHORT_LIVED, "1234", &marker]));
    target.expect_line("ready");
    memtrace.wait_stderr(&format!("{}{} ", Memtrace::TRACING, target.pid())).unwrap();
    // Before the first report: found by its announcement, not by a scan.
    let found_after = waiting.elapsed().as_secs_f64();
    assert!(found_after < INTERVAL_SECS - 0.5, "watched {found_after:.2} s after memtrace started");
    target.send("leak");
    target.expect_line("leaked");
    let pid = target.pid();
    assert!(target.finish().success());
    memtrace.wait_stderr(&format!("memtrace: pid {pid} exited")).unwrap();
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let reports = json_reports(&stdout);
    let first = reports.iter().find(|r| r.pid == pid && !r.is_final).expect("a report while it lived");
    let leak = first.census.as_ref().and_then(|c| c.types.iter().find(|t| t.name == "__main__.Leak"));
    assert_eq!(leak.map(|t| (t.count, t.change)), Some((1234, 1234)), "{:?}", first.census);
}

/// The memtrace process's resident memory (VmRSS) in KiB, and its open
/// file descriptors: the fewest of a few looks, since a scan of /proc or a
/// census holds one for a moment.
fn footprint(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB");
    let descriptors = (0..5)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
        })
        .min();
    (rss.trim().parse().unwrap(), descriptors.unwrap())
}

/// Entries in the hash maps of memtrace process `pid` (found by the map ids
/// in its descriptors' fdinfo), counted with bpftool.
fn map_entries(pid: u32) -> usize {
    ensure_package("bpftool", "bpftool").unwrap();
    let mut entries = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else { continue };
        let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned());
        // BPF_MAP_TYPE_HASH and BPF_MAP_TYPE_PERCPU_HASH.
        let (Some(id), Some("1" | "5")) = (field("map_id:"), field("map_type:").as_deref()) else { continue };
        let dump = Command::new("bpftool").args(["-j", "map", "dump", "id", &id]).output().unwrap();
        let values: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap_or(serde_json::Value::Null);
        entries += values.as_array().map_or(0, Vec::len);
    }
    entries
}

/// Starts `n` Python processes that exit at once, `per_second` a second,
/// and returns their pids.
fn churn(python: &Path, marker: &str, n: usize, per_second: usize) -> Vec<u32> {
    let started = std::time::Instant::now();
    let mut children: Vec<std::process::Child> = Vec::new();
    let mut pids = Vec::new();
    for i in 0..n {
        let due = started + std::time::Duration::from_secs_f64(i as f64 / per_second as f64);
        std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
        let child = Command::new(python).args(["-c", "pass", marker]).spawn().unwrap();
        pids.push(child.id());
        children.push(child);
        children.retain_mut(|c| c.try_wait().unwrap().is_none());
    }
    for mut child in children {
        child.wait().unwrap();
    }
    pids
}

/// A thousand short-lived Python processes, 50 a second (a minute's worth
/// of a busy cron host in 20 s, to keep the suite fast; the rate is what
/// tests the announcements): every one is either watched or named as
/// having exited before it could be read, none is missed, and memtrace
/// holds no more memory or descriptors afterwards than before.
#[test]
fn a_thousand_short_lived_processes_are_each_seen_or_named() {
    require_root();
    let marker = format!("memtrace-host-churn-{}", std::process::id());
    let pattern = format!("{marker}$");
    let mut memtrace = Memtrace::start(&["--all-python", "--match", &pattern, "--interval", "1", "--format", "json"]);
    memtrace.wait_stderr("memtrace: no Python process matching").unwrap();
    let python = pyenv("3.12.1");
    // Warmed up: it has watched a process to its end, and its allocator has
    // seen a few come and go.
    let mut watched = Target::spawn(Command::new(&python).args(["-c", "input()", &marker]));
    memtrace.wait_stderr(&format!("{}{} ", Memtrace::TRACING, watched.pid())).unwrap();
    watched.send("");
    let first = watched.pid();
    assert!(watched.finish().success());
    memtrace.wait_stderr(&format!("memtrace: pid {first} exited")).unwrap();
    let mut pids = churn(&python, &marker, 50, 50);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (before, entries_before) = (footprint(memtrace.pid()), map_entries(memtrace.pid()));
    pids.extend(churn(&python, &marker, 950, 50));
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (after, entries_after) = (footprint(memtrace.pid()), map_entries(memtrace.pid()));
    memtrace.signal(libc::SIGINT);
    let (status, _, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let unaccounted: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|pid| {
            let (watched, vanished) = (format!("{}{pid} ", Memtrace::TRACING), format!("memtrace: pid {pid} ("));
            !stderr.iter().any(|l| {
                l.starts_with(&watched) || (l.starts_with(&vanished) && l.ends_with("exited before it could be read"))
            })
        })
        .collect();
    let said: Vec<&String> =
        stderr.iter().filter(|l| unaccounted.iter().any(|pid| l.contains(&format!(" {pid} ")))).collect();
    assert!(
        unaccounted.is_empty(),
        "{} of 1000 neither watched nor named: {unaccounted:?}: {said:?}",
        unaccounted.len()
    );
    let summary = stderr.iter().find(|l| l.starts_with("memtrace: host mode: ")).expect("a summary");
    // The scan's finds are counted, not failed on: under load it finds a
    // few processes alive after a second that their announcements had not
    // settled yet (issue 10: to be explained).
    assert!(summary.ends_with("; 0 announcements lost"), "{summary}");
    eprintln!(
        "memtrace RSS {} KiB -> {} KiB, descriptors {} -> {}, map entries {entries_before} -> {entries_after}; {summary}",
        before.0, after.0, before.1, after.1
    );
    assert_eq!(after.1, before.1, "descriptors");
    assert_eq!(entries_after, entries_before, "entries in memtrace's maps");
    assert!(after.0 <= before.0 + 1024, "RSS grew from {} KiB to {} KiB", before.0, after.0);
}
