//! Which QEMU permissions each file of an image holds and shares, and taking them.
//!
//! The permissions are the ones QEMU 10's block graph computes for the same open (checked
//! against `/proc/locks` while `qemu-io`/`qemu-nbd` hold images), so that QEMU and this
//! library see each other's opens exactly as they see their own:
//!
//! | file | read-only open | read-write open |
//! | --- | --- | --- |
//! | qcow2 image file (and qcow2 backing files) | holds consistent read; shares consistent read, write unchanged | holds consistent read, write, resize; shares consistent read, write unchanged |
//! | external data file | holds consistent read; shares all but resize | holds consistent read, write, resize; shares all but resize |
//! | raw image (and raw backing files) | holds consistent read; shares all | holds consistent read, write (resize when resizing); shares all |
//! | a file being created (before truncation) | — | holds write, resize; shares all but resize |
//!
//! A qcow2 file never shares "write" or "resize": its metadata lives in the file and two
//! writers with separate caches corrupt it. With `force_share` (`-U`) an open shares
//! everything, which QEMU allows for read-only opens only.

use crate::error::{ImageError, Op, Result};
use crate::options::OpenOptions;
use qcow2_io::{FileStorage, Locking, Perms};
use std::path::Path;

/// What a file is to the image that opens it (it decides the permissions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// A qcow2 image file: metadata and (without a data file) guest data.
    Qcow2,
    /// The external data file of a qcow2 image: guest data only.
    DataFile,
    /// A raw image: the file is the disk. `resize` adds the resize permission to a
    /// writable open (`qemu-img resize`).
    Raw {
        /// Whether the open may change the length.
        resize: bool,
    },
    /// A file being created (QEMU's `raw_co_create`): writes and resizes, shares all but
    /// resize; taken before the old contents are truncated. Always writable.
    NewFile,
}

/// QEMU's message for `-U` on a writable open.
pub const FORCE_SHARE_READ_ONLY: &str = "force-share=on can only be used with read-only images";

/// The permissions (held, shared) of a file in `role`, opened writable or not.
pub fn permissions(role: FileRole, writable: bool, force_share: bool) -> (Perms, Perms) {
    let read = Perms::CONSISTENT_READ;
    let (perm, shared) = match role {
        FileRole::Qcow2 => {
            let perm = if writable {
                read | Perms::WRITE | Perms::RESIZE
            } else {
                read
            };
            (perm, read | Perms::WRITE_UNCHANGED)
        }
        FileRole::DataFile => {
            let perm = if writable {
                read | Perms::WRITE | Perms::RESIZE
            } else {
                read
            };
            (perm, Perms::ALL.without(Perms::RESIZE))
        }
        FileRole::Raw { resize } => {
            let perm = match (writable, resize) {
                (false, _) => read,
                (true, false) => read | Perms::WRITE,
                (true, true) => read | Perms::WRITE | Perms::RESIZE,
            };
            (perm, Perms::ALL)
        }
        FileRole::NewFile => (
            Perms::WRITE | Perms::RESIZE,
            Perms::ALL.without(Perms::RESIZE),
        ),
    };
    if force_share {
        (perm, Perms::ALL)
    } else {
        (perm, shared)
    }
}

/// QEMU's refusal of force-share on a writable open.
pub(crate) fn force_share_refused() -> ImageError {
    ImageError::Refused {
        op: Op::Open,
        message: FORCE_SHARE_READ_ONLY.into(),
        hint: None,
        errno: qcow2_io::errno::EINVAL,
    }
}

/// Takes the permissions of `role` on `file` (named `path` in messages) as `locking` and
/// `force_share` say. A conflict is [`ImageError::Locked`] with QEMU's message and hint;
/// force-share on a writable open is refused with QEMU's message.
pub fn lock_file(
    file: &FileStorage,
    path: &Path,
    role: FileRole,
    writable: bool,
    locking: Locking,
    force_share: bool,
) -> Result<()> {
    if force_share && writable {
        return Err(force_share_refused());
    }
    let (perm, shared) = permissions(role, writable, force_share);
    file.set_permissions(locking, perm, shared)
        .map_err(|source| ImageError::locked(path, None, source))
}

/// [`lock_file`] with the locking options of `opts`.
pub(crate) fn lock_with(
    file: &FileStorage,
    path: &Path,
    role: FileRole,
    writable: bool,
    opts: &OpenOptions,
) -> Result<()> {
    lock_file(file, path, role, writable, opts.locking, opts.force_share)
}

/// Locks an external data file as QEMU does: QEMU attaches the data child while the image
/// has no user yet, holding nothing and sharing all but resize, then raises it to the
/// final permissions when the image's user attaches. Both steps are taken so that a
/// conflict reports the permission QEMU reports (a holder of "resize" is found first).
pub(crate) fn lock_data_file(
    file: &FileStorage,
    path: &Path,
    writable: bool,
    opts: &OpenOptions,
) -> Result<()> {
    if opts.force_share && writable {
        return Err(force_share_refused());
    }
    let (_, shared) = permissions(FileRole::DataFile, false, opts.force_share);
    file.set_permissions(opts.locking, Perms::NONE, shared)
        .map_err(|source| ImageError::locked(path, None, source))?;
    lock_with(file, path, FileRole::DataFile, writable, opts)
}
