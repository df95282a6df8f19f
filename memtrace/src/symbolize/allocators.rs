//! Which native frames are allocation machinery rather than the program's
//! own code: the innermost frames of a native traceback that are left out,
//! so that a site is the first frame of code the program's authors wrote.
//! heaptrack drops `operator new` from the top of its traces, massif
//! treats its `--alloc-fn`s (malloc, `operator new` and their variants) as
//! the allocator itself, and memray hides CPython's own call machinery;
//! memtrace goes as far as the first frame outside the allocators and the
//! languages' standard libraries, since a `std::vector`'s growth or a
//! Rust `Vec`'s is the user's line that grew it. The list is data, here;
//! `--alloc-fn` adds the program's own wrappers (`xmalloc`).

use anyhow::{Context as _, Result};

use super::native::NativeFrame;

/// A rule matching frames by their function's qualified name
/// (`native::Function::qualified`) or by the file holding their code.
enum Rule {
    Named(&'static str),
    /// Names starting so.
    Prefixed(&'static str),
    /// Files whose name starts so (`libc.so.6`, `libc-2.31.so`).
    InFile(&'static str),
    /// Rust's impls of one of these crates' traits for one of their own
    /// types or a primitive (`<u8 as alloc::vec::spec_from_elem::SpecFromElem>`,
    /// `<alloc::vec::Vec<T> as core::clone::Clone>`), and their inherent
    /// impls on primitives (`<[T]>::to_vec`); an impl for the program's
    /// type or of its trait is the program's.
    RustImplIn(&'static [&'static str]),
}

use Rule::{InFile, Named, Prefixed, RustImplIn};

/// Rust's standard library, by crate path (hashbrown is std's HashMap).
const RUST_STD: &[&str] = &["alloc::", "core::", "std::", "hashbrown::"];

/// The built-in rules and why each frame is not the program's.
const BUILT_IN: &[(Rule, &str)] = &[
    // C and the dynamic loader: everything they allocate (strdup, fopen,
    // getline, a thread's stack and TLS, dlopen) is for their caller.
    (InFile("libc.so"), "the C library (glibc)"),
    (InFile("libc-"), "the C library (older glibc)"),
    (InFile("libc.musl"), "the C library (musl)"),
    (InFile("ld-linux"), "the dynamic loader"),
    (InFile("ld-musl"), "the dynamic loader (musl)"),
    // C++: operator new in all its variants (sized, aligned, nothrow, []),
    // and the standard library, compiled into the program from its
    // headers (containers, strings, allocators) or shared.
    (Named("operator new"), "C++ operator new"),
    (Named("operator new[]"), "C++ operator new[]"),
    (Prefixed("std::"), "the C++ or Rust standard library"),
    (Prefixed("__gnu_cxx::"), "libstdc++'s extensions"),
    (Named("__cxa_allocate_exception"), "C++ exception objects"),
    (Named("__cxa_allocate_dependent_exception"), "C++ exception objects"),
    (InFile("libstdc++.so"), "libstdc++"),
    (InFile("libc++.so"), "libc++"),
    (InFile("libc++abi.so"), "libc++abi"),
    (InFile("libgcc_s.so"), "the unwinder"),
    // Rust: the global allocator's shims and the standard library's crates
    // (Box, Vec, String, RawVec's growth, collections, formatting), and
    // their trait impls (`<alloc::vec::Vec<T> as core::clone::Clone>`).
    (Prefixed("__rust_"), "Rust's allocator shims"),
    (Prefixed("__rustc::"), "Rust's allocator shims"),
    (Prefixed("__rdl_"), "Rust's default allocator"),
    (Prefixed("__rg_"), "Rust's #[global_allocator] shims"),
    (Prefixed("alloc::"), "Rust's alloc crate"),
    (Prefixed("core::"), "Rust's core crate"),
    (Prefixed("hashbrown::"), "the hash table of Rust's std"),
    (RustImplIn(RUST_STD), "Rust's standard library"),
    // CPython's allocator layers (with --native): the raw, mem and object
    // domains, pymalloc's pools and arenas, and object allocation.
    (Prefixed("PyMem_"), "CPython's allocator"),
    (Prefixed("_PyMem_"), "CPython's allocator"),
    (Named("PyObject_Malloc"), "CPython's allocator"),
    (Named("PyObject_Calloc"), "CPython's allocator"),
    (Named("PyObject_Realloc"), "CPython's allocator"),
    (Named("_PyObject_Malloc"), "pymalloc"),
    (Named("_PyObject_Calloc"), "pymalloc"),
    (Named("_PyObject_Realloc"), "pymalloc"),
    (Prefixed("pymalloc_"), "pymalloc"),
    (Named("allocate_from_new_pool"), "pymalloc"),
    (Named("new_arena"), "pymalloc"),
    (Named("_PyObject_ArenaMmap"), "pymalloc's arenas"),
    (Named("_PyObject_ArenaMalloc"), "pymalloc's arenas"),
    (Prefixed("_PyObject_GC_"), "CPython's GC object allocation"),
    (Named("PyObject_GC_Malloc"), "CPython's GC object allocation"),
    (Named("gc_alloc"), "CPython's GC object allocation"),
    (Named("_PyObject_New"), "CPython's object allocation"),
    (Named("_PyObject_NewVar"), "CPython's object allocation"),
    (Named("PyType_GenericAlloc"), "CPython's object allocation"),
    (Named("_PyType_AllocNoTrack"), "CPython's object allocation"),
];

/// The built-in rules and the user's `--alloc-fn` patterns.
#[derive(Clone)]
pub struct AllocatorFrames {
    user: Vec<glob::Pattern>,
}

impl AllocatorFrames {
    /// With the user's patterns (fnmatch globs on qualified names:
    /// `xmalloc`, `my_pool::*`).
    pub fn new(patterns: &[String]) -> Result<Self> {
        let user = patterns
            .iter()
            .map(|p| glob::Pattern::new(p).with_context(|| format!("--alloc-fn {p:?} is not a valid glob")))
            .collect::<Result<_>>()?;
        Ok(Self { user })
    }

    /// What `frame` is when it is allocation machinery: the built-in
    /// rule's reason, or `--alloc-fn`.
    pub fn matches(&self, frame: &NativeFrame) -> Option<&'static str> {
        let qualified = frame.function.as_ref().map(|f| f.qualified.as_str());
        let built_in = BUILT_IN.iter().find(|(rule, _)| match (rule, qualified) {
            (Named(name), Some(qualified)) => qualified == *name,
            (Prefixed(prefix), Some(qualified)) => qualified.starts_with(prefix),
            (InFile(prefix), _) => frame.module.starts_with(prefix),
            (RustImplIn(crates), Some(qualified)) => rust_impl_in(qualified, crates),
            _ => false,
        });
        match built_in {
            Some((_, why)) => Some(why),
            None => qualified.filter(|q| self.user.iter().any(|p| p.matches(q))).map(|_| "--alloc-fn"),
        }
    }

    /// How many of `frames` (None for a frame that is no native one), from
    /// the innermost, are allocation machinery, and what they are; none
    /// when all of them are (an allocation by the runtime itself keeps its
    /// whole traceback).
    pub fn leading<'a>(&self, frames: impl IntoIterator<Item = Option<&'a NativeFrame>>) -> (usize, Vec<&'static str>) {
        let mut reasons = Vec::new();
        let mut all = true;
        for frame in frames {
            match frame.and_then(|f| self.matches(f)) {
                Some(why) => reasons.push(why),
                None => {
                    all = false;
                    break;
                }
            }
        }
        if all { (0, Vec::new()) } else { (reasons.len(), reasons) }
    }
}

/// Whether `qualified` is a function of a Rust impl (`<X as Trait>::f`,
/// `<X>::f`) that `crates` wrote: of their trait, for their type or a
/// primitive.
fn rust_impl_in(qualified: &str, crates: &[&str]) -> bool {
    let Some(inner) = qualified.strip_prefix('<') else { return false };
    // The header ends at the `>` that closes the first `<`; its `as` is
    // the one outside any generic arguments.
    let mut depth = 0;
    let mut split = None;
    let mut end = None;
    for (i, c) in inner.char_indices() {
        match c {
            '<' => depth += 1,
            '>' if depth == 0 => {
                end = Some(i);
                break;
            }
            '>' => depth -= 1,
            _ if depth == 0 && split.is_none() && inner[i..].starts_with(" as ") => split = Some(i),
            _ => {}
        }
    }
    let Some(end) = end else { return false };
    let header = &inner[..end];
    let theirs = |path: &str| crates.iter().any(|c| path.trim_start_matches("dyn ").starts_with(c));
    let primitive = |ty: &str| {
        ty.starts_with(['[', '&', '*', '(']) || !ty.contains("::") && ty.chars().all(|c| c.is_ascii_alphanumeric())
    };
    match split {
        Some(i) => theirs(&header[i + 4..]) && (theirs(&header[..i]) || primitive(&header[..i])),
        None => theirs(header) || primitive(header),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{snapshot::Frame, symbolize::native::Function};

    fn frame(raw: &str, module: &str) -> NativeFrame {
        NativeFrame { frame: Frame::at(raw, 0), function: Some(Function::demangle(raw)), module: module.into() }
    }

    #[test]
    fn allocators_and_standard_libraries_are_skipped_to_the_program() {
        let rules = AllocatorFrames::new(&["xmalloc".into()]).unwrap();
        let stack = [
            frame("_Znwm", "libstdc++.so.6.0.30"),
            frame(
                "_ZNSt6vectorIiSaIiEE17_M_realloc_insertIJRKiEEEvN9__gnu_cxx17__normal_iteratorIPiS1_EEDpOT_",
                "leaky",
            ),
            frame("xmalloc", "leaky"),
            frame("_Z7from_f1v", "leaky"),
            frame("main", "leaky"),
        ];
        let (leading, reasons) = rules.leading(stack.iter().map(Some));
        assert_eq!(leading, 3);
        assert_eq!(reasons, ["C++ operator new", "the C++ or Rust standard library", "--alloc-fn"]);
        // A user function taking standard types is the user's.
        assert_eq!(
            rules.matches(&frame("_Z7processRKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE", "leaky")),
            None
        );
        // Rust: the allocator shims and RawVec's growth; the user's own
        // impl of a standard trait is not the library's.
        assert!(rules.matches(&frame("__rdl_alloc", "leaky")).is_some());
        assert!(rules.matches(&frame("_ZN5alloc7raw_vec11finish_grow17h0123456789abcdefE", "leaky")).is_some());
        assert_eq!(rules.matches(&frame("_ZN5leaky10make_block17h0123456789abcdefE", "leaky")), None);
        for (name, library) in [
            ("<u8 as alloc::vec::spec_from_elem::SpecFromElem>::from_elem", true),
            ("<alloc::vec::Vec<T> as core::clone::Clone>::clone", true),
            ("<[T]>::to_vec", true),
            ("<str>::to_owned", true),
            ("<dyn core::any::Any>::type_id", true),
            ("<leaky::Record as core::clone::Clone>::clone", false),
            ("<alloc::vec::Vec<u8> as leaky::Encode>::encode", false),
            ("<leaky::Record>::new", false),
        ] {
            assert_eq!(rust_impl_in(name, RUST_STD), library, "{name}");
        }
        // CPython's layers, LTO clones too; its object code is not.
        assert!(rules.matches(&frame("_PyObject_Malloc.lto_priv.0", "python3.11")).is_some());
        assert_eq!(rules.matches(&frame("PyList_New", "libpython3.12.so.1.0")), None);
        // Only allocators: nothing is skipped; a Python frame ends them.
        assert_eq!(rules.leading(stack[..2].iter().map(Some)).0, 0);
        assert_eq!(rules.leading([Some(&stack[0]), None]).0, 1);
    }
}
