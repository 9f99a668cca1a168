//! The qcow2 consistency checker and repairer, in agreement with `qemu-img check` 10.0.
//!
//! [`check`] opens an image in QEMU's check mode, rebuilds the reference counts of every
//! host cluster from every structure that references clusters (header, active and snapshot
//! L1/L2 tables, snapshot table, refcount table and blocks, bitmaps, LUKS header), compares
//! them with the on-disk refcounts and reports every class of problem QEMU reports, as typed
//! [`Finding`]s that also render to QEMU's exact stderr lines. With a [`RepairMode`] it
//! repairs what `qemu-img check -r leaks|all` repairs, in the same way (including the
//! refcount-structure rebuild with QEMU's placement and the snapshot-table repair), then
//! checks again and reports that second result, as qemu-img does.
//!
//! Speed: L1/L2 tables and refcount blocks are read in large sequential batches sorted by
//! offset, the in-memory refcount table is as narrow as the refcount width allows, and the
//! walk is linear in the metadata size.
//!
//! ```
//! use std::sync::Arc;
//! use qcow2_check::{check, CheckOptions};
//! use qcow2_io::{MemStorage, Storage};
//!
//! let opts = qcow2_format::layout::CreateOptions::new(1 << 30);
//! let image = qcow2_format::layout::fresh_image(&opts).unwrap().to_bytes();
//! let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
//! let report = check(storage, &CheckOptions::default()).unwrap();
//! assert_eq!(report.exit_code(), 0);
//! assert_eq!(report.render_human().lines().next(), Some("No errors were found on the image."));
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod bitmaps;
mod engine;
mod finding;
mod image;
mod imrt;
mod io;
mod report;
mod snapshots;

use std::sync::Arc;

use qcow2_format::features::INCOMPAT_DIRTY;
use qcow2_io::Storage;

pub use finding::{Finding, Label, MismatchKind, SnapshotTableProblem};
pub use report::{CheckCounts, CheckFailure, CheckReport};

use engine::{Fix, Session};

/// What `-r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RepairMode {
    /// `-r leaks`: leaked clusters (and COPIED flags when nothing else is wrong).
    Leaks,
    /// `-r all`: leaks and corruptions, rebuilding the refcount structure if needed.
    All,
}

/// How to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct CheckOptions {
    /// Repair mode; `None` only checks (the image is opened read-only and never written).
    pub repair: Option<RepairMode>,
}

/// Why no check could run at all (qemu-img: "Could not open ..."). Problems found while
/// checking are never errors: they are in the [`CheckReport`].
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The header fails QEMU's open-time validation.
    #[error("{0}")]
    Open(#[from] qcow2_format::header::HeaderError),
    /// The header describes an impossible geometry.
    #[error("{0}")]
    Geometry(qcow2_format::GeometryError),
    /// The first bytes of the image could not be read.
    #[error("Could not read the image header: {0}")]
    Io(std::io::Error),
    /// A table QEMU reads at open could not be read.
    #[error("{0}: {1}")]
    Read(&'static str, std::io::Error),
    /// The persistent bitmaps break QEMU's loader rules (QEMU's open fails, so its check
    /// never starts).
    #[error("{0}")]
    Bitmaps(#[from] qcow2_format::bitmap::BitmapError),
}

/// Checks (and with `opts.repair`, repairs) the qcow2 image in `storage`, as
/// `qemu-img check [-r leaks|all]` does. See [`check_with_progress`].
pub fn check(storage: Arc<dyn Storage>, opts: &CheckOptions) -> Result<CheckReport, CheckError> {
    check_with_progress(storage, opts, &mut |_, _| {})
}

/// [`check`] with a progress callback `(done, total)` in units of metadata tables walked.
///
/// The returned report holds the findings of every run, the first run's counters and the
/// reported result; [`CheckReport::failure`] is set when the check could not complete
/// (qemu-img's "Check failed: ..."), which is not an `Err`.
pub fn check_with_progress(
    storage: Arc<dyn Storage>,
    opts: &CheckOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport, CheckError> {
    let fix = Fix::from_mode(opts.repair);
    let writable = opts.repair.is_some();
    // The open validates the header; the session keeps the in-memory feature bits and
    // the first run starts from this open.
    let probe = image::Image::open(storage.clone(), writable)?;
    let mut session = Session {
        storage: storage.clone(),
        writable,
        findings: Vec::new(),
        signaled_corruption: false,
        poisoned: false,
        incompat: probe.header.incompatible_features,
        version: probe.header.version,
        progress,
        pending: Default::default(),
        opened: None,
    };
    session.opened = Some(probe);

    let first = session.run(fix)?;
    let mut report = CheckReport {
        findings: Vec::new(),
        first_run: CheckCounts::default(),
        result: CheckCounts::default(),
        double_checked: false,
        failure: None,
    };
    match first {
        Err(errno) => report.failure = Some(CheckFailure { errno }),
        Ok(res) => {
            let counts = res.counts();
            report.first_run = counts;
            if counts.corruptions_fixed != 0 || counts.leaks_fixed != 0 {
                report.double_checked = true;
                match session.run(Fix::default())? {
                    Err(errno) => report.failure = Some(CheckFailure { errno }),
                    Ok(second) => {
                        let mut merged = second.counts();
                        merged.corruptions_fixed = counts.corruptions_fixed;
                        merged.leaks_fixed = counts.leaks_fixed;
                        report.result = merged;
                    }
                }
            } else {
                report.result = counts;
            }
        }
    }
    // Closing a writable image that is still usable clears the dirty bit whatever the
    // result (QEMU's qcow2_inactivate -> qcow2_mark_clean).
    if writable && !session.poisoned && session.incompat & INCOMPAT_DIRTY != 0 {
        let _ = session.mark_clean();
    }
    if writable {
        let _ = storage.flush();
    }
    report.findings = std::mem::take(&mut session.findings);
    Ok(report)
}
