//! qcow2 images (through the qcow2-image facade) as a [`BlockDev`] for `io` and `bench`.

use std::sync::Arc;

use qcow2_image::{BackingPolicy, Image, ImageError, Locking, OpenOptions, OverlapLevel};
use qcow2_io::{CacheMode, FileStorage};

use crate::info::format_specific_lines;
use crate::io::BlockDev;

/// `EPERM`, QEMU's answer to a write on a read-only node.
const EPERM: i32 = 1;

/// An opened qcow2 image.
pub struct QcowDev {
    image: Option<Image>,
    read_only: bool,
    copy_on_read: bool,
    /// A corruption was reported (QEMU reports one, then suppresses the rest).
    signaled_corruption: bool,
    /// A fatal corruption made the image unusable (QEMU drops the driver).
    unusable: bool,
}

/// Opens `path` with the backing chain resolved next to it (as qemu-io and qemu-img do).
/// The error is the text qemu-img prints after "Could not open 'FILE': ".
pub fn open_image(path: &str, read_only: bool) -> Result<Image, String> {
    open_image_with(path, read_only, false)
}

/// [`open_image`]; `unmap` passes guest discards down to the files (QEMU's `BDRV_O_UNMAP`,
/// which qemu-io sets by default).
pub fn open_image_with(path: &str, read_only: bool, unmap: bool) -> Result<Image, String> {
    open_image_tuned(path, read_only, unmap, &[])
}

/// [`open_image_with`] with one of QEMU's cache modes on the image file.
pub fn open_image_cached(
    path: &str,
    read_only: bool,
    unmap: bool,
    cache: CacheMode,
) -> Result<Image, String> {
    open_image_full(path, read_only, unmap, cache, Locking::Auto, &[])
}

/// Applies one of QEMU's qcow2 runtime options (`-o KEY=VALUE` of qemu-io's `open`,
/// `--image-opts`) to `opts`. `Ok(false)`: not a qcow2 runtime option. The error is
/// QEMU's message for a bad value.
pub fn apply_runtime_option(
    opts: &mut OpenOptions,
    key: &str,
    value: &str,
) -> Result<bool, String> {
    let bool_opt = || match value {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    };
    let size_opt = || {
        crate::size::parse_size(value).map_err(|_| {
            format!(
                "Parameter '{key}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            )
        })
    };
    match key {
        "lazy-refcounts" => opts.lazy_refcounts = Some(bool_opt()?),
        "encrypt.key-secret" => opts.key_secret = Some(crate::secrets::lookup(value)?),
        "l2-cache-size" => opts.l2_cache_size = Some(size_opt()?),
        "l2-cache-entry-size" => opts.l2_cache_entry_size = Some(size_opt()?),
        "refcount-cache-size" => opts.refcount_cache_size = Some(size_opt()?),
        // The total and the clean-up interval tune memory use only.
        "cache-size" | "cache-clean-interval" => {
            size_opt()?;
        }
        "pass-discard-request" => opts.pass_discard_request = bool_opt()?,
        "pass-discard-snapshot" => opts.pass_discard_snapshot = bool_opt()?,
        "pass-discard-other" => opts.pass_discard_other = bool_opt()?,
        "discard-no-unref" => opts.discard_no_unref = bool_opt()?,
        "overlap-check" | "overlap-check.template" => {
            opts.overlap_check = match value {
                "none" => OverlapLevel::None,
                "constant" => OverlapLevel::Constant,
                "cached" => OverlapLevel::Cached,
                "all" => OverlapLevel::All,
                _ => {
                    return Err(format!(
                        "Unsupported value '{value}' for qcow2 option 'overlap-check'. Allowed \
                         are any of the following: none, constant, cached, all"
                    ))
                }
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// QEMU's rules between `cache-size` and the two caches it is split into (checked before
/// the entry size): not all three at once, and neither part above the total.
pub fn check_cache_sizes(runtime: &[(String, String)]) -> Result<(), String> {
    // The last value of a repeated key wins, as in QEMU's option lists.
    let get = |k: &str| {
        runtime
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .and_then(|(_, v)| crate::size::parse_size(v).ok())
    };
    let (total, l2, refcount) = (
        get("cache-size"),
        get("l2-cache-size"),
        get("refcount-cache-size"),
    );
    match (total, l2, refcount) {
        (Some(_), Some(_), Some(_)) => Err(
            "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
                .to_string(),
        ),
        (Some(t), Some(l), _) if l > t => {
            Err("l2-cache-size may not exceed cache-size".to_string())
        }
        (Some(t), _, Some(r)) if r > t => {
            Err("refcount-cache-size may not exceed cache-size".to_string())
        }
        _ => Ok(()),
    }
}

/// [`open_image_with`] with qcow2 runtime options (see [`apply_runtime_option`]); the
/// error is the text after "can't open device FILE: ".
pub fn open_image_tuned(
    path: &str,
    read_only: bool,
    unmap: bool,
    runtime: &[(String, String)],
) -> Result<Image, String> {
    open_image_full(
        path,
        read_only,
        unmap,
        CacheMode::Writeback,
        Locking::Auto,
        runtime,
    )
}

/// Opens a qcow2 image with everything the command lines can say: the cache mode of the
/// image file, QEMU's `file.locking`, and qcow2 runtime options; the lock taken honours the
/// command's force-share. The error is the text after "can't open device FILE: ".
pub fn open_image_full(
    path: &str,
    read_only: bool,
    unmap: bool,
    cache: CacheMode,
    locking: Locking,
    runtime: &[(String, String)],
) -> Result<Image, String> {
    let node = crate::blkdebug::Blkdebug::from_filename(path)?;
    let extras = OpenExtras {
        blkdebug: node.as_ref(),
        ..OpenExtras::default()
    };
    open_image_extras(path, read_only, unmap, cache, locking, runtime, extras)
}

/// What only some commands ask of an open, beyond [`open_image_full`].
#[derive(Debug, Clone, Copy)]
pub struct OpenExtras<'a> {
    /// Open the backing chain; without it the backing file is not opened (QEMU's
    /// `BDRV_O_NO_BACKING`, as `rebase -u` opens the overlay).
    pub backing: bool,
    /// Let the image file's data transfers go through io_uring (QEMU's `aio=io_uring`):
    /// the open fails with QEMU's message where the kernel has none.
    pub io_uring: bool,
    /// The image file sits below this blkdebug node (its rules run on the engine's I/O
    /// to the file; the path is then the node's name in messages).
    pub blkdebug: Option<&'a crate::blkdebug::Blkdebug>,
}

impl Default for OpenExtras<'_> {
    fn default() -> Self {
        OpenExtras {
            backing: true,
            io_uring: false,
            blkdebug: None,
        }
    }
}

/// [`open_image_full`] with [`OpenExtras`].
pub fn open_image_extras(
    path: &str,
    read_only: bool,
    unmap: bool,
    cache: CacheMode,
    locking: Locking,
    runtime: &[(String, String)],
    extras: OpenExtras<'_>,
) -> Result<Image, String> {
    open_image_extras_uring(path, read_only, unmap, cache, locking, runtime, extras).map(|(i, _)| i)
}

/// [`open_image_extras`], also saying whether the image file's data transfers go through
/// io_uring (asked with [`OpenExtras::io_uring`]). Where the kernel has no usable io_uring:
/// QEMU 10's message and its fallback, the thread pool.
pub fn open_image_extras_uring(
    path: &str,
    read_only: bool,
    unmap: bool,
    cache: CacheMode,
    locking: Locking,
    runtime: &[(String, String)],
    extras: OpenExtras<'_>,
) -> Result<(Image, bool), String> {
    let OpenExtras {
        backing,
        io_uring,
        blkdebug,
    } = extras;
    let file_path = match blkdebug {
        Some(node) => node
            .image
            .as_deref()
            .ok_or_else(|| "Could not open blkdebug: no image file given".to_string())?,
        None => path,
    };
    let mut storage =
        FileStorage::open_cached(crate::image::file_name(file_path), !read_only, cache)
            .map_err(|e| format!("Could not open '{path}': {}", crate::image::strerror(&e)))?;
    if io_uring {
        if let Err(e) = storage.enable_io_uring() {
            eprintln!(
                "{}Unable to use linux io_uring, falling back to thread pool: failed to init linux io_uring ring: {}",
                crate::prog::prefix(),
                crate::image::strerror(&e)
            );
        }
    }
    let uses_io_uring = storage.uses_io_uring();
    let path = file_path;
    let base_dir = std::path::Path::new(path)
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let opts = OpenOptions {
        read_only,
        force_share: crate::image::force_share(),
        locking,
        backing: if backing {
            BackingPolicy::Open {
                base_dir,
                max_depth: 16,
                // qemu-img follows backing file names anywhere; so does this command-line
                // tool (the restriction is for services that open untrusted images).
                allowed_dirs: vec![std::path::PathBuf::from("/")],
            }
        } else {
            BackingPolicy::Ignore
        },
        pass_discard_request: unmap,
        key_secret: crate::secrets::command_secret(),
        ..OpenOptions::default()
    };
    let mut opts = opts;
    // A qemu-img --image-opts list's runtime options first; the caller's override them.
    let mut all = crate::secrets::command_runtime();
    all.extend(runtime.iter().cloned());
    let runtime = &all[..];
    for (k, v) in runtime {
        if !apply_runtime_option(&mut opts, k, v)? {
            return Err(format!(
                "Block format 'qcow2' does not support the option '{k}'"
            ));
        }
    }
    check_cache_sizes(runtime)?;
    let wrap = |f: std::sync::Arc<FileStorage>| -> std::sync::Arc<dyn qcow2_io::Storage> {
        match blkdebug {
            Some(node) => node.wrap(f),
            None => f,
        }
    };
    let image = Image::open_file_wrapped(storage, std::path::Path::new(path), &opts, wrap)
        .map_err(|e| match e {
            // QEMU's message for a bad option has no operation in front.
            ImageError::InvalidArgument { reason, .. } => reason,
            ImageError::Backing { ref name, .. } => {
                backing_open_error(path, name).unwrap_or_else(|| error_text(&e))
            }
            other => error_text(&other),
        })?;
    for m in image.messages() {
        if m.starts_with("warning: ") {
            // QEMU's warnings carry the program prefix; printed once per command.
            crate::image::print_warning(m);
        } else {
            eprintln!("{m}");
        }
    }
    Ok((image, uses_io_uring))
}

/// QEMU's "Could not open backing file: Could not open 'PATH': REASON" when the backing
/// file `name` of the image at `image_path` cannot be opened (`None` when it can, and the
/// engine's own message says what else is wrong). PATH is QEMU's `path_combine`.
fn backing_open_error(image_path: &str, name: &str) -> Option<String> {
    let combined = if name.starts_with('/') {
        name.to_string()
    } else {
        match image_path.rfind('/') {
            Some(i) => format!("{}{name}", &image_path[..=i]),
            None => name.to_string(),
        }
    };
    let e = std::fs::File::open(&combined).err()?;
    Some(format!(
        "Could not open backing file: Could not open '{combined}': {}",
        crate::image::strerror(&e)
    ))
}

/// The message of an image error without the engine's operation prefix where QEMU has none
/// (a lock conflict with qemu-img's hint line after it).
pub fn error_text(e: &ImageError) -> String {
    crate::image::image_error_text(e)
}

impl QcowDev {
    /// Wraps an image opened by [`open_image`].
    pub fn from_image(image: Image, read_only: bool) -> Self {
        QcowDev {
            image: Some(image),
            read_only,
            copy_on_read: false,
            signaled_corruption: false,
            unusable: false,
        }
    }

    /// Turns copy-on-read on: data read from the backing file is written into this image
    /// (whole clusters), as QEMU's `copy-on-read` does.
    pub fn set_copy_on_read(&mut self, on: bool) {
        self.copy_on_read = on;
    }

    /// Opens a throw-away overlay over `backing` (qemu-io's `-s`): a qcow2 image in the
    /// temporary directory whose backing file is `backing` (format `backing_format`),
    /// unlinked as soon as it is open, so that writes never reach `backing` and vanish when
    /// the program ends. The error is the text after "can't open device FILE: ".
    pub fn snapshot_overlay(
        backing: &str,
        backing_format: &str,
        size: u64,
        read_only: bool,
        unmap: bool,
    ) -> Result<Self, String> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let abs = std::fs::canonicalize(backing)
            .map_err(|e| format!("Could not open '{backing}': {}", crate::image::strerror(&e)))?;
        let tmp = std::env::temp_dir().join(format!(
            "qcow2-io-snapshot-{}-{}.qcow2",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let storage = FileStorage::create(&tmp).map_err(|e| {
            format!(
                "Could not create temporary overlay '{}': {}",
                tmp.display(),
                crate::image::strerror(&e)
            )
        })?;
        let mut layout = qcow2_format::layout::CreateOptions::new(size);
        layout.backing_file = Some(abs.to_string_lossy().into_owned());
        layout.backing_format = Some(backing_format.to_string());
        let opts = OpenOptions {
            backing: BackingPolicy::Open {
                base_dir: abs.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
                max_depth: 16,
                allowed_dirs: vec![std::path::PathBuf::from("/")],
            },
            pass_discard_request: unmap,
            ..OpenOptions::default()
        };
        let created = Image::create_with(Arc::new(storage), &layout.into(), &opts);
        // The open file keeps the overlay alive; its name is not needed any more.
        let _ = std::fs::remove_file(&tmp);
        let image = created.map_err(|e| error_text(&e))?;
        Ok(QcowDev::from_image(image, read_only))
    }

    /// Copy-on-read of `[offset, offset + len)` as QEMU's `bdrv_co_do_copy_on_readv`: the
    /// request widened to whole clusters, every run not allocated in this image is read
    /// (from the backing file, or zeros) and written back, as zero clusters where it reads
    /// as zeros.
    fn copy_on_read(&mut self, offset: u64, len: u64) -> Result<(), i32> {
        /// QEMU's bounce buffer limit.
        const MAX_BOUNCE: u64 = 16 << 20;
        let img = self.img()?;
        let size = img.virtual_size();
        if len == 0 || offset >= size {
            return Ok(());
        }
        let cs = img.cluster_size();
        let start = offset - offset % cs;
        let end = offset.saturating_add(len).next_multiple_of(cs).min(size);
        let extents = img.map(start, end - start).map_err(errno)?;
        for x in extents {
            if x.is_allocated() {
                continue;
            }
            let mut pos = x.offset;
            while pos < x.offset + x.length {
                let n = (x.offset + x.length - pos).min(MAX_BOUNCE);
                let mut buf = vec![0u8; n as usize];
                img.read(pos, &mut buf).map_err(errno)?;
                if buf.iter().all(|&b| b == 0) {
                    img.write_zeroes(pos, n, false).map_err(errno)?;
                } else {
                    img.write(pos, &buf).map_err(errno)?;
                }
                pos += n;
            }
        }
        Ok(())
    }

    fn img(&mut self) -> Result<&mut Image, i32> {
        self.image.as_mut().ok_or(5)
    }

    fn writable(&mut self) -> Result<&mut Image, i32> {
        if self.read_only {
            return Err(EPERM);
        }
        self.img()
    }

    /// Flushes and closes the image, reporting the error text if that fails.
    pub fn close(&mut self) -> Result<(), String> {
        match self.image.take() {
            // Marked corrupt and dropped, as QEMU drops the driver: nothing more is written.
            Some(img) if self.unusable => {
                img.abandon();
                Ok(())
            }
            Some(img) => img.close().map_err(|e| error_text(&e)),
            None => Ok(()),
        }
    }
}

impl Drop for QcowDev {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

thread_local! {
    /// The corruption an engine call just reported (message, fatal), for
    /// [`QcowDev::guard`] to signal.
    static CORRUPTION: std::cell::RefCell<Option<(String, bool)>> =
        const { std::cell::RefCell::new(None) };
}

/// The errno of an engine error; a corruption is noted for [`QcowDev::guard`].
fn errno(e: ImageError) -> i32 {
    if let ImageError::Corruption { message, fatal, .. } = &e {
        CORRUPTION.with(|c| *c.borrow_mut() = Some((message.clone(), *fatal)));
    }
    e.errno()
}

use crate::io::ENOMEDIUM;

impl QcowDev {
    /// Runs an engine operation. A corruption it reports is signalled as QEMU's
    /// `qcow2_signal_corruption` does: one message (fatal ones on a writable image mark it
    /// corrupt and make it unusable: every later request fails with ENOMEDIUM; further
    /// events are not reported).
    fn guard<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, i32>) -> Result<T, i32> {
        if self.unusable {
            return Err(ENOMEDIUM);
        }
        let r = f(self);
        if let Some((message, fatal)) = CORRUPTION.with(|c| c.borrow_mut().take()) {
            let fatal = fatal && !self.read_only;
            if !self.signaled_corruption || fatal {
                if fatal {
                    eprintln!(
                        "qcow2: Marking image as corrupt: {message}; further corruption events \
                         will be suppressed"
                    );
                    self.unusable = true;
                } else {
                    eprintln!(
                        "qcow2: Image is corrupt: {message}; further non-fatal corruption \
                         events will be suppressed"
                    );
                }
                self.signaled_corruption = true;
            }
        }
        r
    }
}

impl BlockDev for QcowDev {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }
    fn backing_driver(&self) -> Option<String> {
        // The stored backing format (an image without one, whose backing file QEMU
        // probes, answers None: reopen then refuses any backing.driver).
        let image = self.image.as_ref().filter(|i| i.has_backing())?;
        image.backing_format()
    }
    fn length(&mut self) -> Result<u64, i32> {
        self.guard(Ops::length)
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.guard(|d| Ops::read(d, offset, buf))
    }
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.guard(|d| Ops::write(d, offset, buf))
    }
    fn write_compressed(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.guard(|d| Ops::write_compressed(d, offset, buf))
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        self.guard(|d| Ops::write_zeroes(d, offset, len, unmap))
    }
    fn write_zeroes_fast(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        self.guard(|d| Ops::write_zeroes_fast(d, offset, len, unmap))
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), i32> {
        self.guard(|d| Ops::discard(d, offset, len))
    }
    fn flush(&mut self) -> Result<(), i32> {
        if self.unusable {
            // QEMU's flush of a node without a driver succeeds.
            return Ok(());
        }
        self.guard(Ops::flush)
    }
    fn truncate(&mut self, len: u64) -> Result<(), i32> {
        self.guard(|d| Ops::truncate(d, len))
    }
    fn is_allocated(&mut self, offset: u64, len: u64) -> Result<(bool, u64), i32> {
        self.guard(|d| Ops::is_allocated(d, offset, len))
    }
    fn info(&mut self) -> (u64, u64) {
        Ops::info(self)
    }
    fn specific_info(&mut self) -> Vec<String> {
        Ops::specific_info(self)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn usable(&self) -> bool {
        !self.unusable
    }
    fn load_vmstate(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.guard(|d| Ops::load_vmstate(d, offset, buf))
    }
    fn save_vmstate(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.guard(|d| Ops::save_vmstate(d, offset, buf))
    }
}

/// The engine side of each [`BlockDev`] operation, before [`QcowDev::guard`].
trait Ops {
    fn length(&mut self) -> Result<u64, i32>;
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32>;
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32>;
    fn write_compressed(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32>;
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32>;
    fn write_zeroes_fast(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32>;
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), i32>;
    fn flush(&mut self) -> Result<(), i32>;
    fn truncate(&mut self, len: u64) -> Result<(), i32>;
    fn is_allocated(&mut self, offset: u64, len: u64) -> Result<(bool, u64), i32>;
    fn info(&mut self) -> (u64, u64);
    fn specific_info(&mut self) -> Vec<String>;
    fn load_vmstate(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32>;
    fn save_vmstate(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32>;
}

impl Ops for QcowDev {
    fn length(&mut self) -> Result<u64, i32> {
        Ok(self.img()?.virtual_size())
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        if self.copy_on_read && !self.read_only {
            self.copy_on_read(offset, buf.len() as u64)?;
        }
        self.img()?.read(offset, buf).map_err(errno)
    }
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.writable()?.write(offset, buf).map_err(errno)
    }
    fn write_compressed(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        let img = self.writable()?;
        let cs = img.cluster_size() as usize;
        // QEMU compresses only into clusters with no host cluster yet (EIO otherwise), after
        // refusing external data files outright (ENOTSUP, which the engine returns).
        if !buf.is_empty() && img.data_file().is_none() {
            for x in img.map(offset, buf.len() as u64).map_err(errno)? {
                let has_host = match x.kind {
                    qcow2_image::ExtentKind::Data
                    | qcow2_image::ExtentKind::DataHole
                    | qcow2_image::ExtentKind::Compressed => true,
                    qcow2_image::ExtentKind::Zero => x.host_offset.is_some(),
                    _ => false,
                };
                if has_host {
                    return Err(crate::io::EIO);
                }
            }
        }
        // qemu-io splits a compressed write into whole clusters.
        for (i, chunk) in buf.chunks(cs.max(1)).enumerate() {
            img.write_compressed(offset + (i * cs) as u64, chunk)
                .map_err(errno)?;
        }
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        self.writable()?
            .write_zeroes(offset, len, unmap)
            .map_err(errno)
    }
    fn write_zeroes_fast(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        // Zero clusters need no data write; a partial cluster would.
        // As QEMU: a partial cluster that already reads as zeros widens the request to
        // the whole cluster; any other partial cluster would need a data write.
        // The head cluster, the aligned body and the tail cluster are zeroed in that order
        // (what is done stays done when a later part fails, as in QEMU).
        let img = self.writable()?;
        let cs = img.cluster_size();
        let size = img.virtual_size();
        let end = offset.saturating_add(len).min(size);
        let mut pos = offset;
        while pos < end {
            let lo = pos - pos % cs;
            let hi = (lo + cs).min(size);
            let (from, to) = if pos % cs != 0 || end < hi {
                // A partial cluster: only if it reads as zeros already.
                let mut buf = vec![0u8; (hi - lo) as usize];
                img.read(lo, &mut buf).map_err(errno)?;
                if buf.iter().any(|&b| b != 0) {
                    return Err(crate::io::ENOTSUP);
                }
                (lo, hi)
            } else {
                // Whole clusters up to the last one `end` fills completely.
                let to = if end == size { end } else { end - end % cs };
                (pos, to)
            };
            img.write_zeroes(from, to - from, unmap).map_err(errno)?;
            pos = to;
        }
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), i32> {
        self.writable()?.discard(offset, len).map_err(errno)
    }
    fn flush(&mut self) -> Result<(), i32> {
        self.img()?.flush().map_err(errno)
    }
    fn truncate(&mut self, len: u64) -> Result<(), i32> {
        self.writable()?.resize(len).map_err(errno)
    }
    fn is_allocated(&mut self, offset: u64, len: u64) -> Result<(bool, u64), i32> {
        let e = self.img()?.block_status(offset, len).map_err(errno)?;
        Ok((e.is_allocated(), e.length))
    }
    fn info(&mut self) -> (u64, u64) {
        match self.img() {
            Ok(img) => (img.geometry().cluster_size(), img.vm_state_offset()),
            Err(_) => (0, 0),
        }
    }
    fn load_vmstate(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.img()?.load_vmstate(offset, buf).map_err(errno)
    }
    fn save_vmstate(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.writable()?.save_vmstate(offset, buf).map_err(errno)
    }
    fn specific_info(&mut self) -> Vec<String> {
        match self.img() {
            Ok(img) => format_specific_lines(img.header(), img.data_file().as_deref()),
            Err(_) => Vec::new(),
        }
    }
}
