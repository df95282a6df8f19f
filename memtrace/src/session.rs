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
use memtrace_common::{MAX_NATIVE_FRAMES, ProcessEvent, SiteKey, SiteStats, StackKey, TargetConfig};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval, sleep_until},
};

use crate::{
    binary::elf::ElfFile,
    census::{Census, CensusTaker, schedule::CensusBudget},
    cli::Options,
    collect,
    coverage::Coverage,
    escalation::{self, Tier},
    filter::Filters,
    privileges::{self, Need},
    probes::{
        attach::{Purpose, Tracer},
        inlined, kernel,
        plan::{self, AttachPoint, ProbedBinary, PythonProbes},
        unwinding::{RuleBook, Unwinding},
    },
    process::{
        Target, discovery,
        host::{Decision, Host, HostCounts},
        proc_maps::MemoryMap,
    },
    progress::Progress,
    python::{self, Detection},
    report::{
        CensusChange, FirstTouch, HostReport, Output, ProcessInfo, Report, Writer,
        host::{self, Skipped, Standing, Watch},
        trend::{History, TypeHistory},
    },
    snapshot::{Snapshot, Stat},
    symbolize::{Symbolizer, allocators::AllocatorFrames},
    type_births::{Births, TypeName, TypePlan},
};

/// How often memory maps are refreshed and Python stacks the kernel could
/// not announce (its ring was full) are resolved.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// How soon host mode looks again at a process just started whose
/// interpreter is not mapped yet: its dynamic loader maps libpython within
/// milliseconds, and a short-lived process is gone soon after.
const LOOK_AGAIN_EVERY: Duration = Duration::from_millis(5);

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
    if options.probes_off() && !options.host_wide() && !options.escalate {
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
    let prepared = prepare_each(&pids, &options, &progress)?;
    // Host mode loads the kernel side for its announcements of every
    // process, and attaches no probe but for an escalation.
    let load = |purpose| Tracer::load(kernel::config()?, purpose, options.verbose);
    let escalate = options.escalate.then_some(options.max_allocs);
    let mut tracer = if options.host_wide() || options.escalate {
        progress.step("loading the eBPF programs");
        let purpose = Purpose::Free { every_process: options.host_wide(), escalate };
        Some(privileges::explain(load(purpose), Need::Tracing)?)
    } else if !options.probes_off() {
        progress.step("loading the eBPF programs");
        Some(privileges::explain(load(Purpose::Probes { max_allocs: options.max_allocs }), Need::Tracing)?)
    } else {
        // --census-only needs no eBPF; with it, first touch comes along.
        privileges::check(Need::Tracing)
            .and_then(|()| kernel::check_kernel())
            .and_then(|()| load(Purpose::Free { every_process: false, escalate: None }))
            .inspect_err(|e| {
                if options.verbose {
                    eprintln!("memtrace: no first-touch accounting: {e:#}");
                }
            })
            .ok()
    };
    let (exits, exited) = mpsc::unbounded_channel();
    let mut processes = BTreeMap::new();
    let mut rules = RuleBook::default();
    for prepared in prepared {
        let pid = prepared.target.pid;
        let traced = watch_exit(pid, exits.clone())
            .and_then(|()| prepared.attach(tracer.as_mut(), &mut rules, &allocators, &options, &progress, None));
        match traced {
            Ok(traced) => {
                processes.insert(pid, traced);
            }
            // Of several, one that exited or refused meanwhile is one line.
            Err(e) if pids.len() > 1 => progress.say(&format!("memtrace: pid {pid} is not traced: {e:#}")),
            Err(e) => return Err(e),
        }
    }
    if processes.is_empty() && !pids.is_empty() {
        bail!("none of the pids given can be traced");
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
        vanished: Vec::new(),
        census_budget: CensusBudget::default(),
        host_reports: 0,
        host: options.host_wide().then(|| Host::new(options.matching.clone(), options.all)),
        escalations: Escalations::default(),
    };
    if options.host_wide() {
        session.discover(false);
    }
    let end = session.run_loop(stops, exited, rings).await?;
    if let Some(counts) = session.host_counts() {
        eprintln!(
            "memtrace: host mode: {} Python processes started since memtrace started, {} of them exited before they could be read; {} found by the /proc scan that the kernel's announcements missed; {} announcements lost",
            counts.announced, counts.vanished, counts.missed, counts.events_lost
        );
    }
    if let Some(failure) = session.failed {
        return Err(failure);
    }
    let untracked = session.gone_untracked + session.processes.values().map(|t| t.untracked).sum::<u64>();
    Ok(Outcome { end, untracked })
}

/// What a process is probed for.
enum Probing {
    /// Nothing: its census alone (`--census-only`, host mode).
    Nothing,
    /// Every allocation.
    Allocations,
    /// The births of one type (`--type`).
    Births(TypeName),
}

impl Probing {
    fn of(options: &Options) -> Self {
        match &options.type_name {
            _ if options.probes_off() => Probing::Nothing,
            Some(name) => Probing::Births(name.clone()),
            None => Probing::Allocations,
        }
    }

    /// How `--escalate` probes for `tier`.
    fn for_tier(tier: &Tier) -> Result<Self> {
        Ok(match tier {
            Tier::Exact => Probing::Allocations,
            Tier::Type(name) => {
                Probing::Births(TypeName::parse(name).map_err(|e| anyhow::anyhow!("--type {name}: {e}"))?)
            }
        })
    }
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
    /// `--type`: the type found, whose births `points` probe.
    births: Option<TypePlan>,
}

impl Prepared {
    fn new(pid: u32, options: &Options, progress: &Progress) -> Result<Self> {
        Self::probing(pid, options, progress, Probing::of(options))
    }

    /// `new`, probed for `probing` whatever the options say: host mode's
    /// escalation probes one process of those it watches.
    fn probing(pid: u32, options: &Options, progress: &Progress, probing: Probing) -> Result<Self> {
        progress.step(format!("pid {pid}: reading its interpreter"));
        let target = Target::open(pid)?;
        let python = python::detect(&target)?;
        Self::detected(target, python, options, progress, probing)
    }

    /// `probing` for a process whose interpreter was read already.
    fn detected(
        target: Target,
        python: Detection,
        options: &Options,
        progress: &Progress,
        probing: Probing,
    ) -> Result<Self> {
        let pid = target.pid;
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
        if matches!(probing, Probing::Nothing) {
            return Ok(Self { target, interpreter, points: Vec::new(), notes, includes_raw: true, births: None });
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
        let mut points = plan::plan(
            &target.paths,
            ProbedBinary { path: libc_path, elf: &libc_elf },
            interpreter
                .as_ref()
                .map(|i| PythonProbes { binary: ProbedBinary { path: &i.path, elf: &i.elf }, inlined: &inlined }),
        )?;
        let type_name = match &probing {
            Probing::Births(name) => Some(name),
            Probing::Nothing | Probing::Allocations => None,
        };
        let births = match (type_name, &interpreter) {
            (None, _) => None,
            (Some(name), None) => bail!("--type {name}: pid {pid} ({}) is not a CPython memtrace reads", target.comm),
            (Some(name), Some(i)) => {
                progress.step(format!("pid {pid}: finding type {name}"));
                let mut census = CensusTaker::new(pid, Some((i.layout, i.runtime)), i.pymalloc);
                // A built-in type's births are every object's: the
                // allocation plan probes only those that may reuse one.
                let every_birth = inlined.every_birth();
                let python =
                    PythonProbes { binary: ProbedBinary { path: &i.path, elf: &i.elf }, inlined: &every_birth };
                let birth_points =
                    plan::plan(&target.paths, ProbedBinary { path: libc_path, elf: &libc_elf }, Some(python))?;
                let births = TypePlan::new(&target, i, &mut census, name, &birth_points)?;
                points = births.points.clone();
                notes = vec![births.note()];
                Some(births)
            }
        };
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
        Ok(Self { target, interpreter, points, notes, includes_raw, births })
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
        let Self { target, interpreter, points, notes, includes_raw, births } = self;
        // The free tier's tracer attaches no probe: it charges first
        // touches (and probes only for escalations).
        let (tracer, free_tier) = if points.is_empty() { (None, tracer) } else { (tracer, None) };
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
        // The census at attach is where host reports count growth from.
        let attached_at = SystemTime::now();
        let mut types = TypeHistory::default();
        if let Some(objects) = &baseline.objects {
            types.push(attached_at, objects);
        }
        let mut watch = Watch::default();
        watch.record(attached_at, baseline.memory, baseline.heap);
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
            types,
            watch,
            in_container: target.in_container,
            sequence: 0,
            exited: false,
            gone: false,
            births: None,
            first_touch: None,
        };
        let Some(tracer) = tracer else {
            let touching = free_tier.is_some_and(|tracer| {
                let config = TargetConfig {
                    min_size: 0,
                    max_size: u64::MAX,
                    native_frames: 1,
                    python_frames: if interpreter.is_some() { options.frames } else { 0 },
                    copy_stacks: 0,
                    first_touch: 1,
                    python: interpreter.as_ref().map(|i| i.walk()).unwrap_or_default(),
                };
                tracer
                    .start_first_touch(pid, &config)
                    .inspect_err(|e| eprintln!("memtrace: pid {pid}: no first-touch accounting: {e:#}"))
                    .is_ok()
            });
            progress.say(&format!(
                "memtrace: tracing pid {pid} ({}){}: census only, no probes; a report every {} s; Ctrl-C to stop",
                target.comm,
                described.as_ref().map(|d| format!(", {d}")).unwrap_or_default(),
                options.interval().as_secs_f64()
            ));
            if !touching {
                return Ok(traced(symbolizer(None, false), None, None, None));
            }
            let mut traced =
                traced(symbolizer(interpreter.as_ref().map(|i| i.code_resolver(pid)), false), None, None, None);
            traced.first_touch = Some(Snapshot::default());
            return Ok(traced);
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
            first_touch: 0,
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
        // Its type is watched, and its census taken, before it is said to
        // be traced.
        let births = match (&births, &interpreter) {
            (Some(plan), Some(i)) => Some(Births::start(tracer, pid, plan, i)?),
            _ => None,
        };
        let tracing = format!(
            "memtrace: tracing pid {pid} ({}){}: {} probes; a report every {} s; Ctrl-C to stop",
            target.comm,
            described.as_ref().map(|d| format!(", {d}")).unwrap_or_default(),
            plan.points.len(),
            options.interval().as_secs_f64()
        );
        let sizes = (options.min_size, options.max_size);
        // Births alone say nothing of pymalloc's count.
        let coverage = interpreter
            .as_ref()
            .and_then(|i| i.pymalloc)
            .filter(|_| births.is_none())
            .and_then(|state| Coverage::start(state, pid, includes_raw, sizes));
        let symbolizer = symbolizer(interpreter.as_ref().map(|i| i.code_resolver(pid)), options.native);
        let mut traced = traced(symbolizer, coverage, Some(plan), unwinding);
        if let Some(births) = &births {
            births.watch(&mut traced.census);
            // Counted from now: the census it is compared with is of now,
            // not of before the probes were attached.
            traced.census_before = traced.census.take();
        }
        progress.say(&tracing);
        Ok(Traced { births, ..traced })
    }
}

/// Validates and plans each of `pids`. One pid fails the session; of
/// several, one that cannot be traced (gone, a kernel thread, not
/// readable) is one line and the others are traced, unless none can be.
fn prepare_each(pids: &[u32], options: &Options, progress: &Progress) -> Result<Vec<Prepared>> {
    if let [pid] = pids {
        return Ok(vec![Prepared::new(*pid, options, progress)?]);
    }
    let mut prepared = Vec::new();
    let mut first_failure = None;
    for &pid in pids {
        match Prepared::new(pid, options, progress) {
            Ok(p) => prepared.push(p),
            Err(e) => {
                progress.say(&format!("memtrace: pid {pid} is not traced: {e:#}"));
                first_failure.get_or_insert(e);
            }
        }
    }
    match first_failure {
        Some(e) if prepared.is_empty() && !pids.is_empty() => Err(e.context("none of the pids given can be traced")),
        _ => Ok(prepared),
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
    /// Its memory over time, for host reports.
    watch: Watch,
    /// In another pid or mount namespace (a container).
    in_container: bool,
    sequence: u32,
    /// Its final report is written; nothing more is.
    exited: bool,
    /// It exited (or replaced its image).
    gone: bool,
    /// Allocations the kernel side could not track, at its latest report.
    untracked: u64,
    /// None without probes (`--census-only`).
    plan: Option<Plan>,
    /// The kernel side's native unwinding, when it unwinds.
    unwinding: Option<Unwinding>,
    /// `--type`: its births, kept against its censuses.
    births: Option<Births>,
    /// With first-touch accounting (the free tier), its pages at the
    /// previous report.
    first_touch: Option<Snapshot>,
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

/// Host mode's `--escalate`: at most one process traced at a time, each
/// at most once.
#[derive(Default)]
struct Escalations {
    running: Option<Escalation>,
    done: std::collections::BTreeSet<u32>,
}

struct Escalation {
    pid: u32,
    tier: Tier,
    started: Instant,
    until: Instant,
    /// memtrace's programs' run count when it started.
    hits_before: u64,
    /// Keeps the kernel's run counts on during the window.
    stats: Option<OwnedFd>,
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
    /// Host mode: the processes it cannot watch, and why, for its reports.
    skipped: BTreeMap<u32, Skipped>,
    /// Host mode: the processes that exited before they could be read,
    /// since the last host report.
    vanished: Vec<Skipped>,
    /// Host mode: when each process's object census may be taken.
    census_budget: CensusBudget,
    /// Host reports written.
    host_reports: u32,
    /// Host mode (--all-python, --all): every process on the host, as the
    /// kernel announces them.
    host: Option<Host>,
    /// `--escalate`: the window running, and the processes traced before.
    escalations: Escalations,
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
            let has_pending = self.host.as_ref().is_some_and(Host::has_pending);
            let look_again = async {
                match has_pending {
                    true => tokio::time::sleep(LOOK_AGAIN_EVERY).await,
                    false => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = reports.tick() => {
                    // The last report allowed by --count is the final one.
                    if self.options.count.is_some_and(|n| self.intervals + 1 >= n) {
                        break End::Limit;
                    }
                    self.intervals += 1;
                    if self.options.host_wide() {
                        // Announcements first: the scan is to count only
                        // what they missed.
                        if let Some(Rings { process_events, .. }) = rings.as_mut() {
                            for event in collect::drain_process_events(process_events.get_mut()) {
                                self.announced(event)?;
                            }
                        }
                        self.examine_pending();
                        self.discover(true);
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
                        if self.host.is_some() {
                            self.announced(event)?;
                        } else {
                            self.process_changed(event)?;
                        }
                    }
                    self.examine_pending();
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
                _ = look_again => self.examine_pending(),
                Some(pid) = exited.recv() => {
                    self.exited(pid)?;
                    if self.failed.is_some() {
                        break End::Limit;
                    }
                    // Host mode watches on, for the processes still to come.
                    if self.live().next().is_none() && !self.options.host_wide() {
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
        if self.escalations.running.as_ref().is_some_and(|e| e.pid == pid) {
            self.end_escalation(false)?;
            eprintln!("memtrace: pid {pid} exited");
            return Ok(());
        }
        let Some(traced) = self.processes.get_mut(&pid).filter(|t| !t.exited) else { return Ok(()) };
        traced.gone = true;
        self.final_report_of(pid)?;
        // In host mode, the next host report stands for its final report.
        if self.options.host_mode() {
            eprintln!("memtrace: pid {pid} exited");
        } else {
            eprintln!("memtrace: pid {pid} exited; the final report above covers its whole life since attach");
        }
        // Its records would only fill the maps, and its pid may come back.
        if let Some(tracer) = &mut self.tracer {
            tracer.forget(pid)?;
        }
        // Host mode sees processes come and go for as long as it runs: what
        // it kept of one that exited would only grow.
        if self.host.is_some() {
            self.drop_process(pid);
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
                self.final_report_of(pid)?;
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
            (Err(e), Followed::Found) if !discovery::exiting(pid) => {
                eprintln!("memtrace: pid {pid} is not watched: {e:#}")
            }
            // It exited while it was read (its memory goes before its
            // state says so): named and counted, as one gone before.
            (Err(_), Followed::Found) => {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if let Some(host) = &mut self.host {
                    let decision = host.watch_failed(pid, comm.trim());
                    self.decided(decision);
                }
            }
        }
    }

    /// Host mode's scan of /proc: at start, every Python process; later
    /// (`safety_net`), any the kernel's announcements missed.
    fn discover(&mut self, safety_net: bool) {
        let Some(host) = &mut self.host else { return };
        let processes = &self.processes;
        let (found, decisions) = host.scan(|pid| processes.get(&pid).is_some_and(|t| !t.exited), safety_net);
        // A skipped process that is gone is no longer news.
        self.skipped.retain(|pid, _| Target::is_alive(*pid));
        for decision in decisions {
            self.decided(decision);
        }
        for pid in found {
            self.drop_process(pid);
            self.follow(pid, Followed::Found, collect::monotonic_now_ns());
        }
        let watched = self.live().count();
        if watched == 0 && !safety_net {
            let matching = self.options.matching.as_ref().map(|re| format!(" matching {re}")).unwrap_or_default();
            let what = if self.options.all { "process" } else { "Python process" };
            eprintln!("memtrace: no {what}{matching} yet; watching for new ones");
        }
    }

    /// Host mode: any process on the host forked, exec'd or exited.
    fn announced(&mut self, event: ProcessEvent) -> Result<()> {
        if event.kind == ProcessEvent::EXEC && self.processes.get(&event.pid).is_some_and(|t| !t.exited) {
            let pid = event.pid;
            if let Some(traced) = self.processes.get_mut(&pid) {
                traced.notes.push("it replaced its image (exec): this final report covers the former image".into());
            }
            self.final_report_of(pid)?;
            if let Some(tracer) = &mut self.tracer {
                tracer.forget(pid)?;
            }
            self.drop_process(pid);
        }
        let Some(host) = &mut self.host else { return Ok(()) };
        let processes = &self.processes;
        if let Some(decision) = host.announced(&event, |pid| processes.get(&pid).is_some_and(|t| !t.exited)) {
            self.decided(decision);
        }
        Ok(())
    }

    /// Host mode: looks again at the processes just announced.
    fn examine_pending(&mut self) {
        let Some(host) = &mut self.host else { return };
        for pid in host.pending() {
            let Some(host) = &mut self.host else { return };
            if let Some(decision) = host.examine(pid) {
                self.decided(decision);
            }
        }
    }

    /// What host mode has seen so far.
    pub fn host_counts(&mut self) -> Option<HostCounts> {
        let host = self.host.as_mut()?;
        if let Some(lost) = self.tracer.as_ref().and_then(|t| collect::events_lost(t).ok()) {
            host.counts.events_lost = lost;
        }
        Some(host.counts)
    }

    /// Carries out host mode's decision about a process.
    fn decided(&mut self, decision: Decision) {
        match decision {
            Decision::Skip(pid, reason) => {
                if self.skipped.get(&pid).is_none_or(|s| s.reason != reason) {
                    eprintln!("memtrace: pid {pid} is not watched: {reason}");
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    self.skipped.insert(pid, Skipped { pid, comm: comm.trim().to_owned(), reason });
                }
            }
            Decision::Vanished(pid, name) => {
                eprintln!("memtrace: pid {pid} ({name}) exited before it could be read");
                self.vanished.push(Skipped { pid, comm: name, reason: "exited before it could be read".into() });
            }
            Decision::Watch(target, interpreter) => {
                let (pid, comm) = (target.pid, target.comm.clone());
                let quiet = Progress::start(true);
                let detection = interpreter.map_or(Detection::NotPython, Detection::Supported);
                let watched = Prepared::detected(target, detection, self.options, &quiet, Probing::Nothing).and_then(
                    |prepared| {
                        watch_exit(pid, self.exits.clone())?;
                        prepared.attach(
                            self.tracer.as_mut(),
                            &mut self.rules,
                            &self.allocators,
                            self.options,
                            &quiet,
                            None,
                        )
                    },
                );
                match watched {
                    Ok(traced) => {
                        self.drop_process(pid);
                        self.processes.insert(pid, traced);
                    }
                    Err(e) if !discovery::exiting(pid) => eprintln!("memtrace: pid {pid} is not watched: {e:#}"),
                    Err(_) => {
                        if let Some(host) = &mut self.host {
                            let decision = host.watch_failed(pid, &comm);
                            self.decided(decision);
                        }
                    }
                }
            }
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
        for (&pid, traced) in self.processes.iter_mut().filter(|(_, t)| !t.exited && t.plan.is_some()) {
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
        if !self.options.host_mode() {
            return pids.iter().try_for_each(|&pid| self.report_one(pid, is_final, true));
        }
        // The censuses the budget allows go to the processes censused
        // longest ago; a final report censuses every one.
        self.census_budget.fill();
        let mut order = pids.to_vec();
        order.sort_by_key(|pid| self.processes.get(pid).and_then(|t| t.types.latest()).map(|(time, _)| time));
        for pid in order {
            let census = is_final || self.census_budget.allows();
            let started = Instant::now();
            self.report_one(pid, is_final, census)?;
            if census {
                self.census_budget.spend(started.elapsed());
            }
        }
        let report = self.host_report(is_final);
        if self.options.escalate && !is_final {
            self.escalate(&report)?;
        }
        Ok(())
    }

    /// The final report of one process whose life (or image) ended; in
    /// host mode without a census, which it would not survive, and with
    /// its standing left to the next host report.
    fn final_report_of(&mut self, pid: u32) -> Result<()> {
        self.sweep();
        self.report_one(pid, true, !self.options.host_mode())
    }

    /// Host mode's report of every process: those live, and those that
    /// exited since the previous one (then forgotten, so that churn leaves
    /// nothing behind).
    fn host_report(&mut self, is_final: bool) -> HostReport {
        let top = self.options.view.top;
        let mut processes: Vec<Standing> = self
            .processes
            .values()
            .map(|t| {
                Standing::new(t.info.clone(), t.in_container, t.gone, &t.watch, &t.types, t.first_touch.as_ref(), top)
            })
            .collect();
        host::rank(&mut processes);
        self.host_reports += 1;
        let report = HostReport {
            time: SystemTime::now(),
            sequence: self.host_reports,
            is_final,
            processes,
            skipped: self.skipped.values().cloned().collect(),
            vanished: std::mem::take(&mut self.vanished),
        };
        self.progress.clear();
        write_host_to(&mut self.outputs, &mut self.failed, &report);
        let gone: Vec<u32> = self.processes.iter().filter(|(_, t)| t.gone).map(|(&pid, _)| pid).collect();
        for pid in gone {
            self.drop_process(pid);
        }
        report
    }

    /// `--escalate`, after each host report: ends the window that is over,
    /// or starts one on the process that has grown longest.
    fn escalate(&mut self, report: &HostReport) -> Result<()> {
        if let Some(running) = &self.escalations.running {
            if Instant::now() >= running.until {
                self.end_escalation(true)?;
            }
            return Ok(());
        }
        let Some((pid, tier)) = escalation::candidate(report, &self.escalations.done, self.options.interval()) else {
            return Ok(());
        };
        self.escalations.done.insert(pid);
        let Some(tracer) = self.tracer.as_mut() else { return Ok(()) };
        let quiet = Progress::start(true);
        // The kernel counts its programs' runs while this is open.
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let hits_before = tracer.probe_hits();
        let prepared =
            Probing::for_tier(&tier).and_then(|probing| Prepared::probing(pid, self.options, &quiet, probing));
        let traced = prepared.and_then(|prepared| {
            prepared.attach(Some(tracer), &mut self.rules, &self.allocators, self.options, &quiet, None)
        });
        let mut traced = match traced {
            Ok(traced) => traced,
            Err(e) => {
                eprintln!("memtrace: pid {pid} is growing but cannot be traced: {e:#}");
                return tracer.forget(pid);
            }
        };
        // Its history goes on: the host report still ranks it meanwhile.
        if let Some(watched) = self.processes.remove(&pid) {
            traced.watch = watched.watch;
            traced.types = watched.types;
            traced.census = watched.census;
            traced.sequence = watched.sequence;
        }
        let window = self.options.window();
        eprintln!(
            "memtrace: pid {pid} has grown for {} reports: {} for {:.0} s (--escalate)",
            escalation::GROWING_FOR,
            tier.describe(),
            window.as_secs_f64()
        );
        self.processes.insert(pid, traced);
        self.escalations.running =
            Some(Escalation { pid, tier, until: Instant::now() + window, started: Instant::now(), hits_before, stats });
        Ok(())
    }

    /// Ends the running escalation: its report, with what it cost, and
    /// detaches; with `rewatch`, the process is watched on as before.
    fn end_escalation(&mut self, rewatch: bool) -> Result<()> {
        let Some(running) = self.escalations.running.take() else { return Ok(()) };
        let pid = running.pid;
        let hits = self.tracer.as_ref().map_or(0, |t| t.probe_hits().saturating_sub(running.hits_before));
        drop(running.stats);
        if let Some(traced) = self.processes.get_mut(&pid) {
            traced.notes.push(escalation::cost_note(&running.tier, running.started.elapsed(), hits));
            // Its changes are the window's, as tracemalloc's compare_to
            // with a snapshot taken when tracing started.
            traced.previous = Snapshot::default();
        }
        self.sweep();
        self.report_one(pid, true, false)?;
        if let Some(tracer) = &mut self.tracer {
            tracer.forget(pid)?;
        }
        let Some(traced) = self.processes.remove(&pid) else { return Ok(()) };
        let quiet = Progress::start(true);
        let watched = if rewatch {
            Prepared::probing(pid, self.options, &quiet, Probing::Nothing)
                .and_then(|p| p.attach(None, &mut self.rules, &self.allocators, self.options, &quiet, None))
                .ok()
        } else {
            None
        };
        match watched {
            Some(mut watched) => {
                watched.watch = traced.watch;
                watched.types = traced.types;
                watched.sequence = traced.sequence;
                self.processes.insert(pid, watched);
            }
            // Gone: its last standing is the next host report's.
            None => {
                let mut traced = traced;
                traced.gone = true;
                self.processes.insert(pid, traced);
            }
        }
        Ok(())
    }

    /// Reads `pid`'s sites into a snapshot, takes its census (its memory
    /// only, unless `census`), and writes its report.
    fn report_one(&mut self, pid: u32, is_final: bool, census: bool) -> Result<()> {
        let Some(traced) = self.processes.get_mut(&pid) else { return Ok(()) };
        if traced.sequence == 0 {
            self.progress.step(format!("pid {pid}: its census and symbols for the first report"));
        }
        let census_started_ns = collect::monotonic_now_ns();
        // Births are alive as the census finds them: theirs is never skipped.
        let census = if census || traced.births.is_some() { traced.census.take() } else { traced.census.take_memory() };
        let now = SystemTime::now();
        if let Some(objects) = &census.objects {
            traced.types.push(now, objects);
        }
        traced.watch.record(now, census.memory, census.heap);
        let type_trends = traced.types.trends();
        let Some(tracer) = self.tracer.as_mut().filter(|_| traced.plan.is_some()) else {
            let first_touch = match (&self.tracer, traced.first_touch.take()) {
                (Some(tracer), Some(before)) => Some(first_touch(tracer, traced, before)?),
                _ => None,
            };
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
                first_touch,
            };
            self.progress.clear();
            write_to(&mut self.outputs, &mut self.failed, &report);
            traced.census_before = report.census.map(CensusChange::carried_on).unwrap_or_default();
            traced.first_touch = report.first_touch.map(|touch| touch.now);
            return Ok(());
        };
        let sites = collect::sites(tracer, pid)?;
        let counters = collect::counters(tracer, pid)?;
        let older = match (&mut traced.births, self.options.older_than) {
            (Some(births), _) => {
                Some(births.outstanding(tracer, &mut traced.census, census.objects.as_ref(), census_started_ns)?)
            }
            (None, Some(ms)) => Some(collect::outstanding_older_than(
                tracer,
                pid,
                collect::monotonic_now_ns().saturating_sub(ms * 1_000_000),
            )?),
            (None, None) => None,
        };
        let tracer = &*tracer;
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
            first_touch: None,
        };
        self.progress.clear();
        write_to(&mut self.outputs, &mut self.failed, &report);
        traced.previous = report.current;
        traced.history = report.history;
        traced.census_before = report.census.map(CensusChange::carried_on).unwrap_or_default();
        Ok(())
    }
}

/// Hands `report` to every output; one that fails is dropped, its failure
/// kept in `failed` (the first) or said on stderr (any later one).
fn write_to(outputs: &mut Vec<Output>, failed: &mut Option<anyhow::Error>, report: &Report) {
    write_each(outputs, failed, |writer| writer.write(report));
}

fn write_host_to(outputs: &mut Vec<Output>, failed: &mut Option<anyhow::Error>, report: &HostReport) {
    write_each(outputs, failed, |writer| writer.write_host(report));
}

fn write_each(
    outputs: &mut Vec<Output>,
    failed: &mut Option<anyhow::Error>,
    mut write: impl FnMut(&mut dyn Writer) -> io::Result<()>,
) {
    outputs.retain_mut(|output| match write(output.writer.as_mut()) {
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

/// `traced`'s resident pages by where they were first touched, against
/// `before`, the previous report's.
fn first_touch(tracer: &Tracer, traced: &mut Traced, before: Snapshot) -> Result<FirstTouch> {
    let pid = traced.info.pid;
    let places = collect::first_touch(tracer, pid)?;
    // Native places are instructions, which may lie in code mapped since.
    if places.iter().any(|(key, _)| key.ip != 0)
        && let Ok(map) = MemoryMap::read(pid)
    {
        traced.symbolizer.set_map(map);
    }
    let entries = places.into_iter().filter(|&(_, pages)| pages > 0).map(|(key, pages)| {
        let site = SiteKey { pid, layer: 0, caller: key.ip, native_stack: 0, python_stack: key.python_stack };
        (traced.symbolizer.traceback(&site, |_| None), Stat { size: pages * PAGE_SIZE, count: pages })
    });
    let now = Snapshot::from_entries(entries.collect::<Vec<_>>());
    let counters = collect::counters(tracer, pid)?;
    Ok(FirstTouch { now, before, counters: counters.first_touch().into_iter().map(|(n, v)| (n.into(), v)).collect() })
}

/// The pages first touch charges.
const PAGE_SIZE: u64 = 4096;

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
