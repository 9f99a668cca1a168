//! The snapshot table in memory and the operations on it: create, delete, apply, list.

use crate::error::Error;
use crate::host::{MetadataWrite, SnapshotHost};
use crate::walk::{self, l1_bytes, read_l1, validate_snapshot_l1, Addend, L1Source, Remains};
use qcow2_format::limits::{
    ENTRY_SIZE, MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE, MAX_SNAPSHOT_EXTRA_DATA,
};
use qcow2_format::snapshot::{parse_snapshot_table, SnapshotReadOptions};
use qcow2_format::{Geometry, SnapshotEntry, SnapshotTable};
use qcow2_io::{Storage, StorageExt};
use qcow2_refcount::DiscardType;
use std::time::{SystemTime, UNIX_EPOCH};

/// Header offset of `nb_snapshots` (be32), immediately followed by `snapshots_offset`
/// (be64): the 12 bytes one table switch rewrites.
pub const HEADER_NB_SNAPSHOTS_OFFSET: u64 = 60;

/// First read of the snapshot table at open; grown to what the entries need.
const FIRST_READ: u64 = 64 * 1024;
/// Largest table read: QEMU's 64 MiB limit plus one maximal entry past it (the parser reports
/// "too big" as soon as an entry crosses the limit, so it never needs more).
const MAX_READ: u64 = MAX_SNAPSHOTS_SIZE + 8 + 40 + MAX_SNAPSHOT_EXTRA_DATA + 2 * 65535;

/// What a new snapshot records besides its name; [`NewSnapshot::now`] gives qemu-img's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    /// The name (need not be unique).
    pub name: String,
    /// Creation time, seconds since the epoch (QEMU stores the low 32 bits).
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds (qemu-img: 0).
    pub vm_clock_nsec: u64,
    /// Instruction count (qemu-img: 0; the system emulator without icount: `u64::MAX`).
    pub icount: u64,
}

impl NewSnapshot {
    /// A disk-only snapshot as `qemu-img snapshot -c NAME` makes it: date from the wall
    /// clock, guest clock 0, icount 0 (no VM state).
    pub fn now(name: impl Into<String>) -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            name: name.into(),
            // QEMU assigns the seconds to a uint32_t field: the low 32 bits.
            date_sec: t.as_secs() as u32,
            date_nsec: t.subsec_nanos(),
            vm_clock_nsec: 0,
            icount: 0,
        }
    }
}

/// QEMU's `strtoul(id, NULL, 10)`: optional leading whitespace and sign, decimal digits,
/// saturating at the maximum on overflow, negated modulo 2^64 for '-'; 0 if no digits.
fn strtoul(s: &[u8]) -> u64 {
    let mut i = 0;
    while i < s.len() && matches!(s[i], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    let mut v: u64 = 0;
    let mut overflow = false;
    let start = i;
    while i < s.len() && s[i].is_ascii_digit() {
        match v
            .checked_mul(10)
            .and_then(|x| x.checked_add(u64::from(s[i] - b'0')))
        {
            Some(x) => v = x,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return 0;
    }
    if overflow {
        return u64::MAX;
    }
    if neg {
        v.wrapping_neg()
    } else {
        v
    }
}

/// The snapshot table of an open image: the entries (in table order) and where the table
/// lives on disk.
///
/// Reading follows QEMU's open (`qcow2_read_snapshots`: its limits, v2 and v3 entries,
/// unknown extra data preserved); every change writes a whole new table elsewhere and
/// switches to it with one header write ([`Snapshots::write_table`]).
///
/// The image owns one `Snapshots` next to (not inside) its [`SnapshotHost`] implementation
/// and passes the host to each operation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshots {
    table: SnapshotTable,
    /// Host offset of the table (0 without snapshots).
    offset: u64,
    /// Bytes the table occupies (QEMU's `snapshots_size`: to the unpadded end of the last
    /// entry), what is freed when it is replaced.
    size: u64,
}

impl Snapshots {
    /// An image without snapshots.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the table of `nb_snapshots` entries at `snapshots_offset` (the header fields),
    /// as QEMU's open does: at most 65536 snapshots, 1024 bytes of extra data each, 64 MiB in
    /// total; entries without a recorded `disk_size` get `virtual_size`. The read is bounded
    /// by those limits, never by the header alone.
    pub fn load(
        storage: &dyn Storage,
        geometry: &Geometry,
        nb_snapshots: u32,
        snapshots_offset: u64,
        virtual_size: u64,
    ) -> Result<Self, Error> {
        if nb_snapshots == 0 {
            return Ok(Self::new());
        }
        if u64::from(nb_snapshots) > MAX_SNAPSHOTS {
            return Err(qcow2_format::SnapshotError::TooManySnapshots {
                nb_snapshots: u64::from(nb_snapshots),
            }
            .into());
        }
        if !geometry.is_cluster_aligned(snapshots_offset)
            || snapshots_offset.checked_add(MAX_READ).is_none()
        {
            return Err(Error::TableOffsetInvalid {
                offset: snapshots_offset,
            });
        }
        let opts = SnapshotReadOptions {
            virtual_size,
            repair: false,
        };
        // Each entry is at least 40 bytes; start with what that suggests and grow to what
        // the parser says it needs, up to the limit.
        let mut len = (u64::from(nb_snapshots) * 48).clamp(FIRST_READ, MAX_READ);
        loop {
            let bytes = storage
                .read_vec(snapshots_offset, len as usize)
                .map_err(|e| Error::io("Failed to read the snapshot table", e))?;
            match parse_snapshot_table(&bytes, nb_snapshots, &opts) {
                Ok(read) => {
                    return Ok(Self {
                        table: read.table,
                        offset: snapshots_offset,
                        size: read.size,
                    })
                }
                Err(qcow2_format::SnapshotError::Truncated { needed, .. })
                    if needed > len && len < MAX_READ =>
                {
                    len = needed.max(len.saturating_mul(2)).min(MAX_READ);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The snapshots, in table order (what `qemu-img snapshot -l` lists).
    pub fn entries(&self) -> &[SnapshotEntry] {
        &self.table.entries
    }

    /// The table as a value.
    pub fn table(&self) -> &SnapshotTable {
        &self.table
    }

    /// Number of snapshots (the header's `nb_snapshots`).
    pub fn len(&self) -> usize {
        self.table.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.table.entries.is_empty()
    }

    /// Host offset of the table (the header's `snapshots_offset`; 0 without snapshots).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes the table occupies on disk (for overlap checks: `[offset, offset + size)`).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Index of the first snapshot whose id is `id`.
    pub fn find_by_id(&self, id: &str) -> Option<usize> {
        self.table
            .entries
            .iter()
            .position(|e| e.id == id.as_bytes())
    }

    /// Index of the first snapshot named `name`.
    pub fn find_by_name(&self, name: &str) -> Option<usize> {
        self.table
            .entries
            .iter()
            .position(|e| e.name == name.as_bytes())
    }

    /// QEMU's `find_snapshot_by_id_or_name`: the id first, then the name (apply's lookup, so
    /// `qemu-img snapshot -a 2` applies the snapshot with id 2).
    pub fn find_by_id_or_name(&self, id_or_name: &str) -> Option<usize> {
        self.find_by_id(id_or_name)
            .or_else(|| self.find_by_name(id_or_name))
    }

    /// The id a new snapshot gets: the largest decimal value of the existing ids (as
    /// `strtoul` reads them) plus one.
    pub fn next_id(&self) -> String {
        let max = self
            .table
            .entries
            .iter()
            .map(|e| strtoul(&e.id))
            .max()
            .unwrap_or(0);
        max.wrapping_add(1).to_string()
    }

    /// Writes `table` as the new snapshot table (QEMU's `qcow2_write_snapshots`): allocate
    /// new clusters, write every entry, flush (the new refcounts and the entries are
    /// durable), one synchronous 12-byte header write (`nb_snapshots`, `snapshots_offset`), then free the
    /// old table. An empty table is recorded as offset 0 (as QEMU does). On failure before the
    /// header write the new clusters are freed and nothing changed; if the flush after the
    /// header write fails, neither table is freed ([`Error::TableSwitchUnknown`]).
    pub fn write_table<H: SnapshotHost + ?Sized>(
        &mut self,
        host: &mut H,
        table: SnapshotTable,
    ) -> Result<(), Error> {
        let bytes = table.to_bytes()?;
        let nb = u32::try_from(table.entries.len()).map_err(|_| {
            Error::Table(qcow2_format::SnapshotError::TooManySnapshots {
                nb_snapshots: table.entries.len() as u64,
            })
        })?;
        let len = bytes.len() as u64;
        let geometry = host.geometry();
        let storage = host.parts().caches.storage().clone();
        let new_offset = if len == 0 {
            0
        } else {
            let p = host.parts();
            p.refcounts
                .alloc_clusters(p.caches, geometry.size_to_clusters(len))?
        };
        let free_new = |host: &mut H| {
            if len > 0 {
                free_or_report(host, new_offset, len, DiscardType::Always);
            }
        };
        let staged = (|| -> Result<(), Error> {
            // The new clusters' refcounts and the entries are durable before the header
            // points at them. (QEMU issues a barrier after the allocation and another after
            // the entries; one after both gives the same guarantee.)
            {
                let caches = host.parts().caches;
                caches.write(qcow2_cache::CacheId::L2)?;
                caches.write(qcow2_cache::CacheId::Refblock)?;
            }
            if len > 0 {
                host.check_overlap(new_offset, len, MetadataWrite::NewSnapshotTable)?;
                storage
                    .write_at(&bytes, new_offset)
                    .map_err(|e| Error::io("Failed to write the snapshot table", e))?;
            }
            storage
                .flush()
                .map_err(|e| Error::io("Failed to flush the snapshot table", e))?;
            let mut switch = [0u8; 12];
            switch[..4].copy_from_slice(&nb.to_be_bytes());
            switch[4..].copy_from_slice(&new_offset.to_be_bytes());
            storage
                .write_at(&switch, HEADER_NB_SNAPSHOTS_OFFSET)
                .map_err(|e| Error::io("Failed to update the snapshot table in the header", e))
        })();
        if let Err(e) = staged {
            free_new(host);
            return Err(e);
        }
        if let Err(source) = storage.flush() {
            // The header may or may not point at the new table now: keep both referenced
            // (leaks at most) and let the image poison itself.
            return Err(Error::TableSwitchUnknown { source });
        }
        host.snapshot_table_switched(nb, new_offset);
        let (old_offset, old_size) = (self.offset, self.size);
        self.table = table;
        self.offset = new_offset;
        self.size = len;
        if old_size > 0 {
            // Unreferenced durably by the header write; a failure here only leaks (QEMU
            // prints "qcow2_free_clusters failed" and goes on).
            free_or_report(host, old_offset, old_size, DiscardType::Snapshot);
        }
        Ok(())
    }

    /// `qemu-img snapshot -c NAME`: a new snapshot of the current disk state with qemu-img's
    /// values (see [`NewSnapshot::now`]). Returns its index.
    pub fn create<H: SnapshotHost + ?Sized>(
        &mut self,
        host: &mut H,
        name: &str,
    ) -> Result<usize, Error> {
        self.create_with(host, NewSnapshot::now(name))
    }

    /// Creates a snapshot (QEMU's `qcow2_snapshot_create`), crash-safe in QEMU's order:
    /// allocate the L1 copy and write the active L1 into it; +1 on the whole active tree
    /// with COPIED cleared, all durable (flush) and the active L1 rewritten; only then the
    /// new table that names the copy. Refused at 65536 snapshots ([`Error::TooManySnapshots`])
    /// and with an external data file. If the refcount pass fails (e.g.
    /// [`Error::RefcountOverflow`] with refcount_bits 1 or 2) its changes are undone and the
    /// L1 copy is freed; a failure after it leaks the references at most, as in QEMU.
    pub fn create_with<H: SnapshotHost + ?Sized>(
        &mut self,
        host: &mut H,
        new: NewSnapshot,
    ) -> Result<usize, Error> {
        if host.has_data_file() {
            return Err(Error::DataFile);
        }
        if self.len() as u64 >= MAX_SNAPSHOTS {
            return Err(Error::TooManySnapshots { count: self.len() });
        }
        let geometry = host.geometry();
        let storage = host.parts().caches.storage().clone();
        let active: Vec<u64> = host.parts().active_l1.to_vec();
        let l1_size =
            u32::try_from(active.len()).map_err(|_| Error::L1TooLarge { l1_size: u32::MAX })?;
        let l1_len = active.len() as u64 * ENTRY_SIZE;

        let mut entry = SnapshotEntry::new(
            self.next_id(),
            new.name.into_bytes(),
            0,
            l1_size,
            host.virtual_size(),
        );
        entry.date_sec = new.date_sec;
        entry.date_nsec = new.date_nsec;
        entry.vm_clock_nsec = new.vm_clock_nsec;
        entry.icount = new.icount;
        // The new table must be writable before anything is allocated for it (a too long
        // name or a full table fails here, changing nothing).
        let mut table = self.table.clone();
        table.entries.push(entry);
        table.serialized_size()?;

        if l1_len > 0 {
            let offset = {
                let p = host.parts();
                p.refcounts
                    .alloc_clusters(p.caches, geometry.size_to_clusters(l1_len))?
            };
            let free_copy = |host: &mut H| {
                free_or_report(host, offset, l1_len, DiscardType::Never);
            };
            let written = host
                .check_overlap(offset, l1_len, MetadataWrite::NewSnapshotL1)
                .map_err(Error::from)
                .and_then(|()| {
                    storage
                        .write_at(&l1_bytes(&active), offset)
                        .map_err(|e| Error::io("Failed to write the snapshot L1 table", e))
                });
            if let Err(e) = written {
                free_copy(host);
                return Err(e);
            }
            if let Some(last) = table.entries.last_mut() {
                last.l1_table_offset = offset;
            }
            // +1 on the tree; durable (flushed) before the table names the copy.
            if let Err(f) = walk::walk(host, L1Source::Active, Addend::Increase) {
                let undone = match f.remains {
                    // The flags stripped before the increments come back (best effort: a
                    // missing COPIED flag only costs a COW).
                    Remains::Nothing => {
                        let _ = walk::walk(host, L1Source::Active, Addend::Recompute);
                        true
                    }
                    Remains::All => undo_increase(host, L1Source::Active),
                    Remains::Unknown => false,
                };
                if undone {
                    free_copy(host);
                }
                return Err(f.error);
            }
            // Until the header names the new table nothing references the copy: a failure
            // before that point is undone (QEMU leaks here); after an uncertain header
            // switch, the references leak.
            if let Err(e) = self.write_table(host, table) {
                if !matches!(e, Error::TableSwitchUnknown { .. })
                    && undo_increase(host, L1Source::Active)
                {
                    free_copy(host);
                }
                return Err(e);
            }
        } else {
            self.write_table(host, table)?;
        }
        finish(host)?;
        Ok(self.len() - 1)
    }

    /// `qemu-img snapshot -d NAME`: deletes the first snapshot **named** `name` (qemu-img
    /// does not look ids up for delete). Returns the deleted entry.
    pub fn delete<H: SnapshotHost + ?Sized>(
        &mut self,
        host: &mut H,
        name: &str,
    ) -> Result<SnapshotEntry, Error> {
        let index = self.find_by_name(name).ok_or_else(|| Error::NotFound {
            name: name.to_owned(),
        })?;
        self.delete_at(host, index)
    }

    /// Deletes snapshot `index` (QEMU's `qcow2_snapshot_delete`), crash-safe in QEMU's
    /// order: validate its L1; the new table without it first ("Failed to remove snapshot
    /// from snapshot list"); then -1 on its tree ("Failed to free the cluster and L1
    /// table"); free its L1 copy; then recompute COPIED on the active tree ("Failed to
    /// update snapshot status in disk"). Any failure after the table switch leaks only.
    pub fn delete_at<H: SnapshotHost + ?Sized>(
        &mut self,
        host: &mut H,
        index: usize,
    ) -> Result<SnapshotEntry, Error> {
        let entry = self
            .table
            .entries
            .get(index)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                name: index.to_string(),
            })?;
        let geometry = host.geometry();
        validate_snapshot_l1(&geometry, entry.l1_table_offset, entry.l1_size)?;
        let mut table = self.table.clone();
        table.entries.remove(index);
        self.write_table(host, table)
            .map_err(|e| Error::stage("Failed to remove snapshot from snapshot list", e))?;
        // The snapshot is gone from the table; from here on a failure only leaks.
        walk::walk(
            host,
            L1Source::OnDisk {
                offset: entry.l1_table_offset,
                l1_size: entry.l1_size,
            },
            Addend::Decrease,
        )
        .map_err(|f| Error::stage("Failed to free the cluster and L1 table", f.error))?;
        let l1_len = u64::from(entry.l1_size) * ENTRY_SIZE;
        if l1_len > 0 {
            free_or_report(host, entry.l1_table_offset, l1_len, DiscardType::Snapshot);
        }
        walk::walk(host, L1Source::Active, Addend::Recompute)
            .map_err(|f| Error::stage("Failed to update snapshot status in disk", f.error))?;
        finish(host)?;
        Ok(entry)
    }

    /// `qemu-img snapshot -a ID_OR_NAME`: reverts the disk to the snapshot found by id
    /// first, then by name.
    pub fn apply<H: SnapshotHost + ?Sized>(
        &mut self,
        host: &mut H,
        id_or_name: &str,
    ) -> Result<(), Error> {
        let index = self
            .find_by_id_or_name(id_or_name)
            .ok_or_else(|| Error::NotFound {
                name: id_or_name.to_owned(),
            })?;
        self.apply_at(host, index)
    }

    /// Reverts the disk to snapshot `index` (QEMU's `qcow2_snapshot_goto`): validate its L1;
    /// resize the virtual disk to its `disk_size` if that differs; grow the active L1 to its
    /// L1 size (a smaller snapshot L1 is zero padded); then (a) +1 on the snapshot's tree,
    /// (b) synchronous write of its L1 over the active L1 on disk, (c) -1 on the old active
    /// tree (from the in-memory copy), (d) the new entries into memory (even if (c) failed),
    /// (e) recompute COPIED on the active tree. A crash after (a) or (b) only leaks.
    ///
    /// One deliberate difference from QEMU: the L1 written in (b) carries no COPIED flags
    /// (the snapshot's L1 copy still has those of snapshot time, when its L2 tables were
    /// exclusively owned); (e) sets them exactly. QEMU writes them as they are, so a crash
    /// between (b) and (e) could leave COPIED on a shared L2 table; here it cannot.
    pub fn apply_at<H: SnapshotHost + ?Sized>(
        &mut self,
        host: &mut H,
        index: usize,
    ) -> Result<(), Error> {
        if host.has_data_file() {
            return Err(Error::DataFile);
        }
        let sn = self
            .table
            .entries
            .get(index)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                name: index.to_string(),
            })?;
        let geometry = host.geometry();
        validate_snapshot_l1(&geometry, sn.l1_table_offset, sn.l1_size)?;
        if sn.disk_size != host.virtual_size() {
            host.resize(sn.disk_size).map_err(|source| Error::Host {
                context: "Failed to resize the image to the snapshot's size",
                source,
            })?;
        }
        host.grow_l1(sn.l1_size).map_err(|source| Error::Host {
            context: "Failed to grow the L1 table",
            source,
        })?;
        let storage = host.parts().caches.storage().clone();
        let cur_size = host.parts().active_l1.len();
        let mut new_l1 = read_l1(&*storage, sn.l1_table_offset, sn.l1_size)?;
        if new_l1.len() > cur_size {
            return Err(Error::Host {
                context: "Failed to grow the L1 table",
                source: format!(
                    "the active L1 has {cur_size} entries after growing to {}",
                    sn.l1_size
                )
                .into(),
            });
        }
        new_l1.resize(cur_size, 0);
        for e in &mut new_l1 {
            *e &= !qcow2_format::entry::OFLAG_COPIED;
        }

        // (a); a failure is undone where possible (the active L1 still names the old tree).
        let sn_l1 = L1Source::OnDisk {
            offset: sn.l1_table_offset,
            l1_size: sn.l1_size,
        };
        if let Err(f) = walk::walk(host, sn_l1, Addend::Increase) {
            if f.remains == Remains::All {
                undo_increase(host, sn_l1);
            }
            return Err(f.error);
        }
        // (b)
        let l1_offset = host.l1_table_offset();
        let bytes = l1_bytes(&new_l1);
        host.check_overlap(l1_offset, bytes.len() as u64, MetadataWrite::ActiveL1)?;
        storage
            .write_sync(&bytes, l1_offset)
            .map_err(|e| Error::io("Failed to write the active L1 table", e))?;
        // (c) on the old tree, from memory; (d) whatever happened.
        let old: Vec<u64> = host.parts().active_l1.to_vec();
        let dec = walk::walk(host, L1Source::Entries(&old), Addend::Decrease);
        let active = host.parts().active_l1;
        let n = active.len().min(new_l1.len());
        active[..n].copy_from_slice(&new_l1[..n]);
        dec.map_err(|f| f.error)?;
        // (e)
        walk::walk(host, L1Source::Active, Addend::Recompute).map_err(|f| f.error)?;
        finish(host)
    }
}

/// Takes back a completed +1 pass on `source`
/// whose new references were never published: -1 on the tree, then COPIED recomputed when
/// the tree is the active one. Returns whether everything was undone (else it leaks).
fn undo_increase<H: SnapshotHost + ?Sized>(host: &mut H, source: L1Source<'_>) -> bool {
    if walk::walk(host, source, Addend::Decrease).is_err() {
        return false;
    }
    match source {
        L1Source::Active => walk::walk(host, source, Addend::Recompute).is_ok(),
        _ => true,
    }
}

/// End of an operation: clusters freed during it may be handed out again (invariant 2).
/// Every one of them was unreferenced by a write that is durable already (the header switch
/// for old tables and deleted trees, the synchronous active L1 write for apply's old tree),
/// and every operation flushed both caches after it started, so whatever the image had
/// quarantined before is durable too.
fn finish<H: SnapshotHost + ?Sized>(host: &mut H) -> Result<(), Error> {
    let p = host.parts();
    p.refcounts.release_quarantine(p.caches);
    Ok(())
}

/// Frees clusters where a failure only leaks them, as QEMU's `qcow2_free_clusters` (which
/// prints "qcow2_free_clusters failed: ..." and goes on): the failure goes to
/// [`SnapshotHost::free_failed`].
fn free_or_report<H: SnapshotHost + ?Sized>(
    host: &mut H,
    offset: u64,
    len: u64,
    discard: DiscardType,
) {
    let failed = {
        let p = host.parts();
        p.refcounts
            .free_clusters(p.caches, offset, len, discard)
            .err()
            .map(|e| e.errno())
    };
    if let Some(errno) = failed {
        host.free_failed(errno);
    }
}

#[cfg(test)]
mod tests {
    use super::strtoul;

    #[test]
    fn strtoul_like_c() {
        assert_eq!(strtoul(b"12"), 12);
        assert_eq!(strtoul(b"  7abc"), 7);
        assert_eq!(strtoul(b"abc"), 0);
        assert_eq!(strtoul(b""), 0);
        assert_eq!(strtoul(b"+3"), 3);
        assert_eq!(strtoul(b"-1"), u64::MAX);
        assert_eq!(strtoul(b"99999999999999999999999"), u64::MAX);
    }
}
