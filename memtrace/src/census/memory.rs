//! A process's memory as the kernel counts it, from /proc/PID/smaps_rollup:
//! resident, anonymous and swapped bytes, what `ps` and `mprof` show.

use std::{fs, io};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Memory {
    pub rss: u64,
    pub anonymous: u64,
    pub swap: u64,
}

impl Memory {
    pub fn read(pid: u32) -> io::Result<Self> {
        Self::parse(&fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "smaps_rollup lacks Rss, Anonymous or Swap"))
    }

    fn parse(text: &str) -> Option<Self> {
        let field = |name: &str| {
            text.lines().find_map(|line| {
                let kib = line.strip_prefix(name)?.strip_prefix(':')?.trim().strip_suffix(" kB")?;
                kib.trim().parse::<u64>().ok().map(|k| k * 1024)
            })
        };
        Some(Self { rss: field("Rss")?, anonymous: field("Anonymous")?, swap: field("Swap")? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_rollup() {
        let text = "55f6-7ffc ---p 00000000 00:00 0 [rollup]\nRss:   1748 kB\nPss:  365 kB\nAnonymous:  112 kB\nSwap:  0 kB\nSwapPss: 9 kB\n";
        assert_eq!(Memory::parse(text), Some(Memory { rss: 1748 * 1024, anonymous: 112 * 1024, swap: 0 }));
        assert_eq!(Memory::parse("Rss: 1 kB\n"), None);
        let me = Memory::read(std::process::id()).unwrap();
        assert!(me.rss > 0 && me.anonymous > 0 && me.anonymous <= me.rss, "{me:?}");
    }
}
