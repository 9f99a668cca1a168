//! Zero writes and discards (QEMU's `qcow2_subcluster_zeroize`, `qcow2_cluster_discard`,
//! reference §2.9). The L2 entry changes first; the refcount decrease follows, so the
//! refcount cache depends on the L2 cache (invariant 1) and freed clusters wait in
//! quarantine until a flush (invariant 2).

use crate::error::{Op, Result};
use crate::image::MapKind;
use crate::Image;
use qcow2_format::entry::{
    subcluster_alloc_range, subcluster_zero_range, L2_BITMAP_ALL_ZERO, OFLAG_ZERO,
};
use qcow2_format::{ClusterType, L2Entry};
use qcow2_refcount::DiscardType;

impl Image {
    /// Discards guest `[offset, offset + len)` (QEMU's v2/v3 semantics): only whole clusters
    /// (plus a partial last cluster at the end of the image) are discarded. On v3, or when
    /// there is a backing file, discarded clusters read as zeros; on v2 without a backing
    /// file they become unallocated; on v2 with a backing file the request is ignored (QEMU
    /// refuses it with ENOTSUP, which the block layer drops).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        let op = Op::Discard;
        self.check_writable(op)?;
        self.check_range(op, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // QEMU's block layer marks the range dirty even when the driver ignores it.
        self.track_change(op, offset, len)?;
        if self.fc.header.version < 3 && self.fc.backing_file.is_some() {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let size = self.virtual_size();
        let start = offset.div_ceil(cs) * cs;
        let end = if offset + len == size {
            offset + len
        } else {
            (offset + len) / cs * cs
        };
        if start >= end {
            return Ok(());
        }
        let mut guest = start;
        while guest < end {
            let n = self.discard_in_slice(op, guest, end - guest, false)?;
            guest += n;
        }
        self.zero_raw_data_file(op, start, end - start)
    }

    /// With `data_file_raw`, the data file must read as the guest disk: a range that now
    /// reads as zeros is zeroed there too (QEMU zeroes the data file in the same request).
    fn zero_raw_data_file(&mut self, op: Op, offset: u64, len: u64) -> Result<()> {
        match &self.data {
            Some(data) if self.data_file_raw => data
                .write_zeroes(offset, len)
                .map_err(|e| crate::error::ImageError::io(op, "zero the raw data file", offset, e)),
            _ => Ok(()),
        }
    }

    /// Discards clusters from `guest` (cluster aligned) within one L2 slice; returns the
    /// bytes covered. A `full` discard (QEMU's `full_discard`, used to empty an image)
    /// leaves the entries unallocated, so that the backing file shows through again, and
    /// always gives the clusters back.
    pub(crate) fn discard_in_slice(
        &mut self,
        op: Op,
        guest: u64,
        len: u64,
        full: bool,
    ) -> Result<u64> {
        let g = self.geo;
        let cs = g.cluster_size();
        let se = self.slice_entries();
        let l2_index = g.l2_index(guest);
        let n = len.div_ceil(cs).min(se - l2_index % se);
        let covered = (n * cs).min(len);
        let has_backing = self.fc.backing_file.is_some();
        // Nothing to do where no L2 table exists and nothing can show through.
        let l1_index = g.l1_index(guest);
        if self.l2_offset(op, l1_index)? == 0 && (full || !has_backing) {
            return Ok(covered);
        }
        let l2_offset = self.l2_for_write(op, guest)?;
        let (h, idx) = self.get_slice(op, l2_offset, l2_index)?;
        let v3 = self.fc.header.version >= 3;
        let ext = g.extended_l2();
        let keep_reference = self.discard_no_unref;
        let mut frees = Vec::new();
        for i in 0..n {
            let old = self.slice_entry(&h, idx + i);
            let ty = old.cluster_type(self.ctx);
            let allocated = matches!(
                ty,
                ClusterType::Compressed | ClusterType::Normal | ClusterType::ZeroAlloc
            );
            // Compressed clusters are always unreferenced (no host cluster to keep).
            let keep = keep_reference && ty != ClusterType::Compressed && !full;
            let mut word = old.raw_entry();
            let mut bitmap = old.bitmap();
            if full {
                word = 0;
                bitmap = 0;
            } else if has_backing || allocated {
                if ext {
                    if !keep {
                        word = 0;
                    }
                    bitmap = L2_BITMAP_ALL_ZERO;
                } else if v3 {
                    word = if keep { word | OFLAG_ZERO } else { OFLAG_ZERO };
                } else {
                    word = 0;
                }
            }
            let new = L2Entry::from_raw(word, if ext { bitmap } else { 0 });
            if new == old {
                continue;
            }
            self.set_slice_entry(&h, idx + i, new);
            if !keep {
                frees.push(old);
            } else if matches!(ty, ClusterType::Normal | ClusterType::ZeroAlloc) {
                self.passthrough_discard(old.host_offset());
            }
        }
        self.put(op, h)?;
        let kind = if full {
            DiscardType::Snapshot
        } else {
            DiscardType::Request
        };
        self.free_entries(op, &frees, kind);
        Ok(covered)
    }

    /// Passes a guest discard of the cluster at `host` down to the storage holding it, if
    /// the open options ask for it (a raw data file keeps its bytes: it is the guest disk).
    fn passthrough_discard(&mut self, host: u64) {
        if self.discard_passthrough_request && !self.data_file_raw {
            let _ = self.data_storage().discard(host, self.geo.cluster_size());
        }
    }

    /// Frees what `entries` referenced (after the entries were changed in the cache). Errors
    /// only leak (QEMU ignores them too); they are recorded as messages.
    pub(crate) fn free_entries(&mut self, op: Op, entries: &[L2Entry], discard: DiscardType) {
        // Freed compressed bytes may be reused with an identical descriptor.
        self.decompressed = None;
        if self.data.is_some() {
            // Data-file clusters are not refcounted: freeing one only passes a guest
            // discard down to the data file when asked to (QEMU's qcow2_free_any_cluster),
            // by the same rule as any guest discard.
            if discard == DiscardType::Request {
                for e in entries {
                    if matches!(
                        e.cluster_type(self.ctx),
                        ClusterType::Normal | ClusterType::ZeroAlloc
                    ) {
                        self.passthrough_discard(e.host_offset());
                    }
                }
            }
            return;
        }
        for e in entries {
            if let Err(err) =
                self.alloc
                    .free_l2_entry(&mut self.engine, &mut self.caches, *e, self.ctx, discard)
            {
                let err = self.alloc_err(op, err);
                if !err.is_corruption() {
                    self.messages
                        .push(format!("qcow2_free_clusters failed: {err}"));
                }
            }
        }
        self.sync_overlap_refcounts();
    }

    /// Whether the host range `e` references lies within what the refcount table describes.
    pub(crate) fn refcount_covers(&self, e: L2Entry) -> bool {
        let (off, len) = match e.cluster_type(self.ctx) {
            ClusterType::Compressed => {
                let d = qcow2_format::compressed::CompressedFormat::for_geometry(&self.geo)
                    .decode_raw(e.raw_entry());
                (d.host_offset(), d.compressed_size())
            }
            // Clusters in an external data file are not refcounted.
            ClusterType::Normal | ClusterType::ZeroAlloc if self.data.is_some() => return true,
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                (e.host_offset(), self.geo.cluster_size())
            }
            _ => return true,
        };
        let Some(end) = off.checked_add(len.max(1)) else {
            return false;
        };
        // Every cluster of the range needs an allocated refcount block (else its refcount is
        // necessarily 0).
        let table = self.engine.reftable();
        let first = self.geo.reftable_index(self.geo.cluster_index(off));
        let last = self.geo.reftable_index(self.geo.cluster_index(end - 1));
        (first..=last).all(|b| {
            usize::try_from(b)
                .ok()
                .and_then(|b| table.get(b))
                .is_some_and(|&e| e != 0)
        })
    }

    /// Makes guest `[offset, offset + len)` read as zeros. On v3 images this changes only
    /// metadata where QEMU does (whole subclusters/clusters; unaligned edges whose
    /// remaining bytes already read as zero); `unmap` also releases host clusters. Elsewhere
    /// (v2 images, partial subclusters holding data, compressed clusters under a
    /// partial-cluster request) zeros are written.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let op = Op::WriteZeroes;
        self.check_writable(op)?;
        self.check_range(op, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.track_change(op, offset, len)?;
        if self.fc.header.version < 3 {
            return self.write_zero_buffer(op, offset, len);
        }
        let scs = self.geo.subcluster_size();
        let size = self.virtual_size();
        let end = offset + len;
        // The block layer's split at the subcluster alignment: head, body, tail.
        let body_start = offset.div_ceil(scs) * scs;
        let body_end = if end == size { end } else { end / scs * scs };
        let head_end = end.min(body_start);
        if offset < head_end {
            self.zero_piece(op, offset, head_end - offset, unmap)?;
        }
        if body_start < body_end {
            self.zeroize(op, body_start, body_end - body_start, unmap)?;
        }
        let tail_start = body_end.max(head_end);
        if tail_start < end {
            self.zero_piece(op, tail_start, end - tail_start, unmap)?;
        }
        // Metadata-only zeroing leaves old bytes in a raw data file: zero them there too.
        self.zero_raw_data_file(op, offset, len)
    }

    /// An unaligned piece inside one subcluster (QEMU's `qcow2_co_pwrite_zeroes` head/tail
    /// case): if the rest of the subcluster already reads as zero and it holds no data, the
    /// whole subcluster is zeroed in metadata; otherwise zeros are written.
    fn zero_piece(&mut self, op: Op, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let scs = self.geo.subcluster_size();
        let size = self.virtual_size();
        let sc_start = offset / scs * scs;
        let sc_end = (sc_start + scs).min(size);
        let end = offset + len;
        let tail_end = if end == size { end } else { sc_end };
        if self.reads_as_zero(op, sc_start, offset - sc_start)?
            && self.reads_as_zero(op, end, tail_end - end)?
        {
            let chunk = self.lookup(op, sc_start, sc_end - sc_start)?;
            if matches!(chunk.kind, MapKind::Zero(_) | MapKind::Unallocated(_)) {
                return self.zeroize(op, sc_start, sc_end - sc_start, unmap);
            }
        }
        self.write_zero_buffer(op, offset, len)
    }

    /// Whether guest `[offset, offset + len)` reads as zero by metadata alone (QEMU's
    /// `is_zero` over block status: zero clusters, or unallocated without backing data).
    pub(crate) fn reads_as_zero(&mut self, op: Op, offset: u64, len: u64) -> Result<bool> {
        let mut pos = 0;
        while pos < len {
            let c = self.lookup(op, offset + pos, len - pos)?;
            match c.kind {
                MapKind::Zero(_) => {}
                MapKind::Unallocated(_) => {
                    let beyond = self
                        .backing
                        .as_ref()
                        .is_none_or(|b| b.size() <= offset + pos);
                    if !beyond {
                        return Ok(false);
                    }
                }
                _ => return Ok(false),
            }
            pos += c.len;
        }
        Ok(true)
    }

    /// QEMU's `qcow2_subcluster_zeroize` for a subcluster-aligned range (or one ending at
    /// the image end): partial clusters via the subcluster bitmap, whole clusters via the
    /// zero flag (or an all-zero bitmap).
    fn zeroize(&mut self, op: Op, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let cs = self.geo.cluster_size();
        let size = self.virtual_size();
        let mut offset = offset;
        let mut end = offset + len;
        let head = end.min(offset.div_ceil(cs) * cs) - offset;
        if head > 0 {
            self.zero_subclusters(op, offset, head)?;
            offset += head;
        }
        let tail = if end >= size {
            0
        } else {
            end - offset.max(end / cs * cs)
        };
        end -= tail;
        while offset < end {
            let n = self.zero_in_slice(op, offset, end - offset, unmap)?;
            offset += n;
        }
        if tail > 0 {
            self.zero_subclusters(op, end, tail)?;
        }
        Ok(())
    }

    /// Marks subclusters of one cluster as zero (extended L2). A compressed cluster cannot
    /// express that: zeros are written instead (QEMU: ENOTSUP, then the fallback).
    fn zero_subclusters(&mut self, op: Op, offset: u64, len: u64) -> Result<()> {
        let g = self.geo;
        let l2_offset = self.l2_for_write(op, offset)?;
        let (h, idx) = self.get_slice(op, l2_offset, g.l2_index(offset))?;
        let e = self.slice_entry(&h, idx);
        if e.is_compressed() || !g.extended_l2() {
            self.put(op, h)?;
            return self.write_zero_buffer(op, offset, len);
        }
        let in_cluster = g.offset_in_cluster(offset);
        let a = (in_cluster >> g.subcluster_bits()) as u32;
        let b = (in_cluster + len).div_ceil(g.subcluster_size()) as u32;
        let bm = (e.bitmap() | subcluster_zero_range(a, b).unwrap_or(0))
            & !subcluster_alloc_range(a, b).unwrap_or(0);
        if bm != e.bitmap() {
            self.set_slice_entry(&h, idx, e.with_bitmap(bm));
        }
        self.put(op, h)
    }

    /// QEMU's `zero_in_l2_slice`: whole clusters from `offset` within one slice; returns the
    /// bytes covered.
    fn zero_in_slice(&mut self, op: Op, offset: u64, len: u64, unmap: bool) -> Result<u64> {
        let g = self.geo;
        let cs = g.cluster_size();
        let se = self.slice_entries();
        let l2_index = g.l2_index(offset);
        let n = len.div_ceil(cs).min(se - l2_index % se);
        let covered = (n * cs).min(len);
        let l2_offset = self.l2_for_write(op, offset)?;
        let (h, idx) = self.get_slice(op, l2_offset, l2_index)?;
        let ext = g.extended_l2();
        let mut frees = Vec::new();
        for i in 0..n {
            let old = self.slice_entry(&h, idx + i);
            let ty = old.cluster_type(self.ctx);
            let allocated = matches!(
                ty,
                ClusterType::Compressed | ClusterType::Normal | ClusterType::ZeroAlloc
            );
            let unmap_this = ty == ClusterType::Compressed || (unmap && allocated);
            let keep = self.discard_no_unref && ty != ClusterType::Compressed;
            let mut word = old.raw_entry();
            if unmap_this && !keep {
                word = 0;
            }
            let new = if ext {
                L2Entry::from_raw(word, L2_BITMAP_ALL_ZERO)
            } else {
                L2Entry::from_raw(word | OFLAG_ZERO, 0)
            };
            if new == old {
                continue;
            }
            self.set_slice_entry(&h, idx + i, new);
            if unmap_this {
                if !keep {
                    frees.push(old);
                } else if matches!(ty, ClusterType::Normal | ClusterType::ZeroAlloc) {
                    self.passthrough_discard(old.host_offset());
                }
            }
        }
        self.put(op, h)?;
        self.free_entries(op, &frees, DiscardType::Request);
        Ok(covered)
    }
}
