//! The runs as a reader sees them: medians per configuration, the result
//! tables (printed, and the heart of BENCHMARKS.md), and BENCHMARKS.md
//! itself, bench/template.md filled with the machine, the tools' versions,
//! the method's numbers and the tables.

use std::{collections::HashMap, fmt::Write as _, fs, process::Command, thread};

use anyhow::{Context as _, Result, bail};

use crate::{
    census::CensusCost,
    harness::{Config, DEEP_DEPTH, Samples, WORKLOADS},
    output,
    setup::{AttachPoint, Setup},
};

/// BENCHMARKS.md with `{name}` where a value goes.
const TEMPLATE: &str = include_str!("../template.md");

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

fn median_count(values: &[u64]) -> Option<f64> {
    (!values.is_empty()).then(|| median(&values.iter().map(|&v| v as f64).collect::<Vec<_>>()))
}

/// The result tables, for `samples` indexed like `WORKLOADS`.
pub fn results(points: &[AttachPoint], samples: &[Vec<Samples>]) -> String {
    let mut out = String::new();
    for (workload, samples) in WORKLOADS.iter().zip(samples) {
        // Every workload's first configuration is the untraced one.
        let untraced = median(&samples[0].seconds);
        let floor = workload.configs.iter().position(|&c| c == Config::Floor).map(|i| &samples[i]);
        let hits = floor.and_then(|f| median_count(&f.total_hits)).unwrap_or(0.0);
        // The workload's allocations as memtrace counts them, over all its
        // memtrace runs (the loop is deterministic; the runs agree closely).
        let all_allocations: Vec<u64> = samples.iter().flat_map(|s| s.allocations.iter().copied()).collect();
        let allocations = median_count(&all_allocations).unwrap_or(0.0);
        let _ = writeln!(
            out,
            "### {} workload ({} Python frames at the loop)\n\nPer run: {hits:.0} probe hits (the floor's count) and {allocations:.0} allocations (memtrace's count).\n",
            workload.name,
            workload.depth + 3,
        );
        let mut rows = Vec::new();
        for (&config, s) in workload.configs.iter().zip(samples) {
            let m = median(&s.seconds);
            let spread = format!(
                "{:.3}–{:.3}",
                s.seconds.iter().copied().fold(f64::INFINITY, f64::min),
                s.seconds.iter().copied().fold(0.0, f64::max)
            );
            let per = |count: f64| {
                if config.on_probes() && count > 0.0 {
                    format!("{:.0}", (m - untraced) * 1e9 / count)
                } else {
                    "–".into()
                }
            };
            let share = |values: &[u64]| match (median_count(values), median_count(&s.allocations)) {
                (Some(v), Some(a)) if a > 0.0 => format!("{:.1}%", 100.0 * v / a),
                _ => "–".into(),
            };
            rows.push(vec![
                config.label(),
                format!("{m:.3}"),
                spread,
                format!("{:.2}×", m / untraced),
                per(hits),
                per(allocations),
                share(&s.truncated),
                share(&s.read_faults),
            ]);
        }
        out += &table(
            &[
                "configuration",
                "median s",
                "runs s (min–max)",
                "vs untraced",
                "ns / probe hit",
                "ns / allocation",
                "truncated / allocations",
                "read faults / allocations",
            ],
            &rows,
        );
        out.push('\n');
    }

    out += "### Probe hits per run (the floor's counts, medians)\n\n";
    let floors: Vec<&Samples> = WORKLOADS
        .iter()
        .zip(samples)
        .filter_map(|(w, s)| w.configs.iter().position(|&c| c == Config::Floor).map(|i| &s[i]))
        .collect();
    let mut rows = Vec::new();
    let mut single_stepped = vec![0.0; floors.len()];
    let mut total = vec![0.0; floors.len()];
    for point in points {
        for probe in point.bpftrace_probes() {
            let kind = probe.split(':').next().unwrap_or_default().to_owned();
            let mut row = vec![kind, point.label(), point.placement.clone()];
            for (i, floor) in floors.iter().enumerate() {
                let count = floor.hits.get(&probe).and_then(|v| median_count(v)).unwrap_or(0.0);
                total[i] += count;
                if point.placement == "single-stepped" {
                    single_stepped[i] += count;
                }
                row.push(format!("{count:.0}"));
            }
            rows.push(row);
        }
    }
    let mut headers = vec!["probe", "at", "first instruction"];
    let workload_headers: Vec<String> = WORKLOADS.iter().map(|w| format!("{} hits", w.name)).collect();
    headers.extend(workload_headers.iter().map(String::as_str));
    out += &table(&headers, &rows);
    for (workload, (stepped, total)) in WORKLOADS.iter().zip(single_stepped.iter().zip(&total)) {
        let _ = write!(
            out,
            "\n{}: {stepped:.0} of {total:.0} hits ({:.2}%) are on single-stepped probes.",
            workload.name,
            if *total > 0.0 { 100.0 * stepped / total } else { 0.0 }
        );
    }
    out
}

/// A Markdown table, padded so that it also reads as plain text.
/// The census's cost per million objects, on each interpreter.
pub fn census(costs: &[CensusCost]) -> String {
    let rows: Vec<Vec<String>> = costs
        .iter()
        .map(|c| {
            let took: Vec<f64> = c.took_ms.iter().map(|&t| t as f64).collect();
            let median_ms = median(&took);
            vec![
                c.python.clone(),
                c.objects.to_string(),
                format!("{median_ms:.0}"),
                format!("{:.0}", median_ms * 1e6 / c.objects as f64),
                format!("{:?}", c.took_ms),
            ]
        })
        .collect();
    format!(
        "### The object census (`--census-only`)\n\nA process holding a million instances of a class (each with an int of its own) censused four times, each census timed by memtrace; the cost is memtrace's, the process is not stopped. The goal is at most 200 ms per million objects.\n\n{}",
        table(&["interpreter", "objects counted", "median ms", "ms per million objects", "each census, ms"], &rows)
    )
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(c, &w)| format!("{c}{}", " ".repeat(w - c.chars().count()))).collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(headers.to_vec());
    out += &line(widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().iter().map(String::as_str).collect());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// BENCHMARKS.md: the machine, the method, then the results.
pub fn document(setup: &Setup, repeat: u64, results: &str) -> Result<String> {
    let date = output(Command::new("date").arg("-u"))?;
    let kernel = output(Command::new("uname").arg("-r"))?;
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("cannot read /proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find_map(|l| Some(l.strip_prefix("model name")?.split_once(':')?.1.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    let memory_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .context("no MemTotal in /proc/meminfo")?;
    let interpreter = output(Command::new(&setup.python).arg("--version"))?;
    let bpftrace = output(Command::new("bpftrace").arg("--version"))?;
    let memray = output(Command::new(&setup.memray_python).args(["-c", "import memray; print(memray.__version__)"]))?;
    let single_stepped: Vec<String> =
        setup.points.iter().filter(|p| p.placement == "single-stepped").map(AttachPoint::label).collect();
    let iterations = setup.iterations;
    fill(
        TEMPLATE,
        &HashMap::from([
            ("date", date.trim().to_owned()),
            ("kernel", kernel.trim().to_owned()),
            ("cpu", cpu),
            ("cores", cores.to_string()),
            ("memory", format!("{:.1}", memory_kib / (1024.0 * 1024.0))),
            ("interpreter", interpreter.trim().to_owned()),
            ("python", setup.python.display().to_string()),
            ("source", setup.source.clone()),
            ("bpftrace", bpftrace.trim().to_owned()),
            ("memray", memray.trim().to_owned()),
            ("repeat", repeat.to_string()),
            ("iterations", iterations.to_string()),
            ("kept", iterations.div_ceil(10).to_string()),
            ("deep", (DEEP_DEPTH + 3).to_string()),
            ("depth", DEEP_DEPTH.to_string()),
            ("single_stepped", if single_stepped.is_empty() { "none".into() } else { single_stepped.join(", ") }),
            ("results", results.to_owned()),
        ]),
    )
}

/// `template` with each `{name}` replaced by its value; a name without
/// one is an error, so that the template and the code cannot drift apart
/// unnoticed.
fn fill(template: &str, values: &HashMap<&str, String>) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').map(|at| open + at).context("an unclosed `{` in bench/template.md")?;
        let name = &rest[open + 1..close];
        let Some(value) = values.get(name) else { bail!("bench/template.md has `{{{name}}}`, which nothing fills") };
        out += &rest[..open];
        out += value;
        rest = &rest[close + 1..];
    }
    out += rest;
    Ok(out)
}
