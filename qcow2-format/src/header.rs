//! The qcow2 header (version 2: 72 bytes, version 3: 104 or 112 bytes, or longer with
//! unknown trailing fields) and QEMU's open-time validation of it.
//!
//! [`Header::parse`] decodes the structure (QEMU's checks 1-5, which are needed to know
//! where the header ends); [`open_first_cluster`] runs every remaining check of
//! `qcow2_do_open` in QEMU's order and parses the header extensions and backing file name.

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::extensions::{self, ExtensionError, Extensions, FirstCluster};
use crate::features::{
    self, CompressionType, AUTOCLEAR_DATA_FILE_RAW, AUTOCLEAR_MASK, INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT, INCOMPAT_EXTL2, INCOMPAT_MASK,
};
use crate::limits::{
    ENTRY_SIZE, MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS, MAX_L1_SIZE, MAX_REFCOUNT_ORDER,
    MAX_REFTABLE_SIZE, MAX_SNAPSHOTS, MIN_CLUSTER_BITS, MIN_SUBCLUSTER_SIZE,
    SNAPSHOT_ENTRY_FIXED_SIZE, SUBCLUSTERS_PER_CLUSTER,
};
use crate::Geometry;

/// The header magic, "QFI\xfb".
pub const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Size of a version-2 header.
pub const V2_HEADER_SIZE: usize = 72;
/// Smallest version-3 header (without the compression type byte).
pub const V3_MIN_HEADER_SIZE: usize = 104;
/// Size of the header QEMU knows and writes for version 3 (with compression type + padding).
pub const V3_HEADER_SIZE: usize = 112;
/// Offset of the compression type byte; it is present iff `header_length` exceeds this.
pub const COMPRESSION_TYPE_OFFSET: usize = 104;
/// `crypt_method` value: no encryption.
pub const CRYPT_NONE: u32 = 0;
/// `crypt_method` value: legacy AES-CBC.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method` value: LUKS (needs the full-disk-encryption header extension).
pub const CRYPT_LUKS: u32 = 2;

/// The on-disk layout of the first 112 header bytes, all big-endian.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// `QCOW_MAGIC`.
    pub magic: U32,
    /// 2 or 3.
    pub version: U32,
    /// Offset of the backing file name in the first cluster, 0 for none.
    pub backing_file_offset: U64,
    /// Length of the backing file name (not NUL terminated).
    pub backing_file_size: U32,
    /// `log2(cluster_size)`.
    pub cluster_bits: U32,
    /// Virtual disk size in bytes.
    pub size: U64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: U32,
    /// Number of active L1 entries.
    pub l1_size: U32,
    /// Offset of the active L1 table.
    pub l1_table_offset: U64,
    /// Offset of the refcount table.
    pub refcount_table_offset: U64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: U32,
    /// Number of internal snapshots.
    pub nb_snapshots: U32,
    /// Offset of the snapshot table.
    pub snapshots_offset: U64,
    /// v3: incompatible feature bits.
    pub incompatible_features: U64,
    /// v3: compatible feature bits.
    pub compatible_features: U64,
    /// v3: autoclear feature bits.
    pub autoclear_features: U64,
    /// v3: `log2(refcount_bits)`.
    pub refcount_order: U32,
    /// v3: length of the header structure.
    pub header_length: U32,
    /// v3 with `header_length > 104`: compression type.
    pub compression_type: u8,
    /// Zero padding up to 112 bytes.
    pub padding: [u8; 7],
}

/// A decoded header. Field names follow the specification.
///
/// Version-2 images read as the v3 defaults (no features, `refcount_order` 4,
/// `header_length` 72), as QEMU does. `compression_type` is the raw byte (0 when the header
/// is too short to hold it) so that an invalid value can be reported, not lost.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// 2 or 3 (anything else is refused by [`Header::parse`]).
    pub version: u32,
    /// Offset of the backing file name, 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// `log2(cluster_size)`, 9..=21.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method (see `CRYPT_*`).
    pub crypt_method: u32,
    /// Number of active L1 entries.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (see [`crate::features`]).
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// `log2(refcount_bits)`.
    pub refcount_order: u32,
    /// Length of the header structure in bytes (72 for v2).
    pub header_length: u32,
    /// Raw compression type byte (0 = deflate, 1 = zstd).
    pub compression_type: u8,
    /// Header bytes between 112 and `header_length`, preserved byte for byte.
    pub unknown_fields: Vec<u8>,
}

/// Why a header cannot be opened. Messages equal QEMU's where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Step 1: wrong magic.
    #[error("Image is not in qcow2 format")]
    BadMagic {
        /// The magic found.
        magic: u32,
    },
    /// Step 2: version other than 2 or 3.
    #[error("Unsupported qcow2 version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// Step 3: `cluster_bits` outside 9..=21.
    #[error("Unsupported cluster size: 2^{cluster_bits}")]
    UnsupportedClusterSize {
        /// The value found.
        cluster_bits: u32,
    },
    /// Step 4: v3 `header_length` below 104.
    #[error("qcow2 header too short")]
    HeaderTooShort {
        /// The value found.
        header_length: u32,
    },
    /// Step 5: `header_length` larger than a cluster.
    #[error("qcow2 header exceeds cluster size")]
    HeaderExceedsCluster {
        /// The value found.
        header_length: u32,
        /// The image's cluster size.
        cluster_size: u64,
    },
    /// The caller's buffer ends before `header_length` (not a QEMU check: QEMU reads more).
    #[error("qcow2 header truncated: {header_length} bytes needed, {available} available")]
    Truncated {
        /// Bytes the header occupies.
        header_length: u32,
        /// Bytes given.
        available: usize,
    },
    /// Step 6: `backing_file_offset` beyond the first cluster.
    #[error("Invalid backing file offset")]
    InvalidBackingFileOffset {
        /// The value found.
        backing_file_offset: u64,
        /// The image's cluster size.
        cluster_size: u64,
    },
    /// Step 7: compression type other than 0 or 1.
    #[error("qcow2: unknown compression type: {compression_type}")]
    UnknownCompressionType {
        /// The value found.
        compression_type: u8,
    },
    /// Step 7: deflate with incompatible bit 3 set.
    #[error("qcow2: Compression type incompatible feature bit must not be set")]
    CompressionBitMustNotBeSet {
        /// The incompatible feature bits.
        incompatible_features: u64,
    },
    /// Step 7: non-deflate compression without incompatible bit 3.
    #[error("qcow2: Compression type incompatible feature bit must be set")]
    CompressionBitMustBeSet {
        /// The compression type found.
        compression_type: u8,
    },
    /// Step 8: incompatible bits QEMU does not know.
    #[error("Unsupported qcow2 feature(s): {names}")]
    UnsupportedFeatures {
        /// The unknown bits.
        mask: u64,
        /// Their names from the image's feature-name table, formatted like QEMU.
        names: String,
    },
    /// Step 9: corrupt bit on a read-write open outside check mode.
    #[error("qcow2: Image is corrupt; cannot be opened read/write")]
    Corrupt,
    /// Step 10: extended L2 with subclusters smaller than 512 bytes.
    #[error("Unsupported subcluster size: {subcluster_size}")]
    UnsupportedSubclusterSize {
        /// The subcluster size implied.
        subcluster_size: u64,
    },
    /// Step 11: `refcount_order` above 6.
    #[error("Reference count entry width too large; may not exceed 64 bits")]
    RefcountOrderTooLarge {
        /// The value found.
        refcount_order: u32,
    },
    /// Step 13: no refcount table (outside check mode).
    #[error("Image does not contain a reference count table")]
    NoRefcountTable,
    /// Step 14: refcount table above 8 MiB.
    #[error("Reference count table too large")]
    RefcountTableTooLarge {
        /// `refcount_table_clusters`.
        clusters: u32,
    },
    /// Step 14: refcount table unaligned or ending beyond `i64::MAX`.
    #[error("Reference count table offset invalid")]
    RefcountTableOffsetInvalid {
        /// `refcount_table_offset`.
        offset: u64,
    },
    /// Step 14: more than 65536 snapshots (outside check mode).
    #[error("Snapshot table too large")]
    SnapshotTableTooLarge {
        /// `nb_snapshots`.
        nb_snapshots: u32,
    },
    /// Step 14: snapshot table unaligned or ending beyond `i64::MAX` (outside check mode).
    #[error("Snapshot table offset invalid")]
    SnapshotTableOffsetInvalid {
        /// `snapshots_offset`.
        offset: u64,
    },
    /// Step 14: active L1 table above 32 MiB.
    #[error("Active L1 table too large")]
    L1TableTooLarge {
        /// `l1_size`.
        l1_size: u32,
    },
    /// Step 14: active L1 table unaligned or ending beyond `i64::MAX`.
    #[error("Active L1 table offset invalid")]
    L1TableOffsetInvalid {
        /// `l1_table_offset`.
        offset: u64,
    },
    /// Step 15: the virtual size needs more than `i32::MAX` L1 entries.
    #[error("Image is too big")]
    ImageTooBig {
        /// The virtual size.
        size: u64,
    },
    /// Step 15: the L1 table cannot map the virtual size.
    #[error("L1 table is too small")]
    L1TableTooSmall {
        /// `l1_size`.
        l1_size: u32,
        /// Entries the virtual size needs.
        needed: u64,
    },
    /// Step 16: a header extension is invalid.
    #[error(transparent)]
    Extension(#[from] ExtensionError),
    /// Step 16: autoclear "raw external data" without an external data file.
    #[error("data-file-raw requires a data file")]
    DataFileRawWithoutDataFile,
    /// Step 16: an encrypted image (other than AES) without the encryption header extension.
    #[error("Missing CRYPTO header for crypt method {crypt_method}")]
    MissingCryptoHeader {
        /// `crypt_method`.
        crypt_method: u32,
    },
    /// Step 17: backing file name longer than 1023 bytes or than the rest of the cluster.
    #[error("Backing file name too long")]
    BackingFileNameTooLong {
        /// `backing_file_size`.
        backing_file_size: u32,
        /// The largest length allowed at this offset.
        max: u64,
    },
}

/// How an image is being opened; some checks depend on it (reference §1.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenOptions {
    /// Opened read-write: the corrupt bit refuses the open (unless in check mode).
    pub read_write: bool,
    /// Opened by the checker (`BDRV_O_CHECK`): skips the corrupt-bit refusal, the
    /// "no refcount table" check and the snapshot-table checks so broken images can be
    /// checked and repaired.
    pub check_mode: bool,
}

impl Header {
    /// Decodes a header from the start of the image (QEMU's checks 1-5).
    ///
    /// Bytes missing from a short `buf` read as zero, as QEMU's reads past the end of a file
    /// do, except that unknown fields beyond 112 bytes must be present in `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self, HeaderError> {
        let mut fixed = [0u8; V3_HEADER_SIZE];
        for (dst, src) in fixed.iter_mut().zip(buf) {
            *dst = *src;
        }
        let raw = RawHeader::read_from_bytes(&fixed[..]).map_err(|_| HeaderError::Truncated {
            header_length: V3_HEADER_SIZE as u32,
            available: buf.len(),
        })?;

        let magic = raw.magic.get();
        if magic != QCOW_MAGIC {
            return Err(HeaderError::BadMagic { magic });
        }
        let version = raw.version.get();
        if !(2..=3).contains(&version) {
            return Err(HeaderError::UnsupportedVersion { version });
        }
        let cluster_bits = raw.cluster_bits.get();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::UnsupportedClusterSize { cluster_bits });
        }
        let cluster_size = 1u64 << cluster_bits;

        let (incompat, compat, autoclear, refcount_order, header_length) = if version == 2 {
            (0, 0, 0, 4, V2_HEADER_SIZE as u32)
        } else {
            let header_length = raw.header_length.get();
            if (header_length as usize) < V3_MIN_HEADER_SIZE {
                return Err(HeaderError::HeaderTooShort { header_length });
            }
            (
                raw.incompatible_features.get(),
                raw.compatible_features.get(),
                raw.autoclear_features.get(),
                raw.refcount_order.get(),
                header_length,
            )
        };
        if u64::from(header_length) > cluster_size {
            return Err(HeaderError::HeaderExceedsCluster {
                header_length,
                cluster_size,
            });
        }
        let unknown_fields = if header_length as usize > V3_HEADER_SIZE {
            buf.get(V3_HEADER_SIZE..header_length as usize)
                .ok_or(HeaderError::Truncated {
                    header_length,
                    available: buf.len(),
                })?
                .to_vec()
        } else {
            Vec::new()
        };
        let compression_type = if header_length as usize > COMPRESSION_TYPE_OFFSET {
            raw.compression_type
        } else {
            0
        };

        Ok(Self {
            version,
            backing_file_offset: raw.backing_file_offset.get(),
            backing_file_size: raw.backing_file_size.get(),
            cluster_bits,
            size: raw.size.get(),
            crypt_method: raw.crypt_method.get(),
            l1_size: raw.l1_size.get(),
            l1_table_offset: raw.l1_table_offset.get(),
            refcount_table_offset: raw.refcount_table_offset.get(),
            refcount_table_clusters: raw.refcount_table_clusters.get(),
            nb_snapshots: raw.nb_snapshots.get(),
            snapshots_offset: raw.snapshots_offset.get(),
            incompatible_features: incompat,
            compatible_features: compat,
            autoclear_features: autoclear,
            refcount_order,
            header_length,
            compression_type,
            unknown_fields,
        })
    }

    /// The raw 112-byte structure for these values (feature fields zero for v2).
    pub fn to_raw(&self) -> RawHeader {
        let v3 = self.version >= 3;
        RawHeader {
            magic: U32::new(QCOW_MAGIC),
            version: U32::new(self.version),
            backing_file_offset: U64::new(self.backing_file_offset),
            backing_file_size: U32::new(self.backing_file_size),
            cluster_bits: U32::new(self.cluster_bits),
            size: U64::new(self.size),
            crypt_method: U32::new(self.crypt_method),
            l1_size: U32::new(self.l1_size),
            l1_table_offset: U64::new(self.l1_table_offset),
            refcount_table_offset: U64::new(self.refcount_table_offset),
            refcount_table_clusters: U32::new(self.refcount_table_clusters),
            nb_snapshots: U32::new(self.nb_snapshots),
            snapshots_offset: U64::new(self.snapshots_offset),
            incompatible_features: U64::new(if v3 { self.incompatible_features } else { 0 }),
            compatible_features: U64::new(if v3 { self.compatible_features } else { 0 }),
            autoclear_features: U64::new(if v3 { self.autoclear_features } else { 0 }),
            refcount_order: U32::new(if v3 { self.refcount_order } else { 0 }),
            header_length: U32::new(if v3 { self.header_length } else { 0 }),
            compression_type: if v3 { self.compression_type } else { 0 },
            padding: [0; 7],
        }
    }

    /// Serializes the header: 72 bytes for v2; for v3 the 112-byte structure followed by
    /// the preserved unknown fields. `header_length` is written as stored, so a parsed
    /// header serializes to bytes that parse back to the same value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let raw = self.to_raw();
        if self.version < 3 {
            return raw
                .as_bytes()
                .iter()
                .take(V2_HEADER_SIZE)
                .copied()
                .collect();
        }
        let mut out = raw.as_bytes().to_vec();
        out.extend_from_slice(&self.unknown_fields);
        out
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }

    /// Whether incompatible bit 4 (extended L2 entries) is set.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// The image's geometry, if its parameters are valid.
    pub fn geometry(&self) -> Result<Geometry, crate::GeometryError> {
        Geometry::new(self.cluster_bits, self.refcount_order, self.extended_l2())
    }

    /// The compression type, or `None` for a value QEMU rejects.
    pub fn compression(&self) -> Option<CompressionType> {
        CompressionType::from_u8(self.compression_type)
    }

    /// Where header extensions end: the backing file name, or the end of the first cluster.
    pub fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }

    /// Whether autoclear bits QEMU does not know are set (a writable open clears them).
    pub fn has_unknown_autoclear(&self) -> bool {
        self.autoclear_features & !AUTOCLEAR_MASK != 0
    }

    /// Clears unknown autoclear bits, as QEMU does on a writable open (iotest 036).
    /// Returns whether anything changed, i.e. whether the header must be rewritten.
    pub fn clear_unknown_autoclear(&mut self) -> bool {
        let changed = self.has_unknown_autoclear();
        self.autoclear_features &= AUTOCLEAR_MASK;
        changed
    }

    /// QEMU's checks 6-15 on the header alone, in QEMU's order. `feature_table` names
    /// unknown incompatible bits for the step-8 message (see
    /// [`extensions::feature_table_lenient`]).
    pub fn validate(
        &self,
        opts: &OpenOptions,
        feature_table: &[features::FeatureNameEntry],
    ) -> Result<(), HeaderError> {
        // Steps 1-3 again, for headers built by hand rather than parsed: everything below
        // shifts by `cluster_bits`.
        if !(2..=3).contains(&self.version) {
            return Err(HeaderError::UnsupportedVersion {
                version: self.version,
            });
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(HeaderError::UnsupportedClusterSize {
                cluster_bits: self.cluster_bits,
            });
        }
        let cluster_size = self.cluster_size();
        // 6
        if self.backing_file_offset > cluster_size {
            return Err(HeaderError::InvalidBackingFileOffset {
                backing_file_offset: self.backing_file_offset,
                cluster_size,
            });
        }
        // 7
        self.validate_compression_type()?;
        // 8
        let unknown = self.incompatible_features & !INCOMPAT_MASK;
        if unknown != 0 {
            return Err(HeaderError::UnsupportedFeatures {
                mask: unknown,
                names: features::format_unsupported_features(feature_table, unknown),
            });
        }
        // 9
        if self.incompatible_features & INCOMPAT_CORRUPT != 0 && opts.read_write && !opts.check_mode
        {
            return Err(HeaderError::Corrupt);
        }
        // 10
        if self.extended_l2() {
            let subcluster_size = cluster_size / u64::from(SUBCLUSTERS_PER_CLUSTER);
            if subcluster_size < MIN_SUBCLUSTER_SIZE {
                return Err(HeaderError::UnsupportedSubclusterSize { subcluster_size });
            }
        }
        // 11
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(HeaderError::RefcountOrderTooLarge {
                refcount_order: self.refcount_order,
            });
        }
        // 12 (AES refused in system emulators only) does not apply to a format library.
        // 13
        if self.refcount_table_clusters == 0 && !opts.check_mode {
            return Err(HeaderError::NoRefcountTable);
        }
        // 14
        validate_table(
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters),
            cluster_size,
            MAX_REFTABLE_SIZE,
            cluster_size,
            || HeaderError::RefcountTableTooLarge {
                clusters: self.refcount_table_clusters,
            },
            || HeaderError::RefcountTableOffsetInvalid {
                offset: self.refcount_table_offset,
            },
        )?;
        if !opts.check_mode {
            validate_table(
                self.snapshots_offset,
                u64::from(self.nb_snapshots),
                SNAPSHOT_ENTRY_FIXED_SIZE,
                SNAPSHOT_ENTRY_FIXED_SIZE * MAX_SNAPSHOTS,
                cluster_size,
                || HeaderError::SnapshotTableTooLarge {
                    nb_snapshots: self.nb_snapshots,
                },
                || HeaderError::SnapshotTableOffsetInvalid {
                    offset: self.snapshots_offset,
                },
            )?;
        }
        validate_table(
            self.l1_table_offset,
            u64::from(self.l1_size),
            ENTRY_SIZE,
            MAX_L1_SIZE,
            cluster_size,
            || HeaderError::L1TableTooLarge {
                l1_size: self.l1_size,
            },
            || HeaderError::L1TableOffsetInvalid {
                offset: self.l1_table_offset,
            },
        )?;
        // 15: size_to_l1 uses the L2 coverage of this image's entry width (steps 3, 10 and
        // 11 made the geometry valid).
        let needed = self
            .geometry()
            .map_err(|_| HeaderError::UnsupportedClusterSize {
                cluster_bits: self.cluster_bits,
            })?
            .l1_entries_for(self.size);
        if needed > i32::MAX as u64 {
            return Err(HeaderError::ImageTooBig { size: self.size });
        }
        if u64::from(self.l1_size) < needed {
            return Err(HeaderError::L1TableTooSmall {
                l1_size: self.l1_size,
                needed,
            });
        }
        Ok(())
    }

    /// QEMU's `validate_compression_type` (step 7).
    pub fn validate_compression_type(&self) -> Result<(), HeaderError> {
        let Some(kind) = self.compression() else {
            return Err(HeaderError::UnknownCompressionType {
                compression_type: self.compression_type,
            });
        };
        let bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (kind, bit) {
            (CompressionType::Deflate, true) => Err(HeaderError::CompressionBitMustNotBeSet {
                incompatible_features: self.incompatible_features,
            }),
            (CompressionType::Zstd, false) => Err(HeaderError::CompressionBitMustBeSet {
                compression_type: self.compression_type,
            }),
            _ => Ok(()),
        }
    }

    /// The largest backing file name length QEMU accepts at this `backing_file_offset`.
    pub fn max_backing_file_size(&self) -> u64 {
        MAX_BACKING_FILE_NAME.min(self.cluster_size().saturating_sub(self.backing_file_offset))
    }
}

/// QEMU's `qcow2_validate_table`: at most `max_bytes / entry_len` entries, offset aligned,
/// and the whole table below `i64::MAX` (values are later used as signed offsets). The two
/// closures build the caller's "too large" and "offset invalid" errors.
#[allow(clippy::too_many_arguments)]
fn validate_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
    too_large: impl FnOnce() -> HeaderError,
    offset_invalid: impl FnOnce() -> HeaderError,
) -> Result<(), HeaderError> {
    if entries > max_bytes / entry_len {
        return Err(too_large());
    }
    // entries * entry_len <= max_bytes (< 2^27 here): no overflow.
    let bytes = entries * entry_len;
    if (i64::MAX as u64) - bytes < offset || offset & (cluster_size - 1) != 0 {
        return Err(offset_invalid());
    }
    Ok(())
}

/// Parses and validates the first cluster of an image the way `qcow2_do_open` does
/// (reference §1.11 steps 1-17, in order; step 12 and the runtime data-file options do not
/// apply; snapshot-table contents, step 18, are the snapshot module's business).
///
/// `first_cluster` should hold the image's first cluster; bytes beyond its end read as
/// zero, like QEMU's reads past the end of a file.
pub fn open_first_cluster(
    first_cluster: &[u8],
    opts: &OpenOptions,
) -> Result<FirstCluster, HeaderError> {
    let header = Header::parse(first_cluster)?;
    let cluster_size = header.cluster_size();
    // Steps 6-8 need the feature table, which QEMU reads with errors ignored; the
    // backing-file-offset check (6) guards the extension area first.
    if header.backing_file_offset > cluster_size {
        return Err(HeaderError::InvalidBackingFileOffset {
            backing_file_offset: header.backing_file_offset,
            cluster_size,
        });
    }
    let cluster = pad_to_cluster(first_cluster, cluster_size);
    let table = if header.incompatible_features & !INCOMPAT_MASK != 0 {
        extensions::feature_table_lenient(&cluster, &header)
    } else {
        Vec::new()
    };
    header.validate(opts, &table)?;
    // 16
    let extensions = Extensions::parse(&cluster, &header)?;
    if header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
        && header.incompatible_features & features::INCOMPAT_DATA_FILE == 0
    {
        return Err(HeaderError::DataFileRawWithoutDataFile);
    }
    if header.crypt_method != CRYPT_NONE
        && header.crypt_method != CRYPT_AES
        && extensions.crypto_header.is_none()
    {
        return Err(HeaderError::MissingCryptoHeader {
            crypt_method: header.crypt_method,
        });
    }
    // 17
    let backing_file = if header.backing_file_offset != 0 {
        let max = header.max_backing_file_size();
        if u64::from(header.backing_file_size) > max {
            return Err(HeaderError::BackingFileNameTooLong {
                backing_file_size: header.backing_file_size,
                max,
            });
        }
        // offset + size <= cluster_size by the check above.
        let start = header.backing_file_offset as usize;
        let end = start + header.backing_file_size as usize;
        Some(cluster.get(start..end).unwrap_or(&[]).to_vec())
    } else {
        None
    };
    Ok(FirstCluster {
        header,
        extensions,
        backing_file,
    })
}

/// The first `cluster_size` bytes of `buf`, zero-extended if `buf` is shorter.
fn pad_to_cluster(buf: &[u8], cluster_size: u64) -> std::borrow::Cow<'_, [u8]> {
    let cs = cluster_size as usize;
    if let Some(cluster) = buf.get(..cs) {
        std::borrow::Cow::Borrowed(cluster)
    } else {
        let mut v = buf.to_vec();
        v.resize(cs, 0);
        std::borrow::Cow::Owned(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{quickcheck, Arbitrary, Gen};

    fn v3() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            unknown_fields: Vec::new(),
        }
    }

    impl Arbitrary for Header {
        fn arbitrary(g: &mut Gen) -> Self {
            let version = if bool::arbitrary(g) { 2 } else { 3 };
            let cluster_bits = 9 + u32::arbitrary(g) % 13;
            let mut h = Header {
                version,
                backing_file_offset: u64::arbitrary(g),
                backing_file_size: u32::arbitrary(g),
                cluster_bits,
                size: u64::arbitrary(g),
                crypt_method: u32::arbitrary(g),
                l1_size: u32::arbitrary(g),
                l1_table_offset: u64::arbitrary(g),
                refcount_table_offset: u64::arbitrary(g),
                refcount_table_clusters: u32::arbitrary(g),
                nb_snapshots: u32::arbitrary(g),
                snapshots_offset: u64::arbitrary(g),
                incompatible_features: 0,
                compatible_features: 0,
                autoclear_features: 0,
                refcount_order: 4,
                header_length: 72,
                compression_type: 0,
                unknown_fields: Vec::new(),
            };
            if version == 3 {
                h.incompatible_features = u64::arbitrary(g);
                h.compatible_features = u64::arbitrary(g);
                h.autoclear_features = u64::arbitrary(g);
                h.refcount_order = u32::arbitrary(g);
                let extra = usize::arbitrary(g) % 64;
                let max_extra = (1usize << cluster_bits) - V3_HEADER_SIZE;
                let extra = extra.min(max_extra);
                h.unknown_fields = (0..extra).map(|_| u8::arbitrary(g)).collect();
                h.header_length = if extra == 0 && bool::arbitrary(g) {
                    104
                } else {
                    (V3_HEADER_SIZE + extra) as u32
                };
                if h.header_length > 104 {
                    h.compression_type = u8::arbitrary(g);
                }
            }
            h
        }
    }

    quickcheck! {
        fn prop_round_trip(h: Header) -> bool {
            Header::parse(&h.to_bytes()) == Ok(h)
        }

        fn prop_parse_never_panics(bytes: Vec<u8>) -> bool {
            let _ = Header::parse(&bytes);
            let _ = open_first_cluster(&bytes, &OpenOptions::default());
            true
        }

        fn prop_open_arbitrary_header_never_panics(h: Header, rw: bool, check: bool) -> bool {
            let opts = OpenOptions { read_write: rw, check_mode: check };
            let _ = open_first_cluster(&h.to_bytes(), &opts);
            let _ = h.validate(&opts, &[]);
            true
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(std::mem::size_of::<RawHeader>(), 112);
        assert_eq!(v3().to_bytes().len(), 112);
        let mut v2 = v3();
        v2.version = 2;
        v2.header_length = 72;
        assert_eq!(v2.to_bytes().len(), 72);
        assert_eq!(Header::parse(&v2.to_bytes()), Ok(v2));
    }

    #[test]
    fn parse_errors_in_order() {
        let mut b = v3().to_bytes();
        b[0] = 0;
        assert_eq!(
            Header::parse(&b),
            Err(HeaderError::BadMagic { magic: 0x0046_49fb })
        );
        let mut h = v3();
        h.version = 4;
        let e = Header::parse(&h.to_bytes()).unwrap_err();
        assert_eq!(e.to_string(), "Unsupported qcow2 version 4");
        let mut h = v3();
        h.cluster_bits = 8;
        assert_eq!(
            Header::parse(&h.to_bytes()).unwrap_err().to_string(),
            "Unsupported cluster size: 2^8"
        );
        let mut h = v3();
        h.header_length = 100;
        assert_eq!(
            Header::parse(&h.to_bytes()),
            Err(HeaderError::HeaderTooShort { header_length: 100 })
        );
        let mut h = v3();
        h.header_length = 200;
        assert_eq!(
            Header::parse(&h.to_bytes()),
            Err(HeaderError::Truncated {
                header_length: 200,
                available: 112
            })
        );
    }

    #[test]
    fn header_length_104_has_no_compression_byte() {
        let mut b = v3().to_bytes();
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b[104] = 7;
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.compression_type, 0);
        assert_eq!(h.header_length, 104);
    }

    #[test]
    fn validation_checks() {
        let opts = OpenOptions {
            read_write: true,
            check_mode: false,
        };
        assert_eq!(v3().validate(&opts, &[]), Ok(()));
        let mut h = v3();
        h.incompatible_features = features::INCOMPAT_CORRUPT;
        assert_eq!(h.validate(&opts, &[]), Err(HeaderError::Corrupt));
        assert_eq!(h.validate(&OpenOptions::default(), &[]), Ok(()));
        assert_eq!(
            h.validate(
                &OpenOptions {
                    read_write: true,
                    check_mode: true
                },
                &[]
            ),
            Ok(())
        );
        let mut h = v3();
        h.refcount_table_clusters = 0;
        assert_eq!(h.validate(&opts, &[]), Err(HeaderError::NoRefcountTable));
        assert_eq!(
            h.validate(
                &OpenOptions {
                    read_write: true,
                    check_mode: true
                },
                &[]
            ),
            Ok(())
        );
        let mut h = v3();
        h.compression_type = 1;
        assert_eq!(
            h.validate(&opts, &[]),
            Err(HeaderError::CompressionBitMustBeSet {
                compression_type: 1
            })
        );
        h.incompatible_features = INCOMPAT_COMPRESSION;
        assert_eq!(h.validate(&opts, &[]), Ok(()));
        h.compression_type = 2;
        assert_eq!(
            h.validate(&opts, &[]).unwrap_err().to_string(),
            "qcow2: unknown compression type: 2"
        );
        let mut h = v3();
        h.cluster_bits = 13;
        h.incompatible_features = INCOMPAT_EXTL2;
        h.l1_table_offset = 0x6000;
        h.refcount_table_offset = 0x2000;
        assert_eq!(
            h.validate(&opts, &[]),
            Err(HeaderError::UnsupportedSubclusterSize {
                subcluster_size: 256
            })
        );
        let mut h = v3();
        h.refcount_order = 7;
        assert_eq!(
            h.validate(&opts, &[]),
            Err(HeaderError::RefcountOrderTooLarge { refcount_order: 7 })
        );
        let mut h = v3();
        h.size = u64::MAX;
        assert_eq!(
            h.validate(&opts, &[]),
            Err(HeaderError::ImageTooBig { size: u64::MAX })
        );
        let mut h = v3();
        h.l1_size = 1;
        assert_eq!(
            h.validate(&opts, &[]),
            Err(HeaderError::L1TableTooSmall {
                l1_size: 1,
                needed: 2
            })
        );
    }

    #[test]
    fn autoclear_helper() {
        let mut h = v3();
        h.autoclear_features = (1 << 63) | 1;
        assert!(h.has_unknown_autoclear());
        assert!(h.clear_unknown_autoclear());
        assert_eq!(h.autoclear_features, 1);
        assert!(!h.clear_unknown_autoclear());
    }
}
