//! What memtrace reads of the binaries a process maps, from their files:
//! ELF symbols, sections and segments (`elf`), the call frame information
//! in them (`eh_frame`) and the kernel side's unwind rules compiled from it
//! (`unwind_rules`), and their x86-64 code (`x86`). Part of discovery:
//! nothing here knows about processes or probes.

pub mod eh_frame;
pub mod elf;
pub mod unwind_rules;
pub mod x86;
