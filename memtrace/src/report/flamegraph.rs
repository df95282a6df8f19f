//! `--flamegraph FILE.svg`: outstanding bytes by whole traceback as an
//! interactive SVG flame graph (inferno, Brendan Gregg's layout): one tower
//! per traced process, rooted at `comm (pid N)`, the oldest call at the
//! bottom and the frame that allocated on top, each frame named as
//! tracemalloc prints it (`app.py:6`). Replaced at every report, with
//! every traced process's latest report.

use std::{collections::BTreeMap, path::PathBuf};

use inferno::flamegraph;

use super::{Report, Writer, replace_file};
use crate::snapshot::Snapshot;

pub struct FlamegraphWriter {
    path: PathBuf,
    /// Latest report of each process: its root frame and snapshot.
    latest: BTreeMap<u32, (String, Snapshot)>,
}

impl FlamegraphWriter {
    pub fn new(path: PathBuf) -> Self {
        Self { path, latest: BTreeMap::new() }
    }
}

impl Writer for FlamegraphWriter {
    fn write(&mut self, report: &Report) -> std::io::Result<()> {
        let root = format!("{} (pid {})", report.process.comm, report.process.pid);
        self.latest.insert(report.process.pid, (root, report.current.clone()));
        let lines = collapsed(&self.latest);
        let mut options = flamegraph::Options::default();
        options.title = "memtrace: outstanding bytes by traceback".into();
        options.count_name = "bytes".into();
        options.deterministic = true;
        let mut svg = Vec::new();
        let drawn = flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg);
        // With nothing outstanding inferno still writes a valid SVG that
        // says so, and returns an error that is no failure here.
        if drawn.is_err() && !lines.is_empty() {
            drawn?;
        }
        replace_file(&self.path, &svg)
    }
}

/// Brendan Gregg's collapsed stacks: `root;oldest;...;innermost bytes`.
fn collapsed(latest: &BTreeMap<u32, (String, Snapshot)>) -> Vec<String> {
    // `;` separates frames and would split a name that holds one.
    let name = |s: &str| s.replace(';', ",");
    let mut lines = Vec::new();
    for (root, snapshot) in latest.values() {
        for (traceback, stat) in &snapshot.stats {
            let mut line = name(root);
            for frame in traceback.oldest_first() {
                line.push(';');
                line.push_str(&name(&frame.to_string()));
            }
            lines.push(format!("{line} {}", stat.size));
        }
    }
    lines.sort();
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::text::tests::sample;

    #[test]
    fn one_tower_per_process_oldest_frame_first() {
        let path = std::env::temp_dir().join(format!("memtrace-flame-{}.svg", std::process::id()));
        let mut writer = FlamegraphWriter::new(path.clone());
        writer.write(&sample(false)).unwrap();
        let lines = collapsed(&writer.latest);
        assert_eq!(
            lines,
            [
                "python (pid 24733);/w/app.py:33;/w/app.py:20 40",
                "python (pid 24733);/w/app.py:33;/w/app.py:27;/w/app.py:16 3708000"
            ]
        );
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<?xml") && svg.contains("/w/app.py:16") && svg.contains("python (pid 24733)"));
    }

    #[test]
    fn nothing_outstanding_is_a_valid_svg() {
        let path = std::env::temp_dir().join(format!("memtrace-flame-empty-{}.svg", std::process::id()));
        let mut report = sample(false);
        report.current = Snapshot::default();
        FlamegraphWriter::new(path.clone()).write(&report).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.contains("No valid input") && svg.trim_end().ends_with("</svg>"), "{svg}");
    }
}
