//! Persistent dirty bitmaps made by QEMU, on an engine that does not maintain them yet.
//!
//! A bitmap that QEMU reads as consistent must contain every guest range written since it
//! was stored, or an incremental backup taken from it silently misses data. So before the
//! first change that could make a bitmap stale, the bitmap is marked IN_USE on disk, the
//! state QEMU itself leaves after a crash: QEMU then reports it as `in-use`, refuses to use
//! it for a backup, and lets the user remove it (`qemu-img bitmap --remove`). Refcounts of
//! bitmap clusters are untouched, so `qemu-img check` stays clean. ARCHITECTURE.md
//! ("QEMU state a writable open may touch") says why this and not dropping the extension.
//!
//! Which bitmaps a change makes stale:
//! - guest writes, zero writes, discards, compressed writes and reverting to a snapshot:
//!   the enabled (AUTO) bitmaps; a disabled bitmap is a frozen record by definition;
//! - a size change: every bitmap, since a bitmap table sized for the old disk is refused by
//!   QEMU's loader unless the bitmap is IN_USE.
//!
//! Crash safety: the directory is rewritten in place with only flags changed, then flushed,
//! before the change is made. A torn write leaves each sector old or new, and both are
//! valid directories whose bitmaps are all still consistent (nothing was written yet), so
//! QEMU's three-step autoclear dance is not needed here.

use crate::error::{ImageError, Op, Result};
use crate::overlap::bits;
use crate::Image;
use qcow2_format::bitmap::{encode_directory, load_bitmaps, BitmapDirEntry, BME_FLAG_IN_USE};
use qcow2_format::features::AUTOCLEAR_BITMAPS;
use qcow2_io::Storage;

/// The bitmap directory of a writable open, as loaded (and kept current by this module).
#[derive(Debug, Clone)]
pub(crate) struct BitmapDir {
    offset: u64,
    entries: Vec<BitmapDirEntry>,
}

/// Which bitmaps a change makes stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Staleness {
    /// Guest content changed: the enabled bitmaps.
    Content,
    /// The disk size changed: every bitmap.
    Size,
}

/// One persistent bitmap as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest disk one bit covers.
    pub granularity: u64,
    /// IN_USE: possibly inconsistent (a writer had it loaded and did not store it).
    pub in_use: bool,
    /// AUTO: the bitmap tracks every write ("enabled").
    pub auto: bool,
}

/// QEMU's warning (without the program prefix) at every open of an image whose bitmaps
/// extension lost its autoclear bit (`qcow2_read_extensions`): the bitmaps are ignored,
/// and a writable open drops the extension. QEMU prints the second line without a newline.
pub fn stale_extension_warning(version: u32) -> String {
    let first = if version < 3 {
        "warning: This qcow2 v2 image contains bitmaps, but they may have been modified by a \
         program without persistent bitmap support; so now they must all be considered \
         inconsistent"
    } else {
        "warning: a program lacking bitmap support modified this file, so all bitmaps are now \
         considered inconsistent"
    };
    format!(
        "{first}\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
    )
}

impl Image {
    /// Loads the bitmaps as QEMU's open does when the extension is valid (autoclear bit 0
    /// set): the directory with QEMU's rules and, for bitmaps not IN_USE, their tables;
    /// QEMU's messages on failure. `None` without bitmaps.
    pub(crate) fn read_bitmap_directory(&self, op: Op) -> Result<Option<BitmapDir>> {
        let h = &self.fc.header;
        let Some(ext) = self.fc.extensions.bitmaps else {
            return Ok(None);
        };
        if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 || ext.nb_bitmaps == 0 {
            return Ok(None);
        }
        let storage = self.storage.clone();
        let mut read = |offset: u64, buf: &mut [u8]| storage.read_at(buf, offset);
        let entries = load_bitmaps(
            ext.nb_bitmaps,
            ext.directory_offset,
            ext.directory_size,
            self.geo.cluster_size(),
            self.virtual_size() & !511,
            &mut read,
        )
        .map_err(|source| ImageError::Bitmaps { op, source })?;
        Ok(Some(BitmapDir {
            offset: ext.directory_offset,
            entries,
        }))
    }

    /// The persistent bitmaps, in directory order (empty when the image has none or the
    /// extension is not valid), as loaded at open.
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        Ok(self
            .bitmap_dir
            .as_ref()
            .map(|d| d.entries.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|e| BitmapInfo {
                name: e.name_lossy(),
                granularity: e.granularity(),
                in_use: e.in_use(),
                auto: e.auto(),
            })
            .collect())
    }

    /// Whether the image has persistent bitmaps QEMU would load (a valid extension with
    /// at least one bitmap, IN_USE ones included): QEMU refuses snapshot reverts then.
    pub(crate) fn has_persistent_bitmaps(&self) -> bool {
        self.bitmap_dir
            .as_ref()
            .is_some_and(|d| !d.entries.is_empty())
    }

    /// Marks IN_USE, durably, every bitmap that `change` would make stale and that is not
    /// marked yet. Called before the change reaches the image; a no-op once done.
    pub(crate) fn invalidate_bitmaps(&mut self, op: Op, change: Staleness) -> Result<()> {
        let Some(dir) = &self.bitmap_dir else {
            return Ok(());
        };
        let stale = |e: &BitmapDirEntry| !e.in_use() && (change == Staleness::Size || e.auto());
        if !dir.entries.iter().any(stale) {
            return Ok(());
        }
        let mut entries = dir.entries.clone();
        for e in entries.iter_mut().filter(|e| stale(e)) {
            e.flags |= BME_FLAG_IN_USE;
        }
        let offset = dir.offset;
        let bytes = encode_directory(&entries);
        // The directory itself is the only metadata this write may touch.
        if let Err(e) = self
            .overlap
            .check(offset, bytes.len() as u64, bits::BITMAP_DIRECTORY)
        {
            return Err(self.corruption(op, true, e.to_string()));
        }
        self.metadata_write_sync(op, "mark bitmaps in use", &bytes, offset)?;
        self.bitmap_dir = Some(BitmapDir { offset, entries });
        Ok(())
    }
}
