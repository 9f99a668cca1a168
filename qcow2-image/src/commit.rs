//! `qemu-img commit`: writing an overlay's data into an image below it, then emptying the
//! overlay.
//!
//! What moves (QEMU's commit job, a mirror of the overlay into the base): the base's
//! blocks (its cluster size, at least 4 KiB; 64 KiB for a raw base) that one of the images
//! above the base touches are rewritten from what the overlay reads there. Within them a
//! run that reads as data is copied as plain data, in whole blocks (a partly held block is
//! copied whole, its other bytes read through the chain); a run of whole blocks that
//! reads as zeros becomes a zero write that may unmap (`BDRV_REQ_MAY_UNMAP`), so the base
//! gets zero clusters where the overlay had them. Blocks nothing above the base touches
//! are not touched. A base smaller than the overlay is grown first; the base is flushed
//! at the end.
//!
//! Emptying the overlay (QEMU's `qcow2_make_empty`) happens unless the overlay is kept: a
//! full discard of every cluster (entries unallocated, so the base shows through; crash
//! safe through the normal free path, invariants 1 and 2), then, on a v3 image without
//! snapshots, bitmaps, encryption or data file, QEMU's `make_completely_empty` layout:
//! header, a one-cluster refcount table, one refcount block, an empty L1 table, and the
//! file truncated after it. Where the tables already sit at those places the rewrite goes
//! in steps that each leave a consistent image (leaks at worst); elsewhere it runs under
//! the dirty bit as QEMU's does. Either way the overlay's guest view is already empty by
//! then, so a crash in it loses nothing the base does not hold.

use crate::backing::{BackingImage, Held};
use crate::error::{ImageError, Op, Result};
use crate::image::HDR_INCOMPAT;
use crate::status::BlockStatus;
use crate::Image;
use qcow2_format::features::INCOMPAT_DIRTY;
use qcow2_format::refcount::RefcountCodec;
use qcow2_io::Storage;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Header offset of `l1_table_offset` (be64), followed by `refcount_table_offset` (be64)
/// and `refcount_table_clusters` (be32).
const HDR_L1_OFFSET: u64 = 40;

/// An image that a commit writes into: readable as a backing image, and writable.
pub trait CommitTarget: BackingImage {
    /// Writes guest data.
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes a range read as zeros, releasing its storage where the format can.
    fn write_zeroes_unmap(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Grows the virtual size to `size`.
    fn grow(&mut self, size: u64) -> Result<()>;
    /// Makes everything written durable.
    fn flush_target(&mut self) -> Result<()>;
    /// Flushes and closes.
    fn close_target(self: Box<Self>) -> Result<()>;
    /// The block size the commit copies in (QEMU's default bitmap granularity of the
    /// target: its cluster size, at least 4 KiB, or 64 KiB when it has none).
    fn granularity(&self) -> u64 {
        DEFAULT_GRANULARITY
    }
}

/// QEMU's mirror granularity for targets without a cluster size.
const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// The most a data copy moves in one request (QEMU's mirror: its 16 MiB buffer over 16
/// requests in flight).
const MAX_IO_BYTES: u64 = 1 << 20;

impl CommitTarget for Image {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write(offset, data)
    }

    fn write_zeroes_unmap(&mut self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn grow(&mut self, size: u64) -> Result<()> {
        self.resize(size)
    }

    fn flush_target(&mut self) -> Result<()> {
        self.flush()
    }

    fn close_target(self: Box<Self>) -> Result<()> {
        (*self).close()
    }

    fn granularity(&self) -> u64 {
        self.cluster_size().max(4096)
    }
}

/// A raw image file opened for writing, as a commit target (and a backing image).
pub struct RawTarget {
    storage: Arc<dyn Storage>,
    size: u64,
}

impl RawTarget {
    /// Wraps a writable storage; the size is its length rounded up to whole sectors.
    pub fn new(storage: Arc<dyn Storage>) -> Result<Self> {
        let len = storage
            .len()
            .map_err(|e| ImageError::io(Op::Open, "length of raw image", 0, e))?;
        Ok(Self {
            storage,
            size: len.checked_next_multiple_of(512).unwrap_or(len),
        })
    }

    fn file_len(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| ImageError::io(Op::Read, "length of raw image", 0, e))
    }
}

impl BackingImage for RawTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // The base may have grown during the commit: the file's length now.
        let file_len = self.file_len()?;
        crate::status::raw_read(&*self.storage, file_len, offset, buf)
    }

    fn status(&mut self, offset: u64, len: u64) -> Result<BlockStatus> {
        crate::status::raw_status(&*self.storage, self.size, offset, len)
    }
}

impl CommitTarget for RawTarget {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.storage
            .write_at(data, offset)
            .map_err(|e| ImageError::io(Op::Commit, "write to raw image", offset, e))
    }

    /// Zeros stay allocated in a raw file (`FALLOC_FL_ZERO_RANGE`, else written), as
    /// QEMU's commit leaves them: the file's block status keeps reporting data there.
    fn write_zeroes_unmap(&mut self, offset: u64, len: u64) -> Result<()> {
        let io = |e| ImageError::io(Op::Commit, "zero raw image", offset, e);
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io(std::io::Error::from_raw_os_error(qcow2_io::errno::EINVAL)))?;
        if end > self.file_len()? {
            self.storage.set_len(end).map_err(io)?;
        }
        if self.storage.zero_fast(offset, len).map_err(io)? {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.storage
                .write_at(&zeros[..n], offset + done)
                .map_err(io)?;
            done += n as u64;
        }
        Ok(())
    }

    fn grow(&mut self, size: u64) -> Result<()> {
        self.storage
            .set_len(size)
            .map_err(|e| ImageError::io(Op::Resize, "grow raw image", size, e))?;
        self.size = size;
        Ok(())
    }

    fn flush_target(&mut self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| ImageError::io(Op::Flush, "flush raw image", 0, e))
    }

    fn close_target(mut self: Box<Self>) -> Result<()> {
        self.flush_target()
    }
}

/// A commit target shared between the overlay's backing chain (which reads through it)
/// and the commit (which writes it): one open of the base file, so the chain sees every
/// committed byte and no second writer exists.
#[derive(Clone)]
pub struct SharedTarget(Arc<Mutex<Box<dyn CommitTarget>>>);

impl SharedTarget {
    /// Shares `target`.
    pub fn new(target: Box<dyn CommitTarget>) -> Self {
        SharedTarget(Arc::new(Mutex::new(target)))
    }

    fn with<T>(&self, f: impl FnOnce(&mut dyn CommitTarget) -> Result<T>) -> Result<T> {
        let mut g = self.0.lock().map_err(|_| ImageError::InvalidArgument {
            op: Op::Commit,
            reason: "the commit target was poisoned by a panic".into(),
        })?;
        f(g.as_mut())
    }

    /// Closes the target; every other handle (the overlay's chain) must be gone.
    pub fn close(self) -> Result<()> {
        match Arc::try_unwrap(self.0) {
            Ok(m) => match m.into_inner() {
                Ok(t) => t.close_target(),
                Err(p) => p.into_inner().close_target(),
            },
            Err(_) => Err(ImageError::InvalidArgument {
                op: Op::Close,
                reason: "the commit target is still attached to an image".into(),
            }),
        }
    }
}

impl BackingImage for SharedTarget {
    fn size(&self) -> u64 {
        self.0.lock().map(|g| g.size()).unwrap_or(0)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.with(|t| t.read(offset, buf))
    }

    fn status(&mut self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.with(|t| t.status(offset, len))
    }

    fn held_above(&mut self, offset: u64, len: u64, levels: u32) -> Result<(Held, u64)> {
        self.with(|t| t.held_above(offset, len, levels))
    }
}

/// What `qemu-img commit` is asked to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitOptions {
    /// `-d` (and `-b`): leave the overlay as it is instead of emptying it.
    pub keep_overlay: bool,
    /// `-r`: at most this many bytes per second are copied.
    pub rate_limit: Option<u64>,
}

/// Where a commit failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The base could not be grown to the overlay's size.
    #[error("Top image is larger than base image, and resize of base image failed: {0}")]
    Resize(#[source] ImageError),
    /// Reading the overlay (or an image between it and the base) failed.
    #[error("{}", crate::image::strerror(.0.errno()))]
    Read(#[source] ImageError),
    /// Writing or flushing the base failed.
    #[error("{}", crate::image::strerror(.0.errno()))]
    Write(#[source] ImageError),
    /// Emptying the overlay failed (the base holds the data already).
    #[error("{}", crate::image::strerror(.0.errno()))]
    Empty(#[source] ImageError),
}

impl Image {
    /// Attaches a backing image opened by the caller (in place of the one the backing
    /// policy opened, if any); the name in the header is not changed.
    pub fn set_backing(&mut self, backing: Option<Box<dyn BackingImage>>) {
        self.backing = backing;
    }

    /// `qemu-img commit`: see the module documentation. `base` is the image at depth
    /// `base_depth` of this image's chain (1: its backing file), and must be the one the
    /// chain reads through (attached with [`Image::set_backing`] directly or below the
    /// images in between). `progress(done, total)` follows the guest offset.
    pub fn commit(
        &mut self,
        base: &SharedTarget,
        base_depth: u32,
        opts: &CommitOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), CommitError> {
        let size = self.virtual_size();
        let base = base.clone();
        if base.size() < size {
            base.with(|t| t.grow(size)).map_err(CommitError::Resize)?;
        }
        progress(0, size);
        let g = base
            .with(|t| Ok(t.granularity()))
            .map_err(CommitError::Write)?;
        let started = Instant::now();
        let mut copied = 0u64;
        // Page-aligned: the kernel copies from the page cache fastest into those.
        let mut buf = qcow2_io::IoBuf::default();
        let mut offset = 0u64;
        while offset < size {
            // The next run of granularity blocks that something above the base touches
            // (QEMU's dirty bitmap of the commit job).
            let Some((start, end)) = self
                .dirty_run(offset, size, g, base_depth)
                .map_err(CommitError::Read)?
            else {
                break;
            };
            let mut at = start;
            while at < end {
                let st = self.chain_status(at, end - at).map_err(CommitError::Read)?;
                // QEMU's mirror_iteration: a data run is copied in whole blocks (a run
                // shorter than a block is copied as one block, whatever it holds); a
                // zero run of whole blocks becomes a zero write.
                let mut io = if st.data {
                    st.length.min(MAX_IO_BYTES)
                } else {
                    st.length
                };
                io -= io % g;
                let copy = if io < g {
                    io = g;
                    true
                } else {
                    st.data || !st.zero
                };
                let io = io.min(end - at).min(size - at);
                if copy {
                    buf.resize(io as usize);
                    self.read(at, &mut buf).map_err(CommitError::Read)?;
                    base.with(|t| t.write_data(at, &buf))
                        .map_err(CommitError::Write)?;
                    copied += io;
                    throttle(opts.rate_limit, started, copied);
                } else {
                    base.with(|t| t.write_zeroes_unmap(at, io))
                        .map_err(CommitError::Write)?;
                }
                at += io;
                progress(at, size);
            }
            offset = end;
        }
        progress(size, size);
        base.with(|t| t.flush_target())
            .map_err(CommitError::Write)?;
        if !opts.keep_overlay {
            self.make_empty().map_err(CommitError::Empty)?;
        }
        Ok(())
    }

    /// The first run of `g`-sized blocks at or after `from` in which one of the top
    /// `levels` layers holds something, as `(start, end)` (end clipped to `size`).
    fn dirty_run(
        &mut self,
        from: u64,
        size: u64,
        g: u64,
        levels: u32,
    ) -> Result<Option<(u64, u64)>> {
        let mut at = from;
        let mut start = None;
        while at < size {
            let block_end = (at - at % g + g).min(size);
            let mut dirty = false;
            let mut pos = at;
            while pos < block_end {
                let (held, n) = self.held_above(pos, block_end - pos, levels)?;
                if held != Held::No {
                    dirty = true;
                    break;
                }
                pos += n.max(1);
            }
            match (dirty, start) {
                (true, None) => start = Some(at),
                (false, Some(s)) => return Ok(Some((s, at))),
                _ => {}
            }
            // A clean stretch can be skipped in one step when a single answer covers it.
            at = block_end;
        }
        Ok(start.map(|s| (s, size)))
    }

    /// Empties the image as QEMU's `qcow2_make_empty` does (see the module documentation):
    /// afterwards every guest range reads from the backing file.
    pub fn make_empty(&mut self) -> Result<()> {
        let op = Op::Commit;
        self.check_writable(op)?;
        let size = self.virtual_size();
        let mut guest = 0u64;
        while guest < size {
            guest += self.discard_in_slice(op, guest, size - guest, true)?;
        }
        self.flush_caches(op, true)?;
        let cs = self.geo.cluster_size();
        let l1_clusters = (u64::from(self.fc.header.l1_size) * 8).div_ceil(cs);
        let refblock_entries = RefcountCodec::for_geometry(&self.geo).entries_in(cs as usize);
        let completely = self.fc.header.version >= 3
            && self.fc.header.nb_snapshots == 0
            && self.fc.extensions.bitmaps.is_none()
            && self.fc.header.crypt_method == 0
            && self.data.is_none()
            && 3 + l1_clusters <= refblock_entries;
        if completely {
            self.empty_completely(l1_clusters)?;
        }
        Ok(())
    }

    /// QEMU's `make_completely_empty` on an image whose guest view is already empty and
    /// whose caches are clean, then the image is opened again from disk. When the refcount
    /// table, the first refcount block and the L1 table already sit where the empty layout
    /// puts them (every image QEMU or this library created does), the layout is reached in
    /// steps that each leave a consistent image, at worst with leaks: the L1 table is
    /// zeroed (the empty L2 tables leak), the refcount table keeps only its first entry
    /// (the clusters other blocks counted are referenced by nothing any more), the first
    /// block is rewritten to count only the layout's clusters, and the file is truncated.
    /// Otherwise QEMU's own sequence runs under the dirty bit.
    fn empty_completely(&mut self, l1_clusters: u64) -> Result<()> {
        let op = Op::Commit;
        let cs = self.geo.cluster_size();
        let n = 3 + l1_clusters;
        let file = self.image_file.clone();
        let step = |this: &mut Image, what: &'static str, r: std::io::Result<()>| {
            r.map_err(|e| {
                this.poison(format!("emptying the image failed: {e}"));
                ImageError::io(op, what, 0, e)
            })
        };
        let mut first = [0u8; 8];
        let r = file.read_at(&mut first, cs);
        step(self, "read the refcount table", r)?;
        let h_now = &self.fc.header;
        let in_place = h_now.refcount_table_offset == cs
            && h_now.refcount_table_clusters == 1
            && h_now.l1_table_offset == 3 * cs
            && u64::from_be_bytes(first) == 2 * cs;
        let codec = RefcountCodec::for_geometry(&self.geo);
        let mut block = vec![0u8; cs as usize];
        for i in 0..n {
            codec
                .set(&mut block, i, 1)
                .map_err(|e| ImageError::InvalidArgument {
                    op,
                    reason: e.to_string(),
                })?;
        }
        if in_place {
            let r = file
                .write_zeroes(3 * cs, l1_clusters * cs)
                .and_then(|()| file.flush());
            step(self, "zero the L1 table", r)?;
            let r = file
                .write_zeroes(cs + 8, cs - 8)
                .and_then(|()| file.flush());
            step(self, "drop the other refcount blocks", r)?;
            let r = file.write_at(&block, 2 * cs).and_then(|()| file.flush());
            step(self, "write the refcount block", r)?;
        } else {
            self.mark_dirty(op)?;
            let l1_offset = self.fc.header.l1_table_offset;
            let r = file.write_zeroes(l1_offset, l1_clusters * cs);
            step(self, "zero the L1 table", r)?;
            let r = file.write_zeroes(cs, (2 + l1_clusters) * cs);
            step(self, "zero the new metadata area", r)?;
            let mut fields = Vec::with_capacity(20);
            fields.extend_from_slice(&(3 * cs).to_be_bytes());
            fields.extend_from_slice(&cs.to_be_bytes());
            fields.extend_from_slice(&1u32.to_be_bytes());
            let r = file
                .write_at(&fields, HDR_L1_OFFSET)
                .and_then(|()| file.flush());
            step(self, "switch the header to the empty layout", r)?;
            let r = file
                .write_at(&(2 * cs).to_be_bytes(), cs)
                .and_then(|()| file.flush());
            step(self, "write the refcount table", r)?;
            let r = file.write_at(&block, 2 * cs).and_then(|()| file.flush());
            step(self, "write the refcount block", r)?;
            let clean = self.fc.header.incompatible_features & !INCOMPAT_DIRTY;
            let r = file
                .write_at(&clean.to_be_bytes(), HDR_INCOMPAT)
                .and_then(|()| file.flush());
            step(self, "clear the dirty bit", r)?;
            self.fc.header.incompatible_features = clean;
            self.fc.header.l1_table_offset = 3 * cs;
            self.fc.header.refcount_table_offset = cs;
            self.fc.header.refcount_table_clusters = 1;
        }
        let r = file.set_len(n * cs);
        step(self, "truncate the image", r)?;
        self.reopen(op)
    }
}

/// Sleeps as long as needed for `copied` bytes since `started` to stay within `rate`
/// bytes per second.
fn throttle(rate: Option<u64>, started: Instant, copied: u64) {
    let Some(rate) = rate.filter(|&r| r > 0) else {
        return;
    };
    let due = Duration::from_secs_f64(copied as f64 / rate as f64);
    let elapsed = started.elapsed();
    if due > elapsed {
        std::thread::sleep(due - elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CreateOptions;
    use qcow2_io::MemStorage;

    fn image(size: u64) -> Image {
        let mut o = CreateOptions::new(size);
        o.cluster_size = 4096;
        Image::create(Arc::new(MemStorage::new()), &o).unwrap()
    }

    #[test]
    fn commit_moves_data_and_zeros_and_empties_the_overlay() {
        let mut base = image(1 << 20);
        base.write(0, &[1; 65536]).unwrap();
        let mut top = image(2 << 20);
        top.write(4096, &[2; 4096]).unwrap();
        top.write_zeroes(16384, 8192, false).unwrap();
        top.write_compressed(1 << 20, &[3; 4096]).unwrap();
        let shared = SharedTarget::new(Box::new(base));
        top.set_backing(Some(Box::new(shared.clone())));
        let mut before = vec![0u8; 2 << 20];
        top.read(0, &mut before).unwrap();
        top.commit(&shared, 1, &CommitOptions::default(), &mut |_, _| {})
            .unwrap();
        let mut after = vec![0u8; 2 << 20];
        top.read(0, &mut after).unwrap();
        assert_eq!(before, after);
        assert_eq!(top.allocated_bytes(0, 2 << 20).unwrap(), 0);
        // The overlay now holds only header, refcount table, refcount block and L1.
        assert_eq!(top.header().refcount_table_offset, 4096);
        assert_eq!(top.header().l1_table_offset, 3 * 4096);
        let mut b = shared.clone();
        assert_eq!(b.size(), 2 << 20);
        let mut got = vec![0u8; 2 << 20];
        b.read(0, &mut got).unwrap();
        assert_eq!(got, before);
        let (held, _) = b.held_above(16384, 8192, 1).unwrap();
        assert_eq!(held, Held::Zero);
        drop(b);
        drop(top);
        shared.close().unwrap();
    }
}
