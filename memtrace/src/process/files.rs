//! Reads a file a target names (a binary it maps, a source file its code
//! objects name), which the target may have replaced by anything: only a
//! regular file is read, opened without blocking (a FIFO left where the
//! file was would block open and read forever; a device such as /dev/zero
//! never ends), and only up to a size, checked before and while reading.

use std::{
    fs::OpenOptions,
    io::{self, Read as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// The whole of the regular file at `path`, if it holds at most `max` bytes.
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let too_large = || io::Error::new(io::ErrorKind::InvalidData, format!("larger than {max} bytes"));
    if metadata.len() > max {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(metadata.len() as usize);
    // The file may grow while read.
    file.take(max + 1).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(too_large());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_bound_are_read() {
        let dir = std::env::temp_dir().join(format!("memtrace-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_regular(&file, 5).unwrap(), b"12345");
        assert_eq!(read_regular(&file, 4).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let fifo = dir.join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `name` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        assert_eq!(read_regular(&fifo, 1 << 20).unwrap_err().kind(), io::ErrorKind::InvalidInput, "without blocking");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
