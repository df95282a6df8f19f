//! The report model and its writers. A [`Report`] is a plain value built
//! from snapshots: which process, when, the totals, every loss counter, the
//! notes, the ungrouped snapshots now and at the previous report, and the
//! history that verdicts and peaks come from. Each writer turns reports
//! into one output format and knows nothing of eBPF, sessions or
//! processes; a new format is one new file here.

pub mod flamegraph;
pub mod format;
pub mod host;
pub mod json;
pub mod model;
pub mod pprof;
pub mod prometheus;
pub mod saved;
pub mod text;
pub mod timeline;
pub mod trend;

use std::io;

pub use host::HostReport;
pub use model::{CensusChange, FirstTouch, ProcessInfo, Report};

use crate::snapshot::GroupBy;

/// What of a report a writer shows: the grouping and how many groups, and
/// how many of the census's types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub group_by: GroupBy,
    pub top: usize,
    pub types: usize,
}

/// Something that writes reports somewhere, in its own format.
pub trait Writer {
    fn write(&mut self, report: &Report) -> io::Result<()>;

    /// Host mode's report of every watched process, after their own
    /// reports of the same interval; formats about one process's
    /// allocations (profiles, flame graphs) have nothing to add.
    fn write_host(&mut self, _report: &HostReport) -> io::Result<()> {
        Ok(())
    }
}

/// A writer and how the user asked for it (`--pprof out.pb.gz`), which
/// names it when it fails.
pub struct Output {
    pub name: String,
    pub writer: Box<dyn Writer>,
}

/// Replaces `path` with `contents` in one step (a sibling written first,
/// then renamed over it), so that a reader never sees half a file and a
/// failed write leaves the previous one in place.
pub fn replace_file(path: &std::path::Path, contents: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// Fails now, before anything is traced, if `path` cannot be written.
pub fn check_writable(path: &std::path::Path) -> io::Result<()> {
    if path.is_dir() {
        return Err(io::Error::new(io::ErrorKind::IsADirectory, "it is a directory"));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, b"")?;
    std::fs::remove_file(&tmp)
}
