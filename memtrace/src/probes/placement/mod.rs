//! Where in a function a uprobe goes. Linux on x86-64 emulates a handful of
//! instructions at a probe address (push of a register, its own NOP forms,
//! relative jmp, call and jcc) and single-steps every other one out of line,
//! which costs about ten times as much: a probe on pyenv 3.12's
//! `_PyObject_Free`+0 (`test %rsi,%rsi`, single-stepped) cost 62.5 s over
//! ~6 M hits, the same probe at +9 (`push %r12`, past the NULL check, the
//! argument untouched) 6.5 s. A probe that only reads argument registers at
//! entry may therefore move forward to the first emulated instruction, as long
//! as every call that matters still reaches it with those registers intact.
//! This module finds that spot in the prologue as `binary::x86` decodes it,
//! and keeps the entry for functions that also carry a return probe. Whether
//! the kernel emulates an instruction is read from its bytes, as the kernel
//! reads them.
//!
//! The emulated set is that of `arch/x86/kernel/uprobes.c` in Linux 6.18:
//! `arch_uprobe_analyze_insn()` tries `branch_setup_xol_ops()` (an instruction
//! equal to `x86_nops[len]` for len up to `ASM_NOP_MAX`, or with opcode 0x90;
//! `jmp` rel8/rel32, `call` rel32, `jcc` rel8/rel32, refused outright with a
//! 0x66 prefix), then `push_setup_xol_ops()` (`push %reg`, one byte, or two
//! with REX exactly 0x41), and single-steps anything else. `endbr64` and
//! `mov %rsp,%rbp` are not emulated there. `uprobe_init_insn()` refuses
//! cs, ds, es, ss and lock prefixes altogether.

use iced_x86::{Code, FlowControl, Mnemonic, OpKind, Register};

use crate::binary::x86::{self, Reg};

#[cfg(test)]
mod tests;

/// How far the scan looks, in instructions and bytes: the prologues it is
/// meant for are short, and each instruction skipped is one more whose
/// effects must be read right.
pub const MAX_INSNS: usize = 16;
pub const MAX_BYTES: usize = 64;

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
        let null_check = null_checked.is_some_and(|r| previous == Kind::SelfTest(r));
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
    /// `test %r,%r` on one whole 64-bit register.
    SelfTest(Reg),
    /// `je`/`jz`, which falls through when the tested value was non-zero.
    JumpIfZero,
    /// Another branch, a return or a system call: the scan cannot go past.
    Barrier,
}

struct Insn {
    len: usize,
    text: String,
    /// Registers (bit n for register number n) the instruction may write,
    /// implicitly or only under a condition too, so that a doubt stops the
    /// scan.
    writes: u16,
    kind: Kind,
    emulated: bool,
}

/// `x86_nops[1..=8]` for x86-64 (arch/x86/include/asm/nops.h): the kernel
/// emulates exactly these byte strings, whatever other NOPs look like. Longer
/// kernel NOPs, where defined, carry a cs prefix, which uprobes refuse.
pub const KERNEL_NOPS: [&[u8]; 8] = [
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

/// Decodes the instruction at `code[at..]`, addresses counted from the
/// function's start, or None if it is not a valid instruction whose length
/// every x86-64 CPU agrees on (or runs past the end of `code`).
fn decode(code: &[u8], at: usize) -> Option<Insn> {
    let ins = x86::decode_one(&code[at..], at as u64)?;
    // With REX.B, 0x90 is xchg with r8, which the kernel would still
    // "emulate" as a NOP: never a spot to choose, nor one to pass over.
    if matches!(ins.code(), Code::Xchg_r16_AX | Code::Xchg_r32_EAX | Code::Xchg_r64_RAX)
        && ins.op0_register().full_register() != Register::RAX
    {
        return None;
    }
    let kind = match ins.flow_control() {
        FlowControl::Next
            if ins.code() == Code::Test_rm64_r64
                && ins.op0_kind() == OpKind::Register
                && ins.op0_register() == ins.op1_register() =>
        {
            x86::gpr(ins.op0_register()).map_or(Kind::Plain, Kind::SelfTest)
        }
        FlowControl::Next => Kind::Plain,
        FlowControl::ConditionalBranch if ins.mnemonic() == Mnemonic::Je => Kind::JumpIfZero,
        _ => Kind::Barrier,
    };
    let len = ins.len();
    Some(Insn {
        len,
        text: x86::att(&ins, 0),
        writes: x86::written(&ins).iter().fold(0, |mask, reg| mask | 1 << reg.number()),
        kind,
        emulated: emulated(&code[at..at + len]),
    })
}

/// Legacy prefixes, which may precede a REX prefix and the opcode.
const PREFIXES: [u8; 11] = [0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0x66, 0x67, 0xf0, 0xf2, 0xf3];
/// es, cs, ss, ds and lock, which `uprobe_init_insn()` refuses.
const REFUSED_PREFIXES: [u8; 5] = [0x26, 0x2e, 0x36, 0x3e, 0xf0];

/// Whether the kernel emulates the instruction that is exactly `bytes`,
/// read from its bytes as arch_uprobe_analyze_insn() reads them.
pub fn emulated(bytes: &[u8]) -> bool {
    let (prefixes, rest) = bytes.split_at(bytes.iter().take_while(|b| PREFIXES.contains(b)).count());
    if prefixes.iter().any(|p| REFUSED_PREFIXES.contains(p)) {
        return false;
    }
    if KERNEL_NOPS.contains(&bytes) {
        return true;
    }
    let opcode = match rest {
        [0x40..=0x4f, opcode @ ..] => opcode,
        opcode => opcode,
    };
    match opcode {
        // "prefix* + nop", whatever the prefixes.
        [0x90] => true,
        // Relative jmp, call and jcc, but for 16-bit overrides, which Intel
        // and AMD treat differently.
        [0x70..=0x7f | 0xe8 | 0xe9 | 0xeb, ..] | [0x0f, 0x80..=0x8f, ..] => !prefixes.contains(&0x66),
        // push_setup_xol_ops(): no prefix but REX exactly 0x41.
        _ => matches!(bytes, [0x50..=0x57] | [0x41, 0x50..=0x57]),
    }
}
