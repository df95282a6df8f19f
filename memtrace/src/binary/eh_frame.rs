//! The call frame information of one ELF file (.eh_frame, searched through
//! .eh_frame_hdr's sorted table when the file has one): where each function
//! starts and ends by its FDE, the function containing an address, and the
//! unwind row that says how to find the caller's registers there. It reads
//! the sections out of an `ElfFile`; what the rows are used for (the
//! unwinding policy, the instruction decoding) is the callers' business.

use gimli::{
    BaseAddresses, CieOrFde, EhFrame, EhFrameHdr, EndianSlice, FrameDescriptionEntry, LittleEndian, ParsedEhFrameHdr,
    UnwindContext, UnwindSection as _, UnwindTableRow,
};

use super::elf::ElfFile;

type Reader<'a> = EndianSlice<'a, LittleEndian>;

/// An unwind row: the CFA rule and each register's rule at one address.
pub type UnwindRow = UnwindTableRow<usize>;

pub struct CallFrames<'a> {
    eh_frame: EhFrame<Reader<'a>>,
    /// .eh_frame_hdr, when present and readable; lookups fall back to a
    /// linear walk of .eh_frame without it.
    index: Option<ParsedEhFrameHdr<Reader<'a>>>,
    bases: BaseAddresses,
}

impl<'a> CallFrames<'a> {
    /// The call frame information of `elf`, or None without `.eh_frame`.
    pub fn of(elf: &'a ElfFile) -> Option<Self> {
        let eh_frame = EhFrame::new(elf.sections(&[".eh_frame"]).first()?, LittleEndian);
        let mut bases = BaseAddresses::default().set_eh_frame(elf.section_address(".eh_frame")?);
        if let Some(text) = elf.section_address(".text") {
            bases = bases.set_text(text);
        }
        let mut index = None;
        if let (Some(address), Some(bytes)) =
            (elf.section_address(".eh_frame_hdr"), elf.sections(&[".eh_frame_hdr"]).first())
        {
            bases = bases.set_eh_frame_hdr(address);
            index = EhFrameHdr::new(bytes, LittleEndian).parse(&bases, 8).ok();
        }
        Some(Self { eh_frame, index, bases })
    }

    /// (start, end) of the code each FDE describes, in the order the FDEs
    /// are stored; None when an entry cannot be read.
    pub fn functions(&self) -> Option<Vec<(u64, u64)>> {
        let mut functions = Vec::new();
        let mut entries = self.eh_frame.entries(&self.bases);
        while let Some(entry) = entries.next().ok()? {
            if let CieOrFde::Fde(partial) = entry {
                let fde = partial.parse(EhFrame::cie_from_offset).ok()?;
                functions.push((fde.initial_address(), fde.end_address()));
            }
        }
        Some(functions)
    }

    /// (start, end) of the function (or function part: GCC's `.cold` and
    /// `.part` pieces have FDEs of their own) whose code holds `vaddr`.
    pub fn function_containing(&self, vaddr: u64) -> Option<(u64, u64)> {
        self.fde(vaddr).map(|fde| (fde.initial_address(), fde.end_address()))
    }

    /// How to recover the caller's frame from code at `vaddr`.
    pub fn unwind_row(&self, vaddr: u64) -> Option<UnwindRow> {
        let mut context = UnwindContext::new();
        let row = self.fde(vaddr)?.unwind_info_for_address(&self.eh_frame, &self.bases, &mut context, vaddr).ok()?;
        Some(row.clone())
    }

    /// Passes every unwind row of every FDE to `each` with the addresses
    /// it covers, `[start, end)`, in the order the FDEs are stored: one pass
    /// for rules wanted at many addresses. Entries that cannot be read are
    /// skipped.
    pub fn each_row(&self, mut each: impl FnMut(u64, u64, &UnwindRow)) {
        let mut context = UnwindContext::new();
        let mut entries = self.eh_frame.entries(&self.bases);
        while let Ok(Some(entry)) = entries.next() {
            let CieOrFde::Fde(partial) = entry else { continue };
            let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else { continue };
            let Ok(mut rows) = fde.rows(&self.eh_frame, &self.bases, &mut context) else { continue };
            while let Ok(Some(row)) = rows.next_row() {
                each(row.start_address(), row.end_address(), row);
            }
        }
    }

    fn fde(&self, vaddr: u64) -> Option<FrameDescriptionEntry<Reader<'a>>> {
        match self.index.as_ref().and_then(ParsedEhFrameHdr::table) {
            Some(table) => table.fde_for_address(&self.eh_frame, &self.bases, vaddr, EhFrame::cie_from_offset),
            None => self.eh_frame.fde_for_address(&self.bases, vaddr, EhFrame::cie_from_offset),
        }
        .ok()
    }
}

#[cfg(test)]
mod tests {
    use gimli::{CfaRule, RegisterRule, X86_64};

    use super::*;
    use crate::process::proc_maps::MemoryMap;

    /// This test executable: built wherever the tests run, and linked, like
    /// every Rust executable, with .eh_frame_hdr.
    fn this_binary() -> ElfFile {
        ElfFile::open(&std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn the_index_finds_what_a_walk_of_every_fde_finds() {
        let elf = this_binary();
        let indexed = CallFrames::of(&elf).unwrap();
        assert!(indexed.index.as_ref().and_then(ParsedEhFrameHdr::table).is_some(), "no .eh_frame_hdr table");
        let walked = CallFrames { index: None, ..CallFrames::of(&elf).unwrap() };
        let functions = indexed.functions().unwrap();
        assert!(functions.len() > 100, "only {} FDEs", functions.len());
        for &(start, end) in functions.iter().filter(|(start, end)| start < end) {
            for vaddr in [start, end - 1] {
                assert_eq!(indexed.function_containing(vaddr), Some((start, end)), "{vaddr:#x}");
                assert_eq!(walked.function_containing(vaddr), Some((start, end)), "{vaddr:#x}");
            }
        }
    }

    #[test]
    fn a_function_entered_has_its_return_address_on_top_of_the_stack() {
        // The file's address of this very function, through the live map.
        let here = a_function_entered_has_its_return_address_on_top_of_the_stack as fn() as usize as u64;
        let map = MemoryMap::read(std::process::id()).unwrap();
        let mapping = map.find(here).unwrap();
        let elf = this_binary();
        let vaddr = elf.vaddr_of_offset(here - mapping.start + mapping.file_offset).unwrap();
        let frames = CallFrames::of(&elf).unwrap();
        let (start, end) = frames.function_containing(vaddr).unwrap();
        assert!(start <= vaddr && vaddr < end);
        // The x86-64 psABI at a call's target: CFA = rsp + 8, return
        // address at CFA - 8.
        let row = frames.unwind_row(start).unwrap();
        assert_eq!(*row.cfa(), CfaRule::RegisterAndOffset { register: X86_64::RSP, offset: 8 });
        assert_eq!(row.register(X86_64::RA), Some(RegisterRule::Offset(-8)));
    }
}
