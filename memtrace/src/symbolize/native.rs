//! Native frames to source lines or symbols, with blazesym. Addresses are
//! turned into (file, file offset) with a copy of the target's memory map
//! and symbolized from the file itself, so frames of a process that has
//! already exited still resolve. An address in code into which other
//! functions were inlined gives a frame per function, innermost first, as
//! debuggers show them. Names are demangled here (Rust's, then C++'s
//! manglings), keeping for each function also its bare qualified name
//! (without C++'s parameters and return type) for matching. Results are
//! cached per (file, offset).

use std::{collections::HashMap, rc::Rc};

use blazesym::symbolize::{
    CodeInfo, Input, Symbolized, Symbolizer,
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
    cache: HashMap<(String, u64), Rc<[NativeFrame]>>,
}

/// A native frame as reports print it, the function it is in and the file
/// that holds its code.
#[derive(Clone, Debug)]
pub struct NativeFrame {
    pub frame: Frame,
    pub function: Option<Function>,
    /// The file's name (`libc.so.6`); empty for memory no file backs.
    pub module: String,
}

/// A function's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// As its language spells it: `make_block(unsigned long)`,
    /// `leaky::make_block`, `make_block`.
    pub name: String,
    /// Its qualified name alone: `make_block` for all three; GCC's clones
    /// (`make_block.constprop.0`) answer to their function's name.
    pub qualified: String,
}

impl Function {
    pub fn demangle(raw: &str) -> Self {
        if let Ok(rust) = rustc_demangle::try_demangle(raw) {
            // `{:#}`: without the hash.
            let name = format!("{rust:#}");
            return Self { qualified: name.clone(), name };
        }
        if let Ok(symbol) = cpp_demangle::Symbol::new(raw) {
            let bare = cpp_demangle::DemangleOptions::new().no_params().no_return_type();
            if let (Ok(name), Ok(qualified)) = (symbol.demangle(), symbol.demangle_with_options(&bare)) {
                return Self { name, qualified };
            }
        }
        let qualified = raw.split('.').next().unwrap_or(raw).to_owned();
        Self { name: raw.to_owned(), qualified }
    }
}

impl NativeSymbolizer {
    pub fn new(paths: MappedPaths) -> Self {
        Self {
            // Names are demangled here, where both of their forms are kept.
            symbolizer: Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .enable_demangling(false)
                .build(),
            paths,
            cache: HashMap::new(),
        }
    }

    /// The frames of return address `addr`, innermost first (the call
    /// before it is what allocated, so its line is the one to show).
    /// Each carries the return address, as the process and its file have it.
    pub fn frames(&mut self, map: &MemoryMap, addr: u64) -> Vec<NativeFrame> {
        let Some(mapping) = map.find(addr) else {
            return vec![NativeFrame::unnamed(format!("[unknown] {addr:#x}"), "")];
        };
        if mapping.path.is_empty() {
            return vec![NativeFrame::unnamed(format!("[anonymous] {addr:#x}"), "")];
        }
        let offset = addr.saturating_sub(1) - mapping.start + mapping.file_offset;
        let key = (mapping.path.clone(), offset);
        let frames = match self.cache.get(&key) {
            Some(frames) => frames.clone(),
            None => {
                let frames: Rc<[NativeFrame]> = self.resolve(&mapping.path, offset).into();
                self.cache.insert(key, frames.clone());
                frames
            }
        };
        let location = NativeLocation { module: mapping.path.clone(), address: addr, offset: offset + 1 };
        frames
            .iter()
            .map(|f| {
                let mut f = f.clone();
                f.frame.native = Some(location.clone());
                f
            })
            .collect()
    }

    fn resolve(&self, path: &str, offset: u64) -> Vec<NativeFrame> {
        let module = path.rsplit('/').next().unwrap_or(path);
        let host = self.paths.host_path(path);
        let source = Source::Elf(Elf::new(host));
        let symbol = match self.symbolizer.symbolize_single(&source, Input::FileOffset(offset)) {
            Ok(Symbolized::Sym(sym)) => sym,
            _ => return vec![NativeFrame::unnamed(format!("{module}+{offset:#x}"), module)],
        };
        // blazesym lists inlined calls outermost first, each with the line
        // inside it; the symbol's own line is that of the first call.
        let frame = |function: Function, code: Option<&CodeInfo>, unnamed: String| {
            let frame = match code {
                Some(info) if info.line.is_some() => {
                    let file = match &info.dir {
                        Some(dir) => dir.join(&info.file).to_string_lossy().into_owned(),
                        None => info.file.to_string_lossy().into_owned(),
                    };
                    Frame::at(file, info.line.unwrap_or(0))
                }
                _ => Frame::at(unnamed, 0),
            };
            let frame = Frame { function: Some(function.name.clone()), ..frame };
            NativeFrame { frame, function: Some(function), module: module.to_owned() }
        };
        let mut frames: Vec<NativeFrame> = symbol
            .inlined
            .iter()
            .rev()
            .map(|inlined| {
                let function = Function::demangle(&inlined.name);
                let unnamed = format!("{} ({module})", function.name);
                frame(function, inlined.code_info.as_ref(), unnamed)
            })
            .collect();
        let function = Function::demangle(&symbol.name);
        // +1: the offset was moved back into the call instruction.
        let unnamed = format!("{}+{:#x} ({module})", function.name, symbol.offset + 1);
        frames.push(frame(function, symbol.code_info.as_deref(), unnamed));
        frames
    }
}

impl NativeFrame {
    fn unnamed(filename: String, module: &str) -> Self {
        Self { frame: Frame::at(filename, 0), function: None, module: module.to_owned() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_demangled_and_reduced_to_their_qualified_name() {
        let cases = [
            ("_Z10make_blockm", "make_block(unsigned long)", "make_block"),
            ("_ZnwmSt11align_val_t", "operator new(unsigned long, std::align_val_t)", "operator new"),
            ("_Znam", "operator new[](unsigned long)", "operator new[]"),
            (
                "_ZNSt6vectorIiSaIiEE17_M_realloc_insertIJRKiEEEvN9__gnu_cxx17__normal_iteratorIPiS1_EEDpOT_",
                "void std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>(__gnu_cxx::__normal_iterator<int*, std::vector<int, std::allocator<int> > >, int const&)",
                "std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>",
            ),
            ("_ZN5leaky10make_block17h0123456789abcdefE", "leaky::make_block", "leaky::make_block"),
            ("_RNvCs1234_5leaky10make_block", "leaky::make_block", "leaky::make_block"),
            ("__rust_alloc", "__rust_alloc", "__rust_alloc"),
            ("_PyObject_Malloc.lto_priv.0", "_PyObject_Malloc.lto_priv.0", "_PyObject_Malloc"),
            ("make_block", "make_block", "make_block"),
        ];
        for (raw, name, qualified) in cases {
            let function = Function::demangle(raw);
            assert_eq!((function.name.as_str(), function.qualified.as_str()), (name, qualified), "{raw}");
        }
    }
}
