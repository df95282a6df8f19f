//! Native frames to source lines or symbols, with blazesym. Addresses are
//! turned into (file, file offset) with a copy of the target's memory map
//! and symbolized from the file itself, so frames of a process that has
//! already exited still resolve. Results are cached per (file, offset).

use std::{collections::HashMap, path::PathBuf};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};

use crate::{snapshot::Frame, target::maps::MemoryMap};

pub struct NativeSymbolizer {
    symbolizer: Symbolizer,
    /// Where each of the target's files is reachable from here.
    root: Option<String>,
    cache: HashMap<(String, u64), Frame>,
}

impl NativeSymbolizer {
    pub fn new(pid: u32) -> Self {
        // A process in our own mount namespace sees files where we do, and
        // plain paths keep working after it exits; others only through
        // /proc/PID/root.
        let same_root = std::fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|p| p == std::path::Path::new("/"));
        Self {
            symbolizer: Symbolizer::builder().enable_code_info(true).enable_inlined_fns(false).build(),
            root: (!same_root).then(|| format!("/proc/{pid}/root")),
            cache: HashMap::new(),
        }
    }

    /// The frame of return address `addr` (the call before it is what
    /// allocated, so its line is the one to show).
    pub fn frame(&mut self, map: &MemoryMap, addr: u64) -> Frame {
        let Some(mapping) = map.find(addr) else {
            return Frame { filename: format!("[unknown] {addr:#x}"), lineno: 0 };
        };
        if mapping.path.is_empty() {
            return Frame { filename: format!("[anonymous] {addr:#x}"), lineno: 0 };
        }
        let offset = addr.saturating_sub(1) - mapping.start + mapping.file_offset;
        let key = (mapping.path.clone(), offset);
        if let Some(frame) = self.cache.get(&key) {
            return frame.clone();
        }
        let frame = self.resolve(&mapping.path, offset);
        self.cache.insert(key, frame.clone());
        frame
    }

    fn resolve(&self, path: &str, offset: u64) -> Frame {
        let module = path.rsplit('/').next().unwrap_or(path);
        let host: PathBuf = match &self.root {
            Some(root) => format!("{root}{path}").into(),
            None => path.into(),
        };
        let source = Source::Elf(Elf::new(host));
        let symbol = match self.symbolizer.symbolize_single(&source, Input::FileOffset(offset)) {
            Ok(Symbolized::Sym(sym)) => sym,
            _ => return Frame { filename: format!("{module}+{offset:#x}"), lineno: 0 },
        };
        match &symbol.code_info {
            Some(info) if info.line.is_some() => {
                let file = match &info.dir {
                    Some(dir) => dir.join(&info.file).to_string_lossy().into_owned(),
                    None => info.file.to_string_lossy().into_owned(),
                };
                Frame { filename: file, lineno: info.line.unwrap_or(0) }
            }
            // +1: the offset was moved back into the call instruction.
            _ => Frame { filename: format!("{}+{:#x} ({module})", symbol.name, symbol.offset + 1), lineno: 0 },
        }
    }
}
