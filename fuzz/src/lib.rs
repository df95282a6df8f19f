//! What memtrace's fuzz targets share: an allocator that fails a run on
//! any allocation larger than a reader may make (a size read from the
//! target and not capped), and the forged process images they walk. An
//! image is first built right (as CPython lays its structures out, by the
//! version's layout table) so that the readers get deep, then corrupted
//! word by word as the fuzzer chooses: garbage, null, unmapped, or a
//! pointer to another of its structures (a cycle, a list through a type).

pub mod census;
pub mod code;

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};

use arbitrary::Arbitrary;
use memtrace::{
    binary::{eh_frame::CallFrames, elf::ElfFile},
    process::memory::Image,
    python::layouts::{Layout, layout_for},
};

/// The largest single allocation a run may make: above every bound the
/// readers apply to what they read (a 1 MiB line table, a 64 KiB page
/// run), far below what an uncapped size read from a target asks for.
pub const MAX_ALLOCATION: usize = 64 << 20;

/// The system allocator, refusing an allocation over [`MAX_ALLOCATION`]
/// by aborting, which libFuzzer reports as a crash, with its input.
pub struct CappedAllocator;

// SAFETY: every call is passed on unchanged to the system allocator, which
// upholds GlobalAlloc's contract; only the size is checked first.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        check(layout.size());
        // SAFETY: as the caller's contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        check(layout.size());
        // SAFETY: as the caller's contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: as the caller's contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: as the caller's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn check(size: usize) {
    // An allocator must not unwind: abort, after a line that formats
    // without allocating.
    if size > MAX_ALLOCATION {
        eprintln!("an allocation of {size} bytes: a size read from the target is not capped");
        std::process::abort();
    }
}

/// The layout of CPython 3.(8 + `choice` % 6).
pub fn layout(choice: u8) -> &'static Layout {
    layout_for(3, 8 + choice % 6).expect("memtrace has a table for 3.8 to 3.13")
}

/// A value the fuzzer writes over a word of an image.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Value {
    Raw(u64),
    Zero,
    /// An address no page of the image holds.
    Unmapped,
    /// The address of a word the builder wrote, moved by `delta` words:
    /// a pointer into another structure, or back into the same one.
    Word {
        word: u16,
        delta: i8,
    },
    /// One byte of the word (a flag, a string's character, a count).
    Byte {
        at: u8,
        value: u8,
    },
}

#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Corruption {
    /// Which of the words the builder wrote.
    pub word: u16,
    pub value: Value,
}

/// A process image under construction: every word written is remembered,
/// for corruptions to choose from.
#[derive(Default)]
pub struct Forge {
    pub image: Image,
    words: Vec<u64>,
}

/// Far from every structure a builder lays out.
pub const UNMAPPED: u64 = 0xdead_0000_0000;

impl Forge {
    pub fn put(&mut self, addr: u64, value: u64) {
        self.image.write_u64(addr, value);
        self.words.push(addr);
    }

    pub fn put_u32(&mut self, addr: u64, value: u32) {
        self.image.write_bytes(addr, &value.to_le_bytes());
        self.words.push(addr);
    }

    pub fn put_bytes(&mut self, addr: u64, bytes: &[u8]) {
        self.image.write_bytes(addr, bytes);
        self.words.extend((0..bytes.len() as u64).step_by(8).map(|i| addr.wrapping_add(i)));
    }

    /// Applies at most `limit` of `corruptions`, in order.
    pub fn corrupt(&mut self, corruptions: &[Corruption], limit: usize) {
        if self.words.is_empty() {
            return;
        }
        let pick = |words: &[u64], i: u16| words[usize::from(i) % words.len()];
        for c in corruptions.iter().take(limit) {
            let at = pick(&self.words, c.word);
            match c.value {
                Value::Raw(value) => self.image.write_u64(at, value),
                Value::Zero => self.image.write_u64(at, 0),
                Value::Unmapped => self.image.write_u64(at, UNMAPPED),
                Value::Word { word, delta } => {
                    let target = pick(&self.words, word).wrapping_add_signed(i64::from(delta) * 8);
                    self.image.write_u64(at, target);
                }
                Value::Byte { at: byte, value } => {
                    self.image.write_bytes(at.wrapping_add(u64::from(byte % 8)), &[value])
                }
            }
        }
    }
}

/// Every lookup memtrace makes in `elf`'s call frame information: the
/// functions its FDEs describe, and at the edges of each, the function
/// holding the address and the unwind row there.
pub fn call_frames(elf: &ElfFile) {
    let Some(frames) = CallFrames::of(elf) else { return };
    let functions = frames.functions().unwrap_or_default();
    for &(start, end) in functions.iter().take(256) {
        for vaddr in [start, end.wrapping_sub(1), start.wrapping_add(1), end] {
            frames.function_containing(vaddr);
            frames.unwind_row(vaddr);
        }
    }
    frames.function_containing(0);
    frames.unwind_row(u64::MAX);
}

/// Where section `name`'s bytes are in the ELF file `data`.
pub fn section_range(data: &[u8], name: &str) -> Option<std::ops::Range<usize>> {
    use object::{Object as _, ObjectSection as _};
    let file = object::File::parse(data).ok()?;
    let (offset, size) = file.section_by_name(name)?.file_range()?;
    Some(offset as usize..(offset + size) as usize)
}
