//! Cluster geometry: the one place that answers offset and index questions.
//!
//! Every shift and mask derived from `cluster_bits`, `refcount_order` and the L2 entry width
//! lives here, with checked arithmetic wherever an input can come from disk.

use crate::limits::{
    ENTRY_SIZE, MAX_CLUSTER_BITS, MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, MIN_SUBCLUSTER_SIZE,
    SUBCLUSTERS_PER_CLUSTER,
};

/// Geometry parameters that cannot describe a valid image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// `cluster_bits` outside QEMU's 9..=21.
    #[error("Unsupported cluster size: 2^{cluster_bits}")]
    ClusterBits {
        /// The rejected value.
        cluster_bits: u32,
    },
    /// `refcount_order` above 6.
    #[error("Reference count entry width too large; may not exceed 64 bits (refcount_order {refcount_order})")]
    RefcountOrder {
        /// The rejected value.
        refcount_order: u32,
    },
    /// Extended L2 entries with subclusters smaller than 512 bytes.
    #[error("Unsupported subcluster size: {subcluster_size}")]
    SubclusterSize {
        /// The subcluster size the cluster size implies.
        subcluster_size: u64,
    },
}

/// The shape of an image's clusters, L2 tables and refcount blocks.
///
/// Invariants (checked by [`Geometry::new`]): `9 <= cluster_bits <= 21`,
/// `refcount_order <= 6`, and with extended L2 `cluster_bits >= 14`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    cluster_bits: u32,
    refcount_order: u32,
    extended_l2: bool,
}

impl Geometry {
    /// Validates and builds a geometry.
    pub fn new(
        cluster_bits: u32,
        refcount_order: u32,
        extended_l2: bool,
    ) -> Result<Self, GeometryError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(GeometryError::ClusterBits { cluster_bits });
        }
        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(GeometryError::RefcountOrder { refcount_order });
        }
        if extended_l2 {
            let subcluster_size = (1u64 << cluster_bits) / u64::from(SUBCLUSTERS_PER_CLUSTER);
            if subcluster_size < MIN_SUBCLUSTER_SIZE {
                return Err(GeometryError::SubclusterSize { subcluster_size });
            }
        }
        Ok(Self {
            cluster_bits,
            refcount_order,
            extended_l2,
        })
    }

    /// `log2(cluster_size)`.
    pub const fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// Cluster size in bytes.
    pub const fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// `log2(refcount_bits)`.
    pub const fn refcount_order(&self) -> u32 {
        self.refcount_order
    }

    /// Width of one refcount in bits (1..=64).
    pub const fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Largest refcount a block entry can hold (`2^refcount_bits - 1`).
    pub const fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }

    /// Whether L2 entries are extended (128-bit, with a subcluster bitmap).
    pub const fn extended_l2(&self) -> bool {
        self.extended_l2
    }

    /// Size of one L2 entry: 8 bytes, or 16 with extended L2.
    pub const fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// `log2` of the number of entries in one L2 table.
    pub const fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// Number of entries in one L2 table.
    pub const fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }

    /// Guest bytes mapped by one L2 table (one L1 entry).
    pub const fn l2_coverage(&self) -> u64 {
        1 << (self.l2_bits() + self.cluster_bits)
    }

    /// Index into the L1 table for a guest offset.
    pub const fn l1_index(&self, guest_offset: u64) -> u64 {
        guest_offset >> (self.l2_bits() + self.cluster_bits)
    }

    /// Index into the L2 table for a guest offset.
    pub const fn l2_index(&self, guest_offset: u64) -> u64 {
        (guest_offset >> self.cluster_bits) & (self.l2_entries() - 1)
    }

    /// Number of L1 entries needed to map `virtual_size` bytes (`ceil(size / l2_coverage)`).
    pub const fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        let shift = self.l2_bits() + self.cluster_bits;
        let whole = virtual_size >> shift;
        if virtual_size & ((1 << shift) - 1) != 0 {
            whole + 1
        } else {
            whole
        }
    }

    /// Number of L1 or refcount-table entries that fit in one cluster.
    pub const fn table_entries_per_cluster(&self) -> u64 {
        self.cluster_size() / ENTRY_SIZE
    }

    /// Byte offset within its cluster.
    pub const fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// Whether `offset` is a multiple of the cluster size.
    pub const fn is_cluster_aligned(&self, offset: u64) -> bool {
        self.offset_in_cluster(offset) == 0
    }

    /// Start of the cluster containing `offset`.
    pub const fn start_of_cluster(&self, offset: u64) -> u64 {
        offset & !(self.cluster_size() - 1)
    }

    /// Index of the cluster containing host offset `offset`.
    pub const fn cluster_index(&self, offset: u64) -> u64 {
        offset >> self.cluster_bits
    }

    /// Host offset of cluster `index`, or `None` if it does not fit in 64 bits.
    pub const fn cluster_offset(&self, index: u64) -> Option<u64> {
        if index > (u64::MAX >> self.cluster_bits) {
            None
        } else {
            Some(index << self.cluster_bits)
        }
    }

    /// Number of clusters needed to hold `bytes` bytes (`ceil`). Never overflows.
    pub const fn size_to_clusters(&self, bytes: u64) -> u64 {
        let whole = bytes >> self.cluster_bits;
        if self.offset_in_cluster(bytes) != 0 {
            whole + 1
        } else {
            whole
        }
    }

    /// `bytes` rounded up to a whole number of clusters, or `None` on overflow.
    pub const fn round_up_to_cluster(&self, bytes: u64) -> Option<u64> {
        self.cluster_offset(self.size_to_clusters(bytes))
    }

    /// `log2` of the number of refcounts in one refcount block.
    pub const fn refcount_block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }

    /// Number of refcounts in one refcount block.
    pub const fn refcount_block_entries(&self) -> u64 {
        1 << self.refcount_block_bits()
    }

    /// Host bytes described by one refcount block.
    pub const fn refcount_block_coverage(&self) -> u64 {
        // refcount_block_bits + cluster_bits <= 21 + 3 + 21 = 45: cannot overflow.
        1 << (self.refcount_block_bits() + self.cluster_bits)
    }

    /// Refcount-table index of the block that holds cluster `cluster_index`'s refcount.
    pub const fn reftable_index(&self, cluster_index: u64) -> u64 {
        cluster_index >> self.refcount_block_bits()
    }

    /// Index of cluster `cluster_index`'s refcount inside its refcount block.
    pub const fn refblock_index(&self, cluster_index: u64) -> u64 {
        cluster_index & (self.refcount_block_entries() - 1)
    }

    /// Subcluster size (cluster size / 32) with extended L2; the cluster size otherwise.
    pub const fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS_PER_CLUSTER as u64
        } else {
            self.cluster_size()
        }
    }

    /// `log2(subcluster_size)`.
    pub const fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    /// Index of the subcluster containing guest offset `offset` within its cluster
    /// (always 0 without extended L2).
    pub const fn subcluster_index(&self, offset: u64) -> u32 {
        (self.offset_in_cluster(offset) >> self.subcluster_bits()) as u32
    }

    /// Number of subclusters per cluster: 32 with extended L2, else 1.
    pub const fn subclusters_per_cluster(&self) -> u32 {
        if self.extended_l2 {
            SUBCLUSTERS_PER_CLUSTER
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry() {
        let g = Geometry::new(16, 4, false).unwrap();
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        assert_eq!(g.refcount_block_entries(), 32768);
        assert_eq!(g.refcount_max(), 0xffff);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for((1 << 30) + 1), 3);
        assert_eq!(g.l1_entries_for(0), 0);
        assert_eq!(g.l1_index(0x2000_0000), 1);
        assert_eq!(g.l2_index(0x2001_0000), 1);
        assert_eq!(g.reftable_index(32768), 1);
        assert_eq!(g.refblock_index(32769), 1);
        assert_eq!(g.size_to_clusters(1), 1);
        assert_eq!(g.size_to_clusters(65536), 1);
        assert_eq!(g.round_up_to_cluster(u64::MAX), None);
    }

    #[test]
    fn every_refcount_order() {
        for order in 0..=6 {
            let g = Geometry::new(9, order, false).unwrap();
            assert_eq!(
                u64::from(g.refcount_bits()) * g.refcount_block_entries(),
                512 * 8
            );
            if order < 6 {
                assert_eq!(g.refcount_max(), (1u64 << (1 << order)) - 1);
            }
        }
        assert_eq!(Geometry::new(9, 6, false).unwrap().refcount_max(), u64::MAX);
    }

    #[test]
    fn rejects_invalid() {
        assert_eq!(
            Geometry::new(8, 4, false),
            Err(GeometryError::ClusterBits { cluster_bits: 8 })
        );
        assert_eq!(
            Geometry::new(22, 4, false),
            Err(GeometryError::ClusterBits { cluster_bits: 22 })
        );
        assert_eq!(
            Geometry::new(16, 7, false),
            Err(GeometryError::RefcountOrder { refcount_order: 7 })
        );
        assert_eq!(
            Geometry::new(13, 4, true),
            Err(GeometryError::SubclusterSize {
                subcluster_size: 256
            })
        );
        let g = Geometry::new(14, 4, true).unwrap();
        assert_eq!(g.subcluster_size(), 512);
        assert_eq!(g.l2_entries(), 1024);
        assert_eq!(g.subcluster_index(16383), 31);
    }

    #[test]
    fn cluster_offset_is_checked() {
        let g = Geometry::new(21, 4, false).unwrap();
        assert_eq!(
            g.cluster_offset(u64::MAX >> 21),
            Some((u64::MAX >> 21) << 21)
        );
        assert_eq!(g.cluster_offset((u64::MAX >> 21) + 1), None);
    }
}
