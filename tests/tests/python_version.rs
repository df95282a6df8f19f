//! memtrace's reading of a CPython binary's version against the
//! interpreters themselves: every pyenv build from 2.7 to 3.13 and Debian's
//! LTO, stripped python3.11 must be given the version it reports, from
//! `Py_Version` where 3.11+ exports it and from the PY_VERSION string its
//! code confirms; a launcher that only loads libpython must be given none.

use std::{path::Path, process::Command};

use memtrace::{binary::elf::ElfFile, python::version::Version};

const fn v(major: u8, minor: u8, micro: u8) -> Version {
    Version { major, minor, micro }
}

/// What the interpreter says it is.
fn run(python: &Path) -> Version {
    let output = Command::new(python)
        .args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", python.display()));
    let text = String::from_utf8(output.stdout).unwrap();
    let parts: Vec<u8> = text.trim().split('.').map(|part| part.parse().unwrap()).collect();
    v(parts[0], parts[1], parts[2])
}

/// The value of `Py_Version`, `.rodata` and `.text` of an ELF file.
fn read_binary(path: &Path) -> (Option<u32>, Vec<u8>, Vec<u8>) {
    let elf = ElfFile::open(path).unwrap_or_else(|error| panic!("{error:#}"));
    let py_version = elf.symbol("Py_Version").map(|symbol| {
        let bytes = elf.bytes_at(symbol.vaddr, 4).expect("Py_Version is initialised data");
        u32::from_le_bytes(bytes.try_into().unwrap())
    });
    (py_version, elf.sections(&[".rodata"]).concat(), elf.sections(&[".text"]).concat())
}

#[test]
fn finds_the_version_of_every_installed_interpreter() {
    let pyenv = Path::new("/root/.pyenv/versions");
    let mut binaries: Vec<_> = [
        ("2.7.18", "libpython2.7.so.1.0"),
        ("3.6.15", "libpython3.6m.so.1.0"),
        ("3.7.16", "libpython3.7m.so.1.0"),
        ("3.8.18", "libpython3.8.so.1.0"),
        ("3.9.18", "libpython3.9.so.1.0"),
        ("3.10.13", "libpython3.10.so.1.0"),
        ("3.11.7", "libpython3.11.so.1.0"),
        ("3.12.1", "libpython3.12.so.1.0"),
        ("3.13.0", "libpython3.13.so.1.0"),
    ]
    .into_iter()
    .map(|(version, library)| (pyenv.join(version).join("bin/python"), pyenv.join(version).join("lib").join(library)))
    .collect();
    // Debian's: LTO, stripped, libpython linked in, and Unicode 3.2.0's version string beside its own.
    binaries.push(("/usr/bin/python3.11".into(), "/usr/bin/python3.11".into()));
    for (python, binary) in binaries {
        let expected = run(&python);
        let (py_version, rodata, text) = read_binary(&binary);
        let name = binary.display();
        assert_eq!(py_version.is_some(), expected >= v(3, 11, 0), "{name}: Py_Version");
        if let Some(hex) = py_version {
            assert_eq!(Version::from_hex(hex), Some(expected), "{name}: Py_Version");
        }
        assert_eq!(Version::from_version_string(&rodata, &text), Some(expected), "{name}: version string");
    }
}

#[test]
fn a_launcher_without_the_interpreter_says_nothing() {
    // pyenv's bin/python3.9 only loads libpython3.9.so: no version in it.
    let (py_version, rodata, text) = read_binary(Path::new("/root/.pyenv/versions/3.9.18/bin/python3.9"));
    assert_eq!(py_version, None);
    assert_eq!(Version::from_version_string(&rodata, &text), None);
}
