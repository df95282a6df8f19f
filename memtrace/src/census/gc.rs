//! Walks the garbage collector's lists of a CPython process from outside:
//! every generation and the permanent generation of every interpreter,
//! counting the objects by type, as `gc.get_objects()` would see them. The
//! lists belong to a running process that may be changing them: each node
//! is checked (its `_gc_prev` must name the node before it), every walk is
//! bounded in steps, and a list that stops making sense is left out with
//! the reason, never counted in part as if complete.

use rustc_hash::{FxHashMap, FxHashSet};

use crate::{
    process::memory::{AddressSpace, Fault, PageCache},
    python::layouts::{GcState, Layout},
};

/// Objects counted before a census gives up: far more than any process
/// memtrace has met, and a bound on a list that cycles without its head.
pub const MAX_OBJECTS: u64 = 50_000_000;
/// Distinct types one list may name before it is taken for no list of
/// objects: a process has thousands, a forged list one per node, each a
/// table entry memtrace would keep.
const MAX_TYPES: usize = 1 << 20;
/// Interpreters followed along `_PyRuntime.interpreters`.
const MAX_INTERPRETERS: usize = 64;
/// `_gc_prev` keeps flags in its two low bits (`_PyGC_PREV_MASK`).
const PREV_MASK: u64 = !3;
/// `_gc_next`'s low bit marks an object the collector is moving between
/// lists (`NEXT_MASK_UNREACHABLE`): set only while a collection runs.
const NEXT_UNREACHABLE: u64 = 1;

/// What one walk found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcCensus {
    /// Objects by the address of their type.
    pub by_type: FxHashMap<u64, u64>,
    /// Objects in generations 0, 1, 2 of every interpreter: what
    /// `gc.get_objects()` returns.
    pub tracked: u64,
    /// Objects in the permanent generations (frozen by `gc.freeze()`).
    pub permanent: u64,
    /// Why the walk stopped early, if it did: the counts are then partial.
    pub stopped: Option<String>,
    /// (object, type) of every object whose type is one of those watched.
    pub watched: Vec<(u64, u64)>,
}

/// Counts the objects on every GC list of the process whose `_PyRuntime`
/// is at `runtime`, through `memory`, and lists those of the `watched`
/// types.
pub fn walk<A: AddressSpace>(
    memory: &mut PageCache<A>,
    layout: &Layout,
    runtime: u64,
    watched: &FxHashSet<u64>,
) -> GcCensus {
    let mut census = GcCensus::default();
    if let Err(stop) = walk_all(memory, layout, runtime, watched, &mut census) {
        census.stopped = Some(stop);
    }
    census
}

fn walk_all<A: AddressSpace>(
    memory: &mut PageCache<A>,
    layout: &Layout,
    runtime: u64,
    watched: &FxHashSet<u64>,
    census: &mut GcCensus,
) -> Result<(), String> {
    let gc = &layout.gc;
    let states: Vec<u64> = match gc.state {
        // One collector for every interpreter.
        GcState::InRuntime(offset) => vec![runtime.wrapping_add(offset)],
        GcState::InInterpreter(offset) => {
            interpreters(memory, layout, runtime)?.iter().map(|i| i.wrapping_add(offset)).collect()
        }
    };
    // A list that does not add up is left out, with the reason; the others
    // are still counted.
    let mut stopped = None;
    for state in states {
        for generation in 0..=gc.generation_count {
            let permanent = generation == gc.generation_count;
            let head = match permanent {
                true => state.wrapping_add(gc.permanent_generation),
                false => state.wrapping_add(gc.generations + generation * gc.generation_size),
            };
            match walk_list(memory, layout, head, census.tracked + census.permanent, watched) {
                Ok((list, objects)) => {
                    census.watched.extend(objects);
                    *if permanent { &mut census.permanent } else { &mut census.tracked } += list.values().sum::<u64>();
                    for (object_type, count) in list {
                        *census.by_type.entry(object_type).or_default() += count;
                    }
                }
                Err(why) => {
                    let list =
                        if permanent { "the permanent generation".into() } else { format!("generation {generation}") };
                    stopped.get_or_insert(format!("{list} not counted: {why}"));
                }
            }
        }
    }
    stopped.map_or(Ok(()), Err)
}

/// The interpreters, main first, along `_PyRuntime.interpreters.head`.
fn interpreters<A: AddressSpace>(memory: &mut PageCache<A>, layout: &Layout, runtime: u64) -> Result<Vec<u64>, String> {
    let mut found = Vec::new();
    let mut next =
        memory.u64(runtime.wrapping_add(layout.interpreters_head)).map_err(|f| read_failure(f, "_PyRuntime"))?;
    while next != 0 {
        if found.len() == MAX_INTERPRETERS || found.contains(&next) {
            return Err("the interpreter list does not end".into());
        }
        found.push(next);
        next = memory.u64(next.wrapping_add(layout.interp_next)).map_err(|f| read_failure(f, "an interpreter"))?;
    }
    if found.is_empty() {
        return Err("the process has no interpreter yet".into());
    }
    Ok(found)
}

/// Counts one circular list from its head, by type, `counted` objects
/// having been counted before it; and lists its objects of `watched` types.
fn walk_list<A: AddressSpace>(
    memory: &mut PageCache<A>,
    layout: &Layout,
    head: u64,
    counted: u64,
    watched: &FxHashSet<u64>,
) -> Result<(FxHashMap<u64, u64>, Vec<(u64, u64)>), String> {
    let gc_head = layout.gc_head_size;
    let mut previous = head;
    let mut node = memory.u64(head).map_err(|f| read_failure(f, "a generation's list head"))?;
    let mut by_type = FxHashMap::default();
    let mut objects = Vec::new();
    let mut count = 0;
    while node != head {
        if node & NEXT_UNREACHABLE != 0 {
            return Err("a collection was running".into());
        }
        if counted + count >= MAX_OBJECTS {
            return Err(format!("more than {MAX_OBJECTS} objects: the list may cycle"));
        }
        // PyGC_Head {_gc_next, _gc_prev}; the object, whose ob_type follows
        // ob_refcnt, right after it.
        let fault = |f| read_failure(f, "an object on a GC list");
        let (next, prev) = (memory.u64(node).map_err(fault)?, memory.u64(node.wrapping_add(8)).map_err(fault)?);
        if prev & PREV_MASK != previous {
            return Err("list changed under the reader".into());
        }
        let object_type = memory.u64(node.wrapping_add(gc_head + 8)).map_err(fault)?;
        if by_type.len() == MAX_TYPES && !by_type.contains_key(&object_type) {
            return Err(format!("more than {MAX_TYPES} types: not a list of objects"));
        }
        *by_type.entry(object_type).or_default() += 1;
        if watched.contains(&object_type) {
            objects.push((node.wrapping_add(gc_head), object_type));
        }
        count += 1;
        previous = node;
        node = next;
    }
    Ok((by_type, objects))
}

fn read_failure(fault: Fault, what: &str) -> String {
    match fault {
        Fault::Unmapped => format!("{what} could not be read (a pointer into unmapped memory, or the process exited)"),
        Fault::OverBudget => format!("the census read more of the process's memory than it may ({what})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::memory::Image, python::layouts::PY312};

    /// A 3.12 process image: `_PyRuntime` at 0x1000 naming one interpreter
    /// at 0x10000, whose generation 0 holds `objects` (each the type of one
    /// object) and whose other lists are empty.
    fn image(types: &[u64]) -> (Image, u64) {
        let runtime = 0x1000;
        let interp = 0x10000;
        let GcState::InInterpreter(gc) = PY312.gc.state else { unreachable!() };
        let state = interp + gc;
        let mut image = Image::default();
        image.write_u64(runtime + PY312.interpreters_head, interp);
        image.write_u64(interp + PY312.interp_next, 0);
        let heads: Vec<u64> = (0..PY312.gc.generation_count)
            .map(|g| state + PY312.gc.generations + g * PY312.gc.generation_size)
            .chain([state + PY312.gc.permanent_generation])
            .collect();
        for &head in &heads {
            image.write_u64(head, head);
            image.write_u64(head + 8, head);
        }
        let nodes: Vec<u64> = (0..types.len() as u64).map(|i| 0x100000 + i * 64).collect();
        let mut previous = heads[0];
        for (&node, &object_type) in nodes.iter().zip(types) {
            image.write_u64(previous, node);
            image.write_u64(node + 8, previous | 2);
            image.write_u64(node + 16, 1);
            image.write_u64(node + 24, object_type);
            previous = node;
        }
        image.write_u64(previous, heads[0]);
        image.write_u64(heads[0] + 8, previous);
        (image, runtime)
    }

    fn census_of(image: Image, runtime: u64) -> GcCensus {
        walk(&mut PageCache::new(image, 1 << 30), &PY312, runtime, &FxHashSet::default())
    }

    #[test]
    fn counts_every_object_by_type() {
        let (image, runtime) = image(&[0xa000, 0xb000, 0xa000, 0xa000]);
        let census = census_of(image, runtime);
        assert_eq!(census.stopped, None);
        assert_eq!((census.tracked, census.permanent), (4, 0));
        assert_eq!(census.by_type, FxHashMap::from_iter([(0xa000, 3), (0xb000, 1)]));
    }

    #[test]
    fn lists_the_objects_of_watched_types() {
        let (image, runtime) = image(&[0xa000, 0xb000, 0xa000]);
        let census = walk(&mut PageCache::new(image, 1 << 30), &PY312, runtime, &FxHashSet::from_iter([0xa000]));
        // Each object follows its 16-byte PyGC_Head; nodes are 64 bytes apart.
        assert_eq!(census.watched, vec![(0x100000 + 16, 0xa000), (0x100000 + 128 + 16, 0xa000)]);
    }

    #[test]
    fn a_list_that_changed_is_reported_not_counted_as_complete() {
        let (mut image, runtime) = image(&[0xa000, 0xa000, 0xa000]);
        // The second node's back pointer names another node.
        image.write_u64(0x100000 + 64 + 8, 0x200000);
        let census = census_of(image, runtime);
        assert_eq!(census.stopped.as_deref(), Some("generation 0 not counted: list changed under the reader"));
        assert_eq!((census.tracked, census.by_type.len()), (0, 0), "nothing of that list is counted");
    }

    #[test]
    fn a_cycle_that_skips_the_head_stops() {
        let (mut image, runtime) = image(&[0xa000, 0xa000]);
        // The second node points back to the first, which points on to it.
        image.write_u64(0x100000 + 64, 0x100000);
        let census = census_of(image, runtime);
        assert_eq!(census.stopped.as_deref(), Some("generation 0 not counted: list changed under the reader"));
    }

    #[test]
    fn a_pointer_into_unmapped_memory_stops() {
        let (mut image, runtime) = image(&[0xa000]);
        image.write_u64(0x100000, 0xdead_0000);
        let census = census_of(image, runtime);
        assert!(census.stopped.as_deref().unwrap().contains("unmapped"), "{census:?}");
    }

    #[test]
    fn a_list_naming_more_types_than_a_process_has_stops() {
        let types: Vec<u64> = (0..=MAX_TYPES as u64).map(|i| 0x1_0000_0000 + i * 8).collect();
        let (image, runtime) = image(&types);
        let census = census_of(image, runtime);
        assert_eq!(
            census.stopped.as_deref(),
            Some("generation 0 not counted: more than 1048576 types: not a list of objects")
        );
        assert!(census.by_type.is_empty());
    }

    #[test]
    fn a_collection_in_progress_stops() {
        let (mut image, runtime) = image(&[0xa000, 0xa000]);
        image.write_u64(0x100000, (0x100000 + 64) | NEXT_UNREACHABLE);
        assert_eq!(
            census_of(image, runtime).stopped.as_deref(),
            Some("generation 0 not counted: a collection was running")
        );
    }
}
