//! Turns one process's kernel site keys into tracebacks a report can print:
//! Python frames when the allocation was made by Python code, native frames
//! otherwise, and with `--native` both, merged the way the stack really
//! nests. Native frames of allocation machinery (`allocators`) above the
//! first frame of the program's own code are left out, and native-only
//! tracebacks keep `--frames` frames from there. It is handed the stacks
//! `collect` read, never the maps. Native frames resolve from files and a
//! saved memory map, so they work after the process exits; Python frames
//! and stack copies must be read while the process lives, so they are
//! resolved as soon as the kernel announces them.

pub mod allocators;
pub mod native;
pub mod unwind;

use std::collections::{BTreeSet, HashMap};

use memtrace_common::{NativeStack, PythonStack, SiteKey, SiteStackCopy, StackKey};

use self::{
    allocators::AllocatorFrames,
    native::{NativeFrame, NativeSymbolizer},
    unwind::Unwinder,
};
use crate::{
    process::{Target, proc_maps::MemoryMap},
    python::code::{CodeResolver, ResolvedFrame},
    snapshot::{Frame, Traceback},
};

/// The C function that runs Python frames: in a mixed stack each of its
/// native frames stands for the Python frames it was running.
const EVAL_LOOP: &str = "_PyEval_EvalFrameDefault";

pub struct Symbolizer {
    map: MemoryMap,
    native: NativeSymbolizer,
    unwinder: Unwinder,
    python: Option<CodeResolver>,
    /// Mixed Python and native stacks (`--native`).
    mixed: bool,
    allocators: AllocatorFrames,
    /// Frames kept of a native-only traceback.
    frames: usize,
    /// What the left-out frames were, for the report to say.
    skipped: BTreeSet<&'static str>,
    /// Python stacks resolved while their code objects were alive.
    python_stacks: HashMap<u64, Vec<ResolvedFrame>>,
    /// Return addresses unwound from each site's stack copy (`--native`).
    unwound: HashMap<SiteKey, Vec<u64>>,
    tracebacks: HashMap<SiteKey, Traceback>,
}

impl Symbolizer {
    pub fn new(
        target: &Target,
        python: Option<CodeResolver>,
        mixed: bool,
        allocators: AllocatorFrames,
        frames: usize,
    ) -> Self {
        Self {
            map: target.map.clone(),
            native: NativeSymbolizer::new(target.paths.clone()),
            unwinder: Unwinder::new(target.paths.clone()),
            python,
            mixed,
            allocators,
            frames,
            skipped: BTreeSet::new(),
            python_stacks: HashMap::new(),
            unwound: HashMap::new(),
            tracebacks: HashMap::new(),
        }
    }

    /// Catches up with the live process's memory map (for libraries
    /// loaded since).
    pub fn set_map(&mut self, map: MemoryMap) {
        self.map = map;
    }

    /// Whether Python stack `id` still needs its code objects read.
    pub fn wants_python_stack(&self, id: u64) -> bool {
        self.python.is_some() && !self.python_stacks.contains_key(&id)
    }

    /// Reads the code objects of Python stack `id` from the process, once.
    pub fn resolve_python_stack(&mut self, id: u64, stack: &PythonStack) {
        let Some(resolver) = &mut self.python else { return };
        self.python_stacks.entry(id).or_insert_with(|| resolver.frames(stack));
    }

    /// Unwinds a new site's stack copy, while its libraries are mapped.
    pub fn unwind_site(&mut self, copy: &SiteStackCopy) {
        let pcs = self.unwinder.unwind(&self.map, copy);
        self.unwound.insert(copy.site, pcs);
    }

    /// The site's traceback; `native_stack` gives the stored native stack
    /// of a key, read when the site's traceback is first asked for.
    pub fn traceback(
        &mut self,
        site: &SiteKey,
        native_stack: impl FnOnce(StackKey) -> Option<NativeStack>,
    ) -> Traceback {
        if let Some(traceback) = self.tracebacks.get(site) {
            return traceback.clone();
        }
        let python = (site.python_stack != 0).then(|| self.python_stacks.get(&site.python_stack).cloned()).flatten();
        let resolved = site.python_stack == 0 || python.is_some();
        let native = self.native_pcs(site, native_stack);
        let frames = match python {
            Some(python) if python.iter().any(|f| f.frame.is_some()) => {
                if self.mixed {
                    let pieces = self.merge(&python, &native);
                    self.from_program(pieces)
                } else {
                    python.into_iter().filter_map(|f| f.frame).collect()
                }
            }
            _ => {
                let pieces =
                    native.iter().flat_map(|&pc| self.native.frames(&self.map, pc)).map(Piece::Native).collect();
                let mut frames = self.from_program(pieces);
                frames.truncate(self.frames);
                frames
            }
        };
        let traceback = Traceback(frames);
        // A Python stack not resolved yet may still be: keep asking.
        if resolved {
            self.tracebacks.insert(*site, traceback.clone());
        }
        traceback
    }

    /// What the native frames left out of tracebacks so far were
    /// (`allocators`' reasons), in order.
    pub fn skipped(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.skipped.iter().copied()
    }

    /// The site's native return addresses, innermost first: unwound from
    /// its stack copy when there is one, else the kernel's unwinding.
    fn native_pcs(&self, site: &SiteKey, native_stack: impl FnOnce(StackKey) -> Option<NativeStack>) -> Vec<u64> {
        if let Some(pcs) = self.unwound.get(site) {
            return pcs.clone();
        }
        let mut pcs = vec![site.caller];
        let key = StackKey { pid: site.pid, _pad: 0, id: site.native_stack };
        if let Some(stack) = (site.native_stack != 0).then(|| native_stack(key)).flatten() {
            // The kernel's stack starts at the caller too.
            pcs.extend(stack.frames.iter().take(stack.len as usize).skip(1));
        }
        pcs
    }

    /// Native frames with each eval-loop frame replaced by the Python
    /// frames it was running: up to and including the next entry frame.
    fn merge(&mut self, python: &[ResolvedFrame], native: &[u64]) -> Vec<Piece> {
        let mut python = python.iter();
        let mut pieces = Vec::new();
        for &pc in native {
            let frames = self.native.frames(&self.map, pc);
            // The eval loop's own frame is the outermost function at its pc.
            if frames.last().and_then(|f| f.function.as_ref()).is_some_and(|f| f.name.starts_with(EVAL_LOOP)) {
                for f in python.by_ref() {
                    pieces.extend(f.frame.clone().map(Piece::Python));
                    if f.entry {
                        break;
                    }
                }
            } else {
                pieces.extend(frames.iter().cloned().map(Piece::Native));
            }
        }
        // Frames the unwinding did not reach still belong to the stack.
        pieces.extend(python.filter_map(|f| f.frame.clone()).map(Piece::Python));
        pieces
    }

    /// The frames from the first that is the program's own code.
    fn from_program(&mut self, pieces: Vec<Piece>) -> Vec<Frame> {
        let (skip, reasons) = self.allocators.leading(pieces.iter().map(|p| match p {
            Piece::Native(frame) => Some(frame),
            Piece::Python(_) => None,
        }));
        self.skipped.extend(reasons);
        pieces
            .into_iter()
            .skip(skip)
            .map(|p| match p {
                Piece::Native(frame) => frame.frame,
                Piece::Python(frame) => frame,
            })
            .collect()
    }
}

/// A frame of a merged stack.
enum Piece {
    Native(NativeFrame),
    Python(Frame),
}
