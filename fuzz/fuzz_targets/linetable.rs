//! The line-table decoders, every format, on any bytes: an answer or
//! None, never a panic, in time linear in the table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memtrace::python::linetable::{LineTableFormat, line_for_offset};
use memtrace_fuzz::CappedAllocator;

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

fuzz_target!(|input: (u8, i32, u32, &[u8])| {
    let (format, firstlineno, offset, table) = input;
    let format =
        [LineTableFormat::Lnotab, LineTableFormat::LineTable310, LineTableFormat::Locations][usize::from(format % 3)];
    for offset in [offset, 0, offset / 2 * 2, u32::MAX] {
        line_for_offset(format, firstlineno, table, offset);
    }
});
