//! Raw image files as a [`BlockDev`] for `io` and `bench`: the file's bytes are the disk.

use qcow2_io::{FileStorage, Storage};

use crate::io::BlockDev;

/// `ENOTSUP` ("Operation not supported").
const ENOTSUP: i32 = 95;
/// `EIO`.
const EIO: i32 = 5;
/// `EPERM` for writes on a read-only open.
const EPERM: i32 = 1;

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(EIO)
}

/// A raw file opened for `io`/`bench`.
pub struct RawDev {
    storage: FileStorage,
    read_only: bool,
    /// Whether anything changed since the last flush: QEMU's block layer flushes only then
    /// (`write_gen` vs `flushed_gen`), so a flush without writes never reaches the file
    /// (`fdatasync` on a character device such as /dev/null fails with EINVAL).
    dirty: bool,
}

impl RawDev {
    /// Opens `path` (read-only with `read_only`); errors are qemu-io's open messages.
    pub fn open(path: &str, read_only: bool) -> Result<Self, String> {
        let storage =
            FileStorage::open(crate::image::file_name(path), !read_only).map_err(|e| {
                format!(
                    "can't open device {path}: Could not open '{path}': {}",
                    crate::image::strerror(&e)
                )
            })?;
        crate::image::lock(
            &storage,
            path,
            crate::image::FileRole::Raw { resize: false },
            !read_only,
        )
        .map_err(|e| format!("can't open device {path}: {e}"))?;
        Ok(RawDev {
            storage,
            read_only,
            dirty: false,
        })
    }

    fn writable(&self) -> Result<(), i32> {
        if self.read_only {
            Err(EPERM)
        } else {
            Ok(())
        }
    }
}

impl BlockDev for RawDev {
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn length(&mut self) -> Result<u64, i32> {
        // The block layer counts whole sectors.
        self.storage
            .len()
            .map(|l| l.next_multiple_of(512))
            .map_err(errno)
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.storage.read_at(buf, offset).map_err(errno)
    }
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.writable()?;
        self.dirty = true;
        self.storage.write_at(buf, offset).map_err(errno)
    }
    fn write_compressed(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), i32> {
        Err(ENOTSUP)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> Result<(), i32> {
        self.writable()?;
        self.dirty = true;
        self.storage.write_zeroes(offset, len).map_err(errno)
    }
    fn write_zeroes_fast(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        // The file backend zeroes with fallocate, never by writing data.
        self.write_zeroes(offset, len, unmap)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), i32> {
        self.writable()?;
        self.dirty = true;
        self.storage.discard(offset, len).map_err(errno)
    }
    fn flush(&mut self) -> Result<(), i32> {
        if !self.dirty {
            return Ok(());
        }
        self.storage.flush().map_err(errno)?;
        self.dirty = false;
        Ok(())
    }
    fn truncate(&mut self, len: u64) -> Result<(), i32> {
        self.writable()?;
        self.dirty = true;
        self.storage.set_len(len).map_err(errno)
    }
    fn is_allocated(&mut self, _offset: u64, len: u64) -> Result<(bool, u64), i32> {
        // A raw format layer has no holes of its own: everything is allocated.
        Ok((true, len))
    }
    fn info(&mut self) -> (u64, u64) {
        (0, 0)
    }
    fn specific_info(&mut self) -> Vec<String> {
        Vec::new()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}
