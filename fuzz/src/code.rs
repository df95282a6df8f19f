//! Forged code objects for the code-object reader: each with its file
//! name, name and qualified name as compact str objects of any kind, its
//! line table as a bytes object, and the frames of a kernel stack that
//! point into them, as the version's layout (from its table, or from
//! `_Py_DebugOffsets` the fuzzer writes) places the fields.

use arbitrary::Arbitrary;
use memtrace::python::{
    debug_offsets,
    layouts::{InstrKind, Layout, UNICODE_ASCII, UNICODE_COMPACT, UNICODE_KIND_SHIFT},
};
use memtrace_common::{MAX_PYTHON_FRAMES, PythonFrame, PythonStack, code_tag};

use crate::{Corruption, Forge};

const CODES: u64 = 0x10_0000;
/// Each code object's room: its strings at 4 KiB steps, its table after.
const CODE_ROOM: u64 = 0x10_0000;
const MAX_CODES: usize = 4;
const MAX_CHARS: usize = 512;
const MAX_TABLE: usize = 0x8_0000;
pub const MAX_CORRUPTIONS: usize = 16;

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub version: u8,
    /// Bytes of `_Py_DebugOffsets` to take the layout from instead of the
    /// version's table, when they parse.
    pub debug_offsets: Option<Vec<u8>>,
    pub codes: Vec<CodeSpec>,
    pub frames: Vec<FrameSpec>,
    pub corruptions: Vec<Corruption>,
}

#[derive(Arbitrary, Debug)]
pub struct CodeSpec {
    pub firstlineno: u32,
    pub filename: Str,
    pub name: Str,
    pub qualname: Str,
    pub linetable: Vec<u8>,
    pub first_traceable: u16,
}

/// A compact str: `kind` 1, 2 or 4 bytes a character (others as the
/// fuzzer says), ASCII or not.
#[derive(Arbitrary, Debug)]
pub struct Str {
    pub kind: u8,
    pub ascii: bool,
    pub chars: Vec<u32>,
}

#[derive(Arbitrary, Debug)]
pub struct FrameSpec {
    pub code: u8,
    /// Code units into the bytecode.
    pub instr: u16,
    pub entry: bool,
    /// A tag that is not the code object's: a code object freed and
    /// replaced since the kernel saw it.
    pub stale: bool,
}

/// The layout `input` asks for.
pub fn layout(input: &Input) -> Layout {
    match input.debug_offsets.as_deref().map(debug_offsets::parse) {
        Some(Ok(layout)) => layout,
        _ => *crate::layout(input.version),
    }
}

/// The image of `input`'s code objects, and the stack of its frames.
pub fn forge(input: &Input, layout: &Layout) -> (Forge, PythonStack) {
    let mut forge = Forge::default();
    let f = &mut forge;
    let mut tags = Vec::new();
    for (i, spec) in input.codes.iter().take(MAX_CODES).enumerate() {
        let code = CODES + i as u64 * CODE_ROOM;
        let [filename, name, qualname] = [1, 2, 3].map(|n| code + n * 0x1000);
        let table = code + 0x8000;
        for (object, text) in [(filename, &spec.filename), (name, &spec.name), (qualname, &spec.qualname)] {
            put_str(f, layout, object, text);
        }
        let bytes = &spec.linetable[..spec.linetable.len().min(MAX_TABLE)];
        f.put(table.wrapping_add(layout.bytes_size), bytes.len() as u64);
        f.put_bytes(table.wrapping_add(layout.bytes_data), bytes);
        f.put_u32(code.wrapping_add(layout.code_firstlineno), spec.firstlineno);
        f.put(code.wrapping_add(layout.code_name), name);
        f.put(code.wrapping_add(layout.code_filename), filename);
        if let Some(at) = layout.code_qualname {
            f.put(code.wrapping_add(at), qualname);
        }
        f.put(code.wrapping_add(layout.code_linetable), table);
        if let Some(at) = layout.code_firsttraceable {
            f.put_u32(code.wrapping_add(at), u32::from(spec.first_traceable));
        }
        tags.push((code, code_tag(spec.firstlineno, name, filename)));
    }
    let mut stack = PythonStack { len: 0, truncated: 0, frames: [PythonFrame::default(); MAX_PYTHON_FRAMES] };
    for spec in input.frames.iter().take(MAX_PYTHON_FRAMES) {
        let (code, tag) = match tags.get(usize::from(spec.code) % tags.len().max(1)) {
            Some(&found) => found,
            None => (CODES, 0),
        };
        let instr = u64::from(spec.instr);
        let instr = match layout.instr_kind {
            InstrKind::LastiBytes => instr * 2,
            InstrKind::LastiCodeUnits => instr,
            InstrKind::PrevInstrPointer | InstrKind::InstrPointer => {
                code.wrapping_add(layout.code_bytecode).wrapping_add(instr * 2)
            }
        };
        stack.frames[stack.len as usize] = PythonFrame {
            code,
            instr,
            code_tag: tag ^ u64::from(spec.stale),
            flags: if spec.entry { PythonFrame::ENTRY } else { 0 },
        };
        stack.len += 1;
    }
    (forge, stack)
}

fn put_str(f: &mut Forge, layout: &Layout, object: u64, text: &Str) {
    let chars = &text.chars[..text.chars.len().min(MAX_CHARS)];
    let kind = match text.kind % 4 {
        0 => 1,
        1 => 2,
        2 => 4,
        _ => u32::from(text.kind),
    };
    let ascii = text.ascii && kind == 1;
    let mut state = (kind << UNICODE_KIND_SHIFT) | UNICODE_COMPACT;
    if ascii {
        state |= UNICODE_ASCII;
    }
    f.put(object.wrapping_add(layout.unicode_length), chars.len() as u64);
    f.put_u32(object.wrapping_add(layout.unicode_state), state);
    let data: Vec<u8> = match kind {
        2 => chars.iter().flat_map(|&c| (c as u16).to_le_bytes()).collect(),
        4 => chars.iter().flat_map(|&c| c.to_le_bytes()).collect(),
        _ => chars.iter().map(|&c| if ascii { c as u8 & 0x7f } else { c as u8 }).collect(),
    };
    let at = if ascii { layout.unicode_ascii_data } else { layout.unicode_compact_data };
    f.put_bytes(object.wrapping_add(at), &data);
}

#[cfg(test)]
mod tests {
    use memtrace::python::code::CodeResolver;

    use super::*;

    /// Uncorrupted, every frame is named from its code object, on every
    /// version: the fuzzer's corruptions start from code objects read right.
    #[test]
    fn uncorrupted_code_objects_are_read() {
        let text = |s: &str, kind| Str { kind, ascii: true, chars: s.chars().map(u32::from).collect() };
        let code = |name: &str| CodeSpec {
            firstlineno: 10,
            filename: text("/app/x.py", 0),
            name: text(name, 0),
            qualname: Str { kind: 1, ascii: false, chars: name.chars().map(u32::from).collect() },
            linetable: Vec::new(),
            first_traceable: 0,
        };
        for version in 0..6 {
            let frames = (0..4).map(|i| FrameSpec { code: i, instr: 0, entry: i == 0, stale: i == 3 }).collect();
            let codes = vec![code("f"), code("g")];
            let input = Input { version, debug_offsets: None, codes, frames, corruptions: Vec::new() };
            let layout = layout(&input);
            let (forge, stack) = forge(&input, &layout);
            let resolved = CodeResolver::new(&forge.image, layout).frames(&stack);
            let names: Vec<Option<String>> =
                resolved.iter().map(|r| r.frame.as_ref().map(|f| format!("{}:{:?}", f.filename, f.function))).collect();
            let frame = |name: &str| Some(format!("/app/x.py:Some(\"{name}\")"));
            let stale = Some(format!("{}:None", memtrace::python::code::UNREADABLE_CODE));
            assert_eq!(names, [frame("f"), frame("g"), frame("f"), stale], "3.{}", 8 + version);
        }
    }
}
