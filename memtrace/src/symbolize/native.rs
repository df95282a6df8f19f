//! Native frames to source lines or symbols, with blazesym. Addresses are
//! turned into (file, file offset) with a copy of the target's memory map
//! and symbolized from the file itself, so frames of a process that has
//! already exited still resolve. Results are cached per (file, offset).

use std::collections::HashMap;

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};

use crate::{
    process::proc_maps::{MappedPaths, MemoryMap},
    snapshot::{Frame, NativeLocation},
};

pub struct NativeSymbolizer {
    symbolizer: Symbolizer,
    /// How the target's mapped files are reached from here.
    paths: MappedPaths,
    cache: HashMap<(String, u64), Frame>,
}

impl NativeSymbolizer {
    pub fn new(paths: MappedPaths) -> Self {
        Self {
            symbolizer: Symbolizer::builder().enable_code_info(true).enable_inlined_fns(false).build(),
            paths,
            cache: HashMap::new(),
        }
    }

    /// The frame of return address `addr` (the call before it is what
    /// allocated, so its line is the one to show).
    pub fn frame(&mut self, map: &MemoryMap, addr: u64) -> Frame {
        let Some(mapping) = map.find(addr) else {
            return Frame::at(format!("[unknown] {addr:#x}"), 0);
        };
        if mapping.path.is_empty() {
            return Frame::at(format!("[anonymous] {addr:#x}"), 0);
        }
        let offset = addr.saturating_sub(1) - mapping.start + mapping.file_offset;
        let key = (mapping.path.clone(), offset);
        let mut frame = match self.cache.get(&key) {
            Some(frame) => frame.clone(),
            None => {
                let frame = self.resolve(&mapping.path, offset);
                self.cache.insert(key, frame.clone());
                frame
            }
        };
        // The return address, as the process and its file have it.
        frame.native = Some(NativeLocation { module: mapping.path.clone(), address: addr, offset: offset + 1 });
        frame
    }

    fn resolve(&self, path: &str, offset: u64) -> Frame {
        let module = path.rsplit('/').next().unwrap_or(path);
        let source = Source::Elf(Elf::new(self.paths.host_path(path)));
        let symbol = match self.symbolizer.symbolize_single(&source, Input::FileOffset(offset)) {
            Ok(Symbolized::Sym(sym)) => sym,
            _ => return Frame::at(format!("{module}+{offset:#x}"), 0),
        };
        let (filename, lineno) = match &symbol.code_info {
            Some(info) if info.line.is_some() => {
                let file = match &info.dir {
                    Some(dir) => dir.join(&info.file).to_string_lossy().into_owned(),
                    None => info.file.to_string_lossy().into_owned(),
                };
                (file, info.line.unwrap_or(0))
            }
            // +1: the offset was moved back into the call instruction.
            _ => (format!("{}+{:#x} ({module})", symbol.name, symbol.offset + 1), 0),
        };
        Frame { filename, lineno, function: Some(symbol.name.into_owned()), first_lineno: None, native: None }
    }
}
