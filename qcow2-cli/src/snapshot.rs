//! `qcow2 snapshot`: list, create, apply and delete internal snapshots with qemu-img's
//! lookups (apply: id first, then name; delete: name only), messages and exit status.
//!
//! The list comes from the format crate's snapshot-table parser (a read-only open, as
//! qemu-img's); the other operations open the image read-write through the image facade
//! (a dirty image is repaired first, with the checker's lines on stderr, as QEMU does).

use qcow2_image::{Image, ImageError};

use crate::image::{self, Format};
use crate::info::snapshot_list_text;
use crate::io::strerror;
use crate::qcowdev;
use crate::{out, CliError};

/// The one operation of a `snapshot` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOp {
    /// `-l` (also the default).
    List,
    /// `-c NAME`.
    Create(String),
    /// `-a ID_OR_NAME`.
    Apply(String),
    /// `-d NAME`.
    Delete(String),
}

/// Runs one snapshot operation on `file`.
pub fn run(file: &str, format: Option<Format>, op: &SnapshotOp) -> Result<(), CliError> {
    match op {
        SnapshotOp::List => list(file, format),
        SnapshotOp::Create(name) => modify(file, format, op, name),
        SnapshotOp::Apply(name) => modify(file, format, op, name),
        SnapshotOp::Delete(name) => modify(file, format, op, name),
    }
}

/// `snapshot -l`: qemu-img's "Snapshot list:" table; nothing for an image without snapshots
/// or a raw image.
pub fn list(file: &str, format: Option<Format>) -> Result<(), CliError> {
    let o = image::open(file, format, false)?;
    if let Some(q) = &o.qcow2 {
        out(&snapshot_list_text(&q.snapshots));
    }
    Ok(())
}

/// The innermost error of `e`'s source chain, as text (the snapshot engine wraps stage
/// failures as "stage message: cause").
fn root_text(e: &ImageError) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The snapshot engine's error text (without the facade's "snapshot delete failed: ").
fn engine_text(e: &ImageError) -> String {
    use std::error::Error as _;
    match e {
        ImageError::Snapshot { .. } => e.source().map(|s| s.to_string()).unwrap_or_default(),
        _ => e.to_string(),
    }
}

/// The message qemu-img prints when `op` fails with `e` (without the program prefix).
fn failure_text(op: &SnapshotOp, name: &str, e: &ImageError) -> String {
    let errno_text = strerror(e.errno());
    match op {
        // qemu-img: error_report("Could not create snapshot '%s': %s", strerror(-ret)).
        SnapshotOp::Create(_) | SnapshotOp::List => {
            format!("Could not create snapshot '{name}': {errno_text}")
        }
        // bdrv_snapshot_goto refuses a node with dirty bitmaps with its own message.
        SnapshotOp::Apply(_) if matches!(e, ImageError::Refused { errno: 16, .. }) => {
            format!("Could not apply snapshot '{name}': {e}")
        }
        // bdrv_snapshot_goto: error_setg_errno(errp, -ret, "Failed to load snapshot").
        SnapshotOp::Apply(_) => {
            format!("Could not apply snapshot '{name}': Failed to load snapshot: {errno_text}")
        }
        // qemu-img looks the name up first; then qcow2_snapshot_delete has one message per
        // stage (the first without errno, the others with it).
        SnapshotOp::Delete(_) => {
            let text = engine_text(e);
            let detail = if e.errno() == ENOENT && text.starts_with("snapshot not found") {
                "snapshot not found".to_string()
            } else if text.starts_with(REMOVE_STAGE) {
                REMOVE_STAGE.to_string()
            } else if let Some(stage) = ERRNO_STAGES.iter().find(|s| text.starts_with(*s)) {
                format!("{stage}: {errno_text}")
            } else if text.starts_with("Snapshot L1 table") {
                root_text(e)
            } else {
                errno_text
            };
            format!("Could not delete snapshot '{name}': {detail}")
        }
    }
}

/// `ENOENT`.
const ENOENT: i32 = 2;
/// QEMU's delete stage reported without errno.
const REMOVE_STAGE: &str = "Failed to remove snapshot from snapshot list";
/// QEMU's delete stages reported with errno.
const ERRNO_STAGES: [&str; 2] = [
    "Failed to free the cluster and L1 table",
    "Failed to update snapshot status in disk",
];

/// Lines QEMU reports on its own before the operation's error: corruption, and the snapshot
/// L1 validation of apply (which QEMU prints with `error_report_err`).
fn preliminary_lines(op: &SnapshotOp, e: &ImageError) -> Vec<String> {
    let mut lines = Vec::new();
    if e.is_corruption() {
        lines.push(qcowdev::error_text(e));
    }
    let root = root_text(e);
    if matches!(op, SnapshotOp::Apply(_))
        && matches!(e, ImageError::Snapshot { .. })
        && root.starts_with("Snapshot L1 table")
    {
        lines.push(root);
    }
    lines
}

/// Create, apply or delete on a read-write open.
fn modify(file: &str, format: Option<Format>, op: &SnapshotOp, name: &str) -> Result<(), CliError> {
    let format = match format {
        Some(f) => f,
        // Probe only: the lock that matters (and its message) is the writable open's.
        None => image::probe(file)?,
    };
    if format == Format::Raw {
        // The raw driver has no snapshots; qemu-img's answers per operation.
        image::open(file, Some(Format::Raw), true)?;
        let msg = match op {
            SnapshotOp::Create(_) | SnapshotOp::List => {
                format!("Could not create snapshot '{name}': Operation not supported")
            }
            SnapshotOp::Apply(_) => {
                format!(
                    "Could not apply snapshot '{name}': Block driver does not support snapshots"
                )
            }
            SnapshotOp::Delete(_) => {
                format!("Could not delete snapshot '{name}': snapshot not found")
            }
        };
        return Err(CliError::new(msg));
    }
    let mut img: Image =
        qcowdev::open_image(file, false).map_err(|e| image::open_error(file, e))?;
    // The open's own messages are printed already; the operation's come with its outcome.
    let seen = img.messages().len();
    let result = match op {
        SnapshotOp::Create(n) => img.snapshot_create(n).map(|_| ()),
        SnapshotOp::Apply(n) => img.snapshot_apply(n),
        SnapshotOp::Delete(n) => img.snapshot_delete(n).map(|_| ()),
        SnapshotOp::List => Ok(()),
    };
    // QEMU's unprefixed diagnostics from inside the operation ("qcow2_free_clusters
    // failed: ..."), in the order they happened, before its outcome.
    for m in img.messages().get(seen..).unwrap_or_default() {
        eprintln!("{m}");
    }
    match result {
        Ok(()) => img.close().map_err(|e| {
            CliError::new(format!(
                "Error while closing the image: {}",
                qcowdev::error_text(&e)
            ))
        }),
        Err(e) => {
            for line in preliminary_lines(op, &e) {
                eprintln!("{}{line}", crate::prog::prefix());
            }
            // The failure is what matters; a close error after it would only repeat it.
            let _ = img.close();
            Err(CliError::new(failure_text(op, name, &e)))
        }
    }
}
