//! Finds the code that LTO and PGO inline into CPython's callers, where
//! probes on function entries see nothing: the copies of pymalloc's fast
//! path (`pymalloc`) and of `_Py_NewReference` (`new_reference`). Both
//! match instruction patterns on the decoded `.text` (`text`) and answer
//! only what they can prove, so that memtrace never probes a guess.

mod text;

pub mod new_reference;
pub mod pymalloc_fast_path;

use text::Text;

use crate::binary::elf::ElfFile;

/// What an interpreter binary inlined, from one decoding of its `.text`.
#[derive(Debug, Default)]
pub struct InlinedCode {
    pub pymalloc: Option<pymalloc_fast_path::InlinedPymalloc>,
    pub new_references: new_reference::InlinedNewReferences,
}

pub fn find(elf: &ElfFile) -> InlinedCode {
    match Text::decode(elf) {
        Some(text) => InlinedCode {
            pymalloc: pymalloc_fast_path::find(elf, &text),
            new_references: new_reference::find(elf, &text),
        },
        None => InlinedCode::default(),
    }
}
