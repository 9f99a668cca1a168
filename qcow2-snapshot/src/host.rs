//! The seam to the image facade: what the snapshot engine borrows from the image, and the
//! services only the image can perform.

use crate::error::HostError;
use qcow2_cache::{Caches, OverlapError};
use qcow2_format::Geometry;
use qcow2_refcount::RefcountEngine;

/// The image state the snapshot engine needs mutable access to, all at once.
///
/// Returned by [`SnapshotHost::parts`]. The three borrows are disjoint fields of the image, so
/// an implementation is usually one line:
/// `HostParts { caches: &mut self.caches, refcounts: &mut self.refcounts, active_l1: &mut self.l1 }`.
#[derive(Debug)]
pub struct HostParts<'a> {
    /// The image's metadata caches (L2 and refcount block), over the image's storage. The
    /// engine reads and writes L2 slices through it, so dirty slices the image holds are
    /// seen and never overwritten behind the cache's back; [`Caches::storage`] is the storage
    /// all direct I/O goes to.
    pub caches: &'a mut Caches,
    /// The image's refcount engine (refcount table, free-space index, quarantine).
    pub refcounts: &'a mut RefcountEngine,
    /// The **in-memory active L1 table**: raw entries (host byte order; L2 offset in bits
    /// 9-55, COPIED in bit 63), exactly `l1_size` of them. The engine reads it (snapshot
    /// create copies it; apply decrements the old tree through it) and rewrites entries (the
    /// COPIED flags after a refcount pass; the whole table on apply). Whenever it changes an
    /// entry here it also writes the table to disk at [`SnapshotHost::l1_table_offset`]
    /// (QEMU keeps the two identical, and so does the engine).
    pub active_l1: &'a mut [u64],
}

/// Which metadata a write of the snapshot engine targets, for the image's pre-write overlap
/// check (invariant 5). The image maps it to QEMU's `QCOW2_OL_*` ignore mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetadataWrite {
    /// A new snapshot's L1 copy, written into freshly allocated clusters (QEMU:
    /// `QCOW2_OL_DEFAULT`, nothing ignored).
    NewSnapshotL1,
    /// A rewrite of an existing snapshot's L1 table (its COPIED flags; QEMU does not check).
    SnapshotL1,
    /// A rewrite of the active L1 table in place (ignore `QCOW2_OL_ACTIVE_L1`).
    ActiveL1,
    /// A rewrite of (part of) an L2 table in place: COPIED flags, outside the L2 cache
    /// because the slice was not cached (ignore `QCOW2_OL_ACTIVE_L2` and
    /// `QCOW2_OL_INACTIVE_L2`).
    L2Table,
    /// A new snapshot table, written into freshly allocated clusters (QEMU:
    /// `QCOW2_OL_DEFAULT`, nothing ignored).
    NewSnapshotTable,
}

/// What the image facade provides to the snapshot engine.
///
/// The engine never depends on `qcow2-image`; the image implements this trait (typically on
/// an inner struct that holds everything but the [`Snapshots`](crate::Snapshots) value, so
/// that `self.snapshots.create(&mut self.core, "name")` borrows disjoint fields).
///
/// Contract, per method:
/// - the engine calls methods one at a time and never holds a [`HostParts`] borrow across
///   another call;
/// - on an error return the engine stops the operation and reports
///   [`Error::Host`](crate::Error::Host); the image decides whether it is poisoned;
/// - the engine performs every header write its operations need itself (the 12-byte
///   `nb_snapshots`/`snapshots_offset` switch at header offset 60) except those inside
///   [`SnapshotHost::resize`] and [`SnapshotHost::grow_l1`], and tells the image about the
///   switch through [`SnapshotHost::snapshot_table_switched`].
pub trait SnapshotHost {
    /// Mutable access to the caches, the refcount engine and the in-memory active L1 table.
    fn parts(&mut self) -> HostParts<'_>;

    /// The image's cluster geometry (cluster size, refcount width, extended L2).
    fn geometry(&self) -> Geometry;

    /// The current virtual disk size in bytes (the header's `size`). A new snapshot records
    /// it as its `disk_size`; apply resizes when the snapshot's differs.
    fn virtual_size(&self) -> u64;

    /// Host offset of the active L1 table (the header's `l1_table_offset`). Its size is
    /// `parts().active_l1.len()` (the header's `l1_size`).
    fn l1_table_offset(&self) -> u64;

    /// The engine has durably switched the header to a new snapshot table (one synchronous
    /// 12-byte write at header offset 60). The image must update its in-memory copy of the
    /// header fields `nb_snapshots` and `snapshots_offset` (so a later header rewrite keeps
    /// them) and its overlap-check view of the snapshot table and snapshot L1 tables
    /// (available from the [`Snapshots`](crate::Snapshots) value after the operation).
    fn snapshot_table_switched(&mut self, nb_snapshots: u32, snapshots_offset: u64);

    /// Freeing clusters that are no longer referenced failed with `errno`; the clusters
    /// leak and the operation goes on, as QEMU's does after printing
    /// "qcow2_free_clusters failed: STRERROR". The default ignores it; an image keeps the
    /// message for its caller.
    fn free_failed(&mut self, errno: i32) {
        let _ = errno;
    }

    /// Changes the virtual disk size to exactly `new_size` bytes, as QEMU's
    /// `blk_truncate(.., exact = true, PREALLOC_MODE_OFF)` does for a qcow2 image (called by
    /// apply when the snapshot's `disk_size` differs from the current size, before anything
    /// else changes): grow the active L1 as needed, or shrink (discarding the clusters beyond
    /// the new end from the active tree), write the header's `size`, durably. The image may
    /// refuse what QEMU refuses (a v2 image with snapshots cannot be resized: "Can't resize a
    /// v2 image which has snapshots"); the apply then fails with nothing changed.
    fn resize(&mut self, new_size: u64) -> Result<(), HostError>;

    /// Grows the active L1 table to at least `min_entries` entries, exactly (QEMU's
    /// `qcow2_grow_l1_table(min_entries, exact = true)`); a no-op if it is already that big.
    /// Must be atomic as QEMU's: allocate the new table, write it in full and flush, one
    /// synchronous header write of `l1_size` + `l1_table_offset`, then free the old table;
    /// afterwards [`SnapshotHost::parts`] returns the grown table (new entries 0) and
    /// [`SnapshotHost::l1_table_offset`] its offset.
    fn grow_l1(&mut self, min_entries: u32) -> Result<(), HostError>;

    /// Whether the image has an external data file. Internal snapshots are refused then
    /// (QEMU: `-ENOTSUP`). Default: no.
    fn has_data_file(&self) -> bool {
        false
    }

    /// The pre-write overlap check (invariant 5) for a write of `len` bytes at `offset` that
    /// the engine makes directly to the storage (outside the caches). Return the overlap to
    /// veto the write; the engine then fails the operation without writing. Default: allow.
    fn check_overlap(
        &self,
        offset: u64,
        len: u64,
        target: MetadataWrite,
    ) -> Result<(), OverlapError> {
        let _ = (offset, len, target);
        Ok(())
    }
}
