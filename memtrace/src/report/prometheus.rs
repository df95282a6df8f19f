//! `--listen ADDR`: Prometheus metrics at http://ADDR/metrics, in the
//! OpenMetrics text format, so that a fleet's Prometheus scrapes every
//! host's memtrace like any other exporter. Per traced process (labels
//! `pid`, `comm`, `cgroup`: its container): outstanding bytes and blocks, allocated totals, every
//! loss counter, and the census's memory, Python heap and largest types
//! (label `type`, `--types-limit` of them); per top group of the report
//! (label `site`, as the text report prints it, `--top` of them):
//! outstanding bytes and blocks, peak at reports, and the trend's slope and
//! verdict; in host mode, how many processes are watched and skipped, and
//! each one's private memory slope and whether it grows. Values are those
//! of each process's latest report; a process's series go away after its
//! final report. memtrace's own CPU time and RSS
//! are read at each scrape, under the names every exporter gives its own
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`). A small
//! blocking HTTP server answers on its own thread.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::AtomicU64},
    thread,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{HostReport, ProcessInfo, Report, View, Writer, trend::Verdict};
use crate::census::memory::Memory;

/// Which process a series is about; `cgroup` names its container (its
/// cgroup v2 path, "" when unreadable), the same for all its series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, Ord, PartialOrd, EncodeLabelSet)]
struct ProcessLabels {
    pid: u32,
    comm: String,
    cgroup: String,
}

impl ProcessLabels {
    fn of(process: &ProcessInfo) -> Self {
        Self { pid: process.pid, comm: process.comm.clone(), cgroup: process.cgroup.clone().unwrap_or_default() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, Ord, PartialOrd, EncodeLabelSet)]
struct SiteLabels {
    #[prometheus(flatten)]
    process: ProcessLabels,
    site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, Ord, PartialOrd, EncodeLabelSet)]
struct TypeLabels {
    #[prometheus(flatten)]
    process: ProcessLabels,
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LossLabels {
    #[prometheus(flatten)]
    process: ProcessLabels,
    kind: String,
}

type F64Gauge = Gauge<f64, AtomicU64>;

#[derive(Default, Clone)]
struct Metrics {
    outstanding_bytes: Family<ProcessLabels, Gauge>,
    outstanding_blocks: Family<ProcessLabels, Gauge>,
    allocated_bytes: Family<ProcessLabels, Counter>,
    allocated_blocks: Family<ProcessLabels, Counter>,
    reports: Family<ProcessLabels, Counter>,
    lost: Family<LossLabels, Counter>,
    site_bytes: Family<SiteLabels, Gauge>,
    site_blocks: Family<SiteLabels, Gauge>,
    site_peak_bytes: Family<SiteLabels, Gauge>,
    site_slope: Family<SiteLabels, F64Gauge>,
    site_growing: Family<SiteLabels, Gauge>,
    rss_bytes: Family<ProcessLabels, Gauge>,
    anonymous_bytes: Family<ProcessLabels, Gauge>,
    swap_bytes: Family<ProcessLabels, Gauge>,
    heap_blocks: Family<ProcessLabels, Gauge>,
    heap_bytes: Family<ProcessLabels, Gauge>,
    type_objects: Family<TypeLabels, Gauge>,
    /// Host mode's: what it watches and cannot watch, and each process's
    /// private memory trend.
    watched_processes: Gauge,
    skipped_processes: Gauge,
    memory_slope: Family<ProcessLabels, F64Gauge>,
    memory_growing: Family<ProcessLabels, Gauge>,
    /// memtrace's own, set at each scrape.
    own_cpu_seconds: Counter<f64, AtomicU64>,
    own_rss_bytes: Gauge,
}

impl Metrics {
    fn register(&self, registry: &mut Registry) {
        let m = self.clone();
        registry.register(
            "memtrace_outstanding_bytes",
            "Bytes allocated since attach and not freed",
            m.outstanding_bytes,
        );
        registry.register(
            "memtrace_outstanding_blocks",
            "Blocks allocated since attach and not freed",
            m.outstanding_blocks,
        );
        registry.register("memtrace_allocated_bytes", "Bytes allocated since attach, freed or not", m.allocated_bytes);
        registry.register(
            "memtrace_allocated_blocks",
            "Blocks allocated since attach, freed or not",
            m.allocated_blocks,
        );
        registry.register("memtrace_reports", "Reports taken of the process", m.reports);
        registry.register("memtrace_lost", "What memtrace could not account, by kind", m.lost);
        registry.register("memtrace_site_outstanding_bytes", "Outstanding bytes of a top group", m.site_bytes);
        registry.register("memtrace_site_outstanding_blocks", "Outstanding blocks of a top group", m.site_blocks);
        registry.register(
            "memtrace_site_peak_bytes",
            "Largest outstanding bytes of a top group at any report since attach (sampled at reports)",
            m.site_peak_bytes,
        );
        registry.register(
            "memtrace_site_slope_bytes_per_second",
            "Least-squares slope of a top group's outstanding bytes over the last reports",
            m.site_slope,
        );
        registry.register("memtrace_site_growing", "1 if the group's verdict is growing, else 0", m.site_growing);
        for (name, help, family) in [
            ("memtrace_rss_bytes", "Resident bytes of the process (smaps_rollup Rss)", m.rss_bytes),
            (
                "memtrace_anonymous_bytes",
                "Anonymous resident bytes of the process (smaps_rollup Anonymous)",
                m.anonymous_bytes,
            ),
            ("memtrace_swap_bytes", "Swapped-out bytes of the process (smaps_rollup Swap)", m.swap_bytes),
            ("memtrace_python_heap_blocks", "Blocks in use in pymalloc's pools", m.heap_blocks),
            ("memtrace_python_heap_bytes", "Bytes in use in pymalloc's pools, by size class", m.heap_bytes),
        ] {
            registry.register(name, help, family);
        }
        registry.register(
            "memtrace_type_objects",
            "Objects of one of the process's largest Python types, tracked by the GC or not",
            m.type_objects,
        );
        registry.register("memtrace_watched_processes", "Processes host mode watches", m.watched_processes);
        registry.register(
            "memtrace_skipped_processes",
            "Processes host mode found but cannot watch (unsupported, unreadable)",
            m.skipped_processes,
        );
        registry.register(
            "memtrace_memory_slope_bytes_per_second",
            "Host mode: least-squares slope of a process's private memory (anonymous + swap) over the last reports",
            m.memory_slope,
        );
        registry.register(
            "memtrace_memory_growing",
            "Host mode: 1 if the process's private memory is growing, else 0",
            m.memory_growing,
        );
        registry.register("process_cpu_seconds", "CPU time memtrace itself has used", m.own_cpu_seconds);
        registry.register("process_resident_memory_bytes", "Resident bytes of memtrace itself", m.own_rss_bytes);
    }

    /// Reads memtrace's own CPU time and RSS into their metrics.
    fn read_own(&self) {
        // getrusage counts every thread of the process, the BPF maps'
        // readers and this server included.
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is valid.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0 {
            // SAFETY: initialised by the successful call above (and zeroed before).
            let usage = unsafe { usage.assume_init() };
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            let total = secs(usage.ru_utime) + secs(usage.ru_stime);
            let counted = self.own_cpu_seconds.get();
            if total > counted {
                self.own_cpu_seconds.inc_by(total - counted);
            }
        }
        if let Ok(memory) = Memory::read(std::process::id()) {
            self.own_rss_bytes.set(memory.rss as i64);
        }
    }
}

/// The writer that keeps the metrics, and the server that serves them.
pub struct MetricsServer {
    metrics: Metrics,
    view: View,
    /// Each process's site and type series now, to remove those that leave
    /// the top.
    sites: BTreeMap<u32, BTreeSet<SiteLabels>>,
    types: BTreeMap<u32, BTreeSet<TypeLabels>>,
    /// The processes of the latest host report, to remove those gone.
    standings: BTreeSet<ProcessLabels>,
    server: Arc<tiny_http::Server>,
}

impl MetricsServer {
    /// Binds `addr` now (so a port in use fails before tracing) and serves
    /// /metrics from a thread of its own.
    pub fn start(addr: SocketAddr, view: View) -> anyhow::Result<Self> {
        let server = Arc::new(tiny_http::Server::http(addr).map_err(|e| anyhow::anyhow!("{e}"))?);
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let registry = Arc::new(Mutex::new(registry));
        let serving = Arc::clone(&server);
        let own = metrics.clone();
        thread::Builder::new().name("metrics".into()).spawn(move || serve(&serving, &registry, &own))?;
        Ok(Self { metrics, view, sites: BTreeMap::new(), types: BTreeMap::new(), standings: BTreeSet::new(), server })
    }
}

fn serve(server: &tiny_http::Server, registry: &Mutex<Registry>, metrics: &Metrics) {
    for request in server.incoming_requests() {
        let response = if request.url() == "/metrics" {
            metrics.read_own();
            let mut body = String::new();
            let encoded = encode(&mut body, &registry.lock().unwrap_or_else(|e| e.into_inner()));
            let header = "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8";
            match encoded {
                Ok(()) => tiny_http::Response::from_string(body)
                    .with_header(header.parse::<tiny_http::Header>().expect("a valid header")),
                Err(_) => tiny_http::Response::from_string("cannot encode the metrics\n").with_status_code(500),
            }
        } else {
            tiny_http::Response::from_string("memtrace serves /metrics only\n").with_status_code(404)
        };
        // A scraper that hung up is its own business.
        let _ = request.respond(response);
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

impl Writer for MetricsServer {
    fn write(&mut self, report: &Report) -> std::io::Result<()> {
        let m = &self.metrics;
        let pid = report.process.pid;
        let process = ProcessLabels::of(&report.process);
        let losses = report
            .losses
            .iter()
            .map(|(kind, value)| (LossLabels { process: process.clone(), kind: kind.to_string() }, *value));
        let old_sites = self.sites.remove(&pid).unwrap_or_default();
        let old_types = self.types.remove(&pid).unwrap_or_default();
        if report.is_final {
            for family in m.process_gauges() {
                family.remove(&process);
            }
            for family in [&m.allocated_bytes, &m.allocated_blocks, &m.reports] {
                family.remove(&process);
            }
            losses.for_each(|(labels, _)| {
                m.lost.remove(&labels);
            });
            for site in &old_sites {
                remove_site(m, site);
            }
            for labels in &old_types {
                m.type_objects.remove(labels);
            }
            return Ok(());
        }
        let now = report.current.total();
        m.outstanding_bytes.get_or_create(&process).set(now.size as i64);
        m.outstanding_blocks.get_or_create(&process).set(now.count as i64);
        raise(&m.allocated_bytes.get_or_create(&process), report.allocated.size);
        raise(&m.allocated_blocks.get_or_create(&process), report.allocated.count);
        m.reports.get_or_create(&process).inc();
        for (labels, value) in losses {
            raise(&m.lost.get_or_create(&labels), value);
        }
        let census = report.census.as_ref().map(|c| &c.now);
        let memory = census.and_then(|c| c.memory);
        let heap = census.and_then(|c| c.heap);
        for (family, value) in [
            (&m.rss_bytes, memory.map(|m| m.rss)),
            (&m.anonymous_bytes, memory.map(|m| m.anonymous)),
            (&m.swap_bytes, memory.map(|m| m.swap)),
        ] {
            set_or_remove(family, &process, value);
        }
        match census.and_then(|c| c.objects.as_ref()) {
            Some(objects) => {
                set_or_remove(&m.heap_blocks, &process, heap.map(|h| h.blocks));
                set_or_remove(&m.heap_bytes, &process, heap.map(|h| h.bytes));
                // The census lists types biggest first: the largest
                // populations are the series, so that their number stays
                // bounded and they change only when the ranking does.
                let mut types = BTreeSet::new();
                for count in objects.types.iter().take(self.view.types) {
                    let labels = TypeLabels { process: process.clone(), r#type: count.name.clone() };
                    m.type_objects.get_or_create(&labels).set(count.count() as i64);
                    types.insert(labels);
                }
                for gone in old_types.difference(&types) {
                    m.type_objects.remove(gone);
                }
                self.types.insert(pid, types);
            }
            // Host mode read only its memory this time (its census waits
            // its turn): the heap and type series keep the latest census's
            // values rather than vanish until the next.
            None => {
                self.types.insert(pid, old_types);
            }
        }
        let group_by = self.view.group_by;
        let trends = report.history.trends(group_by);
        let mut sites = BTreeSet::new();
        for row in report.rows(group_by).iter().filter(|r| r.count > 0).take(self.view.top) {
            let labels = SiteLabels { process: process.clone(), site: row.traceback.to_string() };
            m.site_bytes.get_or_create(&labels).set(row.size as i64);
            m.site_blocks.get_or_create(&labels).set(row.count as i64);
            match report.history.peak(group_by, &row.traceback) {
                Some(peak) => {
                    m.site_peak_bytes.get_or_create(&labels).set(peak as i64);
                }
                None => {
                    m.site_peak_bytes.remove(&labels);
                }
            }
            match trends.get(&row.traceback) {
                Some(trend) => {
                    m.site_slope.get_or_create(&labels).set(trend.slope);
                    m.site_growing.get_or_create(&labels).set(i64::from(trend.verdict == Verdict::Growing));
                }
                None => {
                    m.site_slope.remove(&labels);
                    m.site_growing.remove(&labels);
                }
            }
            sites.insert(labels);
        }
        for gone in old_sites.difference(&sites) {
            remove_site(m, gone);
        }
        self.sites.insert(pid, sites);
        Ok(())
    }

    fn write_host(&mut self, report: &HostReport) -> std::io::Result<()> {
        let m = &self.metrics;
        m.watched_processes.set(report.processes.len() as i64);
        m.skipped_processes.set(report.skipped.len() as i64);
        let mut standings = BTreeSet::new();
        for standing in report.processes.iter().filter(|s| !s.exited && !report.is_final) {
            let labels = ProcessLabels::of(&standing.process);
            match standing.trend {
                Some(trend) => {
                    m.memory_slope.get_or_create(&labels).set(trend.slope);
                    m.memory_growing.get_or_create(&labels).set(i64::from(trend.verdict == Verdict::Growing));
                }
                None => {
                    m.memory_slope.remove(&labels);
                    m.memory_growing.remove(&labels);
                }
            }
            standings.insert(labels);
        }
        for gone in self.standings.difference(&standings) {
            m.memory_slope.remove(gone);
            m.memory_growing.remove(gone);
        }
        self.standings = standings;
        Ok(())
    }
}

impl Metrics {
    /// The per-process gauges, which a final report removes.
    fn process_gauges(&self) -> [&Family<ProcessLabels, Gauge>; 7] {
        [
            &self.outstanding_bytes,
            &self.outstanding_blocks,
            &self.rss_bytes,
            &self.anonymous_bytes,
            &self.swap_bytes,
            &self.heap_blocks,
            &self.heap_bytes,
        ]
    }
}

/// A value the report may lack (no census, no pymalloc): no series then.
fn set_or_remove(family: &Family<ProcessLabels, Gauge>, labels: &ProcessLabels, value: Option<u64>) {
    match value {
        Some(value) => {
            family.get_or_create(labels).set(value as i64);
        }
        None => {
            family.remove(labels);
        }
    }
}

fn remove_site(m: &Metrics, labels: &SiteLabels) {
    for family in [&m.site_bytes, &m.site_blocks, &m.site_peak_bytes, &m.site_growing] {
        family.remove(labels);
    }
    m.site_slope.remove(labels);
}

/// Brings a counter up to `total`, a running total memtrace read.
fn raise(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;
    use crate::{
        census::{Census, ObjectCensus, TypeCount, pymalloc},
        report::{CensusChange, text::tests::sample},
        snapshot::GroupBy,
    };

    const VIEW: View = View { group_by: GroupBy::Lineno, top: 10, types: 2 };

    fn scrape(addr: SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn serves_the_latest_report_and_drops_a_finished_process() {
        let mut server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), VIEW).unwrap();
        let addr = server.server.server_addr().to_ip().unwrap();
        let mut report = sample(false);
        report.history.push(report.time, &report.current);
        let count = |name: &str, tracked| TypeCount { name: name.into(), tracked, untracked: 1 };
        let now = Census {
            memory: Some(Memory { rss: 9 << 20, anonymous: 5 << 20, swap: 0 }),
            heap: Some(pymalloc::Census { blocks: 51_000, bytes: 3_000_000, raw_blocks: 4 }),
            objects: Some(ObjectCensus {
                types: vec![count("MyObject", 9_999), count("dict", 500), count("tuple", 20)],
                ..ObjectCensus::default()
            }),
        };
        report.census = Some(CensusChange { now, before: Census::default() });
        server.write(&report).unwrap();
        let body = scrape(addr, "/metrics");
        for line in [
            r#"memtrace_outstanding_bytes{pid="24733",comm="python",cgroup="/system.slice/app.service"} 3708040"#,
            r#"memtrace_allocated_blocks_total{pid="24733",comm="python",cgroup="/system.slice/app.service"} 42790"#,
            r#"memtrace_lost_total{pid="24733",comm="python",cgroup="/system.slice/app.service",kind="python-reads"} 3"#,
            r#"memtrace_site_outstanding_bytes{pid="24733",comm="python",cgroup="/system.slice/app.service",site="/w/app.py:16"} 3708000"#,
            r#"memtrace_site_peak_bytes{pid="24733",comm="python",cgroup="/system.slice/app.service",site="/w/app.py:16"} 3708000"#,
            r#"memtrace_rss_bytes{pid="24733",comm="python",cgroup="/system.slice/app.service"} 9437184"#,
            r#"memtrace_swap_bytes{pid="24733",comm="python",cgroup="/system.slice/app.service"} 0"#,
            r#"memtrace_python_heap_blocks{pid="24733",comm="python",cgroup="/system.slice/app.service"} 51000"#,
            r#"memtrace_type_objects{pid="24733",comm="python",cgroup="/system.slice/app.service",type="MyObject"} 10000"#,
            r#"memtrace_type_objects{pid="24733",comm="python",cgroup="/system.slice/app.service",type="dict"} 501"#,
        ] {
            assert!(body.contains(line), "{line} not in:\n{body}");
        }
        assert!(!body.contains(r#"type="tuple""#), "--types-limit bounds the types: {body}");
        let own = |name: &str| -> f64 {
            let line = body.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name}: {body}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(own("process_resident_memory_bytes ") > 0.0 && own("process_cpu_seconds_total ") > 0.0, "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        // The site that only vanished has nothing outstanding: no series.
        assert!(!body.contains("malloc+0x1c"), "{body}");
        assert!(scrape(addr, "/other").starts_with("HTTP/1.0 404") || scrape(addr, "/other").contains(" 404 "));
        server.write(&sample(true)).unwrap();
        let body = scrape(addr, "/metrics");
        assert!(!body.contains("24733"), "{body}");
        assert!(body.contains("process_resident_memory_bytes "), "memtrace's own stay: {body}");
    }

    #[test]
    fn a_port_in_use_fails_at_start() {
        let first = MetricsServer::start("127.0.0.1:0".parse().unwrap(), VIEW).unwrap();
        let addr = first.server.server_addr().to_ip().unwrap();
        let err = MetricsServer::start(addr, VIEW).err().expect("the port is taken");
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
