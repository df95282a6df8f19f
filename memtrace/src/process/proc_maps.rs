//! A process's memory map as read from /proc/PID/maps: which file is mapped
//! where. Probe planning uses it to find the target's own libc and
//! interpreter; symbolization uses a copy taken while the target was alive to
//! turn addresses into (file, offset) even after it exits.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub file_offset: u64,
    pub executable: bool,
    pub inode: u64,
    /// Path as the target sees it (inside its mount namespace); empty for
    /// anonymous memory.
    pub path: String,
}

impl Mapping {
    /// Where file offset `offset` is mapped, if this mapping holds it.
    pub fn address_of(&self, offset: u64) -> Option<u64> {
        let address = self.start.checked_add(offset.checked_sub(self.file_offset)?)?;
        (address < self.end).then_some(address)
    }
}

/// The file-backed mappings of one process, sorted by address.
#[derive(Clone, Debug, Default)]
pub struct MemoryMap {
    pub mappings: Vec<Mapping>,
}

impl MemoryMap {
    pub fn read(pid: u32) -> Result<Self> {
        let text =
            fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("cannot read /proc/{pid}/maps"))?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut mappings: Vec<Mapping> = text.lines().filter_map(parse_line).collect();
        mappings.sort_by_key(|m| m.start);
        Self { mappings }
    }

    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        self.mappings[..i].last().filter(|m| addr < m.end)
    }

    /// Distinct files with executable code, in address order.
    pub fn executable_files(&self) -> Vec<&str> {
        let mut seen = Vec::new();
        for m in &self.mappings {
            if m.executable && m.path.starts_with('/') && !seen.contains(&m.path.as_str()) {
                seen.push(m.path.as_str());
            }
        }
        seen
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    // start-end perms offset dev inode [path]
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start();
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        file_offset: u64::from_str_radix(offset, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        inode: inode.parse().ok()?,
        path: if inode == "0" { String::new() } else { path.trim_end_matches(" (deleted)").to_owned() },
    })
}

/// How this process reaches the files another process's /proc/PID/maps
/// names. The kernel writes those paths as seen from the reader's root when
/// it can reach them: a chrooted process in our mount namespace maps
/// `/srv/root/lib/libc.so.6`, not `/lib/libc.so.6`. A process in another
/// mount namespace (a container) has files we cannot reach that way; the
/// kernel names them from that namespace's root, and we reach them through
/// /proc/PID/root, less the process's own root as the kernel names it the
/// same way (a chroot inside the container).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappedPaths {
    /// Our mount namespace: its paths are ours, and keep working after it
    /// exits.
    Ours,
    /// Another mount namespace, where the process's root is `root`.
    Through { pid: u32, root: String },
}

impl MappedPaths {
    pub fn of(pid: u32) -> Self {
        let namespace = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        let ours = namespace("self");
        if ours.is_some() && ours == namespace(&pid.to_string()) {
            return Self::Ours;
        }
        let root = fs::read_link(format!("/proc/{pid}/root")).map_or_else(|_| "/".into(), |p| p.display().to_string());
        Self::Through { pid, root }
    }

    /// Where mapped file `path` is reached from here.
    pub fn host_path(&self, path: &str) -> PathBuf {
        match self {
            Self::Ours => path.into(),
            Self::Through { pid, root } => {
                // A file outside its root (mapped before it chrooted) keeps its path.
                let inside = path.strip_prefix(root.trim_end_matches('/')).filter(|rest| rest.starts_with('/'));
                format!("/proc/{pid}/root{}", inside.unwrap_or(path)).into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234 /usr/bin/prog
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1234 /usr/bin/prog
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000028000 r--p 00000000 fe:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000028000-7f000019d000 r-xp 00028000 fe:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f00001a0000-7f00001a1000 r-xp 00000000 fe:01 77 /tmp/gone.so (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn mapped_paths_of_another_namespace_lose_its_root() {
        let chrooted = MappedPaths::Through { pid: 7, root: "/srv/root".into() };
        assert_eq!(chrooted.host_path("/srv/root/lib/libc.so.6"), PathBuf::from("/proc/7/root/lib/libc.so.6"));
        assert_eq!(chrooted.host_path("/srv/rootless/x.so"), PathBuf::from("/proc/7/root/srv/rootless/x.so"));
        let container = MappedPaths::Through { pid: 7, root: "/".into() };
        assert_eq!(container.host_path("/usr/lib/libc.so.6"), PathBuf::from("/proc/7/root/usr/lib/libc.so.6"));
        assert_eq!(MappedPaths::Ours.host_path("/srv/root/lib/libc.so.6"), PathBuf::from("/srv/root/lib/libc.so.6"));
        assert_eq!(MappedPaths::of(std::process::id()), MappedPaths::Ours);
    }

    #[test]
    fn parses_files_and_anonymous_memory() {
        let map = MemoryMap::parse(SAMPLE);
        assert_eq!(map.mappings.len(), 7);
        assert_eq!(map.executable_files(), ["/usr/bin/prog", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/tmp/gone.so"]);
        let heap = map.find(0x55d0c1000010).unwrap();
        assert_eq!(heap.path, "");
        let libc = map.find(0x7f0000028010).unwrap();
        assert_eq!((libc.file_offset, libc.inode), (0x28000, 99));
        assert!(map.find(0x7f00001a1000).is_none());
    }
}
