//! `--flamegraph FILE.svg`: outstanding bytes by whole traceback as an
//! interactive SVG flame graph (inferno, Brendan Gregg's layout): one tower
//! per traced process, rooted at `comm (pid N)`, the oldest call at the
//! bottom and the frame that allocated on top, each frame named as
//! tracemalloc prints it (`app.py:6`). Replaced at every report, with
//! every traced process's latest report. `--flamegraph-diff FILE.svg` is
//! the differential form (inferno's `differential`, Brendan Gregg's
//! layout): widths are the bytes outstanding now, and each frame is red
//! where it grew since the previous report and blue where it shrank, the
//! deeper the colour the bigger the change; a traceback freed entirely has
//! no width left to show.

use std::{collections::BTreeMap, path::PathBuf};

use inferno::{differential, flamegraph};

use super::{Report, Writer, replace_file};
use crate::snapshot::Snapshot;

pub struct FlamegraphWriter {
    path: PathBuf,
    differential: bool,
    /// Latest report of each process: its root frame, its snapshot at the
    /// previous report (kept only for the differential form) and now.
    latest: BTreeMap<u32, (String, Option<Snapshot>, Snapshot)>,
}

impl FlamegraphWriter {
    /// Outstanding bytes now.
    pub fn new(path: PathBuf) -> Self {
        Self { path, differential: false, latest: BTreeMap::new() }
    }

    /// Outstanding bytes now, coloured by their change since the previous
    /// report.
    pub fn differential(path: PathBuf) -> Self {
        Self { path, differential: true, latest: BTreeMap::new() }
    }
}

impl Writer for FlamegraphWriter {
    fn write(&mut self, report: &Report) -> std::io::Result<()> {
        let root = format!("{} (pid {})", report.process.comm, report.process.pid);
        let previous = self.differential.then(|| report.previous.clone());
        self.latest.insert(report.process.pid, (root, previous, report.current.clone()));
        let now = collapsed(self.latest.values().map(|(root, _, now)| (root, now)));
        let mut options = flamegraph::Options::default();
        options.count_name = "bytes".into();
        options.deterministic = true;
        let lines = if self.differential {
            options.title =
                "memtrace: outstanding bytes, red where they grew since the previous report, blue where they shrank"
                    .into();
            let before = self.latest.values().filter_map(|(root, before, _)| Some((root, before.as_ref()?)));
            let mut merged = Vec::new();
            // Addresses name native frames: they must not be merged away.
            let keep = differential::Options { normalize: false, strip_hex: false };
            differential::from_readers(
                keep,
                collapsed(before).join("\n").as_bytes(),
                now.join("\n").as_bytes(),
                &mut merged,
            )?;
            String::from_utf8_lossy(&merged).lines().map(str::to_owned).collect()
        } else {
            options.title = "memtrace: outstanding bytes by traceback".into();
            now
        };
        let mut svg = Vec::new();
        let drawn = flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg);
        // With nothing outstanding inferno still writes a valid SVG that
        // says so, and returns an error that is no failure here.
        let outstanding = self.latest.values().any(|(_, _, now)| !now.stats.is_empty());
        if drawn.is_err() && outstanding {
            drawn?;
        }
        replace_file(&self.path, &svg)
    }
}

/// Brendan Gregg's collapsed stacks: `root;oldest;...;innermost bytes`.
fn collapsed<'a>(snapshots: impl Iterator<Item = (&'a String, &'a Snapshot)>) -> Vec<String> {
    // `;` separates frames and would split a name that holds one.
    let name = |s: &str| s.replace(';', ",");
    let mut lines = Vec::new();
    for (root, snapshot) in snapshots {
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
    use crate::{report::text::tests::sample, snapshot::Stat};

    /// The SVG `writer` draws of `report`, its file removed.
    fn drawn(mut writer: FlamegraphWriter, report: &Report) -> String {
        writer.write(report).unwrap();
        let svg = std::fs::read_to_string(&writer.path).unwrap();
        std::fs::remove_file(&writer.path).unwrap();
        svg
    }

    fn path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("memtrace-flame-{tag}-{}.svg", std::process::id()))
    }

    #[test]
    fn one_tower_per_process_oldest_frame_first() {
        let mut writer = FlamegraphWriter::new(path("towers"));
        writer.write(&sample(false)).unwrap();
        let lines = collapsed(writer.latest.values().map(|(root, _, now)| (root, now)));
        assert_eq!(
            lines,
            [
                "python (pid 24733);/w/app.py:33;/w/app.py:20 40",
                "python (pid 24733);/w/app.py:33;/w/app.py:27;/w/app.py:16 3708000"
            ]
        );
        let svg = drawn(writer, &sample(false));
        assert!(svg.starts_with("<?xml") && svg.contains("/w/app.py:16") && svg.contains("python (pid 24733)"));
    }

    #[test]
    fn nothing_outstanding_is_a_valid_svg() {
        let mut report = sample(false);
        report.current = Snapshot::default();
        for writer in [FlamegraphWriter::new(path("empty")), FlamegraphWriter::differential(path("empty-diff"))] {
            let svg = drawn(writer, &report);
            assert!(svg.contains("No valid input") && svg.trim_end().ends_with("</svg>"), "{svg}");
        }
    }

    /// The `<g>` of the frame named `name`: its tooltip and rectangle.
    fn frame<'a>(svg: &'a str, name: &str) -> &'a str {
        svg.split("<g>").find(|g| g.contains(&format!("<title>{name} "))).unwrap_or_else(|| panic!("{svg}"))
    }

    #[test]
    fn the_differential_form_colours_growth_red_and_shrinkage_blue() {
        // The leak grew from 1,850,000 to 3,708,000 bytes; a new line came.
        let svg = drawn(FlamegraphWriter::differential(path("diff")), &sample(false));
        let leak = frame(&svg, "/w/app.py:16");
        assert!(leak.contains("(3,708,000 bytes, 100.00%; +50.11%)") && leak.contains(r#"fill="rgb(255,"#), "{leak}");
        assert!(svg.contains("red where they grew"), "{svg}");
        let mut report = sample(false);
        let (leak, _) = report.current.stats.iter().max_by_key(|(_, s)| s.size).unwrap();
        report.previous = Snapshot::from_entries([(leak.clone(), Stat { size: 5_000_000, count: 60_000 })]);
        let svg = drawn(FlamegraphWriter::differential(path("shrink")), &report);
        let leak = frame(&svg, "/w/app.py:16");
        assert!(leak.contains("; -34.84%)") && leak.contains(",255)"), "{leak}");
    }
}
