//! Sizes of a qcow2 image before it exists: QEMU's `qcow2_measure` and
//! `qcow2_calc_prealloc_size` (what `qemu-img measure -O qcow2` prints).
//!
//! The fully allocated size is the metadata of an image whose every cluster is allocated
//! (header cluster, all L2 tables, the L1 table rounded to clusters, and the refcount
//! structures that count all of it, a fixed point computed by
//! [`refcount_metadata_size`]) plus the virtual size rounded up to clusters. The required
//! size keeps that metadata (an over-estimate, as QEMU's) and replaces the data by the
//! clusters the source actually needs.

use crate::bitmap::DIR_ENTRY_FIXED_SIZE;
use crate::limits::{ENTRY_SIZE, MAX_CLUSTER_BITS, MAX_L1_SIZE, MIN_CLUSTER_BITS};
use crate::refcount::refcount_metadata_size;

/// Why a measurement cannot be made, with QEMU's messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeasureError {
    /// Cluster size not a power of two in 512..=2 MiB.
    #[error("Cluster size must be a power of two between 512 and 2048k")]
    ClusterSize {
        /// The value given.
        cluster_size: u64,
    },
    /// Extended L2 entries need clusters of at least 16 KiB.
    #[error("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")]
    ExtendedL2ClusterSize {
        /// The value given.
        cluster_size: u64,
    },
    /// Refcount width not a power of two up to 64.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountBits {
        /// The value given.
        refcount_bits: u64,
    },
    /// A refcount width other than 16 with compat 0.10.
    #[error("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")]
    RefcountBitsNeedV3 {
        /// The value given.
        refcount_bits: u64,
    },
    /// The L1 table for this size would exceed QEMU's 32 MiB limit.
    #[error("The image size is too large (try using a larger cluster size)")]
    TooLarge {
        /// The virtual size.
        virtual_size: u64,
    },
    /// A size computation overflowed 64 bits.
    #[error("The image size is too large (try using a larger cluster size)")]
    Overflow,
}

/// The layout options a measurement depends on (the target's `-o` options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasureOptions {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u64,
    /// `extended_l2=on`.
    pub extended_l2: bool,
    /// Header version 3 or later (`compat=1.1`).
    pub v3: bool,
    /// `preallocation=falloc|full`: every data cluster is required.
    pub preallocate_data: bool,
    /// `backing_file=` is set: the whole source is assumed to differ from the new
    /// backing file, so every cluster is required.
    pub has_backing_file: bool,
}

impl Default for MeasureOptions {
    /// qemu-img's defaults: 64 KiB clusters, 16-bit refcounts, compat 1.1.
    fn default() -> Self {
        Self {
            cluster_size: crate::limits::DEFAULT_CLUSTER_SIZE,
            refcount_bits: 16,
            extended_l2: false,
            v3: true,
            preallocate_data: false,
            has_backing_file: false,
        }
    }
}

impl MeasureOptions {
    /// Checks the options in QEMU's order (cluster size, extended L2, refcount width).
    pub fn validate(&self) -> Result<(), MeasureError> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two()
            || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cs)
        {
            return Err(MeasureError::ClusterSize { cluster_size: cs });
        }
        if self.extended_l2 && cs < 16384 {
            return Err(MeasureError::ExtendedL2ClusterSize { cluster_size: cs });
        }
        let rb = self.refcount_bits;
        if rb == 0 || rb > 64 || !rb.is_power_of_two() {
            return Err(MeasureError::RefcountBits { refcount_bits: rb });
        }
        if !self.v3 && rb != 16 {
            return Err(MeasureError::RefcountBitsNeedV3 { refcount_bits: rb });
        }
        Ok(())
    }

    fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            2 * ENTRY_SIZE
        } else {
            ENTRY_SIZE
        }
    }
}

/// What the source of a measurement contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureSource {
    /// `--size N` (or no size at all: 0): an empty image of N bytes.
    Size(u64),
    /// An existing image of `virtual_size` bytes whose data (not reading as zeros) covers
    /// `data_clusters` clusters of the target's cluster size (see [`DataClusterCounter`]).
    /// `size_option` is the `size` create option if one was given (QEMU checks the L1
    /// limit against it, not against the source).
    Image {
        /// The source's virtual size.
        virtual_size: u64,
        /// Target clusters holding data.
        data_clusters: u64,
        /// `-o size=N`, or 0.
        size_option: u64,
    },
}

/// The result of a measurement (qemu-img's `BlockMeasureInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes the new image needs.
    pub required: u64,
    /// Bytes the image needs with every cluster allocated.
    pub fully_allocated: u64,
}

fn round_up(v: u64, to: u64) -> Result<u64, MeasureError> {
    v.checked_next_multiple_of(to).ok_or(MeasureError::Overflow)
}

/// QEMU's `qcow2_calc_prealloc_size`: the file size of an image of `virtual_size` bytes
/// with every cluster allocated (metadata included).
pub fn prealloc_size(
    virtual_size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> Result<u64, MeasureError> {
    if cluster_size == 0 || !cluster_size.is_power_of_two() {
        return Err(MeasureError::ClusterSize { cluster_size });
    }
    let l2e = if extended_l2 {
        2 * ENTRY_SIZE
    } else {
        ENTRY_SIZE
    };
    let aligned = round_up(virtual_size, cluster_size)?;
    // The header cluster.
    let mut meta = cluster_size;
    // All L2 tables.
    let nl2e = round_up(aligned / cluster_size, cluster_size / l2e)?;
    let l2_bytes = nl2e.checked_mul(l2e).ok_or(MeasureError::Overflow)?;
    meta = meta.checked_add(l2_bytes).ok_or(MeasureError::Overflow)?;
    // The L1 table, in whole clusters.
    let nl1e = round_up(l2_bytes / cluster_size, cluster_size / ENTRY_SIZE)?;
    meta = nl1e
        .checked_mul(ENTRY_SIZE)
        .and_then(|v| v.checked_add(meta))
        .ok_or(MeasureError::Overflow)?;
    // Refcount table and blocks for everything so far.
    let clusters = meta.checked_add(aligned).ok_or(MeasureError::Overflow)? / cluster_size;
    let refcounts = refcount_metadata_size(clusters, cluster_size, refcount_order, false)
        .map_err(|_| MeasureError::Overflow)?;
    meta.checked_add(refcounts.bytes)
        .and_then(|v| v.checked_add(aligned))
        .ok_or(MeasureError::Overflow)
}

/// QEMU's `qcow2_measure` (without encryption): the required and fully allocated sizes of
/// a qcow2 image with `opts` holding `source`.
pub fn measure(opts: &MeasureOptions, source: MeasureSource) -> Result<Measurement, MeasureError> {
    opts.validate()?;
    let cs = opts.cluster_size;
    let (checked, size) = match source {
        MeasureSource::Size(s) => (s, s),
        MeasureSource::Image {
            virtual_size,
            size_option,
            ..
        } => (size_option, virtual_size),
    };
    let l2_tables = (round_up(checked, cs)? / cs).div_ceil(cs / opts.l2_entry_size());
    if l2_tables.saturating_mul(ENTRY_SIZE) > MAX_L1_SIZE {
        return Err(MeasureError::TooLarge {
            virtual_size: checked,
        });
    }
    let virtual_size = round_up(size, cs)?;
    let mut required = match source {
        MeasureSource::Size(_) => 0,
        MeasureSource::Image { .. } if opts.has_backing_file => virtual_size,
        MeasureSource::Image { data_clusters, .. } => data_clusters
            .checked_mul(cs)
            .ok_or(MeasureError::Overflow)?
            .min(virtual_size),
    };
    if opts.preallocate_data {
        required = virtual_size;
    }
    let fully_allocated = prealloc_size(
        virtual_size,
        cs,
        opts.refcount_bits.trailing_zeros(),
        opts.extended_l2,
    )?;
    // The metadata of the fully allocated image stays counted (QEMU's over-estimate).
    let required = (fully_allocated - virtual_size)
        .checked_add(required)
        .ok_or(MeasureError::Overflow)?;
    Ok(Measurement {
        required,
        fully_allocated,
    })
}

/// Counts the target clusters that hold data, from the source's data ranges in ascending
/// order (QEMU's loop over block status: a data range counts every cluster it touches,
/// each once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataClusterCounter {
    cluster_size: u64,
    /// First cluster not yet counted.
    next: u64,
    /// Clusters counted.
    count: u64,
}

impl DataClusterCounter {
    /// A counter for clusters of `cluster_size` bytes (a power of two).
    pub fn new(cluster_size: u64) -> Self {
        Self {
            cluster_size: cluster_size.max(1),
            next: 0,
            count: 0,
        }
    }

    /// Adds the data range `[offset, offset + len)`; ranges come in ascending order.
    pub fn add(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = (offset / self.cluster_size).max(self.next);
        let end = offset.saturating_add(len).div_ceil(self.cluster_size);
        if end > first {
            self.count += end - first;
            self.next = end;
        }
    }

    /// Clusters counted so far.
    pub fn clusters(&self) -> u64 {
        self.count
    }
}

/// A persistent bitmap of the source, as QEMU's measure counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapSize {
    /// Length of the bitmap's name in bytes.
    pub name_len: u64,
    /// Its granularity in bytes.
    pub granularity: u64,
}

/// QEMU's `qcow2_get_persistent_dirty_bitmap_size`: the bytes the bitmaps of a source of
/// `virtual_size` bytes need in a target with `cluster_size` clusters (every bitmap fully
/// allocated, its table, and the directory).
pub fn bitmaps_size(
    bitmaps: &[BitmapSize],
    virtual_size: u64,
    cluster_size: u64,
) -> Result<u64, MeasureError> {
    let mut total = 0u64;
    let mut dir = 0u64;
    for b in bitmaps {
        let bits = virtual_size.div_ceil(b.granularity.max(1));
        let clusters = bits.div_ceil(8).div_ceil(cluster_size);
        let table = round_up(
            clusters
                .checked_mul(ENTRY_SIZE)
                .ok_or(MeasureError::Overflow)?,
            cluster_size,
        )?;
        total = clusters
            .checked_mul(cluster_size)
            .and_then(|v| v.checked_add(table))
            .and_then(|v| v.checked_add(total))
            .ok_or(MeasureError::Overflow)?;
        let entry = round_up(
            (DIR_ENTRY_FIXED_SIZE as u64)
                .checked_add(b.name_len)
                .ok_or(MeasureError::Overflow)?,
            8,
        )?;
        dir = dir.checked_add(entry).ok_or(MeasureError::Overflow)?;
    }
    total
        .checked_add(round_up(dir, cluster_size)?)
        .ok_or(MeasureError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_numbers() {
        // qemu-img 10.0.2 measure -O qcow2 --size 1G.
        let m = measure(&MeasureOptions::default(), MeasureSource::Size(1 << 30)).unwrap();
        assert_eq!(m.required, 393_216);
        assert_eq!(m.fully_allocated, 1_074_135_040);
        // A 2 MiB qcow2 source with one data cluster.
        let m = measure(
            &MeasureOptions::default(),
            MeasureSource::Image {
                virtual_size: 2 << 20,
                data_clusters: 1,
                size_option: 0,
            },
        )
        .unwrap();
        assert_eq!(m.fully_allocated, 2_424_832);
        assert_eq!(m.required, 393_216);
    }

    #[test]
    fn preallocation_and_backing_require_everything() {
        let mut o = MeasureOptions {
            preallocate_data: true,
            ..MeasureOptions::default()
        };
        let m = measure(&o, MeasureSource::Size(1 << 30)).unwrap();
        assert_eq!(m.required, m.fully_allocated);
        o.preallocate_data = false;
        o.has_backing_file = true;
        let m = measure(
            &o,
            MeasureSource::Image {
                virtual_size: 2 << 20,
                data_clusters: 0,
                size_option: 0,
            },
        )
        .unwrap();
        assert_eq!(m.required, m.fully_allocated);
    }

    #[test]
    fn refused_options() {
        let bad = |o: MeasureOptions| measure(&o, MeasureSource::Size(1 << 30)).unwrap_err();
        let d = MeasureOptions::default();
        assert!(matches!(
            bad(MeasureOptions {
                cluster_size: 1000,
                ..d
            }),
            MeasureError::ClusterSize { .. }
        ));
        assert!(matches!(
            bad(MeasureOptions {
                refcount_bits: 3,
                ..d
            }),
            MeasureError::RefcountBits { .. }
        ));
        assert!(matches!(
            bad(MeasureOptions {
                refcount_bits: 8,
                v3: false,
                ..d
            }),
            MeasureError::RefcountBitsNeedV3 { .. }
        ));
        assert!(matches!(
            bad(MeasureOptions {
                extended_l2: true,
                cluster_size: 4096,
                ..d
            }),
            MeasureError::ExtendedL2ClusterSize { .. }
        ));
        assert!(matches!(
            measure(
                &MeasureOptions {
                    cluster_size: 512,
                    ..d
                },
                MeasureSource::Size(1 << 50)
            ),
            Err(MeasureError::TooLarge { .. })
        ));
        assert!(measure(&d, MeasureSource::Size(u64::MAX)).is_err());
    }

    #[test]
    fn data_clusters_count_each_touched_cluster_once() {
        let mut c = DataClusterCounter::new(65536);
        c.add(0, 4096);
        c.add(8192, 4096);
        c.add(65536 + 4096, 65536);
        c.add(10 * 65536, 1);
        assert_eq!(c.clusters(), 4);
    }

    #[test]
    fn bitmap_sizes() {
        assert_eq!(bitmaps_size(&[], 1 << 30, 65536).unwrap(), 0);
        // One 64 KiB-granularity bitmap over 1 GiB: 2 KiB of bits (one cluster), one table
        // cluster, one directory cluster.
        let b = BitmapSize {
            name_len: 2,
            granularity: 65536,
        };
        assert_eq!(bitmaps_size(&[b], 1 << 30, 65536).unwrap(), 3 * 65536);
    }
}
