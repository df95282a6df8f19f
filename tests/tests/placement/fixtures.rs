//! Functions of the binaries memtrace's platform ships (Debian 12's glibc
//! and python3.11, pyenv's CPython builds), each with its first bytes and
//! the placement it gets: `placement.rs` places the embedded bytes, and
//! checks that the files still hold them and that objdump agrees.

use memtrace::{
    binary::x86::Reg,
    probes::placement::{Placement, at_entry, entry_only},
};

/// Bytes written as hex pairs separated by white space.
pub fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
}

/// A binary of the platform and some of its functions, with the placement
/// each gets, checked by hand against `objdump -d`. `cases` reads like a
/// listing: a line `symbol pointer +offset emulated|stepped instruction`,
/// where pointer is the register a free-like function's entry-only probe
/// reads, or `-` for an allocator, which also carries a return probe; then
/// the function's first bytes: 64 (the scan window) for free-like
/// functions, 16 for allocators, fewer if the function is shorter.
pub struct Binary {
    pub path: &'static str,
    cases: &'static str,
}

pub struct Case {
    pub symbol: &'static str,
    /// The pointer a free-like function's probe reads.
    pub reads: Option<Reg>,
    offset: u64,
    emulated: bool,
    instruction: String,
    /// The function's first bytes, as embedded.
    pub code: Vec<u8>,
}

impl Binary {
    pub fn cases(&self) -> Vec<Case> {
        let mut cases: Vec<Case> = Vec::new();
        for line in self.cases.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut words = line.split_whitespace();
            let symbol = words.next().unwrap();
            if symbol.len() == 2 && u8::from_str_radix(symbol, 16).is_ok() {
                cases.last_mut().unwrap().code.extend(hex(line));
                continue;
            }
            let reads = match words.next() {
                Some("rdi") => Some(Reg::Rdi),
                Some("rsi") => Some(Reg::Rsi),
                _ => None,
            };
            let offset = u64::from_str_radix(words.next().unwrap().trim_start_matches("+0x"), 16).unwrap();
            let emulated = words.next() == Some("emulated");
            let instruction = words.collect::<Vec<_>>().join(" ");
            cases.push(Case { symbol, reads, offset, emulated, instruction, code: Vec::new() });
        }
        cases
    }
}

impl Case {
    /// The placement `code`, this function's bytes, gets.
    pub fn place(&self, code: &[u8]) -> Placement {
        match self.reads {
            Some(reg) => entry_only(code, &[reg], Some(reg)),
            None => at_entry(code),
        }
    }

    /// Panics unless `placement` is the one expected.
    pub fn check(&self, path: &str, placement: &Placement) {
        let got = (placement.offset, placement.instruction.as_str(), placement.emulated);
        let want = (self.offset, self.instruction.as_str(), self.emulated);
        assert_eq!(got, want, "{path} {}: {}", self.symbol, placement.reason);
    }
}

/// glibc 2.36-9+deb12u14 (Debian 12).
pub const GLIBC: Binary = Binary {
    path: "/lib/x86_64-linux-gnu/libc.so.6",
    cases: "
        free               rdi +0x9   emulated push %rbp
            48 85 ff 0f 84 bf 00 00 00 55 48 8d 77 f0 53 48 83 ec 18 48 8b 1d d6 9e 13 00 48 8b 47 f8 64 8b
            2b a8 02 75 5b 48 8b 15 5c 9e 13 00 64 48 83 3a 00 0f 84 99 00 00 00 48 8d 3d 32 ad 13 00 a8 04
        munmap             rdi +0x0   stepped  mov $0xb,%eax
            b8 0b 00 00 00 0f 05 48 3d 01 f0 ff ff 73 01 c3 48 8b 0d c9 13 0d 00 f7 d8 64 89 01 48 83 c8 ff
            c3
        malloc             -   +0x0   emulated push %r12
            41 54 55 53 48 89 fb 48 83 ec 10 80 3d 46 1b 14
        calloc             -   +0x0   emulated push %r13
            41 55 48 89 f8 41 54 55 53 48 83 ec 18 48 f7 e6
        realloc            -   +0x0   emulated push %r15
            41 57 41 56 41 55 41 54 55 48 89 f5 53 48 89 fb
        posix_memalign     -   +0x0   stepped  cmpb $0x0,0x140201(%rip)
            80 3d 01 02 14 00 00 41 54 49 89 d4 55 48 89 fd
        memalign           -   +0x0   stepped  cmpb $0x0,0x140e71(%rip)
            80 3d 71 0e 14 00 00 74 07 e9 32 f6 ff ff 66 90
        valloc             -   +0x0   stepped  cmpb $0x0,0x140e31(%rip)
            80 3d 31 0e 14 00 00 53 48 89 fb 74 1b 48 8b 05
        pvalloc            -   +0x0   stepped  cmpb $0x0,0x140e01(%rip)
            80 3d 01 0e 14 00 00 53 48 89 fb 74 2b 48 8b 05
        reallocarray       -   +0x0   stepped  mov %rsi,%rax
            48 89 f0 48 f7 e2 48 89 c6 70 05 e9 40 b8 f8 ff
        mmap               -   +0x0   stepped  mov %ecx,%r10d
            41 89 ca 41 f7 c1 ff 0f 00 00 75 14 b8 09 00 00",
};

/// pyenv's CPython 3.8.18, built with --enable-shared: internal symbols in .symtab.
pub const PYENV_3_8_18: Binary = Binary {
    path: "/root/.pyenv/versions/3.8.18/lib/libpython3.8.so.1.0",
    cases: "
        _PyObject_Free     rsi +0x26  emulated jae <+0x4c>
            48 85 f6 0f 84 cf 01 00 00 48 89 f0 48 83 2d cc 7f 27 00 01 48 89 f7 48 25 00 f0 ff ff 8b 50 20
            3b 15 f2 81 27 00 73 24 48 8b 0d f1 81 27 00 48 8d 14 52 48 c1 e2 04 48 8b 14 11 48 29 d6 48 81
        PyObject_Free      rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d 56 0c 25 00 ff 25 70 0c 25 00
        PyMem_Free         rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d 16 0e 25 00 ff 25 30 0e 25 00
        PyMem_RawFree      rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d 46 11 25 00 ff 25 60 11 25 00
        _PyMem_RawFree     rsi +0x3   emulated jmp <-0x74d38>
            48 89 f7 e9 c0 b2 f8 ff
        _PyObject_Malloc   -   +0x0   emulated push %rbx
            53 48 89 f7 48 89 f3 e8 d4 fa ff ff 48 85 c0 74
        _PyObject_Realloc  -   +0x0   emulated push %r14
            41 56 41 55 41 54 55 48 89 d5 53 48 85 f6 0f 84
        _PyObject_Calloc   -   +0x0   emulated push %r12
            41 54 49 89 f4 4c 0f af e2 55 48 89 d5 53 48 89",
};

/// pyenv's CPython 3.9.18, built with --enable-shared: internal symbols in .symtab.
pub const PYENV_3_9_18: Binary = Binary {
    path: "/root/.pyenv/versions/3.9.18/lib/libpython3.9.so.1.0",
    cases: "
        _PyObject_Free     rsi +0xc   emulated push %rbx
            48 85 f6 0f 84 2f 01 00 00 48 89 f0 53 48 89 f7 48 25 00 f0 ff ff 8b 50 20 3b 15 69 fd 28 00 73
            27 48 8b 35 68 fd 28 00 48 8d 14 52 48 89 f9 48 c1 e2 04 48 8b 14 16 48 29 d1 48 81 f9 ff ff 03
        PyObject_Free      rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d 76 78 26 00 ff 25 90 78 26 00
        PyMem_Free         rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d 36 7a 26 00 ff 25 50 7a 26 00
        PyMem_RawFree      rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d 76 7d 26 00 ff 25 90 7d 26 00
        _PyMem_RawFree     rsi +0x3   emulated jmp <-0x9c008>
            48 89 f7 e9 f0 3f f6 ff
        _PyObject_Malloc   -   +0x0   stepped  lea -0x1(%rsi),%rax
            48 8d 46 ff 53 48 89 f3 48 3d ff 01 00 00 77 60
        _PyObject_Realloc  -   +0x0   emulated push %r13
            41 55 41 54 49 89 fc 55 53 48 89 f3 48 89 d6 48
        _PyObject_Calloc   -   +0x0   emulated push %rbp
            55 48 89 d5 48 89 f2 48 0f af d5 53 48 89 f3 48",
};

/// pyenv's CPython 3.10.13, built with --enable-shared: internal symbols in .symtab.
pub const PYENV_3_10_13: Binary = Binary {
    path: "/root/.pyenv/versions/3.10.13/lib/libpython3.10.so.1.0",
    cases: "
        _PyObject_Free     rsi +0xf   emulated push %rbx
            48 85 f6 74 7b 48 89 f2 48 8d 0d f1 57 29 00 53 48 89 f0 48 c1 ea 26 48 25 00 c0 ff ff 81 e2 ff
            03 00 00 48 8b 0c d1 48 85 c9 74 66 48 89 f2 48 c1 ea 1c 81 e2 ff 03 00 00 48 8b 0c d1 48 85 c9
        PyObject_Free      rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d 06 83 27 00 ff 25 20 83 27 00
        PyMem_Free         rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d c6 84 27 00 ff 25 e0 84 27 00
        PyMem_RawFree      rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d 26 88 27 00 ff 25 40 88 27 00
        _PyMem_RawFree     rsi +0x3   emulated jmp <-0xacc88>
            48 89 f7 e9 70 33 f5 ff
        _PyObject_Malloc   -   +0x0   stepped  lea -0x1(%rsi),%rax
            48 8d 46 ff 53 48 89 f3 48 3d ff 01 00 00 77 60
        _PyObject_Realloc  -   +0x0   emulated push %r13
            41 55 41 54 49 89 fc 55 53 48 89 f3 48 89 d6 48
        _PyObject_Calloc   -   +0x0   emulated push %rbp
            55 48 89 d5 48 89 f2 48 0f af d5 53 48 89 f3 48",
};

/// pyenv's CPython 3.11.7, built with --enable-shared: internal symbols in .symtab.
pub const PYENV_3_11_7: Binary = Binary {
    path: "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0",
    cases: "
        _PyObject_Free     rsi +0xf   emulated push %rbx
            48 85 f6 74 7b 48 89 f1 48 8d 15 31 8a 3c 00 53 48 89 f0 48 c1 e9 31 48 25 00 c0 ff ff 48 8b 0c
            ca 48 85 c9 74 6c 48 89 f2 48 c1 ea 22 81 e2 ff 7f 00 00 48 8b 0c d1 48 85 c9 74 56 48 89 f2 89
        PyObject_Free      rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d e6 cf 2a 00 ff 25 00 d0 2a 00
        PyMem_Free         rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d a6 d1 2a 00 ff 25 c0 d1 2a 00
        PyMem_RawFree      rdi +0x0   stepped  mov %rdi,%rsi
            48 89 fe 48 8b 3d 06 d5 2a 00 ff 25 20 d5 2a 00
        _PyMem_RawFree     rsi +0x3   emulated jmp <-0xb20c0>
            48 89 f7 e9 38 df f4 ff
        _PyObject_Malloc   -   +0x0   stepped  lea -0x1(%rsi),%rax
            48 8d 46 ff 53 48 89 f3 48 3d ff 01 00 00 77 60
        _PyObject_Realloc  -   +0x0   emulated push %r13
            41 55 41 54 49 89 fc 55 53 48 89 f3 48 89 d6 48
        _PyObject_Calloc   -   +0x0   emulated push %rbp
            55 48 89 d5 48 89 f2 48 0f af d5 53 48 89 f3 48",
};

/// pyenv's CPython 3.12.1, built with --enable-shared: internal symbols in .symtab.
pub const PYENV_3_12_1: Binary = Binary {
    path: "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0",
    cases: "
        _PyObject_Free     rsi +0x9   emulated push %r12
            48 85 f6 0f 84 b7 00 00 00 41 54 55 53 48 89 f3 66 48 8d 3d 58 4f 37 00 66 66 48 e8 40 96 f3 ff
            4c 8b 25 59 4d 37 00 48 8b 00 48 8b 68 10 49 3b 6c 24 30 74 0d f6 85 b0 06 00 00 20 0f 85 a6 00
        PyObject_Free      rdi +0x0   stepped  mov 0x374819(%rip),%rax
            48 8b 05 19 48 37 00 48 89 fe 48 8b b8 b0 00 00 00 ff a0 d0 00 00 00
        PyMem_Free         rdi +0x0   stepped  mov 0x3749c9(%rip),%rax
            48 8b 05 c9 49 37 00 48 89 fe 48 8b b8 88 00 00 00 ff a0 a8 00 00 00
        PyMem_RawFree      rdi +0x0   stepped  mov 0x374d99(%rip),%rax
            48 8b 05 99 4d 37 00 48 89 fe 48 8b 78 60 ff a0 80 00 00 00
        _PyMem_RawFree     rsi +0x3   emulated jmp <-0xc06f8>
            48 89 f7 e9 00 f9 f3 ff
        _PyObject_Malloc   -   +0x0   emulated push %rbp
            55 53 48 89 f3 48 83 ec 08 66 48 8d 3d 2f 41 37
        _PyObject_Realloc  -   +0x0   emulated push %r15
            41 57 49 89 d7 41 56 41 55 41 54 49 89 fc 55 53
        _PyObject_Calloc   -   +0x0   emulated push %r13
            41 55 49 89 f5 41 54 4c 0f af ea 49 89 d4 55 48",
};

/// pyenv's CPython 3.13.0, built with --enable-shared: internal symbols in .symtab.
pub const PYENV_3_13_0: Binary = Binary {
    path: "/root/.pyenv/versions/3.13.0/lib/libpython3.13.so.1.0",
    cases: "
        _PyObject_Free     rsi +0x9   emulated push %rbp
            48 85 f6 0f 84 9f 00 00 00 55 53 48 89 f3 48 83 ec 08 66 48 8d 3d 96 0e 38 00 66 66 48 e8 fe e2
            f1 ff 48 89 da 48 c1 ea 31 48 8b 00 48 8b 40 10 48 8b a8 30 2a 00 00 48 89 d8 48 25 00 c0 ff ff
        PyObject_Free      rdi +0x0   stepped  mov 0x380679(%rip),%rax
            48 8b 05 79 06 38 00 48 89 fe 48 8b b8 10 03 00 00 ff a0 30 03 00 00
        PyMem_Free         rdi +0x0   stepped  mov 0x380929(%rip),%rax
            48 8b 05 29 09 38 00 48 89 fe 48 8b b8 e8 02 00 00 ff a0 08 03 00 00
        PyMem_RawFree      rdi +0x0   stepped  mov 0x380cb9(%rip),%rax
            48 8b 05 b9 0c 38 00 48 89 fe 48 8b b8 c0 02 00 00 ff a0 e0 02 00 00
        _PyMem_RawFree     rsi +0x3   emulated jmp <-0xc6038>
            48 89 f7 e9 c0 9f f3 ff
        _PyObject_Malloc   -   +0x0   emulated push %rbp
            55 53 48 89 f3 48 83 ec 08 66 48 8d 3d 4f f8 37
        _PyObject_Realloc  -   +0x0   emulated push %r15
            41 57 49 89 ff 41 56 49 89 d6 41 55 41 54 55 53
        _PyObject_Calloc   -   +0x0   emulated push %r13
            41 55 41 54 49 89 f4 55 4c 0f af e2 48 89 d5 53",
};

/// Debian's CPython 3.11.2-6+deb12u6 executable: stripped, exported symbols only.
pub const DEBIAN_PYTHON: Binary = Binary {
    path: "/usr/bin/python3.11",
    cases: "
        PyObject_Free      rdi +0x14  emulated jne <+0x1ce>
            48 8b 05 09 96 45 00 48 8b 15 e2 95 45 00 48 3d e0 0f 50 00 0f 85 b4 01 00 00 48 85 ff 0f 84 aa
            01 00 00 48 89 f8 48 89 fe 53 48 c1 e8 31 48 81 e6 00 c0 ff ff 48 8b 14 c5 00 46 a8 00 48 85 d2
        PyMem_Free         rdi +0x14  emulated jne <+0x1ce>
            48 8b 05 29 36 45 00 48 8b 15 02 36 45 00 48 3d e0 0f 50 00 0f 85 b4 01 00 00 48 85 ff 0f 84 aa
            01 00 00 48 89 f8 48 89 fe 53 48 c1 e8 31 48 81 e6 00 c0 ff ff 48 8b 14 c5 00 46 a8 00 48 85 d2
        PyMem_RawFree      rdi +0x14  emulated jne <+0x1b>
            48 8b 05 f9 2a 46 00 48 8b 15 d2 2a 46 00 48 3d b0 75 4f 00 75 05 e9 05 85 f2 ff 48 89 fe 48 89
            d7 ff e0
        PyObject_Malloc    -   +0x0   emulated push %rbx
            53 48 85 ff 0f 88 65 ad f2 ff 48 8b 05 e7 eb 45
        PyObject_Calloc    -   +0x0   stepped  test %rsi,%rsi
            48 85 f6 74 18 48 b8 ff ff ff ff ff ff ff 7f 31
        PyObject_Realloc   -   +0x0   emulated push %r13
            41 55 41 54 55 53 41 52 48 85 f6 0f 88 6b 35 ee
        PyMem_Malloc       -   +0x0   emulated push %rbx
            53 48 85 ff 0f 88 8e 1f f2 ff 48 8b 05 67 3e 45
        PyMem_Calloc       -   +0x0   emulated push %rbx
            53 48 89 fb 48 83 ec 10 48 85 f6 0f 84 93 01 00
        PyMem_Realloc      -   +0x0   emulated push %r13
            41 55 41 54 55 53 48 83 ec 08 48 85 f6 0f 88 4c
        PyMem_RawMalloc    -   +0x0   stepped  test %rdi,%rdi
            48 85 ff 0f 88 32 a2 f2 ff 48 8b 05 18 2e 46 00",
};
pub const BINARIES: [Binary; 8] =
    [GLIBC, PYENV_3_8_18, PYENV_3_9_18, PYENV_3_10_13, PYENV_3_11_7, PYENV_3_12_1, PYENV_3_13_0, DEBIAN_PYTHON];
