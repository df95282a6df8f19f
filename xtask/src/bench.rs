//! `cargo xtask bench [--repeat N] [--iterations N]`: what tracing costs the
//! traced process. One allocation-heavy CPython loop (bench/workload.py) is
//! timed by the script itself, untraced, under memtrace attached from
//! outside (default options and `--frames 1`), under the kernel's floor
//! (bpftrace with empty, counting probes at memtrace's own attach points,
//! learned from `memtrace --verbose`), under `python -X tracemalloc=1` and
//! under memray with and without `--trace-python-allocators`; then the same
//! loop 20 Python frames deep, for the cost of the frame walk. Every
//! configuration runs N times, interleaved so that the machine's noise falls
//! on all of them alike, and the medians go to a table on stdout and to
//! BENCHMARKS.md, which this file regenerates wholesale. A tool that cannot
//! run fails the bench with one line: a comparison with a peer missing would
//! read as a complete one.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError, Sender},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{build, check, example_python, output, workspace_root};

const USAGE: &str = "usage: cargo xtask bench [--repeat N] [--iterations N]";
const DEFAULT_REPEAT: u64 = 5;
/// About 0.4 s untraced on the machine this was written on.
const DEFAULT_ITERATIONS: u64 = 1_000_000;
/// Deep enough that `--frames 16` truncates every walk.
const DEEP_DEPTH: u32 = 20;
/// bpftrace compiles its program with LLVM before attaching; a loaded
/// 2-core machine can make that slow.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// The line bpftrace's own test hook prints once every probe is attached
/// (it prints "Attaching N probes..." before it starts).
const BPFTRACE_ATTACHED: &str = "__BPFTRACE_NOTIFY_PROBES_ATTACHED";

#[derive(Clone, Copy, PartialEq)]
enum Config {
    Untraced,
    /// memtrace attached from outside; None leaves --frames at its default.
    Memtrace(Option<u32>),
    /// bpftrace with empty, counting probes where memtrace puts its own.
    Floor,
    Tracemalloc,
    Memray {
        python_allocators: bool,
    },
}

impl Config {
    fn label(self) -> String {
        match self {
            Config::Untraced => "untraced".into(),
            Config::Memtrace(None) => "memtrace (default: --frames 16)".into(),
            Config::Memtrace(Some(n)) => format!("memtrace --frames {n}"),
            Config::Floor => "floor: bpftrace, empty probes".into(),
            Config::Tracemalloc => "python -X tracemalloc=1".into(),
            Config::Memray { python_allocators: false } => "memray run".into(),
            Config::Memray { python_allocators: true } => "memray run --trace-python-allocators".into(),
        }
    }

    /// Whether the cost per probe hit and per allocation means anything:
    /// only for tracers on memtrace's attach points.
    fn on_probes(self) -> bool {
        matches!(self, Config::Memtrace(_) | Config::Floor)
    }
}

struct Workload {
    name: &'static str,
    depth: u32,
    configs: &'static [Config],
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "shallow",
        depth: 1,
        configs: &[
            Config::Untraced,
            Config::Memtrace(None),
            Config::Memtrace(Some(1)),
            Config::Floor,
            Config::Tracemalloc,
            Config::Memray { python_allocators: false },
            Config::Memray { python_allocators: true },
        ],
    },
    Workload {
        name: "deep",
        depth: DEEP_DEPTH,
        configs: &[Config::Untraced, Config::Floor, Config::Memtrace(Some(1)), Config::Memtrace(None)],
    },
];

pub fn run(args: &[String]) -> Result<()> {
    let (repeat, iterations) = parse_args(args)?;
    let built = build()?;
    let root = workspace_root();
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Another build in this tree may replace target/release/memtrace while
    // the bench runs; every run must time the same binary.
    let memtrace = dir.join("memtrace");
    fs::copy(&built, &memtrace).with_context(|| format!("cannot copy {} into {}", built.display(), dir.display()))?;
    let source = source_version(&root)?;
    let python = example_python();
    let script = root.join("bench/workload.py");
    ensure_package("bpftrace", "bpftrace")?;
    ensure_package("gcc", "gcc")?;
    let shim = build_shim(&root.join("bench/bpftrace_shim.c"), &dir)?;
    let memray_python = ensure_memray(&python, &dir)?;
    let points = discover_probes(&memtrace, &python, &script)?;
    let floor_program = dir.join("floor.bt");
    fs::write(&floor_program, bpftrace_program(&points))
        .with_context(|| format!("cannot write {}", floor_program.display()))?;

    let bench = Bench {
        memtrace,
        source,
        python,
        memray_python,
        script,
        shim,
        floor_program,
        floor_probes: points.iter().map(|p| p.bpftrace_probes().len()).sum(),
        memray_output: dir.join("memray.bin"),
        iterations,
    };
    let mut samples: Vec<Vec<Samples>> =
        WORKLOADS.iter().map(|w| w.configs.iter().map(|_| Samples::default()).collect()).collect();
    for round in 1..=repeat {
        for (workload, samples) in WORKLOADS.iter().zip(&mut samples) {
            for (&config, samples) in workload.configs.iter().zip(samples) {
                let (seconds, measured) = bench
                    .run_once(workload, config)
                    .with_context(|| format!("{} workload, {}", workload.name, config.label()))?;
                eprintln!("bench: round {round}/{repeat}: {} / {}: {seconds:.3} s", workload.name, config.label());
                samples.add(seconds, measured);
            }
        }
    }

    let results = results(&points, &samples);
    println!("{results}");
    let document = document(&bench, repeat, &points, &results)?;
    let path = root.join("BENCHMARKS.md");
    fs::write(&path, document).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

fn parse_args(args: &[String]) -> Result<(u64, u64)> {
    let mut repeat = DEFAULT_REPEAT;
    let mut iterations = DEFAULT_ITERATIONS;
    let mut args = args.iter().filter(|a| *a != "--");
    while let Some(arg) = args.next() {
        let target = match arg.as_str() {
            "--repeat" => &mut repeat,
            "--iterations" => &mut iterations,
            other => bail!("unknown argument `{other}`; {USAGE}"),
        };
        *target = args
            .next()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &u64| n > 0)
            .with_context(|| format!("{arg} needs a positive whole number; {USAGE}"))?;
    }
    Ok((repeat, iterations))
}

/// The commit the tree is at, and whether tracked files differ from it
/// (read only: no index refresh is written).
fn source_version(root: &Path) -> Result<String> {
    let git = |args: &[&str]| output(Command::new("git").args(args).current_dir(root).env("GIT_OPTIONAL_LOCKS", "0"));
    let commit = git(&["rev-parse", "--short", "HEAD"]).context("cannot tell which commit memtrace is built from")?;
    let changes = git(&["status", "--porcelain", "--untracked-files=no"])?;
    Ok(format!("commit {}{}", commit.trim(), if changes.trim().is_empty() { "" } else { " with uncommitted changes" }))
}

/// Installs a Debian package when its command is missing.
fn ensure_package(command: &str, package: &str) -> Result<()> {
    if Command::new(command).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("bench: installing {package} with apt-get");
    check(Command::new("apt-get").args(["update", "--quiet"]))
        .and_then(|()| check(Command::new("apt-get").args(["install", "--yes", "--quiet", package])))
        .with_context(|| format!("cannot install {package}, which the bench needs"))
}

/// Compiles the LD_PRELOAD shim that lets bpftrace probe at memtrace's
/// offsets, for memtrace's one process (see the source for why).
fn build_shim(source: &Path, dir: &Path) -> Result<PathBuf> {
    let shim = dir.join("bpftrace_shim.so");
    check(Command::new("gcc").args(["-shared", "-fPIC", "-O2", "-Wall", "-o"]).arg(&shim).arg(source).arg("-ldl"))
        .context("cannot build the bpftrace shim")?;
    Ok(shim)
}

/// A venv of the benchmarked interpreter with memray in it; returns its
/// python.
fn ensure_memray(python: &Path, dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let venv_python = venv.join("bin/python");
    if Command::new(&venv_python).args(["-c", "import memray"]).output().is_ok_and(|o| o.status.success()) {
        return Ok(venv_python);
    }
    eprintln!("bench: installing memray into {}", venv.display());
    check(Command::new(python).args(["-m", "venv"]).arg(&venv))
        .and_then(|()| check(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "memray"])))
        .context("cannot install memray from PyPI")?;
    Ok(venv_python)
}

/// One of memtrace's attach points, as `memtrace --verbose` lists it.
struct AttachPoint {
    /// The BPF program: alloc_return (which comes with an entry probe at
    /// the same place), free_entry or new_reference.
    program: String,
    symbol: String,
    offset: u64,
    binary: String,
    /// "emulated" or "single-stepped": how the kernel runs the probed
    /// instruction.
    placement: String,
    file_offset: u64,
}

impl AttachPoint {
    /// bpftrace's names of the probes memtrace puts here: an allocator gets
    /// an entry and a return probe, a release or object birth one probe.
    fn bpftrace_probes(&self) -> Vec<String> {
        let kinds: &[&str] = if self.program == "alloc_return" { &["uprobe", "uretprobe"] } else { &["uprobe"] };
        kinds.iter().map(|kind| format!("{kind}:{}:{}", self.binary, self.file_offset)).collect()
    }

    fn label(&self) -> String {
        let file = self.binary.rsplit('/').next().unwrap_or(&self.binary);
        format!("{}+{:#x} in {file}", self.symbol, self.offset)
    }
}

/// memtrace's attach points for this interpreter and libc: run once, with
/// --verbose, against a workload that waits at `ready`.
fn discover_probes(memtrace: &Path, python: &Path, script: &Path) -> Result<Vec<AttachPoint>> {
    let mut cmd = Command::new(python);
    cmd.arg(script).args(["1", "1"]);
    let target = Target::start(cmd)?;
    let out = Command::new(memtrace)
        .args(["--verbose", "--count", "1", "--interval", "0.1", "--pid"])
        .arg(target.pid().to_string())
        .output()
        .context("cannot start memtrace")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("memtrace --verbose failed ({}): {}", out.status, last_line(&stderr));
    }
    let points = stderr
        .lines()
        .filter_map(|line| line.strip_prefix("memtrace: probe "))
        .map(parse_attach_point)
        .collect::<Result<Vec<_>>>()?;
    // The listing leaves out the entry probes that go with alloc_return;
    // the count memtrace attaches must match ours with them added back.
    let attached = stderr.lines().find_map(|l| {
        l.strip_prefix("memtrace: tracing pid ")?.split(": ").nth(1)?.split_once(" probes")?.0.parse::<usize>().ok()
    });
    let ours: usize = points.iter().map(|p| p.bpftrace_probes().len()).sum();
    match attached {
        Some(n) if n == ours => Ok(points),
        _ => bail!(
            "memtrace --verbose lists {ours} probes, but its `tracing pid` line says otherwise: {}",
            last_line(&stderr)
        ),
    }
}

/// `alloc_return malloc+0x0 in /usr/lib/.../libc.so.6 (emulated): reason`
fn parse_attach_point(line: &str) -> Result<AttachPoint> {
    let parsed = (|| {
        let (head, _reason) = line.split_once("): ")?;
        let (head, placement) = head.rsplit_once(" (")?;
        let (head, binary) = head.split_once(" in ")?;
        let (program, location) = head.split_once(' ')?;
        let (symbol, offset) = location.rsplit_once("+0x")?;
        Some((program, symbol, u64::from_str_radix(offset, 16).ok()?, binary, placement))
    })();
    let (program, symbol, offset, binary, placement) =
        parsed.with_context(|| format!("cannot read memtrace's probe line `{line}`"))?;
    let file_offset = symbol_file_offset(Path::new(binary), symbol)? + offset;
    Ok(AttachPoint {
        program: program.into(),
        symbol: symbol.into(),
        offset,
        binary: binary.into(),
        placement: placement.into(),
        file_offset,
    })
}

/// Where `symbol` starts in the ELF file at `path`, as a file offset: found
/// the way memtrace finds it (.symtab first, for the interpreter's internal
/// allocator, then .dynsym; versioned names by their base name), mapped
/// through the PT_LOAD segment that holds it.
fn symbol_file_offset(path: &Path, symbol: &str) -> Result<u64> {
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    elf_symbol_file_offset(&data, symbol)
        .with_context(|| format!("cannot find {symbol} in {} (not a 64-bit little-endian ELF?)", path.display()))
}

fn elf_symbol_file_offset(data: &[u8], symbol: &str) -> Option<u64> {
    let u16_at = |at: u64| Some(u16::from_le_bytes(data.get(at as usize..at as usize + 2)?.try_into().ok()?));
    let u32_at = |at: u64| Some(u32::from_le_bytes(data.get(at as usize..at as usize + 4)?.try_into().ok()?));
    let u64_at = |at: u64| Some(u64::from_le_bytes(data.get(at as usize..at as usize + 8)?.try_into().ok()?));
    if data.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (phoff, shoff) = (u64_at(0x20)?, u64_at(0x28)?);
    let (phentsize, phnum) = (u64::from(u16_at(0x36)?), u64::from(u16_at(0x38)?));
    let (shentsize, shnum) = (u64::from(u16_at(0x3a)?), u64::from(u16_at(0x3c)?));
    let sections: Vec<u64> = (0..shnum).map(|i| shoff + i * shentsize).collect();
    const SYMTAB: u32 = 2;
    const DYNSYM: u32 = 11;
    let vaddr = [SYMTAB, DYNSYM].iter().find_map(|&kind| {
        sections.iter().filter(|&&sh| u32_at(sh + 4) == Some(kind)).find_map(|&sh| {
            let (offset, size, entsize) = (u64_at(sh + 24)?, u64_at(sh + 32)?, u64_at(sh + 56)?);
            let strtab = u64_at(*sections.get(u32_at(sh + 40)? as usize)? + 24)?;
            (0..size / entsize.max(1)).map(|i| offset + i * entsize).find_map(|sym| {
                let info = *data.get(sym as usize + 4)?;
                let defined = u16_at(sym + 6)? != 0;
                // Functions, data and TLS, as memtrace counts symbols.
                let wanted = matches!(info & 0xf, 1 | 2 | 6);
                let name_at = (strtab + u64::from(u32_at(sym)?)) as usize;
                let name = data.get(name_at..)?.split(|&b| b == 0).next()?;
                let base = name.split(|&b| b == b'@').next()?;
                (defined && wanted && base == symbol.as_bytes()).then(|| u64_at(sym + 8)).flatten()
            })
        })
    })?;
    const PT_LOAD: u32 = 1;
    (0..phnum).map(|i| phoff + i * phentsize).find_map(|ph| {
        let (offset, start, file_size) = (u64_at(ph + 8)?, u64_at(ph + 16)?, u64_at(ph + 32)?);
        (u32_at(ph)? == PT_LOAD && vaddr >= start && vaddr < start + file_size).then(|| vaddr - start + offset)
    })
}

/// The floor: one empty action, counting hits per probe, on every probe
/// memtrace attaches.
fn bpftrace_program(points: &[AttachPoint]) -> String {
    let probes: Vec<String> = points.iter().flat_map(AttachPoint::bpftrace_probes).collect();
    format!(
        "// The kernel's floor under memtrace, written by `cargo xtask bench`: memtrace's\n\
         // attach points, by file offset, each running nothing but a hit count.\n\
         {}\n{{ @[probe] = count(); }}\n",
        probes.join(",\n")
    )
}

/// What one run measured besides the loop's time.
enum Measured {
    Nothing,
    Memtrace(MemtraceCounts),
    /// Hits per bpftrace probe name.
    Floor(BTreeMap<String, u64>),
}

/// From memtrace's final report header.
struct MemtraceCounts {
    allocations: u64,
    truncated: u64,
    read_faults: u64,
}

#[derive(Default)]
struct Samples {
    seconds: Vec<f64>,
    allocations: Vec<u64>,
    truncated: Vec<u64>,
    read_faults: Vec<u64>,
    hits: BTreeMap<String, Vec<u64>>,
    total_hits: Vec<u64>,
}

impl Samples {
    fn add(&mut self, seconds: f64, measured: Measured) {
        self.seconds.push(seconds);
        match measured {
            Measured::Nothing => {}
            Measured::Memtrace(c) => {
                self.allocations.push(c.allocations);
                self.truncated.push(c.truncated);
                self.read_faults.push(c.read_faults);
            }
            Measured::Floor(hits) => {
                self.total_hits.push(hits.values().sum());
                for (probe, count) in hits {
                    self.hits.entry(probe).or_default().push(count);
                }
            }
        }
    }
}

struct Bench {
    memtrace: PathBuf,
    /// The commit memtrace was built from, and whether the tree had changes.
    source: String,
    python: PathBuf,
    memray_python: PathBuf,
    script: PathBuf,
    shim: PathBuf,
    floor_program: PathBuf,
    floor_probes: usize,
    memray_output: PathBuf,
    iterations: u64,
}

impl Bench {
    fn run_once(&self, workload: &Workload, config: Config) -> Result<(f64, Measured)> {
        let mut cmd = match config {
            Config::Tracemalloc => {
                let mut cmd = Command::new(&self.python);
                cmd.args(["-X", "tracemalloc=1"]);
                cmd
            }
            Config::Memray { python_allocators } => {
                let mut cmd = Command::new(&self.memray_python);
                cmd.args(["-m", "memray", "run", "--force", "-o"]).arg(&self.memray_output);
                if python_allocators {
                    cmd.arg("--trace-python-allocators");
                }
                cmd
            }
            Config::Untraced | Config::Memtrace(_) | Config::Floor => Command::new(&self.python),
        };
        cmd.arg(&self.script).arg(self.iterations.to_string()).arg(workload.depth.to_string());
        let mut target = Target::start(cmd)?;
        let tracer = match config {
            Config::Memtrace(frames) => Some(self.memtrace(target.pid(), frames)?),
            Config::Floor => Some(self.bpftrace(target.pid())?),
            Config::Untraced | Config::Tracemalloc | Config::Memray { .. } => None,
        };
        target.go()?;
        let seconds = target.elapsed()?;
        let measured = match tracer {
            None => Measured::Nothing,
            Some(tracer) => {
                let log = tracer.stop()?;
                if config == Config::Floor {
                    Measured::Floor(parse_hits(&log)?)
                } else {
                    Measured::Memtrace(parse_final_report(&log)?)
                }
            }
        };
        target.finish()?;
        Ok((seconds, measured))
    }

    fn memtrace(&self, pid: u32, frames: Option<u32>) -> Result<Tracer> {
        let mut cmd = Command::new(&self.memtrace);
        cmd.arg("--pid").arg(pid.to_string());
        if let Some(n) = frames {
            cmd.arg("--frames").arg(n.to_string());
        }
        Tracer::start(cmd, "memtrace", |l| l.stderr && l.text.starts_with("memtrace: tracing pid "))
    }

    fn bpftrace(&self, pid: u32) -> Result<Tracer> {
        let mut cmd = Command::new("bpftrace");
        cmd.arg("--unsafe")
            .arg("-p")
            .arg(pid.to_string())
            .arg(&self.floor_program)
            .env("LD_PRELOAD", &self.shim)
            .env("BPFTRACE_SHIM_PID", pid.to_string())
            .env(BPFTRACE_ATTACHED, "1");
        let tracer = Tracer::start(cmd, "bpftrace", |l| l.stderr && l.text == BPFTRACE_ATTACHED)?;
        let attaching = format!("Attaching {} probes...", self.floor_probes);
        if !tracer.log.iter().any(|l| l.text == attaching) {
            bail!("bpftrace did not attach the {} probes memtrace uses: {}", self.floor_probes, tracer.last_error());
        }
        Ok(tracer)
    }
}

/// `@[uprobe:/path:offset]: count` lines, printed when bpftrace stops.
fn parse_hits(log: &[Line]) -> Result<BTreeMap<String, u64>> {
    let hits: BTreeMap<String, u64> = log
        .iter()
        .filter(|l| !l.stderr)
        .filter_map(|l| {
            let (probe, count) = l.text.strip_prefix("@[")?.rsplit_once("]: ")?;
            Some((probe.to_owned(), count.trim().parse().ok()?))
        })
        .collect();
    if hits.is_empty() {
        bail!("bpftrace printed no probe counts");
    }
    Ok(hits)
}

/// The final report's header: `... allocated since attach 12.4 MiB in
/// 375663 blocks | lost: ... python-reads=0 ... | truncated-python-stacks=0 ...`
fn parse_final_report(log: &[Line]) -> Result<MemtraceCounts> {
    let header = log
        .iter()
        .find(|l| !l.stderr && l.text.contains(" final report "))
        .map(|l| l.text.as_str())
        .context("memtrace printed no final report")?;
    let allocations = header
        .split_once("allocated since attach ")
        .and_then(|(_, rest)| rest.split_once(" in ")?.1.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no allocation count in memtrace's final report `{header}`"))?;
    let counter = |name: &str| {
        header
            .split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .with_context(|| format!("no {name} counter in memtrace's final report `{header}`"))
    };
    Ok(MemtraceCounts {
        allocations,
        truncated: counter("truncated-python-stacks")?,
        read_faults: counter("python-reads")?,
    })
}

/// A child process that is killed if still running when dropped, so that a
/// failed run leaves no workload or tracer behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The workload: `ready`, a line on stdin starts the loop, `elapsed
/// SECONDS`, then it waits for stdin to close.
struct Target {
    child: KillOnDrop,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Target {
    fn start(mut cmd: Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the workload {cmd:?}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("the workload has no stdout")?);
        let mut target = Self { child: KillOnDrop(child), stdin, stdout };
        target.read_line_starting("ready")?;
        Ok(target)
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn go(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("the workload's stdin is closed")?;
        writeln!(stdin).and_then(|()| stdin.flush()).context("cannot start the workload's loop")
    }

    fn elapsed(&mut self) -> Result<f64> {
        let text = self.read_line_starting("elapsed ")?;
        text.trim().parse().with_context(|| format!("the workload printed `elapsed {text}`"))
    }

    /// The rest of the next stdout line that starts with `prefix`; memray
    /// prints lines of its own around the workload's.
    fn read_line_starting(&mut self, prefix: &str) -> Result<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line).context("cannot read the workload's output")? == 0 {
                let status = self.child.0.wait().context("cannot wait for the workload")?;
                bail!("the workload exited ({status}) before printing `{prefix}`");
            }
            if let Some(rest) = line.trim_end().strip_prefix(prefix) {
                return Ok(rest.to_owned());
            }
        }
    }

    fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.0.wait().context("cannot wait for the workload")?;
        if !status.success() {
            bail!("the workload failed after its loop: {status}");
        }
        Ok(())
    }
}

struct Line {
    stderr: bool,
    text: String,
}

/// memtrace or bpftrace, attached to a workload, its output gathered as it
/// comes (the attach line must be seen while it runs).
struct Tracer {
    name: &'static str,
    child: KillOnDrop,
    lines: Receiver<Line>,
    log: Vec<Line>,
}

impl Tracer {
    /// Starts `cmd` and returns once a line satisfies `attached`.
    fn start(mut cmd: Command, name: &'static str, attached: impl Fn(&Line) -> bool) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let (sender, lines) = mpsc::channel();
        forward(child.stdout.take().context("no stdout")?, false, sender.clone());
        forward(child.stderr.take().context("no stderr")?, true, sender);
        let mut tracer = Self { name, child: KillOnDrop(child), lines, log: Vec::new() };
        loop {
            match tracer.lines.recv_timeout(ATTACH_TIMEOUT) {
                Ok(line) => {
                    let done = attached(&line);
                    tracer.log.push(line);
                    if done {
                        return Ok(tracer);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{name} did not attach within {} s: {}", ATTACH_TIMEOUT.as_secs(), tracer.last_error())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = tracer.child.0.wait().with_context(|| format!("cannot wait for {name}"))?;
                    bail!("{name} exited ({status}) before attaching: {}", tracer.last_error());
                }
            }
        }
    }

    /// Stops it as a user would, with SIGINT, and returns all it printed.
    fn stop(mut self) -> Result<Vec<Line>> {
        // SAFETY: kill takes a pid and a signal; the pid is our own child,
        // not yet waited for, so it cannot name another process.
        unsafe { libc::kill(self.child.0.id() as libc::pid_t, libc::SIGINT) };
        let status = self.child.0.wait().with_context(|| format!("cannot wait for {}", self.name))?;
        self.log.extend(self.lines.iter());
        if !status.success() {
            bail!("{} failed ({status}): {}", self.name, self.last_error());
        }
        Ok(std::mem::take(&mut self.log))
    }

    fn last_error(&self) -> &str {
        self.log.iter().rev().find(|l| l.stderr && !l.text.trim().is_empty()).map_or("(no message)", |l| &l.text)
    }
}

fn forward(stream: impl Read + Send + 'static, stderr: bool, sender: Sender<Line>) {
    thread::spawn(move || {
        for text in BufReader::new(stream).lines().map_while(Result::ok) {
            if sender.send(Line { stderr, text }).is_err() {
                break;
            }
        }
    });
}

fn last_line(text: &str) -> &str {
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no message)")
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

fn median_count(values: &[u64]) -> Option<f64> {
    (!values.is_empty()).then(|| median(&values.iter().map(|&v| v as f64).collect::<Vec<_>>()))
}

/// The result tables (printed, and the heart of BENCHMARKS.md).
fn results(points: &[AttachPoint], samples: &[Vec<Samples>]) -> String {
    let mut out = String::new();
    for (workload, samples) in WORKLOADS.iter().zip(samples) {
        // Every workload's first configuration is the untraced one.
        let untraced = median(&samples[0].seconds);
        let floor = workload.configs.iter().position(|&c| c == Config::Floor).map(|i| &samples[i]);
        let hits = floor.and_then(|f| median_count(&f.total_hits)).unwrap_or(0.0);
        // The workload's allocations as memtrace counts them, over all its
        // memtrace runs (the loop is deterministic; the runs agree closely).
        let all_allocations: Vec<u64> = samples.iter().flat_map(|s| s.allocations.iter().copied()).collect();
        let allocations = median_count(&all_allocations).unwrap_or(0.0);
        let _ = writeln!(
            out,
            "### {} workload ({} Python frames at the loop)\n\nPer run: {hits:.0} probe hits (the floor's count) and {allocations:.0} allocations (memtrace's count).\n",
            workload.name,
            workload.depth + 3,
        );
        let mut rows = Vec::new();
        for (&config, s) in workload.configs.iter().zip(samples) {
            let m = median(&s.seconds);
            let spread = format!(
                "{:.3}–{:.3}",
                s.seconds.iter().copied().fold(f64::INFINITY, f64::min),
                s.seconds.iter().copied().fold(0.0, f64::max)
            );
            let per = |count: f64| {
                if config.on_probes() && count > 0.0 {
                    format!("{:.0}", (m - untraced) * 1e9 / count)
                } else {
                    "–".into()
                }
            };
            let share = |values: &[u64]| match (median_count(values), median_count(&s.allocations)) {
                (Some(v), Some(a)) if a > 0.0 => format!("{:.1}%", 100.0 * v / a),
                _ => "–".into(),
            };
            rows.push(vec![
                config.label(),
                format!("{m:.3}"),
                spread,
                format!("{:.2}×", m / untraced),
                per(hits),
                per(allocations),
                share(&s.truncated),
                share(&s.read_faults),
            ]);
        }
        out += &table(
            &[
                "configuration",
                "median s",
                "runs s (min–max)",
                "vs untraced",
                "ns / probe hit",
                "ns / allocation",
                "truncated / allocations",
                "read faults / allocations",
            ],
            &rows,
        );
        out.push('\n');
    }

    out += "### Probe hits per run (the floor's counts, medians)\n\n";
    let floors: Vec<&Samples> = WORKLOADS
        .iter()
        .zip(samples)
        .filter_map(|(w, s)| w.configs.iter().position(|&c| c == Config::Floor).map(|i| &s[i]))
        .collect();
    let mut rows = Vec::new();
    let mut single_stepped = vec![0.0; floors.len()];
    let mut total = vec![0.0; floors.len()];
    for point in points {
        for probe in point.bpftrace_probes() {
            let kind = probe.split(':').next().unwrap_or_default().to_owned();
            let mut row = vec![kind, point.label(), point.placement.clone()];
            for (i, floor) in floors.iter().enumerate() {
                let count = floor.hits.get(&probe).and_then(|v| median_count(v)).unwrap_or(0.0);
                total[i] += count;
                if point.placement == "single-stepped" {
                    single_stepped[i] += count;
                }
                row.push(format!("{count:.0}"));
            }
            rows.push(row);
        }
    }
    let mut headers = vec!["probe", "at", "first instruction"];
    let workload_headers: Vec<String> = WORKLOADS.iter().map(|w| format!("{} hits", w.name)).collect();
    headers.extend(workload_headers.iter().map(String::as_str));
    out += &table(&headers, &rows);
    for (workload, (stepped, total)) in WORKLOADS.iter().zip(single_stepped.iter().zip(&total)) {
        let _ = write!(
            out,
            "\n{}: {stepped:.0} of {total:.0} hits ({:.2}%) are on single-stepped probes.",
            workload.name,
            if *total > 0.0 { 100.0 * stepped / total } else { 0.0 }
        );
    }
    out.push('\n');
    out
}

/// A Markdown table, padded so that it also reads as plain text.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(c, &w)| format!("{c}{}", " ".repeat(w - c.chars().count()))).collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(headers.to_vec());
    out += &line(widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().iter().map(String::as_str).collect());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// BENCHMARKS.md: the machine, the method, then the results.
fn document(bench: &Bench, repeat: u64, points: &[AttachPoint], results: &str) -> Result<String> {
    let date = output(Command::new("date").arg("-u"))?;
    let kernel = output(Command::new("uname").arg("-r"))?;
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("cannot read /proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find_map(|l| Some(l.strip_prefix("model name")?.split_once(':')?.1.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    let memory_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .context("no MemTotal in /proc/meminfo")?;
    let interpreter = output(Command::new(&bench.python).arg("--version"))?;
    let bpftrace = output(Command::new("bpftrace").arg("--version"))?;
    let memray = output(Command::new(&bench.memray_python).args(["-c", "import memray; print(memray.__version__)"]))?;
    let single_stepped: Vec<String> =
        points.iter().filter(|p| p.placement == "single-stepped").map(AttachPoint::label).collect();
    let iterations = bench.iterations;
    Ok(format!(
        "# memtrace benchmarks

What tracing costs the traced process. Written by `cargo xtask bench` \
(xtask/src/bench.rs), which regenerates this whole file on every run: change \
the bench, not this file.

- date: {date}
- machine: Linux {kernel}, {cpu}, {cores} cores, {memory:.1} GiB memory
- interpreter: {interpreter} ({python})
- memtrace: built from {source} (the binary copied to target/bench/ before the first run)
- peers: {bpftrace}, memray {memray}

Every number is the median of {repeat} run(s) of its configuration, \
interleaved with the other configurations', and every ratio a ratio of \
medians. The machine is shared, noisy and has 2 cores, on \
which the tracer and the target compete: single runs vary a lot (see the \
min–max column), so read the ratios, not the third digit.

## Workload

`bench/workload.py ITERATIONS DEPTH`, with {iterations} iterations of a loop \
that builds a one-element list (`x = [i]`, freed the next iteration), \
replaces one of 1000 strings in a dict (`names[i % 1000] = str(i)`, freeing \
the old one) and creates an instance of a small class with two attributes \
(every tenth one kept to the end, so {kept} objects stay alive). The script \
prints `ready` and waits for a line on stdin, so that a tracer attaches \
before the loop starts (the bench sends the line once memtrace prints its \
`tracing pid` line, or bpftrace says all its probes are attached); it times \
the loop alone with `time.perf_counter()` and prints the seconds. \
Interpreter start-up, attaching and detaching are not timed.

- shallow: the loop 4 Python frames deep (`<module>`, `main`, `at_depth`, `loop`).
- deep: the loop {deep} Python frames deep (`at_depth` recursing {depth} \
times): `--frames 16` walks 16 frames and truncates every stack, \
`--frames 1` walks one.

## Configurations

- untraced: `python bench/workload.py N DEPTH`.
- memtrace: `memtrace --pid PID` (defaults, among them `--frames 16`) or \
`memtrace --pid PID --frames 1`, attached from outside to the waiting \
workload and stopped with SIGINT after the loop; the counts come from its \
final report. ns / probe hit and ns / allocation divide the time added over \
untraced by the floor's probe hits and by memtrace's allocation count; \
the last two columns are its `truncated-python-stacks` and `python-reads` \
counters (Python stack walks cut at --frames, and walks that failed on a \
read fault) over its allocation count.
- floor: bpftrace with an empty action (a hit count per probe) on exactly \
memtrace's attach points, learned from `memtrace --verbose` against the \
workload: an entry and a return probe at the start of each allocator, one \
probe at memtrace's offset into each release function and into \
`_Py_NewReference`, run as `bpftrace --unsafe -p PID \
target/bench/floor.bt`. It is what the kernel charges for the probes alone, \
before memtrace's programs do any work. bpftrace runs with an LD_PRELOAD \
shim (bench/bpftrace_shim.c, built into target/bench/ with gcc) that does \
three things. It hides ELF symbols from bpftrace's bcc, so that `bpftrace \
--unsafe` takes each probe as a raw file offset: Debian's bpftrace 0.17 is \
built without the disassembler it needs to accept a probe past a function's \
first byte, and memtrace's placement has already checked that each offset \
starts an instruction. It passes the workload's pid to bcc's \
`bpf_attach_uprobe`, so that the probes are scoped to the workload as \
memtrace's are: bpftrace 0.17 attaches uprobes system-wide whatever `-p` \
says, and the counts would then include every other process on the \
machine. And it makes `setrlimit(RLIMIT_MEMLOCK)` return 0 (this sandbox \
may not raise the limit; the kernel has not needed it for BPF since 5.11).
- tracemalloc: `python -X tracemalloc=1` (one frame per trace).
- memray: `python -m memray run --force -o target/bench/memray.bin` with and \
without `--trace-python-allocators`, from a venv of the same interpreter \
(target/bench/venv).

Probes the kernel single-steps rather than emulates (from `memtrace \
--verbose`): {single_stepped}. Every other probe's first instruction is \
emulated, which spares a second trap per hit.

## Results

{results}",
        date = date.trim(),
        kernel = kernel.trim(),
        memory = memory_kib / (1024.0 * 1024.0),
        interpreter = interpreter.trim(),
        source = bench.source,
        python = bench.python.display(),
        bpftrace = bpftrace.trim(),
        memray = memray.trim(),
        kept = iterations.div_ceil(10),
        deep = DEEP_DEPTH + 3,
        depth = DEEP_DEPTH,
        single_stepped = if single_stepped.is_empty() { "none".into() } else { single_stepped.join(", ") },
    ))
}
