//! A sparse in-memory backend.

use crate::Storage;
use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

const PAGE: u64 = 4096;

/// Written pages by page number, and the storage length.
type Pages = (HashMap<u64, Box<[u8]>>, u64);

/// A sparse in-memory storage: only written 4 KiB pages take memory, so benchmarks and fuzz
/// targets can address (or `set_len` to) terabytes without allocating them, as a sparse file
/// would. Flush is a no-op.
#[derive(Debug, Default)]
pub struct SparseStorage {
    inner: Mutex<Pages>,
}

impl SparseStorage {
    /// A storage holding `bytes` at offset 0.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let s = Self::default();
        // Writing to a fresh in-memory map cannot fail.
        let _ = s.write_at(bytes, 0);
        s
    }

    /// The contents up to the current length.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = self.len().unwrap_or(0);
        let mut v = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let _ = self.read_at(&mut v, 0);
        v
    }
}

impl Storage for SparseStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            match g.0.get(&page) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let p =
                g.0.entry(page)
                    .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[in_page..in_page + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        let end = offset + buf.len() as u64;
        if end > g.1 {
            g.1 = end;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self
            .inner
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .1)
    }

    /// Exact at page granularity: a written page is data, a page never written is a hole.
    fn data_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        if len == 0 {
            return Ok((true, 0));
        }
        let g = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        let (pages, end) = (&g.0, g.1);
        if offset >= end {
            return Ok((false, len));
        }
        // The answer never reaches past the end: beyond it is a hole.
        let limit = len.min(end - offset);
        let first = offset / PAGE;
        if pages.contains_key(&first) {
            let mut p = first + 1;
            while p * PAGE < offset + limit && pages.contains_key(&p) {
                p += 1;
            }
            return Ok((true, (p * PAGE - offset).min(limit)));
        }
        // The next written page, found by a scan of the written pages (bounded by the
        // memory they take, unlike a walk over the hole's pages).
        let next_data = pages
            .keys()
            .filter(|&&p| p > first)
            .min()
            .map_or(u64::MAX, |&p| p.saturating_mul(PAGE));
        Ok((false, (next_data - offset).min(len)))
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        let g = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        Ok(Some(g.0.len() as u64 * PAGE))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        g.1 = len;
        let last_page = len.div_ceil(PAGE);
        g.0.retain(|&p, _| p < last_page);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_reads_writes_and_length() {
        let s = SparseStorage::from_bytes(&[1, 2, 3]);
        s.write_at(&[9; 10], (1 << 40) - 5).unwrap();
        assert_eq!(s.len().unwrap(), (1 << 40) + 5);
        let mut b = [0u8; 12];
        s.read_at(&mut b, (1 << 40) - 6).unwrap();
        assert_eq!(b, [0, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0]);
        s.set_len(2).unwrap();
        assert_eq!(s.to_bytes(), vec![1, 2]);
        s.set_len(1 << 50).unwrap();
        assert_eq!(s.len().unwrap(), 1 << 50);
    }

    #[test]
    fn data_status_follows_written_pages() {
        let s = SparseStorage::default();
        s.set_len(10 * PAGE + 100).unwrap();
        s.write_at(&[1], 2 * PAGE + 5).unwrap();
        s.write_at(&[1; 10], 4 * PAGE - 5).unwrap();
        s.write_at(&[1], 10 * PAGE).unwrap();
        assert_eq!(s.data_status(0, u64::MAX).unwrap(), (false, 2 * PAGE));
        assert_eq!(s.data_status(100, 50).unwrap(), (false, 50));
        assert_eq!(
            s.data_status(2 * PAGE + 7, 1 << 30).unwrap(),
            (true, 3 * PAGE - 7)
        );
        assert_eq!(s.data_status(3 * PAGE, 1 << 30).unwrap(), (true, 2 * PAGE));
        assert_eq!(s.data_status(5 * PAGE, 1 << 30).unwrap(), (false, 5 * PAGE));
        // The last page is data up to the end, then a hole.
        assert_eq!(s.data_status(10 * PAGE, 1 << 30).unwrap(), (true, 100));
        assert_eq!(s.data_status(10 * PAGE + 100, 7).unwrap(), (false, 7));
        assert_eq!(s.data_status(0, 0).unwrap(), (true, 0));
        assert_eq!(s.allocated_size().unwrap(), Some(4 * PAGE));
    }
}
