//! The finder of pymalloc's pops inside its own functions against the
//! interpreters on this machine: in each pyenv build from 3.9 one pop in
//! `_PyObject_Malloc` and one in `_PyObject_Calloc`, at the addresses,
//! with the registers, objdump shows; 3.8, which has no
//! `allocate_from_new_pool`, and the binaries without internal symbols
//! are refused with the reason. Needs the interpreters: their absence
//! fails the test.

use std::path::Path;

use memtrace::{
    binary::{elf::ElfFile, x86::Text},
    probes::inlined::pymalloc_functions::find,
    python::layouts,
};

fn libpython(version: &str) -> String {
    let minor = &version[..version.rfind('.').unwrap()];
    format!("/root/.pyenv/versions/{version}/lib/libpython{minor}.so.1.0")
}

fn found(path: &str, minor: u8) -> Result<String, String> {
    let elf = ElfFile::open(Path::new(path)).unwrap_or_else(|e| panic!("{path}: {e:#}"));
    let pops = find(&elf, &Text::decode(&elf).unwrap(), layouts::layout_for(3, minor).unwrap())?;
    let sites: Vec<String> = pops
        .pops
        .iter()
        .map(|p| format!("{:x}:{}:{}", p.vaddr, p.pool.name(), p.request.map_or("-", |r| r.name())))
        .collect();
    Ok(format!("{} new_pool={:x}", sites.join(" "), pops.new_pool))
}

/// `vaddr:pool:request` of the pops in `_PyObject_Malloc` and
/// `_PyObject_Calloc`, and `allocate_from_new_pool`, as objdump shows them.
const POPS: [(&str, &str); 5] = [
    ("3.9.18", "104641:rdx:rbx 104560:rax:rdx new_pool=1040e0"),
    ("3.10.13", "114351:rdx:rbx 1145e0:rax:rdx new_pool=113eb0"),
    // The size class is computed from a copy of the request (rsi is reused
    // for the pool's nextpool), with an instruction between lea and shr.
    ("3.11.7", "1af851:rdx:rbx 1afae0:rax:rdx new_pool=1af3b0"),
    ("3.12.1", "1cfe10:rdx:rbx 1cfcdf:rax:r13 new_pool=1cf7f0"),
    ("3.13.0", "16b6ae:rdx:rbx 16b5bf:rax:r12 new_pool=16b0e0"),
];

#[test]
fn finds_the_pop_in_each_pyenv_allocator_from_3_9() {
    for (version, pops) in POPS {
        let minor: u8 = version.split('.').nth(1).unwrap().parse().unwrap();
        assert_eq!(found(&libpython(version), minor).as_deref(), Ok(pops), "{version}");
    }
}

#[test]
fn refuses_what_it_cannot_prove() {
    assert_eq!(
        found(&libpython("3.8.18"), 8),
        Err("no symbol allocate_from_new_pool (before 3.9 pymalloc hands out a new pool's first block inline, where no pop shows it)".into())
    );
    // Debian's libpython keeps only its exported symbols.
    assert_eq!(found("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", 11), Err("no symbol _PyObject_Malloc".into()));
}
