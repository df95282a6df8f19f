//! One tracing session over one or more processes, end to end: validate
//! each process, plan and attach its probes, then every interval read the
//! kernel maps into a snapshot per process and hand its report to every
//! output, until a signal, a limit or every process's exit; then the final
//! reports, and detach (dropping the tracer). Everything per process (its
//! symbolizer, counters, previous snapshot, report header) is kept by pid,
//! so processes never share state.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Result, anyhow, bail};
use aya::maps::{MapData, RingBuf};
use memtrace_common::{KernelConfig, SiteStats, StackKey, TargetConfig};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval, sleep_until},
};

use crate::{
    binary::elf::ElfFile,
    cli::Options,
    collect,
    coverage::Coverage,
    filter::Filters,
    probes::{
        attach::Tracer,
        inlined, kernel,
        plan::{self, AttachPoint, ProbedBinary, PythonProbes},
    },
    process::{Target, proc_maps::host_path},
    python::{self, Detection},
    report::{Output, ProcessInfo, Report, trend::History},
    snapshot::{Snapshot, Stat},
    symbolize::Symbolizer,
};

/// How often memory maps are refreshed and Python stacks the kernel could
/// not announce (its ring was full) are resolved.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Why the session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Interrupted,
    /// Every traced process exited.
    TargetExited,
    Limit,
}

pub struct Outcome {
    pub end: End,
    /// Allocations the kernel side could not track (a map was full), summed
    /// over the processes.
    pub untracked: u64,
}

pub async fn run(options: Options) -> Result<Outcome> {
    kernel::check_privileges()?;
    kernel::check_kernel()?;
    let outputs = options.outputs()?;
    let filters = options.filters()?;
    let mut pids = options.pids.clone();
    pids.dedup();
    let prepared = pids.iter().map(|&pid| Prepared::new(pid, &options)).collect::<Result<Vec<_>>>()?;
    let kernel_config = KernelConfig { task_fsbase: kernel::task_fsbase_offset()? };
    let mut tracer = Tracer::load(kernel_config, options.max_allocs, options.verbose)?;
    let (exits, exited) = mpsc::unbounded_channel();
    let mut processes = BTreeMap::new();
    for prepared in prepared {
        let pid = prepared.target.pid;
        watch_exit(pid, exits.clone())?;
        processes.insert(pid, prepared.attach(&mut tracer, &options)?);
    }
    let rings = Rings {
        new_stacks: watch(collect::new_python_stacks(&mut tracer)?, "the kernel's stack ring")?,
        site_stacks: watch(collect::site_stacks(&mut tracer)?, "the kernel's stack copy ring")?,
        log: if options.verbose { Some(watch(tracer.take_logger()?, "the kernel's log")?) } else { None },
    };
    let mut session = Session { options: &options, filters, tracer, processes, outputs, failed: None, intervals: 0 };
    let end = session.run_loop(exited, rings).await?;
    if let Some(failure) = session.failed {
        return Err(failure);
    }
    let mut untracked = 0;
    for &pid in session.processes.keys() {
        untracked += collect::counters(&session.tracer, pid)?.untracked();
    }
    Ok(Outcome { end, untracked })
}

/// A process validated and planned, not attached yet: every mistake a user
/// can make about it is found before anything is loaded.
struct Prepared {
    target: Target,
    interpreter: Option<python::Interpreter>,
    points: Vec<AttachPoint>,
    notes: Vec<String>,
    /// Whether pymalloc's large blocks count in the probed pymalloc layer
    /// (function-level probes; with inlined sites those are libc's).
    includes_raw: bool,
}

impl Prepared {
    fn new(pid: u32, options: &Options) -> Result<Self> {
        let target = Target::open(pid)?;
        let python = python::detect(&target)?;
        let libc_path = plan::find_libc(&target)?;
        let libc_elf = ElfFile::open(&host_path(pid, libc_path))?;
        let mut notes = Vec::new();
        let interpreter = match python {
            Detection::Supported(interpreter) => Some(*interpreter),
            Detection::Unsupported(reason) => {
                eprintln!("memtrace: pid {pid}: {reason}; reporting native frames only");
                notes.push(format!("{reason}; native frames only"));
                None
            }
            Detection::NotPython => None,
        };
        let inlined = interpreter.as_ref().map(|i| inlined::find(&i.elf)).unwrap_or_default();
        if let (Some(i), Some(sites)) = (&interpreter, &inlined.pymalloc) {
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
            interpreter
                .as_ref()
                .map(|i| PythonProbes { binary: ProbedBinary { path: &i.path, elf: &i.elf }, inlined: &inlined }),
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
        let includes_raw = inlined.pymalloc.is_none();
        Ok(Self { target, interpreter, points, notes, includes_raw })
    }

    /// Attaches the probes and starts counting.
    fn attach(self, tracer: &mut Tracer, options: &Options) -> Result<Traced> {
        let Self { target, interpreter, points, notes, includes_raw } = self;
        let pid = target.pid;
        if let Err(e) = tracer.attach(pid, &points) {
            if !Target::is_alive(pid) {
                bail!("pid {pid} ({}) exited before tracing started", target.comm);
            }
            return Err(e);
        }
        let wants_stacks = options.wants_tracebacks();
        let config = TargetConfig {
            min_size: options.min_size,
            max_size: options.max_size,
            // --native unwinds each site's stack copy; without it, a native
            // target's traceback comes from the kernel's frame-pointer walk.
            native_frames: if interpreter.is_none() && wants_stacks && !options.native { options.frames } else { 1 },
            python_frames: if interpreter.is_some() { options.frames } else { 0 },
            copy_stacks: u32::from(options.native),
            _pad: 0,
            python: interpreter.as_ref().map(|i| i.walk()).unwrap_or_default(),
        };
        tracer.set_target(pid, &config)?;
        let described = interpreter.as_ref().map(|i| format!("CPython {}", i.version));
        eprintln!(
            "memtrace: tracing pid {pid} ({}){}: {} probes; a report every {} s; Ctrl-C to stop",
            target.comm,
            described.as_ref().map(|d| format!(", {d}")).unwrap_or_default(),
            points.len(),
            options.interval
        );
        let coverage =
            interpreter.as_ref().and_then(|i| i.pymalloc).and_then(|state| Coverage::start(state, pid, includes_raw));
        Ok(Traced {
            info: ProcessInfo { pid, comm: target.comm.clone(), interpreter: described },
            symbolizer: Symbolizer::new(&target, interpreter.as_ref().map(|i| i.code_resolver(pid)), options.native),
            coverage,
            notes,
            previous: Snapshot::default(),
            history: History::default(),
            sequence: 0,
            exited: false,
        })
    }
}

/// What the session keeps for one traced process.
struct Traced {
    info: ProcessInfo,
    symbolizer: Symbolizer,
    coverage: Option<Coverage>,
    /// Said under every report's header.
    notes: Vec<String>,
    previous: Snapshot,
    history: History,
    sequence: u32,
    /// Its final report is written; nothing more is.
    exited: bool,
}

/// The kernel's announcements, drained as they come so that what they name
/// is read while the process still has it.
struct Rings {
    /// Keys of new Python stacks.
    new_stacks: AsyncFd<RingBuf<MapData>>,
    /// Stack copies of new sites (`--native`).
    site_stacks: AsyncFd<RingBuf<MapData>>,
    /// The kernel side's diagnostics (`--verbose`).
    log: Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>,
}

struct Session<'a> {
    options: &'a Options,
    tracer: Tracer,
    filters: Filters,
    processes: BTreeMap<u32, Traced>,
    /// The outputs still working; one that failed is dropped from here.
    outputs: Vec<Output>,
    /// The first output's failure: the session then ends, with final
    /// reports to the outputs that still work, and fails.
    failed: Option<anyhow::Error>,
    /// Report intervals passed, for `--count`.
    intervals: u32,
}

impl Session<'_> {
    async fn run_loop(&mut self, mut exited: mpsc::UnboundedReceiver<u32>, mut rings: Rings) -> Result<End> {
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
            let kernel_log = async {
                match rings.log.as_mut() {
                    Some(log) => log.readable_mut().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = reports.tick() => {
                    // The last report allowed by --count is the final one.
                    if self.options.count.is_some_and(|n| self.intervals + 1 >= n) {
                        break End::Limit;
                    }
                    self.intervals += 1;
                    let live: Vec<u32> = self.live().collect();
                    for pid in live {
                        self.report(pid, false)?;
                    }
                    if self.failed.is_some() {
                        break End::Limit;
                    }
                }
                ready = rings.new_stacks.readable_mut() => {
                    let mut guard = ready?;
                    for key in collect::drain_stack_keys(guard.get_inner_mut()) {
                        self.resolve_python_stack(key);
                    }
                    guard.clear_ready();
                }
                ready = rings.site_stacks.readable_mut() => {
                    let mut guard = ready?;
                    let processes = &mut self.processes;
                    collect::drain_stack_copies(guard.get_inner_mut(), |copy| {
                        if let Some(traced) = processes.get_mut(&copy.site.pid) {
                            traced.symbolizer.unwind_site(copy);
                        }
                    });
                    guard.clear_ready();
                }
                ready = kernel_log => {
                    let mut guard = ready?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                _ = sweep.tick() => self.sweep(),
                Some(pid) = exited.recv() => {
                    self.exited(pid)?;
                    if self.failed.is_some() {
                        break End::Limit;
                    }
                    if self.live().next().is_none() {
                        return Ok(End::TargetExited);
                    }
                }
                _ = sigint.recv() => break End::Interrupted,
                _ = sigterm.recv() => break End::Interrupted,
                _ = until_deadline => break End::Limit,
            }
        };
        let live: Vec<u32> = self.live().collect();
        for pid in live {
            self.report(pid, true)?;
        }
        Ok(end)
    }

    fn live(&self) -> impl Iterator<Item = u32> + '_ {
        self.processes.iter().filter(|(_, t)| !t.exited).map(|(&pid, _)| pid)
    }

    /// A process exited: its final report, covering its whole life since attach.
    fn exited(&mut self, pid: u32) -> Result<()> {
        if self.processes.get(&pid).is_none_or(|t| t.exited) {
            return Ok(());
        }
        self.report(pid, true)?;
        eprintln!("memtrace: pid {pid} exited; the final report above covers its whole life since attach");
        Ok(())
    }

    /// Catches up with every live process: fresh memory maps, and any
    /// Python stack the kernel could not announce.
    fn sweep(&mut self) {
        for traced in self.processes.values_mut().filter(|t| !t.exited) {
            traced.symbolizer.refresh_map();
        }
        if let Ok(keys) = collect::python_stack_keys(&self.tracer) {
            for key in keys {
                self.resolve_python_stack(key);
            }
        }
    }

    fn resolve_python_stack(&mut self, key: StackKey) {
        let Some(traced) = self.processes.get_mut(&key.pid) else { return };
        if traced.exited || !traced.symbolizer.wants_python_stack(key.id) {
            return;
        }
        if let Some(stack) = collect::python_stack(&self.tracer, key) {
            traced.symbolizer.resolve_python_stack(key.id, &stack);
        }
    }

    /// Reads `pid`'s sites into a snapshot and writes its report.
    fn report(&mut self, pid: u32, is_final: bool) -> Result<()> {
        self.sweep();
        let tracer = &self.tracer;
        let sites = collect::sites(tracer, pid)?;
        let counters = collect::counters(tracer, pid)?;
        let older = match self.options.older_than {
            Some(ms) => Some(collect::outstanding_older_than(
                tracer,
                pid,
                collect::monotonic_now_ns().saturating_sub(ms * 1_000_000),
            )?),
            None => None,
        };
        let Some(traced) = self.processes.get_mut(&pid) else { return Ok(()) };
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
                let traceback = traced.symbolizer.traceback(site, |key| collect::native_stack(tracer, key));
                entries.push((traceback, outstanding));
            }
        }
        if !self.filters.is_empty() {
            entries.retain(|(traceback, _)| self.filters.keeps(traceback));
        }
        let current = Snapshot::from_entries(entries);
        let mut notes = traced.notes.clone();
        notes.extend(traced.coverage.as_ref().and_then(|c| c.note(&counters)));
        traced.sequence += 1;
        traced.exited |= is_final;
        let time = SystemTime::now();
        traced.history.push(time, &current);
        let report = Report {
            time,
            process: traced.info.clone(),
            sequence: traced.sequence,
            is_final,
            allocated,
            losses: counters.losses().into_iter().map(|(n, v)| (n.into(), v)).collect(),
            counters: counters.notable().into_iter().map(|(n, v)| (n.into(), v)).collect(),
            notes,
            current,
            previous: std::mem::take(&mut traced.previous),
            history: std::mem::take(&mut traced.history),
        };
        self.outputs.retain_mut(|output| match output.writer.write(&report) {
            Ok(()) => true,
            Err(e) => {
                let error = anyhow!("cannot write {}: {e}", output.name);
                match &self.failed {
                    None => self.failed = Some(error),
                    Some(_) => eprintln!("memtrace: {error}"),
                }
                false
            }
        });
        traced.previous = report.current;
        traced.history = report.history;
        Ok(())
    }
}

fn outstanding(stats: &SiteStats) -> Stat {
    Stat { size: stats.outstanding_bytes, count: stats.outstanding_count }
}

/// Sends `pid` on `exits` when the process exits.
fn watch_exit(pid: u32, exits: mpsc::UnboundedSender<u32>) -> Result<()> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        bail!("pid {pid} exited before tracing started");
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    let pidfd = watch(unsafe { OwnedFd::from_raw_fd(fd as i32) }, &format!("pid {pid}"))?;
    tokio::spawn(async move {
        // A pidfd becomes readable when its process exits.
        let _ = pidfd.readable().await;
        let _ = exits.send(pid);
    });
    Ok(())
}

/// Registers a descriptor-owning value with the runtime.
fn watch<T: AsRawFd>(inner: T, what: &str) -> Result<AsyncFd<T>> {
    // SAFETY: register needs the descriptor to stay open while registered;
    // `inner` owns it and the AsyncFd owns `inner` until it is dropped.
    unsafe { AsyncFd::register(inner) }.map_err(|e| anyhow::anyhow!("cannot watch {what}: {e}"))
}
