//! One check run (QEMU's `qcow2_co_check_locked`) and the qemu-img session around it.

use std::sync::Arc;

use qcow2_format::compressed::CompressedFormat;
use qcow2_format::entry::{
    L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK,
    L2_BITMAP_ALL_ALLOC, L2_BITMAP_ALL_ZERO, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use qcow2_format::features::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use qcow2_format::refcount::{REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use qcow2_io::Storage;

use crate::finding::{
    errno_of, errno_text, strerror, Finding, Label, MismatchKind, EFBIG, EINVAL, EIO, ENOMEDIUM,
    ENOMEM,
};
use crate::image::{Image, Ol, INCOMPAT_OFFSET};
use crate::imrt::{Imrt, PlainWalk};
use crate::io::{be64_at, pread, put_be64, pwrite, pwrite_sync, TableBatch};
use crate::report::CheckCounts;
use crate::{CheckError, RepairMode};

/// QEMU's `BdrvCheckMode` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Fix {
    pub(crate) leaks: bool,
    pub(crate) errors: bool,
}

impl Fix {
    pub(crate) fn from_mode(mode: Option<RepairMode>) -> Self {
        match mode {
            None => Fix::default(),
            Some(RepairMode::Leaks) => Fix {
                leaks: true,
                errors: false,
            },
            Some(RepairMode::All) => Fix {
                leaks: true,
                errors: true,
            },
        }
    }

    fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// QEMU's `BdrvCheckResult` during a run (signed, as QEMU decrements after incrementing).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Res {
    pub(crate) corruptions: i64,
    pub(crate) leaks: i64,
    pub(crate) check_errors: i64,
    pub(crate) corruptions_fixed: i64,
    pub(crate) leaks_fixed: i64,
    pub(crate) image_end_offset: u64,
    pub(crate) total_clusters: u64,
    pub(crate) allocated_clusters: u64,
    pub(crate) fragmented_clusters: u64,
    pub(crate) compressed_clusters: u64,
}

impl Res {
    /// QEMU's `qcow2_add_check_result`.
    fn add(&mut self, src: &Res, alloc_info: bool) {
        self.corruptions += src.corruptions;
        self.leaks += src.leaks;
        self.check_errors += src.check_errors;
        self.corruptions_fixed += src.corruptions_fixed;
        self.leaks_fixed += src.leaks_fixed;
        if alloc_info {
            self.image_end_offset = src.image_end_offset;
            self.total_clusters = src.total_clusters;
            self.allocated_clusters = src.allocated_clusters;
            self.fragmented_clusters = src.fragmented_clusters;
            self.compressed_clusters = src.compressed_clusters;
        }
    }

    pub(crate) fn counts(&self) -> CheckCounts {
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        CheckCounts {
            corruptions: u(self.corruptions),
            leaks: u(self.leaks),
            check_errors: u(self.check_errors),
            corruptions_fixed: u(self.corruptions_fixed),
            leaks_fixed: u(self.leaks_fixed),
            image_end_offset: self.image_end_offset,
            total_clusters: self.total_clusters,
            allocated_clusters: self.allocated_clusters,
            fragmented_clusters: self.fragmented_clusters,
            compressed_clusters: self.compressed_clusters,
        }
    }
}

/// State that lives as long as qemu-img's open image: findings, the corruption-event
/// suppression flag, the in-memory incompatible features and whether a fatal corruption
/// event made the image unusable (QEMU sets `bs->drv = NULL`).
pub(crate) struct Session<'p> {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) writable: bool,
    pub(crate) findings: Vec<Finding>,
    pub(crate) signaled_corruption: bool,
    pub(crate) poisoned: bool,
    pub(crate) incompat: u64,
    pub(crate) version: u32,
    pub(crate) progress: &'p mut dyn FnMut(u64, u64),
    /// Refcount blocks changed by repairs but not yet written: QEMU keeps them in its
    /// refcount-block cache until a flush, and loses them if a fatal corruption event
    /// makes the image unusable first.
    pub(crate) pending: std::collections::BTreeMap<u64, Vec<u8>>,
    /// The image as the initial open read it, used by the first run instead of reading
    /// the header and tables again.
    pub(crate) opened: Option<Image>,
}

impl Session<'_> {
    fn push(&mut self, f: Finding) {
        self.findings.push(f);
    }

    /// QEMU's `qcow2_signal_corruption`: fatal only on a writable image; reported once
    /// unless a later one is fatal and the image is not yet marked corrupt. A fatal event
    /// sets the corrupt bit and makes the image unusable for further checks.
    pub(crate) fn signal_corruption(&mut self, message: String) {
        let fatal = self.writable;
        if self.signaled_corruption && (!fatal || self.incompat & INCOMPAT_CORRUPT != 0) {
            return;
        }
        self.push(Finding::CorruptionEvent { fatal, message });
        if fatal {
            self.incompat |= INCOMPAT_CORRUPT;
            self.write_incompat();
            self.poisoned = true;
        }
        self.signaled_corruption = true;
    }

    /// Writes the in-memory incompatible features to the header (v3 only; errors ignored
    /// as QEMU ignores the result of marking an image corrupt).
    fn write_incompat(&mut self) -> bool {
        if self.version < 3 {
            return true;
        }
        let ok = pwrite(
            &*self.storage,
            &self.incompat.to_be_bytes(),
            INCOMPAT_OFFSET,
        )
        .is_ok();
        ok && self.storage.flush().is_ok()
    }

    /// Writes the pending refcount blocks (QEMU's refcount-block cache flush).
    pub(crate) fn flush_pending(&mut self) -> Result<(), i32> {
        let pending = std::mem::take(&mut self.pending);
        for (offset, block) in &pending {
            pwrite(&*self.storage, block, *offset).map_err(|e| errno_of(&e))?;
        }
        // A read-only open has nothing to make durable (QEMU's flush of a read-only node
        // is a no-op); an fdatasync would cost more than a small check itself.
        if !self.writable {
            return Ok(());
        }
        self.storage.flush().map_err(|e| errno_of(&e))
    }

    /// QEMU's `qcow2_mark_clean` (clears the dirty bit if set).
    pub(crate) fn mark_clean(&mut self) -> Result<(), i32> {
        if self.incompat & INCOMPAT_DIRTY != 0 {
            self.flush_pending()?;
            self.incompat &= !INCOMPAT_DIRTY;
            if !self.write_incompat() {
                return Err(EIO);
            }
        }
        Ok(())
    }

    /// QEMU's `qcow2_mark_consistent` (clears the corrupt bit if set).
    fn mark_consistent(&mut self) -> Result<(), i32> {
        if self.incompat & INCOMPAT_CORRUPT != 0 {
            self.flush_pending()?;
            self.incompat &= !INCOMPAT_CORRUPT;
            if !self.write_incompat() {
                return Err(EIO);
            }
        }
        Ok(())
    }

    /// One `bdrv_check` (QEMU's `qcow2_co_check_locked`) with a fresh view of the image.
    pub(crate) fn run(&mut self, fix: Fix) -> Result<Result<Res, i32>, CheckError> {
        if self.poisoned {
            return Ok(Err(ENOMEDIUM));
        }
        let img = match self.opened.take() {
            Some(img) => img,
            None => Image::open(self.storage.clone(), self.writable)?,
        };
        let mut run = Run::new(self, img, fix);
        let r = run.check();
        // Closing (or checking again) writes what QEMU's cache still holds, unless the
        // image became unusable.
        if !self.poisoned {
            let _ = self.flush_pending();
        }
        Ok(r)
    }
}

/// Where the on-disk refcount of a cluster below `nb_clusters` differs from the IMRT after
/// the last comparison (sorted by cluster; `Err` = the refcount could not be read).
type Overrides = Vec<(u64, Result<u64, i32>)>;

/// One check run over an open image.
pub(crate) struct Run<'s, 'p> {
    s: &'s mut Session<'p>,
    img: Image,
    fix: Fix,
    imrt: Imrt,
    file_len: u64,
    rebuild: bool,
    overrides: Overrides,
    progress_done: u64,
    progress_total: u64,
    /// A reusable read buffer for table batches.
    spare: Vec<u8>,
    /// The active L2 tables as the last walk read (and repaired) them, for the COPIED
    /// pass; `None` when they did not fit the memory budget.
    active_l2: Option<Vec<TableBatch>>,
}

/// Memory budget for keeping the active L2 tables between the walk and the COPIED pass.
const ACTIVE_L2_BUDGET: usize = 256 << 20;

/// Byte budget of one batch of L2 tables or refcount blocks.
const BATCH_BYTES: u64 = 32 << 20;

/// What went wrong in `fix_l2_entry_by_zero`.
enum ZeroFix {
    Fixed,
    Overlap(i32),
    WriteFailed,
}

impl<'s, 'p> Run<'s, 'p> {
    fn new(s: &'s mut Session<'p>, img: Image, fix: Fix) -> Self {
        let codec = img.codec;
        Run {
            s,
            img,
            fix,
            imrt: Imrt::empty(&codec),
            file_len: 0,
            rebuild: false,
            overrides: Vec::new(),
            progress_done: 0,
            progress_total: 0,
            spare: Vec::new(),
            active_l2: None,
        }
    }

    fn push(&mut self, f: Finding) {
        self.s.push(f);
    }

    fn tick(&mut self, n: u64) {
        self.progress_done += n;
        if self.progress_done % 1024 < n || self.progress_done >= self.progress_total {
            (self.s.progress)(
                self.progress_done.min(self.progress_total),
                self.progress_total,
            );
        }
    }

    fn refresh_file_len(&mut self) -> Result<(), i32> {
        self.file_len = self.img.file_len().map_err(|e| errno_of(&e))?;
        Ok(())
    }

    /// `qcow2_co_check_locked`.
    fn check(&mut self) -> Result<Res, i32> {
        let mut result = Res::default();
        let mut snap_res = Res::default();
        self.check_read_snapshot_table(&mut snap_res)?;
        let mut rc_res = Res::default();
        let r = self.check_refcounts(&mut rc_res);
        result.add(&rc_res, true);
        r?;
        let r = self.check_fix_snapshot_table(&mut snap_res);
        result.add(&snap_res, false);
        r?;
        if self.fix.any() && result.check_errors == 0 && result.corruptions == 0 {
            self.s.mark_clean()?;
            self.s.mark_consistent()?;
        }
        Ok(result)
    }

    // --------------------------------------------------------------------------------
    // Snapshot table (qcow2-snapshot.c)
    // --------------------------------------------------------------------------------

    /// `qcow2_check_read_snapshot_table`.
    fn check_read_snapshot_table(&mut self, res: &mut Res) -> Result<(), i32> {
        let mut ptr = [0u8; 12];
        if let Err(e) = pread(
            &*self.img.storage,
            &mut ptr,
            crate::image::SNAPSHOT_POINTER_OFFSET,
        ) {
            res.check_errors += 1;
            self.push(Finding::SnapshotPointerReadFailed {
                error: strerror(&e),
            });
            return Err(errno_of(&e));
        }
        let mut nb = u64::from(u32::from_be_bytes([ptr[0], ptr[1], ptr[2], ptr[3]]));
        let offset = be64_at(&ptr, 4);
        self.img.snapshots_offset = offset;
        self.img.snapshots.clear();
        self.img.snapshots_size = 0;
        let mut reduced = 0u64;
        const MAX_SNAPSHOTS: u64 = 65536;
        if nb > MAX_SNAPSHOTS && self.fix.errors {
            self.push(Finding::DiscardingOverhangingSnapshots {
                count: nb - MAX_SNAPSHOTS,
            });
            reduced += nb - MAX_SNAPSHOTS;
            nb = MAX_SNAPSHOTS;
        }
        let problem = if nb > MAX_SNAPSHOTS {
            Some((crate::finding::SnapshotTableProblem::TooLarge, EFBIG))
        } else if (i64::MAX as u64) - nb * 40 < offset || offset & (self.img.cs - 1) != 0 {
            Some((crate::finding::SnapshotTableProblem::OffsetInvalid, EINVAL))
        } else {
            None
        };
        if let Some((problem, errno)) = problem {
            res.check_errors += 1;
            self.push(Finding::SnapshotTableInvalid {
                problem,
                overhanging: nb.saturating_sub(MAX_SNAPSHOTS),
            });
            self.img.snapshots_offset = 0;
            return Err(errno);
        }
        let mut dropped = 0u64;
        match crate::snapshots::read_snapshots(self, nb as u32, &mut reduced, &mut dropped) {
            Ok((list, size)) => {
                self.img.snapshots = list;
                self.img.snapshots_size = size;
            }
            Err((message, hint, errno)) => {
                res.check_errors += 1;
                self.push(Finding::SnapshotTableReadFailed { message, hint });
                self.img.snapshots_offset = 0;
                self.img.snapshots.clear();
                return Err(errno);
            }
        }
        res.corruptions += (reduced + dropped) as i64;
        if reduced > 0 {
            let n = self.img.snapshots.len() as u32;
            if let Err(e) = pwrite_sync(
                &*self.img.storage,
                &n.to_be_bytes(),
                crate::image::SNAPSHOT_POINTER_OFFSET,
            ) {
                res.check_errors += 1;
                self.push(Finding::SnapshotCountUpdateFailed {
                    error: strerror(&e),
                });
                return Err(errno_of(&e));
            }
            res.corruptions_fixed += reduced as i64;
            res.corruptions -= reduced as i64;
        }
        if self.img.header.version >= 3 {
            let label = Label::from_fix(self.fix.errors);
            for i in 0..self.img.snapshots.len() {
                if self.img.snapshots[i].entry.extra_data_size < 16 {
                    res.corruptions += 1;
                    self.push(Finding::SnapshotEntryIncomplete {
                        label,
                        index: i as u32,
                    });
                }
            }
        }
        Ok(())
    }

    /// `qcow2_check_fix_snapshot_table`.
    fn check_fix_snapshot_table(&mut self, res: &mut Res) -> Result<(), i32> {
        if res.corruptions != 0 && self.fix.errors {
            if let Err(e) = crate::snapshots::write_snapshots(self) {
                res.check_errors += 1;
                self.push(Finding::SnapshotTableUpdateFailed {
                    error: errno_text(e),
                });
                return Err(e);
            }
            res.corruptions_fixed += res.corruptions;
            res.corruptions = 0;
        }
        Ok(())
    }

    // --------------------------------------------------------------------------------
    // Reference counting (qcow2-refcount.c)
    // --------------------------------------------------------------------------------

    /// `qcow2_inc_refcounts_imrt` with C's signed 64-bit arithmetic.
    fn inc(&mut self, res: &mut Res, offset: i64, size: i64) -> Result<(), i32> {
        if size <= 0 {
            return Ok(());
        }
        let cs = self.img.cs;
        // Fast path: one aligned cluster inside the table and the file.
        if size as u64 == cs && offset >= 0 && offset as u64 & (cs - 1) == 0 {
            let o = offset as u64;
            let k = o >> self.img.bits;
            if k < self.imrt.len() && o < self.file_len {
                if !self.imrt.inc(k) {
                    self.push(Finding::RefcountOverflow { cluster_offset: o });
                    res.corruptions += 1;
                }
                return Ok(());
            }
        }
        let over = offset.wrapping_add(size).wrapping_sub(self.file_len as i64);
        if over >= cs as i64 {
            self.push(Finding::RegionBeyondEof {
                offset: offset as u64,
                size: size as u64,
            });
            res.corruptions += 1;
            return Ok(());
        }
        let start = (offset as u64) & !(cs - 1);
        let last = (offset.wrapping_add(size - 1) as u64) & !(cs - 1);
        let mut c = start;
        while c <= last {
            let k = c >> self.img.bits;
            if k >= self.imrt.len() {
                // Legitimate growth is at most to the cluster holding the end of the file;
                // anything further comes from a negative (wrapped) offset, for which QEMU's
                // reallocation fails.
                let limit = self
                    .imrt
                    .len()
                    .max(self.img.size_to_clusters(self.file_len))
                    + 1;
                if k >= limit || !self.imrt.grow(k + 1) {
                    res.check_errors += 1;
                    return Err(ENOMEM);
                }
            }
            if !self.imrt.inc(k) {
                self.push(Finding::RefcountOverflow { cluster_offset: c });
                res.corruptions += 1;
            }
            match c.checked_add(cs) {
                Some(n) => c = n,
                None => break,
            }
        }
        Ok(())
    }

    /// `qcow2_check_refcounts`.
    fn check_refcounts(&mut self, res: &mut Res) -> Result<(), i32> {
        let file_len = match self.img.file_len() {
            Ok(l) => l,
            Err(e) => {
                res.check_errors += 1;
                return Err(errno_of(&e));
            }
        };
        self.file_len = file_len;
        let nb_clusters = self.img.size_to_clusters(file_len);
        if nb_clusters > i32::MAX as u64 {
            res.check_errors += 1;
            return Err(EFBIG);
        }
        res.total_clusters = self.img.size_to_clusters(self.img.virtual_size);
        self.imrt = match Imrt::new(&self.img.codec, nb_clusters) {
            Some(t) => t,
            None => {
                res.check_errors += 1;
                return Err(ENOMEM);
            }
        };
        self.progress_total = self.estimate_work(nb_clusters);
        self.rebuild = false;
        self.calculate_refcounts(res, self.fix)?;

        let pre_compare = *res;
        let mut highest = self.compare_refcounts(res, Fix::default());

        if self.rebuild && self.fix.errors {
            let old = *res;
            let mut fresh_leaks = 0;
            self.push(Finding::RebuildingRefcountStructure);
            if let Err((message, errno)) = self.rebuild_refcount_structure(res) {
                self.push(Finding::RebuildFailed { message });
                return Err(errno);
            }
            res.corruptions = 0;
            res.leaks = 0;
            self.rebuild = false;
            self.imrt.clear();
            self.calculate_refcounts(res, Fix::default())?;
            if self.fix.leaks {
                let saved = *res;
                *res = Res::default();
                highest = self.compare_refcounts(
                    res,
                    Fix {
                        leaks: true,
                        errors: false,
                    },
                );
                if self.rebuild {
                    self.push(Finding::RebuiltStillBroken);
                }
                fresh_leaks = res.leaks;
                *res = saved;
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_leaks;
        } else if self.fix.any() {
            if self.rebuild {
                self.push(Finding::NeedRebuild);
                res.check_errors += 1;
                return Err(EIO);
            }
            if res.leaks != 0 || res.corruptions != 0 {
                *res = pre_compare;
                highest = self.compare_refcounts(res, self.fix);
            }
        }

        self.check_oflag_copied(res)?;
        res.image_end_offset = (highest + 1).saturating_mul(self.img.cs);
        Ok(())
    }

    /// Units of work for the progress callback: L1 entries of every table, and refcount
    /// blocks to compare.
    fn estimate_work(&self, nb_clusters: u64) -> u64 {
        let l1: u64 = self.img.l1.len() as u64
            + self
                .img
                .snapshots
                .iter()
                .map(|s| u64::from(s.entry.l1_size).min(4 << 20))
                .sum::<u64>();
        l1 + nb_clusters.div_ceil(self.img.geo.refcount_block_entries())
    }

    /// `calculate_refcounts`.
    fn calculate_refcounts(&mut self, res: &mut Res, fix: Fix) -> Result<(), i32> {
        let cs = self.img.cs;
        // header
        self.inc(res, 0, cs as i64)?;
        // active L1
        let l1_offset = self.img.header.l1_table_offset;
        let l1_size = self.img.header.l1_size;
        self.check_refcounts_l1(res, l1_offset, l1_size, true, fix, true)?;
        // snapshots
        if self.img.has_data_file && !self.img.snapshots.is_empty() {
            self.push(Finding::SnapshotsWithDataFile {
                count: self.img.snapshots.len() as u64,
            });
            res.corruptions += 1;
        }
        for i in 0..self.img.snapshots.len() {
            let (off, size, id, name) = {
                let sn = &self.img.snapshots[i];
                (
                    sn.entry.l1_table_offset,
                    sn.entry.l1_size,
                    sn.id.clone(),
                    sn.name.clone(),
                )
            };
            if off & (cs - 1) != 0 {
                self.push(Finding::SnapshotL1Unaligned {
                    id,
                    name,
                    l1_offset: off,
                });
                res.corruptions += 1;
                continue;
            }
            if u64::from(size) > (32 << 20) / 8 {
                self.push(Finding::SnapshotL1TooLarge {
                    id,
                    name,
                    l1_size: size,
                });
                res.corruptions += 1;
                continue;
            }
            self.check_refcounts_l1(res, off, size, false, fix, false)?;
        }
        let (so, ss) = (self.img.snapshots_offset, self.img.snapshots_size);
        self.inc(res, so as i64, ss as i64)?;
        // refcount table
        let (ro, rs) = (self.img.reftable_offset, self.img.reftable.len() as u64 * 8);
        self.inc(res, ro as i64, rs as i64)?;
        // encryption header
        if let Some(c) = self.img.ext.crypto_header {
            if c.length != 0 {
                self.inc(res, c.offset as i64, c.length as i64)?;
            }
        }
        // bitmaps
        crate::bitmaps::check_bitmaps_refcounts(self, res)?;
        self.check_refblocks(res, fix)
    }

    /// `check_refcounts_l1`, with the L2 tables of a batch of L1 entries fetched by sorted,
    /// coalesced reads and processed in L1 order (so findings come out in QEMU's order).
    fn check_refcounts_l1(
        &mut self,
        res: &mut Res,
        l1_offset: u64,
        l1_size: u32,
        frag: bool,
        fix: Fix,
        active: bool,
    ) -> Result<(), i32> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = u64::from(l1_size) * 8;
        self.inc(res, l1_offset as i64, bytes as i64)?;
        let mut buf = Vec::new();
        if buf.try_reserve_exact(bytes as usize).is_err() {
            res.check_errors += 1;
            return Err(ENOMEM);
        }
        buf.resize(bytes as usize, 0);
        if let Err(e) = pread(&*self.img.storage, &mut buf, l1_offset) {
            self.push(Finding::L1ReadFailed);
            res.check_errors += 1;
            return Err(errno_of(&e));
        }
        let l1 = crate::io::be64_words(&buf);
        drop(buf);
        let cs = self.img.cs;
        let per_batch = (BATCH_BYTES / cs).max(1) as usize;
        if active {
            self.active_l2 = Some(Vec::new());
        }
        let mut i = 0usize;
        while i < l1.len() {
            // One batch: the next `per_batch` allocated entries.
            let mut j = i;
            let mut offsets = Vec::new();
            while j < l1.len() && offsets.len() < per_batch {
                if l1[j] != 0 {
                    offsets.push(l1[j] & L1E_OFFSET_MASK);
                }
                j += 1;
            }
            let spare = std::mem::take(&mut self.spare);
            let mut batch = TableBatch::load(&*self.img.storage, &offsets, cs as usize, spare);
            for &entry in l1.iter().take(j).skip(i) {
                if entry == 0 {
                    continue;
                }
                if entry & L1E_RESERVED_MASK != 0 {
                    self.push(Finding::L1ReservedBits { entry });
                    res.corruptions += 1;
                }
                let l2_offset = entry & L1E_OFFSET_MASK;
                self.inc(res, l2_offset as i64, cs as i64)?;
                if l2_offset & (cs - 1) != 0 {
                    self.push(Finding::L2TableUnaligned { l2_offset });
                    res.corruptions += 1;
                }
                self.check_refcounts_l2(res, l2_offset, &mut batch, frag, fix, active)?;
            }
            self.tick((j - i) as u64);
            i = j;
            // Keep the active tables for the COPIED pass while they fit the budget.
            let keep = active
                && self.active_l2.as_ref().is_some_and(|v| {
                    v.iter().map(TableBatch::bytes).sum::<usize>() + batch.bytes()
                        <= ACTIVE_L2_BUDGET
                });
            if keep {
                if let Some(v) = self.active_l2.as_mut() {
                    v.push(batch);
                }
            } else {
                if active {
                    self.active_l2 = None;
                }
                self.spare = batch.into_buffer();
            }
        }
        Ok(())
    }

    /// `check_refcounts_l2`.
    fn check_refcounts_l2(
        &mut self,
        res: &mut Res,
        l2_offset: u64,
        batch: &mut TableBatch,
        frag: bool,
        fix: Fix,
        active: bool,
    ) -> Result<(), i32> {
        // Repairs below patch this batch copy, which later references of the table see.
        let table = match batch.get_mut(l2_offset) {
            Ok(t) => t,
            Err(e) => {
                self.push(Finding::L2ReadFailed);
                res.check_errors += 1;
                return Err(e);
            }
        };
        let cs = self.img.cs;
        let ext = self.img.geo.extended_l2();
        let esz: usize = if ext { 16 } else { 8 };
        let n = self.img.l2_entries() as usize;
        let fmt = CompressedFormat::for_geometry(&self.img.geo);
        let data_file = self.img.has_data_file;
        let mut next_contiguous = 0u64;
        // An entry with none of these bits is a plain allocated data cluster (or only
        // COPIED/unallocated): nothing to report, one reference to count. Runs of them go
        // through the IMRT's tight loop; the first other entry takes the full path below.
        let mut plain = (!ext && !data_file).then(|| PlainWalk {
            plain_mask: OFLAG_COMPRESSED
                | L2E_STD_RESERVED_MASK
                | OFLAG_ZERO
                | (L2E_OFFSET_MASK & (cs - 1)),
            offset_mask: L2E_OFFSET_MASK,
            bits: self.img.bits,
            limit: self.img.size_to_clusters(self.file_len),
            allocated: 0,
            fragmented: 0,
            next_contiguous: 0,
        });
        let mut i = 0usize;
        while i < n {
            if let Some(w) = plain.as_mut() {
                w.next_contiguous = next_contiguous;
                i = self.imrt.inc_plain_l2(&table[..n * 8], i, w);
                next_contiguous = w.next_contiguous;
                if i >= n {
                    break;
                }
            }
            // The full per-entry logic (QEMU's loop body) for entry `i`.
            'entry: {
                let mut entry = be64_at(table, i * esz);
                let bitmap = if ext { be64_at(table, i * esz + 8) } else { 0 };
                if entry == 0 && bitmap == 0 {
                    break 'entry;
                }
                let compressed = entry & OFLAG_COMPRESSED != 0;
                if !compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                    self.push(Finding::L2ReservedBits { entry });
                    res.corruptions += 1;
                }
                let offset = entry & L2E_OFFSET_MASK;
                if compressed {
                    if entry & OFLAG_COPIED != 0 {
                        self.push(Finding::CompressedCopied {
                            coffset: fmt.decode_raw(entry).host_offset(),
                        });
                        entry &= !OFLAG_COPIED;
                        res.corruptions += 1;
                    }
                    if data_file {
                        self.push(Finding::CompressedWithDataFile {
                            index: i as u64,
                            entry,
                        });
                        res.corruptions += 1;
                        break 'entry;
                    }
                    if bitmap != 0 {
                        self.push(Finding::CompressedWithBitmap {
                            index: i as u64,
                            entry,
                        });
                        res.corruptions += 1;
                        break 'entry;
                    }
                    let d = fmt.decode_raw(entry);
                    self.inc(res, d.host_offset() as i64, d.compressed_size() as i64)?;
                    if frag {
                        res.allocated_clusters += 1;
                        res.compressed_clusters += 1;
                        res.fragmented_clusters += 1;
                    }
                    break 'entry;
                }
                // QEMU's qcow2_get_cluster_type for non-compressed entries.
                let zero_flag = !ext && entry & OFLAG_ZERO != 0;
                let allocated = if zero_flag {
                    offset != 0
                } else {
                    offset != 0 || (data_file && entry & OFLAG_COPIED != 0)
                };
                if !allocated {
                    if !zero_flag && bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                        self.push(Finding::UnallocatedWithAllocBits);
                        res.corruptions += 1;
                    }
                    break 'entry;
                }
                if (bitmap >> 32) & bitmap != 0 {
                    res.corruptions += 1;
                    self.push(Finding::AllocatedBitmapOverlap { offset });
                }
                if offset & (cs - 1) != 0 {
                    res.corruptions += 1;
                    let contains_data = if ext {
                        bitmap & L2_BITMAP_ALL_ALLOC != 0
                    } else {
                        entry & OFLAG_ZERO == 0
                    };
                    if !contains_data {
                        self.push(Finding::UnalignedPreallocated {
                            label: Label::from_fix(fix.errors),
                            offset,
                        });
                        if fix.errors {
                            match self.fix_l2_entry_by_zero(res, l2_offset, table, i, active) {
                                ZeroFix::Fixed => break 'entry,
                                ZeroFix::Overlap(e) => return Err(e),
                                ZeroFix::WriteFailed => {}
                            }
                        }
                    } else {
                        self.push(Finding::UnalignedData { offset });
                    }
                }
                if frag {
                    res.allocated_clusters += 1;
                    if next_contiguous != 0 && offset != next_contiguous {
                        res.fragmented_clusters += 1;
                    }
                    next_contiguous = offset.wrapping_add(cs);
                }
                if !data_file {
                    self.inc(res, offset as i64, cs as i64)?;
                }
            }
            i += 1;
        }
        if let (Some(w), true) = (plain, frag) {
            res.allocated_clusters += w.allocated;
            res.fragmented_clusters += w.fragmented;
        }
        Ok(())
    }

    /// `fix_l2_entry_by_zero`: turns an unaligned preallocated zero cluster into a plain
    /// zero cluster, in the batch copy and on disk.
    fn fix_l2_entry_by_zero(
        &mut self,
        res: &mut Res,
        l2_offset: u64,
        table: &mut [u8],
        index: usize,
        active: bool,
    ) -> ZeroFix {
        let ext = self.img.geo.extended_l2();
        let esz: usize = if ext { 16 } else { 8 };
        if ext {
            let mut bitmap = be64_at(table, index * esz + 8);
            bitmap |= bitmap << 32;
            bitmap &= L2_BITMAP_ALL_ZERO;
            put_be64(table, index * esz + 8, bitmap);
            put_be64(table, index * esz, 0);
        } else {
            put_be64(table, index * esz, OFLAG_ZERO);
        }
        let l2e_offset = l2_offset.wrapping_add((index * esz) as u64);
        let ign = if active { Ol::ActiveL2 } else { Ol::InactiveL2 };
        if let Some(ol) = self.img.overlap(&[ign], l2e_offset, esz as u64) {
            self.s.signal_corruption(format!(
                "Preventing invalid write on metadata (overlaps with {})",
                ol.name()
            ));
            self.push(Finding::L2EntryFixOverlap);
            res.check_errors += 1;
            return ZeroFix::Overlap(EIO);
        }
        let bytes = table
            .get(index * esz..index * esz + esz)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        if let Err(e) = pwrite_sync(&*self.img.storage, &bytes, l2e_offset) {
            self.push(Finding::L2EntryFixWriteFailed {
                error: strerror(&e),
            });
            res.check_errors += 1;
            return ZeroFix::WriteFailed;
        }
        res.corruptions -= 1;
        res.corruptions_fixed += 1;
        ZeroFix::Fixed
    }

    /// `check_refblocks`.
    fn check_refblocks(&mut self, res: &mut Res, fix: Fix) -> Result<(), i32> {
        let cs = self.img.cs;
        for i in 0..self.img.reftable.len() {
            let raw = self.img.reftable[i];
            let offset = raw & REFT_OFFSET_MASK;
            let cluster = offset >> self.img.bits;
            if raw & REFT_RESERVED_MASK != 0 {
                self.push(Finding::ReftableEntryReserved { index: i as u64 });
                res.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if offset & (cs - 1) != 0 {
                self.push(Finding::RefblockUnaligned { index: i as u64 });
                res.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if cluster >= self.imrt.len() {
                res.corruptions += 1;
                self.push(Finding::RefblockOutsideImage {
                    label: Label::from_fix(fix.errors),
                    index: i as u64,
                });
                if fix.errors {
                    match self.grow_for_refblock(res, offset, cluster)? {
                        Ok(()) => {
                            res.corruptions -= 1;
                            res.corruptions_fixed += 1;
                            self.inc(res, offset as i64, cs as i64)?;
                        }
                        Err(errno) => {
                            self.rebuild = true;
                            self.push(Finding::ResizeFailed {
                                error: errno_text(errno),
                            });
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc(res, offset as i64, cs as i64)?;
                let r = self.imrt.get(cluster);
                if r != 1 {
                    self.push(Finding::RefblockRefcount {
                        index: i as u64,
                        refcount: r,
                    });
                    res.corruptions += 1;
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Grows the file to cover a refcount block beyond its end (QEMU truncates the file up
    /// to `offset + cluster_size`). The outer error aborts the check (no memory for the
    /// bigger IMRT); the inner one is a failed resize.
    ///
    /// Unlike QEMU, growth is refused (`EFBIG`, as a file system refuses a too-large file)
    /// beyond twice the file length or 1 GiB past its end, whichever is more: a corrupt
    /// entry must not make the storage (or the IMRT) allocate unbounded space. Refused
    /// entries are handled by the rebuild, as when QEMU's resize fails.
    fn grow_for_refblock(
        &mut self,
        res: &mut Res,
        offset: u64,
        cluster: u64,
    ) -> Result<Result<(), i32>, i32> {
        let cs = self.img.cs;
        if offset > (i64::MAX as u64) - cs {
            return Ok(Err(EINVAL));
        }
        let new_len = offset + cs;
        let limit = self
            .file_len
            .saturating_mul(2)
            .max(self.file_len.saturating_add(1 << 30));
        if new_len > limit {
            self.push(Finding::ResizeErrorReport {
                message: format!("Could not resize file: {}", errno_text(EFBIG)),
            });
            return Ok(Err(EFBIG));
        }
        if new_len > self.file_len {
            if let Err(e) = self.img.storage.set_len(new_len) {
                self.push(Finding::ResizeErrorReport {
                    message: format!("Could not resize file: {}", strerror(&e)),
                });
                return Ok(Err(errno_of(&e)));
            }
        }
        let size = match self.img.file_len() {
            Ok(s) => s,
            Err(e) => return Ok(Err(errno_of(&e))),
        };
        self.file_len = size;
        let new_nb = self.img.size_to_clusters(size);
        if new_nb > self.imrt.len() && !self.imrt.grow(new_nb) {
            res.check_errors += 1;
            return Err(ENOMEM);
        }
        if cluster >= self.imrt.len() {
            return Ok(Err(EINVAL));
        }
        Ok(Ok(()))
    }

    /// `compare_refcounts`; returns `highest_cluster`. With `fix`, repairs by rewriting
    /// each refcount block once (then one flush), and discards clusters that become free.
    fn compare_refcounts(&mut self, res: &mut Res, fix: Fix) -> u64 {
        let nb = self.imrt.len();
        let e = self.img.geo.refcount_block_entries();
        let cs = self.img.cs;
        let codec = self.img.codec;
        let nblocks = nb.div_ceil(e);
        let mut highest = 0u64;
        self.overrides.clear();
        let mut wrote_any = false;
        let mut freed: Vec<u64> = Vec::new();
        let per_batch = (BATCH_BYTES / cs).max(1);
        let mut b0 = 0u64;
        while b0 < nblocks {
            let b1 = (b0 + per_batch).min(nblocks);
            let mut offsets = Vec::new();
            for rb in b0..b1 {
                let o = self.reftable_entry(rb) & REFT_OFFSET_MASK;
                if o != 0 && o & (cs - 1) == 0 {
                    offsets.push(o);
                }
            }
            let spare = std::mem::take(&mut self.spare);
            let mut batch = TableBatch::load(&*self.img.storage, &offsets, cs as usize, spare);
            // Refcount blocks repaired earlier in this session are still "in the cache".
            for (off, b) in &self.s.pending {
                if let Ok(t) = batch.get_mut(*off) {
                    t.copy_from_slice(b);
                }
            }
            for rb in b0..b1 {
                let start = rb * e;
                let end = (start + e).min(nb);
                let raw = self.reftable_entry(rb);
                let rb_offset = raw & REFT_OFFSET_MASK;
                // Where the on-disk refcounts of this block come from.
                let source: Result<Option<Vec<u8>>, i32> = if rb_offset == 0 {
                    Ok(None)
                } else if rb_offset & (cs - 1) != 0 {
                    Err(-1)
                } else {
                    batch.get_mut(rb_offset).map(|b| Some(b.to_vec()))
                };
                let mut block = match source {
                    Ok(b) => b,
                    Err(code) => {
                        for c in start..end {
                            let errno = if code == -1 {
                                self.s.signal_corruption(format!(
                                    "Refblock offset {} unaligned (reftable index: {})",
                                    qcow2_format::display::CHex(rb_offset),
                                    qcow2_format::display::CHex(rb)
                                ));
                                EIO
                            } else {
                                code
                            };
                            self.push(Finding::CantGetRefcount {
                                cluster: c,
                                error: errno_text(errno),
                            });
                            res.check_errors += 1;
                            self.overrides.push((c, Err(errno)));
                        }
                        continue;
                    }
                };
                let mut fixed_clusters: Vec<u64> = Vec::new();
                let order16 = codec.order() == 4;
                for c in start..end {
                    let r1 = match &block {
                        Some(b) if order16 => {
                            let i = ((c - start) * 2) as usize;
                            b.get(i..i + 2)
                                .map_or(0, |w| u64::from(u16::from_be_bytes([w[0], w[1]])))
                        }
                        Some(b) => codec.get(b, c - start).unwrap_or(0),
                        None => 0,
                    };
                    let r2 = self.imrt.get(c);
                    if r1 > 0 || r2 > 0 {
                        highest = c;
                    }
                    if r1 == r2 {
                        continue;
                    }
                    let mut fixing = false;
                    if r1 == 0 {
                        self.rebuild = true;
                    } else if (r1 > r2 && fix.leaks) || (r1 < r2 && fix.errors) {
                        fixing = true;
                    }
                    let kind = if fixing {
                        MismatchKind::Repairing
                    } else if r1 < r2 {
                        MismatchKind::Error
                    } else {
                        MismatchKind::Leaked
                    };
                    self.push(Finding::RefcountMismatch {
                        kind,
                        cluster: c,
                        refcount: r1,
                        reference: r2,
                    });
                    if fixing {
                        if let Some(b) = block.as_mut() {
                            if codec.set(b, c - start, r2).is_ok() {
                                if r1 > r2 {
                                    res.leaks_fixed += 1;
                                } else {
                                    res.corruptions_fixed += 1;
                                }
                                fixed_clusters.push(c);
                                if r2 == 0 {
                                    freed.push(c);
                                }
                                continue;
                            }
                        }
                    }
                    if r1 < r2 {
                        res.corruptions += 1;
                    } else {
                        res.leaks += 1;
                    }
                    self.overrides.push((c, Ok(r1)));
                }
                if !fixed_clusters.is_empty() {
                    if let Some(b) = block {
                        // Later lookups in this batch must see the new counts.
                        if let Ok(t) = batch.get_mut(rb_offset) {
                            t.copy_from_slice(&b);
                        }
                        self.s.pending.insert(rb_offset, b);
                        wrote_any = true;
                    }
                }
            }
            self.tick(b1 - b0);
            b0 = b1;
            self.spare = batch.into_buffer();
        }
        if wrote_any {
            // QEMU_DISCARD_ALWAYS: clusters whose refcount dropped to 0 are discarded, in
            // runs of adjacent clusters.
            let mut i = 0;
            while i < freed.len() {
                let mut j = i + 1;
                while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                    j += 1;
                }
                let start = freed[i] * cs;
                let len = (j - i) as u64 * cs;
                let _ = self.img.storage.discard(start, len);
                i = j;
            }
        }
        highest
    }

    fn reftable_entry(&self, index: u64) -> u64 {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.img.reftable.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// The on-disk refcount of `cluster` as QEMU's `qcow2_get_refcount` would read it after
    /// the last comparison (and its repairs).
    fn disk_refcount(&mut self, cluster: u64, cache: &mut RefblockCache) -> Result<u64, i32> {
        if cluster < self.imrt.len() {
            if self.overrides.is_empty() {
                return Ok(self.imrt.get(cluster));
            }
            return match self.overrides.binary_search_by_key(&cluster, |o| o.0) {
                Ok(i) => self.overrides[i].1,
                Err(_) => Ok(self.imrt.get(cluster)),
            };
        }
        let rb = cluster >> self.img.geo.refcount_block_bits();
        let raw = self.reftable_entry(rb);
        let off = raw & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        if off & (self.img.cs - 1) != 0 {
            self.s.signal_corruption(format!(
                "Refblock offset {} unaligned (reftable index: {})",
                qcow2_format::display::CHex(off),
                qcow2_format::display::CHex(rb)
            ));
            return Err(EIO);
        }
        if let Some(b) = self.s.pending.get(&off) {
            let idx = cluster & (self.img.geo.refcount_block_entries() - 1);
            return Ok(self.img.codec.get(b, idx).unwrap_or(0));
        }
        let block = cache.get(&*self.img.storage, off, self.img.cs as usize)?;
        let idx = cluster & (self.img.geo.refcount_block_entries() - 1);
        Ok(self.img.codec.get(block, idx).unwrap_or(0))
    }

    /// `check_oflag_copied`.
    fn check_oflag_copied(&mut self, res: &mut Res) -> Result<(), i32> {
        let repair = if self.fix.errors {
            true
        } else if self.fix.leaks {
            res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
        } else {
            false
        };
        let label = Label::from_fix(repair);
        let cs = self.img.cs;
        let ext = self.img.geo.extended_l2();
        let esz: usize = if ext { 16 } else { 8 };
        let n = self.img.l2_entries() as usize;
        let mut cache = RefblockCache::default();
        let l1_len = self.img.l1.len();
        let per_batch = (BATCH_BYTES / cs).max(1) as usize;
        // Owned here so that tables can be borrowed while `self` reports findings.
        let mut kept = self.active_l2.take();
        let mut i0 = 0usize;
        while i0 < l1_len {
            let mut i1 = i0;
            let mut offsets = Vec::new();
            while i1 < l1_len && offsets.len() < per_batch {
                let o = self.img.l1[i1] & L1E_OFFSET_MASK;
                if o != 0 {
                    offsets.push(o);
                }
                i1 += 1;
            }
            // The walk's copies when it kept them all, else a fresh batched read.
            let cached = kept
                .as_ref()
                .is_some_and(|v| offsets.iter().all(|o| v.iter().any(|b| b.contains(*o))));
            let mut fresh = if cached {
                None
            } else {
                let spare = std::mem::take(&mut self.spare);
                Some(TableBatch::load(
                    &*self.img.storage,
                    &offsets,
                    cs as usize,
                    spare,
                ))
            };
            for i in i0..i1 {
                let l1_entry = self.img.l1[i];
                let l2_offset = l1_entry & L1E_OFFSET_MASK;
                if l2_offset == 0 {
                    continue;
                }
                let Ok(refcount) = self.disk_refcount(l2_offset >> self.img.bits, &mut cache)
                else {
                    continue;
                };
                if (refcount == 1) != (l1_entry & OFLAG_COPIED != 0) {
                    res.corruptions += 1;
                    self.push(Finding::CopiedL2Cluster {
                        label,
                        l1_index: i as u64,
                        l1_entry,
                        refcount,
                    });
                    if repair {
                        self.img.l1[i] = if refcount == 1 {
                            l1_entry | OFLAG_COPIED
                        } else {
                            l1_entry & !OFLAG_COPIED
                        };
                        if let Err(e) = self.write_l1_entry(i) {
                            res.check_errors += 1;
                            return Err(e);
                        }
                        res.corruptions -= 1;
                        res.corruptions_fixed += 1;
                    }
                }
                let got = match fresh.as_mut() {
                    Some(b) => b.get_mut(l2_offset),
                    None => kept
                        .as_mut()
                        .and_then(|v| v.iter_mut().find(|b| b.contains(l2_offset)))
                        .map_or(Err(EIO), |b| b.get_mut(l2_offset)),
                };
                // Repairs patch this copy in place, so later references see them.
                let table = match got {
                    Ok(t) => t,
                    Err(e) => {
                        self.push(Finding::CopiedL2ReadFailed {
                            error: errno_text(e),
                        });
                        res.check_errors += 1;
                        return Err(e);
                    }
                };
                let mut dirty = 0i64;
                for j in 0..n {
                    let entry = be64_at(table, j * esz);
                    if entry & OFLAG_COMPRESSED != 0 {
                        continue;
                    }
                    let data_offset = entry & L2E_OFFSET_MASK;
                    let zero_flag = !ext && entry & OFLAG_ZERO != 0;
                    let allocated = if zero_flag {
                        data_offset != 0
                    } else {
                        data_offset != 0 || (self.img.has_data_file && entry & OFLAG_COPIED != 0)
                    };
                    if !allocated {
                        continue;
                    }
                    let refcount = if self.img.has_data_file {
                        1
                    } else {
                        match self.disk_refcount(data_offset >> self.img.bits, &mut cache) {
                            Ok(r) => r,
                            Err(_) => continue,
                        }
                    };
                    if (refcount == 1) != (entry & OFLAG_COPIED != 0) {
                        res.corruptions += 1;
                        self.push(Finding::CopiedDataCluster {
                            label,
                            l2_entry: entry,
                            refcount,
                        });
                        if repair {
                            let new = if refcount == 1 {
                                entry | OFLAG_COPIED
                            } else {
                                entry & !OFLAG_COPIED
                            };
                            put_be64(table, j * esz, new);
                            dirty += 1;
                        }
                    }
                }
                if dirty > 0 {
                    if let Some(ol) = self.img.overlap(&[Ol::ActiveL2], l2_offset, cs) {
                        self.s.signal_corruption(format!(
                            "Preventing invalid write on metadata (overlaps with {})",
                            ol.name()
                        ));
                        self.push(Finding::CopiedL2WriteOverlap {
                            error: errno_text(EIO),
                        });
                        res.check_errors += 1;
                        return Err(EIO);
                    }
                    if let Err(e) = pwrite(&*self.img.storage, table, l2_offset) {
                        self.push(Finding::CopiedL2WriteFailed {
                            error: strerror(&e),
                        });
                        res.check_errors += 1;
                        return Err(errno_of(&e));
                    }
                    res.corruptions -= dirty;
                    res.corruptions_fixed += dirty;
                }
            }
            i0 = i1;
            if let Some(b) = fresh {
                self.spare = b.into_buffer();
            }
        }
        // Only a repair wrote anything; a read-only check issues no barrier.
        if self.s.writable {
            let _ = self.img.storage.flush();
        }
        Ok(())
    }

    /// `qcow2_write_l1_entry`: writes the 512-byte chunk of the in-memory L1 table holding
    /// entry `index` (zero-padded past the table's end), after an overlap check.
    fn write_l1_entry(&mut self, index: usize) -> Result<(), i32> {
        let bufsize = 512usize.min(self.img.cs as usize);
        let per = bufsize / 8;
        let start = index / per * per;
        let mut buf = vec![0u8; bufsize];
        for k in 0..per {
            if let Some(&e) = self.img.l1.get(start + k) {
                put_be64(&mut buf, k * 8, e);
            }
        }
        let off = self.img.header.l1_table_offset + (start as u64) * 8;
        if let Some(ol) = self.img.overlap(&[Ol::ActiveL1], off, bufsize as u64) {
            self.s.signal_corruption(format!(
                "Preventing invalid write on metadata (overlaps with {})",
                ol.name()
            ));
            return Err(EIO);
        }
        pwrite_sync(&*self.img.storage, &buf, off).map_err(|e| errno_of(&e))
    }

    // --------------------------------------------------------------------------------
    // Rebuild (rebuild_refcount_structure)
    // --------------------------------------------------------------------------------

    /// `alloc_clusters_imrt`: first fit of `count` free clusters in the IMRT from
    /// `*first_free`, growing the IMRT at the end if needed.
    fn alloc_clusters_imrt(&mut self, count: u64, first_free: &mut u64) -> Result<u64, i32> {
        let mut cluster = *first_free;
        let mut first_gap = true;
        let mut contiguous = 0u64;
        let nb = self.imrt.len();
        while cluster < nb && contiguous < count {
            if self.imrt.get(cluster) == 0 {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else if contiguous > 0 {
                contiguous = 0;
            }
            cluster += 1;
        }
        if contiguous < count {
            let new_len = cluster + count - contiguous;
            if new_len > i32::MAX as u64 || !self.imrt.grow(new_len) {
                return Err(ENOMEM);
            }
        }
        cluster -= contiguous;
        for i in 0..count {
            self.imrt.set(cluster + i, 1);
        }
        Ok(cluster << self.img.bits)
    }

    /// `rebuild_refcounts_write_refblocks`: writes every refcount block covering a
    /// nonzero IMRT entry in `[first, end)`, allocating blocks in the IMRT as needed.
    /// Returns whether the new refcount table had to grow.
    fn rebuild_write_refblocks(
        &mut self,
        first: u64,
        mut end: u64,
        table: &mut Vec<u64>,
    ) -> Result<bool, (String, i32)> {
        let cs = self.img.cs;
        let e = self.img.geo.refcount_block_entries();
        let rb_bits = self.img.geo.refcount_block_bits();
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if self.imrt.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let rb_index = cluster >> rb_bits;
            let rb_start = rb_index << rb_bits;
            let existing = usize::try_from(rb_index)
                .ok()
                .and_then(|i| table.get(i))
                .copied()
                .unwrap_or(0);
            let rb_offset = if existing != 0 {
                existing
            } else {
                if first_free < rb_start {
                    first_free = rb_start;
                }
                let off = self
                    .alloc_clusters_imrt(1, &mut first_free)
                    .map_err(|errno| (with_errno("ERROR allocating refblock", errno), errno))?;
                let ci = off / cs;
                if ci >= end {
                    end = ci + 1;
                }
                if table.len() as u64 <= rb_index {
                    let entries = ((rb_index + 1) * 8).div_ceil(cs) * cs / 8;
                    table.resize(entries as usize, 0);
                    grown = true;
                }
                if let Some(slot) = table.get_mut(rb_index as usize) {
                    *slot = off;
                }
                off
            };
            if let Some(ol) = self.img.overlap(&[], rb_offset, cs) {
                self.s.signal_corruption(format!(
                    "Preventing invalid write on metadata (overlaps with {})",
                    ol.name()
                ));
                return Err((with_errno("ERROR writing refblock", EIO), EIO));
            }
            let mut block = vec![0u8; cs as usize];
            for k in 0..e {
                let v = self.imrt.get(rb_start + k);
                if v != 0 {
                    let _ = self.img.codec.set(&mut block, k, v);
                }
            }
            if let Err(err) = pwrite(&*self.img.storage, &block, rb_offset) {
                let errno = errno_of(&err);
                return Err((with_errno("ERROR writing refblock", errno), errno));
            }
            cluster = rb_start + e;
        }
        Ok(grown)
    }

    /// `rebuild_refcount_structure`: new refcount blocks and table purely from the IMRT,
    /// placed first-fit from cluster 0; the old structures are leaked (freed by the leak
    /// pass that follows).
    fn rebuild_refcount_structure(&mut self, res: &mut Res) -> Result<(), (String, i32)> {
        let cs = self.img.cs;
        let mut table: Vec<u64> = Vec::new();
        let nb = self.imrt.len();
        match self.rebuild_write_refblocks(0, nb, &mut table) {
            Ok(_) => {}
            Err(e) => {
                res.check_errors += 1;
                return Err(e);
            }
        }
        let mut reftable_offset;
        let mut reftable_clusters;
        loop {
            let mut first_free = 0u64;
            let length = table.len() as u64 * 8;
            reftable_clusters = self.img.size_to_clusters(length);
            reftable_offset = match self.alloc_clusters_imrt(reftable_clusters, &mut first_free) {
                Ok(o) => o,
                Err(errno) => {
                    res.check_errors += 1;
                    return Err((with_errno("ERROR allocating reftable", errno), errno));
                }
            };
            let start = reftable_offset / cs;
            match self.rebuild_write_refblocks(start, start + reftable_clusters, &mut table) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    res.check_errors += 1;
                    return Err(e);
                }
            }
        }
        let length = table.len() as u64 * 8;
        if let Some(ol) = self.img.overlap(&[], reftable_offset, length) {
            self.s.signal_corruption(format!(
                "Preventing invalid write on metadata (overlaps with {})",
                ol.name()
            ));
            return Err((with_errno("ERROR writing reftable", EIO), EIO));
        }
        let mut bytes = Vec::with_capacity(length as usize);
        for &e in &table {
            bytes.extend_from_slice(&e.to_be_bytes());
        }
        if let Err(err) = pwrite(&*self.img.storage, &bytes, reftable_offset) {
            let errno = errno_of(&err);
            return Err((with_errno("ERROR writing reftable", errno), errno));
        }
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&reftable_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(reftable_clusters as u32).to_be_bytes());
        if let Err(err) = pwrite_sync(
            &*self.img.storage,
            &hdr,
            crate::image::REFTABLE_POINTER_OFFSET,
        ) {
            let errno = errno_of(&err);
            return Err((with_errno("ERROR setting reftable", errno), errno));
        }
        self.img.reftable = table;
        self.img.reftable_offset = reftable_offset;
        self.img.header.refcount_table_offset = reftable_offset;
        self.img.header.refcount_table_clusters = reftable_clusters as u32;
        self.refresh_file_len()
            .map_err(|e| (with_errno("ERROR setting reftable", e), e))?;
        Ok(())
    }

    // Accessors for the sibling modules (snapshots, bitmaps).

    pub(crate) fn image(&self) -> &Image {
        &self.img
    }

    pub(crate) fn image_mut(&mut self) -> &mut Image {
        &mut self.img
    }

    pub(crate) fn fix(&self) -> Fix {
        self.fix
    }

    pub(crate) fn report(&mut self, f: Finding) {
        self.push(f);
    }

    pub(crate) fn flush_pending(&mut self) -> Result<(), i32> {
        self.s.flush_pending()
    }

    pub(crate) fn signal(&mut self, message: String) {
        self.s.signal_corruption(message);
    }

    pub(crate) fn inc_refcounts(
        &mut self,
        res: &mut Res,
        offset: i64,
        size: i64,
    ) -> Result<(), i32> {
        self.inc(res, offset, size)
    }
}

/// QEMU's `error_setg_errno` text: "message: strerror".
fn with_errno(msg: &str, errno: i32) -> String {
    format!("{msg}: {}", errno_text(errno))
}

/// Refcount blocks read for clusters beyond `nb_clusters` (rare: references past EOF).
#[derive(Default)]
pub(crate) struct RefblockCache {
    blocks: std::collections::HashMap<u64, Result<Vec<u8>, i32>>,
}

impl RefblockCache {
    fn get(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> Result<&[u8], i32> {
        let entry = self.blocks.entry(offset).or_insert_with(|| {
            let mut b = vec![0u8; len];
            pread(storage, &mut b, offset)
                .map(|()| b)
                .map_err(|e| errno_of(&e))
        });
        match entry {
            Ok(b) => Ok(b.as_slice()),
            Err(e) => Err(*e),
        }
    }
}
