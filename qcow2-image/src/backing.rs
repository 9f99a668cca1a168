//! Backing files: the read-only images unallocated clusters read through to.
//!
//! A backing file name comes from the (untrusted) image, so nothing is opened unless the
//! caller's [`BackingPolicy`] allows it: either a path policy (base directory, allowed
//! directories, maximum chain depth) or a caller-supplied [`BackingOpener`].

use crate::error::{ImageError, Result};
use crate::locking::FileRole;
use crate::options::{BackingPolicy, OpenOptions};
use crate::Image;
use qcow2_io::{FileStorage, Storage};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A read-only image below another one.
pub trait BackingImage: Send + 'static {
    /// Virtual size in bytes; reads beyond it return zeros.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` (guest offsets of the backing image). Bytes
    /// beyond [`size`](BackingImage::size) read as zero.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// The block status of the run at `offset` (at most `len` bytes) through this image and
    /// the images below it, `eof` set as the layer that answered sets it; a length of 0
    /// when `offset` lies at or beyond [`size`](BackingImage::size). The default, for
    /// images that cannot tell, is allocated data.
    fn status(&mut self, offset: u64, len: u64) -> Result<crate::BlockStatus> {
        let len = len.min(self.size().saturating_sub(offset));
        Ok(crate::BlockStatus {
            eof: offset.saturating_add(len) == self.size(),
            ..crate::BlockStatus::data(offset, len)
        })
    }

    /// QEMU's `bdrv_block_status_above(bs, NULL, ...)` on this image as the top of its
    /// chain: [`status`](BackingImage::status), with `eof` as the top reports it (the flag
    /// of a lower layer that holds the run is dropped; the run ends the image iff it
    /// reaches this image's end).
    fn status_above(&mut self, offset: u64, len: u64) -> Result<crate::BlockStatus> {
        let size = self.size();
        let mut st = self.status(offset, len)?;
        let end = offset.saturating_add(st.length);
        st.eof = if st.allocated {
            end == size
        } else {
            st.eof || end == size
        };
        Ok(st)
    }

    /// Whether one of the top `levels` layers of this chain (this image is the first)
    /// holds the run at `offset`, and how long the run of equal answer is (at most `len`;
    /// 0 when `offset` lies at or beyond [`size`](BackingImage::size)). The default, for
    /// layers that cannot tell (raw files), holds everything as data.
    fn held_above(&mut self, offset: u64, len: u64, levels: u32) -> Result<(Held, u64)> {
        let len = len.min(self.size().saturating_sub(offset));
        Ok((if levels > 0 { Held::Data } else { Held::No }, len))
    }

    /// This image as the concurrent read paths of [`SharedImage`](crate::SharedImage) use
    /// it: reads through `&self`, so they run without the overlay's metadata lock and, for
    /// qcow2 and raw images, in parallel. The default serializes reads behind a lock.
    fn into_shared(self: Box<Self>) -> SharedBacking {
        SharedBacking::Locked(crate::sync::Mutex::new(Box::new(Unshared(self))))
    }

    /// The shared form this image already is, if [`BackingImage::into_shared`] made it.
    #[doc(hidden)]
    fn as_shared(&self) -> Option<Arc<SharedBacking>> {
        None
    }
}

/// Which kind of allocation holds a run in the top layers of a chain (QEMU's
/// `bdrv_is_allocated_above` with the zero flag of the layer that holds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// No layer among those asked holds the run: it reads from below them.
    No,
    /// A layer holds data (normal or compressed clusters; raw images hold everything).
    Data,
    /// A layer holds it as zeros (zero clusters or subclusters).
    Zero,
}

/// A backing image that only reads through `&mut self`, boxed for the lock around it.
struct Unshared<T: ?Sized>(Box<T>);

impl<T: BackingImage + ?Sized> BackingImage for Unshared<T> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read(offset, buf)
    }
    fn status(&mut self, offset: u64, len: u64) -> Result<crate::BlockStatus> {
        self.0.status(offset, len)
    }
    fn status_above(&mut self, offset: u64, len: u64) -> Result<crate::BlockStatus> {
        self.0.status_above(offset, len)
    }
    fn held_above(&mut self, offset: u64, len: u64, levels: u32) -> Result<(Held, u64)> {
        self.0.held_above(offset, len, levels)
    }
    fn into_shared(self: Box<Self>) -> SharedBacking {
        SharedBacking::Locked(crate::sync::Mutex::new(self))
    }
}

/// A backing image readable through `&self` (see [`BackingImage::into_shared`]).
pub enum SharedBacking {
    /// A qcow2 image: reads in parallel, metadata behind its own lock.
    Image(Box<crate::SharedImage>),
    /// A raw file: positioned reads.
    Raw(RawBacking),
    /// Any other backing image: one read at a time.
    Locked(crate::sync::Mutex<Box<dyn BackingImage>>),
}

impl std::fmt::Debug for SharedBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SharedBacking::Image(_) => "SharedBacking::Image",
            SharedBacking::Raw(_) => "SharedBacking::Raw",
            SharedBacking::Locked(_) => "SharedBacking::Locked",
        })
    }
}

impl SharedBacking {
    fn locked(&self) -> Result<crate::sync::MutexGuard<'_, Box<dyn BackingImage>>> {
        match self {
            SharedBacking::Locked(m) => m
                .lock()
                .map_err(|_| crate::shared::lock_failed(crate::Op::Read)),
            _ => Err(crate::shared::lock_failed(crate::Op::Read)),
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            SharedBacking::Image(i) => i.virtual_size().unwrap_or(0),
            SharedBacking::Raw(r) => r.size,
            SharedBacking::Locked(_) => self.locked().map(|b| b.size()).unwrap_or(0),
        }
    }

    /// Reads `buf` at `offset`; what lies beyond the image reads as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let SharedBacking::Locked(_) = self {
            let mut b = self.locked()?;
            return read_backing_from(&mut **b, offset, buf);
        }
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        match self {
            SharedBacking::Image(i) => i.read(offset, head),
            SharedBacking::Raw(r) => r.read_at(offset, head),
            SharedBacking::Locked(_) => Ok(()),
        }
    }
}

/// The handle an image keeps in place of a backing image it shares with the concurrent
/// read paths.
struct SharedHandle {
    shared: Arc<SharedBacking>,
    size: u64,
}

impl BackingImage for SharedHandle {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.shared.read(offset, buf)
    }
    fn status(&mut self, offset: u64, len: u64) -> Result<crate::BlockStatus> {
        match &*self.shared {
            SharedBacking::Image(i) => i.layer_status(offset, len),
            SharedBacking::Raw(r) => r.clone_status(offset, len),
            SharedBacking::Locked(_) => self.shared.locked()?.status(offset, len),
        }
    }
    fn held_above(&mut self, offset: u64, len: u64, levels: u32) -> Result<(Held, u64)> {
        // The shared form must answer as the image it replaced: rebase and commit walk
        // the chain's allocation through it.
        match &*self.shared {
            SharedBacking::Image(i) => i.exclusive(|img| img.held_above(offset, len, levels))?,
            SharedBacking::Raw(_) => {
                let len = len.min(self.size.saturating_sub(offset));
                Ok((if levels > 0 { Held::Data } else { Held::No }, len))
            }
            SharedBacking::Locked(_) => self.shared.locked()?.held_above(offset, len, levels),
        }
    }
    fn as_shared(&self) -> Option<Arc<SharedBacking>> {
        Some(self.shared.clone())
    }
}

/// Replaces `backing` by a handle to its shared form (once) and returns that form.
pub(crate) fn share_backing(
    backing: &mut Option<Box<dyn BackingImage>>,
) -> Option<Arc<SharedBacking>> {
    if let Some(s) = backing.as_ref()?.as_shared() {
        return Some(s);
    }
    let b = backing.take()?;
    let size = b.size();
    let shared = Arc::new(b.into_shared());
    *backing = Some(Box::new(SharedHandle {
        shared: shared.clone(),
        size,
    }));
    Some(shared)
}

/// Opens backing files on behalf of an image (see [`BackingPolicy::Custom`]).
pub trait BackingOpener: Send + Sync {
    /// Opens the backing file `name` (as stored in the image) with format `format` (the
    /// backing-format extension, if any). `depth` is 1 for the image's direct backing file,
    /// 2 for its backing file, and so on.
    fn open(&self, name: &str, format: Option<&str>, depth: u32) -> Result<Box<dyn BackingImage>>;
}

/// A raw image as backing file.
pub struct RawBacking {
    storage: Arc<dyn Storage>,
    size: u64,
}

impl RawBacking {
    /// A raw backing image over `storage`; its size is the storage length rounded up to
    /// whole 512-byte sectors, as QEMU's block layer counts it (the tail reads as zeros).
    pub fn new(storage: Arc<dyn Storage>) -> Result<Self> {
        let len = storage
            .len()
            .map_err(|e| ImageError::io(crate::Op::Open, "length of raw backing file", 0, e))?;
        let size = len.checked_next_multiple_of(512).unwrap_or(len);
        Ok(Self { storage, size })
    }
}

impl RawBacking {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_at(buf, offset)
            .map_err(|e| ImageError::io(crate::Op::Read, "read from raw backing file", offset, e))
    }

    fn clone_status(&self, offset: u64, len: u64) -> Result<crate::BlockStatus> {
        RawBacking {
            storage: self.storage.clone(),
            size: self.size,
        }
        .status(offset, len)
    }
}

impl BackingImage for RawBacking {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(offset, buf)
    }

    fn into_shared(self: Box<Self>) -> SharedBacking {
        SharedBacking::Raw(*self)
    }

    /// Holes the file system reports read as zeros (QEMU's file driver); a storage that
    /// cannot tell reports data.
    fn status(&mut self, offset: u64, len: u64) -> Result<crate::BlockStatus> {
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Ok(crate::BlockStatus {
                eof: true,
                ..crate::BlockStatus::unallocated_zero(offset, 0)
            });
        }
        let (data, run) = self.storage.data_status(offset, len).map_err(|e| {
            ImageError::io(
                crate::Op::Map,
                "block status of raw backing file",
                offset,
                e,
            )
        })?;
        let mut st = crate::BlockStatus::data(offset, len);
        st.data = data;
        st.zero = !data;
        st.length = run.clamp(1, len);
        st.eof = offset + st.length == self.size;
        Ok(st)
    }
}

impl BackingImage for Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Image::read_clamped(self, offset, buf)
    }

    fn status(&mut self, offset: u64, len: u64) -> Result<crate::BlockStatus> {
        self.layer_status(offset, len)
    }

    fn held_above(&mut self, offset: u64, len: u64, levels: u32) -> Result<(Held, u64)> {
        let len = len.min(self.virtual_size().saturating_sub(offset));
        if len == 0 || levels == 0 {
            return Ok((Held::No, len));
        }
        let chunk = self.lookup(crate::Op::Map, offset, len)?;
        let n = chunk.len.clamp(1, len);
        Ok(match chunk.kind {
            crate::image::MapKind::Data(_) | crate::image::MapKind::Compressed(_) => {
                (Held::Data, n)
            }
            crate::image::MapKind::Zero(_) => (Held::Zero, n),
            crate::image::MapKind::Unallocated(_) => match self.backing.as_mut() {
                Some(b) if levels > 1 => {
                    let (held, m) = b.held_above(offset, n, levels - 1)?;
                    // Beyond a shorter backing file no lower layer holds anything.
                    if m == 0 {
                        (Held::No, n)
                    } else {
                        (held, m.min(n))
                    }
                }
                _ => (Held::No, n),
            },
        })
    }

    fn into_shared(self: Box<Self>) -> SharedBacking {
        SharedBacking::Image(Box::new(crate::SharedImage::new(*self)))
    }
}

/// Reads `buf` at `offset` from an optional backing image, zero-filling what lies beyond it.
pub(crate) fn read_backing(
    backing: &mut Option<Box<dyn BackingImage>>,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    let Some(b) = backing.as_mut() else {
        buf.fill(0);
        return Ok(());
    };
    read_backing_from(&mut **b, offset, buf)
}

fn read_backing_from(b: &mut dyn BackingImage, offset: u64, buf: &mut [u8]) -> Result<()> {
    let size = b.size();
    let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(avail);
    if !head.is_empty() {
        b.read(offset, head)?;
    }
    tail.fill(0);
    Ok(())
}

/// The path a backing name resolves to under a path policy, after checking it.
pub(crate) fn resolve(name: &str, base_dir: &Path, allowed: &[PathBuf]) -> Result<PathBuf> {
    let err = |reason: String| ImageError::Backing {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.contains(':') && !Path::new(name).exists() {
        return Err(err(
            "not a plain file name (protocol prefixes are refused)".into()
        ));
    }
    let p = Path::new(name);
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    };
    let canon = full
        .canonicalize()
        .map_err(|e| err(format!("cannot resolve {}: {e}", full.display())))?;
    let ok = allowed.iter().any(|d| {
        d.canonicalize()
            .map(|d| canon.starts_with(d))
            .unwrap_or(false)
    });
    if !ok {
        return Err(err(format!(
            "{} is outside the allowed directories",
            canon.display()
        )));
    }
    Ok(canon)
}

/// Opens the backing chain of an image according to `opts.backing`. Backing files opened
/// by path hold QEMU's read-only locks (force-share and the locking mode inherited from
/// `opts`, as QEMU's children inherit them).
pub(crate) fn open_backing(
    name: &str,
    format: Option<&str>,
    opts: &OpenOptions,
    depth: u32,
) -> Result<Option<Box<dyn BackingImage>>> {
    let policy = &opts.backing;
    let err = |reason: String| ImageError::Backing {
        name: name.to_string(),
        reason,
    };
    match policy {
        BackingPolicy::None => Err(err(
            "the image has a backing file and the backing policy opens none".into(),
        )),
        BackingPolicy::Ignore => Ok(None),
        BackingPolicy::Custom(opener) => opener.open(name, format, depth).map(Some),
        BackingPolicy::Open {
            base_dir,
            max_depth,
            allowed_dirs,
        } => {
            if depth > *max_depth {
                return Err(err(format!(
                    "backing chain deeper than the allowed {max_depth} levels"
                )));
            }
            let path = resolve(name, base_dir, allowed_dirs)?;
            let file = FileStorage::open(&path, false)
                .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
            let is_qcow2 = match format {
                Some("qcow2") => true,
                Some("raw") => false,
                Some(other) => return Err(err(format!("unsupported backing format '{other}'"))),
                None => {
                    let mut magic = [0u8; 4];
                    file.read_at(&mut magic, 0)
                        .map_err(|e| err(format!("cannot probe the format: {e}")))?;
                    magic == *b"QFI\xfb"
                }
            };
            // QEMU names the backing file in its hint as the image's directory joined with
            // the stored name (`path_combine`), not the canonical path.
            let shown = if Path::new(name).is_absolute() {
                PathBuf::from(name)
            } else {
                base_dir.join(name)
            };
            let role = if is_qcow2 {
                FileRole::Qcow2
            } else {
                // A raw backing node passes the overlay's sharing through: it shares all.
                FileRole::Raw { resize: false }
            };
            lock_backing(&file, &shown, role, opts)?;
            let storage: Arc<dyn Storage> = Arc::new(file);
            if !is_qcow2 {
                return Ok(Some(Box::new(RawBacking::new(storage)?)));
            }
            let next_policy = BackingPolicy::Open {
                base_dir: path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| base_dir.clone()),
                max_depth: *max_depth,
                allowed_dirs: allowed_dirs.clone(),
            };
            let opts = OpenOptions {
                read_only: true,
                backing: next_policy,
                locking: opts.locking,
                force_share: opts.force_share,
                ..OpenOptions::default()
            };
            let img = Image::open_at_depth(storage, &opts, depth)?;
            Ok(Some(Box::new(img)))
        }
    }
}

/// Takes the read-only locks of a backing file; a conflict reads as QEMU's "Could not open backing file: ...".
fn lock_backing(
    file: &FileStorage,
    shown: &Path,
    role: FileRole,
    opts: &OpenOptions,
) -> Result<()> {
    let (perm, shared) = crate::locking::permissions(role, false, opts.force_share);
    file.set_permissions(opts.locking, perm, shared)
        .map_err(|source| ImageError::locked(shown, Some("Could not open backing file: "), source))
}
