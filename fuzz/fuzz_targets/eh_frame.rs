//! The call frame information reader: a real ELF file whose .eh_frame (or
//! .eh_frame_hdr, its sorted index) the fuzzer overwrites, then every
//! lookup the unwinder and the pymalloc locator make.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memtrace::binary::elf::ElfFile;
use memtrace_fuzz::{CappedAllocator, call_frames, section_range};

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

/// A small C program with an index and call frames for each function
/// (seeds/elf/hello, built with gcc -O2 -fasynchronous-unwind-tables).
static TEMPLATE: &[u8] = include_bytes!("../seeds/elf/hello");

fuzz_target!(|input: (bool, &[u8])| {
    let (index, bytes) = input;
    let mut data = TEMPLATE.to_vec();
    let Some(range) = section_range(TEMPLATE, if index { ".eh_frame_hdr" } else { ".eh_frame" }) else {
        panic!("the template has .eh_frame and .eh_frame_hdr");
    };
    let n = bytes.len().min(range.len());
    data[range.start..range.start + n].copy_from_slice(&bytes[..n]);
    let elf = ElfFile::parse(data).expect("only a section's contents changed");
    call_frames(&elf);
});
