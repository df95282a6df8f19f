//! memtrace's line-table decoders against the interpreters themselves:
//! every pyenv CPython from 3.8 to 3.13 and Debian's python3.11 compiles a
//! large sample of code (standard-library modules and synthetic sources
//! with long jumps, line gaps and column-less entries) and prints each code
//! object's table with the line of every instruction, from its own views
//! cross-checked against `PyCode_Addr2Line`; the decoders must agree on
//! each one.

use std::process::Command;

use memtrace::python::linetable::{
    LineTableFormat::{self, LineTable310, Lnotab, Locations},
    line_for_offset,
};

/// Prints its `major minor` version, then per code object
/// `firstlineno hex(line table) line,line,...` (one line per 2-byte code unit of
/// co_code, `-` for no line), then `END count`. The expected lines come from the
/// interpreter's own views (co_lines(), or dis.findlinestarts before 3.10) and are
/// cross-checked against its `PyCode_Addr2Line` through ctypes.
const SAMPLE_SCRIPT: &str = r#"
import ast, ctypes, dis, importlib.util, sys

MODULES = """json.decoder json.encoder argparse asyncio.base_events asyncio.tasks dataclasses
typing inspect email.message email._header_value_parser http.client tarfile zipfile pydoc
logging collections functools enum pathlib subprocess unittest.case unittest.mock
urllib.parse xml.etree.ElementTree difflib textwrap _pydecimal fractions statistics
configparser ast tokenize pickle calendar optparse doctest pdb""".split()

def synthetic():
    body = lambda n, s: "".join("        %s\n" % s for _ in range(n))
    src = [
        "def gaps(a):\n    b = a\n" + "\n" * 300 + "    c = b\n" + "\n" * 70000 + "    return c\n",
        "def back(xs):\n    for x in xs:\n        y = x\n" + "\n" * 200 + "        z = y\n    return f(\n"
        + "\n" * 300 + "        z)\n",
        "def long_line(v):\n    v = [" + ", ".join(["v"] * 300) + "]\n    return v\n",
        "def long_jump(c, v):\n    if c:\n" + body(150, "v = [v, v, v, v, v, v]")
        + "    else:\n" + body(150, "v = v + v * v")
        + "    while c:\n" + body(100, "c = c - 1") + "    return v\n",
        "lam = lambda q: [i * q for i in range(q) if i]\n",
        "comps = ({k: v for k, v in {}.items()}, {s for s in ()}, (g for g in ()))\n",
        "class K:\n    @staticmethod\n    def m(\n        a,\n        b=2,\n    ):\n        try:\n"
        "            with open(a) as f:\n                return f.read()\n        except OSError as e:\n"
        "            raise ValueError(a) from e\n        finally:\n            del b\n",
        "async def co(it):\n    async with it as a:\n        async for b in a:\n            await b\n"
        "    return [x async for x in it]\n",
        "def gen():\n    yield 1\n    yield from gen()\n",
    ]
    if sys.version_info >= (3, 10):
        src.append("def m(v):\n    match v:\n        case [1, *r]:\n            return r\n"
                   "        case {'k': k}:\n            return k\n        case _:\n            pass\n")
    return "".join(src)

def walk(code):
    yield code
    for c in code.co_consts:
        if isinstance(c, type(code)):
            yield from walk(c)

def sources():
    for name in MODULES:
        path = importlib.util.find_spec(name).origin
        with open(path, "rb") as f:
            yield f.read(), path
    yield synthetic(), "<synthetic>"
    # Column-less ASTs make 3.11+ emit its "no column" entries with real line deltas.
    tree = ast.parse(synthetic())
    for node in ast.walk(tree):
        if hasattr(node, "col_offset"):
            node.col_offset = node.end_col_offset = -1
    yield tree, "<synthetic without columns>"

addr2line = ctypes.pythonapi.PyCode_Addr2Line
addr2line.argtypes = (ctypes.py_object, ctypes.c_int)
addr2line.restype = ctypes.c_int

def expected(code):
    n = len(code.co_code)
    lines = [None] * (n // 2)
    if sys.version_info >= (3, 10):
        for start, end, line in code.co_lines():
            for off in range(start, end, 2):
                lines[off // 2] = line
    else:
        starts = dict(dis.findlinestarts(code))
        line = code.co_firstlineno
        for off in range(0, n, 2):
            line = starts.get(off, line)
            lines[off // 2] = line
    for off in range(0, n, 2):
        a = addr2line(code, off)
        if (None if a == -1 else a) != lines[off // 2]:
            sys.exit("line views disagree with PyCode_Addr2Line at %s:%d" % (code, off))
    return lines

print(*sys.version_info[:2])
count = 0
for src, path in sources():
    for code in walk(compile(src, path, "exec", dont_inherit=True)):
        table = code.co_lnotab if sys.version_info < (3, 10) else code.co_linetable
        lines = ",".join("-" if l is None else str(l) for l in expected(code))
        print(code.co_firstlineno, table.hex(), lines)
        count += 1
print("END", count)
"#;

fn unhex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex length");
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("bad hex")).collect()
}

fn check_interpreter(python: &str, format: LineTableFormat) {
    let output = Command::new(python).args(["-c", SAMPLE_SCRIPT]).output().unwrap_or_else(|e| {
        panic!("cannot run {python} ({e}); this interpreter is part of the supported platform and must be installed")
    });
    let stdout = String::from_utf8(output.stdout).expect("non-UTF-8 output");
    assert!(output.status.success(), "{python} failed: {}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    let mut rows = stdout.lines();
    let version: Vec<u8> = rows.next().unwrap().split(' ').map(|v| v.parse().unwrap()).collect();
    let table_format = memtrace::python::layouts::layout_for(version[0], version[1]).map(|l| l.line_table);
    assert_eq!(table_format, Some(format), "{python}");

    let (mut codes, mut offsets, mut lineless) = (0usize, 0usize, 0usize);
    let mut mismatches = Vec::new();
    for row in rows {
        if row.starts_with("END ") {
            break;
        }
        let [firstlineno, hex, lines] = row.split(' ').collect::<Vec<_>>()[..] else {
            panic!("{python}: bad row {row:?}");
        };
        let firstlineno: i32 = firstlineno.parse().unwrap();
        let table = unhex(hex);
        let lines: Vec<Option<i32>> = lines.split(',').map(|l| (l != "-").then(|| l.parse().unwrap())).collect();
        for (unit, &want) in lines.iter().enumerate() {
            let offset = u32::try_from(unit * 2).unwrap();
            let got = line_for_offset(format, firstlineno, &table, offset);
            if got != want && mismatches.len() < 10 {
                mismatches.push(format!("first={firstlineno} table={hex} offset={offset}: want {want:?}, got {got:?}"));
            }
            lineless += usize::from(want.is_none());
        }
        if format != Lnotab {
            let past_end = u32::try_from(lines.len() * 2).unwrap();
            assert_eq!(line_for_offset(format, firstlineno, &table, past_end), None, "{hex}");
        }
        codes += 1;
        offsets += lines.len();
    }
    let end = format!("END {codes}");
    assert_eq!(stdout.lines().last(), Some(end.as_str()), "{python}: lost rows");
    assert!(mismatches.is_empty(), "{python}:\n{}", mismatches.join("\n"));
    println!("{python}: {codes} code objects, {offsets} offsets, {lineless} without a line");
    assert!(codes > 2000 && offsets > 100_000, "{python}: sample too small");
    // Line-less spans exist from 3.10 on; make sure the sample exercises them.
    assert_eq!(lineless > 0, format != Lnotab, "{python}");
}

#[test]
fn matches_cpython_3_8() {
    check_interpreter("/root/.pyenv/versions/3.8.18/bin/python", Lnotab);
}

#[test]
fn matches_cpython_3_9() {
    check_interpreter("/root/.pyenv/versions/3.9.18/bin/python", Lnotab);
}

#[test]
fn matches_cpython_3_10() {
    check_interpreter("/root/.pyenv/versions/3.10.13/bin/python", LineTable310);
}

#[test]
fn matches_cpython_3_11() {
    check_interpreter("/root/.pyenv/versions/3.11.7/bin/python", Locations);
}

#[test]
fn matches_debian_cpython_3_11() {
    check_interpreter("/usr/bin/python3.11", Locations);
}

#[test]
fn matches_cpython_3_12() {
    check_interpreter("/root/.pyenv/versions/3.12.1/bin/python", Locations);
}

#[test]
fn matches_cpython_3_13() {
    check_interpreter("/root/.pyenv/versions/3.13.0/bin/python", Locations);
}
