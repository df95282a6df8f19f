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

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
};

use iced_x86::{Code, ConditionCode, FlowControl, Instruction, Mnemonic, OpKind, Register};

use super::pointer_register;
use crate::{
    binary::{
        elf::ElfFile,
        x86::{Reg, Text, addresses, decode, gpr, load64, memory_writes, register, store64, writes_register, written},
    },
    probes::placement,
    python::layouts::Layout,
};

/// What the patterns know of the interpreter's structures, from its
/// version's layout table: `struct pool_header`'s `ref.count`, `freeblock`
/// and `nextpool`, and sizeof(PyGC_Head) (GC objects are freed as their
/// address less it, and the compiler may write the freed block through the
/// object's address).
#[derive(Clone, Copy)]
struct Fields {
    ref_count: u64,
    freeblock: u64,
    nextpool: u64,
    gc_head: u64,
}

impl Fields {
    fn of(layout: &Layout) -> Self {
        let pool = &layout.pymalloc.pool_header;
        Self {
            ref_count: pool.ref_count,
            freeblock: pool.freeblock,
            nextpool: pool.nextpool,
            gc_head: layout.gc_head_size,
        }
    }
}

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

/// An inlined `pymalloc_alloc` fast path, found at its `++pool->ref.count`
/// (`addl $1,(%pool)`): there `*(pool + 8)` is the block being allocated and
/// the u32 at `pool + Layout::pool_szidx` its size class. Where the size is
/// not a compile-time constant, `request` holds the size asked for: the
/// copy computes the size class from it (`lea -1(%request),%r; shr $4,%r`)
/// and keeps it for the fallback to malloc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PopSite {
    /// The increment's address.
    pub vaddr: u64,
    pub pool: Reg,
    pub request: Option<Reg>,
    /// The `mov 0x8(%pool),%block` that loads the block: what it loads is
    /// the block this pop hands out (an object born from it is fresh).
    pub block_load: u64,
    /// Where to probe the pop instead of its increment, whose memory
    /// operand the kernel single-steps (about 7x the cost of an emulated
    /// trap): an instruction after it that the kernel emulates (the
    /// `je` taken when the pool's free list ran out, in every copy found),
    /// with the block, pool and request still in their registers.
    pub taken: Option<TakenAt>,
}

/// An instruction the kernel emulates, past the point where pymalloc took
/// a block from a pool: there the block is in `block` and the request, when
/// not a compile-time constant, in `request`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TakenAt {
    pub vaddr: u64,
    pub block: Reg,
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
pub fn find(elf: &ElfFile, text: &Text, layout: &Layout) -> Option<InlinedPymalloc> {
    Matched::new(elf, text, layout)?.account()
}

/// What the patterns match in a binary's `.text` before `find` checks that
/// the matches account for every inlined copy. Public so that a test can
/// take one site away and see the accounting notice.
pub struct Matched<'a> {
    text: &'a Text,
    defaults: [u64; 4],
    guards: HashMap<usize, Kind>,
    sites: Sites,
}

impl<'a> Matched<'a> {
    /// None when `elf` calls its object allocator through the pointer.
    pub fn new(elf: &ElfFile, text: &'a Text, layout: &Layout) -> Option<Self> {
        let defaults = default_allocator(elf)?;
        Some(Self { text, defaults, guards: text.guards(&defaults), sites: text.sites(elf, Fields::of(layout)) })
    }

    /// The addresses of the pops matched, in address order.
    pub fn pops(&self) -> Vec<u64> {
        self.sites.pops.iter().map(|(_, pop)| pop.site.vaddr).collect()
    }

    /// The addresses of the pushes matched, in address order.
    pub fn pushes(&self) -> Vec<u64> {
        self.sites.pushes.iter().map(|(_, push)| push.vaddr).collect()
    }

    /// `find`'s answer.
    pub fn account(&self) -> Option<InlinedPymalloc> {
        account(self.text, self.defaults, &self.guards, self.sites.clone())
    }

    /// `find`'s answer had the patterns missed the pop or push at `vaddr`.
    pub fn account_without(&self, vaddr: u64) -> Option<InlinedPymalloc> {
        let mut sites = self.sites.clone();
        sites.pops.retain(|(_, pop)| pop.site.vaddr != vaddr);
        sites.pushes.retain(|(_, push)| push.vaddr != vaddr);
        account(self.text, self.defaults, &self.guards, sites)
    }
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

/// The pops the pattern matches among the instructions `range` of `text`,
/// each with the direct call its empty-pool side makes (index, target):
/// how `pymalloc_functions` finds the pops inside pymalloc's own functions.
pub(super) fn pops_in(
    elf: &ElfFile,
    text: &Text,
    layout: &Layout,
    range: Range<usize>,
) -> Vec<(PopSite, Option<(usize, u64)>)> {
    let fields = Fields::of(layout);
    range.filter_map(|i| text.pop_at(elf, i, fields)).map(|pop| (pop.site, pop.slow_call)).collect()
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
    allocator_table(elf, "PyObject_Malloc").map(|(_, defaults)| defaults)
}

/// For the exported allocator function `exported` (`PyObject_Malloc`,
/// `PyMem_Malloc`, `PyMem_RawMalloc`) that compares its domain's malloc
/// pointer with the default before calling it: the address of that
/// pointer's slot, and the defaults of malloc, calloc, realloc and free,
/// which follow it in `PyMemAllocatorEx`.
pub(super) fn allocator_table(elf: &ElfFile, exported: &str) -> Option<(u64, [u64; 4])> {
    let symbol = elf.symbol(exported)?;
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
            return (slots[0] == default && slots.iter().all(|&f| f != 0)).then_some((slot, slots));
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
    pub(super) fn call_reached(&self, mut k: usize) -> Option<(usize, u64)> {
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

    fn sites(&self, elf: &ElfFile, f: Fields) -> Sites {
        let mut sites = Sites { pops: Vec::new(), pushes: Vec::new() };
        for i in 0..self.insns.len() {
            if let Some(pop) = self.pop_at(elf, i, f) {
                sites.pops.push((i, pop));
            } else if let Some(push) = self.push_at(i, f) {
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
    ///   addl $0x1,(%P)                            ++pool->ref.count     <- i
    ///   mov (%B),%N ; mov %N,0x8(%P)              pool->freeblock = *bp
    ///   test %N,%N ; je <extend>                  <- taken
    /// slow: ... call allocate_from_new_pool
    /// ```
    ///
    /// in any order the data flow allows, within one straight line.
    fn pop_at(&self, elf: &ElfFile, i: usize, f: Fields) -> Option<Pop> {
        let pool = count_increment(&self.insns[i], f)?;
        let (start, end) = (self.line_start(i), self.line_end(i));
        let store = (i + 1..=end).find(|&k| self.writes_field([k], pool, f.freeblock))?;
        let (next, stored_at) = store64(&self.insns[store], pool)?;
        if stored_at != f.freeblock {
            return None;
        }
        let load_next = self.last_writer(start, store, next)?;
        let (block, 0) = load64(&self.insns[load_next], next)? else { return None };
        let load_block = self.last_writer(start, load_next, block)?;
        if load64(&self.insns[load_block], block)? != (pool, f.freeblock) {
            return None;
        }
        // From the load of the free block to its replacement the pool stays
        // in its register and nothing else writes the free block: at the
        // increment, *(pool + 8) is the block this pop hands out.
        let first = load_block.min(i);
        if self.writes_register(first..=store, pool) || self.writes_field(first + 1..store, pool, f.freeblock) {
            return None;
        }
        let branch = self.line_start(first).checked_sub(1)?;
        if !self.branches_if_pool_empty(branch, pool, f) {
            return None;
        }
        let empty = self.index_of(self.insns[branch].near_branch_target())?;
        let request = self.request_register(i);
        Some(Pop {
            site: PopSite {
                vaddr: self.insns[i].ip(),
                pool: pointer_register(pool)?,
                request,
                block_load: self.insns[load_block].ip(),
                taken: self.taken_at(elf, i, load_block, pool, block, request),
            },
            slow_call: self.call_reached(empty),
        })
    }

    /// The first instruction after the pop at `i`, on its straight line,
    /// that the kernel emulates, reached only by falling through (so every
    /// pop passes it once, and nothing else does), with the block loaded at
    /// `load_block` still in `block` and the pool and request unchanged.
    fn taken_at(
        &self,
        elf: &ElfFile,
        i: usize,
        load_block: usize,
        pool: Register,
        block: Register,
        request: Option<Reg>,
    ) -> Option<TakenAt> {
        let block_reg = pointer_register(block)?;
        for k in i.max(load_block) + 1..=self.line_end(i) {
            if self.predecessors(k)? != [k - 1] {
                return None;
            }
            let mut kept = [pool].into_iter().chain(request.map(register));
            if self.writes_register(load_block + 1..k, block) || kept.any(|r| self.writes_register(i..k, r)) {
                return None;
            }
            let ins = &self.insns[k];
            if elf.bytes_at(ins.ip(), ins.len() as u64).is_some_and(placement::emulated) {
                return Some(TakenAt { vaddr: ins.ip(), block: block_reg, request });
            }
        }
        None
    }

    /// The register that holds the requested size at the pop at `i`. The
    /// copy computed the size class from it, `lea -1(%N),%r; ... shr $4,%r`
    /// or `sub $1,%r; ... shr $4,%r`, on the code that falls through to `i`: the
    /// request is `N`, or a copy of it made before, whichever is unchanged
    /// at `i`.
    fn request_register(&self, i: usize) -> Option<Reg> {
        let path: Vec<usize> = self.path_to(i).collect();
        let shr = *path.iter().find(|&&k| {
            let ins = &self.insns[k];
            ins.code() == Code::Shr_rm32_imm8 && ins.op0_kind() == OpKind::Register && ins.immediate(1) == 4
        })?;
        let index = self.insns[shr].op0_register();
        // Its computation, the last write of the index before the shift
        // (the compiler may schedule other work between them).
        let computation =
            *path.iter().filter(|&&k| k < shr).find(|&&k| self.writes_register([k], index.full_register()))?;
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
    fn branches_if_pool_empty(&self, branch: usize, pool: Register, f: Fields) -> bool {
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
                .is_some_and(|address| address == (pool, f.nextpool))
        };
        match (operand(0), operand(1)) {
            (Some(a), Some(b)) => (a == pool && nextpool_in(b)) || (b == pool && nextpool_in(a)),
            (Some(r), None) | (None, Some(r)) => {
                r == pool
                    && cmp_ins.memory_index() == Register::None
                    && (cmp_ins.memory_base(), cmp_ins.memory_displacement64()) == (pool, f.nextpool)
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
    fn push_at(&self, i: usize, f: Fields) -> Option<PushSite> {
        let ins = &self.insns[i];
        let pool = ins.memory_base();
        let (block, stored_at) = store64(ins, pool)?;
        if stored_at != f.freeblock {
            return None;
        }
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
            base != block && base != pool && pointer_register(base).is_some() && offset == f.gc_head.wrapping_neg();
        if !(links_block || links_gc_head) {
            return None;
        }
        let load = self.last_writer(start, link, lastfree)?;
        if load64(&self.insns[load], lastfree)? != (pool, f.freeblock)
            || self.writes_register(load..=i, pool)
            || self.writes_field(load + 1..link, pool, f.freeblock)
        {
            return None;
        }
        self.updates_count_after(i, pool, f).then_some(site)
    }

    /// Whether a 32-bit store to `pool->ref.count` follows instruction `i`
    /// within `NEAR` instructions, through direct jumps, with `pool` intact.
    fn updates_count_after(&self, i: usize, pool: Register, f: Fields) -> bool {
        let mut k = i + 1;
        for _ in 0..NEAR {
            let Some(ins) = self.insns.get(k) else { return false };
            if memory_writes(ins).iter().any(|m| addresses(m, pool, f.ref_count) && m.memory_size().size() == 4) {
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
fn count_increment(ins: &Instruction, f: Fields) -> Option<Register> {
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
        && ins.memory_displacement64() == f.ref_count
        && pointer_register(base).is_some())
    .then_some(base)
}
