//! The kernel side's native unwinding of one process: the unwind rules
//! (`binary::unwind_rules`) of each executable file it maps, placed at the
//! addresses it maps them at, and of each probed instruction whose program
//! unwinds (inlined pymalloc pops), in UNWIND_RULES. Files the process maps
//! later (dlopen) get theirs when the session refreshes its memory map.
//! Each file's rules are compiled once per session (`RuleBook`), whichever
//! processes map it.

use std::{
    collections::{HashMap, HashSet},
    rc::Rc,
};

use anyhow::Result;
use memtrace_common::UnwindRule;

use super::{
    attach::Tracer,
    plan::{AttachPoint, Program},
};
use crate::{
    binary::{elf::ElfFile, unwind_rules},
    process::proc_maps::{MappedPaths, Mapping, MemoryMap},
};

/// Each file's return-address rules, as (file offset, rule), by the file's
/// path as processes see it and its inode.
#[derive(Default)]
pub struct RuleBook {
    files: HashMap<(String, u64), Rc<Vec<(u64, UnwindRule)>>>,
}

impl RuleBook {
    fn file(&mut self, pid: u32, mapping: &Mapping) -> Rc<Vec<(u64, UnwindRule)>> {
        let key = (mapping.path.clone(), mapping.inode);
        self.files
            .entry(key)
            .or_insert_with(|| {
                // A file that cannot be read has no rules: unwinding stops in
                // its code and counts it.
                let rules = ElfFile::open(&MappedPaths::of(pid).host_path(&mapping.path)).map(|elf| {
                    unwind_rules::return_address_rules(&elf)
                        .into_iter()
                        .filter_map(|(vaddr, rule)| Some((elf.file_offset(vaddr)?, rule)))
                        .collect()
                });
                Rc::new(rules.unwrap_or_default())
            })
            .clone()
    }
}

pub struct Unwinding {
    pid: u32,
    /// Executable mappings whose rules are in place, by start address.
    mappings: HashSet<u64>,
    /// Rules in place, and those UNWIND_RULES had no room for.
    placed: usize,
    refused: usize,
}

impl Unwinding {
    /// Places the rules of everything `pid` maps, and of its probed
    /// instructions among `points` (in `interpreter`, the binary that holds
    /// them).
    pub fn start(
        tracer: &mut Tracer,
        book: &mut RuleBook,
        map: &MemoryMap,
        pid: u32,
        points: &[AttachPoint],
        interpreter: Option<&ElfFile>,
    ) -> Result<Self> {
        let mut unwinding = Self { pid, mappings: HashSet::new(), placed: 0, refused: 0 };
        unwinding.refresh(tracer, book, map)?;
        // After the files' rules, which they replace: a probed instruction
        // right after a call that never returns has its own row.
        let instructions: Vec<(u64, UnwindRule)> = points
            .iter()
            .filter(|p| p.program == Program::PoolPop)
            .filter_map(|p| {
                let elf = interpreter?;
                let rule = unwind_rules::instruction_rule(elf, elf.vaddr_of_offset(p.file_offset)?)?;
                let address =
                    map.mappings.iter().filter(|m| m.path == p.binary).find_map(|m| m.address_of(p.file_offset))?;
                Some((address, rule))
            })
            .collect();
        unwinding.add(tracer, instructions)?;
        Ok(unwinding)
    }

    /// Places the rules of files mapped since the last call.
    pub fn refresh(&mut self, tracer: &mut Tracer, book: &mut RuleBook, map: &MemoryMap) -> Result<()> {
        for mapping in map.mappings.iter().filter(|m| m.executable && m.path.starts_with('/')) {
            if !self.mappings.insert(mapping.start) {
                continue;
            }
            let rules = book.file(self.pid, mapping);
            let placed: Vec<(u64, UnwindRule)> =
                rules.iter().filter_map(|&(offset, rule)| Some((mapping.address_of(offset)?, rule))).collect();
            self.add(tracer, placed)?;
        }
        Ok(())
    }

    fn add(&mut self, tracer: &mut Tracer, rules: Vec<(u64, UnwindRule)>) -> Result<()> {
        let wanted = rules.len();
        let added = tracer.add_unwind_rules(self.pid, rules)?;
        self.placed += added;
        self.refused += wanted - added;
        Ok(())
    }

    /// What is in place, for --verbose.
    pub fn summary(&self) -> String {
        format!("{} unwind rules for the code of {} mappings", self.placed, self.mappings.len())
    }

    /// Says so when some rules did not fit, under every report.
    pub fn note(&self) -> Option<String> {
        (self.refused > 0).then(|| {
            format!(
                "{} unwind rules did not fit the kernel's table: native stacks through their code stop there (unwind-stops)",
                self.refused
            )
        })
    }
}
