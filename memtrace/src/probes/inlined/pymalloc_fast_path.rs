//! Finds the copies of pymalloc that LTO and PGO inline into CPython's
//! callers, so that memtrace can probe instructions where probing functions
//! sees almost nothing. In Debian's /usr/bin/python3.11 (3.11.2, LTO+PGO,
//! stripped, non-PIE, libpython linked in) PGO turned each call through
//! `_PyObject.malloc` and its siblings into a guard, `mov
//! _PyObject.malloc(%rip),%rax; cmp $_PyObject_Malloc,%rax; jne <indirect
//! call>`, followed by an inlined copy of the allocator's fast path: 264
//! guards (191 malloc, 6 calloc, 15 realloc, 52 free) lead to 171 inlined
//! block pops (`++pool->ref.count; bp = pool->freeblock; pool->freeblock =
//! *bp`) and 49 inlined block pushes (`*(block **)p = pool->freeblock;
//! pool->freeblock = p`), which probes on function entries do not see. This
//! module finds the guards from the exported `PyObject_Malloc`, decodes
//! `.text` function by function (the FDEs of `.eh_frame` give the starts in a
//! stripped binary), matches the pop and push patterns together with the
//! branch and bookkeeping around them, and finds `allocate_from_new_pool`,
//! the out-of-line slow path every pop falls back on. It answers None, so
//! that memtrace probes nothing it guessed, unless every call of that slow
//! path belongs to a recognised pop and every free and realloc guard leads to
//! a recognised site or to an out-of-line allocator function.

use std::collections::{HashMap, HashSet};

use iced_x86::{Code, ConditionCode, FlowControl, Instruction, Mnemonic, OpKind, Register};

use super::pointer_register;
use crate::binary::{
    elf::ElfFile,
    x86::{Reg, Text, addresses, decode, gpr, load64, memory_writes, store64, writes_register, written},
};

// `struct pool_header` (Objects/obmalloc.c), laid out alike from 3.8 to
// 3.13: the `ref.count` union, then `freeblock`, then `nextpool`.
const REF_COUNT: u64 = 0;
const FREEBLOCK: u64 = 8;
const NEXTPOOL: u64 = 0x10;
/// sizeof(PyGC_Head): GC objects are freed as their address less this, and
/// the compiler may write the freed block through the object's address.
const GC_HEAD: u64 = 16;

/// How many instructions may lie between the empty-pool branch and its call
/// of `allocate_from_new_pool` (the copies found need up to seven: the call
/// spills live registers first), or between a push and its count update
/// (up to four).
const NEAR: usize = 12;
/// How many instructions of a guard's inlined side are searched for its
/// site (the copies found need at most 43).
const GUARD_REACH: usize = 96;
/// How many instructions before a pop its size class computation may be
/// (the copies found need 11).
const REQUEST_REACH: usize = 24;

/// An inlined `pymalloc_alloc` fast path, probed at its `++pool->ref.count`
/// (`addl $1,(%pool)`): there `*(pool + 8)` is the block being allocated and
/// the u32 at `pool + Layout::pool_szidx` its size class. Where the size is
/// not a compile-time constant, `request` holds the size asked for: the
/// copy computes the size class from it (`lea -1(%request),%r; shr $4,%r`)
/// and keeps it for the fallback to malloc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PopSite {
    pub vaddr: u64,
    pub pool: Reg,
    pub request: Option<Reg>,
}

/// An inlined `pymalloc_free`, probed at its `pool->freeblock = p` (`mov
/// %block,8(%pool)`): block and pool are in those registers there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushSite {
    pub vaddr: u64,
    pub block: Reg,
    pub pool: Reg,
}

/// How many guards compare an allocator pointer with its default function:
/// the evidence that PGO promoted the indirect calls, and what the copies
/// were accounted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guards {
    pub malloc: usize,
    pub calloc: usize,
    pub realloc: usize,
    pub free: usize,
}

/// Where a binary's inlined pymalloc copies are. The BPF side keeps a pop or
/// push only when `(block & pool_mask) == pool`, with the mask from the
/// version's layout (`Layout::pool_size`: 16 KiB pools from 3.10, 4 KiB
/// before; `PythonWalk::pool_mask`): the sites themselves do not depend on
/// the pool size, so `find` does not take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InlinedPymalloc {
    /// In address order.
    pub pops: Vec<PopSite>,
    /// In address order.
    pub pushes: Vec<PushSite>,
    /// Virtual address of `allocate_from_new_pool`, which pops fall back on
    /// when their size class has no pool with free blocks; its return value
    /// is the block allocated.
    pub new_pool: u64,
    pub guards: Guards,
}

/// The inlined pymalloc copies of `elf`. None when the binary calls its
/// object allocator through the pointer (not inlined: every pyenv build, and
/// Debian's libpython3.11.so.1.0, whose guard-free `PyObject_Malloc` jumps
/// through `_PyObject.malloc`), or when the copies cannot be found with
/// confidence: memtrace must not probe guesses.
pub(super) fn find(elf: &ElfFile, text: &Text) -> Option<InlinedPymalloc> {
    let defaults = default_allocator(elf)?;
    let guards = text.guards(&defaults);
    let sites = text.sites();
    account(text, defaults, &guards, sites)
}

/// The pops and pushes the patterns match, in address order, by
/// instruction index.
#[derive(Clone)]
struct Sites {
    pops: Vec<(usize, Pop)>,
    pushes: Vec<(usize, PushSite)>,
}

/// `sites`, when they account for every inlined copy of `text`'s
/// allocator, whose defaults are `defaults` and whose guards are `guards`.
fn account(text: &Text, defaults: [u64; 4], guards: &HashMap<usize, Kind>, sites: Sites) -> Option<InlinedPymalloc> {
    if !defaults.iter().all(|&f| text.starts_function(f)) {
        return None;
    }
    let count = |kind: Kind| guards.values().filter(|&&k| k == kind).count();
    let counts = Guards {
        malloc: count(Kind::Malloc),
        calloc: count(Kind::Calloc),
        realloc: count(Kind::Realloc),
        free: count(Kind::Free),
    };
    if counts.malloc == 0 {
        return None;
    }

    // A pop whose empty-pool side does not call out hands out blocks from an
    // inlined slow path no probe would see.
    let slow_calls: HashMap<usize, u64> = sites.pops.iter().map(|(_, pop)| pop.slow_call).collect::<Option<_>>()?;
    let Sites { pops, pushes } = sites;
    let mut targets = slow_calls.values();
    let new_pool = *targets.next()?;
    if targets.any(|&t| t != new_pool) || !text.starts_function(new_pool) {
        return None;
    }
    // Every inlined alloc copy calls allocate_from_new_pool on its slow path,
    // so a call that no recognised pop leads to is a copy the pop pattern
    // missed.
    if text.transfers_to(new_pool).iter().any(|k| !slow_calls.contains_key(k)) {
        return None;
    }
    // Calls the guards did not promote reach the out-of-line functions,
    // whose copies must be among those found.
    let [malloc, _, _, free] = defaults;
    if !pops.iter().any(|(_, pop)| text.same_function(malloc, pop.site.vaddr))
        || !pushes.iter().any(|(_, s)| text.same_function(free, s.vaddr))
    {
        return None;
    }
    // A free or realloc guard guards a pymalloc copy (of free, or of the
    // realloc that moves a block between size classes); one whose copy
    // leads to no recognised site nor out-of-line allocator is a copy the
    // patterns missed. (Alloc copies are accounted for above; a malloc guard
    // may legitimately guard only libc's malloc, for sizes known to be large.)
    // The search stops at the first site, so a second free copy in a loop,
    // reached by a back edge after a recognised one, is not accounted for.
    let pop_at: HashSet<usize> = pops.iter().map(|&(i, _)| i).collect();
    let push_at: HashSet<usize> = pushes.iter().map(|&(i, _)| i).collect();
    let out_of_line: HashSet<u64> = defaults.iter().copied().chain([new_pool]).collect();
    for (&guard, &kind) in guards {
        let accounted = match kind {
            Kind::Malloc | Kind::Calloc => continue,
            Kind::Free => {
                text.guarded_reaches(guard, guards, |k| push_at.contains(&k) || text.direct_target(k) == Some(free))
            }
            Kind::Realloc => text.guarded_reaches(guard, guards, |k| {
                pop_at.contains(&k)
                    || push_at.contains(&k)
                    || text.direct_target(k).is_some_and(|t| out_of_line.contains(&t))
            }),
        };
        if !accounted {
            return None;
        }
    }
    Some(InlinedPymalloc {
        pops: pops.into_iter().map(|(_, pop)| pop.site).collect(),
        pushes: pushes.into_iter().map(|(_, s)| s).collect(),
        new_pool,
        guards: counts,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Malloc,
    Calloc,
    Realloc,
    Free,
}

const KINDS: [Kind; 4] = [Kind::Malloc, Kind::Calloc, Kind::Realloc, Kind::Free];

/// The object allocator's default malloc, calloc, realloc and free (the
/// internal `_PyObject_Malloc` and siblings), as the file initialises
/// `_PyObject` (or, from 3.12, `_PyRuntime`'s copy of it), found through the
/// guard in the exported `PyObject_Malloc`: it loads `_PyObject.malloc` and
/// compares it with the default, whose address the slot holds in the file.
/// The siblings follow malloc in `PyMemAllocatorEx`. None when
/// `PyObject_Malloc` calls through the pointer without comparing it.
fn default_allocator(elf: &ElfFile) -> Option<[u64; 4]> {
    let symbol = elf.symbol("PyObject_Malloc")?;
    let code = elf.symbol_bytes(symbol).ok()?;
    // Register -> the RIP-relative slot it was last loaded from.
    let mut loaded = HashMap::new();
    for ins in decode(code, symbol.vaddr) {
        if let Some(default) = compared_immediate(&ins)
            && ins.op0_kind() == OpKind::Register
            && let Some(&slot) = gpr(ins.op0_register()).and_then(|reg| loaded.get(&reg))
        {
            let mut slots = [0; 4];
            for (k, value) in slots.iter_mut().enumerate() {
                let bytes = elf.bytes_at(slot + 8 * k as u64, 8)?;
                *value = u64::from_le_bytes(bytes.try_into().ok()?);
            }
            return (slots[0] == default && slots.iter().all(|&f| f != 0)).then_some(slots);
        }
        for reg in written(&ins) {
            loaded.remove(&reg);
        }
        if ins.code() == Code::Mov_r64_rm64
            && ins.is_ip_rel_memory_operand()
            && let Some(reg) = gpr(ins.op0_register())
        {
            loaded.insert(reg, ins.ip_rel_memory_address());
        }
    }
    None
}

impl Text {
    /// Each `cmp $default,<reg or memory>` against one of the allocator
    /// defaults, by instruction index.
    fn guards(&self, defaults: &[u64; 4]) -> HashMap<usize, Kind> {
        let mut guards = HashMap::new();
        for (k, ins) in self.insns.iter().enumerate() {
            if let Some(value) = compared_immediate(ins)
                && let Some(f) = defaults.iter().position(|&f| f == value)
            {
                guards.insert(k, KINDS[f]);
            }
        }
        guards
    }

    /// Whether the code guard `guard` lets through when the pointer holds
    /// the default reaches an instruction `wanted` accepts before any other
    /// guard (which begins another copy), searching fall-through first.
    fn guarded_reaches(&self, guard: usize, guards: &HashMap<usize, Kind>, wanted: impl Fn(usize) -> bool) -> bool {
        let Some(branch) = self.insns.get(guard + 1) else { return false };
        let start = match (branch.flow_control(), branch.condition_code()) {
            (FlowControl::ConditionalBranch, ConditionCode::ne) => guard + 2,
            (FlowControl::ConditionalBranch, ConditionCode::e) => match self.index_of(branch.near_branch_target()) {
                Some(k) => k,
                None => return false,
            },
            _ => return false,
        };
        let mut stack = vec![start];
        let mut seen = HashSet::new();
        while let Some(k) = stack.pop() {
            if k >= self.insns.len() || guards.contains_key(&k) || !seen.insert(k) {
                continue;
            }
            if seen.len() > GUARD_REACH {
                return false;
            }
            if wanted(k) {
                return true;
            }
            let ins = &self.insns[k];
            let next = (self.insns.get(k + 1).is_some_and(|n| n.ip() == ins.next_ip())).then_some(k + 1);
            let target = (ins.op0_kind() == OpKind::NearBranch64).then(|| self.index_of(ins.near_branch_target()));
            match ins.flow_control() {
                FlowControl::Next | FlowControl::Call | FlowControl::IndirectCall => stack.extend(next),
                FlowControl::ConditionalBranch => stack.extend(target.flatten().into_iter().chain(next)),
                FlowControl::UnconditionalBranch => stack.extend(target.flatten()),
                _ => {}
            }
        }
        false
    }

    /// The direct call the straight line from `k` makes within `NEAR`
    /// instructions, following direct jumps: (index, target).
    fn call_reached(&self, mut k: usize) -> Option<(usize, u64)> {
        for _ in 0..NEAR {
            let ins = self.insns.get(k)?;
            match ins.flow_control() {
                FlowControl::Next if self.falls_through(k) => k += 1,
                FlowControl::Call => return Some((k, self.direct_target(k)?)),
                FlowControl::UnconditionalBranch => k = self.index_of(self.direct_target(k)?)?,
                _ => return None,
            }
        }
        None
    }

    fn sites(&self) -> Sites {
        let mut sites = Sites { pops: Vec::new(), pushes: Vec::new() };
        for i in 0..self.insns.len() {
            if let Some(pop) = self.pop_at(i) {
                sites.pops.push((i, pop));
            } else if let Some(push) = self.push_at(i) {
                sites.pushes.push((i, push));
            }
        }
        sites
    }

    /// The inlined pop whose `++pool->ref.count` is instruction `i`:
    ///
    /// ```text
    ///   mov 0x10(%P),%X ; cmp %X,%P ; je <slow>   pool != pool->nextpool
    ///   mov 0x8(%P),%B                            bp = pool->freeblock
    ///   addl $0x1,(%P)                            ++pool->ref.count     <- probe
    ///   mov (%B),%N ; mov %N,0x8(%P)              pool->freeblock = *bp
    /// slow: ... call allocate_from_new_pool
    /// ```
    ///
    /// in any order the data flow allows, within one straight line.
    fn pop_at(&self, i: usize) -> Option<Pop> {
        let pool = count_increment(&self.insns[i])?;
        let (start, end) = (self.line_start(i), self.line_end(i));
        let store = (i + 1..=end).find(|&k| self.writes_field([k], pool, FREEBLOCK))?;
        let (next, FREEBLOCK) = store64(&self.insns[store], pool)? else { return None };
        let load_next = self.last_writer(start, store, next)?;
        let (block, 0) = load64(&self.insns[load_next], next)? else { return None };
        let load_block = self.last_writer(start, load_next, block)?;
        if load64(&self.insns[load_block], block)? != (pool, FREEBLOCK) {
            return None;
        }
        // From the load of the free block to its replacement the pool stays
        // in its register and nothing else writes the free block: at the
        // increment, *(pool + 8) is the block this pop hands out.
        let first = load_block.min(i);
        if self.writes_register(first..=store, pool) || self.writes_field(first + 1..store, pool, FREEBLOCK) {
            return None;
        }
        let branch = self.line_start(first).checked_sub(1)?;
        if !self.branches_if_pool_empty(branch, pool) {
            return None;
        }
        let empty = self.index_of(self.insns[branch].near_branch_target())?;
        Some(Pop {
            site: PopSite {
                vaddr: self.insns[i].ip(),
                pool: pointer_register(pool)?,
                request: self.request_register(i),
            },
            slow_call: self.call_reached(empty),
        })
    }

    /// The register that holds the requested size at the pop at `i`. The
    /// copy computed the size class from it, `lea -1(%N),%r; shr $4,%r` or
    /// `sub $1,%r; shr $4,%r`, on the code that falls through to `i`: the
    /// request is `N`, or a copy of it made before, whichever is unchanged
    /// at `i`.
    fn request_register(&self, i: usize) -> Option<Reg> {
        let path: Vec<usize> = self.path_to(i).collect();
        let shr = *path.iter().find(|&&k| {
            let ins = &self.insns[k];
            ins.code() == Code::Shr_rm32_imm8 && ins.op0_kind() == OpKind::Register && ins.immediate(1) == 4
        })?;
        let index = self.insns[shr].op0_register();
        let computation = shr.checked_sub(1)?;
        let ins = &self.insns[computation];
        let value = if ins.code() == Code::Lea_r32_m
            && ins.op0_register() == index
            && ins.memory_index() == Register::None
            && ins.memory_displacement64() == u64::MAX
        {
            ins.memory_base()
        } else if matches!(ins.code(), Code::Sub_rm32_imm8 | Code::Sub_rm32_imm32)
            && ins.op0_kind() == OpKind::Register
            && ins.op0_register() == index
            && ins.immediate(1) == 1
        {
            index.full_register()
        } else {
            return None;
        };
        if !self.writes_register(computation..i, value) {
            return pointer_register(value);
        }
        // A copy, `mov %value,%copy`, made while `value` held the request.
        path.iter().filter(|&&k| k < computation).find_map(|&k| {
            let copy = &self.insns[k];
            let copies = copy.code() == Code::Mov_rm64_r64
                && copy.op0_kind() == OpKind::Register
                && copy.op1_register() == value;
            let copied = copy.op0_register();
            (copies && !self.writes_register(k + 1..computation, value) && !self.writes_register(k + 1..i, copied))
                .then(|| pointer_register(copied))
                .flatten()
        })
    }

    /// The instructions before `i`, nearest first, as long as each falls
    /// into the next (straight code and not-taken conditional branches), at
    /// most `REQUEST_REACH`.
    fn path_to(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        (1..=REQUEST_REACH).map_while(move |back| {
            let k = i.checked_sub(back)?;
            let (previous, next) = (&self.insns[k], &self.insns[k + 1]);
            (previous.next_ip() == next.ip()
                && matches!(previous.flow_control(), FlowControl::Next | FlowControl::ConditionalBranch))
            .then_some(k)
        })
    }

    /// Whether instruction `branch` is a `je` taken when `pool` is its own
    /// `nextpool` (the size class has no pool with free blocks).
    fn branches_if_pool_empty(&self, branch: usize, pool: Register) -> bool {
        let ins = &self.insns[branch];
        if ins.flow_control() != FlowControl::ConditionalBranch || ins.condition_code() != ConditionCode::e {
            return false;
        }
        let start = self.line_start(branch);
        let Some(cmp) = (start..branch).rev().find(|&k| self.insns[k].rflags_modified() != 0) else { return false };
        let cmp_ins = &self.insns[cmp];
        if !matches!(cmp_ins.code(), Code::Cmp_r64_rm64 | Code::Cmp_rm64_r64) {
            return false;
        }
        let operand = |n| match cmp_ins.op_kind(n) {
            OpKind::Register => Some(cmp_ins.op_register(n)),
            _ => None,
        };
        let nextpool_in = |register: Register| {
            self.last_writer(start, cmp, register)
                .and_then(|k| load64(&self.insns[k], register))
                .is_some_and(|address| address == (pool, NEXTPOOL))
        };
        match (operand(0), operand(1)) {
            (Some(a), Some(b)) => (a == pool && nextpool_in(b)) || (b == pool && nextpool_in(a)),
            (Some(r), None) | (None, Some(r)) => {
                r == pool
                    && cmp_ins.memory_index() == Register::None
                    && (cmp_ins.memory_base(), cmp_ins.memory_displacement64()) == (pool, NEXTPOOL)
            }
            (None, None) => false,
        }
    }

    /// The inlined push whose `pool->freeblock = p` is instruction `i`:
    ///
    /// ```text
    ///   mov 0x8(%Q),%X                  lastfree = pool->freeblock
    ///   mov %X,(%B)                     *(block **)p = lastfree
    ///   mov %B,0x8(%Q)                  pool->freeblock = p         <- probe
    ///   ... mov %E,(%Q)                 pool->ref.count--
    /// ```
    ///
    /// `(%B)` may be `-0x10(%O)` with O the object that B is the GC head of.
    fn push_at(&self, i: usize) -> Option<PushSite> {
        let ins = &self.insns[i];
        let pool = ins.memory_base();
        let (block, FREEBLOCK) = store64(ins, pool)? else { return None };
        if pool == block {
            return None;
        }
        let site = PushSite { vaddr: ins.ip(), block: pointer_register(block)?, pool: pointer_register(pool)? };
        let start = self.line_start(i);
        // The link is the last store before the site.
        let link = (start..i).rev().find(|&k| !memory_writes(&self.insns[k]).is_empty())?;
        let base = self.insns[link].memory_base();
        let (lastfree, offset) = store64(&self.insns[link], base)?;
        let links_block = base == block && offset == 0 && !self.writes_register(link..i, block);
        let links_gc_head =
            base != block && base != pool && pointer_register(base).is_some() && offset == GC_HEAD.wrapping_neg();
        if !(links_block || links_gc_head) {
            return None;
        }
        let load = self.last_writer(start, link, lastfree)?;
        if load64(&self.insns[load], lastfree)? != (pool, FREEBLOCK)
            || self.writes_register(load..=i, pool)
            || self.writes_field(load + 1..link, pool, FREEBLOCK)
        {
            return None;
        }
        self.updates_count_after(i, pool).then_some(site)
    }

    /// Whether a 32-bit store to `pool->ref.count` follows instruction `i`
    /// within `NEAR` instructions, through direct jumps, with `pool` intact.
    fn updates_count_after(&self, i: usize, pool: Register) -> bool {
        let mut k = i + 1;
        for _ in 0..NEAR {
            let Some(ins) = self.insns.get(k) else { return false };
            if memory_writes(ins).iter().any(|m| addresses(m, pool, REF_COUNT) && m.memory_size().size() == 4) {
                return true;
            }
            if writes_register(ins, pool) {
                return false;
            }
            k = match ins.flow_control() {
                FlowControl::Next if self.falls_through(k) => k + 1,
                FlowControl::UnconditionalBranch => match self.direct_target(k).and_then(|t| self.index_of(t)) {
                    Some(t) => t,
                    None => return false,
                },
                _ => return false,
            };
        }
        false
    }
}

#[derive(Clone)]
struct Pop {
    site: PopSite,
    /// The call the empty-pool branch makes: (index, target).
    slow_call: Option<(usize, u64)>,
}

/// For `cmp $imm32,<64-bit register or memory>`: the immediate, sign-extended.
fn compared_immediate(ins: &Instruction) -> Option<u64> {
    (ins.mnemonic() == Mnemonic::Cmp && ins.op1_kind() == OpKind::Immediate32to64).then(|| ins.immediate(1))
}

/// `addl $1,(%reg)` or `incl (%reg)` on a 32-bit count: the register.
fn count_increment(ins: &Instruction) -> Option<Register> {
    let by_one = match ins.code() {
        Code::Add_rm32_imm8 | Code::Add_rm32_imm32 => ins.immediate(1) == 1,
        Code::Inc_rm32 => true,
        _ => false,
    };
    let base = ins.memory_base();
    (by_one
        && ins.op0_kind() == OpKind::Memory
        && ins.memory_index() == Register::None
        && ins.segment_prefix() == Register::None
        && ins.memory_displacement64() == REF_COUNT
        && pointer_register(base).is_some())
    .then_some(base)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        fs::{self, OpenOptions},
        io::{BufRead as _, BufReader, Write as _},
        path::{Path, PathBuf},
        process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    };

    use super::*;

    const DEBIAN_PYTHON311: &str = "/usr/bin/python3.11";

    /// The sites /tmp/lto-research/find_sites.py found in Debian's
    /// python3.11 (3.11.2-6+deb12u6, build ID 571d98e0...), whose counts
    /// matched sys.getallocatedblocks() under probes: pops as `vaddr:pool`.
    const RESEARCH_POPS: &str = "
        4fb148:rdx 4fb3a1:rdx 4fb482:rdx 4fbad5:r9 4fd4ab:rdx 4fe036:rdx 4fe82d:rax 4fecc9:rax 500107:rax 501f69:rax
        506161:rdx 506291:rax 506441:rax 5073bf:rdx 507e4b:rax 50825d:rax 50859b:rax 50958d:rdx 509772:rdx
        5099a8:rax 50d35d:rdx 50d592:rdx 50d8f7:rax 50f039:rdx 5100f0:rax 51420c:rax 514908:rax 51550f:rsi
        51650f:r10 5171b0:rax 518b93:rax 51ebbe:rax 520b41:rsi 522209:rax 5237da:rax 527d4b:rax 5281a1:rax
        5285f5:rax 52869f:rax 528717:rax 52add2:rax 533515:rdi 5395cf:rax 539e04:rax 53ce23:rax 54556f:rax
        549193:rax 551e65:rax 55250e:rax 554d17:rax 55587b:rdx 55625b:rax 55d295:rax 55d5bb:rax 55d8b5:rax
        55e4d2:rdx 563a98:rax 56404e:rax 5651e5:rax 566a96:rax 56900e:rax 56937a:rax 5702fd:rax 573e28:rax
        574f70:rax 5762a9:rax 577c94:rax 578f70:rax 579f05:rax 57cb5c:rax 57e54b:rax 57fef5:rax 58282d:rax
        583d51:rax 583ecc:rax 585102:rdx 589631:rdx 58ea35:rax 59382f:rsi 597222:rax 599d68:rax 59b7d7:rax
        59c412:rax 59efa5:rax 5a09bc:rax 5a2fd4:rdx 5a3115:rax 5a31e2:rax 5a3343:r8 5a3617:rcx 5a38ce:rcx 5a3bfb:rax
        5a3cce:rax 5a3d83:rax 5a3e46:rax 5a3f1e:rdx 5a43cc:rax 5a449f:rdx 5a455d:rax 5a461c:rax 5a5edd:rdx
        5a6695:rax 5a68f5:rax 5a6ef0:rax 5a77b5:rax 5a85e7:rax 5aac7b:rax 5aba4d:rax 5b0b31:rax 5b1111:rax
        5b1ac6:rax 5b47e5:rax 5b4fe2:rax 5b54cf:rax 5baf93:rdx 5bbefa:rdx 5bca1f:rdx 5bd18d:rdx 5bde4f:rax
        5be26e:rax 5bea61:rax 5bf729:rax 5bfc6b:rax 5c07ba:rax 5c1fda:rax 5c22b5:rdx 5ce60f:rax 5cfb77:rdx
        5d2142:rax 5d372b:rax 5d5995:rdx 5d72f8:rax 5defa3:rax 5e97f3:rax 5e9b49:rdx 5ea6d9:rax 5eb269:rax
        5eb2ff:rax 5ec1d5:rax 5ec33c:rax 5f0c47:rax 5f4a15:rax 5f4ab5:rax 5f4b55:rax 5f4bf5:rax 5f8deb:rax
        5f8ec5:rax 6008e7:rdx 600b99:rdx 600d52:rdx 6025ce:rdx 603675:rax 6057da:rax 605903:rax 605b7e:rax
        6093be:rax 60ec92:rax 60fb1b:rax 612788:rdx 6136a5:rax 613763:rax 613a8d:rax 6148c0:rax 616649:rax
        6166ee:rax 61e7d4:rax 61e983:rax 621395:rdx 621b5b:rax 6265df:rdx 629ba4:rdx";

    /// Pushes as `vaddr:block:pool`, from the same research.
    const RESEARCH_PUSHES: &str = "
        5009e8:rdi:rsi 500ccb:rbx:rax 50105f:rsi:rax 506751:rdi:rax 506a08:rdi:rsi 507716:rsi:rax 50a2f0:rdi:rsi
        514e5b:rbx:rax 51f87c:rbx:rax 523a74:r15:rcx 53cf49:r14:rdi 53f7a7:rdi:rax 549292:rdx:rcx 554e78:r12:rax
        554eca:r12:rax 5563bf:r12:rdx 55b953:rbx:rax 5612ef:rdi:rax 5697c7:rbx:rax 575447:rbx:rdx 5756e7:rbx:rdx
        57ea4b:rbx:rax 584006:rbp:rsi 58c207:rbp:rax 58c306:rbx:rax 5936d8:rdx:rax 599422:rsi:rax 5994cc:rbx:rax
        59dc0b:rdi:rax 5a06ac:rbx:rax 5a0b26:r12:rax 5b6d46:rbx:rdx 5b96e0:rdi:rax 5b979b:rbx:rax 5b97c9:rbx:rax
        5bc728:rbx:rax 5c0b81:rdi:rax 5c0cb7:rdi:rax 5c0d01:rdi:rax 5cb230:rdi:rax 5cb5e9:rdi:rax 5ceeb9:rsi:rax
        5d41bb:rdi:rax 5df19f:rdi:r8 5df271:rdi:rsi 5ec476:rbp:rsi 60837b:rdi:rax 60844a:rdi:rax 61eabe:rbx:rsi";

    /// Stores of a register to 8(%reg) with a load of 8(%reg) and another
    /// store in the five instructions before: what a looser free pattern
    /// takes for pushes. GC list unlinks (`_PyGCHead_SET_PREV`, keeping tag
    /// bits), e.g. 0x50ca70, which the research names, and stores whose
    /// loaded value is not linked into the block, or that are relative to
    /// rsp.
    const NOT_PUSHES: [u64; 6] = [0x50ca70, 0x620e5f, 0x4285d1, 0x430910, 0x51bd0e, 0x44d749];

    fn debian_python311() -> (ElfFile, InlinedPymalloc) {
        let elf = ElfFile::open(Path::new(DEBIAN_PYTHON311)).expect("Debian's python3.11 is installed");
        let found = find(&elf, &Text::decode(&elf).unwrap()).expect("Debian's python3.11 inlines pymalloc");
        (elf, found)
    }

    #[test]
    fn finds_every_inlined_copy_in_debian_python311() {
        let (_, found) = debian_python311();
        // 190 `cmp $_PyObject_Malloc,%reg` and one comparing the slot in memory.
        assert_eq!(found.guards, Guards { malloc: 191, calloc: 6, realloc: 15, free: 52 });
        assert_eq!(found.new_pool, 0x4fb540, "allocate_from_new_pool");
        let pops: Vec<String> = found.pops.iter().map(|s| format!("{:x}:{}", s.vaddr, s.pool.name())).collect();
        assert_eq!(pops, RESEARCH_POPS.split_whitespace().collect::<Vec<_>>());
        let pushes: Vec<String> =
            found.pushes.iter().map(|s| format!("{:x}:{}:{}", s.vaddr, s.block.name(), s.pool.name())).collect();
        assert_eq!(pushes, RESEARCH_PUSHES.split_whitespace().collect::<Vec<_>>());
        for vaddr in NOT_PUSHES {
            assert!(found.pushes.iter().all(|s| s.vaddr != vaddr), "{vaddr:#x} is not a push");
        }
        let request = |vaddr: u64| found.pops.iter().find(|p| p.vaddr == vaddr).unwrap().request;
        // _PyObject_GC_New's basic size, _PyLong_New's digits, and
        // PyUnicode_New's constant-size empty string, whose request was folded.
        assert_eq!(request(0x4fb148), Some(Reg::R12));
        assert_eq!(request(0x509772), Some(Reg::Rbp));
        assert_eq!(request(0x5a3115), None);
        // The other 59 take their pool from a constant slot of `usedpools`:
        // a size fixed at compile time, folded into its class.
        assert_eq!(found.pops.iter().filter(|p| p.request.is_some()).count(), 112);
    }

    #[test]
    fn pointer_called_builds_have_no_inlined_copies() {
        let mut binaries: Vec<String> = ["3.8.18", "3.9.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0"]
            .iter()
            .map(|v| {
                let minor = &v[..v.rfind('.').unwrap()];
                format!("/root/.pyenv/versions/{v}/lib/libpython{minor}.so.1.0")
            })
            .collect();
        binaries.push("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0".into());
        for path in binaries {
            let elf = ElfFile::open(Path::new(&path)).unwrap_or_else(|e| panic!("{path}: {e:#}"));
            assert!(elf.symbol("PyObject_Malloc").is_some(), "{path} is a CPython");
            assert_eq!(find(&elf, &Text::decode(&elf).unwrap()), None, "{path}");
        }
    }

    /// The accounting is what keeps a copy the patterns miss from going
    /// unnoticed: without any one pop, or any one push but four, `find`
    /// gives up. Those four are second copies in loops, reached by a back
    /// edge after a first copy that the same guard leads to.
    #[test]
    fn a_missed_copy_makes_find_give_up() {
        let elf = ElfFile::open(Path::new(DEBIAN_PYTHON311)).unwrap();
        let defaults = default_allocator(&elf).unwrap();
        let text = Text::decode(&elf).unwrap();
        let guards = text.guards(&defaults);
        let sites = text.sites();
        assert!(account(&text, defaults, &guards, sites.clone()).is_some());
        for k in 0..sites.pops.len() {
            let mut fewer = sites.clone();
            let (_, missed) = fewer.pops.remove(k);
            assert_eq!(account(&text, defaults, &guards, fewer), None, "without the pop at {:#x}", missed.site.vaddr);
        }
        let mut unnoticed = Vec::new();
        for k in 0..sites.pushes.len() {
            let mut fewer = sites.clone();
            let (_, missed) = fewer.pushes.remove(k);
            if account(&text, defaults, &guards, fewer).is_some() {
                unnoticed.push(missed.vaddr);
            }
        }
        assert_eq!(unnoticed, [0x554eca, 0x5756e7, 0x5b97c9, 0x5c0d01]);
    }

    const TRACEFS: &str = "/sys/kernel/tracing";
    /// CPython 3.11's POOL_SIZE.
    const POOL_MASK: u64 = !(16 * 1024 - 1);
    /// Rounds of the workload: each keeps about 22 blocks and allocates
    /// about 45, through 37 of the sites.
    const ROUNDS: u64 = 5_000;
    /// Marks the measured window in the trace (through the instance's
    /// trace_marker) right next to the interpreter's own counts. Every
    /// request stays within 512 bytes (larger ones go to libc, which
    /// sys.getallocatedblocks() counts and these sites do not), but for the
    /// item array of `keep`, one block.
    const WORKLOAD: &str = r#"
import os, sys
keep = []
print("ready", flush=True)
sys.stdin.readline()
marker = os.open(sys.argv[1], os.O_WRONLY)
n = int(sys.argv[2])
before = sys.getallocatedblocks(); os.write(marker, b"begin")
for i in range(n):
    keep.append((
        os.urandom(100), str(i), b"%d" % i, "x" * (i % 400), bytearray(i % 300),
        {i: i, "k": str(i)}, [i, i], {i}, frozenset((i,)), (i, str(i)).__repr__(),
        i * 0.5, int(str(i)) << 70, [j for j in range(i % 40)], sorted(range(i % 20, 0, -1)),
    ))
os.write(marker, b"end"); after = sys.getallocatedblocks()
print(after - before, flush=True)
"#;

    /// The register's name in uprobe_events' fetch arguments: the legacy
    /// registers' without the `r` (`%di`), r8 to r15 as they are.
    fn tracefs_register(reg: Reg) -> &'static str {
        if reg.number() < 8 { &reg.name()[1..] } else { reg.name() }
    }

    /// uprobe events of one group, enabled in a tracing instance of their
    /// own (its own buffer, clock and pid filter), removed on drop, also
    /// when the test fails.
    struct Tracing {
        group: String,
        events: Vec<String>,
        instance: PathBuf,
    }

    impl Tracing {
        fn new() -> Self {
            if !Path::new(TRACEFS).join("uprobe_events").exists() {
                let status = Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]).status().unwrap();
                assert!(status.success(), "cannot mount tracefs on {TRACEFS}");
            }
            let group = format!("memtrace_inlined_{}", std::process::id());
            let instance = Path::new(TRACEFS).join("instances").join(&group);
            fs::create_dir(&instance).expect("tracing instance");
            Self { group, events: Vec::new(), instance }
        }

        /// Adds a probe to `event`. Probes of one event (same argument names
        /// and types) are unregistered together: the kernel waits for RCU
        /// once per event, ~50 ms here, when disabling 221 single-probe
        /// events took 12 s.
        fn probe(&mut self, kind: char, event: &str, binary: &str, offset: u64, args: &str) {
            let spec = format!("{kind}:{}/{event} {binary}:{offset:#x} {args}\n", self.group);
            let mut events = OpenOptions::new().append(true).open(Path::new(TRACEFS).join("uprobe_events")).unwrap();
            events.write_all(spec.as_bytes()).unwrap_or_else(|e| panic!("{spec}: {e}"));
            if !self.events.iter().any(|e| e == event) {
                self.events.push(event.to_owned());
            }
        }

        fn write(&self, file: &str, value: &str) {
            fs::write(self.instance.join(file), value).unwrap_or_else(|e| panic!("{file}: {e}"));
        }

        fn read(&self, file: &str) -> String {
            fs::read_to_string(self.instance.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
        }

        fn enable(&self, pid: u32) {
            self.write("buffer_size_kb", "65536");
            self.write("trace_clock", "mono");
            self.write("set_event_pid", &pid.to_string());
            self.write(&format!("events/{}/enable", self.group), "1");
        }
    }

    impl Drop for Tracing {
        fn drop(&mut self) {
            // The kernel keeps events that an instance has enabled.
            let _ = fs::write(self.instance.join(format!("events/{}/enable", self.group)), "0");
            let _ = fs::remove_dir(&self.instance);
            if let Ok(mut events) = OpenOptions::new().append(true).open(Path::new(TRACEFS).join("uprobe_events")) {
                for event in &self.events {
                    let _ = events.write_all(format!("-:{}/{event}\n", self.group).as_bytes());
                }
            }
        }
    }

    /// The workload's process, killed on drop.
    struct Workload {
        child: Child,
        stdin: ChildStdin,
        stdout: BufReader<ChildStdout>,
    }

    impl Workload {
        fn spawn(marker: &Path) -> Self {
            let mut child = Command::new(DEBIAN_PYTHON311)
                .args(["-c", WORKLOAD, marker.to_str().unwrap(), &ROUNDS.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdin = child.stdin.take().unwrap();
            let stdout = BufReader::new(child.stdout.take().unwrap());
            let mut workload = Self { child, stdin, stdout };
            assert_eq!(workload.line(), "ready");
            workload
        }

        fn line(&mut self) -> String {
            let mut line = String::new();
            self.stdout.read_line(&mut line).unwrap();
            line.trim().to_owned()
        }
    }

    impl Drop for Workload {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// What the probes saw between the workload's markers.
    #[derive(Debug, Default)]
    struct Seen {
        pops: u64,
        new_pool: u64,
        pushes: u64,
        /// Hits whose block is not in the pool they name: a wrong site.
        strays: u64,
        /// Hits by site.
        by_site: BTreeMap<String, u64>,
    }

    fn parse(trace: &str) -> Seen {
        let mut seen = Seen::default();
        let mut inside = false;
        for line in trace.lines().filter(|l| !l.starts_with('#')) {
            let Some((_, rest)) = line.split_once(": ") else { continue };
            let Some((event, payload)) = rest.split_once(": ") else { continue };
            match (event, payload.trim()) {
                ("tracing_mark_write", "begin") => inside = true,
                ("tracing_mark_write", "end") => inside = false,
                _ if inside => {
                    let arg = |key: &str| {
                        payload
                            .split_whitespace()
                            .find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
                            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
                            .unwrap_or_else(|| panic!("no {key} in {line}"))
                    };
                    // "(0x4fb148)", or "(<return address> <- 0x4fb540)".
                    let site = payload.split(')').next().unwrap_or_default().rsplit(['(', ' ']).next();
                    *seen.by_site.entry(format!("{event} {}", site.unwrap_or_default())).or_default() += 1;
                    if event == "new_pool" {
                        seen.new_pool += u64::from(arg("block") != 0);
                    } else if arg("block") & POOL_MASK != arg("pool") {
                        seen.strays += 1;
                    } else if event == "pop" {
                        seen.pops += 1;
                    } else {
                        seen.pushes += 1;
                    }
                }
                _ => {}
            }
        }
        seen
    }

    /// The important check: probes at exactly these sites (and a return
    /// probe on allocate_from_new_pool) count the blocks the interpreter
    /// itself counts, and every hit names a block of its pool.
    #[test]
    fn sites_count_what_getallocatedblocks_counts() {
        let (elf, found) = debian_python311();
        let offset = |vaddr| elf.file_offset(vaddr).expect("sites are in the file");
        let mut tracing = Tracing::new();
        for pop in &found.pops {
            let pool = tracefs_register(pop.pool);
            let args = format!("pool=%{pool}:x64 block=+8(%{pool}):x64");
            tracing.probe('p', "pop", DEBIAN_PYTHON311, offset(pop.vaddr), &args);
        }
        for push in &found.pushes {
            let args = format!("block=%{}:x64 pool=%{}:x64", tracefs_register(push.block), tracefs_register(push.pool));
            tracing.probe('p', "push", DEBIAN_PYTHON311, offset(push.vaddr), &args);
        }
        tracing.probe('r', "new_pool", DEBIAN_PYTHON311, offset(found.new_pool), "block=$retval:x64");

        let mut workload = Workload::spawn(&tracing.instance.join("trace_marker"));
        tracing.enable(workload.child.id());
        writeln!(workload.stdin, "go").unwrap();
        let delta: i64 = workload.line().parse().expect("the workload prints its block delta");
        assert!(workload.child.wait().unwrap().success());
        tracing.write("tracing_on", "0");

        for cpu in fs::read_dir(tracing.instance.join("per_cpu")).unwrap() {
            let stats = fs::read_to_string(cpu.unwrap().path().join("stats")).unwrap();
            assert!(stats.contains("\noverrun: 0\n") && stats.contains("dropped events: 0"), "lost events: {stats}");
        }
        let seen = parse(&tracing.read("trace"));
        let counted = (seen.pops + seen.new_pool) as i64 - seen.pushes as i64;
        eprintln!(
            "getallocatedblocks delta {delta}; pops {} + new_pool {} - pushes {} = {counted}; strays {}; {} of {} sites hit",
            seen.pops,
            seen.new_pool,
            seen.pushes,
            seen.strays,
            seen.by_site.len(),
            found.pops.len() + found.pushes.len() + 1,
        );
        assert!(delta >= 20 * ROUNDS as i64, "the workload keeps what it allocates");
        assert_eq!(seen.strays, 0);
        assert!((counted - delta).abs() * 1000 <= delta, "probes count {counted}, the interpreter {delta}");
    }
}
