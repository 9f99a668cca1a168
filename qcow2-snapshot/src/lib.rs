//! qcow2 internal snapshots: the snapshot table and crash-safe, batched snapshot refcount
//! walking (QEMU's `block/qcow2-snapshot.c` and `qcow2_update_snapshot_refcount`).
//!
//! - [`Snapshots`]: the table in memory, read at open with QEMU's limits
//!   ([`Snapshots::load`]), always rewritten to a new location and switched with one header
//!   write ([`Snapshots::write_table`]); create, delete, apply (revert) and lookups with
//!   qemu-img's rules (apply: id first, then name; delete: name only, first match; duplicate
//!   names allowed; new id = largest numeric id + 1).
//! - [`update_snapshot_refcount`]: +1 / -1 / COPIED recomputation over an L1 tree, with
//!   refcount changes grouped by refcount block and undone on error (see [`walk`](mod@walk)
//!   for the phases and their durability order).
//! - [`SnapshotHost`]: what the image facade lends the engine (caches, refcount engine, the
//!   in-memory active L1) and the services only it can perform (resize, L1 growth). This
//!   crate never depends on the facade.
//!
//! Crash safety (every operation, at every instant on disk): refcounts never under-count, so
//! a crash or an error can only leak clusters. Create makes the increments durable before
//! the table names the new L1 copy; delete switches the table first and decrements after;
//! apply increments the snapshot's tree before the active L1 is overwritten and decrements
//! the old tree after.
//!
//! ```no_run
//! # fn demo<H: qcow2_snapshot::SnapshotHost>(host: &mut H, snapshots: &mut qcow2_snapshot::Snapshots)
//! # -> Result<(), qcow2_snapshot::Error> {
//! let i = snapshots.create(host, "before-upgrade")?;
//! println!("created id {}", snapshots.entries()[i].id_str().unwrap_or("?"));
//! snapshots.apply(host, "before-upgrade")?;
//! snapshots.delete(host, "before-upgrade")?;
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod error;
mod host;
mod snapshots;
pub mod walk;

#[cfg(feature = "test-utils")]
pub mod test_utils;

pub use error::{Error, HostError};
pub use host::{HostParts, MetadataWrite, SnapshotHost};
pub use qcow2_format::SnapshotEntry;
pub use snapshots::{NewSnapshot, Snapshots, HEADER_NB_SNAPSHOTS_OFFSET};
pub use walk::{update_snapshot_refcount, validate_snapshot_l1, Addend, L1Source, PassStats};
