//! Checks memtrace's CPython layout tables against the interpreters
//! themselves: every offset against the DWARF of the pyenv builds (through
//! gdb), 3.13's `_Py_DebugOffsets` as stored in libpython against the 3.13
//! table, and each table at work in running interpreters (pyenv's, and
//! Debian's stripped python3.11, which has no DWARF to compare with), where
//! ctypes follows the same pointers as the BPF program and reads code, bytes
//! and str objects as userspace will. A missing gdb or interpreter fails the
//! test: a layout nobody checked is a layout that is wrong somewhere.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use memtrace::{
    binary::elf::ElfFile,
    python::{
        debug_offsets,
        layouts::{self, DictTable, EvalEntry, GcState, Layout, ObmallocLocation, layout_for},
    },
};

const PYENV: &str = "/root/.pyenv/versions";
/// Each supported minor version with the pyenv build whose DWARF the table was taken from.
const BUILDS: [(&str, u8); 6] =
    [("3.8.18", 8), ("3.9.18", 9), ("3.10.13", 10), ("3.11.7", 11), ("3.12.1", 12), ("3.13.0", 13)];

fn libpython(build: &str, minor: u8) -> PathBuf {
    let path = Path::new(PYENV).join(build).join(format!("lib/libpython3.{minor}.so.1.0"));
    assert!(
        path.is_file(),
        "{} is missing: install the pyenv builds (--enable-shared, with debug info)",
        path.display()
    );
    path
}

/// The value of a `#define NAME (1 << N)` in the pyenv build's object.h.
fn header_define(minor: u8, name: &str) -> u64 {
    let (build, _) = BUILDS.iter().find(|(_, m)| *m == minor).expect("a build of every minor");
    let path = Path::new(PYENV).join(build).join(format!("include/python3.{minor}/object.h"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let line = text
        .lines()
        .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
        .unwrap_or_else(|| panic!("{name} is not defined in {}", path.display()));
    let shift = line.split("<<").nth(1).and_then(|r| r.trim().trim_end_matches(')').trim().parse::<u32>().ok());
    1 << shift.unwrap_or_else(|| panic!("cannot read {line:?}"))
}

fn table(minor: u8) -> &'static Layout {
    layout_for(3, minor).unwrap_or_else(|| panic!("no table for 3.{minor}"))
}

/// Evaluates integer C expressions against a binary's DWARF, and returns
/// their values with the output of `ptype/o PyASCIIObject`.
fn gdb(binary: &Path, exprs: &[String]) -> (Vec<u64>, String) {
    let mut gdb = Command::new("gdb");
    gdb.args(["-batch", "-nx"]);
    for (i, expr) in exprs.iter().enumerate() {
        gdb.arg("-ex").arg(format!("printf \"{i} %ld\\n\", (long)({expr})"));
    }
    gdb.args(["-ex", "ptype/o PyASCIIObject"]);
    let output = gdb.arg(binary).output().expect("gdb must be installed to check the layouts against DWARF");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut values = vec![None; exprs.len()];
    for line in stdout.lines() {
        if let Some((i, value)) = line.split_once(' ')
            && let (Ok(i), Ok(value)) = (i.parse::<usize>(), value.parse::<u64>())
        {
            values[i] = Some(value);
        }
    }
    let errors = String::from_utf8_lossy(&output.stderr);
    let values = values
        .into_iter()
        .zip(exprs)
        .map(|(value, expr)| {
            value.unwrap_or_else(|| panic!("gdb could not evaluate `{expr}` in {}: {errors}", binary.display()))
        })
        .collect();
    (values, stdout)
}

fn offset(ty: &str, member: &str) -> String {
    format!("&(({ty} *)0)->{member}")
}

fn size(ty: &str, member: &str) -> String {
    format!("sizeof((({ty} *)0)->{member})")
}

/// (what, the table's value, the C expression DWARF answers it with), for
/// each number of the table: the members named as in that version's headers.
fn dwarf_checks(layout: &Layout) -> Vec<(String, u64, String)> {
    let minor = layout.version.1;
    let mut checks = Vec::new();
    let mut check = |what: &str, table: u64, expr: String| checks.push((what.to_owned(), table, expr));

    let tstate_chain = if minor <= 11 {
        vec![offset("_PyRuntimeState", "gilstate.tstate_current")]
    } else {
        vec![
            offset("_PyRuntimeState", "interpreters.main"),
            offset("PyInterpreterState", "ceval.gil"),
            offset("struct _gil_runtime_state", "last_holder"),
        ]
    };
    let frame_chain = match minor {
        ..=10 => vec![offset("PyThreadState", "frame")],
        11 | 12 => vec![offset("PyThreadState", "cframe"), offset("_PyCFrame", "current_frame")],
        _ => vec![offset("PyThreadState", "current_frame")],
    };
    for (name, steps, exprs) in [
        ("tstate_chain", &layout.tstate_chain[..], tstate_chain),
        ("frame_chain", &layout.frame_chain[..], frame_chain),
    ] {
        assert_eq!(steps.len(), exprs.len(), "3.{minor} {name}: number of steps");
        for (step, expr) in steps.iter().zip(exprs) {
            check(name, *step, expr);
        }
    }
    check("tstate_thread_id", layout.tstate_thread_id, offset("PyThreadState", "thread_id"));
    let threads_head = if minor <= 10 { "tstate_head" } else { "threads.head" };
    assert_eq!(layout.threads_chain.len(), 2, "3.{minor} threads_chain: number of steps");
    check("threads_chain", layout.threads_chain[0], offset("_PyRuntimeState", "interpreters.head"));
    check("threads_chain", layout.threads_chain[1], offset("PyInterpreterState", threads_head));
    check("tstate_next", layout.tstate_next, offset("PyThreadState", "next"));
    check("tstate_thread_id size (unsigned long)", 8, size("PyThreadState", "thread_id"));

    let (frame, code, previous, instr) = match minor {
        ..=10 => ("PyFrameObject", "f_code", "f_back", "f_lasti"),
        11 | 12 => ("_PyInterpreterFrame", "f_code", "previous", "prev_instr"),
        _ => ("_PyInterpreterFrame", "f_executable", "previous", "instr_ptr"),
    };
    check("frame_code", layout.frame_code, offset(frame, code));
    check("frame_previous", layout.frame_previous, offset(frame, previous));
    check("frame_instr", layout.frame_instr, offset(frame, instr));
    let instr_size = if layout.instr_kind.mask() == 0xffff_ffff { 4 } else { 8 };
    check("frame_instr size (instr_kind's mask)", instr_size, size(frame, instr));
    match layout.frame_owner_cstack {
        Some((owner, cstack)) => {
            check("frame_owner_cstack offset", owner, offset(frame, "owner"));
            check("frame_owner_cstack size", 1, size(frame, "owner"));
            check("frame_owner_cstack value", cstack.into(), "FRAME_OWNED_BY_CSTACK".into());
        }
        None => assert!(minor <= 11, "3.{minor} has shim frames"),
    }

    match (minor, layout.eval_entry) {
        (..=10, EvalEntry::EveryFrame) | (12.., EvalEntry::BeforeShim) => {}
        (11, EvalEntry::Flag(is_entry)) => check("eval_entry", is_entry, offset(frame, "is_entry")),
        (_, rule) => panic!("3.{minor} cannot use {rule:?}"),
    }
    check("code_filename", layout.code_filename, offset("PyCodeObject", "co_filename"));
    check("code_name", layout.code_name, offset("PyCodeObject", "co_name"));
    match layout.code_qualname {
        Some(qualname) => check("code_qualname", qualname, offset("PyCodeObject", "co_qualname")),
        None => assert!(minor <= 10, "3.{minor} has co_qualname"),
    }
    check("code_firstlineno", layout.code_firstlineno, offset("PyCodeObject", "co_firstlineno"));
    check("code_firstlineno size (int)", 4, size("PyCodeObject", "co_firstlineno"));
    let linetable = if minor <= 9 { "co_lnotab" } else { "co_linetable" };
    check("code_linetable", layout.code_linetable, offset("PyCodeObject", linetable));
    let bytecode = if minor <= 10 { "co_code" } else { "co_code_adaptive" };
    check("code_bytecode", layout.code_bytecode, offset("PyCodeObject", bytecode));

    match layout.code_firsttraceable {
        Some(first) => check("code_firsttraceable", first, offset("PyCodeObject", "_co_firsttraceable")),
        None => assert!(minor <= 10, "3.{minor} has _co_firsttraceable"),
    }
    check("type_flags", layout.type_flags, offset("PyTypeObject", "tp_flags"));
    check("gc_head_size", layout.gc_head_size, "sizeof(PyGC_Head)".into());
    // Flags are #defines, absent from DWARF: their values come from the
    // build's own object.h, and gdb just echoes them.
    let preheader = match minor {
        ..=10 => 0,
        11 => header_define(minor, "Py_TPFLAGS_MANAGED_DICT"),
        _ => header_define(minor, "Py_TPFLAGS_MANAGED_DICT") | header_define(minor, "Py_TPFLAGS_MANAGED_WEAKREF"),
    };
    check("preheader_flags", layout.preheader_flags, preheader.to_string());

    check("type_name", layout.type_name, offset("PyTypeObject", "tp_name"));
    check("type_basicsize", layout.type_basicsize, offset("PyTypeObject", "tp_basicsize"));
    check("type_dict", layout.type_dict, offset("PyTypeObject", "tp_dict"));
    let dict = &layout.dict;
    check("dict.keys", dict.keys, offset("PyDictObject", "ma_keys"));
    check("dict.nentries", dict.nentries, offset("PyDictKeysObject", "dk_nentries"));
    check("dict.indices", dict.indices, offset("PyDictKeysObject", "dk_indices"));
    match dict.table {
        DictTable::Sized(at) => check("dict.size", at, offset("PyDictKeysObject", "dk_size")),
        DictTable::Log2 { size, index_bytes, kind } => {
            check("dict.log2_size", size, offset("PyDictKeysObject", "dk_log2_size"));
            check("dict.log2_index_bytes", index_bytes, offset("PyDictKeysObject", "dk_log2_index_bytes"));
            check("dict.kind", kind, offset("PyDictKeysObject", "dk_kind"));
        }
    }
    check("interpreters_head", layout.interpreters_head, offset("_PyRuntimeState", "interpreters.head"));
    check("interp_next", layout.interp_next, offset("PyInterpreterState", "next"));
    let gc = &layout.gc;
    match gc.state {
        GcState::InRuntime(at) => check("gc", at, offset("_PyRuntimeState", "gc")),
        GcState::InInterpreter(at) => check("gc", at, offset("PyInterpreterState", "gc")),
    }
    check("gc.generations", gc.generations, offset("struct _gc_runtime_state", "generations"));
    check("gc.generation_size", gc.generation_size, "sizeof(struct gc_generation)".into());
    let count = "sizeof(((struct _gc_runtime_state *)0)->generations) / sizeof(struct gc_generation)";
    check("gc.generation_count", gc.generation_count, count.into());
    check(
        "gc.permanent_generation",
        gc.permanent_generation,
        offset("struct _gc_runtime_state", "permanent_generation"),
    );
    check("gc head of a generation", 0, offset("struct gc_generation", "head"));
    let pymalloc = &layout.pymalloc;
    let pool = &pymalloc.pool_header;
    check("pool_header.ref_count", pool.ref_count, offset("struct pool_header", "ref"));
    check("pool_header.freeblock", pool.freeblock, offset("struct pool_header", "freeblock"));
    check("pool_header.nextpool", pool.nextpool, offset("struct pool_header", "nextpool"));
    check("pool_header.arenaindex", pool.arenaindex, offset("struct pool_header", "arenaindex"));
    check("pool_header.szidx", pool.szidx, offset("struct pool_header", "szidx"));
    check("pool_header.nextoffset", pool.nextoffset, offset("struct pool_header", "nextoffset"));
    // POOL_OVERHEAD rounds the header up to ALIGNMENT.
    check("pool_header.size", pool.size, "(sizeof(struct pool_header) + 15) / 16 * 16".into());
    let arena = &pymalloc.arena_object;
    check("arena_object.address", arena.address, offset("struct arena_object", "address"));
    check("arena_object.pool_address", arena.pool_address, offset("struct arena_object", "pool_address"));
    check("arena_object.nfreepools", arena.nfreepools, offset("struct arena_object", "nfreepools"));
    check("arena_object.ntotalpools", arena.ntotalpools, offset("struct arena_object", "ntotalpools"));
    check("arena_object.size", arena.size, "sizeof(struct arena_object)".into());
    match pymalloc.state {
        ObmallocLocation::Statics => assert!(minor <= 11, "3.{minor} keeps pymalloc in the interpreter"),
        ObmallocLocation::InMainInterpreter { interpreters_main, interp_obmalloc, mgmt } => {
            check("interpreters_main", interpreters_main, offset("_PyRuntimeState", "interpreters.main"));
            check("interp_obmalloc", interp_obmalloc, offset("PyInterpreterState", "obmalloc"));
            check("mgmt.arenas", mgmt.arenas, offset("struct _obmalloc_state", "mgmt.arenas"));
            check("mgmt.maxarenas", mgmt.maxarenas, offset("struct _obmalloc_state", "mgmt.maxarenas"));
            let raw = offset("struct _obmalloc_state", "mgmt.raw_allocated_blocks");
            check("mgmt.raw_allocated_blocks", mgmt.raw_allocated_blocks, raw);
        }
        ObmallocLocation::PointedByMainInterpreter {
            main_interpreter,
            interp_obmalloc,
            runtime_size,
            interp_size,
            mgmt,
        } => {
            check("main_interpreter", main_interpreter, offset("_PyRuntimeState", "_main_interpreter"));
            check("interp_obmalloc", interp_obmalloc, offset("PyInterpreterState", "obmalloc"));
            check("runtime_size", runtime_size, "sizeof(_PyRuntimeState)".into());
            check("interp_size", interp_size, "sizeof(PyInterpreterState)".into());
            check("mgmt.arenas", mgmt.arenas, offset("struct _obmalloc_state", "mgmt.arenas"));
            check("mgmt.maxarenas", mgmt.maxarenas, offset("struct _obmalloc_state", "mgmt.maxarenas"));
            let raw = offset("struct _obmalloc_state", "mgmt.raw_allocated_blocks");
            check("mgmt.raw_allocated_blocks", mgmt.raw_allocated_blocks, raw);
        }
    }

    check("bytes_size", layout.bytes_size, offset("PyBytesObject", "ob_base.ob_size"));
    check("bytes_data", layout.bytes_data, offset("PyBytesObject", "ob_sval"));
    check("unicode_length", layout.unicode_length, offset("PyASCIIObject", "length"));
    check("unicode_state", layout.unicode_state, offset("PyASCIIObject", "state"));
    check("unicode_ascii_data", layout.unicode_ascii_data, "sizeof(PyASCIIObject)".into());
    check("unicode_compact_data", layout.unicode_compact_data, "sizeof(PyCompactUnicodeObject)".into());
    checks
}

/// The bitfields in `ptype/o` output: name -> (byte offset, first bit, width).
fn bitfields(ptype: &str) -> HashMap<String, (u64, u32, u32)> {
    let mut bits = HashMap::new();
    // A bitfield's line reads `/*     32: 2   |       4 */        unsigned int kind : 3;`.
    for line in ptype.lines() {
        let Some((position, declaration)) = line.trim_start().strip_prefix("/*").and_then(|line| line.split_once("*/"))
        else {
            continue;
        };
        let (Some((byte, bit)), Some((name, width))) = (
            position.split('|').next().and_then(|at| at.split_once(':')),
            declaration.trim().trim_end_matches(';').rsplit_once(':'),
        ) else {
            continue;
        };
        let name = name.split_whitespace().last().unwrap_or_default().to_owned();
        bits.insert(name, (byte.trim().parse().unwrap(), bit.trim().parse().unwrap(), width.trim().parse().unwrap()));
    }
    bits
}

#[test]
fn tables_match_dwarf() {
    let mut wrong = Vec::new();
    for (build, minor) in BUILDS {
        let library = libpython(build, minor);
        let layout = table(minor);
        assert_eq!(layout.version, (3, minor));
        let checks = dwarf_checks(layout);
        let exprs: Vec<String> = checks.iter().map(|(_, _, expr)| expr.clone()).collect();
        let (values, ptype) = gdb(&library, &exprs);
        for ((what, table, expr), dwarf) in checks.iter().zip(values) {
            if *table != dwarf {
                wrong.push(format!("{build} {what}: table {table}, DWARF {dwarf} (`{expr}`)"));
            }
        }

        let bits = bitfields(&ptype);
        let kind_width = layouts::UNICODE_KIND_MASK.count_ones();
        for (name, expected) in [
            ("kind", (layout.unicode_state, layouts::UNICODE_KIND_SHIFT, kind_width)),
            ("compact", (layout.unicode_state, layouts::UNICODE_COMPACT.trailing_zeros(), 1)),
            ("ascii", (layout.unicode_state, layouts::UNICODE_ASCII.trailing_zeros(), 1)),
        ] {
            if bits.get(name) != Some(&expected) {
                wrong.push(format!("{build} state.{name}: table {expected:?}, DWARF {:?}", bits.get(name)));
            }
        }
    }
    assert!(wrong.is_empty(), "layouts differ from DWARF:\n{}", wrong.join("\n"));
}

#[test]
fn debug_offsets_of_313_give_the_313_table() {
    let elf = ElfFile::open(&libpython("3.13.0", 13)).unwrap();
    let runtime = elf.symbol("_PyRuntime").expect("libpython3.13 has _PyRuntime");
    let bytes = elf.bytes_at(runtime.vaddr, debug_offsets::LEN as u64).expect("_PyRuntime starts initialised");
    assert_eq!(&bytes[..8], debug_offsets::COOKIE);
    assert_eq!(debug_offsets::parse(bytes).as_ref(), Ok(table(13)));
}

/// Run inside an interpreter with a table as arguments: follows the table's
/// pointers from `_PyRuntime` in the main thread and in a second one, and
/// compares what it finds with what the interpreter says through `sys`,
/// `id()` (an object's address) and libc's pthread_self.
const LIVE_CHECK: &str = r#"
import ctypes, sys, threading

args = dict(arg.split("=", 1) for arg in sys.argv[1:])
def one(key): return int(args[key])
def ints(key): return [int(value) for value in args[key].split(",") if value]

api = ctypes.pythonapi
api.PyThreadState_Get.restype = ctypes.c_void_p
libc = ctypes.CDLL(None)
libc.pthread_self.restype = ctypes.c_ulong
runtime = ctypes.addressof(ctypes.c_char.in_dll(api, "_PyRuntime"))
failures = []

def read(address, size=8):
    return int.from_bytes(ctypes.string_at(address, size), "little")

def follow(address, steps):
    for step in steps:
        address = read(address + step)
    return address

def check(what, got, expected):
    if got != expected:
        failures.append("%s: read %r, expected %r" % (what, got, expected))

def kernel_walk(frame):
    """(code address, instruction word) of each Python frame from `frame` outwards, as the BPF program walks them."""
    owner, frames = ints("owner"), []
    while frame and len(frames) < 200:
        if not owner or read(frame + owner[0], 1) != owner[1]:
            frames.append((read(frame + one("frame_code")), read(frame + one("frame_instr")) & one("instr_mask")))
        frame = read(frame + one("frame_previous"))
    return frames

def lasti_in_bytes(instr, code):
    kind = args["instr_kind"]
    if kind == "LastiBytes":
        return instr
    if kind == "LastiCodeUnits":
        return instr * 2
    return instr - (code + one("code_bytecode"))

def check_code(where, address, code):
    check(where + " co_filename", read(address + one("code_filename")), id(code.co_filename))
    check(where + " co_name", read(address + one("code_name")), id(code.co_name))
    if "code_qualname" in args:
        check(where + " co_qualname", read(address + one("code_qualname")), id(code.co_qualname))
    check(where + " co_firstlineno", read(address + one("code_firstlineno"), 4), code.co_firstlineno)
    linetable = code.co_lnotab if sys.version_info < (3, 10) else code.co_linetable
    check(where + " line table", read(address + one("code_linetable")), id(linetable))
    if sys.version_info < (3, 11):
        check(where + " co_code", read(address + one("code_bytecode")), id(code.co_code))

def inspect(thread):
    tstate = api.PyThreadState_Get()
    check(thread + " GIL holder", follow(runtime, ints("tstate_chain")), tstate)
    check(thread + " thread_id", read(tstate + one("tstate_thread_id")), libc.pthread_self())
    # Followed inline: a helper's own frame would be the innermost one.
    steps, innermost = ints("frame_chain"), tstate
    for step in steps:
        innermost = ctypes.c_uint64.from_address(innermost + step).value
    frames, expected, frame = kernel_walk(innermost), [], sys._getframe()
    while frame is not None:
        expected.append(frame)
        frame = frame.f_back
    check(thread + " frames", [code for code, _ in frames], [id(frame.f_code) for frame in expected])
    for (address, instr), frame in zip(frames, expected):
        where = "%s %s" % (thread, frame.f_code.co_name)
        check_code(where, address, frame.f_code)
        # Only callers stand still, at the call to the frame below them.
        if frame is not expected[0]:
            check(where + " instruction", lasti_in_bytes(instr, address), frame.f_lasti)

def nested(depth, thread):
    if depth:
        return nested(depth - 1, thread)
    inspect(thread)

nested(3, "main thread")
worker = threading.Thread(target=nested, args=(2, "second thread"))
worker.start()
worker.join()

data = bytes(range(7)) * 3
check("bytes size", read(id(data) + one("bytes_size")), len(data))
check("bytes data", ctypes.string_at(id(data) + one("bytes_data"), len(data)), data)
for text, kind, ascii, encoding in [
    ("memtrace" * 3, 1, True, "ascii"),
    ("d\xe9j\xe0 vu", 1, False, "latin-1"),
    ("\u20acuro", 2, False, "utf-16-le"),
    ("\U0001f600!", 4, False, "utf-32-le"),
]:
    state = read(id(text) + one("unicode_state"), 4)
    check(repr(text) + " kind", (state >> one("kind_shift")) & one("kind_mask"), kind)
    check(repr(text) + " compact", bool(state & one("compact_bit")), True)
    check(repr(text) + " ascii", bool(state & one("ascii_bit")), ascii)
    check(repr(text) + " length", read(id(text) + one("unicode_length")), len(text))
    start = one("unicode_ascii_data") if ascii else one("unicode_compact_data")
    check(repr(text) + " data", ctypes.string_at(id(text) + start, len(text) * kind), text.encode(encoding))

print("\n".join(failures) if failures else "ok")
sys.exit(1 if failures else 0)
"#;

/// What went wrong, if anything, when `python` follows `layout`.
fn live_check(python: &Path, layout: &Layout) -> Result<(), String> {
    assert!(python.is_file(), "{} is missing", python.display());
    let join = |steps: &[u64]| steps.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec![
        format!("tstate_chain={}", join(&layout.tstate_chain)),
        format!("tstate_thread_id={}", layout.tstate_thread_id),
        format!("frame_chain={}", join(&layout.frame_chain)),
        format!("frame_code={}", layout.frame_code),
        format!("frame_previous={}", layout.frame_previous),
        format!("frame_instr={}", layout.frame_instr),
        format!("instr_mask={}", layout.instr_kind.mask()),
        format!("instr_kind={:?}", layout.instr_kind),
        format!(
            "owner={}",
            layout.frame_owner_cstack.map(|(owner, cstack)| format!("{owner},{cstack}")).unwrap_or_default()
        ),
        format!("code_filename={}", layout.code_filename),
        format!("code_name={}", layout.code_name),
        format!("code_firstlineno={}", layout.code_firstlineno),
        format!("code_linetable={}", layout.code_linetable),
        format!("code_bytecode={}", layout.code_bytecode),
        format!("bytes_size={}", layout.bytes_size),
        format!("bytes_data={}", layout.bytes_data),
        format!("unicode_length={}", layout.unicode_length),
        format!("unicode_state={}", layout.unicode_state),
        format!("unicode_ascii_data={}", layout.unicode_ascii_data),
        format!("unicode_compact_data={}", layout.unicode_compact_data),
        format!("kind_shift={}", layouts::UNICODE_KIND_SHIFT),
        format!("kind_mask={}", layouts::UNICODE_KIND_MASK),
        format!("compact_bit={}", layouts::UNICODE_COMPACT),
        format!("ascii_bit={}", layouts::UNICODE_ASCII),
    ];
    if let Some(qualname) = layout.code_qualname {
        args.push(format!("code_qualname={qualname}"));
    }
    let output = Command::new(python)
        .args(["-I", "-c", LIVE_CHECK])
        .args(&args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && stdout.trim() == "ok" {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(format!("{} with the 3.{} table:\n{stdout}{stderr}", python.display(), layout.version.1))
}

#[test]
fn tables_work_in_running_interpreters() {
    let failures: Vec<String> = BUILDS
        .into_iter()
        .filter_map(|(build, minor)| live_check(&Path::new(PYENV).join(build).join("bin/python"), table(minor)).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Debian's 3.11.2 is built with LTO and stripped: no DWARF says it matches
/// the 3.11.7 it is given the table of, so this shows it does.
#[test]
fn debian_python311_uses_the_311_table() {
    if let Err(failure) = live_check(Path::new("/usr/bin/python3.11"), table(11)) {
        panic!("{failure}");
    }
}
