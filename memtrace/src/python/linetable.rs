//! Maps a Python frame's instruction offset to its source line, the way the
//! interpreter itself does (`PyCode_Addr2Line`), by decoding the code object's
//! line table as read out of the traced process: `co_lnotab` on CPython 3.8 and
//! 3.9, the 3.10 `co_linetable`, and the 3.11+ location table. The bytes come
//! from another process's memory and may be torn or garbage, so every decoder
//! is bounded by the table's length and answers `None` rather than panicking.

/// Which line-number table format a code object carries (each version's
/// is in its layout table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineTableFormat {
    /// `co_lnotab` of CPython 3.8 and 3.9.
    Lnotab,
    /// `co_linetable` of CPython 3.10.
    LineTable310,
    /// The location table (`co_linetable`) of CPython 3.11 and later.
    Locations,
}

/// The source line of the instruction at `byte_offset` (offset in bytes into co_code,
/// i.e. into the bytecode array; for 3.11+ this is code-unit index * 2), or None when the
/// table says the instruction has no line (3.10+: line "None") or the table is malformed.
///
/// Like CPython, an `Lnotab` lookup past the last entry yields the last line (the table
/// does not record where the bytecode ends), while 3.10+ tables cover the bytecode
/// exactly, so offsets past them yield `None`.
pub fn line_for_offset(format: LineTableFormat, firstlineno: i32, table: &[u8], byte_offset: u32) -> Option<i32> {
    match format {
        LineTableFormat::Lnotab => lnotab_line(firstlineno, table, byte_offset),
        LineTableFormat::LineTable310 => line_in_spans(linetable310_spans(firstlineno, table), byte_offset),
        LineTableFormat::Locations => line_in_spans(location_spans(firstlineno, table), byte_offset),
    }
}

/// The table cannot be decoded at this point.
struct Malformed;

/// `len` consecutive bytes of bytecode sharing one line (`None`: no line).
struct Span {
    len: u32,
    line: Option<i32>,
}

/// 3.8/3.9: (unsigned address delta, signed line delta) pairs; each line delta
/// takes effect at the address reached so far (`PyCode_Addr2Line` before 3.10).
fn lnotab_line(firstlineno: i32, table: &[u8], byte_offset: u32) -> Option<i32> {
    let mut line = firstlineno;
    let mut addr = 0u64;
    // CPython reads len / 2 pairs, so a stray odd byte is ignored there too.
    for pair in table.chunks_exact(2) {
        addr += u64::from(pair[0]);
        if addr > u64::from(byte_offset) {
            break;
        }
        line = line.checked_add(i32::from(pair[1] as i8))?;
    }
    Some(line)
}

/// Walks spans from offset 0 to the one holding `byte_offset`, the forward half of
/// `_PyCode_CheckLineNumber` (the backward half never runs for a fresh lookup).
fn line_in_spans(spans: impl Iterator<Item = Result<Span, Malformed>>, byte_offset: u32) -> Option<i32> {
    let mut end = 0u32;
    for span in spans {
        let span = span.ok()?;
        end = end.checked_add(span.len)?;
        if byte_offset < end {
            return span.line;
        }
    }
    None
}

/// 3.10: (unsigned byte length, signed line delta) pairs. Zero-length pairs
/// carry line deltas too large for one byte; -128 marks a line-less span and,
/// unlike a real delta, leaves the running line untouched.
fn linetable310_spans(firstlineno: i32, table: &[u8]) -> impl Iterator<Item = Result<Span, Malformed>> {
    const NO_LINE: i8 = -128;
    let mut computed = firstlineno;
    table.chunks_exact(2).map(move |pair| {
        let delta = pair[1] as i8;
        let line = if delta == NO_LINE {
            None
        } else {
            computed = computed.checked_add(delta.into()).ok_or(Malformed)?;
            Some(computed)
        };
        Ok(Span { len: pair[0].into(), line })
    })
}

/// 3.11+: entries start with a byte with bit 7 set (bits 3-6: code, bits 0-2:
/// length in code units - 1), followed by bytes with bit 7 clear. Like CPython,
/// entries are delimited by that bit rather than by parsing their payload, since
/// only the start-line delta matters here.
fn location_spans(firstlineno: i32, table: &[u8]) -> impl Iterator<Item = Result<Span, Malformed>> {
    let mut computed = firstlineno;
    let mut rest = table;
    std::iter::from_fn(move || {
        let (&head, tail) = rest.split_first()?;
        let payload_len = tail.iter().position(|b| b & 0x80 != 0).unwrap_or(tail.len());
        let (payload, next) = tail.split_at(payload_len);
        rest = next;
        Some(location_entry(head, payload, &mut computed))
    })
}

fn location_entry(head: u8, payload: &[u8], computed: &mut i32) -> Result<Span, Malformed> {
    const NO_COLUMNS: u8 = 13;
    const LONG: u8 = 14;
    const NO_LOCATION: u8 = 15;
    if head & 0x80 == 0 {
        return Err(Malformed);
    }
    let code = (head >> 3) & 15;
    let delta = match code {
        // The one-line forms encode their line delta in the code itself.
        10..=12 => i32::from(code - 10),
        NO_COLUMNS | LONG => svarint(payload)?,
        // Short forms stay on the line; "no location" does not move it either.
        _ => 0,
    };
    *computed = computed.checked_add(delta).ok_or(Malformed)?;
    Ok(Span { len: (u32::from(head & 7) + 1) * 2, line: (code != NO_LOCATION).then_some(*computed) })
}

/// A signed varint: 6-bit chunks, least significant first, bit 6 meaning "more
/// follows"; the lowest bit of the result is the sign, the rest the magnitude.
fn svarint(bytes: &[u8]) -> Result<i32, Malformed> {
    let mut value = 0u32;
    // Bits shifted past 32 are dropped, as by CPython's `unsigned int`; a seventh
    // chunk cannot come from CPython.
    for (shift, &byte) in (0..32).step_by(6).zip(bytes) {
        value |= u32::from(byte & 63) << shift;
        if byte & 64 == 0 {
            let magnitude = (value >> 1) as i32;
            return Ok(if value & 1 == 1 { -magnitude } else { magnitude });
        }
    }
    Err(Malformed)
}

#[cfg(test)]
mod tests {
    use super::LineTableFormat::{LineTable310, Lnotab, Locations};
    use super::*;

    fn lines(format: LineTableFormat, first: i32, table: &[u8], offsets: &[u32]) -> Vec<Option<i32>> {
        offsets.iter().map(|&o| line_for_offset(format, first, table, o)).collect()
    }

    #[test]
    fn lnotab_by_hand() {
        // +1 at 2; a 300-byte stretch split as 255 + 45; +200 split as 127 + 73;
        // -138 split as -128 + -10.
        let table = [2, 1, 255, 0, 45, 127, 0, 73, 4, 0x80, 0, 0xf6];
        assert_eq!(
            lines(Lnotab, 1000, &table, &[0, 1, 2, 300, 302, 304, 306, 10_000]),
            [1000, 1000, 1001, 1001, 1201, 1201, 1063, 1063].map(Some)
        );
        assert_eq!(line_for_offset(Lnotab, 7, &[], 40), Some(7));
    }

    #[test]
    fn linetable310_by_hand() {
        // 6 bytes at +1; a zero-length +3; 4 line-less bytes; 8 bytes at -2 from the
        // running line, which the line-less span did not move.
        let table = [6, 1, 0, 3, 4, 0x80, 8, 0xfe];
        assert_eq!(
            lines(LineTable310, 5, &table, &[0, 4, 6, 8, 10, 16, 18]),
            [Some(6), Some(6), None, None, Some(7), Some(7), None]
        );
    }

    #[test]
    fn locations_by_hand() {
        let table = [
            0x80, 0x04, // short form, 1 unit, same line
            0xda, 0x04, 0x09, // one-line form +1, 3 units
            0xf8, // no location, 1 unit
            0xf1, 0x0b, 0x00, 0x01, 0x05, // long form -5, 2 units
            0xef, 0x50, 0x06, // no columns +200 (two-chunk varint), 8 units
            0xc8, 0x12, // short form, 1 unit
        ];
        assert_eq!(
            lines(Locations, 20, &table, &[0, 2, 6, 8, 10, 12, 14, 28, 30, 32]),
            [Some(20), Some(21), Some(21), None, Some(16), Some(16), Some(216), Some(216), Some(216), None]
        );
    }

    #[test]
    fn malformed_tables() {
        // A stray odd byte is ignored, as CPython does.
        assert_eq!(line_for_offset(Lnotab, 1, &[2, 1, 7], 4), Some(2));
        assert_eq!(line_for_offset(Lnotab, i32::MAX, &[0, 1], 0), None);
        assert_eq!(lines(LineTable310, 1, &[6, 1, 4], &[2, 8]), [Some(2), None]);
        assert_eq!(line_for_offset(LineTable310, i32::MIN, &[2, 0xff], 0), None);
        assert_eq!(line_for_offset(Locations, 1, &[], 0), None);
        // Not starting at an entry, truncated long form, unterminated and overlong varints.
        assert_eq!(line_for_offset(Locations, 1, &[0x05, 0x80], 0), None);
        assert_eq!(line_for_offset(Locations, 1, &[0xf1], 0), None);
        assert_eq!(line_for_offset(Locations, 1, &[0xf1, 0x41, 0x41], 0), None);
        assert_eq!(line_for_offset(Locations, 1, &[0xe8, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x01], 0), None);
        assert_eq!(line_for_offset(Locations, i32::MAX, &[0xd8, 0, 0], 0), None);
        // Garbage after the entry holding the offset does not matter.
        assert_eq!(line_for_offset(Locations, 3, &[0x80, 0x00, 0xf1], 0), Some(3));
        for format in [Lnotab, LineTable310, Locations] {
            assert!(line_for_offset(format, 1, &[0xff; 7], u32::MAX).is_none_or(|l| l < 1));
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let table: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            let first = next() as i32;
            for format in [Lnotab, LineTable310, Locations] {
                for offset in [0, next() as u32 % 512, next() as u32, u32::MAX] {
                    line_for_offset(format, first, &table, offset);
                }
            }
        }
    }
}
