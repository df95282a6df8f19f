//! The allocator functions memtrace knows, as data: for each, what it does
//! and where its arguments are. The kernel programs read this through each
//! probe's cookie; adding an allocator is one row here.

use memtrace_common::{NO_ARG, ProbeCookie, Reg, layer, op};

#[derive(Clone, Copy, Debug)]
pub struct AllocatorFn {
    pub symbol: &'static str,
    pub op: u8,
    pub layer: u8,
    pub size_arg: u8,
    pub count_arg: u8,
    pub ptr_arg: u8,
}

impl AllocatorFn {
    /// Functions whose work is known at entry (releases, object births);
    /// allocators also need a return probe to learn the block's address.
    pub fn entry_only(&self) -> bool {
        matches!(self.op, op::FREE | op::MUNMAP | op::NEW_REFERENCE)
    }

    pub fn cookie(&self, function: u8) -> ProbeCookie {
        // The kernel reads registers; the catalog speaks of arguments.
        let register = |arg: u8| Reg::arg(arg).map_or(NO_ARG, Reg::number);
        ProbeCookie {
            op: self.op,
            layer: self.layer,
            size_reg: register(self.size_arg),
            count_reg: register(self.count_arg),
            ptr_reg: register(self.ptr_arg),
            function,
        }
    }
}

const fn f(symbol: &'static str, op: u8, layer: u8, size_arg: u8, count_arg: u8, ptr_arg: u8) -> AllocatorFn {
    AllocatorFn { symbol, op, layer, size_arg, count_arg, ptr_arg }
}

const N: u8 = NO_ARG;
use layer::{LIBC, MMAP, PYMALLOC};
use op::{ALLOC, ARENA, FREE, MMAP as MAP, MUNMAP, NEW_REFERENCE, POOL_NEW, POSIX_MEMALIGN, REALLOC};

/// C library allocator entry points. aligned_alloc and memalign share an
/// address in glibc; the planner attaches each address once.
pub const LIBC_FUNCTIONS: &[AllocatorFn] = &[
    f("malloc", ALLOC, LIBC, 0, N, N),
    f("calloc", ALLOC, LIBC, 1, 0, N),
    f("realloc", REALLOC, LIBC, 1, N, 0),
    f("reallocarray", REALLOC, LIBC, 2, 1, 0),
    f("posix_memalign", POSIX_MEMALIGN, LIBC, 2, N, 0),
    f("aligned_alloc", ALLOC, LIBC, 1, N, N),
    f("memalign", ALLOC, LIBC, 1, N, N),
    f("valloc", ALLOC, LIBC, 0, N, N),
    f("pvalloc", ALLOC, LIBC, 0, N, N),
    f("free", FREE, LIBC, N, N, 0),
    f("mmap", MAP, MMAP, 1, N, N),
    f("munmap", MUNMAP, MMAP, N, N, 0),
];

/// CPython's allocator when the interpreter keeps its internal symbols
/// (pyenv builds): every PyObject_* and PyMem_* call reaches these, through
/// the allocator's function-pointer table, with a context first argument.
pub const PYMALLOC_INTERNAL: &[AllocatorFn] = &[
    f("_PyObject_Malloc", ALLOC, PYMALLOC, 1, N, N),
    f("_PyObject_Calloc", ALLOC, PYMALLOC, 2, 1, N),
    f("_PyObject_Realloc", REALLOC, PYMALLOC, 2, N, 1),
    f("_PyObject_Free", FREE, PYMALLOC, N, N, 1),
];

/// CPython's public allocator API, for stripped interpreters that only
/// export these. The object and "mem" domains are separate entry points.
pub const PYMALLOC_EXPORTED: &[AllocatorFn] = &[
    f("PyObject_Malloc", ALLOC, PYMALLOC, 0, N, N),
    f("PyObject_Calloc", ALLOC, PYMALLOC, 1, 0, N),
    f("PyObject_Realloc", REALLOC, PYMALLOC, 1, N, 0),
    f("PyObject_Free", FREE, PYMALLOC, N, N, 0),
    f("PyMem_Malloc", ALLOC, PYMALLOC, 0, N, N),
    f("PyMem_Calloc", ALLOC, PYMALLOC, 1, 0, N),
    f("PyMem_Realloc", REALLOC, PYMALLOC, 1, N, 0),
    f("PyMem_Free", FREE, PYMALLOC, N, N, 0),
];

/// Where CPython 3.9+ initialises every new object, including ones taken
/// from a free list instead of an allocator (3.8 inlines it).
pub const PYTHON_OBJECTS: &[AllocatorFn] = &[f("_Py_NewReference", NEW_REFERENCE, PYMALLOC, N, N, 0)];

/// pymalloc's out-of-line slow path in builds that inline the fast path:
/// its return value is the first block of a new pool. Found by address (the
/// binaries that need it are stripped); the name is only a label.
pub const POOL_NEW_FUNCTION: AllocatorFn = f("allocate_from_new_pool", POOL_NEW, PYMALLOC, N, N, N);

/// 3.8's arena allocator, where pymalloc's own function (no longer probed)
/// maps arenas: probed so that the mappings are not taken for allocations.
pub const ARENA_FUNCTION: AllocatorFn = f("_PyObject_ArenaMmap", ARENA, PYMALLOC, N, N, N);
