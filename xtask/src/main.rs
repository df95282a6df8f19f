//! memtrace's developer entry points, so that a fresh machine needs nothing
//! but `cargo`:
//!
//!   cargo xtask run [-- MEMTRACE ARGS]   set up, build, and trace a process
//!                                        (the bundled leaking example when
//!                                        no --pid is given)
//!   cargo xtask test                     set up, build, run every test
//!   cargo xtask setup                    only install the toolchain pieces
//!   cargo xtask bench [OPTIONS]          set up, build, and run the bench
//!                                        (bench/): memtrace against
//!                                        untraced, the kernel's floor and
//!                                        peers; writes BENCHMARKS.md
//!                                        (`cargo xtask bench --help`)
//!   cargo xtask fuzz [TARGET] [--seconds N]
//!                                        set up, build and run the fuzz
//!                                        targets (fuzz/), each for N
//!                                        seconds (default 60)
//!
//! Setup is idempotent and fast once done: the nightly toolchain's rust-src
//! (the eBPF crate builds `core` itself), bpf-linker built against the
//! nightly rustc's own libLLVM (no system LLVM here is new enough), and
//! for `test` and `fuzz` cargo-fuzz, installed under target/tools. `test`
//! runs every fuzz target for a few seconds before the tests.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds each fuzz target runs in `cargo xtask test`, and by default in
/// `cargo xtask fuzz`.
const FUZZ_SECONDS_IN_TEST: u64 = 5;
const FUZZ_SECONDS: u64 = 60;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((c, rest)) => (c.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match command {
        "setup" => setup().map(|_| ()),
        "build" => build().map(|_| ()),
        "run" => run(rest),
        "test" => test(rest),
        "bench" => bench(rest),
        "fuzz" => fuzz_command(rest),
        _ => {
            eprintln!("usage: cargo xtask <setup|build|run|test|bench|fuzz> [args]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn tools_dir() -> PathBuf {
    workspace_root().join("target/tools")
}

/// PATH with our tools first, for every cargo we start.
fn path_with_tools() -> OsString {
    let mut paths = vec![tools_dir().join("bin")];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).expect("PATH entries are valid")
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).env("PATH", path_with_tools());
    cmd
}

fn check(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs what the eBPF build needs, unless already there.
fn setup() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))
        .context("the nightly toolchain is needed to build the eBPF side (rustup toolchain install nightly)")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for nightly");
        check(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let linker = tools_dir().join("bin/bpf-linker");
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !works {
        install_bpf_linker()?;
    }
    Ok(())
}

/// Installs cargo-fuzz, which builds the fuzz targets, unless already there.
fn setup_fuzz() -> Result<()> {
    let cargo_fuzz = Command::new(tools_dir().join("bin/cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if !cargo_fuzz {
        eprintln!("xtask: building cargo-fuzz {CARGO_FUZZ_VERSION} (about two minutes, once)");
        check(
            Command::new("cargo")
                .args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION, "--root"])
                .arg(tools_dir()),
        )?;
    }
    Ok(())
}

/// bpf-linker must use the LLVM of the rustc that compiles the eBPF crate;
/// nightly ships its own libLLVM, so link against exactly that.
fn install_bpf_linker() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| {
            n.strip_prefix("lib")
                .and_then(|n| n.strip_suffix(".so"))
                .filter(|n| n.starts_with("LLVM-"))
                .map(str::to_owned)
        })
        .with_context(|| format!("no libLLVM-*.so in {}", lib_dir.display()))?;
    let major = llvm.trim_start_matches("LLVM-").split('-').next().unwrap_or_default().to_owned();
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's {llvm} (about a minute, once)");
    let rustflags = format!("-L {dir} -C link-arg=-l{llvm} -C link-arg=-Wl,-rpath,{dir}", dir = lib_dir.display());
    check(
        Command::new("cargo")
            .args(["+nightly", "install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION, "--root"])
            .arg(tools_dir())
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major},no-llvm-linking"))
            .env("RUSTFLAGS", rustflags),
    )
}

/// Builds memtrace (release) and returns the binary's path.
fn build() -> Result<PathBuf> {
    setup()?;
    check(cargo().args(["build", "--release", "--package", "memtrace"]))?;
    Ok(workspace_root().join("target/release/memtrace"))
}

/// The interpreter the bundled example runs on: pyenv's 3.12 when present.
fn example_python() -> PathBuf {
    let pyenv = PathBuf::from(env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".into()));
    let preferred = pyenv.join("versions/3.12.1/bin/python");
    if preferred.exists() { preferred } else { PathBuf::from("python3") }
}

fn run(args: &[String]) -> Result<()> {
    let memtrace = build()?;
    let args: Vec<String> = args.iter().filter(|a| *a != "--").cloned().collect();
    if args
        .iter()
        .any(|a| a == "--pid" || a == "-p" || a.starts_with("--pid=") || a == "--help" || a == "-h" || a == "--version")
    {
        return check(Command::new(&memtrace).args(&args));
    }
    let example = workspace_root().join("examples/waste_memory.py");
    let python = example_python();
    eprintln!("xtask: no --pid given: tracing the bundled example {} on {}", example.display(), python.display());
    let mut child = Command::new(&python).arg(&example).stdout(Stdio::null()).spawn()?;
    // Let the interpreter start before attaching: memtrace traces a
    // process that is already running.
    std::thread::sleep(Duration::from_millis(500));
    let mut cmd = Command::new(&memtrace);
    cmd.arg("--pid").arg(child.id().to_string());
    if !args.iter().any(|a| a.starts_with("--interval") || a == "-i") {
        cmd.args(["--interval", "2"]);
    }
    if !args.iter().any(|a| a.starts_with("--count") || a == "-c" || a.starts_with("--duration") || a == "-d") {
        cmd.args(["--count", "3"]);
    }
    let result = check(cmd.args(&args));
    stop(&mut child);
    result
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn test(args: &[String]) -> Result<()> {
    let memtrace = build()?;
    // The whole suite fuzzes too, first, so that cargo test's summary
    // closes the output.
    if args.is_empty() {
        fuzz(&fuzz_targets()?, FUZZ_SECONDS_IN_TEST)?;
    }
    // The workspace's default members: memtrace-ebpf only builds for the bpf
    // target (memtrace's build script builds it), never as a host test.
    check(cargo().args(["test", "--release"]).args(args).env("MEMTRACE_BIN", &memtrace))
}

/// The bench links memtrace's library, whose build needs the bpf-linker
/// setup installs: it is a crate of its own, run once memtrace is built.
fn bench(args: &[String]) -> Result<()> {
    let memtrace = build()?;
    check(
        cargo()
            .args(["run", "--release", "--package", "memtrace-bench", "--"])
            .args(args)
            .env("MEMTRACE_BIN", &memtrace),
    )
}

/// `cargo xtask fuzz [TARGET] [--seconds N]`.
fn fuzz_command(args: &[String]) -> Result<()> {
    let mut seconds = FUZZ_SECONDS;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().context("--seconds needs a number")?;
                seconds = value
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .with_context(|| format!("--seconds {value}: not a positive number"))?;
            }
            target => targets.push(target.to_owned()),
        }
    }
    let known = fuzz_targets()?;
    if let Some(unknown) = targets.iter().find(|t| !known.contains(t)) {
        bail!("no fuzz target {unknown}: the targets are {}", known.join(", "));
    }
    setup()?;
    fuzz(if targets.is_empty() { &known } else { &targets }, seconds)
}

/// The fuzz targets: the files of fuzz/fuzz_targets.
fn fuzz_targets() -> Result<Vec<String>> {
    let dir = workspace_root().join("fuzz/fuzz_targets");
    let mut targets: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".rs").map(str::to_owned))
        .collect();
    targets.sort();
    Ok(targets)
}

/// Builds every fuzz target (one build) and runs each of `targets` for
/// `seconds`, from its seeds (fuzz/seeds/TARGET) and the corpus earlier
/// runs grew (target/fuzz/corpus/TARGET). A crash, a leak of time (an
/// input taking seconds) or of memory fails, with the input saved under
/// target/fuzz/artifacts/TARGET.
///
/// Built as memtrace is released (optimised, without overflow checks,
/// which its dependencies do not all pass) and with no sanitizer: the
/// code fuzzed is safe Rust. The targets' own allocator refuses an
/// allocation of a size no reader should make.
fn fuzz(targets: &[String], seconds: u64) -> Result<()> {
    setup_fuzz()?;
    check(
        Command::new("cargo")
            .current_dir(workspace_root())
            .env("PATH", path_with_tools())
            .args(["+nightly", "fuzz", "build", "--fuzz-dir", "fuzz", "-O", "--sanitizer", "none"])
            .args(["--codegen-units", "16"]),
    )?;
    let root = workspace_root();
    let work = root.join("target/fuzz");
    for target in targets {
        let corpus = work.join("corpus").join(target);
        let artifacts = work.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let log = work.join(format!("{target}.log"));
        let mut cmd = Command::new(root.join("target/x86_64-unknown-linux-gnu/release").join(target));
        cmd.arg(format!("-max_total_time={seconds}"))
            .args(["-timeout=5", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(&corpus);
        let seeds = root.join("fuzz/seeds").join(target);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        let status = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .status()
            .with_context(|| format!("cannot start fuzz target {target}"))?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            bail!(
                "fuzz target {target} failed ({status}): the input is in {}, the log in {}",
                artifacts.display(),
                log.display()
            );
        }
        let runs = text.lines().find_map(|l| l.strip_prefix("stat::number_of_executed_units: ")).unwrap_or("?");
        let inputs = std::fs::read_dir(&corpus).map_or(0, |d| d.count());
        eprintln!("xtask: fuzz {target}: {runs} inputs in {seconds} s, no failure; corpus of {inputs}");
    }
    Ok(())
}
