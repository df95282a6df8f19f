//! Support for memtrace's integration tests (and its bench, which drives
//! the same processes): start real target processes (C programs compiled
//! here, Python scripts on real interpreters) that pause at known points,
//! run the memtrace binary against them, and read its reports (its
//! `--format json` lines, with memtrace's own document type). Tests that
//! need eBPF fail, never skip, when they cannot run.

pub mod bpf_stats;
mod processes;

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, PoisonError},
    thread,
};

use anyhow::Context as _;

pub use processes::{KillOnDrop, Line, Memtrace, TIMEOUT, Target, Tracer};

/// The memtrace binary under test: $MEMTRACE_BIN (set by `cargo xtask test`)
/// or the release build.
pub fn memtrace_bin() -> PathBuf {
    let path = std::env::var_os("MEMTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/memtrace"));
    assert!(
        path.exists(),
        "memtrace binary {} not found: build it first (`cargo xtask test` and `cargo xtask bench` do)",
        path.display()
    );
    path
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// eBPF tests need root. Outside CI a non-root run fails with a pointer to
/// the fix rather than passing vacuously.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "memtrace's integration tests load eBPF programs and must run as root");
}

/// Installs Debian package `package` with apt-get unless `command` (on
/// PATH, or an absolute path) is already there, for the tests and the bench
/// that run real tools (bpftool, go tool pprof, prometheus, chromium, jq,
/// bpftrace); apt-get update runs once per process, before the first
/// install. Serialised, since dpkg takes one install at a time.
pub fn ensure_package(command: &str, package: &str) -> anyhow::Result<()> {
    static UPDATED: Mutex<bool> = Mutex::new(false);
    let present = || match command.starts_with('/') {
        true => Path::new(command).exists(),
        false => {
            Command::new("sh").args(["-c", &format!("command -v {command}")]).output().is_ok_and(|o| o.status.success())
        }
    };
    if present() {
        return Ok(());
    }
    let mut updated = UPDATED.lock().unwrap_or_else(PoisonError::into_inner);
    if present() {
        return Ok(());
    }
    eprintln!("installing {package} with apt-get, for `{command}`");
    let apt_get = |args: &[&str]| -> anyhow::Result<()> {
        // Wait for another install on this machine rather than fail.
        let status = Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?;
        anyhow::ensure!(status.success(), "apt-get {} failed: {status}", args.join(" "));
        Ok(())
    };
    let mut install = || {
        if !*updated {
            apt_get(&["update", "--quiet"])?;
            *updated = true;
        }
        apt_get(&["install", "--yes", "--quiet", package])
    };
    install().with_context(|| format!("cannot install {package}"))?;
    anyhow::ensure!(present(), "{package} is installed but {command} is still missing");
    Ok(())
}

/// A scratch directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "memtrace-test-{tag}-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A language the tests write target programs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    C,
    Cpp,
    Rust,
}

impl Language {
    fn compiler(self) -> &'static str {
        match self {
            Language::C => "gcc",
            Language::Cpp => "g++",
            Language::Rust => "rustc",
        }
    }

    /// How its source files end.
    pub fn extension(self) -> &'static str {
        match self {
            Language::C => "c",
            Language::Cpp => "cpp",
            Language::Rust => "rs",
        }
    }
}

/// Compiles `source`, written in `language`, with exactly `flags` and
/// returns the executable `dir/name` (a Rust program's crate is `name` too).
/// The source is saved beside it as `name.c`, `name.cpp` or `name.rs`,
/// where debug information points.
pub fn compile(dir: &TempDir, name: &str, language: Language, source: &str, flags: &[&str]) -> PathBuf {
    if language == Language::Cpp {
        ensure_package("g++", "g++").unwrap();
    }
    let src = dir.0.join(format!("{name}.{}", language.extension()));
    std::fs::write(&src, source).unwrap();
    let exe = dir.0.join(name);
    let out = Command::new(language.compiler())
        .current_dir(&dir.0)
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("{} must be installed: {e}", language.compiler()));
    assert!(out.status.success(), "{} failed: {}", language.compiler(), String::from_utf8_lossy(&out.stderr));
    exe
}

/// A C program with one exact number, for tests about how memtrace
/// reaches a process rather than what it counts: it says "ready", waits for
/// a line, keeps 1000 blocks of 1000 bytes allocated on the line marked
/// LEAK, says "done", and waits for its stdin to close.
pub const KEEPER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
static char *kept[1000];
int main(void) {
    char line[16];
    puts("ready");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    for (int i = 0; i < 1000; i++) kept[i] = malloc(1000); /* LEAK */
    puts("done");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {}
    return kept[0] == 0;
}
"#;

/// Where memtrace reports KEEPER's blocks, built as `exe` by [`compile_c`].
pub fn keeper_site(exe: &Path) -> String {
    format!("{}.c:{}", exe.display(), line_of(KEEPER, "LEAK"))
}

/// Asserts that `report` has KEEPER's (built as `exe`) 1000 blocks of 1000
/// bytes, and lost nothing.
pub fn assert_keeper_counted(report: &JsonReport, exe: &Path) {
    let site = keeper_site(exe);
    let row = report.rows.iter().find(|r| r.location == site).unwrap_or_else(|| panic!("no {site}: {report:?}"));
    assert_eq!((row.count, row.size), (1000, 1_000_000), "{report:?}");
    assert_eq!(report.losses.values().sum::<u64>(), 0, "{:?}", report.losses);
}

/// A command running the memtrace under test with `args`.
pub fn memtrace_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(memtrace_bin());
    cmd.args(args);
    cmd
}

/// One round of a target that says "ready", waits for a line and says
/// "done" (KEEPER, workloads.py), traced by the memtrace that `start`
/// runs with the arguments it is given (the target's pid, a report only at
/// the end, `--format json`): attached before the line, stopped with
/// SIGINT after "done", to exit with `status`. Its final report.
pub fn traced_round(target: &mut Target, status: i32, start: impl FnOnce(&[&str]) -> Command) -> JsonReport {
    target.expect_line("ready");
    let pid = target.pid().to_string();
    let attached =
        Memtrace::try_attach_command(&mut start(&["--pid", &pid, "--interval", "600", "--format", "json"]), TIMEOUT);
    let memtrace = attached.unwrap_or_else(|e| panic!("{e:#}"));
    target.send("go");
    target.expect_line("done");
    memtrace.signal(libc::SIGINT);
    let (exit, stdout, stderr) = memtrace.finish();
    assert_eq!(exit.code(), Some(status), "stderr: {stderr:?}");
    final_report(&stdout)
}

/// The python of pyenv's CPython `version` (3.12.1), under $PYENV_ROOT or
/// /root/.pyenv.
pub fn pyenv(version: &str) -> PathBuf {
    let root = std::env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".into());
    Path::new(&root).join("versions").join(version).join("bin/python")
}

/// tests/python/workloads.py, which real interpreters run.
pub const WORKLOADS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/workloads.py");

/// Asserts that `report` has the 1000 bytes objects of workloads.py's
/// `bytes_kept`, exactly, and lost nothing.
pub fn assert_bytes_kept_counted(report: &JsonReport) {
    let site = workload_site("bytes-kept");
    let row = report.rows.iter().find(|r| r.location == site).unwrap_or_else(|| panic!("no {site}: {report:?}"));
    assert_eq!((row.count, row.size), (1000, 1000 * 1033), "{report:?}");
    assert_eq!(report.losses.values().sum::<u64>(), 0, "{:?}", report.losses);
}

/// The number of workloads.py's line marked `# MARK:<marker>`.
pub fn workload_line(marker: &str) -> usize {
    let tag = format!("# MARK:{marker}");
    let source = std::fs::read_to_string(WORKLOADS).unwrap();
    source.lines().position(|l| l.ends_with(&tag)).unwrap_or_else(|| panic!("no line ends with {tag}")) + 1
}

/// `workloads.py:LINE` of its line marked `# MARK:<marker>`, as reports
/// name it.
pub fn workload_site(marker: &str) -> String {
    format!("{WORKLOADS}:{}", workload_line(marker))
}

/// Compiles C `source` with gcc (debug info and frame pointers, so native
/// sites resolve to lines), then `extra` flags, and returns the executable.
pub fn compile_c(dir: &TempDir, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let mut flags = vec!["-g", "-O0", "-fno-omit-frame-pointer"];
    flags.extend_from_slice(extra);
    compile(dir, name, Language::C, source, &flags)
}

/// One round of a target that waits for "go" and then says "done...":
/// traced by a memtrace attached with `--pid PID --interval 60` and
/// `options`, stopped with SIGINT `hold` after the round. memtrace's
/// stdout; it must have exited normally.
pub fn traced_stdout(target: &mut Target, options: &[&str], hold: std::time::Duration) -> String {
    let pid = target.pid().to_string();
    let mut args = vec!["--pid", &pid, "--interval", "60"];
    args.extend_from_slice(options);
    let memtrace = Memtrace::attach(&args);
    target.send("go");
    target.expect_line_prefix("done");
    std::thread::sleep(hold);
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "stderr: {stderr:?}");
    stdout
}

/// The line number of the first line of `source` containing `marker`.
pub fn line_of(source: &str, marker: &str) -> u32 {
    source.lines().position(|l| l.contains(marker)).unwrap_or_else(|| panic!("marker {marker:?} not in source")) as u32
        + 1
}

/// Runs memtrace to completion with `args` (for failures before tracing).
pub fn run_memtrace(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd.output().expect("memtrace runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One `location: size=..., count=...` line of tracemalloc's
/// `compare_to` output, which memtrace's text format repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportLine {
    pub location: String,
    pub size: String,
    pub size_diff: String,
    pub count: u64,
    pub count_diff: i64,
    pub average: Option<String>,
}

pub fn parse_line(line: &str) -> Option<ReportLine> {
    let (location, rest) = line.split_once(": size=")?;
    let (size, rest) = rest.split_once(" (")?;
    let (size_diff, rest) = rest.split_once("), count=")?;
    let (count, rest) = rest.split_once(" (")?;
    let (count_diff, rest) = rest.split_once(')')?;
    let average = rest.strip_prefix(", average=").map(str::to_owned);
    Some(ReportLine {
        location: location.to_owned(),
        size: size.to_owned(),
        size_diff: size_diff.to_owned(),
        count: count.parse().ok()?,
        count_diff: count_diff.parse().ok()?,
        average,
    })
}

pub use memtrace::report::json::{JsonHostReport, JsonReport, Row};

/// Whether a line of `--format json` output is a host report.
fn is_host_report(line: &str) -> bool {
    line.starts_with(r#"{"report":"host""#)
}

/// memtrace's reports of each process, from its stdout under `--format
/// json` (host reports left out).
pub fn json_reports(stdout: &str) -> Vec<JsonReport> {
    stdout
        .lines()
        .filter(|line| !is_host_report(line))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON report ({e}): {line}")))
        .collect()
}

/// memtrace's host reports, from its stdout under `--format json`.
pub fn host_reports(stdout: &str) -> Vec<JsonHostReport> {
    stdout
        .lines()
        .filter(|line| is_host_report(line))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a host report ({e}): {line}")))
        .collect()
}

/// The last report, which must be the final one.
pub fn final_report(stdout: &str) -> JsonReport {
    let report = json_reports(stdout).pop().unwrap_or_else(|| panic!("no report in memtrace's output:\n{stdout}"));
    assert!(report.is_final, "last report is not final: {report:?}");
    report
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The body of an HTTP GET of `path` from `127.0.0.1:port`, or None when
/// nothing answers there (yet).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_owned())
}
