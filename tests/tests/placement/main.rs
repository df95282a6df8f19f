//! Probe placement on the platform's binaries: each function embedded in
//! `fixtures` gets its expected placement, and is read from the files on this machine
//! (Debian 12's glibc and python3.11, pyenv's CPython builds), which must
//! still hold the embedded bytes, and the x86 layer's decoding and the
//! placement's emulated flag are checked against objdump's listing of
//! them. The binaries and objdump are part of the platform memtrace
//! supports: their absence fails the test.

mod fixtures;

use std::{path::Path, process::Command};

use fixtures::{BINARIES, GLIBC, PYENV_3_12_1, hex};
use memtrace::{
    binary::{
        elf::ElfFile,
        x86::{self, Reg},
    },
    probes::placement::{KERNEL_NOPS, MAX_BYTES, MAX_INSNS, at_entry, entry_only},
};

/// One line of `objdump -d`: offset from the function's start, bytes, text.
struct Line {
    offset: usize,
    bytes: Vec<u8>,
    text: String,
}

fn objdump(path: &str, vaddr: u64, len: usize) -> Option<Vec<Line>> {
    let (start, stop) = (format!("--start-address={vaddr:#x}"), format!("--stop-address={:#x}", vaddr + len as u64));
    let out = Command::new("objdump").args(["-d", "-w", &start, &stop, path]).output().ok()?;
    let listing = String::from_utf8(out.stdout).ok()?;
    let lines = listing.lines().filter_map(|line| {
        let (address, rest) = line.trim_start().split_once(":\t")?;
        let (bytes, text) = rest.split_once('\t')?;
        let offset = (u64::from_str_radix(address, 16).ok()? - vaddr) as usize;
        Some(Line { offset, bytes: hex(bytes), text: normalize(text, vaddr) })
    });
    Some(lines.collect())
}

/// objdump's and the x86 layer's text in one form: no comments, single
/// spaces, branch targets relative to the function, no prefixes that change
/// nothing (objdump writes a cs or ds prefix as a word, iced as the
/// operand's segment), scale 1 implied (objdump writes it, iced does not),
/// and indirect branches without the size suffix iced gives them.
fn normalize(text: &str, vaddr: u64) -> String {
    let text = text.split(" #").next().unwrap().replace(",1)", ")").replace("%cs:", "").replace("%ds:", "");
    let mut words: Vec<String> = text
        .split_whitespace()
        .filter(|w| !["rex.W", "data16", "bnd", "notrack", "cs", "ds"].contains(w))
        .map(|w| match w {
            "jmpq" => "jmp".to_owned(),
            "callq" => "call".to_owned(),
            _ => w.to_owned(),
        })
        .collect();
    if let Some(at) = words.iter().position(|w| w.starts_with('<'))
        && let Ok(target) = u64::from_str_radix(&words[at - 1], 16)
    {
        let distance = target as i64 - vaddr as i64;
        words[at - 1] = match distance {
            ..0 => format!("<-{:#x}>", distance.unsigned_abs()),
            _ => format!("<+{distance:#x}>"),
        };
        words.truncate(at);
    }
    words.join(" ")
}

/// Whether the kernel emulates these bytes, read independently of the
/// decoder: arch_uprobe_analyze_insn() in Linux 6.18.
fn kernel_emulates(bytes: &[u8]) -> bool {
    KERNEL_NOPS.contains(&bytes)
        || matches!(
            bytes,
            [0x50..=0x57]
                | [0x41, 0x50..=0x57]
                | [0xf3, 0x90]
                | [0x70..=0x7f | 0xeb, _]
                | [0xe8 | 0xe9, _, _, _, _]
                | [0x0f, 0x80..=0x8f, _, _, _, _]
        )
}

/// From objdump's text alone: the first instruction the kernel emulates,
/// before the straight line ends or `names` (one register's aliases) is
/// written. Approximate, but independent of the decoder.
fn first_emulated(listing: &[Line], names: [&str; 4]) -> Option<usize> {
    for line in listing.iter().take(MAX_INSNS).take_while(|l| l.offset < MAX_BYTES) {
        if kernel_emulates(&line.bytes) {
            return Some(line.offset);
        }
        let (mnemonic, operands) = line.text.split_once(' ').unwrap_or((&line.text, ""));
        if mnemonic.starts_with('j') || ["call", "ret", "syscall"].contains(&mnemonic) {
            return None;
        }
        let destination = operands.rsplit(',').next().unwrap_or("").trim_start_matches('%');
        let reads_only = ["test", "cmp", "push"].iter().any(|m| mnemonic.starts_with(m));
        if !reads_only && names.contains(&destination) {
            return None;
        }
    }
    None
}

/// The x86 layer agrees with objdump on every instruction among each
/// function's first 16, each function still has the bytes embedded in the
/// fixtures and gets the placement they expect, and a free-like function's
/// probe is emulated exactly when objdump's listing shows an emulated
/// instruction before the pointer is overwritten.
#[test]
fn live_binaries() {
    assert!(Command::new("objdump").arg("--version").output().is_ok(), "objdump (binutils) is needed");
    for binary in &BINARIES {
        let elf = ElfFile::open(Path::new(binary.path)).unwrap_or_else(|e| panic!("{}: {e:#}", binary.path));
        for case in binary.cases() {
            let name = format!("{} {}", binary.path, case.symbol);
            let symbol = elf.symbol(case.symbol).unwrap_or_else(|| panic!("{name}: no symbol"));
            let code = elf.symbol_bytes(symbol).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let listing = objdump(binary.path, symbol.vaddr, code.len().min(256)).unwrap();
            let mut offset = 0;
            for _ in 0..MAX_INSNS {
                let Some(insn) = x86::decode_one(&code[offset..], offset as u64) else { break };
                let line = listing.iter().find(|l| l.offset == offset);
                let line = line.unwrap_or_else(|| panic!("{name}+{offset:#x}: not an instruction boundary"));
                assert_eq!(insn.len(), line.bytes.len(), "{name}+{offset:#x}: `{}`", line.text);
                assert_eq!(normalize(&x86::att(&insn, 0), 0), line.text, "{name}+{offset:#x}");
                offset += insn.len();
            }
            // The binaries are the platform's, fixed: other bytes are
            // another build, whose placements nobody checked.
            assert!(code.starts_with(&case.code), "{name}: not the bytes embedded in the fixtures");
            let placement = case.place(code);
            case.check(binary.path, &placement);
            let Some(reg) = case.reads else { continue };
            let at = listing.iter().find(|l| l.offset as u64 == placement.offset).unwrap();
            assert_eq!(kernel_emulates(&at.bytes), placement.emulated, "{name}: {placement:?}");
            let names = match reg {
                Reg::Rdi => ["rdi", "edi", "di", "dil"],
                _ => ["rsi", "esi", "si", "sil"],
            };
            match first_emulated(&listing, names) {
                Some(spot) => assert!(placement.emulated, "{name}: +{spot:#x} is emulated; {placement:?}"),
                None => assert_eq!((placement.offset, placement.emulated), (0, false), "{name}"),
            }
        }
    }
}

/// Every embedded function gets its expected placement.
#[test]
fn embedded_functions() {
    for binary in &BINARIES {
        for case in binary.cases() {
            case.check(binary.path, &case.place(&case.code));
        }
    }
}

#[test]
fn reasons_say_why() {
    let free_like = |code: &[u8]| entry_only(code, &[Reg::Rdi], Some(Reg::Rdi));
    let (glibc, python) = (GLIBC.cases(), PYENV_3_12_1.cases());
    assert!(free_like(&glibc[0].code).reason.contains("NULL pointers return before it"));
    assert!(free_like(&glibc[1].code).reason.contains("`syscall` ends the straight-line code"));
    assert!(free_like(&python[1].code).reason.contains("`mov 0xb0(%rax),%rdi` overwrites"));
}

#[test]
fn return_probes_keep_the_entry() {
    let p = at_entry(&GLIBC.cases()[0].code);
    assert_eq!((p.offset, p.emulated, p.instruction.as_str()), (0, false, "test %rdi,%rdi"));
}
