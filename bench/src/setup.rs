//! Everything the runs need, made ready before the first one and reused
//! when already there: the memtrace binary copied aside, the tools (bpftrace,
//! gcc), memray in a venv of the benchmarked interpreter, the LD_PRELOAD
//! shim bpftrace runs with, and memtrace's own attach points, learned from
//! `memtrace --verbose` against the workload, written as the floor's
//! bpftrace program.

use std::{
    collections::{HashMap, hash_map::Entry},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use memtrace::binary::elf::ElfFile;
use memtrace_tests::{ensure_package, memtrace_bin};

use crate::{output, workload::start_workload};

/// What the runs use, and what the report says about them.
pub struct Setup {
    pub memtrace: PathBuf,
    /// The commit memtrace was built from, and whether the tree had changes.
    pub source: String,
    pub python: PathBuf,
    pub memray_python: PathBuf,
    pub script: PathBuf,
    pub shim: PathBuf,
    pub floor_program: PathBuf,
    pub points: Vec<AttachPoint>,
    pub memray_output: PathBuf,
    pub iterations: u64,
}

pub fn prepare(root: &Path, iterations: u64) -> Result<Setup> {
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Another build in this tree may replace target/release/memtrace while
    // the bench runs; every run must time the same binary.
    let built = memtrace_bin();
    let memtrace = dir.join("memtrace");
    fs::copy(&built, &memtrace).with_context(|| format!("cannot copy {} into {}", built.display(), dir.display()))?;
    let source = source_version(root)?;
    let python = python();
    let script = root.join("bench/workload.py");
    ensure_package("bpftrace", "bpftrace")?;
    ensure_package("gcc", "gcc")?;
    let shim = build_shim(&root.join("bench/bpftrace_shim.c"), &dir)?;
    let memray_python = ensure_memray(&python, &dir)?;
    let points = discover_probes(&memtrace, &python, &script)?;
    let floor_program = dir.join("floor.bt");
    fs::write(&floor_program, bpftrace_program(&points))
        .with_context(|| format!("cannot write {}", floor_program.display()))?;
    Ok(Setup {
        memtrace,
        source,
        python,
        memray_python,
        script,
        shim,
        floor_program,
        points,
        memray_output: dir.join("memray.bin"),
        iterations,
    })
}

/// The interpreter benchmarked: pyenv's 3.12 when present.
fn python() -> PathBuf {
    let pyenv = PathBuf::from(std::env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".into()));
    let preferred = pyenv.join("versions/3.12.1/bin/python");
    if preferred.exists() { preferred } else { PathBuf::from("python3") }
}

/// The commit the tree is at, and whether tracked files differ from it
/// (read only: no index refresh is written).
fn source_version(root: &Path) -> Result<String> {
    let git = |args: &[&str]| output(Command::new("git").args(args).current_dir(root).env("GIT_OPTIONAL_LOCKS", "0"));
    let commit = git(&["rev-parse", "--short", "HEAD"]).context("cannot tell which commit memtrace is built from")?;
    let changes = git(&["status", "--porcelain", "--untracked-files=no"])?;
    Ok(format!("commit {}{}", commit.trim(), if changes.trim().is_empty() { "" } else { " with uncommitted changes" }))
}

/// Compiles the LD_PRELOAD shim that lets bpftrace probe at memtrace's
/// offsets, for memtrace's one process (see the source for why).
fn build_shim(source: &Path, dir: &Path) -> Result<PathBuf> {
    let shim = dir.join("bpftrace_shim.so");
    output(Command::new("gcc").args(["-shared", "-fPIC", "-O2", "-Wall", "-o"]).arg(&shim).arg(source).arg("-ldl"))
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
    output(Command::new(python).args(["-m", "venv"]).arg(&venv))
        .and_then(|_| output(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "memray"])))
        .context("cannot install memray from PyPI")?;
    Ok(venv_python)
}

/// One of memtrace's attach points, as `memtrace --verbose` lists it.
pub struct AttachPoint {
    /// The BPF program: alloc_return (which comes with an entry probe at
    /// the same place), free_entry or new_reference.
    program: String,
    symbol: String,
    offset: u64,
    binary: String,
    /// "emulated" or "single-stepped": how the kernel runs the probed
    /// instruction.
    pub placement: String,
    file_offset: u64,
}

impl AttachPoint {
    /// bpftrace's names of the probes memtrace puts here: an allocator gets
    /// an entry and a return probe, a release or object birth one probe.
    pub fn bpftrace_probes(&self) -> Vec<String> {
        let kinds: &[&str] = if self.program == "alloc_return" { &["uprobe", "uretprobe"] } else { &["uprobe"] };
        kinds.iter().map(|kind| format!("{kind}:{}:{}", self.binary, self.file_offset)).collect()
    }

    pub fn label(&self) -> String {
        let file = self.binary.rsplit('/').next().unwrap_or(&self.binary);
        format!("{}+{:#x} in {file}", self.symbol, self.offset)
    }
}

/// memtrace's attach points for this interpreter and libc: run once, with
/// --verbose, against a workload that waits at `ready`.
fn discover_probes(memtrace: &Path, python: &Path, script: &Path) -> Result<Vec<AttachPoint>> {
    let target = start_workload(Command::new(python).arg(script).args(["1", "1"]))?;
    let out = Command::new(memtrace)
        .args(["--verbose", "--count", "1", "--interval", "0.1", "--pid"])
        .arg(target.pid().to_string())
        .output()
        .context("cannot start memtrace")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("memtrace --verbose failed ({}): {}", out.status, last_line(&stderr));
    }
    let mut files = HashMap::new();
    let points = stderr
        .lines()
        .filter_map(|line| line.strip_prefix("memtrace: probe "))
        .map(|line| parse_attach_point(line, &mut files))
        .collect::<Result<Vec<_>>>()?;
    // The listing leaves out the entry probes that go with alloc_return;
    // the count memtrace attaches must match ours with them added back.
    let attached = stderr.lines().find_map(|l| {
        l.strip_prefix("memtrace: tracing pid ")?.split(": ").nth(1)?.split_once(" probes")?.0.parse::<usize>().ok()
    });
    let ours = probe_count(&points);
    match attached {
        Some(n) if n == ours => Ok(points),
        _ => bail!(
            "memtrace --verbose lists {ours} probes, but its `tracing pid` line says otherwise: {}",
            last_line(&stderr)
        ),
    }
}

/// How many probes bpftrace attaches for `points`: as many as memtrace.
pub fn probe_count(points: &[AttachPoint]) -> usize {
    points.iter().map(|p| p.bpftrace_probes().len()).sum()
}

/// `alloc_return malloc+0x0 in /usr/lib/.../libc.so.6 (emulated): reason`;
/// `files` keeps each binary read once.
fn parse_attach_point(line: &str, files: &mut HashMap<String, ElfFile>) -> Result<AttachPoint> {
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
    let elf = match files.entry(binary.to_owned()) {
        Entry::Occupied(known) => known.into_mut(),
        Entry::Vacant(new) => new.insert(ElfFile::open(Path::new(binary))?),
    };
    let file_offset = elf
        .symbol(symbol)
        .and_then(|s| elf.file_offset(s.vaddr))
        .with_context(|| format!("cannot find {symbol} in {binary}"))?
        + offset;
    Ok(AttachPoint {
        program: program.into(),
        symbol: symbol.into(),
        offset,
        binary: binary.into(),
        placement: placement.into(),
        file_offset,
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

fn last_line(text: &str) -> &str {
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no message)")
}
