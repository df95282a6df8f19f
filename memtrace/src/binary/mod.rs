//! What memtrace reads of the binaries a process maps, from their files:
//! ELF symbols, sections and segments (`elf`), and the call frame
//! information in them (`eh_frame`). Part of discovery: nothing here knows
//! about processes or probes.

pub mod eh_frame;
pub mod elf;
