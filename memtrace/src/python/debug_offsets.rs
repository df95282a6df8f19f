//! CPython 3.13 starts `_PyRuntime` with `_Py_DebugOffsets`: the cookie
//! "xdebugpy", PY_VERSION_HEX, then the offsets of the interpreter's own
//! fields, written by the build that uses them. Reading the layout from there
//! instead of from [`super::layouts::PY313`] keeps memtrace right on a 3.13.x
//! whose structures moved. Only what those offsets do not say (how frames
//! store the instruction, the C-stack owner value, and the gaps between two
//! neighbouring fields of which only one is listed) comes from the table. The
//! struct itself changes with every minor version, so only 3.13's is read.

use std::fmt;

use super::layouts::{Chain, Layout, PY313};

pub const COOKIE: &[u8; 8] = b"xdebugpy";

/// Bytes from the start of `_PyRuntime` that [`parse`] needs: sizeof(_Py_DebugOffsets) in 3.13.
pub const LEN: usize = 584;

// Byte offsets, within 3.13's `_Py_DebugOffsets`, of the members read, named
// after them (RUNTIME_INTERPRETERS_HEAD is `runtime_state.interpreters_head`).
const VERSION: usize = 8;
const FREE_THREADED: usize = 16;
const RUNTIME_INTERPRETERS_HEAD: usize = 40;
const INTERP_THREADS_HEAD: usize = 72;
const INTERP_CEVAL_GIL: usize = 112;
const INTERP_GIL_RUNTIME_STATE: usize = 120;
const INTERP_GIL_RUNTIME_STATE_HOLDER: usize = 144;
const TSTATE_NEXT: usize = 168;
const TSTATE_CURRENT_FRAME: usize = 184;
const TSTATE_THREAD_ID: usize = 192;
const FRAME_PREVIOUS: usize = 232;
const FRAME_EXECUTABLE: usize = 240;
const FRAME_INSTR_PTR: usize = 248;
const FRAME_OWNER: usize = 264;
const CODE_FILENAME: usize = 280;
const CODE_NAME: usize = 288;
const CODE_QUALNAME: usize = 296;
const CODE_LINETABLE: usize = 304;
const CODE_FIRSTLINENO: usize = 312;
const CODE_CO_CODE_ADAPTIVE: usize = 344;
const BYTES_OB_SIZE: usize = 520;
const BYTES_OB_SVAL: usize = 528;
const UNICODE_STATE: usize = 544;
const UNICODE_LENGTH: usize = 552;
const UNICODE_ASCIIOBJECT_SIZE: usize = 560;

/// Only `interpreters.head` is listed, but memtrace follows the main
/// interpreter's GIL; `struct pyinterpreters` is { mutex, head, main, next_id }.
const MAIN_AFTER_HEAD: u64 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Fewer than [`LEN`] bytes were given.
    Short(usize),
    /// The bytes do not start with [`COOKIE`]: not the start of a 3.13+ `_PyRuntime`.
    NoCookie,
    /// Debug offsets of another version, whose struct this memtrace cannot read.
    Version { major: u8, minor: u8 },
    /// A free-threaded build: no GIL, so no holder to follow, and other object headers.
    FreeThreaded,
    /// Offsets no build writes (the GIL's holder before the GIL, or past the address space).
    Malformed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Short(len) => write!(f, "_Py_DebugOffsets needs {LEN} bytes, got {len}"),
            Error::NoCookie => write!(f, "_PyRuntime does not start with the \"xdebugpy\" cookie"),
            Error::Version { major, minor } => {
                write!(f, "_Py_DebugOffsets of Python {major}.{minor} are not understood (only 3.13's are)")
            }
            Error::FreeThreaded => write!(f, "free-threaded Python builds are not supported"),
            Error::Malformed => write!(f, "_Py_DebugOffsets hold impossible offsets"),
        }
    }
}

impl std::error::Error for Error {}

/// Whether CPython `major.minor` starts `_PyRuntime` with debug offsets,
/// and so is to be read with [`parse`] rather than from a table. [`parse`]
/// refuses those after 3.13, whose struct it does not know, with [`Error::Version`].
pub fn applies(major: u8, minor: u8) -> bool {
    (major, minor) >= PY313.version
}

/// The layout described by the `_Py_DebugOffsets` at the start of `bytes`
/// (the first [`LEN`] bytes of `_PyRuntime`, from the file's initializer or
/// the process). Values are little-endian, as on every target memtrace runs on.
pub fn parse(bytes: &[u8]) -> Result<Layout, Error> {
    if bytes.len() < LEN {
        return Err(Error::Short(bytes.len()));
    }
    if &bytes[..COOKIE.len()] != COOKIE {
        return Err(Error::NoCookie);
    }
    let at = |offset: usize| u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"));
    let hex = at(VERSION);
    let version = ((hex >> 24) as u8, (hex >> 16) as u8);
    if version != PY313.version {
        return Err(Error::Version { major: version.0, minor: version.1 });
    }
    if at(FREE_THREADED) != 0 {
        return Err(Error::FreeThreaded);
    }
    // The interpreter's own `_gil` is listed, but a subinterpreter sharing
    // the main GIL points `ceval.gil` elsewhere, so follow the pointer and
    // take only the holder's place inside the GIL from the inline copy.
    let holder_in_gil =
        at(INTERP_GIL_RUNTIME_STATE_HOLDER).checked_sub(at(INTERP_GIL_RUNTIME_STATE)).ok_or(Error::Malformed)?;
    let main = at(RUNTIME_INTERPRETERS_HEAD).checked_add(MAIN_AFTER_HEAD).ok_or(Error::Malformed)?;
    // PyCompactUnicodeObject is PyASCIIObject plus utf8_length and utf8.
    let compact_data = at(UNICODE_ASCIIOBJECT_SIZE)
        .checked_add(PY313.unicode_compact_data - PY313.unicode_ascii_data)
        .ok_or(Error::Malformed)?;
    Ok(Layout {
        version,
        tstate_chain: Chain::new(&[main, at(INTERP_CEVAL_GIL), holder_in_gil]),
        tstate_thread_id: at(TSTATE_THREAD_ID),
        threads_chain: Chain::new(&[at(RUNTIME_INTERPRETERS_HEAD), at(INTERP_THREADS_HEAD)]),
        tstate_next: at(TSTATE_NEXT),
        frame_chain: Chain::new(&[at(TSTATE_CURRENT_FRAME)]),
        frame_code: at(FRAME_EXECUTABLE),
        frame_previous: at(FRAME_PREVIOUS),
        frame_instr: at(FRAME_INSTR_PTR),
        frame_owner_cstack: PY313.frame_owner_cstack.map(|(_, cstack)| (at(FRAME_OWNER), cstack)),
        code_filename: at(CODE_FILENAME),
        code_name: at(CODE_NAME),
        code_qualname: Some(at(CODE_QUALNAME)),
        code_firstlineno: at(CODE_FIRSTLINENO),
        code_linetable: at(CODE_LINETABLE),
        code_bytecode: at(CODE_CO_CODE_ADAPTIVE),
        bytes_size: at(BYTES_OB_SIZE),
        bytes_data: at(BYTES_OB_SVAL),
        unicode_length: at(UNICODE_LENGTH),
        unicode_state: at(UNICODE_STATE),
        unicode_ascii_data: at(UNICODE_ASCIIOBJECT_SIZE),
        unicode_compact_data: compact_data,
        ..PY313
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debug offsets as a 3.13 build would write them for the 3.13 table.
    fn blob() -> Vec<u8> {
        let mut bytes = vec![0; LEN];
        bytes[..8].copy_from_slice(COOKIE);
        let gil = 7752;
        let [main, ceval_gil, holder] = PY313.tstate_chain[..] else { panic!("3.13 follows the GIL in three steps") };
        for (offset, value) in [
            (VERSION, 0x030d_00f0),
            (RUNTIME_INTERPRETERS_HEAD, main - MAIN_AFTER_HEAD),
            (INTERP_THREADS_HEAD, PY313.threads_chain[1]),
            (INTERP_CEVAL_GIL, ceval_gil),
            (INTERP_GIL_RUNTIME_STATE, gil),
            (INTERP_GIL_RUNTIME_STATE_HOLDER, gil + holder),
            (TSTATE_NEXT, PY313.tstate_next),
            (TSTATE_CURRENT_FRAME, PY313.frame_chain[0]),
            (TSTATE_THREAD_ID, PY313.tstate_thread_id),
            (FRAME_PREVIOUS, PY313.frame_previous),
            (FRAME_EXECUTABLE, PY313.frame_code),
            (FRAME_INSTR_PTR, PY313.frame_instr),
            (FRAME_OWNER, PY313.frame_owner_cstack.unwrap().0),
            (CODE_FILENAME, PY313.code_filename),
            (CODE_NAME, PY313.code_name),
            (CODE_QUALNAME, PY313.code_qualname.unwrap()),
            (CODE_LINETABLE, PY313.code_linetable),
            (CODE_FIRSTLINENO, PY313.code_firstlineno),
            (CODE_CO_CODE_ADAPTIVE, PY313.code_bytecode),
            (BYTES_OB_SIZE, PY313.bytes_size),
            (BYTES_OB_SVAL, PY313.bytes_data),
            (UNICODE_STATE, PY313.unicode_state),
            (UNICODE_LENGTH, PY313.unicode_length),
            (UNICODE_ASCIIOBJECT_SIZE, PY313.unicode_ascii_data),
        ] {
            set(&mut bytes, offset, value);
        }
        bytes
    }

    fn set(bytes: &mut [u8], offset: usize, value: u64) {
        bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn reads_every_field_from_its_place() {
        assert_eq!(parse(&blob()), Ok(PY313));
        // A later 3.13.x whose structures moved is followed, not the table.
        let mut moved = blob();
        set(&mut moved, VERSION, 0x030d_05f0);
        set(&mut moved, TSTATE_THREAD_ID, 160);
        set(&mut moved, UNICODE_ASCIIOBJECT_SIZE, 48);
        let layout = parse(&moved).unwrap();
        assert_eq!(layout.version, (3, 13));
        assert_eq!(layout.tstate_thread_id, 160);
        assert_eq!((layout.unicode_ascii_data, layout.unicode_compact_data), (48, 64));
    }

    #[test]
    fn only_313_and_later_have_them() {
        assert!(!applies(3, 12) && !applies(2, 7));
        assert!(applies(3, 13) && applies(3, 14) && applies(4, 0));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert_eq!(parse(&blob()[..LEN - 1]), Err(Error::Short(LEN - 1)));
        let mut bytes = blob();
        bytes[0] = b'y';
        assert_eq!(parse(&bytes), Err(Error::NoCookie));
        let mut bytes = blob();
        set(&mut bytes, VERSION, 0x030e_00f0);
        assert_eq!(parse(&bytes), Err(Error::Version { major: 3, minor: 14 }));
        let mut bytes = blob();
        set(&mut bytes, FREE_THREADED, 1);
        assert_eq!(parse(&bytes), Err(Error::FreeThreaded));
        let mut bytes = blob();
        set(&mut bytes, INTERP_GIL_RUNTIME_STATE_HOLDER, 8);
        assert_eq!(parse(&bytes), Err(Error::Malformed));
        let mut bytes = blob();
        set(&mut bytes, RUNTIME_INTERPRETERS_HEAD, u64::MAX);
        assert_eq!(parse(&bytes), Err(Error::Malformed));
    }
}
