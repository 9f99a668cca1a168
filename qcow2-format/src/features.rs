//! Feature bits of the version-3 header, their names, and the compression type.
//!
//! The three 64-bit feature fields (`incompatible_features`, `compatible_features`,
//! `autoclear_features`) are kept as plain `u64` in [`crate::header::Header`]; this module
//! names the bits QEMU knows, the masks it accepts, and formats the "Unsupported qcow2
//! feature(s)" message exactly like QEMU's `report_unsupported_feature`.

use std::fmt::Write as _;

/// Incompatible bit 0: refcounts may be stale (lazy refcounts were in use).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: QEMU found fatal corruption; read-write open is refused.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: the header's `compression_type` byte is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: L2 entries are 128-bit with a subcluster bitmap.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit QEMU 10 understands; any other bit refuses the open.
pub const INCOMPAT_MASK: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Compatible bit 0: refcount updates may be postponed (dirty-bit protocol).
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Every compatible bit QEMU 10 understands (unknown ones are ignored and preserved).
pub const COMPAT_MASK: u64 = COMPAT_LAZY_REFCOUNTS;

/// Autoclear bit 0: the bitmaps extension is consistent with the image.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a valid raw image on its own.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Every autoclear bit QEMU 10 understands; others are cleared on a writable open.
pub const AUTOCLEAR_MASK: u64 = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

/// Which of the three feature fields a bit belongs to (the feature-name table's `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// `incompatible_features` (table type 0).
    Incompatible,
    /// `compatible_features` (table type 1).
    Compatible,
    /// `autoclear_features` (table type 2).
    Autoclear,
}

impl FeatureKind {
    /// The type byte used in the feature-name table.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Incompatible => 0,
            Self::Compatible => 1,
            Self::Autoclear => 2,
        }
    }

    /// Decodes a feature-name table type byte; `None` for types the spec does not define.
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Incompatible),
            1 => Some(Self::Compatible),
            2 => Some(Self::Autoclear),
            _ => None,
        }
    }
}

/// A feature bit QEMU knows, with the name it writes into the feature-name table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownFeature {
    /// Which feature field the bit lives in.
    pub kind: FeatureKind,
    /// Bit number (0..=63).
    pub bit: u8,
    /// Name as written in QEMU's feature-name table.
    pub name: &'static str,
}

/// QEMU's feature-name table, in the order `qcow2_update_header` writes it.
pub const KNOWN_FEATURES: [KnownFeature; 8] = [
    KnownFeature {
        kind: FeatureKind::Incompatible,
        bit: 0,
        name: "dirty bit",
    },
    KnownFeature {
        kind: FeatureKind::Incompatible,
        bit: 1,
        name: "corrupt bit",
    },
    KnownFeature {
        kind: FeatureKind::Incompatible,
        bit: 2,
        name: "external data file",
    },
    KnownFeature {
        kind: FeatureKind::Incompatible,
        bit: 3,
        name: "compression type",
    },
    KnownFeature {
        kind: FeatureKind::Incompatible,
        bit: 4,
        name: "extended L2 entries",
    },
    KnownFeature {
        kind: FeatureKind::Compatible,
        bit: 0,
        name: "lazy refcounts",
    },
    KnownFeature {
        kind: FeatureKind::Autoclear,
        bit: 0,
        name: "bitmaps",
    },
    KnownFeature {
        kind: FeatureKind::Autoclear,
        bit: 1,
        name: "raw external data",
    },
];

/// Length of the name field of a feature-name table entry.
pub const FEATURE_NAME_LEN: usize = 46;
/// Size of one feature-name table entry on disk (type, bit, 46-byte name).
pub const FEATURE_ENTRY_SIZE: usize = 48;

/// One raw entry of a feature-name table extension, as stored in the image.
///
/// The type byte is kept raw: QEMU ignores entries whose type is not "incompatible" when
/// naming unsupported bits, and a reader must not reject a table with unknown types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeatureNameEntry {
    /// Raw type byte (0 incompatible, 1 compatible, 2 autoclear).
    pub kind: u8,
    /// Bit number; values above 63 name no bit.
    pub bit: u8,
    /// Name, zero padded (not necessarily NUL terminated when all 46 bytes are used).
    pub name: [u8; FEATURE_NAME_LEN],
}

impl FeatureNameEntry {
    /// Builds an entry; the name is truncated to 46 bytes.
    pub fn new(kind: u8, bit: u8, name: &str) -> Self {
        let mut raw = [0u8; FEATURE_NAME_LEN];
        for (dst, src) in raw.iter_mut().zip(name.as_bytes()) {
            *dst = *src;
        }
        Self {
            kind,
            bit,
            name: raw,
        }
    }

    /// Decodes one 48-byte entry.
    pub fn from_bytes(bytes: &[u8; FEATURE_ENTRY_SIZE]) -> Self {
        let mut name = [0u8; FEATURE_NAME_LEN];
        name.copy_from_slice(&bytes[2..]);
        Self {
            kind: bytes[0],
            bit: bytes[1],
            name,
        }
    }

    /// Encodes the entry as its 48 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; FEATURE_ENTRY_SIZE] {
        let mut out = [0u8; FEATURE_ENTRY_SIZE];
        out[0] = self.kind;
        out[1] = self.bit;
        out[2..].copy_from_slice(&self.name);
        out
    }

    /// The name up to its first NUL (QEMU prints it with `%.46s`), lossily as UTF-8.
    pub fn name_str(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(FEATURE_NAME_LEN);
        String::from_utf8_lossy(self.name.get(..end).unwrap_or(&[])).into_owned()
    }

    /// The mask of the bit this entry names, or `None` for bit numbers above 63.
    pub fn mask(&self) -> Option<u64> {
        1u64.checked_shl(u32::from(self.bit))
    }
}

/// QEMU's own feature-name table as entries (what `qcow2_update_header` writes).
pub fn qemu_feature_table() -> Vec<FeatureNameEntry> {
    KNOWN_FEATURES
        .iter()
        .map(|f| FeatureNameEntry::new(f.kind.as_u8(), f.bit, f.name))
        .collect()
}

/// Formats unknown incompatible bits the way QEMU's `report_unsupported_feature` does.
///
/// Walks `table` until the first entry with an empty name (QEMU's terminator), naming each
/// set incompatible bit once; any bits still unnamed are appended as
/// `Unknown incompatible feature: <lowercase hex>`. The result is the list that follows
/// "Unsupported qcow2 feature(s): ".
pub fn format_unsupported_features(table: &[FeatureNameEntry], mask: u64) -> String {
    let mut remaining = mask;
    let mut out = String::new();
    for entry in table {
        if entry.name[0] == 0 {
            break;
        }
        if entry.kind != FeatureKind::Incompatible.as_u8() {
            continue;
        }
        let Some(bit) = entry.mask() else { continue };
        if remaining & bit != 0 {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(&entry.name_str());
            remaining &= !bit;
        }
    }
    if remaining != 0 {
        if !out.is_empty() {
            out.push_str(", ");
        }
        // Writing into a String cannot fail.
        let _ = write!(out, "Unknown incompatible feature: {remaining:x}");
    }
    out
}

/// Names of the known bits set in `value` for `kind`, in table order (for display).
pub fn known_feature_names(kind: FeatureKind, value: u64) -> Vec<&'static str> {
    KNOWN_FEATURES
        .iter()
        .filter(|f| f.kind == kind && value & (1u64 << f.bit) != 0)
        .map(|f| f.name)
        .collect()
}

/// Compression algorithm of compressed clusters (header byte 104, v3 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    /// Raw deflate (no zlib header), the only choice before QEMU 5.1. QEMU calls it "zlib".
    #[default]
    Deflate,
    /// zstd frames.
    Zstd,
}

impl CompressionType {
    /// Decodes the header byte; `None` for values QEMU rejects.
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Deflate),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The header byte.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Deflate => 0,
            Self::Zstd => 1,
        }
    }

    /// The name QEMU uses (`compression_type=` option, `qemu-img info`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Deflate => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_match_qemu() {
        assert_eq!(INCOMPAT_MASK, 0x1f);
        assert_eq!(COMPAT_MASK, 0x1);
        assert_eq!(AUTOCLEAR_MASK, 0x3);
    }

    #[test]
    fn unknown_bits_without_table() {
        assert_eq!(
            format_unsupported_features(&[], 1 << 63),
            "Unknown incompatible feature: 8000000000000000"
        );
        assert_eq!(
            format_unsupported_features(&[], 0xe000_0000_0000_0000),
            "Unknown incompatible feature: e000000000000000"
        );
    }

    #[test]
    fn named_and_unnamed_bits() {
        let table = [
            FeatureNameEntry::new(0, 60, "test1"),
            FeatureNameEntry::new(1, 62, "compat only"),
            FeatureNameEntry::new(0, 62, "test2"),
            FeatureNameEntry::new(0, 200, "bogus bit"),
        ];
        assert_eq!(
            format_unsupported_features(&table, (1 << 60) | (1 << 62) | (1 << 63)),
            "test1, test2, Unknown incompatible feature: 8000000000000000"
        );
        assert_eq!(format_unsupported_features(&table, 1 << 60), "test1");
    }

    #[test]
    fn empty_name_terminates_the_table() {
        let table = [
            FeatureNameEntry::new(0, 5, ""),
            FeatureNameEntry::new(0, 6, "late"),
        ];
        assert_eq!(
            format_unsupported_features(&table, 1 << 6),
            "Unknown incompatible feature: 40"
        );
    }

    #[test]
    fn entry_round_trip_and_truncation() {
        let long = "x".repeat(60);
        let e = FeatureNameEntry::new(2, 1, &long);
        assert_eq!(e.name_str().len(), 46);
        assert_eq!(FeatureNameEntry::from_bytes(&e.to_bytes()), e);
        assert_eq!(qemu_feature_table().len(), 8);
        assert_eq!(qemu_feature_table()[4].name_str(), "extended L2 entries");
    }

    #[test]
    fn compression_names() {
        assert_eq!(
            CompressionType::from_u8(1).map(CompressionType::name),
            Some("zstd")
        );
        assert_eq!(CompressionType::Deflate.name(), "zlib");
        assert_eq!(CompressionType::from_u8(2), None);
        assert_eq!(
            known_feature_names(FeatureKind::Incompatible, 0x3),
            ["dirty bit", "corrupt bit"]
        );
    }
}
