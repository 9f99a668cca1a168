//! Compressed-cluster descriptors (bits 0-61 of a compressed L2 entry).
//!
//! With `x = 62 - (cluster_bits - 8)`, bits `0..x` hold the host **byte** offset of the
//! compressed data and bits `x..62` the number of 512-byte sectors that follow the sector
//! containing that offset. The data may run into the next host cluster, and two compressed
//! clusters may share a sector, so every host cluster that `[offset, offset + csize)` touches
//! holds one reference per compressed cluster stored in it.

use core::ops::RangeInclusive;

use crate::entry::{L2Entry, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::geometry::Geometry;
use crate::limits::{MAX_CLUSTER_BITS, MAX_CLUSTER_OFFSET, MIN_CLUSTER_BITS, SECTOR_SIZE};

/// Errors of the compressed-descriptor codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CompressedError {
    /// `cluster_bits` outside 9..=21.
    #[error("Unsupported cluster size: 2^{cluster_bits}")]
    ClusterBits {
        /// The rejected value.
        cluster_bits: u32,
    },
    /// Compressed data of length 0 has no sectors to describe.
    #[error("compressed data at {offset:#x} is empty")]
    Empty {
        /// Host offset of the data.
        offset: u64,
    },
    /// The host offset is above what the descriptor (and QEMU's allocator) can address.
    #[error("compressed data offset {offset:#x} exceeds the limit {limit:#x}")]
    OffsetTooLarge {
        /// The rejected offset.
        offset: u64,
        /// `min(offset mask, 2^56 - 1)` for this cluster size.
        limit: u64,
    },
    /// The data spans more sectors than the sector-count field holds.
    #[error("compressed data at {offset:#x} of {len} bytes needs {extra_sectors} additional sectors, more than the {max} the descriptor holds")]
    TooManySectors {
        /// Host offset of the data.
        offset: u64,
        /// Length of the data.
        len: u64,
        /// Additional sectors needed.
        extra_sectors: u64,
        /// Largest additional-sector count the field holds.
        max: u64,
    },
    /// `offset + length` does not fit in 64 bits.
    #[error("compressed data at {offset:#x} of {len:#x} bytes ends beyond 2^64")]
    Overflow {
        /// Host offset of the data.
        offset: u64,
        /// Length of the data.
        len: u64,
    },
    /// The L2 entry given to the decoder is not a compressed one.
    #[error("L2 entry {entry:#x} is not compressed")]
    NotCompressed {
        /// The raw entry word.
        entry: u64,
    },
}

/// The descriptor layout for one cluster size (QEMU's `csize_shift`, `csize_mask` and
/// `cluster_offset_mask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressedFormat {
    cluster_bits: u32,
    csize_shift: u32,
    csize_mask: u64,
    offset_mask: u64,
}

impl CompressedFormat {
    /// The layout for `cluster_bits` (9..=21).
    pub const fn new(cluster_bits: u32) -> Result<Self, CompressedError> {
        if cluster_bits < MIN_CLUSTER_BITS || cluster_bits > MAX_CLUSTER_BITS {
            return Err(CompressedError::ClusterBits { cluster_bits });
        }
        Ok(Self::from_valid_bits(cluster_bits))
    }

    /// The layout for an image's geometry (whose `cluster_bits` is already validated).
    pub const fn for_geometry(geometry: &Geometry) -> Self {
        Self::from_valid_bits(geometry.cluster_bits())
    }

    /// Builds the layout; `cluster_bits` must be in 9..=21 (so every shift below is < 64).
    const fn from_valid_bits(cluster_bits: u32) -> Self {
        let count_bits = cluster_bits - 8;
        let csize_shift = 62 - count_bits;
        Self {
            cluster_bits,
            csize_shift,
            csize_mask: (1 << count_bits) - 1,
            offset_mask: (1 << csize_shift) - 1,
        }
    }

    /// The cluster size exponent this layout belongs to.
    pub const fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// Bit position of the sector-count field (`62 - (cluster_bits - 8)`).
    pub const fn csize_shift(&self) -> u32 {
        self.csize_shift
    }

    /// Largest value of the additional-sectors field (`2^(cluster_bits - 8) - 1`).
    pub const fn max_extra_sectors(&self) -> u64 {
        self.csize_mask
    }

    /// Mask of the host-offset field (bits `0..csize_shift`).
    pub const fn offset_mask(&self) -> u64 {
        self.offset_mask
    }

    /// Largest host offset compressed data may start at: the offset field's reach, capped by
    /// QEMU's `QCOW_MAX_CLUSTER_OFFSET` (what `qcow2_alloc_bytes` enforces).
    pub const fn offset_limit(&self) -> u64 {
        if self.offset_mask < MAX_CLUSTER_OFFSET {
            self.offset_mask
        } else {
            MAX_CLUSTER_OFFSET
        }
    }

    /// Decodes the descriptor bits of any word (bits 62-63 are ignored), as QEMU's
    /// `qcow2_parse_compressed_l2_entry` does. Never fails: every bit pattern decodes.
    pub const fn decode_raw(&self, word: u64) -> CompressedDescriptor {
        CompressedDescriptor {
            host_offset: word & self.offset_mask,
            extra_sectors: (word >> self.csize_shift) & self.csize_mask,
        }
    }

    /// Decodes a compressed L2 entry.
    pub const fn decode(&self, entry: L2Entry) -> Result<CompressedDescriptor, CompressedError> {
        if !entry.is_compressed() {
            return Err(CompressedError::NotCompressed {
                entry: entry.raw_entry(),
            });
        }
        Ok(self.decode_raw(entry.raw_entry()))
    }

    /// Describes `len` bytes of compressed data at host byte `offset`, with QEMU's writer
    /// rule: the sector field is the index of the sector holding the last byte minus the
    /// index of the sector holding the first.
    pub const fn describe(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<CompressedDescriptor, CompressedError> {
        if len == 0 {
            return Err(CompressedError::Empty { offset });
        }
        let limit = self.offset_limit();
        if offset > limit {
            return Err(CompressedError::OffsetTooLarge { offset, limit });
        }
        let last = match offset.checked_add(len - 1) {
            Some(l) => l,
            None => return Err(CompressedError::Overflow { offset, len }),
        };
        let extra_sectors = last / SECTOR_SIZE - offset / SECTOR_SIZE;
        if extra_sectors > self.csize_mask {
            return Err(CompressedError::TooManySectors {
                offset,
                len,
                extra_sectors,
                max: self.csize_mask,
            });
        }
        Ok(CompressedDescriptor {
            host_offset: offset,
            extra_sectors,
        })
    }

    /// Encodes `len` bytes at `offset` as a compressed L2 entry (COPIED clear, no bitmap).
    pub const fn encode(&self, offset: u64, len: u64) -> Result<L2Entry, CompressedError> {
        match self.describe(offset, len) {
            Ok(d) => match self.to_entry(&d) {
                Ok(e) => Ok(e),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Encodes a descriptor as a compressed L2 entry, checking that both fields fit.
    pub const fn to_entry(&self, d: &CompressedDescriptor) -> Result<L2Entry, CompressedError> {
        if d.host_offset > self.offset_limit() {
            return Err(CompressedError::OffsetTooLarge {
                offset: d.host_offset,
                limit: self.offset_limit(),
            });
        }
        if d.extra_sectors > self.csize_mask {
            return Err(CompressedError::TooManySectors {
                offset: d.host_offset,
                len: d.compressed_size(),
                extra_sectors: d.extra_sectors,
                max: self.csize_mask,
            });
        }
        let word = OFLAG_COMPRESSED | (d.extra_sectors << self.csize_shift) | d.host_offset;
        // Compressed clusters never carry COPIED (their refcount is per host cluster).
        Ok(L2Entry::from_raw(word & !OFLAG_COPIED, 0))
    }
}

/// A decoded compressed-cluster descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressedDescriptor {
    host_offset: u64,
    extra_sectors: u64,
}

impl CompressedDescriptor {
    /// Host byte offset of the compressed data (not aligned).
    pub const fn host_offset(&self) -> u64 {
        self.host_offset
    }

    /// The raw sector field: sectors after the one containing the offset.
    pub const fn extra_sectors(&self) -> u64 {
        self.extra_sectors
    }

    /// Number of 512-byte sectors the data spans (`extra_sectors + 1`).
    pub const fn nb_sectors(&self) -> u64 {
        self.extra_sectors + 1
    }

    /// QEMU's `csize`: bytes from the offset to the end of the last sector
    /// (`nb_sectors * 512 - offset % 512`). At most `2^13 * 512`, never overflows, never 0.
    pub const fn compressed_size(&self) -> u64 {
        self.nb_sectors() * SECTOR_SIZE - self.host_offset % SECTOR_SIZE
    }

    /// Whether the offset is within `format`'s limit (bits above 55 are reserved, and with
    /// small clusters the offset field is wider than that).
    pub const fn offset_in_limit(&self, format: &CompressedFormat) -> bool {
        self.host_offset <= format.offset_limit()
    }

    /// The indexes of the first and last host clusters that `[offset, offset + csize)`
    /// touches: each gets one reference for this compressed cluster.
    pub const fn host_clusters(
        &self,
        geometry: &Geometry,
    ) -> Result<RangeInclusive<u64>, CompressedError> {
        let len = self.compressed_size();
        let last = match self.host_offset.checked_add(len - 1) {
            Some(l) => l,
            None => {
                return Err(CompressedError::Overflow {
                    offset: self.host_offset,
                    len,
                })
            }
        };
        Ok(geometry.cluster_index(self.host_offset)..=geometry.cluster_index(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(bits: u32) -> CompressedFormat {
        CompressedFormat::new(bits).unwrap()
    }

    #[test]
    fn layout_table() {
        // The table of the qcow2 spec: offset bits, count bits, cap at 2^56.
        let f9 = fmt(9);
        assert_eq!(f9.csize_shift(), 61);
        assert_eq!(f9.max_extra_sectors(), 1);
        assert_eq!(f9.offset_limit(), MAX_CLUSTER_OFFSET);
        let f14 = fmt(14);
        assert_eq!(f14.csize_shift(), 56);
        assert_eq!(f14.offset_limit(), (1 << 56) - 1);
        let f16 = fmt(16);
        assert_eq!(f16.csize_shift(), 54);
        assert_eq!(f16.max_extra_sectors(), 255);
        assert_eq!(f16.offset_limit(), (1 << 54) - 1);
        let f21 = fmt(21);
        assert_eq!(f21.csize_shift(), 49);
        assert_eq!(f21.max_extra_sectors(), 8191);
        assert_eq!(f21.offset_limit(), (1 << 49) - 1);
        assert_eq!(
            CompressedFormat::new(8),
            Err(CompressedError::ClusterBits { cluster_bits: 8 })
        );
        assert_eq!(
            CompressedFormat::new(22),
            Err(CompressedError::ClusterBits { cluster_bits: 22 })
        );
    }

    /// Golden entries from `qemu-img convert -c -O qcow2 -o cluster_size=N semi.raw`, where
    /// semi.raw is 256 KiB alternating 16 random bytes (Python `random.seed(7)`) and 16 zero
    /// bytes; read from the first L2 table with a hex dump.
    #[test]
    fn golden_qemu_descriptors() {
        let cases: &[(u32, u64, u64, u64)] = &[
            // (cluster_bits, entry, host_offset, nb_sectors)
            (9, 0x4000_0000_0000_0a00, 0xa00, 1),
            (9, 0x6000_0000_0000_0b2f, 0xb2f, 2),
            (12, 0x5000_0000_0000_5000, 0x5000, 5),
            (12, 0x5400_0000_0000_61e8, 0x61e8, 6),
            (16, 0x5180_0000_0005_0000, 0x50000, 71),
            (16, 0x5180_0000_0005_8c5a, 0x58c5a, 71),
            (16, 0x5180_0000_0006_a51d, 0x6a51d, 71),
            (21, 0x423a_0000_00a0_0000, 0xa0_0000, 286),
            // qemu-io -c 'write -c -P 0x11 0 64k' on a 64k-cluster image.
            (16, 0x4000_0000_0005_0000, 0x50000, 1),
            (16, 0x4000_0000_0005_004f, 0x5004f, 1),
        ];
        for &(bits, raw, off, nb) in cases {
            let f = fmt(bits);
            let d = f.decode(L2Entry::from_raw(raw, 0)).unwrap();
            assert_eq!(d.host_offset(), off, "{raw:#x}");
            assert_eq!(d.nb_sectors(), nb, "{raw:#x}");
            // Re-encoding csize bytes gives back the same entry (csize ends a sector).
            assert_eq!(f.encode(off, d.compressed_size()).unwrap().raw_entry(), raw);
        }
        // The third 64k descriptor spills into the next host cluster.
        let d = fmt(16).decode_raw(0x5180_0000_0006_a51d);
        let g = Geometry::new(16, 4, false).unwrap();
        assert_eq!(d.host_clusters(&g), Ok(6..=7));
        // The first one shares its tail sector with the second.
        let d0 = fmt(16).decode_raw(0x5180_0000_0005_0000);
        assert!(d0.host_offset() + d0.compressed_size() > 0x58c5a);
    }

    #[test]
    fn encode_rules() {
        let f = fmt(16);
        // One byte in the last byte of a sector: 0 extra sectors, csize 1.
        let d = f.describe(511, 1).unwrap();
        assert_eq!((d.extra_sectors(), d.compressed_size()), (0, 1));
        // Crossing one sector boundary.
        let d = f.describe(511, 2).unwrap();
        assert_eq!((d.extra_sectors(), d.compressed_size()), (1, 513));
        assert_eq!(f.describe(7, 0), Err(CompressedError::Empty { offset: 7 }));
        assert!(matches!(
            f.describe(1 << 54, 10),
            Err(CompressedError::OffsetTooLarge { .. })
        ));
        assert!(matches!(
            f.describe(0, 256 * 512 + 1),
            Err(CompressedError::TooManySectors {
                extra_sectors: 256,
                max: 255,
                ..
            })
        ));
        assert!(f.describe(0, 256 * 512).is_ok());
        let f9 = fmt(9);
        assert!(matches!(
            f9.describe(MAX_CLUSTER_OFFSET, u64::MAX),
            Err(CompressedError::Overflow { .. })
        ));
        assert!(matches!(
            f9.describe(MAX_CLUSTER_OFFSET + 1, 1),
            Err(CompressedError::OffsetTooLarge { .. })
        ));
        // QEMU's writer always fits: at most cluster_size - 1 bytes at any offset.
        for bits in 9..=21 {
            let f = fmt(bits);
            assert!(f.describe(511, (1 << bits) - 1).is_ok(), "{bits}");
        }
    }

    #[test]
    fn decode_wide_offsets() {
        // With 512-byte clusters the offset field reaches bit 60; the codec decodes it as QEMU
        // does and reports it as out of limit.
        let f = fmt(9);
        let d = f.decode_raw(OFLAG_COMPRESSED | (1 << 60) | 5);
        assert_eq!(d.host_offset(), (1 << 60) | 5);
        assert!(!d.offset_in_limit(&f));
        assert!(f.to_entry(&d).is_err());
        assert!(f
            .decode(L2Entry::from_raw(0x50000, 0))
            .is_err_and(|e| e == CompressedError::NotCompressed { entry: 0x50000 }));
        // The widest decodable descriptor still has a computable host-cluster range
        // (offsets stay below 2^61, so the checked end never overflows in practice).
        let g = Geometry::new(9, 4, false).unwrap();
        let d = f.decode_raw(u64::MAX);
        let off = (1u64 << 61) - 1;
        assert_eq!(d.compressed_size(), 1024 - 511);
        assert_eq!(d.host_clusters(&g), Ok(off >> 9..=(off + 512) >> 9));
    }
}
