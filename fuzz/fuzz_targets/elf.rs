//! The ELF reader on any bytes, and what memtrace reads through it from a
//! binary a target maps: symbols, sections, the mapping between addresses
//! and file offsets, GOT slots, the CPython version a binary states, where
//! pymalloc's state is (machine code decoded along the way) and the call
//! frame information.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memtrace::{binary::elf::ElfFile, census::pymalloc::PymallocState, python::version::Version};
use memtrace_fuzz::CappedAllocator;

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

fuzz_target!(|data: &[u8]| {
    let Ok(elf) = ElfFile::parse(data.to_vec()) else { return };
    for name in ["main", "_PyRuntime", "Py_Version", "malloc", "_Py_GetAllocatedBlocks"] {
        if let Some(symbol) = elf.symbol(name) {
            let _ = elf.symbol_bytes(symbol);
            elf.bytes_at(symbol.vaddr, symbol.size);
            if let Some(offset) = elf.file_offset(symbol.vaddr) {
                elf.vaddr_of_offset(offset);
            }
        }
    }
    elf.got_slot("malloc");
    elf.section_address(".text");
    Version::from_version_string(&elf.sections(&[".rodata"]).concat(), &elf.sections(&[".text"]).concat());
    for minor in 8..=13 {
        PymallocState::locate(&elf, 0, (3, minor));
    }
    memtrace_fuzz::call_frames(&elf);
});
