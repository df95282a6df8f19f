//! The pymalloc census against running interpreters and the binaries on
//! this machine: pyenv's CPython 3.8 to 3.13 (with their symbols, and
//! stripped copies of their libpython, as distributions ship it) and
//! Debian's stripped LTO python3.11. A census must equal the interpreter's
//! own `sys.getallocatedblocks()`, and pymalloc's state must be found from
//! the machine code exactly where the symbols say it is. A missing
//! interpreter fails the test.

use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
};

use memtrace::{
    binary::elf::ElfFile,
    census::pymalloc::{
        Census, PymallocState,
        locate::{Code, debug_offsets_sizes_match, statics_from_code, statics_from_symbols, walker_code},
    },
    process::{
        memory::ProcessMemory,
        proc_maps::{MappedPaths, MemoryMap},
    },
    python::layouts::{self, ObmallocLocation},
};
use memtrace_tests::Target;

const PYENV: &str = "/root/.pyenv/versions";

fn libpython(version: &str) -> ElfFile {
    let minor = version.rsplit_once('.').unwrap().0;
    let path = format!("{PYENV}/{version}/lib/libpython{minor}.so.1.0");
    ElfFile::open(Path::new(&path)).unwrap_or_else(|e| panic!("CPython {version} is missing: {e}"))
}

/// Keeps 100,000 16-byte objects and 100 raw (1,000-byte) blocks, writes
/// its own count and waits on stdin. Raw `os` calls rather than
/// `sys.stdout`, whose text layer allocates and frees differently with
/// the hash seed.
const SCRIPT: &str = "import os, sys
small = [object() for _ in range(100_000)]
large = [bytes(1000) for _ in range(100)]
count = sys.getallocatedblocks()
os.write(1, b'%d\\n' % count)
os.read(0, 1)
";

/// Starts `python` on [`SCRIPT`] and returns it with the count it printed.
fn start(python: &str) -> (Target, u64) {
    assert!(Path::new(python).exists(), "{python} is missing");
    let mut target = Target::spawn(Command::new(python).args(["-S", "-c", SCRIPT]));
    // The count is the script's only line.
    let line = target.expect_line_prefix("");
    let count = line.trim().parse().unwrap_or_else(|_| panic!("{python} printed {line:?}"));
    target.wait_reading_stdin();
    (target, count)
}

/// pymalloc's state in the running `pid`: the first mapped binary named
/// like Python in which `locate` finds it, moved by that binary's bias;
/// with that binary (as reachable from here) and bias.
fn locate_in(pid: u32, version: (u8, u8)) -> (PymallocState, PathBuf, u64) {
    let map = MemoryMap::read(pid).unwrap();
    for path in map.executable_files().into_iter().filter(|p| p.contains("python")) {
        let binary = MappedPaths::of(pid).host_path(path);
        let elf = ElfFile::open(&binary).unwrap();
        let bias = map
            .mappings
            .iter()
            .filter(|m| m.path == path)
            .find_map(|m| Some(m.start.wrapping_sub(elf.vaddr_of_offset(m.file_offset)?)))
            .unwrap();
        if let Some(state) = PymallocState::locate(&elf, bias, version) {
            return (state, binary, bias);
        }
    }
    panic!("no pymalloc state found in {pid}");
}

/// The census equals the target's own `sys.getallocatedblocks()` plus
/// two blocks allocated after it counted and live while it waits: the
/// int `count` and the 1-byte bytes object os.read reads into (the
/// formatted line is freed after the write). The idle target allocates
/// nothing else. Returns the target, still waiting, and what was found.
fn census_matches(python: &str, version: (u8, u8)) -> (Target, Census, PathBuf, u64) {
    let (target, printed) = start(python);
    let (state, binary, bias) = locate_in(target.pid(), version);
    let census = state.census(&ProcessMemory::new(target.pid())).unwrap();
    eprintln!("{python}: {state:?} {census:?}, the target counted {printed}");
    assert_eq!(census.blocks + census.raw_blocks, printed + 2, "{python}: {census:?} against {printed}");
    assert!(census.blocks >= 100_000 && census.bytes >= 16 * census.blocks, "{census:?}");
    assert!((100..1_000).contains(&census.raw_blocks), "{census:?}");
    (target, census, binary, bias)
}

/// [`census_matches`] for a pyenv build, found by its symbols; then the
/// same census from a stripped copy of its libpython (.dynsym only, as
/// distributions ship it), found from the code.
fn pyenv_matches(version: &str) {
    let minor: u8 = version.split('.').nth(1).unwrap().parse().unwrap();
    let (target, census, binary, bias) = census_matches(&format!("{PYENV}/{version}/bin/python3.{minor}"), (3, minor));
    let stripped = std::env::temp_dir().join(format!("memtrace-pymalloc-{}-{version}.so", std::process::id()));
    let status = Command::new("strip").arg("--strip-all").arg("-o").arg(&stripped).arg(&binary).status();
    assert!(status.expect("strip (binutils) is missing").success());
    let elf = ElfFile::open(&stripped).unwrap();
    std::fs::remove_file(&stripped).unwrap();
    assert!(elf.symbol("_PyObject_Malloc").is_none(), "{version}: still has local symbols");
    let state = PymallocState::locate(&elf, bias, (3, minor)).expect("found from the code");
    assert_eq!(state.census(&ProcessMemory::new(target.pid())).unwrap(), census, "{version} stripped");
}

#[test]
fn debian_lto_python_3_11_by_decoding() {
    let elf = ElfFile::open(Path::new("/usr/bin/python3.11")).expect("Debian's python3.11 is missing");
    let counter = layouts::PY311.pymalloc.counter;
    assert!(statics_from_symbols(&elf, counter).is_none(), "stripped: the statics must come from the code");
    assert!(statics_from_code(&elf, 11).is_some());
    census_matches("/usr/bin/python3.11", (3, 11));
}

#[test]
fn pyenv_3_8() {
    pyenv_matches("3.8.18");
}

#[test]
fn pyenv_3_9() {
    pyenv_matches("3.9.18");
}

#[test]
fn pyenv_3_10() {
    pyenv_matches("3.10.13");
}

#[test]
fn pyenv_3_11() {
    pyenv_matches("3.11.7");
}

#[test]
fn pyenv_3_12() {
    pyenv_matches("3.12.1");
}

#[test]
fn pyenv_3_13() {
    pyenv_matches("3.13.0");
}

/// A target allocating and freeing arenas as fast as it can is counted
/// or refused as inconsistent, never anything else.
#[test]
fn a_busy_target_is_counted_or_refused() {
    let python = format!("{PYENV}/3.11.7/bin/python3.11");
    let churn = "import os\nkeep = []\nos.write(1, b'started\\n')\n\
                 while True:\n    keep.append([object() for _ in range(50_000)])\n    del keep[:-5]\n";
    assert!(Path::new(&python).exists(), "CPython 3.11.7 is missing");
    let mut target = Target::spawn(Command::new(&python).args(["-S", "-c", churn]));
    let pid = target.pid();
    target.expect_line("started");
    let (state, ..) = locate_in(pid, (3, 11));
    let memory = ProcessMemory::new(pid);
    let (mut counted, mut refused) = (0, 0);
    for _ in 0..200 {
        match state.census(&memory) {
            Ok(census) => {
                assert!(census.blocks > 0 && census.bytes >= 16 * census.blocks, "{census:?}");
                counted += 1;
            }
            Err(error) => {
                assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
                refused += 1;
            }
        }
    }
    eprintln!("busy target: {counted} censuses, {refused} refused");
    assert!(counted > 0);
}

/// The decoder finds in unstripped builds what their symbols say, so it
/// is right where only the code is left.
#[test]
fn code_agrees_with_symbols() {
    for (version, minor) in [("3.8.18", 8), ("3.9.18", 9), ("3.10.13", 10), ("3.11.7", 11)] {
        let elf = libpython(version);
        let pymalloc = layouts::layout_for(3, minor).unwrap().pymalloc;
        let symbols = statics_from_symbols(&elf, pymalloc.counter).unwrap();
        assert_eq!(statics_from_code(&elf, minor), Some(symbols), "{version}");
        let expected = pymalloc.pool_size;
        assert_eq!(walker_code(&elf, minor).unwrap().pool_size(), Some(expected), "{version}");
    }
}

/// The 3.12 offsets are those of the interpreter's own walk and of the
/// exported statistics dump that confirms them in stripped builds; the
/// 3.13 ones are those of its own walk.
#[test]
fn interpreter_offsets_are_the_codes() {
    let (py312, py313) = (libpython("3.12.1"), libpython("3.13.0"));
    let ObmallocLocation::InMainInterpreter { interp_obmalloc: obmalloc_312, mgmt, .. } = layouts::PY312.pymalloc.state
    else {
        panic!("3.12 keeps pymalloc in the main interpreter")
    };
    let ObmallocLocation::PointedByMainInterpreter { interp_obmalloc: obmalloc_313, runtime_size, interp_size, .. } =
        layouts::PY313.pymalloc.state
    else {
        panic!("3.13 points to pymalloc from the main interpreter")
    };
    for function in ["_PyInterpreterState_GetAllocatedBlocks", "_PyObject_DebugMallocStats"] {
        let code = Code::of(&py312, function).unwrap();
        let has =
            |address, width| code.loads.iter().any(|l| !l.rip_relative && l.address == address && l.width == width);
        assert!(has(obmalloc_312 + mgmt.arenas, 8) && has(obmalloc_312 + mgmt.maxarenas, 4));
    }
    // The statistics dumps: 3.12's rounds arena addresses to its 16 KiB
    // pools; 3.13's has no single pool mask, so a stripped 3.13 takes the
    // pool size from its layout.
    let dump_pool_size = |elf, function| Code::of(elf, function).unwrap().pool_size();
    assert_eq!(dump_pool_size(&py312, "_PyObject_DebugMallocStats"), Some(16384));
    assert_eq!(dump_pool_size(&py313, "_PyObject_DebugMallocStats"), None);
    let walk = Code::of(&py312, "_PyInterpreterState_GetAllocatedBlocks").unwrap();
    assert!(walk.loads.iter().any(|l| l.address == obmalloc_312 + mgmt.raw_allocated_blocks));
    assert_eq!(walk.pool_size(), Some(16384));

    assert!(debug_offsets_sizes_match(&py313, (3, 13), runtime_size, interp_size));
    assert!(!debug_offsets_sizes_match(&py313, (3, 12), runtime_size, interp_size));
    assert!(!debug_offsets_sizes_match(&py313, (3, 13), runtime_size + 8, interp_size));
    let walk = Code::of(&py313, "_PyInterpreterState_GetAllocatedBlocks").unwrap();
    let load = |address, width| walk.loads.iter().find(|l| !l.rip_relative && l.address == address && l.width == width);
    assert!(load(obmalloc_313, 8).is_some_and(|l| l.pointer));
    for (offset, width) in [(mgmt.arenas, 8), (mgmt.maxarenas, 4), (mgmt.raw_allocated_blocks, 8)] {
        assert!(load(offset, width).is_some(), "{offset:#x}");
    }
    // 3.12's confirmation does not pass for 3.13, nor 3.13's for 3.12.
    assert!(PymallocState::locate(&py313, 0, (3, 12)).is_none());
    assert!(PymallocState::locate(&py312, 0, (3, 13)).is_none());
}

#[test]
fn nothing_outside_python_or_its_versions() {
    let libc = ElfFile::open(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
    for minor in 8..=13 {
        assert!(PymallocState::locate(&libc, 0, (3, minor)).is_none());
    }
    let py311 = libpython("3.11.7");
    assert!(PymallocState::locate(&py311, 0, (3, 11)).is_some());
    assert!(PymallocState::locate(&py311, 0, (3, 7)).is_none());
    assert!(PymallocState::locate(&py311, 0, (3, 14)).is_none());
    assert!(PymallocState::locate(&py311, 0, (2, 7)).is_none());
}
