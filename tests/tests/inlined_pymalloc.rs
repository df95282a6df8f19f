//! The finder of pymalloc's inlined copies against the binaries on this
//! machine: every copy in Debian's LTO python3.11, exactly, none in the
//! builds that call the allocator through its pointer (pyenv's, Debian's
//! libpython3.11), an accounting that notices a copy the patterns miss,
//! and probes at the sites found counting, through tracefs, what the
//! interpreter's own sys.getallocatedblocks() counts. Needs root (tracefs)
//! and the interpreters: their absence fails the test.

use std::{
    collections::BTreeMap,
    fs::{self, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use memtrace::{
    binary::{
        elf::ElfFile,
        x86::{Reg, Text},
    },
    probes::inlined::pymalloc_fast_path::{Guards, InlinedPymalloc, Matched, TakenAt, find},
    python::layouts,
};
use memtrace_tests::Target;

const DEBIAN_PYTHON311: &str = "/usr/bin/python3.11";

/// The inlined pops in Debian's python3.11 (3.11.2-6+deb12u6, build ID
/// 571d98e0...), as `vaddr:pool`: the sites whose probes
/// `sites_count_what_getallocatedblocks_counts` checks against
/// sys.getallocatedblocks().
const DEBIAN_PYTHON311_POPS: &str = "
    4fb148:rdx 4fb3a1:rdx 4fb482:rdx 4fbad5:r9 4fd4ab:rdx 4fe036:rdx 4fe82d:rax 4fecc9:rax 500107:rax 501f69:rax
    506161:rdx 506291:rax 506441:rax 5073bf:rdx 507e4b:rax 50825d:rax 50859b:rax 50958d:rdx 509772:rdx
    5099a8:rax 50d35d:rdx 50d592:rdx 50d8f7:rax 50f039:rdx 5100f0:rax 51420c:rax 514908:rax 51550f:rsi
    51650f:r10 5171b0:rax 518b93:rax 51ebbe:rax 520b41:rsi 522209:rax 5237da:rax 527d4b:rax 5281a1:rax
    5285f5:rax 52869f:rax 528717:rax 52add2:rax 533515:rdi 5395cf:rax 539e04:rax 53ce23:rax 54556f:rax
    549193:rax 551e65:rax 55250e:rax 554d17:rax 55587b:rdx 55625b:rax 55d295:rax 55d5bb:rax 55d8b5:rax
    55e4d2:rdx 563a98:rax 56404e:rax 5651e5:rax 566a96:rax 56900e:rax 56937a:rax 5702fd:rax 573e28:rax
    574f70:rax 5762a9:rax 577c94:rax 578f70:rax 579f05:rax 57cb5c:rax 57e54b:rax 57fef5:rax 58282d:rax
    583d51:rax 583ecc:rax 585102:rdx 589631:rdx 58ea35:rax 59382f:rsi 597222:rax 599d68:rax 59b7d7:rax
    59c412:rax 59efa5:rax 5a09bc:rax 5a2fd4:rdx 5a3115:rax 5a31e2:rax 5a3343:r8 5a3617:rcx 5a38ce:rcx 5a3bfb:rax
    5a3cce:rax 5a3d83:rax 5a3e46:rax 5a3f1e:rdx 5a43cc:rax 5a449f:rdx 5a455d:rax 5a461c:rax 5a5edd:rdx
    5a6695:rax 5a68f5:rax 5a6ef0:rax 5a77b5:rax 5a85e7:rax 5aac7b:rax 5aba4d:rax 5b0b31:rax 5b1111:rax
    5b1ac6:rax 5b47e5:rax 5b4fe2:rax 5b54cf:rax 5baf93:rdx 5bbefa:rdx 5bca1f:rdx 5bd18d:rdx 5bde4f:rax
    5be26e:rax 5bea61:rax 5bf729:rax 5bfc6b:rax 5c07ba:rax 5c1fda:rax 5c22b5:rdx 5ce60f:rax 5cfb77:rdx
    5d2142:rax 5d372b:rax 5d5995:rdx 5d72f8:rax 5defa3:rax 5e97f3:rax 5e9b49:rdx 5ea6d9:rax 5eb269:rax
    5eb2ff:rax 5ec1d5:rax 5ec33c:rax 5f0c47:rax 5f4a15:rax 5f4ab5:rax 5f4b55:rax 5f4bf5:rax 5f8deb:rax
    5f8ec5:rax 6008e7:rdx 600b99:rdx 600d52:rdx 6025ce:rdx 603675:rax 6057da:rax 605903:rax 605b7e:rax
    6093be:rax 60ec92:rax 60fb1b:rax 612788:rdx 6136a5:rax 613763:rax 613a8d:rax 6148c0:rax 616649:rax
    6166ee:rax 61e7d4:rax 61e983:rax 621395:rdx 621b5b:rax 6265df:rdx 629ba4:rdx";

/// The inlined pushes in the same binary, as `vaddr:block:pool`, checked
/// by the same test.
const DEBIAN_PYTHON311_PUSHES: &str = "
    5009e8:rdi:rsi 500ccb:rbx:rax 50105f:rsi:rax 506751:rdi:rax 506a08:rdi:rsi 507716:rsi:rax 50a2f0:rdi:rsi
    514e5b:rbx:rax 51f87c:rbx:rax 523a74:r15:rcx 53cf49:r14:rdi 53f7a7:rdi:rax 549292:rdx:rcx 554e78:r12:rax
    554eca:r12:rax 5563bf:r12:rdx 55b953:rbx:rax 5612ef:rdi:rax 5697c7:rbx:rax 575447:rbx:rdx 5756e7:rbx:rdx
    57ea4b:rbx:rax 584006:rbp:rsi 58c207:rbp:rax 58c306:rbx:rax 5936d8:rdx:rax 599422:rsi:rax 5994cc:rbx:rax
    59dc0b:rdi:rax 5a06ac:rbx:rax 5a0b26:r12:rax 5b6d46:rbx:rdx 5b96e0:rdi:rax 5b979b:rbx:rax 5b97c9:rbx:rax
    5bc728:rbx:rax 5c0b81:rdi:rax 5c0cb7:rdi:rax 5c0d01:rdi:rax 5cb230:rdi:rax 5cb5e9:rdi:rax 5ceeb9:rsi:rax
    5d41bb:rdi:rax 5df19f:rdi:r8 5df271:rdi:rsi 5ec476:rbp:rsi 60837b:rdi:rax 60844a:rdi:rax 61eabe:rbx:rsi";

/// Stores of a register to 8(%reg) with a load of 8(%reg) and another
/// store in the five instructions before: what a looser free pattern
/// takes for pushes. GC list unlinks (`_PyGCHead_SET_PREV`, keeping tag
/// bits), e.g. 0x50ca70, and stores whose
/// loaded value is not linked into the block, or that are relative to
/// rsp.
const NOT_PUSHES: [u64; 6] = [0x50ca70, 0x620e5f, 0x4285d1, 0x430910, 0x51bd0e, 0x44d749];

fn debian_python311() -> (ElfFile, InlinedPymalloc) {
    let elf = ElfFile::open(Path::new(DEBIAN_PYTHON311)).expect("Debian's python3.11 is installed");
    let found =
        find(&elf, &Text::decode(&elf).unwrap(), &layouts::PY311).expect("Debian's python3.11 inlines pymalloc");
    (elf, found)
}

#[test]
fn finds_every_inlined_copy_in_debian_python311() {
    let (_, found) = debian_python311();
    // 190 `cmp $_PyObject_Malloc,%reg` and one comparing the slot in memory.
    assert_eq!(found.guards, Guards { malloc: 191, calloc: 6, realloc: 15, free: 52 });
    assert_eq!(found.new_pool, 0x4fb540, "allocate_from_new_pool");
    let pops: Vec<String> = found.pops.iter().map(|s| format!("{:x}:{}", s.vaddr, s.pool.name())).collect();
    assert_eq!(pops, DEBIAN_PYTHON311_POPS.split_whitespace().collect::<Vec<_>>());
    let pushes: Vec<String> =
        found.pushes.iter().map(|s| format!("{:x}:{}:{}", s.vaddr, s.block.name(), s.pool.name())).collect();
    assert_eq!(pushes, DEBIAN_PYTHON311_PUSHES.split_whitespace().collect::<Vec<_>>());
    for vaddr in NOT_PUSHES {
        assert!(found.pushes.iter().all(|s| s.vaddr != vaddr), "{vaddr:#x} is not a push");
    }
    let request = |vaddr: u64| found.pops.iter().find(|p| p.vaddr == vaddr).unwrap().request;
    // _PyObject_GC_New's basic size, _PyLong_New's digits, and
    // PyUnicode_New's constant-size empty string, whose request was folded.
    assert_eq!(request(0x4fb148), Some(Reg::R12));
    assert_eq!(request(0x509772), Some(Reg::Rbp));
    assert_eq!(request(0x5a3115), None);
    // The other 59 take their pool from a constant slot of `usedpools`:
    // a size fixed at compile time, folded into its class.
    assert_eq!(found.pops.iter().filter(|p| p.request.is_some()).count(), 112);
    // Probed past the pop, at the `je` taken when the pool's free list ran
    // out, with the block in the register it was loaded into: all but the
    // 13 in functions that dispatch through jump tables memtrace cannot
    // read, whose targets could land inside the pop (those keep the
    // single-stepped increment). The eval loop's computed gotos are read
    // (256 entries: the opcode is a byte); a switch whose range check is on
    // memory (`cmpl $N,8(%rsi); ja; mov 8(%rsi),%edx`) is not followed.
    let taken = |vaddr: u64| found.pops.iter().find(|p| p.vaddr == vaddr).unwrap().taken;
    assert_eq!(taken(0x4fb3a1), Some(TakenAt { vaddr: 0x4fb3ae, block: Reg::Rax, request: Some(Reg::Rbx) }));
    assert_eq!(taken(0x4fb148).map(|t| t.request), Some(Some(Reg::R12)));
    assert_eq!(taken(0x533515).map(|t| t.vaddr), Some(0x533522), "in _PyEval_EvalFrameDefault");
    assert_eq!(taken(0x54556f), None, "in a function with a switch memtrace cannot bound");
    assert_eq!(found.pops.iter().filter(|p| p.taken.is_some()).count(), 158);
}

#[test]
fn pointer_called_builds_have_no_inlined_copies() {
    let mut binaries: Vec<String> = ["3.8.18", "3.9.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0"]
        .iter()
        .map(|v| {
            let minor = &v[..v.rfind('.').unwrap()];
            format!("/root/.pyenv/versions/{v}/lib/libpython{minor}.so.1.0")
        })
        .collect();
    binaries.push("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0".into());
    for path in binaries {
        let elf = ElfFile::open(Path::new(&path)).unwrap_or_else(|e| panic!("{path}: {e:#}"));
        assert!(elf.symbol("PyObject_Malloc").is_some(), "{path} is a CPython");
        let minor: u8 = path.split("python3.").nth(1).unwrap().split('.').next().unwrap().parse().unwrap();
        let layout = layouts::layout_for(3, minor).unwrap();
        assert_eq!(find(&elf, &Text::decode(&elf).unwrap(), layout), None, "{path}");
    }
}

/// The accounting is what keeps a copy the patterns miss from going
/// unnoticed: without any one pop, or any one push but four, `find`
/// gives up. Those four are second copies in loops, reached by a back
/// edge after a first copy that the same guard leads to.
#[test]
fn a_missed_copy_makes_find_give_up() {
    let elf = ElfFile::open(Path::new(DEBIAN_PYTHON311)).unwrap();
    let text = Text::decode(&elf).unwrap();
    let matched = Matched::new(&elf, &text, &layouts::PY311).unwrap();
    assert!(matched.account().is_some());
    for pop in matched.pops() {
        assert_eq!(matched.account_without(pop), None, "without the pop at {pop:#x}");
    }
    let unnoticed: Vec<u64> =
        matched.pushes().into_iter().filter(|&push| matched.account_without(push).is_some()).collect();
    assert_eq!(unnoticed, [0x554eca, 0x5756e7, 0x5b97c9, 0x5c0d01]);
}

const TRACEFS: &str = "/sys/kernel/tracing";
/// CPython 3.11's POOL_SIZE.
const POOL_MASK: u64 = !(16 * 1024 - 1);
/// Rounds of the workload: each keeps about 22 blocks and allocates
/// about 45, through 37 of the sites.
const ROUNDS: u64 = 5_000;
/// Marks the measured window in the trace (through the instance's
/// trace_marker) right next to the interpreter's own counts. Every
/// request stays within 512 bytes (larger ones go to libc, which
/// sys.getallocatedblocks() counts and these sites do not), but for the
/// item array of `keep`, one block.
const WORKLOAD: &str = r#"
import os, sys
keep = []
print("ready", flush=True)
sys.stdin.readline()
marker = os.open(sys.argv[1], os.O_WRONLY)
n = int(sys.argv[2])
before = sys.getallocatedblocks(); os.write(marker, b"begin")
for i in range(n):
    keep.append((
        os.urandom(100), str(i), b"%d" % i, "x" * (i % 400), bytearray(i % 300),
        {i: i, "k": str(i)}, [i, i], {i}, frozenset((i,)), (i, str(i)).__repr__(),
        i * 0.5, int(str(i)) << 70, [j for j in range(i % 40)], sorted(range(i % 20, 0, -1)),
    ))
os.write(marker, b"end"); after = sys.getallocatedblocks()
print(after - before, flush=True)
"#;

/// The register's name in uprobe_events' fetch arguments: the legacy
/// registers' without the `r` (`%di`), r8 to r15 as they are.
fn tracefs_register(reg: Reg) -> &'static str {
    if reg.number() < 8 { &reg.name()[1..] } else { reg.name() }
}

/// uprobe events of one group, enabled in a tracing instance of their
/// own (its own buffer, clock and pid filter), removed on drop, also
/// when the test fails.
struct Tracing {
    group: String,
    events: Vec<String>,
    instance: PathBuf,
}

impl Tracing {
    fn new() -> Self {
        if !Path::new(TRACEFS).join("uprobe_events").exists() {
            let status = Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]).status().unwrap();
            assert!(status.success(), "cannot mount tracefs on {TRACEFS}");
        }
        let group = format!("memtrace_inlined_{}", std::process::id());
        let instance = Path::new(TRACEFS).join("instances").join(&group);
        fs::create_dir(&instance).expect("tracing instance");
        Self { group, events: Vec::new(), instance }
    }

    /// Adds a probe to `event`. Probes of one event (same argument names
    /// and types) are unregistered together: the kernel waits for RCU
    /// once per event, ~50 ms here, when disabling 221 single-probe
    /// events took 12 s.
    fn probe(&mut self, kind: char, event: &str, binary: &str, offset: u64, args: &str) {
        let spec = format!("{kind}:{}/{event} {binary}:{offset:#x} {args}\n", self.group);
        let mut events = OpenOptions::new().append(true).open(Path::new(TRACEFS).join("uprobe_events")).unwrap();
        events.write_all(spec.as_bytes()).unwrap_or_else(|e| panic!("{spec}: {e}"));
        if !self.events.iter().any(|e| e == event) {
            self.events.push(event.to_owned());
        }
    }

    fn write(&self, file: &str, value: &str) {
        fs::write(self.instance.join(file), value).unwrap_or_else(|e| panic!("{file}: {e}"));
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.instance.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    fn enable(&self, pid: u32) {
        self.write("buffer_size_kb", "65536");
        self.write("trace_clock", "mono");
        self.write("set_event_pid", &pid.to_string());
        self.write(&format!("events/{}/enable", self.group), "1");
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        // The kernel keeps events that an instance has enabled.
        let _ = fs::write(self.instance.join(format!("events/{}/enable", self.group)), "0");
        let _ = fs::remove_dir(&self.instance);
        if let Ok(mut events) = OpenOptions::new().append(true).open(Path::new(TRACEFS).join("uprobe_events")) {
            for event in &self.events {
                let _ = events.write_all(format!("-:{}/{event}\n", self.group).as_bytes());
            }
        }
    }
}

/// What the probes saw between the workload's markers.
#[derive(Debug, Default)]
struct Seen {
    pops: u64,
    new_pool: u64,
    pushes: u64,
    /// Hits whose block is not in the pool they name: a wrong site.
    strays: u64,
    /// Hits by site.
    by_site: BTreeMap<String, u64>,
}

fn parse(trace: &str) -> Seen {
    let mut seen = Seen::default();
    let mut inside = false;
    for line in trace.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, rest)) = line.split_once(": ") else { continue };
        let Some((event, payload)) = rest.split_once(": ") else { continue };
        match (event, payload.trim()) {
            ("tracing_mark_write", "begin") => inside = true,
            ("tracing_mark_write", "end") => inside = false,
            _ if inside => {
                let arg = |key: &str| {
                    payload
                        .split_whitespace()
                        .find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
                        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
                        .unwrap_or_else(|| panic!("no {key} in {line}"))
                };
                // "(0x4fb148)", or "(<return address> <- 0x4fb540)".
                let site = payload.split(')').next().unwrap_or_default().rsplit(['(', ' ']).next();
                *seen.by_site.entry(format!("{event} {}", site.unwrap_or_default())).or_default() += 1;
                if event == "new_pool" {
                    seen.new_pool += u64::from(arg("block") != 0);
                } else if arg("block") & POOL_MASK != arg("pool") {
                    seen.strays += 1;
                } else if event == "pop" {
                    seen.pops += 1;
                } else {
                    seen.pushes += 1;
                }
            }
            _ => {}
        }
    }
    seen
}

/// The important check: probes at exactly these sites (and a return
/// probe on allocate_from_new_pool) count the blocks the interpreter
/// itself counts, and every hit names a block of its pool.
#[test]
fn sites_count_what_getallocatedblocks_counts() {
    let (elf, found) = debian_python311();
    let offset = |vaddr| elf.file_offset(vaddr).expect("sites are in the file");
    let mut tracing = Tracing::new();
    for pop in &found.pops {
        let pool = tracefs_register(pop.pool);
        let args = format!("pool=%{pool}:x64 block=+8(%{pool}):x64");
        tracing.probe('p', "pop", DEBIAN_PYTHON311, offset(pop.vaddr), &args);
    }
    for push in &found.pushes {
        let args = format!("block=%{}:x64 pool=%{}:x64", tracefs_register(push.block), tracefs_register(push.pool));
        tracing.probe('p', "push", DEBIAN_PYTHON311, offset(push.vaddr), &args);
    }
    tracing.probe('r', "new_pool", DEBIAN_PYTHON311, offset(found.new_pool), "block=$retval:x64");

    let marker = tracing.instance.join("trace_marker");
    let mut workload = Target::spawn(Command::new(DEBIAN_PYTHON311).args([
        "-c",
        WORKLOAD,
        marker.to_str().unwrap(),
        &ROUNDS.to_string(),
    ]));
    workload.expect_line("ready");
    tracing.enable(workload.pid());
    workload.send("go");
    // The block delta is the workload's only line after "ready".
    let delta: i64 = workload.expect_line_prefix("").parse().expect("the workload prints its block delta");
    assert!(workload.finish().success());
    tracing.write("tracing_on", "0");

    for cpu in fs::read_dir(tracing.instance.join("per_cpu")).unwrap() {
        let stats = fs::read_to_string(cpu.unwrap().path().join("stats")).unwrap();
        assert!(stats.contains("\noverrun: 0\n") && stats.contains("dropped events: 0"), "lost events: {stats}");
    }
    let seen = parse(&tracing.read("trace"));
    let counted = (seen.pops + seen.new_pool) as i64 - seen.pushes as i64;
    eprintln!(
        "getallocatedblocks delta {delta}; pops {} + new_pool {} - pushes {} = {counted}; strays {}; {} of {} sites hit",
        seen.pops,
        seen.new_pool,
        seen.pushes,
        seen.strays,
        seen.by_site.len(),
        found.pops.len() + found.pushes.len() + 1,
    );
    assert!(delta >= 20 * ROUNDS as i64, "the workload keeps what it allocates");
    assert_eq!(seen.strays, 0);
    assert!((counted - delta).abs() * 1000 <= delta, "probes count {counted}, the interpreter {delta}");
}
