//! memtrace's outputs read by the tools users already have, against a C
//! program traced from outside: go tool pprof reads the --pprof profile,
//! Prometheus scrapes --listen, headless Chromium renders the flame graphs
//! and the timeline, jq parses the JSON lines; saved snapshots rebuild the
//! live report byte for byte; verdicts tell a leak from churn; filters keep
//! what tracemalloc's would; and every mistake with an output is one line.
//! The consumers are installed from Debian by the tests themselves.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use memtrace_tests::{
    JsonReport, Memtrace, TIMEOUT, Target, TempDir, compile_c, ensure_package, final_report, free_port, http_get,
    json_reports, line_of, memtrace_bin, require_root, run_memtrace, traced_stdout,
};

/// On "go", keeps 10,000 blocks of 100 bytes from one line and allocates
/// and frees 10,000 from another, then says "done". Run as `drip`, it
/// instead keeps 100 blocks from the first line every 80 ms and holds 100
/// from the second for 40 ms of each 80 (churn), for about 30 seconds.
const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N 10000
static char *kept[40000];
static char *held[100];

__attribute__((noinline)) static char *leak(void) {
    return malloc(100); /* LEAK */
}

__attribute__((noinline)) static char *churn(void) {
    return malloc(100); /* CHURN */
}

int main(int argc, char **argv) {
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (argc > 1 && strcmp(argv[1], "drip") == 0) {
        for (int round = 0; round < 400; round++) {
            for (int i = 0; i < 100; i++) {
                kept[round * 100 + i] = leak();
                held[i] = churn();
            }
            /* Held for most of each 80 ms round, so that nearly every
               report sees the churn outstanding, and none sees it grow. */
            usleep(60000);
            for (int i = 0; i < 100; i++) free(held[i]);
            usleep(20000);
        }
        return 0;
    }
    while (fgets(line, sizeof line, stdin)) {
        for (int i = 0; i < N; i++) {
            kept[i] = leak();
            memset(kept[i], 1, 100);
            char *p = churn();
            memset(p, 2, 100);
            free(p);
        }
        printf("done\n");
        fflush(stdout);
    }
    return 0;
}
"#;

/// The interpreter the Python outputs tests trace.
const PYTHON: &str = "/root/.pyenv/versions/3.12.1/bin/python";

struct Built {
    dir: TempDir,
    exe: std::path::PathBuf,
}

fn build(tag: &str) -> Built {
    let dir = TempDir::new(tag);
    let exe = compile_c(&dir, "outputs", PROGRAM, &[]);
    Built { dir, exe }
}

impl Built {
    /// How a line of PROGRAM is named in reports: DWARF's full path.
    fn site(&self, marker: &str) -> String {
        format!("{}.c:{}", self.exe.display(), line_of(PROGRAM, marker))
    }

    fn start(&self, args: &[&str]) -> Target {
        let mut target = Target::spawn(Command::new(&self.exe).args(args));
        target.expect_line("ready");
        target
    }

    /// The program dripping, under a memtrace started with `options`.
    fn drip(&self, options: &[&str]) -> (Target, Memtrace) {
        let target = self.start(&["drip"]);
        let pid = target.pid().to_string();
        let memtrace = Memtrace::attach(&[&["--pid", &pid][..], options].concat());
        (target, memtrace)
    }

    fn path(&self, name: &str) -> String {
        self.dir.0.join(name).to_str().unwrap().to_owned()
    }
}

/// One round of the program under memtrace with `options`; stopped by
/// SIGINT after the round. Returns memtrace's stdout.
fn one_round(built: &Built, options: &[&str]) -> String {
    traced_stdout(&mut built.start(&[]), options, std::time::Duration::ZERO)
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn go_tool_pprof_lists_the_leaking_line_first_with_its_size() {
    require_root();
    ensure_package("go", "golang-go").unwrap();
    let built = build("pprof");
    let profile = built.path("heap.pb.gz");
    one_round(&built, &["--format", "json", "--pprof", &profile]);
    // By function, the leaking function first; by line (-lines), its line.
    let first_row = |args: &[&str]| {
        let top = run(
            "go",
            &[&["tool", "pprof", "-top", "-unit=B", "-sample_index=inuse_space"], args, &[&profile]].concat(),
        );
        let rows: Vec<String> =
            top.lines().skip_while(|l| !l.trim_start().starts_with("flat")).skip(1).map(str::to_owned).collect();
        (
            rows[0].split_whitespace().skip(5).collect::<Vec<_>>().join(" "),
            rows[0].split_whitespace().next().unwrap().to_owned(),
            top,
        )
    };
    let (function, bytes, top) = first_row(&[]);
    assert_eq!((bytes.as_str(), function.as_str()), ("1000000B", "leak"), "{top}");
    let (line, bytes, top) = first_row(&["-lines"]);
    assert_eq!((bytes, line), ("1000000B".to_owned(), format!("leak {}", built.site("LEAK"))), "{top}");
    assert!(!top.contains(&built.site("CHURN")), "nothing of the churn is outstanding:\n{top}");
    let counts = run("go", &["tool", "pprof", "-top", "-lines", "-sample_index=inuse_objects", &profile]);
    assert!(
        counts.lines().any(|l| l.trim_start().starts_with("10000 ") && l.ends_with(&built.site("LEAK"))),
        "{counts}"
    );
    // -traces shows the traceback: the leaking function, then main.
    let traces = run("go", &["tool", "pprof", "-traces", "-sample_index=inuse_space", &profile]);
    let leak = traces.find("  leak\n").unwrap_or_else(|| panic!("{traces}"));
    assert!(traces[leak..].lines().nth(1).is_some_and(|l| l.trim() == "main"), "main calls leak():\n{traces}");
    // Native frames keep their mapping and address: the program's own file.
    let raw = run("go", &["tool", "pprof", "-raw", &profile]);
    let exe = built.exe.display().to_string();
    assert!(raw.lines().any(|l| l.trim_start().starts_with("1: 0x") && l.contains(&exe)), "{raw}");
    assert!(traces.contains("pid:") && traces.contains("comm:  outputs"), "{traces}");
}

#[test]
fn jq_parses_every_json_line_and_reads_the_leak() {
    require_root();
    ensure_package("jq", "jq").unwrap();
    let built = build("jq");
    let stdout = one_round(&built, &["--format", "json"]);
    let file = built.path("reports.jsonl");
    std::fs::write(&file, &stdout).unwrap();
    // jq -e fails on a line that is not JSON or a query that is null/false.
    let lines = run("jq", &["-e", "-c", ".pid", &file]);
    assert_eq!(lines.lines().count(), stdout.lines().count());
    let query = r#"select(.final) | .rows[0] | "\(.location) \(.count) \(.size)""#;
    let leak = run("jq", &["-e", "-r", query, &file]);
    assert_eq!(leak.trim(), format!("{} 10000 1000000", built.site("LEAK")));
    let lost = run("jq", &["-e", "-r", r#"select(.final) | .losses | to_entries | map(.value) | add"#, &file]);
    assert_eq!(lost.trim(), "0");
    // Outside a container the process's own pid is the host's.
    let pids = run("jq", &["-e", "-r", r#"select(.final) | "\(.pid) \(.ns_pid)""#, &file]);
    let pid = final_report(&stdout).pid;
    assert_eq!(pids.trim(), format!("{pid} {pid}"));
}

/// Chromium, headless, on a local file: the DOM it built and a screenshot.
fn chromium(file: &str, shot: &str) -> String {
    let common = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"];
    let url = format!("file://{file}");
    let dom = run("chromium", &[&common[..], &["--dump-dom", &url]].concat());
    run("chromium", &[&common[..], &["--window-size=1200,800", &format!("--screenshot={shot}"), &url]].concat());
    dom
}

fn png_size(path: &str) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{path} is a PNG");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn chromium_renders_the_flame_graph_and_the_timeline() {
    require_root();
    ensure_package("chromium", "chromium").unwrap();
    let built = build("svg");
    let (flame, diff) = (built.path("flame.svg"), built.path("flame-diff.svg"));
    let (timeline, png) = (built.path("timeline.svg"), built.path("timeline.png"));
    let options = ["--format", "json", "--flamegraph", &flame, "--flamegraph-diff", &diff, "--timeline", &timeline];
    let stdout = one_round(&built, &options);
    let pid = final_report(&stdout).pid;
    let dom = chromium(&flame, &built.path("flame-shot.png"));
    assert!(dom.contains("<svg") && dom.contains(&built.site("LEAK")), "flame graph DOM:\n{dom}");
    assert!(dom.contains("outputs (pid "), "the process's tower:\n{dom}");
    assert!(dom.contains("1,000,000 bytes"), "the leak's size in its tooltip:\n{dom}");
    assert_eq!(png_size(&built.path("flame-shot.png")), (1200, 800));
    // The change since attach: all of the leak is growth, drawn red.
    let dom = chromium(&diff, &built.path("diff-shot.png"));
    let frame = dom.split("<g>").find(|g| g.contains(&built.site("LEAK"))).unwrap_or_else(|| panic!("{dom}"));
    assert!(frame.contains("1,000,000 bytes, 100.00%; +100.00%)"), "the leak's growth in its tooltip:\n{frame}");
    assert!(frame.contains(r#"fill="rgb(255,"#), "drawn red:\n{frame}");
    let dom = chromium(&timeline, &built.path("timeline-shot.png"));
    assert!(dom.contains(&built.site("LEAK")), "timeline DOM:\n{dom}");
    // The census's RSS beside the traced bytes; a C program has no Python heap.
    for legend in ["RSS", "traced outstanding"] {
        assert!(dom.contains(&format!("outputs (pid {pid}) {legend}")), "{legend} in the timeline DOM:\n{dom}");
    }
    assert!(!dom.contains("Python heap"), "{dom}");
    // The PNG form is drawn by memtrace itself.
    one_round(&built, &["--format", "json", "--timeline", &png]);
    assert_eq!(png_size(&png), (1024, 640));
}

/// A process that is killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The result of an instant query to Prometheus's HTTP API.
fn query(port: u16, promql: &str) -> Vec<serde_json::Value> {
    let encoded: String = promql
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'_' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    let Some(body) = http_get(port, &format!("/api/v1/query?query={encoded}")) else { return Vec::new() };
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    answer["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Debian's Prometheus on loopback, scraping memtrace at `addr` every
/// second; killed when dropped.
struct Prometheus {
    _running: Running,
    web: u16,
}

impl Prometheus {
    fn start(built: &Built, addr: &str) -> Self {
        ensure_package("prometheus", "prometheus").unwrap();
        let config = built.path("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: memtrace\n    static_configs:\n      - targets: ['{addr}']\n"
            ),
        )
        .unwrap();
        let web = free_port();
        let running = Running(
            Command::new("prometheus")
                .arg(format!("--config.file={config}"))
                .arg(format!("--storage.tsdb.path={}", built.path("tsdb")))
                .arg(format!("--web.listen-address=127.0.0.1:{web}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("prometheus starts"),
        );
        Self { _running: running, web }
    }

    /// The series of `promql` once Prometheus has scraped any.
    fn wait_for(&self, promql: &str) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let found = query(self.web, promql);
            if !found.is_empty() {
                return found;
            }
            assert!(Instant::now() < deadline, "Prometheus never had {promql}");
            thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn prometheus_scrapes_the_leak_from_listen() {
    require_root();
    let built = build("prom");
    let mut target = built.start(&[]);
    let pid = target.pid().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "0.3", "--format", "json", "--listen", &addr]);
    target.send("go");
    target.expect_line("done");
    let prometheus = Prometheus::start(&built, &addr);
    let site = built.site("LEAK");
    let series = prometheus.wait_for(&format!(r#"memtrace_site_outstanding_bytes{{pid="{pid}",site="{site}"}}"#));
    let web = prometheus.web;
    assert_eq!(series.len(), 1, "{series:?}");
    assert_eq!(series[0]["value"][1], "1000000", "{series:?}");
    assert_eq!(series[0]["metric"]["comm"], "outputs");
    assert_eq!(series[0]["metric"]["job"], "memtrace");
    let blocks = query(web, &format!(r#"memtrace_site_outstanding_blocks{{pid="{pid}",site="{site}"}}"#));
    assert_eq!(blocks[0]["value"][1], "10000", "{blocks:?}");
    let lost = query(web, &format!(r#"sum(memtrace_lost_total{{pid="{pid}"}})"#));
    assert_eq!(lost[0]["value"][1], "0", "{lost:?}");
    let churn = query(web, &format!(r#"memtrace_site_outstanding_bytes{{site="{}"}}"#, built.site("CHURN")));
    assert!(churn.is_empty(), "the churn has nothing outstanding: {churn:?}");
    // The census's memory, at least the million bytes the program keeps.
    let number = |series: &[serde_json::Value]| -> f64 {
        series[0]["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{series:?}"))
    };
    let rss = query(web, &format!(r#"memtrace_rss_bytes{{pid="{pid}"}}"#));
    assert!(number(&rss) > 1e6, "{rss:?}");
    let anonymous = query(web, &format!(r#"memtrace_anonymous_bytes{{pid="{pid}"}}"#));
    assert!(number(&anonymous) > 1e6 && number(&anonymous) <= number(&rss), "{anonymous:?} {rss:?}");
    assert!(query(web, &format!(r#"memtrace_python_heap_bytes{{pid="{pid}"}}"#)).is_empty(), "no pymalloc in C");
    // memtrace's own, as every exporter names them.
    let own_rss = query(web, r#"process_resident_memory_bytes{job="memtrace"}"#);
    assert!(number(&own_rss) > 1e6, "{own_rss:?}");
    let cpu = query(web, r#"process_cpu_seconds_total{job="memtrace"}"#);
    assert!(number(&cpu) > 0.0, "{cpu:?}");
    memtrace.signal(libc::SIGINT);
    let (status, _, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
}

/// On a terminal, memtrace names each step of its start while it takes
/// it, and clears that line before the report; on a pipe it never does.
#[test]
fn progress_shows_on_a_terminal_and_never_on_a_pipe() {
    require_root();
    let built = build("progress");
    let target = built.start(&[]);
    let pid = target.pid().to_string();
    let command = format!("{} --pid {pid} --interval 0.5 --count 1", memtrace_bin().display());
    // script(1) runs the command on a pseudo-terminal and copies it out.
    let out = Command::new("script").args(["-qfec", &command, "/dev/null"]).output().expect("script runs");
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{terminal}");
    let steps = [format!("memtrace: pid {pid}: finding where to probe"), format!("memtrace: pid {pid}: attaching")];
    for step in &steps {
        assert!(terminal.contains(step.as_str()), "{step:?} in {terminal:?}");
    }
    // Cleared (erase-line) before the report starts.
    let report = terminal.find(&format!("] memtrace pid {pid} (outputs) final report 1")).expect("the report");
    let timestamp = terminal[..report].rfind('[').unwrap();
    assert!(terminal[..timestamp].ends_with("\x1b[2K"), "{terminal:?}");
    let (code, stdout, stderr) =
        run_memtrace(Command::new(memtrace_bin()).args(["--pid", &pid, "--interval", "0.5", "--count", "1"]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("final report 1"), "{stdout}");
    assert!(!stderr.contains("attaching") && !stderr.contains('\r') && !stderr.contains('\x1b'), "{stderr:?}");
}

/// A cgroup of the unified hierarchy, removed when dropped (once empty).
struct Cgroup {
    path: std::path::PathBuf,
    /// As /proc/PID/cgroup names it.
    name: String,
}

impl Cgroup {
    fn new(tag: &str) -> Self {
        // Mounted at the top on a v2 host, beside the v1 ones on a hybrid.
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .find(|r| Path::new(r).join("cgroup.procs").exists())
            .expect("a cgroup v2 hierarchy");
        let name = format!("/memtrace-test-{tag}-{}", std::process::id());
        let path = Path::new(root).join(&name[1..]);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        Self { path, name }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A process in a container of its own (a pid and mount namespace by
/// `unshare`, in its own cgroup) is reported under its host pid with the
/// pid it has inside, read through its own root, and named by its cgroup
/// in the JSON header and in every Prometheus series.
#[test]
fn a_process_in_a_container_is_named_by_both_pids_and_its_cgroup() {
    require_root();
    let built = build("container");
    let cgroup = Cgroup::new("container");
    let script = r#"echo $$ > "$1/cgroup.procs" && exec unshare --fork --pid --mount-proc "$2""#;
    let mut unshare = Target::spawn(Command::new("sh").args(["-c", script, "sh"]).arg(&cgroup.path).arg(&built.exe));
    unshare.expect_line("ready");
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.pid())).unwrap();
    let pid = children.split_whitespace().next().expect("unshare forked the program").to_owned();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let memtrace = Memtrace::attach(&["--pid", &pid, "--interval", "0.3", "--format", "json", "--listen", &addr]);
    unshare.send("go");
    unshare.expect_line("done");
    let labels = format!(r#"pid="{pid}",comm="outputs",cgroup="{}""#, cgroup.name);
    let site = format!(r#"memtrace_site_outstanding_bytes{{{labels},site="{}"}} 1000000"#, built.site("LEAK"));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let metrics = http_get(port, "/metrics").unwrap_or_default();
        if metrics.lines().any(|l| l == site) {
            break;
        }
        assert!(Instant::now() < deadline, "{site} never in:\n{metrics}");
        thread::sleep(Duration::from_millis(100));
    }
    memtrace.signal(libc::SIGINT);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let report = final_report(&stdout);
    assert_eq!((report.pid.to_string(), report.ns_pid), (pid, 1), "the program is pid 1 of its namespace");
    assert_eq!(report.cgroup, Some(cgroup.name.clone()));
    let leak = report.rows.iter().find(|r| r.location == built.site("LEAK")).expect("the leak, read through its root");
    assert_eq!((leak.count, leak.size), (10_000, 1_000_000));
}

/// A Python process holding 10,000 instances of its own class: Prometheus
/// reads their number from the census, with the Python heap, and no more
/// types than --types-limit.
#[test]
fn prometheus_counts_a_python_population() {
    require_root();
    let python = Path::new(PYTHON);
    assert!(python.exists(), "{PYTHON} is missing");
    let built = build("prom-python");
    let script = built.path("population.py");
    std::fs::write(
        &script,
        "import sys\nclass Population:\n    pass\nkept = [Population() for _ in range(10_000)]\nprint('ready', flush=True)\nsys.stdin.readline()\n",
    )
    .unwrap();
    let mut target = Target::spawn(Command::new(python).arg(&script));
    target.expect_line("ready");
    let pid = target.pid().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let memtrace = Memtrace::attach(&[
        "--pid",
        &pid,
        "--census-only",
        "--interval",
        "1",
        "--format",
        "json",
        "--types-limit",
        "5",
        "--listen",
        &addr,
    ]);
    let prometheus = Prometheus::start(&built, &addr);
    let population =
        prometheus.wait_for(&format!(r#"memtrace_type_objects{{pid="{pid}",type="__main__.Population"}}"#));
    assert_eq!(population[0]["value"][1], "10000", "{population:?}");
    let types = query(prometheus.web, &format!(r#"count(memtrace_type_objects{{pid="{pid}"}})"#));
    assert_eq!(types[0]["value"][1], "5", "{types:?}");
    let heap = query(prometheus.web, &format!(r#"memtrace_python_heap_blocks{{pid="{pid}"}}"#));
    assert!(heap[0]["value"][1].as_str().unwrap().parse::<u64>().unwrap() > 10_000, "{heap:?}");
    memtrace.signal(libc::SIGINT);
    let (status, _, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    assert!(target.finish().success());
}

/// The text reports in memtrace's stdout, each with its blank line.
fn text_reports(stdout: &str) -> Vec<String> {
    stdout.split_inclusive("\n\n").map(str::to_owned).collect()
}

#[test]
fn saved_snapshots_rebuild_the_live_reports_byte_for_byte() {
    require_root();
    let built = build("save");
    let saved = built.path("saved");
    // Three reports: fewer than a verdict needs, so the live text has no
    // `growing:` lines, which need a history that two snapshots lack.
    let (target, memtrace) = built.drip(&["--interval", "0.4", "--count", "3", "--save", &saved]);
    let pid = target.pid();
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let live = text_reports(&stdout);
    assert_eq!(live.len(), 3, "{stdout}");
    let snapshot = |seq: u32| format!("{saved}/{pid}-{seq:06}.json");
    // The first report counts from attach, as `show` counts from nothing.
    assert_eq!(run(memtrace_bin().to_str().unwrap(), &["show", &snapshot(1)]), live[0]);
    for seq in 2..=3 {
        let diff = run(memtrace_bin().to_str().unwrap(), &["diff", &snapshot(seq - 1), &snapshot(seq)]);
        assert_eq!(diff, live[seq as usize - 1], "report {seq}");
    }
    // The same snapshots regrouped, as JSON for jq-like tools.
    let json = run(
        memtrace_bin().to_str().unwrap(),
        &["diff", &snapshot(2), &snapshot(3), "--group-by", "traceback", "--format", "json"],
    );
    let report: JsonReport = serde_json::from_str(json.trim()).unwrap();
    assert_eq!((report.sequence, report.group_by.as_str()), (3, "traceback"));
    assert!(report.rows[0].frames.len() > 1, "whole tracebacks were saved: {json}");
}

#[test]
fn a_leak_is_growing_and_churn_never_is() {
    require_root();
    let built = build("verdict");
    let (target, memtrace) = built.drip(&["--interval", "0.25", "--count", "10", "--format", "json"]);
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let reports = json_reports(&stdout);
    let verdicts = |marker: &str| -> Vec<String> {
        let site = built.site(marker);
        reports
            .iter()
            .flat_map(|r| r.rows.iter())
            .filter(|row| row.location == site)
            .filter_map(|row| row.verdict.clone())
            .collect()
    };
    let leak = verdicts("LEAK");
    assert!(!leak.is_empty() && leak.iter().all(|v| v == "growing"), "leak: {leak:?}\n{stdout}");
    let churn = verdicts("CHURN");
    assert!(!churn.is_empty(), "the churn was seen with a verdict:\n{stdout}");
    assert!(churn.iter().all(|v| v != "growing"), "churn: {churn:?}");
    let last = final_report(&stdout);
    let row = last.rows.iter().find(|r| r.location == built.site("LEAK")).unwrap();
    // It keeps 100 blocks of 100 bytes every 80 ms: 125 KB/s.
    let slope = row.slope_bytes_per_second.unwrap();
    assert!((100_000.0..150_000.0).contains(&slope), "{slope}");
    assert_eq!(row.peak_at_reports, Some(row.size), "a growing site peaks now");
    drop(target);
}

/// The same leak and churn from a C program traced through `--include`
/// and `--exclude`: globs on the file of the innermost frame by default,
/// of any frame with `--filter-all-frames`.
#[test]
fn filters_keep_what_tracemalloc_filters_keep() {
    require_root();
    let built = build("filter");
    let file = format!("{}.c", built.exe.display());
    let sites = |options: &[&str]| -> Vec<String> {
        let mut args = vec!["--format", "json", "--group-by", "traceback"];
        args.extend_from_slice(options);
        final_report(&one_round(&built, &args)).rows.iter().map(|r| r.frames[0].filename.clone()).collect()
    };
    let everything = sites(&[]);
    assert!(everything.contains(&file), "{everything:?}");
    let only = sites(&["--include", "*/outputs.c"]);
    assert!(!only.is_empty() && only.iter().all(|f| *f == file), "{only:?}");
    let none = sites(&["--exclude", "*/outputs.c"]);
    assert!(!none.contains(&file), "{none:?}");
    // main() in outputs.c is in every traceback of the program; the C
    // library's start-up code is innermost in none of them.
    let by_caller = sites(&["--include", "*libc_start_call_main.h", "--filter-all-frames"]);
    assert!(by_caller.contains(&file), "{by_caller:?}");
    assert!(sites(&["--include", "*libc_start_call_main.h"]).is_empty());
}

/// Asserts exit status 1, one `memtrace: ` line mentioning `needle`, and no
/// panic.
fn assert_one_line_error((code, _, stderr): (Option<i32>, String, String), needle: &str) {
    assert_eq!(code, Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr:?}");
    assert!(lines[0].starts_with("memtrace: ") && lines[0].contains(needle), "{needle:?} in {stderr:?}");
    assert!(!stderr.contains("panicked"));
}

#[test]
fn output_mistakes_are_one_line_before_tracing() {
    require_root();
    let me = std::process::id().to_string();
    let memtrace = |args: &[&str]| run_memtrace(Command::new(memtrace_bin()).args(["--pid", &me]).args(args));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_one_line_error(memtrace(&["--listen", &addr]), &format!("cannot listen on {addr}"));
    assert_one_line_error(memtrace(&["--listen", "localhost"]), "is not an address and port");
    assert_one_line_error(
        memtrace(&["--pprof", "/nonexistent/dir/heap.pb.gz"]),
        "cannot write --pprof /nonexistent/dir/heap.pb.gz",
    );
    assert_one_line_error(memtrace(&["--flamegraph", "/"]), "cannot write --flamegraph /");
    assert_one_line_error(memtrace(&["--flamegraph-diff", "/tmp"]), "cannot write --flamegraph-diff /tmp");
    assert_one_line_error(memtrace(&["--include", "[x"]), "--include \"[x\" is not a valid glob");
    assert_one_line_error(
        run_memtrace(Command::new(memtrace_bin()).args(["show", "/nonexistent.json"])),
        "cannot read /nonexistent.json",
    );
}

/// A --pprof file that stops being writable while tracing: the session
/// ends with its final report on stdout, and memtrace says why, once.
#[test]
fn a_failing_output_loses_nothing_else() {
    require_root();
    let built = build("fail");
    let dir = built.path("gone");
    std::fs::create_dir(&dir).unwrap();
    let profile = format!("{dir}/heap.pb.gz");
    let (target, memtrace) =
        built.drip(&["--interval", "0.3", "--count", "20", "--format", "json", "--pprof", &profile]);
    let deadline = Instant::now() + TIMEOUT;
    while !Path::new(&profile).exists() {
        assert!(Instant::now() < deadline, "no profile written");
        thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let (status, stdout, stderr) = memtrace.finish();
    assert_eq!(status.code(), Some(1), "{stderr:?}");
    let errors: Vec<&String> = stderr.iter().filter(|l| !l.starts_with("memtrace: tracing pid")).collect();
    assert_eq!(errors.len(), 1, "{stderr:?}");
    assert!(errors[0].starts_with(&format!("memtrace: cannot write --pprof {profile}: ")), "{errors:?}");
    let reports = json_reports(&stdout);
    assert!(reports.len() < 20, "the session ended early");
    let last = final_report(&stdout);
    assert!(last.rows.iter().any(|r| r.location == built.site("LEAK")), "{stdout}");
    drop(target);
}
