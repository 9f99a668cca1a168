//! The write path: L2 allocation, L1 growth, cluster allocation, copy-on-write, linking.
//!
//! Order of every allocating write (QEMU's `qcow2_alloc_host_offset` →
//! `perform_cow` → `qcow2_alloc_cluster_link_l2`):
//! 1. *mapping*: make the L2 table writable (allocate or copy it; its refcount is flushed
//!    before the L1 entry points at it), classify the clusters, allocate new host clusters
//!    (refcounts in the refcount cache);
//! 2. *data*: read the copy-on-write parts through the old mapping, write them and the guest
//!    data to the new clusters; on failure free the new clusters (invariant 3);
//! 3. *link*: the L2 cache depends on the refcount cache (or the dirty bit is set with lazy
//!    refcounts) and on a storage flush (the data is durable before the entry), then the
//!    entries are updated (COPIED: refcount 1, invariant 6) and the old clusters freed
//!    (the refcount cache then depends on the L2 cache, invariant 1).

use crate::error::{ImageError, Op, Result};
use crate::image::{HDR_L1, HDR_SIZE};
use crate::options::Preallocation;
use crate::overlap::bits;
use crate::Image;
use qcow2_cache::CacheId;
use qcow2_format::display::CHex;
use qcow2_format::entry::{
    subcluster_alloc_range, subcluster_zero_range, L1E_OFFSET_MASK, OFLAG_COPIED,
};
use qcow2_format::limits::MAX_L1_SIZE;
use qcow2_format::{ClusterType, L2Entry};
use qcow2_io::{Event, StorageExt};
use qcow2_refcount::DiscardType;

/// What a write needs for one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// The cluster is ours (refcount 1) and every touched subcluster holds data: write in
    /// place, no metadata change.
    InPlace(u64),
    /// The cluster is ours but some touched subclusters are not data (preallocated zero,
    /// extended-L2 unallocated or zero subclusters): write in place, copy-on-write inside
    /// the cluster, update the entry.
    KeepOld(u64),
    /// A new host cluster is needed (unallocated, zero, compressed or shared).
    Alloc,
}

/// Where the copy-on-write regions of an allocation start and end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cow {
    /// Offset in the first cluster where the written area (COW head included) starts.
    pub start: u64,
    /// Offset in the last cluster where it ends (COW tail included).
    pub end: u64,
}

impl Image {
    /// Writes `buf` at guest `offset`, allocating L2 tables and clusters as needed.
    pub fn write(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let op = Op::Write;
        self.check_writable(op)?;
        self.check_range(op, offset, buf.len() as u64)?;
        self.track_change(op, offset, buf.len() as u64)?;
        self.write_internal(op, offset, buf)
    }

    pub(crate) fn write_internal(&mut self, op: Op, offset: u64, buf: &[u8]) -> Result<()> {
        const S: u64 = crate::crypto::SECTOR;
        let end = offset + buf.len() as u64;
        if self.crypto.is_some() && (offset % S != 0 || end % S != 0) && !buf.is_empty() {
            // Encrypted sectors change whole: the partial head and tail sectors are read
            // (decrypted) and merged, and the aligned range is written.
            let start = offset / S * S;
            let aligned_end = end.div_ceil(S) * S;
            if aligned_end > self.virtual_size() {
                return Err(ImageError::InvalidArgument {
                    op,
                    reason: "encrypted write past the last whole sector of the image".into(),
                });
            }
            let mut whole = vec![0u8; (aligned_end - start) as usize];
            self.read_internal(op, start, &mut whole[..S as usize])?;
            let last = whole.len() - S as usize;
            self.read_internal(op, aligned_end - S, &mut whole[last..])?;
            let at = (offset - start) as usize;
            whole[at..at + buf.len()].copy_from_slice(buf);
            return self.write_internal(op, start, &whole);
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let n = self.write_chunk(op, offset + pos as u64, &buf[pos..])?;
            pos += n;
        }
        Ok(())
    }

    /// Changes the virtual disk size to `new_size` bytes (`qemu-img resize`), with QEMU's
    /// rules: a multiple of 512 ("The new size must be a multiple of 512"); a v2 image with
    /// snapshots cannot be resized ("Can't resize a v2 image which has snapshots"). Growing:
    /// the L1 table grows with QEMU's atomic switch, then the header's size field is
    /// rewritten. Shrinking (QEMU's `qcow2_co_truncate` with a smaller size, allowed on v3
    /// images with snapshots as in QEMU 10): the clusters beyond the new end are discarded
    /// (unreferenced, shared L2 tables copied first so snapshots keep theirs), the L2 tables
    /// wholly beyond it are released (their L1 entries cleared; `l1_size` unchanged, as
    /// QEMU), the file is truncated after the last cluster still in use, then the header's
    /// size is rewritten. Data beyond the new end is lost.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.resize_as(Op::Resize, new_size)
    }

    /// [`Image::resize`] on behalf of `op` (snapshot apply resizes too).
    pub(crate) fn resize_as(&mut self, op: Op, new_size: u64) -> Result<()> {
        self.check_writable(op)?;
        let old = self.virtual_size();
        if self.fc.header.version < 3 && !self.snapshots.is_empty() {
            return Err(ImageError::Refused {
                op,
                message: "Can't resize a v2 image which has snapshots".into(),
                hint: None,
                errno: crate::error::ENOTSUP,
            });
        }
        if new_size % 512 != 0 {
            return Err(ImageError::Refused {
                op,
                message: "The new size must be a multiple of 512".into(),
                hint: None,
                errno: qcow2_io::errno::EINVAL,
            });
        }
        if new_size != old {
            // Refused with inconsistent bitmaps, as QEMU; the others follow the new size.
            self.resize_bitmaps(op, new_size)?;
        }
        if new_size < old {
            self.shrink(op, new_size)?;
            return self.resize_data_file(op, new_size);
        }
        let needed = self.geo.l1_entries_for(new_size);
        if needed > MAX_L1_SIZE / 8 {
            return Err(ImageError::InvalidArgument {
                op,
                reason: "File too large".into(),
            });
        }
        // QEMU's rule (bdrv_co_truncate): when a backing file reaches past the old end, the
        // new area must read as zeros, not as the backing file's data; zero clusters need v3.
        let zero_new_area = self.backing.as_ref().is_some_and(|b| b.size() > old);
        if zero_new_area && self.fc.header.version < 3 {
            return Err(ImageError::Refused {
                op,
                message: "Failed to zero out new clusters: Operation not supported".into(),
                hint: None,
                errno: crate::error::ENOTSUP,
            });
        }
        self.grow_l1(op, needed, true)?;
        if zero_new_area {
            // The zeros are made durable before the header's size exposes the new area, so
            // a crash never shows the backing file's bytes there.
            self.fc.header.size = new_size;
            let zeroed = self
                .zero_grown_area(old, new_size)
                .and_then(|()| self.flush_caches(op, true));
            if let Err(e) = zeroed {
                self.fc.header.size = old;
                return Err(e);
            }
        }
        if let Err(e) =
            self.metadata_write_sync(op, "write the new size", &new_size.to_be_bytes(), HDR_SIZE)
        {
            self.fc.header.size = old;
            return Err(e);
        }
        self.fc.header.size = new_size;
        self.resize_data_file(op, new_size)
    }

    /// Makes guest `[old, new)` read as zeros after a grow (QEMU's `qcow2_co_truncate` with
    /// `BDRV_REQ_ZERO_WRITE`): zero clusters from the first subcluster boundary, explicit
    /// zeros for the unaligned head, which a shrink may have left inside a cluster that
    /// still holds old data.
    fn zero_grown_area(&mut self, old: u64, new: u64) -> Result<()> {
        let scs = self.geo.subcluster_size();
        let zero_start = old.div_ceil(scs) * scs;
        if new > zero_start {
            self.write_zeroes(zero_start, new - zero_start, false)?;
        }
        let head_end = zero_start.min(new);
        if head_end > old {
            self.write_zero_buffer(Op::Resize, old, head_end - old)?;
        }
        Ok(())
    }

    /// An external data file is as long as the disk: QEMU sizes it at creation and
    /// truncates it to the new size with the image (`qcow2_co_truncate` passes the resize
    /// on to the data file, which a regular file takes exactly), raw or not. Guest data
    /// past a shrunk end would otherwise stay in the file.
    pub(crate) fn resize_data_file(&mut self, op: Op, new_size: u64) -> Result<()> {
        let Some(data) = self.data.clone() else {
            return Ok(());
        };
        let io = |e| ImageError::io(op, "resize the data file", new_size, e);
        let len = data.len().map_err(io)?;
        if len != new_size {
            data.set_len(new_size).map_err(io)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ L1 / L2 tables

    /// Writes the 512-byte-aligned group of L1 entries holding `l1_index` (QEMU's
    /// `qcow2_write_l1_entry`), synchronously.
    pub(crate) fn write_l1_entry(&mut self, op: Op, l1_index: u64) -> Result<()> {
        self.write_l1_group(op, l1_index & !63, true)
    }

    /// Writes the 64 L1 entries starting at `start` (a multiple of 64), synchronously or not.
    pub(crate) fn write_l1_group(&mut self, op: Op, start: u64, sync: bool) -> Result<()> {
        let n = (self.l1.len() as u64 - start).min(64);
        let mut buf = Vec::with_capacity(n as usize * 8);
        for e in &self.l1[start as usize..(start + n) as usize] {
            buf.extend_from_slice(&e.to_be_bytes());
        }
        let off = self.fc.header.l1_table_offset + start * 8;
        if !self.refcount_covers(L2Entry::normal(off & !511, true).unwrap_or(L2Entry::UNALLOCATED))
        {
            return Err(self.corruption(
                op,
                true,
                format!(
                    "Active L1 table offset {} is not covered by the refcount structures",
                    CHex(self.fc.header.l1_table_offset)
                ),
            ));
        }
        self.storage.event(Event::L1Update);
        if let Err(e) = self.overlap.check(off, n * 8, bits::ACTIVE_L1) {
            return Err(self.corruption(op, true, e.to_string()));
        }
        if sync {
            self.metadata_write_sync(op, "write an L1 entry", &buf, off)
        } else {
            self.metadata_write(op, "write an L1 entry", &buf, off)
        }
    }

    /// Grows the active L1 table to at least `min_size` entries (QEMU's
    /// `qcow2_grow_l1_table`): the new table is allocated, its refcount flushed, the table
    /// written and flushed, then one header write switches to it, then the old one is freed
    /// (invariant 4).
    pub(crate) fn grow_l1(&mut self, op: Op, min_size: u64, exact: bool) -> Result<()> {
        let cur = self.l1.len() as u64;
        if min_size <= cur {
            return Ok(());
        }
        // The new table is a copy of memory: deferred entries must be durable first.
        if !self.l1_dirty.is_empty() {
            self.flush_caches(op, true)?;
        }
        let max = MAX_L1_SIZE / 8;
        if min_size > max {
            return Err(ImageError::io(
                op,
                "grow the L1 table",
                min_size,
                qcow2_io::errno::error(qcow2_io::errno::EFBIG),
            ));
        }
        let new_size = if exact {
            min_size
        } else {
            let mut n = cur.max(1);
            while n < min_size {
                n = (n * 3).div_ceil(2);
            }
            n.min(max)
        };
        let bytes = new_size * 8;
        self.storage.event(Event::L1GrowAllocTable);
        let clusters = self.geo.size_to_clusters(bytes);
        let new_off = match self.engine.alloc_clusters(&mut self.caches, clusters) {
            Ok(o) => o,
            Err(e) => return Err(self.rc_err(op, e)),
        };
        self.sync_overlap_refcounts();
        // The new table's refcount is durable before the header points at it.
        if let Err(e) = self.caches.flush(CacheId::Refblock) {
            return Err(self.cache_err(op, e));
        }
        self.storage.event(Event::L1GrowWriteTable);
        if let Err(e) = self.overlap.check(new_off, bytes, 0) {
            return Err(self.corruption(op, true, e.to_string()));
        }
        let mut table = Vec::with_capacity(bytes as usize);
        for e in &self.l1 {
            table.extend_from_slice(&e.to_be_bytes());
        }
        table.resize(bytes as usize, 0);
        if let Err(e) = self.metadata_write_sync(op, "write the new L1 table", &table, new_off) {
            // Nothing points at the new table: give it back.
            let _ = self.engine.free_clusters(
                &mut self.caches,
                new_off,
                clusters * self.geo.cluster_size(),
                DiscardType::Other,
            );
            return Err(e);
        }
        self.storage.event(Event::L1GrowActivateTable);
        let mut sw = [0u8; 12];
        sw[..4].copy_from_slice(&(new_size as u32).to_be_bytes());
        sw[4..].copy_from_slice(&new_off.to_be_bytes());
        // If this write fails we cannot know which table the header names: keep both (leak
        // at worst) and let the poison stop further writes.
        self.metadata_write_sync(op, "switch to the new L1 table", &sw, HDR_L1)?;
        let old_off = self.fc.header.l1_table_offset;
        self.l1.resize(new_size as usize, 0);
        self.fc.header.l1_size = new_size as u32;
        self.fc.header.l1_table_offset = new_off;
        self.sync_overlap_l1();
        if cur > 0 {
            if let Err(e) =
                self.engine
                    .free_clusters(&mut self.caches, old_off, cur * 8, DiscardType::Other)
            {
                let err = self.rc_err(op, e);
                self.messages
                    .push(format!("qcow2_free_clusters failed: {err}"));
            }
        }
        self.sync_overlap_refcounts();
        Ok(())
    }

    /// Returns the offset of a writable (refcount 1, COPIED) L2 table covering `guest`,
    /// allocating or copying it first (QEMU's `get_cluster_table`).
    pub(crate) fn l2_for_write(&mut self, op: Op, guest: u64) -> Result<u64> {
        let l1_index = self.geo.l1_index(guest);
        if l1_index >= self.l1.len() as u64 {
            self.grow_l1(op, l1_index + 1, false)?;
        }
        let raw = self.l1[l1_index as usize];
        let off = self.l2_offset(op, l1_index)?;
        if off != 0 && raw & OFLAG_COPIED != 0 {
            if !self.refcount_covers(L2Entry::normal(off, true).unwrap_or(L2Entry::UNALLOCATED)) {
                // A table no refcount block describes has refcount 0: updating it in place
                // would write wherever a corrupted L1 entry points.
                return Err(self.corruption(
                    op,
                    true,
                    format!(
                        "L2 table offset {} is not covered by the refcount structures \
                         (L1 index: {})",
                        CHex(off),
                        CHex(l1_index)
                    ),
                ));
            }
            return Ok(off);
        }
        self.l2_allocate(op, l1_index)
    }

    /// QEMU's `l2_allocate`: a new L2 table (zeroed, or a copy of a shared one), its refcount
    /// flushed before the table is written, the table flushed before the L1 entry points at
    /// it, the old table freed last.
    fn l2_allocate(&mut self, op: Op, l1_index: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let old_raw = self.l1[l1_index as usize];
        let old = old_raw & L1E_OFFSET_MASK;
        let new = match self.engine.alloc_clusters(&mut self.caches, 1) {
            Ok(o) => o,
            Err(e) => return Err(self.rc_err(op, e)),
        };
        if new == 0 {
            return Err(self.corruption(
                op,
                true,
                "Preventing invalid allocation of L2 table at offset 0".into(),
            ));
        }
        self.sync_overlap_refcounts();
        // A brand-new table (nothing to copy, nothing to free) is linked lazily: its L1
        // entry changes in memory now and reaches the disk at the next flush, after the
        // table's refcount and contents (see `commit_l1`). This saves QEMU's three
        // barriers per new L2 table. Replacing a shared table, or lazy refcounts (where
        // refcounts may never be written before a crash), keeps QEMU's synchronous order.
        let deferred = old == 0 && !self.lazy;
        if !deferred {
            if let Err(e) = self.caches.flush(CacheId::Refblock) {
                return Err(self.cache_err(op, e));
            }
        }
        let slice = self.caches.entry_size(CacheId::L2) as u64;
        for s in 0..cs / slice {
            let hn = match self.caches.get_empty(CacheId::L2, new + s * slice) {
                Ok(h) => h,
                Err(e) => {
                    self.abandon_l2(new, s);
                    return Err(self.cache_err(op, e));
                }
            };
            if old != 0 {
                self.storage.event(Event::L2AllocCowRead);
                match self.caches.get(CacheId::L2, old + s * slice) {
                    Ok(ho) => {
                        let src = self.caches.data(&ho).to_vec();
                        self.caches.data_mut(&hn).copy_from_slice(&src);
                        let _ = self.caches.put(ho);
                    }
                    Err(e) => {
                        let _ = self.caches.put(hn);
                        self.abandon_l2(new, s + 1);
                        return Err(self.cache_err(op, e));
                    }
                }
            }
            self.caches.mark_dirty(&hn);
            self.put(op, hn)?;
        }
        self.storage.event(Event::L2AllocWrite);
        if deferred {
            self.l1[l1_index as usize] = new | OFLAG_COPIED;
            self.l1_dirty.insert(l1_index & !63);
            self.overlap_replace_active_l2(old, new);
            return Ok(new);
        }
        if let Err(e) = self.caches.flush(CacheId::L2) {
            return Err(self.cache_err(op, e));
        }
        self.l1[l1_index as usize] = new | OFLAG_COPIED;
        if let Err(e) = self.write_l1_entry(op, l1_index) {
            // The L1 entry may or may not be on disk: leak the new table rather than free a
            // cluster that might be referenced.
            self.l1[l1_index as usize] = old_raw;
            return Err(e);
        }
        self.overlap_replace_active_l2(old, new);
        if old != 0 {
            if let Err(e) = self
                .engine
                .free_clusters(&mut self.caches, old, cs, DiscardType::Other)
            {
                let err = self.rc_err(op, e);
                self.messages
                    .push(format!("qcow2_free_clusters failed: {err}"));
            }
        }
        Ok(new)
    }

    /// Undoes a half-built L2 table: drop its first `slices` cache entries, free the cluster.
    fn abandon_l2(&mut self, new: u64, slices: u64) {
        let slice = self.caches.entry_size(CacheId::L2) as u64;
        for s in 0..slices {
            self.caches.discard(CacheId::L2, new + s * slice);
        }
        let _ = self.engine.free_clusters(
            &mut self.caches,
            new,
            self.geo.cluster_size(),
            DiscardType::Always,
        );
    }

    // ------------------------------------------------------------------ classification

    /// What a write of bytes `[a, b)` of the cluster described by `e` needs.
    pub(crate) fn need(
        &mut self,
        op: Op,
        e: L2Entry,
        guest_cluster: u64,
        a: u64,
        b: u64,
    ) -> Result<Need> {
        let ty = e.cluster_type(self.ctx);
        let host = e.host_offset();
        let ext = self.geo.extended_l2();
        if ext && ty != ClusterType::Compressed {
            let bad = if host != 0 {
                e.alloc_bitmap() & e.zero_bitmap() != 0
            } else {
                e.alloc_bitmap() != 0
            };
            if bad {
                let l2_index = self.geo.l2_index(guest_cluster);
                let l2_offset = self.l1_l2_offset(guest_cluster);
                return Err(self.corruption(
                    op,
                    true,
                    format!(
                        "Invalid cluster entry found (L2 offset: {}, L2 index: {})",
                        CHex(l2_offset),
                        CHex(l2_index % self.slice_entries())
                    ),
                ));
            }
        }
        match ty {
            ClusterType::Normal | ClusterType::ZeroAlloc if e.is_copied() => {
                if !self.geo.is_cluster_aligned(host) {
                    let what = if ty == ClusterType::Normal {
                        "Data"
                    } else {
                        "Preallocated zero"
                    };
                    return Err(self.corruption(
                        op,
                        true,
                        format!(
                            "{what} cluster offset {} unaligned (guest offset: {})",
                            CHex(host),
                            CHex(guest_cluster)
                        ),
                    ));
                }
                if !self.refcount_covers(e) {
                    // Refcount 0 while referenced: writing there would extend the file to an
                    // offset from disk for a cluster no refcount block can describe.
                    return Err(self.corruption(
                        op,
                        true,
                        format!(
                            "Cluster offset {} is not covered by the refcount structures \
                             (guest offset: {})",
                            CHex(host),
                            CHex(guest_cluster)
                        ),
                    ));
                }
                if ty == ClusterType::ZeroAlloc {
                    return Ok(Need::KeepOld(host));
                }
                if !ext {
                    return Ok(Need::InPlace(host));
                }
                let r = qcow2_format::entry::subclusters_for_bytes(&self.geo, a, b - a)
                    .unwrap_or(0..32);
                let mask = qcow2_format::entry::subcluster_mask(r.start, r.end).unwrap_or(0);
                if e.alloc_bitmap() & mask == mask && e.zero_bitmap() & mask == 0 {
                    Ok(Need::InPlace(host))
                } else {
                    Ok(Need::KeepOld(host))
                }
            }
            _ => Ok(Need::Alloc),
        }
    }

    fn l1_l2_offset(&self, guest: u64) -> u64 {
        self.l1
            .get(self.geo.l1_index(guest) as usize)
            .map(|e| e & L1E_OFFSET_MASK)
            .unwrap_or(0)
    }

    /// The copy-on-write start in the first cluster of a new allocation (QEMU's
    /// `calculate_l2_meta`, `keep_old == false`).
    pub(crate) fn cow_start_new(&self, e: L2Entry, in_cluster: u64) -> u64 {
        let sc_bits = self.geo.subcluster_bits();
        let sc = u64::from(self.geo.subcluster_index(in_cluster));
        match e.cluster_type(self.ctx) {
            ClusterType::Compressed => 0,
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                if self.geo.extended_l2() {
                    let first_alloc = u64::from(e.alloc_bitmap().trailing_zeros());
                    sc.min(first_alloc) << sc_bits
                } else {
                    0
                }
            }
            ClusterType::ZeroPlain | ClusterType::Unallocated => sc << sc_bits,
        }
    }

    /// The copy-on-write end in the last cluster of a new allocation; `end` is the end of the
    /// guest write inside that cluster (1..=cluster_size).
    pub(crate) fn cow_end_new(&self, e: L2Entry, end: u64) -> u64 {
        let cs = self.geo.cluster_size();
        let sc_bits = self.geo.subcluster_bits();
        let scs = self.geo.subcluster_size();
        let sc = u64::from(self.geo.subcluster_index(end - 1));
        match e.cluster_type(self.ctx) {
            ClusterType::Compressed => cs,
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                if self.geo.extended_l2() {
                    let last_free = u64::from(e.alloc_bitmap().leading_zeros());
                    cs - ((31 - sc).min(last_free) << sc_bits)
                } else {
                    cs
                }
            }
            ClusterType::ZeroPlain | ClusterType::Unallocated => end.div_ceil(scs) * scs,
        }
    }

    /// The written subclusters `[from, to)` of one cluster, as an allocation bitmap update.
    fn mark_written(&self, bitmap: u64, from: u64, to: u64) -> u64 {
        let bits_ = self.geo.subcluster_bits();
        let a = (from >> bits_) as u32;
        let b = to.div_ceil(1 << bits_) as u32;
        let alloc = subcluster_alloc_range(a, b).unwrap_or(0);
        let zero = subcluster_zero_range(a, b).unwrap_or(0);
        (bitmap | alloc) & !zero
    }

    // ------------------------------------------------------------------ data movement

    /// Writes `data` at host `host` after the overlap check (invariant 5). Data write
    /// failures do not poison: nothing references the target yet, or the target is ours.
    /// `guest` is the guest offset of `data` (the IVs of legacy AES count guest sectors).
    fn write_data(&mut self, op: Op, host: u64, guest: u64, data: &[u8], cow: bool) -> Result<()> {
        // Data in an external data file cannot overwrite metadata of the image file.
        if self.data.is_none() {
            if let Err(e) = self.overlap.check(host, data.len() as u64, 0) {
                return Err(self.corruption(op, true, e.to_string()));
            }
        }
        if cow {
            self.storage.event(Event::CowWrite);
        }
        self.storage.event(Event::WriteAio);
        let io = |e| ImageError::io(op, "write guest data", host, e);
        match &self.crypto {
            Some(c) => {
                let iv = if self.crypt_iv_guest { guest } else { host };
                let enc = crate::crypto::encrypted(c.as_ref(), iv, data).map_err(io)?;
                self.data_storage().write_at(&enc, host).map_err(io)
            }
            None => self.data_storage().write_at(data, host).map_err(io),
        }
    }

    /// Builds the buffer for `[cluster_guest + start, cluster_guest + end)` with `data` at
    /// `data_at` (relative), filling the rest from the current mapping (copy-on-write).
    fn cow_buffer(
        &mut self,
        op: Op,
        base_guest: u64,
        start: u64,
        end: u64,
        data_at: u64,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; (end - start) as usize];
        let d0 = (data_at - start) as usize;
        let d1 = d0 + data.len();
        if d0 > 0 {
            self.storage.event(Event::CowRead);
            self.read_internal(op, base_guest + start, &mut buf[..d0])?;
        }
        if d1 < buf.len() {
            self.storage.event(Event::CowRead);
            let at = base_guest + start + d1 as u64;
            self.read_internal(op, at, &mut buf[d1..])?;
        }
        buf[d0..d1].copy_from_slice(data);
        Ok(buf)
    }

    // ------------------------------------------------------------------ one write step

    /// Writes a prefix of `data` at `guest` that maps to one kind of cluster run inside one
    /// L2 slice; returns how many bytes were written.
    fn write_chunk(&mut self, op: Op, guest: u64, data: &[u8]) -> Result<usize> {
        let g = self.geo;
        let cs = g.cluster_size();
        let l2_offset = self.l2_for_write(op, guest)?;
        let l2_index = g.l2_index(guest);
        let in_cluster = g.offset_in_cluster(guest);
        let cluster_guest = guest - in_cluster;
        let se = self.slice_entries();
        let left_in_slice = se - l2_index % se;
        let len = data.len() as u64;
        let want = (in_cluster + len).div_ceil(cs).min(left_in_slice);
        // Touched byte range of cluster i of this request.
        let touched = |i: u64| -> (u64, u64) {
            let a = if i == 0 { in_cluster } else { 0 };
            let b = (in_cluster + len - i * cs).min(cs);
            (a, b)
        };

        let (h, idx) = self.get_slice(op, l2_offset, l2_index)?;
        let first = self.slice_entry(&h, idx);
        let (a0, b0) = touched(0);
        let need0 = match self.need(op, first, cluster_guest, a0, b0) {
            Ok(n) => n,
            Err(e) => {
                let _ = self.caches.put(h);
                return Err(e);
            }
        };
        match need0 {
            Need::InPlace(host0) => {
                let mut run = 1;
                while run < want {
                    let e = self.slice_entry(&h, idx + run);
                    let (a, b) = touched(run);
                    match self.need(op, e, cluster_guest + run * cs, a, b) {
                        Ok(Need::InPlace(hst)) if hst == host0 + run * cs => run += 1,
                        _ => break,
                    }
                }
                self.put(op, h)?;
                let n = len.min(run * cs - in_cluster);
                self.write_data(op, host0 + in_cluster, guest, &data[..n as usize], false)?;
                Ok(n as usize)
            }
            Need::KeepOld(host) => {
                self.put(op, h)?;
                let n = len.min(cs - in_cluster);
                let (start, end) = if g.extended_l2() {
                    let scs = g.subcluster_size();
                    let s_ty = first.subcluster_type(self.ctx, g.subcluster_index(in_cluster));
                    let e_ty =
                        first.subcluster_type(self.ctx, g.subcluster_index(in_cluster + n - 1));
                    let start = match s_ty {
                        Ok(qcow2_format::SubclusterType::Normal) => in_cluster,
                        _ => in_cluster / scs * scs,
                    };
                    let end = match e_ty {
                        Ok(qcow2_format::SubclusterType::Normal) => in_cluster + n,
                        _ => (in_cluster + n).div_ceil(scs) * scs,
                    };
                    (start, end)
                } else {
                    (0, cs)
                };
                let buf = self.cow_buffer(
                    op,
                    cluster_guest,
                    start,
                    end,
                    in_cluster,
                    &data[..n as usize],
                )?;
                let cow = start < in_cluster || end > in_cluster + n;
                self.write_data(op, host + start, cluster_guest + start, &buf, cow)?;
                // The entry must not reach the disk before the data (QEMU: depends_on_flush).
                self.caches.set_depends_on_flush(CacheId::L2);
                let (h, idx) = self.get_slice(op, l2_offset, l2_index)?;
                let cur = self.slice_entry(&h, idx);
                let new = if g.extended_l2() {
                    let bm = self.mark_written(cur.bitmap(), start, end);
                    cur.with_bitmap(bm)
                } else {
                    L2Entry::normal(host, true).unwrap_or(cur)
                };
                if new != cur {
                    self.set_slice_entry(&h, idx, new);
                }
                self.put(op, h)?;
                Ok(n as usize)
            }
            Need::Alloc => {
                let mut run = 1;
                while run < want {
                    let e = self.slice_entry(&h, idx + run);
                    let (a, b) = touched(run);
                    match self.need(op, e, cluster_guest + run * cs, a, b) {
                        Ok(Need::Alloc) => run += 1,
                        _ => break,
                    }
                }
                let n = len.min(run * cs - in_cluster);
                let last = self.slice_entry(&h, idx + run - 1);
                let end_in_last = in_cluster + n - (run - 1) * cs;
                let cow = Cow {
                    start: self.cow_start_new(first, in_cluster),
                    end: self.cow_end_new(last, end_in_last),
                };
                let olds: Vec<L2Entry> = (0..run).map(|i| self.slice_entry(&h, idx + i)).collect();
                self.put(op, h)?;
                // QEMU's is_zero_cow: when the copy-on-write areas read as zero, the new
                // clusters are zeroed by the storage and only the guest data is written.
                let head = (
                    cluster_guest + cow.start,
                    in_cluster - cow.start.min(in_cluster),
                );
                let tail_at = guest + n;
                let tail_end = cluster_guest + (run - 1) * cs + cow.end;
                let tail = (tail_at, tail_end.saturating_sub(tail_at));
                let has_cow = head.1 > 0 || tail.1 > 0;
                // Zeroed host clusters do not decrypt to zeros: encrypted images write
                // their COW areas.
                let zero_cow = has_cow
                    && self.crypto.is_none()
                    && self.reads_as_zero(op, head.0, head.1)?
                    && self.reads_as_zero(op, tail.0, tail.1)?;
                let direct = zero_cow.then_some((in_cluster, &data[..n as usize]));
                self.alloc_and_link(
                    op,
                    l2_offset,
                    l2_index,
                    cluster_guest,
                    run,
                    cow,
                    olds,
                    direct,
                    |img| {
                        let end = (run - 1) * cs + cow.end;
                        img.cow_buffer(
                            op,
                            cluster_guest,
                            cow.start,
                            end,
                            in_cluster,
                            &data[..n as usize],
                        )
                    },
                )?;
                Ok(n as usize)
            }
        }
    }

    /// Allocates `run` clusters, writes the data `fill` produces (covering
    /// `[cow.start, (run-1)*cs + cow.end)` of the run), and links them in place of `olds`.
    #[allow(clippy::too_many_arguments)]
    fn alloc_and_link(
        &mut self,
        op: Op,
        l2_offset: u64,
        l2_index: u64,
        cluster_guest: u64,
        run: u64,
        cow: Cow,
        olds: Vec<L2Entry>,
        direct: Option<(u64, &[u8])>,
        fill: impl FnOnce(&mut Image) -> Result<Vec<u8>>,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let host = self.alloc_data_clusters(op, cluster_guest, run)?;
        self.sync_overlap_refcounts();
        let span = (run - 1) * cs + cow.end - cow.start;
        let zeroed = match direct {
            Some(_) => self.zero_new_clusters(op, host + cow.start, span),
            None => Ok(false),
        };
        let result = zeroed.and_then(|zeroed| match direct {
            Some((at, data)) if zeroed => {
                self.write_data(op, host + at, cluster_guest + at, data, false)
            }
            _ => fill(self).and_then(|buf| {
                let whole = buf.len() as u64 == run * cs;
                let cow_flag = !whole;
                self.write_data(
                    op,
                    host + cow.start,
                    cluster_guest + cow.start,
                    &buf,
                    cow_flag,
                )
            }),
        });
        if let Err(e) = result {
            // Invariant 3: nothing references the new clusters; give them back.
            if !e.is_corruption() && self.data.is_none() {
                let _ =
                    self.engine
                        .free_clusters(&mut self.caches, host, run * cs, DiscardType::Never);
            }
            return Err(e);
        }
        self.link(
            op, l2_offset, l2_index, host, run, cow.start, cow.end, &olds,
        )
    }

    /// Zeroes freshly allocated host clusters through the storage's fast zeroing, if it has
    /// one (overlap-checked like a data write). `false`: nothing changed, write the COW.
    fn zero_new_clusters(&mut self, op: Op, host: u64, len: u64) -> Result<bool> {
        if self.data.is_none() {
            if let Err(e) = self.overlap.check(host, len, 0) {
                return Err(self.corruption(op, true, e.to_string()));
            }
        }
        self.storage.event(Event::ClusterAllocSpace);
        self.data_storage()
            .zero_fast(host, len)
            .map_err(|e| ImageError::io(op, "zero new clusters", host, e))
    }

    /// Host clusters for the `run` guest clusters starting at `guest` (cluster aligned): in
    /// an external data file a guest cluster lives at its own offset, unrefcounted;
    /// otherwise they are allocated from the refcounts.
    pub(crate) fn alloc_data_clusters(&mut self, op: Op, guest: u64, run: u64) -> Result<u64> {
        if self.data.is_some() {
            return Ok(guest);
        }
        match self.engine.alloc_clusters(&mut self.caches, run) {
            Ok(o) => Ok(o),
            Err(e) => Err(self.rc_err(op, e)),
        }
    }

    /// Publishes `run` new clusters at `host` in the L2 slice and frees what they replace.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn link(
        &mut self,
        op: Op,
        l2_offset: u64,
        l2_index: u64,
        host: u64,
        run: u64,
        start: u64,
        end: u64,
        olds: &[L2Entry],
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        // The data is durable before the entries (QEMU: depends_on_flush after COW/data).
        self.caches.set_depends_on_flush(CacheId::L2);
        if self.lazy {
            self.mark_dirty(op)?;
        } else if let Err(e) = self.caches.set_dependency(CacheId::L2, CacheId::Refblock) {
            // Invariant 1: the refcounts are durable before the references.
            return Err(self.cache_err(op, e));
        }
        let (h, idx) = self.get_slice(op, l2_offset, l2_index)?;
        for i in 0..run {
            let old = self.slice_entry(&h, idx + i);
            let mut new = L2Entry::normal(host + i * cs, true).unwrap_or(L2Entry::UNALLOCATED);
            if self.geo.extended_l2() {
                let base = if old.is_compressed() { 0 } else { old.bitmap() };
                let from = if i == 0 { start } else { 0 };
                let to = if i + 1 == run { end } else { cs };
                new = new.with_bitmap(self.mark_written(base, from, to));
            }
            self.set_slice_entry(&h, idx + i, new);
        }
        self.put(op, h)?;
        // COW replacement: never discarded (QEMU: QCOW2_DISCARD_NEVER).
        self.free_entries(op, olds, DiscardType::Never);
        self.sync_overlap_refcounts();
        Ok(())
    }

    /// `preallocation=metadata|falloc|full` at creation: every guest cluster gets an L2
    /// entry and a host cluster (data reads as zeros; with extended L2 the subclusters stay
    /// unallocated, as QEMU leaves them).
    pub(crate) fn preallocate(&mut self, mode: Preallocation) -> Result<()> {
        let op = Op::Create;
        let cs = self.geo.cluster_size();
        let size = self.virtual_size();
        let mut guest = 0u64;
        let mut file_end = 0u64;
        while guest < size {
            let l2_offset = self.l2_for_write(op, guest)?;
            let l2_index = self.geo.l2_index(guest);
            let se = self.slice_entries();
            let n = (se - l2_index % se).min((size - guest).div_ceil(cs));
            let host = self.alloc_data_clusters(op, guest, n)?;
            if mode == Preallocation::Full {
                let zeros = vec![0u8; (n * cs) as usize];
                self.write_data(op, host, guest, &zeros, false)?;
            }
            if self.lazy {
                self.mark_dirty(op)?;
            } else if let Err(e) = self.caches.set_dependency(CacheId::L2, CacheId::Refblock) {
                return Err(self.cache_err(op, e));
            }
            let (h, idx) = self.get_slice(op, l2_offset, l2_index)?;
            for i in 0..n {
                let e = L2Entry::normal(host + i * cs, true).unwrap_or(L2Entry::UNALLOCATED);
                self.set_slice_entry(&h, idx + i, e);
            }
            self.put(op, h)?;
            file_end = file_end.max(host + n * cs);
            guest += n * cs;
        }
        self.sync_overlap_refcounts();
        let data = self.data_storage().clone();
        let len = data
            .len()
            .map_err(|e| ImageError::io(op, "image length", 0, e))?;
        if len < file_end {
            let r = if mode == Preallocation::Falloc {
                // The data clusters beyond the old end get real blocks (QEMU truncates the
                // file with PREALLOC_MODE_FALLOC); below it they were written already.
                data.allocate(len, file_end - len)
            } else {
                data.set_len(file_end)
            };
            r.map_err(|e| ImageError::io(op, "extend the image file", file_end, e))?;
        }
        self.flush()
    }

    /// Writes zeros the slow way (v2 images and unaligned pieces QEMU cannot zero with
    /// metadata): a regular write of a zero buffer.
    pub(crate) fn write_zero_buffer(&mut self, op: Op, offset: u64, len: u64) -> Result<()> {
        let chunk = (1u64 << 20).max(self.geo.cluster_size());
        let zeros = vec![0u8; chunk.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk);
            self.write_internal(op, offset + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Host-level helper kept for symmetry with the header helpers: the storage flush used by
    /// tests that want a barrier without a cache flush.
    #[doc(hidden)]
    pub fn storage_flush(&self) -> std::io::Result<()> {
        self.storage.flush()
    }

    #[allow(dead_code)]
    fn write_be64_sync(&mut self, op: Op, off: u64, v: u64) -> Result<()> {
        self.storage
            .write_sync(&v.to_be_bytes(), off)
            .map_err(|e| ImageError::io(op, "write", off, e))
    }
}
