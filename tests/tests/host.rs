//! Host mode's free tier (`--all-python`): every CPython process whose
//! command line matches is found, those running at start and one started
//! later, and each gets its own census reports with no probe attached;
//! the census counts exactly what each process holds, on every kind of
//! interpreter at once. Mistakes are one line.

use std::{os::unix::process::CommandExt as _, path::Path, process::Command};

use memtrace_tests::{
    JsonHostReport, JsonReport, Memtrace, Target, TempDir, compile_c, ensure_package, host_reports, json_reports,
    memtrace_bin, pyenv, require_root, run_memtrace,
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

/// The `Leak` objects a host report counts in process `pid`: grown since
/// memtrace first saw it, it is among the types that grew.
fn leaks(report: &JsonHostReport, pid: u32) -> u64 {
    let standing = report.processes.iter().find(|p| p.pid == pid).expect("each process ranked");
    standing.types.iter().find(|t| t.name == "__main__.Leak").map_or(0, |t| t.count)
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
    let host = host_reports(&stdout).pop().expect("host reports");
    assert!(host.is_final && host.watched == 4, "{host:?}");
    for (target, n) in targets.iter().zip([1000, 2000, 3000, 4000]) {
        let last: &JsonReport = reports.iter().filter(|r| r.pid == target.pid()).last().expect("reports of each");
        assert!(last.is_final && !last.traced, "census only: {last:?}");
        assert_eq!(leaks(&host, target.pid()), n, "pid {}: {host:?}", target.pid());
    }
    assert!(reports.iter().all(|r| r.pid != other.pid()), "the other Python does not match");
    assert!(host.processes.iter().all(|p| p.pid != other.pid()), "the other Python does not match");
}

/// Leaks `Leak` instances (argv[1] of them every 0.25 s), churns 8 MiB
/// of private memory (argv[1] 0: mapped, touched and unmapped every 0.35 s,
/// a period memtrace's 0.5 s interval cannot fall in step with; malloc
/// would keep it after the first free, raising its mmap threshold, and a
/// shared mapping is not anonymous memory), or sits still
/// (`still`); on "freeze" stops and says how many `Leak` objects
/// gc.get_objects() holds.
const HOST_SCRIPT: &str = "import gc, mmap, sys, threading, time
class Leak:
    pass
keep = []
freeze = threading.Event()
threading.Thread(target=lambda: sys.stdin.readline() and freeze.set(), daemon=True).start()
print('ready', flush=True)
rate = None if sys.argv[1] == 'still' else int(sys.argv[1])
churn = None
while not freeze.is_set():
    if rate:
        keep.extend(Leak() for _ in range(rate))
        time.sleep(0.25)
    elif rate == 0:
        if churn:
            churn.close()
            churn = None
        else:
            churn = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE)
            for page in range(0, 8 << 20, 4096):
                churn[page] = 1
        time.sleep(0.35)
    else:
        time.sleep(0.1)
print('count', sum(1 for o in gc.get_objects() if type(o) is Leak), flush=True)
time.sleep(3600)
";

fn host_target(path: &Path, args: &[&str]) -> Target {
    assert!(path.exists(), "{} is missing", path.display());
    let mut target = Target::spawn(Command::new(path).args(["-c", HOST_SCRIPT]).args(args));
    target.expect_line("ready");
    target
}

/// The issue's host report: interpreters of every kind at once, ranked by
/// growth; the leakers first (the faster first), growing, with their class
/// counted as their own gc.get_objects() counts it; the churner churns and
/// the still one is on a plateau.
#[test]
fn the_host_report_ranks_the_leakers_first_with_their_type() {
    require_root();
    let marker = format!("memtrace-host-report-{}", std::process::id());
    let mut fast = host_target(&pyenv("3.12.1"), &["400", &marker]);
    let mut slow = host_target(&pyenv("3.13.0"), &["100", &marker]);
    let churner = host_target(&pyenv("3.8.18"), &["0", &marker]);
    let still = host_target(Path::new("/usr/bin/python3.11"), &["still", &marker]);
    let pattern = format!("{marker}$");
    let memtrace = Memtrace::attach(&["--all-python", "--match", &pattern, "--interval", "0.5", "--format", "json"]);
    std::thread::sleep(std::time::Duration::from_secs(9));
    // Frozen, the leakers hold still while memtrace's final census is taken.
    let mut own = Vec::new();
    for target in [&mut fast, &mut slow] {
        target.send("freeze");
        own.push(target.expect_line_prefix("count ").trim_start_matches("count ").trim().parse::<u64>().unwrap());
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let reports = host_reports(&stdout);
    assert!(reports.len() >= 12, "a host report every 0.5 s: {}", reports.len());
    let last: &JsonHostReport = reports.last().unwrap();
    assert!(last.is_final);
    assert_eq!((last.watched, last.in_containers, last.skipped.len()), (4, 0, 0), "{last:?}");
    // Ranked on a report while all four ran.
    let ranked = &reports[reports.len() - 4];
    let order: Vec<u32> = ranked.processes.iter().map(|p| p.pid).collect();
    assert_eq!(&order[..2], [fast.pid(), slow.pid()], "{ranked:#?}");
    let verdict = |pid: u32| {
        let standing = ranked.processes.iter().find(|p| p.pid == pid).unwrap();
        standing.verdict.clone().unwrap_or_default()
    };
    assert_eq!(verdict(fast.pid()), "growing");
    assert_eq!(verdict(slow.pid()), "growing");
    assert_eq!(verdict(churner.pid()), "churn");
    assert_eq!(verdict(still.pid()), "plateau");
    for (target, own) in [&fast, &slow].into_iter().zip(own) {
        let growing = ranked.processes.iter().find(|p| p.pid == target.pid()).unwrap();
        assert!(growing.growing_since.is_some(), "{growing:?}");
        let leak = &growing.types[0];
        assert_eq!(leak.name, "__main__.Leak", "the growing type first: {growing:?}");
        assert_eq!(leak.verdict.as_deref(), Some("growing"), "{leak:?}");
        // Frozen before the final census: the same objects, counted twice.
        let last_leak = last.processes.iter().find(|p| p.pid == target.pid()).unwrap();
        let last_leak = last_leak.types.iter().find(|t| t.name == "__main__.Leak").expect("still grown");
        assert_eq!(last_leak.count, own, "pid {}", target.pid());
        assert!(last_leak.change > 0 && last_leak.change as u64 <= own, "{last_leak:?}");
    }
    for standing in &last.processes {
        let memory = standing.memory.expect("memory read at every report");
        assert!(memory.rss > 0 && standing.memory_at_start.is_some(), "{standing:?}");
        assert!(standing.census_time.is_some(), "{standing:?}");
    }
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
    // Each interval's host report says so too.
    let headers: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).map(|l| l.split_once("] ").unwrap().1).collect();
    assert_eq!(
        headers,
        [
            "memtrace host report 1: 0 processes watched (0 in containers), 0 skipped",
            "memtrace host final report 2: 0 processes watched (0 in containers), 0 skipped"
        ]
    );
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
        (&["--match", "x", "--pid", "1"][..], "--match narrows --all-python or --all, neither of which is given"),
        (&["--all", "--all-python"][..], "the argument '--all' cannot be used with '--all-python'"),
        (&["--all", "--pid", "1"][..], "the argument '--all' cannot be used with '--pid <PID>'"),
        (&["--all-python", "--native"][..], "the argument '--all-python' cannot be used with '--native'"),
    ] {
        let (code, _, stderr) = run_memtrace(Command::new(memtrace_bin()).args(args));
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// `--census-only` over several pids is host mode on chosen processes; a
/// pid among them that does not exist is one line, the others are watched.
#[test]
fn several_pids_census_only_get_a_host_report_and_a_missing_one_is_one_line() {
    require_root();
    let a = host_target(&pyenv("3.12.1"), &["still"]);
    let b = host_target(Path::new("/usr/bin/python3.11"), &["still"]);
    let pids = format!("{},4194305,{}", a.pid(), b.pid());
    let (code, stdout, stderr) = run_memtrace(Command::new(memtrace_bin()).args([
        "--census-only",
        "--pid",
        &pids,
        "--interval",
        "0.3",
        "--count",
        "2",
        "--format",
        "json",
    ]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.lines().any(|l| l == "memtrace: pid 4194305 is not traced: no process with pid 4194305"),
        "{stderr}"
    );
    let last = host_reports(&stdout).pop().expect("host reports");
    let mut watched: Vec<u32> = last.processes.iter().map(|p| p.pid).collect();
    watched.sort_unstable();
    let mut want = vec![a.pid(), b.pid()];
    want.sort_unstable();
    assert_eq!(watched, want, "{last:?}");
    // None of them: the session fails with one line.
    let (code, _, stderr) =
        run_memtrace(Command::new(memtrace_bin()).args(["--census-only", "--pid", "4194305,4194306"]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.ends_with("memtrace: none of the pids given can be traced: no process with pid 4194305\n"),
        "{stderr}"
    );
}

/// `--all` watches native processes too: a C program that touches 256 KiB
/// more every 0.2 s is ranked first and growing, its memory counted.
#[test]
fn all_watches_native_processes_by_their_memory() {
    require_root();
    let dir = TempDir::new("host-all");
    let grower = compile_c(
        &dir,
        "grower",
        r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        memset(malloc(256 << 10), 1, 256 << 10);
        usleep(200000);
    }
}
"#,
        &[],
    );
    let marker = format!("memtrace-host-all-{}", std::process::id());
    let mut target = Target::spawn(Command::new(&grower).arg0(&marker));
    target.expect_line("ready");
    let (code, stdout, stderr) = run_memtrace(Command::new(memtrace_bin()).args([
        "--all",
        "--match",
        &format!("^{marker}$"),
        "--interval",
        "0.5",
        "--count",
        "8",
        "--format",
        "json",
    ]));
    assert_eq!(code, Some(0), "{stderr}");
    let last = host_reports(&stdout).pop().expect("host reports");
    assert_eq!(last.watched, 1, "{last:?}");
    let standing = &last.processes[0];
    assert_eq!((standing.pid, standing.interpreter.as_deref()), (target.pid(), None));
    assert_eq!(standing.verdict.as_deref(), Some("growing"), "{standing:?}");
    // 256 KiB every 0.2 s is 1.25 MiB/s, give or take the scheduling.
    let slope = standing.slope_bytes_per_second.unwrap();
    assert!((0.8e6..1.6e6).contains(&slope), "{slope}");
    let (memory, start) = (standing.memory.unwrap(), standing.memory_at_start.unwrap());
    assert!(memory.anonymous > start.anonymous + (2 << 20), "{standing:?}");
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
    // Its standing in a host report while it lived: the leak, as growth
    // since memtrace first saw it.
    let standings: Vec<_> = host_reports(&stdout)
        .into_iter()
        .filter_map(|r| r.processes.into_iter().find(|p| p.pid == pid && !p.exited))
        .collect();
    let leak = standings.iter().rev().find_map(|s| s.types.iter().find(|t| t.name == "__main__.Leak"));
    assert_eq!(leak.map(|t| (t.count, t.change)), Some((1234, 1234)), "{standings:?}");
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
/// holds no more descriptors or map entries afterwards than before, nor
/// more memory after the last 475 than after the 475 before them.
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
    // Two halves: the first takes memtrace's memory to what this machine's
    // load makes its high-water mark (more processes alive at once under
    // load, each read at once), the second must not add to it, as a leak
    // per process would.
    pids.extend(churn(&python, &marker, 475, 50));
    std::thread::sleep(std::time::Duration::from_secs(2));
    let halfway = footprint(memtrace.pid());
    pids.extend(churn(&python, &marker, 475, 50));
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
        "memtrace RSS {} KiB -> {} KiB -> {} KiB, descriptors {} -> {}, map entries {entries_before} -> {entries_after}; {summary}",
        before.0, halfway.0, after.0, before.1, after.1
    );
    assert_eq!(after.1, before.1, "descriptors");
    assert_eq!(entries_after, entries_before, "entries in memtrace's maps");
    assert!(after.0 <= halfway.0 + 1024, "RSS grew from {} KiB to {} KiB over the second 475", halfway.0, after.0);
}

/// Grows by 200 bytes objects (a built-in type) every 0.25 s from one line.
const BYTES_LEAK: &str = "import sys, time
keep = []
print('ready', flush=True)
while True:
    keep.extend(bytes(100) for _ in range(200))  # LEAK
    time.sleep(0.25)
";

/// Grows by 200 instances of its own class every 0.25 s from one line.
const CLASS_LEAK: &str = "import sys, time
class Leak:
    pass
keep = []
print('ready', flush=True)
while True:
    keep.extend(Leak() for _ in range(200))  # LEAK
    time.sleep(0.25)
";

/// `--escalate`: a process growing for a whole verdict window is traced
/// for `--window` seconds (exactly, what grows being built-in objects),
/// its tracemalloc report names the leaking line and what the window cost,
/// and it is watched on after.
#[test]
fn escalate_traces_the_grower_for_a_window_then_watches_it_again() {
    escalated("exact", "exact tracing of every allocation", BYTES_LEAK);
}

/// A class of the program's own that grows is traced by its births alone.
#[test]
fn escalate_traces_a_growing_class_by_its_births() {
    escalated("class", "the births of __main__.Leak (--type __main__.Leak)", CLASS_LEAK);
}

fn escalated(name: &str, tier: &str, script: &str) {
    require_root();
    let marker = format!("memtrace-host-escalate-{name}-{}", std::process::id());
    let target = host_target_script(&pyenv("3.12.1"), script, &marker);
    let pattern = format!("{marker}$");
    let (code, stdout, stderr) = run_memtrace(Command::new(memtrace_bin()).args([
        "--all-python",
        "--match",
        &pattern,
        "--interval",
        "0.5",
        "--escalate",
        "--window",
        "2",
        "--duration",
        "9",
        "--format",
        "json",
    ]));
    assert_eq!(code, Some(0), "{stderr}");
    let pid = target.pid();
    assert!(
        stderr.contains(&format!("memtrace: pid {pid} has grown for 8 reports: {tier} for 2 s (--escalate)")),
        "{stderr}"
    );
    let reports = json_reports(&stdout);
    let window = reports.iter().find(|r| r.pid == pid && r.traced && r.is_final).expect("the window's report");
    let leak_line = format!("<string>:{}", memtrace_tests::line_of(script, "# LEAK"));
    assert_eq!(window.rows[0].location, leak_line, "{window:?}");
    assert!(window.rows[0].count > 0, "{:?}", window.rows[0]);
    let note =
        window.notes.iter().find(|n| n.starts_with("escalated from host mode (--escalate) for 2 s")).expect("the cost");
    assert!(note.contains("probe hits, about"), "{note}");
    // Watched on, at the free tier, after the window.
    let after = reports.iter().filter(|r| r.pid == pid).skip_while(|r| !r.traced).find(|r| !r.traced);
    assert!(after.is_some_and(|r| r.sequence > window.sequence), "{after:?}");
    let last = host_reports(&stdout).pop().unwrap();
    assert!(last.processes.iter().any(|p| p.pid == pid), "{last:?}");
}

fn host_target_script(path: &Path, script: &str, marker: &str) -> Target {
    let mut target = Target::spawn(Command::new(path).args(["-c", script, marker]));
    target.expect_line("ready");
    target
}
