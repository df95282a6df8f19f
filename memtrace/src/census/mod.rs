//! The census: what a process holds, read from its memory with no probe at
//! all, so it costs the process nothing: its memory as the kernel counts it
//! (`memory`), pymalloc's live blocks (`pymalloc`), the objects on the
//! garbage collector's lists (`gc`) and those it does not track, found in
//! pymalloc's pools (`pools`), named by type (`types`). [`CensusTaker`]
//! takes one of a process now; the report compares it with the previous.

pub mod gc;
pub mod memory;
pub mod pools;
pub mod pymalloc;
pub mod schedule;
pub mod types;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

use self::{
    memory::Memory,
    pymalloc::PymallocState,
    types::{TypeInfo, TypeNames},
};
use crate::{
    process::memory::{AddressSpace, PageCache, ProcessMemory},
    python::layouts::Layout,
};

/// Walks of the GC's lists tried before one that moved is left out.
const GC_ATTEMPTS: usize = 3;
/// The most of a process's memory one census copies.
const MAX_COPIED: usize = 2 << 30;

/// One process's census at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Census {
    pub memory: Option<Memory>,
    /// pymalloc's own count, when memtrace can read it.
    pub heap: Option<pymalloc::Census>,
    /// The objects by type, when the process is a CPython memtrace reads.
    pub objects: Option<ObjectCensus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectCensus {
    /// By type name, biggest first.
    pub types: Vec<TypeCount>,
    /// On generations 0 to 2 of the GC's lists: `len(gc.get_objects())`.
    pub gc_tracked: u64,
    /// On the permanent generation (`gc.freeze()`).
    pub gc_permanent: u64,
    /// Objects the GC does not track, found in pymalloc's pools.
    pub untracked: u64,
    /// Blocks of pymalloc's pools that hold no object (buffers, free lists).
    pub other_blocks: u64,
    /// How long it took, and how much of the process's memory it copied.
    pub took: Duration,
    pub copied: usize,
    /// Why a part of it is partial, each a sentence; empty when complete.
    pub incomplete: Vec<String>,
    /// The address of every object of the watched types (see
    /// [`CensusTaker::watch`]); not part of a saved census.
    #[serde(skip)]
    pub watched: FxHashSet<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeCount {
    /// As `type(o).__name__`.
    pub name: String,
    /// Found on the GC's lists, and in pymalloc's pools.
    pub tracked: u64,
    pub untracked: u64,
}

impl TypeCount {
    pub fn count(&self) -> u64 {
        self.tracked + self.untracked
    }
}

/// Takes censuses of one process.
pub struct CensusTaker {
    pid: u32,
    python: Option<(Layout, u64)>,
    pymalloc: Option<PymallocState>,
    types: TypeNames,
    watched: FxHashSet<u64>,
}

impl CensusTaker {
    /// For process `pid`; `python` is its interpreter's layout and the
    /// address of its `_PyRuntime`, when memtrace reads it.
    pub fn new(pid: u32, python: Option<(Layout, u64)>, pymalloc: Option<PymallocState>) -> Self {
        Self { pid, python, pymalloc, types: TypeNames::default(), watched: FxHashSet::default() }
    }

    /// From the next census on, lists the objects of the types at these
    /// addresses (`ObjectCensus::watched`).
    pub fn watch(&mut self, types: FxHashSet<u64>) {
        self.watched = types;
    }

    /// Every type of the process whose name `matches` (as censuses name
    /// them), with its address: the types of the objects the last census
    /// found, and the classes on the GC's lists, which need no instance to
    /// be found. Takes a walk of the GC's lists.
    pub fn types_named(&mut self, matches: impl Fn(&str) -> bool) -> Vec<(u64, TypeInfo)> {
        let Some((layout, runtime)) = self.python else { return Vec::new() };
        let reader = ProcessMemory::new(self.pid);
        let mut cache = PageCache::new(&reader, MAX_COPIED);
        let metatypes: FxHashSet<u64> = self.types.checked().map(|(_, info)| info.metatype).collect();
        let classes = gc::walk(&mut cache, &layout, runtime, &metatypes).watched;
        let mut found: Vec<(u64, TypeInfo)> =
            self.types.checked().filter(|(_, info)| matches(&info.name)).map(|(a, i)| (a, i.clone())).collect();
        for (class, _) in classes {
            if let Some(info) = self.types.get(&mut cache, &layout, class)
                && matches(&info.name)
                && !found.iter().any(|(a, _)| *a == class)
            {
                found.push((class, info.clone()));
            }
        }
        found.sort_by_key(|(address, _)| *address);
        found
    }

    pub fn take(&mut self) -> Census {
        let memory = Memory::read(self.pid).ok();
        Census { memory, ..self.take_from(&ProcessMemory::new(self.pid)) }
    }

    /// The kernel's count of the process's memory only: what host mode
    /// reads at every report of a process whose census waits its turn.
    pub fn take_memory(&self) -> Census {
        Census { memory: Memory::read(self.pid).ok(), heap: None, objects: None }
    }

    /// The census of what `reader` holds (the process's memory, or an
    /// image of it), without the kernel's count of its memory.
    pub fn take_from<A: AddressSpace>(&mut self, reader: &A) -> Census {
        let pools = self.pymalloc.as_ref().map(|state| state.pools(reader));
        let heap = pools.as_ref().and_then(|p| p.as_ref().ok()).map(|(_, census)| *census);
        let objects = self.python.map(|(layout, runtime)| {
            let started = Instant::now();
            self.types.next_census();
            // A list the process changed while it was read is read again,
            // from fresh copies, a few times before it is left out.
            let mut attempts = 0;
            let (mut cache, found) = loop {
                let mut cache = PageCache::new(reader, MAX_COPIED);
                let found = gc::walk(&mut cache, &layout, runtime, &self.watched);
                attempts += 1;
                if found.stopped.is_none() || attempts == GC_ATTEMPTS {
                    break (cache, found);
                }
            };
            let mut incomplete: Vec<String> = found.stopped.iter().map(|why| format!("GC lists: {why}")).collect();
            let untracked = match &pools {
                Some(Ok((pools, _))) => pools::scan(&mut cache, &layout, &mut self.types, pools, &self.watched),
                Some(Err(e)) => {
                    incomplete.push(format!("untracked objects not counted: {e}"));
                    pools::PoolObjects::default()
                }
                None => {
                    incomplete.push("untracked objects not counted: pymalloc's state was not found".into());
                    pools::PoolObjects::default()
                }
            };
            incomplete.extend(untracked.stopped.iter().map(|why| format!("pymalloc's pools: {why}")));
            if untracked.inconsistent_pools > 0 {
                incomplete.push(format!("{} pools changed while read and were skipped", untracked.inconsistent_pools));
            }
            let mut by_name: HashMap<String, TypeCount> = HashMap::new();
            let mut unnamed = 0;
            for (tracked, counts) in [(true, &found.by_type), (false, &untracked.by_type)] {
                for (&address, &count) in counts {
                    let Some(info) = self.types.get(&mut cache, &layout, address) else {
                        unnamed += count;
                        continue;
                    };
                    let entry = by_name
                        .entry(info.name.clone())
                        .or_insert_with(|| TypeCount { name: info.name.clone(), ..TypeCount::default() });
                    if tracked {
                        entry.tracked += count;
                    } else {
                        entry.untracked += count;
                    }
                }
            }
            if unnamed > 0 {
                incomplete.push(format!("{unnamed} objects on the GC's lists have a type that is not one"));
            }
            let mut types: Vec<TypeCount> = by_name.into_values().collect();
            types.sort_by(|a, b| b.count().cmp(&a.count()).then_with(|| a.name.cmp(&b.name)));
            ObjectCensus {
                types,
                gc_tracked: found.tracked,
                gc_permanent: found.permanent,
                untracked: untracked.by_type.values().sum(),
                other_blocks: untracked.other_blocks,
                took: started.elapsed(),
                copied: cache.copied(),
                watched: found.watched.iter().chain(&untracked.watched).map(|&(object, _)| object).collect(),
                incomplete,
            }
        });
        Census { memory: None, heap, objects }
    }
}
