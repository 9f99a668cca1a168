//! What the server serves: the [`NbdExport`] trait, and its implementations for a qcow2
//! image shared between threads ([`SharedImage`]) and for a raw file ([`RawExport`]).

use std::io;

use qcow2_image::{ExtentKind, ImageError, SharedImage};
use qcow2_io::{FileStorage, Storage};

use crate::proto::{NbdErrno, STATE_DIRTY, STATE_HOLE, STATE_ZERO};

/// A failed export operation; [`ExportError::errno`] is what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A write-like request on a read-only export.
    #[error("the export is read-only")]
    ReadOnly,
    /// `NBD_CMD_FLAG_FAST_ZERO`: zeroing this range would not be faster than writing.
    #[error("zeroing this range would not be fast")]
    NotFast,
    /// An I/O error of the backing file.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An error of the qcow2 engine.
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl ExportError {
    /// The NBD error the client receives.
    pub fn errno(&self) -> NbdErrno {
        match self {
            ExportError::ReadOnly => NbdErrno::Perm,
            ExportError::NotFast => NbdErrno::NotSup,
            ExportError::Io { source, .. } => {
                NbdErrno::from_errno(source.raw_os_error().unwrap_or(5))
            }
            ExportError::Image(e) => NbdErrno::from_errno(e.errno()),
        }
    }

    fn io(op: &'static str) -> impl FnOnce(io::Error) -> ExportError {
        move |source| ExportError::Io { op, source }
    }
}

/// One run of block status: `base:allocation` flags or a `qemu:allocation-depth` depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Length in bytes (nonzero).
    pub length: u64,
    /// For `base:allocation`: [`STATE_HOLE`] and/or [`STATE_ZERO`]. For
    /// `qemu:allocation-depth`: 0 unallocated, 1 in this image, 2 in a backing file.
    pub flags: u32,
}

/// A block device the server exports. Every method takes `&self` and may be called from
/// many threads at once; the server checks ranges against [`NbdExport::size`] and refuses
/// write-like requests on read-only exports before calling these.
pub trait NbdExport: Send + Sync {
    /// The size in bytes (read once, when the export is registered).
    fn size(&self) -> Result<u64, ExportError>;

    /// Whether the export refuses writes (read once, when the export is registered).
    fn read_only(&self) -> Result<bool, ExportError>;

    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;

    /// Writes `buf` at `offset`; with `fua` the data is durable when this returns.
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> Result<(), ExportError>;

    /// Makes `[offset, offset + len)` read as zeros. `may_trim`: the range may be
    /// deallocated. `fast`: fail with [`ExportError::NotFast`] unless it is cheaper than
    /// writing zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast: bool,
    ) -> Result<(), ExportError>;

    /// Discards `[offset, offset + len)` (the contents become unspecified).
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), ExportError>;

    /// A hint that `[offset, offset + len)` will be read soon. The default does nothing.
    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let _ = (offset, len);
        Ok(())
    }

    /// `base:allocation` status of the runs from `offset`, covering at most `len` bytes
    /// (at least one run when `len > 0` and the range is inside the export).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Allocation>, ExportError>;

    /// `qemu:allocation-depth` of the runs from `offset`, covering at most `len` bytes: 0
    /// where nothing in the chain allocates the range, 1 where this image does, 2 and more
    /// where a backing file does. The default: all of it at depth 1 (a plain file).
    fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<Allocation>, ExportError> {
        let _ = offset;
        Ok(vec![Allocation {
            length: len,
            flags: 1,
        }])
    }

    /// `qemu:dirty-bitmap:NAME` status of the runs from `offset`, covering at most `len`
    /// bytes: flags [`STATE_DIRTY`](crate::proto::STATE_DIRTY) where bitmap `name` is
    /// dirty, 0 where clean. The default: no bitmap, everything clean.
    fn dirty_bitmap(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Allocation>, ExportError> {
        let _ = (name, offset);
        Ok(vec![Allocation {
            length: len,
            flags: 0,
        }])
    }

    /// Whether `write_zeroes` with `fast` can ever succeed (`NBD_FLAG_SEND_FAST_ZERO`).
    fn can_fast_zero(&self) -> bool {
        true
    }

    /// Whether a flush on one connection covers writes completed on others
    /// (`NBD_FLAG_CAN_MULTI_CONN`). True for one shared image or file.
    fn can_multi_conn(&self) -> bool {
        true
    }
}

/// Appends a run, merging it into the previous one when the flags agree.
fn push_run(out: &mut Vec<Allocation>, length: u64, flags: u32) {
    if length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.flags == flags => last.length += length,
        _ => out.push(Allocation { length, flags }),
    }
}

/// The most block status one call looks at (mapping cost is per L2 entry).
const STATUS_WINDOW: u64 = 1 << 30;

impl NbdExport for SharedImage {
    fn size(&self) -> Result<u64, ExportError> {
        Ok(self.virtual_size()?)
    }

    fn read_only(&self) -> Result<bool, ExportError> {
        Ok(self.exclusive(|img| img.is_read_only())?)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        Ok(SharedImage::read(self, offset, buf)?)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> Result<(), ExportError> {
        SharedImage::write(self, offset, buf)?;
        if fua {
            SharedImage::flush(self)?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast: bool,
    ) -> Result<(), ExportError> {
        // Zero clusters need qcow2 v3; a v2 image writes zeros into data clusters.
        if fast && !self.exclusive(|img| img.header().version >= 3)? {
            return Err(ExportError::NotFast);
        }
        Ok(SharedImage::write_zeroes(self, offset, len, may_trim)?)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        Ok(SharedImage::discard(self, offset, len)?)
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(SharedImage::flush(self)?)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Allocation>, ExportError> {
        let len = len.min(STATUS_WINDOW);
        let mut out = Vec::new();
        for x in self.map(offset, len)? {
            // Ranges read from a backing file are reported as data: this image cannot
            // tell whether they read as zeros without asking the backing chain.
            let flags = match x.kind {
                ExtentKind::Data | ExtentKind::Compressed | ExtentKind::Backing => 0,
                ExtentKind::Zero | ExtentKind::Unallocated => STATE_HOLE | STATE_ZERO,
                // Allocated, but the host range is a hole: data that reads as zeros.
                ExtentKind::DataHole => STATE_ZERO,
            };
            push_run(&mut out, x.length, flags);
        }
        Ok(out)
    }

    fn dirty_bitmap(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Allocation>, ExportError> {
        let mut out = Vec::new();
        for (length, dirty) in self.dirty_bitmap_runs(name, offset, len)? {
            push_run(&mut out, length, if dirty { STATE_DIRTY } else { 0 });
        }
        Ok(out)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<Allocation>, ExportError> {
        let len = len.min(STATUS_WINDOW);
        let mut out = Vec::new();
        for x in self.map(offset, len)? {
            // The engine knows a range comes from the backing chain, not from which layer:
            // it is reported as the first backing file.
            let depth = match x.kind {
                ExtentKind::Data
                | ExtentKind::DataHole
                | ExtentKind::Compressed
                | ExtentKind::Zero => 1,
                ExtentKind::Backing => 2,
                ExtentKind::Unallocated => 0,
            };
            push_run(&mut out, x.length, depth);
        }
        Ok(out)
    }
}

/// A raw image file exported as it is: positioned I/O, holes punched for trims, and
/// block status from the file's holes (`SEEK_DATA`/`SEEK_HOLE`).
#[derive(Debug)]
pub struct RawExport {
    file: FileStorage,
    read_only: bool,
}

impl RawExport {
    /// Exports `file`; writes are refused when `read_only` (or the file is not writable).
    pub fn new(file: FileStorage, read_only: bool) -> Self {
        let read_only = read_only || !file.is_writable();
        RawExport { file, read_only }
    }

    /// Opens the file at `path` (read-only or read-write).
    pub fn open(path: impl AsRef<std::path::Path>, read_only: bool) -> io::Result<Self> {
        Ok(RawExport::new(
            FileStorage::open(path, !read_only)?,
            read_only,
        ))
    }

    /// `lseek(fd, offset, whence)`, `None` for ENXIO (no data/hole at or after offset).
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        use std::os::fd::AsRawFd;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        #[allow(unsafe_code)]
        // SAFETY: lseek takes an open descriptor (borrowed from the file, alive for the call)
        // and integers; it touches no memory of ours. The file position it moves is not
        // used by anything else (all I/O is positioned).
        let r = unsafe { libc::lseek(self.file.file().as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(u64::try_from(r).ok())
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; len.min(CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.file
                .write_at(&zeros[..n as usize], offset + done)
                .map_err(ExportError::io("write zeroes"))?;
            done += n;
        }
        Ok(())
    }
}

impl NbdExport for RawExport {
    fn size(&self) -> Result<u64, ExportError> {
        self.file.len().map_err(ExportError::io("file size"))
    }

    fn read_only(&self) -> Result<bool, ExportError> {
        Ok(self.read_only)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.file
            .read_at(buf, offset)
            .map_err(ExportError::io("read"))
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.file
            .write_at(buf, offset)
            .map_err(ExportError::io("write"))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast: bool,
    ) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        if may_trim
            && self
                .file
                .discard(offset, len)
                .map_err(ExportError::io("punch hole"))
                .is_ok()
        {
            // A punched hole reads as zeros (the length never changes).
            return Ok(());
        }
        if self
            .file
            .zero_fast(offset, len)
            .map_err(ExportError::io("zero range"))?
        {
            return Ok(());
        }
        if fast {
            return Err(ExportError::NotFast);
        }
        self.write_zero_buffers(offset, len)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.file
            .discard(offset, len)
            .map_err(ExportError::io("discard"))
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.file.flush().map_err(ExportError::io("flush"))
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.file.prefetch(offset, len);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Allocation>, ExportError> {
        let end = offset.saturating_add(len.min(STATUS_WINDOW));
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(d) => d.unwrap_or(end).min(end),
                // No SEEK_DATA: everything is data.
                Err(_) => {
                    push_run(&mut out, end - pos, 0);
                    break;
                }
            };
            push_run(&mut out, data - pos, STATE_HOLE | STATE_ZERO);
            if data >= end {
                break;
            }
            let hole = match self.seek(data, libc::SEEK_HOLE) {
                Ok(h) => h.unwrap_or(end).min(end),
                Err(_) => end,
            };
            // Guard against a file changing under us: always make progress.
            let hole = hole.max(data + 1).min(end);
            push_run(&mut out, hole - data, 0);
            pos = hole;
        }
        Ok(out)
    }
}
