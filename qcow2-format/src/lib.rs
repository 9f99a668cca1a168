//! The qcow2 on-disk format, pure: no I/O, no allocation policy, no panics on any input.
//!
//! Everything an engine needs to speak the format: the header (v2 and v3) with QEMU's
//! open-time validation, header extensions and feature bits, the cluster [`Geometry`], L1 and
//! L2 entries (standard and extended) with QEMU's cluster classification, compressed-cluster
//! descriptors, the refcount-block entry codec for every `refcount_order`, snapshot-table
//! entries, and a builder for the layout of a fresh image. All integers on disk are
//! big-endian. Names follow the qcow2 specification (`docs/interop/qcow2.txt`).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]

pub mod compressed;
pub mod entry;
pub mod extensions;
pub mod features;
pub mod geometry;
pub mod header;
pub mod layout;
pub mod limits;
pub mod refcount;
pub mod snapshot;

pub use geometry::{Geometry, GeometryError};
pub use compressed::{CompressedDescriptor, CompressedError, CompressedFormat};
pub use entry::{ClusterType, EntryError, L1Entry, L2Context, L2Entry, SubclusterType};
pub use refcount::{RefcountCodec, RefcountError, ReftableEntry};
pub use snapshot::{SnapshotEntry, SnapshotError, SnapshotTable};
