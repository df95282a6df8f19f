//! `--timeline FILE`: memory over time as a line plot (plotters), as
//! `mprof plot` draws it: per traced process, thick lines for its RSS and
//! Python heap (from the census) and its traced outstanding bytes, each
//! marked at every report, and a thin line for each of its largest groups
//! at the latest report, as the report groups them. Written as SVG, or as
//! PNG when FILE ends in `.png`; replaced at every report. Text is laid out with a TrueType font read from the system
//! (Debian's fonts-dejavu-core), for both formats.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::SystemTime,
};

use anyhow::{Context as _, bail};
use plotters::{coord::Shift, prelude::*};

use super::{Report, Writer, format::format_size, replace_file};
use crate::snapshot::{GroupBy, Traceback};

/// Groups drawn per process, besides its total.
const GROUP_LINES: usize = 5;
/// Points kept per line: at the default 5 s interval, 14 hours.
const MAX_POINTS: usize = 10_000;
const SIZE: (u32, u32) = (1024, 640);
/// Where Debian's packages put a sans-serif TrueType font.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

pub struct TimelineWriter {
    path: PathBuf,
    png: bool,
    group_by: GroupBy,
    top: usize,
    start: Option<SystemTime>,
    processes: BTreeMap<u32, Lines>,
}

/// What a process's thick lines measure, in legend order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Measure {
    Rss,
    PythonHeap,
    Outstanding,
}

impl Measure {
    fn label(self) -> &'static str {
        match self {
            Measure::Rss => "RSS",
            Measure::PythonHeap => "Python heap",
            Measure::Outstanding => "traced outstanding",
        }
    }
}

/// One process's lines: (seconds since the first report, bytes).
#[derive(Default)]
struct Lines {
    name: String,
    /// Only those the reports had: no Python heap for a C program, no
    /// outstanding bytes under `--census-only`.
    measures: BTreeMap<Measure, Vec<(f64, u64)>>,
    groups: HashMap<Traceback, Vec<(f64, u64)>>,
    /// The groups to draw: the largest at the latest report.
    largest: Vec<Traceback>,
}

impl TimelineWriter {
    pub fn new(path: PathBuf, group_by: GroupBy, top: usize) -> anyhow::Result<Self> {
        register_font()?;
        let png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
        Ok(Self { path, png, group_by, top, start: None, processes: BTreeMap::new() })
    }
}

/// Registers the system's font with plotters, once per run.
fn register_font() -> anyhow::Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    let registered = FONT.get_or_init(|| {
        let Some((path, bytes)) = FONTS.iter().find_map(|p| std::fs::read(p).ok().map(|b| (p, b))) else {
            return Err(format!(
                "no TrueType font found to lay out its text ({}); install Debian's fonts-dejavu-core",
                FONTS.join(", ")
            ));
        };
        // plotters keeps fonts for the life of the program.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a TrueType font plotters can read"))
    });
    match registered {
        Ok(()) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

impl Writer for TimelineWriter {
    fn write(&mut self, report: &Report) -> std::io::Result<()> {
        let start = *self.start.get_or_insert(report.time);
        let t = report.time.duration_since(start).unwrap_or_default().as_secs_f64();
        let lines = self.processes.entry(report.process.pid).or_default();
        lines.name = format!("{} (pid {})", report.process.comm, report.process.pid);
        let census = report.census.as_ref().map(|c| &c.now);
        for (measure, bytes) in [
            (Measure::Rss, census.and_then(|c| c.memory).map(|m| m.rss)),
            (Measure::PythonHeap, census.and_then(|c| c.heap).map(|h| h.bytes)),
            (Measure::Outstanding, report.traced.then(|| report.current.total().size)),
        ] {
            if let Some(bytes) = bytes {
                push(lines.measures.entry(measure).or_default(), (t, bytes));
            }
        }
        let mut groups: Vec<_> = report.current.group(self.group_by).stats.into_iter().collect();
        groups.sort_by(|a, b| b.1.size.cmp(&a.1.size).then_with(|| a.0.cmp(&b.0)));
        groups.truncate(self.top.min(GROUP_LINES));
        for (key, stat) in &groups {
            push(lines.groups.entry(key.clone()).or_default(), (t, stat.size));
        }
        lines.largest = groups.into_iter().map(|(key, _)| key).collect();
        self.draw().map_err(|e| std::io::Error::other(format!("{e:#}")))
    }
}

fn push(line: &mut Vec<(f64, u64)>, point: (f64, u64)) {
    if line.len() == MAX_POINTS {
        line.remove(0);
    }
    line.push(point);
}

impl TimelineWriter {
    fn draw(&self) -> anyhow::Result<()> {
        if self.png {
            // The encoder picks the format from the name, so the sibling
            // that is renamed over the file ends in .png too.
            let tmp = sibling(&self.path, "tmp.png");
            {
                let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
                self.plot(&root)?;
                root.present().context("cannot encode the PNG")?;
            }
            std::fs::rename(&tmp, &self.path)?;
        } else {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
                self.plot(&root)?;
                root.present().context("cannot draw the SVG")?;
            }
            replace_file(&self.path, svg.as_bytes())?;
        }
        Ok(())
    }

    fn plot<B: DrawingBackend>(&self, root: &DrawingArea<B, Shift>) -> anyhow::Result<()>
    where
        B::ErrorType: 'static,
    {
        let error = |e: DrawingAreaErrorKind<B::ErrorType>| anyhow::anyhow!("cannot plot: {e:?}");
        root.fill(&WHITE).map_err(error)?;
        let all = self.processes.values().flat_map(|l| l.measures.values().chain(l.groups.values()).flatten());
        let t_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
        let y_max = all.map(|p| p.1).max().unwrap_or(0).max(1) as f64 * 1.05;
        let mut chart = ChartBuilder::on(root)
            .caption("memtrace: memory over time", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(error)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the first report")
            .y_label_formatter(&|y| format_size(*y, false))
            .draw()
            .map_err(error)?;
        let mut color = 0;
        for lines in self.processes.values() {
            // The measures thick and marked at each report, the groups thin.
            let measures =
                lines.measures.iter().map(|(m, points)| (format!("{} {}", lines.name, m.label()), points, 3));
            let groups = lines.largest.iter().map(|key| (key.to_string(), &lines.groups[key], 1));
            for (label, points, width) in measures.chain(groups) {
                let style = Palette99::pick(color).stroke_width(width);
                color += 1;
                let points = || points.iter().map(|&(t, y)| (t, y as f64));
                chart
                    .draw_series(LineSeries::new(points(), style))
                    .map_err(error)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                if width > 1 {
                    chart.draw_series(points().map(|p| Circle::new(p, 3, style.filled()))).map_err(error)?;
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(error)?;
        Ok(())
    }
}

/// `dir/.name.suffix`: hidden, beside `path`, on the same file system.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        census::{Census, memory::Memory, pymalloc},
        report::{CensusChange, text::tests::sample},
    };

    /// Needs a system font; memtrace's test set-up installs Debian's
    /// fonts-dejavu-core, and without one the writer says so at start.
    #[test]
    fn draws_svg_and_png_with_every_line_labelled() {
        if FONTS.iter().all(|p| !Path::new(p).exists()) {
            let err = TimelineWriter::new("x.svg".into(), GroupBy::Lineno, 10).err().expect("no font");
            assert!(err.to_string().contains("fonts-dejavu-core"), "{err}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("memtrace-timeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["t.svg", "t.png"] {
            let path = dir.join(name);
            let mut writer = TimelineWriter::new(path.clone(), GroupBy::Lineno, 10).unwrap();
            let mut report = sample(false);
            let now = Census {
                memory: Some(Memory { rss: 9 << 20, anonymous: 5 << 20, swap: 0 }),
                heap: Some(pymalloc::Census { blocks: 51_000, bytes: 3_000_000, raw_blocks: 4 }),
                objects: None,
            };
            report.census = Some(CensusChange { now, before: Census::default() });
            writer.write(&report).unwrap();
            report.time += std::time::Duration::from_secs(5);
            writer.write(&report).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            if name.ends_with(".svg") {
                let svg = String::from_utf8(bytes).unwrap();
                for label in ["RSS", "Python heap", "traced outstanding"] {
                    assert!(svg.contains(&format!("python (pid 24733) {label}")), "{label}: {svg}");
                }
                assert!(svg.contains("/w/app.py:16"), "{svg}");
                // A marker at each report of each of the three measures.
                assert_eq!(svg.matches("<circle").count(), 6, "{svg}");
            } else {
                assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000, "{} bytes", bytes.len());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
