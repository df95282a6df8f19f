//! Reads what memtrace needs from an ELF file on disk, the one place that
//! parses one: symbol addresses and sizes (from .symtab when present, else
//! .dynsym), the bytes of a function (to choose where a probe goes) or of a
//! section (read-only data, call frame information), and the mapping from
//! virtual addresses to file offsets (uprobes are attached by file offset).

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result, anyhow};
use object::{
    Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _, ObjectSymbolTable as _, SymbolKind,
};

use crate::process::files::read_regular;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub vaddr: u64,
    pub size: u64,
}

/// Largest file read: more than any shared library with its debug
/// information, and a bound on what a target can make memtrace hold by
/// mapping a huge file.
const MAX_FILE: u64 = 4 << 30;

pub struct ElfFile {
    data: Vec<u8>,
    symbols: HashMap<String, Symbol>,
    /// (vaddr, memory size, file offset, file size) of each PT_LOAD segment.
    segments: Vec<(u64, u64, u64, u64)>,
    /// The section headers, read once: the unwinder asks for .eh_frame on
    /// every step.
    sections: Vec<Section>,
}

struct Section {
    name: String,
    address: u64,
    /// (file offset, size); None for sections without file data (.bss).
    file_range: Option<(u64, u64)>,
}

impl ElfFile {
    pub fn open(path: &Path) -> Result<Self> {
        let data = read_regular(path, MAX_FILE).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(data).with_context(|| format!("{} is not an ELF file", path.display()))
    }

    /// The ELF file whose bytes are `data`.
    pub fn parse(data: Vec<u8>) -> Result<Self> {
        let file = object::File::parse(&*data)?;
        let mut symbols = HashMap::new();
        // .symtab first: it has the local symbols (the internal allocator
        // functions) that .dynsym lacks; entries already seen win.
        for symbol in file.symbols().chain(file.dynamic_symbols()) {
            if !matches!(symbol.kind(), SymbolKind::Text | SymbolKind::Data | SymbolKind::Tls) || symbol.is_undefined()
            {
                continue;
            }
            let Ok(name) = symbol.name() else { continue };
            // Versioned names (malloc@@GLIBC_2.2.5) answer to their base name.
            let name = name.split('@').next().unwrap_or(name);
            symbols.entry(name.to_owned()).or_insert(Symbol { vaddr: symbol.address(), size: symbol.size() });
        }
        let segments = file
            .segments()
            .map(|s| {
                let (offset, file_size) = s.file_range();
                (s.address(), s.size(), offset, file_size)
            })
            .collect();
        let sections = file
            .sections()
            .map(|s| Section {
                name: s.name().unwrap_or_default().to_owned(),
                address: s.address(),
                file_range: s.file_range(),
            })
            .collect();
        Ok(Self { data, symbols, segments, sections })
    }

    pub fn symbol(&self, name: &str) -> Option<Symbol> {
        self.symbols.get(name).copied()
    }

    /// The file offset holding the byte at `vaddr`.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|&&(start, _, _, file_size)| vaddr.checked_sub(start).is_some_and(|at| at < file_size))
            .map(|&(start, _, offset, _)| (vaddr - start).wrapping_add(offset))
    }

    /// The virtual address of the byte at file offset `offset`.
    pub fn vaddr_of_offset(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|&&(_, _, start, file_size)| offset.checked_sub(start).is_some_and(|at| at < file_size))
            .map(|&(vaddr, _, start, _)| (offset - start).wrapping_add(vaddr))
    }

    /// The bytes of `symbol` as stored in the file.
    pub fn symbol_bytes(&self, symbol: Symbol) -> Result<&[u8]> {
        let offset =
            self.file_offset(symbol.vaddr).ok_or_else(|| anyhow!("address {:#x} is not in the file", symbol.vaddr))?;
        let start = usize::try_from(offset)?;
        let end = start.saturating_add(usize::try_from(symbol.size.max(1))?).min(self.data.len());
        self.data.get(start..end).ok_or_else(|| anyhow!("symbol at {:#x} lies past the end of the file", symbol.vaddr))
    }

    /// The bytes of every section whose name is in `names` (for scanning
    /// read-only data).
    pub fn sections(&self, names: &[&str]) -> Vec<&[u8]> {
        self.sections
            .iter()
            .filter(|s| names.contains(&s.name.as_str()))
            .filter_map(|s| s.file_range)
            .filter_map(|(offset, size)| {
                self.data.get(usize::try_from(offset).ok()?..usize::try_from(offset.checked_add(size)?).ok()?)
            })
            .collect()
    }

    /// The `len` bytes the file stores at `vaddr` (initialised data, code),
    /// or None when they are not all in one loadable segment's file part.
    pub fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let &(start, _, offset, _) = self.segments.iter().find(|&&(start, _, _, file_size)| {
            vaddr.checked_sub(start).and_then(|at| at.checked_add(len)).is_some_and(|end| end <= file_size)
        })?;
        let from = usize::try_from((vaddr - start).checked_add(offset)?).ok()?;
        self.data.get(from..from.checked_add(usize::try_from(len).ok()?)?)
    }

    /// The GOT slot the dynamic linker fills with the address of data symbol
    /// `name` (its R_X86_64_GLOB_DAT relocation): how position-independent
    /// code reaches data that may be interposed.
    pub fn got_slot(&self, name: &str) -> Option<u64> {
        const R_X86_64_GLOB_DAT: u32 = 6;
        self.dynamic_slot(name, R_X86_64_GLOB_DAT)
    }

    /// The GOT slot the PLT stub of function `name` jumps through (a
    /// JUMP_SLOT relocation), for code that calls an exported function of
    /// its own binary through the PLT.
    pub fn plt_slot(&self, name: &str) -> Option<u64> {
        const R_X86_64_JUMP_SLOT: u32 = 7;
        self.dynamic_slot(name, R_X86_64_JUMP_SLOT)
    }

    fn dynamic_slot(&self, name: &str, r_type: u32) -> Option<u64> {
        let file = object::File::parse(&*self.data).ok()?;
        let dynamic_symbols = file.dynamic_symbol_table()?;
        file.dynamic_relocations()?.find_map(|(slot, relocation)| {
            let object::RelocationFlags::Elf { r_type: found } = relocation.flags() else { return None };
            if found != r_type {
                return None;
            }
            let object::RelocationTarget::Symbol(index) = relocation.target() else { return None };
            let symbol = dynamic_symbols.symbol_by_index(index).ok()?;
            (symbol.name().ok()?.split('@').next()? == name).then_some(slot)
        })
    }

    /// The virtual address of section `name`, if the file has it.
    pub fn section_address(&self, name: &str) -> Option<u64> {
        self.sections.iter().find(|s| s.name == name).map(|s| s.address)
    }
}
