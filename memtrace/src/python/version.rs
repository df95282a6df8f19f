//! Which CPython a binary (a `python` executable or a libpython) is, from its
//! bytes alone, so that memtrace picks the right layout or names the version
//! it refuses. 3.11+ exports `Py_Version`, whose value is PY_VERSION_HEX.
//! Older ones only hold the PY_VERSION string ("3.9.18"), often merged by the
//! linker into the tail of another string (the install prefix), among other
//! version-like strings such as the Unicode 3.2.0 database's; a string is
//! believed only when its PY_VERSION_HEX also appears in the machine code,
//! where `sys.hexversion` is built from an immediate.

use std::fmt;

use rustc_hash::FxHashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
    pub micro: u8,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// PY_VERSION_HEX's release-level nibble: alpha, beta, candidate, final.
const LEVELS: [u32; 4] = [0xa, 0xb, 0xc, 0xf];

impl Version {
    /// Decodes PY_VERSION_HEX (`major << 24 | minor << 16 | micro << 8 |
    /// level << 4 | serial`), as `Py_Version` holds it (read its first 4
    /// bytes: it is an `unsigned long`). None when it cannot be one.
    pub fn from_hex(hex: u32) -> Option<Version> {
        let version = Version { major: (hex >> 24) as u8, minor: (hex >> 16) as u8, micro: (hex >> 8) as u8 };
        (version.major != 0 && LEVELS.contains(&((hex >> 4) & 0xf))).then_some(version)
    }

    /// Finds the version of a binary without `Py_Version` (before 3.11)
    /// from its read-only data (`.rodata`, where PY_VERSION is) and its
    /// machine code (`.text`). None when no candidate is confirmed by the
    /// code or when confirmed candidates disagree: memtrace must not guess.
    pub fn from_version_string(rodata: &[u8], text: &[u8]) -> Option<Version> {
        let mut candidates: FxHashMap<u32, Version> = FxHashMap::default();
        for at in 0..rodata.len() {
            // A version string is not the end of a longer number ("13.0.0").
            if at > 0 && (rodata[at - 1].is_ascii_digit() || rodata[at - 1] == b'.') {
                continue;
            }
            if let Some((version, hex)) = version_string(&rodata[at..]) {
                candidates.insert(hex, version);
            }
        }
        // One pass over the code for all of them: a binary (the target's to
        // forge) may hold any number of version-like strings.
        let mut found = None;
        for word in text.windows(4) {
            let Some(&version) = candidates.get(&u32::from_le_bytes(word.try_into().expect("4 bytes"))) else {
                continue;
            };
            match found {
                Some(seen) if seen != version => return None,
                _ => found = Some(version),
            }
        }
        found
    }
}

/// Parses a NUL-terminated `2|3.minor.micro[(a|b|c|rc)serial][+]` at the
/// start of `bytes`, with the PY_VERSION_HEX it stands for.
fn version_string(bytes: &[u8]) -> Option<(Version, u32)> {
    let mut rest = bytes;
    let major = number(&mut rest, 1).filter(|major| matches!(major, 2 | 3))?;
    rest = rest.strip_prefix(b".")?;
    let minor = number(&mut rest, 2)?;
    rest = rest.strip_prefix(b".")?;
    let micro = number(&mut rest, 2)?;
    let mut level = 0xf;
    let mut serial = 0;
    for (prefix, prefix_level) in [(&b"rc"[..], 0xc), (b"a", 0xa), (b"b", 0xb), (b"c", 0xc)] {
        if let Some(after) = rest.strip_prefix(prefix) {
            rest = after;
            level = prefix_level;
            serial = number(&mut rest, 2)?;
            break;
        }
    }
    // A development build after a tag ("3.10.0a1+") keeps the tag's hex.
    rest = rest.strip_prefix(b"+").unwrap_or(rest);
    if rest.first() != Some(&0) {
        return None;
    }
    let hex = u32::from(major) << 24 | u32::from(minor) << 16 | u32::from(micro) << 8 | level << 4 | u32::from(serial);
    Some((Version { major, minor, micro }, hex))
}

/// Takes 1 to `max_digits` decimal digits, and fails if more follow.
fn number(bytes: &mut &[u8], max_digits: usize) -> Option<u8> {
    let digits = bytes.iter().take_while(|byte| byte.is_ascii_digit()).count();
    if digits == 0 || digits > max_digits {
        return None;
    }
    let value = bytes[..digits].iter().fold(0u8, |value, digit| value * 10 + (digit - b'0'));
    *bytes = &bytes[digits..];
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn v(major: u8, minor: u8, micro: u8) -> Version {
        Version { major, minor, micro }
    }

    #[test]
    fn decodes_py_version_hex() {
        assert_eq!(Version::from_hex(0x030b_02f0), Some(v(3, 11, 2)));
        assert_eq!(Version::from_hex(0x030d_00c1), Some(v(3, 13, 0)));
        assert_eq!(Version::from_hex(0x020b_0000), None);
        assert_eq!(Version::from_hex(0), None);
    }

    #[test]
    fn believes_only_strings_the_code_confirms() {
        let text = |hexes: &[u32]| {
            hexes.iter().flat_map(|hex| [0x90, 0xbf].into_iter().chain(hex.to_le_bytes())).collect::<Vec<u8>>()
        };
        // The tail of the install prefix, as linkers merge it.
        let rodata = b"\0/usr/local/3.9.18\0python3.9\0";
        assert_eq!(Version::from_version_string(rodata, &text(&[0x0309_12f0])), Some(v(3, 9, 18)));
        assert_eq!(Version::from_version_string(rodata, &text(&[])), None);
        // Unicode 3.2.0 is a string too, but nothing in the code says 0x030200f0.
        let rodata = b"\0unidata_version\x003.2.0\0 SRE 2.2.2 Copyright\x003.10.0rc2+\0";
        assert_eq!(Version::from_version_string(rodata, &text(&[0x030a_00c2])), Some(v(3, 10, 0)));
        // Two confirmed versions: refuse rather than pick one.
        assert_eq!(Version::from_version_string(rodata, &text(&[0x030a_00c2, 0x0302_00f0])), None);
        // Not a version: a longer number, more digits, no terminator.
        for rodata in [&b"\x0013.0.0\0"[..], b"\x003.9.180\0", b"\x003.123.1\0", b"\x003.9.18 (main"] {
            assert_eq!(Version::from_version_string(rodata, &text(&[0x0300_00f0, 0x0309_b4f0])), None);
        }
    }

    /// A forged binary full of version strings costs one pass over its
    /// code, not one per string (20,000 passes over 4 MiB here).
    #[test]
    fn many_candidates_cost_one_pass() {
        let rodata: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("\x003.{}.{}a{}\0", i % 100, i / 100 % 100, i / 10_000).into_bytes())
            .collect();
        let text = vec![0x90; 4 << 20];
        let started = std::time::Instant::now();
        assert_eq!(Version::from_version_string(&rodata, &text), None);
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
