//! The finder of `_Py_NewReference`'s inlined copies on real interpreters:
//! Debian's LTO python3.11, which inlines it into its free-list paths,
//! pyenv's 3.8, whose header makes it `static inline`, and 3.12 and 3.13,
//! where it is a function only.

use std::path::Path;

use memtrace::{
    binary::elf::ElfFile,
    probes::inlined::{self, new_reference::InlinedNewReferences},
};

/// rbx's hardware number, as a site names the register holding the object.
const RBX: u8 = 3;

fn found(path: &str) -> InlinedNewReferences {
    let elf = ElfFile::open(Path::new(path)).unwrap_or_else(|e| panic!("{path}: {e:#}"));
    inlined::find(&elf).new_references
}

/// Debian's LTO python3.11 refers to `tracing` 286 times; the copies on
/// its free-list paths (e.g. PyType_GetModuleState's neighbour at
/// 0x428eb9, `movq $1,(%rbx)`) are among the sites, and the function's
/// own store is not.
#[test]
fn finds_inlined_copies_in_debian_python311() {
    let found = found("/usr/bin/python3.11");
    assert_eq!(found.tracing_references, 286);
    assert!(found.sites.len() >= 200, "{} sites", found.sites.len());
    assert!(found.sites.iter().any(|s| s.vaddr == 0x428eb9 && s.object.number() == RBX), "{found:?}");
    let function = 0x4fb8a0..0x4fb8e0;
    assert!(!found.sites.iter().any(|s| function.contains(&s.vaddr)), "_Py_NewReference itself is probed");
}

/// 3.8's header inlines it everywhere; 3.12 and 3.13 have no copies.
#[test]
fn static_inline_in_3_8_and_none_from_3_12() {
    let root = std::env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".into());
    let libpython = |v: &str, minor: &str| format!("{root}/versions/{v}/lib/libpython{minor}.so.1.0");
    let in_3_8 = found(&libpython("3.8.18", "3.8"));
    assert!(in_3_8.sites.len() > 30, "{in_3_8:?}");
    for (v, minor) in [("3.12.1", "3.12"), ("3.13.0", "3.13")] {
        assert_eq!(found(&libpython(v, minor)), InlinedNewReferences::default(), "{v}");
    }
}
