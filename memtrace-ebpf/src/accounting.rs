//! The bookkeeping every probe ends in: an allocation becomes an ALLOCS
//! record and adds to its site's totals; a free removes the record and
//! subtracts from the same site. Nothing here knows which allocator fired.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use memtrace_common::{AllocInfo, AllocKey, SiteKey, SiteStats, counter};

use crate::maps::{ALLOCS, SITES, atomic_add, count};

const EEXIST: i32 = 17;

/// What became of an allocation.
#[derive(PartialEq, Eq)]
pub enum Recorded {
    Untracked,
    AtKnownSite,
    AtNewSite,
}

/// Records a successful allocation of `size` bytes at `addr`, made at
/// `site`.
pub fn record_alloc(addr: u64, size: u64, site: SiteKey) -> Recorded {
    let key = AllocKey { pid: site.pid, _pad: 0, addr };
    // SAFETY: a helper without arguments.
    let info = AllocInfo { size, timestamp_ns: unsafe { bpf_ktime_get_ns() }, site };
    // Inserted only if new, rather than looked up first: a block is almost
    // always new, and the insert looks for the key anyway.
    match ALLOCS.insert(&key, &info, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {
            let Some(old) = ALLOCS.get_ptr_mut(&key) else { return Recorded::Untracked };
            // The block was released by a path no probe sees (or before a
            // probe was attached); it cannot be live twice.
            // SAFETY: `old` points into the block's ALLOCS value.
            let old = unsafe { core::mem::replace(&mut *old, info) };
            count(counter::MISSED_FREE);
            site_sub(&old.site, old.size);
        }
        Err(_) => {
            // Untracked blocks must not stay outstanding: their frees would
            // never be matched and they would look like leaks.
            count(counter::ALLOC_MAP_FULL);
            return Recorded::Untracked;
        }
    }
    let added = site_add(&site, size, true);
    if added == Recorded::Untracked {
        // A record without a site would subtract from none when freed.
        let _ = ALLOCS.remove(&key);
        return added;
    }
    count(counter::ALLOCS_SEEN + site.layer);
    added
}

/// The record of the live block at `addr`, if it is tracked. The record
/// stays where it is while the thread that is using the block holds it:
/// no other thread can free the block meanwhile.
pub fn tracked(pid: u32, addr: u64) -> Option<*mut AllocInfo> {
    ALLOCS.get_ptr_mut(&AllocKey { pid, _pad: 0, addr })
}

/// Hands the live block whose record is `info` (from [`tracked`]) to the
/// site with Python stack `python_stack` (same caller and native stack):
/// its outstanding bytes follow it, its allocation stays counted where it
/// was made. Returns the site when it is a new one.
pub fn move_block(info: *mut AllocInfo, python_stack: u64) -> Option<SiteKey> {
    // SAFETY: `info` points into the block's ALLOCS value (see `tracked`).
    let info = unsafe { &mut *info };
    let old = info.site;
    if old.python_stack == python_stack {
        return None;
    }
    let new = SiteKey { python_stack, ..old };
    let added = site_add(&new, info.size, false);
    if added == Recorded::Untracked {
        return None;
    }
    site_sub(&old, info.size);
    info.site = new;
    (added == Recorded::AtNewSite).then_some(new)
}

/// Forgets the allocation at `addr`, returning its record if it was known.
pub fn record_free(pid: u32, addr: u64) -> Option<AllocInfo> {
    let key = AllocKey { pid, _pad: 0, addr };
    // SAFETY: the value is copied out before the map can change it.
    let info = unsafe { ALLOCS.get(&key) }.copied()?;
    let _ = ALLOCS.remove(&key);
    site_sub(&info.site, info.size);
    count(counter::FREES_MATCHED + info.site.layer);
    Some(info)
}

/// Puts back the record `record_free` took for `addr`: a realloc that
/// failed leaves its block where it was.
pub fn restore(addr: u64, info: &AllocInfo) {
    let key = AllocKey { pid: info.site.pid, _pad: 0, addr };
    if let Some(stats) = SITES.get_ptr_mut(&info.site) {
        if ALLOCS.insert(&key, info, 0).is_ok() {
            add_to(stats, info.size, 1, false);
        } else {
            count(counter::ALLOC_MAP_FULL);
        }
    }
}

/// Adds one block to a site's outstanding totals, and to its allocated
/// totals when `allocated` (not when the block merely moves there).
fn site_add(site: &SiteKey, size: u64, allocated: bool) -> Recorded {
    if let Some(stats) = SITES.get_ptr_mut(site) {
        add_to(stats, size, 1, allocated);
        return Recorded::AtKnownSite;
    }
    let (total_bytes, total_count) = if allocated { (size, 1) } else { (0, 0) };
    let fresh = SiteStats { outstanding_bytes: size, outstanding_count: 1, total_bytes, total_count };
    match SITES.insert(site, &fresh, BPF_NOEXIST as u64) {
        Ok(()) => Recorded::AtNewSite,
        // Another CPU created it between our lookup and insert.
        Err(e) if e == -EEXIST => match SITES.get_ptr_mut(site) {
            Some(stats) => {
                add_to(stats, size, 1, allocated);
                Recorded::AtKnownSite
            }
            None => Recorded::Untracked,
        },
        Err(_) => {
            count(counter::SITE_MAP_FULL);
            Recorded::Untracked
        }
    }
}

fn site_sub(site: &SiteKey, size: u64) {
    if let Some(stats) = SITES.get_ptr_mut(site) {
        add_to(stats, size.wrapping_neg(), 1u64.wrapping_neg(), false);
    }
}

fn add_to(stats: *mut SiteStats, bytes: u64, blocks: u64, to_totals: bool) {
    // SAFETY: `stats` points into a SITES value, alive for this program run.
    unsafe {
        atomic_add(&raw mut (*stats).outstanding_bytes, bytes);
        atomic_add(&raw mut (*stats).outstanding_count, blocks);
        if to_totals {
            atomic_add(&raw mut (*stats).total_bytes, bytes);
            atomic_add(&raw mut (*stats).total_count, blocks);
        }
    }
}
