//! memtrace's ELF reader against binutils' `nm` on real binaries: symbols
//! found where nm finds them, with nm's sizes, the local ones only .symtab
//! holds (the interpreter's internal allocator) included, and file offsets
//! that map back to the same addresses.

use std::{path::Path, process::Command};

use memtrace::binary::elf::{ElfFile, Symbol};

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
const LIBPYTHON_312: &str = "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0";

/// `name` as `nm -S` lists it from .symtab, or with `dynamic` from
/// .dynsym: (the symbol, its type letter). Versioned names answer to their
/// base name.
fn nm(path: &str, dynamic: bool, name: &str) -> Option<(Symbol, char)> {
    let mut cmd = Command::new("nm");
    cmd.arg("-S");
    if dynamic {
        cmd.arg("-D");
    }
    let out = cmd.arg(path).output().expect("nm (binutils) must be installed");
    assert!(out.status.success(), "nm {path}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
        let [vaddr, size, kind, symbol] = line.split_whitespace().collect::<Vec<_>>()[..] else { return None };
        (symbol.split('@').next() == Some(name)).then(|| {
            let hex = |field| u64::from_str_radix(field, 16).unwrap();
            (Symbol { vaddr: hex(vaddr), size: hex(size) }, kind.chars().next().unwrap())
        })
    })
}

#[test]
fn finds_libc_allocator_symbols_and_their_offsets() {
    let libc = ElfFile::open(Path::new(LIBC)).unwrap();
    let malloc = libc.symbol("malloc").expect("libc has malloc");
    assert_eq!(Some((malloc, 'T')), nm(LIBC, true, "malloc"));
    let offset = libc.file_offset(malloc.vaddr).unwrap();
    assert_eq!(libc.vaddr_of_offset(offset), Some(malloc.vaddr));
    assert_eq!(libc.symbol_bytes(malloc).unwrap().len() as u64, malloc.size);
}

#[test]
fn finds_local_symbols_only_symtab_has() {
    let lib = ElfFile::open(Path::new(LIBPYTHON_312)).unwrap();
    // The internal allocator is static: a local in .symtab, absent from .dynsym.
    let (internal, kind) = nm(LIBPYTHON_312, false, "_PyObject_Malloc").expect("pyenv builds keep .symtab");
    assert_eq!(kind, 't', "_PyObject_Malloc is a local function");
    assert_eq!(nm(LIBPYTHON_312, true, "_PyObject_Malloc"), None);
    assert_eq!(lib.symbol("_PyObject_Malloc"), Some(internal));
    // The exported one is in both tables, at one address.
    let (exported, _) = nm(LIBPYTHON_312, true, "PyObject_Malloc").unwrap();
    assert_eq!(nm(LIBPYTHON_312, false, "PyObject_Malloc").map(|(s, _)| s), Some(exported));
    assert_eq!(lib.symbol("PyObject_Malloc"), Some(exported));
}
