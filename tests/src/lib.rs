//! Support for memtrace's integration tests: start real target processes (C
//! programs compiled here, Python scripts on real interpreters) that pause
//! at known points, run the memtrace binary against them, and read its
//! reports (its `--format json` lines, with memtrace's own document type).
//! Tests that need eBPF fail, never skip, when they cannot run.

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

/// How long any single wait in a test may take before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The memtrace binary under test: $MEMTRACE_BIN (set by `cargo xtask test`)
/// or the release build.
pub fn memtrace_bin() -> PathBuf {
    let path = std::env::var_os("MEMTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/memtrace"));
    assert!(path.exists(), "memtrace binary {} not found: run the tests with `cargo xtask test`", path.display());
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

/// Compiles C `source` with gcc (debug info and frame pointers, so native
/// sites resolve to lines) and returns the executable.
pub fn compile_c(dir: &TempDir, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let src = dir.0.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let exe = dir.0.join(name);
    let out = Command::new("gcc")
        .args(["-g", "-O0", "-fno-omit-frame-pointer", "-o"])
        .arg(&exe)
        .arg(&src)
        .args(extra)
        .output()
        .expect("gcc must be installed");
    assert!(out.status.success(), "gcc failed: {}", String::from_utf8_lossy(&out.stderr));
    exe
}

/// The line number of the first line of `source` containing `marker`.
pub fn line_of(source: &str, marker: &str) -> u32 {
    source.lines().position(|l| l.contains(marker)).unwrap_or_else(|| panic!("marker {marker:?} not in source")) as u32
        + 1
}

/// A target process driven through its stdin/stdout: it prints lines to
/// say where it is and waits for a line before each phase.
pub struct Target {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Target {
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("target starts");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        Self { child, stdin, lines: line_reader(stdout) }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line equal to `want`.
    pub fn expect_line(&mut self, want: &str) {
        self.wait_for(want, |line| line == want);
    }

    /// Waits for a line starting with `prefix` and returns it.
    pub fn expect_line_prefix(&mut self, prefix: &str) -> String {
        self.wait_for(prefix, |line| line.starts_with(prefix))
    }

    fn wait_for(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return line,
                Ok(line) => before.push(line),
                Err(_) => panic!("target never printed {what:?}; it printed {before:?}"),
            }
        }
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin and waits for the exit status.
    pub fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        wait_with_timeout(&mut self.child)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn line_reader(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub fn wait_with_timeout(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {TIMEOUT:?}", child.id());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A running memtrace.
pub struct Memtrace {
    pub child: Child,
    stderr: mpsc::Receiver<String>,
    stdout: Option<ChildStdout>,
    pub stderr_lines: Vec<String>,
}

impl Memtrace {
    /// Starts memtrace with `args` and waits until it reports that it is
    /// tracing (probes attached, counting on).
    /// With several pids, waits until it traces every one.
    pub fn attach(args: &[&str]) -> Self {
        let pids = args
            .windows(2)
            .filter(|w| w[0] == "--pid" || w[0] == "-p")
            .map(|w| w[1].split(',').count())
            .sum::<usize>()
            .max(1);
        let mut m = Self::start(args);
        let deadline = Instant::now() + TIMEOUT;
        let mut tracing = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match m.stderr.recv_timeout(left) {
                Ok(line) => {
                    tracing += usize::from(line.starts_with("memtrace: tracing pid"));
                    m.stderr_lines.push(line);
                    if tracing == pids {
                        return m;
                    }
                }
                Err(_) => {
                    let _ = m.child.kill();
                    panic!("memtrace did not start tracing; stderr: {:?}", m.stderr_lines);
                }
            }
        }
    }

    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(memtrace_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("memtrace starts");
        let stderr = line_reader(child.stderr.take().unwrap());
        let stdout = child.stdout.take();
        Self { child, stderr, stdout, stderr_lines: Vec::new() }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for exit; returns (status, stdout, stderr lines).
    pub fn finish(mut self) -> (std::process::ExitStatus, String, Vec<String>) {
        let mut stdout = self.stdout.take().unwrap();
        let reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let status = wait_with_timeout(&mut self.child);
        let out = reader.join().unwrap();
        let mut err = std::mem::take(&mut self.stderr_lines);
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
            err.push(line);
        }
        (status, out, err)
    }
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

pub use memtrace::report::json::{JsonReport, Row};

/// memtrace's reports, from its stdout under `--format json`.
pub fn json_reports(stdout: &str) -> Vec<JsonReport> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON report ({e}): {line}")))
        .collect()
}

/// The last report, which must be the final one.
pub fn final_report(stdout: &str) -> JsonReport {
    let report = json_reports(stdout).pop().unwrap_or_else(|| panic!("no report in memtrace's output:\n{stdout}"));
    assert!(report.is_final, "last report is not final: {report:?}");
    report
}

/// Makes sure Debian package `package` is installed, for a test that runs
/// a real consumer of memtrace's outputs (go tool pprof, prometheus,
/// chromium, jq): nothing happens when `probe` (a command on PATH, or an
/// absolute path) already exists; otherwise `apt-get update` runs once per
/// test process and then `apt-get install -y package`. Tests calling it at
/// once install one at a time.
pub fn ensure_debian_package(package: &str, probe: &str) {
    static APT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let present = || {
        if probe.starts_with('/') {
            Path::new(probe).exists()
        } else {
            Command::new("sh").args(["-c", &format!("command -v {probe}")]).output().is_ok_and(|o| o.status.success())
        }
    };
    let mut updated = APT.lock().unwrap_or_else(|e| e.into_inner());
    if present() {
        return;
    }
    let apt = |args: &[&str]| {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("apt-get runs (Debian is memtrace's test platform)");
        assert!(out.status.success(), "apt-get {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    };
    if !*updated {
        apt(&["update"]);
        *updated = true;
    }
    apt(&["install", "-y", package]);
    assert!(present(), "{package} is installed but {probe} is still missing");
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
