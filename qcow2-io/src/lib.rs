//! The storage seam of the qcow2 engine.
//!
//! Every engine crate talks to a [`Storage`], never to `std::fs::File`. The trait is small
//! (what a backend must do); conveniences live in [`StorageExt`]. The engine reports named
//! [`Event`]s (QEMU's blkdebug event names) to the storage before the I/O they describe, so a
//! test backend can inject an error exactly there.
//!
//! Backends:
//! - [`FileStorage`]: positional I/O on a file, `fdatasync` for flush, QEMU's image locks
//!   ([`lock`]).
//! - [`MemStorage`]: a growable byte vector.
//! - behind the `test-utils` feature: [`fault::FaultStorage`] (blkdebug-style error
//!   injection) and [`crash::CrashStorage`] (a volatile write cache whose unflushed writes
//!   may be lost in any subset, or torn at 512-byte sector granularity).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod aligned;
mod direct;
mod event;
mod file;
pub mod lock;
mod mem;
pub mod queue;
mod sparse;
mod uring;

#[cfg(any(test, feature = "test-utils"))]
pub mod crash;
#[cfg(any(test, feature = "fault"))]
pub mod fault;

pub use aligned::IoBuf;
pub use event::{Event, UnknownEvent};
pub use file::{CacheMode, FileStorage, DIRECT_ALIGN};
pub use lock::{LockError, Locking, Perms};
pub use mem::MemStorage;
pub use queue::{queue, Completion, Dir, IoQueue, Transfer};
pub use sparse::SparseStorage;

use std::io;
use std::sync::Arc;

/// Positional, byte-addressed storage under a qcow2 image.
///
/// Semantics every backend keeps:
/// - `read_at` fills the whole buffer; bytes at or beyond the current length read as zero
///   (as QEMU's file protocol does), so a table that ends mid-cluster at end of file can be
///   read whole.
/// - `write_at` writes the whole buffer, growing the storage if needed (an empty buffer
///   changes nothing); the write is volatile until the next successful `flush`.
/// - `flush` is a durability barrier: every write that completed before it is on stable
///   storage when it returns `Ok`.
// `len` is a byte size, not a collection's element count; an `is_empty` would only widen the
// trait every backend implements.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`; bytes beyond the end read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, extending the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable (a barrier, like `fdatasync`).
    fn flush(&self) -> io::Result<()>;

    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Tells the backend that `[offset, offset + len)` is no longer needed. The range reads
    /// as zero afterwards; the length never changes (as QEMU's discard, and a hole punched
    /// with `FALLOC_FL_KEEP_SIZE`). The default writes zeros over the part inside the
    /// storage.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let cur = self.len()?;
        if offset >= cur {
            return Ok(());
        }
        self.write_zeroes(offset, len.min(cur - offset))
    }

    /// Makes `[offset, offset + len)` read as zero, extending the storage to cover the range
    /// (like a write of zeros). An empty range changes nothing. The default writes zero
    /// buffers.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(1 << 20)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK);
            let n_usize = usize::try_from(n).map_err(|_| io::Error::other("length overflow"))?;
            let at = offset
                .checked_add(done)
                .ok_or_else(|| io::Error::other("offset overflow"))?;
            self.write_at(&zeros[..n_usize], at)?;
            done += n;
        }
        Ok(())
    }

    /// Reserves backing space for `[offset, offset + len)` (QEMU's `preallocation=falloc`),
    /// extending the storage to cover the range; bytes already there are unchanged and new
    /// bytes read as zero. The default only extends the length (the range may stay
    /// sparse); [`FileStorage`] reserves the blocks with `fallocate`.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        if self.len()? < end {
            self.set_len(end)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zero **only if the backend can do it without
    /// writing the zeros** (files: `fallocate(FALLOC_FL_ZERO_RANGE)`), extending the
    /// storage like [`Storage::write_zeroes`]; returns `Ok(true)` then. Returns `Ok(false)`
    /// and changes nothing when it cannot (QEMU's `BDRV_REQ_NO_FALLBACK`): the caller then
    /// writes what it needs itself. The default cannot.
    fn zero_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }

    /// A hint that `[offset, offset + len)` will be read soon: a backend may start fetching
    /// it in the background (files: `posix_fadvise(WILLNEED)`). Never changes contents;
    /// the default does nothing.
    fn prefetch(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// Where the storage holds data: whether the bytes at `offset` are data (`true`) or a
    /// hole that reads as zero (`false`), and how many bytes from `offset` (at most `len`)
    /// share that answer (QEMU's file-layer block status: `SEEK_DATA`/`SEEK_HOLE`). Bytes at
    /// or beyond the end are a hole; "data" only means "not known to be a hole" (it may hold
    /// zeros). An empty range answers `(true, 0)`. The default knows no holes inside the
    /// storage.
    fn data_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        if len == 0 {
            return Ok((true, 0));
        }
        let end = self.len()?;
        Ok(if offset >= end {
            (false, len)
        } else {
            (true, len.min(end - offset))
        })
    }

    /// Bytes of host space the storage occupies (a file's `st_blocks * 512`, QEMU's
    /// `bdrv_get_allocated_file_size`), or `None` when the backend cannot tell. QEMU's
    /// detection of `preallocation=metadata` images compares it with the clusters in use.
    /// The default cannot tell.
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }

    /// Reports that the engine is about to perform the I/O named by `event`. Backends that
    /// do not inject faults ignore it.
    fn event(&self, event: Event) {
        let _ = event;
    }

    /// The backend's own asynchronous queue for about `depth` transfers in flight, if it
    /// has one (a file with io_uring enabled); `None` (the default): callers use
    /// [`queue::SyncQueue`] over the synchronous calls (see [`queue::queue`]). Transfers
    /// through it report no events: callers report them when they plan the I/O.
    fn io_queue(&self, depth: usize) -> io::Result<Option<Box<dyn IoQueue>>> {
        let _ = depth;
        Ok(None)
    }
}

impl<S: Storage + ?Sized> Storage for Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).allocate(offset, len)
    }
    fn zero_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).zero_fast(offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) {
        (**self).prefetch(offset, len)
    }
    fn data_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        (**self).data_status(offset, len)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        (**self).allocated_size()
    }
    fn event(&self, event: Event) {
        (**self).event(event)
    }
    fn io_queue(&self, depth: usize) -> io::Result<Option<Box<dyn IoQueue>>> {
        (**self).io_queue(depth)
    }
}

impl<S: Storage + ?Sized> Storage for Box<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).allocate(offset, len)
    }
    fn zero_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).zero_fast(offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) {
        (**self).prefetch(offset, len)
    }
    fn data_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        (**self).data_status(offset, len)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        (**self).allocated_size()
    }
    fn event(&self, event: Event) {
        (**self).event(event)
    }
    fn io_queue(&self, depth: usize) -> io::Result<Option<Box<dyn IoQueue>>> {
        (**self).io_queue(depth)
    }
}

/// Conveniences over [`Storage`] for the engine: big-endian integer access and event-tagged
/// I/O. Implemented for every `Storage`.
pub trait StorageExt: Storage {
    /// Reads a big-endian `u64` at `offset`.
    fn read_be64(&self, offset: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_at(&mut b, offset)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads a big-endian `u32` at `offset`.
    fn read_be32(&self, offset: u64) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.read_at(&mut b, offset)?;
        Ok(u32::from_be_bytes(b))
    }

    /// Writes a big-endian `u64` at `offset`.
    fn write_be64(&self, offset: u64, value: u64) -> io::Result<()> {
        self.write_at(&value.to_be_bytes(), offset)
    }

    /// Writes a big-endian `u32` at `offset`.
    fn write_be32(&self, offset: u64, value: u32) -> io::Result<()> {
        self.write_at(&value.to_be_bytes(), offset)
    }

    /// Reports `event`, then writes `buf` at `offset`.
    fn write_event(&self, event: Event, buf: &[u8], offset: u64) -> io::Result<()> {
        self.event(event);
        self.write_at(buf, offset)
    }

    /// Reports `event`, then reads into `buf` from `offset`.
    fn read_event(&self, event: Event, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.event(event);
        self.read_at(buf, offset)
    }

    /// A synchronous write as QEMU's `bdrv_pwrite_sync`: the write, then a flush barrier.
    fn write_sync(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.flush()
    }

    /// Reads `len` bytes at `offset` into a new vector. `len` must have been validated by the
    /// caller against a limit: this allocates it.
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_at(&mut v, offset)?;
        Ok(v)
    }
}

impl<S: Storage + ?Sized> StorageExt for S {}

/// The `errno` values the engine distinguishes, as `io::Error`s (for fault injection and for
/// matching QEMU's messages).
pub mod errno {
    use std::io;

    /// `EIO`: "Input/output error".
    pub const EIO: i32 = libc::EIO;
    /// `ENOSPC`: "No space left on device".
    pub const ENOSPC: i32 = libc::ENOSPC;
    /// `EFBIG`: "File too large".
    pub const EFBIG: i32 = libc::EFBIG;
    /// `EINVAL`: "Invalid argument".
    pub const EINVAL: i32 = libc::EINVAL;

    /// An `io::Error` carrying `code`.
    pub fn error(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }
}
