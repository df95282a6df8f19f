//! Everything the runs need, made ready before the first one and reused
//! when already there: the memtrace binary copied aside, the tools (bpftrace,
//! gcc), a venv of the benchmarked interpreter with the bench's packages
//! from PyPI (memray, pyperformance, Flask), the LD_PRELOAD shim bpftrace
//! runs with, memtrace's own attach points, learned from `memtrace
//! --verbose` against the microbenchmark and written as the floor's
//! bpftrace program, and each pyperformance benchmark's loop count.

use std::{
    collections::{HashMap, hash_map::Entry},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use memtrace::binary::elf::ElfFile;
use memtrace_tests::{Memtrace, ensure_package, memtrace_bin};

use crate::{output, workload::start_workload};

/// What a pyperformance benchmark's loops last untraced, calibrated once
/// per bench run: long enough to time, short enough that the slowest
/// tracer's runs stay within a few tens of seconds.
pub const CALIBRATION_SECONDS: f64 = 0.2;
/// What the venv holds, as pip names them and as Python imports them.
const PACKAGES: [(&str, &str); 3] = [("memray", "memray"), ("pyperformance", "pyperformance"), ("flask", "flask")];

/// What the runs use, and what the report says about them.
pub struct Setup {
    pub memtrace: PathBuf,
    /// The commit memtrace was built from, and whether the tree had changes.
    pub source: String,
    /// The benchmarked interpreter, as installed.
    pub python: PathBuf,
    /// The same interpreter in the bench's venv: every run uses it.
    pub venv_python: PathBuf,
    /// bench/, where the workload scripts are.
    pub bench_dir: PathBuf,
    pub shim: PathBuf,
    pub floor_program: PathBuf,
    pub points: Vec<AttachPoint>,
    pub memray_output: PathBuf,
    /// Each selected pyperformance benchmark and its calibrated loops.
    pub loops: Vec<(String, u64)>,
}

pub fn prepare(root: &Path, benchmarks: &[String]) -> Result<Setup> {
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Another build in this tree may replace target/release/memtrace while
    // the bench runs; every run must time the same binary.
    let built = memtrace_bin();
    let memtrace = dir.join("memtrace");
    fs::copy(&built, &memtrace).with_context(|| format!("cannot copy {} into {}", built.display(), dir.display()))?;
    let source = source_version(root)?;
    let python = python();
    let bench_dir = root.join("bench");
    ensure_package("bpftrace", "bpftrace")?;
    ensure_package("gcc", "gcc")?;
    let shim = build_shim(&bench_dir.join("bpftrace_shim.c"), &dir)?;
    let venv_python = ensure_venv(&python, &dir)?;
    let points = discover_probes(&memtrace, &venv_python, &bench_dir.join("workload.py"))?;
    let floor_program = dir.join("floor.bt");
    fs::write(&floor_program, bpftrace_program(&points))
        .with_context(|| format!("cannot write {}", floor_program.display()))?;
    let loops = benchmarks
        .iter()
        .map(|name| Ok((name.clone(), calibrate(&venv_python, &bench_dir, name)?)))
        .collect::<Result<_>>()?;
    Ok(Setup {
        memtrace,
        source,
        python,
        venv_python,
        bench_dir,
        shim,
        floor_program,
        points,
        memray_output: dir.join("memray.bin"),
        loops,
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

/// A venv of the benchmarked interpreter (target/bench/venv) with
/// PACKAGES in it; returns its python. pip runs as `python -m pip`: a venv
/// copied from another tree keeps scripts that point into that tree.
fn ensure_venv(python: &Path, dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let venv_python = venv.join("bin/python");
    let imports: Vec<&str> = PACKAGES.iter().map(|(_, module)| *module).collect();
    let check = format!("import {}", imports.join(", "));
    if Command::new(&venv_python).args(["-c", &check]).output().is_ok_and(|o| o.status.success()) {
        return Ok(venv_python);
    }
    let names: Vec<&str> = PACKAGES.iter().map(|(name, _)| *name).collect();
    eprintln!("bench: installing {} into {}", names.join(", "), venv.display());
    output(Command::new(python).args(["-m", "venv"]).arg(&venv))
        .and_then(|_| output(Command::new(&venv_python).args(["-m", "pip", "install", "--quiet"]).args(&names)))
        .with_context(|| format!("cannot install {} from PyPI", names.join(", ")))?;
    Ok(venv_python)
}

/// How many loops of pyperformance benchmark `name` take about
/// CALIBRATION_SECONDS untraced (bench/pyperformance_loop.py measures it).
fn calibrate(python: &Path, bench_dir: &Path, name: &str) -> Result<u64> {
    let out = output(Command::new(python).arg(bench_dir.join("pyperformance_loop.py")).args([
        name,
        "--calibrate",
        &CALIBRATION_SECONDS.to_string(),
    ]))
    .with_context(|| format!("cannot calibrate pyperformance's {name}"))?;
    let loops = out.lines().find_map(|l| l.strip_prefix("loops ")?.trim().parse().ok());
    loops.with_context(|| format!("pyperformance_loop.py {name} --calibrate printed {out:?}"))
}

/// One of memtrace's attach points, as `memtrace --verbose` lists it.
pub struct AttachPoint {
    /// The BPF program: alloc_return (which comes with an entry probe at
    /// the same place), free_entry or new_reference.
    pub program: String,
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
    let attached = stderr.lines().find_map(attached_probes);
    let ours = probe_count(&points);
    match attached {
        Some(n) if n == ours => Ok(points),
        _ => bail!(
            "memtrace --verbose lists {ours} probes, but its `tracing pid` line says otherwise: {}",
            last_line(&stderr)
        ),
    }
}

/// How many probes memtrace's `tracing pid PID (comm), CPython X: N
/// probes; ...` line says it attached.
pub fn attached_probes(line: &str) -> Option<usize> {
    line.strip_prefix(Memtrace::TRACING)?.split(": ").nth(1)?.split_once(" probes")?.0.parse().ok()
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
    // An inlined site or a function found by address is labelled
    // `what@0xVADDR`; a function by symbol, by its name.
    let vaddr = match symbol.rsplit_once("@0x") {
        Some((_, hex)) => u64::from_str_radix(hex, 16).ok(),
        None => elf.symbol(symbol).map(|s| s.vaddr),
    };
    let file_offset =
        vaddr.and_then(|v| elf.file_offset(v)).with_context(|| format!("cannot find {symbol} in {binary}"))? + offset;
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
