//! Bitmaps on disk: loading a bitmap's bits from its table, storing the session as
//! QEMU's `qcow2_store_persistent_dirty_bitmaps` does, and removing a stored bitmap
//! (`qcow2_co_remove_persistent_dirty_bitmap`). Every cluster is allocated and freed
//! through the refcount engine, so refcounts stay exact.

use super::{refused, BitmapDir, DirtyBitmap};
use crate::error::{ImageError, Op, Result};
use crate::Image;
use qcow2_format::bitmap::{
    encode_directory, table_entry_ok, table_size_for, BitmapDirEntry, BME_FLAG_AUTO,
    BME_FLAG_IN_USE, BME_MAX_PHYS_SIZE, BME_MAX_TABLE_SIZE, BME_TABLE_ENTRY_FLAG_ALL_ONES,
    BME_TABLE_ENTRY_OFFSET_MASK, BT_DIRTY_TRACKING_BITMAP,
};
use qcow2_format::extensions::BitmapsExtension;
use qcow2_format::features::AUTOCLEAR_BITMAPS;
use qcow2_format::limits::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE};
use qcow2_io::Storage;
use qcow2_refcount::DiscardType;

impl Image {
    /// Reads a bitmap table (`size` entries at `offset`), every entry checked as QEMU's
    /// `check_table_entry`.
    fn read_bitmap_table(&self, op: Op, e: &BitmapDirEntry) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size();
        // Bounded by check_dir_entry at open: size * cluster_size <= 512 MiB.
        let n = e.bitmap_table_size as usize;
        if u64::from(e.bitmap_table_size) > BME_MAX_TABLE_SIZE {
            return Err(refused(
                op,
                format!("Bitmap '{}' is too big", e.name_lossy()),
            ));
        }
        let mut raw = vec![0u8; n * 8];
        self.storage
            .read_at(&mut raw, e.bitmap_table_offset)
            .map_err(|err| ImageError::io(op, "read bitmap table", e.bitmap_table_offset, err))?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_be_bytes(w)
            })
            .collect();
        if table.iter().any(|&t| !table_entry_ok(t, cs)) {
            return Err(ImageError::Bitmaps {
                op,
                source: qcow2_format::bitmap::BitmapError::Table {
                    name: e.name_lossy(),
                    reason: "Invalid argument".into(),
                },
            });
        }
        Ok(table)
    }

    /// The bits of a consistent stored bitmap (QEMU's `load_bitmap_data`): all-zero
    /// entries are clean, all-ones entries dirty, others name a data cluster.
    pub(crate) fn load_bitmap_bits(&self, op: Op, e: &BitmapDirEntry) -> Result<DirtyBitmap> {
        let cs = self.geo.cluster_size();
        let size = self.bitmap_disk_size();
        let expected = table_size_for(size, e.granularity_bits, cs);
        if expected != u64::from(e.bitmap_table_size) || expected > BME_MAX_TABLE_SIZE {
            return Err(ImageError::Bitmaps {
                op,
                source: qcow2_format::bitmap::BitmapError::TableSize {
                    name: e.name_lossy(),
                    expected,
                    found: e.bitmap_table_size,
                },
            });
        }
        let table = self.read_bitmap_table(op, e)?;
        let mut bits = DirtyBitmap::new(size, e.granularity_bits);
        let mut buf = vec![0u8; cs as usize];
        for (i, &t) in table.iter().enumerate() {
            let off = t & BME_TABLE_ENTRY_OFFSET_MASK;
            if off != 0 {
                self.storage
                    .read_at(&mut buf, off)
                    .map_err(|err| ImageError::io(op, "read bitmap data", off, err))?;
                bits.deserialize_cluster(i as u64, cs, Some(&buf));
            } else if t & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 {
                bits.deserialize_cluster(i as u64, cs, None);
            }
        }
        Ok(bits)
    }

    fn bitmap_alloc(&mut self, op: Op, bytes: u64) -> Result<u64> {
        let clusters = self.geo.size_to_clusters(bytes).max(1);
        let off = match self.engine.alloc_clusters(&mut self.caches, clusters) {
            Ok(o) => o,
            Err(e) => return Err(self.rc_err(op, e)),
        };
        self.sync_overlap_refcounts();
        Ok(off)
    }

    fn bitmap_free(&mut self, op: Op, offset: u64, bytes: u64, discard: DiscardType) -> Result<()> {
        if let Err(e) = self
            .engine
            .free_clusters(&mut self.caches, offset, bytes, discard)
        {
            return Err(self.rc_err(op, e));
        }
        Ok(())
    }

    /// A write of new bitmap metadata, overlap-checked against every live structure.
    fn bitmap_write(&mut self, op: Op, what: &'static str, buf: &[u8], offset: u64) -> Result<()> {
        if let Err(e) = self.overlap.check(offset, buf.len() as u64, 0) {
            return Err(self.corruption(op, true, e.to_string()));
        }
        self.metadata_write(op, what, buf, offset)
    }

    /// Frees a stored bitmap's data clusters (discarded, as QEMU's `DISCARD_ALWAYS`)
    /// and then its table (QEMU's `free_bitmap_clusters`).
    fn free_bitmap_clusters(&mut self, op: Op, e: &BitmapDirEntry) -> Result<()> {
        let cs = self.geo.cluster_size();
        let table = self.read_bitmap_table(op, e)?;
        for t in table {
            let off = t & BME_TABLE_ENTRY_OFFSET_MASK;
            if off != 0 {
                self.bitmap_free(op, off, cs, DiscardType::Always)?;
            }
        }
        self.bitmap_free(
            op,
            e.bitmap_table_offset,
            u64::from(e.bitmap_table_size) * 8,
            DiscardType::Other,
        )
    }

    /// Writes `entries` as a new directory and switches the header to it (QEMU's
    /// `update_ext_header_and_dir`): directory written, caches and storage flushed, then
    /// the header rewritten (autoclear bit set; cleared and the extension dropped when no
    /// bitmap is left), then the old directory freed.
    fn switch_bitmap_directory(&mut self, op: Op, entries: Vec<BitmapDirEntry>) -> Result<()> {
        let cs = self.geo.cluster_size();
        let size = self.bitmap_disk_size();
        let old = self
            .bitmap_dir
            .as_ref()
            .map(|d| (d.offset, encode_directory(&d.entries).len() as u64));
        let new = if entries.is_empty() {
            None
        } else {
            if entries.len() as u64 > MAX_BITMAPS
                || entries.iter().any(|e| !e.satisfies_constraints(cs, size))
            {
                return Err(refused(op, "Failed to update bitmap extension".into()));
            }
            let bytes = encode_directory(&entries);
            if bytes.len() as u64 > MAX_BITMAP_DIRECTORY_SIZE {
                return Err(refused(op, "Bitmap directory is too large".into()));
            }
            let off = self.bitmap_alloc(op, bytes.len() as u64)?;
            self.bitmap_write(op, "write bitmap directory", &bytes, off)?;
            self.flush_caches(op, true)?;
            Some((off, bytes.len() as u64))
        };
        let mut fc_bitmaps = None;
        match new {
            Some((off, len)) => {
                self.fc.header.autoclear_features |= AUTOCLEAR_BITMAPS;
                fc_bitmaps = Some(BitmapsExtension {
                    nb_bitmaps: entries.len() as u32,
                    reserved: 0,
                    directory_size: len,
                    directory_offset: off,
                });
            }
            None => self.fc.header.autoclear_features &= !AUTOCLEAR_BITMAPS,
        }
        self.fc.extensions.bitmaps = fc_bitmaps;
        self.rewrite_header(op)?;
        self.overlap.with(|s| s.bitmap_dir = new);
        self.bitmap_dir = new.map(|(offset, _)| BitmapDir { offset, entries });
        if let Some((off, len)) = old {
            self.bitmap_free(op, off, len, DiscardType::Other)?;
        }
        Ok(())
    }

    /// Removes a bitmap from the disk if it is stored there (a no-op otherwise).
    pub(super) fn remove_stored_bitmap(&mut self, op: Op, name: &[u8]) -> Result<()> {
        let Some(dir) = &self.bitmap_dir else {
            return Ok(());
        };
        let Some(i) = dir.entries.iter().position(|e| e.name == name) else {
            return Ok(());
        };
        let mut entries = dir.entries.clone();
        let gone = entries.remove(i);
        self.switch_bitmap_directory(op, entries)?;
        self.free_bitmap_clusters(op, &gone)
    }

    /// Writes one bitmap's data clusters (only those with a dirty bit) and its table;
    /// returns the table's offset and size (QEMU's `store_bitmap`).
    fn store_bitmap_data(&mut self, op: Op, bits: &DirtyBitmap) -> Result<(u64, u32)> {
        let cs = self.geo.cluster_size();
        let n = table_size_for(bits.size(), bits.granularity_bits(), cs);
        if n > BME_MAX_TABLE_SIZE || n.saturating_mul(cs) > BME_MAX_PHYS_SIZE {
            return Err(refused(op, "Bitmap is too big".into()));
        }
        let mut table = vec![0u64; n as usize];
        for (i, slot) in table.iter_mut().enumerate() {
            if !bits.cluster_dirty(i as u64, cs) {
                continue;
            }
            let off = self.bitmap_alloc(op, cs)?;
            *slot = off;
            let data = bits.serialize_cluster(i as u64, cs);
            self.bitmap_write(op, "write bitmap data", &data, off)?;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|t| t.to_be_bytes()).collect();
        let off = self.bitmap_alloc(op, bytes.len() as u64)?;
        self.bitmap_write(op, "write bitmap table", &bytes, off)?;
        Ok((off, n as u32))
    }

    /// Stores the bitmaps of the session (see the module documentation); the session
    /// ends. A no-op without a session. Called at close and before the engine's reopen.
    pub fn store_bitmaps(&mut self) -> Result<()> {
        let op = Op::Bitmap;
        let Some(session) = self.bitmap_session.take() else {
            return Ok(());
        };
        // What was read for block-status queries may be older than what is stored now.
        self.bitmap_cache = None;
        self.check_writable(op)?;
        let mut entries: Vec<BitmapDirEntry> = self
            .bitmap_dir
            .as_ref()
            .map(|d| d.entries.clone())
            .unwrap_or_default();
        // Which entry stores which bitmap, and the tables the store replaces.
        let mut stores: Vec<(usize, usize)> = Vec::new();
        let mut drop_tables = Vec::new();
        let mut dir_size = encode_directory(&entries).len() as u64;
        for (mi, b) in session.list.iter().enumerate() {
            if b.bits.is_none() {
                continue;
            }
            let name = String::from_utf8_lossy(&b.name).into_owned();
            if let Err(reason) = self.check_bitmap_constraints(&name, b.granularity_bits) {
                return Err(refused(
                    op,
                    format!("Bitmap '{name}' doesn't satisfy the constraints: {reason}"),
                ));
            }
            let ei = match entries.iter().position(|e| e.name == b.name) {
                Some(ei) => {
                    let e = &mut entries[ei];
                    if !e.in_use() {
                        return Err(refused(
                            op,
                            format!("Bitmap '{name}' already exists in the image"),
                        ));
                    }
                    drop_tables.push(e.clone());
                    ei
                }
                None => {
                    if entries.len() as u64 + 1 > MAX_BITMAPS {
                        return Err(refused(op, "Too many persistent bitmaps".into()));
                    }
                    dir_size += super::dir_entry_size(b.name.len());
                    if dir_size > MAX_BITMAP_DIRECTORY_SIZE {
                        return Err(refused(op, "Bitmap directory is too large".into()));
                    }
                    entries.push(BitmapDirEntry {
                        bitmap_table_offset: 0,
                        bitmap_table_size: 0,
                        flags: 0,
                        bitmap_type: BT_DIRTY_TRACKING_BITMAP,
                        granularity_bits: b.granularity_bits,
                        extra_data: Vec::new(),
                        name: b.name.clone(),
                    });
                    entries.len() - 1
                }
            };
            let e = &mut entries[ei];
            e.flags = if b.enabled { BME_FLAG_AUTO } else { 0 };
            e.granularity_bits = b.granularity_bits;
            stores.push((ei, mi));
        }
        if stores.is_empty() {
            return Ok(());
        }
        // Clusters freed earlier in this open (a removed bitmap) are reusable once their
        // unreference is durable; QEMU reuses them at once.
        self.flush_caches(op, true)?;
        self.engine.release_quarantine(&mut self.caches);
        // Allocate in directory order, as QEMU's store does.
        stores.sort_unstable();
        for (ei, mi) in stores {
            let Some(bits) = &session.list[mi].bits else {
                continue;
            };
            let (off, n) = self.store_bitmap_data(op, bits)?;
            entries[ei].bitmap_table_offset = off;
            entries[ei].bitmap_table_size = n;
            debug_assert!(entries[ei].flags & BME_FLAG_IN_USE == 0);
        }
        self.switch_bitmap_directory(op, entries)?;
        for e in drop_tables {
            self.free_bitmap_clusters(op, &e)?;
        }
        Ok(())
    }
}
