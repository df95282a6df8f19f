//! The bookkeeping every probe ends in: an allocation becomes an ALLOCS
//! record and adds to its site's totals; a free removes the record and
//! subtracts from the same site. Nothing here knows which allocator fired.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use memtrace_common::{AllocInfo, AllocKey, SiteKey, SiteStats, counter};

use crate::maps::{ALLOCS, SITES, atomic_add, count};

const EEXIST: i32 = 17;

/// Records a successful allocation of `size` bytes at `addr`, made at
/// `site`; false when it could not be tracked.
pub fn record_alloc(addr: u64, size: u64, site: SiteKey) -> bool {
    let key = AllocKey { pid: site.pid, _pad: 0, addr };
    // SAFETY: the value is copied out before the map can change it.
    if let Some(old) = unsafe { ALLOCS.get(&key) }.copied() {
        // The block was released by a path no probe sees (or before a probe
        // was attached); it cannot be live twice.
        count(counter::MISSED_FREE);
        site_sub(&old.site, old.size);
    }
    if !site_add(&site, size, true) {
        return false;
    }
    let info = AllocInfo { size, timestamp_ns: unsafe { bpf_ktime_get_ns() }, site };
    if ALLOCS.insert(&key, &info, 0).is_err() {
        // Untracked blocks must not stay outstanding: their frees would
        // never be matched and they would look like leaks.
        count(counter::ALLOC_MAP_FULL);
        site_sub(&site, size);
        return false;
    }
    count(counter::ALLOCS_SEEN + site.layer);
    true
}

pub fn is_tracked(pid: u32, addr: u64) -> bool {
    // SAFETY: only checks presence.
    unsafe { ALLOCS.get(&AllocKey { pid, _pad: 0, addr }) }.is_some()
}

/// Hands the live block at `addr` to the site with Python stack
/// `python_stack` (same caller and native stack): its outstanding bytes
/// follow it, its allocation stays counted where it was made.
pub fn move_block(pid: u32, addr: u64, python_stack: u64) {
    let Some(info) = ALLOCS.get_ptr_mut(&AllocKey { pid, _pad: 0, addr }) else { return };
    // SAFETY: `info` points into the block's ALLOCS value.
    let info = unsafe { &mut *info };
    let old = info.site;
    if old.python_stack == python_stack {
        return;
    }
    let new = SiteKey { python_stack, ..old };
    if site_add(&new, info.size, false) {
        site_sub(&old, info.size);
        info.site = new;
    }
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
/// totals when `allocated` (not when the block merely moves there); false if
/// the site could not be stored.
fn site_add(site: &SiteKey, size: u64, allocated: bool) -> bool {
    if let Some(stats) = SITES.get_ptr_mut(site) {
        add_to(stats, size, 1, allocated);
        return true;
    }
    let (total_bytes, total_count) = if allocated { (size, 1) } else { (0, 0) };
    let fresh = SiteStats { outstanding_bytes: size, outstanding_count: 1, total_bytes, total_count };
    match SITES.insert(site, &fresh, BPF_NOEXIST as u64) {
        Ok(()) => true,
        // Another CPU created it between our lookup and insert.
        Err(e) if e == -EEXIST => match SITES.get_ptr_mut(site) {
            Some(stats) => {
                add_to(stats, size, 1, allocated);
                true
            }
            None => false,
        },
        Err(_) => {
            count(counter::SITE_MAP_FULL);
            false
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
