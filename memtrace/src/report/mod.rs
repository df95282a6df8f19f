//! The report model and its writers. A [`Report`] is a plain value built
//! from snapshots: which process, when, the totals, every loss counter, the
//! notes, and the ungrouped snapshots now and at the previous report. Each
//! writer turns reports into one output format and knows nothing of eBPF,
//! sessions or processes; a new format is one new file here.

pub mod format;
pub mod json;
pub mod model;
pub mod text;

use std::io;

pub use model::{CensusChange, ProcessInfo, Report};

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
}
