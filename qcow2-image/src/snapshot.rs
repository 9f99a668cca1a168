//! Internal snapshots through the facade: the image is the [`SnapshotHost`] of the
//! `qcow2-snapshot` engine, and the table is loaded at open with QEMU's limits and messages.
//!
//! Borrowing: the [`Snapshots`] value lives in the image; an operation takes it out
//! (`std::mem::take`), runs with the image as host, and puts it back. The engine's contract
//! (it never holds a [`HostParts`] borrow across calls) makes this sound, and nothing in the
//! host callbacks needs the table.
//!
//! Crash safety is the engine's (create: increments durable before the table names the
//! copy; delete: table first, decrements after; apply: increments before the active L1 is
//! overwritten): every failure leaks at most. The image adds invariant 5 (every direct write
//! of the engine is overlap-checked, and the overlap view is refreshed after each
//! operation) and invariant 7 (a failure whose on-disk outcome is unknown poisons).

use crate::error::{ImageError, Op, Result, EBUSY};
use crate::overlap::bits;
use crate::Image;
use qcow2_cache::OverlapError;
use qcow2_format::entry::L1E_OFFSET_MASK;
use qcow2_format::limits::MAX_L1_SIZE;
use qcow2_format::{Geometry, SnapshotEntry, SnapshotError};
use qcow2_io::errno::{EFBIG, EINVAL};
use qcow2_io::{Storage, StorageExt};
use qcow2_snapshot::{Addend, L1Source, NewSnapshot, Snapshots};
use qcow2_snapshot::{Error as SnapError, HostError, HostParts, MetadataWrite, SnapshotHost};

/// QEMU's open-time errors of the snapshot table (reference §1.11 step 18), with the hint
/// QEMU prints after some of them. Public so that tools reading the table on their own
/// (before opening the image) word the failure as the open does.
pub fn open_error(e: SnapError) -> ImageError {
    let refused = |message: String, hint: Option<String>, errno: i32| ImageError::Refused {
        op: Op::Open,
        message,
        hint,
        errno,
    };
    match &e {
        SnapError::Table(SnapshotError::TooMuchExtraData { index, .. }) => refused(
            format!("Too much extra metadata in snapshot table entry {index}"),
            Some("You can force-remove this extra metadata with qemu-img check -r all".into()),
            EFBIG,
        ),
        SnapError::Table(SnapshotError::TableTooBig { overhanging, .. }) => refused(
            "Snapshot table is too big".into(),
            Some(format!(
                "You can force-remove all {overhanging} overhanging snapshots with qemu-img \
                 check -r all"
            )),
            EFBIG,
        ),
        SnapError::Table(SnapshotError::TooManySnapshots { .. }) => {
            refused("Snapshot table too large".into(), None, EFBIG)
        }
        SnapError::TableOffsetInvalid { .. } => {
            refused("Snapshot table offset invalid".into(), None, EINVAL)
        }
        _ => refused(
            format!("Failed to read snapshot table: {e}"),
            None,
            e.errno(),
        ),
    }
}

/// Loads the snapshot table named by the header (QEMU's `qcow2_read_snapshots`).
pub(crate) fn load(
    storage: &dyn Storage,
    geo: &Geometry,
    nb_snapshots: u32,
    snapshots_offset: u64,
    virtual_size: u64,
) -> Result<Snapshots> {
    Snapshots::load(storage, geo, nb_snapshots, snapshots_offset, virtual_size).map_err(open_error)
}

impl SnapshotHost for Image {
    fn has_data_file(&self) -> bool {
        self.data.is_some()
    }

    fn parts(&mut self) -> HostParts<'_> {
        HostParts {
            caches: &mut self.caches,
            refcounts: &mut self.engine,
            active_l1: &mut self.l1,
        }
    }

    fn geometry(&self) -> Geometry {
        self.geo
    }

    fn virtual_size(&self) -> u64 {
        self.fc.header.size
    }

    fn l1_table_offset(&self) -> u64 {
        self.fc.header.l1_table_offset
    }

    fn snapshot_table_switched(&mut self, nb_snapshots: u32, snapshots_offset: u64) {
        // A later full header rewrite must keep the switch.
        self.fc.header.nb_snapshots = nb_snapshots;
        self.fc.header.snapshots_offset = snapshots_offset;
    }

    fn free_failed(&mut self, errno: i32) {
        self.messages.push(format!(
            "qcow2_free_clusters failed: {}",
            crate::image::strerror(errno)
        ));
    }

    fn resize(&mut self, new_size: u64) -> Result<(), HostError> {
        self.resize_as(Op::SnapshotApply, new_size)
            .map_err(|e| Box::new(e) as HostError)
    }

    fn grow_l1(&mut self, min_entries: u32) -> Result<(), HostError> {
        Image::grow_l1(self, Op::SnapshotApply, u64::from(min_entries), true)
            .map_err(|e| Box::new(e) as HostError)?;
        self.sync_overlap_refcounts();
        Ok(())
    }

    fn check_overlap(
        &self,
        offset: u64,
        len: u64,
        target: MetadataWrite,
    ) -> Result<(), OverlapError> {
        // QEMU's ignore masks: new tables go into fresh clusters (nothing ignored); a rewrite
        // of a table in place ignores that kind of table.
        let ignore = match target {
            MetadataWrite::NewSnapshotL1 | MetadataWrite::NewSnapshotTable => 0,
            MetadataWrite::SnapshotL1 => bits::INACTIVE_L1,
            MetadataWrite::ActiveL1 => bits::ACTIVE_L1,
            MetadataWrite::L2Table => bits::ACTIVE_L2 | bits::INACTIVE_L2,
        };
        self.overlap.check(offset, len, ignore)
    }
}

impl Image {
    /// The internal snapshots, in table order (what `qemu-img snapshot -l` lists: `id_str()`,
    /// `name_str()`, `vm_state_size`, `date_sec`/`date_nsec`, `vm_clock_nsec`, `icount`).
    pub fn snapshots(&self) -> &[SnapshotEntry] {
        self.snapshots.entries()
    }

    /// `qemu-img snapshot -c NAME`: a disk-only snapshot of the current state, with
    /// qemu-img's values (date from the wall clock, VM clock 0, icount 0, no VM state) and
    /// the next free numeric id. Names need not be unique (qemu-img allows duplicates).
    /// Returns the new entry.
    ///
    /// Crash safety: the L1 copy and the +1 on the whole active tree are durable before the
    /// new snapshot table names the copy; a failure or a crash leaks at most. Refused with
    /// refcount_bits 1 (or 2 after enough snapshots): "Invalid argument" (refcount overflow,
    /// everything undone), and at 65536 snapshots ("File too large").
    pub fn snapshot_create(&mut self, name: &str) -> Result<SnapshotEntry> {
        self.snapshot_create_with(NewSnapshot::now(name))
    }

    /// [`Image::snapshot_create`] with explicit recorded values (date, VM clock, icount).
    pub fn snapshot_create_with(&mut self, new: NewSnapshot) -> Result<SnapshotEntry> {
        let op = Op::SnapshotCreate;
        self.check_writable(op)?;
        let i = self.with_snapshots(op, |snaps, img| snaps.create_with(img, new))?;
        Ok(self.snapshots.entries()[i].clone())
    }

    /// `qemu-img snapshot -a ID_OR_NAME`: reverts the disk to the snapshot found by **id
    /// first, then by name** (QEMU's `find_snapshot_by_id_or_name`). The virtual size
    /// becomes the snapshot's `disk_size` (the image is resized first if it differs).
    /// Not found: [`ImageError::Snapshot`] with [`qcow2_snapshot::Error::NotFound`] (errno
    /// ENOENT; qemu-img prints "Could not apply snapshot 'x': Failed to load snapshot: No
    /// such file or directory"). An image with persistent bitmaps is refused first, as
    /// QEMU refuses it: [`ImageError::Refused`] "Device has active dirty bitmaps" (EBUSY).
    ///
    /// Crash safety: +1 on the snapshot's tree before the active L1 is overwritten (one
    /// synchronous write), -1 on the old tree after; a crash leaks at most.
    pub fn snapshot_apply(&mut self, id_or_name: &str) -> Result<()> {
        let op = Op::SnapshotApply;
        self.check_writable(op)?;
        // QEMU refuses to revert a node that has dirty bitmaps (`bdrv_snapshot_goto`),
        // before looking the snapshot up: a revert changes guest content under every
        // bitmap, the disabled ones included (a frozen record of changes no longer
        // describes the disk), so no bitmap could stay both consistent and right. The
        // bitmaps QEMU loads are those of a valid extension, IN_USE ones included.
        if self.has_persistent_bitmaps() {
            return Err(ImageError::Refused {
                op,
                message: "Device has active dirty bitmaps".into(),
                hint: None,
                errno: EBUSY,
            });
        }
        self.with_snapshots(op, |snaps, img| snaps.apply(img, id_or_name))?;
        // The active tree changed wholesale: cached decompressed data and the byte
        // allocator's partially used cluster may belong to the old tree.
        self.decompressed = None;
        Ok(())
    }

    /// `qemu-img snapshot -d NAME`: deletes the first snapshot **named** `name` (qemu-img
    /// does not look ids up for delete; "snapshot not found" otherwise, errno ENOENT).
    /// Returns the deleted entry.
    ///
    /// Crash safety: the table without the snapshot is switched to first, the -1 on its tree
    /// follows; a failure after the switch leaks only.
    pub fn snapshot_delete(&mut self, name: &str) -> Result<SnapshotEntry> {
        let op = Op::SnapshotDelete;
        self.check_writable(op)?;
        self.with_snapshots(op, |snaps, img| snaps.delete(img, name))
    }

    /// Runs one snapshot operation with the table taken out of the image, then puts it back
    /// and refreshes everything derived from it (overlap view, byte allocator). Maps the
    /// engine's errors: corruption marks the image corrupt; errors after which the on-disk
    /// state is not known to be the old or the new one poison (invariant 7).
    pub(crate) fn with_snapshots<T>(
        &mut self,
        op: Op,
        f: impl FnOnce(&mut Snapshots, &mut Image) -> std::result::Result<T, SnapError>,
    ) -> Result<T> {
        // A snapshot pass changes refcounts and COPIED flags in different clusters; no write
        // order keeps both exact at every instant (QEMU's leaves COPIED on clusters whose
        // refcount is already 2, ours leaves refcount-1 clusters without COPIED). On a v3
        // image the dirty bit covers the window: set (synchronously) before the first
        // change, cleared after the last one is durable, so a crash or a failure in between
        // is repaired on the next read-write open (QEMU's and ours) and never reads as
        // corruption. v2 has no dirty bit; there a crash can leave harmless COPIED
        // mismatches, as QEMU does.
        // The snapshot engine copies and rewrites the in-memory active L1: deferred entries
        // (new L2 tables) must be durable before any copy of them is.
        if !self.l1_dirty.is_empty() {
            self.flush_caches(op, true)?;
        }
        let guard = self.fc.header.version >= 3 && !self.is_dirty();
        if guard {
            self.mark_dirty(op)?;
        }
        let mut snaps = std::mem::take(&mut self.snapshots);
        let r = f(&mut snaps, self);
        self.snapshots = snaps;
        // The byte allocator must not continue in a cluster whose refcount the operation
        // may have changed (or freed).
        self.alloc.reset_byte_offset();
        self.decompressed = None;
        self.sync_overlap_l1();
        self.sync_overlap_refcounts();
        let synced = self.sync_overlap_snapshots(op);
        match r {
            Ok(v) => {
                synced?;
                if guard {
                    self.mark_clean(op)?;
                }
                Ok(v)
            }
            Err(e) => {
                let err = self.snapshot_err(op, e);
                // Nothing changed (a refusal), or the image is consistent again: clear the
                // bit. Otherwise it stays set and the next read-write open repairs.
                if guard && self.poisoned().is_none() && !self.is_corrupt() {
                    let _ = self.mark_clean(op);
                }
                Err(err)
            }
        }
    }

    /// Maps a snapshot-engine error (see [`Image::with_snapshots`]).
    fn snapshot_err(&mut self, op: Op, e: SnapError) -> ImageError {
        if e.is_corruption() {
            let msg = e.root().to_string();
            let _ = self.corruption(op, true, msg);
            return ImageError::Snapshot { op, source: e };
        }
        // Refusals and validation failures change nothing on disk; everything else may
        // have left a partial (leaking, never under-counting) state whose caches cannot be
        // trusted to match the disk.
        let harmless = matches!(
            e.root(),
            SnapError::NotFound { .. }
                | SnapError::TooManySnapshots { .. }
                | SnapError::L1TooLarge { .. }
                | SnapError::L1OffsetInvalid { .. }
                | SnapError::RefcountOverflow { .. }
                | SnapError::DataFile
                | SnapError::Table(_)
        );
        if let SnapError::Host { source, .. } = e.root() {
            if let Some(ImageError::Refused { .. }) = source.downcast_ref::<ImageError>() {
                return ImageError::Snapshot { op, source: e };
            }
        }
        if !harmless {
            if !matches!(e.root(), SnapError::TableSwitchUnknown { .. }) {
                // A pass that failed after COPIED flags were stripped (create) or before
                // they were recomputed (delete, apply) leaves clusters with refcount 1
                // without COPIED: safe, but not exact (invariant 6) and reported by
                // `qemu-img check`. One more recompute pass (refcounts flushed before any
                // flag is set) restores them when the failure was transient.
                let _ = qcow2_snapshot::update_snapshot_refcount(
                    self,
                    L1Source::Active,
                    Addend::Recompute,
                );
                self.sync_overlap_l1();
            }
            self.poison(format!("{op} failed: {e}"));
        }
        ImageError::Snapshot { op, source: e }
    }

    /// QEMU's `bdrv_snapshot_load_tmp_by_id_or_name`: a read-only image shows the guest
    /// contents of internal snapshot `id_or_name` (looked up by id, then by name) until it
    /// is closed; the virtual size stays the image's, as in QEMU. Nothing is written.
    pub fn snapshot_load_tmp(&mut self, id_or_name: &str) -> Result<()> {
        let op = Op::SnapshotApply;
        if !self.read_only {
            return Err(ImageError::InvalidArgument {
                op,
                reason: "temporarily loading a snapshot needs a read-only image".into(),
            });
        }
        let entry = self
            .snapshots
            .find_by_id_or_name(id_or_name)
            .and_then(|i| self.snapshots.entries().get(i))
            .cloned()
            .ok_or_else(|| ImageError::Snapshot {
                op,
                source: qcow2_snapshot::Error::NotFound {
                    name: id_or_name.to_string(),
                },
            })?;
        qcow2_snapshot::validate_snapshot_l1(&self.geo, entry.l1_table_offset, entry.l1_size)
            .map_err(|source| ImageError::Snapshot { op, source })?;
        self.l1 = self.read_snapshot_l1(op, &entry)?;
        self.decompressed = None;
        Ok(())
    }

    /// Reads a snapshot's L1 table (raw entries); one larger than QEMU's limit reads as
    /// empty (the snapshot is unusable and its tables are not walked).
    pub(crate) fn read_snapshot_l1(&self, op: Op, s: &SnapshotEntry) -> Result<Vec<u64>> {
        let bytes = u64::from(s.l1_size) * 8;
        if bytes > MAX_L1_SIZE {
            return Ok(Vec::new());
        }
        let raw = self
            .storage
            .read_vec(s.l1_table_offset, bytes as usize)
            .map_err(|e| ImageError::io(op, "read a snapshot L1 table", s.l1_table_offset, e))?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// Mirrors the snapshot table and the snapshot L1 tables (and, at overlap level
    /// [`OverlapLevel::All`](crate::OverlapLevel::All), their L2 tables) into the overlap
    /// view (invariant 5).
    pub(crate) fn sync_overlap_snapshots(&mut self, op: Op) -> Result<()> {
        let table = (self.snapshots.offset(), self.snapshots.size());
        let inactive_l1: Vec<(u64, u64)> = self
            .snapshots
            .entries()
            .iter()
            .map(|s| (s.l1_table_offset, u64::from(s.l1_size) * 8))
            .collect();
        let mut inactive_l2 = std::collections::HashSet::new();
        if self.opts.overlap_check == crate::OverlapLevel::All {
            for s in self.snapshots.entries() {
                for e in self.read_snapshot_l1(op, s)? {
                    let e = e & L1E_OFFSET_MASK;
                    if e != 0 {
                        inactive_l2.insert(e);
                    }
                }
            }
        }
        self.overlap.with(|s| {
            s.snapshot_table = table;
            s.inactive_l1 = inactive_l1;
            s.inactive_l2 = inactive_l2;
        });
        Ok(())
    }
}
