//! Where in a function a uprobe goes. Linux on x86-64 emulates a handful of
//! instructions at a probe address (push of a register, its own NOP forms,
//! relative jmp, call and jcc) and single-steps every other one out of line,
//! which costs about ten times as much: a probe on pyenv 3.12's
//! `_PyObject_Free`+0 (`test %rsi,%rsi`, single-stepped) cost 62.5 s over
//! ~6 M hits, the same probe at +9 (`push %r12`, past the NULL check, the
//! argument untouched) 6.5 s. A probe that only reads argument registers at
//! entry may therefore move forward to the first emulated instruction, as long
//! as every call that matters still reaches it with those registers intact.
//! This module decodes just enough of a prologue to find that spot, and keeps
//! the entry for functions that also carry a return probe.
//!
//! The emulated set is that of `arch/x86/kernel/uprobes.c` in Linux 6.18:
//! `arch_uprobe_analyze_insn()` tries `branch_setup_xol_ops()` (an instruction
//! equal to `x86_nops[len]` for len up to `ASM_NOP_MAX`, or with opcode 0x90;
//! `jmp` rel8/rel32, `call` rel32, `jcc` rel8/rel32, refused outright with a
//! 0x66 prefix), then `push_setup_xol_ops()` (`push %reg`, one byte, or two
//! with REX exactly 0x41), and single-steps anything else. `endbr64` and
//! `mov %rsp,%rbp` are not emulated there. `uprobe_init_insn()` refuses
//! cs, ds, es, ss and lock prefixes altogether.

// How far the scan looks: the prologues it is meant for are short, and each
// instruction skipped is one more the decoder must get right.
const MAX_INSNS: usize = 16;
const MAX_BYTES: usize = 64;

use memtrace_common::Reg;

/// Where a probe goes within a function, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Offset from the function's start.
    pub offset: u64,
    /// Whether the kernel emulates the instruction there (else it is single-stepped).
    pub emulated: bool,
    /// The instruction there, in AT&T syntax, with branch targets relative to
    /// the function's start (e.g. "push %r12", "je <+0xc8>").
    pub instruction: String,
    /// Why this spot, for --verbose.
    pub reason: String,
}

/// The placement for a probe that reads only the argument registers `reads`
/// (nothing from the stack) and has no return probe. `code` is the function's
/// bytes from its entry, up to its symbol size.
///
/// The scan follows the straight line from the entry, passing over
/// instructions it decodes that leave `reads` alone, and stops at the first
/// one the kernel emulates: a push, a kernel NOP, or the relative branch,
/// call or jump that ends the straight line, which every call reaches with
/// the arguments intact. With `null_checked`, a `test %reg,%reg; je` on that
/// register is passed over too: the calls it diverts carry a NULL pointer and
/// release nothing. The scan gives up at anything else (an instruction it
/// cannot decode or that writes a register in `reads`, a branch the kernel
/// single-steps, the end of the window) and falls back to the NULL check's
/// `je` if it passed one, which is emulated but also hit by free(NULL), or
/// else to the entry. It never picks a spot that a direct branch elsewhere in
/// the function may jump back into.
pub fn entry_only(code: &[u8], reads: &[Reg], null_checked: Option<Reg>) -> Placement {
    let Some(first) = decode(code, 0) else {
        return Placement {
            offset: 0,
            emulated: false,
            instruction: undecoded(code),
            reason: "single-stepped: the entry instruction is not decoded".into(),
        };
    };
    if first.emulated {
        let reason = "the entry instruction is emulated".into();
        return Placement { offset: 0, emulated: true, instruction: first.text, reason };
    }
    let watched = reads.iter().fold(0u16, |mask, r| mask | 1 << r.number());
    let names: Vec<String> = reads.iter().map(|r| format!("%{}", r.name())).collect();
    let intact = match reads {
        [] => "no argument register to keep".to_owned(),
        _ => format!("{} intact", names.join(",")),
    };
    let mut offset = 0;
    let mut previous = Kind::Plain;
    let mut null_branch: Option<(usize, Insn)> = None;
    let mut examined = 0;
    let stop = loop {
        if examined == MAX_INSNS || offset >= MAX_BYTES.min(code.len()) {
            break format!("the scan ends at +{offset:#x}");
        }
        let Some(insn) = decode(code, offset) else {
            break format!("+{offset:#x} is not decoded");
        };
        examined += 1;
        let null_check = null_checked.is_some_and(|r| previous == Kind::SelfTest(r.number()));
        if null_check && insn.kind == Kind::JumpIfZero {
            let len = insn.len;
            null_branch = Some((offset, insn));
            offset += len;
            previous = Kind::Plain;
            continue;
        }
        if insn.emulated {
            if let Some(from) = branch_into(code, offset) {
                break format!("+{from:#x} may branch into +0x1..=+{offset:#x}");
            }
            let past_null = match null_branch {
                Some(_) => "; NULL pointers return before it",
                None => "",
            };
            return Placement {
                offset: offset as u64,
                emulated: true,
                instruction: insn.text,
                reason: format!("first emulated instruction on the entry path, reached with {intact}{past_null}"),
            };
        }
        if insn.kind == Kind::Barrier {
            break format!("+{offset:#x} `{}` ends the straight-line code", insn.text);
        }
        if insn.writes & watched != 0 {
            break format!("+{offset:#x} `{}` overwrites an argument the probe reads", insn.text);
        }
        previous = insn.kind;
        offset += insn.len;
    };
    if let Some((at, insn)) = null_branch
        && branch_into(code, at).is_none()
    {
        return Placement {
            offset: at as u64,
            emulated: true,
            instruction: insn.text,
            reason: format!("the NULL check's branch is the only emulated spot ({stop})"),
        };
    }
    let reason = format!("single-stepped at entry: {stop}");
    Placement { offset: 0, emulated: false, instruction: first.text, reason }
}

/// A probe that must sit exactly at the start of `code`, for `reason`.
pub fn exact(code: &[u8], reason: &str) -> Placement {
    Placement { reason: reason.to_owned(), ..at_entry(code) }
}

/// The placement for a function that also carries a return probe: always the
/// entry, because the kernel hijacks the return address at [rsp] when that
/// breakpoint hits, and [rsp] holds it only before the first push.
pub fn at_entry(code: &[u8]) -> Placement {
    let reason = "a return probe needs the entry, where [rsp] is the return address".to_owned();
    match decode(code, 0) {
        Some(insn) => Placement { offset: 0, emulated: insn.emulated, instruction: insn.text, reason },
        None => Placement { offset: 0, emulated: false, instruction: undecoded(code), reason },
    }
}

fn undecoded(code: &[u8]) -> String {
    let bytes: Vec<String> = code.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("(not decoded: {})", bytes.join(" "))
}

/// Where a direct branch anywhere in the function could land in `1..=end`,
/// so that a probe at `end` would fire again, or without the entry's
/// arguments. Instruction boundaries past the prologue are unknown, so every
/// byte is tried as an opcode; a false alarm only costs the cheaper spot.
fn branch_into(code: &[u8], end: usize) -> Option<usize> {
    (0..code.len()).find(|&at| {
        let target = match code[at..] {
            [0x70..=0x7f | 0xe0..=0xe3 | 0xeb, rel, ..] => at as i64 + 2 + i64::from(rel as i8),
            [0xe8 | 0xe9, a, b, c, d, ..] => at as i64 + 5 + i64::from(i32::from_le_bytes([a, b, c, d])),
            [0x0f, 0x80..=0x8f, a, b, c, d, ..] => at as i64 + 6 + i64::from(i32::from_le_bytes([a, b, c, d])),
            _ => return false,
        };
        (1..=end as i64).contains(&target)
    })
}

/// What the scan needs to know about an instruction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Falls through; may be skipped if it leaves the watched registers alone.
    Plain,
    /// `test %r,%r` on one whole 64-bit register, by number.
    SelfTest(u8),
    /// `je`/`jz`, which falls through when the tested value was non-zero.
    JumpIfZero,
    /// Another branch, a return or a system call: the scan cannot go past.
    Barrier,
}

struct Insn {
    len: usize,
    text: String,
    /// Registers (bit n for register number n) the instruction may write;
    /// over-approximated, so that a doubt stops the scan.
    writes: u16,
    kind: Kind,
    emulated: bool,
}

/// `x86_nops[1..=8]` for x86-64 (arch/x86/include/asm/nops.h): the kernel
/// emulates exactly these byte strings, whatever other NOPs look like. Longer
/// kernel NOPs, where defined, carry a cs prefix, which uprobes refuse.
const KERNEL_NOPS: [&[u8]; 8] = [
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

const REG64: [&str; 16] =
    ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];
const REG32: [&str; 16] = [
    "eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "r8d", "r9d", "r10d", "r11d", "r12d", "r13d", "r14d",
    "r15d",
];
const REG16: [&str; 16] =
    ["ax", "cx", "dx", "bx", "sp", "bp", "si", "di", "r8w", "r9w", "r10w", "r11w", "r12w", "r13w", "r14w", "r15w"];
const REG8: [&str; 16] =
    ["al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil", "r8b", "r9b", "r10b", "r11b", "r12b", "r13b", "r14b", "r15b"];
/// Byte registers 4-7 without a REX prefix: the high bytes of rax-rbx.
const REG8_HIGH: [&str; 4] = ["ah", "ch", "dh", "bh"];
const CONDITIONS: [&str; 16] = ["o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g"];
const ALU: [&str; 8] = ["add", "or", "adc", "sbb", "and", "sub", "xor", "cmp"];
/// Group 2 by ModRM reg field; /6 is an undocumented alias, left undecoded.
const SHIFTS: [Option<&str>; 8] =
    [Some("rol"), Some("ror"), Some("rcl"), Some("rcr"), Some("shl"), Some("shr"), None, Some("sar")];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Size {
    B,
    W,
    L,
    Q,
}

impl Size {
    fn suffix(self) -> char {
        match self {
            Size::B => 'b',
            Size::W => 'w',
            Size::L => 'l',
            Size::Q => 'q',
        }
    }

    /// Bytes of an immediate of this size, at most 4: wider ones are
    /// sign-extended from 32 bits, but for `movabs`.
    fn imm_len(self) -> usize {
        match self {
            Size::B => 1,
            Size::W => 2,
            Size::L | Size::Q => 4,
        }
    }

    fn mask(self) -> u64 {
        match self {
            Size::B => 0xff,
            Size::W => 0xffff,
            Size::L => 0xffff_ffff,
            Size::Q => u64::MAX,
        }
    }
}

/// Legacy and REX prefixes of one instruction.
#[derive(Default)]
struct Prefixes {
    operand16: bool,
    rep: bool,
    repne: bool,
    /// fs or gs, which address thread-local data.
    segment: Option<&'static str>,
    /// cs or ds: ignored by the CPU in 64-bit code, refused by uprobes.
    refused: Option<&'static str>,
    rex: u8,
}

impl Prefixes {
    fn wide(&self) -> bool {
        self.rex & 8 != 0
    }

    fn size(&self) -> Size {
        if self.wide() {
            Size::Q
        } else if self.operand16 {
            Size::W
        } else {
            Size::L
        }
    }

    fn reg(&self, n: u8, size: Size) -> &'static str {
        let n = usize::from(n);
        match size {
            Size::Q => REG64[n],
            Size::L => REG32[n],
            Size::W => REG16[n],
            Size::B if self.rex == 0 && (4..8).contains(&n) => REG8_HIGH[n - 4],
            Size::B => REG8[n],
        }
    }

    /// The register a write to `n` at `size` changes, as a mask bit.
    fn write(&self, n: u8, size: Size) -> u16 {
        let n = if size == Size::B && self.rex == 0 && (4..8).contains(&n) { n - 4 } else { n };
        1 << n
    }
}

struct Bytes<'a> {
    code: &'a [u8],
    at: usize,
}

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let b = *self.code.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// A little-endian, sign-extended value of `n` bytes.
    fn signed(&mut self, n: usize) -> Option<i64> {
        let raw = self.code.get(self.at..self.at + n)?;
        self.at += n;
        let value = raw.iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
        let shift = 64 - 8 * n as u32;
        Some(((value << shift) as i64) >> shift)
    }
}

/// A decoded operand, as AT&T text.
struct Operand {
    text: String,
    is_reg: bool,
}

fn reg_operand(name: &str) -> Operand {
    Operand { text: format!("%{name}"), is_reg: true }
}

fn imm_operand(value: i64, size: Size) -> Operand {
    Operand { text: format!("${:#x}", value as u64 & size.mask()), is_reg: false }
}

/// The r/m half of a ModRM byte.
enum Rm {
    Reg(u8),
    Mem(String),
}

struct ModRm {
    /// The reg field with REX.R, when it names a register.
    reg: u8,
    /// The reg field alone, when it extends the opcode.
    group: u8,
    rm: Rm,
}

fn modrm(b: &mut Bytes, p: &Prefixes) -> Option<ModRm> {
    let m = b.u8()?;
    let (md, group, rm3) = (m >> 6, (m >> 3) & 7, m & 7);
    let reg = group | (p.rex & 4) << 1;
    if md == 3 {
        return Some(ModRm { reg, group, rm: Rm::Reg(rm3 | (p.rex & 1) << 3) });
    }
    let mut base = None;
    let mut index = None;
    let mut rip = false;
    let mut disp = None;
    if rm3 == 4 {
        let sib = b.u8()?;
        let idx = (sib >> 3) & 7 | (p.rex & 2) << 2;
        if idx != 4 {
            index = Some((idx, 1u8 << (sib >> 6)));
        }
        if sib & 7 == 5 && md == 0 {
            disp = Some(b.signed(4)?);
        } else {
            base = Some(sib & 7 | (p.rex & 1) << 3);
        }
    } else if rm3 == 5 && md == 0 {
        rip = true;
        disp = Some(b.signed(4)?);
    } else {
        base = Some(rm3 | (p.rex & 1) << 3);
    }
    match md {
        1 => disp = Some(b.signed(1)?),
        2 => disp = Some(b.signed(4)?),
        _ => {}
    }
    let mut text = p.segment.map(|s| format!("%{s}:")).unwrap_or_default();
    if let Some(d) = disp {
        text += &if d < 0 { format!("-{:#x}", d.unsigned_abs()) } else { format!("{d:#x}") };
    }
    if rip {
        text += "(%rip)";
    } else if base.is_some() || index.is_some() {
        text.push('(');
        if let Some(r) = base {
            text += &format!("%{}", REG64[usize::from(r)]);
        }
        if let Some((r, scale)) = index {
            text += &format!(",%{},{scale}", REG64[usize::from(r)]);
        }
        text.push(')');
    }
    Some(ModRm { reg, group, rm: Rm::Mem(text) })
}

impl ModRm {
    fn operand(&self, p: &Prefixes, size: Size) -> Operand {
        match &self.rm {
            Rm::Reg(n) => reg_operand(p.reg(*n, size)),
            Rm::Mem(text) => Operand { text: text.clone(), is_reg: false },
        }
    }

    /// What writing the r/m operand changes among the registers.
    fn write(&self, p: &Prefixes, size: Size) -> u16 {
        match self.rm {
            Rm::Reg(n) => p.write(n, size),
            Rm::Mem(_) => 0,
        }
    }
}

/// AT&T text: operands source first, and a size suffix when no register
/// operand implies one.
fn att(p: &Prefixes, mnemonic: &str, size: Size, operands: &[Operand]) -> String {
    let mut text = String::new();
    if p.operand16 && p.wide() {
        text += "data16 ";
    }
    if let Some(s) = p.refused {
        text += s;
        text.push(' ');
    }
    text += mnemonic;
    if !operands.is_empty() && !operands.iter().any(|o| o.is_reg) {
        text.push(size.suffix());
    }
    if !operands.is_empty() {
        text.push(' ');
        text += &operands.iter().map(|o| o.text.as_str()).collect::<Vec<_>>().join(",");
    }
    text
}

/// A relative branch's text, its target as an offset from the function's start.
fn branch(b: &mut Bytes, p: &Prefixes, mnemonic: &str, n: usize) -> Option<String> {
    let rel = b.signed(n)?;
    let bnd = if p.repne { "bnd " } else { "" };
    Some(format!("{bnd}{mnemonic} {}", relative(b.at, rel)))
}

fn relative(end: usize, rel: i64) -> String {
    let target = end as i64 + rel;
    if target < 0 { format!("<-{:#x}>", target.unsigned_abs()) } else { format!("<+{target:#x}>") }
}

const RSP: u16 = 1 << 4;
const RAX: u16 = 1;
const RCX: u16 = 1 << 1;
const RDX: u16 = 1 << 2;
const R11: u16 = 1 << 11;

/// Decodes the instruction at `code[at..]`, or None if it is not one of the
/// integer forms prologues use (or runs past the end of `code`).
fn decode(code: &[u8], at: usize) -> Option<Insn> {
    let mut b = Bytes { code, at };
    let mut p = Prefixes::default();
    let mut op = loop {
        match b.u8()? {
            0x66 => p.operand16 = true,
            0xf2 => p.repne = true,
            0xf3 => p.rep = true,
            0x64 => p.segment = Some("fs"),
            0x65 => p.segment = Some("gs"),
            0x2e => p.refused = Some("cs"),
            0x3e => p.refused = Some("ds"),
            byte => break byte,
        }
    };
    if op & 0xf0 == 0x40 {
        p.rex = op;
        op = b.u8()?;
    }
    let size = p.size();
    let mut writes = 0u16;
    let mut kind = Kind::Plain;
    let mut relative_branch = false;
    let text = match op {
        0x00..=0x3f if op & 7 < 6 => {
            let name = ALU[usize::from(op >> 3)];
            let operands = match op & 7 {
                form @ 0..=3 => {
                    let s = if form & 1 == 0 { Size::B } else { size };
                    let m = modrm(&mut b, &p)?;
                    let (reg, rm) = (reg_operand(p.reg(m.reg, s)), m.operand(&p, s));
                    if form < 2 {
                        writes = m.write(&p, s);
                        vec![reg, rm]
                    } else {
                        writes = p.write(m.reg, s);
                        vec![rm, reg]
                    }
                }
                4 => {
                    writes = RAX;
                    vec![imm_operand(b.signed(1)?, Size::B), reg_operand("al")]
                }
                _ => {
                    writes = RAX;
                    vec![imm_operand(b.signed(size.imm_len())?, size), reg_operand(p.reg(0, size))]
                }
            };
            if name == "cmp" {
                writes = 0;
            }
            let s = if op & 1 == 0 { Size::B } else { size };
            att(&p, name, s, &operands)
        }
        0x50..=0x57 => {
            writes = RSP;
            let s = if p.operand16 { Size::W } else { Size::Q };
            att(&p, "push", s, &[reg_operand(p.reg(op & 7 | (p.rex & 1) << 3, s))])
        }
        0x58..=0x5f => {
            let s = if p.operand16 { Size::W } else { Size::Q };
            let n = op & 7 | (p.rex & 1) << 3;
            writes = RSP | p.write(n, s);
            att(&p, "pop", s, &[reg_operand(p.reg(n, s))])
        }
        0x63 if p.wide() => {
            let m = modrm(&mut b, &p)?;
            writes = p.write(m.reg, Size::Q);
            att(&p, "movslq", Size::Q, &[m.operand(&p, Size::L), reg_operand(p.reg(m.reg, Size::Q))])
        }
        0x68 | 0x6a => {
            writes = RSP;
            let imm = b.signed(if op == 0x6a { 1 } else { 4 })?;
            att(&p, "push", Size::Q, &[imm_operand(imm, Size::Q)])
        }
        0x69 | 0x6b => {
            let m = modrm(&mut b, &p)?;
            let imm = b.signed(if op == 0x6b { 1 } else { size.imm_len() })?;
            writes = p.write(m.reg, size);
            att(&p, "imul", size, &[imm_operand(imm, size), m.operand(&p, size), reg_operand(p.reg(m.reg, size))])
        }
        0x70..=0x7f => {
            kind = if op == 0x74 { Kind::JumpIfZero } else { Kind::Barrier };
            relative_branch = true;
            branch(&mut b, &p, &format!("j{}", CONDITIONS[usize::from(op & 0xf)]), 1)?
        }
        0x80 | 0x81 | 0x83 => {
            let s = if op == 0x80 { Size::B } else { size };
            let m = modrm(&mut b, &p)?;
            let imm = b.signed(if op == 0x81 { s.imm_len() } else { 1 })?;
            let name = ALU[usize::from(m.group)];
            if name != "cmp" {
                writes = m.write(&p, s);
            }
            att(&p, name, s, &[imm_operand(imm, s), m.operand(&p, s)])
        }
        0x84..=0x8b => {
            let s = if op & 1 == 0 { Size::B } else { size };
            let m = modrm(&mut b, &p)?;
            let (reg, rm) = (reg_operand(p.reg(m.reg, s)), m.operand(&p, s));
            match op {
                0x84 | 0x85 => {
                    if op == 0x85 && p.wide() && !p.operand16 && matches!(m.rm, Rm::Reg(n) if n == m.reg) {
                        kind = Kind::SelfTest(m.reg);
                    }
                    att(&p, "test", s, &[reg, rm])
                }
                0x86 | 0x87 => {
                    writes = p.write(m.reg, s) | m.write(&p, s);
                    att(&p, "xchg", s, &[reg, rm])
                }
                0x88 | 0x89 => {
                    writes = m.write(&p, s);
                    att(&p, "mov", s, &[reg, rm])
                }
                _ => {
                    writes = p.write(m.reg, s);
                    att(&p, "mov", s, &[rm, reg])
                }
            }
        }
        0x8d => {
            let m = modrm(&mut b, &p)?;
            if let Rm::Reg(_) = m.rm {
                return None;
            }
            writes = p.write(m.reg, size);
            att(&p, "lea", size, &[m.operand(&p, size), reg_operand(p.reg(m.reg, size))])
        }
        // With REX.B this is xchg with r8, which the kernel would still
        // "emulate" as a NOP: never a spot to choose, so not decoded.
        0x90 if p.rex & 1 == 0 => match (p.operand16, p.rep) {
            (true, _) => "xchg %ax,%ax".to_owned(),
            (_, true) => "pause".to_owned(),
            _ => att(&p, "nop", size, &[]),
        },
        0x98 => {
            writes = RAX;
            match size {
                Size::W => "cbtw",
                Size::L => "cwtl",
                _ => "cltq",
            }
            .to_owned()
        }
        0x99 => {
            writes = RDX;
            match size {
                Size::W => "cwtd",
                Size::L => "cltd",
                _ => "cqto",
            }
            .to_owned()
        }
        0xa8 | 0xa9 => {
            let s = if op == 0xa8 { Size::B } else { size };
            att(&p, "test", s, &[imm_operand(b.signed(s.imm_len())?, s), reg_operand(p.reg(0, s))])
        }
        0xb0..=0xbf => {
            let s = if op < 0xb8 { Size::B } else { size };
            let n = op & 7 | (p.rex & 1) << 3;
            let imm = b.signed(if s == Size::Q { 8 } else { s.imm_len() })?;
            writes = p.write(n, s);
            att(&p, if s == Size::Q { "movabs" } else { "mov" }, s, &[imm_operand(imm, s), reg_operand(p.reg(n, s))])
        }
        0xc0 | 0xc1 | 0xd0 | 0xd1 | 0xd2 | 0xd3 => {
            let s = if op & 1 == 0 { Size::B } else { size };
            let m = modrm(&mut b, &p)?;
            let name = SHIFTS[usize::from(m.group)]?;
            writes = m.write(&p, s);
            let target = m.operand(&p, s);
            match op {
                0xc0 | 0xc1 => att(&p, name, s, &[imm_operand(b.signed(1)?, Size::B), target]),
                0xd0 | 0xd1 => att(&p, name, s, &[target]),
                _ => att(&p, name, s, &[reg_operand("cl"), target]),
            }
        }
        0xc3 => {
            kind = Kind::Barrier;
            if p.rep { "repz ret".to_owned() } else { "ret".to_owned() }
        }
        0xc6 | 0xc7 => {
            let s = if op == 0xc6 { Size::B } else { size };
            let m = modrm(&mut b, &p)?;
            if m.group != 0 {
                return None;
            }
            let imm = b.signed(s.imm_len())?;
            writes = m.write(&p, s);
            att(&p, "mov", s, &[imm_operand(imm, s), m.operand(&p, s)])
        }
        // Without REX.W, 0x66 makes these rel16 on AMD and rel32 on Intel.
        0xe8 | 0xe9 if p.operand16 && !p.wide() => return None,
        0xe8 | 0xe9 | 0xeb => {
            kind = Kind::Barrier;
            relative_branch = true;
            if op == 0xe8 {
                writes = RSP;
            }
            branch(&mut b, &p, if op == 0xe8 { "call" } else { "jmp" }, if op == 0xeb { 1 } else { 4 })?
        }
        0xf6 | 0xf7 => {
            let s = if op == 0xf6 { Size::B } else { size };
            let m = modrm(&mut b, &p)?;
            let target = m.operand(&p, s);
            match m.group {
                0 => att(&p, "test", s, &[imm_operand(b.signed(s.imm_len())?, s), target]),
                1 => return None,
                2 | 3 => {
                    writes = m.write(&p, s);
                    att(&p, ["not", "neg"][usize::from(m.group - 2)], s, &[target])
                }
                g => {
                    writes = RAX | RDX;
                    att(&p, ["mul", "imul", "div", "idiv"][usize::from(g - 4)], s, &[target])
                }
            }
        }
        0xfe | 0xff => {
            let s = if op == 0xfe { Size::B } else { size };
            let m = modrm(&mut b, &p)?;
            match (op, m.group) {
                (_, 0 | 1) => {
                    writes = m.write(&p, s);
                    att(&p, ["inc", "dec"][usize::from(m.group)], s, &[m.operand(&p, s)])
                }
                (0xff, 2 | 4) => {
                    kind = Kind::Barrier;
                    writes = RSP;
                    // Marked as a register so that no size suffix follows.
                    let star = Operand { text: format!("*{}", m.operand(&p, Size::Q).text), is_reg: true };
                    att(&p, if m.group == 2 { "call" } else { "jmp" }, Size::Q, &[star])
                }
                (0xff, 6) => {
                    writes = RSP;
                    att(&p, "push", Size::Q, &[m.operand(&p, Size::Q)])
                }
                _ => return None,
            }
        }
        0x0f => match b.u8()? {
            0x05 => {
                kind = Kind::Barrier;
                writes = RAX | RCX | R11;
                "syscall".to_owned()
            }
            0x1e if p.rep => match b.u8()? {
                0xfa => "endbr64".to_owned(),
                _ => return None,
            },
            0x1f => {
                let s = if p.operand16 { Size::W } else { Size::L };
                let m = modrm(&mut b, &p)?;
                if m.group != 0 {
                    return None;
                }
                att(&p, "nop", s, &[m.operand(&p, s)])
            }
            op2 @ 0x40..=0x4f => {
                let m = modrm(&mut b, &p)?;
                writes = p.write(m.reg, size);
                let name = format!("cmov{}", CONDITIONS[usize::from(op2 & 0xf)]);
                att(&p, &name, size, &[m.operand(&p, size), reg_operand(p.reg(m.reg, size))])
            }
            0x80..=0x8f if p.operand16 && !p.wide() => return None,
            op2 @ 0x80..=0x8f => {
                kind = if op2 == 0x84 { Kind::JumpIfZero } else { Kind::Barrier };
                relative_branch = true;
                branch(&mut b, &p, &format!("j{}", CONDITIONS[usize::from(op2 & 0xf)]), 4)?
            }
            op2 @ 0x90..=0x9f => {
                let m = modrm(&mut b, &p)?;
                writes = m.write(&p, Size::B);
                let name = format!("set{}", CONDITIONS[usize::from(op2 & 0xf)]);
                att(&p, &name, Size::B, &[m.operand(&p, Size::B)])
            }
            0xaf => {
                let m = modrm(&mut b, &p)?;
                writes = p.write(m.reg, size);
                att(&p, "imul", size, &[m.operand(&p, size), reg_operand(p.reg(m.reg, size))])
            }
            op2 @ (0xb6 | 0xb7 | 0xbe | 0xbf) => {
                let from = if op2 & 1 == 0 { Size::B } else { Size::W };
                let m = modrm(&mut b, &p)?;
                writes = p.write(m.reg, size);
                let name = format!("mov{}{}{}", if op2 < 0xbe { 'z' } else { 's' }, from.suffix(), size.suffix());
                att(&p, &name, size, &[m.operand(&p, from), reg_operand(p.reg(m.reg, size))])
            }
            _ => return None,
        },
        _ => return None,
    };
    let len = b.at - at;
    let bytes = &code[at..b.at];
    let emulated = p.refused.is_none()
        && match op {
            0x50..=0x57 => matches!(bytes, [0x50..=0x57] | [0x41, 0x50..=0x57]),
            0x90 => true,
            _ => relative_branch && !p.operand16 || KERNEL_NOPS.contains(&bytes),
        };
    Some(Insn { len, text, writes, kind, emulated })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use Reg::{Rdi, Rsi};

    fn hex(text: &str) -> Vec<u8> {
        text.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
    }

    fn free_like(code: &[u8], reg: Reg) -> Placement {
        entry_only(code, &[reg], Some(reg))
    }

    /// A binary on this machine and some of its functions, with the placement
    /// each gets, checked by hand against `objdump -d`. `cases` reads like a
    /// listing: a line `symbol pointer +offset emulated|stepped instruction`,
    /// where pointer is the register a free-like function's entry-only probe
    /// reads, or `-` for an allocator, which also carries a return probe; then
    /// the function's first bytes: 64 (the scan window) for free-like
    /// functions, 16 for allocators, fewer if the function is shorter.
    struct Binary {
        path: &'static str,
        cases: &'static str,
    }

    struct Case {
        symbol: &'static str,
        reads: Option<Reg>,
        offset: u64,
        emulated: bool,
        instruction: String,
        code: Vec<u8>,
    }

    impl Binary {
        fn cases(&self) -> Vec<Case> {
            let mut cases: Vec<Case> = Vec::new();
            for line in self.cases.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let mut words = line.split_whitespace();
                let symbol = words.next().unwrap();
                if symbol.len() == 2 && u8::from_str_radix(symbol, 16).is_ok() {
                    cases.last_mut().unwrap().code.extend(hex(line));
                    continue;
                }
                let reads = match words.next() {
                    Some("rdi") => Some(Rdi),
                    Some("rsi") => Some(Rsi),
                    _ => None,
                };
                let offset = u64::from_str_radix(words.next().unwrap().trim_start_matches("+0x"), 16).unwrap();
                let emulated = words.next() == Some("emulated");
                let instruction = words.collect::<Vec<_>>().join(" ");
                cases.push(Case { symbol, reads, offset, emulated, instruction, code: Vec::new() });
            }
            cases
        }
    }

    impl Case {
        fn place(&self, code: &[u8]) -> Placement {
            match self.reads {
                Some(reg) => free_like(code, reg),
                None => at_entry(code),
            }
        }

        fn check(&self, path: &str, placement: &Placement) {
            let got = (placement.offset, placement.instruction.as_str(), placement.emulated);
            let want = (self.offset, self.instruction.as_str(), self.emulated);
            assert_eq!(got, want, "{path} {}: {}", self.symbol, placement.reason);
        }
    }

    /// glibc 2.36-9+deb12u14 (Debian 12).
    const GLIBC: Binary = Binary {
        path: "/lib/x86_64-linux-gnu/libc.so.6",
        cases: "
            free               rdi +0x9   emulated push %rbp
                48 85 ff 0f 84 bf 00 00 00 55 48 8d 77 f0 53 48 83 ec 18 48 8b 1d d6 9e 13 00 48 8b 47 f8 64 8b
                2b a8 02 75 5b 48 8b 15 5c 9e 13 00 64 48 83 3a 00 0f 84 99 00 00 00 48 8d 3d 32 ad 13 00 a8 04
            munmap             rdi +0x0   stepped  mov $0xb,%eax
                b8 0b 00 00 00 0f 05 48 3d 01 f0 ff ff 73 01 c3 48 8b 0d c9 13 0d 00 f7 d8 64 89 01 48 83 c8 ff
                c3
            malloc             -   +0x0   emulated push %r12
                41 54 55 53 48 89 fb 48 83 ec 10 80 3d 46 1b 14
            calloc             -   +0x0   emulated push %r13
                41 55 48 89 f8 41 54 55 53 48 83 ec 18 48 f7 e6
            realloc            -   +0x0   emulated push %r15
                41 57 41 56 41 55 41 54 55 48 89 f5 53 48 89 fb
            posix_memalign     -   +0x0   stepped  cmpb $0x0,0x140201(%rip)
                80 3d 01 02 14 00 00 41 54 49 89 d4 55 48 89 fd
            memalign           -   +0x0   stepped  cmpb $0x0,0x140e71(%rip)
                80 3d 71 0e 14 00 00 74 07 e9 32 f6 ff ff 66 90
            valloc             -   +0x0   stepped  cmpb $0x0,0x140e31(%rip)
                80 3d 31 0e 14 00 00 53 48 89 fb 74 1b 48 8b 05
            pvalloc            -   +0x0   stepped  cmpb $0x0,0x140e01(%rip)
                80 3d 01 0e 14 00 00 53 48 89 fb 74 2b 48 8b 05
            reallocarray       -   +0x0   stepped  mov %rsi,%rax
                48 89 f0 48 f7 e2 48 89 c6 70 05 e9 40 b8 f8 ff
            mmap               -   +0x0   stepped  mov %ecx,%r10d
                41 89 ca 41 f7 c1 ff 0f 00 00 75 14 b8 09 00 00",
    };

    /// pyenv's CPython 3.8.18, built with --enable-shared: internal symbols in .symtab.
    const PYENV_3_8_18: Binary = Binary {
        path: "/root/.pyenv/versions/3.8.18/lib/libpython3.8.so.1.0",
        cases: "
            _PyObject_Free     rsi +0x26  emulated jae <+0x4c>
                48 85 f6 0f 84 cf 01 00 00 48 89 f0 48 83 2d cc 7f 27 00 01 48 89 f7 48 25 00 f0 ff ff 8b 50 20
                3b 15 f2 81 27 00 73 24 48 8b 0d f1 81 27 00 48 8d 14 52 48 c1 e2 04 48 8b 14 11 48 29 d6 48 81
            PyObject_Free      rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d 56 0c 25 00 ff 25 70 0c 25 00
            PyMem_Free         rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d 16 0e 25 00 ff 25 30 0e 25 00
            PyMem_RawFree      rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d 46 11 25 00 ff 25 60 11 25 00
            _PyMem_RawFree     rsi +0x3   emulated jmp <-0x74d38>
                48 89 f7 e9 c0 b2 f8 ff
            _PyObject_Malloc   -   +0x0   emulated push %rbx
                53 48 89 f7 48 89 f3 e8 d4 fa ff ff 48 85 c0 74
            _PyObject_Realloc  -   +0x0   emulated push %r14
                41 56 41 55 41 54 55 48 89 d5 53 48 85 f6 0f 84
            _PyObject_Calloc   -   +0x0   emulated push %r12
                41 54 49 89 f4 4c 0f af e2 55 48 89 d5 53 48 89",
    };

    /// pyenv's CPython 3.9.18, built with --enable-shared: internal symbols in .symtab.
    const PYENV_3_9_18: Binary = Binary {
        path: "/root/.pyenv/versions/3.9.18/lib/libpython3.9.so.1.0",
        cases: "
            _PyObject_Free     rsi +0xc   emulated push %rbx
                48 85 f6 0f 84 2f 01 00 00 48 89 f0 53 48 89 f7 48 25 00 f0 ff ff 8b 50 20 3b 15 69 fd 28 00 73
                27 48 8b 35 68 fd 28 00 48 8d 14 52 48 89 f9 48 c1 e2 04 48 8b 14 16 48 29 d1 48 81 f9 ff ff 03
            PyObject_Free      rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d 76 78 26 00 ff 25 90 78 26 00
            PyMem_Free         rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d 36 7a 26 00 ff 25 50 7a 26 00
            PyMem_RawFree      rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d 76 7d 26 00 ff 25 90 7d 26 00
            _PyMem_RawFree     rsi +0x3   emulated jmp <-0x9c008>
                48 89 f7 e9 f0 3f f6 ff
            _PyObject_Malloc   -   +0x0   stepped  lea -0x1(%rsi),%rax
                48 8d 46 ff 53 48 89 f3 48 3d ff 01 00 00 77 60
            _PyObject_Realloc  -   +0x0   emulated push %r13
                41 55 41 54 49 89 fc 55 53 48 89 f3 48 89 d6 48
            _PyObject_Calloc   -   +0x0   emulated push %rbp
                55 48 89 d5 48 89 f2 48 0f af d5 53 48 89 f3 48",
    };

    /// pyenv's CPython 3.10.13, built with --enable-shared: internal symbols in .symtab.
    const PYENV_3_10_13: Binary = Binary {
        path: "/root/.pyenv/versions/3.10.13/lib/libpython3.10.so.1.0",
        cases: "
            _PyObject_Free     rsi +0xf   emulated push %rbx
                48 85 f6 74 7b 48 89 f2 48 8d 0d f1 57 29 00 53 48 89 f0 48 c1 ea 26 48 25 00 c0 ff ff 81 e2 ff
                03 00 00 48 8b 0c d1 48 85 c9 74 66 48 89 f2 48 c1 ea 1c 81 e2 ff 03 00 00 48 8b 0c d1 48 85 c9
            PyObject_Free      rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d 06 83 27 00 ff 25 20 83 27 00
            PyMem_Free         rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d c6 84 27 00 ff 25 e0 84 27 00
            PyMem_RawFree      rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d 26 88 27 00 ff 25 40 88 27 00
            _PyMem_RawFree     rsi +0x3   emulated jmp <-0xacc88>
                48 89 f7 e9 70 33 f5 ff
            _PyObject_Malloc   -   +0x0   stepped  lea -0x1(%rsi),%rax
                48 8d 46 ff 53 48 89 f3 48 3d ff 01 00 00 77 60
            _PyObject_Realloc  -   +0x0   emulated push %r13
                41 55 41 54 49 89 fc 55 53 48 89 f3 48 89 d6 48
            _PyObject_Calloc   -   +0x0   emulated push %rbp
                55 48 89 d5 48 89 f2 48 0f af d5 53 48 89 f3 48",
    };

    /// pyenv's CPython 3.11.7, built with --enable-shared: internal symbols in .symtab.
    const PYENV_3_11_7: Binary = Binary {
        path: "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0",
        cases: "
            _PyObject_Free     rsi +0xf   emulated push %rbx
                48 85 f6 74 7b 48 89 f1 48 8d 15 31 8a 3c 00 53 48 89 f0 48 c1 e9 31 48 25 00 c0 ff ff 48 8b 0c
                ca 48 85 c9 74 6c 48 89 f2 48 c1 ea 22 81 e2 ff 7f 00 00 48 8b 0c d1 48 85 c9 74 56 48 89 f2 89
            PyObject_Free      rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d e6 cf 2a 00 ff 25 00 d0 2a 00
            PyMem_Free         rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d a6 d1 2a 00 ff 25 c0 d1 2a 00
            PyMem_RawFree      rdi +0x0   stepped  mov %rdi,%rsi
                48 89 fe 48 8b 3d 06 d5 2a 00 ff 25 20 d5 2a 00
            _PyMem_RawFree     rsi +0x3   emulated jmp <-0xb20c0>
                48 89 f7 e9 38 df f4 ff
            _PyObject_Malloc   -   +0x0   stepped  lea -0x1(%rsi),%rax
                48 8d 46 ff 53 48 89 f3 48 3d ff 01 00 00 77 60
            _PyObject_Realloc  -   +0x0   emulated push %r13
                41 55 41 54 49 89 fc 55 53 48 89 f3 48 89 d6 48
            _PyObject_Calloc   -   +0x0   emulated push %rbp
                55 48 89 d5 48 89 f2 48 0f af d5 53 48 89 f3 48",
    };

    /// pyenv's CPython 3.12.1, built with --enable-shared: internal symbols in .symtab.
    const PYENV_3_12_1: Binary = Binary {
        path: "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0",
        cases: "
            _PyObject_Free     rsi +0x9   emulated push %r12
                48 85 f6 0f 84 b7 00 00 00 41 54 55 53 48 89 f3 66 48 8d 3d 58 4f 37 00 66 66 48 e8 40 96 f3 ff
                4c 8b 25 59 4d 37 00 48 8b 00 48 8b 68 10 49 3b 6c 24 30 74 0d f6 85 b0 06 00 00 20 0f 85 a6 00
            PyObject_Free      rdi +0x0   stepped  mov 0x374819(%rip),%rax
                48 8b 05 19 48 37 00 48 89 fe 48 8b b8 b0 00 00 00 ff a0 d0 00 00 00
            PyMem_Free         rdi +0x0   stepped  mov 0x3749c9(%rip),%rax
                48 8b 05 c9 49 37 00 48 89 fe 48 8b b8 88 00 00 00 ff a0 a8 00 00 00
            PyMem_RawFree      rdi +0x0   stepped  mov 0x374d99(%rip),%rax
                48 8b 05 99 4d 37 00 48 89 fe 48 8b 78 60 ff a0 80 00 00 00
            _PyMem_RawFree     rsi +0x3   emulated jmp <-0xc06f8>
                48 89 f7 e9 00 f9 f3 ff
            _PyObject_Malloc   -   +0x0   emulated push %rbp
                55 53 48 89 f3 48 83 ec 08 66 48 8d 3d 2f 41 37
            _PyObject_Realloc  -   +0x0   emulated push %r15
                41 57 49 89 d7 41 56 41 55 41 54 49 89 fc 55 53
            _PyObject_Calloc   -   +0x0   emulated push %r13
                41 55 49 89 f5 41 54 4c 0f af ea 49 89 d4 55 48",
    };

    /// pyenv's CPython 3.13.0, built with --enable-shared: internal symbols in .symtab.
    const PYENV_3_13_0: Binary = Binary {
        path: "/root/.pyenv/versions/3.13.0/lib/libpython3.13.so.1.0",
        cases: "
            _PyObject_Free     rsi +0x9   emulated push %rbp
                48 85 f6 0f 84 9f 00 00 00 55 53 48 89 f3 48 83 ec 08 66 48 8d 3d 96 0e 38 00 66 66 48 e8 fe e2
                f1 ff 48 89 da 48 c1 ea 31 48 8b 00 48 8b 40 10 48 8b a8 30 2a 00 00 48 89 d8 48 25 00 c0 ff ff
            PyObject_Free      rdi +0x0   stepped  mov 0x380679(%rip),%rax
                48 8b 05 79 06 38 00 48 89 fe 48 8b b8 10 03 00 00 ff a0 30 03 00 00
            PyMem_Free         rdi +0x0   stepped  mov 0x380929(%rip),%rax
                48 8b 05 29 09 38 00 48 89 fe 48 8b b8 e8 02 00 00 ff a0 08 03 00 00
            PyMem_RawFree      rdi +0x0   stepped  mov 0x380cb9(%rip),%rax
                48 8b 05 b9 0c 38 00 48 89 fe 48 8b b8 c0 02 00 00 ff a0 e0 02 00 00
            _PyMem_RawFree     rsi +0x3   emulated jmp <-0xc6038>
                48 89 f7 e9 c0 9f f3 ff
            _PyObject_Malloc   -   +0x0   emulated push %rbp
                55 53 48 89 f3 48 83 ec 08 66 48 8d 3d 4f f8 37
            _PyObject_Realloc  -   +0x0   emulated push %r15
                41 57 49 89 ff 41 56 49 89 d6 41 55 41 54 55 53
            _PyObject_Calloc   -   +0x0   emulated push %r13
                41 55 41 54 49 89 f4 55 4c 0f af e2 48 89 d5 53",
    };

    /// Debian's CPython 3.11.2-6+deb12u6 executable: stripped, exported symbols only.
    const DEBIAN_PYTHON: Binary = Binary {
        path: "/usr/bin/python3.11",
        cases: "
            PyObject_Free      rdi +0x14  emulated jne <+0x1ce>
                48 8b 05 09 96 45 00 48 8b 15 e2 95 45 00 48 3d e0 0f 50 00 0f 85 b4 01 00 00 48 85 ff 0f 84 aa
                01 00 00 48 89 f8 48 89 fe 53 48 c1 e8 31 48 81 e6 00 c0 ff ff 48 8b 14 c5 00 46 a8 00 48 85 d2
            PyMem_Free         rdi +0x14  emulated jne <+0x1ce>
                48 8b 05 29 36 45 00 48 8b 15 02 36 45 00 48 3d e0 0f 50 00 0f 85 b4 01 00 00 48 85 ff 0f 84 aa
                01 00 00 48 89 f8 48 89 fe 53 48 c1 e8 31 48 81 e6 00 c0 ff ff 48 8b 14 c5 00 46 a8 00 48 85 d2
            PyMem_RawFree      rdi +0x14  emulated jne <+0x1b>
                48 8b 05 f9 2a 46 00 48 8b 15 d2 2a 46 00 48 3d b0 75 4f 00 75 05 e9 05 85 f2 ff 48 89 fe 48 89
                d7 ff e0
            PyObject_Malloc    -   +0x0   emulated push %rbx
                53 48 85 ff 0f 88 65 ad f2 ff 48 8b 05 e7 eb 45
            PyObject_Calloc    -   +0x0   stepped  test %rsi,%rsi
                48 85 f6 74 18 48 b8 ff ff ff ff ff ff ff 7f 31
            PyObject_Realloc   -   +0x0   emulated push %r13
                41 55 41 54 55 53 41 52 48 85 f6 0f 88 6b 35 ee
            PyMem_Malloc       -   +0x0   emulated push %rbx
                53 48 85 ff 0f 88 8e 1f f2 ff 48 8b 05 67 3e 45
            PyMem_Calloc       -   +0x0   emulated push %rbx
                53 48 89 fb 48 83 ec 10 48 85 f6 0f 84 93 01 00
            PyMem_Realloc      -   +0x0   emulated push %r13
                41 55 41 54 55 53 48 83 ec 08 48 85 f6 0f 88 4c
            PyMem_RawMalloc    -   +0x0   stepped  test %rdi,%rdi
                48 85 ff 0f 88 32 a2 f2 ff 48 8b 05 18 2e 46 00",
    };
    const BINARIES: [Binary; 8] =
        [GLIBC, PYENV_3_8_18, PYENV_3_9_18, PYENV_3_10_13, PYENV_3_11_7, PYENV_3_12_1, PYENV_3_13_0, DEBIAN_PYTHON];

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
        let (glibc, python) = (GLIBC.cases(), PYENV_3_12_1.cases());
        assert!(free_like(&glibc[0].code, Rdi).reason.contains("NULL pointers return before it"));
        assert!(free_like(&glibc[1].code, Rdi).reason.contains("`syscall` ends the straight-line code"));
        assert!(free_like(&python[1].code, Rdi).reason.contains("`mov 0xb0(%rax),%rdi` overwrites"));
    }

    #[test]
    fn an_emulated_entry_stays() {
        let p = free_like(&hex("55 48 85 ff 74 02 53"), Rdi);
        assert_eq!((p.offset, p.emulated, p.reason.as_str()), (0, true, "the entry instruction is emulated"));
    }

    #[test]
    fn return_probes_keep_the_entry() {
        let p = at_entry(&GLIBC.cases()[0].code);
        assert_eq!((p.offset, p.emulated, p.instruction.as_str()), (0, false, "test %rdi,%rdi"));
    }

    #[test]
    fn a_32_bit_test_is_not_a_null_check() {
        // test %edi,%edi; je; push %rbp: a pointer whose low half is zero is
        // not NULL, so the push is not reached by every call that matters.
        let p = free_like(&hex("85 ff 74 02 55 c3"), Rdi);
        assert_eq!((p.offset, p.instruction.as_str()), (2, "je <+0x6>"));
    }

    #[test]
    fn only_the_probed_pointer_null_check_is_skipped() {
        let code = hex("48 85 f6 74 02 55 c3");
        assert_eq!(free_like(&code, Rdi).offset, 3);
        assert_eq!(free_like(&code, Rsi).offset, 5);
    }

    #[test]
    fn an_overwritten_argument_falls_back_to_the_null_check() {
        // test %rdi,%rdi; je; mov 0x0(%rip),%rdi; push %rbp
        let p = free_like(&hex("48 85 ff 74 08 48 8b 3d 00 00 00 00 55 c3"), Rdi);
        assert_eq!((p.offset, p.instruction.as_str(), p.emulated), (3, "je <+0xd>", true));
        assert!(p.reason.contains("overwrites"), "{}", p.reason);
    }

    #[test]
    fn byte_registers_alias_correctly() {
        // mov $0x1,%dh writes rdx, not rsi; mov $0x1,%sil writes rsi.
        let dh = hex("b6 01 55");
        assert_eq!(entry_only(&dh, &[Rsi], None).offset, 2);
        assert_eq!(entry_only(&dh, &[Reg::Rdx], None).offset, 0);
        assert_eq!(entry_only(&hex("40 b6 01 55"), &[Rsi], None).offset, 0);
    }

    #[test]
    fn no_spot_that_a_branch_may_reenter() {
        // test; je; mov %rdi,%rax; push %rbp; ...; jmp back to the mov.
        let code = hex("48 85 ff 74 06 48 89 f8 55 eb fa c3");
        let p = free_like(&code, Rdi);
        assert_eq!((p.offset, p.instruction.as_str()), (3, "je <+0xb>"));
        assert!(p.reason.contains("+0x9 may branch into"), "{}", p.reason);
    }

    #[test]
    fn kernel_nops_are_emulated_others_not() {
        for nop in KERNEL_NOPS {
            assert!(at_entry(nop).emulated, "{nop:02x?}");
        }
        let nopw9 = hex("66 0f 1f 84 00 00 00 00 00 55");
        assert!(!at_entry(&nopw9).emulated);
        assert_eq!(free_like(&nopw9, Rdi).offset, 9);
        // A cs prefix makes uprobes refuse the instruction altogether.
        let cs_nopw = hex("66 2e 0f 1f 84 00 00 00 00 00 55");
        assert_eq!(at_entry(&cs_nopw).instruction, "cs nopw 0x0(%rax,%rax,1)");
        assert!(!at_entry(&cs_nopw).emulated);
        assert_eq!(free_like(&cs_nopw, Rdi).offset, 10);
    }

    #[test]
    fn push_is_emulated_only_in_its_short_forms() {
        assert!(at_entry(&hex("41 54")).emulated);
        assert!(!at_entry(&hex("48 55")).emulated);
        assert!(!at_entry(&hex("66 55")).emulated);
        assert_eq!(at_entry(&hex("66 55")).instruction, "push %bp");
    }

    #[test]
    fn operand_size_prefixed_branches_are_refused() {
        // 66 jcc rel8: decoded, not emulated (the kernel refuses the probe).
        assert!(!at_entry(&hex("66 74 00")).emulated);
        // 66 jmp without REX.W takes rel16 on AMD, rel32 on Intel: not decoded.
        assert_eq!(at_entry(&hex("66 e9 00 00 00 00")).instruction, "(not decoded: 66 e9 00 00)");
        // With REX.W, as in CPython's TLS sequences, it is rel32 everywhere.
        let tls_call = at_entry(&hex("66 66 48 e8 00 00 00 00"));
        assert_eq!((tls_call.instruction.as_str(), tls_call.emulated), ("call <+0x8>", false));
    }

    #[test]
    fn endbr64_is_skipped() {
        let p = free_like(&hex("f3 0f 1e fa 48 85 ff 74 02 55 c3"), Rdi);
        assert_eq!((p.offset, p.instruction.as_str()), (9, "push %rbp"));
        assert_eq!(at_entry(&hex("f3 0f 1e fa")).instruction, "endbr64");
    }

    #[test]
    fn a_call_is_a_spot() {
        let p = entry_only(&hex("48 89 f7 e8 00 00 00 00"), &[Rsi], None);
        assert_eq!((p.offset, p.instruction.as_str(), p.emulated), (3, "call <+0x8>", true));
    }

    #[test]
    fn undecoded_instructions_stop_the_scan() {
        let p = free_like(&hex("0f 0b 55"), Rdi);
        assert_eq!((p.offset, p.emulated, p.instruction.as_str()), (0, false, "(not decoded: 0f 0b 55)"));
        let p = free_like(&hex("48 89 c3 0f 0b 55"), Rdi);
        assert_eq!((p.offset, p.reason.as_str()), (0, "single-stepped at entry: +0x3 is not decoded"));
    }

    #[test]
    fn the_scan_window_is_bounded() {
        let mut code = hex(&"48 89 c3 ".repeat(MAX_INSNS));
        code.push(0x55);
        let p = free_like(&code, Rdi);
        assert_eq!((p.offset, p.reason.as_str()), (0, "single-stepped at entry: the scan ends at +0x30"));
        code.drain(..3);
        assert_eq!(free_like(&code, Rdi).offset, 0x2d);
    }

    #[test]
    fn nothing_read_means_nothing_to_protect() {
        assert_eq!(entry_only(&hex("48 89 c7 55"), &[], None).offset, 3);
        assert_eq!(entry_only(&hex("48 89 c7 55"), &[Rdi], None).offset, 0);
    }

    /// A FUNC symbol's address and bytes, from .symtab or else .dynsym.
    fn function(elf: &[u8], name: &str) -> Option<(u64, Vec<u8>)> {
        let u16_at = |at: usize| usize::from(u16::from_le_bytes([elf[at], elf[at + 1]]));
        let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) as usize;
        let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap()) as usize;
        let section = |i: usize| u64_at(0x28) + i * u16_at(0x3a);
        for kind in [2, 11] {
            for table in (0..u16_at(0x3c)).map(section).filter(|&s| u32_at(s + 4) == kind) {
                let strings = u64_at(section(u32_at(table + 0x28)) + 0x18);
                for sym in (0..u64_at(table + 0x20) / 24).map(|i| u64_at(table + 0x18) + i * 24) {
                    let at = strings + u32_at(sym);
                    let end = at + elf[at..].iter().position(|&b| b == 0)?;
                    if &elf[at..end] != name.as_bytes() || elf[sym + 4] & 0xf != 2 || u16_at(sym + 6) == 0 {
                        continue;
                    }
                    let (vaddr, size) = (u64_at(sym + 8), u64_at(sym + 16));
                    let home = section(u16_at(sym + 6));
                    let offset = u64_at(home + 0x18) + vaddr - u64_at(home + 0x10);
                    return Some((vaddr as u64, elf[offset..offset + size].to_vec()));
                }
            }
        }
        None
    }

    /// One line of `objdump -d`: offset from the function's start, bytes, text.
    struct Line {
        offset: usize,
        bytes: Vec<u8>,
        text: String,
    }

    fn objdump(path: &str, vaddr: u64, len: usize) -> Option<Vec<Line>> {
        let (start, stop) =
            (format!("--start-address={vaddr:#x}"), format!("--stop-address={:#x}", vaddr + len as u64));
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

    /// Both decoders' text in one form: no comments, single spaces, branch
    /// targets relative to the function, and no prefixes that change nothing.
    fn normalize(text: &str, vaddr: u64) -> String {
        let text = text.split(" #").next().unwrap();
        let mut words: Vec<String> = text
            .split_whitespace()
            .filter(|w| !["rex.W", "data16", "bnd", "notrack", "cs", "ds"].contains(w))
            .map(str::to_owned)
            .collect();
        if let Some(at) = words.iter().position(|w| w.starts_with('<'))
            && let Ok(target) = u64::from_str_radix(&words[at - 1], 16)
        {
            words[at - 1] = relative(0, target as i64 - vaddr as i64);
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

    /// Against the real binaries on this machine: the decoder agrees with
    /// objdump on every instruction it decodes among each function's first
    /// 16, each placement is as expected (when the binary has the bytes
    /// embedded above), and a free-like function's probe is emulated exactly
    /// when objdump's listing shows an emulated instruction before the
    /// pointer is overwritten. The binaries and objdump are part of the
    /// platform memtrace supports: their absence fails the test.
    #[test]
    fn live_binaries() {
        assert!(Command::new("objdump").arg("--version").output().is_ok(), "objdump (binutils) is needed");
        for binary in &BINARIES {
            let elf = std::fs::read(binary.path).unwrap_or_else(|e| panic!("{}: {e}", binary.path));
            for case in binary.cases() {
                let name = format!("{} {}", binary.path, case.symbol);
                let (vaddr, code) = function(&elf, case.symbol).unwrap_or_else(|| panic!("{name}: no symbol"));
                let listing = objdump(binary.path, vaddr, code.len().min(256)).unwrap();
                let mut offset = 0;
                for _ in 0..MAX_INSNS {
                    let Some(insn) = decode(&code, offset) else { break };
                    let line = listing.iter().find(|l| l.offset == offset);
                    let line = line.unwrap_or_else(|| panic!("{name}+{offset:#x}: not an instruction boundary"));
                    assert_eq!(insn.len, line.bytes.len(), "{name}+{offset:#x}: `{}`", line.text);
                    assert_eq!(normalize(&insn.text, 0), line.text, "{name}+{offset:#x}");
                    offset += insn.len;
                }
                let placement = case.place(&code);
                if code.starts_with(&case.code) {
                    case.check(binary.path, &placement);
                } else {
                    eprintln!("{name}: not the bytes embedded here; placement {placement:?}");
                }
                let Some(reg) = case.reads else { continue };
                let at = listing.iter().find(|l| l.offset as u64 == placement.offset).unwrap();
                assert_eq!(kernel_emulates(&at.bytes), placement.emulated, "{name}: {placement:?}");
                let names = match reg {
                    Rdi => ["rdi", "edi", "di", "dil"],
                    _ => ["rsi", "esi", "si", "sil"],
                };
                match first_emulated(&listing, names) {
                    Some(spot) => assert!(placement.emulated, "{name}: +{spot:#x} is emulated; {placement:?}"),
                    None => assert_eq!((placement.offset, placement.emulated), (0, false), "{name}"),
                }
            }
        }
    }
}
