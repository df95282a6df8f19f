//! The child processes the integration tests and the bench drive, in one
//! place: a child killed when dropped (a failed run leaves nothing behind),
//! a target driven by lines over its stdin and stdout, a tracer whose
//! output is gathered while it runs, and memtrace as such a tracer. Each
//! fallible step returns an error for the bench to report; the tests' own
//! calls panic with it.

use std::{
    io::{BufRead, BufReader, Read, Write},
    ops::{Deref, DerefMut},
    path::Path,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError, Sender},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::memtrace_bin;

/// How long any single wait in a test may take before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A child process killed, if still running, when dropped.
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits at most `timeout` for `child` to exit; kills it when it does not.
fn wait_for_exit(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("cannot wait for a child")? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("process {} did not exit within {timeout:?}", child.id());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A line a child printed, and on which stream.
#[derive(Clone, Debug)]
pub struct Line {
    pub stderr: bool,
    pub text: String,
}

/// Sends each line of `stream` as it comes, from a thread of its own.
fn forward(stream: impl Read + Send + 'static, stderr: bool, sender: Sender<Line>) {
    thread::spawn(move || {
        for text in BufReader::new(stream).lines().map_while(Result::ok) {
            if sender.send(Line { stderr, text }).is_err() {
                break;
            }
        }
    });
}

/// A target process driven through its stdin/stdout: it prints lines to
/// say where it is and waits for a line before each phase.
pub struct Target {
    child: KillOnDrop,
    stdin: Option<ChildStdin>,
    lines: Receiver<Line>,
}

impl Target {
    pub fn try_spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the target {cmd:?}"))?;
        let (sender, lines) = mpsc::channel();
        forward(child.stdout.take().context("the target has no stdout")?, false, sender);
        let stdin = child.stdin.take();
        Ok(Self { child: KillOnDrop(child), stdin, lines })
    }

    pub fn spawn(cmd: &mut Command) -> Self {
        Self::try_spawn(cmd).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process is blocked reading its stdin: between a
    /// line it printed and its next read it may still allocate and free,
    /// and a census of it then would see a moving heap.
    pub fn wait_reading_stdin(&self) {
        let syscall = format!("/proc/{}/syscall", self.pid());
        let deadline = Instant::now() + TIMEOUT;
        // read(2) is system call 0 on x86-64; its first argument, fd 0.
        while !std::fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with("0 0x0 ")) {
            assert!(Instant::now() < deadline, "pid {} never blocked reading stdin", self.pid());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The next line that `matches` (`what` names it in errors), within
    /// `timeout`; the lines before it are passed over.
    pub fn wait_line(&mut self, what: &str, timeout: Duration, matches: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if matches(&line.text) => return Ok(line.text),
                Ok(line) => before.push(line.text),
                Err(RecvTimeoutError::Timeout) => {
                    bail!("the target printed no {what:?} within {timeout:?}; it printed {before:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = wait_for_exit(&mut self.child, TIMEOUT)?;
                    bail!("the target exited ({status}) before printing {what:?}; it printed {before:?}")
                }
            }
        }
    }

    /// Waits for a line equal to `want`.
    pub fn expect_line(&mut self, want: &str) {
        self.wait_line(want, TIMEOUT, |line| line == want).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Waits for a line starting with `prefix` and returns it.
    pub fn expect_line_prefix(&mut self, prefix: &str) -> String {
        self.wait_line(prefix, TIMEOUT, |line| line.starts_with(prefix)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("the target's stdin is closed")?;
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).context("cannot write to the target")
    }

    pub fn send(&mut self, line: &str) {
        self.try_send(line).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Closes stdin and waits at most `timeout` for the exit status.
    pub fn try_finish(mut self, timeout: Duration) -> Result<ExitStatus> {
        drop(self.stdin.take());
        wait_for_exit(&mut self.child, timeout)
    }

    /// Closes stdin and waits for the exit status.
    pub fn finish(self) -> ExitStatus {
        self.try_finish(TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// A tracer (memtrace, or a peer the bench compares it with) attached to a
/// target, its stdout and stderr gathered as they come: what says it has
/// attached must be seen while it runs.
pub struct Tracer {
    name: String,
    child: KillOnDrop,
    lines: Receiver<Line>,
    /// What it printed so far, both streams in the order received.
    pub log: Vec<Line>,
}

impl Tracer {
    pub fn start(cmd: &mut Command, name: &str) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let (sender, lines) = mpsc::channel();
        forward(child.stdout.take().context("no stdout")?, false, sender.clone());
        forward(child.stderr.take().context("no stderr")?, true, sender);
        Ok(Self { name: name.to_owned(), child: KillOnDrop(child), lines, log: Vec::new() })
    }

    /// Returns once a line satisfies `attached`; fails, and kills the
    /// tracer, when it exits first or `timeout` passes.
    pub fn wait_attached(&mut self, timeout: Duration, attached: impl Fn(&Line) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let done = attached(&line);
                    self.log.push(line);
                    if done {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{} did not attach within {timeout:?}: {}", self.name, self.last_error())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = wait_for_exit(&mut self.child, TIMEOUT)?;
                    bail!("{} exited ({status}) before attaching: {}", self.name, self.last_error());
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) takes a pid and a signal; the pid is our own child,
        // not yet waited for, so it cannot name another process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Waits at most `timeout` for it to exit; returns its status and all
    /// it printed.
    pub fn finish(mut self, timeout: Duration) -> Result<(ExitStatus, Vec<Line>)> {
        let status = wait_for_exit(&mut self.child, timeout)?;
        self.log.extend(self.lines.iter());
        Ok((status, self.log))
    }

    /// Stops it as a user would, with SIGINT, and returns all it printed;
    /// fails unless it exits successfully within `timeout`.
    pub fn stop(self, timeout: Duration) -> Result<Vec<Line>> {
        self.signal(libc::SIGINT);
        let name = self.name.clone();
        let (status, log) = self.finish(timeout)?;
        if !status.success() {
            bail!("{name} failed ({status}): {}", last_error(&log));
        }
        Ok(log)
    }

    /// Its last non-empty line on stderr: why it failed, when it did.
    pub fn last_error(&self) -> &str {
        last_error(&self.log)
    }
}

fn last_error(log: &[Line]) -> &str {
    log.iter().rev().find(|l| l.stderr && !l.text.trim().is_empty()).map_or("(no message)", |l| &l.text)
}

/// A running memtrace.
pub struct Memtrace(Tracer);

impl Memtrace {
    /// What memtrace prints on stderr once its probes are attached and
    /// counting is on.
    pub const TRACING: &str = "memtrace: tracing pid ";

    /// Starts the memtrace binary `binary` with `args` and returns once it
    /// is tracing every pid `args` names, or fails when it exits first or
    /// `timeout` passes.
    pub fn try_attach(binary: &Path, args: &[&str], timeout: Duration) -> Result<Self> {
        Self::try_attach_command(Command::new(binary).args(args), timeout)
    }

    /// As [`Memtrace::try_attach`], for a command that runs memtrace (as
    /// another user, say) with the arguments that follow it.
    pub fn try_attach_command(cmd: &mut Command, timeout: Duration) -> Result<Self> {
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        // memtrace traces a pid named twice once.
        let pids = args
            .windows(2)
            .filter(|w| w[0] == "--pid" || w[0] == "-p")
            .flat_map(|w| w[1].split(','))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            .max(1);
        let mut tracer = Tracer::start(cmd, "memtrace")?;
        let tracing = std::cell::Cell::new(0);
        tracer.wait_attached(timeout, |line| {
            tracing.set(tracing.get() + usize::from(line.stderr && line.text.starts_with(Self::TRACING)));
            tracing.get() == pids
        })?;
        Ok(Self(tracer))
    }

    /// Starts memtrace with `args` and waits until it reports that it is
    /// tracing (probes attached, counting on).
    pub fn attach(args: &[&str]) -> Self {
        Self::try_attach(&memtrace_bin(), args, TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn start(args: &[&str]) -> Self {
        Self(Tracer::start(Command::new(memtrace_bin()).args(args), "memtrace").unwrap_or_else(|e| panic!("{e:#}")))
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    pub fn signal(&self, signal: i32) {
        self.0.signal(signal);
    }

    /// Waits for a line on stderr starting with `prefix` (for example
    /// `TRACING` and a pid memtrace is to follow); fails when memtrace exits
    /// first or TIMEOUT passes.
    pub fn wait_stderr(&mut self, prefix: &str) -> Result<()> {
        self.0.wait_attached(TIMEOUT, |line| line.stderr && line.text.starts_with(prefix))
    }

    /// Stops it with SIGINT; see [`Tracer::stop`].
    pub fn stop(self, timeout: Duration) -> Result<Vec<Line>> {
        self.0.stop(timeout)
    }

    /// Waits for exit; returns (status, stdout, stderr lines).
    pub fn finish(self) -> (ExitStatus, String, Vec<String>) {
        let (status, log) = self.0.finish(TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"));
        let stdout = log.iter().filter(|l| !l.stderr).map(|l| format!("{}\n", l.text)).collect();
        let stderr = log.into_iter().filter(|l| l.stderr).map(|l| l.text).collect();
        (status, stdout, stderr)
    }
}
