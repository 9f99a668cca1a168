//! QEMU's implementation limits (`block/qcow2.h`), which open-time validation enforces.

/// Smallest `cluster_bits` QEMU accepts (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest `cluster_bits` QEMU accepts (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Default cluster size of `qemu-img create`.
pub const DEFAULT_CLUSTER_SIZE: u64 = 65536;
/// Largest active or snapshot L1 table, in bytes (4 Mi entries).
pub const MAX_L1_SIZE: u64 = 32 * 1024 * 1024;
/// Largest refcount table, in bytes (1 Mi refcount blocks).
pub const MAX_REFTABLE_SIZE: u64 = 8 * 1024 * 1024;
/// Largest host offset of data or metadata (`QCOW_MAX_CLUSTER_OFFSET`).
pub const MAX_CLUSTER_OFFSET: u64 = (1 << 56) - 1;
/// Largest number of internal snapshots.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// Largest snapshot table, in bytes.
pub const MAX_SNAPSHOTS_SIZE: u64 = 1024 * 65536;
/// Largest extra-data area of one snapshot-table entry.
pub const MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;
/// Largest number of persistent bitmaps.
pub const MAX_BITMAPS: u64 = 65535;
/// Largest bitmap directory, in bytes.
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * 65535;
/// Largest `refcount_order` (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Default `refcount_order` (16-bit refcounts), the only one version 2 allows.
pub const DEFAULT_REFCOUNT_ORDER: u32 = 4;
/// Largest backing file name, in bytes (the spec's limit).
pub const MAX_BACKING_FILE_NAME: u64 = 1023;
/// Size of a snapshot-table entry's fixed part.
pub const SNAPSHOT_ENTRY_FIXED_SIZE: u64 = 40;
/// Size of one L1 or standard L2 entry, and of one refcount-table entry.
pub const ENTRY_SIZE: u64 = 8;
/// Number of subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
/// Smallest subcluster (so extended L2 needs `cluster_bits >= 14`).
pub const MIN_SUBCLUSTER_SIZE: u64 = 512;
/// Sector size used by compressed-cluster descriptors.
pub const SECTOR_SIZE: u64 = 512;
