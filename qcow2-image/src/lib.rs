//! The qcow2 image facade: create/open/close, guest read/write/discard/write-zeroes/flush,
//! L1/L2 mapping and copy-on-write, compressed clusters, backing files, the dirty and corrupt
//! bits, lazy refcounts and metadata-overlap checks, composed from the lower crates.
//!
//! ```
//! use qcow2_image::{CreateOptions, Image, OpenOptions};
//! use qcow2_io::MemStorage;
//! use std::sync::Arc;
//!
//! let storage = Arc::new(MemStorage::new());
//! let mut img = Image::create(storage.clone(), &CreateOptions::new(1 << 20))?;
//! img.write(4096, b"hello")?;
//! img.close()?;
//!
//! let mut img = Image::open(storage, &OpenOptions::read_only())?;
//! let mut buf = [0u8; 5];
//! img.read(4096, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! # Ok::<(), qcow2_image::ImageError>(())
//! ```
//!
//! Safety properties are the workspace invariants (ARCHITECTURE.md); each code path names
//! the invariant it keeps.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod amend;
mod backing;
mod bitmaps;
mod commit;
mod compare;
mod compress;
mod crypto;
mod data_file;
mod dd;
mod error;
mod image;
mod inflight;
mod keyslots;
pub mod locking;
mod map;
mod options;
mod overlap;
mod plan;
mod queue;
mod rebase;
#[cfg(all(test, shuttle))]
mod schedule_tests;
mod shared;
mod shrink;
mod snapshot;
mod status;
mod sync;
mod vmstate;
mod write;
mod zero;

pub use amend::AmendOptions;
pub use backing::{BackingImage, BackingOpener, Held, RawBacking, SharedBacking};
pub use bitmaps::{
    stale_extension_warning, BitmapAddOptions, BitmapInfo, DirtyBitmap, DirtyRanges,
};
pub use commit::{CommitError, CommitOptions, CommitTarget, RawTarget, SharedTarget};
pub use compare::{compare, CompareError, CompareOptions, CompareOutcome, CompareReport, Side};
pub use compress::compress_cluster;
pub use dd::{dd_copy, DdError, DdParams, DdPlan, DdWrite};
pub use error::{ImageError, Op, Result};
pub use image::Image;
pub use keyslots::{KeyslotAmend, KeyslotState};
pub use map::{Extent, ExtentKind};
pub use options::{
    BackingPolicy, CreateOptions, DataFileStorage, OpenOptions, OverlapLevel, Preallocation,
};
pub use qcow2_crypto::Secret;
pub use qcow2_format::features::CompressionType;
pub use qcow2_format::layout::Compat;
pub use qcow2_io::{Locking, Perms};
pub use qcow2_snapshot::{NewSnapshot, SnapshotEntry};
pub use queue::{Done, RequestQueue};
pub use rebase::{RebaseError, RebaseOptions};
pub use shared::SharedImage;
pub use snapshot::open_error as snapshot_open_error;
pub use status::{BlockStatus, RawDisk};

#[cfg(test)]
mod send_check {
    fn assert_send<T: Send>() {}
    #[test]
    fn image_is_send() {
        assert_send::<crate::Image>();
    }
}
