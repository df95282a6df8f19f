//! One program written three times, in C, C++ and Rust, built as releases
//! are (optimised, no frame pointers): two callers, `from_f1` and
//! `from_f2`, allocate 100 and 300 bytes through one shared wrapper,
//! `make_block`, which allocates the language's way (malloc; a
//! `std::string` in a `std::vector`; a `Vec<u8>`). Traced from outside,
//! each caller must be its own traceback with its exact count and size,
//! with and without `--native`, and each traceback must start in the
//! program's own code: `make_block`, not `operator new`, the C++ or Rust
//! standard library's internals or libc, named as the language spells it.

use std::path::PathBuf;

use memtrace_tests::{
    JsonReport, Language, Target, TempDir, compile, final_report, line_of, require_root, traced_stdout,
};

/// Blocks each caller allocates per round.
const N: u64 = 4000;

const C: &str = r#"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N 4000
/* Global, so that the stores, after each call, are kept: no tail calls. */
char *kept[N * 2 * 8];
int count;

static void say(const char *s) { write(1, s, strlen(s)); }

static int wait_go(void) {
    char c;
    while (read(0, &c, 1) == 1)
        if (c == '\n') return 1;
    return 0;
}

/* noipa: no inlining, no clone per constant argument. */
__attribute__((noipa)) static char *make_block(size_t n) {
    char *p = malloc(n); /* ALLOC */
    if (!p) abort();
    p[0] = 1;
    return p;
}

__attribute__((noipa)) static void from_f1(void) {
    kept[count++] = make_block(100); /* F1 */
}

__attribute__((noipa)) static void from_f2(void) {
    kept[count++] = make_block(300); /* F2 */
}

int main(void) {
    say("ready\n");
    while (wait_go()) {
        for (int i = 0; i < N; i++) {
            from_f1();
            from_f2();
        }
        say("done\n");
    }
    return 0;
}
"#;

const CPP: &str = r#"
#include <cstring>
#include <string>
#include <vector>
#include <unistd.h>

static const int N = 4000;
static std::vector<std::string> kept;
static volatile int calls;

static void say(const char *s) { write(1, s, strlen(s)); }

static bool wait_go() {
    char c;
    while (read(0, &c, 1) == 1)
        if (c == '\n') return true;
    return false;
}

// A string of n - 1 characters: its buffer is n bytes, from operator new.
__attribute__((noipa)) void make_block(size_t n) {
    kept.emplace_back(n - 1, 'x'); // ALLOC
}

__attribute__((noipa)) void from_f1() {
    make_block(100); // F1
    calls++;
}

__attribute__((noipa)) void from_f2() {
    make_block(300); // F2
    calls++;
}

int main() {
    kept.reserve(N * 2 * 8);
    say("ready\n");
    while (wait_go()) {
        for (int i = 0; i < N; i++) {
            from_f1();
            from_f2();
        }
        say("done\n");
    }
    return 0;
}
"#;

const RUST: &str = r#"
use std::hint::black_box;
use std::io::{BufRead, Write};

const N: usize = 4000;

#[inline(never)]
fn make_block(n: usize) -> Vec<u8> {
    vec![1u8; n] // ALLOC
}

#[inline(never)]
fn from_f1(kept: &mut Vec<Vec<u8>>) {
    kept.push(make_block(black_box(100))); // F1
}

#[inline(never)]
fn from_f2(kept: &mut Vec<Vec<u8>>) {
    kept.push(make_block(black_box(300))); // F2
}

fn main() {
    let mut kept: Vec<Vec<u8>> = Vec::with_capacity(N * 2 * 8);
    let mut out = std::io::stdout();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for _ in std::io::stdin().lock().lines() {
        for _ in 0..N {
            from_f1(&mut kept);
            from_f2(&mut kept);
        }
        writeln!(out, "done").unwrap();
        out.flush().unwrap();
    }
}
"#;

struct Program {
    language: Language,
    source: &'static str,
    _dir: TempDir,
    exe: PathBuf,
}

impl Program {
    /// Built as a release is, with debug information (`debug`) or with
    /// symbols only.
    fn build(language: Language, debug: bool) -> Self {
        let source = match language {
            Language::C => C,
            Language::Cpp => CPP,
            Language::Rust => RUST,
        };
        let dir = TempDir::new(&format!("callers-{language:?}-{debug}"));
        let mut flags = match language {
            Language::C | Language::Cpp => vec!["-O2", "-fomit-frame-pointer"],
            Language::Rust => vec!["-C", "opt-level=2"],
        };
        if debug {
            flags.push("-g");
        }
        // The crate name is the program's: Rust names its functions leaky::...
        let exe = compile(&dir, "leaky", language, source, &flags);
        Self { language, source, _dir: dir, exe }
    }

    /// A frame at the line of `marker`, as DWARF names it.
    fn line(&self, marker: &str) -> String {
        format!("{}.{}:{}", self.exe.display(), self.language.extension(), line_of(self.source, marker))
    }

    /// One round traced by a memtrace started with `options`.
    fn traced_stdout(&self, options: &[&str]) -> JsonReport {
        let mut target = Target::spawn(&mut std::process::Command::new(&self.exe));
        target.expect_line("ready");
        let mut args = vec!["--format", "json"];
        args.extend_from_slice(options);
        final_report(&traced_stdout(&mut target, &args, std::time::Duration::ZERO))
    }
}

/// Each caller's traceback: (its innermost two frames, size, count).
fn by_caller(report: &JsonReport, caller_frame: impl Fn(&str) -> bool) -> Vec<(Vec<String>, u64, u64)> {
    let mut rows: Vec<(Vec<String>, u64, u64)> = report
        .rows
        .iter()
        .filter(|row| row.frames.get(1).is_some_and(|f| caller_frame(&format!("{}:{}", f.filename, f.lineno))))
        .map(|row| {
            (row.frames.iter().take(2).map(|f| format!("{}:{}", f.filename, f.lineno)).collect(), row.size, row.count)
        })
        .collect();
    rows.sort_by_key(|(_, size, _)| *size);
    rows
}

/// With debug information: the wrapper's line, then each caller's line,
/// each with exactly its own blocks, with and without --native; and each
/// caller's line alone once the wrapper is named an allocator.
fn callers_are_separate_and_start_in_the_program(language: Language) {
    require_root();
    let program = Program::build(language, true);
    let (alloc, f1, f2) = (program.line("ALLOC"), program.line("F1"), program.line("F2"));
    for options in [&["--group-by", "traceback"][..], &["--native", "--group-by", "traceback"]] {
        let report = program.traced_stdout(options);
        let rows = by_caller(&report, |frame| frame == f1 || frame == f2);
        let dump = serde_json::to_string_pretty(&report.rows).unwrap();
        assert_eq!(
            rows,
            [(vec![alloc.clone(), f1.clone()], 100 * N, N), (vec![alloc.clone(), f2.clone()], 300 * N, N)],
            "{options:?}: every row:\n{dump}"
        );
        assert_eq!(report.losses.values().sum::<u64>(), 0, "{:?}", report.losses);
    }
    // Grouped by line, both callers share the wrapper's line, as tracemalloc
    // would say; named as an allocator, the wrapper gives way to each
    // caller's line.
    let rows = |report: &JsonReport| -> Vec<(String, u64, u64)> {
        let mut rows: Vec<_> = report
            .rows
            .iter()
            .filter(|r| [&alloc, &f1, &f2].contains(&&r.location))
            .map(|r| (r.location.clone(), r.size, r.count))
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(rows(&program.traced_stdout(&[])), [(alloc.clone(), 400 * N, 2 * N)]);
    let report = program.traced_stdout(&["--alloc-fn", "*make_block"]);
    assert_eq!(rows(&report), [(f1.clone(), 100 * N, N), (f2.clone(), 300 * N, N)]);
    assert!(report.notes.iter().any(|n| n.contains("--alloc-fn")), "{:?}", report.notes);
}

/// Without debug information: frames named by their demangled symbols.
fn frames_are_named_as_the_language_spells_them(language: Language, wrapper: &str, f1: &str, f2: &str) {
    require_root();
    let program = Program::build(language, false);
    let report = program.traced_stdout(&["--group-by", "traceback"]);
    let named = |frame: &str, name: &str| frame.starts_with(&format!("{name}+0x")) && frame.contains("(leaky)");
    let rows = by_caller(&report, |frame| named(frame, f1) || named(frame, f2));
    let dump = serde_json::to_string_pretty(&report.rows).unwrap();
    assert_eq!(rows.len(), 2, "one row per caller:\n{dump}");
    for ((frames, size, count), (caller, bytes)) in rows.iter().zip([(f1, 100), (f2, 300)]) {
        assert!(named(&frames[0], wrapper) && named(&frames[1], caller), "{frames:?}:\n{dump}");
        assert_eq!((*size, *count), (bytes * N, N), "{frames:?}");
    }
}

#[test]
fn c_callers_are_separate_and_start_in_the_program() {
    callers_are_separate_and_start_in_the_program(Language::C);
}

#[test]
fn cpp_callers_are_separate_and_start_in_the_program() {
    callers_are_separate_and_start_in_the_program(Language::Cpp);
}

#[test]
fn rust_callers_are_separate_and_start_in_the_program() {
    callers_are_separate_and_start_in_the_program(Language::Rust);
}

#[test]
fn c_frames_are_named_by_their_symbols() {
    frames_are_named_as_the_language_spells_them(Language::C, "make_block", "from_f1", "from_f2");
}

#[test]
fn cpp_frames_are_named_demangled() {
    frames_are_named_as_the_language_spells_them(Language::Cpp, "make_block(unsigned long)", "from_f1()", "from_f2()");
}

#[test]
fn rust_frames_are_named_demangled() {
    frames_are_named_as_the_language_spells_them(
        Language::Rust,
        "leaky::make_block",
        "leaky::from_f1",
        "leaky::from_f2",
    );
}
