//! qcow2 allocation policy over the refcount engine.
//!
//! [`qcow2_refcount::RefcountEngine`] owns refcounts, whole-cluster allocation
//! (`alloc_clusters`, `alloc_clusters_at`), the free-space index and the quarantine of freed
//! clusters, because all of them change in the same step as a refcount. This crate adds the
//! policy that needs the format's entry types:
//! - [`Allocator::alloc_bytes`]: QEMU's byte allocator for compressed clusters (sub-cluster
//!   ranges sharing a host cluster, extending into the next contiguous cluster, the
//!   compressed descriptor's offset limit);
//! - [`Allocator::free_l2_entry`]: freeing whatever an L2 entry references (normal,
//!   preallocated zero, compressed), with QEMU's corruption rule for unaligned offsets.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

use qcow2_cache::{CacheId, Caches};
use qcow2_format::compressed::{CompressedError, CompressedFormat};
use qcow2_format::display::CHex;
use qcow2_format::entry::{ClusterType, L2Context, L2Entry};
use qcow2_format::limits::MAX_CLUSTER_OFFSET;
use qcow2_format::Geometry;
use qcow2_io::Event;
pub use qcow2_refcount::{
    Change, DiscardPassthrough, DiscardType, FreedRange, RefcountEngine, RefcountError,
};

/// Errors of the allocation policy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// The refcount engine failed.
    #[error(transparent)]
    Refcount(#[from] RefcountError),
    /// A byte allocation of 0 bytes or more than a cluster.
    #[error("invalid compressed allocation of {size} bytes (cluster size {cluster_size})")]
    InvalidSize {
        /// Requested size.
        size: u64,
        /// The image's cluster size.
        cluster_size: u64,
    },
    /// The compressed data would lie beyond what a compressed descriptor can address
    /// (QEMU: `-EFBIG`, "File too large").
    #[error(
        "File too large: compressed data at {offset:#x} is beyond the descriptor limit {limit:#x}"
    )]
    CompressedOffsetLimit {
        /// Where the data would go.
        offset: u64,
        /// The descriptor's limit.
        limit: u64,
    },
    /// A compressed descriptor that cannot be decoded.
    #[error(transparent)]
    Compressed(#[from] CompressedError),
    /// An L2 entry whose host offset is not cluster aligned (QEMU reports this as non-fatal
    /// corruption and leaks the cluster).
    #[error("Cannot free unaligned cluster {}", CHex(*offset))]
    UnalignedFree {
        /// The unaligned host offset.
        offset: u64,
    },
}

impl AllocError {
    /// The errno QEMU returns for this failure.
    pub fn errno(&self) -> i32 {
        use qcow2_io::errno::{EFBIG, EINVAL, EIO};
        match self {
            AllocError::Refcount(e) => e.errno(),
            AllocError::InvalidSize { .. } => EINVAL,
            AllocError::CompressedOffsetLimit { .. } => EFBIG,
            AllocError::Compressed(_) | AllocError::UnalignedFree { .. } => EIO,
        }
    }
}

/// Allocation state that outlives one request: where the next compressed cluster's bytes
/// go (QEMU's `free_byte_offset`).
#[derive(Debug, Clone)]
pub struct Allocator {
    geometry: Geometry,
    compressed: CompressedFormat,
    /// 0, or a position inside a partially used host cluster.
    free_byte_offset: u64,
}

/// Bound on retries of a byte allocation after a new refcount block was hooked in.
const MAX_RETRIES: u32 = 64;

impl Allocator {
    /// An allocator for an image of this geometry.
    pub fn new(geometry: Geometry) -> Self {
        Self {
            geometry,
            compressed: CompressedFormat::for_geometry(&geometry),
            free_byte_offset: 0,
        }
    }

    /// Where the next compressed bytes would go (0: a new cluster). Correct only while the
    /// same [`RefcountEngine`] is used for every allocation and free (it watches the partial
    /// cluster for this allocator).
    pub fn free_byte_offset(&self) -> u64 {
        self.free_byte_offset
    }

    /// Forgets the partially used cluster (the next byte allocation starts a new one).
    pub fn reset_byte_offset(&mut self) {
        self.free_byte_offset = 0;
    }

    /// Allocates `size` bytes (`0 < size <= cluster_size`) for compressed data and returns
    /// the host byte offset (QEMU's `qcow2_alloc_bytes`).
    ///
    /// Consecutive allocations share a host cluster; data may straddle into the next cluster
    /// when that one is contiguous and free. Every host cluster the range touches gets +1
    /// (one reference per compressed cluster stored in it). The L2 cache is made to depend
    /// on the refcount-block cache, so the descriptor never reaches disk before the refcount.
    pub fn alloc_bytes(
        &mut self,
        engine: &mut RefcountEngine,
        caches: &mut Caches,
        size: u64,
    ) -> Result<u64, AllocError> {
        let cs = self.geometry.cluster_size();
        if size == 0 || size > cs {
            return Err(AllocError::InvalidSize {
                size,
                cluster_size: cs,
            });
        }
        caches.storage().event(Event::ClusterAllocBytes);
        let limit = self.compressed.offset_limit().min(MAX_CLUSTER_OFFSET);
        let mut last_err = None;
        for _ in 0..MAX_RETRIES {
            let mut offset = self.free_byte_offset;
            if engine.take_watched_freed() {
                // The partial cluster was freed (its compressed clusters discarded or
                // overwritten) and may belong to someone else by now: never append there.
                offset = 0;
            }
            if offset != 0 {
                // A cluster at the maximum refcount cannot take another compressed cluster
                // (refcount_bits=1: every compressed cluster gets its own host cluster); one
                // freed meanwhile must not be written into either.
                let r = engine.get(caches, self.geometry.cluster_index(offset))?;
                if r == 0 || r >= self.geometry.refcount_max() {
                    offset = 0;
                }
            }
            let free_in_cluster = if offset == 0 {
                0
            } else {
                cs - self.geometry.offset_in_cluster(offset)
            };
            if offset == 0 || free_in_cluster < size {
                let new_cluster = engine.find_free(caches, 1)?;
                let new_offset = new_cluster << self.geometry.cluster_bits();
                if new_cluster == 0 {
                    return Err(RefcountError::AllocationAtZero {
                        what: "compressed cluster",
                    }
                    .into());
                }
                if new_offset.saturating_add(cs) - 1 > limit {
                    return Err(AllocError::CompressedOffsetLimit {
                        offset: new_offset,
                        limit,
                    });
                }
                let contiguous =
                    offset != 0 && self.geometry.start_of_cluster(offset) + cs == new_offset;
                if !contiguous {
                    offset = new_offset;
                }
            }
            match engine.try_update(
                caches,
                offset,
                size,
                Change::Increase(1),
                DiscardType::Never,
            ) {
                // A refcount block was placed first and may sit where the bytes were meant
                // to go (found by fuzzing: compressed data written over it): search again,
                // as QEMU's loop on -EAGAIN does.
                Ok(false) => continue,
                Ok(true) => {
                    caches
                        .set_dependency(CacheId::L2, CacheId::Refblock)
                        .map_err(RefcountError::from)?;
                    let next = offset + size;
                    self.free_byte_offset = if self.geometry.is_cluster_aligned(next) {
                        0
                    } else {
                        next
                    };
                    engine.watch_cluster(
                        (self.free_byte_offset != 0)
                            .then(|| self.geometry.cluster_index(self.free_byte_offset)),
                    );
                    return Ok(offset);
                }
                Err(e) => {
                    // A failed update is rolled back; the partial cluster may be stale now.
                    self.free_byte_offset = 0;
                    if matches!(e, RefcountError::Overflow { .. }) {
                        last_err = Some(e);
                        continue;
                    }
                    return Err(e.into());
                }
            }
        }
        Err(last_err
            .map(AllocError::from)
            .unwrap_or(AllocError::Refcount(RefcountError::InvalidRequest {
                reason: "compressed allocation did not converge",
            })))
    }

    /// Frees whatever `entry` references (QEMU's `qcow2_free_any_cluster`): a compressed
    /// range (−1 on every touched cluster), a normal or preallocated-zero cluster (−1), or
    /// nothing. With an external data file, data clusters carry no refcount.
    pub fn free_l2_entry(
        &mut self,
        engine: &mut RefcountEngine,
        caches: &mut Caches,
        entry: L2Entry,
        ctx: L2Context,
        discard: DiscardType,
    ) -> Result<(), AllocError> {
        match entry.cluster_type(ctx) {
            ClusterType::Compressed => {
                let d = self.compressed.decode(entry)?;
                engine.free_clusters(caches, d.host_offset(), d.compressed_size(), discard)?;
                Ok(())
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                if ctx.external_data_file {
                    return Ok(());
                }
                let offset = entry.host_offset();
                if !self.geometry.is_cluster_aligned(offset) {
                    return Err(AllocError::UnalignedFree { offset });
                }
                engine.free_clusters(caches, offset, self.geometry.cluster_size(), discard)?;
                Ok(())
            }
            ClusterType::ZeroPlain | ClusterType::Unallocated => Ok(()),
        }
    }
}
