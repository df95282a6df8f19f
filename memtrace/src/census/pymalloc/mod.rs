//! Counts, from outside and at any moment, the blocks CPython's small-object
//! allocator (pymalloc) has live, the way `sys.getallocatedblocks()` does
//! inside the target: every arena in `arenas[]`, every pool header carved
//! from it, `ref.count` blocks of `(szidx + 1) * 16` bytes each, plus the
//! count of larger requests pymalloc passed to the raw allocator. It is the
//! measured side of memtrace's coverage line for interpreters whose pymalloc
//! fast path is inlined (Debian's LTO python3.11): how much pymalloc grew,
//! against what the probes saw. Where that state is in a binary is
//! `locate`'s job; this module walks it. Reads are not synchronised with the
//! target: a census taken while it allocates may be off by what changed
//! during the walk, and one that finds the structures inconsistent (an arena
//! created or freed under it) is retried, then reported as an error, never
//! as a number.

pub mod locate;

use std::io;

use crate::{
    process::memory::AddressSpace,
    python::layouts::{BlockCounter, Pymalloc},
};

/// `arenas[]` starts with INITIAL_ARENA_OBJECTS entries and doubles, so
/// `maxarenas` is a power of two from 16; past 2^20 entries (48 MiB to read,
/// 256 GiB of arenas) it is taken for garbage.
const INITIAL_ARENA_OBJECTS: u32 = 16;
const MAX_ARENAS: u32 = 1 << 20;
/// Pools in use counted before the state is taken for garbage: 64 GiB of
/// 16 KiB pools, and a bound on the list kept of them.
const MAX_POOLS: usize = 1 << 22;
/// Walks tried before an inconsistent state is reported.
const ATTEMPTS: usize = 4;
/// Where pymalloc's bookkeeping is in one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PymallocState {
    anchor: Anchor,
    /// `arenas` (a pointer to `struct arena_object[maxarenas]`), `maxarenas`
    /// (u32) and the block counter (u64): addresses, or offsets from the
    /// anchor's pointer.
    arenas: u64,
    maxarenas: u64,
    counter: u64,
    /// The version's pymalloc, with the pool size the binary's code uses.
    layout: Pymalloc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    /// The fields are at fixed addresses (3.8 to 3.11's statics).
    Fixed,
    /// The fields are offsets from the pointer stored at this address
    /// (3.12's main interpreter, 3.13's main allocator state), which the
    /// target sets while starting up.
    Pointer(u64),
}

/// pymalloc's live blocks at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Census {
    /// Small blocks allocated from pools.
    pub blocks: u64,
    /// Their bytes, by size class (the request rounded up to 16).
    pub bytes: u64,
    /// Blocks over 512 bytes pymalloc handed to the raw allocator (malloc).
    pub raw_blocks: u64,
}

/// A pool with blocks in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    pub address: u64,
    /// Its size class, in bytes.
    pub block_size: u64,
    /// Blocks in use (`ref.count`).
    pub used: u64,
}

impl PymallocState {
    /// The state whose `arenas`, `maxarenas` and block counter are at
    /// `fields` (addresses, or offsets from `anchor`'s pointer), laid out
    /// as `layout` says.
    pub fn new(anchor: Anchor, fields: [u64; 3], layout: Pymalloc) -> Self {
        let [arenas, maxarenas, counter] = fields;
        Self { anchor, arenas, maxarenas, counter, layout }
    }

    /// Walks the arenas and pools now.
    pub fn census(&self, memory: &impl AddressSpace) -> io::Result<Census> {
        Ok(self.walk_consistently(memory)?.1)
    }

    /// The pools with blocks in use now, with the census they add up to.
    pub fn pools(&self, memory: &impl AddressSpace) -> io::Result<(Vec<Pool>, Census)> {
        self.walk_consistently(memory)
    }

    /// The version's pymalloc, with the pool size this binary uses.
    pub fn layout(&self) -> &Pymalloc {
        &self.layout
    }

    fn walk_consistently(&self, memory: &impl AddressSpace) -> io::Result<(Vec<Pool>, Census)> {
        let mut why = "";
        for _ in 0..ATTEMPTS {
            match self.walk(memory) {
                Ok(found) => return Ok(found),
                Err(Miss::Io(error)) => return Err(error),
                Err(Miss::Inconsistent(reason)) => why = reason,
            }
        }
        Err(io::Error::new(io::ErrorKind::InvalidData, format!("pymalloc's state is not consistent: {why}")))
    }

    fn walk(&self, memory: &impl AddressSpace) -> Result<(Vec<Pool>, Census), Miss> {
        let base = match self.anchor {
            Anchor::Fixed => 0,
            Anchor::Pointer(at) => match memory.read_u64(at)? {
                0 => return Err(Miss::Inconsistent("the interpreter has no allocator yet")),
                base => base,
            },
        };
        let maxarenas = memory.read_u32(base.wrapping_add(self.maxarenas))?;
        let arenas = memory.read_u64(base.wrapping_add(self.arenas))?;
        let counter = memory.read_u64(base.wrapping_add(self.counter))?;
        if counter > i64::MAX as u64 {
            return Err(Miss::Inconsistent("the block counter is negative"));
        }
        let mut census = Census::default();
        let mut pools = Vec::new();
        // No arena yet (or the allocator is not pymalloc): nothing to walk.
        if maxarenas != 0 {
            if !maxarenas.is_power_of_two() || !(INITIAL_ARENA_OBJECTS..=MAX_ARENAS).contains(&maxarenas) || arenas == 0
            {
                return Err(Miss::Inconsistent("maxarenas or arenas is implausible"));
            }
            // arenas[] is reallocated as it grows: a failed read is a race.
            let entry = self.layout.arena_object.size as usize;
            let table = memory
                .read_vec(arenas, maxarenas as usize * entry)
                .map_err(|_| Miss::Inconsistent("arenas[] could not be read"))?;
            for (index, object) in table.chunks_exact(entry).enumerate() {
                self.count_arena(memory, index, object, &mut pools)?;
            }
        }
        census.blocks = pools.iter().map(|p| p.used).sum();
        census.bytes = pools.iter().map(|p| p.used * p.block_size).sum();
        census.raw_blocks = match self.layout.counter {
            BlockCounter::RawBlocks => counter,
            BlockCounter::AllBlocks => counter.saturating_sub(census.blocks),
        };
        Ok((pools, census))
    }

    /// Adds the pools in use of the arena `object` describes, checking it
    /// against how new_arena() and the pool carving in obmalloc.c set it up.
    fn count_arena(
        &self,
        memory: &impl AddressSpace,
        index: usize,
        object: &[u8],
        pools: &mut Vec<Pool>,
    ) -> Result<(), Miss> {
        let (layout, arena) = (&self.layout, &self.layout.arena_object);
        let address = u64_at(object, arena.address);
        if address == 0 {
            return Ok(());
        }
        let pool_address = u64_at(object, arena.pool_address);
        let nfreepools = u64::from(u32_at(object, arena.nfreepools));
        let ntotalpools = u64::from(u32_at(object, arena.ntotalpools));
        let pool_size = layout.pool_size;
        // Pools start at the first pool-aligned address; an unaligned arena
        // loses one pool to the alignment.
        let excess = address % pool_size;
        let first = address.checked_add((pool_size - excess) % pool_size).ok_or(Miss::Inconsistent("arena address"))?;
        let carved = layout.arena_size / pool_size - u64::from(excess != 0);
        let end = first.checked_add(carved * pool_size).ok_or(Miss::Inconsistent("arena address"))?;
        if ntotalpools != carved
            || nfreepools > ntotalpools
            || !(first..=end).contains(&pool_address)
            || !(pool_address - first).is_multiple_of(pool_size)
            // The pools not carved yet are free ones.
            || (end - pool_address) / pool_size > nfreepools
        {
            return Err(Miss::Inconsistent("an arena's pool bookkeeping does not add up"));
        }
        let fields = &layout.pool_header;
        let mut header = vec![0; fields.size as usize];
        for pool in (first..pool_address).step_by(pool_size as usize) {
            // An arena freed since arenas[] was read is unmapped.
            memory.read(pool, &mut header).map_err(|_| Miss::Inconsistent("a pool header could not be read"))?;
            if u32_at(&header, fields.arenaindex) as usize != index {
                return Err(Miss::Inconsistent("a pool names another arena"));
            }
            let count = u64::from(u32_at(&header, fields.ref_count));
            if count == 0 {
                continue;
            }
            let szidx = u32_at(&header, fields.szidx);
            if szidx >= layout.size_classes {
                return Err(Miss::Inconsistent("a pool has no size class"));
            }
            let size = u64::from(szidx + 1) << layout.size_class_shift;
            if count > (pool_size - fields.size) / size {
                return Err(Miss::Inconsistent("a pool holds more blocks than fit"));
            }
            if pools.len() == MAX_POOLS {
                return Err(Miss::Inconsistent("more pools in use than memtrace counts"));
            }
            pools.push(Pool { address: pool, block_size: size, used: count });
        }
        Ok(())
    }
}

enum Miss {
    /// The target's statics could not be read: it is gone.
    Io(io::Error),
    /// What was read does not fit together, most likely because the target
    /// changed it during the walk.
    Inconsistent(&'static str),
}

impl From<io::Error> for Miss {
    fn from(error: io::Error) -> Self {
        Miss::Io(error)
    }
}

/// The word at offset `at` of bytes a layout table describes.
fn u64_at(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(bytes: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::ProcessMemory;

    /// A state pointing at memory that is not pymalloc's (this test's own)
    /// is refused, not counted: a `maxarenas` that is no power of two, then
    /// a plausible one over an arena table of garbage.
    #[test]
    fn garbage_is_an_error() {
        let garbage = [0x41_u8; 16 * 48];
        let me = ProcessMemory::new(std::process::id());
        for maxarenas in [24, 16] {
            let statics: [u64; 3] = [garbage.as_ptr() as u64, maxarenas, 7];
            let at = std::hint::black_box(&statics).as_ptr() as u64;
            let state =
                PymallocState::new(Anchor::Fixed, [at, at + 8, at + 16], crate::python::layouts::PY313.pymalloc);
            assert_eq!(state.census(&me).unwrap_err().kind(), io::ErrorKind::InvalidData);
        }
        std::hint::black_box(&garbage);
    }
}
