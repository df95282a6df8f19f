//! The object census against real interpreters, with `--census-only` (no
//! probe): on every supported CPython, the counts of a known population
//! equal the target's own `gc.get_objects()` for the types the collector
//! tracks and the known numbers for those it does not, a later growth
//! shows as exactly that, and a target that corrupts its own GC list and a
//! type's name gets a census that says it stopped, not a wrong one, while
//! memtrace and the target carry on.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use memtrace_tests::{JsonReport, Memtrace, Target, final_report, pyenv, require_root};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/census.py");

/// Runs a `--census-only` memtrace over one step of `target`: attached
/// before `send`ing it on, stopped after it printed `then`. Returns the
/// final report and what the target printed.
fn census_over(target: &mut Target, then: &str) -> (JsonReport, String) {
    let pid = target.pid().to_string();
    let memtrace = Memtrace::attach(&["--pid", &pid, "--census-only", "--interval", "600", "--format", "json"]);
    target.send("go");
    let said = target.expect_line_prefix(then);
    target.wait_reading_stdin();
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    (final_report(&stdout), said)
}

fn type_row<'a>(report: &'a JsonReport, name: &str) -> &'a memtrace::report::json::TypeJson {
    let census = report.census.as_ref().expect("a census");
    census.types.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no {name} in {census:?}"))
}

fn population(python: &Path) {
    assert!(python.exists(), "{} is missing: it is a supported interpreter", python.display());
    let mut target = Target::spawn(Command::new(python).args([SCRIPT, "population"]));
    target.expect_line("ready");

    let (report, said) = census_over(&mut target, "built ");
    let counts: Vec<u64> = said.split_whitespace().skip(1).map(|n| n.parse().unwrap()).collect();
    let census = report.census.as_ref().unwrap();
    assert!(census.incomplete.is_empty(), "{:?}", census.incomplete);
    assert!(!report.traced && report.rows.is_empty(), "no probe: {report:?}");
    // What the collector tracks: exactly the target's own count.
    let mine = type_row(&report, "__main__.MyObject");
    assert_eq!((mine.count, mine.tracked, mine.change), (counts[0], counts[0], 10_000), "{census:?}");
    assert_eq!(type_row(&report, "dict").tracked, counts[1], "{census:?}");
    // What it does not: the 20,000 bytes objects, within 1%.
    let bytes = type_row(&report, "bytes");
    assert!((bytes.change - 20_000).abs() <= 200, "{bytes:?}");
    assert!(report.heap.is_some_and(|h| h.blocks > 35_000), "{:?}", report.heap);
    assert!(report.memory.is_some_and(|m| m.rss > 0 && m.anonymous > 0), "{:?}", report.memory);

    let (report, said) = census_over(&mut target, "more ");
    let counts: Vec<u64> = said.split_whitespace().skip(1).map(|n| n.parse().unwrap()).collect();
    let mine = type_row(&report, "__main__.MyObject");
    assert_eq!((mine.count, mine.change), (counts[0], 1_000));
    assert_eq!(report.census.as_ref().unwrap().types[0].name, "__main__.MyObject", "the biggest growth first");
    target.send("done");
    assert!(target.finish().success());
}

fn hostile(python: &Path) {
    assert!(python.exists(), "{} is missing: it is a supported interpreter", python.display());
    let mut target = Target::spawn(Command::new(python).args([SCRIPT, "corrupt"]));
    target.expect_line("ready");
    let stopped = |report: &JsonReport| report.census.as_ref().unwrap().incomplete.join("; ");
    let (report, _) = census_over(&mut target, "cycle");
    assert!(
        stopped(&report).contains("GC lists: generation 0 not counted: list changed under the reader"),
        "{report:?}"
    );
    let (report, _) = census_over(&mut target, "unmapped");
    assert!(stopped(&report).contains("unmapped memory"), "{report:?}");
    let (report, _) = census_over(&mut target, "garbage-name");
    assert!(stopped(&report).contains("have a type that is not one"), "{report:?}");
    assert!(report.census.as_ref().unwrap().types.iter().all(|t| !t.name.ends_with("Named")), "{report:?}");
    // Mended, the target uses the type's name and collects: unharmed.
    let (report, said) = census_over(&mut target, "mended ");
    assert_eq!(said, "mended True");
    assert!(stopped(&report).is_empty(), "{report:?}");
    target.send("go");
    assert_eq!(target.expect_line_prefix("collected "), "collected True");
    target.send("done");
    assert!(target.finish().success());
}

/// Six censuses half a second apart of `target`, which runs on its own:
/// the final report, whose types have verdicts.
fn watched(target: &Target) -> JsonReport {
    let pid = target.pid().to_string();
    let memtrace =
        Memtrace::attach(&["--pid", &pid, "--census-only", "--interval", "0.5", "--count", "6", "--format", "json"]);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    final_report(&stdout)
}

/// The bundled example keeps 5,000 `Record`s a second: growing, at about
/// that slope; its churn is no growing type.
#[test]
fn a_leaking_class_is_growing_and_churn_is_not() {
    require_root();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/waste_memory.py");
    let target = Target::spawn(Command::new(pyenv("3.12.1")).arg(example));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let report = watched(&target);
    let record = type_row(&report, "__main__.Record");
    assert_eq!(record.verdict.as_deref(), Some("growing"), "{record:?}");
    let slope = record.slope_objects_per_minute.unwrap();
    assert!((150_000.0..=330_000.0).contains(&slope), "about 300,000 a minute, less the sleeps' slack: {slope}");
    // Each Record holds a bytes object of its own: the two grow alike, first.
    let census = report.census.as_ref().unwrap();
    let mut first_two: Vec<&str> = census.types[..2].iter().map(|t| t.name.as_str()).collect();
    first_two.sort();
    assert_eq!(first_two, ["__main__.Record", "bytes"], "biggest growth first: {census:?}");
    assert_eq!(type_row(&report, "bytes").verdict.as_deref(), Some("growing"));
    drop(target);

    let mut churner = Target::spawn(Command::new(pyenv("3.12.1")).args([SCRIPT, "churn"]));
    churner.expect_line("ready");
    let report = watched(&churner);
    let census = report.census.as_ref().unwrap();
    let growing: Vec<&str> =
        census.types.iter().filter(|t| t.verdict.as_deref() == Some("growing")).map(|t| t.name.as_str()).collect();
    assert!(growing.is_empty(), "churn grows nothing: {census:?}");
    assert!(census.types.iter().all(|t| t.verdict.is_some()), "six censuses give every type a verdict: {census:?}");
}

macro_rules! interpreter {
    ($module:ident, $python:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn population_matches_gc_get_objects() {
                require_root();
                population(&$python);
            }

            #[test]
            fn a_corrupt_gc_list_stops_the_census_not_memtrace() {
                require_root();
                hostile(&$python);
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
