//! One session over one or more processes, end to end: validate each
//! process, plan and attach its probes (none with `--census-only`), then
//! every interval read the kernel maps into a snapshot per process, take
//! its census, and hand its report to every output, until a signal, a limit
//! or every process's exit; then the final reports, and detach (dropping
//! the tracer). A traced process's forked children are followed (they
//! inherit its breakpoints, so they pay for them anyway), and a process
//! that execs gets a final report for its former image and a new plan. Everything per process (its symbolizer, counters, census,
//! previous snapshot, report header) is kept by pid, so processes never
//! share state.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Result, bail};
use aya::maps::{MapData, RingBuf};
use memtrace_common::{MAX_NATIVE_FRAMES, ProcessEvent, SiteStats, StackKey, TargetConfig};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval, sleep_until},
};

use crate::{
    binary::elf::ElfFile,
    census::{Census, CensusTaker},
    cli::Options,
    collect,
    coverage::Coverage,
    filter::Filters,
    privileges::{self, Need},
    probes::{
        attach::Tracer,
        inlined, kernel,
        plan::{self, AttachPoint, ProbedBinary, PythonProbes},
        unwinding::{RuleBook, Unwinding},
    },
    process::{Target, discovery, proc_maps::MemoryMap},
    progress::Progress,
    python::{self, Detection},
    report::{
        CensusChange, Output, ProcessInfo, Report,
        trend::{History, TypeHistory},
    },
    snapshot::{Snapshot, Stat},
    symbolize::{Symbolizer, allocators::AllocatorFrames},
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
    if options.probes_off() {
        privileges::check(Need::Reading)?;
    } else {
        privileges::check(Need::Tracing)?;
        kernel::check_kernel()?;
    }
    let outputs = options.outputs()?;
    let filters = options.filters()?;
    let allocators = options.allocator_frames()?;
    // Before anything says it is tracing: a signal from then on must end
    // the session with its final reports, not kill the process.
    let stops = Stops { sigint: signal(SignalKind::interrupt())?, sigterm: signal(SignalKind::terminate())? };
    let progress = Progress::start(options.verbose);
    // Each pid once, in the order given: a repeated one would be probed twice.
    let mut seen = std::collections::BTreeSet::new();
    let pids: Vec<u32> = options.pids.iter().copied().filter(|pid| seen.insert(*pid)).collect();
    let prepared = pids.iter().map(|&pid| Prepared::new(pid, &options, &progress)).collect::<Result<Vec<_>>>()?;
    let mut tracer = if options.probes_off() {
        None
    } else {
        progress.step("loading the eBPF programs");
        Some(privileges::explain(Tracer::load(kernel::config()?, options.max_allocs, options.verbose), Need::Tracing)?)
    };
    let (exits, exited) = mpsc::unbounded_channel();
    let mut processes = BTreeMap::new();
    let mut rules = RuleBook::default();
    for prepared in prepared {
        let pid = prepared.target.pid;
        watch_exit(pid, exits.clone())?;
        processes.insert(pid, prepared.attach(tracer.as_mut(), &mut rules, &allocators, &options, &progress, None)?);
    }
    progress.step("waiting for the first report");
    let rings = match &mut tracer {
        Some(tracer) => Some(Rings {
            new_stacks: watch(collect::new_python_stacks(tracer)?, "the kernel's stack ring")?,
            site_stacks: watch(collect::site_stacks(tracer)?, "the kernel's stack copy ring")?,
            process_events: watch(collect::process_events(tracer)?, "the kernel's process ring")?,
            log: if options.verbose { Some(watch(tracer.take_logger()?, "the kernel's log")?) } else { None },
        }),
        None => None,
    };
    let mut session = Session {
        options: &options,
        filters,
        tracer,
        rules,
        allocators,
        processes,
        outputs,
        failed: None,
        intervals: 0,
        progress,
        exits,
        gone_untracked: 0,
        skipped: BTreeMap::new(),
    };
    if options.all_python {
        session.discover();
    }
    let end = session.run_loop(stops, exited, rings).await?;
    if let Some(failure) = session.failed {
        return Err(failure);
    }
    let untracked = session.gone_untracked + session.processes.values().map(|t| t.untracked).sum::<u64>();
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
    fn new(pid: u32, options: &Options, progress: &Progress) -> Result<Self> {
        progress.step(format!("pid {pid}: reading its interpreter"));
        let target = Target::open(pid)?;
        let python = python::detect(&target)?;
        let mut notes = Vec::new();
        let interpreter = match python {
            Detection::Supported(interpreter) => Some(*interpreter),
            Detection::Unsupported(reason) => {
                progress.say(&format!("memtrace: pid {pid}: {reason}; reporting native frames only"));
                notes.push(format!("{reason}; native frames only"));
                None
            }
            Detection::NotPython => None,
        };
        if options.probes_off() {
            return Ok(Self { target, interpreter, points: Vec::new(), notes, includes_raw: true });
        }
        progress.step(format!("pid {pid}: finding where to probe"));
        let libc_path = plan::find_libc(&target)?;
        let libc_elf = privileges::explain(ElfFile::open(&target.paths.host_path(libc_path)), Need::Binaries)?;
        let inlined = interpreter.as_ref().map(|i| inlined::find(&i.elf, &i.layout)).unwrap_or_default();
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
            &target.paths,
            ProbedBinary { path: libc_path, elf: &libc_elf },
            interpreter
                .as_ref()
                .map(|i| PythonProbes { binary: ProbedBinary { path: &i.path, elf: &i.elf }, inlined: &inlined }),
        )?;
        if options.verbose {
            if interpreter.is_some() {
                eprintln!("memtrace: {}", inlined.describe());
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
        let includes_raw = !inlined.probes_pops();
        Ok(Self { target, interpreter, points, notes, includes_raw })
    }

    /// Takes the first census and, with a tracer, attaches the probes,
    /// places the rules the kernel side unwinds native stacks with (when
    /// it does: native programs, and Python with `--native`) and starts
    /// counting; or with `counting`, the plan it is already counted with
    /// (a forked child's, its parent's), keeps that and adds its rules.
    fn attach(
        self,
        tracer: Option<&mut Tracer>,
        rules: &mut RuleBook,
        allocators: &AllocatorFrames,
        options: &Options,
        progress: &Progress,
        counting: Option<Plan>,
    ) -> Result<Traced> {
        let Self { target, interpreter, points, notes, includes_raw } = self;
        let pid = target.pid;
        progress.step(format!("pid {pid}: its first census"));
        let mut census = CensusTaker::new(
            pid,
            interpreter.as_ref().map(|i| (i.layout, i.runtime)),
            interpreter.as_ref().and_then(|i| i.pymalloc),
        );
        let baseline = census.take();
        let described = interpreter.as_ref().map(|i| format!("CPython {}", i.version));
        let info = ProcessInfo {
            pid,
            ns_pid: target.ns_pid,
            comm: target.comm.clone(),
            interpreter: described.clone(),
            cgroup: target.cgroup.clone(),
        };
        let symbolizer =
            |python, mixed| Symbolizer::new(&target, python, mixed, allocators.clone(), options.frames as usize);
        let traced = |symbolizer, coverage, plan, unwinding| Traced {
            plan,
            unwinding,
            untracked: 0,
            info,
            symbolizer,
            coverage,
            census,
            census_before: baseline,
            notes,
            previous: Snapshot::default(),
            history: History::default(),
            types: TypeHistory::default(),
            sequence: 0,
            exited: false,
        };
        let Some(tracer) = tracer else {
            progress.say(&format!(
                "memtrace: tracing pid {pid} ({}){}: census only, no probes; a report every {} s; Ctrl-C to stop",
                target.comm,
                described.as_ref().map(|d| format!(", {d}")).unwrap_or_default(),
                options.interval().as_secs_f64()
            ));
            return Ok(traced(symbolizer(None, false), None, None, None));
        };
        // A native program's sites are its native stacks, whatever the
        // grouping: two callers of one wrapper are two sites, and a site
        // starts at the first frame of the program's own code. With
        // --native, Python's sites are keyed by native stacks as well, and
        // each new one is copied for userspace to unwind deeper, through
        // every eval loop frame to merge with the Python frames.
        let unwinds = interpreter.is_none() || options.native;
        let config = TargetConfig {
            min_size: options.min_size,
            max_size: options.max_size,
            native_frames: if unwinds { MAX_NATIVE_FRAMES as u32 } else { 1 },
            python_frames: if interpreter.is_some() { options.frames } else { 0 },
            copy_stacks: u32::from(options.native && interpreter.is_some()),
            _pad: 0,
            python: interpreter.as_ref().map(|i| i.walk()).unwrap_or_default(),
        };
        let elf = interpreter.as_ref().map(|i| &i.elf);
        let mut start_unwinding = |tracer: &mut Tracer| -> Result<Option<Unwinding>> {
            if !unwinds {
                return Ok(None);
            }
            let started = Instant::now();
            let unwinding = Unwinding::start(tracer, rules, &target.map, pid, &points, elf)?;
            if options.verbose {
                eprintln!("memtrace: pid {pid}: {} in {:?}", unwinding.summary(), started.elapsed());
            }
            Ok(Some(unwinding))
        };
        let (plan, unwinding) = match counting {
            // Counted already: its rules follow at once.
            Some(plan) => {
                let unwinding = start_unwinding(tracer)?;
                (plan, unwinding)
            }
            None => {
                progress.step(format!("pid {pid}: attaching {} probes", points.len()));
                let attached = tracer.attach(pid, &points).and_then(|()| {
                    // The rules are in place before the first allocation counts.
                    let unwinding = start_unwinding(tracer)?;
                    tracer.set_target(pid, &config)?;
                    Ok(unwinding)
                });
                let unwinding = match attached {
                    Ok(unwinding) => unwinding,
                    Err(_) if !Target::is_alive(pid) => {
                        bail!("pid {pid} ({}) exited before tracing started", target.comm)
                    }
                    Err(e) => return privileges::explain(Err(e), Need::Tracing),
                };
                (Plan { points: points.clone(), config }, unwinding)
            }
        };
        progress.say(&format!(
            "memtrace: tracing pid {pid} ({}){}: {} probes; a report every {} s; Ctrl-C to stop",
            target.comm,
            described.as_ref().map(|d| format!(", {d}")).unwrap_or_default(),
            plan.points.len(),
            options.interval().as_secs_f64()
        ));
        let sizes = (options.min_size, options.max_size);
        let coverage = interpreter
            .as_ref()
            .and_then(|i| i.pymalloc)
            .and_then(|state| Coverage::start(state, pid, includes_raw, sizes));
        let symbolizer = symbolizer(interpreter.as_ref().map(|i| i.code_resolver(pid)), options.native);
        Ok(traced(symbolizer, coverage, Some(plan), unwinding))
    }
}

/// What a process is counted with: its probes and the kernel side's
/// configuration for it.
#[derive(Clone)]
struct Plan {
    points: Vec<AttachPoint>,
    config: TargetConfig,
}

impl Plan {
    /// Attaches the probes, then starts counting, so that counting starts
    /// with every probe in place.
    fn start(&self, tracer: &mut Tracer, pid: u32) -> Result<()> {
        tracer.attach(pid, &self.points)?;
        tracer.set_target(pid, &self.config)
    }
}

/// What the session keeps for one traced process.
struct Traced {
    info: ProcessInfo,
    symbolizer: Symbolizer,
    coverage: Option<Coverage>,
    census: CensusTaker,
    /// The census of the previous report (of attach, for the first).
    census_before: Census,
    /// Said under every report's header.
    notes: Vec<String>,
    previous: Snapshot,
    /// Its reports so far, for verdicts and peaks.
    history: History,
    /// Its censuses so far, for the types' verdicts.
    types: TypeHistory,
    sequence: u32,
    /// Its final report is written; nothing more is.
    exited: bool,
    /// Allocations the kernel side could not track, at its latest report.
    untracked: u64,
    /// None without probes (`--census-only`).
    plan: Option<Plan>,
    /// The kernel side's native unwinding, when it unwinds.
    unwinding: Option<Unwinding>,
}

/// How a process came to be traced after the session started.
#[derive(Clone, Copy)]
enum Followed {
    /// Forked by traced process `parent`.
    Fork { parent: u32 },
    /// Its own new image, after an exec.
    Exec,
    /// Found by host mode's scan.
    Found,
}

/// The signals that end a session.
struct Stops {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
}

/// The kernel's announcements, drained as they come so that what they name
/// is read while the process still has it.
struct Rings {
    /// Keys of new Python stacks.
    new_stacks: AsyncFd<RingBuf<MapData>>,
    /// Forks and execs of traced processes.
    process_events: AsyncFd<RingBuf<MapData>>,
    /// Stack copies of new sites (`--native`).
    site_stacks: AsyncFd<RingBuf<MapData>>,
    /// The kernel side's diagnostics (`--verbose`).
    log: Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>,
}

struct Session<'a> {
    options: &'a Options,
    /// None with `--census-only`.
    tracer: Option<Tracer>,
    /// The unwind rules of every file a traced process maps.
    rules: RuleBook,
    /// The frames left out of native tracebacks (`--alloc-fn` included).
    allocators: AllocatorFrames,
    filters: Filters,
    processes: BTreeMap<u32, Traced>,
    /// The outputs still working; one that failed is dropped from here.
    outputs: Vec<Output>,
    /// The first output's failure: the session then ends, with final
    /// reports to the outputs that still work, and fails.
    failed: Option<anyhow::Error>,
    /// Report intervals passed, for `--count`.
    intervals: u32,
    /// Shown until the first report is written.
    progress: Progress,
    /// Where each traced process's exit is announced.
    exits: mpsc::UnboundedSender<u32>,
    /// `untracked` of the processes no longer in `processes`.
    gone_untracked: u64,
    /// With --all-python: the Python processes it cannot watch, and why,
    /// each said once.
    skipped: BTreeMap<u32, String>,
}

impl Session<'_> {
    async fn run_loop(
        &mut self,
        mut stops: Stops,
        mut exited: mpsc::UnboundedReceiver<u32>,
        mut rings: Option<Rings>,
    ) -> Result<End> {
        let Stops { sigint, sigterm } = &mut stops;
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
            // Without probes there are no rings: their branches wait forever.
            let (new_stacks, site_stacks, process_events, kernel_log) = match rings.as_mut() {
                Some(Rings { new_stacks, site_stacks, process_events, log }) => {
                    (Some(new_stacks), Some(site_stacks), Some(process_events), log.as_mut())
                }
                None => (None, None, None, None),
            };
            let new_stacks = readable(new_stacks);
            let site_stacks = readable(site_stacks);
            let process_events = readable(process_events);
            let kernel_log = readable(kernel_log);
            tokio::select! {
                _ = reports.tick() => {
                    // The last report allowed by --count is the final one.
                    if self.options.count.is_some_and(|n| self.intervals + 1 >= n) {
                        break End::Limit;
                    }
                    self.intervals += 1;
                    if self.options.all_python {
                        self.discover();
                    }
                    let live: Vec<u32> = self.live().collect();
                    self.report(&live, false)?;
                    if self.failed.is_some() {
                        break End::Limit;
                    }
                }
                ready = new_stacks => {
                    let mut guard = ready?;
                    for key in collect::drain_stack_keys(guard.get_inner_mut()) {
                        self.resolve_python_stack(key);
                    }
                    guard.clear_ready();
                }
                ready = site_stacks => {
                    let mut guard = ready?;
                    let processes = &mut self.processes;
                    collect::drain_stack_copies(guard.get_inner_mut(), |copy| {
                        if let Some(traced) = processes.get_mut(&copy.site.pid) {
                            traced.symbolizer.unwind_site(copy);
                        }
                    });
                    guard.clear_ready();
                }
                ready = process_events => {
                    let mut guard = ready?;
                    for event in collect::drain_process_events(guard.get_inner_mut()) {
                        self.process_changed(event)?;
                    }
                    guard.clear_ready();
                    if self.failed.is_some() {
                        break End::Limit;
                    }
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
                    // Host mode watches on, for the processes still to come.
                    if self.live().next().is_none() && !self.options.all_python {
                        return Ok(End::TargetExited);
                    }
                }
                _ = sigint.recv() => break End::Interrupted,
                _ = sigterm.recv() => break End::Interrupted,
                _ = until_deadline => break End::Limit,
            }
        };
        let live: Vec<u32> = self.live().collect();
        self.report(&live, true)?;
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
        self.report(&[pid], true)?;
        eprintln!("memtrace: pid {pid} exited; the final report above covers its whole life since attach");
        // Its records would only fill the maps, and its pid may come back.
        if let Some(tracer) = &mut self.tracer {
            tracer.forget(pid)?;
        }
        Ok(())
    }

    /// A traced process forked a child, or replaced its image.
    fn process_changed(&mut self, event: ProcessEvent) -> Result<()> {
        match event.kind {
            ProcessEvent::FORK => {
                let child = event.child;
                // A pid that comes back is a new process.
                if self.processes.get(&child).is_some_and(|t| !t.exited) {
                    return Ok(());
                }
                self.drop_process(child);
                self.follow(child, Followed::Fork { parent: event.pid }, event.time_ns);
            }
            ProcessEvent::EXEC => {
                let pid = event.pid;
                let Some(traced) = self.processes.get_mut(&pid).filter(|t| !t.exited) else { return Ok(()) };
                // The kernel side stopped counting it at the exec.
                traced.notes.push("it replaced its image (exec): this final report covers the former image".into());
                self.report(&[pid], true)?;
                eprintln!("memtrace: pid {pid} exec'd; the final report above covers its former image");
                if let Some(tracer) = &mut self.tracer {
                    tracer.forget(pid)?;
                }
                self.drop_process(pid);
                self.follow(pid, Followed::Exec, event.time_ns);
            }
            _ => {}
        }
        Ok(())
    }

    /// Plans and attaches a process the session did not start with; one
    /// that cannot be traced is one line, not the end of the session.
    fn follow(&mut self, pid: u32, how: Followed, since_ns: u64) {
        let quiet = Progress::start(true);
        // A child runs its parent's image at its parent's addresses: it is
        // counted with its parent's plan at once, and read afterwards.
        let inherited = match how {
            Followed::Fork { parent } => self.processes.get(&parent).and_then(|p| p.plan.clone()),
            Followed::Exec | Followed::Found => None,
        };
        let mut counted_from = None;
        let traced = (|| {
            if let (Some(plan), Some(tracer)) = (&inherited, self.tracer.as_mut()) {
                plan.start(tracer, pid)?;
                counted_from = Some(collect::monotonic_now_ns());
            }
            let prepared = Prepared::new(pid, self.options, &quiet)?;
            if !matches!(how, Followed::Exec) {
                watch_exit(pid, self.exits.clone())?;
            }
            prepared.attach(
                self.tracer.as_mut(),
                &mut self.rules,
                &self.allocators,
                self.options,
                &quiet,
                inherited.clone(),
            )
        })();
        let counted_from = counted_from.unwrap_or_else(collect::monotonic_now_ns);
        let lag_ms = counted_from.saturating_sub(since_ns) / 1_000_000;
        if traced.is_err()
            && let Some(tracer) = &mut self.tracer
        {
            // Counting may have started; nothing is to be left of it.
            let _ = tracer.forget(pid);
        }
        match (traced, how) {
            (Ok(mut traced), Followed::Fork { parent }) => {
                traced.notes.push(format!(
                    "forked from pid {parent}, traced from {lag_ms} ms after the fork: what it allocated before, and the blocks it inherited, are not counted"
                ));
                self.processes.insert(pid, traced);
            }
            (Ok(mut traced), Followed::Exec) => {
                traced.notes.push(format!("a new image (exec), traced from {lag_ms} ms after the exec"));
                self.processes.insert(pid, traced);
            }
            (Err(e), Followed::Fork { parent }) => {
                eprintln!("memtrace: pid {pid}, forked from pid {parent}, is not traced: {e:#}")
            }
            (Err(e), Followed::Exec) => eprintln!("memtrace: pid {pid}'s new image (exec) is not traced: {e:#}"),
            (Ok(traced), Followed::Found) => {
                self.processes.insert(pid, traced);
            }
            (Err(e), Followed::Found) => {
                if Target::is_alive(pid) {
                    eprintln!("memtrace: pid {pid} is not watched: {e:#}");
                }
            }
        }
    }

    /// Host mode: watches the Python processes not watched yet, and says
    /// once of each that cannot be watched why not.
    fn discover(&mut self) {
        let processes = &self.processes;
        let scan =
            discovery::scan(self.options.matching.as_ref(), |pid| processes.get(&pid).is_some_and(|t| !t.exited));
        for (pid, reason) in scan.skipped {
            if self.skipped.get(&pid) != Some(&reason) {
                eprintln!("memtrace: pid {pid} is not watched: {reason}");
                self.skipped.insert(pid, reason);
            }
        }
        for pid in scan.python {
            self.drop_process(pid);
            self.follow(pid, Followed::Found, collect::monotonic_now_ns());
        }
        let watched = self.live().count();
        if watched == 0 && self.intervals == 0 {
            let matching = self.options.matching.as_ref().map(|re| format!(" matching {re}")).unwrap_or_default();
            eprintln!("memtrace: no Python process{matching} yet; looking again at every report");
        }
    }

    /// Forgets a process the session has done with, keeping its losses.
    fn drop_process(&mut self, pid: u32) {
        if let Some(traced) = self.processes.remove(&pid) {
            self.gone_untracked += traced.untracked;
        }
    }

    /// Catches up with every live process: fresh memory maps, and any
    /// Python stack the kernel could not announce.
    fn sweep(&mut self) {
        let Some(tracer) = &mut self.tracer else { return };
        for (&pid, traced) in self.processes.iter_mut().filter(|(_, t)| !t.exited) {
            // Gone already (a zombie's map is empty): its exit is on its way.
            if !Target::is_alive(pid) {
                continue;
            }
            let Ok(map) = MemoryMap::read(pid) else { continue };
            if let Some(unwinding) = &mut traced.unwinding
                && let Err(e) = unwinding.refresh(tracer, &mut self.rules, &map)
            {
                eprintln!("memtrace: pid {pid}: cannot add unwind rules for its new code: {e:#}");
            }
            traced.symbolizer.set_map(map);
        }
        if let Ok(keys) = collect::python_stack_keys(tracer) {
            for key in keys {
                self.resolve_python_stack(key);
            }
        }
    }

    fn resolve_python_stack(&mut self, key: StackKey) {
        let (Some(tracer), Some(traced)) = (&self.tracer, self.processes.get_mut(&key.pid)) else { return };
        if traced.exited || !traced.symbolizer.wants_python_stack(key.id) {
            return;
        }
        if let Some(stack) = collect::python_stack(tracer, key) {
            traced.symbolizer.resolve_python_stack(key.id, &stack);
        }
    }

    /// Catches up with the kernel's announcements once, then reports each
    /// of `pids`.
    fn report(&mut self, pids: &[u32], is_final: bool) -> Result<()> {
        self.sweep();
        pids.iter().try_for_each(|&pid| self.report_one(pid, is_final))
    }

    /// Reads `pid`'s sites into a snapshot, takes its census, and writes
    /// its report.
    fn report_one(&mut self, pid: u32, is_final: bool) -> Result<()> {
        let Some(traced) = self.processes.get_mut(&pid) else { return Ok(()) };
        if traced.sequence == 0 {
            self.progress.step(format!("pid {pid}: its census and symbols for the first report"));
        }
        let census = traced.census.take();
        if let Some(objects) = &census.objects {
            traced.types.push(SystemTime::now(), objects);
        }
        let type_trends = traced.types.trends();
        let Some(tracer) = &self.tracer else {
            traced.sequence += 1;
            traced.exited |= is_final;
            let report = Report {
                time: SystemTime::now(),
                process: traced.info.clone(),
                sequence: traced.sequence,
                is_final,
                allocated: Stat::default(),
                losses: Vec::new(),
                counters: Vec::new(),
                notes: traced.notes.clone(),
                traced: false,
                current: Snapshot::default(),
                previous: Snapshot::default(),
                census: Some(CensusChange { now: census, before: std::mem::take(&mut traced.census_before) }),
                history: History::default(),
                type_trends,
            };
            self.progress.clear();
            write_to(&mut self.outputs, &mut self.failed, &report);
            traced.census_before = report.census.map(|c| c.now).unwrap_or_default();
            return Ok(());
        };
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
        traced.untracked = counters.untracked();
        let mut notes = traced.notes.clone();
        notes.extend(traced.coverage.as_ref().and_then(|c| c.note(&counters)));
        notes.extend(traced.unwinding.as_ref().and_then(Unwinding::note));
        let skipped: Vec<&str> = traced.symbolizer.skipped().collect();
        if !skipped.is_empty() {
            notes.push(format!(
                "native tracebacks start at the program's own code; left out above it: {}",
                skipped.join(", ")
            ));
        }
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
            traced: true,
            current,
            previous: std::mem::take(&mut traced.previous),
            census: Some(CensusChange { now: census, before: std::mem::take(&mut traced.census_before) }),
            history: std::mem::take(&mut traced.history),
            type_trends,
        };
        self.progress.clear();
        write_to(&mut self.outputs, &mut self.failed, &report);
        traced.previous = report.current;
        traced.history = report.history;
        traced.census_before = report.census.map(|c| c.now).unwrap_or_default();
        Ok(())
    }
}

/// Hands `report` to every output; one that fails is dropped, its failure
/// kept in `failed` (the first) or said on stderr (any later one).
fn write_to(outputs: &mut Vec<Output>, failed: &mut Option<anyhow::Error>, report: &Report) {
    outputs.retain_mut(|output| match output.writer.write(report) {
        Ok(()) => true,
        Err(e) => {
            let error = anyhow::anyhow!("cannot write {}: {e}", output.name);
            match failed {
                None => *failed = Some(error),
                Some(_) => eprintln!("memtrace: {error}"),
            }
            false
        }
    });
}

fn outstanding(stats: &SiteStats) -> Stat {
    Stat { size: stats.outstanding_bytes, count: stats.outstanding_count }
}

/// Readiness of an optional descriptor; never, without one.
async fn readable<T: AsRawFd>(fd: Option<&mut AsyncFd<T>>) -> io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, T>> {
    match fd {
        Some(fd) => fd.readable_mut().await,
        None => std::future::pending().await,
    }
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
