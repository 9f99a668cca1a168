//! Typed findings: everything the checker reports, each renderable as the exact stderr
//! line(s) `qemu-img check` 10.0 prints for it.

use core::fmt;

use qcow2_format::display::CHex;

/// How a mismatch is labelled in QEMU's `%s`-prefixed messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    /// Reported, not repaired (`ERROR`).
    Error,
    /// Being repaired in this pass (`Repairing`).
    Repairing,
}

impl Label {
    fn as_str(self) -> &'static str {
        match self {
            Label::Error => "ERROR",
            Label::Repairing => "Repairing",
        }
    }

    pub(crate) fn from_fix(fix: bool) -> Self {
        if fix {
            Label::Repairing
        } else {
            Label::Error
        }
    }
}

/// The three outcomes of comparing one cluster's on-disk refcount with its references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MismatchKind {
    /// The refcount is being set to the number of references (`Repairing`).
    Repairing,
    /// Fewer refcounts than references: corruption (`ERROR`).
    Error,
    /// More refcounts than references: a leak (`Leaked`).
    Leaked,
}

/// Why a snapshot table could not be used at all (QEMU's `qcow2_validate_table` failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotTableProblem {
    /// More than 65536 entries.
    TooLarge,
    /// Unaligned, or the table reaches beyond `i64::MAX`.
    OffsetInvalid,
}

/// One thing the checker found or did, in the order QEMU reports it.
///
/// `Display` renders the exact stderr text of `qemu-img check` (several lines for a few
/// variants, joined by `\n`, without a trailing newline). Lines that QEMU prints through
/// `error_report` carry its `qemu-img: ` prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Finding {
    /// The snapshot-table pointer in the header could not be read.
    SnapshotPointerReadFailed {
        /// Error text (`strerror`).
        error: String,
    },
    /// `nb_snapshots` above 65536 with `-r all`: the excess is dropped.
    DiscardingOverhangingSnapshots {
        /// Snapshots dropped.
        count: u64,
    },
    /// The snapshot table fails QEMU's table validation (a check error; the check fails).
    SnapshotTableInvalid {
        /// What is wrong.
        problem: SnapshotTableProblem,
        /// Snapshots beyond 65536, for the hint QEMU prints (0 = no hint).
        overhanging: u64,
    },
    /// The snapshot table could not be read (a check error; the check fails).
    SnapshotTableReadFailed {
        /// QEMU's message, e.g. "Too much extra metadata in snapshot table entry 3".
        message: String,
        /// QEMU's hint line, if any.
        hint: Option<String>,
    },
    /// Repair mode truncates an entry's extra data to 1024 bytes.
    DiscardingExtraData {
        /// Entry index.
        index: u32,
        /// Its extra-data size.
        extra_data_size: u32,
    },
    /// Repair mode drops snapshots beyond the 64 MiB table limit.
    DiscardingTooBigSnapshots {
        /// Snapshots dropped.
        count: u64,
    },
    /// Writing the reduced snapshot count failed.
    SnapshotCountUpdateFailed {
        /// Error text.
        error: String,
    },
    /// A v3 snapshot entry with less than 16 bytes of extra data.
    SnapshotEntryIncomplete {
        /// `ERROR` or `Repairing`.
        label: Label,
        /// Entry index.
        index: u32,
    },
    /// Rewriting the snapshot table failed.
    SnapshotTableUpdateFailed {
        /// Error text.
        error: String,
    },
    /// A referenced range ends one cluster or more beyond the end of the file (not counted).
    RegionBeyondEof {
        /// Start of the range (as QEMU's signed offset, printed in hex).
        offset: u64,
        /// Its length.
        size: u64,
    },
    /// A cluster's reference count would exceed the refcount width.
    RefcountOverflow {
        /// Host offset of the cluster.
        cluster_offset: u64,
    },
    /// Internal snapshots in an image with an external data file.
    SnapshotsWithDataFile {
        /// `nb_snapshots`.
        count: u64,
    },
    /// A snapshot whose L1 table offset is not cluster aligned (skipped).
    SnapshotL1Unaligned {
        /// Snapshot id.
        id: String,
        /// Snapshot name.
        name: String,
        /// The L1 table offset.
        l1_offset: u64,
    },
    /// A snapshot whose L1 table has more than 4 Mi entries (skipped).
    SnapshotL1TooLarge {
        /// Snapshot id.
        id: String,
        /// Snapshot name.
        name: String,
        /// `l1_size`.
        l1_size: u32,
    },
    /// An L1 table could not be read (a check error; the check fails).
    L1ReadFailed,
    /// An L1 entry with reserved bits set.
    L1ReservedBits {
        /// The raw entry.
        entry: u64,
    },
    /// An L1 entry whose L2 table offset is not cluster aligned.
    L2TableUnaligned {
        /// The L2 table offset.
        l2_offset: u64,
    },
    /// An L2 table could not be read (a check error; the check fails).
    L2ReadFailed,
    /// A standard L2 entry with reserved bits set.
    L2ReservedBits {
        /// The raw entry.
        entry: u64,
    },
    /// A compressed L2 entry with the COPIED flag.
    CompressedCopied {
        /// The compressed data's host offset.
        coffset: u64,
    },
    /// A compressed cluster in an image with an external data file.
    CompressedWithDataFile {
        /// Index of the entry in its L2 table.
        index: u64,
        /// The raw entry.
        entry: u64,
    },
    /// A compressed extended-L2 entry with a nonzero subcluster bitmap.
    CompressedWithBitmap {
        /// Index of the entry in its L2 table.
        index: u64,
        /// The raw entry.
        entry: u64,
    },
    /// A subcluster both allocated and reading as zero.
    AllocatedBitmapOverlap {
        /// The cluster's host offset.
        offset: u64,
    },
    /// A preallocated zero cluster whose offset is not cluster aligned (`-r all` makes it a
    /// plain zero cluster).
    UnalignedPreallocated {
        /// `ERROR` or `Repairing`.
        label: Label,
        /// The host offset.
        offset: u64,
    },
    /// A data cluster whose offset is not cluster aligned (never repaired).
    UnalignedData {
        /// The host offset.
        offset: u64,
    },
    /// An unallocated extended-L2 cluster with allocation bits.
    UnallocatedWithAllocBits,
    /// The L2 entry repair was refused by the metadata overlap check.
    L2EntryFixOverlap,
    /// The L2 entry repair could not be written.
    L2EntryFixWriteFailed {
        /// Error text.
        error: String,
    },
    /// A refcount-table entry with reserved bits set (needs a rebuild).
    ReftableEntryReserved {
        /// Refcount-table index.
        index: u64,
    },
    /// A refcount block that is not cluster aligned (needs a rebuild).
    RefblockUnaligned {
        /// Refcount-table index.
        index: u64,
    },
    /// A refcount block beyond the end of the file (`-r all` grows the file).
    RefblockOutsideImage {
        /// `ERROR` or `Repairing`.
        label: Label,
        /// Refcount-table index.
        index: u64,
    },
    /// Growing the file failed; QEMU's `error_report` line.
    ResizeErrorReport {
        /// The error's message.
        message: String,
    },
    /// Growing the file for an outside refcount block failed (needs a rebuild).
    ResizeFailed {
        /// Error text.
        error: String,
    },
    /// A refcount block referenced other than exactly once (needs a rebuild).
    RefblockRefcount {
        /// Refcount-table index.
        index: u64,
        /// Its computed reference count.
        refcount: u64,
    },
    /// The on-disk refcount of a cluster could not be read (a check error).
    CantGetRefcount {
        /// Cluster index.
        cluster: u64,
        /// Error text.
        error: String,
    },
    /// On-disk refcount differs from the number of references.
    RefcountMismatch {
        /// `Repairing`, `ERROR` or `Leaked`.
        kind: MismatchKind,
        /// Cluster index.
        cluster: u64,
        /// On-disk refcount.
        refcount: u64,
        /// Computed references.
        reference: u64,
    },
    /// `-r all` starts rebuilding the refcount structure.
    RebuildingRefcountStructure,
    /// Rebuilding failed (QEMU's `error_report_err` line, e.g. "ERROR writing refblock:
    /// Input/output error").
    RebuildFailed {
        /// The message.
        message: String,
    },
    /// After a rebuild, a used cluster still has refcount 0.
    RebuiltStillBroken,
    /// `-r leaks` cannot repair an image that needs a rebuild (a check error; fails).
    NeedRebuild,
    /// An active L1 entry whose COPIED flag disagrees with its L2 table's refcount.
    CopiedL2Cluster {
        /// `ERROR` or `Repairing`.
        label: Label,
        /// L1 index.
        l1_index: u64,
        /// The raw L1 entry.
        l1_entry: u64,
        /// The L2 table's refcount.
        refcount: u64,
    },
    /// An active L2 entry whose COPIED flag disagrees with its cluster's refcount.
    CopiedDataCluster {
        /// `ERROR` or `Repairing`.
        label: Label,
        /// The raw L2 entry.
        l2_entry: u64,
        /// The cluster's refcount.
        refcount: u64,
    },
    /// An active L2 table could not be read by the COPIED check.
    CopiedL2ReadFailed {
        /// Error text.
        error: String,
    },
    /// The COPIED repair of an L2 table was refused by the overlap check.
    CopiedL2WriteOverlap {
        /// Error text.
        error: String,
    },
    /// The COPIED repair of an L2 table could not be written.
    CopiedL2WriteFailed {
        /// Error text.
        error: String,
    },
    /// QEMU's corruption event (`qcow2_signal_corruption`): fatal when the image is open
    /// read-write (the corrupt bit is set and the image becomes unusable).
    CorruptionEvent {
        /// Fatal (repair mode) or not.
        fatal: bool,
        /// The event message, e.g. "Refblock offset 0x2a00 unaligned (reftable index: 0)".
        message: String,
    },
    /// Freeing clusters failed (`qcow2_free_clusters`).
    FreeClustersFailed {
        /// Error text.
        error: String,
    },
}

impl Finding {
    /// Whether this finding records a problem that QEMU counts (as opposed to a progress
    /// note such as "Rebuilding refcount structure").
    pub fn is_problem(&self) -> bool {
        !matches!(
            self,
            Finding::RebuildingRefcountStructure
                | Finding::DiscardingOverhangingSnapshots { .. }
                | Finding::DiscardingExtraData { .. }
                | Finding::DiscardingTooBigSnapshots { .. }
        )
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Finding::*;
        match self {
            SnapshotPointerReadFailed { error } => write!(
                f,
                "ERROR failed to read the snapshot table pointer from the image header: {error}"
            ),
            DiscardingOverhangingSnapshots { count } => {
                write!(f, "Discarding {count} overhanging snapshots")
            }
            SnapshotTableInvalid {
                problem,
                overhanging,
            } => {
                let what = match problem {
                    SnapshotTableProblem::TooLarge => "too large",
                    SnapshotTableProblem::OffsetInvalid => "offset invalid",
                };
                write!(f, "qemu-img: ERROR snapshot table {what}")?;
                if *overhanging > 0 {
                    write!(
                        f,
                        "\nYou can force-remove all {overhanging} overhanging snapshots with qemu-img check -r all"
                    )?;
                }
                Ok(())
            }
            SnapshotTableReadFailed { message, hint } => {
                write!(
                    f,
                    "qemu-img: ERROR failed to read the snapshot table: {message}"
                )?;
                if let Some(h) = hint {
                    write!(f, "\n{h}")?;
                }
                Ok(())
            }
            DiscardingExtraData {
                index,
                extra_data_size,
            } => write!(
                f,
                "Discarding too much extra metadata in snapshot table entry {index} ({extra_data_size} > 1024)"
            ),
            DiscardingTooBigSnapshots { count } => write!(
                f,
                "Discarding {count} overhanging snapshots (snapshot table is too big)"
            ),
            SnapshotCountUpdateFailed { error } => write!(
                f,
                "ERROR failed to update the snapshot count in the image header: {error}"
            ),
            SnapshotEntryIncomplete { label, index } => write!(
                f,
                "{} snapshot table entry {index} is incomplete",
                label.as_str()
            ),
            SnapshotTableUpdateFailed { error } => {
                write!(f, "ERROR failed to update snapshot table: {error}")
            }
            RegionBeyondEof { offset, size } => write!(
                f,
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ),
            RefcountOverflow { cluster_offset } => write!(
                f,
                "ERROR: overflow cluster offset=0x{cluster_offset:x}\nUse qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing"
            ),
            SnapshotsWithDataFile { count } => {
                write!(f, "ERROR {count} snapshots in image with data file")
            }
            SnapshotL1Unaligned {
                id,
                name,
                l1_offset,
            } => write!(
                f,
                "ERROR snapshot {id} ({name}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                CHex(*l1_offset)
            ),
            SnapshotL1TooLarge { id, name, l1_size } => write!(
                f,
                "ERROR snapshot {id} ({name}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                CHex(u64::from(*l1_size))
            ),
            L1ReadFailed => f.write_str("ERROR: I/O error in check_refcounts_l1"),
            L1ReservedBits { entry } => {
                write!(f, "ERROR found L1 entry with reserved bits set: {entry:x}")
            }
            L2TableUnaligned { l2_offset } => write!(
                f,
                "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
            ),
            L2ReadFailed => f.write_str("ERROR: I/O error in check_refcounts_l2"),
            L2ReservedBits { entry } => {
                write!(f, "ERROR found l2 entry with reserved bits set: {entry:x}")
            }
            CompressedCopied { coffset } => write!(
                f,
                "ERROR: coffset=0x{coffset:x}: copied flag must never be set for compressed clusters"
            ),
            CompressedWithDataFile { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with data file, entry=0x{entry:x}"
            ),
            CompressedWithBitmap { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry=0x{entry:x}"
            ),
            AllocatedBitmapOverlap { offset } => write!(
                f,
                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            ),
            UnalignedPreallocated { label, offset } => write!(
                f,
                "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                label.as_str()
            ),
            UnalignedData { offset } => write!(
                f,
                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
            ),
            UnallocatedWithAllocBits => f.write_str(
                "ERROR: Unallocated cluster has non-zero subcluster allocation map",
            ),
            L2EntryFixOverlap => f.write_str("ERROR: Overlap check failed"),
            L2EntryFixWriteFailed { error } => {
                write!(f, "ERROR: Failed to overwrite L2 table entry: {error}")
            }
            ReftableEntryReserved { index } => {
                write!(f, "ERROR refcount table entry {index} has reserved bits set")
            }
            RefblockUnaligned { index } => write!(
                f,
                "ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted"
            ),
            RefblockOutsideImage { label, index } => write!(
                f,
                "{} refcount block {index} is outside image",
                label.as_str()
            ),
            ResizeErrorReport { message } => write!(f, "qemu-img: {message}"),
            ResizeFailed { error } => write!(f, "ERROR could not resize image: {error}"),
            RefblockRefcount { index, refcount } => {
                write!(f, "ERROR refcount block {index} refcount={refcount}")
            }
            CantGetRefcount { cluster, error } => {
                write!(f, "Can't get refcount for cluster {cluster}: {error}")
            }
            RefcountMismatch {
                kind,
                cluster,
                refcount,
                reference,
            } => {
                let k = match kind {
                    MismatchKind::Repairing => "Repairing",
                    MismatchKind::Error => "ERROR",
                    MismatchKind::Leaked => "Leaked",
                };
                write!(
                    f,
                    "{k} cluster {cluster} refcount={refcount} reference={reference}"
                )
            }
            RebuildingRefcountStructure => f.write_str("Rebuilding refcount structure"),
            RebuildFailed { message } => write!(f, "qemu-img: {message}"),
            RebuiltStillBroken => f.write_str("ERROR rebuilt refcount structure is still broken"),
            NeedRebuild => f.write_str("ERROR need to rebuild refcount structures"),
            CopiedL2Cluster {
                label,
                l1_index,
                l1_entry,
                refcount,
            } => write!(
                f,
                "{} OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x} refcount={refcount}",
                label.as_str()
            ),
            CopiedDataCluster {
                label,
                l2_entry,
                refcount,
            } => write!(
                f,
                "{} OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}",
                label.as_str()
            ),
            CopiedL2ReadFailed { error } => write!(f, "ERROR: Could not read L2 table: {error}"),
            CopiedL2WriteOverlap { error } => write!(
                f,
                "ERROR: Could not write L2 table; metadata overlap check failed: {error}"
            ),
            CopiedL2WriteFailed { error } => {
                write!(f, "ERROR: Could not write L2 table: {error}")
            }
            CorruptionEvent { fatal, message } => {
                if *fatal {
                    write!(
                        f,
                        "qcow2: Marking image as corrupt: {message}; further corruption events will be suppressed"
                    )
                } else {
                    write!(
                        f,
                        "qcow2: Image is corrupt: {message}; further non-fatal corruption events will be suppressed"
                    )
                }
            }
            FreeClustersFailed { error } => write!(f, "qcow2_free_clusters failed: {error}"),
        }
    }
}

/// C's `strerror` text for the errno values the checker can meet; other I/O errors render
/// through their own `Display`.
pub(crate) fn strerror(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => errno_text(code),
        None => e.to_string(),
    }
}

/// glibc's message for `code`.
pub(crate) fn errno_text(code: i32) -> String {
    match code {
        libc_eio if libc_eio == EIO => "Input/output error".into(),
        c if c == ENOMEM => "Cannot allocate memory".into(),
        c if c == EINVAL => "Invalid argument".into(),
        c if c == EFBIG => "File too large".into(),
        c if c == ENOSPC => "No space left on device".into(),
        c if c == ENOMEDIUM => "No medium found".into(),
        c if c == ERANGE => "Numerical result out of range".into(),
        c if c == EAGAIN => "Resource temporarily unavailable".into(),
        c => {
            let s = std::io::Error::from_raw_os_error(c).to_string();
            // Rust appends " (os error N)"; C's strerror does not.
            match s.rfind(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
    }
}

pub(crate) const EIO: i32 = 5;
pub(crate) const EAGAIN: i32 = 11;
pub(crate) const ENOMEM: i32 = 12;
pub(crate) const EINVAL: i32 = 22;
pub(crate) const EFBIG: i32 = 27;
pub(crate) const ENOSPC: i32 = 28;
pub(crate) const ERANGE: i32 = 34;
pub(crate) const ENOMEDIUM: i32 = 123;

/// The errno of an I/O error (EIO when it carries none).
pub(crate) fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(EIO)
}
