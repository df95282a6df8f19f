//! Turns kernel site keys into tracebacks a report can print: Python frames
//! when the allocation was made by Python code, native frames otherwise.
//! Native frames resolve from files and a saved memory map, so they work
//! after the target exits; Python frames must be read from the live
//! process, so `refresh` resolves new Python stacks as soon as they appear.

pub mod native;

use std::collections::HashMap;

use memtrace_common::SiteKey;

use self::native::NativeSymbolizer;
use crate::{
    collect,
    probes::attach::Tracer,
    python::code::CodeResolver,
    snapshot::{Frame, Traceback},
    target::{Target, maps::MemoryMap},
};

pub struct Symbolizer {
    pid: u32,
    map: MemoryMap,
    native: NativeSymbolizer,
    python: Option<CodeResolver>,
    /// Python stacks resolved while their code objects were alive.
    python_stacks: HashMap<u64, Vec<Frame>>,
    tracebacks: HashMap<SiteKey, Traceback>,
}

impl Symbolizer {
    pub fn new(target: &Target, python: Option<CodeResolver>) -> Self {
        Self {
            pid: target.pid,
            map: target.map.clone(),
            native: NativeSymbolizer::new(target.pid),
            python,
            python_stacks: HashMap::new(),
            tracebacks: HashMap::new(),
        }
    }

    /// Catches up with the live process: a fresh memory map (for libraries
    /// loaded since) and any Python stack not resolved yet. Does nothing once
    /// the target is gone.
    pub fn refresh(&mut self, tracer: &Tracer) {
        if !Target::is_alive(self.pid) {
            return;
        }
        if let Ok(map) = MemoryMap::read(self.pid) {
            self.map = map;
        }
        if self.python.is_some()
            && let Ok(ids) = collect::python_stack_ids(tracer)
        {
            for id in ids {
                self.resolve_python_stack(tracer, id);
            }
        }
    }

    /// Reads the code objects of Python stack `id` from the target, once.
    pub fn resolve_python_stack(&mut self, tracer: &Tracer, id: u64) {
        let Some(resolver) = &mut self.python else { return };
        if self.python_stacks.contains_key(&id) {
            return;
        }
        if let Some(stack) = collect::python_stack(tracer, id) {
            self.python_stacks.insert(id, resolver.frames(&stack));
        }
    }

    pub fn traceback(&mut self, tracer: &Tracer, site: &SiteKey) -> Traceback {
        if let Some(traceback) = self.tracebacks.get(site) {
            return traceback.clone();
        }
        let python = (site.python_stack != 0).then(|| self.python_stacks.get(&site.python_stack)).flatten();
        let resolved = site.python_stack == 0 || python.is_some();
        let frames = match python {
            Some(frames) if !frames.is_empty() => frames.clone(),
            _ => self.native_frames(tracer, site),
        };
        let traceback = Traceback(frames);
        // A Python stack not resolved yet may still be: keep asking.
        if resolved {
            self.tracebacks.insert(*site, traceback.clone());
        }
        traceback
    }

    fn native_frames(&mut self, tracer: &Tracer, site: &SiteKey) -> Vec<Frame> {
        let stack = (site.native_stack != 0).then(|| collect::native_stack(tracer, site.native_stack)).flatten();
        let mut addrs = vec![site.caller];
        if let Some(stack) = stack {
            // The stack starts at the caller too.
            addrs.extend(stack.frames.iter().take(stack.len as usize).skip(1));
        }
        addrs.iter().map(|&addr| self.native.frame(&self.map, addr)).collect()
    }
}
