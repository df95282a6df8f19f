//! Source files as a traced process sees them (through /proc/PID/root, so
//! a process in a container shows its own files), or as the host has them
//! now for reports rebuilt from saved snapshots, read once each, for the
//! text report's tracebacks. The names come from the target's code
//! objects: only regular files of a bounded size are read, and only so
//! many bytes of them are kept.

use std::{collections::HashMap, path::Path};

use super::files::read_regular;
use crate::report::text::SourceLines;

/// Largest source file read: Python's own largest modules are a few
/// hundred KiB.
const MAX_FILE: u64 = 16 << 20;
/// Bytes of source kept before the files read are forgotten (and read
/// again when next shown): a bound on a target naming many files.
const MAX_HELD: usize = 256 << 20;

#[derive(Default)]
pub struct SourceFiles {
    /// By (pid, file name); None for a file that could not be read.
    files: HashMap<(u32, String), Option<Vec<String>>>,
    /// Bytes of the files held.
    held: usize,
    on_host: bool,
}

impl SourceFiles {
    /// Reads the host's files, not the process's.
    pub fn on_host() -> Self {
        Self { on_host: true, ..Self::default() }
    }
}

impl SourceLines for SourceFiles {
    fn line(&mut self, pid: u32, filename: &str, lineno: u32) -> Option<String> {
        let key = (pid, filename.to_owned());
        if !self.files.contains_key(&key) {
            let path = if filename.starts_with('/') && !self.on_host {
                format!("/proc/{pid}/root{filename}")
            } else {
                filename.to_owned()
            };
            let text = read_regular(Path::new(&path), MAX_FILE).ok().and_then(|bytes| String::from_utf8(bytes).ok());
            let size = text.as_ref().map_or(0, String::len);
            if self.held + size > MAX_HELD {
                self.files.clear();
                self.held = 0;
            }
            self.held += size;
            self.files.insert(key.clone(), text.map(|text| text.lines().map(str::to_owned).collect()));
        }
        let lines = &self.files[&key];
        let text = lines.as_ref()?.get((lineno as usize).checked_sub(1)?)?.trim();
        (!text.is_empty()).then(|| text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_as_linecache_strips_them() {
        let path = std::env::temp_dir().join(format!("memtrace-source-{}.py", std::process::id()));
        std::fs::write(&path, "def f():\n    x = [1]  \n\n").unwrap();
        let mut files = SourceFiles::default();
        let (me, name) = (std::process::id(), path.to_str().unwrap());
        assert_eq!(files.line(me, name, 2).as_deref(), Some("x = [1]"));
        assert_eq!(files.line(me, name, 3), None, "blank");
        assert_eq!(files.line(me, name, 9), None, "past the end");
        assert_eq!(files.line(me, name, 0), None);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(files.line(me, name, 1).as_deref(), Some("def f():"), "read once");
        assert_eq!(files.line(me, "/nonexistent/x.py", 1), None);
        // pid 0 has no /proc entry; the host's file is read all the same.
        std::fs::write(&path, "y = 2\n").unwrap();
        assert_eq!(SourceFiles::on_host().line(0, name, 1).as_deref(), Some("y = 2"));
        assert_eq!(SourceFiles::default().line(0, name, 1), None);
        std::fs::remove_file(&path).unwrap();
    }
}
