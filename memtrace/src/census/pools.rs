//! Objects the garbage collector does not track, found where they live: in
//! pymalloc's pools. Many leaks are of such objects (bytes, str, int,
//! float, and the tuples and dicts the collector has untracked), which no
//! GC list shows. Each allocated block of a pool in use (below the pool's
//! `nextoffset` and not on its `freeblock` list) is read as an object, a
//! GC object (after its PyGC_Head) or one with a pre-header, whichever
//! holds a checked type; a GC object counts here only when untracked
//! (`_gc_next` is 0), since the GC walk counts the tracked ones. Objects
//! larger than pymalloc's 512-byte limit are malloc's and are not seen.

use rustc_hash::{FxHashMap, FxHashSet};

use super::{
    pymalloc::Pool,
    types::{HAVE_GC, TypeInfo, TypeNames},
};
use crate::{
    process::memory::{AddressSpace, PageCache},
    python::layouts::Layout,
};

/// What the pools hold that the GC does not track.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolObjects {
    /// Objects by the address of their type.
    pub by_type: FxHashMap<u64, u64>,
    /// Allocated blocks that held no object of a checked type (buffers
    /// such as list item arrays, dict keys, or objects being built).
    pub other_blocks: u64,
    /// Pools whose free list did not add up with their count: they
    /// changed while read, or are not what they seemed.
    pub inconsistent_pools: u64,
    /// Why the scan stopped early, if it did.
    pub stopped: Option<String>,
    /// (object, type) of every object found of the types watched.
    pub watched: Vec<(u64, u64)>,
}

pub fn scan<A: AddressSpace>(
    memory: &mut PageCache<A>,
    layout: &Layout,
    types: &mut TypeNames,
    pools: &[Pool],
    watched: &FxHashSet<u64>,
) -> PoolObjects {
    let mut found = PoolObjects::default();
    for pool in pools {
        if let Err(stop) = scan_pool(memory, layout, types, pool, watched, &mut found) {
            found.stopped = Some(stop);
            break;
        }
    }
    found
}

fn scan_pool<A: AddressSpace>(
    memory: &mut PageCache<A>,
    layout: &Layout,
    types: &mut TypeNames,
    pool: &Pool,
    watched: &FxHashSet<u64>,
    found: &mut PoolObjects,
) -> Result<(), String> {
    let pymalloc = &layout.pymalloc;
    let header = &pymalloc.pool_header;
    let unreadable = |_| "a pool could not be read (freed while read?)".to_owned();
    let size = pool.block_size;
    let first = header.size;
    let end = u64::from(memory.u32(pool.address + header.nextoffset).map_err(unreadable)?).min(pymalloc.pool_size);
    let capacity = end.saturating_sub(first) / size;
    // The free list runs through the freed blocks' first words.
    let mut free = Vec::new();
    let mut next = memory.u64(pool.address + header.freeblock).map_err(unreadable)?;
    while next != 0 && (free.len() as u64) < capacity {
        let offset = next.wrapping_sub(pool.address);
        if !(first..end).contains(&offset) || !(offset - first).is_multiple_of(size) {
            break;
        }
        free.push(offset);
        next = memory.u64(next).map_err(unreadable)?;
    }
    free.sort_unstable();
    if capacity - free.len() as u64 != pool.used {
        found.inconsistent_pools += 1;
        return Ok(());
    }
    // A pool's blocks are one size, mostly of one type: the reading that
    // found the last block's object is tried first for the next.
    let mut hint = 0;
    for offset in (first..first + capacity * size).step_by(size as usize) {
        if free.binary_search(&offset).is_err() {
            match untracked_object(memory, layout, types, pool.address + offset, &mut hint) {
                Some(Some((object, object_type))) => {
                    *found.by_type.entry(object_type).or_default() += 1;
                    // An object CPython keeps on a free list for reuse
                    // (dicts, tuples) still names its type, but its
                    // reference count is 0: it is dead.
                    if watched.contains(&object_type) && memory.u64(object).is_ok_and(|refcount| refcount != 0) {
                        found.watched.push((object, object_type));
                    }
                }
                Some(None) => {}
                None => found.other_blocks += 1,
            }
        }
    }
    Ok(())
}

/// The block at `block` as an object: Some(Some((object, type))) for an
/// object the GC does not track, Some(None) for a tracked one (counted by the GC
/// walk), None for no object of a checked type.
fn untracked_object<A: AddressSpace>(
    memory: &mut PageCache<A>,
    layout: &Layout,
    types: &mut TypeNames,
    block: u64,
    hint: &mut usize,
) -> Option<Option<(u64, u64)>> {
    let gc_head = layout.gc_head_size;
    // Where the object would start: the block itself (no GC header), after
    // its PyGC_Head, or after a two-word pre-header too (3.11+ managed dict
    // or weak references); each is right for the types it is right for.
    let candidates = [(block, None), (block + gc_head, Some(false)), (block + 16 + gc_head, Some(true))];
    let fits = |info: &TypeInfo, gc: Option<bool>| match gc {
        None => info.flags & HAVE_GC == 0,
        Some(preheader) => info.flags & HAVE_GC != 0 && (info.flags & layout.preheader_flags != 0) == preheader,
    };
    let type_of = |memory: &mut PageCache<A>, object: u64| memory.u64(object + 8).ok();
    // Types already met are asked for first: a block's other readings hold
    // pointers of every kind, and checking each as a type is what costs.
    let order = [*hint, (*hint + 1) % 3, (*hint + 2) % 3];
    let mut found = None;
    for i in order {
        let (object, gc) = candidates[i];
        if let Some(t) = type_of(memory, object)
            && types.known(t).is_some_and(|info| fits(info, gc))
        {
            found = Some((i, object, gc, t));
            break;
        }
    }
    if found.is_none() {
        for (i, &(object, gc)) in candidates.iter().enumerate() {
            if let Some(t) = type_of(memory, object)
                && types.get(memory, layout, t).is_some_and(|info| fits(info, gc))
            {
                found = Some((i, object, gc, t));
                break;
            }
        }
    }
    let (i, object, gc, object_type) = found?;
    *hint = i;
    if gc.is_none() {
        return Some(Some((object, object_type)));
    }
    // `_gc_next` is 0 for an object the collector does not track.
    let tracked = memory.u64(object - gc_head).ok()? != 0;
    Some((!tracked).then_some((object, object_type)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::memory::Image, python::layouts::PY312};

    const TYPE: u64 = 0x1000;
    const BYTES: u64 = 0x2000;
    const TUPLE: u64 = 0x3000;
    const POOL: u64 = 0x40000;

    /// `type`, a non-GC `bytes` and a GC `tuple`, and a 16 KiB pool of
    /// 48-byte blocks: block 0 a bytes object, 1 free, 2 an untracked
    /// tuple, 3 a tracked tuple, 4 a buffer; `nextoffset` after block 4.
    fn image() -> Image {
        let mut image = Image::default();
        const READY: u64 = 1 << 12;
        for (address, name, flags) in [(TYPE, 0x8000, 1 << 31), (BYTES, 0x8100, 0), (TUPLE, 0x8200, HAVE_GC)] {
            image.write_u64(address + 8, TYPE);
            image.write_u64(address + PY312.type_flags, flags | READY);
            image.write_u64(address + PY312.type_name, name);
            image.write_u64(address + PY312.type_basicsize, 32);
        }
        image.write_bytes(0x8000, b"type\0");
        image.write_bytes(0x8100, b"bytes\0");
        image.write_bytes(0x8200, b"tuple\0");
        let block = |i: u64| POOL + 48 + i * 48;
        image.write_u64(block(0) + 8, BYTES);
        image.write_u64(POOL + PY312.pymalloc.pool_header.freeblock, block(1));
        image.write_u64(block(1), 0);
        image.write_u64(block(2), 0);
        image.write_u64(block(2) + 16, 1);
        image.write_u64(block(2) + 16 + 8, TUPLE);
        image.write_u64(block(3), 0x7777_0000);
        image.write_u64(block(3) + 16 + 8, TUPLE);
        image.write_u64(block(4) + 8, 0x1234);
        image.write_u64(POOL + PY312.pymalloc.pool_header.nextoffset, 48 + 5 * 48);
        image.write_u64(POOL + PY312.pymalloc.pool_size - 8, 0);
        image
    }

    fn scan_image(image: Image, used: u64) -> PoolObjects {
        let pool = Pool { address: POOL, block_size: 48, used };
        scan(
            &mut PageCache::new(image, 1 << 20),
            &PY312,
            &mut TypeNames::default(),
            &[pool],
            &FxHashSet::from_iter([TUPLE]),
        )
    }

    #[test]
    fn counts_untracked_objects_and_skips_free_and_tracked_blocks() {
        let found = scan_image(image(), 4);
        assert_eq!(found.by_type, FxHashMap::from_iter([(BYTES, 1), (TUPLE, 1)]));
        assert_eq!(found.watched, vec![(POOL + 48 + 2 * 48 + 16, TUPLE)], "the untracked tuple, after its PyGC_Head");
        assert_eq!((found.other_blocks, found.inconsistent_pools, found.stopped), (1, 0, None));
    }

    #[test]
    fn a_pool_whose_count_disagrees_is_not_read_as_objects() {
        let found = scan_image(image(), 3);
        assert_eq!((found.by_type.len(), found.inconsistent_pools), (0, 1));
    }

    #[test]
    fn a_free_list_that_cycles_or_leaves_the_pool_ends() {
        let mut image = image();
        image.write_u64(POOL + 48 + 48, POOL + 48 + 48);
        assert_eq!(scan_image(image, 4).inconsistent_pools, 1, "a cycle fills the capacity, then disagrees");
        let mut image = self::image();
        image.write_u64(POOL + 48 + 48, 0xdead_0000);
        assert_eq!(scan_image(image, 4).by_type.len(), 2, "a pointer out of the pool ends the list");
    }
}
