//! `qcow2 commit`: qemu-img commit's command line, messages and exit codes (0 done, 1 any
//! error) over [`qcow2_image::Image::commit`]. The chain is opened here layer by layer:
//! the base read-write once (shared between the chain that reads through it and the commit
//! that writes it), the images in between read-only, the overlay read-write.

use clap::Args;
use qcow2_image::{BackingImage, CommitOptions, Image, Locking, RawTarget, SharedTarget};
use qcow2_io::{CacheMode, FileStorage};

use crate::image::{self, FileRole, Format};
use crate::progress::Progress;
use crate::{bench, out, qcowdev, source, CliError, ObjectArgs};

/// The layers are opened one by one and wired bottom-up here, so none opens its own chain.
const NO_BACKING: qcowdev::OpenExtras<'static> = qcowdev::OpenExtras {
    backing: false,
    io_uring: false,
    blkdebug: None,
};

/// The arguments of `commit`.
#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Format of the image.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Cache mode of the images written.
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Commit into this image of the backing chain (default: the backing file; implies -d).
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    base: Option<String>,
    /// Keep the image's data after committing (do not empty it).
    #[arg(short = 'd', long = "drop")]
    keep: bool,
    /// Limit the copy to this many bytes per second.
    #[arg(short = 'r', long = "rate-limit", value_name = "RATE")]
    rate: Option<String>,
    /// Show a progress bar.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image file.
    files: Vec<String>,
    #[command(flatten)]
    objects: ObjectArgs,
}

/// One image below the overlay: its path (as qemu-img combines it) and its format.
struct Layer {
    path: String,
    format: Format,
}

/// Runs `commit`.
pub fn run(mut a: CommitArgs) -> Result<(), CliError> {
    let driver = a.objects.apply(&mut a.files)?;
    let format = a.format.take().or(driver);
    let [file] = a.files.as_slice() else {
        return Err(CliError::usage("commit", "Expecting one image file name"));
    };
    let cache = bench::cache_mode(a.cache.as_deref()).map_err(|_| {
        CliError::new(format!(
            "Invalid cache option: {}",
            a.cache.as_deref().unwrap_or("")
        ))
    })?;
    let rate = match a.rate.as_deref() {
        None => None,
        Some(r) => Some(
            crate::size::parse_size(r)
                .ok()
                .filter(|&v| v <= i64::MAX as u64)
                .ok_or_else(|| CliError::new(format!("Invalid rate limit specified: '{r}'.")))?,
        ),
    };
    let parsed = source::parse_format(file, format.as_deref())?;
    let fmt = match parsed {
        Some(f) => f,
        None => image::probe(file)?,
    };
    if fmt == Format::Raw {
        image::open(file, Some(Format::Raw), true)?;
        if parsed.is_none() {
            image::warn_probed_raw(file);
        }
        return Err(CliError::new("Image does not have a backing file"));
    }
    let mut top =
        qcowdev::open_image_extras(file, false, true, cache, Locking::Auto, &[], NO_BACKING)
            .map_err(|e| image::open_error(file, e))?;
    let chain = chain_of(file, &top)?;
    if chain.is_empty() {
        return Err(CliError::new("Image does not have a backing file"));
    }
    let base_depth = match a.base.as_deref() {
        None => 1,
        Some(b) => find_base(file, &top, &chain, b).ok_or_else(|| {
            CliError::new(format!(
                "Did not find '{b}' in the backing chain of '{file}'"
            ))
        })?,
    };
    let base_layer = &chain[base_depth - 1];
    let shared = SharedTarget::new(open_base(base_layer, cache)?);
    // Wire the chain bottom-up: each image in between reads through the next one.
    let mut below: Box<dyn BackingImage> = Box::new(shared.clone());
    for layer in chain[..base_depth - 1].iter().rev() {
        let mut img = qcowdev::open_image_extras(
            &layer.path,
            true,
            false,
            cache,
            Locking::Auto,
            &[],
            NO_BACKING,
        )
        .map_err(|e| image::open_error(file, format!("Could not open backing file: {e}")))?;
        img.set_backing(Some(below));
        below = Box::new(img);
    }
    top.set_backing(Some(below));
    let opts = CommitOptions {
        // -b implies -d: the images in between no longer match what the base holds.
        keep_overlay: a.keep || a.base.is_some(),
        rate_limit: rate,
    };
    let mut progress = Progress::new(a.progress && !a.quiet, 1.0);
    let depth = u32::try_from(base_depth).unwrap_or(u32::MAX);
    let result = top.commit(&shared, depth, &opts, &mut |done, total| {
        progress.set_ratio(done, total)
    });
    let closed = top.close();
    let base_closed = shared.close();
    progress.end();
    result.map_err(|e| CliError::new(e.to_string()))?;
    closed.map_err(|e| CliError::new(qcowdev::error_text(&e)))?;
    base_closed.map_err(|e| CliError::new(qcowdev::error_text(&e)))?;
    if !a.quiet {
        out("Image committed.\n");
    }
    Ok(())
}

/// The images below the overlay `file`, top-down, with the formats their parents record
/// (probed where none is recorded).
fn chain_of(file: &str, top: &Image) -> Result<Vec<Layer>, CliError> {
    let mut layers = Vec::new();
    let mut current = file.to_string();
    let mut next = top.backing_file().map(|n| (n, top.backing_format()));
    while let Some((name, fmt)) = next.take() {
        if layers.len() >= 16 {
            return Err(image::open_error(
                file,
                "Could not open backing file: backing chain too deep",
            ));
        }
        let path = image::path_combine(&current, &name);
        let format = fmt
            .as_deref()
            .and_then(|f| Format::parse(f).ok())
            .map(Ok)
            .unwrap_or_else(|| image::probe_detail(&path))
            .map_err(|e| image::open_error(file, format!("Could not open backing file: {e}")))?;
        if format == Format::Qcow2 {
            let o = image::open_detail(&path, Some(format), false).map_err(|e| {
                image::open_error(file, format!("Could not open backing file: {e}"))
            })?;
            next = o.qcow2.and_then(|q| {
                q.first
                    .backing_file_str()
                    .map(|n| (n, q.first.backing_format_str()))
            });
        }
        layers.push(Layer {
            path: path.clone(),
            format,
        });
        current = path;
    }
    Ok(layers)
}

/// The depth of `base` in the chain (qemu-img's `bdrv_find_backing_image`: the name as
/// stored, or the same file as `base` taken relative to the image that names it).
fn find_base(file: &str, top: &Image, chain: &[Layer], base: &str) -> Option<usize> {
    let mut parent = file.to_string();
    let mut stored = top.backing_file();
    for (i, layer) in chain.iter().enumerate() {
        if stored.as_deref() == Some(base) {
            return Some(i + 1);
        }
        let candidate = std::fs::canonicalize(image::path_combine(&parent, base));
        if let (Ok(c), Ok(l)) = (candidate, std::fs::canonicalize(&layer.path)) {
            if c == l {
                return Some(i + 1);
            }
        }
        stored = image::open_detail(&layer.path, Some(layer.format), false)
            .ok()
            .and_then(|o| o.qcow2)
            .and_then(|q| q.first.backing_file_str());
        parent = layer.path.clone();
    }
    None
}

/// Opens the base read-write: a qcow2 image with its own chain below, or a raw file.
fn open_base(
    layer: &Layer,
    cache: CacheMode,
) -> Result<Box<dyn qcow2_image::CommitTarget>, CliError> {
    let fail = |e: String| image::open_error(&layer.path, e);
    match layer.format {
        Format::Qcow2 => {
            let img = qcowdev::open_image_full(&layer.path, false, true, cache, Locking::Auto, &[])
                .map_err(fail)?;
            Ok(Box::new(img))
        }
        Format::Raw => {
            let storage = FileStorage::open_cached(&layer.path, true, cache)
                .map_err(|e| fail(image::strerror(&e)))?;
            image::lock(&storage, &layer.path, FileRole::Raw { resize: true }, true)
                .map_err(fail)?;
            let t = RawTarget::new(std::sync::Arc::new(storage))
                .map_err(|e| fail(qcowdev::error_text(&e)))?;
            Ok(Box::new(t))
        }
    }
}
