//! `--listen ADDR`: Prometheus metrics at http://ADDR/metrics, in the
//! OpenMetrics text format, so that a fleet's Prometheus scrapes every
//! host's memtrace like any other exporter. Per traced process (labels
//! `pid`, `comm`): outstanding bytes and blocks, allocated totals, every
//! loss counter; per top group of the report (label `site`, as the text
//! report prints it): outstanding bytes and blocks, peak at reports, and
//! the trend's slope and verdict. Values are those of each process's latest
//! report; a process's series go away after its final report. A small
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

use super::{Report, Writer, trend::Verdict};
use crate::snapshot::GroupBy;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    pid: u32,
    comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, Ord, PartialOrd, EncodeLabelSet)]
struct SiteLabels {
    pid: u32,
    comm: String,
    site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LossLabels {
    pid: u32,
    comm: String,
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
    }
}

/// The writer that keeps the metrics, and the server that serves them.
pub struct MetricsServer {
    metrics: Metrics,
    group_by: GroupBy,
    top: usize,
    /// Each process's site series now, to remove those that leave the top.
    sites: BTreeMap<u32, BTreeSet<SiteLabels>>,
    server: Arc<tiny_http::Server>,
}

impl MetricsServer {
    /// Binds `addr` now (so a port in use fails before tracing) and serves
    /// /metrics from a thread of its own.
    pub fn start(addr: SocketAddr, group_by: GroupBy, top: usize) -> anyhow::Result<Self> {
        let server = Arc::new(tiny_http::Server::http(addr).map_err(|e| anyhow::anyhow!("{e}"))?);
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let registry = Arc::new(Mutex::new(registry));
        let serving = Arc::clone(&server);
        thread::Builder::new().name("metrics".into()).spawn(move || serve(&serving, &registry))?;
        Ok(Self { metrics, group_by, top, sites: BTreeMap::new(), server })
    }
}

fn serve(server: &tiny_http::Server, registry: &Mutex<Registry>) {
    for request in server.incoming_requests() {
        let response = if request.url() == "/metrics" {
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
        let (pid, comm) = (report.process.pid, report.process.comm.clone());
        let process = ProcessLabels { pid, comm: comm.clone() };
        let losses = report
            .losses
            .iter()
            .map(|(kind, value)| (LossLabels { pid, comm: comm.clone(), kind: kind.to_string() }, *value));
        let old_sites = self.sites.remove(&pid).unwrap_or_default();
        if report.is_final {
            for family in [&m.outstanding_bytes, &m.outstanding_blocks] {
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
        let trends = report.history.trends(self.group_by);
        let mut sites = BTreeSet::new();
        for row in report.rows(self.group_by).iter().filter(|r| r.count > 0).take(self.top) {
            let labels = SiteLabels { pid, comm: comm.clone(), site: row.traceback.to_string() };
            m.site_bytes.get_or_create(&labels).set(row.size as i64);
            m.site_blocks.get_or_create(&labels).set(row.count as i64);
            match report.history.peak(self.group_by, &row.traceback) {
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
    use crate::report::text::tests::sample;

    fn scrape(addr: SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn serves_the_latest_report_and_drops_a_finished_process() {
        let mut server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), GroupBy::Lineno, 10).unwrap();
        let addr = server.server.server_addr().to_ip().unwrap();
        let mut report = sample(false);
        report.history.push(report.time, &report.current);
        server.write(&report).unwrap();
        let body = scrape(addr, "/metrics");
        for line in [
            r#"memtrace_outstanding_bytes{pid="24733",comm="python"} 3708040"#,
            r#"memtrace_allocated_blocks_total{pid="24733",comm="python"} 42790"#,
            r#"memtrace_lost_total{pid="24733",comm="python",kind="python-reads"} 3"#,
            r#"memtrace_site_outstanding_bytes{pid="24733",comm="python",site="/w/app.py:16"} 3708000"#,
            r#"memtrace_site_peak_bytes{pid="24733",comm="python",site="/w/app.py:16"} 3708000"#,
        ] {
            assert!(body.contains(line), "{line} not in:\n{body}");
        }
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        // The site that only vanished has nothing outstanding: no series.
        assert!(!body.contains("malloc+0x1c"), "{body}");
        assert!(scrape(addr, "/other").starts_with("HTTP/1.0 404") || scrape(addr, "/other").contains(" 404 "));
        server.write(&sample(true)).unwrap();
        let body = scrape(addr, "/metrics");
        assert!(!body.contains("24733"), "{body}");
    }

    #[test]
    fn a_port_in_use_fails_at_start() {
        let first = MetricsServer::start("127.0.0.1:0".parse().unwrap(), GroupBy::Lineno, 10).unwrap();
        let addr = first.server.server_addr().to_ip().unwrap();
        let err = MetricsServer::start(addr, GroupBy::Lineno, 10).err().expect("the port is taken");
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
