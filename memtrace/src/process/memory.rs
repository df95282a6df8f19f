//! Reads another process's memory with process_vm_readv: no ptrace stop, no
//! write, the target never notices. Used to read interpreter state, code
//! objects and the heap; every read may fail (the target can exit or free
//! the memory at any time) and callers treat failure as "unknown", never as
//! a crash. [`PageCache`] serves walks that read millions of small objects:
//! it copies 64 KiB at a time and answers from its copy, within a budget.
//! Readers take any [`AddressSpace`], so that an [`Image`] held here stands
//! in for a process in tests and fuzzing.

use std::{collections::HashMap, io};

use rustc_hash::FxHashMap;

#[derive(Clone, Copy, Debug)]
pub struct ProcessMemory {
    pid: u32,
}

impl ProcessMemory {
    pub fn new(pid: u32) -> Self {
        Self { pid }
    }
}

/// An address space memtrace reads: a live process, or (in tests and
/// fuzzing) an [`Image`] of one. Every read may fail; sizes and addresses
/// come from the target, so callers bound what they ask for.
pub trait AddressSpace {
    /// Copies what it can of `buf.len()` bytes at `addr`, stopping at the
    /// first unreadable byte; returns how many it copied.
    fn read_partial(&self, addr: u64, buf: &mut [u8]) -> usize;

    /// Fills `buf` from `addr`; fails unless every byte was read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.read_partial(addr, buf) {
            n if n == buf.len() => Ok(()),
            _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read")),
        }
    }

    fn read_vec(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    fn read_u64(&self, addr: u64) -> io::Result<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_u32(&self, addr: u64) -> io::Result<u32> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

impl AddressSpace for ProcessMemory {
    fn read_partial(&self, addr: u64, buf: &mut [u8]) -> usize {
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: `local` describes `buf`, which is valid for writes of its
        // length; the remote side is only read, by the kernel.
        let n = unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        n.max(0) as usize
    }

    /// As the trait's, with the system's reason when nothing could be read
    /// (ESRCH: the process is gone; EFAULT: unmapped).
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: as in `read_partial`.
        let n = unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        match n {
            -1 => Err(io::Error::last_os_error()),
            n if n as usize == buf.len() => Ok(()),
            _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read")),
        }
    }
}

impl<A: AddressSpace> AddressSpace for &A {
    fn read_partial(&self, addr: u64, buf: &mut [u8]) -> usize {
        (**self).read_partial(addr, buf)
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read(addr, buf)
    }
}

/// A few pages of memory held here, as an address space: what walkers
/// are tested and fuzzed on. Unwritten pages are unmapped.
#[derive(Clone, Debug, Default)]
pub struct Image(HashMap<u64, [u8; PAGE]>);

impl Image {
    /// Stores `value` at `addr`, mapping its page.
    pub fn write_u64(&mut self, addr: u64, value: u64) {
        self.write_bytes(addr, &value.to_le_bytes());
    }

    /// Stores `bytes` at `addr`, mapping their pages; bytes past the end
    /// of the address space are dropped.
    pub fn write_bytes(&mut self, addr: u64, bytes: &[u8]) {
        for (i, &byte) in bytes.iter().enumerate() {
            let Some(at) = addr.checked_add(i as u64) else { break };
            self.0.entry(at & !(PAGE as u64 - 1)).or_insert([0; PAGE])[at as usize % PAGE] = byte;
        }
    }
}

impl AddressSpace for Image {
    fn read_partial(&self, addr: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let Some(at) = addr.checked_add(done as u64) else { break };
            let Some(page) = self.0.get(&(at & !(PAGE as u64 - 1))) else { break };
            let offset = at as usize % PAGE;
            let n = (PAGE - offset).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&page[offset..offset + n]);
            done += n;
        }
        done
    }
}

pub const PAGE: usize = 4096;
/// Pages copied at once when one is missing: one system call per 64 KiB.
const RUN: usize = 16;

/// Why a cached read failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The address is not mapped (or the process is gone).
    Unmapped,
    /// The cache holds as much as it may.
    OverBudget,
}

/// Pages of another address space, copied on first use and kept: a walk
/// over a linked structure reads each page once instead of each node
/// separately. The copy is not atomic: pages read at different moments of
/// a running process may disagree, which walkers must detect.
pub struct PageCache<A> {
    space: A,
    /// Index into `copies` by page address; None for a page that could not
    /// be read.
    pages: FxHashMap<u64, Option<u32>>,
    copies: Vec<Box<[u8; PAGE]>>,
    /// The page read last and its copy: walks read neighbouring words.
    last: Option<(u64, u32)>,
    max_pages: usize,
}

impl<A: AddressSpace> PageCache<A> {
    /// A cache of at most `max_bytes` of copied memory.
    pub fn new(space: A, max_bytes: usize) -> Self {
        Self { space, pages: FxHashMap::default(), copies: Vec::new(), last: None, max_pages: max_bytes / PAGE }
    }

    /// Bytes copied so far.
    pub fn copied(&self) -> usize {
        self.copies.len() * PAGE
    }

    /// Fills `buf` from `addr`, which may span pages.
    pub fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let mut done = 0;
        while done < buf.len() {
            let at = addr.checked_add(done as u64).ok_or(Fault::Unmapped)?;
            let page = at & !(PAGE as u64 - 1);
            let offset = (at - page) as usize;
            let bytes = self.page(page)?;
            let n = (PAGE - offset).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&bytes[offset..offset + n]);
            done += n;
        }
        Ok(())
    }

    pub fn u64(&mut self, addr: u64) -> Result<u64, Fault> {
        let offset = (addr % PAGE as u64) as usize;
        if offset <= PAGE - 8 {
            let bytes = self.page(addr - offset as u64)?;
            return Ok(u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes")));
        }
        let mut word = [0; 8];
        self.read(addr, &mut word)?;
        Ok(u64::from_le_bytes(word))
    }

    pub fn u32(&mut self, addr: u64) -> Result<u32, Fault> {
        let mut word = [0; 4];
        self.read(addr, &mut word)?;
        Ok(u32::from_le_bytes(word))
    }

    fn page(&mut self, page: u64) -> Result<&[u8; PAGE], Fault> {
        if let Some((last, index)) = self.last
            && last == page
        {
            return Ok(&self.copies[index as usize]);
        }
        if !self.pages.contains_key(&page) {
            self.copy_run(page)?;
        }
        let index = self.pages.get(&page).copied().flatten().ok_or(Fault::Unmapped)?;
        self.last = Some((page, index));
        Ok(&self.copies[index as usize])
    }

    /// Copies the pages from `first` on that are readable and not cached,
    /// up to a run of them; marks `first` unreadable if it is.
    fn copy_run(&mut self, first: u64) -> Result<(), Fault> {
        let wanted = (0..RUN as u64)
            .map(|i| first.wrapping_add(i * PAGE as u64))
            .take_while(|p| *p >= first && !self.pages.contains_key(p))
            .count();
        if self.copies.len() + wanted > self.max_pages {
            return Err(Fault::OverBudget);
        }
        let mut run = vec![0u8; wanted * PAGE];
        let copied = self.space.read_partial(first, &mut run) / PAGE;
        for (i, bytes) in run.chunks_exact(PAGE).take(copied).enumerate() {
            self.pages.insert(first + (i * PAGE) as u64, Some(self.copies.len() as u32));
            self.copies.push(Box::new(bytes.try_into().expect("a page")));
        }
        if copied == 0 {
            self.pages.insert(first, None);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_fails_cleanly_on_unmapped() {
        let value: u64 = 0x1122_3344_5566_7788;
        let me = ProcessMemory::new(std::process::id());
        assert_eq!(me.read_u64(&value as *const u64 as u64).unwrap(), value);
        assert!(me.read_u64(8).is_err());
    }

    #[test]
    fn pages_are_copied_once_and_reads_span_them() {
        let mut image = HashMap::new();
        for (page, fill) in [(0x10000, 1u8), (0x11000, 2), (0x13000, 3)] {
            image.insert(page, [fill; PAGE]);
        }
        let mut cache = PageCache::new(Image(image), 1 << 20);
        let mut buf = [0; 4];
        cache.read(0x10ffe, &mut buf).unwrap();
        assert_eq!(buf, [1, 1, 2, 2]);
        // One run copied both mapped pages and stopped at the hole.
        assert_eq!(cache.copied(), 2 * PAGE);
        assert_eq!(cache.read(0x12000, &mut buf), Err(Fault::Unmapped));
        assert_eq!(cache.u32(0x13000), Ok(0x0303_0303));
        assert_eq!(cache.read(0x11ffe, &mut buf), Err(Fault::Unmapped), "into the hole");
        let mut small = PageCache::new(Image(HashMap::from([(0x10000, [0; PAGE])])), PAGE);
        assert_eq!(small.u64(0x10000), Err(Fault::OverBudget), "a run of 16 pages does not fit");
    }
}
