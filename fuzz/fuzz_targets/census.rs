//! The census over a forged CPython heap: pymalloc's arenas and pools, the
//! GC's generation lists, type objects and class dicts, corrupted as the
//! fuzzer chooses (cycles, pointers into unmapped memory, garbage types).
//! Uncorrupted, the census must count exactly what was forged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memtrace_fuzz::{CappedAllocator, census, layout};

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

fuzz_target!(|input: census::Input| {
    let layout = layout(input.version);
    let (mut forge, expected) = census::forge(&input, layout);
    forge.corrupt(&input.corruptions, census::MAX_CORRUPTIONS);
    let found = census::census(&forge, layout);
    if input.corruptions.is_empty() {
        let objects = found.objects.expect("a CPython image has an object census");
        assert_eq!(objects.incomplete, Vec::<String>::new());
        let counted = census::Expected {
            tracked: objects.gc_tracked,
            permanent: objects.gc_permanent,
            untracked: objects.untracked,
        };
        assert_eq!(counted, expected);
    }
});
