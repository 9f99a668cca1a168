//! Where a file holds data: `lseek(SEEK_DATA / SEEK_HOLE)`, as QEMU's file driver answers
//! block-status queries of raw images.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// What the file system reports for the bytes from an offset on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileExtent {
    /// Data up to (excluding) the given offset.
    Data(u64),
    /// A hole (reads as zeros) up to the given offset.
    Hole(u64),
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    #[allow(unsafe_code)]
    // SAFETY: lseek takes a file descriptor that `file` keeps open for the duration of the
    // call and plain integers; it touches no memory of ours.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data (SEEK_DATA) or offset at/after the end.
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    u64::try_from(r)
        .map(Some)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The extent of `file` that starts at `offset` (below `len`, the file length): data or a
/// hole, and where it ends (at most `len`). A file system without hole support reports
/// everything as data.
pub fn file_extent_at(file: &File, offset: u64, len: u64) -> io::Result<FileExtent> {
    if offset >= len {
        return Ok(FileExtent::Hole(offset));
    }
    match lseek(file, offset, libc::SEEK_DATA) {
        Ok(None) => Ok(FileExtent::Hole(len)),
        Ok(Some(d)) if d > offset => Ok(FileExtent::Hole(d.min(len))),
        Ok(Some(_)) => {
            let end = match lseek(file, offset, libc::SEEK_HOLE)? {
                Some(h) if h > offset => h.min(len),
                _ => len,
            };
            Ok(FileExtent::Data(end))
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
            ) =>
        {
            Ok(FileExtent::Data(len))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn data_and_holes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 256 << 10).unwrap();
        let len = 1 << 20;
        match file_extent_at(&f, 0, len).unwrap() {
            // Some file systems (tmpfs, ext4) report the hole; others only data.
            FileExtent::Hole(end) => {
                assert_eq!(end, 256 << 10);
                assert!(matches!(
                    file_extent_at(&f, end, len).unwrap(),
                    FileExtent::Data(e) if e > end
                ));
            }
            FileExtent::Data(end) => assert_eq!(end, len),
        }
        assert_eq!(file_extent_at(&f, len, len).unwrap(), FileExtent::Hole(len));
    }
}
