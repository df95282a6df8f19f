//! Finds the code that LTO and PGO inline into CPython's callers, where
//! probes on function entries see nothing: the copies of pymalloc's fast
//! path (`pymalloc_fast_path`) and of `_Py_NewReference` (`new_reference`);
//! and, where pymalloc is not inlined into callers, its pop inside its own
//! functions (`pymalloc_functions`), one probe where entry and return
//! probes take two. All match instruction patterns on the decoded `.text`
//! (`binary::x86::Text`) and answer only what they can prove, so that
//! memtrace never probes a guess.

pub mod births;
pub mod new_reference;
pub mod pymalloc_fast_path;
pub mod pymalloc_functions;

use iced_x86::Register;

use crate::python::layouts::Layout;

use crate::binary::{
    elf::ElfFile,
    x86::{Reg, Text, gpr},
};

/// What an interpreter binary inlined, from one decoding of its `.text`.
#[derive(Debug)]
pub struct InlinedCode {
    pub pymalloc: Option<pymalloc_fast_path::InlinedPymalloc>,
    /// Without copies in callers: the pops in pymalloc's functions, or why
    /// their entries and returns are probed instead.
    pub function_pops: Result<pymalloc_functions::FunctionPops, String>,
    pub new_references: new_reference::InlinedNewReferences,
    /// The births to probe, from those copies and the function's calls.
    pub births: births::Births,
}

impl Default for InlinedCode {
    fn default() -> Self {
        Self {
            pymalloc: None,
            function_pops: Err("no interpreter code decoded".into()),
            new_references: Default::default(),
            births: Default::default(),
        }
    }
}

impl InlinedCode {
    /// As `self`, with every birth probed (for `--type` of a built-in
    /// type): `_Py_NewReference`'s entry, which its calls reach, and its
    /// inlined copies, fresh or not, rather than the call sites.
    pub fn every_birth(&self) -> InlinedCode {
        let births = births::Births {
            probed: self.new_references.sites.clone(),
            fresh: 0,
            function_probed: Some("every birth is watched".into()),
        };
        InlinedCode {
            pymalloc: self.pymalloc.clone(),
            function_pops: self.function_pops.clone(),
            new_references: self.new_references.clone(),
            births,
        }
    }

    /// Whether pymalloc's blocks are seen at its pops (and its large
    /// blocks, which it takes from libc, as libc's), not at its functions.
    pub fn probes_pops(&self) -> bool {
        self.pymalloc.is_some() || self.function_pops.is_ok()
    }

    /// What `--verbose` says of how pymalloc and births are probed.
    pub fn describe(&self) -> String {
        let births = &self.births;
        let function = match &births.function_probed {
            Some(why) => format!("_Py_NewReference's entry too ({why})"),
            None => "not _Py_NewReference's entry: calls from other binaries (extension modules) are not seen".into(),
        };
        format!(
            "{}; births probed at {} sites that may revive a free-list object ({} proven to follow an allocation are not), and {function}",
            self.describe_pymalloc(),
            births.probed.len(),
            births.fresh
        )
    }

    fn describe_pymalloc(&self) -> String {
        match (&self.pymalloc, &self.function_pops) {
            (Some(_), _) => "pymalloc is probed at its copies inlined into callers".into(),
            (None, Ok(_)) => format!(
                "pymalloc is probed inside {} where each block they take from a pool passes, one trap per block",
                pymalloc_functions::POPPING.join(" and ")
            ),
            (None, Err(why)) => format!("pymalloc's functions are probed at entry and return: {why}"),
        }
    }
}

/// What `elf`, the binary of an interpreter laid out as `layout`, inlined.
pub fn find(elf: &ElfFile, layout: &Layout) -> InlinedCode {
    let Some(text) = Text::decode(elf) else { return InlinedCode::default() };
    let pymalloc = pymalloc_fast_path::find(elf, &text, layout);
    let function_pops = match pymalloc {
        Some(_) => Err("its copies in callers are probed".into()),
        None => pymalloc_functions::find(elf, &text, layout),
    };
    let new_references = new_reference::find(elf, &text);
    let births = births::find(elf, &text, &new_references, pymalloc.as_ref());
    InlinedCode { pymalloc, function_pops, new_references, births }
}

/// The register a pattern's pointer (a pool, a block, an object) is in, as
/// a probe cookie names it: a 64-bit general register other than rsp, whose
/// stores and loads are the stack's own.
fn pointer_register(register: Register) -> Option<Reg> {
    gpr(register).filter(|&reg| reg != Reg::Rsp)
}
