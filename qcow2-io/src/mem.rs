//! An in-memory backend.

use crate::Storage;
use std::io;
use std::sync::RwLock;

/// Storage in a growable byte vector. Flush is a no-op: memory is as durable as it gets.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(bytes),
        }
    }

    /// A copy of the current contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// The contents, consuming the storage.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_default()
    }
}

fn to_usize(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

fn poisoned() -> io::Error {
    io::Error::other("memory storage lock poisoned")
}

/// Refuses in-memory sizes that could not be backed; real files are bounded by the host.
pub(crate) const MAX_MEM_LEN: u64 = 1 << 40;

/// The end of `[offset, offset + len)` as an index, refused beyond [`MAX_MEM_LEN`].
fn checked_end(offset: u64, len: u64) -> io::Result<usize> {
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= MAX_MEM_LEN)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range beyond limit"))?;
    to_usize(end)
}

// The byte-vector semantics below are shared by `MemStorage` and the crash simulator's
// cache and crash-state images, so that both model exactly the same storage: a crash state
// of an op sequence must equal a `MemStorage` that received the same ops.

/// `read_at` on a byte vector: bytes at or beyond the end read as zero.
pub(crate) fn vec_read(data: &[u8], buf: &mut [u8], offset: u64) {
    let start = match usize::try_from(offset) {
        Ok(s) if s < data.len() => s,
        _ => {
            buf.fill(0);
            return;
        }
    };
    let n = (data.len() - start).min(buf.len());
    buf[..n].copy_from_slice(&data[start..start + n]);
    buf[n..].fill(0);
}

/// `write_at` on a byte vector. An empty write is a no-op and does not extend (as `pwrite`).
pub(crate) fn vec_write(data: &mut Vec<u8>, buf: &[u8], offset: u64) -> io::Result<()> {
    let end = checked_end(offset, buf.len() as u64)?;
    if buf.is_empty() {
        return Ok(());
    }
    if data.len() < end {
        data.resize(end, 0);
    }
    data[end - buf.len()..end].copy_from_slice(buf);
    Ok(())
}

/// `set_len` on a byte vector: truncates, or extends with zeros.
pub(crate) fn vec_set_len(data: &mut Vec<u8>, len: u64) -> io::Result<()> {
    if len > MAX_MEM_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "length beyond limit",
        ));
    }
    data.resize(to_usize(len)?, 0);
    Ok(())
}

/// `write_zeroes` on a byte vector: the range reads as zero and the length grows to cover it
/// (like a write of zeros). An empty range is a no-op.
pub(crate) fn vec_write_zeroes(data: &mut Vec<u8>, offset: u64, len: u64) -> io::Result<()> {
    let end = checked_end(offset, len)?;
    if len == 0 {
        return Ok(());
    }
    if data.len() < end {
        data.resize(end, 0);
    }
    data[end - to_usize(len)?..end].fill(0);
    Ok(())
}

/// `discard` on a byte vector: the range reads as zero; the length never changes (as a hole
/// punched with `FALLOC_FL_KEEP_SIZE`, and as QEMU's discard).
pub(crate) fn vec_discard(data: &mut [u8], offset: u64, len: u64) -> io::Result<()> {
    let end = checked_end(offset, len)?.min(data.len());
    if let Ok(start) = usize::try_from(offset) {
        if start < end {
            data[start..end].fill(0);
        }
    }
    Ok(())
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().map_err(|_| poisoned())?;
        vec_read(&data, buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().map_err(|_| poisoned())?;
        vec_write(&mut data, buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().map_err(|_| poisoned())?.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut data = self.data.write().map_err(|_| poisoned())?;
        vec_set_len(&mut data, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write().map_err(|_| poisoned())?;
        vec_discard(&mut data, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write().map_err(|_| poisoned())?;
        vec_write_zeroes(&mut data, offset, len)
    }

    // Every byte of the vector takes memory: no holes inside (the default `data_status`
    // is exact), and the whole length is allocated.
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.len().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StorageExt;

    #[test]
    fn reads_beyond_end_are_zero() {
        let s = MemStorage::from_bytes(vec![1, 2, 3]);
        let mut b = [9u8; 5];
        s.read_at(&mut b, 1).unwrap();
        assert_eq!(b, [2, 3, 0, 0, 0]);
        s.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [0; 5]);
    }

    #[test]
    fn write_grows_and_be_helpers_round_trip() {
        let s = MemStorage::new();
        s.write_be64(16, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(s.len().unwrap(), 24);
        assert_eq!(s.read_be64(16).unwrap(), 0x0102_0304_0506_0708);
        assert_eq!(s.read_be32(20).unwrap(), 0x0506_0708);
        s.write_zeroes(18, 4).unwrap();
        assert_eq!(s.read_be64(16).unwrap(), 0x0102_0000_0000_0708);
        s.set_len(4).unwrap();
        assert_eq!(s.len().unwrap(), 4);
    }

    #[test]
    fn empty_writes_and_discard_keep_the_length() {
        let s = MemStorage::from_bytes(vec![1; 8]);
        s.write_at(&[], 100).unwrap();
        s.write_zeroes(100, 0).unwrap();
        assert_eq!(s.len().unwrap(), 8);
        s.discard(4, 100).unwrap();
        assert_eq!(s.len().unwrap(), 8);
        assert_eq!(s.to_bytes(), [1, 1, 1, 1, 0, 0, 0, 0]);
        s.write_zeroes(6, 4).unwrap();
        assert_eq!(s.len().unwrap(), 10);
    }

    #[test]
    fn refuses_absurd_offsets() {
        let s = MemStorage::new();
        assert!(s.write_at(&[1], u64::MAX).is_err());
        assert!(s.set_len(u64::MAX).is_err());
    }
}
