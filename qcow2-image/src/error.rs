//! Typed errors of the image facade.

use qcow2_alloc::AllocError;
use qcow2_cache::CacheError;
use qcow2_format::header::HeaderError;
use qcow2_format::layout::LayoutError;
use qcow2_refcount::RefcountError;
use std::io;

/// The guest operation an error belongs to, so a message says what was being done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Opening the image.
    Open,
    /// Creating the image.
    Create,
    /// A guest read.
    Read,
    /// A guest write.
    Write,
    /// A compressed write.
    WriteCompressed,
    /// A zero write.
    WriteZeroes,
    /// A discard.
    Discard,
    /// A flush.
    Flush,
    /// Closing the image.
    Close,
    /// A mapping query.
    Map,
    /// Resizing the image.
    Resize,
    /// Creating an internal snapshot.
    SnapshotCreate,
    /// Reverting to an internal snapshot.
    SnapshotApply,
    /// Deleting an internal snapshot.
    SnapshotDelete,
    /// Changing image options in place (`qemu-img amend`).
    Amend,
    /// Changing the backing file, copying what differs first (`qemu-img rebase`).
    Rebase,
    /// Writing an overlay's data into an image below it (`qemu-img commit`).
    Commit,
    /// A persistent-bitmap operation (add, remove, clear, enable, disable, merge, store).
    Bitmap,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Open => "open",
            Op::Create => "create",
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteCompressed => "compressed write",
            Op::WriteZeroes => "write zeroes",
            Op::Discard => "discard",
            Op::Flush => "flush",
            Op::Close => "close",
            Op::Map => "map",
            Op::Resize => "resize",
            Op::SnapshotCreate => "snapshot create",
            Op::SnapshotApply => "snapshot apply",
            Op::SnapshotDelete => "snapshot delete",
            Op::Amend => "amend",
            Op::Rebase => "rebase",
            Op::Commit => "commit",
            Op::Bitmap => "bitmap",
        })
    }
}

/// Everything that can go wrong in the facade. Each variant names what is wrong and where
/// (guest or host offsets); [`ImageError::errno`] gives the errno QEMU would report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The header or first cluster failed QEMU's open-time validation (message as QEMU's).
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Create options qemu-img would refuse.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A storage operation failed.
    #[error("{op} failed: {context} at {offset:#x}: {source}")]
    Io {
        /// The operation.
        op: Op,
        /// What was being done.
        context: &'static str,
        /// The host (or guest, as the context says) offset involved.
        offset: u64,
        /// The storage error.
        #[source]
        source: io::Error,
    },
    /// The metadata cache failed.
    #[error("{op} failed: {source}")]
    Cache {
        /// The operation.
        op: Op,
        /// The cache error.
        #[source]
        source: CacheError,
    },
    /// The refcount engine failed.
    #[error("{op} failed: {source}")]
    Refcount {
        /// The operation.
        op: Op,
        /// The refcount error.
        #[source]
        source: RefcountError,
    },
    /// The allocation policy failed.
    #[error("{op} failed: {source}")]
    Alloc {
        /// The operation.
        op: Op,
        /// The allocation error.
        #[source]
        source: AllocError,
    },
    /// The image was opened read-only.
    #[error("{op} refused: the image is opened read-only")]
    ReadOnly {
        /// The operation.
        op: Op,
    },
    /// An earlier metadata write or flush failed (invariant 7): the on-disk state is only
    /// known to be consistent up to the last successful flush, so the image refuses writes
    /// until it is reopened (and checked).
    #[error("{op} refused: the image is unusable after an earlier failure ({cause}); reopen it")]
    Poisoned {
        /// The operation.
        op: Op,
        /// What failed first.
        cause: String,
    },
    /// QEMU-style corruption was detected (the message is QEMU's, e.g. "L2 table offset
    /// 0x42a00 unaligned (L1 index: 0)"). A fatal one marks a writable image corrupt.
    #[error("{op} failed: image corruption: {message}")]
    Corruption {
        /// The operation.
        op: Op,
        /// QEMU's corruption message.
        message: String,
        /// Whether the image was (or would have been) marked corrupt.
        fatal: bool,
    },
    /// A request outside the image.
    #[error("{op} of {len} bytes at {offset:#x} is outside the image (virtual size {size:#x})")]
    OutOfRange {
        /// The operation.
        op: Op,
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// The dirty bit is set and no repair is available for a read-write open.
    #[error("Could not repair dirty image: {reason}")]
    DirtyImage {
        /// Why the repair did not happen or failed.
        reason: String,
    },
    /// A feature this facade does not implement.
    #[error("{op}: unsupported: {what}")]
    Unsupported {
        /// The operation.
        op: Op,
        /// What is unsupported.
        what: String,
    },
    /// An invalid argument from the caller.
    #[error("{op}: invalid argument: {reason}")]
    InvalidArgument {
        /// The operation.
        op: Op,
        /// What is wrong.
        reason: String,
    },
    /// Compressed data that does not decompress to exactly one cluster.
    #[error("{op} failed: compressed cluster at host offset {host_offset:#x} (guest {guest_offset:#x}) is invalid: {reason}")]
    Decompress {
        /// The operation.
        op: Op,
        /// Guest offset of the cluster.
        guest_offset: u64,
        /// Host byte offset of the compressed data.
        host_offset: u64,
        /// What went wrong.
        reason: String,
    },
    /// An internal-snapshot operation failed (the snapshot engine's error: QEMU's messages
    /// and errno via [`qcow2_snapshot::Error::errno`]).
    #[error("{op} failed: {source}")]
    Snapshot {
        /// The operation.
        op: Op,
        /// The snapshot engine's error.
        #[source]
        source: qcow2_snapshot::Error,
    },
    /// A request QEMU refuses, with QEMU's message (e.g. amend's "Invalid parameter
    /// 'cluster_size'", resize's "Can't resize a v2 image which has snapshots", open's
    /// "Too much extra metadata in snapshot table entry 3"). `hint` is the second line QEMU
    /// prints after some of them ("This option is only supported for image creation").
    /// Nothing was changed unless the operation's documentation says otherwise.
    #[error("{message}")]
    Refused {
        /// The operation.
        op: Op,
        /// QEMU's message.
        message: String,
        /// QEMU's hint line, if it prints one.
        hint: Option<String>,
        /// The errno QEMU returns.
        errno: i32,
    },
    /// The bitmaps break QEMU's loader rules (QEMU refuses to open such images).
    #[error("{source}")]
    Bitmaps {
        /// The operation.
        op: Op,
        /// What is wrong, in QEMU's words.
        source: qcow2_format::bitmap::BitmapError,
    },
    /// The backing chain could not be opened or read.
    #[error("backing file {name:?}: {reason}")]
    Backing {
        /// The backing file name as stored in the image.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// Another open holds the file in a way that conflicts with this one (QEMU's image
    /// locks: "Failed to get \"write\" lock"), or the locks could not be taken. `hint` is
    /// the line qemu-img prints after it: "Is another process using the image [PATH]?".
    /// Nothing was read or written.
    #[error("{context}{source}")]
    Locked {
        /// The file whose lock failed, as QEMU names it (the image, a backing file or the
        /// data file).
        path: String,
        /// What was being opened, as QEMU prefixes it ("Could not open backing file: "),
        /// or empty.
        context: &'static str,
        /// The lock error (QEMU's message).
        #[source]
        source: qcow2_io::LockError,
        /// QEMU's hint line.
        hint: String,
    },
    /// The external data file could not be opened (`reason` names it, in QEMU's words
    /// where QEMU has them).
    #[error("{reason}")]
    DataFile {
        /// The data file name as stored in the image.
        name: String,
        /// What went wrong.
        reason: String,
    },
}

impl ImageError {
    /// A lock failure on the file at `path`, with QEMU's hint line.
    pub(crate) fn locked(
        path: &std::path::Path,
        context: Option<&'static str>,
        source: qcow2_io::LockError,
    ) -> Self {
        let path = path.display().to_string();
        let hint = format!("Is another process using the image [{path}]?");
        ImageError::Locked {
            path,
            context: context.unwrap_or(""),
            source,
            hint,
        }
    }

    /// Whether this error is a lock conflict with another open of the same file.
    pub fn is_locked(&self) -> bool {
        matches!(self, ImageError::Locked { .. })
    }

    pub(crate) fn io(op: Op, context: &'static str, offset: u64, source: io::Error) -> Self {
        ImageError::Io {
            op,
            context,
            offset,
            source,
        }
    }

    /// The errno QEMU would report for this failure (`EIO` when there is no better one).
    pub fn errno(&self) -> i32 {
        use qcow2_io::errno::{EFBIG, EINVAL, EIO};
        match self {
            ImageError::Io { source, .. } => source.raw_os_error().unwrap_or(EIO),
            ImageError::Cache { source, .. } => source
                .io_error()
                .and_then(io::Error::raw_os_error)
                .unwrap_or(EIO),
            ImageError::Refcount { source, .. } => source.errno(),
            ImageError::Alloc { source, .. } => source.errno(),
            ImageError::ReadOnly { .. } => libc_erofs(),
            ImageError::OutOfRange { .. } | ImageError::InvalidArgument { .. } => EINVAL,
            ImageError::Snapshot { source, .. } => source.errno(),
            ImageError::Refused { errno, .. } => *errno,
            ImageError::Locked { source, .. } => source.errno(),
            ImageError::Bitmaps { .. } => EINVAL,
            ImageError::Header(HeaderError::RefcountTableTooLarge { .. })
            | ImageError::Header(HeaderError::L1TableTooLarge { .. }) => EFBIG,
            _ => EIO,
        }
    }

    /// Whether this error reports image corruption.
    pub fn is_corruption(&self) -> bool {
        matches!(self, ImageError::Corruption { .. })
    }

    /// QEMU's hint line for this error, if it prints one after the message.
    pub fn hint(&self) -> Option<&str> {
        match self {
            ImageError::Refused { hint, .. } => hint.as_deref(),
            ImageError::Locked { hint, .. } => Some(hint),
            _ => None,
        }
    }
}

/// `ENOTSUP` (Linux): "Operation not supported".
pub(crate) const ENOTSUP: i32 = 95;

/// `EBUSY` (Linux): "Device or resource busy".
pub(crate) const EBUSY: i32 = 16;

const fn libc_erofs() -> i32 {
    30
}

/// Result alias of the facade.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;
