//! L1 and L2 table entries: codecs, QEMU's cluster and subcluster classification, and the
//! checks QEMU's checker applies to each entry.
//!
//! An L1 entry points at an L2 table. An L2 entry describes one guest cluster; with extended
//! L2 (incompatible feature bit 4) it carries a 64-bit subcluster bitmap as well: bits 0-31
//! say "subcluster `x` is allocated", bits 32-63 say "subcluster `x` reads as zeros".
//!
//! Nothing here panics: every index that could come from disk or a caller is checked and
//! reported as an [`EntryError`].

use core::ops::Range;

use crate::geometry::Geometry;
use crate::limits::SUBCLUSTERS_PER_CLUSTER;

/// Bits 9-55 of an L1 entry: the host offset of the L2 table.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that must be zero (0-8 and 56-62).
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Bits 9-55 of a standard cluster descriptor: the host cluster offset.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of a non-compressed L2 entry that must be zero (1-8 and 56-61).
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Bit 63 of L1 and L2 entries: the referenced cluster has refcount exactly 1.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed (bits 0-61 are a compressed descriptor).
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard cluster descriptor: the cluster reads as zeros (v3, standard L2 only).
pub const OFLAG_ZERO: u64 = 1;
/// The allocation half of an extended-L2 subcluster bitmap (bits 0-31).
pub const L2_BITMAP_ALL_ALLOC: u64 = 0x0000_0000_ffff_ffff;
/// The reads-as-zero half of an extended-L2 subcluster bitmap (bits 32-63).
pub const L2_BITMAP_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// Size in bytes of one L1 entry.
pub const L1_ENTRY_SIZE: usize = 8;
/// Size in bytes of one standard L2 entry.
pub const L2_STANDARD_ENTRY_SIZE: usize = 8;
/// Size in bytes of one extended L2 entry (entry word plus bitmap word).
pub const L2_EXTENDED_ENTRY_SIZE: usize = 16;

/// Everything that can be wrong with an L1/L2 entry, a table access or a subcluster range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// A table access past the end of the table buffer.
    #[error("entry index {index} out of range: the table holds {entries} entries")]
    IndexOutOfRange {
        /// The requested index.
        index: u64,
        /// Number of whole entries in the buffer.
        entries: u64,
    },
    /// An offset that the entry's offset field (bits 9-55) cannot represent.
    #[error("offset {offset:#x} cannot be stored in an L1/L2 entry (must be 512-aligned and below 2^56)")]
    OffsetNotRepresentable {
        /// The rejected offset.
        offset: u64,
    },
    /// A standard (64-bit) L2 entry cannot carry a subcluster bitmap.
    #[error("subcluster bitmap {bitmap:#x} cannot be stored in a standard L2 entry")]
    BitmapInStandardEntry {
        /// The nonzero bitmap.
        bitmap: u64,
    },
    /// A subcluster index of 32 or more.
    #[error("subcluster index {index} out of range (a cluster has {SUBCLUSTERS_PER_CLUSTER} subclusters)")]
    SubclusterIndex {
        /// The rejected index.
        index: u32,
    },
    /// A subcluster range that is empty-reversed or reaches past subcluster 32.
    #[error("subcluster range {start}..{end} is invalid")]
    SubclusterRange {
        /// First subcluster.
        start: u32,
        /// One past the last subcluster.
        end: u32,
    },
    /// A byte range that does not lie within one cluster.
    #[error("byte range at {offset:#x} of length {len:#x} does not fit in a cluster of {cluster_size:#x} bytes")]
    ByteRange {
        /// Offset within the cluster.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// QEMU's `QCOW2_SUBCLUSTER_INVALID`: the bitmap contradicts the entry.
    #[error("Invalid cluster entry found (entry {entry:#x}, bitmap {bitmap:#x})")]
    InvalidSubclusterBitmap {
        /// The entry word.
        entry: u64,
        /// The bitmap word.
        bitmap: u64,
    },
    /// An L1 entry with reserved bits set.
    #[error("found L1 entry with reserved bits set: {entry:x}")]
    L1ReservedBits {
        /// The raw entry.
        entry: u64,
    },
    /// An L1 entry whose L2 table offset is not cluster aligned.
    #[error("l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")]
    L1Unaligned {
        /// The unaligned L2 table offset.
        l2_offset: u64,
    },
    /// A non-compressed L2 entry with reserved bits set.
    #[error("found l2 entry with reserved bits set: {entry:x}")]
    L2ReservedBits {
        /// The raw entry word.
        entry: u64,
    },
    /// A compressed L2 entry with the COPIED flag (compressed clusters are never COPIED).
    #[error("coffset={coffset:#x}: copied flag must never be set for compressed clusters")]
    CompressedCopied {
        /// The compressed data's host offset, as the codec decodes it.
        coffset: u64,
    },
    /// A compressed L2 entry in an image with an external data file.
    #[error("compressed cluster with data file, entry={entry:#x}")]
    CompressedWithDataFile {
        /// The raw entry word.
        entry: u64,
    },
    /// A compressed extended L2 entry whose bitmap is not zero.
    #[error("compressed cluster with non-zero subcluster allocation bitmap, entry={entry:#x}")]
    CompressedWithBitmap {
        /// The raw entry word.
        entry: u64,
        /// The nonzero bitmap.
        bitmap: u64,
    },
    /// An allocated cluster with a subcluster both allocated and reading as zero.
    #[error("offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap")]
    AllocatedBitmapOverlap {
        /// The cluster's host offset.
        offset: u64,
        /// The bitmap word.
        bitmap: u64,
    },
    /// An unallocated cluster with allocation bits in its bitmap.
    #[error("Unallocated cluster has non-zero subcluster allocation map (bitmap {bitmap:#x})")]
    UnallocatedWithAllocBits {
        /// The bitmap word.
        bitmap: u64,
    },
    /// A cluster holding no data (preallocated zero) whose offset is not cluster aligned.
    /// QEMU's `check -r all` repairs this by turning the entry into a plain zero cluster.
    #[error(
        "offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
    )]
    UnalignedPreallocated {
        /// The unaligned host offset.
        offset: u64,
    },
    /// A data cluster whose offset is not cluster aligned (never repairable).
    #[error("offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.")]
    UnalignedData {
        /// The unaligned host offset.
        offset: u64,
    },
}

/// Whether `offset` fits the 512-aligned bits 9-55 offset field of L1/L2 entries.
const fn offset_representable(offset: u64) -> bool {
    offset & !L2E_OFFSET_MASK == 0
}

// ------------------------------------------------------------------------------------------
// L1
// ------------------------------------------------------------------------------------------

/// One L1 table entry: the host offset of an L2 table plus the COPIED flag.
///
/// Holds the raw on-disk word, so reserved bits read from disk survive a round trip and can
/// be reported by [`L1Entry::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L1Entry(u64);

impl L1Entry {
    /// The entry of an unallocated L2 table (all zeros).
    pub const UNALLOCATED: Self = Self(0);

    /// Wraps a raw (host-endian) entry word as read from disk, without any check.
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// Builds an entry pointing at the L2 table at `l2_offset`.
    ///
    /// `l2_offset` must be 512-aligned and below 2^56 to fit the field; cluster alignment is
    /// a geometry question checked by [`L1Entry::validate`].
    pub const fn new(l2_offset: u64, copied: bool) -> Result<Self, EntryError> {
        if !offset_representable(l2_offset) {
            return Err(EntryError::OffsetNotRepresentable { offset: l2_offset });
        }
        Ok(Self(l2_offset | if copied { OFLAG_COPIED } else { 0 }))
    }

    /// The raw entry word.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Host offset of the L2 table; 0 means no L2 table is allocated.
    pub const fn l2_offset(self) -> u64 {
        self.0 & L1E_OFFSET_MASK
    }

    /// Whether an L2 table is allocated.
    pub const fn is_allocated(self) -> bool {
        self.l2_offset() != 0
    }

    /// The COPIED flag: the L2 table's refcount is exactly 1 (meaningful in the active L1).
    pub const fn is_copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }

    /// The same entry with the COPIED flag set or cleared.
    pub const fn with_copied(self, copied: bool) -> Self {
        if copied {
            Self(self.0 | OFLAG_COPIED)
        } else {
            Self(self.0 & !OFLAG_COPIED)
        }
    }

    /// The reserved bits that are set (0 in a valid entry).
    pub const fn reserved_bits(self) -> u64 {
        self.0 & L1E_RESERVED_MASK
    }

    /// QEMU's checks of an L1 entry, in the checker's order: reserved bits, then alignment
    /// of the L2 table offset to `geometry`'s cluster size.
    pub const fn validate(self, geometry: &Geometry) -> Result<(), EntryError> {
        if self.reserved_bits() != 0 {
            return Err(EntryError::L1ReservedBits { entry: self.0 });
        }
        if !geometry.is_cluster_aligned(self.l2_offset()) {
            return Err(EntryError::L1Unaligned {
                l2_offset: self.l2_offset(),
            });
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Classification
// ------------------------------------------------------------------------------------------

/// The image properties that change how an L2 entry is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L2Context {
    /// Extended L2 entries (subcluster bitmaps); the zero flag (bit 0) is then ignored.
    pub extended_l2: bool,
    /// An external data file: offset 0 with COPIED is then a valid data cluster.
    pub external_data_file: bool,
}

impl L2Context {
    /// Standard L2 entries, no external data file (the common case).
    pub const STANDARD: Self = Self {
        extended_l2: false,
        external_data_file: false,
    };

    /// Builds a context.
    pub const fn new(extended_l2: bool, external_data_file: bool) -> Self {
        Self {
            extended_l2,
            external_data_file,
        }
    }

    /// The context of an image with `geometry` (its L2 entry width).
    pub const fn for_geometry(geometry: &Geometry, external_data_file: bool) -> Self {
        Self::new(geometry.extended_l2(), external_data_file)
    }

    /// Size in bytes of one L2 entry in this context.
    pub const fn entry_size(&self) -> usize {
        if self.extended_l2 {
            L2_EXTENDED_ENTRY_SIZE
        } else {
            L2_STANDARD_ENTRY_SIZE
        }
    }
}

/// QEMU's classification of a whole cluster (`QCow2ClusterType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterType {
    /// Not allocated: read from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros, no host cluster (standard L2 only).
    ZeroPlain,
    /// Reads as zeros, with a preallocated host cluster that keeps its refcount.
    ZeroAlloc,
    /// An allocated data cluster.
    Normal,
    /// A compressed cluster.
    Compressed,
}

/// QEMU's classification of one subcluster (`QCow2SubclusterType`). Without extended L2 a
/// cluster is its single subcluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubclusterType {
    /// Part of a compressed cluster.
    Compressed,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, inside an allocated host cluster.
    ZeroAlloc,
    /// Allocated data.
    Normal,
    /// Not allocated, and the cluster has no host cluster.
    UnallocatedPlain,
    /// Not allocated, but the cluster has a host cluster (extended L2 only).
    UnallocatedAlloc,
    /// The bitmap contradicts itself or the entry; QEMU treats this as fatal corruption.
    Invalid,
}

// ------------------------------------------------------------------------------------------
// L2
// ------------------------------------------------------------------------------------------

/// One L2 table entry: the 64-bit entry word and, with extended L2, the subcluster bitmap
/// (always 0 for standard entries).
///
/// Holds raw words, so anything read from disk (reserved bits, contradictory bitmaps) is kept
/// and can be reported by [`L2Entry::problems`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L2Entry {
    entry: u64,
    bitmap: u64,
}

impl L2Entry {
    /// An unallocated cluster (all zeros).
    pub const UNALLOCATED: Self = Self {
        entry: 0,
        bitmap: 0,
    };

    /// Wraps raw (host-endian) words as read from disk, without any check.
    pub const fn from_raw(entry: u64, bitmap: u64) -> Self {
        Self { entry, bitmap }
    }

    /// A data cluster at `host_offset`.
    ///
    /// `host_offset` must fit the 512-aligned bits 9-55 field; cluster alignment is checked by
    /// [`L2Entry::problems`]. With extended L2, combine with [`L2Entry::with_bitmap`].
    pub const fn normal(host_offset: u64, copied: bool) -> Result<Self, EntryError> {
        if !offset_representable(host_offset) {
            return Err(EntryError::OffsetNotRepresentable {
                offset: host_offset,
            });
        }
        Ok(Self {
            entry: host_offset | if copied { OFLAG_COPIED } else { 0 },
            bitmap: 0,
        })
    }

    /// A standard-L2 zero cluster: plain if `host_offset` is 0, else preallocated at
    /// `host_offset` (v3 only; extended L2 expresses zeros through the bitmap instead).
    pub const fn zero(host_offset: u64, copied: bool) -> Result<Self, EntryError> {
        match Self::normal(host_offset, copied) {
            Ok(e) => Ok(Self {
                entry: e.entry | OFLAG_ZERO,
                bitmap: 0,
            }),
            Err(err) => Err(err),
        }
    }

    /// An extended-L2 cluster without host cluster that reads as zeros in every subcluster.
    pub const fn zero_plain_extended() -> Self {
        Self {
            entry: 0,
            bitmap: L2_BITMAP_ALL_ZERO,
        }
    }

    /// A compressed cluster from the 62-bit descriptor (see [`crate::compressed`]).
    /// Bits 62-63 of `descriptor` are ignored: compressed clusters are never COPIED.
    pub const fn compressed(descriptor: u64) -> Self {
        Self {
            entry: (descriptor & !(OFLAG_COPIED | OFLAG_COMPRESSED)) | OFLAG_COMPRESSED,
            bitmap: 0,
        }
    }

    /// The same entry with `bitmap` as its subcluster bitmap.
    pub const fn with_bitmap(self, bitmap: u64) -> Self {
        Self {
            entry: self.entry,
            bitmap,
        }
    }

    /// The same entry with the COPIED flag set or cleared.
    pub const fn with_copied(self, copied: bool) -> Self {
        Self {
            entry: if copied {
                self.entry | OFLAG_COPIED
            } else {
                self.entry & !OFLAG_COPIED
            },
            bitmap: self.bitmap,
        }
    }

    /// The raw 64-bit entry word.
    pub const fn raw_entry(self) -> u64 {
        self.entry
    }

    /// The raw subcluster bitmap (0 for standard entries).
    pub const fn bitmap(self) -> u64 {
        self.bitmap
    }

    /// Bits 0-31 of the bitmap: which subclusters are allocated.
    pub const fn alloc_bitmap(self) -> u32 {
        self.bitmap as u32
    }

    /// Bits 32-63 of the bitmap: which subclusters read as zeros.
    pub const fn zero_bitmap(self) -> u32 {
        (self.bitmap >> 32) as u32
    }

    /// The COPIED flag (refcount exactly 1; never set on compressed clusters).
    pub const fn is_copied(self) -> bool {
        self.entry & OFLAG_COPIED != 0
    }

    /// Whether the cluster is compressed.
    pub const fn is_compressed(self) -> bool {
        self.entry & OFLAG_COMPRESSED != 0
    }

    /// The zero flag (bit 0). Meaningless for compressed entries, ignored with extended L2.
    pub const fn has_zero_flag(self) -> bool {
        self.entry & OFLAG_ZERO != 0
    }

    /// Host cluster offset (bits 9-55). Only meaningful for non-compressed entries.
    pub const fn host_offset(self) -> u64 {
        self.entry & L2E_OFFSET_MASK
    }

    /// The compressed descriptor (bits 0-61), if the entry is compressed.
    pub const fn compressed_descriptor(self) -> Option<u64> {
        if self.is_compressed() {
            Some(self.entry & !(OFLAG_COPIED | OFLAG_COMPRESSED))
        } else {
            None
        }
    }

    /// Reserved bits of a standard cluster descriptor that are set; 0 for compressed entries,
    /// whose descriptor has no reserved bits of this shape.
    pub const fn reserved_bits(self) -> u64 {
        if self.is_compressed() {
            0
        } else {
            self.entry & L2E_STD_RESERVED_MASK
        }
    }

    /// QEMU's `qcow2_get_cluster_type`.
    ///
    /// Offset 0 usually means unallocated, but with an external data file 0 is a valid host
    /// offset; there every allocated cluster has refcount 1, so COPIED disambiguates.
    pub const fn cluster_type(self, ctx: L2Context) -> ClusterType {
        if self.is_compressed() {
            ClusterType::Compressed
        } else if self.has_zero_flag() && !ctx.extended_l2 {
            if self.host_offset() != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if self.host_offset() == 0 {
            if ctx.external_data_file && self.is_copied() {
                ClusterType::Normal
            } else {
                ClusterType::Unallocated
            }
        } else {
            ClusterType::Normal
        }
    }

    /// QEMU's `qcow2_get_subcluster_type` for subcluster `sc_index` (must be < 32; without
    /// extended L2 only index 0 names a real subcluster, but any index < 32 gives the
    /// cluster's type, as in QEMU).
    pub const fn subcluster_type(
        self,
        ctx: L2Context,
        sc_index: u32,
    ) -> Result<SubclusterType, EntryError> {
        if sc_index >= SUBCLUSTERS_PER_CLUSTER {
            return Err(EntryError::SubclusterIndex { index: sc_index });
        }
        let ty = self.cluster_type(ctx);
        if !ctx.extended_l2 {
            return Ok(match ty {
                ClusterType::Compressed => SubclusterType::Compressed,
                ClusterType::ZeroPlain => SubclusterType::ZeroPlain,
                ClusterType::ZeroAlloc => SubclusterType::ZeroAlloc,
                ClusterType::Normal => SubclusterType::Normal,
                ClusterType::Unallocated => SubclusterType::UnallocatedPlain,
            });
        }
        let alloc = self.alloc_bitmap();
        let zero = self.zero_bitmap();
        let bit = 1u32 << sc_index;
        Ok(match ty {
            ClusterType::Compressed => SubclusterType::Compressed,
            // With extended L2 the zero flag is ignored, so `cluster_type` never returns the
            // Zero* types here; they are grouped by whether a host cluster exists.
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                if alloc & zero != 0 {
                    SubclusterType::Invalid
                } else if zero & bit != 0 {
                    SubclusterType::ZeroAlloc
                } else if alloc & bit != 0 {
                    SubclusterType::Normal
                } else {
                    SubclusterType::UnallocatedAlloc
                }
            }
            ClusterType::Unallocated | ClusterType::ZeroPlain => {
                if alloc != 0 {
                    SubclusterType::Invalid
                } else if zero & bit != 0 {
                    SubclusterType::ZeroPlain
                } else {
                    SubclusterType::UnallocatedPlain
                }
            }
        })
    }

    /// The type of subcluster `sc_from` and how many consecutive subclusters from it (within
    /// this cluster) share that type, as QEMU's `qcow2_get_subcluster_range_type`.
    ///
    /// Without extended L2 only `sc_from == 0` is valid and the run is 1; for compressed
    /// clusters the run reaches the end of the cluster. An invalid bitmap is an error rather than a type, since no run makes sense.
    pub const fn subcluster_run(
        self,
        ctx: L2Context,
        sc_from: u32,
    ) -> Result<(SubclusterType, u32), EntryError> {
        let ty = match self.subcluster_type(ctx, sc_from) {
            Ok(SubclusterType::Invalid) => {
                return Err(EntryError::InvalidSubclusterBitmap {
                    entry: self.entry,
                    bitmap: self.bitmap,
                })
            }
            Ok(ty) => ty,
            Err(e) => return Err(e),
        };
        if !ctx.extended_l2 {
            // The cluster is its only subcluster.
            if sc_from != 0 {
                return Err(EntryError::SubclusterIndex { index: sc_from });
            }
            return Ok((ty, 1));
        }
        if matches!(ty, SubclusterType::Compressed) {
            return Ok((ty, SUBCLUSTERS_PER_CLUSTER - sc_from));
        }
        // A run of type T is a run of equal bits in the mask whose bit `sc_from` identifies T;
        // bits below `sc_from` do not matter, so shift them out.
        let alloc = self.alloc_bitmap() >> sc_from;
        let zero = self.zero_bitmap() >> sc_from;
        let avail = SUBCLUSTERS_PER_CLUSTER - sc_from;
        let run = match ty {
            SubclusterType::Normal => alloc.trailing_ones(),
            SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc => zero.trailing_ones(),
            _ => (alloc | zero).trailing_zeros(),
        };
        Ok((ty, if run < avail { run } else { avail }))
    }

    /// Every problem QEMU's checker reports for this entry, in its order (an empty vector for
    /// a valid entry; the vector only allocates when there is something to report).
    ///
    /// `geometry` supplies the cluster size for the alignment checks and the compressed
    /// descriptor layout. Unaligned offsets are classified the way QEMU classifies them:
    /// a cluster that holds no data ("preallocated") is repairable, a data cluster is not.
    pub fn problems(self, ctx: L2Context, geometry: &Geometry) -> Vec<EntryError> {
        let mut out = Vec::new();
        let ty = self.cluster_type(ctx);
        if ty != ClusterType::Compressed && self.reserved_bits() != 0 {
            out.push(EntryError::L2ReservedBits { entry: self.entry });
        }
        let bitmap = if ctx.extended_l2 { self.bitmap } else { 0 };
        match ty {
            ClusterType::Compressed => {
                if self.is_copied() {
                    let fmt = crate::compressed::CompressedFormat::for_geometry(geometry);
                    out.push(EntryError::CompressedCopied {
                        coffset: fmt.decode_raw(self.entry).host_offset(),
                    });
                }
                if ctx.external_data_file {
                    out.push(EntryError::CompressedWithDataFile { entry: self.entry });
                } else if bitmap != 0 {
                    out.push(EntryError::CompressedWithBitmap {
                        entry: self.entry,
                        bitmap,
                    });
                }
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                let offset = self.host_offset();
                if (bitmap >> 32) & bitmap != 0 {
                    out.push(EntryError::AllocatedBitmapOverlap { offset, bitmap });
                }
                if !geometry.is_cluster_aligned(offset) {
                    let contains_data = if ctx.extended_l2 {
                        bitmap & L2_BITMAP_ALL_ALLOC != 0
                    } else {
                        !self.has_zero_flag()
                    };
                    out.push(if contains_data {
                        EntryError::UnalignedData { offset }
                    } else {
                        EntryError::UnalignedPreallocated { offset }
                    });
                }
            }
            ClusterType::ZeroPlain => {}
            ClusterType::Unallocated => {
                if bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                    out.push(EntryError::UnallocatedWithAllocBits { bitmap });
                }
            }
        }
        out
    }

    /// The first of [`L2Entry::problems`], as a result.
    pub fn validate(self, ctx: L2Context, geometry: &Geometry) -> Result<(), EntryError> {
        match self.problems(ctx, geometry).into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Table buffers
// ------------------------------------------------------------------------------------------

/// The byte range of the `N`-byte slot `index` in a table of `len` bytes, if it lies wholly
/// inside the buffer (a trailing partial entry is not an entry).
fn slot_range<const N: usize>(
    len: usize,
    index: u64,
) -> Result<std::ops::Range<usize>, EntryError> {
    let entries = len / N;
    let out_of_range = EntryError::IndexOutOfRange {
        index,
        entries: entries as u64,
    };
    match usize::try_from(index) {
        // i < entries = len / N, so i * N + N <= len: no overflow, in bounds.
        Ok(i) if i < entries => Ok(i * N..i * N + N),
        _ => Err(out_of_range),
    }
}

/// The `N`-byte slot `index` of `table` (see [`slot_range`]).
fn slot<const N: usize>(table: &[u8], index: u64) -> Result<&[u8; N], EntryError> {
    let r = slot_range::<N>(table.len(), index)?;
    table
        .get(r)
        .and_then(|s| s.try_into().ok())
        .ok_or(EntryError::IndexOutOfRange {
            index,
            entries: (table.len() / N) as u64,
        })
}

/// Mutable counterpart of [`slot`].
fn slot_mut<const N: usize>(table: &mut [u8], index: u64) -> Result<&mut [u8; N], EntryError> {
    let r = slot_range::<N>(table.len(), index)?;
    let entries = (table.len() / N) as u64;
    table
        .get_mut(r)
        .and_then(|s| s.try_into().ok())
        .ok_or(EntryError::IndexOutOfRange { index, entries })
}

/// Splits a 16-byte extended entry into its two big-endian words.
fn split_words(s: &[u8; 16]) -> (u64, u64) {
    let mut e = [0u8; 8];
    let mut b = [0u8; 8];
    let (hi, lo) = s.split_at(8);
    e.copy_from_slice(hi);
    b.copy_from_slice(lo);
    (u64::from_be_bytes(e), u64::from_be_bytes(b))
}

/// Reads L1 entry `index` from an L1 table buffer.
pub fn read_l1_entry(table: &[u8], index: u64) -> Result<L1Entry, EntryError> {
    slot::<L1_ENTRY_SIZE>(table, index).map(|s| L1Entry(u64::from_be_bytes(*s)))
}

/// Writes L1 entry `index` into an L1 table buffer.
pub fn write_l1_entry(table: &mut [u8], index: u64, entry: L1Entry) -> Result<(), EntryError> {
    *slot_mut::<L1_ENTRY_SIZE>(table, index)? = entry.0.to_be_bytes();
    Ok(())
}

/// Reads L2 entry `index` from an L2 table (or slice) buffer; `extended` selects 16-byte
/// entries. Standard entries always come back with a zero bitmap.
pub fn read_l2_entry(table: &[u8], index: u64, extended: bool) -> Result<L2Entry, EntryError> {
    if extended {
        let (e, b) = split_words(slot::<L2_EXTENDED_ENTRY_SIZE>(table, index)?);
        Ok(L2Entry::from_raw(e, b))
    } else {
        slot::<L2_STANDARD_ENTRY_SIZE>(table, index)
            .map(|s| L2Entry::from_raw(u64::from_be_bytes(*s), 0))
    }
}

/// Writes L2 entry `index` into an L2 table (or slice) buffer; `extended` selects 16-byte
/// entries. A standard entry cannot hold a bitmap, so a nonzero one is an error rather than
/// being silently dropped.
pub fn write_l2_entry(
    table: &mut [u8],
    index: u64,
    entry: L2Entry,
    extended: bool,
) -> Result<(), EntryError> {
    if extended {
        let s = slot_mut::<L2_EXTENDED_ENTRY_SIZE>(table, index)?;
        let (e, b) = s.split_at_mut(8);
        e.copy_from_slice(&entry.entry.to_be_bytes());
        b.copy_from_slice(&entry.bitmap.to_be_bytes());
    } else {
        if entry.bitmap != 0 {
            return Err(EntryError::BitmapInStandardEntry {
                bitmap: entry.bitmap,
            });
        }
        *slot_mut::<L2_STANDARD_ENTRY_SIZE>(table, index)? = entry.entry.to_be_bytes();
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Subcluster bitmap ranges
// ------------------------------------------------------------------------------------------

/// Bits `start..end` of a 32-bit subcluster mask (QEMU's `QCOW_OFLAG_SUB_ALLOC_RANGE` shape).
/// `start <= end <= 32` is required.
pub const fn subcluster_mask(start: u32, end: u32) -> Result<u32, EntryError> {
    if start > end || end > SUBCLUSTERS_PER_CLUSTER {
        return Err(EntryError::SubclusterRange { start, end });
    }
    if start == end {
        return Ok(0);
    }
    // end - start in 1..=32: build the ones without shifting by 32.
    let ones = u32::MAX >> (32 - (end - start));
    Ok(ones << start)
}

/// The allocation bits (bitmap bits `start..end`) for subclusters `start..end`.
pub const fn subcluster_alloc_range(start: u32, end: u32) -> Result<u64, EntryError> {
    match subcluster_mask(start, end) {
        Ok(m) => Ok(m as u64),
        Err(e) => Err(e),
    }
}

/// The reads-as-zero bits (bitmap bits `32 + start..32 + end`) for subclusters `start..end`.
pub const fn subcluster_zero_range(start: u32, end: u32) -> Result<u64, EntryError> {
    match subcluster_mask(start, end) {
        Ok(m) => Ok((m as u64) << 32),
        Err(e) => Err(e),
    }
}

/// The subclusters touched by bytes `offset..offset + len` of one cluster.
///
/// The range must lie within the cluster. An empty byte range touches no subcluster (an
/// empty range at `offset`'s subcluster is returned). Without extended L2 the cluster is its
/// only subcluster.
pub const fn subclusters_for_bytes(
    geometry: &Geometry,
    offset: u64,
    len: u64,
) -> Result<Range<u32>, EntryError> {
    let cluster_size = geometry.cluster_size();
    let err = EntryError::ByteRange {
        offset,
        len,
        cluster_size,
    };
    let end = match offset.checked_add(len) {
        Some(e) => e,
        None => return Err(err),
    };
    if end > cluster_size {
        return Err(err);
    }
    let bits = geometry.subcluster_bits();
    let first = (offset >> bits) as u32;
    if len == 0 {
        return Ok(first..first);
    }
    // Round the end up to a subcluster boundary; end <= cluster_size so this cannot overflow.
    let last_exclusive = ((end + (1 << bits) - 1) >> bits) as u32;
    Ok(first..last_exclusive)
}

/// The 32-bit subcluster mask for bytes `offset..offset + len` of one cluster: OR it into the
/// allocation half (or shift by 32 for the zero half) of an extended L2 bitmap.
pub const fn subcluster_mask_for_bytes(
    geometry: &Geometry,
    offset: u64,
    len: u64,
) -> Result<u32, EntryError> {
    match subclusters_for_bytes(geometry, offset, len) {
        Ok(r) => subcluster_mask(r.start, r.end),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(bits: u32, ext: bool) -> Geometry {
        Geometry::new(bits, 4, ext).unwrap()
    }

    const EXT: L2Context = L2Context::new(true, false);

    #[test]
    fn l1_entry_codec() {
        let e = L1Entry::new(0x40000, true).unwrap();
        assert_eq!(e.raw(), 0x8000_0000_0004_0000);
        assert_eq!(e.l2_offset(), 0x40000);
        assert!(e.is_copied() && e.is_allocated());
        assert_eq!(e.with_copied(false).raw(), 0x40000);
        assert_eq!(
            L1Entry::new(0x40001, false),
            Err(EntryError::OffsetNotRepresentable { offset: 0x40001 })
        );
        assert_eq!(
            L1Entry::new(1 << 56, false),
            Err(EntryError::OffsetNotRepresentable { offset: 1 << 56 })
        );
        assert!(!L1Entry::UNALLOCATED.is_allocated());
    }

    #[test]
    fn l1_validate() {
        let geo = g(16, false);
        assert_eq!(
            L1Entry::from_raw(0x8000_0000_0004_0000).validate(&geo),
            Ok(())
        );
        assert_eq!(
            L1Entry::from_raw(0x4_0001).validate(&geo),
            Err(EntryError::L1ReservedBits { entry: 0x4_0001 })
        );
        assert_eq!(
            L1Entry::from_raw(0x0100_0000_0000_0000).validate(&geo),
            Err(EntryError::L1ReservedBits {
                entry: 0x0100_0000_0000_0000
            })
        );
        assert_eq!(
            L1Entry::from_raw(0x4_0200).validate(&geo),
            Err(EntryError::L1Unaligned {
                l2_offset: 0x4_0200
            })
        );
        // With 512-byte clusters the same offset is aligned.
        assert_eq!(L1Entry::from_raw(0x4_0200).validate(&g(9, false)), Ok(()));
    }

    #[test]
    fn cluster_types_standard() {
        let s = L2Context::STANDARD;
        let d = L2Context::new(false, true);
        assert_eq!(
            L2Entry::UNALLOCATED.cluster_type(s),
            ClusterType::Unallocated
        );
        assert_eq!(
            L2Entry::from_raw(1, 0).cluster_type(s),
            ClusterType::ZeroPlain
        );
        assert_eq!(
            L2Entry::from_raw(0x10001, 0).cluster_type(s),
            ClusterType::ZeroAlloc
        );
        assert_eq!(
            L2Entry::from_raw(0x10000, 0).cluster_type(s),
            ClusterType::Normal
        );
        assert_eq!(
            L2Entry::from_raw(OFLAG_COMPRESSED | 1, 0).cluster_type(s),
            ClusterType::Compressed
        );
        // Offset 0 + COPIED: a data cluster only with an external data file.
        let zero_copied = L2Entry::from_raw(OFLAG_COPIED, 0);
        assert_eq!(zero_copied.cluster_type(s), ClusterType::Unallocated);
        assert_eq!(zero_copied.cluster_type(d), ClusterType::Normal);
        assert_eq!(
            L2Entry::from_raw(0, 0).cluster_type(d),
            ClusterType::Unallocated
        );
        // Zero flag wins over the data-file rule.
        assert_eq!(
            L2Entry::from_raw(OFLAG_COPIED | 1, 0).cluster_type(d),
            ClusterType::ZeroPlain
        );
    }

    #[test]
    fn extended_ignores_zero_flag() {
        assert_eq!(
            L2Entry::from_raw(1, 0).cluster_type(EXT),
            ClusterType::Unallocated
        );
        assert_eq!(
            L2Entry::from_raw(0x10001, 0).cluster_type(EXT),
            ClusterType::Normal
        );
    }

    #[test]
    fn subcluster_types() {
        let normal = L2Entry::normal(0x50000, true).unwrap();
        // Golden: qemu-io write -P 1 0 2k; write -z 8k 4k on a 64k extended image.
        let e = normal.with_bitmap(0x0000_0030_0000_0001);
        assert_eq!(e.subcluster_type(EXT, 0), Ok(SubclusterType::Normal));
        assert_eq!(
            e.subcluster_type(EXT, 1),
            Ok(SubclusterType::UnallocatedAlloc)
        );
        assert_eq!(e.subcluster_type(EXT, 4), Ok(SubclusterType::ZeroAlloc));
        assert_eq!(e.subcluster_type(EXT, 5), Ok(SubclusterType::ZeroAlloc));
        assert_eq!(
            e.subcluster_type(EXT, 32),
            Err(EntryError::SubclusterIndex { index: 32 })
        );
        // alloc & zero overlap anywhere makes every subcluster invalid.
        let bad = normal.with_bitmap(0x0000_0002_0000_0002);
        assert_eq!(bad.subcluster_type(EXT, 0), Ok(SubclusterType::Invalid));
        let un = L2Entry::zero_plain_extended();
        assert_eq!(un.subcluster_type(EXT, 7), Ok(SubclusterType::ZeroPlain));
        assert_eq!(
            L2Entry::UNALLOCATED.subcluster_type(EXT, 7),
            Ok(SubclusterType::UnallocatedPlain)
        );
        assert_eq!(
            L2Entry::UNALLOCATED
                .with_bitmap(1 << 9)
                .subcluster_type(EXT, 0),
            Ok(SubclusterType::Invalid)
        );
        let c = L2Entry::compressed(0x1234);
        assert_eq!(c.subcluster_type(EXT, 3), Ok(SubclusterType::Compressed));
        // Standard entries map one to one.
        let s = L2Context::STANDARD;
        assert_eq!(
            L2Entry::from_raw(1, 0).subcluster_type(s, 0),
            Ok(SubclusterType::ZeroPlain)
        );
        assert_eq!(
            L2Entry::from_raw(0x10001, 0).subcluster_type(s, 0),
            Ok(SubclusterType::ZeroAlloc)
        );
        assert_eq!(
            L2Entry::UNALLOCATED.subcluster_type(s, 0),
            Ok(SubclusterType::UnallocatedPlain)
        );
        assert_eq!(normal.subcluster_type(s, 0), Ok(SubclusterType::Normal));
    }

    #[test]
    fn subcluster_runs() {
        let e = L2Entry::normal(0x50000, false)
            .unwrap()
            .with_bitmap(0x0000_0030_0000_0007);
        assert_eq!(e.subcluster_run(EXT, 0), Ok((SubclusterType::Normal, 3)));
        assert_eq!(e.subcluster_run(EXT, 1), Ok((SubclusterType::Normal, 2)));
        assert_eq!(
            e.subcluster_run(EXT, 3),
            Ok((SubclusterType::UnallocatedAlloc, 1))
        );
        assert_eq!(e.subcluster_run(EXT, 4), Ok((SubclusterType::ZeroAlloc, 2)));
        assert_eq!(
            e.subcluster_run(EXT, 6),
            Ok((SubclusterType::UnallocatedAlloc, 26))
        );
        let full = e.with_bitmap(L2_BITMAP_ALL_ALLOC);
        assert_eq!(
            full.subcluster_run(EXT, 31),
            Ok((SubclusterType::Normal, 1))
        );
        assert_eq!(
            full.subcluster_run(EXT, 0),
            Ok((SubclusterType::Normal, 32))
        );
        assert_eq!(
            L2Entry::zero_plain_extended().subcluster_run(EXT, 0),
            Ok((SubclusterType::ZeroPlain, 32))
        );
        assert_eq!(
            L2Entry::compressed(5).subcluster_run(EXT, 10),
            Ok((SubclusterType::Compressed, 22))
        );
        assert!(matches!(
            e.with_bitmap(0x1_0000_0001).subcluster_run(EXT, 3),
            Err(EntryError::InvalidSubclusterBitmap { .. })
        ));
        assert_eq!(
            e.subcluster_run(L2Context::STANDARD, 0),
            Ok((SubclusterType::Normal, 1))
        );
    }

    #[test]
    fn problems_match_qemu_checker() {
        let geo = g(16, false);
        let s = L2Context::STANDARD;
        assert!(L2Entry::normal(0x50000, true)
            .unwrap()
            .problems(s, &geo)
            .is_empty());
        assert_eq!(
            L2Entry::from_raw(0x50002, 0).validate(s, &geo),
            Err(EntryError::L2ReservedBits { entry: 0x50002 })
        );
        assert_eq!(
            L2Entry::from_raw(0x50200, 0).validate(s, &geo),
            Err(EntryError::UnalignedData { offset: 0x50200 })
        );
        assert_eq!(
            L2Entry::from_raw(0x50201, 0).validate(s, &geo),
            Err(EntryError::UnalignedPreallocated { offset: 0x50200 })
        );
        let c = L2Entry::from_raw(OFLAG_COMPRESSED | OFLAG_COPIED | 0x50000, 0);
        assert_eq!(
            c.problems(s, &geo),
            vec![EntryError::CompressedCopied { coffset: 0x50000 }]
        );
        // Compressed descriptors have no standard reserved bits.
        assert!(
            L2Entry::from_raw(OFLAG_COMPRESSED | 0x3f00_0000_0000_01ff, 0)
                .problems(s, &geo)
                .is_empty()
        );
        assert_eq!(
            L2Entry::compressed(0x50000).validate(L2Context::new(false, true), &geo),
            Err(EntryError::CompressedWithDataFile {
                entry: OFLAG_COMPRESSED | 0x50000
            })
        );
        let geo_ext = g(16, true);
        assert_eq!(
            L2Entry::compressed(0x50000)
                .with_bitmap(1)
                .validate(EXT, &geo_ext),
            Err(EntryError::CompressedWithBitmap {
                entry: OFLAG_COMPRESSED | 0x50000,
                bitmap: 1
            })
        );
        assert_eq!(
            L2Entry::from_raw(0x50000, 0x1_0000_0001).validate(EXT, &geo_ext),
            Err(EntryError::AllocatedBitmapOverlap {
                offset: 0x50000,
                bitmap: 0x1_0000_0001
            })
        );
        assert_eq!(
            L2Entry::from_raw(0, 0x2).validate(EXT, &geo_ext),
            Err(EntryError::UnallocatedWithAllocBits { bitmap: 2 })
        );
        // Extended: unaligned without allocated subclusters is "preallocated".
        assert_eq!(
            L2Entry::from_raw(0x50200, L2_BITMAP_ALL_ZERO).validate(EXT, &geo_ext),
            Err(EntryError::UnalignedPreallocated { offset: 0x50200 })
        );
        assert_eq!(
            L2Entry::from_raw(0x50200, 1).validate(EXT, &geo_ext),
            Err(EntryError::UnalignedData { offset: 0x50200 })
        );
        // Several problems at once, in QEMU's order.
        assert_eq!(
            L2Entry::from_raw(0x0100_0000_0005_0200, 0).problems(s, &geo),
            vec![
                EntryError::L2ReservedBits {
                    entry: 0x0100_0000_0005_0200
                },
                EntryError::UnalignedData { offset: 0x50200 }
            ]
        );
    }

    #[test]
    fn table_buffers() {
        let mut t = vec![0u8; 64];
        let e = L2Entry::normal(0x50000, true).unwrap();
        write_l2_entry(&mut t, 7, e, false).unwrap();
        assert_eq!(&t[56..64], &[0x80, 0, 0, 0, 0, 5, 0, 0]);
        assert_eq!(read_l2_entry(&t, 7, false), Ok(e));
        assert_eq!(
            read_l2_entry(&t, 8, false),
            Err(EntryError::IndexOutOfRange {
                index: 8,
                entries: 8
            })
        );
        assert_eq!(
            write_l2_entry(&mut t, 0, e.with_bitmap(1), false),
            Err(EntryError::BitmapInStandardEntry { bitmap: 1 })
        );
        let x = e.with_bitmap(0x0000_0030_0000_0001);
        write_l2_entry(&mut t, 3, x, true).unwrap();
        assert_eq!(
            &t[48..64],
            &[0x80, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0x30, 0, 0, 0, 1]
        );
        assert_eq!(read_l2_entry(&t, 3, true), Ok(x));
        assert!(read_l2_entry(&t, 4, true).is_err());
        assert!(read_l2_entry(&t, u64::MAX, true).is_err());
        assert!(write_l2_entry(&mut t, u64::MAX, x, true).is_err());
        // A trailing partial entry is not an entry.
        assert!(read_l1_entry(&t[..15], 1).is_err());
        write_l1_entry(&mut t, 0, L1Entry::new(0x40000, true).unwrap()).unwrap();
        assert_eq!(read_l1_entry(&t, 0).unwrap().raw(), 0x8000_0000_0004_0000);
    }

    /// Golden: `qemu-img create -f qcow2 -o extended_l2=on,cluster_size=64k ext.qcow2 1M`,
    /// then `qemu-io -c 'write -P 1 0 2k' -c 'write -z 8k 4k' -c 'write -P 2 64k 64k'
    /// -c 'write -z 128k 64k' -c 'write -P 3 200k 2k'`; the first four 16-byte entries of the
    /// L2 table at 0x40000 (qemu-img check: no errors).
    #[test]
    fn golden_qemu_extended_l2() {
        let hex = "80000000000500000000003000000001\
                   800000000006000000000000ffffffff\
                   0000000000000000ffffffff00000000\
                   80000000000700000000000000000010";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let geo = g(16, true);
        let e: Vec<L2Entry> = (0..4)
            .map(|i| read_l2_entry(&bytes, i, true).unwrap())
            .collect();
        for x in &e {
            assert!(x.problems(EXT, &geo).is_empty());
        }
        // 0: data in subcluster 0, subclusters 4-5 zeroed, the rest unallocated.
        assert_eq!(e[0].host_offset(), 0x50000);
        assert!(e[0].is_copied());
        assert_eq!(e[0].subcluster_run(EXT, 0), Ok((SubclusterType::Normal, 1)));
        assert_eq!(
            e[0].subcluster_run(EXT, 1),
            Ok((SubclusterType::UnallocatedAlloc, 3))
        );
        assert_eq!(
            e[0].subcluster_run(EXT, 4),
            Ok((SubclusterType::ZeroAlloc, 2))
        );
        // 1: a fully written cluster.
        assert_eq!(
            e[1].subcluster_run(EXT, 0),
            Ok((SubclusterType::Normal, 32))
        );
        // 2: write -z of a whole unallocated cluster: no host cluster, all zero bits.
        assert_eq!(e[2], L2Entry::zero_plain_extended());
        assert_eq!(e[2].cluster_type(EXT), ClusterType::Unallocated);
        assert_eq!(
            e[2].subcluster_run(EXT, 0),
            Ok((SubclusterType::ZeroPlain, 32))
        );
        // 3: 2 KiB at guest 200k = 8k into the cluster: subcluster 4 only.
        assert_eq!(
            e[3].alloc_bitmap(),
            subcluster_mask_for_bytes(&geo, 200 * 1024 - 192 * 1024, 2048).unwrap()
        );
        // Writing the entries back reproduces QEMU's bytes.
        let mut out = vec![0u8; 64];
        for (i, x) in e.iter().enumerate() {
            write_l2_entry(&mut out, i as u64, *x, true).unwrap();
        }
        assert_eq!(out, bytes);
    }

    #[test]
    fn subcluster_ranges() {
        assert_eq!(subcluster_mask(0, 32), Ok(u32::MAX));
        assert_eq!(subcluster_mask(4, 6), Ok(0x30));
        assert_eq!(subcluster_mask(5, 5), Ok(0));
        assert_eq!(subcluster_mask(31, 32), Ok(1 << 31));
        assert!(subcluster_mask(6, 5).is_err());
        assert!(subcluster_mask(0, 33).is_err());
        assert_eq!(subcluster_zero_range(4, 6), Ok(0x30 << 32));
        assert_eq!(subcluster_alloc_range(0, 1), Ok(1));
        let geo = g(16, true);
        // 8k..12k with 2 KiB subclusters: subclusters 4 and 5 (the golden write -z 8k 4k).
        assert_eq!(subclusters_for_bytes(&geo, 8192, 4096), Ok(4..6));
        assert_eq!(subcluster_mask_for_bytes(&geo, 8192, 4096), Ok(0x30));
        assert_eq!(subcluster_mask_for_bytes(&geo, 1, 1), Ok(1));
        assert_eq!(subcluster_mask_for_bytes(&geo, 2047, 2), Ok(3));
        assert_eq!(subcluster_mask_for_bytes(&geo, 0, 65536), Ok(u32::MAX));
        assert_eq!(subcluster_mask_for_bytes(&geo, 100, 0), Ok(0));
        assert!(subcluster_mask_for_bytes(&geo, 65535, 2).is_err());
        assert!(subcluster_mask_for_bytes(&geo, u64::MAX, 2).is_err());
        // Without extended L2 the cluster is a single subcluster.
        assert_eq!(subcluster_mask_for_bytes(&g(16, false), 9000, 10), Ok(1));
    }
}
