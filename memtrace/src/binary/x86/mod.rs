//! x86-64 machine code as memtrace reads it, on iced-x86: decoding bytes at
//! an address, an instruction's AT&T text, the general registers it writes
//! (by [`Reg`], the one register vocabulary the kernel side shares), the
//! memory it writes, and the small load and store patterns the finders of
//! inlined code and of pymalloc's statics match; `text` holds a whole
//! binary's `.text`, decoded function by function. Probe placement, those
//! finders and the pymalloc locator all read code through this module.

mod text;

use iced_x86::{
    Code, Decoder, DecoderOptions, Formatter as _, GasFormatter, Instruction, InstructionInfoFactory, OpAccess, OpKind,
    Register, SymbolResolver, SymbolResult, UsedMemory,
};
pub use memtrace_common::Reg;
pub use text::Text;

/// Decodes `code` as 64-bit code whose first byte is at address `ip`, to
/// its end; bytes that are no instruction come out as invalid ones
/// (`Code::INVALID`), so that the instructions after them still follow.
pub fn decode(code: &[u8], ip: u64) -> impl Iterator<Item = Instruction> + '_ {
    Decoder::with_ip(64, code, ip, DecoderOptions::NONE).into_iter()
}

/// The instruction at the start of `code`, whose first byte is at address
/// `ip`; None when the bytes are not a valid instruction, are cut short, or
/// are one that Intel and AMD CPUs decode differently (a 0x66-prefixed
/// near branch is rel16 on AMD, rel32 on Intel): its length, and so what
/// follows, would be a guess.
pub fn decode_one(code: &[u8], ip: u64) -> Option<Instruction> {
    let intel = Decoder::with_ip(64, code, ip, DecoderOptions::NONE).decode();
    let amd = Decoder::with_ip(64, code, ip, DecoderOptions::AMD).decode();
    (!intel.is_invalid() && intel.code() == amd.code() && intel.len() == amd.len()).then_some(intel)
}

/// `ins` in AT&T syntax as objdump spells it, but with branch targets
/// relative to `origin` (`je <+0xc8>`, `jmp <-0x74d38>`), where addresses
/// would say nothing to a reader of a function's placement. Prefixes the
/// CPU ignores are shown (`nopw %cs:0x0(%rax,%rax)`): uprobes refuse some.
pub fn att(ins: &Instruction, origin: u64) -> String {
    let mut formatter = GasFormatter::with_options(Some(Box::new(Relative(origin))), None);
    let options = formatter.options_mut();
    options.set_uppercase_hex(false);
    options.set_small_hex_numbers_in_decimal(false);
    options.set_space_after_operand_separator(false);
    options.set_rip_relative_addresses(true);
    options.set_show_zero_displacements(true);
    options.set_show_branch_size(false);
    options.set_show_useless_prefixes(true);
    let mut text = String::new();
    formatter.format(ins, &mut text);
    text
}

/// Names near branch targets by their distance from a function's start.
struct Relative(u64);

impl SymbolResolver for Relative {
    fn symbol(
        &mut self,
        ins: &Instruction,
        _operand: u32,
        ins_operand: Option<u32>,
        address: u64,
        _address_size: u32,
    ) -> Option<SymbolResult<'_>> {
        let kind = ins.op_kind(ins_operand?);
        if !matches!(kind, OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64) {
            return None;
        }
        let distance = address.wrapping_sub(self.0) as i64;
        let text = match distance {
            ..0 => format!("<-{:#x}>", distance.unsigned_abs()),
            _ => format!("<+{distance:#x}>"),
        };
        Some(SymbolResult::with_string(address, text))
    }
}

/// The general register `register` names, when it is a 64-bit one (rax,
/// not eax; rsp included).
pub fn gpr(register: Register) -> Option<Reg> {
    Some(match register {
        Register::RAX => Reg::Rax,
        Register::RCX => Reg::Rcx,
        Register::RDX => Reg::Rdx,
        Register::RBX => Reg::Rbx,
        Register::RSP => Reg::Rsp,
        Register::RBP => Reg::Rbp,
        Register::RSI => Reg::Rsi,
        Register::RDI => Reg::Rdi,
        Register::R8 => Reg::R8,
        Register::R9 => Reg::R9,
        Register::R10 => Reg::R10,
        Register::R11 => Reg::R11,
        Register::R12 => Reg::R12,
        Register::R13 => Reg::R13,
        Register::R14 => Reg::R14,
        Register::R15 => Reg::R15,
        _ => return None,
    })
}

/// iced's name of the 64-bit general register `reg`: `gpr`'s inverse.
pub fn register(reg: Reg) -> Register {
    const BY_NUMBER: [Register; 16] = [
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RBX,
        Register::RSP,
        Register::RBP,
        Register::RSI,
        Register::RDI,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    BY_NUMBER[reg.number() as usize]
}

/// Whether `access` may change the operand.
fn writes(access: OpAccess) -> bool {
    matches!(access, OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite)
}

/// The general registers `ins` may change, whole (a write to %dh changes
/// rdx), implicit operands included: what iced's instruction info lists.
pub fn written(ins: &Instruction) -> Vec<Reg> {
    let mut info = InstructionInfoFactory::new();
    let used = info.info(ins).used_registers();
    used.iter().filter(|used| writes(used.access())).filter_map(|used| gpr(used.register().full_register())).collect()
}

/// Whether `ins` may change any part of the 64-bit general `register`.
pub fn writes_register(ins: &Instruction, register: Register) -> bool {
    gpr(register).is_some_and(|reg| written(ins).contains(&reg))
}

/// The memory operands `ins` may write.
pub fn memory_writes(ins: &Instruction) -> Vec<UsedMemory> {
    InstructionInfoFactory::new().info(ins).used_memory().iter().filter(|m| writes(m.access())).copied().collect()
}

/// Whether `memory` is `offset(%base)`.
pub fn addresses(memory: &UsedMemory, base: Register, offset: u64) -> bool {
    memory.base() == base
        && memory.index() == Register::None
        && memory.segment() != Register::FS
        && memory.segment() != Register::GS
        && memory.displacement() == offset
}

/// For `mov disp(%base),%register` (64-bit, no index): (base, disp).
pub fn load64(ins: &Instruction, register: Register) -> Option<(Register, u64)> {
    (ins.code() == Code::Mov_r64_rm64
        && ins.op0_register() == register
        && ins.op1_kind() == OpKind::Memory
        && ins.memory_index() == Register::None
        && ins.segment_prefix() == Register::None)
        .then(|| (ins.memory_base(), ins.memory_displacement64()))
}

/// For `mov %value,disp(%base)` (64-bit, no index): (value, disp).
pub fn store64(ins: &Instruction, base: Register) -> Option<(Register, u64)> {
    (ins.code() == Code::Mov_rm64_r64
        && ins.op0_kind() == OpKind::Memory
        && ins.memory_base() == base
        && ins.memory_index() == Register::None
        && ins.segment_prefix() == Register::None)
        .then(|| (ins.op1_register(), ins.memory_displacement64()))
}

/// Whether `register` is used as a memory operand's base in `code`
/// (straight-line, as decoded) before an instruction replaces its value
/// (a plain write: arithmetic on it keeps it an address). Only real
/// accesses count: `lea` and long `nop`s have memory operands too.
pub fn dereferences(code: &[Instruction], register: Register) -> bool {
    let mut info = InstructionInfoFactory::new();
    for ins in code {
        let info = info.info(ins);
        if info
            .used_memory()
            .iter()
            .any(|m| m.access() != OpAccess::NoMemAccess && m.base().full_register() == register)
        {
            return true;
        }
        if info
            .used_registers()
            .iter()
            .any(|r| r.access() == OpAccess::Write && r.register().full_register() == register)
        {
            return false;
        }
    }
    false
}
