//! The placement policy's tests on hand-assembled prologues, each for one
//! rule. The functions of the platform's binaries are the tests crate's
//! `placement` test.

use super::*;
use Reg::{Rdi, Rsi};

fn free_like(code: &[u8], reg: Reg) -> Placement {
    entry_only(code, &[reg], Some(reg))
}

/// Bytes written as hex pairs separated by white space.
fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
}

#[test]
fn an_emulated_entry_stays() {
    let p = free_like(&hex("55 48 85 ff 74 02 53"), Rdi);
    assert_eq!((p.offset, p.emulated, p.reason.as_str()), (0, true, "the entry instruction is emulated"));
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
    assert_eq!(at_entry(&cs_nopw).instruction, "nopw %cs:0x0(%rax,%rax)");
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
    // 66 jcc rel8: not emulated (the kernel refuses the probe), nor decoded
    // (AMD truncates its target to 16 bits).
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
    // 0x06 (push %es) is no instruction in 64-bit code.
    let p = free_like(&hex("06 55"), Rdi);
    assert_eq!((p.offset, p.emulated, p.instruction.as_str()), (0, false, "(not decoded: 06 55)"));
    let p = free_like(&hex("48 89 c3 06 55"), Rdi);
    assert_eq!((p.offset, p.reason.as_str()), (0, "single-stepped at entry: +0x3 is not decoded"));
    // ud2 decodes, and ends the straight line.
    let p = free_like(&hex("0f 0b 55"), Rdi);
    assert_eq!((p.offset, p.reason.as_str()), (0, "single-stepped at entry: +0x0 `ud2` ends the straight-line code"));
}

#[test]
fn an_xchg_the_kernel_takes_for_a_nop_is_neither_spot_nor_passed() {
    // 41 90 is xchg %eax,%r8d; the kernel "emulates" any 0x90 as a NOP.
    let p = free_like(&hex("41 90 55"), Rdi);
    assert_eq!((p.offset, p.emulated, p.instruction.as_str()), (0, false, "(not decoded: 41 90 55)"));
    assert_eq!(entry_only(&hex("48 89 c3 41 90 55"), &[], None).reason, "single-stepped at entry: +0x3 is not decoded");
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
