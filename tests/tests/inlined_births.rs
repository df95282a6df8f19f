//! Which object births memtrace probes, against the interpreters on this
//! machine: in every pyenv build, the calls of `_Py_NewReference` on
//! free-list paths (floats, lists) are probed and those that follow an
//! allocation (ints, strings) are not, and nothing takes the function's
//! address, so its entry is not probed; 3.8's inlined copies are sorted
//! the same way, and so are Debian's LTO python3.11's. A missing binary
//! fails the test.

use std::path::Path;

use memtrace::{
    binary::elf::ElfFile,
    probes::inlined::{self, births::Births},
    python::layouts,
};

fn births(path: &str, minor: u8) -> (ElfFile, Births) {
    let elf = ElfFile::open(Path::new(path)).unwrap_or_else(|e| panic!("{path}: {e:#}"));
    let births = inlined::find(&elf, layouts::layout_for(3, minor).unwrap()).births;
    (elf, births)
}

/// How many of `births`' probed sites lie in function `name`.
fn probed_in(elf: &ElfFile, births: &Births, name: &str) -> usize {
    let symbol = elf.symbol(name).unwrap_or_else(|| panic!("{name}"));
    births.probed.iter().filter(|s| (symbol.vaddr..symbol.vaddr + symbol.size).contains(&s.vaddr)).count()
}

/// (version, sites probed, sites proven fresh).
const PYENV: [(&str, usize, usize); 6] = [
    ("3.8.18", 23, 14),
    ("3.9.18", 30, 16),
    ("3.10.13", 23, 17),
    ("3.11.7", 28, 40),
    ("3.12.1", 31, 37),
    ("3.13.0", 31, 33),
];

#[test]
fn free_list_births_are_probed_and_fresh_ones_are_not() {
    for (version, probed, fresh) in PYENV {
        let minor: u8 = version.split('.').nth(1).unwrap().parse().unwrap();
        let path = format!("/root/.pyenv/versions/{version}/lib/libpython3.{minor}.so.1.0");
        let (elf, births) = births(&path, minor);
        eprintln!("{version}: {} probed, {} fresh", births.probed.len(), births.fresh);
        assert_eq!((births.probed.len(), births.fresh), (probed, fresh), "{version}");
        assert_eq!(births.function_probed, None, "{version}");
        for reused in ["PyFloat_FromDouble", "PyList_New"] {
            assert_eq!(probed_in(&elf, &births, reused), 1, "{version}: {reused}");
        }
        for allocated in ["PyUnicode_New", "_PyLong_New"] {
            assert_eq!(probed_in(&elf, &births, allocated), 0, "{version}: {allocated}");
        }
    }
}

/// Debian's LTO build: an object born from an inlined pop's block, from a
/// guard's call through `_PyObject.malloc`, or from libc's malloc is fresh
/// too, through the cold parts GCC split off and the spills around
/// tracemalloc's call.
#[test]
fn debian_python311_births_from_inlined_pops_are_fresh() {
    let (_, births) = births("/usr/bin/python3.11", 11);
    assert_eq!((births.probed.len(), births.fresh), (108, 113));
    assert_eq!(births.function_probed, None);
}
