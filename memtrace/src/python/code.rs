//! Turns the kernel's Python frames (code object address, instruction
//! position, code tag) into file names and line numbers by reading code
//! objects from the live target. A code object is read once and cached under
//! its address *and* tag; before the first read the tag is checked against
//! the object now at that address, so a freed code object whose memory was
//! reused by another function is never reported under the wrong name.

use std::collections::HashMap;

use memtrace_common::{PythonFrame, PythonStack, code_tag};

use super::{
    layouts::{InstrKind, Layout, UNICODE_ASCII, UNICODE_COMPACT, UNICODE_KIND_MASK, UNICODE_KIND_SHIFT},
    linetable::{self, LineTableFormat},
};
use crate::{
    process::memory::{AddressSpace, ProcessMemory},
    snapshot::Frame,
};

/// Bounds on what is read from the target, which could hold garbage.
const MAX_STRING: usize = 4096;
const MAX_LINETABLE: usize = 1 << 20;
/// Bytes of code objects remembered: far more than a process runs, and a
/// bound on what a target forging frames and code objects (each may name a
/// table of [`MAX_LINETABLE`] bytes) can make memtrace keep.
const MAX_HELD: usize = 64 << 20;

struct Code {
    filename: String,
    /// co_qualname where there is one (3.11+), else co_name.
    function: String,
    firstlineno: i32,
    linetable: Vec<u8>,
    /// Byte offset of the first instruction after the frame's set-up
    /// (RESUME), 0 when the version has no such notion.
    first_traceable: i64,
}

pub struct CodeResolver<A = ProcessMemory> {
    memory: A,
    layout: Layout,
    format: LineTableFormat,
    /// By (address, tag); None when the object could not be read or had
    /// changed by the time it was.
    codes: HashMap<(u64, u64), Option<Code>>,
    /// Bytes the codes hold.
    held: usize,
}

/// A resolved Python frame: None for one still being set up (before its
/// RESUME), which CPython's own tracebacks and tracemalloc leave out; and
/// whether it is the first frame its C call of the eval loop ran.
#[derive(Clone, Debug)]
pub struct ResolvedFrame {
    pub frame: Option<Frame>,
    pub entry: bool,
}

/// Shown for a frame whose code object could not be read: gone before it
/// was, or not what a code object is (a table or name beyond the bounds).
pub const UNREADABLE_CODE: &str = "<code object that could not be read>";

impl<A: AddressSpace> CodeResolver<A> {
    pub fn new(memory: A, layout: Layout) -> Self {
        Self { memory, layout, format: layout.line_table, codes: HashMap::new(), held: 0 }
    }

    /// The stack's frames, innermost first.
    pub fn frames(&mut self, stack: &PythonStack) -> Vec<ResolvedFrame> {
        let len = (stack.len as usize).min(stack.frames.len());
        let format = self.format;
        let mut frames = Vec::with_capacity(len);
        for f in &stack.frames[..len] {
            let offset = self.byte_offset(f.code, f.instr);
            let entry = f.flags & PythonFrame::ENTRY != 0;
            let frame = match self.code(f.code, f.code_tag) {
                Some(code) if offset < code.first_traceable => None,
                Some(code) => Some(Frame {
                    filename: code.filename.clone(),
                    lineno: linetable::line_for_offset(format, code.firstlineno, &code.linetable, offset.max(0) as u32)
                        .map_or(0, |l| l.max(0) as u32),
                    function: Some(code.function.clone()),
                    first_lineno: Some(code.firstlineno.max(0) as u32),
                    native: None,
                }),
                None => Some(Frame::at(UNREADABLE_CODE, 0)),
            };
            frames.push(ResolvedFrame { frame, entry });
        }
        frames
    }

    /// Byte offset in the bytecode of the instruction a frame is at;
    /// negative before the first one.
    fn byte_offset(&self, code: u64, instr: u64) -> i64 {
        let bytecode = code.wrapping_add(self.layout.code_bytecode);
        match self.layout.instr_kind {
            InstrKind::LastiBytes => i64::from(instr as u32 as i32),
            InstrKind::LastiCodeUnits => i64::from(instr as u32 as i32) * 2,
            InstrKind::PrevInstrPointer | InstrKind::InstrPointer => instr.wrapping_sub(bytecode) as i64,
        }
    }

    fn code(&mut self, address: u64, tag: u64) -> Option<&Code> {
        if !self.codes.contains_key(&(address, tag)) {
            let code = self.read_code(address, tag);
            let size = size_of::<Option<Code>>()
                + code.as_ref().map_or(0, |c| c.linetable.len() + c.filename.len() + c.function.len());
            // Past the bound, start again rather than grow: what is still
            // in use is read again once.
            if self.held + size > MAX_HELD {
                self.codes.clear();
                self.held = 0;
            }
            self.held += size;
            self.codes.insert((address, tag), code);
        }
        self.codes.get(&(address, tag))?.as_ref()
    }

    fn read_code(&self, address: u64, tag: u64) -> Option<Code> {
        let l = &self.layout;
        let m = &self.memory;
        let firstlineno = m.read_u32(address.wrapping_add(l.code_firstlineno)).ok()?;
        let name = m.read_u64(address.wrapping_add(l.code_name)).ok()?;
        let filename = m.read_u64(address.wrapping_add(l.code_filename)).ok()?;
        if code_tag(firstlineno, name, filename) != tag {
            return None;
        }
        let table = m.read_u64(address.wrapping_add(l.code_linetable)).ok()?;
        let function = match l.code_qualname {
            Some(offset) => m.read_u64(address.wrapping_add(offset)).ok()?,
            None => name,
        };
        let first_traceable = match l.code_firsttraceable {
            Some(offset) => i64::from(m.read_u32(address.wrapping_add(offset)).ok()? as i32) * 2,
            None => 0,
        };
        Some(Code {
            filename: self.read_str(filename)?,
            function: self.read_str(function)?,
            firstlineno: firstlineno as i32,
            linetable: self.read_bytes(table)?,
            first_traceable,
        })
    }

    /// A `bytes` object's contents.
    fn read_bytes(&self, object: u64) -> Option<Vec<u8>> {
        let len = self.memory.read_u64(object.wrapping_add(self.layout.bytes_size)).ok()? as usize;
        if len > MAX_LINETABLE {
            return None;
        }
        self.memory.read_vec(object.wrapping_add(self.layout.bytes_data), len).ok()
    }

    /// A compact `str` object's text (code object strings always are).
    fn read_str(&self, object: u64) -> Option<String> {
        let l = &self.layout;
        let len = self.memory.read_u64(object.wrapping_add(l.unicode_length)).ok()? as usize;
        let state = self.memory.read_u32(object.wrapping_add(l.unicode_state)).ok()?;
        let kind = (state >> UNICODE_KIND_SHIFT) & UNICODE_KIND_MASK;
        let (compact, ascii) = (state & UNICODE_COMPACT != 0, state & UNICODE_ASCII != 0);
        if !compact || len > MAX_STRING || !matches!(kind, 1 | 2 | 4) {
            return None;
        }
        let data = if ascii { l.unicode_ascii_data } else { l.unicode_compact_data };
        let raw = self.memory.read_vec(object.wrapping_add(data), len * kind as usize).ok()?;
        Some(match kind {
            1 => raw.iter().map(|&b| b as char).collect(),
            2 => char::decode_utf16(raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])))
                .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect(),
            _ => raw
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])).unwrap_or(char::REPLACEMENT_CHARACTER)
                })
                .collect(),
        })
    }
}
