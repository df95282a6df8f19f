//! The /proc/PID/maps parser on any text, and lookups in what it parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memtrace::process::proc_maps::MemoryMap;
use memtrace_fuzz::CappedAllocator;

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

fuzz_target!(|text: &str| {
    let map = MemoryMap::parse(text);
    for mapping in &map.mappings {
        for address in [mapping.start, mapping.end, mapping.end.wrapping_sub(1)] {
            map.find(address);
        }
    }
    map.find(0);
    map.find(u64::MAX);
    map.executable_files();
});
