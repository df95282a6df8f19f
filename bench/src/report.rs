//! The runs as a reader sees them: medians per configuration, ratios to
//! each configuration's untraced baseline, costs per probe hit, geomeans;
//! the result tables of each part of the bench (printed, and the heart of
//! BENCHMARKS.md), and BENCHMARKS.md itself, bench/template.md filled with
//! the machine, the tools' versions, the method's numbers and the tables.

use std::{collections::HashMap, fmt::Write as _, fs, process::Command, thread};

use anyhow::{Context as _, Result, bail};

use crate::{
    census::CensusCost,
    first_touch::Accuracy,
    harness::{CENSUS_INTERVAL, CENSUS_SPAN, Config, Samples},
    host::HostCost,
    output,
    program_stats::RunTime,
    setup::{AttachPoint, CALIBRATION_SECONDS, Setup},
    workload::{DEEP_DEPTH, Group, Kind, Workload},
};

/// BENCHMARKS.md with `{name}` where a value goes.
const TEMPLATE: &str = include_str!("../template.md");

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn median_count(values: &[u64]) -> Option<f64> {
    median(&values.iter().map(|&v| v as f64).collect::<Vec<_>>())
}

fn geomean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| (values.iter().map(|v| v.ln()).sum::<f64>() / values.len() as f64).exp())
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn cell(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "–".into(), format)
}

fn times(ratio: f64) -> String {
    format!("{ratio:.2}×")
}

/// One workload's runs, asked the questions every table asks.
struct Measures<'a> {
    workload: &'a Workload,
    samples: &'a [Samples],
}

impl Measures<'_> {
    fn of(&self, config: Config) -> Option<&Samples> {
        self.workload.position(|c| c == config).map(|i| &self.samples[i])
    }

    /// Median seconds per untraced-size run.
    fn seconds(&self, config: Config) -> Option<f64> {
        median(&self.of(config)?.seconds)
    }

    /// Its median time over its baseline's: the slowdown.
    fn ratio(&self, config: Config) -> Option<f64> {
        Some(self.seconds(config)? / self.seconds(config.baseline())?)
    }

    /// Probe hits per run, the floor's count.
    fn hits(&self) -> Option<f64> {
        median_count(&self.of(Config::Floor)?.total_hits)
    }

    /// Allocations per run as memtrace counts them, over all its runs of
    /// the workload (the workloads are deterministic; the runs agree
    /// closely).
    fn allocations(&self) -> Option<f64> {
        median_count(&self.samples.iter().flat_map(|s| s.allocations.iter().copied()).collect::<Vec<_>>())
    }

    /// Nanoseconds `config` adds over untraced per one of `count`: only
    /// for the tracers on memtrace's attach points.
    fn ns_per(&self, config: Config, count: Option<f64>) -> Option<f64> {
        let count = count.filter(|&c| c > 0.0 && config.on_probes())?;
        Some((self.seconds(config)? - self.seconds(Config::Untraced)?) * 1e9 / count)
    }

    /// `config`'s ns per probe hit over the floor's.
    fn over_floor(&self, config: Config) -> Option<f64> {
        Some(self.ns_per(config, self.hits())? / self.ns_per(Config::Floor, self.hits())?)
    }

    /// The floor's probe hits over memtrace's allocations: the traps an
    /// allocation costs.
    fn hits_per_allocation(&self) -> Option<f64> {
        Some(self.hits()? / self.allocations().filter(|&a| a > 0.0)?)
    }

    /// The floor's hits at births (`_Py_NewReference`'s probes) over
    /// memtrace's allocations: the traps objects revived from CPython's free
    /// lists cost, which no allocation counts (tracemalloc moves a revived
    /// object's block to the code reviving it, so memtrace must see them).
    fn births_per_allocation(&self, points: &[AttachPoint]) -> Option<f64> {
        let floor = self.of(Config::Floor)?;
        let births: f64 = points
            .iter()
            .filter(|p| p.program == "new_reference")
            .flat_map(AttachPoint::bpftrace_probes)
            .filter_map(|probe| median_count(floor.hits.get(&probe)?))
            .sum();
        Some(births / self.allocations().filter(|&a| a > 0.0)?)
    }

    /// What one run counts: "N probe hits (the floor's count), M
    /// allocations (memtrace's count), H hits per allocation".
    fn counts(&self) -> String {
        format!(
            "{} probe hits (the floor's count), {} allocations (memtrace's count), {} hits per allocation",
            cell(self.hits(), |h| format!("{h:.0}")),
            cell(self.allocations(), |a| format!("{a:.0}")),
            cell(self.hits_per_allocation(), |p| format!("{p:.2}")),
        )
    }

    /// A table row per configuration it ran, in the order it ran them.
    fn rows(&self, row: impl Fn(Config, &Samples) -> Vec<String>) -> Vec<Vec<String>> {
        self.workload.configs.iter().zip(self.samples).map(|(&config, s)| row(config, s)).collect()
    }

    /// A counter of memtrace's as a share of its allocations.
    fn share(&self, values: &[u64], allocations: &[u64]) -> Option<f64> {
        Some(100.0 * median_count(values)? / median_count(allocations).filter(|&a| a > 0.0)?)
    }
}

fn measures<'a>(workloads: &'a [Workload], samples: &'a [Vec<Samples>], group: Group) -> Vec<Measures<'a>> {
    workloads
        .iter()
        .zip(samples)
        .filter(|(w, _)| w.group() == group)
        .map(|(workload, samples)| Measures { workload, samples })
        .collect()
}

/// One part's results: its `{name}` in the template, its title, and its
/// tables when it ran.
pub struct Part {
    pub name: &'static str,
    pub title: &'static str,
    pub text: Option<String>,
}

/// Every part's results, in BENCHMARKS.md's order.
pub fn results(
    workloads: &[Workload],
    samples: &[Vec<Samples>],
    points: &[AttachPoint],
    census_costs: Option<&[CensusCost]>,
    host_costs: Option<&[HostCost]>,
    accuracy: Option<&[Accuracy]>,
) -> Vec<Part> {
    let part = |group, write: &dyn Fn(&[Measures]) -> String| {
        let runs = measures(workloads, samples, group);
        (!runs.is_empty()).then(|| write(&runs))
    };
    vec![
        Part {
            name: "micro_results",
            title: "The microbenchmark",
            text: part(Group::Micro, &|runs| micro(runs, points)),
        },
        Part {
            name: "pyperformance_results",
            title: "The pyperformance subset",
            text: part(Group::Pyperformance, &|runs| pyperformance(runs, points)),
        },
        Part { name: "flask_results", title: "The web service", text: part(Group::Flask, &flask) },
        Part { name: "census_results", title: "The object census's own cost", text: census_costs.map(census) },
        Part { name: "host_results", title: "Host mode's own cost", text: host_costs.map(host) },
        Part {
            name: "first_touch_results",
            title: "First-touch attribution: how often the leak is named first",
            text: accuracy.map(first_touch),
        },
    ]
}

/// The microbenchmark's tables: every configuration of each workload, then
/// the floor's hits per probe.
fn micro(runs: &[Measures], points: &[AttachPoint]) -> String {
    let mut out = String::new();
    for run in runs {
        let (hits, allocations) = (run.hits(), run.allocations());
        let _ = writeln!(
            out,
            "### {} workload ({} Python frames at the loop)\n\nPer run: {}.\n",
            run.workload.name,
            depth(run.workload) + 3,
            run.counts(),
        );
        let rows = run.rows(|config, s| {
            vec![
                config.label(),
                cell(median(&s.seconds), |m| format!("{m:.3}")),
                spread(&s.seconds, |v| format!("{v:.3}")),
                cell(run.ratio(config), times),
                cell(run.ns_per(config, hits), |ns| format!("{ns:.0}")),
                cell(run.ns_per(config, allocations), |ns| format!("{ns:.0}")),
                cell(run.share(&s.truncated, &s.allocations), |p| format!("{p:.1}%")),
                cell(run.share(&s.read_faults, &s.allocations), |p| format!("{p:.1}%")),
            ]
        });
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
        let tracers: Vec<(Config, &Samples)> =
            run.workload.configs.iter().zip(run.samples).filter(|(c, _)| c.on_probes()).map(|(&c, s)| (c, s)).collect();
        if !tracers.is_empty() {
            let _ = writeln!(
                out,
                "Inside the kernel ({} workload): each BPF program's run time, from the kernel's statistics.\n",
                run.workload.name
            );
            out += &program_table(&tracers, hits);
            out.push('\n');
        }
    }
    let floors: Vec<(&Measures, &Samples)> = runs.iter().filter_map(|r| Some((r, r.of(Config::Floor)?))).collect();
    if floors.is_empty() {
        return out;
    }
    out += "### Probe hits per run (the floor's counts, medians)\n\n";
    let mut rows = Vec::new();
    let mut single_stepped = vec![0.0; floors.len()];
    let mut total = vec![0.0; floors.len()];
    for point in points {
        for probe in point.bpftrace_probes() {
            let kind = probe.split(':').next().unwrap_or_default().to_owned();
            let mut row = vec![kind, point.label(), point.placement.clone()];
            for (i, (_, floor)) in floors.iter().enumerate() {
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
    let names: Vec<String> = floors.iter().map(|(r, _)| format!("{} hits", r.workload.name)).collect();
    let mut headers = vec!["probe", "at", "first instruction"];
    headers.extend(names.iter().map(String::as_str));
    out += &table(&headers, &rows);
    for ((run, _), (stepped, total)) in floors.iter().zip(single_stepped.iter().zip(&total)) {
        let _ = write!(
            out,
            "\n{}: {stepped:.0} of {total:.0} hits ({:.2}%) are on single-stepped probes.",
            run.workload.name,
            if *total > 0.0 { 100.0 * stepped / total } else { 0.0 }
        );
    }
    out
}

fn depth(workload: &Workload) -> u32 {
    match workload.kind {
        Kind::Micro { depth } => depth,
        _ => 0,
    }
}

/// The configurations any of `runs` ran, in Config::ALL's order.
fn configs_run(runs: &[Measures]) -> Vec<Config> {
    Config::ALL.into_iter().filter(|&c| runs.iter().any(|r| r.of(c).is_some())).collect()
}

/// The pyperformance subset: the slowdown of every configuration per
/// benchmark and its geomean, then what the probes cost per hit.
fn pyperformance(runs: &[Measures], points: &[AttachPoint]) -> String {
    let configs: Vec<Config> = configs_run(runs).into_iter().filter(|&c| c != Config::Untraced).collect();
    let mut headers = vec!["benchmark".to_owned(), "loops".into(), "untraced s".into()];
    headers.extend(configs.iter().map(|c| c.column()));
    let mut rows: Vec<Vec<String>> = runs
        .iter()
        .map(|run| {
            let mut row = vec![
                run.workload.name.clone(),
                run.workload.size.to_string(),
                cell(run.seconds(Config::Untraced), |s| format!("{s:.3}")),
            ];
            row.extend(configs.iter().map(|&c| cell(run.ratio(c), times)));
            row
        })
        .collect();
    let mut geomeans = vec!["geomean".to_owned(), String::new(), String::new()];
    geomeans.extend(configs.iter().map(|&c| {
        let ratios: Vec<f64> = runs.iter().filter_map(|r| r.ratio(c)).collect();
        cell(geomean(&ratios), times)
    }));
    rows.push(geomeans);
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut out =
        format!("### Slowdown (time over untraced; the census's over its own baseline)\n\n{}", table(&headers, &rows));

    let memtrace: Vec<Config> = configs.iter().copied().filter(|c| matches!(c, Config::Memtrace(_))).collect();
    let mut headers = vec![
        "benchmark".to_owned(),
        "allocations / run".into(),
        "probe hits / run".into(),
        "hits / allocation".into(),
        "of which births".into(),
        "floor ns / hit".into(),
    ];
    for c in &memtrace {
        headers.push(format!("{} ns / hit", c.column()));
        headers.push(format!("{} over floor", c.column()));
    }
    headers.push("censuses in the census run".into());
    let mut rows: Vec<Vec<String>> = runs
        .iter()
        .map(|run| {
            let hits = run.hits();
            let mut row = vec![
                run.workload.name.clone(),
                cell(run.allocations(), |a| format!("{a:.0}")),
                cell(hits, |h| format!("{h:.0}")),
                cell(run.hits_per_allocation(), |p| format!("{p:.2}")),
                cell(run.births_per_allocation(points), |p| format!("{p:.2}")),
                cell(run.ns_per(Config::Floor, hits), |ns| format!("{ns:.0}")),
            ];
            for &c in &memtrace {
                row.push(cell(run.ns_per(c, hits), |ns| format!("{ns:.0}")));
                row.push(cell(run.over_floor(c), times));
            }
            row.push(cell(run.of(Config::Census).and_then(|s| median_count(&s.censuses)), |n| format!("{n:.0}")));
            row
        })
        .collect();
    let over_runs = |f: &dyn Fn(&Measures) -> Option<f64>| runs.iter().filter_map(f).collect::<Vec<f64>>();
    let mut summary = vec![
        "mean (hits and births / allocation), geomean (the rest)".to_owned(),
        String::new(),
        String::new(),
        cell(mean(&over_runs(&|r| r.hits_per_allocation())), |p| format!("{p:.2}")),
        cell(mean(&over_runs(&|r| r.births_per_allocation(points))), |p| format!("{p:.2}")),
        cell(geomean(&over_runs(&|r| r.ns_per(Config::Floor, r.hits()))), |ns| format!("{ns:.0}")),
    ];
    for &c in &memtrace {
        summary.push(cell(geomean(&over_runs(&|r| r.ns_per(c, r.hits()))), |ns| format!("{ns:.0}")));
        summary.push(cell(geomean(&over_runs(&|r| r.over_floor(c))), times));
    }
    summary.push(String::new());
    rows.push(summary);
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    let _ = write!(out, "\n### What the probes cost\n\n{}", table(&headers, &rows));
    let _ = write!(
        out,
        "\n### Inside the kernel, over the subset\n\nEach BPF program's run time per run of it, from the kernel's statistics, every benchmark's runs together; ns / probe hit over the subset's probe hits.\n\n{}",
        subset_programs(runs)
    );
    out
}

/// Every tracer's programs summed over the subset's benchmarks, round by
/// round, as one table.
fn subset_programs(runs: &[Measures]) -> String {
    let mut tracers = Vec::new();
    for config in configs_run(runs).into_iter().filter(|c| c.on_probes()) {
        let mut total = Samples::default();
        let rounds = runs.iter().filter_map(|r| Some(r.of(config)?.seconds.len())).min().unwrap_or(0);
        total.seconds = vec![0.0; rounds];
        for run in runs {
            let Some(samples) = run.of(config) else { continue };
            for (name, times) in &samples.programs {
                let sum = total.programs.entry(name.clone()).or_insert_with(|| vec![RunTime::default(); rounds]);
                for (s, t) in sum.iter_mut().zip(times) {
                    s.ns += t.ns;
                    s.runs += t.runs;
                }
            }
        }
        tracers.push((config, total));
    }
    let hits: f64 = runs.iter().filter_map(|r| r.hits()).sum();
    let tracers: Vec<(Config, &Samples)> = tracers.iter().map(|(c, s)| (*c, s)).collect();
    program_table(&tracers, Some(hits))
}

/// The web service: requests per second under each configuration.
fn flask(runs: &[Measures]) -> String {
    let mut out = String::new();
    for run in runs {
        let requests = run.workload.size as f64;
        let rate = |seconds: f64| requests / seconds;
        let hits = run.hits();
        let _ = writeln!(out, "Per run: {} requests, {}.\n", run.workload.size, run.counts());
        let rows = run.rows(|config, s| {
            vec![
                config.label(),
                cell(median(&s.seconds), |m| format!("{:.0}", rate(m))),
                spread(&s.seconds.iter().map(|&v| rate(v)).collect::<Vec<_>>(), |r| format!("{r:.0}")),
                cell(run.ratio(config), |r| format!("{:.1}%", 100.0 / r)),
                cell(run.ns_per(config, hits), |ns| format!("{ns:.0}")),
            ]
        });
        out += &table(
            &["configuration", "requests / s", "runs requests / s", "of its baseline's throughput", "ns / probe hit"],
            &rows,
        );
    }
    out
}

/// The median of a program's per-run totals: runs, and ns per run.
fn program_medians(times: &[RunTime]) -> (Option<f64>, Option<f64>) {
    let runs: Vec<u64> = times.iter().map(|t| t.runs).collect();
    let per_run: Vec<f64> = times.iter().filter(|t| t.runs > 0).map(|t| t.ns as f64 / t.runs as f64).collect();
    (median_count(&runs), median(&per_run))
}

/// Every tracer's programs over `hits` probe hits per run (the floor's
/// count): how often each ran, its ns per run and per probe hit, and all
/// of a tracer's programs together. memtrace's ns per hit over the
/// floor's is, to the extent that the 2 cores do not contend, its
/// programs' ns per hit over the floor's programs'.
fn program_table(tracers: &[(Config, &Samples)], hits: Option<f64>) -> String {
    let mut rows = Vec::new();
    for &(config, samples) in tracers {
        let per_hit = |ns: f64| hits.filter(|&h| h > 0.0).map(|h| ns / h);
        // The floor's programs are bpftrace's, one per probe, named after
        // it by bpftrace: only their sum says something.
        let programs = samples.programs.iter().filter(|_| config != Config::Floor);
        for (name, times) in programs {
            let (runs, ns_per_run) = program_medians(times);
            if runs.is_none_or(|r| r == 0.0) {
                continue;
            }
            let ns: Vec<u64> = times.iter().map(|t| t.ns).collect();
            rows.push(vec![
                config.column(),
                name.clone(),
                cell(runs, |r| format!("{r:.0}")),
                cell(ns_per_run, |ns| format!("{ns:.0}")),
                cell(median_count(&ns).and_then(per_hit), |ns| format!("{ns:.0}")),
            ]);
        }
        let round_ns: Vec<u64> = (0..samples.seconds.len())
            .map(|i| samples.programs.values().filter_map(|t| t.get(i)).map(|t| t.ns).sum())
            .collect();
        let round_runs: Vec<u64> = (0..samples.seconds.len())
            .map(|i| samples.programs.values().filter_map(|t| t.get(i)).map(|t| t.runs).sum())
            .collect();
        let all: Vec<RunTime> = round_ns.iter().zip(&round_runs).map(|(&ns, &runs)| RunTime { ns, runs }).collect();
        let (runs, ns_per_run) = program_medians(&all);
        rows.push(vec![
            config.column(),
            "all programs".into(),
            cell(runs, |r| format!("{r:.0}")),
            cell(ns_per_run, |ns| format!("{ns:.0}")),
            cell(median_count(&round_ns).and_then(per_hit), |ns| format!("{ns:.0}")),
        ]);
    }
    table(&["configuration", "program", "runs / run", "ns / run", "ns / probe hit"], &rows)
}

/// A run's values, smallest to largest: `min–max`.
fn spread(values: &[f64], format: impl Fn(f64) -> String) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    if values.is_empty() { "–".into() } else { format!("{}–{}", format(min), format(max)) }
}

/// The census's cost per million objects, on each interpreter.
fn census(costs: &[CensusCost]) -> String {
    let rows: Vec<Vec<String>> = costs
        .iter()
        .map(|c| {
            let took: Vec<f64> = c.took_ms.iter().map(|&t| t as f64).collect();
            let median_ms = median(&took).unwrap_or(0.0);
            vec![
                c.python.clone(),
                c.objects.to_string(),
                format!("{median_ms:.0}"),
                format!("{:.0}", median_ms * 1e6 / c.objects as f64),
                format!("{:?}", c.took_ms),
            ]
        })
        .collect();
    table(&["interpreter", "objects counted", "median ms", "ms per million objects", "each census, ms"], &rows)
}

/// memtrace's CPU and memory watching fifty processes, idle and busy.
fn host(costs: &[HostCost]) -> String {
    let mib = |b: u64| format!("{:.1}", b as f64 / (1024.0 * 1024.0));
    let rows: Vec<Vec<String>> = costs
        .iter()
        .map(|c| {
            vec![
                format!("{} {} processes", c.processes, if c.busy { "busy" } else { "idle" }),
                format!("{:.2}%", 100.0 * c.cpu_share),
                mib(c.rss),
                mib(c.peak_rss),
                c.reports.to_string(),
            ]
        })
        .collect();
    table(&["watched", "memtrace CPU (of one core)", "RSS MiB", "peak RSS MiB", "host reports"], &rows)
}

/// How often each leak-plus-churn workload's reports named the leak first.
fn first_touch(accuracy: &[Accuracy]) -> String {
    let rows: Vec<Vec<String>> = accuracy
        .iter()
        .map(|a| {
            let counter = |name: &str| a.counters.get(name).copied().unwrap_or(0).to_string();
            vec![
                format!("{} ({})", a.mode, a.what),
                a.reports.to_string(),
                format!("{} ({:.0}%)", a.leak_first, 100.0 * a.leak_first as f64 / a.reports.max(1) as f64),
                a.instead.as_ref().map_or("–".into(), |(place, n)| format!("{place} ({n})")),
                counter("growth-faults-walked"),
                counter("faults-sampled"),
                counter("faults-skipped"),
            ]
        })
        .collect();
    table(
        &["workload", "reports", "leak first", "first otherwise", "growth faults walked", "sampled", "skipped"],
        &rows,
    )
}

/// A Markdown table, padded so that it also reads as plain text.
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

/// What the runs were, for the document's method sections.
pub struct Scope {
    pub repeat: u64,
    pub iterations: u64,
    pub requests: u64,
}

/// BENCHMARKS.md: the machine, the method, then each part's results (a
/// part left out by `--only` says so).
pub fn document(setup: &Setup, scope: &Scope, parts: &[Part]) -> Result<String> {
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
    let version = |module: &str| {
        output(
            Command::new(&setup.venv_python)
                .args(["-c", &format!("import importlib.metadata as m; print(m.version('{module}'))")]),
        )
        .map(|v| v.trim().to_owned())
    };
    let single_stepped: Vec<String> =
        setup.points.iter().filter(|p| p.placement == "single-stepped").map(AttachPoint::label).collect();
    let iterations = scope.iterations;
    let mut values = HashMap::from([
        ("date", date.trim().to_owned()),
        ("kernel", kernel.trim().to_owned()),
        ("cpu", cpu),
        ("cores", cores.to_string()),
        ("memory", format!("{:.1}", memory_kib / (1024.0 * 1024.0))),
        ("interpreter", interpreter.trim().to_owned()),
        ("python", setup.python.display().to_string()),
        ("source", setup.source.clone()),
        ("bpftrace", bpftrace.trim().to_owned()),
        ("memray", version("memray")?),
        ("pyperformance", version("pyperformance")?),
        ("flask", version("flask")?),
        ("werkzeug", version("werkzeug")?),
        ("repeat", scope.repeat.to_string()),
        ("iterations", iterations.to_string()),
        ("kept", iterations.div_ceil(10).to_string()),
        ("deep", (DEEP_DEPTH + 3).to_string()),
        ("depth", DEEP_DEPTH.to_string()),
        ("requests", scope.requests.to_string()),
        ("calibration", CALIBRATION_SECONDS.to_string()),
        ("census_interval", CENSUS_INTERVAL.to_owned()),
        ("census_span", CENSUS_SPAN.to_string()),
        ("host_processes", crate::host::PROCESSES.to_string()),
        ("host_window", crate::host::WINDOW.as_secs().to_string()),
        ("single_stepped", if single_stepped.is_empty() { "none".into() } else { single_stepped.join(", ") }),
    ]);
    for part in parts {
        let text = part.text.clone().unwrap_or_else(|| "Not run: `--only` left this part out.".into());
        values.insert(part.name, text);
    }
    fill(TEMPLATE, &values)
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
