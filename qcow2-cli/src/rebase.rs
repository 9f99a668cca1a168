//! `qcow2 rebase`: qemu-img rebase's command line, messages and exit codes (0 done, 1 any
//! error) over [`qcow2_image::Image::rebase`]. The new backing name is resolved as qemu-img
//! resolves it (relative to the overlay's directory); when it names an image already in the
//! overlay's chain only the ranges the images above it allocate are compared.

use clap::Args;
use qcow2_image::{BackingImage, Image, Locking, RebaseOptions};

use crate::image::{self, Format};
use crate::progress::Progress;
use crate::{bench, qcowdev, source, CliError, ObjectArgs};

/// The arguments of `rebase`.
#[derive(Args, Debug)]
pub struct RebaseArgs {
    /// Format of the image.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Format of the new backing file (recorded in the image).
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// The new backing file ("" removes it: the image becomes standalone).
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Unsafe: only change the name in the header, copy nothing.
    #[arg(short = 'u', long = "unsafe")]
    header_only: bool,
    /// Write the data copied into the image compressed.
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Show a progress bar.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Cache mode of the image.
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Cache mode of the backing files (validated).
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    source_cache: Option<String>,
    /// Force-share the backing files.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    files: Vec<String>,
    #[command(flatten)]
    objects: ObjectArgs,
}

/// The format names QEMU's `bdrv_find_format` knows beyond the two this tool opens
/// (`-F` values recorded by `rebase -u`; refused with "Invalid format name" otherwise).
const QEMU_DRIVERS: [&str; 8] = [
    "file",
    "host_device",
    "host_cdrom",
    "nbd",
    "null-co",
    "null-aio",
    "blkdebug",
    "throttle",
];

fn known_format(f: &str) -> bool {
    Format::parse(f).is_ok() || source::QEMU_ONLY_FORMATS.contains(&f) || QEMU_DRIVERS.contains(&f)
}

/// Runs `rebase`.
pub fn run(mut a: RebaseArgs) -> Result<(), CliError> {
    let driver = a.objects.apply(&mut a.files)?;
    let format = a.format.take().or(driver);
    let [file] = a.files.as_slice() else {
        return Err(CliError::usage("rebase", "Expecting one image file name"));
    };
    if !a.header_only && a.backing.is_none() {
        return Err(CliError::usage(
            "rebase",
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    image::set_force_share(a.force_share);
    let mut progress = Progress::new(a.progress && !a.quiet, 2.0);
    progress.set(0.0);
    let r = rebase(file, format.as_deref(), &a, &mut progress);
    progress.end();
    r
}

fn rebase(
    file: &str,
    format: Option<&str>,
    a: &RebaseArgs,
    progress: &mut Progress,
) -> Result<(), CliError> {
    let cache = bench::cache_mode(a.cache.as_deref()).map_err(|_| {
        CliError::new(format!(
            "Invalid cache option: {}",
            a.cache.as_deref().unwrap_or("")
        ))
    })?;
    if let Some(t) = a.source_cache.as_deref() {
        if qcow2_io::CacheMode::parse(t).is_none() {
            return Err(CliError::new(format!("Invalid source cache option: {t}")));
        }
    }
    let parsed = source::parse_format(file, format)?;
    let fmt = match parsed {
        Some(f) => f,
        None => image::probe(file)?,
    };
    if fmt == Format::Raw {
        // A raw image has no backing file to change (QEMU: ENOTSUP), nor compression.
        image::open(file, Some(Format::Raw), true)?;
        if parsed.is_none() {
            image::warn_probed_raw(file);
        }
        if a.compress {
            return Err(CliError::new(
                "Compression not supported for this file format",
            ));
        }
        if let (false, Some(n)) = (
            a.header_only,
            a.backing.as_deref().filter(|n| !n.is_empty()),
        ) {
            // Safe mode opens the new backing file first.
            let full = image::path_combine(file, n);
            open_new_backing(&full, n, a.backing_format.as_deref())?;
        }
        return Err(CliError::new(format!(
            "Could not change the backing file to '{}': Operation not supported",
            a.backing.as_deref().unwrap_or("")
        )));
    }
    let extras = qcowdev::OpenExtras {
        backing: !a.header_only,
        ..Default::default()
    };
    let mut img = qcowdev::open_image_extras(file, false, false, cache, Locking::Auto, &[], extras)
        .map_err(|e| image::open_error(file, e))?;
    if let Some(f) = a.backing_format.as_deref() {
        if !known_format(f) {
            return Err(CliError::new(format!("Invalid format name: '{f}'")));
        }
    }
    let name = a.backing.clone().filter(|n| !n.is_empty());
    let mut new_disk: Option<Box<dyn BackingImage>> = None;
    let mut in_chain = None;
    if let (false, Some(n)) = (a.header_only, name.as_deref()) {
        let full = image::path_combine(file, n);
        in_chain = chain_depth(file, &img, &full);
        new_disk = Some(open_new_backing(&full, n, a.backing_format.as_deref())?);
    }
    let opts = RebaseOptions {
        backing_file: name,
        backing_format: a.backing_format.clone(),
        header_only: a.header_only,
        compress: a.compress,
    };
    let mut acc = 0f32;
    let new_ref = new_disk
        .as_mut()
        .map(|b| b.as_mut() as &mut dyn BackingImage);
    let result = img.rebase(new_ref, in_chain, &opts, &mut |step| {
        acc += step;
        progress.set(acc);
    });
    let changed = match &result {
        Err(qcow2_image::RebaseError::ChangeBacking { .. }) | Ok(()) => true,
        Err(_) => false,
    };
    let close = img.close();
    if let Err(e) = result {
        if changed {
            // qemu-img reports a failed header switch and still finishes its progress.
            eprintln!("{}{e}", crate::prog::prefix());
            progress.set(100.0);
            return Err(CliError {
                msg: String::new(),
                code: 1,
            });
        }
        return Err(CliError::new(e.to_string()));
    }
    progress.set(100.0);
    close.map_err(|e| CliError::new(qcowdev::error_text(&e)))
}

/// Opens the new backing file `full` (the name `n` as given) read-only, with qemu-img's
/// "Could not open new backing file" message.
fn open_new_backing(
    full: &str,
    n: &str,
    format: Option<&str>,
) -> Result<Box<dyn BackingImage>, CliError> {
    source::open(full, format).map(|d| d.disk).map_err(|e| {
        // source::open says "Could not open 'FULL': " before an open error that already
        // names the file; qemu-img names it once.
        let prefix = format!("Could not open '{full}': ");
        let detail = match e.msg.strip_prefix(&prefix) {
            Some(rest) if rest.starts_with("Could not open") => rest,
            _ => &e.msg,
        };
        CliError::new(format!("Could not open new backing file '{n}': {detail}"))
    })
}

/// The depth of `target` (a path as qemu-img combined it) in the backing chain of the
/// overlay `file` (1: its backing file), compared as files (canonical paths).
fn chain_depth(file: &str, img: &Image, target: &str) -> Option<u32> {
    let target = std::fs::canonicalize(target).ok()?;
    let mut current = file.to_string();
    let mut name = img.backing_file()?;
    for depth in 1..=16 {
        let full = image::path_combine(&current, &name);
        if std::fs::canonicalize(&full).ok()? == target {
            return Some(depth);
        }
        let opened = image::open_detail(&full, None, false).ok()?;
        name = opened.qcow2?.first.backing_file_str()?;
        current = full;
    }
    None
}
