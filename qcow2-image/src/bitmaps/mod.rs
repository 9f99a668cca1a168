//! Persistent dirty bitmaps (the bitmaps extension, `docs/interop/qcow2.txt`), maintained
//! as QEMU maintains them (`block/qcow2-bitmap.c`).
//!
//! **Lifecycle.** Every open validates the directory with QEMU's loader rules. A writable
//! open starts a *bitmap session* before the first change that concerns bitmaps (a guest
//! write, zero write, discard or compressed write, a resize, or a bitmap operation): the
//! bitmaps that are consistent on disk are loaded into memory and marked IN_USE on disk,
//! durably, before the change; IN_USE ones stay in the list as *inconsistent* (QEMU
//! refuses to use them; they can be removed). During the session the enabled bitmaps get
//! a bit set for every changed granule. At close (and before the engine's own reopen) the
//! session is stored as QEMU's `qcow2_store_persistent_dirty_bitmaps` stores it: new data
//! clusters and tables for every consistent bitmap, a new directory, a header rewrite
//! pointing at it, then the old directory and tables freed. A read-only open never
//! starts a session and never writes.
//!
//! **Crash safety.** On disk a bitmap is either consistent and complete, or IN_USE:
//! - the IN_USE marks are one in-place directory write (only flags change; each entry's
//!   flags lie in one sector, so a torn write leaves each entry old or new, both valid and
//!   consistent with the disk, since nothing changed yet), flushed before the change;
//! - the store writes the new data, tables and directory, makes them and their refcounts
//!   durable, and only then switches the header to the new directory (one sector write):
//!   before the switch the old directory says IN_USE, after it the new one holds every
//!   change made during the session. Old clusters are freed afterwards (a crash leaks them).
//!
//! Differences from QEMU kept on purpose: QEMU marks the bitmaps IN_USE at every writable
//! open (with three header rewrites around the in-place directory write, clearing and
//! setting the autoclear bit); we mark them at the first change, so an open that changes
//! nothing leaves the file untouched, and we keep the single in-place write (see above).

mod dirty;
mod store;

pub use dirty::{DirtyBitmap, DirtyRanges};

use crate::error::{ImageError, Op, Result};
use crate::overlap::bits;
use crate::Image;
use qcow2_format::bitmap::{
    encode_directory, load_bitmaps, BitmapDirEntry, BME_FLAG_IN_USE, BME_MAX_GRANULARITY_BITS,
    BME_MAX_NAME_SIZE, BME_MAX_PHYS_SIZE, BME_MAX_TABLE_SIZE, BME_MIN_GRANULARITY_BITS,
    DIR_ENTRY_FIXED_SIZE,
};
use qcow2_format::features::AUTOCLEAR_BITMAPS;
use qcow2_format::limits::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE};
use qcow2_io::errno::EINVAL;
use qcow2_io::Storage;

/// The bitmap directory as it is on disk (valid extension with at least one bitmap).
#[derive(Debug, Clone)]
pub(crate) struct BitmapDir {
    offset: u64,
    entries: Vec<BitmapDirEntry>,
}

/// One bitmap of a session (QEMU's in-memory `BdrvDirtyBitmap` of a persistent bitmap).
#[derive(Debug, Clone)]
pub(crate) struct MemBitmap {
    name: Vec<u8>,
    granularity_bits: u8,
    /// The bits; `None` for a bitmap that was IN_USE on disk when the session started
    /// (inconsistent: never used, never stored, removable).
    bits: Option<DirtyBitmap>,
    enabled: bool,
}

/// The bitmaps of a writable open once something concerned them, in QEMU's list order
/// (newest first: QEMU inserts at the head, so loaded bitmaps come in reverse directory
/// order and added ones before them). This order decides where a store allocates.
#[derive(Debug, Clone, Default)]
pub(crate) struct Session {
    list: Vec<MemBitmap>,
}

impl Session {
    fn find(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|b| b.name == name.as_bytes())
    }
}

/// One persistent bitmap as `qemu-img info` lists it (for a session: its state in memory).
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

/// How [`Image::bitmap_add`] makes a bitmap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BitmapAddOptions {
    /// Bytes per bit (a power of two, 512 ..= 2 GiB); `None`: QEMU's default, the
    /// cluster size clamped to 4 KiB ..= 64 KiB.
    pub granularity: Option<u64>,
    /// Make it disabled (not tracking writes) rather than enabled.
    pub disabled: bool,
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

/// A refusal of a bitmap operation with QEMU's message.
pub(crate) fn refused(op: Op, message: String) -> ImageError {
    ImageError::Refused {
        op,
        message,
        hint: None,
        errno: EINVAL,
    }
}

fn not_found(op: Op, name: &str) -> ImageError {
    refused(op, format!("Dirty bitmap '{name}' not found"))
}

/// QEMU's `bdrv_dirty_bitmap_check` failure for an inconsistent bitmap.
fn inconsistent(op: Op, name: &str) -> ImageError {
    ImageError::Refused {
        op,
        message: format!("Bitmap '{name}' is inconsistent and cannot be used"),
        hint: Some("Try block-dirty-bitmap-remove to delete this bitmap from disk".into()),
        errno: EINVAL,
    }
}

/// Directory bytes one entry with a name of `name_len` bytes takes.
fn dir_entry_size(name_len: usize) -> u64 {
    ((DIR_ENTRY_FIXED_SIZE + name_len) as u64).div_ceil(8) * 8
}

impl Image {
    /// The disk size bitmaps cover (QEMU's `bdrv_getlength`, whole sectors).
    pub(crate) fn bitmap_disk_size(&self) -> u64 {
        self.virtual_size() & !511
    }

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
            self.bitmap_disk_size(),
            &mut read,
        )
        .map_err(|source| ImageError::Bitmaps { op, source })?;
        Ok(Some(BitmapDir {
            offset: ext.directory_offset,
            entries,
        }))
    }

    /// The persistent bitmaps: in a writable open that changed something, their state in
    /// memory (directory order, then the added ones; IN_USE means inconsistent); otherwise
    /// the directory as on disk. Empty when the image has none or the extension is not
    /// valid.
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        let on_disk = self
            .bitmap_dir
            .as_ref()
            .map(|d| d.entries.as_slice())
            .unwrap_or_default();
        let Some(s) = &self.bitmap_session else {
            return Ok(on_disk
                .iter()
                .map(|e| BitmapInfo {
                    name: e.name_lossy(),
                    granularity: e.granularity(),
                    in_use: e.in_use(),
                    auto: e.auto(),
                })
                .collect());
        };
        // Directory order for the stored ones, then the new ones oldest first.
        let mut order: Vec<&MemBitmap> = Vec::new();
        for e in on_disk {
            if let Some(b) = s.list.iter().find(|b| b.name == e.name) {
                order.push(b);
            }
        }
        for b in s.list.iter().rev() {
            if !on_disk.iter().any(|e| e.name == b.name) {
                order.push(b);
            }
        }
        Ok(order
            .into_iter()
            .map(|b| BitmapInfo {
                name: String::from_utf8_lossy(&b.name).into_owned(),
                granularity: 1u64 << b.granularity_bits,
                in_use: b.bits.is_none(),
                auto: b.enabled,
            })
            .collect())
    }

    /// Whether the image has persistent bitmaps QEMU would load (a valid extension with
    /// at least one bitmap, IN_USE ones included, or bitmaps added in this open): QEMU
    /// refuses snapshot reverts then.
    pub(crate) fn has_persistent_bitmaps(&self) -> bool {
        self.bitmap_dir
            .as_ref()
            .is_some_and(|d| !d.entries.is_empty())
            || self
                .bitmap_session
                .as_ref()
                .is_some_and(|s| !s.list.is_empty())
    }

    /// QEMU's default granularity for a new bitmap: the cluster size clamped to
    /// 4 KiB ..= 64 KiB (`bdrv_get_default_bitmap_granularity`).
    pub fn default_bitmap_granularity(&self) -> u64 {
        self.geo.cluster_size().clamp(4096, 65536)
    }

    /// Starts the bitmap session if it has not started (see the module documentation):
    /// loads the consistent bitmaps and marks them IN_USE on disk, durably.
    pub(crate) fn bitmap_session(&mut self, op: Op) -> Result<&mut Session> {
        if self.bitmap_session.is_none() {
            self.check_writable(op)?;
            let mut list = Vec::new();
            let entries = self
                .bitmap_dir
                .as_ref()
                .map(|d| d.entries.clone())
                .unwrap_or_default();
            for e in &entries {
                let bits = if e.in_use() {
                    None
                } else {
                    Some(self.load_bitmap_bits(op, e)?)
                };
                list.insert(
                    0,
                    MemBitmap {
                        name: e.name.clone(),
                        granularity_bits: e.granularity_bits,
                        bits,
                        enabled: e.auto(),
                    },
                );
            }
            self.mark_bitmaps_in_use(op)?;
            self.bitmap_session = Some(Session { list });
        }
        // Just set when it was missing.
        self.bitmap_session
            .as_mut()
            .ok_or_else(|| refused(op, "bitmap session not started".into()))
    }

    /// Starts the bitmap session now, as QEMU's writable open does: the consistent bitmaps
    /// are loaded and marked IN_USE on disk (and stored at close, consistent again). A
    /// no-op without bitmaps or when the session already runs. Tools that mirror a QEMU
    /// command (`qcow2 bitmap`) call it right after the open, so that even a failing
    /// operation leaves the file as QEMU leaves it.
    pub fn begin_bitmap_session(&mut self) -> Result<()> {
        if self.bitmap_dir.is_some() {
            self.bitmap_session(Op::Bitmap)?;
        }
        Ok(())
    }

    /// Marks every bitmap that is consistent on disk IN_USE, in place, durably.
    fn mark_bitmaps_in_use(&mut self, op: Op) -> Result<()> {
        let Some(dir) = &self.bitmap_dir else {
            return Ok(());
        };
        if dir.entries.iter().all(BitmapDirEntry::in_use) {
            return Ok(());
        }
        let mut entries = dir.entries.clone();
        for e in &mut entries {
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

    /// Before a guest change of `[offset, offset + len)`: starts the bitmap session (the
    /// bitmaps are IN_USE on disk before the change) and sets the range's granules in
    /// every enabled bitmap. No work when the image has no bitmaps.
    pub(crate) fn track_change(&mut self, op: Op, offset: u64, len: u64) -> Result<()> {
        if self.bitmap_dir.is_none() && self.bitmap_session.is_none() {
            return Ok(());
        }
        let s = self.bitmap_session(op)?;
        for b in s.list.iter_mut().filter(|b| b.enabled) {
            if let Some(bits) = &mut b.bits {
                bits.set_range(offset, len);
            }
        }
        Ok(())
    }

    /// Before a size change: QEMU refuses it while a bitmap is inconsistent
    /// (`qcow2_truncate_bitmaps_check`); otherwise every bitmap follows the new size.
    pub(crate) fn resize_bitmaps(&mut self, op: Op, new_size: u64) -> Result<()> {
        if self.bitmap_dir.is_none() && self.bitmap_session.is_none() {
            return Ok(());
        }
        if let Some(e) = self
            .bitmap_dir
            .as_ref()
            .and_then(|d| d.entries.iter().find(|e| e.in_use()))
        {
            // IN_USE on disk before our session (ours are all loaded and consistent).
            if self.bitmap_session.is_none() {
                return Err(inconsistent(op, &e.name_lossy()));
            }
        }
        let s = self.bitmap_session(op)?;
        if let Some(b) = s.list.iter().find(|b| b.bits.is_none()) {
            return Err(inconsistent(op, &String::from_utf8_lossy(&b.name)));
        }
        for b in &mut s.list {
            if let Some(bits) = &mut b.bits {
                bits.truncate(new_size & !511);
            }
        }
        Ok(())
    }

    /// Creates a persistent bitmap (QEMU's `block-dirty-bitmap-add` with `persistent`),
    /// empty and enabled unless `opts.disabled`. It reaches the disk when the image is
    /// closed (or [`Image::store_bitmaps`]). QEMU's checks and messages: names unique,
    /// non-empty, at most 1023 bytes; granularity a power of two in 512 ..= 2 GiB; at most
    /// 65535 bitmaps; the bitmap and the directory within QEMU's size limits; v3 images only.
    pub fn bitmap_add(&mut self, name: &str, opts: &BitmapAddOptions) -> Result<()> {
        let op = Op::Bitmap;
        self.check_writable(op)?;
        if name.is_empty() {
            return Err(refused(op, "Bitmap name cannot be empty".into()));
        }
        let granularity = opts
            .granularity
            .unwrap_or_else(|| self.default_bitmap_granularity());
        if granularity < 512 || !granularity.is_power_of_two() || granularity > u64::from(u32::MAX)
        {
            return Err(refused(
                op,
                "Granularity must be power of 2 and at least 512".into(),
            ));
        }
        let exists = match &self.bitmap_session {
            Some(s) => s.find(name).is_some(),
            None => self
                .bitmap_dir
                .as_ref()
                .is_some_and(|d| d.entries.iter().any(|e| e.name == name.as_bytes())),
        };
        if exists {
            return Err(refused(op, format!("Bitmap already exists: {name}")));
        }
        let persist = |reason: &str| {
            refused(
                op,
                format!("Can't make bitmap '{name}' persistent in '#block0': {reason}"),
            )
        };
        if self.fc.header.version < 3 {
            return Err(persist("Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        let gbits = granularity.trailing_zeros() as u8;
        if let Err(reason) = self.check_bitmap_constraints(name, gbits) {
            return Err(persist(&reason));
        }
        // Count what QEMU counts: every persistent bitmap in memory (or on disk).
        let (mut count, mut dir_size) = (1u64, dir_entry_size(name.len()));
        match &self.bitmap_session {
            Some(s) => {
                for b in &s.list {
                    count += 1;
                    dir_size += dir_entry_size(b.name.len());
                }
            }
            None => {
                for e in self.bitmap_dir.iter().flat_map(|d| &d.entries) {
                    count += 1;
                    dir_size += dir_entry_size(e.name.len());
                }
            }
        }
        if count > MAX_BITMAPS {
            return Err(persist(
                "Maximum number of persistent bitmaps is already reached",
            ));
        }
        if dir_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(persist("Not enough space in the bitmap directory"));
        }
        let size = self.bitmap_disk_size();
        let s = self.bitmap_session(op)?;
        s.list.insert(
            0,
            MemBitmap {
                name: name.as_bytes().to_vec(),
                granularity_bits: gbits,
                bits: Some(DirtyBitmap::new(size, gbits)),
                enabled: !opts.disabled,
            },
        );
        Ok(())
    }

    /// QEMU's `check_constraints_on_bitmap`: `Err` holds its message.
    pub(crate) fn check_bitmap_constraints(
        &self,
        name: &str,
        gbits: u8,
    ) -> std::result::Result<(), String> {
        if gbits > BME_MAX_GRANULARITY_BITS {
            return Err(format!(
                "Granularity exceeds maximum ({} bytes)",
                1u64 << BME_MAX_GRANULARITY_BITS
            ));
        }
        if gbits < BME_MIN_GRANULARITY_BITS {
            return Err(format!(
                "Granularity is under minimum ({} bytes)",
                1u64 << BME_MIN_GRANULARITY_BITS
            ));
        }
        let bytes = self.bitmap_disk_size().div_ceil(1u64 << gbits).div_ceil(8);
        if bytes > BME_MAX_PHYS_SIZE
            || bytes > BME_MAX_TABLE_SIZE.saturating_mul(self.geo.cluster_size())
        {
            return Err(
                "Too much space will be occupied by the bitmap. Use larger granularity".into(),
            );
        }
        if name.len() > usize::from(BME_MAX_NAME_SIZE) {
            return Err(format!(
                "Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)"
            ));
        }
        Ok(())
    }

    /// Removes a persistent bitmap, from memory and at once from the disk (QEMU's
    /// `block-dirty-bitmap-remove`): a new directory without it, then its clusters freed.
    /// Inconsistent (IN_USE) bitmaps can be removed.
    pub fn bitmap_remove(&mut self, name: &str) -> Result<()> {
        let op = Op::Bitmap;
        self.check_writable(op)?;
        self.bitmap_index(op, name)?;
        let s = self.bitmap_session(op)?;
        if let Some(i) = s.find(name) {
            s.list.remove(i);
        }
        self.remove_stored_bitmap(op, name.as_bytes())
    }

    /// Index of a bitmap in the session (started); QEMU's "not found" otherwise.
    fn bitmap_index(&mut self, op: Op, name: &str) -> Result<usize> {
        let s = self.bitmap_session(op)?;
        s.find(name).ok_or_else(|| not_found(op, name))
    }

    /// A consistent bitmap of the session, for a change (`block-dirty-bitmap-*`).
    fn bitmap_mut(&mut self, op: Op, name: &str) -> Result<&mut MemBitmap> {
        let i = self.bitmap_index(op, name)?;
        let s = self.bitmap_session(op)?;
        let b = &mut s.list[i];
        if b.bits.is_none() {
            return Err(inconsistent(op, name));
        }
        Ok(b)
    }

    /// Clears every bit of a bitmap (`block-dirty-bitmap-clear`).
    pub fn bitmap_clear(&mut self, name: &str) -> Result<()> {
        let op = Op::Bitmap;
        self.check_writable(op)?;
        if let Some(bits) = &mut self.bitmap_mut(op, name)?.bits {
            bits.clear();
        }
        Ok(())
    }

    /// Makes a bitmap track writes (`block-dirty-bitmap-enable`).
    pub fn bitmap_enable(&mut self, name: &str) -> Result<()> {
        let op = Op::Bitmap;
        self.check_writable(op)?;
        self.bitmap_mut(op, name)?.enabled = true;
        Ok(())
    }

    /// Stops a bitmap tracking writes (`block-dirty-bitmap-disable`).
    pub fn bitmap_disable(&mut self, name: &str) -> Result<()> {
        let op = Op::Bitmap;
        self.check_writable(op)?;
        self.bitmap_mut(op, name)?.enabled = false;
        Ok(())
    }

    /// The bits of a bitmap, as a copy: in a session its state in memory, otherwise read
    /// from the disk (read-only opens too). Inconsistent bitmaps are refused as QEMU
    /// refuses to use them.
    pub fn bitmap(&self, name: &str) -> Result<DirtyBitmap> {
        let op = Op::Bitmap;
        if let Some(s) = &self.bitmap_session {
            let i = s.find(name).ok_or_else(|| not_found(op, name))?;
            return s.list[i].bits.clone().ok_or_else(|| inconsistent(op, name));
        }
        let e = self
            .bitmap_dir
            .as_ref()
            .and_then(|d| d.entries.iter().find(|e| e.name == name.as_bytes()))
            .ok_or_else(|| not_found(op, name))?;
        if e.in_use() {
            return Err(inconsistent(op, name));
        }
        let e = e.clone();
        self.load_bitmap_bits(op, &e)
    }

    /// The dirty ranges `(offset, length)` of a bitmap, in guest order (see
    /// [`Image::bitmap`]): what an incremental backup copies.
    pub fn dirty_ranges(&self, name: &str) -> Result<std::vec::IntoIter<(u64, u64)>> {
        let bits = self.bitmap(name)?;
        Ok(bits.ranges().collect::<Vec<_>>().into_iter())
    }

    /// Merges `source` into bitmap `target` (`block-dirty-bitmap-merge`): every granule
    /// of `target` that a dirty range of `source` touches becomes dirty. The bitmaps must
    /// cover the same disk size (QEMU's "Bitmaps are of different sizes ...").
    pub fn bitmap_merge(&mut self, target: &str, source: &DirtyBitmap) -> Result<()> {
        let op = Op::Bitmap;
        self.check_writable(op)?;
        let t = self.bitmap_mut(op, target)?;
        let Some(bits) = &mut t.bits else {
            return Err(inconsistent(op, target));
        };
        if bits.size() != source.size() {
            return Err(refused(
                op,
                format!(
                    "Bitmaps are of different sizes (destination size is {}, source size is \
                     {}) and can't be merged",
                    bits.size(),
                    source.size()
                ),
            ));
        }
        bits.merge_from(source);
        Ok(())
    }

    /// Merges bitmap `source` of this image into `target` (see [`Image::bitmap_merge`]).
    pub fn bitmap_merge_from(&mut self, target: &str, source: &str) -> Result<()> {
        let op = Op::Bitmap;
        self.check_writable(op)?;
        // QEMU looks the target up first, then the source.
        self.bitmap_index(op, target)?;
        let src = self.bitmap(source)?;
        self.bitmap_merge(target, &src)
    }

    /// Dirty (`true`) and clean runs `(length, dirty)` of bitmap `name` from `offset`,
    /// covering `[offset, offset + len)` clipped to the disk: what an NBD export of
    /// `qemu:dirty-bitmap:NAME` reports. In a session the live bitmap answers (writes
    /// through the export show up at once); otherwise the stored bitmap, read once.
    pub fn dirty_bitmap_runs(
        &mut self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, bool)>> {
        let op = Op::Map;
        let cached = self.bitmap_cache.as_ref().is_some_and(|(n, _)| n == name);
        if self.bitmap_session.is_none() && !cached {
            let bits = self.bitmap(name)?;
            self.bitmap_cache = Some((name.to_string(), bits));
        }
        let bits = match &self.bitmap_session {
            Some(s) => {
                let i = s.find(name).ok_or_else(|| not_found(op, name))?;
                s.list[i]
                    .bits
                    .as_ref()
                    .ok_or_else(|| inconsistent(op, name))?
            }
            None => match &self.bitmap_cache {
                Some((_, b)) => b,
                None => return Err(not_found(op, name)),
            },
        };
        let end = offset.saturating_add(len).min(bits.size());
        let mut out = Vec::new();
        let mut pos = offset;
        for (s, l) in bits.ranges_in(offset, end.saturating_sub(offset)) {
            if s > pos {
                out.push((s - pos, false));
            }
            out.push((l, true));
            pos = s + l;
        }
        if end > pos {
            out.push((end - pos, false));
        }
        Ok(out)
    }
}
