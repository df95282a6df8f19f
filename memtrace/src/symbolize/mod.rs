//! Turns one process's kernel site keys into tracebacks a report can print:
//! Python frames when the allocation was made by Python code, native frames
//! otherwise, and with `--native` both, merged the way the stack really
//! nests. It is handed the stacks `collect` read, never the maps. Native
//! frames resolve from files and a saved memory map, so they work after the
//! process exits; Python frames and stack copies must be read while the
//! process lives, so they are resolved as soon as the kernel announces them.

pub mod native;
pub mod unwind;

use std::collections::HashMap;

use memtrace_common::{NativeStack, PythonStack, SiteKey, SiteStackCopy, StackKey};

use self::{native::NativeSymbolizer, unwind::Unwinder};
use crate::{
    process::{Target, proc_maps::MemoryMap},
    python::code::{CodeResolver, ResolvedFrame},
    snapshot::{Frame, Traceback},
};

/// The C function that runs Python frames: in a mixed stack each of its
/// native frames stands for the Python frames it was running.
const EVAL_LOOP: &str = "_PyEval_EvalFrameDefault";

pub struct Symbolizer {
    pid: u32,
    map: MemoryMap,
    native: NativeSymbolizer,
    unwinder: Unwinder,
    python: Option<CodeResolver>,
    /// Mixed Python and native stacks (`--native`).
    mixed: bool,
    /// Python stacks resolved while their code objects were alive.
    python_stacks: HashMap<u64, Vec<ResolvedFrame>>,
    /// Return addresses unwound from each site's stack copy (`--native`).
    unwound: HashMap<SiteKey, Vec<u64>>,
    tracebacks: HashMap<SiteKey, Traceback>,
}

impl Symbolizer {
    pub fn new(target: &Target, python: Option<CodeResolver>, mixed: bool) -> Self {
        Self {
            pid: target.pid,
            map: target.map.clone(),
            native: NativeSymbolizer::new(target.paths.clone()),
            unwinder: Unwinder::new(target.paths.clone()),
            python,
            mixed,
            python_stacks: HashMap::new(),
            unwound: HashMap::new(),
            tracebacks: HashMap::new(),
        }
    }

    /// Catches up with the live process's memory map (for libraries loaded
    /// since). Does nothing once the process is gone.
    pub fn refresh_map(&mut self) {
        if Target::is_alive(self.pid)
            && let Ok(map) = MemoryMap::read(self.pid)
        {
            self.map = map;
        }
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
                    self.merge(&python, &native)
                } else {
                    python.into_iter().filter_map(|f| f.frame).collect()
                }
            }
            _ => native.iter().map(|&pc| self.native.frame(&self.map, pc)).collect(),
        };
        let traceback = Traceback(frames);
        // A Python stack not resolved yet may still be: keep asking.
        if resolved {
            self.tracebacks.insert(*site, traceback.clone());
        }
        traceback
    }

    /// The site's native return addresses, innermost first: unwound from
    /// its stack copy when there is one, else the caller and whatever the
    /// kernel's frame-pointer walk found.
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
    fn merge(&mut self, python: &[ResolvedFrame], native: &[u64]) -> Vec<Frame> {
        let mut python = python.iter();
        let mut frames = Vec::new();
        for &pc in native {
            let resolved = self.native.frame(&self.map, pc);
            if resolved.function.as_deref().is_some_and(|f| f.starts_with(EVAL_LOOP)) {
                for f in python.by_ref() {
                    frames.extend(f.frame.clone());
                    if f.entry {
                        break;
                    }
                }
            } else {
                frames.push(resolved);
            }
        }
        // Frames the unwinding did not reach still belong to the stack.
        frames.extend(python.filter_map(|f| f.frame.clone()));
        frames
    }
}
