//! The qcow2 writeback metadata cache: QEMU's L2-table and refcount-block caches
//! (`block/qcow2-cache.c`) with their ordering rules.
//!
//! [`Caches`] holds both caches over one [`Storage`](qcow2_io::Storage). Entries are
//! fixed-size tables (an L2 slice, or a refcount block) keyed by their host offset; each cache
//! is one contiguous buffer of `capacity * entry_size` bytes plus small slot descriptors.
//!
//! - **Pinning.** [`Caches::get`] and [`Caches::get_empty`] return a [`Handle`] that pins the
//!   entry until [`Caches::put`]. The handle is not a borrow: bytes are reached with
//!   [`Caches::data`] / [`Caches::data_mut`], so no reference into the cache outlives a call
//!   that might evict, and nested use (a refcount update while an L2 slice is pinned) cannot
//!   alias or deadlock. Pinned entries are never evicted; when all are pinned, `get` returns
//!   [`CacheError::AllPinned`].
//! - **Replacement.** Least recently *released*: the unpinned entry whose last `put` is
//!   oldest. A dirty victim is written back first.
//! - **Dirty tracking.** Modifications count only after [`Caches::mark_dirty`]. Debug builds
//!   checksum every clean entry and report [`CacheError::UndeclaredModification`] when a
//!   clean entry changed (a lost update) at eviction or flush.
//! - **Ordering (invariant 1).** [`Caches::set_dependency`] and
//!   [`Caches::set_depends_on_flush`] add edges checked before every write-back: the
//!   dependency's dirty entries are written and a storage flush barrier is issued before the
//!   dependent's entry goes out. The L2 cache depends on the refcount cache on allocation;
//!   the refcount cache depends on the L2 cache on free.
//! - **Overlap veto (invariant 5).** An [`OverlapCheck`] hook sees every write-back first.
//! - **Errors (invariant 7).** A failed write-back leaves the entry dirty and cached; the
//!   caller reports it and the image layer poisons itself. The next flush retries.
//!
//! Events: `L2Load`/`RefblockLoad` before a load, `L2Update`/`RefblockUpdatePart` before a
//! write-back. (QEMU's cache reports only `l2_load` itself and leaves `refblock_load` to the
//! refcount code; here the cache reports both, so callers must not report `RefblockLoad`
//! again for a cache load.)
//!
//! ```
//! use qcow2_cache::{CacheId, CacheOptions, Caches};
//! use qcow2_io::MemStorage;
//! use std::sync::Arc;
//!
//! let storage = Arc::new(MemStorage::new());
//! let opts = CacheOptions::new(512, 4);
//! let mut caches = Caches::new(storage.clone(), opts, opts)?;
//!
//! // Allocation: the refcount increment must be durable before the L2 entry is.
//! let rb = caches.get_empty(CacheId::Refblock, 0x1000)?;
//! caches.data_mut(&rb)[0..2].copy_from_slice(&1u16.to_be_bytes());
//! caches.mark_dirty(&rb);
//! caches.put(rb)?;
//! caches.set_dependency(CacheId::L2, CacheId::Refblock)?;
//!
//! let l2 = caches.get(CacheId::L2, 0x2000)?;
//! caches.data_mut(&l2)[0..8].copy_from_slice(&0x8000_0000_0000_3000u64.to_be_bytes());
//! caches.mark_dirty(&l2);
//! caches.put(l2)?;
//!
//! // Writes the refcount block, flushes the storage, then writes the L2 slice.
//! caches.flush(CacheId::L2)?;
//! assert_eq!(caches.dirty_count(CacheId::Refblock), 0);
//! assert_eq!(&storage.to_bytes()[0x1000..0x1002], &[0, 1]);
//! # Ok::<(), qcow2_cache::CacheError>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod cache;
mod error;
mod options;

pub use cache::{CacheId, CacheStats, Caches, Handle, OverlapCheck};
pub use error::{CacheError, OverlapError};
pub use options::{
    default_l2_options, default_refblock_options, CacheOptions, DEFAULT_L2_CACHE_MAX_SIZE,
    MAX_ENTRY_SIZE, MIN_ENTRY_SIZE, MIN_L2_CACHE_ENTRIES, MIN_REFCOUNT_CACHE_ENTRIES,
    SMALL_L2_ENTRY_SIZE,
};

#[cfg(test)]
mod tests;
