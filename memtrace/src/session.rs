//! One tracing session, end to end: validate the target, plan and attach
//! the probes, then every interval read the kernel maps into a snapshot and
//! print its difference from the previous one, until a signal, a limit or the
//! target's exit; then a final report, and detach (dropping the tracer).

use std::{
    io::Write as _,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, RingBuf};
use memtrace_common::{KernelConfig, SiteStats, TargetConfig, counter};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval, sleep_until},
};

use crate::{
    binary::elf::ElfFile,
    cli::Options,
    collect,
    coverage::Coverage,
    probes::{
        attach::Tracer,
        inlined, kernel,
        plan::{self, ProbedBinary, PythonProbes},
    },
    process::{Target, proc_maps::host_path},
    python::{self, Detection},
    report::text::{Header, SourceFiles, TextReport},
    snapshot::{GroupBy, Snapshot, Stat},
    symbolize::Symbolizer,
};

/// How often the memory map is refreshed and Python stacks the kernel could
/// not announce (its ring was full) are resolved.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Why the session ended.
pub enum End {
    Interrupted,
    TargetExited,
    Limit,
}

pub struct Outcome {
    pub pid: u32,
    pub end: End,
    /// Allocations the kernel side could not track (a map was full).
    pub untracked: u64,
}

pub async fn run(options: Options) -> Result<Outcome> {
    kernel::check_privileges()?;
    kernel::check_kernel()?;
    let pid = options.pid;
    let target = Target::open(pid)?;
    let python = python::detect(&target)?;
    let libc_path = plan::find_libc(&target)?;
    let libc_elf = ElfFile::open(&host_path(pid, libc_path))?;
    let mut notes = Vec::new();
    let interpreter = match &python {
        Detection::Supported(interpreter) => Some(interpreter),
        Detection::Unsupported(reason) => {
            eprintln!("memtrace: {reason}; reporting native frames only");
            notes.push(format!("{reason}; native frames only"));
            None
        }
        Detection::NotPython => None,
    };
    let inlined = interpreter.map(|i| inlined::find(&i.elf)).unwrap_or_default();
    if let (Some(i), Some(sites)) = (interpreter, &inlined.pymalloc) {
        notes.push(format!(
            "CPython {} inlines pymalloc's fast path into its callers; memtrace probes those copies ({} pops, {} pushes) instead of the allocator's functions; where a copy's request is a compile-time constant ({} of the pops), a block's size is its pymalloc size class (the request rounded up to 16 bytes)",
            i.version,
            sites.pops.len(),
            sites.pushes.len(),
            sites.pops.iter().filter(|pop| pop.request.is_none()).count()
        ));
    }
    let points = plan::plan(
        pid,
        ProbedBinary { path: libc_path, elf: &libc_elf },
        interpreter.map(|i| PythonProbes { binary: ProbedBinary { path: &i.path, elf: &i.elf }, inlined: &inlined }),
    )?;
    if options.verbose {
        if interpreter.is_some() {
            let found = &inlined.new_references;
            eprintln!(
                "memtrace: {} inlined copies of _Py_NewReference found, from {} references to tracemalloc's flag",
                found.sites.len(),
                found.tracing_references
            );
        }
        for p in points.iter().filter(|p| p.program != plan::Program::AllocEntry) {
            eprintln!(
                "memtrace: probe {} {}+{:#x} in {} ({}): {}",
                p.program.name(),
                p.symbol,
                p.placement.offset,
                p.binary,
                if p.placement.emulated { "emulated" } else { "single-stepped" },
                p.placement.reason
            );
        }
    }

    let kernel_config = KernelConfig { task_fsbase: kernel::task_fsbase_offset()? };
    let mut tracer = Tracer::load(kernel_config, options.max_allocs, options.verbose)?;
    let exited = open_pidfd(pid)?;
    if let Err(e) = tracer.attach(pid, &points) {
        if !Target::is_alive(pid) {
            bail!("pid {pid} ({}) exited before tracing started", target.comm);
        }
        return Err(e);
    }
    let wants_stacks = options.group_by == GroupBy::Traceback;
    let config = TargetConfig {
        min_size: options.min_size,
        max_size: options.max_size,
        // --native unwinds each site's stack copy; without it, a native
        // target's traceback comes from the kernel's frame-pointer walk.
        native_frames: if interpreter.is_none() && wants_stacks && !options.native { options.frames } else { 1 },
        python_frames: if interpreter.is_some() { options.frames } else { 0 },
        copy_stacks: u32::from(options.native),
        _pad: 0,
        python: interpreter.map(|i| i.walk()).unwrap_or_default(),
    };
    tracer.set_target(pid, &config)?;
    eprintln!(
        "memtrace: tracing pid {pid} ({}){}: {} probes; a report every {} s; Ctrl-C to stop",
        target.comm,
        interpreter.map(|i| format!(", CPython {}", i.version)).unwrap_or_default(),
        points.len(),
        options.interval
    );

    // Function-level probes count pymalloc's large blocks in its layer;
    // with inlined sites those are libc's.
    let includes_raw = inlined.pymalloc.is_none();
    let coverage = interpreter.and_then(|i| i.pymalloc).and_then(|state| Coverage::start(state, pid, includes_raw));
    let mut session = Session {
        coverage,
        symbolizer: Symbolizer::new(&target, interpreter.map(|i| i.code_resolver(pid)), options.native),
        target,
        source: SourceFiles::new(pid),
        options: &options,
        previous: Snapshot::default(),
        sequence: 0,
        notes,
    };
    let rings = Rings {
        new_stacks: watch(collect::new_python_stacks(&mut tracer)?, "the kernel's stack ring")?,
        site_stacks: watch(collect::site_stacks(&mut tracer)?, "the kernel's stack copy ring")?,
    };
    let end = session.run_loop(&tracer, exited, rings).await?;
    let counters = collect::counters(&tracer)?;
    let untracked = counters.get(counter::ALLOC_MAP_FULL) + counters.get(counter::SITE_MAP_FULL);
    Ok(Outcome { pid, end, untracked })
}

/// The kernel's announcements, drained as they come so that what they name
/// is read while the target still has it.
struct Rings {
    /// Ids of new Python stacks.
    new_stacks: AsyncFd<RingBuf<MapData>>,
    /// Stack copies of new sites (`--native`).
    site_stacks: AsyncFd<RingBuf<MapData>>,
}

struct Session<'a> {
    options: &'a Options,
    coverage: Option<Coverage>,
    target: Target,
    symbolizer: Symbolizer,
    source: SourceFiles,
    previous: Snapshot,
    sequence: u32,
    notes: Vec<String>,
}

impl Session<'_> {
    async fn run_loop(&mut self, tracer: &Tracer, exited: AsyncFd<OwnedFd>, mut rings: Rings) -> Result<End> {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let start = Instant::now();
        let deadline = self.options.duration().map(|d| start + d);
        let mut reports = interval(self.options.interval());
        reports.set_missed_tick_behavior(MissedTickBehavior::Delay);
        reports.tick().await; // the first tick is immediate
        let mut sweep = interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let end = loop {
            let until_deadline = async {
                match deadline {
                    Some(at) => sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = reports.tick() => {
                    // The last report allowed by --count is the final one.
                    if self.options.count.is_some_and(|n| self.sequence + 1 >= n) {
                        break End::Limit;
                    }
                    self.report(tracer, false)?;
                }
                ready = rings.new_stacks.readable_mut() => {
                    let mut guard = ready?;
                    for id in collect::drain_stack_ids(guard.get_inner_mut()) {
                        self.symbolizer.resolve_python_stack(tracer, id);
                    }
                    guard.clear_ready();
                }
                ready = rings.site_stacks.readable_mut() => {
                    let mut guard = ready?;
                    collect::drain_stack_copies(guard.get_inner_mut(), |copy| self.symbolizer.unwind_site(copy));
                    guard.clear_ready();
                }
                _ = sweep.tick() => self.symbolizer.refresh(tracer),
                _ = sigint.recv() => break End::Interrupted,
                _ = sigterm.recv() => break End::Interrupted,
                _ = exited.readable() => break End::TargetExited,
                _ = until_deadline => break End::Limit,
            }
        };
        self.report(tracer, true)?;
        Ok(end)
    }

    fn report(&mut self, tracer: &Tracer, is_final: bool) -> Result<()> {
        self.sequence += 1;
        self.symbolizer.refresh(tracer);
        let pid = self.target.pid;
        let sites = collect::sites(tracer, pid)?;
        let counters = collect::counters(tracer)?;
        let older = match self.options.older_than {
            Some(ms) => Some(collect::outstanding_older_than(
                tracer,
                pid,
                collect::monotonic_now_ns().saturating_sub(ms * 1_000_000),
            )?),
            None => None,
        };
        let mut allocated = Stat::default();
        let mut entries = Vec::new();
        for (site, stats) in &sites {
            allocated.size += stats.total_bytes;
            allocated.count += stats.total_count;
            let outstanding = match &older {
                Some(older) => older.get(site).map_or(Stat::default(), |&(size, count)| Stat { size, count }),
                None => outstanding(stats),
            };
            if outstanding.count > 0 {
                entries.push((self.symbolizer.traceback(tracer, site), outstanding));
            }
        }
        let current = Snapshot::group(entries.iter().map(|(t, s)| (t, *s)), self.options.group_by);
        let mut notes = self.notes.clone();
        notes.extend(self.coverage.as_ref().and_then(|c| c.note(&counters)));
        let report = TextReport {
            header: Header {
                time: SystemTime::now(),
                pid,
                comm: &self.target.comm,
                sequence: self.sequence,
                is_final,
                allocated,
                losses: losses(&counters),
                other: other_counters(&counters),
                notes: &notes,
            },
            current: &current,
            previous: &self.previous,
            group_by: self.options.group_by,
            top: self.options.top,
        };
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        report.write(&mut out, &mut |file, line| self.source.line(file, line)).context("cannot write the report")?;
        out.flush()?;
        self.previous = current;
        Ok(())
    }
}

fn outstanding(stats: &SiteStats) -> Stat {
    Stat { size: stats.outstanding_bytes, count: stats.outstanding_count }
}

/// Every loss counter a report shows, with names a user can read: what the
/// kernel side could not account.
fn losses(c: &collect::Counters) -> Vec<(&'static str, u64)> {
    vec![
        ("alloc-map-full", c.get(counter::ALLOC_MAP_FULL)),
        ("site-map-full", c.get(counter::SITE_MAP_FULL)),
        ("stack-map-full", c.get(counter::STACK_MAP_FULL)),
        ("stack-reads", c.get(counter::STACK_FAILED)),
        ("python-reads", c.get(counter::PYTHON_READ_FAULT)),
        ("native-copies", c.get(counter::STACK_COPY_LOST)),
    ]
}

/// Counters that are not losses but say how to read the report.
fn other_counters(c: &collect::Counters) -> Vec<(&'static str, u64)> {
    vec![
        ("truncated-python-stacks", c.get(counter::PYTHON_TRUNCATED)),
        ("unknown-frees", c.all_layers(counter::UNKNOWN_FREE)),
        ("missed-frees", c.get(counter::MISSED_FREE)),
        ("failed-allocs", c.get(counter::FAILED_ALLOC)),
    ]
}

/// A descriptor that becomes readable when `pid` exits.
fn open_pidfd(pid: u32) -> Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        bail!("pid {pid} exited before tracing started");
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    watch(unsafe { OwnedFd::from_raw_fd(fd as i32) }, &format!("pid {pid}"))
}

/// Registers a descriptor-owning value with the runtime.
fn watch<T: AsRawFd>(inner: T, what: &str) -> Result<AsyncFd<T>> {
    // SAFETY: register needs the descriptor to stay open while registered;
    // `inner` owns it and the AsyncFd owns `inner` until it is dropped.
    unsafe { AsyncFd::register(inner) }.map_err(|e| anyhow::anyhow!("cannot watch {what}: {e}"))
}
