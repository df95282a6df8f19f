//! The code-object reader over a forged image: code objects with str
//! objects of every kind and line tables of every format, corrupted as the
//! fuzzer chooses, read from a kernel stack of frames into them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memtrace::python::code::CodeResolver;
use memtrace_fuzz::{CappedAllocator, code};

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

fuzz_target!(|input: code::Input| {
    let layout = code::layout(&input);
    let (mut forge, stack) = code::forge(&input, &layout);
    forge.corrupt(&input.corruptions, code::MAX_CORRUPTIONS);
    let mut resolver = CodeResolver::new(&forge.image, layout);
    let first = resolver.frames(&stack);
    assert_eq!(first.len(), stack.len as usize);
    // The second time from the cache: the same answer.
    let again = resolver.frames(&stack);
    assert_eq!(format!("{first:?}"), format!("{again:?}"));
});
