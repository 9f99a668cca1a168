//! The [`Image`]: open, create, close, flush, the header bits, corruption and poison, and the
//! read path.
//!
//! Structure: *mapping* (L1/L2 lookups, allocation, linking; everything that touches
//! metadata) lives in methods under `&mut self` that return host extents; *data movement*
//! (reading and writing guest bytes at those extents) is done by small helpers that only
//! need the storage. Concurrency can later split the two along this line.

use crate::backing::{self, BackingImage};
use crate::error::{ImageError, Op, Result};
use crate::options::{CreateOptions, OpenOptions, Preallocation};
use crate::overlap::{self, Overlap, OverlapState};
use qcow2_alloc::{AllocError, Allocator};
use qcow2_cache::{default_l2_options, default_refblock_options, CacheError, CacheId};
use qcow2_cache::{CacheOptions, Caches, Handle, MIN_L2_CACHE_ENTRIES, MIN_REFCOUNT_CACHE_ENTRIES};
use qcow2_format::display::CHex;
use qcow2_format::entry::{self, L1E_OFFSET_MASK};
use qcow2_format::extensions::FirstCluster;
use qcow2_format::features::{
    CompressionType, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
};
use qcow2_format::header::{self, Header, HeaderError};
use qcow2_format::limits::{MAX_CLUSTER_BITS, MAX_L1_SIZE, MIN_CLUSTER_BITS};
use qcow2_format::{Geometry, L1Entry, L2Context, L2Entry, SubclusterType};
use qcow2_io::{Event, FileStorage, Storage, StorageExt};
use qcow2_refcount::{DiscardPassthrough, RefcountEngine, RefcountError};
use std::path::Path;
use std::sync::Arc;

/// Header offset of `incompatible_features`.
pub(crate) const HDR_INCOMPAT: u64 = 72;
/// Header offset of `size`.
pub(crate) const HDR_SIZE: u64 = 24;
/// Header offset of `l1_size` (be32), followed by `l1_table_offset` (be64).
pub(crate) const HDR_L1: u64 = 36;

/// What a guest range maps to (one run of equal kind inside one L2 slice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapKind {
    /// Guest data at this host offset.
    Data(u64),
    /// Reads as zeros; the host offset (of the first byte) if a cluster is preallocated.
    Zero(Option<u64>),
    /// A compressed cluster.
    Compressed(L2Entry),
    /// Not allocated here (backing file or zeros); the host offset (of the first byte) if
    /// the cluster has one (extended L2).
    Unallocated(Option<u64>),
}

/// One lookup result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunk {
    pub kind: MapKind,
    pub len: u64,
}

/// An open qcow2 image: the facade a VMM embeds.
///
/// Every method that touches metadata takes `&mut self`; the image is `Send`. Invariants the
/// image keeps (ARCHITECTURE.md): refcounts never under-count (cache dependencies), freed
/// clusters are quarantined until a durable flush, allocations unwind on error, table
/// switches are atomic, every write is overlap-checked, COPIED is exact, a failed metadata
/// write or flush poisons the image, unknown incompatible features are refused.
pub struct Image {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) fc: FirstCluster,
    pub(crate) geo: Geometry,
    pub(crate) ctx: L2Context,
    pub(crate) l1: Vec<u64>,
    pub(crate) caches: Caches,
    pub(crate) engine: RefcountEngine,
    pub(crate) alloc: Allocator,
    pub(crate) overlap: Overlap,
    pub(crate) read_only: bool,
    pub(crate) lazy: bool,
    pub(crate) poisoned: Option<String>,
    pub(crate) corruption_signalled: bool,
    pub(crate) backing: Option<Box<dyn BackingImage>>,
    pub(crate) discard_no_unref: bool,
    pub(crate) discard_passthrough_request: bool,
    pub(crate) messages: Vec<String>,
    pub(crate) closed: bool,
    /// 64-entry groups (by first index) of the active L1 whose on-disk copy is older than
    /// memory: new L2 tables are linked in memory and reach the disk at the next flush,
    /// after their own refcounts and contents (see [`Image::commit_l1`]).
    pub(crate) l1_dirty: std::collections::BTreeSet<u64>,
    /// The internal snapshot table (taken out while a snapshot operation runs).
    pub(crate) snapshots: qcow2_snapshot::Snapshots,
    /// The options the image was opened with (overlap level, caches; reused by a reopen
    /// after amend).
    pub(crate) opts: OpenOptions,
    /// Depth in the backing chain (0: the top image).
    pub(crate) depth: u32,
    /// Last decompressed cluster: (raw L2 entry word, cluster bytes).
    pub(crate) decompressed: Option<(u64, Vec<u8>)>,
    /// The external data file, if the image has one (guest data at the guest offset, not
    /// refcounted).
    pub(crate) data: Option<Arc<dyn Storage>>,
    /// `data_file_raw`: the data file alone is a valid raw image of the guest disk.
    pub(crate) data_file_raw: bool,
    /// The image file's own storage (`storage` wraps it when there is a data file); a
    /// reopen starts from it.
    pub(crate) image_file: Arc<dyn Storage>,
    /// The bitmap directory as on disk, when the image has valid bitmaps (see
    /// `bitmaps/mod.rs`).
    pub(crate) bitmap_dir: Option<crate::bitmaps::BitmapDir>,
    /// The bitmaps in memory once a change concerned them (loaded, IN_USE on disk,
    /// tracking writes); stored at close.
    pub(crate) bitmap_session: Option<crate::bitmaps::Session>,
    /// A stored bitmap read for block-status queries outside a session (NBD exports of
    /// `qemu:dirty-bitmap:NAME`), so that each query does not read it again.
    pub(crate) bitmap_cache: Option<(String, crate::bitmaps::DirtyBitmap)>,
    /// The image file and its name when the library opened it and holds QEMU's locks on
    /// it (see `locking.rs`); the locks go with the last reference to the file.
    pub(crate) locked: Option<(Arc<FileStorage>, std::path::PathBuf)>,
    /// Whether the image looks preallocated with `preallocation=metadata` (QEMU's
    /// heuristic, decided at the first block-status query and kept for the open, as QEMU
    /// does): only then does block status ask the host storage where its holes are.
    pub(crate) metadata_prealloc: Option<bool>,
    /// The payload cipher of an encrypted (LUKS) image: guest data in data clusters is
    /// encrypted per 512-byte sector with the host offset / 512 as the IV's sector number
    /// (QEMU's `crypt_physical_offset`).
    pub(crate) crypto: Option<Arc<dyn qcow2_crypto::SectorCipher>>,
    /// Legacy AES (`crypt_method` 1): IVs count guest sectors, not host sectors.
    pub(crate) crypt_iv_guest: bool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("virtual_size", &self.fc.header.size)
            .field("cluster_size", &self.geo.cluster_size())
            .field("read_only", &self.read_only)
            .field("lazy_refcounts", &self.lazy)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

fn cache_options(
    opts: &OpenOptions,
    size: u64,
    geo: &Geometry,
) -> Result<(CacheOptions, CacheOptions)> {
    let cs = geo.cluster_size();
    let bad = |reason: String| ImageError::InvalidArgument {
        op: Op::Open,
        reason,
    };
    let mut l2 = default_l2_options(size, geo);
    if let Some(es) = opts.l2_cache_entry_size {
        if !es.is_power_of_two() || !(512..=cs).contains(&es) {
            return Err(bad(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
            )));
        }
        let bytes = opts
            .l2_cache_size
            .unwrap_or((l2.capacity as u64).saturating_mul(l2.entry_size as u64));
        l2 = CacheOptions::from_cache_size(bytes, es as usize, MIN_L2_CACHE_ENTRIES);
    } else if let Some(bytes) = opts.l2_cache_size {
        l2 = CacheOptions::from_cache_size(bytes, l2.entry_size, MIN_L2_CACHE_ENTRIES);
    }
    let mut rb = default_refblock_options(geo);
    if let Some(bytes) = opts.refcount_cache_size {
        rb = CacheOptions::from_cache_size(bytes, rb.entry_size, MIN_REFCOUNT_CACHE_ENTRIES);
    }
    Ok((l2, rb))
}

/// Why `Image::open_inner` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenKind {
    /// A caller's open: may ask for the repair of a dirty image.
    First,
    /// The open again after that repair.
    AfterRepair,
    /// The engine's own reopen after amend: no open-time header update or warning (QEMU
    /// does not reopen; its amend works on the image as opened).
    Reopen,
}

/// `open_inner` with `may_repair` false never asks for a repair; kept as an error, not a
/// panic, should that change.
fn unreachable_dirty() -> Result<()> {
    Err(ImageError::DirtyImage {
        reason: "the image is dirty".into(),
    })
}

/// The text of `errno` as QEMU prints it (`strerror`): "Input/output error".
pub(crate) fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// QEMU's automatic repair of a dirty image (`qcow2_co_check_locked` with
/// `BDRV_FIX_ERRORS | BDRV_FIX_LEAKS`): rebuilds what lazy refcounts left out and clears the
/// dirty bit. Returns the checker's messages (what QEMU prints to stderr); a check that
/// cannot complete or reports check errors fails the open with "Could not repair dirty
/// image: <errno text>".
fn repair_dirty(storage: Arc<dyn Storage>) -> Result<Vec<String>> {
    let opts = qcow2_check::CheckOptions {
        repair: Some(qcow2_check::RepairMode::All),
    };
    let report = qcow2_check::check(storage, &opts).map_err(|e| ImageError::DirtyImage {
        reason: e.to_string(),
    })?;
    let messages: Vec<String> = report.findings.iter().map(ToString::to_string).collect();
    let errno = match &report.failure {
        Some(f) => Some(f.errno),
        None if report.result.check_errors > 0 => Some(qcow2_io::errno::EIO),
        None => None,
    };
    if let Some(errno) = errno {
        return Err(ImageError::DirtyImage {
            reason: strerror(errno),
        });
    }
    Ok(messages)
}

impl Image {
    // ------------------------------------------------------------------ open / create

    /// Opens an image on `storage` with QEMU's open-time validation (reference §1.11):
    /// unknown incompatible features are refused by name, the corrupt bit refuses a
    /// read-write open, unknown autoclear bits are cleared on a writable open (header
    /// rewrite), the snapshot table is read with QEMU's limits and messages, and a dirty
    /// image (lazy refcounts after a crash) opened read-write is repaired first as QEMU
    /// does (`qemu-img check -r all` via `qcow2-check`; the checker's lines, e.g. "ERROR
    /// cluster 5 refcount=0 reference=1", "Rebuilding refcount structure", go to
    /// [`Image::messages`]). A repair that cannot complete fails the open with
    /// [`ImageError::DirtyImage`] ("Could not repair dirty image: Input/output error"); so
    /// does a dirty read-write open with [`OpenOptions::repair_dirty`] off. Read-only opens
    /// never repair.
    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        Self::open_at_depth(storage, opts, 0)
    }

    /// Opens the image file at `path` (read-only if `opts.read_only`), taking QEMU's image
    /// locks on it first as [`OpenOptions::locking`] says (see [`Image::open_file`]).
    pub fn open_path(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let f = FileStorage::open(path, !opts.read_only)
            .map_err(|e| ImageError::io(Op::Open, "open image file", 0, e))?;
        Self::open_file(f, path, opts)
    }

    /// Opens the image in `file` (named `path` in messages), which the caller opened
    /// (writable unless `opts.read_only`). Before anything is read, QEMU's image locks are
    /// taken as [`OpenOptions::locking`] and [`OpenOptions::force_share`] say: while
    /// another process (QEMU or this library) holds the image in a conflicting way, the
    /// open fails with [`ImageError::Locked`] ("Failed to get \"write\" lock") and
    /// nothing is read or written. Backing files and the data file that the library opens
    /// by name are locked the same way. The locks last until the image is dropped.
    pub fn open_file(file: FileStorage, path: &Path, opts: &OpenOptions) -> Result<Image> {
        Self::open_file_wrapped(file, path, opts, |f| f)
    }

    /// [`Image::open_file`], with the engine's I/O going through the storage `wrap` builds
    /// around the locked file (a fault-injecting layer, as QEMU's blkdebug above its file
    /// node). The locks are taken on `file` itself, before `wrap` runs.
    pub fn open_file_wrapped(
        file: FileStorage,
        path: &Path,
        opts: &OpenOptions,
        wrap: impl FnOnce(Arc<FileStorage>) -> Arc<dyn Storage>,
    ) -> Result<Image> {
        if opts.force_share && !opts.read_only {
            return Err(crate::locking::force_share_refused());
        }
        let file = Arc::new(file);
        crate::locking::lock_with(
            &file,
            path,
            crate::locking::FileRole::Qcow2,
            !opts.read_only,
            opts,
        )?;
        let mut img = Self::open(wrap(file.clone()), opts)?;
        img.locked = Some((file, path.to_path_buf()));
        Ok(img)
    }

    pub(crate) fn open_at_depth(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        depth: u32,
    ) -> Result<Image> {
        if opts.force_share && !opts.read_only {
            return Err(crate::locking::force_share_refused());
        }
        if let Some(img) =
            Self::open_inner(storage.clone(), opts, depth, Vec::new(), OpenKind::First)?
        {
            return Ok(img);
        }
        // Reference §1.11 step 20 / §2.12: a dirty image (lazy refcounts, not closed) opened
        // read-write is repaired first, as QEMU's open does (`-r all` semantics); the open
        // then starts over on the repaired image.
        let messages = repair_dirty(storage.clone())?;
        Self::open_inner(storage, opts, depth, messages, OpenKind::AfterRepair)?.ok_or_else(|| {
            ImageError::DirtyImage {
                reason: "the image is still dirty after the repair".into(),
            }
        })
    }

    /// Opens; `Ok(None)` when the image is dirty, opened read-write, `repair_dirty` is set
    /// and `kind` is [`OpenKind::First`] (the caller repairs and retries).
    fn open_inner(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        depth: u32,
        messages: Vec<String>,
        kind: OpenKind,
    ) -> Result<Option<Image>> {
        let may_repair = kind == OpenKind::First;
        let op = Op::Open;
        let mut head = [0u8; header::V3_HEADER_SIZE];
        storage
            .read_at(&mut head, 0)
            .map_err(|e| ImageError::io(op, "read header", 0, e))?;
        let cluster_bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
        let first = if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            storage
                .read_vec(0, 1usize << cluster_bits)
                .map_err(|e| ImageError::io(op, "read first cluster", 0, e))?
        } else {
            head.to_vec()
        };
        let fc = header::open_first_cluster(
            &first,
            &header::OpenOptions {
                read_write: !opts.read_only,
                check_mode: false,
            },
        )?;
        let h = fc.header.clone();
        let h = &h;
        let crypto = match h.crypt_method {
            header::CRYPT_NONE => None,
            header::CRYPT_LUKS => Some(crate::crypto::unlock(storage.as_ref(), &fc, opts)?),
            header::CRYPT_AES => Some(crate::crypto::legacy_aes(opts)?),
            m => {
                return Err(ImageError::Unsupported {
                    op,
                    what: format!("encrypted images (crypt_method {m})"),
                })
            }
        };
        let crypt_iv_guest = h.crypt_method == header::CRYPT_AES;
        // External data file: guest data goes there; the image file's storage is wrapped
        // so that its flushes make the data durable first.
        let image_file = storage.clone();
        let (storage, data) = if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            let Some(name) = fc.extensions.data_file.as_ref() else {
                return Err(ImageError::DataFile {
                    name: String::new(),
                    reason: "Could not open data file: 'data-file' is required for this image"
                        .into(),
                });
            };
            let name = String::from_utf8_lossy(name).into_owned();
            let data = crate::data_file::open(&name, opts)?;
            let wrapped: Arc<dyn Storage> = Arc::new(crate::data_file::FlushesDataFirst {
                meta: storage,
                data: data.clone(),
            });
            (wrapped, Some(data))
        } else {
            (storage, None)
        };
        let data_file_raw = data.is_some() && h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0;
        let geo = h.geometry().map_err(|e| ImageError::InvalidArgument {
            op,
            reason: e.to_string(),
        })?;
        let ctx = L2Context::for_geometry(&geo, data.is_some());

        // L1: validated against QEMU's 32 MiB limit by `open_first_cluster`.
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_SIZE {
            return Err(HeaderError::L1TableTooLarge { l1_size: h.l1_size }.into());
        }
        let raw = storage
            .read_vec(h.l1_table_offset, l1_bytes as usize)
            .map_err(|e| ImageError::io(op, "read L1 table", h.l1_table_offset, e))?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();

        let engine = RefcountEngine::open(
            geo,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            storage.as_ref(),
        )
        .map_err(|source| ImageError::Refcount { op, source })?;

        // Snapshot table (reference §1.11 step 18): needed for the snapshot operations and
        // the overlap checks (table, inactive L1/L2).
        let snapshots = crate::snapshot::load(
            storage.as_ref(),
            &geo,
            h.nb_snapshots,
            h.snapshots_offset,
            h.size,
        )?;

        let (l2o, rbo) = cache_options(opts, h.size, &geo)?;
        let mut caches = Caches::new(storage.clone(), l2o, rbo)
            .map_err(|source| ImageError::Cache { op, source })?;
        let overlap = Overlap::default();
        caches.set_overlap_check(Some(Arc::new(overlap.clone())));

        let lazy = match opts.lazy_refcounts {
            Some(true) if h.version < 3 => {
                return Err(ImageError::InvalidArgument {
                    op,
                    reason: "Lazy refcounts require a qcow2 image with at least qemu 1.1 \
                             compatibility level"
                        .into(),
                })
            }
            Some(v) => v,
            None => h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
        };
        let mut engine = engine;
        engine.set_discard_passthrough(DiscardPassthrough {
            request: opts.pass_discard_request,
            snapshot: opts.pass_discard_snapshot,
            other: opts.pass_discard_other,
        });
        let compression = h.compression().unwrap_or(CompressionType::Deflate);
        let _ = compression;

        let mut img = Image {
            storage: storage.clone(),
            alloc: Allocator::new(geo),
            fc,
            geo,
            ctx,
            l1,
            caches,
            engine,
            overlap,
            read_only: opts.read_only,
            lazy,
            poisoned: None,
            corruption_signalled: false,
            backing: None,
            discard_no_unref: opts.discard_no_unref && h.version >= 3,
            discard_passthrough_request: opts.pass_discard_request,
            messages: Vec::new(),
            closed: false,
            l1_dirty: std::collections::BTreeSet::new(),
            snapshots,
            opts: opts.clone(),
            depth,
            decompressed: None,
            data,
            data_file_raw,
            image_file,
            bitmap_dir: None,
            bitmap_session: None,
            bitmap_cache: None,
            locked: None,
            metadata_prealloc: None,
            crypto,
            crypt_iv_guest,
        };
        img.messages = messages;
        if img.fc.extensions.stale_bitmaps && depth == 0 && kind != OpenKind::Reopen {
            // QEMU's warning at every open that finds a bitmaps extension without its
            // autoclear bit (`qcow2_read_extensions`); the second line has no newline.
            img.messages.push(crate::bitmaps::stale_extension_warning(
                img.fc.header.version,
            ));
        }
        img.init_overlap(opts)?;
        // QEMU's open loads the bitmaps and refuses an image whose bitmaps break its rules.
        match img.read_bitmap_directory(op) {
            Ok(dir) => img.bitmap_dir = dir,
            Err(e) => {
                img.closed = true;
                return Err(e);
            }
        }

        if !opts.read_only {
            if img.fc.header.incompatible_features & INCOMPAT_DIRTY != 0 {
                if opts.repair_dirty && may_repair {
                    // Nothing was written yet; the caller repairs and opens again.
                    img.closed = true;
                    return Ok(None);
                }
                // Only reachable when the repair was disabled (or left the bit set because
                // corruptions remain, as QEMU then also keeps it): refuse, never write.
                img.closed = true;
                return Err(ImageError::DirtyImage {
                    reason: if opts.repair_dirty {
                        "the repair left the image dirty".into()
                    } else {
                        "repair of dirty images is disabled by the open options".into()
                    },
                });
            }
            // Invariant 8: unknown autoclear bits are cleared by a writable open. A bitmaps
            // extension without its autoclear bit (a program without bitmap support
            // changed the image) is dropped by the same header rewrite, as QEMU's open
            // does (`need_update_header` in `qcow2_read_extensions`): left in place it
            // would name a directory whose clusters `check -r` frees as leaks.
            // Not on the engine's own reopen after amend: QEMU's amend works on the open
            // image, so a downgrade keeps the (then stale) bitmaps extension in the v2
            // header, as QEMU's does, until the next real writable open drops it.
            let cleared = img.fc.header.clear_unknown_autoclear();
            if kind != OpenKind::Reopen && (cleared || img.fc.extensions.stale_bitmaps) {
                if let Err(e) = img.rewrite_header(op) {
                    img.closed = true;
                    return Err(e);
                }
                img.fc.extensions.stale_bitmaps = false;
            }
        }

        if let Some(name) = img.fc.backing_file_str() {
            let fmt = img.fc.backing_format_str();
            match backing::open_backing(&name, fmt.as_deref(), opts, depth + 1) {
                Ok(b) => img.backing = b,
                Err(e) => {
                    img.closed = true;
                    return Err(e);
                }
            }
        }
        Ok(Some(img))
    }

    fn init_overlap(&mut self, opts: &OpenOptions) -> Result<()> {
        let h = &self.fc.header;
        let state = OverlapState {
            mask: overlap::level_mask(opts.overlap_check),
            cluster_bits: self.geo.cluster_bits(),
            l1: (h.l1_table_offset, u64::from(h.l1_size) * 8),
            bitmap_dir: self
                .fc
                .extensions
                .bitmaps
                .filter(|_| h.autoclear_features & 1 != 0)
                .map(|b| (b.directory_offset, b.directory_size)),
            crypto_header: self
                .fc
                .extensions
                .crypto_header
                .filter(|c| c.length != 0)
                .map(|c| (c.offset, c.length)),
            ..OverlapState::default()
        };
        self.overlap.with(|s| *s = state);
        self.sync_overlap_snapshots(Op::Open)?;
        self.sync_overlap_l1();
        self.sync_overlap_refcounts();
        Ok(())
    }

    /// Mirrors the active L1 table into the overlap state.
    pub(crate) fn sync_overlap_l1(&mut self) {
        let l1 = &self.l1;
        let off = self.fc.header.l1_table_offset;
        self.overlap.with(|s| {
            s.l1 = (off, l1.len() as u64 * 8);
            s.active_l2 = l1
                .iter()
                .map(|e| e & L1E_OFFSET_MASK)
                .filter(|&o| o != 0)
                .collect();
        });
    }

    /// Mirrors one L1 entry change (`old` L2 table replaced by `new`; 0 for none) into the
    /// overlap state without rebuilding it: allocating L2 tables one by one must not cost
    /// a pass over the whole L1 table each (that made large preallocations quadratic).
    pub(crate) fn overlap_replace_active_l2(&mut self, old: u64, new: u64) {
        // A damaged image may name one table twice: keep `old` while any entry still does.
        let still = old != 0 && self.l1.iter().any(|e| e & L1E_OFFSET_MASK == old);
        self.overlap.with(|s| {
            if old != 0 && !still {
                s.active_l2.remove(&old);
            }
            if new != 0 {
                s.active_l2.insert(new);
            }
        });
    }

    /// Mirrors the refcount structures into the overlap state if they changed.
    pub(crate) fn sync_overlap_refcounts(&mut self) {
        let engine = &self.engine;
        let cs = self.geo.cluster_size();
        self.overlap.with(|s| {
            let table = (
                engine.reftable_offset(),
                engine.reftable_clusters().saturating_mul(cs),
            );
            let generation = Some(engine.reftable_generation());
            if s.reftable != table || s.reftable_generation != generation {
                s.reftable = table;
                s.reftable_generation = generation;
                s.sync_refblocks(engine.reftable());
            }
        });
    }

    /// Creates an image on `storage` exactly as `qemu-img create -f qcow2` lays it out, and
    /// opens it read-write. A backing file name is recorded but not opened (use
    /// [`Image::create_with`] to pass a backing policy).
    pub fn create(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<Image> {
        let open = OpenOptions {
            backing: crate::BackingPolicy::Ignore,
            ..OpenOptions::default()
        };
        Self::create_with(storage, opts, &open)
    }

    /// Creates the image file at `path` (truncating it) and opens it read-write. As
    /// QEMU's create, QEMU's image locks for a writer are taken (where OFD locks work)
    /// **before** the file is truncated: an image another process holds is refused with
    /// [`ImageError::Locked`] and left untouched. The image keeps the locks.
    pub fn create_path(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Image> {
        let path = path.as_ref();
        let f = Arc::new(
            FileStorage::open_for_create(path)
                .map_err(|e| ImageError::io(Op::Create, "create image file", 0, e))?,
        );
        crate::locking::lock_file(
            &f,
            path,
            crate::locking::FileRole::Qcow2,
            true,
            crate::Locking::Auto,
            false,
        )?;
        let mut img = Self::create(f.clone(), opts)?;
        img.locked = Some((f, path.to_path_buf()));
        Ok(img)
    }

    /// Creates an image on `storage` and opens it with `open` options.
    pub fn create_with(
        storage: Arc<dyn Storage>,
        opts: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<Image> {
        let op = Op::Create;
        if opts.preallocation != Preallocation::Off
            && opts.backing_file.is_some()
            && !opts.extended_l2
        {
            return Err(ImageError::InvalidArgument {
                op,
                reason: "Backing file and preallocation can only be used at the same time if \
                         extended_l2 is on"
                    .into(),
            });
        }
        let preallocation = match opts.preallocation {
            Preallocation::Off if opts.data_file_raw => Preallocation::Metadata,
            p => p,
        };
        // QEMU preallocates while it creates the image (the truncate with the preallocation
        // mode) and sets up encryption after that: a LUKS area then lands after the
        // preallocated clusters, not right after the L1 table.
        let luks_later = match &opts.luks_area {
            Some(area) if preallocation != Preallocation::Off => Some(area.clone()),
            _ => None,
        };
        let mut layout = opts.layout.clone();
        if luks_later.is_some() {
            layout.luks_area = None;
        }
        let fresh = qcow2_format::layout::fresh_image(&layout)?;
        let io = |e| ImageError::io(op, "write new image", 0, e);
        storage.set_len(0).map_err(io)?;
        for (off, bytes) in &fresh.writes {
            storage.write_at(bytes, *off).map_err(io)?;
        }
        storage.set_len(fresh.file_length).map_err(io)?;
        storage.flush().map_err(io)?;
        let mut open = open.clone();
        open.read_only = false;
        let mut img = Self::open(storage.clone(), &open)?;
        // The data file covers the disk; a raw one implies metadata preallocation (QEMU),
        // so that every cluster maps to its own offset in it.
        img.resize_data_file(op, img.virtual_size())?;
        if preallocation != Preallocation::Off {
            img.preallocate(preallocation)?;
        }
        if let Some(area) = luks_later {
            img.place_luks_area(op, &area.0)?;
            img.close()?;
            img = Self::open(storage, &open)?;
        }
        Ok(img)
    }

    // ------------------------------------------------------------------ properties

    /// Where guest data clusters live: the external data file, or the image file.
    pub(crate) fn data_storage(&self) -> &Arc<dyn Storage> {
        self.data.as_ref().unwrap_or(&self.storage)
    }

    /// The external data file name, if the image uses one.
    pub fn data_file(&self) -> Option<String> {
        self.data.as_ref()?;
        self.fc
            .extensions
            .data_file
            .as_ref()
            .map(|n| String::from_utf8_lossy(n).into_owned())
    }

    /// Whether the external data file is a raw image of the guest disk (`data_file_raw`).
    pub fn data_file_raw(&self) -> bool {
        self.data_file_raw
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.fc.header.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// The image geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The header as currently known (in memory).
    pub fn header(&self) -> &Header {
        &self.fc.header
    }

    /// The backing file name stored in the image, if any.
    pub fn backing_file(&self) -> Option<String> {
        self.fc.backing_file_str()
    }

    /// The backing file's format stored in the image (its backing format extension), if
    /// any.
    pub fn backing_format(&self) -> Option<String> {
        self.fc.backing_format_str()
    }

    /// Whether a backing image is attached.
    pub fn has_backing(&self) -> bool {
        self.backing.is_some()
    }

    /// Whether the image is open read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether lazy refcounts are in effect.
    pub fn lazy_refcounts(&self) -> bool {
        self.lazy
    }

    /// Whether the dirty bit is set (in memory, which follows the disk after every write).
    pub fn is_dirty(&self) -> bool {
        self.fc.header.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether the image is (or was found) marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.fc.header.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// Why the image refuses writes, if it is poisoned (invariant 7).
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// QEMU-style messages emitted so far (corruption reports, freeing failures), oldest
    /// first; the caller decides whether to print them.
    pub fn messages(&self) -> &[String] {
        &self.messages
    }

    /// The compression type of the image (`compression_type` header field).
    pub fn compression_type(&self) -> CompressionType {
        self.fc
            .header
            .compression()
            .unwrap_or(CompressionType::Deflate)
    }

    /// Number of clusters held in the free quarantine (for tests and diagnostics).
    pub fn quarantined_clusters(&self) -> u64 {
        self.engine.quarantined_clusters()
    }

    // ------------------------------------------------------------------ error plumbing

    pub(crate) fn poison(&mut self, cause: impl Into<String>) {
        if self.poisoned.is_none() {
            self.poisoned = Some(cause.into());
        }
    }

    /// Fails unless writes are allowed (not read-only, not poisoned, not marked corrupt).
    pub(crate) fn check_writable(&self, op: Op) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly { op });
        }
        if let Some(cause) = &self.poisoned {
            return Err(ImageError::Poisoned {
                op,
                cause: cause.clone(),
            });
        }
        Ok(())
    }

    pub(crate) fn check_range(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(ImageError::OutOfRange {
                op,
                offset,
                len,
                size,
            }),
        }
    }

    /// QEMU's `qcow2_signal_corruption`: reports `msg`; a fatal event on a writable image
    /// marks it corrupt on disk and makes it unusable.
    pub(crate) fn corruption(&mut self, op: Op, fatal: bool, msg: String) -> ImageError {
        let fatal = fatal && !self.read_only;
        let already_corrupt = self.is_corrupt() && self.poisoned.is_some();
        if !(self.corruption_signalled && (!fatal || already_corrupt)) {
            let line = if fatal {
                format!(
                    "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed"
                )
            } else {
                format!(
                    "qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed"
                )
            };
            self.messages.push(line);
        }
        self.corruption_signalled = true;
        if fatal {
            self.poison(format!("image marked corrupt: {msg}"));
            if !self.is_corrupt() {
                self.fc.header.incompatible_features |= INCOMPAT_CORRUPT;
                if self.fc.header.version >= 3 {
                    let v = self.fc.header.incompatible_features;
                    let _ = self.storage.write_sync(&v.to_be_bytes(), HDR_INCOMPAT);
                }
            }
        }
        ImageError::Corruption {
            op,
            message: msg,
            fatal,
        }
    }

    /// Maps a cache error: overlaps are corruption, failed write-backs and flushes poison.
    pub(crate) fn cache_err(&mut self, op: Op, e: CacheError) -> ImageError {
        match e {
            CacheError::Overlap { source, .. } => self.corruption(op, true, source.to_string()),
            CacheError::UnalignedOffset { .. } => self.corruption(op, true, e.to_string()),
            CacheError::WriteBack { .. } | CacheError::Flush { .. } => {
                self.poison(e.to_string());
                ImageError::Cache { op, source: e }
            }
            _ => ImageError::Cache { op, source: e },
        }
    }

    pub(crate) fn rc_err(&mut self, op: Op, e: RefcountError) -> ImageError {
        match e {
            RefcountError::Cache(c) => self.cache_err(op, c),
            e if e.is_corruption() => self.corruption(op, true, e.to_string()),
            RefcountError::Io { .. } => {
                self.poison(e.to_string());
                ImageError::Refcount { op, source: e }
            }
            e => ImageError::Refcount { op, source: e },
        }
    }

    pub(crate) fn alloc_err(&mut self, op: Op, e: AllocError) -> ImageError {
        match e {
            AllocError::Refcount(r) => self.rc_err(op, r),
            AllocError::UnalignedFree { offset } => self.corruption(
                op,
                false,
                format!("Cannot free unaligned cluster {}", CHex(offset)),
            ),
            e => ImageError::Alloc { op, source: e },
        }
    }

    /// A direct metadata write (L1 entry, header field) without a barrier; a failure
    /// poisons the image.
    pub(crate) fn metadata_write(
        &mut self,
        op: Op,
        context: &'static str,
        buf: &[u8],
        offset: u64,
    ) -> Result<()> {
        if let Err(e) = self.storage.write_at(buf, offset) {
            self.poison(format!("{context} at {offset:#x} failed: {e}"));
            return Err(ImageError::io(op, context, offset, e));
        }
        Ok(())
    }

    /// A metadata write followed by a storage flush; a failure poisons the image.
    pub(crate) fn metadata_write_sync(
        &mut self,
        op: Op,
        context: &'static str,
        buf: &[u8],
        offset: u64,
    ) -> Result<()> {
        self.metadata_write(op, context, buf, offset)?;
        if let Err(e) = self.storage.flush() {
            self.poison(format!("{context} at {offset:#x} failed: {e}"));
            return Err(ImageError::io(op, context, offset, e));
        }
        Ok(())
    }

    /// Rewrites the whole first cluster from the in-memory header (QEMU's
    /// `qcow2_update_header`).
    pub(crate) fn rewrite_header(&mut self, op: Op) -> Result<()> {
        self.fc.header.refcount_table_offset = self.engine.reftable_offset();
        self.fc.header.refcount_table_clusters =
            u32::try_from(self.engine.reftable_clusters()).unwrap_or(u32::MAX);
        let bytes = self
            .fc
            .to_bytes()
            .map_err(|e| ImageError::InvalidArgument {
                op,
                reason: e.to_string(),
            })?;
        self.metadata_write_sync(op, "rewrite the header", &bytes, 0)
    }

    // ------------------------------------------------------------------ dirty bit

    /// Sets the dirty bit before the first refcount update is postponed (lazy refcounts,
    /// reference §2.12): one synchronous write of `incompatible_features`, the bit set in
    /// memory only after it succeeded.
    pub(crate) fn mark_dirty(&mut self, op: Op) -> Result<()> {
        if self.is_dirty() {
            return Ok(());
        }
        let v = self.fc.header.incompatible_features | INCOMPAT_DIRTY;
        self.metadata_write_sync(op, "set the dirty bit", &v.to_be_bytes(), HDR_INCOMPAT)?;
        self.fc.header.incompatible_features = v;
        Ok(())
    }

    /// Clears the dirty bit after both caches are durable (QEMU's `qcow2_mark_clean`).
    pub(crate) fn mark_clean(&mut self, op: Op) -> Result<()> {
        if !self.is_dirty() {
            return Ok(());
        }
        self.flush_caches(op, true)?;
        let v = self.fc.header.incompatible_features & !INCOMPAT_DIRTY;
        self.metadata_write_sync(op, "clear the dirty bit", &v.to_be_bytes(), HDR_INCOMPAT)?;
        self.fc.header.incompatible_features = v;
        Ok(())
    }

    // ------------------------------------------------------------------ flush / close

    /// Writes the caches (the refcount cache only when `refblocks`), then a storage flush.
    pub(crate) fn flush_caches(&mut self, op: Op, refblocks: bool) -> Result<()> {
        // Deferred L1 entries point at tables whose refcounts must be durable first.
        let refblocks = refblocks || !self.l1_dirty.is_empty();
        self.storage.event(Event::FlushToOs);
        if let Err(e) = self.caches.write(CacheId::L2) {
            return Err(self.cache_err(op, e));
        }
        if refblocks {
            if let Err(e) = self.caches.write(CacheId::Refblock) {
                return Err(self.cache_err(op, e));
            }
        }
        self.storage.event(Event::FlushToDisk);
        if let Err(e) = self.storage.flush() {
            self.poison(format!("storage flush failed: {e}"));
            return Err(ImageError::io(op, "flush the storage", 0, e));
        }
        self.commit_l1(op)
    }

    /// Writes the deferred L1 entries, then a barrier. Called only after both caches were
    /// written and a storage flush succeeded, so every L2 table a deferred entry points at
    /// has its contents and its refcount on disk before the entry does (invariants 1 and 3:
    /// a crash before this point leaks the new tables, never exposes them half-written).
    pub(crate) fn commit_l1(&mut self, op: Op) -> Result<()> {
        if self.l1_dirty.is_empty() {
            return Ok(());
        }
        let groups: Vec<u64> = std::mem::take(&mut self.l1_dirty).into_iter().collect();
        for (i, &start) in groups.iter().enumerate() {
            if let Err(e) = self.write_l1_group(op, start, false) {
                // Keep what was not written: a retry (or nothing, if poisoned) follows.
                self.l1_dirty.extend(groups[i..].iter().copied());
                return Err(e);
            }
        }
        if let Err(e) = self.storage.flush() {
            self.poison(format!("storage flush failed: {e}"));
            return Err(ImageError::io(op, "flush the storage", 0, e));
        }
        Ok(())
    }

    /// Makes every completed write durable (QEMU's flush: the L2 cache, the refcount cache
    /// unless lazy refcounts postpone it, then a storage flush barrier). Clusters freed
    /// before the flush become reusable only after it succeeded (invariant 2). A failure
    /// poisons the image (invariant 7).
    pub fn flush(&mut self) -> Result<()> {
        let op = Op::Flush;
        if self.read_only {
            return Ok(());
        }
        self.check_writable(op)?;
        // With lazy refcounts refblocks may stay dirty, unless freed clusters wait for a
        // durable unreference: then both caches are flushed so they can be released.
        let refblocks = !self.is_dirty() || self.engine.quarantined_clusters() > 0;
        self.flush_caches(op, refblocks)?;
        if refblocks {
            // Both caches were written and a barrier followed: the unreferences are durable.
            self.engine.release_quarantine(&mut self.caches);
        }
        Ok(())
    }

    /// Flushes everything, clears the dirty bit, and closes the image. A poisoned image is
    /// closed without writing anything more (its on-disk state is whatever was durable).
    pub fn close(mut self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        if self.read_only {
            return Ok(());
        }
        if let Some(cause) = &self.poisoned {
            return Err(ImageError::Poisoned {
                op: Op::Close,
                cause: cause.clone(),
            });
        }
        // The bitmaps first: their store allocates and frees clusters.
        self.store_bitmaps()?;
        self.flush_caches(Op::Close, true)?;
        self.engine.release_quarantine(&mut self.caches);
        self.mark_clean(Op::Close)
    }

    /// Makes everything durable and clean, then opens the image again from disk with the
    /// same options, keeping the attached backing image and the messages (after amend
    /// changed the geometry or the header, every derived structure is rebuilt from what is
    /// on disk rather than patched). If the open fails the image is poisoned: the in-memory
    /// state no longer describes the disk.
    pub(crate) fn reopen(&mut self, op: Op) -> Result<()> {
        // The reopen is writable: a file the library locked must hold the writer's
        // permissions first (an upgrade takes and checks the new bytes; a no-op when the
        // image was opened writable).
        if let Some((file, path)) = &self.locked {
            crate::locking::lock_with(
                file,
                path,
                crate::locking::FileRole::Qcow2,
                true,
                &self.opts,
            )?;
        }
        // The reopen reads the bitmaps from disk: store the session first.
        self.store_bitmaps()?;
        self.flush_caches(op, true)?;
        self.engine.release_quarantine(&mut self.caches);
        self.mark_clean(op)?;
        let mut opts = self.opts.clone();
        opts.backing = crate::BackingPolicy::Ignore;
        opts.read_only = false;
        // The data file stays the one already open.
        opts.data_file = self.data.clone().map(crate::DataFileStorage);
        let messages = std::mem::take(&mut self.messages);
        match Self::open_inner(
            self.image_file.clone(),
            &opts,
            self.depth,
            messages,
            OpenKind::Reopen,
        ) {
            Ok(Some(mut new)) => {
                new.opts = self.opts.clone();
                // QEMU keeps the unknown extensions in the list it read at open and writes
                // that list (reversed from the file) at every header update; re-reading
                // them here would flip their order at the next update.
                new.fc.extensions.unknown = std::mem::take(&mut self.fc.extensions.unknown);
                new.backing = self.backing.take();
                new.locked = self.locked.take();
                self.closed = true;
                let old = std::mem::replace(self, new);
                drop(old);
                Ok(())
            }
            Ok(None) => unreachable_dirty(),
            Err(e) => {
                self.poison(format!("reopen after {op} failed: {e}"));
                Err(e)
            }
        }
    }

    /// Drops the image without flushing anything, as if the process had been killed (for
    /// crash tests and emergency teardown).
    pub fn abandon(mut self) {
        self.closed = true;
    }

    // ------------------------------------------------------------------ L2 access

    /// Number of L2 entries per cache slice.
    pub(crate) fn slice_entries(&self) -> u64 {
        self.caches.entry_size(CacheId::L2) as u64 / self.geo.l2_entry_size()
    }

    /// Pins the L2 slice holding `l2_index` of the table at `l2_offset`; returns the handle
    /// and the index inside the slice.
    pub(crate) fn get_slice(
        &mut self,
        op: Op,
        l2_offset: u64,
        l2_index: u64,
    ) -> Result<(Handle, u64)> {
        let se = self.slice_entries();
        let slice_off = l2_offset + (l2_index / se) * self.caches.entry_size(CacheId::L2) as u64;
        match self.caches.get(CacheId::L2, slice_off) {
            Ok(h) => Ok((h, l2_index % se)),
            Err(e) => Err(self.cache_err(op, e)),
        }
    }

    pub(crate) fn slice_entry(&self, h: &Handle, idx: u64) -> L2Entry {
        entry::read_l2_entry(self.caches.data(h), idx, self.geo.extended_l2())
            .unwrap_or(L2Entry::UNALLOCATED)
    }

    pub(crate) fn set_slice_entry(&mut self, h: &Handle, idx: u64, e: L2Entry) {
        let ext = self.geo.extended_l2();
        let _ = entry::write_l2_entry(self.caches.data_mut(h), idx, e, ext);
        self.caches.mark_dirty(h);
    }

    pub(crate) fn put(&mut self, op: Op, h: Handle) -> Result<()> {
        match self.caches.put(h) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.cache_err(op, e)),
        }
    }

    /// The L2 table offset of L1 entry `l1_index` (0: none), checking alignment.
    pub(crate) fn l2_offset(&mut self, op: Op, l1_index: u64) -> Result<u64> {
        let Some(&raw) = self.l1.get(l1_index as usize) else {
            return Ok(0);
        };
        let off = L1Entry::from_raw(raw).l2_offset();
        if !self.geo.is_cluster_aligned(off) {
            return Err(self.corruption(
                op,
                true,
                format!(
                    "L2 table offset {} unaligned (L1 index: {})",
                    CHex(off),
                    CHex(l1_index)
                ),
            ));
        }
        Ok(off)
    }

    // ------------------------------------------------------------------ lookup (mapping)

    /// Maps the guest range starting at `guest` (at most `max` bytes) to one run of equal
    /// kind, within one L2 slice (QEMU's `qcow2_get_host_offset`).
    pub(crate) fn lookup(&mut self, op: Op, guest: u64, max: u64) -> Result<Chunk> {
        let g = self.geo;
        let cs = g.cluster_size();
        let se = self.slice_entries();
        let l1_index = g.l1_index(guest);
        let l2_index = g.l2_index(guest);
        let in_cluster = g.offset_in_cluster(guest);
        // Bytes up to the end of the slice this offset falls in.
        let slice_left = (se - l2_index % se) * cs - in_cluster;
        let max = max.min(slice_left);
        let l2_offset = self.l2_offset(op, l1_index)?;
        if l2_offset == 0 {
            return Ok(Chunk {
                kind: MapKind::Unallocated(None),
                len: max,
            });
        }
        let (h, idx) = self.get_slice(op, l2_offset, l2_index)?;
        let res = self.lookup_in_slice(op, &h, l2_offset, idx, in_cluster, max);
        self.put(op, h)?;
        res
    }

    fn classify(
        &mut self,
        op: Op,
        e: L2Entry,
        l2_offset: u64,
        idx: u64,
        sc: u32,
    ) -> Result<(SubclusterType, u32)> {
        let (ty, run) = match e.subcluster_run(self.ctx, sc) {
            Ok(r) => r,
            Err(_) => {
                return Err(self.corruption(
                    op,
                    true,
                    format!(
                        "Invalid cluster entry found  (L2 offset: {}, L2 index: {})",
                        CHex(l2_offset),
                        CHex(idx)
                    ),
                ))
            }
        };
        match ty {
            SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc if self.fc.header.version < 3 => {
                return Err(self.corruption(
                    op,
                    true,
                    format!(
                        "Zero cluster entry found in pre-v3 image (L2 offset: {}, L2 index: {})",
                        CHex(l2_offset),
                        CHex(idx)
                    ),
                ))
            }
            SubclusterType::Normal
            | SubclusterType::ZeroAlloc
            | SubclusterType::UnallocatedAlloc
                if !self.geo.is_cluster_aligned(e.host_offset()) =>
            {
                return Err(self.corruption(
                    op,
                    true,
                    format!(
                        "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
                        CHex(e.host_offset()),
                        CHex(l2_offset),
                        CHex(idx)
                    ),
                ))
            }
            _ => {}
        }
        Ok((ty, run))
    }

    fn kind_of(ty: SubclusterType, e: L2Entry, sc_off: u64) -> MapKind {
        match ty {
            SubclusterType::Normal => MapKind::Data(e.host_offset() + sc_off),
            SubclusterType::ZeroPlain => MapKind::Zero(None),
            SubclusterType::ZeroAlloc => MapKind::Zero(Some(e.host_offset() + sc_off)),
            SubclusterType::Compressed => MapKind::Compressed(e),
            SubclusterType::UnallocatedAlloc => {
                MapKind::Unallocated(Some(e.host_offset() + sc_off))
            }
            SubclusterType::UnallocatedPlain | SubclusterType::Invalid => {
                MapKind::Unallocated(None)
            }
        }
    }

    /// Whether a run of kind `a` and length `a_len` continues with kind `b`: QEMU's
    /// `count_contiguous_subclusters` rule, so that a run is one block-status answer: the
    /// same subcluster type, and for types with a host cluster, contiguous host offsets.
    fn same_kind(a: MapKind, b: MapKind, a_len: u64) -> bool {
        let contiguous = |x: Option<u64>, y: Option<u64>| match (x, y) {
            (None, None) => true,
            (Some(x), Some(y)) => x.checked_add(a_len) == Some(y),
            _ => false,
        };
        match (a, b) {
            (MapKind::Data(x), MapKind::Data(y)) => contiguous(Some(x), Some(y)),
            (MapKind::Zero(x), MapKind::Zero(y)) => contiguous(x, y),
            (MapKind::Unallocated(x), MapKind::Unallocated(y)) => contiguous(x, y),
            _ => false,
        }
    }

    fn lookup_in_slice(
        &mut self,
        op: Op,
        h: &Handle,
        l2_offset: u64,
        idx: u64,
        in_cluster: u64,
        max: u64,
    ) -> Result<Chunk> {
        let g = self.geo;
        let cs = g.cluster_size();
        let sc_bits = g.subcluster_bits();
        let e = self.slice_entry(h, idx);
        let sc = g.subcluster_index(in_cluster);
        let (ty, run) = self.classify(op, e, l2_offset, idx, sc)?;
        let sc_start = u64::from(sc) << sc_bits;
        let kind = Self::kind_of(ty, e, in_cluster);
        let run_end = (u64::from(sc + run) << sc_bits).min(cs);
        let mut len = (run_end - in_cluster).min(max);
        if matches!(kind, MapKind::Compressed(_)) || len >= max || run_end < cs {
            let _ = sc_start;
            return Ok(Chunk { kind, len });
        }
        // Extend over following clusters of the same kind (contiguous for data).
        let se = self.slice_entries();
        let mut i = idx + 1;
        while i < se && len < max {
            let e2 = self.slice_entry(h, i);
            let (ty2, run2) = self.classify(op, e2, l2_offset, i, 0)?;
            let k2 = Self::kind_of(ty2, e2, 0);
            if !Self::same_kind(kind, k2, len) {
                break;
            }
            let r = (u64::from(run2) << sc_bits).min(cs);
            len = (len + r).min(max);
            if r < cs {
                break;
            }
            i += 1;
        }
        Ok(Chunk { kind, len })
    }

    // ------------------------------------------------------------------ read path

    /// Reads `buf.len()` guest bytes at `offset` (anywhere inside the virtual disk).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(Op::Read, offset, buf.len() as u64)?;
        if self.poisoned.is_some() && self.is_corrupt() {
            return Err(ImageError::Poisoned {
                op: Op::Read,
                cause: self.poisoned.clone().unwrap_or_default(),
            });
        }
        self.read_internal(Op::Read, offset, buf)
    }

    /// Whether guest data is encrypted (a LUKS image opened with its secret).
    pub fn is_encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// Reads guest data stored at `host` in the data storage, decrypting it when the image
    /// is encrypted (whole sectors are read and decrypted, `dst` gets its part).
    pub(crate) fn read_data(&self, op: Op, host: u64, guest: u64, dst: &mut [u8]) -> Result<()> {
        let io = |e| ImageError::io(op, "read guest data", host, e);
        let Some(c) = &self.crypto else {
            return self.data_storage().read_at(dst, host).map_err(io);
        };
        let iv = self.iv_offset(host, guest);
        crate::crypto::read_decrypted(self.data_storage().as_ref(), c.as_ref(), host, iv, dst)
            .map_err(io)
    }

    /// The offset whose sector numbers the IVs of data at `host` (guest `guest`) use:
    /// the host offset for LUKS (QEMU's `crypt_physical_offset`), the guest offset for
    /// legacy AES.
    pub(crate) fn iv_offset(&self, host: u64, guest: u64) -> u64 {
        if self.crypt_iv_guest {
            guest
        } else {
            host
        }
    }

    /// Reads with bytes beyond the virtual size as zeros (backing-file reads).
    pub(crate) fn read_clamped(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.virtual_size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        self.read_internal(Op::Read, offset, head)
    }

    /// The read path for any guest range (also copy-on-write sources).
    pub(crate) fn read_internal(&mut self, op: Op, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let chunk = self.lookup(op, guest, (buf.len() - pos) as u64)?;
            let n = chunk.len as usize;
            let dst = &mut buf[pos..pos + n];
            match chunk.kind {
                MapKind::Data(host) => {
                    self.storage.event(Event::ReadAio);
                    self.read_data(op, host, guest, dst)?;
                }
                MapKind::Zero(_) => dst.fill(0),
                MapKind::Unallocated(_) => {
                    if self.backing.is_some() {
                        self.storage.event(Event::ReadBackingAio);
                    }
                    backing::read_backing(&mut self.backing, guest, dst)?;
                }
                MapKind::Compressed(e) => {
                    let in_cluster = self.geo.offset_in_cluster(guest) as usize;
                    let data = self.decompress_cluster(op, guest, e)?;
                    dst.copy_from_slice(&data[in_cluster..in_cluster + n]);
                }
            }
            pos += n;
        }
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Best effort, like QEMU closing on exit; errors are lost here, so callers that
        // care use `close`.
        let _ = self.close_inner();
    }
}
