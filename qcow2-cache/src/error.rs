//! Typed errors of the metadata cache.

use crate::CacheId;
use std::io;

/// A pre-write overlap check refused a cache write-back (invariant 5: metadata never
/// overlaps). Produced by an [`OverlapCheck`](crate::OverlapCheck) implementation, which
/// knows the live metadata layout; the cache only carries it to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Preventing invalid write on metadata (overlaps with {region})")]
pub struct OverlapError {
    /// Start of the refused write.
    pub offset: u64,
    /// Length of the refused write.
    pub len: u64,
    /// QEMU's name of the structure the write would have hit, e.g. `"active L1 table"`,
    /// `"refcount table"`, `"qcow2_header"`.
    pub region: &'static str,
}

/// Everything that can go wrong in the cache. Every variant names the cache it concerns and,
/// where there is one, the host offset of the table entry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// [`CacheOptions`](crate::CacheOptions) that cannot describe a cache.
    #[error("Invalid {cache} cache options: {reason}")]
    InvalidOptions {
        /// The cache being configured.
        cache: CacheId,
        /// What is wrong, with the offending value.
        reason: String,
    },
    /// A table offset that is not a multiple of the cache's entry size (QEMU treats this as
    /// image corruption: the offset came from an L1 or refcount-table entry).
    #[error("Cannot get entry from {cache} cache: Offset {offset:#x} is unaligned")]
    UnalignedOffset {
        /// The cache asked.
        cache: CacheId,
        /// The offending offset.
        offset: u64,
    },
    /// A table offset of 0 (the image header) or beyond the largest host offset qcow2 can
    /// address. Offset 0 is also the cache's "empty slot" marker.
    #[error("Cannot get entry from {cache} cache: Offset {offset:#x} is not a valid table offset")]
    InvalidOffset {
        /// The cache asked.
        cache: CacheId,
        /// The offending offset.
        offset: u64,
    },
    /// Every entry of the cache is pinned by a live [`Handle`](crate::Handle), so nothing
    /// can be evicted to make room (QEMU aborts here; we report it).
    #[error("Cannot get entry from {cache} cache: all {capacity} entries are in use")]
    AllPinned {
        /// The cache asked.
        cache: CacheId,
        /// Its capacity in entries.
        capacity: usize,
    },
    /// Reading a table into the cache failed. Nothing was cached.
    #[error("Failed to load {cache} at offset {offset:#x}")]
    Load {
        /// The cache loading.
        cache: CacheId,
        /// Host offset of the table.
        offset: u64,
        /// The storage error.
        #[source]
        source: io::Error,
    },
    /// Writing a dirty entry back failed. The entry stays cached and dirty; the next write,
    /// flush or eviction retries it.
    #[error("Failed to write {cache} at offset {offset:#x}")]
    WriteBack {
        /// The cache writing.
        cache: CacheId,
        /// Host offset of the table.
        offset: u64,
        /// The storage error.
        #[source]
        source: io::Error,
    },
    /// The storage flush barrier failed (during a cache flush or a dependency flush).
    #[error("Failed to flush storage for the {cache} cache")]
    Flush {
        /// The cache whose flush (or whose dependency's flush) issued the barrier.
        cache: CacheId,
        /// The storage error.
        #[source]
        source: io::Error,
    },
    /// The overlap hook vetoed a write-back. Nothing was written; the entry stays dirty.
    #[error("Refused to write {cache} at offset {offset:#x}")]
    Overlap {
        /// The cache writing.
        cache: CacheId,
        /// Host offset of the table.
        offset: u64,
        /// What the hook reported.
        #[source]
        source: OverlapError,
    },
    /// Debug-build lost-update guard: a clean entry's bytes changed without
    /// [`Caches::mark_dirty`](crate::Caches::mark_dirty), so the change would never have
    /// reached storage.
    #[error(
        "{cache} at offset {offset:#x} was modified without mark_dirty \
         (checksum when clean {expected:#010x}, now {found:#010x})"
    )]
    UndeclaredModification {
        /// The cache holding the entry.
        cache: CacheId,
        /// Host offset of the table.
        offset: u64,
        /// CRC-32 of the entry when it last became clean.
        expected: u32,
        /// CRC-32 of the entry now.
        found: u32,
    },
    /// `set_dependency(c, c)`: a cache cannot be ordered after itself.
    #[error("The {cache} cache cannot depend on itself")]
    SelfDependency {
        /// The cache named twice.
        cache: CacheId,
    },
}

impl CacheError {
    /// The storage error underneath, if this error came from storage I/O.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            CacheError::Load { source, .. }
            | CacheError::WriteBack { source, .. }
            | CacheError::Flush { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Whether the storage ran out of space (`ENOSPC`). Like QEMU, a multi-entry write keeps
    /// its first error unless a later one is `ENOSPC`, which callers treat specially.
    pub fn is_no_space(&self) -> bool {
        self.io_error().is_some_and(|e| {
            e.raw_os_error() == Some(qcow2_io::errno::ENOSPC)
                || e.kind() == io::ErrorKind::StorageFull
        })
    }

    /// The cache this error concerns.
    pub fn cache(&self) -> CacheId {
        match self {
            CacheError::InvalidOptions { cache, .. }
            | CacheError::UnalignedOffset { cache, .. }
            | CacheError::InvalidOffset { cache, .. }
            | CacheError::AllPinned { cache, .. }
            | CacheError::Load { cache, .. }
            | CacheError::WriteBack { cache, .. }
            | CacheError::Flush { cache, .. }
            | CacheError::Overlap { cache, .. }
            | CacheError::UndeclaredModification { cache, .. }
            | CacheError::SelfDependency { cache } => *cache,
        }
    }
}
