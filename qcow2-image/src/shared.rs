//! Concurrent guest I/O on one image: [`SharedImage`] is `Send + Sync` and its guest I/O
//! takes `&self`.
//!
//! The metadata engine (caches, refcount engine, allocator, overlap state, header bits, L1)
//! sits behind one lock, held while a request is mapped, allocated and linked, never while
//! the data of a read or of an in-place write moves (QEMU's block layer drops its qcow2
//! lock around data I/O the same way). What keeps that safe:
//!
//! - **In-flight data ranges.** A request whose data moves without the lock registers its
//!   guest clusters first, under the lock. Any request that would change the mapping of a
//!   registered cluster (allocating or copy-on-write writes, zero writes, discards,
//!   compressed writes) drops the lock, waits until those clusters have no data in
//!   flight, and plans again (nobody waits on the registry while holding the lock: see
//!   `inflight.rs`). So a host cluster is never freed, reused or moved while data is read from or
//!   written to it for another request; unrelated requests proceed.
//! - **In-flight allocations** (QEMU's `QCowL2Meta`). A write into fresh clusters whose
//!   copy-on-write areas read as zero (or come from the backing file) allocates them under the lock (refcounts taken,
//!   overlap-checked), registers its guest clusters as allocating, writes its data without
//!   the lock (one fast zeroing of the new clusters and the guest bytes), and links the L2
//!   entries under the lock again. Every write, zero write, discard or compressed write that
//!   touches an allocating cluster waits for it **without** the lock (the allocation needs
//!   it to finish), then plans again; reads do not wait (they see the old mapping until the
//!   link, as a read racing a write may). Data reaches the storage before the entry that
//!   points at it, as on the single-threaded path; a crash in between leaks the clusters
//!   and never exposes them.
//! - **Drain.** Operations on the whole image (snapshots, amend, resize, close, and
//!   [`SharedImage::exclusive`]) wait for every request in flight and run alone.
//! - Freed clusters stay quarantined until a durable flush (invariant 2), as before.
//!
//! Which methods may run in parallel: `read`, `write`, `write_zeroes`, `discard`,
//! `write_compressed`, `flush`, `map`, `block_status` and the accessors, from any number
//! of threads. Reads (of data, compressed and backing clusters), in-place writes and
//! allocating writes whose copy-on-write bytes are zeros or backing data overlap their data
//! movement; the other requests that change metadata run one at a time under the lock.
//! Whole-image operations run alone. [`SharedImage::queue`] keeps many requests in flight
//! from one thread (io_uring where the file has it).

use crate::error::{ImageError, Op, Result};
use crate::inflight::{InFlight, Moving};
use crate::map::Extent;
use crate::plan::ReadPiece;
use crate::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use crate::Image;

/// An image shared by many threads: guest I/O takes `&self` (see the module docs for what
/// may run in parallel).
pub struct SharedImage {
    pub(crate) core: Mutex<Image>,
    pub(crate) drain: RwLock<()>,
    pub(crate) in_flight: InFlight,
    cluster_size: u64,
}

impl std::fmt::Debug for SharedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedImage")
            .field("cluster_size", &self.cluster_size)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock_failed(op: Op) -> ImageError {
    ImageError::Poisoned {
        op,
        cause: "a thread panicked while changing the image's metadata".into(),
    }
}

impl SharedImage {
    /// Shares an open image between threads.
    pub fn new(image: Image) -> Self {
        let cluster_size = image.geometry().cluster_size();
        SharedImage {
            core: Mutex::new(image),
            drain: RwLock::new(()),
            in_flight: InFlight::default(),
            cluster_size,
        }
    }

    pub(crate) fn core(&self, op: Op) -> Result<MutexGuard<'_, Image>> {
        self.core.lock().map_err(|_| lock_failed(op))
    }

    pub(crate) fn requests(&self, op: Op) -> Result<RwLockReadGuard<'_, ()>> {
        self.drain.read().map_err(|_| lock_failed(op))
    }

    /// The cluster-aligned guest range around `[offset, offset + len)`.
    pub(crate) fn clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.cluster_size;
        let start = offset / cs * cs;
        let end = offset.saturating_add(len).div_ceil(cs).saturating_mul(cs);
        (start, end)
    }

    /// Runs `f` on the engine alone: requests in flight finish first and new ones wait
    /// (QEMU's drain). For whole-image operations without a method here.
    pub fn exclusive<R>(&self, f: impl FnOnce(&mut Image) -> R) -> Result<R> {
        let _alone = self.drain.write().map_err(|_| lock_failed(Op::Open))?;
        let mut core = self.core(Op::Open)?;
        Ok(f(&mut core))
    }

    /// Reads guest bytes; data moves without the metadata lock.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _req = self.requests(Op::Read)?;
        self.read_request(offset, buf)
    }

    /// [`SharedImage::read`] for a caller that holds the drain guard.
    pub(crate) fn read_request(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let op = Op::Read;
        let mut core = self.core(op)?;
        let pieces = core.plan_read(offset, buf)?;
        if !pieces.iter().any(ReadPiece::pending) {
            return Ok(());
        }
        let sources = core.read_sources();
        let (start, end) = self.clusters(offset, buf.len() as u64);
        // Data, compressed and backing clusters alike: their mapping stays while the
        // bytes are read (writers that would change it wait for this range).
        let _moving = self.in_flight.register(start, end, Moving::Data);
        drop(core);
        crate::sync::data_moves();
        for p in &pieces {
            sources.fill(op, offset, p, buf)?;
        }
        Ok(())
    }

    /// Writes guest bytes. Into clusters the image owns whose subclusters hold data, the
    /// data moves without the metadata lock; fresh clusters whose copy-on-write areas read
    /// as zero are allocated under the lock, written without it and linked under it again
    /// (other requests touching them wait); everything else runs under the lock.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let _req = self.requests(Op::Write)?;
        self.write_request(offset, buf)
    }

    /// [`SharedImage::write`] for a caller that holds the drain guard.
    pub(crate) fn write_request(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let op = Op::Write;
        let len = buf.len() as u64;
        let (start, end) = self.clusters(offset, len);
        let mut core = loop {
            let mut core = self.lock_clear(op, start, end, Moving::Alloc)?;
            core.check_writable(op)?;
            core.check_range(op, offset, len)?;
            core.track_change(op, offset, len)?;
            if let Some(pieces) = core.plan_rewrite(offset, len)? {
                let storage = core.data_storage_arc();
                let cipher = core.crypto_arc();
                let iv_guest = core.crypt_iv_guest;
                let _moving = self.in_flight.register(start, end, Moving::Data);
                drop(core);
                crate::sync::data_moves();
                for p in pieces {
                    let src = &buf[p.at as usize..(p.at + p.len) as usize];
                    let io = |e| ImageError::io(op, "write guest data", p.host, e);
                    match &cipher {
                        Some(c) => {
                            let iv = if iv_guest { offset + p.at } else { p.host };
                            let enc = crate::crypto::encrypted(c.as_ref(), iv, src).map_err(io)?;
                            storage.write_at(&enc, p.host)
                        }
                        None => storage.write_at(src, p.host),
                    }
                    .map_err(io)?;
                }
                return Ok(());
            }
            // Nothing may read from or write to clusters whose mapping changes now.
            if !self.in_flight.moving(start, end) {
                break core;
            }
            drop(core);
            self.in_flight.wait_for(Moving::Data, start, end);
        };
        let Some(plan) = core.plan_alloc(offset, len)? else {
            return core.write(offset, buf);
        };
        let storage = core.data_storage_arc();
        let _allocating = self.in_flight.register(start, end, Moving::Alloc);
        drop(core);
        crate::sync::data_moves();
        let written = plan.prepare(op, &*storage, buf).and_then(|whole| {
            let (at, bytes) = match &whole {
                Some(w) => (plan.zero.0, &w[..]),
                None => (plan.data_at, buf),
            };
            storage
                .write_at(bytes, at)
                .map_err(|e| ImageError::io(op, "write guest data", at, e))
        });
        let mut core = self.core(op)?;
        match written {
            Ok(()) => core.finish_alloc(plan),
            Err(e) => {
                core.abort_alloc(&plan);
                Err(e)
            }
        }
    }

    /// Takes the metadata lock once nothing of `kind` (and, for [`Moving::Data`],
    /// no allocation either) is in flight in `[start, end)`, waiting without the lock
    /// (see `inflight.rs`: nobody waits while holding it).
    pub(crate) fn lock_clear(
        &self,
        op: Op,
        start: u64,
        end: u64,
        kind: Moving,
    ) -> Result<MutexGuard<'_, Image>> {
        loop {
            let core = self.core(op)?;
            if self.in_flight.allocating(start, end) {
                drop(core);
                self.in_flight.wait_for(Moving::Alloc, start, end);
            } else if kind == Moving::Data && self.in_flight.moving(start, end) {
                drop(core);
                self.in_flight.wait_for(Moving::Data, start, end);
            } else {
                return Ok(core);
            }
        }
    }

    /// Makes guest bytes read as zeros (see [`Image::write_zeroes`]).
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.metadata_request(Op::WriteZeroes, offset, len, |img| {
            img.write_zeroes(offset, len, unmap)
        })
    }

    /// Discards guest bytes (see [`Image::discard`]).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.metadata_request(Op::Discard, offset, len, |img| img.discard(offset, len))
    }

    /// Writes one compressed cluster (see [`Image::write_compressed`]).
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.metadata_request(Op::WriteCompressed, offset, data.len() as u64, |img| {
            img.write_compressed(offset, data)
        })
    }

    /// A request that changes the mapping of its clusters: waits until no data moves and
    /// no allocation is in flight there, then runs under the lock.
    fn metadata_request<R>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut Image) -> Result<R>,
    ) -> Result<R> {
        let _req = self.requests(op)?;
        let (start, end) = self.clusters(offset, len.max(1));
        let mut core = self.lock_clear(op, start, end, Moving::Data)?;
        f(&mut core)
    }

    /// Makes every completed write durable (see [`Image::flush`]).
    pub fn flush(&self) -> Result<()> {
        let _req = self.requests(Op::Flush)?;
        self.core(Op::Flush)?.flush()
    }

    /// Maps a guest range (see [`Image::map`]).
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let _req = self.requests(Op::Map)?;
        self.core(Op::Map)?.map(offset, len)
    }

    /// The block status of the range starting at `offset` (see [`Image::block_status`]).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let _req = self.requests(Op::Map)?;
        self.core(Op::Map)?.block_status(offset, len)
    }

    /// Dirty and clean runs of a persistent bitmap (see [`Image::dirty_bitmap_runs`]).
    pub fn dirty_bitmap_runs(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let _req = self.requests(Op::Map)?;
        self.core(Op::Map)?.dirty_bitmap_runs(name, offset, len)
    }

    /// The block status of this image's own layer (see `Image::layer_status`), for an
    /// overlay above it.
    pub(crate) fn layer_status(&self, offset: u64, len: u64) -> Result<crate::BlockStatus> {
        self.core(Op::Map)?.layer_status(offset, len)
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> Result<u64> {
        Ok(self.core(Op::Map)?.virtual_size())
    }

    /// Changes the disk size, alone (see [`Image::resize`]).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.exclusive(|img| img.resize(new_size))?
    }

    /// Creates an internal snapshot, alone (see [`Image::snapshot_create`]).
    pub fn snapshot_create(&self, name: &str) -> Result<crate::SnapshotEntry> {
        self.exclusive(|img| img.snapshot_create(name))?
    }

    /// Reverts to an internal snapshot, alone (see [`Image::snapshot_apply`]).
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        self.exclusive(|img| img.snapshot_apply(id_or_name))?
    }

    /// Deletes an internal snapshot, alone (see [`Image::snapshot_delete`]).
    pub fn snapshot_delete(&self, name: &str) -> Result<crate::SnapshotEntry> {
        self.exclusive(|img| img.snapshot_delete(name))?
    }

    /// Waits for the requests in flight, then closes the image (see [`Image::close`]).
    pub fn close(self) -> Result<()> {
        let image = self.core.into_inner().map_err(|_| lock_failed(Op::Close))?;
        image.close()
    }

    /// Gives the image back once no other thread uses it (the requests in flight hold
    /// borrows, so none remains when this runs).
    pub fn into_inner(self) -> Result<Image> {
        self.core.into_inner().map_err(|_| lock_failed(Op::Close))
    }
}

#[cfg(all(test, not(shuttle)))]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn shared_image_is_send_and_sync() {
        assert_send_sync::<SharedImage>();
    }

    /// Counts data reads and writes in progress at once (each takes 20 ms).
    struct Slow {
        inner: qcow2_io::MemStorage,
        now: std::sync::atomic::AtomicU32,
        max: std::sync::atomic::AtomicU32,
        slow: std::sync::atomic::AtomicBool,
    }

    impl Slow {
        fn io<R>(&self, f: impl FnOnce() -> R) -> R {
            use std::sync::atomic::Ordering::SeqCst;
            if !self.slow.load(SeqCst) {
                return f();
            }
            let n = self.now.fetch_add(1, SeqCst) + 1;
            self.max.fetch_max(n, SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            let r = f();
            self.now.fetch_sub(1, SeqCst);
            r
        }
    }

    impl qcow2_io::Storage for Slow {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.io(|| self.inner.read_at(buf, offset))
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.io(|| self.inner.write_at(buf, offset))
        }
        fn flush(&self) -> std::io::Result<()> {
            self.inner.flush()
        }
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
    }

    #[test]
    fn reads_and_rewrites_move_data_in_parallel() {
        use std::sync::atomic::Ordering::SeqCst;
        let storage = std::sync::Arc::new(Slow {
            inner: qcow2_io::MemStorage::new(),
            now: 0.into(),
            max: 0.into(),
            slow: false.into(),
        });
        let mut img = Image::create(storage.clone(), &crate::CreateOptions::new(4 << 20)).unwrap();
        img.write(0, &vec![7u8; 4 << 20]).unwrap();
        img.flush().unwrap();
        let shared = SharedImage::new(img);
        // Metadata is cached now; only data I/O is slow.
        storage.slow.store(true, SeqCst);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let shared = &shared;
                s.spawn(move || {
                    let mut b = vec![0u8; 4096];
                    shared.read(t << 20, &mut b).unwrap();
                    assert!(b.iter().all(|&x| x == 7));
                    shared.write((t << 20) + 8192, &b).unwrap();
                });
            }
        });
        assert!(storage.max.load(SeqCst) >= 2, "data I/O never overlapped");
    }

    #[test]
    fn allocating_writes_move_data_in_parallel() {
        use std::sync::atomic::Ordering::SeqCst;
        let storage = std::sync::Arc::new(Slow {
            inner: qcow2_io::MemStorage::new(),
            now: 0.into(),
            max: 0.into(),
            slow: false.into(),
        });
        let mut img = Image::create(storage.clone(), &crate::CreateOptions::new(8 << 20)).unwrap();
        // L2 table present; every data cluster still unallocated.
        img.write(0, &[1u8; 512]).unwrap();
        img.flush().unwrap();
        let shared = SharedImage::new(img);
        let before = qcow2_io::Storage::len(&storage.inner).unwrap();
        storage.slow.store(true, SeqCst);
        std::thread::scope(|s| {
            for i in 0..8u64 {
                let shared = &shared;
                // Two threads race into each fresh cluster: one allocates, the other waits
                // for that allocation and must not allocate a second cluster.
                let (t, at) = (i / 2 + 1, if i % 2 == 0 { 4096 } else { 12288 });
                s.spawn(move || shared.write((t << 20) + at, &[t as u8; 4096]).unwrap());
            }
        });
        assert!(
            storage.max.load(SeqCst) >= 2,
            "allocating writes never overlapped"
        );
        storage.slow.store(false, SeqCst);
        let mut img = shared.into_inner().unwrap();
        for t in 1..5u64 {
            let mut b = vec![0u8; 65536];
            img.read(t << 20, &mut b).unwrap();
            assert!(b[..4096].iter().all(|&x| x == 0));
            assert!(b[4096..8192].iter().all(|&x| x == t as u8));
            assert!(b[8192..12288].iter().all(|&x| x == 0));
            assert!(b[12288..16384].iter().all(|&x| x == t as u8));
            assert!(b[16384..].iter().all(|&x| x == 0));
        }
        // One new cluster per thread, not one per request.
        let after = qcow2_io::Storage::len(&storage.inner).unwrap();
        assert_eq!(after - before, 4 * 65536);
        img.close().unwrap();
    }

    fn slow() -> std::sync::Arc<Slow> {
        std::sync::Arc::new(Slow {
            inner: qcow2_io::MemStorage::new(),
            now: 0.into(),
            max: 0.into(),
            slow: false.into(),
        })
    }

    #[test]
    fn compressed_reads_move_data_in_parallel() {
        use std::sync::atomic::Ordering::SeqCst;
        let storage = slow();
        let mut img = Image::create(storage.clone(), &crate::CreateOptions::new(8 << 20)).unwrap();
        for t in 0..4u64 {
            let cluster: Vec<u8> = (0..65536u32).map(|i| (i / 512) as u8 ^ t as u8).collect();
            img.write_compressed(t << 20, &cluster).unwrap();
        }
        img.flush().unwrap();
        let shared = SharedImage::new(img);
        storage.slow.store(true, SeqCst);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let shared = &shared;
                s.spawn(move || {
                    let mut b = vec![0u8; 4096];
                    shared.read((t << 20) + 8192, &mut b).unwrap();
                    let want: Vec<u8> = (8192..12288u32)
                        .map(|i| (i / 512) as u8 ^ t as u8)
                        .collect();
                    assert_eq!(b, want);
                });
            }
        });
        assert!(
            storage.max.load(SeqCst) >= 2,
            "compressed reads never overlapped"
        );
    }

    /// Reads through to a slow backing image, and allocating writes whose copy-on-write
    /// bytes come from it, move those bytes without the overlay's lock (and without the
    /// backing image's: it is shared too).
    #[test]
    fn backing_reads_and_cow_move_data_in_parallel() {
        use std::sync::atomic::Ordering::SeqCst;
        let storage = slow();
        let mut base = Image::create(storage.clone(), &crate::CreateOptions::new(8 << 20)).unwrap();
        let pattern = |t: u64| vec![0x10 + t as u8; 65536];
        for t in 0..8u64 {
            base.write(t << 20, &pattern(t)).unwrap();
        }
        base.flush().unwrap();
        let mut img = Image::create(
            std::sync::Arc::new(qcow2_io::MemStorage::new()),
            &crate::CreateOptions::new(8 << 20),
        )
        .unwrap();
        img.backing = Some(Box::new(base));
        // The overlay's L2 table exists; its data clusters are all unallocated.
        img.write((7 << 20) + 65536, &[0u8; 512]).unwrap();
        let shared = SharedImage::new(img);
        storage.slow.store(true, SeqCst);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let shared = &shared;
                s.spawn(move || {
                    let mut b = vec![0u8; 4096];
                    shared.read((t << 20) + 4096, &mut b).unwrap();
                    assert!(b.iter().all(|&x| x == 0x10 + t as u8));
                    // A partial write into the unallocated cluster of another region: the
                    // rest of the cluster is copied from the backing image.
                    shared.write(((t + 4) << 20) + 1000, &[0xee; 100]).unwrap();
                });
            }
        });
        assert!(
            storage.max.load(SeqCst) >= 2,
            "backing reads never overlapped"
        );
        storage.slow.store(false, SeqCst);
        for t in 4..8u64 {
            let mut b = vec![0u8; 65536];
            shared.read(t << 20, &mut b).unwrap();
            assert!(b[..1000].iter().all(|&x| x == 0x10 + t as u8));
            assert!(b[1000..1100].iter().all(|&x| x == 0xee));
            assert!(b[1100..].iter().all(|&x| x == 0x10 + t as u8));
            let m = shared.map(t << 20, 65536).unwrap();
            assert!(
                m[0].host_offset.is_some(),
                "cluster {t} not allocated: {m:?}"
            );
        }
    }
}
