//! Loads the kernel side, attaches probe plans to processes, and tells the
//! kernel side which processes to count and how; forgets a process whose
//! image is gone. Dropping the `Tracer` detaches everything; so does the
//! kernel if memtrace dies, since every probe lives only as long as its
//! file descriptor. The fork and exec tracepoints (see the kernel side's
//! `lifecycle`) are attached once, at load, for every traced process (in
//! host mode, for every process).
//!
//! Probes are attached as uprobe_multi links (Linux 6.6): one link per
//! program and binary, holding every offset with its cookie. Detaching a
//! uprobe waits for an RCU tasks-trace grace period, ~0.1 s on 6.13 and
//! later once probes have fired, and perf-event uprobes pay it one probe at
//! a time under the kernel's global `event_mutex` (46 s for the 450 probes
//! of Debian's python3.11); a multi link pays it once. aya 0.14 cannot load
//! a program for uprobe_multi, so aya creates the maps and this module loads
//! the programs itself, from the same object relocated against those maps.

use std::{
    collections::{BTreeMap, HashSet},
    ffi::CString,
    io, mem,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, PerCpuHashMap, PerCpuValues},
    programs::{RawTracePoint, TracePoint},
    util::nr_cpus,
};
use aya_obj::{
    btf::BtfFeatures,
    generated::{BPF_F_UPROBE_MULTI_RETURN, bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type},
};
use memtrace_common::{
    AllocInfo, AllocKey, CounterSet, KernelConfig, NativeStack, PageKey, PythonStack, SiteKey, SiteStats, StackKey,
    TargetConfig, TouchKey, TouchState, UnwindKey, UnwindRule, WatchedType, WatchedTypeKey, map_name,
};

use super::plan::{AttachPoint, ProbeKind, Program};

/// `BPF_TRACE_UPROBE_SESSION` of Linux 6.13's `enum bpf_attach_type`,
/// which aya-obj's bindings predate.
const BPF_TRACE_UPROBE_SESSION: u32 = 57;

/// The kernel side, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace"));

/// The kernel side's raw tracepoints: each program is named after its
/// tracepoint.
const TRACEPOINTS: [&str; 3] = ["task_newtask", "sched_process_exec", "sched_process_exit"];

/// What the kernel side is loaded for.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    /// Probes on chosen processes, with room for `max_allocs` live blocks.
    Probes { max_allocs: u32 },
    /// The free tier (host mode, `--census-only`): no allocation probe, so
    /// the maps of live blocks and sites are left at one entry (a
    /// preallocated ALLOCS would pin ~100 MiB of kernel memory for
    /// nothing); page faults charged to where they were first touched; and
    /// with `every_process` (host mode), every process's forks, execs and
    /// exits announced. With `escalate` (`--escalate`), also the programs
    /// that trace one process at a time, with room for that many blocks.
    Free { every_process: bool, escalate: Option<u32> },
}

/// The free tier's first-touch programs: the page-fault tracepoint, and the
/// system calls that give pages back (program, syscalls tracepoint). The
/// syscall tracepoints are read through tracefs, root's: kprobes would need
/// CONFIG_KPROBE_EVENTS, which kernels like this project's lack.
const FIRST_TOUCH_FAULTS: &str = "page_fault_user";
const FIRST_TOUCH_RELEASES: [(&str, &str); 2] =
    [("touch_munmap", "sys_enter_munmap"), ("touch_madvise", "sys_enter_madvise")];

/// Host mode's process ring: about 3,000 events (an exec's carries its
/// command line), so that a burst of short-lived processes (a shell loop,
/// a build) is not lost while userspace reads.
const HOST_PROCESS_RING: u32 = 1 << 20;

pub struct Tracer {
    /// Each process's probes. Declared first so that the links go before
    /// the programs.
    links: BTreeMap<u32, Vec<OwnedFd>>,
    programs: BTreeMap<Program, OwnedFd>,
    pub(crate) ebpf: Ebpf,
}

impl Tracer {
    /// Creates the maps and loads and verifies the BPF programs (for host
    /// mode, its tracepoints only). A program the verifier rejects is
    /// one line; its log, pages long, is printed only when `verbose`, which
    /// also turns on the kernel side's own diagnostics (aya-log).
    pub fn load(kernel: KernelConfig, purpose: Purpose, verbose: bool) -> Result<Self> {
        // aya-log's levels: 0 is off; 2 is warnings and worse.
        let log_level: u8 = if verbose { 2 } else { 0 };
        let every_process = u32::from(matches!(purpose, Purpose::Free { every_process: true, .. }));
        let mut loader = EbpfLoader::new();
        loader
            .override_global("KERNEL_CONFIG", &kernel, true)
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .override_global("WATCH_EVERY_PROCESS", &every_process, true);
        match purpose {
            Purpose::Probes { max_allocs } => loader.map_max_entries(map_name::ALLOCS, max_allocs),
            Purpose::Free { escalate: Some(max_allocs), .. } => loader
                .map_max_entries(map_name::ALLOCS, max_allocs)
                .map_max_entries(map_name::PROCESS_EVENTS, HOST_PROCESS_RING),
            Purpose::Free { escalate: None, .. } => loader
                .map_max_entries(map_name::ALLOCS, 1)
                .map_max_entries(map_name::SITES, 1)
                .map_max_entries(map_name::PROCESS_EVENTS, HOST_PROCESS_RING),
        };
        let mut ebpf = loader.load(OBJECT).context("cannot load memtrace's eBPF maps")?;
        let programs = match purpose {
            Purpose::Probes { .. } | Purpose::Free { escalate: Some(_), .. } => load_programs(&ebpf, OBJECT, verbose)?,
            Purpose::Free { escalate: None, .. } => BTreeMap::new(),
        };
        if let Purpose::Free { .. } = purpose {
            attach_first_touch(&mut ebpf)?;
        }
        // Kept attached by the object, which owns the links.
        for name in TRACEPOINTS {
            let program: &mut RawTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("eBPF object lacks program {name}"))?
                .try_into()
                .with_context(|| format!("eBPF program {name} is not a raw tracepoint"))?;
            program.load().with_context(|| format!("the kernel rejected eBPF program {name}"))?;
            program.attach(name).with_context(|| format!("cannot attach to tracepoint {name}"))?;
        }
        Ok(Self { links: BTreeMap::new(), programs, ebpf })
    }

    /// Attaches every point, scoped to `pid`: the kernel plants breakpoints
    /// only in that process, so others sharing its libc are not slowed.
    /// Links are made in the plan's order (return probes first).
    pub fn attach(&mut self, pid: u32, points: &[AttachPoint]) -> Result<()> {
        let mut links: Vec<((Program, &str), Vec<&AttachPoint>)> = Vec::new();
        for point in points {
            let key = (point.program, point.binary.as_str());
            match links.iter_mut().find(|(k, _)| *k == key) {
                Some((_, group)) => group.push(point),
                None => links.push((key, vec![point])),
            }
        }
        for ((program, binary), group) in links {
            let prog = self.programs.get(&program).ok_or_else(|| match program.kind() {
                ProbeKind::Session => {
                    anyhow!("this kernel has no uprobe sessions (Linux 6.13 or later), which --type of a class needs")
                }
                _ => anyhow!("program {} not loaded", program.name()),
            })?;
            let link = link_uprobe_multi(prog.as_raw_fd(), program.kind(), pid, &group)
                .with_context(|| format!("cannot attach {} probes to {binary}", program.name()))?;
            self.links.entry(pid).or_default().push(link);
        }
        Ok(())
    }

    /// Starts (or changes) counting for `pid`. Called after attaching, so
    /// that counting starts with every probe in place. The process's
    /// counters are created first: programs count only processes that have
    /// them, and never create them.
    pub fn set_target(&mut self, pid: u32, config: &TargetConfig) -> Result<()> {
        let mut counters: PerCpuHashMap<&mut MapData, u32, CounterSet> =
            PerCpuHashMap::try_from(self.map_mut(map_name::COUNTERS)?)?;
        if counters.get(&pid, 0).is_err() {
            let cpus = nr_cpus().map_err(|(_, e)| anyhow!("cannot count the CPUs: {e}"))?;
            let zeroes = PerCpuValues::try_from(vec![CounterSet::default(); cpus])?;
            counters.insert(pid, zeroes, 0).context("cannot create the process's counters")?;
        }
        let mut targets: HashMap<&mut MapData, u32, TargetConfig> =
            HashMap::try_from(self.map_mut(map_name::TARGETS)?)?;
        targets.insert(pid, config, 0).context("cannot configure the kernel side")?;
        Ok(())
    }

    /// Detaches `pid`'s probes and drops everything the kernel side keeps
    /// of it: its configuration, counters, live blocks, sites, stacks and
    /// unwind rules. For a process that exited, or whose image an exec
    /// replaced (its records then describe memory that no longer exists).
    /// How many times memtrace's probe programs have run, all processes
    /// together, while the kernel keeps run counts (BPF_ENABLE_STATS, see
    /// aya::sys::enable_stats); read from /proc/self/fdinfo, where the
    /// kernel prints each program descriptor's `run_cnt`.
    pub fn probe_hits(&self) -> u64 {
        let run_count = |fd: &OwnedFd| {
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
            info.lines().find_map(|l| l.strip_prefix("run_cnt:")?.trim().parse::<u64>().ok())
        };
        self.programs.values().filter_map(run_count).sum()
    }

    pub fn forget(&mut self, pid: u32) -> Result<()> {
        self.links.remove(&pid);
        HashMap::<_, u32, TargetConfig>::try_from(self.map_mut(map_name::TARGETS)?)?.remove(&pid).ok();
        PerCpuHashMap::<_, u32, CounterSet>::try_from(self.map_mut(map_name::COUNTERS)?)?.remove(&pid).ok();
        self.forget_entries::<AllocKey, AllocInfo>(map_name::ALLOCS, |k| k.pid == pid)?;
        self.forget_entries::<SiteKey, SiteStats>(map_name::SITES, |k| k.pid == pid)?;
        self.forget_entries::<StackKey, NativeStack>(map_name::NATIVE_STACKS, |k| k.pid == pid)?;
        self.forget_entries::<StackKey, PythonStack>(map_name::PYTHON_STACKS, |k| k.pid == pid)?;
        self.forget_entries::<UnwindKey, UnwindRule>(map_name::UNWIND_RULES, |k| k.pid == pid)?;
        HashMap::<_, u32, TouchState>::try_from(self.map_mut(map_name::FIRST_TOUCH_STATE)?)?.remove(&pid).ok();
        self.forget_entries::<PageKey, TouchKey>(map_name::FIRST_TOUCH_PAGES, |k| k.pid == pid)?;
        self.forget_entries::<TouchKey, u64>(map_name::FIRST_TOUCH_SITES, |k| k.pid == pid)?;
        self.forget_entries::<WatchedTypeKey, WatchedType>(map_name::WATCHED_TYPES, |k| k.pid == pid)?;
        Ok(())
    }

    /// `--type`: counts the births of objects of the type at `type_object`
    /// in `pid`, each `sizes` big.
    pub fn watch_type(&mut self, pid: u32, type_object: u64, sizes: WatchedType) -> Result<()> {
        let mut map: HashMap<&mut MapData, WatchedTypeKey, WatchedType> =
            HashMap::try_from(self.map_mut(map_name::WATCHED_TYPES)?)?;
        map.insert(WatchedTypeKey { pid, _pad: 0, type_object }, sizes, 0).context("cannot watch the type")
    }

    /// `--type`: drops the records of births whose objects died, each
    /// given with its birth time. A record a new birth replaced since (it
    /// has another time) stays; one replaced between that check and the
    /// removal, a window of one system call, goes.
    pub fn forget_births(&mut self, pid: u32, dead: &[(AllocKey, u64)]) -> Result<()> {
        let mut map: HashMap<&mut MapData, AllocKey, AllocInfo> = HashMap::try_from(self.map_mut(map_name::ALLOCS)?)?;
        for (key, born_ns) in dead.iter().filter(|(k, _)| k.pid == pid) {
            if map.get(key, 0).is_ok_and(|info| info.timestamp_ns == *born_ns) {
                map.remove(key).ok();
            }
        }
        Ok(())
    }

    /// Starts charging `pid`'s new resident pages to where they were first
    /// touched, walking its Python stacks as `config` says.
    pub fn start_first_touch(&mut self, pid: u32, config: &TargetConfig) -> Result<()> {
        let mut state: HashMap<&mut MapData, u32, TouchState> =
            HashMap::try_from(self.map_mut(map_name::FIRST_TOUCH_STATE)?)?;
        state.insert(pid, TouchState::default(), 0).context("cannot start first-touch accounting")?;
        self.set_target(pid, config)
    }

    /// Removes the entries of hash map `name` whose key `matches`; keys are
    /// listed first, since deleting while iterating restarts the iteration.
    fn forget_entries<K: aya::Pod, V: aya::Pod>(&mut self, name: &str, matches: impl Fn(&K) -> bool) -> Result<()> {
        let mut map: HashMap<&mut MapData, K, V> = HashMap::try_from(self.map_mut(name)?)?;
        let keys: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| matches(k)).collect();
        for key in keys {
            // Already gone is as good as removed.
            map.remove(&key).ok();
        }
        Ok(())
    }

    /// Adds unwind rules for code of `pid`, each at its address in the
    /// process, replacing any there. Stops at the first rule the map
    /// refuses (it is full): returns how many went in.
    pub fn add_unwind_rules(&mut self, pid: u32, rules: impl IntoIterator<Item = (u64, UnwindRule)>) -> Result<usize> {
        let mut map: HashMap<&mut MapData, UnwindKey, UnwindRule> =
            HashMap::try_from(self.map_mut(map_name::UNWIND_RULES)?)?;
        let mut added = 0;
        for (pc, rule) in rules {
            if map.insert(UnwindKey { pid, _pad: 0, pc }, rule, 0).is_err() {
                break;
            }
            added += 1;
        }
        Ok(added)
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf.map_mut(name).ok_or_else(|| anyhow!("eBPF object lacks map {name}"))
    }

    /// The kernel side's diagnostics (`--verbose`), read by aya-log into
    /// the `log` crate. Taken out of the tracer, so the session can wait on it.
    pub fn take_logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("cannot read the kernel side's log")
    }
}

/// Loads and attaches the free tier's first-touch programs; they stay
/// attached as long as the object.
fn attach_first_touch(ebpf: &mut Ebpf) -> Result<()> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(FIRST_TOUCH_FAULTS)
        .ok_or_else(|| anyhow!("eBPF object lacks program {FIRST_TOUCH_FAULTS}"))?
        .try_into()
        .context("the page-fault program is not a raw tracepoint")?;
    program.load().context("the kernel rejected the page-fault program")?;
    program.attach(FIRST_TOUCH_FAULTS).context("cannot attach to tracepoint page_fault_user")?;
    for (name, function) in FIRST_TOUCH_RELEASES {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("eBPF object lacks program {name}"))?
            .try_into()
            .with_context(|| format!("eBPF program {name} is not a tracepoint"))?;
        program.load().with_context(|| format!("the kernel rejected eBPF program {name}"))?;
        program
            .attach("syscalls", function)
            .with_context(|| format!("cannot attach to tracepoint syscalls:{function}"))?;
    }
    Ok(())
}

/// Loads each of memtrace's programs for uprobe_multi links, relocated
/// against the maps aya created from the same object.
fn load_programs(ebpf: &Ebpf, object: &[u8], verbose: bool) -> Result<BTreeMap<Program, OwnedFd>> {
    let mut obj = aya_obj::Object::parse(object).context("cannot parse memtrace's eBPF object")?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|&(section, _)| section).collect();
    let maps = obj.maps.clone();
    let fds =
        maps.keys().map(|name| Ok((name.as_str(), map_fd(ebpf, name)?))).collect::<Result<Vec<(&str, OwnedFd)>>>()?;
    obj.relocate_maps(fds.iter().map(|(name, fd)| (*name, fd.as_raw_fd(), &maps[*name])), &text_sections)
        .context("cannot relocate memtrace's eBPF maps")?;
    obj.relocate_calls(&text_sections).context("cannot relocate memtrace's eBPF calls")?;
    let btf = load_btf(&mut obj)?;
    let license = CString::new(obj.license.as_bytes()).context("eBPF license")?;
    let mut programs = BTreeMap::new();
    for program in Program::ALL {
        let name = program.name();
        let prog = obj.programs.get(name).ok_or_else(|| anyhow!("eBPF object lacks program {name}"))?;
        let function = &obj.functions[&prog.function_key()];
        let load = |log| load_program(name, program.kind(), function, &license, btf.as_ref(), log);
        let fd = match load(None) {
            Ok(fd) => fd,
            // Uprobe sessions came with Linux 6.13; only --type needs one,
            // and says so when it is missing (see `attach`).
            Err(_) if program.kind() == ProbeKind::Session => continue,
            Err(io_error) => {
                if verbose {
                    let mut log = vec![0u8; 16 << 20];
                    let _ = load(Some(&mut log));
                    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                    eprintln!("memtrace: verifier log of {name}:\n{}", String::from_utf8_lossy(&log[..end]));
                }
                bail!("the kernel rejected eBPF program {name}: {io_error} (--verbose prints the verifier log)");
            }
        };
        programs.insert(program, fd);
    }
    Ok(programs)
}

/// A new descriptor of map `name`, duplicated from the one aya created it
/// with. Reopening it by its kernel id instead would need CAP_SYS_ADMIN,
/// which the documented CAP_BPF+CAP_PERFMON+CAP_SYS_PTRACE lacks.
fn map_fd(ebpf: &Ebpf, name: &str) -> Result<OwnedFd> {
    let data = match ebpf.map(name).ok_or_else(|| anyhow!("aya did not create map {name}"))? {
        Map::Array(data)
        | Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)
        | Map::RingBuf(data) => data,
        other => bail!("map {name} has a type memtrace does not use: {other:?}"),
    };
    data.fd().as_fd().try_clone_to_owned().with_context(|| format!("cannot duplicate map {name}'s descriptor"))
}

/// The bpf(2) system call.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, zero-initialised-then-filled bpf_attr of the
    // size passed; every pointer in it outlives the call.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut bpf_attr, mem::size_of::<bpf_attr>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The object's BTF, loaded into the kernel: the verifier wants each
/// function's BTF (func_info) once a program has subprograms, as the
/// `bpf_loop` callbacks are.
fn load_btf(obj: &mut aya_obj::Object) -> Result<Option<OwnedFd>> {
    // Linux 6.6 and later, which uprobe_multi needs, have every BTF feature.
    let features = BtfFeatures::new(true, true, true, true, true, true, true, true);
    let Some(btf) = obj.fixup_and_sanitize_btf(&features).context("cannot prepare memtrace's BTF")? else {
        return Ok(None);
    };
    let bytes = btf.to_bytes();
    // SAFETY: bpf_attr is plain data; all zeroes is its "unset" state.
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    // SAFETY: writing the BTF-load member of the union we zeroed.
    let load = unsafe { &mut attr.__bindgen_anon_7 };
    load.btf = bytes.as_ptr() as u64;
    load.btf_size = bytes.len() as u32;
    bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr).map(Some).context("the kernel rejected memtrace's BTF")
}

/// BPF_PROG_LOAD of a kprobe-type program for uprobe_multi links, with the
/// verifier's log into `log` when given.
fn load_program(
    name: &str,
    kind: ProbeKind,
    function: &aya_obj::Function,
    license: &CString,
    btf: Option<&OwnedFd>,
    log: Option<&mut [u8]>,
) -> io::Result<OwnedFd> {
    let insns: &[bpf_insn] = &function.instructions;
    let func_info = function.func_info.func_info_bytes();
    let line_info = function.line_info.line_info_bytes();
    // SAFETY: bpf_attr is plain data; all zeroes is its "unset" state.
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    // SAFETY: writing the prog-load member of the union we zeroed.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32;
    load.expected_attach_type = attach_type(kind);
    load.insns = insns.as_ptr() as u64;
    load.insn_cnt = insns.len() as u32;
    load.license = license.as_ptr() as u64;
    for (slot, byte) in load.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte as libc::c_char;
    }
    if let Some(btf) = btf {
        load.prog_btf_fd = btf.as_raw_fd() as u32;
        if function.func_info_rec_size > 0 {
            load.func_info = func_info.as_ptr() as u64;
            load.func_info_cnt = function.func_info.len() as u32;
            load.func_info_rec_size = function.func_info_rec_size as u32;
        }
        if function.line_info_rec_size > 0 {
            load.line_info = line_info.as_ptr() as u64;
            load.line_info_cnt = function.line_info.len() as u32;
            load.line_info_rec_size = function.line_info_rec_size as u32;
        }
    }
    if let Some(log) = log {
        load.log_level = 1;
        load.log_buf = log.as_mut_ptr() as u64;
        load.log_size = log.len() as u32;
    }
    bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
}

/// One uprobe_multi link of program `prog` on every point of `group` (one
/// binary), each with its cookie, in process `pid` only.
fn link_uprobe_multi(prog: RawFd, kind: ProbeKind, pid: u32, group: &[&AttachPoint]) -> io::Result<OwnedFd> {
    let path = CString::new(group[0].host_path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))?;
    let offsets: Vec<u64> = group.iter().map(|p| p.file_offset).collect();
    let cookies: Vec<u64> = group.iter().map(|p| p.cookie).collect();
    // SAFETY: bpf_attr is plain data; all zeroes is its "unset" state.
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    // SAFETY: writing the link-create member of the union we zeroed.
    let create = unsafe { &mut attr.link_create };
    create.__bindgen_anon_1.prog_fd = prog as u32;
    create.attach_type = attach_type(kind);
    // SAFETY: writing the uprobe_multi member of the union we zeroed.
    let multi = unsafe { &mut create.__bindgen_anon_3.uprobe_multi };
    multi.path = path.as_ptr() as u64;
    multi.offsets = offsets.as_ptr() as u64;
    multi.cookies = cookies.as_ptr() as u64;
    multi.cnt = offsets.len() as u32;
    multi.flags = if kind == ProbeKind::Return { BPF_F_UPROBE_MULTI_RETURN } else { 0 };
    multi.pid = pid;
    bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
}

/// A session program is loaded and linked as one; the others as
/// uprobe_multi programs, entry or return by the link's flag.
fn attach_type(kind: ProbeKind) -> u32 {
    match kind {
        ProbeKind::Session => BPF_TRACE_UPROBE_SESSION,
        ProbeKind::Entry | ProbeKind::Return => bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Userspace opens maps by the names memtrace-common gives; each must
    /// be a map of the object the kernel side built.
    #[test]
    fn every_shared_map_name_is_in_the_object() {
        let obj = aya_obj::Object::parse(OBJECT).unwrap();
        for name in map_name::ALL {
            assert!(obj.maps.contains_key(name), "no map {name} in the eBPF object: {:?}", obj.maps.keys());
        }
        for program in Program::ALL {
            assert!(obj.programs.contains_key(program.name()), "no program {}", program.name());
        }
        for name in TRACEPOINTS {
            assert!(obj.programs.contains_key(name), "no program {name}");
        }
    }
}
