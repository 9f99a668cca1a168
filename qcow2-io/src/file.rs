//! A file backend: positional I/O, `fdatasync` for flush, hole punching for discard, and
//! QEMU's image locks (see [`crate::lock`]).

use crate::lock::{self, LockError, LockState, Locking, Perms};
use crate::Storage;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Offset, length and memory alignment of the requests that bypass the page cache in
/// [`FileStorage::open_direct`] (the largest logical block size of common disks).
pub const DIRECT_ALIGN: usize = 4096;

/// QEMU's cache modes (`-t`/`cache=`): whether the host page cache is bypassed
/// (`O_DIRECT`), whether every write is durable when it returns (`O_DSYNC`), and whether
/// flushes reach the disk at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Page cache; durable at flush (QEMU's default).
    #[default]
    Writeback,
    /// `O_DIRECT`; durable at flush.
    None,
    /// Page cache, `O_DSYNC`: durable when each write returns.
    Writethrough,
    /// `O_DIRECT` and `O_DSYNC`.
    DirectSync,
    /// Page cache; flushes are ignored (a crash may lose everything since open).
    Unsafe,
}

impl CacheMode {
    /// The mode named as QEMU names it (`none`, `off`, `writeback`, `writethrough`,
    /// `directsync`, `unsafe`); `None` for anything else.
    pub fn parse(name: &str) -> Option<CacheMode> {
        Some(match name {
            "writeback" => CacheMode::Writeback,
            "none" | "off" => CacheMode::None,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::DirectSync,
            "unsafe" => CacheMode::Unsafe,
            _ => return None,
        })
    }

    /// Whether aligned requests bypass the page cache.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }

    /// Whether each write is durable when it returns.
    pub fn sync_writes(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::DirectSync)
    }
}

/// Storage in a host file, read with `pread` and written with `pwrite`.
///
/// Each `FileStorage` is one open file description: the QEMU permission locks taken with
/// [`FileStorage::set_permissions`] belong to it and are released when it is dropped.
#[derive(Debug)]
pub struct FileStorage {
    // Shared with the io_uring queues made from this storage: a queue keeps the
    // descriptors it submits on open while its transfers are in flight.
    file: Arc<File>,
    writable: bool,
    /// `cache=unsafe`: flushes do nothing.
    ignore_flush: bool,
    /// A second descriptor opened with `O_DIRECT` (QEMU's `cache=none`): aligned requests
    /// go through it, bypassing the page cache; the others through `file`. The kernel keeps
    /// the two coherent (a direct read writes back dirty cached pages of its range first, a
    /// direct write drops them).
    direct: Option<Arc<File>>,
    /// Transfers of [`Storage::io_queue`] go through io_uring rings.
    io_uring: bool,
    lock: Mutex<LockState>,
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Self::from_file(file, writable))
    }

    /// Opens an existing file whose requests aligned to [`DIRECT_ALIGN`] bypass the page
    /// cache (`O_DIRECT`, QEMU's `cache=none`). Fails as the `open` does where the file
    /// system refuses `O_DIRECT` (`EINVAL`).
    pub fn open_direct(path: impl AsRef<Path>, writable: bool) -> io::Result<Self> {
        Self::open_cached(path, writable, CacheMode::None)
    }

    /// Opens an existing file in one of QEMU's cache modes.
    pub fn open_cached(
        path: impl AsRef<Path>,
        writable: bool,
        mode: CacheMode,
    ) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref();
        let sync = if mode.sync_writes() { libc::O_DSYNC } else { 0 };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(sync)
            .open(path)?;
        let mut me = Self::from_file(file, writable);
        me.ignore_flush = mode == CacheMode::Unsafe;
        if mode.direct() {
            let direct = OpenOptions::new()
                .read(true)
                .write(writable)
                .custom_flags(libc::O_DIRECT | sync)
                .open(path)?;
            me.direct = Some(Arc::new(direct));
        }
        Ok(me)
    }

    /// Whether aligned requests bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Makes [`Storage::io_queue`] answer with io_uring rings (QEMU's `aio=io_uring`).
    /// Fails, changing nothing, where the kernel has no usable io_uring (too old, disabled
    /// by `kernel.io_uring_disabled`, or forbidden by a seccomp filter): the error says so
    /// (`failed to init linux io_uring ring: ...`), and the synchronous calls keep working.
    pub fn enable_io_uring(&mut self) -> io::Result<()> {
        crate::uring::probe()?;
        self.io_uring = true;
        Ok(())
    }

    /// Whether [`Storage::io_queue`] uses io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.io_uring
    }

    /// The `O_DIRECT` descriptor, if the request can use it.
    fn direct_for(&self, offset: u64, len: usize) -> Option<&File> {
        let a = DIRECT_ALIGN as u64;
        self.direct
            .as_deref()
            .filter(|_| offset % a == 0 && len as u64 % a == 0 && len > 0)
    }

    /// Creates (or truncates) a file for writing.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self::from_file(file, true))
    }

    /// Opens (creating if needed) a file for writing **without truncating it**, so that a
    /// caller can take its locks with [`FileStorage::set_permissions`] before it destroys
    /// the old contents (QEMU's create takes the locks before truncating).
    pub fn open_for_create(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Self::from_file(file, true))
    }

    /// Wraps an already open file.
    pub fn from_file(file: File, writable: bool) -> Self {
        Self {
            file: Arc::new(file),
            writable,
            ignore_flush: false,
            direct: None,
            io_uring: false,
            lock: Mutex::new(LockState::new()),
        }
    }

    /// Holds the QEMU permissions `perm` on the file and shares only `shared` with other
    /// opens, through QEMU's lock bytes (see [`crate::lock`]); replaces what an earlier
    /// call set (an upgrade from read-only to read-write takes the new bytes and checks
    /// them first; a downgrade only releases bytes). On a conflict nothing changes and
    /// the error is QEMU's ("Failed to get \"write\" lock"). `locking` decides at the
    /// first call whether locks are used at all ([`Locking::Auto`]: when OFD locks work on
    /// the file); later calls keep that decision.
    pub fn set_permissions(
        &self,
        locking: Locking,
        perm: Perms,
        shared: Perms,
    ) -> Result<(), LockError> {
        // A poisoned mutex only means another thread panicked mid-change; the state it
        // describes is still the kernel's (each byte is recorded after it changed).
        let mut st = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        lock::set_permissions(&self.file, &mut st, locking, perm, shared)
    }

    /// The permissions held and shared through this file, if it uses locks.
    pub fn permissions(&self) -> Option<(Perms, Perms)> {
        let st = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        st.current()
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

    /// `lseek(2)` on the file with `whence` (`SEEK_DATA`/`SEEK_HOLE`): the offset found.
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        #[allow(unsafe_code)]
        // SAFETY: lseek takes a valid open descriptor (borrowed from `self.file`, alive for
        // the call) and plain integers; it touches no memory of ours. SEEK_DATA/SEEK_HOLE
        // move the descriptor's position, which nothing here uses (all I/O is positional).
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        u64::try_from(rc).map_err(|_| io::Error::last_os_error())
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
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(d) = self.direct_for(offset, buf.len()) {
            return crate::direct::read_at(d, buf, offset);
        }
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
        if let Some(d) = self.direct_for(offset, buf.len()) {
            return crate::direct::write_at(d, buf, offset);
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.ignore_flush {
            return Ok(());
        }
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

    fn data_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        if len == 0 {
            return Ok((true, 0));
        }
        let clamp = |n: u64| n.min(len).max(1);
        // When the file system cannot tell, QEMU pretends there are no holes inside the
        // file; beyond its end still reads as zero.
        let no_answer = || -> io::Result<(bool, u64)> {
            let end = self.len()?;
            Ok(if offset >= end {
                (false, len)
            } else {
                (true, clamp(end - offset))
            })
        };
        // QEMU's `find_allocation` (file-posix): SEEK_DATA from `offset`, then SEEK_HOLE if
        // `offset` is in data. ENXIO means no data at or after `offset` (a trailing hole,
        // or beyond the end); any other failure means the file system cannot tell.
        let data = match self.seek(offset, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok((false, len)),
            Err(_) => return no_answer(),
        };
        if data > offset {
            return Ok((false, clamp(data - offset)));
        }
        if data < offset {
            // A file system answering backwards is as good as no answer.
            return no_answer();
        }
        match self.seek(offset, libc::SEEK_HOLE) {
            Ok(hole) if hole > offset => Ok((true, clamp(hole - offset))),
            _ => no_answer(),
        }
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        use std::os::unix::fs::MetadataExt;
        // `st_blocks` counts 512-byte units whatever the file system's block size.
        Ok(Some(self.file.metadata()?.blocks().saturating_mul(512)))
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

    fn io_queue(&self, depth: usize) -> io::Result<Option<Box<dyn crate::IoQueue>>> {
        if !self.io_uring {
            return Ok(None);
        }
        let q = crate::uring::UringQueue::new(depth, self.file.clone(), self.direct.clone())?;
        Ok(Some(Box::new(q)))
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
    fn data_status_finds_holes_like_seek_data() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(dir.path().join("f")).unwrap();
        s.set_len(1 << 20).unwrap();
        s.write_at(&[7u8; 4096], 64 << 10).unwrap();
        s.write_at(&[7u8; 100], (1 << 20) - 100).unwrap();
        // File systems without SEEK_HOLE answer "all data": nothing more to check there.
        let (data, n) = s.data_status(0, 1 << 30).unwrap();
        if data {
            assert_eq!(n, 1 << 20);
            return;
        }
        assert_eq!(n, 64 << 10);
        assert_eq!(s.data_status(100, 1000).unwrap(), (false, 1000));
        assert_eq!(s.data_status(64 << 10, 1 << 30).unwrap(), (true, 4096));
        assert_eq!(s.data_status((64 << 10) + 10, 6).unwrap(), (true, 6));
        let (data, n) = s.data_status(68 << 10, 1 << 30).unwrap();
        assert!(!data);
        // The last block holds data up to the end (its start depends on the block size).
        let tail = (68 << 10) + n;
        assert!(tail < 1 << 20);
        assert_eq!(
            s.data_status(tail, 1 << 30).unwrap(),
            (true, (1 << 20) - tail)
        );
        assert_eq!(s.data_status(1 << 20, 512).unwrap(), (false, 512));
        assert_eq!(s.data_status(5 << 20, 512).unwrap(), (false, 512));
        assert_eq!(s.data_status(0, 0).unwrap(), (true, 0));
        let allocated = s.allocated_size().unwrap().unwrap();
        assert!((4096..256 << 10).contains(&allocated), "{allocated}");
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
