//! Finds the code that LTO and PGO inline into CPython's callers, where
//! probes on function entries see nothing: the copies of pymalloc's fast
//! path (`pymalloc_fast_path`) and of `_Py_NewReference` (`new_reference`).
//! Both match instruction patterns on the decoded `.text`
//! (`binary::x86::Text`) and answer only what they can prove, so that
//! memtrace never probes a guess.

pub mod new_reference;
pub mod pymalloc_fast_path;

use iced_x86::Register;

use crate::python::layouts::Layout;

use crate::binary::{
    elf::ElfFile,
    x86::{Reg, Text, gpr},
};

/// What an interpreter binary inlined, from one decoding of its `.text`.
#[derive(Debug, Default)]
pub struct InlinedCode {
    pub pymalloc: Option<pymalloc_fast_path::InlinedPymalloc>,
    pub new_references: new_reference::InlinedNewReferences,
}

/// What `elf`, the binary of an interpreter laid out as `layout`, inlined.
pub fn find(elf: &ElfFile, layout: &Layout) -> InlinedCode {
    match Text::decode(elf) {
        Some(text) => InlinedCode {
            pymalloc: pymalloc_fast_path::find(elf, &text, layout),
            new_references: new_reference::find(elf, &text),
        },
        None => InlinedCode::default(),
    }
}

/// The register a pattern's pointer (a pool, a block, an object) is in, as
/// a probe cookie names it: a 64-bit general register other than rsp, whose
/// stores and loads are the stack's own.
fn pointer_register(register: Register) -> Option<Reg> {
    gpr(register).filter(|&reg| reg != Reg::Rsp)
}
