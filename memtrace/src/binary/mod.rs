//! What memtrace reads of the binaries a process maps, from their files:
//! ELF symbols, sections and segments (`elf`). Part of discovery: nothing
//! here knows about processes or probes.

pub mod elf;
