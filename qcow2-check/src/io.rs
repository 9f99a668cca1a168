//! Reads as QEMU's block layer does them (offset limits, zeros beyond the end of the file),
//! and batched table reads: many cluster-sized tables fetched with a few large reads sorted
//! by offset instead of one small read each.

use std::collections::HashMap;
use std::io;

use qcow2_io::Storage;

use crate::finding::EIO;

/// QEMU's `BDRV_MAX_LENGTH`: requests reaching beyond it fail with `EIO` before any I/O.
pub(crate) const MAX_LENGTH: u64 = (i64::MAX as u64) & !((1u64 << 31) - 1);

/// The largest single read issued when batching tables; bounds memory per batch.
const MAX_RUN: u64 = 8 << 20;
/// Gaps up to this size between wanted tables are read through rather than split, because
/// one larger sequential read is cheaper than two requests.
const MAX_GAP: u64 = 64 << 10;

/// `bdrv_pread`: fails with `EIO` for requests beyond [`MAX_LENGTH`], reads zeros past EOF.
pub(crate) fn pread(storage: &dyn Storage, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let len = buf.len() as u64;
    if offset > MAX_LENGTH || len > MAX_LENGTH - offset {
        return Err(io::Error::from_raw_os_error(EIO));
    }
    storage.read_at(buf, offset)
}

/// `bdrv_pwrite`, with the same offset limit as [`pread`].
pub(crate) fn pwrite(storage: &dyn Storage, buf: &[u8], offset: u64) -> io::Result<()> {
    let len = buf.len() as u64;
    if offset > MAX_LENGTH || len > MAX_LENGTH - offset {
        return Err(io::Error::from_raw_os_error(EIO));
    }
    storage.write_at(buf, offset)
}

/// `bdrv_pwrite_sync`: a write followed by a flush barrier.
pub(crate) fn pwrite_sync(storage: &dyn Storage, buf: &[u8], offset: u64) -> io::Result<()> {
    pwrite(storage, buf, offset)?;
    storage.flush()
}

/// Tables of `table_len` bytes fetched in batches. Each distinct offset is read once per
/// batch; lookups hand out a mutable view so that a repair written to disk can be mirrored
/// into the copy that later references of the same table will see.
pub(crate) struct TableBatch {
    table_len: usize,
    /// Offset -> start within `buf`, or the read error.
    slots: HashMap<u64, Result<usize, i32>>,
    buf: Vec<u8>,
}

impl TableBatch {
    /// Reads every table in `offsets` (duplicates allowed) with reads sorted by offset and
    /// coalesced across small gaps, into `buf` (reused to avoid fresh allocations). A
    /// failing batched read is retried table by table so that only the tables that really
    /// fail report an error.
    pub(crate) fn load(
        storage: &dyn Storage,
        offsets: &[u64],
        table_len: usize,
        mut buf: Vec<u8>,
    ) -> Self {
        let tl = table_len as u64;
        let mut slots = HashMap::with_capacity(offsets.len());
        // A table that would end beyond 2^64 cannot be read (found by fuzzing: the run
        // arithmetic below saturates and the slice is shorter than a table).
        let mut sorted: Vec<u64> = Vec::with_capacity(offsets.len());
        for &o in offsets {
            if o.checked_add(tl).is_some() {
                sorted.push(o);
            } else {
                slots.insert(o, Err(libc_einval()));
            }
        }
        sorted.sort_unstable();
        sorted.dedup();
        // Reading through a gap pays only while the gap is small next to the tables: with
        // 512-byte clusters the L2 tables of a preallocated image sit every 32 KiB, and
        // reading through would read the whole file (twice the data per table pass).
        let max_gap = tl.clamp(4096, MAX_GAP);
        // Plan the runs first so that one buffer holds them all.
        let mut runs: Vec<(usize, usize, u64, u64)> = Vec::new();
        let mut i = 0;
        let mut total = 0u64;
        while i < sorted.len() {
            let start = sorted[i];
            let mut end = start.saturating_add(tl);
            let mut j = i + 1;
            while j < sorted.len() {
                let next = sorted[j];
                let next_end = next.saturating_add(tl);
                if next > end.saturating_add(max_gap) || next_end - start > MAX_RUN {
                    break;
                }
                end = end.max(next_end);
                j += 1;
            }
            runs.push((i, j, start, end));
            total += end - start;
            i = j;
        }
        buf.clear();
        buf.resize(total as usize, 0);
        let mut pos = 0usize;
        for (i, j, start, end) in runs {
            let len = (end - start) as usize;
            let run_buf = &mut buf[pos..pos + len];
            match pread(storage, run_buf, start) {
                Ok(()) => {
                    for &o in &sorted[i..j] {
                        slots.insert(o, Ok(pos + (o - start) as usize));
                    }
                }
                Err(_) => {
                    for &o in &sorted[i..j] {
                        let at = pos + (o - start) as usize;
                        let r = pread(storage, &mut buf[at..at + table_len], o);
                        slots.insert(o, r.map(|()| at).map_err(|e| crate::finding::errno_of(&e)));
                    }
                }
            }
            pos += len;
        }
        TableBatch {
            table_len,
            slots,
            buf,
        }
    }

    /// Whether `offset` was requested in this batch.
    pub(crate) fn contains(&self, offset: u64) -> bool {
        self.slots.contains_key(&offset)
    }

    /// The table at `offset` (which must have been requested), or the errno of its read.
    pub(crate) fn get_mut(&mut self, offset: u64) -> Result<&mut [u8], i32> {
        match self.slots.get(&offset) {
            Some(Ok(start)) => {
                let (start, tl) = (*start, self.table_len);
                self.buf.get_mut(start..start + tl).ok_or(EIO)
            }
            Some(Err(e)) => Err(*e),
            None => Err(EIO),
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Gives the buffer back for the next batch.
    pub(crate) fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads big-endian `u64`s from a byte buffer (a trailing partial word is ignored).
pub(crate) fn be64_words(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_be_bytes(w)
        })
        .collect()
}

/// The big-endian `u64` at byte `at` of `buf` (0 if out of range).
#[inline]
pub(crate) fn be64_at(buf: &[u8], at: usize) -> u64 {
    match buf.get(at..at + 8) {
        Some(s) => {
            let mut w = [0u8; 8];
            w.copy_from_slice(s);
            u64::from_be_bytes(w)
        }
        None => 0,
    }
}

/// Stores `v` big-endian at byte `at` of `buf` (ignored if out of range).
#[inline]
pub(crate) fn put_be64(buf: &mut [u8], at: usize, v: u64) {
    if let Some(s) = buf.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// `EINVAL`, for table offsets that cannot be addressed.
fn libc_einval() -> i32 {
    qcow2_io::errno::EINVAL
}
