//! Shrinking the virtual disk (QEMU's `qcow2_co_truncate` for a smaller size:
//! `qcow2_cluster_discard(.., QCOW2_DISCARD_ALWAYS, full_discard)`,
//! `qcow2_shrink_l1_table`, the file truncated after `qcow2_get_last_cluster`).
//!
//! Crash safety: entries are cleared in the L2 tables first and the refcounts follow (the
//! refcount cache depends on the L2 cache, invariant 1); the L2 cache is written and flushed
//! before the L1 entries of released tables are zeroed on disk, and those zeros are
//! durable before the tables are freed; the file is truncated only after both caches were
//! flushed, so nothing durable references what is cut off. The size field is written last:
//! a crash before it leaves the old size with zeros beyond the new end.

use crate::error::{ImageError, Op, Result};
use crate::image::HDR_SIZE;
use crate::overlap::bits;
use crate::Image;
use qcow2_cache::CacheId;
use qcow2_format::entry::L1E_OFFSET_MASK;
use qcow2_format::L2Entry;
use qcow2_io::StorageExt;
use qcow2_refcount::DiscardType;

impl Image {
    /// Shrinks to `new_size` (a multiple of 512 below the current size; checked by the
    /// caller). See [`Image::resize`].
    pub(crate) fn shrink(&mut self, op: Op, new_size: u64) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let old = self.virtual_size();
        // Full discard of every whole cluster past the new end.
        let start = new_size.div_ceil(cs) * cs;
        let mut guest = start;
        while guest < old {
            guest += self.full_discard_in_slice(op, guest, old - guest)?;
        }
        // Release the L2 tables wholly beyond the new end.
        let new_l1 = g.l1_entries_for(new_size) as usize;
        if new_l1 < self.l1.len() {
            // Cleared entries are durable before their tables lose their L1 references.
            self.flush_caches(op, false)?;
            let from = new_l1 as u64 * 8;
            let len = (self.l1.len() - new_l1) as u64 * 8;
            let off = self.fc.header.l1_table_offset + from;
            if let Err(e) = self.overlap.check(off, len, bits::ACTIVE_L1) {
                return Err(self.corruption(op, true, e.to_string()));
            }
            self.metadata_write_sync(op, "clear L1 entries", &vec![0u8; len as usize], off)?;
            let slice = self.caches.entry_size(CacheId::L2) as u64;
            for i in new_l1..self.l1.len() {
                let l2 = self.l1[i] & L1E_OFFSET_MASK;
                self.l1[i] = 0;
                if l2 == 0 {
                    continue;
                }
                for s in 0..cs / slice {
                    self.caches.discard(CacheId::L2, l2 + s * slice);
                }
                if let Err(e) =
                    self.engine
                        .free_clusters(&mut self.caches, l2, cs, DiscardType::Always)
                {
                    let err = self.rc_err(op, e);
                    self.messages
                        .push(format!("qcow2_free_clusters failed: {err}"));
                }
            }
            self.sync_overlap_l1();
            self.sync_overlap_refcounts();
        }
        // Everything unreferenced durably (and the quarantine released) before the file
        // loses its tail.
        self.flush()?;
        self.shrink_reftable(op)?;
        self.truncate_tail(op);
        self.metadata_write_sync(op, "write the new size", &new_size.to_be_bytes(), HDR_SIZE)?;
        self.fc.header.size = new_size;
        Ok(())
    }

    /// Unreferences every cluster from `guest` (cluster aligned) to the end of its L2 slice
    /// or `len`; entries become unallocated (QEMU's full discard). Returns bytes covered.
    fn full_discard_in_slice(&mut self, op: Op, guest: u64, len: u64) -> Result<u64> {
        let g = self.geo;
        let cs = g.cluster_size();
        let se = self.slice_entries();
        let l2_index = g.l2_index(guest);
        let n = len.div_ceil(cs).min(se - l2_index % se);
        let covered = (n * cs).min(len);
        if self.l2_offset(op, g.l1_index(guest))? == 0 {
            return Ok(covered);
        }
        // A shared table is copied first: the snapshots keep theirs.
        let l2_offset = self.l2_for_write(op, guest)?;
        let (h, idx) = self.get_slice(op, l2_offset, l2_index)?;
        let mut frees = Vec::new();
        for i in 0..n {
            let e = self.slice_entry(&h, idx + i);
            if e == L2Entry::UNALLOCATED {
                continue;
            }
            self.set_slice_entry(&h, idx + i, L2Entry::UNALLOCATED);
            frees.push(e);
        }
        self.put(op, h)?;
        self.free_entries(op, &frees, DiscardType::Always);
        Ok(covered)
    }

    /// QEMU's `qcow2_shrink_reftable`: refcount blocks that count nothing but themselves
    /// are unhooked (their reftable entries zeroed on disk, synchronously, before anything
    /// else) and the image state is rebuilt from disk; a block another block counts is then
    /// freed there. Such a block references nothing, so dropping it never under-counts.
    fn shrink_reftable(&mut self, op: Op) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let codec = qcow2_format::refcount::RefcountCodec::for_geometry(&g);
        let per_block = codec.entries_in(cs as usize);
        let table: Vec<u64> = self.engine.reftable().to_vec();
        let table_off = self.engine.reftable_offset();
        let mut dropped = Vec::new();
        for (i, &rte) in table.iter().enumerate() {
            let rb = rte & qcow2_format::refcount::REFT_OFFSET_MASK;
            if rb == 0 {
                continue;
            }
            let block = self
                .storage
                .read_vec(rb, cs as usize)
                .map_err(|e| ImageError::io(op, "read a refcount block", rb, e))?;
            let own = rb >> g.cluster_bits();
            let unused = (0..per_block).all(|k| {
                let rc = codec.get(&block, k).unwrap_or(1);
                let cluster = i as u64 * per_block + k;
                rc == 0 || (cluster == own && rc == 1)
            });
            if unused {
                let at = table_off + i as u64 * 8;
                if let Err(e) = self.overlap.check(at, 8, bits::REFCOUNT_TABLE) {
                    return Err(self.corruption(op, true, e.to_string()));
                }
                self.metadata_write_sync(op, "unhook a refcount block", &[0u8; 8], at)?;
                dropped.push(rb);
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        self.reopen(op)?;
        for rb in dropped {
            if matches!(
                self.engine.get(&mut self.caches, rb >> g.cluster_bits()),
                Ok(1)
            ) {
                let _ = self
                    .engine
                    .free_clusters(&mut self.caches, rb, cs, DiscardType::Always);
            }
        }
        self.sync_overlap_refcounts();
        self.flush()
    }

    /// Cuts the file after the last cluster with a nonzero refcount (QEMU's
    /// `qcow2_get_last_cluster` + truncate). A failure only wastes space: recorded as
    /// QEMU's warning "Failed to truncate the tail of the image: ...".
    fn truncate_tail(&mut self, op: Op) {
        let cs = self.geo.cluster_size();
        let len = match self.storage.len() {
            Ok(l) => l,
            Err(e) => {
                self.messages
                    .push(format!("Failed to inquire current file length: {e}"));
                return;
            }
        };
        let mut last = len.div_ceil(cs);
        while last > 0 {
            match self.engine.get(&mut self.caches, last - 1) {
                Ok(0) => last -= 1,
                Ok(_) => break,
                Err(e) => {
                    let err = self.rc_err(op, e);
                    self.messages
                        .push(format!("Failed to find the last cluster: {err}"));
                    return;
                }
            }
        }
        let end = last * cs;
        if end < len {
            if let Err(e) = self.storage.set_len(end) {
                self.messages.push(format!(
                    "Failed to truncate the tail of the image: {}",
                    ImageError::io(op, "truncate the image file", end, e)
                ));
            }
        }
    }
}
