//! The qcow2 refcount engine: QEMU's `block/qcow2-refcount.c`, for every refcount width.
//!
//! [`RefcountEngine`] keeps the refcount table in memory and reaches refcount blocks through
//! the refcount-block cache of a [`qcow2_cache::Caches`] that the caller owns and lends to
//! every operation (so an update that must allocate a refcount block, which updates a
//! refcount, never aliases a cache borrow). It provides:
//! - [`RefcountEngine::get`] and [`RefcountEngine::update`] over a range, with overflow and
//!   underflow as typed errors and rollback of what was applied when an error occurs midway;
//! - self-describing refcount-block allocation and refcount-table growth with QEMU's
//!   crash-safe order (blocks, flush; table, flush; one header write; free the old table);
//! - cluster allocation ([`RefcountEngine::alloc_clusters`],
//!   [`RefcountEngine::alloc_clusters_at`]) over a free-space index whose cost does not grow
//!   with the image size, and frees whose clusters stay in quarantine until the caller says
//!   the unreferencing metadata is durable ([`RefcountEngine::release_quarantine`]).
//!
//! The free-space index and the quarantine live here rather than in `qcow2-alloc` because
//! they must change in the same step as every refcount the engine writes, including the
//! engine's own (new refcount blocks and tables); `qcow2-alloc` builds its policy (byte
//! allocation, freeing L2 entries, discard) on top.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod engine;
mod error;
mod index;

pub use engine::{Change, DiscardPassthrough, DiscardType, FreedRange, RefcountEngine};
pub use error::RefcountError;

#[cfg(feature = "test-utils")]
pub mod test_utils;
