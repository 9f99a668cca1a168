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
const MAX_MEM_LEN: u64 = 1 << 40;

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().map_err(|_| poisoned())?;
        let len = data.len() as u64;
        if offset >= len {
            buf.fill(0);
            return Ok(());
        }
        let start = to_usize(offset)?;
        let avail = data.len() - start;
        let n = avail.min(buf.len());
        buf[..n].copy_from_slice(&data[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= MAX_MEM_LEN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write beyond limit"))?;
        let mut data = self.data.write().map_err(|_| poisoned())?;
        let end = to_usize(end)?;
        if data.len() < end {
            data.resize(end, 0);
        }
        let start = to_usize(offset)?;
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().map_err(|_| poisoned())?.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > MAX_MEM_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "length beyond limit"));
        }
        let mut data = self.data.write().map_err(|_| poisoned())?;
        data.resize(to_usize(len)?, 0);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= MAX_MEM_LEN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range beyond limit"))?;
        let mut data = self.data.write().map_err(|_| poisoned())?;
        let end = to_usize(end)?;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[to_usize(offset)?..end].fill(0);
        Ok(())
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
    fn refuses_absurd_offsets() {
        let s = MemStorage::new();
        assert!(s.write_at(&[1], u64::MAX).is_err());
        assert!(s.set_len(u64::MAX).is_err());
    }
}
