//! The qcow2 on-disk format, pure: no I/O, no allocation policy, no panics on any input.
//!
//! Everything an engine needs to speak the format: the header (v2 and v3) with QEMU's
//! open-time validation, header extensions and feature bits, the cluster [`Geometry`], L1 and
//! L2 entries (standard and extended) with QEMU's cluster classification, compressed-cluster
//! descriptors, the refcount-block entry codec for every `refcount_order`, snapshot-table
//! entries, and a builder for the layout of a fresh image. All integers on disk are
//! big-endian. Names follow the qcow2 specification (`docs/interop/qcow2.txt`).
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod bitmap;
pub mod compressed;
pub mod entry;
pub mod extensions;
pub mod features;
pub mod geometry;
pub mod header;
pub mod layout;
pub mod limits;
pub mod measure;
pub mod refcount;
pub mod snapshot;

pub use compressed::{CompressedDescriptor, CompressedError, CompressedFormat};
pub use entry::{ClusterType, EntryError, L1Entry, L2Context, L2Entry, SubclusterType};
pub use geometry::{Geometry, GeometryError};
pub use refcount::{RefcountCodec, RefcountError, ReftableEntry};
pub use snapshot::{SnapshotEntry, SnapshotError, SnapshotTable};

/// Display helpers for QEMU-compatible messages.
pub mod display {
    use core::fmt;

    /// A number printed as C's `%#x` does: `0x`-prefixed hex, except that zero prints as
    /// `0` (QEMU's messages use this format, e.g. "reftable index: 0").
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CHex(pub u64);

    impl fmt::Display for CHex {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.0 == 0 {
                f.write_str("0")
            } else {
                write!(f, "{:#x}", self.0)
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::CHex;

        #[test]
        fn c_style_hex() {
            assert_eq!(CHex(0).to_string(), "0");
            assert_eq!(CHex(0x22a00).to_string(), "0x22a00");
        }
    }
}
