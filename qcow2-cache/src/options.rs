//! Cache sizing: per-cache options and QEMU's default sizes (`read_cache_sizes`).

use crate::{CacheError, CacheId};
use qcow2_format::Geometry;

/// Smallest entry size: one 512-byte sector (QEMU's minimum `l2-cache-entry-size`).
pub const MIN_ENTRY_SIZE: usize = 512;
/// Largest entry size: the largest cluster qcow2 allows (2 MiB).
pub const MAX_ENTRY_SIZE: usize = 1 << qcow2_format::limits::MAX_CLUSTER_BITS;
/// QEMU's default upper bound of the L2 cache on Linux (`DEFAULT_L2_CACHE_MAX_SIZE`).
pub const DEFAULT_L2_CACHE_MAX_SIZE: u64 = 32 << 20;
/// QEMU's minimum number of L2 cache entries: copy-on-write needs two slices pinned at once.
pub const MIN_L2_CACHE_ENTRIES: usize = 2;
/// QEMU's minimum (and default) number of refcount-block cache entries.
pub const MIN_REFCOUNT_CACHE_ENTRIES: usize = 4;
/// The L2 entry size QEMU falls back to when the L2 cache cannot map the whole disk: smaller
/// slices make each miss and eviction cheaper.
pub const SMALL_L2_ENTRY_SIZE: u64 = 4096;

/// The shape of one cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    /// Bytes per entry: a power of two in `512..=2 MiB`. For the refcount-block cache this is
    /// the cluster size; for the L2 cache it is the L2 slice size (at most a cluster).
    pub entry_size: usize,
    /// Number of entries (at least 1). Memory is `capacity * entry_size` bytes, allocated
    /// once.
    pub capacity: usize,
    /// Write every dirty entry back as soon as its handle is put (QEMU's 2011
    /// `cache=writethrough` cache mode), instead of at flush or eviction.
    pub writethrough: bool,
}

impl CacheOptions {
    /// A write-back cache of `capacity` entries of `entry_size` bytes.
    pub const fn new(entry_size: usize, capacity: usize) -> Self {
        Self {
            entry_size,
            capacity,
            writethrough: false,
        }
    }

    /// The same options in write-through mode.
    pub const fn with_writethrough(mut self, writethrough: bool) -> Self {
        self.writethrough = writethrough;
        self
    }

    /// Converts a cache size in bytes (`l2-cache-size`, `refcount-cache-size`) to entries as
    /// QEMU does: integer division by the entry size, then at least `min_entries`.
    pub fn from_cache_size(cache_size: u64, entry_size: usize, min_entries: usize) -> Self {
        let per_entry = (entry_size as u64).max(1);
        let entries = usize::try_from(cache_size / per_entry).unwrap_or(usize::MAX);
        Self::new(entry_size, entries.max(min_entries))
    }

    /// Total bytes of entry memory these options ask for, if it fits in `usize`.
    pub fn memory(&self) -> Option<usize> {
        self.entry_size.checked_mul(self.capacity)
    }

    pub(crate) fn validate(&self, cache: CacheId) -> Result<(), CacheError> {
        let bad = |reason: String| Err(CacheError::InvalidOptions { cache, reason });
        if !self.entry_size.is_power_of_two()
            || !(MIN_ENTRY_SIZE..=MAX_ENTRY_SIZE).contains(&self.entry_size)
        {
            return bad(format!(
                "entry size {} is not a power of two between {MIN_ENTRY_SIZE} and {MAX_ENTRY_SIZE}",
                self.entry_size
            ));
        }
        if self.capacity == 0 {
            return bad("capacity must be at least one entry".into());
        }
        // Slot indexes are stored as u32 with u32::MAX as the list terminator.
        if self.capacity >= u32::MAX as usize {
            return bad(format!("capacity {} is too large", self.capacity));
        }
        match self.memory() {
            Some(m) if m <= isize::MAX as usize => Ok(()),
            _ => bad(format!(
                "{} entries of {} bytes do not fit in memory",
                self.capacity, self.entry_size
            )),
        }
    }
}

/// QEMU's default L2 cache for an image (`read_cache_sizes` without user options): large
/// enough to map the whole virtual disk, but at most [`DEFAULT_L2_CACHE_MAX_SIZE`]; entries
/// are whole L2 tables (one cluster) when the cache covers the disk, else 4 KiB slices (or
/// the cluster size if smaller); never fewer than [`MIN_L2_CACHE_ENTRIES`].
pub fn default_l2_options(virtual_size: u64, geometry: &Geometry) -> CacheOptions {
    let cluster_size = geometry.cluster_size();
    let max_l2_entries = virtual_size.div_ceil(cluster_size);
    // An L2 table is a whole cluster, so the cache that maps everything is a whole number of
    // clusters.
    let max_l2_cache = max_l2_entries
        .saturating_mul(geometry.l2_entry_size())
        .div_ceil(cluster_size)
        .saturating_mul(cluster_size);
    let l2_cache_size = max_l2_cache.min(DEFAULT_L2_CACHE_MAX_SIZE);
    let entry_size = if l2_cache_size < max_l2_cache {
        cluster_size.min(SMALL_L2_ENTRY_SIZE)
    } else {
        cluster_size
    };
    // entry_size <= 2 MiB always fits in usize.
    let entry_size = usize::try_from(entry_size).unwrap_or(MAX_ENTRY_SIZE);
    CacheOptions::from_cache_size(l2_cache_size, entry_size, MIN_L2_CACHE_ENTRIES)
}

/// QEMU's default refcount-block cache: [`MIN_REFCOUNT_CACHE_ENTRIES`] clusters, one refcount
/// block per entry.
pub fn default_refblock_options(geometry: &Geometry) -> CacheOptions {
    let cluster_size = usize::try_from(geometry.cluster_size()).unwrap_or(MAX_ENTRY_SIZE);
    CacheOptions::new(cluster_size, MIN_REFCOUNT_CACHE_ENTRIES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cluster_bits: u32, extended_l2: bool) -> Geometry {
        Geometry::new(cluster_bits, 4, extended_l2).unwrap()
    }

    #[test]
    fn default_l2_small_disk_maps_everything_with_whole_tables() {
        // 1 GiB, 64 KiB clusters: 16384 L2 entries * 8 B = 128 KiB = 2 tables.
        let o = default_l2_options(1 << 30, &geo(16, false));
        assert_eq!(o, CacheOptions::new(65536, 2));
        // One byte more needs a third (partly used) table: rounded up to whole clusters.
        let o = default_l2_options((1 << 30) + 1, &geo(16, false));
        assert_eq!(o, CacheOptions::new(65536, 3));
        // Tiny or empty disk: still the two-entry minimum.
        assert_eq!(default_l2_options(0, &geo(16, false)).capacity, 2);
        assert_eq!(default_l2_options(512, &geo(9, false)).capacity, 2);
    }

    #[test]
    fn default_l2_large_disk_caps_at_32m_with_4k_slices() {
        // 1 TiB at 64 KiB clusters needs 128 MiB of L2: capped at 32 MiB of 4 KiB slices.
        let o = default_l2_options(1 << 40, &geo(16, false));
        assert_eq!(o, CacheOptions::new(4096, (32 << 20) / 4096));
        // Exactly 32 MiB of L2 (256 GiB) still maps everything: whole tables.
        let o = default_l2_options(256 << 30, &geo(16, false));
        assert_eq!(o, CacheOptions::new(65536, 512));
        // Clusters below 4 KiB keep the cluster size as slice size.
        let o = default_l2_options(1 << 40, &geo(11, false));
        assert_eq!(o.entry_size, 2048);
        // Extended L2 doubles the metadata per cluster.
        let o = default_l2_options(1 << 30, &geo(16, true));
        assert_eq!(o, CacheOptions::new(65536, 4));
        // Absurd sizes saturate instead of overflowing.
        let o = default_l2_options(u64::MAX, &geo(14, true));
        assert_eq!(o, CacheOptions::new(4096, (32 << 20) / 4096));
    }

    #[test]
    fn default_refblock_is_four_clusters() {
        assert_eq!(
            default_refblock_options(&geo(16, false)),
            CacheOptions::new(65536, 4)
        );
        assert_eq!(default_refblock_options(&geo(9, false)).entry_size, 512);
    }

    #[test]
    fn validation() {
        let ok = CacheOptions::new(512, 1);
        assert!(ok.validate(CacheId::L2).is_ok());
        for bad in [
            CacheOptions::new(0, 4),
            CacheOptions::new(256, 4),
            CacheOptions::new(1000, 4),
            CacheOptions::new(4 << 20, 4),
            CacheOptions::new(4096, 0),
            CacheOptions::new(1 << 21, usize::MAX / 2),
        ] {
            let e = bad.validate(CacheId::Refblock).unwrap_err();
            assert!(matches!(
                e,
                CacheError::InvalidOptions {
                    cache: CacheId::Refblock,
                    ..
                }
            ));
        }
        assert_eq!(
            CacheOptions::from_cache_size(1 << 20, 65536, 2),
            CacheOptions::new(65536, 16)
        );
        assert_eq!(CacheOptions::from_cache_size(1000, 65536, 4).capacity, 4);
    }
}
