//! Loads the kernel side, attaches a probe plan to one process, and tells
//! the kernel side which process to count and how. Dropping the `Tracer`
//! detaches everything; so does the kernel if memtrace dies, since every
//! probe lives only as long as its file descriptor.
//!
//! Detaching is slow on Linux 6.13 and later: each uprobe's removal waits
//! for an RCU tasks-trace grace period under the kernel's global
//! `event_mutex`, ~0.1 s each once the probes have fired (46 s for the 450
//! probes of Debian's python3.11). uprobe_multi links (one wait per link)
//! would fix it, but aya 0.14 cannot load a program for them; so memtrace
//! stops counting first, and the target only pays a breakpoint trap per
//! probe hit until the last probe is gone.

use std::num::NonZeroU32;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{
        ProgramError, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use memtrace_common::{KernelConfig, TargetConfig};

use super::plan::{AttachPoint, Program};

pub struct Tracer {
    pub(crate) ebpf: Ebpf,
}

impl Tracer {
    /// Loads and verifies the BPF programs. `max_allocs` sizes the map of
    /// live allocations. A program the verifier rejects is one line; its
    /// log, pages long, is printed only when `verbose`.
    pub fn load(kernel: KernelConfig, max_allocs: u32, verbose: bool) -> Result<Self> {
        let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace"));
        let mut ebpf = EbpfLoader::new()
            .override_global("KERNEL_CONFIG", &kernel, true)
            .map_max_entries("ALLOCS", max_allocs)
            .load(object)
            .context("cannot load memtrace's eBPF programs")?;
        for program in Program::ALL {
            let name = program.name();
            let probe: &mut UProbe =
                ebpf.program_mut(name).ok_or_else(|| anyhow!("eBPF object lacks program {name}"))?.try_into()?;
            match probe.load() {
                Ok(()) => {}
                Err(ProgramError::LoadError { io_error, verifier_log }) => {
                    if verbose {
                        eprintln!("memtrace: verifier log of {name}:\n{verifier_log}");
                    }
                    bail!("the kernel rejected eBPF program {name}: {io_error} (--verbose prints the verifier log)");
                }
                Err(e) => return Err(e).with_context(|| format!("cannot load eBPF program {name}")),
            }
        }
        Ok(Self { ebpf })
    }

    /// Attaches every point, scoped to `pid`: the kernel plants breakpoints
    /// only in that process, so others sharing its libc are not slowed.
    pub fn attach(&mut self, pid: u32, points: &[AttachPoint]) -> Result<()> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0 is not a process"))?);
        for point in points {
            let probe: &mut UProbe = self
                .ebpf
                .program_mut(point.program.name())
                .ok_or_else(|| anyhow!("eBPF object lacks program {}", point.program.name()))?
                .try_into()?;
            let at = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(point.file_offset),
                cookie: Some(point.cookie),
            };
            probe
                .attach(at, &point.host_path, scope)
                .with_context(|| format!("cannot attach to {} in {}", point.symbol, point.binary))?;
        }
        Ok(())
    }

    /// Starts (or changes) counting for `pid`. Called after attaching, so
    /// that counting starts with every probe in place.
    pub fn set_target(&mut self, pid: u32, config: &TargetConfig) -> Result<()> {
        let mut targets: HashMap<&mut MapData, u32, TargetConfig> =
            HashMap::try_from(self.ebpf.map_mut("TARGETS").ok_or_else(|| anyhow!("eBPF object lacks map TARGETS"))?)?;
        targets.insert(pid, config, 0).context("cannot configure the kernel side")?;
        Ok(())
    }

    /// Stops counting for `pid`: its probes return at once until detached.
    pub fn stop_counting(&mut self, pid: u32) -> Result<()> {
        let mut targets: HashMap<&mut MapData, u32, TargetConfig> =
            HashMap::try_from(self.ebpf.map_mut("TARGETS").ok_or_else(|| anyhow!("eBPF object lacks map TARGETS"))?)?;
        match targets.remove(&pid) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("cannot stop the kernel side"),
        }
    }
}
