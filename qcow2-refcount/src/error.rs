//! Typed errors of the refcount engine.

use qcow2_cache::CacheError;
use qcow2_format::display::CHex;
use std::io;

/// Everything that can go wrong in the refcount engine. Corruption variants carry the offsets
/// QEMU's messages name; [`RefcountError::errno`] gives the errno QEMU would return.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefcountError {
    /// The refcount-block cache failed (load, write-back, flush, pinning).
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A direct storage operation failed (refcount-table read or write, header switch).
    #[error("{context}: {source}")]
    Io {
        /// What the engine was doing.
        context: &'static str,
        /// The storage error.
        #[source]
        source: io::Error,
    },
    /// An increase would exceed the refcount width (QEMU: `-EINVAL`).
    #[error("refcount overflow: cluster at offset {cluster_offset:#x} has refcount {refcount}; adding {addend} exceeds the maximum {max}")]
    Overflow {
        /// Host offset of the cluster.
        cluster_offset: u64,
        /// Its current refcount.
        refcount: u64,
        /// The amount that did not fit.
        addend: u64,
        /// `2^refcount_bits - 1`.
        max: u64,
    },
    /// A decrease below zero (QEMU: `-EINVAL`).
    #[error("refcount underflow: cluster at offset {cluster_offset:#x} has refcount {refcount}; cannot subtract {subtrahend}")]
    Underflow {
        /// Host offset of the cluster.
        cluster_offset: u64,
        /// Its current refcount.
        refcount: u64,
        /// The amount that did not fit.
        subtrahend: u64,
    },
    /// A refcount-table entry with reserved bits or an unaligned block offset (corruption).
    #[error("Refblock offset {} unaligned (reftable index: {})", CHex(*offset), CHex(*index))]
    UnalignedRefblock {
        /// The raw offset found in the table.
        offset: u64,
        /// Its index in the refcount table.
        index: u64,
    },
    /// The free-cluster search offered cluster 0 for a new refcount block (corruption: the
    /// header's refcount is missing).
    #[error("Preventing invalid allocation of refcount block at offset 0")]
    RefblockAtZero,
    /// The free-cluster search offered cluster 0 for a new allocation (corruption).
    #[error("Preventing invalid allocation of {what} at offset 0")]
    AllocationAtZero {
        /// What was being allocated ("L2 table", "compressed cluster", ...).
        what: &'static str,
    },
    /// The refcount table would exceed QEMU's 8 MiB limit (QEMU: `-EFBIG`).
    #[error("refcount table too large: {clusters} clusters needed")]
    ReftableTooLarge {
        /// Table size in clusters that would have been needed.
        clusters: u64,
    },
    /// An offset beyond what qcow2 can address (QEMU: `-EFBIG`, "File too large").
    #[error("File too large: offset {offset:#x} is beyond the largest host offset")]
    OffsetTooLarge {
        /// The offending offset (or range end).
        offset: u64,
    },
    /// Invalid arguments from the caller (zero-sized allocation, range overflow).
    #[error("invalid refcount request: {reason}")]
    InvalidRequest {
        /// What was wrong.
        reason: &'static str,
    },
    /// The refcount table read at open is unusable.
    #[error("invalid refcount table: {reason}")]
    InvalidReftable {
        /// What was wrong.
        reason: String,
    },
}

impl RefcountError {
    pub(crate) fn io(context: &'static str, source: io::Error) -> Self {
        RefcountError::Io { context, source }
    }

    /// Whether the error reports corruption in the image (QEMU would mark it corrupt).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            RefcountError::UnalignedRefblock { .. }
                | RefcountError::RefblockAtZero
                | RefcountError::AllocationAtZero { .. }
        ) || matches!(
            self,
            RefcountError::Cache(CacheError::UnalignedOffset { .. })
        )
    }

    /// The errno QEMU returns for this failure (`EIO`, `EINVAL`, `EFBIG`, or the storage's).
    pub fn errno(&self) -> i32 {
        use qcow2_io::errno::{EFBIG, EINVAL, EIO};
        match self {
            RefcountError::Cache(e) => e
                .io_error()
                .and_then(io::Error::raw_os_error)
                .unwrap_or(EIO),
            RefcountError::Io { source, .. } => source.raw_os_error().unwrap_or(EIO),
            RefcountError::Overflow { .. }
            | RefcountError::Underflow { .. }
            | RefcountError::InvalidRequest { .. }
            | RefcountError::InvalidReftable { .. } => EINVAL,
            RefcountError::ReftableTooLarge { .. } | RefcountError::OffsetTooLarge { .. } => EFBIG,
            RefcountError::UnalignedRefblock { .. }
            | RefcountError::RefblockAtZero
            | RefcountError::AllocationAtZero { .. } => EIO,
        }
    }
}
