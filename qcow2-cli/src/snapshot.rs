//! `qcow2 snapshot`: the list (from the format crate's snapshot-table parser); create,
//! apply and delete wait on the qcow2-snapshot crate.

use crate::image::{self, Format};
use crate::info::snapshot_list_text;
use crate::{out, CliError};

/// `snapshot -l`: qemu-img's "Snapshot list:" table; nothing for an image without snapshots
/// or a raw image.
pub fn list(file: &str, format: Option<Format>) -> Result<(), CliError> {
    let o = image::open(file, format, false)?;
    if let Some(q) = &o.qcow2 {
        out(&snapshot_list_text(&q.snapshots));
    }
    Ok(())
}
