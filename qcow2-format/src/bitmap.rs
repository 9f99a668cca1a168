//! The bitmap directory of the bitmaps extension (`docs/interop/qcow2.txt`, "Bitmaps
//! extension") and the bitmap-table entry codec, with QEMU's load-time constraints
//! (`bitmap_list_load` / `check_dir_entry` / `check_table_entry` in `block/qcow2-bitmap.c`)
//! and their messages.
//!
//! A directory entry is 24 fixed bytes, then `extra_data_size` bytes of extra data, then
//! `name_size` bytes of name, padded with zeros to a multiple of 8.

use thiserror::Error;

/// Flag: the bitmap was in use (loaded by a writer) and may be inconsistent.
pub const BME_FLAG_IN_USE: u32 = 1 << 0;
/// Flag: the bitmap tracks every write to the disk ("enabled").
pub const BME_FLAG_AUTO: u32 = 1 << 1;
/// Flag: the extra data may be ignored by a program that does not understand it.
pub const BME_FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Flags QEMU refuses (every bit but IN_USE and AUTO).
pub const BME_RESERVED_FLAGS: u32 = 0xffff_fffc;
/// The only bitmap type: a dirty-tracking bitmap.
pub const BT_DIRTY_TRACKING_BITMAP: u8 = 1;
/// Largest bitmap table, in entries.
pub const BME_MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Largest bitmap in bytes (QEMU's bound on its in-memory size).
pub const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Largest granularity, as a shift.
pub const BME_MAX_GRANULARITY_BITS: u8 = 31;
/// Smallest granularity, as a shift.
pub const BME_MIN_GRANULARITY_BITS: u8 = 9;
/// Longest bitmap name in bytes.
pub const BME_MAX_NAME_SIZE: u16 = 1023;
/// Reserved bits of a bitmap-table entry: 1..=8 and 56..=63.
pub const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Offset bits of a bitmap-table entry.
pub const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap-table entry bit 0 with offset 0: the cluster's bits all read as one.
pub const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;
/// Size of the fixed part of a directory entry.
pub const DIR_ENTRY_FIXED_SIZE: usize = 24;

/// Why QEMU's open refuses an image's bitmaps (the directory, or a bitmap that claims to
/// be consistent); the texts are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BitmapError {
    /// An entry runs past the end of the directory, or bytes are left after the last one.
    #[error("Broken bitmap directory")]
    Broken,
    /// More entries than the extension's `nb_bitmaps`.
    #[error("More bitmaps found than specified in header extension")]
    TooMany,
    /// Fewer entries than the extension's `nb_bitmaps`.
    #[error("Less bitmaps found than specified in header extension")]
    TooFew,
    /// QEMU 10 does not load bitmaps with extra data.
    #[error("Bitmap extra data is not supported")]
    ExtraData {
        /// Index of the entry.
        index: usize,
    },
    /// An entry breaks `check_dir_entry`'s constraints.
    #[error("Bitmap '{name}' doesn't satisfy the constraints")]
    Constraints {
        /// The bitmap's name (lossily decoded).
        name: String,
    },
    /// Two bitmaps share a name.
    #[error("Bitmap already exists: {name}")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// The directory could not be read.
    #[error("Failed to read bitmap directory: {reason}")]
    ReadDirectory {
        /// The I/O error's text.
        reason: String,
    },
    /// A consistent bitmap's table could not be read, or has an invalid entry.
    #[error("Could not read bitmap_table table from image for bitmap '{name}': {reason}")]
    Table {
        /// The bitmap's name.
        name: String,
        /// The I/O error's text, or "Invalid argument" for a bad entry.
        reason: String,
    },
    /// A consistent bitmap's table does not have the size the disk needs.
    #[error("Could not read bitmap '{name}' from image: Invalid argument")]
    TableSize {
        /// The bitmap's name.
        name: String,
        /// Entries the disk size and granularity need.
        expected: u64,
        /// Entries the directory gives.
        found: u32,
    },
}

/// Bitmap-table entries a bitmap of `granularity_bits` needs for a disk of `virtual_size`
/// bytes: QEMU serializes 64-bit words of bits, one cluster per table entry.
pub fn table_size_for(virtual_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    let bits = virtual_size.div_ceil(1u64 << granularity_bits.min(63));
    let bytes = bits.div_ceil(64) * 8;
    bytes.div_ceil(cluster_size.max(1))
}

/// QEMU's loading of the bitmaps at open (`qcow2_load_dirty_bitmaps`): the directory
/// (`bitmap_list_load`), unique names, and for every bitmap not IN_USE its table (entries
/// valid, size matching the disk). `read(offset, buf)` reads the image file. Bitmap data
/// clusters are not read. Bounded: the directory is at most 64 MiB, a table at most 8 MiB.
pub fn load_bitmaps(
    nb_bitmaps: u32,
    directory_offset: u64,
    directory_size: u64,
    cluster_size: u64,
    virtual_size: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<Vec<BitmapDirEntry>, BitmapError> {
    let io_text = |e: std::io::Error| {
        let s = e.to_string();
        match s.find(" (os error") {
            Some(i) => s[..i].to_string(),
            None => s,
        }
    };
    if directory_size == 0 || directory_size > crate::limits::MAX_BITMAP_DIRECTORY_SIZE {
        return Err(BitmapError::Broken);
    }
    let mut dir = vec![0u8; directory_size as usize];
    read(directory_offset, &mut dir)
        .map_err(|e| BitmapError::ReadDirectory { reason: io_text(e) })?;
    let entries = parse_directory(&dir, nb_bitmaps, cluster_size, virtual_size)?;
    let mut names = std::collections::HashSet::new();
    for e in &entries {
        let name = e.name_lossy();
        if !names.insert(e.name.clone()) {
            return Err(BitmapError::DuplicateName { name });
        }
        if e.in_use() {
            continue;
        }
        // check_dir_entry bounds the table: size * cluster_size <= 512 MiB.
        let mut table = vec![0u8; e.bitmap_table_size as usize * 8];
        read(e.bitmap_table_offset, &mut table).map_err(|err| BitmapError::Table {
            name: name.clone(),
            reason: io_text(err),
        })?;
        let all_ok = table.chunks_exact(8).all(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            table_entry_ok(u64::from_be_bytes(w), cluster_size)
        });
        if !all_ok {
            return Err(BitmapError::Table {
                name,
                reason: "Invalid argument".into(),
            });
        }
        let expected = table_size_for(virtual_size, e.granularity_bits, cluster_size);
        if expected != u64::from(e.bitmap_table_size) {
            return Err(BitmapError::TableSize {
                name,
                expected,
                found: e.bitmap_table_size,
            });
        }
    }
    Ok(entries)
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirEntry {
    /// Offset of the bitmap table (cluster aligned).
    pub bitmap_table_offset: u64,
    /// Number of 8-byte entries in the bitmap table.
    pub bitmap_table_size: u32,
    /// `BME_FLAG_*` bits.
    pub flags: u32,
    /// Bitmap type (1: dirty tracking).
    pub bitmap_type: u8,
    /// Granularity as a shift: one bit covers `1 << granularity_bits` guest bytes.
    pub granularity_bits: u8,
    /// Extra data, kept as stored.
    pub extra_data: Vec<u8>,
    /// Name bytes (UTF-8 by convention, not guaranteed).
    pub name: Vec<u8>,
}

impl BitmapDirEntry {
    /// The name, lossily decoded.
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// Whether the bitmap is marked in use (possibly inconsistent).
    pub fn in_use(&self) -> bool {
        self.flags & BME_FLAG_IN_USE != 0
    }

    /// Whether the bitmap tracks writes ("enabled").
    pub fn auto(&self) -> bool {
        self.flags & BME_FLAG_AUTO != 0
    }

    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }

    /// The entry's size on disk, padding included.
    pub fn encoded_len(&self) -> usize {
        (DIR_ENTRY_FIXED_SIZE + self.extra_data.len() + self.name.len()).div_ceil(8) * 8
    }

    /// QEMU's `check_dir_entry` for a disk of `virtual_size` bytes with `cluster_size`
    /// clusters. A bitmap not in use must have a table large enough for the disk (an
    /// in-use one may be left too small by a resize that could not store it).
    pub fn satisfies_constraints(&self, cluster_size: u64, virtual_size: u64) -> bool {
        let bad = self.bitmap_table_size == 0
            || self.bitmap_table_offset == 0
            || cluster_size == 0
            || self.bitmap_table_offset % cluster_size != 0
            || u64::from(self.bitmap_table_size) > BME_MAX_TABLE_SIZE
            || !(BME_MIN_GRANULARITY_BITS..=BME_MAX_GRANULARITY_BITS)
                .contains(&self.granularity_bits)
            || self.flags & BME_RESERVED_FLAGS != 0
            || self.name.len() > usize::from(BME_MAX_NAME_SIZE)
            || self.bitmap_type != BT_DIRTY_TRACKING_BITMAP;
        if bad {
            return false;
        }
        let Some(phys) = u64::from(self.bitmap_table_size).checked_mul(cluster_size) else {
            return false;
        };
        if phys > BME_MAX_PHYS_SIZE {
            return false;
        }
        // phys <= 512 MiB and granularity_bits <= 31: the shift cannot overflow.
        self.in_use() || virtual_size <= (phys * 8) << self.granularity_bits
    }

    /// Appends the entry's bytes (padded to a multiple of 8) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.bitmap_table_offset.to_be_bytes());
        out.extend_from_slice(&self.bitmap_table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.bitmap_type);
        out.push(self.granularity_bits);
        // Lengths were bounded when parsed or built (name <= 1023 bytes).
        out.extend_from_slice(&(self.name.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        out.extend_from_slice(&(self.extra_data.len().min(u32::MAX as usize) as u32).to_be_bytes());
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(&self.name);
        out.resize(start + self.encoded_len(), 0);
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_be_bytes(v)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}

/// Parses a directory without QEMU's constraints: the entries' framing only. Used where
/// the entries are shown or rewritten as they are (extra data kept).
pub fn parse_directory_raw(
    dir: &[u8],
    nb_bitmaps: u32,
) -> Result<Vec<BitmapDirEntry>, BitmapError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let fixed = dir
            .get(pos..pos + DIR_ENTRY_FIXED_SIZE)
            .ok_or(BitmapError::Broken)?;
        if out.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(BitmapError::TooMany);
        }
        let name_size = usize::from(be16(fixed, 18));
        let extra_size = be32(fixed, 20) as usize;
        let len =
            (DIR_ENTRY_FIXED_SIZE as u64 + name_size as u64 + extra_size as u64).div_ceil(8) * 8;
        let end = (pos as u64)
            .checked_add(len)
            .filter(|&e| e <= dir.len() as u64)
            .ok_or(BitmapError::Broken)? as usize;
        let var = pos + DIR_ENTRY_FIXED_SIZE;
        let extra = dir.get(var..var + extra_size).unwrap_or_default().to_vec();
        let name = dir
            .get(var + extra_size..var + extra_size + name_size)
            .unwrap_or_default()
            .to_vec();
        out.push(BitmapDirEntry {
            bitmap_table_offset: be64(fixed, 0),
            bitmap_table_size: be32(fixed, 8),
            flags: be32(fixed, 12),
            bitmap_type: fixed.get(16).copied().unwrap_or(0),
            granularity_bits: fixed.get(17).copied().unwrap_or(0),
            extra_data: extra,
            name,
        });
        pos = end;
    }
    if (out.len() as u64) < u64::from(nb_bitmaps) {
        return Err(BitmapError::TooFew);
    }
    Ok(out)
}

/// QEMU's `bitmap_list_load`: the directory must hold exactly `nb_bitmaps` entries, none
/// with extra data, each satisfying [`BitmapDirEntry::satisfies_constraints`], and nothing
/// after the last one. Errors come in QEMU's order (entry by entry).
pub fn parse_directory(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    virtual_size: u64,
) -> Result<Vec<BitmapDirEntry>, BitmapError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        // Parse one entry at a time so that errors come in QEMU's order.
        let rest = dir.get(pos..).unwrap_or_default();
        if rest.len() < DIR_ENTRY_FIXED_SIZE {
            return Err(BitmapError::Broken);
        }
        if out.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(BitmapError::TooMany);
        }
        let mut one = parse_directory_raw_prefix(rest)?;
        if !one.extra_data.is_empty() {
            return Err(BitmapError::ExtraData { index: out.len() });
        }
        if !one.satisfies_constraints(cluster_size, virtual_size) {
            return Err(BitmapError::Constraints {
                name: one.name_lossy(),
            });
        }
        pos += one.encoded_len();
        one.extra_data.clear();
        out.push(one);
    }
    if (out.len() as u64) != u64::from(nb_bitmaps) {
        return Err(BitmapError::TooFew);
    }
    Ok(out)
}

/// The first entry of `rest` (at least [`DIR_ENTRY_FIXED_SIZE`] bytes).
fn parse_directory_raw_prefix(rest: &[u8]) -> Result<BitmapDirEntry, BitmapError> {
    let name_size = usize::from(be16(rest, 18));
    let extra_size = be32(rest, 20) as usize;
    let len = (DIR_ENTRY_FIXED_SIZE as u64 + name_size as u64 + extra_size as u64).div_ceil(8) * 8;
    if len > rest.len() as u64 {
        return Err(BitmapError::Broken);
    }
    let len = len as usize;
    let mut v = parse_directory_raw(rest.get(..len).unwrap_or_default(), 1)?;
    v.pop().ok_or(BitmapError::Broken)
}

/// Serializes a directory (every entry padded to a multiple of 8).
pub fn encode_directory(entries: &[BitmapDirEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(BitmapDirEntry::encoded_len).sum());
    for e in entries {
        e.encode_into(&mut out);
    }
    out
}

/// QEMU's `check_table_entry`: reserved bits clear; with an offset, bit 0 clear and the
/// offset cluster aligned.
pub fn table_entry_ok(entry: u64, cluster_size: u64) -> bool {
    if entry & BME_TABLE_ENTRY_RESERVED_MASK != 0 {
        return false;
    }
    let offset = entry & BME_TABLE_ENTRY_OFFSET_MASK;
    if offset != 0
        && (entry & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0
            || cluster_size == 0
            || offset % cluster_size != 0)
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32, gran: u8) -> BitmapDirEntry {
        BitmapDirEntry {
            bitmap_table_offset: 0x10000,
            bitmap_table_size: 1,
            flags,
            bitmap_type: 1,
            granularity_bits: gran,
            extra_data: Vec::new(),
            name: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn round_trip() {
        let v = vec![entry("b0", BME_FLAG_AUTO, 16), entry("longer-name", 0, 17)];
        let bytes = encode_directory(&v);
        assert_eq!(bytes.len(), 32 + 40);
        assert_eq!(parse_directory(&bytes, 2, 65536, 64 << 20).unwrap(), v);
        assert_eq!(parse_directory_raw(&bytes, 2).unwrap(), v);
    }

    #[test]
    fn qemu_errors() {
        let v = vec![entry("b0", BME_FLAG_AUTO, 16)];
        let bytes = encode_directory(&v);
        assert_eq!(
            parse_directory(&bytes, 2, 65536, 1 << 20),
            Err(BitmapError::TooFew)
        );
        let two = encode_directory(&[v[0].clone(), v[0].clone()]);
        assert_eq!(
            parse_directory(&two, 1, 65536, 1 << 20),
            Err(BitmapError::TooMany)
        );
        assert_eq!(
            parse_directory(&bytes[..20], 1, 65536, 1 << 20),
            Err(BitmapError::Broken)
        );
        // One table cluster of 64 KiB covers 2^19 bits of 64 KiB: 32 GiB; not 64 GiB.
        assert!(matches!(
            parse_directory(&bytes, 1, 65536, 64 << 30),
            Err(BitmapError::Constraints { .. })
        ));
        // ... unless the bitmap is in use.
        let in_use = encode_directory(&[entry("b0", BME_FLAG_IN_USE, 16)]);
        assert!(parse_directory(&in_use, 1, 65536, 64 << 30).is_ok());
        let mut extra = entry("x", 0, 16);
        extra.extra_data = vec![1, 2, 3];
        let bytes = encode_directory(&[extra.clone()]);
        assert_eq!(
            parse_directory(&bytes, 1, 65536, 1 << 20),
            Err(BitmapError::ExtraData { index: 0 })
        );
        assert_eq!(parse_directory_raw(&bytes, 1).unwrap(), vec![extra]);
        for bad in [
            BitmapDirEntry {
                bitmap_type: 2,
                ..entry("t", 0, 16)
            },
            BitmapDirEntry {
                granularity_bits: 8,
                ..entry("t", 0, 16)
            },
            BitmapDirEntry {
                flags: 4,
                ..entry("t", 0, 16)
            },
            BitmapDirEntry {
                bitmap_table_offset: 0x10200,
                ..entry("t", 0, 16)
            },
            BitmapDirEntry {
                bitmap_table_size: 0,
                ..entry("t", 0, 16)
            },
        ] {
            let bytes = encode_directory(&[bad]);
            assert_eq!(
                parse_directory(&bytes, 1, 65536, 1 << 20),
                Err(BitmapError::Constraints { name: "t".into() })
            );
        }
    }

    #[test]
    fn loading_checks_tables_of_consistent_bitmaps() {
        // 64 MiB disk, 64 KiB granularity: 1024 bits = 128 bytes: one table entry.
        assert_eq!(table_size_for(64 << 20, 16, 65536), 1);
        // 1 TiB at 512 B granularity: 2^31 bits = 256 MiB of bitmap = 4096 clusters.
        assert_eq!(table_size_for(1 << 40, 9, 65536), 4096);
        let dir = encode_directory(&[entry("b0", BME_FLAG_AUTO, 16)]);
        let image = |table: u64| {
            let mut img = vec![0u8; 0x20000];
            img[0x10000..0x10008].copy_from_slice(&table.to_be_bytes());
            img[0x18000..0x18000 + dir.len()].copy_from_slice(&dir);
            img
        };
        let load = |img: &[u8], size: u64| {
            let mut read = |off: u64, buf: &mut [u8]| {
                let o = off as usize;
                buf.copy_from_slice(&img[o..o + buf.len()]);
                Ok(())
            };
            load_bitmaps(1, 0x18000, dir.len() as u64, 65536, size, &mut read)
        };
        assert!(load(&image(0), 64 << 20).is_ok());
        assert!(load(&image(1), 64 << 20).is_ok());
        assert_eq!(
            load(&image(2), 64 << 20),
            Err(BitmapError::Table {
                name: "b0".into(),
                reason: "Invalid argument".into()
            })
        );
        // A 1 MiB disk needs the same one entry; 64 GiB needs more than the directory's.
        assert!(load(&image(0), 1 << 20).is_ok());
        assert!(matches!(
            load(&image(0), 64 << 30),
            Err(BitmapError::Constraints { .. })
        ));
        let two = encode_directory(&[entry("b0", 0, 16), entry("b0", 0, 16)]);
        let mut img = image(0);
        img[0x18000..0x18000 + two.len()].copy_from_slice(&two);
        let mut read = |off: u64, buf: &mut [u8]| {
            let o = off as usize;
            buf.copy_from_slice(&img[o..o + buf.len()]);
            Ok(())
        };
        assert_eq!(
            load_bitmaps(2, 0x18000, two.len() as u64, 65536, 1 << 20, &mut read),
            Err(BitmapError::DuplicateName { name: "b0".into() })
        );
    }

    #[test]
    fn table_entries() {
        assert!(table_entry_ok(0, 65536));
        assert!(table_entry_ok(1, 65536));
        assert!(table_entry_ok(0x30000, 65536));
        assert!(!table_entry_ok(0x30001, 65536));
        assert!(!table_entry_ok(0x30200, 65536));
        assert!(!table_entry_ok(0x2, 65536));
        assert!(!table_entry_ok(1 << 60, 65536));
    }

    quickcheck::quickcheck! {
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>, nb: u32) -> bool {
            let _ = parse_directory(&bytes, nb, 65536, 1 << 30);
            let _ = parse_directory_raw(&bytes, nb);
            true
        }
    }
}
