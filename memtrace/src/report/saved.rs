//! `--save DIR`: every report's whole ungrouped snapshot, tracebacks and
//! all, with its header, as one JSON document per report
//! (`DIR/PID-SEQUENCE.json`), and reading them back for `memtrace diff` and
//! `memtrace show`. A saved snapshot holds everything the report's header
//! and rows are made of, so a report rebuilt from two consecutive ones is
//! the report memtrace printed live. The format is [`SavedSnapshot`],
//! versioned by its `version` field ([`VERSION`]); README.md lists its
//! fields.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::{CensusChange, ProcessInfo, Report, Writer, model::Counters, replace_file};
use crate::snapshot::{Frame, Snapshot, Stat, Traceback};

/// The format's version; a reader refuses any other.
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedSnapshot {
    pub version: u32,
    /// When the report was taken: whole seconds since the Unix epoch and
    /// nanoseconds, exactly.
    pub time_secs: u64,
    pub time_nanos: u32,
    pub process: ProcessInfo,
    pub sequence: u32,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub allocated: Stat,
    /// (name, value) in the report's order.
    pub losses: Counters,
    pub counters: Counters,
    pub notes: Vec<String>,
    pub traced: bool,
    /// Every traceback with something outstanding, sorted by traceback.
    pub stats: Vec<SavedStat>,
    /// The census the report showed, and the one it was compared with.
    pub census: Option<CensusChange>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedStat {
    /// Innermost (where the allocation was made) first.
    pub frames: Vec<Frame>,
    pub size: u64,
    pub count: u64,
}

impl SavedSnapshot {
    pub fn of(report: &Report) -> Self {
        let since = report.time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let mut stats: Vec<(&Traceback, &Stat)> = report.current.stats.iter().collect();
        stats.sort_by(|a, b| a.0.cmp(b.0));
        Self {
            version: VERSION,
            time_secs: since.as_secs(),
            time_nanos: since.subsec_nanos(),
            process: report.process.clone(),
            sequence: report.sequence,
            is_final: report.is_final,
            allocated: report.allocated,
            losses: report.losses.clone(),
            counters: report.counters.clone(),
            notes: report.notes.clone(),
            traced: report.traced,
            census: report.census.clone(),
            stats: stats
                .into_iter()
                .map(|(traceback, stat)| SavedStat { frames: traceback.0.clone(), size: stat.size, count: stat.count })
                .collect(),
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let saved: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a snapshot memtrace saved", path.display()))?;
        if saved.version != VERSION {
            bail!("{} is a version {} snapshot; this memtrace reads version {VERSION}", path.display(), saved.version);
        }
        Ok(saved)
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot::from_entries(
            self.stats.iter().map(|s| (Traceback(s.frames.clone()), Stat { size: s.size, count: s.count })),
        )
    }

    /// This snapshot's report, with its changes since `previous` (from
    /// nothing when None; its census then compared as it was live). It has
    /// no history, so no verdicts or peaks.
    pub fn report(&self, previous: Option<&SavedSnapshot>) -> Report {
        Report {
            time: SystemTime::UNIX_EPOCH + Duration::new(self.time_secs, self.time_nanos),
            process: self.process.clone(),
            sequence: self.sequence,
            is_final: self.is_final,
            allocated: self.allocated,
            losses: self.losses.clone(),
            counters: self.counters.clone(),
            notes: self.notes.clone(),
            traced: self.traced,
            current: self.snapshot(),
            previous: previous.map(SavedSnapshot::snapshot).unwrap_or_default(),
            census: self.census.clone().map(|census| match previous.and_then(|p| p.census.as_ref()) {
                Some(before) => CensusChange { now: census.now, before: before.now.clone() },
                None => census,
            }),
            history: Default::default(),
            type_trends: Default::default(),
            first_touch: None,
        }
    }
}

pub struct SnapshotSaver {
    dir: PathBuf,
}

impl SnapshotSaver {
    /// Creates `dir` if needed and checks that it takes files.
    pub fn new(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)?;
        super::check_writable(&dir.join(".memtrace-check"))?;
        Ok(Self { dir })
    }

    pub fn path(dir: &Path, pid: u32, sequence: u32) -> PathBuf {
        dir.join(format!("{pid}-{sequence:06}.json"))
    }
}

impl Writer for SnapshotSaver {
    fn write(&mut self, report: &Report) -> std::io::Result<()> {
        let json = serde_json::to_vec(&SavedSnapshot::of(report))?;
        replace_file(&Self::path(&self.dir, report.process.pid, report.sequence), &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        report::text::{TextWriter, tests::sample},
        snapshot::GroupBy,
    };

    fn text(report: &Report) -> String {
        let mut out = Vec::new();
        let view = crate::report::View { group_by: GroupBy::Traceback, top: 10, types: 10 };
        TextWriter::new(&mut out, NoSource, view).write(report).unwrap();
        String::from_utf8(out).unwrap()
    }

    struct NoSource;

    impl crate::report::text::SourceLines for NoSource {
        fn line(&mut self, _: u32, _: &str, _: u32) -> Option<String> {
            None
        }
    }

    #[test]
    fn two_saved_snapshots_rebuild_the_report_between_them() {
        let dir = std::env::temp_dir().join(format!("memtrace-saved-{}", std::process::id()));
        let mut report = sample(false);
        report.time += Duration::from_nanos(123_456_789);
        let mut saver = SnapshotSaver::new(dir.clone()).unwrap();
        let mut before = report.clone();
        before.current = report.previous.clone();
        before.sequence -= 1;
        saver.write(&before).unwrap();
        saver.write(&report).unwrap();
        let load = |seq| SavedSnapshot::load(&SnapshotSaver::path(&dir, 24733, seq)).unwrap();
        let (old, new) = (load(1), load(2));
        std::fs::remove_dir_all(&dir).unwrap();
        let rebuilt = new.report(Some(&old));
        assert_eq!(rebuilt.time, report.time);
        assert_eq!(text(&rebuilt), text(&report));
        assert_eq!(new, SavedSnapshot::of(&report));
    }

    #[test]
    fn other_versions_and_other_files_are_refused() {
        let path = std::env::temp_dir().join(format!("memtrace-saved-v-{}.json", std::process::id()));
        let mut saved = SavedSnapshot::of(&sample(false));
        saved.version = 2;
        std::fs::write(&path, serde_json::to_string(&saved).unwrap()).unwrap();
        let err = format!("{:#}", SavedSnapshot::load(&path).unwrap_err());
        assert!(err.contains("is a version 2 snapshot; this memtrace reads version 1"), "{err}");
        std::fs::write(&path, "{}").unwrap();
        let err = format!("{:#}", SavedSnapshot::load(&path).unwrap_err());
        assert!(err.contains("is not a snapshot memtrace saved"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
