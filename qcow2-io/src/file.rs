//! A file backend: positional I/O, `fdatasync` for flush, hole punching for discard.

use crate::Storage;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Storage in a host file, read with `pread` and written with `pwrite`.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    writable: bool,
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Self { file, writable })
    }

    /// Creates (or truncates) a file for writing.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self {
            file,
            writable: true,
        })
    }

    /// Wraps an already open file.
    pub fn from_file(file: File, writable: bool) -> Self {
        Self { file, writable }
    }

    /// Whether the file was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// `fallocate(2)` on the file with `mode`.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let l = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        #[allow(unsafe_code)]
        // SAFETY: fallocate takes a valid open descriptor (borrowed from `self.file`, alive for
        // the call) and plain integers; it touches no memory of ours.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Storage for FileStorage {
    fn extent_at(&self, offset: u64) -> io::Result<Option<crate::FileExtent>> {
        let len = self.len()?;
        crate::file_extent_at(&self.file, offset, len).map(Some)
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks().checked_mul(512))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
            match self.file.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.punch_hole(offset, len) {
            Ok(()) => Ok(()),
            // Filesystems without hole punching still get the "reads as zero" contract, but
            // only inside the file: a discard never changes the length (as a punched hole
            // with KEEP_SIZE), and beyond the end already reads as zero.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let file_len = self.len()?;
                if offset >= file_len {
                    return Ok(());
                }
                self.write_zeroes_fallback(offset, len.min(file_len - offset))
            }
            Err(e) => Err(e),
        }
    }

    fn prefetch(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return;
        };
        #[allow(unsafe_code)]
        // SAFETY: posix_fadvise takes a valid open descriptor (borrowed from `self.file`,
        // alive for the call) and plain integers; it touches no memory of ours. It is only
        // a hint: its result is ignored.
        let _ = unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, l, libc::POSIX_FADV_WILLNEED)
        };
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(0, offset, len) {
            Ok(()) => Ok(()),
            // Without fallocate the range is at least covered (sparse), as QEMU's falloc
            // mode cannot do better there either.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let end = offset.checked_add(len).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "offset overflow")
                })?;
                if self.len()? < end {
                    self.set_len(end)?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn zero_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
            Ok(()) => Ok(true),
            // Filesystems without ZERO_RANGE: nothing was changed; the caller writes.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            // An empty range changes nothing, not even the length (as an empty `pwrite`).
            return Ok(());
        }
        let file_len = self.len()?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflow"))?;
        if offset >= file_len {
            // Beyond the end already reads as zero; only the length has to follow.
            return if end > file_len {
                self.set_len(end)
            } else {
                Ok(())
            };
        }
        let inside_end = end.min(file_len);
        if self.punch_hole(offset, inside_end - offset).is_err() {
            self.write_zeroes_fallback(offset, inside_end - offset)?;
        }
        if end > file_len {
            self.set_len(end)?;
        }
        Ok(())
    }
}

impl FileStorage {
    fn write_zeroes_fallback(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_zeroing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let s = FileStorage::create(&path).unwrap();
        s.write_at(&[7u8; 8192], 0).unwrap();
        s.flush().unwrap();
        s.write_zeroes(4096, 4096).unwrap();
        let mut b = [1u8; 8192];
        s.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 7));
        assert!(b[4096..].iter().all(|&x| x == 0));
        s.discard(0, 4096).unwrap();
        s.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(s.len().unwrap(), 8192);
        let mut tail = [5u8; 16];
        s.read_at(&mut tail, 8190).unwrap();
        assert_eq!(tail, [0u8; 16]);
        s.write_zeroes(8192, 100).unwrap();
        assert_eq!(s.len().unwrap(), 8292);
    }

    #[test]
    fn empty_ranges_and_discards_keep_the_length() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(dir.path().join("f")).unwrap();
        s.write_at(&[7u8; 100], 0).unwrap();
        s.write_zeroes(10_000, 0).unwrap();
        s.discard(50, 10_000).unwrap();
        s.discard(20_000, 512).unwrap();
        assert_eq!(s.len().unwrap(), 100);
        let mut b = [1u8; 100];
        s.read_at(&mut b, 0).unwrap();
        assert!(b[..50].iter().all(|&x| x == 7) && b[50..].iter().all(|&x| x == 0));
    }
}
