//! The finder of the one probe point inside pymalloc's own functions
//! against the interpreters on this machine: in each pyenv build from 3.9
//! the `je` past the one pop in `_PyObject_Malloc` and in
//! `_PyObject_Calloc`, and in 3.8 the `je` testing what `pymalloc_alloc`
//! returned, at the addresses, with the registers, objdump shows; the
//! binaries without internal symbols are refused with the reason. Needs the
//! interpreters: their absence fails the test.

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
        .taken
        .iter()
        .map(|p| format!("{:x}:{}:{}", p.vaddr, p.block.name(), p.request.map_or("-", |r| r.name())))
        .collect();
    let new_pool = pops.new_pool.map_or("-".into(), |v| format!("{v:x}"));
    Ok(format!("{} new_pool={new_pool}", sites.join(" ")))
}

/// `vaddr:block:request` of the probe points in `_PyObject_Malloc` and
/// `_PyObject_Calloc`, and `allocate_from_new_pool`, as objdump shows them:
/// from 3.9 the `je` past `pool->freeblock = *bp` (`test %next,%next`),
/// where the pop's `mov 0x8(%pool),%block` loaded the block; in 3.8 the `je`
/// past `call pymalloc_alloc.constprop.0; test %rax,%rax`.
const POINTS: [(&str, &str); 6] = [
    // The request is copied to rbx (`mov %rsi,%rbx` beside `mov
    // %rsi,%rdi`), and computed into r12 for calloc (`imul %rdx,%r12`).
    ("3.8.18", "e21af:rax:rbx e21ec:rax:r12 new_pool=-"),
    ("3.9.18", "10464e:rax:rbx 10456d:rcx:rdx new_pool=1040e0"),
    ("3.10.13", "11435e:rax:rbx 1145ed:rcx:rdx new_pool=113eb0"),
    // The size class is computed from a copy of the request (rsi is reused
    // for the pool's nextpool), with an instruction between lea and shr.
    ("3.11.7", "1af85e:rax:rbx 1afaed:rcx:rdx new_pool=1af3b0"),
    ("3.12.1", "1cfe1d:rax:rbx 1cfcec:rcx:r13 new_pool=1cf7f0"),
    ("3.13.0", "16b6bb:rax:rbx 16b5cc:rcx:r12 new_pool=16b0e0"),
];

#[test]
fn finds_the_probe_point_in_each_pyenv_allocator() {
    for (version, pops) in POINTS {
        let minor: u8 = version.split('.').nth(1).unwrap().parse().unwrap();
        assert_eq!(found(&libpython(version), minor).as_deref(), Ok(pops), "{version}");
    }
}

#[test]
fn refuses_what_it_cannot_prove() {
    // Debian's libpython keeps only its exported symbols.
    assert_eq!(found("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", 11), Err("no symbol _PyObject_Malloc".into()));
}
