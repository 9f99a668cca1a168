//! Create and open options.

use crate::backing::BackingOpener;
use qcow2_format::layout::CreateOptions as LayoutOptions;
use std::path::PathBuf;
use std::sync::Arc;

/// `preallocation=` of `qemu-img create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// No preallocation (the default).
    #[default]
    Off,
    /// L2 tables and data clusters are allocated; data reads as zero from the (sparse) file.
    Metadata,
    /// As `Metadata`, and the file is extended to cover every data cluster.
    Falloc,
    /// As `Metadata`, and zeros are written over every data cluster.
    Full,
}

/// The options of `qemu-img create -f qcow2`: the on-disk layout options, which the format
/// crate owns (size, cluster size, refcount width, compat, lazy refcounts, compression type,
/// extended L2, backing file), plus what only a live image can do (preallocation). The
/// layout fields are reachable directly (`opts.cluster_size`) through `Deref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// The layout of the fresh image.
    pub layout: LayoutOptions,
    /// `preallocation=`.
    pub preallocation: Preallocation,
}

impl CreateOptions {
    /// qemu-img's defaults for an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        LayoutOptions::new(size).into()
    }
}

impl From<LayoutOptions> for CreateOptions {
    /// The layout with no preallocation.
    fn from(layout: LayoutOptions) -> Self {
        Self {
            layout,
            preallocation: Preallocation::Off,
        }
    }
}

impl std::ops::Deref for CreateOptions {
    type Target = LayoutOptions;
    fn deref(&self) -> &LayoutOptions {
        &self.layout
    }
}

impl std::ops::DerefMut for CreateOptions {
    fn deref_mut(&mut self) -> &mut LayoutOptions {
        &mut self.layout
    }
}

/// QEMU's `overlap-check` templates (reference §2.10). Which metadata structures every write
/// is checked against before it is issued (invariant 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverlapLevel {
    /// No checks.
    None,
    /// Header, active L1, refcount table, snapshot table, bitmap directory.
    Constant,
    /// `Constant` plus active L2 tables, refcount blocks and inactive L1 tables (QEMU's
    /// default).
    #[default]
    Cached,
    /// `Cached` plus inactive L2 tables (reads every snapshot L1 table at open).
    All,
}

/// How (and whether) a backing file named by the image is opened. Images are untrusted: a
/// backing file name is only followed when the caller says so.
#[derive(Clone, Default)]
pub enum BackingPolicy {
    /// Never open backing files; an image with one opens without it (unallocated clusters
    /// then read as zeros) only if `allow_missing` is set, else the open fails.
    #[default]
    None,
    /// Do not open the backing file, and read unallocated clusters as zeros.
    Ignore,
    /// Open backing files by path, relative names resolved against `base_dir` (the
    /// directory of the image), following at most `max_depth` levels, and only files under
    /// one of `allowed_dirs` (canonicalised). Formats `qcow2` and `raw`; without a format
    /// extension the file is probed (qcow2 magic, else raw).
    Open {
        /// Directory relative names are resolved against.
        base_dir: PathBuf,
        /// Maximum chain length below this image.
        max_depth: u32,
        /// Directories backing files must lie in.
        allowed_dirs: Vec<PathBuf>,
    },
    /// A caller-supplied opener decides.
    Custom(Arc<dyn BackingOpener>),
}

impl std::fmt::Debug for BackingPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackingPolicy::None => f.write_str("None"),
            BackingPolicy::Ignore => f.write_str("Ignore"),
            BackingPolicy::Open {
                base_dir,
                max_depth,
                allowed_dirs,
            } => f
                .debug_struct("Open")
                .field("base_dir", base_dir)
                .field("max_depth", max_depth)
                .field("allowed_dirs", allowed_dirs)
                .finish(),
            BackingPolicy::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Runtime options of an open (QEMU's `-o` options of `open`, reference §1.12).
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open read-only: no write ever reaches the storage.
    pub read_only: bool,
    /// `l2-cache-size` in bytes (`None`: QEMU's default).
    pub l2_cache_size: Option<u64>,
    /// `l2-cache-entry-size` in bytes (`None`: QEMU's default).
    pub l2_cache_entry_size: Option<u64>,
    /// `refcount-cache-size` in bytes (`None`: QEMU's default of 4 clusters).
    pub refcount_cache_size: Option<u64>,
    /// `lazy-refcounts=on|off` (`None`: the image's compatible bit).
    pub lazy_refcounts: Option<bool>,
    /// `pass-discard-request` (QEMU: on iff `discard=unmap`).
    pub pass_discard_request: bool,
    /// `pass-discard-snapshot`.
    pub pass_discard_snapshot: bool,
    /// `pass-discard-other`.
    pub pass_discard_other: bool,
    /// `discard-no-unref`: guest discards keep the host cluster (v3 only).
    pub discard_no_unref: bool,
    /// `overlap-check`.
    pub overlap_check: OverlapLevel,
    /// How backing files are opened.
    pub backing: BackingPolicy,
    /// Repair a dirty image (lazy refcounts after a crash) on a read-write open, as QEMU
    /// does. When false, such an open fails.
    pub repair_dirty: bool,
    /// The external data file of an image that has one (incompatible feature bit 2). When
    /// `None`, the name stored in the image is opened as QEMU opens it (a relative name is
    /// relative to the working directory) if it lies in the allowed directories of a
    /// [`BackingPolicy::Open`]; any other backing policy then refuses the image.
    pub data_file: Option<DataFileStorage>,
    /// QEMU's `locking` option of the file driver for the files the library opens by name
    /// ([`crate::Image::open_path`], [`crate::Image::open_file`], backing files of
    /// [`BackingPolicy::Open`], the data file by its name): `Auto` (the default) takes
    /// QEMU's image locks where OFD locks work, `On` requires them, `Off` takes none.
    /// Storage the caller passes in ([`crate::Image::open`], [`OpenOptions::data_file`])
    /// is never locked by the library.
    pub locking: qcow2_io::Locking,
    /// QEMU's `force-share` (`-U`): share every permission with other opens (a writer
    /// elsewhere may change the image under this open). Read-only opens only; a writable
    /// open with it is refused with QEMU's message. Inherited by backing and data files.
    pub force_share: bool,
    /// The passphrase of an encrypted (LUKS, `crypt_method` 2) image: QEMU's
    /// `encrypt.key-secret`. Opening an encrypted image without it fails with QEMU's
    /// "Parameter 'encrypt.key-secret' is required for cipher"; with a wrong one with
    /// "Invalid password, cannot unlock any keyslot"; nothing is written either way.
    /// Backing files are opened with the same secret.
    pub key_secret: Option<qcow2_crypto::Secret>,
}

/// Caller-supplied storage of an external data file (see [`OpenOptions::data_file`]).
#[derive(Clone)]
pub struct DataFileStorage(pub Arc<dyn qcow2_io::Storage>);

impl std::fmt::Debug for DataFileStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataFileStorage(..)")
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            l2_cache_size: None,
            l2_cache_entry_size: None,
            refcount_cache_size: None,
            lazy_refcounts: None,
            pass_discard_request: false,
            pass_discard_snapshot: true,
            pass_discard_other: false,
            discard_no_unref: false,
            overlap_check: OverlapLevel::Cached,
            backing: BackingPolicy::None,
            repair_dirty: true,
            data_file: None,
            locking: qcow2_io::Locking::Auto,
            force_share: false,
            key_secret: None,
        }
    }
}

impl OpenOptions {
    /// Read-write with QEMU's defaults.
    pub fn read_write() -> Self {
        Self::default()
    }

    /// Read-only with QEMU's defaults.
    pub fn read_only() -> Self {
        Self {
            read_only: true,
            ..Self::default()
        }
    }
}
