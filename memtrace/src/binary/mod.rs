//! What memtrace reads of the binaries a process maps, from their files:
//! ELF symbols, sections and segments (`elf`), and the x86-64 code in them
//! (`x86`). Part of discovery: nothing here knows about processes or probes.

pub mod elf;
pub mod x86;
