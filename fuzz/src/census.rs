//! A forged CPython heap for the census: `_PyRuntime`, an interpreter, the
//! GC's generations, type objects (with a class's `__module__` in its
//! dict), and one pymalloc arena whose pools hold the objects, tracked on
//! the generations' lists, untracked, or free; as the version's layout
//! table says CPython lays them out.

use arbitrary::Arbitrary;
use memtrace::{
    census::{
        Census, CensusTaker,
        pymalloc::{Anchor, PymallocState},
        types::HAVE_GC,
    },
    python::layouts::{DictTable, GcState, Layout, UNICODE_ASCII, UNICODE_COMPACT},
};

use crate::{Corruption, Forge};

pub const RUNTIME: u64 = 0x10_0000;
const INTERPRETER: u64 = 0x20_0000;
const TYPES: u64 = 0x30_0000;
const NAMES: u64 = 0x34_0000;
const DICTS: u64 = 0x36_0000;
const STATICS: u64 = 0x38_0000;
const ARENA_TABLE: u64 = 0x39_0000;
const ARENA: u64 = 0x1000_0000;
/// `maxarenas`: the table's first size.
const ARENAS: u64 = 16;
/// Every block is of this size class: room for a pre-header, a PyGC_Head
/// and an object's two words.
const BLOCK: u64 = 64;

/// CPython's type flags (Include/object.h).
const TYPE_SUBCLASS: u64 = 1 << 31;
const READY: u64 = 1 << 12;
const HEAPTYPE: u64 = 1 << 9;

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub version: u8,
    pub types: Vec<TypeSpec>,
    pub objects: Vec<ObjectSpec>,
    pub corruptions: Vec<Corruption>,
}

#[derive(Arbitrary, Debug)]
pub struct TypeSpec {
    /// Mapped to letters and dots.
    pub name: Vec<u8>,
    pub gc: bool,
    /// A class, named with the `__module__` of its dict.
    pub module: Option<Vec<u8>>,
    /// With a managed dict (3.11+): two words before its PyGC_Head.
    pub preheader: bool,
}

#[derive(Arbitrary, Debug)]
pub struct ObjectSpec {
    pub type_index: u8,
    /// Which list it is on, if any: a generation (0 to 2), the permanent
    /// generation (3), untracked (4), or a free block (more).
    pub list: u8,
}

/// What a census of the image should find when nothing was corrupted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expected {
    pub tracked: u64,
    pub permanent: u64,
    pub untracked: u64,
}

pub const MAX_TYPES: usize = 8;
pub const MAX_OBJECTS: usize = 300;
pub const MAX_CORRUPTIONS: usize = 16;

fn name_of(bytes: &[u8], fallback: &str) -> Vec<u8> {
    let printable = |b: u8| match b {
        b'a'..=b'z' | b'.' => b,
        _ if b % 16 == 0 => b'.',
        _ => b'a' + b % 26,
    };
    let name: Vec<u8> = bytes.iter().take(40).copied().map(printable).collect();
    if name.is_empty() { fallback.as_bytes().to_vec() } else { name }
}

/// The image `input` describes, before corruption, and what its census is.
pub fn forge(input: &Input, layout: &Layout) -> (Forge, Expected) {
    let mut forge = Forge::default();
    let f = &mut forge;
    // `type` first: every type's type.
    let metatype = TYPES;
    let types: Vec<(u64, u64)> = std::iter::once((TYPE_SUBCLASS | READY | HAVE_GC, 0))
        .chain(input.types.iter().take(MAX_TYPES).enumerate().map(|(i, spec)| {
            let mut flags = READY;
            if spec.gc {
                flags |= HAVE_GC;
                if spec.preheader {
                    flags |= layout.preheader_flags;
                }
            }
            if spec.module.is_some() {
                flags |= HEAPTYPE;
            }
            (flags, i as u64 + 1)
        }))
        .collect();
    for &(flags, i) in &types {
        let address = TYPES + i * 0x400;
        f.put(address, 1);
        f.put(address + 8, metatype);
        f.put(address + layout.type_flags, flags);
        f.put(address + layout.type_basicsize, 32);
        let name = match i {
            0 => b"type".to_vec(),
            _ => name_of(&input.types[i as usize - 1].name, "T"),
        };
        f.put(address + layout.type_name, NAMES + i * 0x100);
        f.put_bytes(NAMES + i * 0x100, &[&name[..], b"\0"].concat());
        if let Some(module) = input.types.get(i.wrapping_sub(1) as usize).and_then(|t| t.module.as_ref()) {
            let dict = DICTS + i * 0x400;
            f.put(address + layout.type_dict, dict);
            class_dict(f, layout, dict, &name_of(module, "m"));
        }
    }
    let gc = &layout.gc;
    let state = match gc.state {
        GcState::InRuntime(offset) => RUNTIME + offset,
        GcState::InInterpreter(offset) => {
            f.put(RUNTIME + layout.interpreters_head, INTERPRETER);
            f.put(INTERPRETER + layout.interp_next, 0);
            INTERPRETER + offset
        }
    };
    let heads: Vec<u64> = (0..gc.generation_count)
        .map(|g| state + gc.generations + g * gc.generation_size)
        .chain([state + gc.permanent_generation])
        .collect();
    // The blocks, pool after pool.
    let p = &layout.pymalloc;
    let per_pool = (p.pool_size - p.pool_header.size) / BLOCK;
    let mut lists: Vec<Vec<u64>> = vec![Vec::new(); heads.len()];
    let mut expected = Expected::default();
    let mut free: Vec<u64> = Vec::new();
    let objects: Vec<&ObjectSpec> = input.objects.iter().take(MAX_OBJECTS).collect();
    let block_at = |n: u64| ARENA + (n / per_pool) * p.pool_size + p.pool_header.size + (n % per_pool) * BLOCK;
    for (n, spec) in objects.iter().enumerate() {
        let block = block_at(n as u64);
        let (flags, i) = types[usize::from(spec.type_index) % types.len()];
        let type_address = TYPES + i * 0x400;
        let list = usize::from(spec.list);
        if list > heads.len() {
            free.push(block);
            continue;
        }
        if flags & HAVE_GC == 0 {
            f.put(block, 1);
            f.put(block + 8, type_address);
            expected.untracked += 1;
            continue;
        }
        let gc_head = block + if flags & layout.preheader_flags != 0 { 16 } else { 0 };
        f.put(gc_head + layout.gc_head_size, 1);
        f.put(gc_head + layout.gc_head_size + 8, type_address);
        match lists.get_mut(list) {
            Some(members) => {
                members.push(gc_head);
                *if list == heads.len() - 1 { &mut expected.permanent } else { &mut expected.tracked } += 1;
            }
            None => {
                f.put(gc_head, 0);
                f.put(gc_head + 8, 0);
                expected.untracked += 1;
            }
        }
    }
    for (head, members) in heads.iter().zip(&lists) {
        let mut previous = *head;
        for &node in members {
            f.put(previous, node);
            // `_gc_prev` keeps flags in its low bits.
            f.put(node + 8, previous | 2);
            previous = node;
        }
        f.put(previous, *head);
        f.put(head + 8, previous);
    }
    pools(f, layout, objects.len() as u64, per_pool, &free);
    (forge, expected)
}

/// A class's dict holding `__module__`, as the version's dict table is.
fn class_dict(f: &mut Forge, layout: &Layout, dict: u64, module: &[u8]) {
    let d = &layout.dict;
    let keys = dict + 0x100;
    let (key, value) = (dict + 0x200, dict + 0x300);
    f.put(dict + d.keys, keys);
    f.put(keys + d.nentries, 1);
    let (index_bytes, entry_key) = match d.table {
        DictTable::Sized(at) => {
            f.put(keys + at, 8);
            (8, 8)
        }
        DictTable::Log2 { index_bytes, kind, .. } => {
            f.put_bytes(keys + index_bytes, &[3]);
            // A str-keyed table: entries are {key, value}.
            f.put_bytes(keys + kind, &[1]);
            (8, 0)
        }
    };
    let entry = keys + d.indices + index_bytes + entry_key;
    f.put(entry, key);
    f.put(entry + 8, value);
    for (object, text) in [(key, &b"__module__"[..]), (value, module)] {
        f.put(object + layout.unicode_length, text.len() as u64);
        f.put_u32(object + layout.unicode_state, UNICODE_COMPACT | UNICODE_ASCII);
        f.put_bytes(object + layout.unicode_ascii_data, text);
    }
}

/// pymalloc's statics, its arena table and the one arena's pool headers
/// for `blocks` blocks, `free` of them on their pools' free lists.
fn pools(f: &mut Forge, layout: &Layout, blocks: u64, per_pool: u64, free: &[u64]) {
    let p = &layout.pymalloc;
    let (h, a) = (&p.pool_header, &p.arena_object);
    let used_pools = blocks.div_ceil(per_pool);
    let total = p.arena_size / p.pool_size;
    f.put(STATICS, ARENA_TABLE);
    f.put_u32(STATICS + 8, ARENAS as u32);
    f.put(STATICS + 16, blocks - free.len() as u64);
    f.image.write_bytes(ARENA_TABLE, &vec![0; (ARENAS * a.size) as usize]);
    f.put(ARENA_TABLE + a.address, ARENA);
    f.put(ARENA_TABLE + a.pool_address, ARENA + used_pools * p.pool_size);
    f.put_u32(ARENA_TABLE + a.nfreepools, (total - used_pools) as u32);
    f.put_u32(ARENA_TABLE + a.ntotalpools, total as u32);
    for pool in 0..used_pools {
        let address = ARENA + pool * p.pool_size;
        let carved = (blocks - pool * per_pool).min(per_pool);
        let freed: Vec<u64> = free.iter().copied().filter(|b| b & !(p.pool_size - 1) == address).collect();
        f.put_u32(address + h.ref_count, (carved - freed.len() as u64) as u32);
        f.put_u32(address + h.arenaindex, 0);
        f.put_u32(address + h.szidx, (BLOCK >> p.size_class_shift) as u32 - 1);
        f.put_u32(address + h.nextoffset, (h.size + carved * BLOCK) as u32);
        // The free list runs through the freed blocks' first words.
        let mut next = address + h.freeblock;
        for &block in &freed {
            f.put(next, block);
            next = block;
        }
        f.put(next, 0);
        // The last word of a pool, so that its pages are mapped.
        f.image.write_u64(address + p.pool_size - 8, 0);
    }
}

/// The census memtrace takes of `forge`'s image.
pub fn census(forge: &Forge, layout: &Layout) -> Census {
    let pymalloc = PymallocState::new(Anchor::Fixed, [STATICS, STATICS + 8, STATICS + 16], layout.pymalloc);
    CensusTaker::new(0, Some((*layout, RUNTIME)), Some(pymalloc)).take_from(&forge.image)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forged heap is one the census reads to the end, on every
    /// version: the fuzzer's corruptions start from a heap read right.
    #[test]
    fn an_uncorrupted_heap_is_counted_exactly() {
        let types = (0..6u8)
            .map(|i| TypeSpec {
                name: vec![b'r' + i; 3 + usize::from(i)],
                gc: i % 2 == 1,
                module: (i >= 3).then(|| b"app".to_vec()),
                preheader: i == 5,
            })
            .collect();
        let objects = (0..200u8).map(|i| ObjectSpec { type_index: i % 7, list: i % 6 }).collect();
        let input = Input { version: 0, types, objects, corruptions: Vec::new() };
        for version in 0..6 {
            let layout = crate::layout(version);
            let (forge, expected) = forge(&input, layout);
            let objects = census(&forge, layout).objects.unwrap();
            assert_eq!(objects.incomplete, Vec::<String>::new(), "3.{}", 8 + version);
            let counted =
                Expected { tracked: objects.gc_tracked, permanent: objects.gc_permanent, untracked: objects.untracked };
            assert_eq!(counted, expected, "3.{}", 8 + version);
            assert!(expected.tracked > 50 && expected.permanent > 10 && expected.untracked > 50, "{expected:?}");
            let names: Vec<&str> = objects.types.iter().map(|t| t.name.as_str()).collect();
            assert!(names.contains(&"app.wwwwwwww") && names.contains(&"rrr"), "{names:?}");
        }
    }
}
