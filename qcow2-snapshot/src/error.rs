//! Typed errors of the snapshot engine.

use qcow2_cache::{CacheError, OverlapError};
use qcow2_format::display::CHex;
use qcow2_refcount::RefcountError;
use std::io;

/// An error reported by the host (the image facade) for a service only it can perform:
/// resizing the virtual disk or growing the active L1 table.
pub type HostError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in a snapshot operation.
///
/// Variants carry the offsets and indexes QEMU's messages name; [`Error::errno`] gives the
/// errno QEMU would return for the same failure (what `qemu-img` turns into "File too
/// large", "Invalid argument", "No such file or directory", ...). Variants for which
/// [`Error::is_corruption`] is true are the ones QEMU reports through
/// `qcow2_signal_corruption` (the facade marks the image corrupt).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No snapshot matched the lookup (QEMU: `-ENOENT`). qemu-img prints "snapshot not
    /// found" for `-d` and "Failed to load snapshot: No such file or directory" for `-a`.
    #[error("snapshot not found: '{name}'")]
    NotFound {
        /// The id or name looked up.
        name: String,
    },
    /// The image already has 65536 snapshots (QEMU: `-EFBIG`, "File too large").
    #[error("File too large: the image already has {count} snapshots (the limit is 65536)")]
    TooManySnapshots {
        /// The current number of snapshots.
        count: usize,
    },
    /// The header's `snapshots_offset` is unaligned or too large to hold a table (QEMU:
    /// `-EINVAL`, "Snapshot table offset invalid").
    #[error("Snapshot table offset invalid")]
    TableOffsetInvalid {
        /// The header's `snapshots_offset`.
        offset: u64,
    },
    /// The snapshot's L1 table has more entries than QEMU allows (32 MiB of entries).
    /// QEMU: `-EFBIG`, "Snapshot L1 table too large".
    #[error("Snapshot L1 table too large")]
    L1TooLarge {
        /// The snapshot's `l1_size`.
        l1_size: u32,
    },
    /// The snapshot's L1 table offset is unaligned or its end is beyond `INT64_MAX`.
    /// QEMU: `-EINVAL`, "Snapshot L1 table offset invalid".
    #[error("Snapshot L1 table offset invalid")]
    L1OffsetInvalid {
        /// The snapshot's `l1_table_offset`.
        offset: u64,
    },
    /// An L1 entry points at an L2 table that is not cluster aligned (QEMU: fatal corruption,
    /// `-EIO`).
    #[error("L2 table offset {} unaligned (L1 index: {})", CHex(*l2_offset), CHex(*l1_index))]
    L2TableUnaligned {
        /// The masked L2 table offset.
        l2_offset: u64,
        /// Index of the L1 entry.
        l1_index: u64,
    },
    /// A nonzero L1 entry whose offset field is 0 (it would make the header an L2 table).
    #[error("L1 entry {} has no L2 table offset (entry {:#x}); L1 entry corrupted", CHex(*l1_index), entry)]
    L1EntryInvalid {
        /// Index of the L1 entry.
        l1_index: u64,
        /// The raw entry.
        entry: u64,
    },
    /// A data (or preallocated zero) cluster whose host offset is not cluster aligned
    /// (QEMU: fatal corruption, `-EIO`).
    #[error(
        "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
        CHex(*offset),
        CHex(*l2_offset),
        CHex(*l2_index)
    )]
    ClusterUnaligned {
        /// The unaligned host offset.
        offset: u64,
        /// The L2 table holding the entry.
        l2_offset: u64,
        /// Index of the entry in its L2 table.
        l2_index: u64,
    },
    /// A table or data range referenced by the image lies one cluster or more beyond the end
    /// of the file (the condition `qemu-img check` reports as "counting reference for region
    /// exceeding the end of the file"). Refused before any refcount changes: updating
    /// refcounts there would grow the refcount structures for clusters that hold nothing.
    #[error("reference to {} bytes at offset {} exceeds the end of the file ({}) by one cluster or more", CHex(*size), CHex(*offset), CHex(*file_len))]
    BeyondEndOfFile {
        /// Start of the referenced range.
        offset: u64,
        /// Its length.
        size: u64,
        /// The file length.
        file_len: u64,
    },
    /// A compressed descriptor whose byte range cannot be represented.
    #[error("invalid compressed cluster descriptor {entry:#x} (L2 offset: {}, L2 index: {}): {source}", CHex(*l2_offset), CHex(*l2_index))]
    CompressedInvalid {
        /// The raw L2 entry.
        entry: u64,
        /// The L2 table holding it.
        l2_offset: u64,
        /// Index of the entry in its L2 table.
        l2_index: u64,
        /// What is wrong with it.
        #[source]
        source: qcow2_format::CompressedError,
    },
    /// Adding the snapshot's references would exceed the refcount width (refcount_bits 1 or
    /// 2: one snapshot too many). Everything applied was undone. QEMU: `-EINVAL`, "Invalid
    /// argument".
    #[error("Invalid argument: refcount overflow at cluster offset {cluster_offset:#x} (refcount {refcount}, adding {addend} exceeds {max}); use a wider refcount_bits")]
    RefcountOverflow {
        /// Host offset of the cluster that would overflow.
        cluster_offset: u64,
        /// Its refcount.
        refcount: u64,
        /// What could not be added.
        addend: u64,
        /// `2^refcount_bits - 1`.
        max: u64,
    },
    /// Snapshots are not supported with an external data file (QEMU: `-ENOTSUP`).
    #[error("Operation not supported: internal snapshots need the data in the image file")]
    DataFile,
    /// The snapshot table cannot be read or written within QEMU's limits.
    #[error(transparent)]
    Table(#[from] qcow2_format::SnapshotError),
    /// The refcount engine failed.
    #[error(transparent)]
    Refcount(RefcountError),
    /// The metadata cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The pre-write overlap check refused a write (invariant 5); nothing was written.
    #[error(transparent)]
    Overlap(#[from] OverlapError),
    /// A direct storage operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The storage error.
        #[source]
        source: io::Error,
    },
    /// The header switch to a new snapshot table was written but the flush after it failed:
    /// whether the old or the new table is the durable one is unknown, so neither was freed
    /// (both leak at most). The image must be treated as poisoned until reopened.
    #[error("Failed to switch to the new snapshot table (flush failed; state unknown): {source}")]
    TableSwitchUnknown {
        /// The flush error.
        #[source]
        source: io::Error,
    },
    /// A host service (resize, L1 growth) failed.
    #[error("{context}: {source}")]
    Host {
        /// Which service.
        context: &'static str,
        /// The host's error.
        #[source]
        source: HostError,
    },
    /// A stage of a multi-step operation failed; `context` is QEMU's message for the stage
    /// (e.g. "Failed to free the cluster and L1 table").
    #[error("{context}: {source}")]
    Stage {
        /// QEMU's stage message.
        context: &'static str,
        /// What failed.
        #[source]
        source: Box<Error>,
    },
}

impl From<RefcountError> for Error {
    fn from(e: RefcountError) -> Self {
        match e {
            RefcountError::Overflow {
                cluster_offset,
                refcount,
                addend,
                max,
            } => Error::RefcountOverflow {
                cluster_offset,
                refcount,
                addend,
                max,
            },
            RefcountError::Cache(c) => Error::Cache(c),
            other => Error::Refcount(other),
        }
    }
}

impl Error {
    pub(crate) fn io(context: &'static str, source: io::Error) -> Self {
        Error::Io { context, source }
    }

    pub(crate) fn stage(context: &'static str, source: Error) -> Self {
        Error::Stage {
            context,
            source: Box::new(source),
        }
    }

    /// The innermost error (through [`Error::Stage`] wrappers).
    pub fn root(&self) -> &Error {
        match self {
            Error::Stage { source, .. } => source.root(),
            e => e,
        }
    }

    /// Whether the error reports corruption in the image (QEMU would mark it corrupt).
    pub fn is_corruption(&self) -> bool {
        match self.root() {
            Error::L2TableUnaligned { .. }
            | Error::L1EntryInvalid { .. }
            | Error::ClusterUnaligned { .. }
            | Error::BeyondEndOfFile { .. }
            | Error::CompressedInvalid { .. } => true,
            Error::Refcount(r) => r.is_corruption(),
            _ => false,
        }
    }

    /// The errno QEMU returns for this failure.
    pub fn errno(&self) -> i32 {
        use qcow2_io::errno::{EFBIG, EINVAL, EIO};
        match self.root() {
            Error::NotFound { .. } => libc::ENOENT,
            Error::TooManySnapshots { .. } | Error::L1TooLarge { .. } => EFBIG,
            Error::L1OffsetInvalid { .. }
            | Error::TableOffsetInvalid { .. }
            | Error::RefcountOverflow { .. } => EINVAL,
            Error::L2TableUnaligned { .. }
            | Error::L1EntryInvalid { .. }
            | Error::ClusterUnaligned { .. }
            | Error::BeyondEndOfFile { .. }
            | Error::CompressedInvalid { .. } => EIO,
            Error::DataFile => libc::ENOTSUP,
            Error::Table(t) => match t {
                qcow2_format::SnapshotError::TooManySnapshots { .. }
                | qcow2_format::SnapshotError::TooMuchExtraData { .. }
                | qcow2_format::SnapshotError::TableTooBig { .. } => EFBIG,
                _ => EINVAL,
            },
            Error::Refcount(r) => r.errno(),
            Error::Cache(c) => c
                .io_error()
                .and_then(io::Error::raw_os_error)
                .unwrap_or(EIO),
            Error::Overlap(_) => EIO,
            Error::Io { source, .. } | Error::TableSwitchUnknown { source } => {
                source.raw_os_error().unwrap_or(EIO)
            }
            Error::Host { source, .. } => source
                .downcast_ref::<io::Error>()
                .and_then(io::Error::raw_os_error)
                .unwrap_or(EIO),
            Error::Stage { .. } => EIO,
        }
    }
}
