//! memtrace against real CPython processes, on every interpreter memtrace
//! supports. Ground truth is tracemalloc: each workload runs once in-process
//! under `-X tracemalloc=25`, printing its own `compare_to('lineno')`, and
//! once untraced with memtrace attached from outside over the same phase;
//! the top three lines must be the same lines in the same order, with
//! counts within 2% and sizes within 5%.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use memtrace_tests::{
    JsonReport, Memtrace, ReportLine, Row, Target, WORKLOADS, final_report, parse_line, pyenv, require_root,
    workload_line, workload_site,
};

/// What tracemalloc says about one run of `workload`.
struct Truth {
    top: Vec<ReportLine>,
    /// compare_to('traceback')'s biggest offender, oldest frame first.
    traceback: Vec<String>,
}

fn tracemalloc_truth(python: &Path, workload: &str) -> Truth {
    assert!(python.exists(), "{} is missing: it is a supported interpreter", python.display());
    let mut target =
        Target::spawn(Command::new(python).args(["-X", "tracemalloc=25", WORKLOADS, "tracemalloc", workload]));
    target.expect_line("ready");
    target.send("go");
    let mut top = Vec::new();
    let mut traceback = Vec::new();
    loop {
        let line = target.expect_line_prefix("");
        if let Some(stat) = line.strip_prefix("TM ") {
            top.push(parse_line(stat).unwrap_or_else(|| panic!("unparsable tracemalloc line {stat:?}")));
        } else if let Some(frame) = line.strip_prefix("TB ") {
            traceback.push(frame.to_owned());
        } else if line == "done" {
            break;
        }
    }
    Truth { top, traceback }
}

/// memtrace's final report on one untraced run of `workload`, and its
/// whole stdout; `extra` are more memtrace options.
struct Observed {
    report: JsonReport,
    stdout: String,
    /// What the workload printed besides its protocol.
    said: Vec<String>,
}

fn memtrace_view(python: &Path, workload: &str, extra: &[&str]) -> Observed {
    let mut args = vec!["--format", "json"];
    args.extend_from_slice(extra);
    let (stdout, said) = memtrace_run(python, workload, &args);
    Observed { report: final_report(&stdout), stdout, said }
}

/// memtrace's stdout over one untraced run of `workload`, and what the
/// workload printed besides its protocol.
fn memtrace_run(python: &Path, workload: &str, extra: &[&str]) -> (String, Vec<String>) {
    assert!(python.exists(), "{} is missing: it is a supported interpreter", python.display());
    let mut target = Target::spawn(Command::new(python).args([WORKLOADS, "plain", workload]));
    target.expect_line("ready");
    let pid = target.pid().to_string();
    let mut args = vec!["--pid", &pid, "--interval", "600"];
    args.extend_from_slice(extra);
    let memtrace = Memtrace::attach(&args);
    target.send("go");
    let mut said = Vec::new();
    loop {
        let line = target.expect_line_prefix("");
        if line == "done" {
            break;
        }
        said.push(line);
    }
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "memtrace failed: {stderr:?}");
    assert!(
        !stderr.iter().any(|l| l.contains("native frames only")),
        "{} must be supported: {stderr:?}",
        python.display()
    );
    (stdout, said)
}

fn bytes(size: &str) -> f64 {
    let (value, unit) = size.split_once(' ').unwrap_or_else(|| panic!("bad size {size:?}"));
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => panic!("bad unit in {size:?}"),
    };
    value.parse::<f64>().unwrap() * scale
}

/// memtrace's row agrees with tracemalloc's line: same place, count within
/// 2%, size within 5% (plus the rounding of tracemalloc's printed size). Counts are
/// integers, and CPython's free lists hold a few blocks whose state differs
/// between any two processes (a dict keys object one process allocates
/// fresh at a line, another reuses), so a one-block difference is allowed
/// where 2% is less than a block.
fn assert_close(truth: &ReportLine, seen: &Row, context: &str) {
    assert_eq!(seen.location, truth.location, "{context}");
    let (want, got) = (truth.count as f64, seen.count as f64);
    assert!((got - want).abs() <= (0.02 * want).max(1.0), "{context}: count {got} vs tracemalloc's {want}");
    let (want, got) = (bytes(&truth.size), seen.size as f64);
    let rounding = if truth.size.ends_with(" B") { 0.0 } else { 0.001 * want };
    assert!((got - want).abs() <= 0.05 * want + rounding, "{context}: size {got} vs tracemalloc's {want}");
}

/// The ground-truth comparison: the workload's three marked lines lead both
/// reports, in the same order, with close numbers.
fn ground_truth(python: &Path, workload: &str, markers: [&str; 3]) -> Observed {
    let truth = tracemalloc_truth(python, workload);
    let seen = memtrace_view(python, workload, &[]);
    let expected: Vec<String> = markers.iter().map(|m| workload_site(m)).collect();
    let mut truth_top: Vec<String> = truth.top[..3].iter().map(|l| l.location.clone()).collect();
    truth_top.sort();
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(truth_top, sorted, "tracemalloc's top 3 are the workload's lines: {:?}", truth.top);
    let rows = &seen.report.rows;
    assert!(rows.len() >= 3, "memtrace reported fewer than 3 lines:\n{}", seen.stdout);
    for (i, (truth, seen_row)) in truth.top.iter().zip(rows).take(3).enumerate() {
        assert_close(truth, seen_row, &format!("{workload} line {i}:\n{}", seen.stdout));
    }
    assert_eq!(seen.report.losses["alloc-map-full"], 0, "{}", seen.stdout);
    seen
}

/// Each frame names its function as Python's own tracebacks do from 3.11
/// (`co_qualname`: `Holder.__init__`), or before 3.11 as they did then
/// (`co_name`), with the function's first line.
fn nested_lists(python: &Path) {
    let seen = ground_truth(python, "nested_lists", ["holder-data", "holder-label", "holder"]);
    let function_of = |marker: &str| {
        let row = seen.report.rows.iter().find(|r| r.location == workload_site(marker)).unwrap();
        (row.frames[0].function.clone().unwrap_or_default(), row.frames[0].first_lineno)
    };
    let qualified = Command::new(python)
        .args(["-c", "import sys; print(sys.version_info >= (3, 11))"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "True")
        .unwrap();
    let method = if qualified { "Holder.__init__" } else { "__init__" };
    let first_line = |marker: &str| Some(workload_line(marker) as u32 - 1);
    assert_eq!(function_of("holder-data"), (method.to_owned(), first_line("holder-data")), "{}", seen.stdout);
    assert_eq!(function_of("holder"), ("nested_lists".to_owned(), Some(workload_line("holder") as u32 - 4)));
}

fn dict_cache(python: &Path) {
    ground_truth(python, "dict_cache", ["cache-key", "cache-value", "cache-insert"]);
}

fn closures(python: &Path) {
    ground_truth(python, "closures", ["closure-buffer", "closure-def", "closure"]);
}

/// Pure churn keeps nothing: no line of the workload holds memory.
fn churn(python: &Path) {
    let seen = memtrace_view(python, "churn", &[]);
    let held: u64 = seen.report.rows.iter().filter(|l| l.location.starts_with(WORKLOADS)).map(|l| l.size).sum();
    assert!(held < 1024, "churn holds {held} bytes:\n{}", seen.stdout);
    assert!(seen.report.allocated.size > 5 << 20, "the churn was seen: {:?}", seen.report.allocated);
}

/// `--group-by traceback`: the biggest offender's first four frames are
/// tracemalloc's.
fn traceback(python: &Path) {
    let truth = tracemalloc_truth(python, "deep");
    let (stdout, _) = memtrace_run(python, "deep", &["--group-by", "traceback", "--top", "1"]);
    let frames: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  File \""))
        .map(|l| {
            let (file, line) = l.split_once("\", line ").unwrap();
            format!("{file}:{line}")
        })
        .collect();
    assert!(truth.traceback.len() >= 4 && frames.len() >= 4, "{:?}\n{stdout}", truth.traceback);
    assert_eq!(frames[..4], truth.traceback[..4], "{stdout}");
    assert_eq!(frames.last(), Some(&workload_site("deep")), "innermost frame last: {stdout}");
    // Each frame is followed by its source line, as Traceback.format() does.
    assert!(stdout.contains("    deep_leak(depth - 1)  # MARK:deep-recurse"), "{stdout}");
}

/// Three threads leaking from their own lines get their own lines.
fn threads(python: &Path) {
    let truth = tracemalloc_truth(python, "threads");
    let seen = memtrace_view(python, "threads", &[]);
    let rows = &seen.report.rows;
    for (i, (truth, seen_row)) in truth.top.iter().zip(rows).take(3).enumerate() {
        assert_close(truth, seen_row, &format!("threads line {i}:\n{}", seen.stdout));
    }
    let mut top: Vec<&str> = rows[..3].iter().map(|l| l.location.as_str()).collect();
    top.sort();
    let mut want = [workload_site("thread-one"), workload_site("thread-two"), workload_site("thread-three")];
    want.sort();
    assert_eq!(top, want);
}

/// Memory malloc'ed through ctypes, which tracemalloc cannot see, is the
/// Python line's; with --native the C frames beneath it are shown.
fn native_leak(python: &Path) {
    let seen = memtrace_view(python, "native_leak", &[]);
    let rows = &seen.report.rows;
    let line = rows.iter().find(|l| l.location == workload_site("ctypes-malloc")).expect("the ctypes line is reported");
    assert!(line.count >= 1000 && line.size >= 1000 * 8192, "{}", seen.stdout);
    assert_eq!(rows[0].location, workload_site("ctypes-malloc"), "{}", seen.stdout);

    let seen = memtrace_view(python, "native_leak", &["--native", "--group-by", "traceback", "--top", "1"]);
    let frames = &seen.report.rows[0].frames;
    let python_frame = frames.iter().position(|f| f.lineno as usize == workload_line("ctypes-malloc"));
    let native_frame = frames.iter().position(|f| f.filename.contains("ffi_call"));
    assert!(python_frame.is_some() && native_frame.is_some(), "Python and libffi frames: {frames:?}");
    assert!(native_frame < python_frame, "native frames come beneath (inside) the Python line: {frames:?}");
}

/// A freed code object whose address a new function gets is never reported
/// under the old function's name: every generated file keeps its own line
/// and numbers.
fn code_reuse(python: &Path) {
    let seen = memtrace_view(python, "code_reuse", &["--top", "50"]);
    let reused: u32 = seen.said.iter().find_map(|l| l.strip_prefix("REUSED ")).unwrap().parse().unwrap();
    assert!(reused > 0, "the allocator never reused a code object's address; the test proves nothing");
    let rows = &seen.report.rows;
    for i in 0..12 {
        let location = format!("generated_{i}.py:{}", i + 2);
        let line = rows.iter().find(|l| l.location == location).unwrap_or_else(|| {
            panic!("{location} missing (reused code objects reported under another name?):\n{}", seen.stdout)
        });
        // Ten bytes objects and the list holding them.
        assert!((11..=13).contains(&line.count), "{location}: {line:?}\n{}", seen.stdout);
    }
    assert!(
        !rows.iter().any(|l| l.location.starts_with("generated_") && l.count > 13),
        "one function got another's allocations:\n{}",
        seen.stdout
    );
}

macro_rules! interpreter {
    ($module:ident, $python:expr) => {
        mod $module {
            use super::*;

            fn python() -> PathBuf {
                require_root();
                $python
            }

            #[test]
            fn nested_lists_match_tracemalloc() {
                nested_lists(&python());
            }

            #[test]
            fn dict_cache_matches_tracemalloc() {
                dict_cache(&python());
            }

            #[test]
            fn closures_match_tracemalloc() {
                closures(&python());
            }

            #[test]
            fn churn_shows_no_growth() {
                churn(&python());
            }

            #[test]
            fn traceback_matches_tracemalloc() {
                traceback(&python());
            }

            #[test]
            fn threads_get_their_own_lines() {
                threads(&python());
            }

            #[test]
            fn ctypes_malloc_is_the_python_lines() {
                native_leak(&python());
            }

            #[test]
            fn reused_code_objects_keep_their_own_names() {
                code_reuse(&python());
            }
        }
    };
}

interpreter!(cpython_3_8, pyenv("3.8.18"));
interpreter!(cpython_3_9, pyenv("3.9.18"));
interpreter!(cpython_3_10, pyenv("3.10.13"));
interpreter!(cpython_3_11, pyenv("3.11.7"));
interpreter!(cpython_3_12, pyenv("3.12.1"));
interpreter!(cpython_3_13, pyenv("3.13.0"));
interpreter!(debian_python_3_11, PathBuf::from("/usr/bin/python3.11"));
