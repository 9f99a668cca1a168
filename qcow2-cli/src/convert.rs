//! `qcow2 convert`: copies raw or qcow2 images (one or several, concatenated) into a new raw
//! or qcow2 image, as `qemu-img convert` does.
//!
//! - Sources: raw files, and qcow2 images read through the image facade. A qcow2 source's
//!   backing chain is followed (its names resolved relative to the source's directory, as
//!   qemu-img does; at most 16 levels; qcow2 or raw) and flattened into the target.
//! - Sparseness: ranges the source maps as zero or unallocated are not read; data is
//!   scanned for zeros per target cluster (4 KiB for raw targets, qemu-img's `-S 4k`) and
//!   zero clusters are not written, so the new image (which reads zeros everywhere) does
//!   not allocate them.
//! - `-c`: every non-zero target cluster is compressed on a pool of worker threads
//!   (`std::thread`, one per available core) with [`qcow2_image::compress_cluster`], and
//!   the results are written **in guest order** on this thread with
//!   [`qcow2_image::Image::write_compressed_prepared`] (or a normal write when compression
//!   does not pay), which packs them exactly as a sequential conversion would.
//! - `-p`: QEMU's progress lines over the bytes of data to copy.
//! - `-B`/`-F`: the target is created on a backing file and only what the source's own
//!   image holds is written (zeros it holds are written as zeros), as qemu-img does; `-n`
//!   writes into an existing target (zeros then written, unless `--target-is-zero`); `-S`
//!   sets the zero detection granularity (`-S 0`: everything written as data); `-l`
//!   converts an internal snapshot; `--salvage` turns unreadable sectors into zeros; `-r`
//!   limits the rate (options in `convert_opts`).

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use qcow2_image::{CompressionType, ExtentKind, Image, Preallocation};
use qcow2_io::{FileStorage, Storage};

use crate::create::{target_options, TargetOption};
use crate::image::{self, Format};
use crate::progress::Progress;
use crate::qcowdev;
use crate::CliError;

#[path = "convert_compressed.rs"]
mod compressed;
use compressed::copy_compressed;

/// Bytes handled per step (qemu-img's 2 MiB buffer).
const CHUNK: u64 = 2 << 20;

/// The arguments of `convert`.
pub struct ConvertRequest {
    /// `-f`: the format of every source (probed when absent).
    pub source_format: Option<Format>,
    /// `-O`: the target format (raw when absent, as qemu-img).
    pub target_format: Option<String>,
    /// `-c`.
    pub compress: bool,
    /// `-o` lists for the target.
    pub options: Vec<String>,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// Sources, then the target (at least two names).
    pub files: Vec<String>,
    /// `--bitmaps`: copy the persistent bitmaps (see `bitmap::copy_bitmaps`).
    pub bitmaps: bool,
    /// `--skip-broken-bitmaps`: with `--bitmaps`, skip inconsistent ones.
    pub skip_broken_bitmaps: bool,
    /// The options of `convert_opts` (backing file, existing target, zero detection, ...).
    pub extra: crate::convert_opts::ConvertExtraArgs,
}

/// One opened source image.
enum Reader {
    Raw(FileStorage),
    Qcow2(Box<Image>),
}

/// A source placed in the target's guest address space.
struct Source {
    reader: Reader,
    /// First target byte this source covers.
    start: u64,
    /// Its virtual size.
    size: u64,
}

impl Source {
    fn open(path: &str, format: Option<Format>, snapshot: Option<&str>) -> Result<Self, CliError> {
        let opened = image::open(path, format, false)?;
        if snapshot.is_some() && opened.format == Format::Raw {
            return Err(CliError::new(
                "Failed to load snapshot: Block format 'raw' used by device '' does not support temporarily loading internal snapshots",
            ));
        }
        match opened.format {
            Format::Raw => {
                let storage = FileStorage::open(crate::image::file_name(path), false)
                    .map_err(|e| image::open_error(path, image::strerror(&e)))?;
                image::lock(
                    &storage,
                    path,
                    image::FileRole::Raw { resize: false },
                    false,
                )
                .map_err(|e| image::open_error(path, e))?;
                Ok(Source {
                    reader: Reader::Raw(storage),
                    start: 0,
                    // The block layer counts whole sectors.
                    size: opened.file_len.next_multiple_of(512),
                })
            }
            Format::Qcow2 => {
                let mut img =
                    qcowdev::open_image(path, true).map_err(|e| image::open_error(path, e))?;
                if let Some(spec) = snapshot {
                    let id = crate::source::snapshot_id(img.snapshots(), spec)?;
                    img.snapshot_load_tmp(&id).map_err(|e| {
                        CliError::new(format!(
                            "Failed to load snapshot: {}",
                            qcowdev::error_text(&e)
                        ))
                    })?;
                }
                let size = img.virtual_size();
                Ok(Source {
                    reader: Reader::Qcow2(Box::new(img)),
                    start: 0,
                    size,
                })
            }
        }
    }

    /// The runs of local `[off, off + len)`: what the whole chain holds, or with
    /// `top_only` (a target on a backing file) what the source's own image holds, ranges
    /// it leaves to its backing file being [`Run::Backing`].
    fn runs(&mut self, off: u64, len: u64, top_only: bool) -> Result<Vec<(u64, u64, Run)>, String> {
        match &mut self.reader {
            // QEMU's raw format asks the file system where the holes are; a failed
            // query reads the rest as data.
            Reader::Raw(s) => {
                let mut out: Vec<(u64, u64, Run)> = Vec::new();
                let mut pos = 0;
                while pos < len {
                    let (run, n) = match s.data_status(off + pos, len - pos) {
                        Ok((data, n)) if n > 0 => {
                            (if data { Run::Data } else { Run::Zero }, n.min(len - pos))
                        }
                        _ => (Run::Data, len - pos),
                    };
                    match out.last_mut() {
                        Some(last) if last.2 == run => last.1 += n,
                        _ => out.push((off + pos, n, run)),
                    }
                    pos += n;
                }
                Ok(out)
            }
            // Without -B: QEMU's block status through the whole chain (zero where no layer
            // holds data, holes of metadata-preallocated images included).
            Reader::Qcow2(img) if !top_only => {
                let mut out: Vec<(u64, u64, Run)> = Vec::new();
                let mut pos = 0;
                while pos < len {
                    let st = img
                        .chain_status(off + pos, len - pos)
                        .map_err(|e| qcowdev::error_text(&e))?;
                    let n = st.length.clamp(1, len - pos);
                    let run = if st.zero { Run::Zero } else { Run::Data };
                    match out.last_mut() {
                        Some(last) if last.2 == run => last.1 += n,
                        _ => out.push((off + pos, n, run)),
                    }
                    pos += n;
                }
                Ok(out)
            }
            Reader::Qcow2(img) => {
                let ext = img
                    .map_metadata(off, len)
                    .map_err(|e| qcowdev::error_text(&e))?;
                Ok(ext
                    .iter()
                    .map(|e| {
                        // What the source's own image leaves to its backing file, the
                        // target's backing file provides.
                        let run = match e.kind {
                            ExtentKind::Backing => Run::Backing,
                            _ if e.reads_as_zero() => Run::Zero,
                            _ => Run::Data,
                        };
                        (e.offset, e.length, run)
                    })
                    .collect())
            }
        }
    }

    /// Bytes of data (not known to be zero) in the whole source, for the progress total.
    fn data_bytes(&mut self) -> Result<u64, String> {
        match &mut self.reader {
            Reader::Raw(_) => Ok(self.size),
            Reader::Qcow2(img) => {
                let size = self.size;
                let ext = img.map(0, size).map_err(|e| qcowdev::error_text(&e))?;
                Ok(ext
                    .iter()
                    .filter(|e| !e.reads_as_zero())
                    .map(|e| e.length)
                    .sum())
            }
        }
    }

    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        match &mut self.reader {
            Reader::Raw(s) => s.read_at(buf, off).map_err(|e| image::strerror(&e)),
            Reader::Qcow2(img) => img.read(off, buf).map_err(|e| {
                let errno = e.errno();
                if e.is_corruption() {
                    eprintln!("{}{}", crate::prog::prefix(), qcowdev::error_text(&e));
                }
                crate::io::strerror(errno)
            }),
        }
    }
}

/// What a source range holds, as qemu-img convert sorts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Data to read (zeros in it are still detected).
    Data,
    /// Reads as zeros without reading.
    Zero,
    /// Left to the target's backing file (`-B`): nothing is written.
    Backing,
}

/// All sources, concatenated.
struct Sources(Vec<Source>);

impl Sources {
    fn total(&self) -> u64 {
        self.0.last().map(|s| s.start + s.size).unwrap_or(0)
    }

    /// The runs of target `[off, off + len)` over every source it touches (see
    /// [`Source::runs`]), in target offsets.
    fn runs(
        &mut self,
        off: u64,
        len: u64,
        top_only: bool,
    ) -> Result<Vec<(u64, u64, Run)>, CliError> {
        let end = off + len;
        let mut out: Vec<(u64, u64, Run)> = Vec::new();
        for s in &mut self.0 {
            let (a, b) = (off.max(s.start), end.min(s.start + s.size));
            if a >= b {
                continue;
            }
            for (o, l, r) in s
                .runs(a - s.start, b - a, top_only)
                .map_err(|e| read_error(a, &e))?
            {
                let o = o + s.start;
                match out.last_mut() {
                    Some(last) if last.2 == r && last.0 + last.1 == o => last.1 += l,
                    _ => out.push((o, l, r)),
                }
            }
        }
        Ok(out)
    }

    /// Reads target `[off, off + buf.len())`; with `salvage`, a failed read is retried
    /// sector by sector and the sectors that fail read as zeros (with qemu-img's warning).
    fn read_salvaging(&mut self, off: u64, buf: &mut [u8], salvage: bool) -> Result<(), CliError> {
        match self.read(off, buf) {
            Err(e) if salvage => {
                let _ = e;
                for (i, sector) in buf.chunks_mut(512).enumerate() {
                    let at = off + (i * 512) as u64;
                    if let Err(e) = self.read(at, sector) {
                        let why = e.msg.rsplit(": ").next().unwrap_or("").to_string();
                        eprintln!(
                            "{}warning: error while reading offset {at}: {why}",
                            crate::prog::prefix()
                        );
                        sector.fill(0);
                    }
                }
                Ok(())
            }
            r => r,
        }
    }

    /// Reads target `[off, off + buf.len())`.
    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), CliError> {
        let end = off + buf.len() as u64;
        for s in &mut self.0 {
            let (a, b) = (off.max(s.start), end.min(s.start + s.size));
            if a < b {
                let part = &mut buf[(a - off) as usize..(b - off) as usize];
                s.read(a - s.start, part).map_err(|e| read_error(a, &e))?;
            }
        }
        Ok(())
    }
}

fn read_error(offset: u64, e: &str) -> CliError {
    CliError::new(format!("error while reading at byte {offset}: {e}"))
}

fn write_error(offset: u64, e: &str) -> CliError {
    CliError::new(format!("error while writing at byte {offset}: {e}"))
}

/// The target being written.
enum Target {
    Raw(FileStorage),
    Qcow2(Box<Image>),
}

impl Target {
    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), CliError> {
        match self {
            Target::Raw(f) => f
                .file()
                .write_all_at(data, off)
                .map_err(|e| write_error(off, &image::strerror(&e))),
            Target::Qcow2(img) => img
                .write(off, data)
                .map_err(|e| write_error(off, &crate::io::strerror(e.errno()))),
        }
    }

    /// Makes `[off, off + len)` read as zeros (releasing storage where it can), for
    /// targets that did not read as zeros before (`-n`, `-B`).
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<(), CliError> {
        match self {
            Target::Raw(f) => f
                .write_zeroes(off, len)
                .map_err(|e| write_error(off, &image::strerror(&e))),
            Target::Qcow2(img) => img
                .write_zeroes(off, len, true)
                .map_err(|e| write_error(off, &crate::io::strerror(e.errno()))),
        }
    }

    /// Opens an existing target (`-n`) read-write; it must be at least `size` long.
    fn open_existing(
        dst: &str,
        format: Format,
        size: u64,
        cache: qcow2_io::CacheMode,
    ) -> Result<Target, CliError> {
        let (target, len) = match format {
            Format::Qcow2 => {
                let img = qcowdev::open_image_full(
                    dst,
                    false,
                    true,
                    cache,
                    qcow2_image::Locking::Auto,
                    &[],
                )
                .map_err(|e| image::open_error(dst, e))?;
                let len = img.virtual_size();
                (Target::Qcow2(Box::new(img)), len)
            }
            Format::Raw => {
                let f = FileStorage::open_cached(dst, true, cache).map_err(|e| {
                    image::open_error(
                        dst,
                        format_args!("Could not open '{dst}': {}", image::strerror(&e)),
                    )
                })?;
                image::lock(&f, dst, image::FileRole::Raw { resize: false }, true)
                    .map_err(|e| image::open_error(dst, e))?;
                let len = f
                    .len()
                    .map_err(|e| image::open_error(dst, image::strerror(&e)))?;
                (Target::Raw(f), len)
            }
        };
        if len < size {
            return Err(CliError::new("output file is smaller than input file"));
        }
        Ok(target)
    }

    fn finish(self) -> Result<(), CliError> {
        match self {
            Target::Raw(f) => f
                .file()
                .sync_all()
                .map_err(|e| CliError::new(format!("Error while closing the image: {e}"))),
            Target::Qcow2(img) => img.close().map_err(|e| {
                CliError::new(format!(
                    "Error while closing the image: {}",
                    qcowdev::error_text(&e)
                ))
            }),
        }
    }
}

/// The qcow2 create options of the target from `-o` (what qemu-img's driver would refuse
/// is refused with "DST: error while converting qcow2: ...").
fn qcow2_options(
    dst: &str,
    opts: &[TargetOption],
    size: u64,
) -> Result<qcow2_image::CreateOptions, CliError> {
    let driver = |m: String| CliError::new(format!("{dst}: error while converting qcow2: {m}"));
    let mut c = qcow2_image::CreateOptions::new(size);
    for o in opts {
        match o.name.as_str() {
            // qemu-img takes the size from the sources.
            "size" => {}
            "cluster_size" => c.cluster_size = o.num,
            "refcount_bits" => c.refcount_bits = u32::try_from(o.num).unwrap_or(3),
            "lazy_refcounts" => c.lazy_refcounts = o.flag,
            "extended_l2" => c.extended_l2 = o.flag,
            "compat" => {
                c.compat = match o.text.as_str() {
                    "0.10" | "v2" => qcow2_image::Compat::V0_10,
                    "1.1" | "v3" => qcow2_image::Compat::V1_1,
                    other => {
                        return Err(driver(format!(
                            "Parameter 'version' does not accept value '{other}'"
                        )))
                    }
                }
            }
            "compression_type" => {
                c.compression_type = match o.text.as_str() {
                    "zlib" => CompressionType::Deflate,
                    "zstd" => CompressionType::Zstd,
                    other => {
                        return Err(driver(format!(
                            "Parameter 'compression-type' does not accept value '{other}'"
                        )))
                    }
                }
            }
            "preallocation" => {
                c.preallocation = match o.text.as_str() {
                    "off" => Preallocation::Off,
                    "metadata" => Preallocation::Metadata,
                    "falloc" => Preallocation::Falloc,
                    "full" => Preallocation::Full,
                    other => {
                        return Err(driver(format!(
                            "Parameter 'preallocation' does not accept value '{other}'"
                        )))
                    }
                }
            }
            // Built below (encryption::from_options).
            "encryption" => {}
            n if n.starts_with("encrypt.") => {}
            "data_file" => c.data_file = Some(o.text.clone()),
            "data_file_raw" => c.data_file_raw = o.flag,
            other => {
                return Err(driver(format!(
                    "option '{other}' is not supported by this tool's convert"
                )))
            }
        }
    }
    Ok(c)
}

/// Creates the target file (overwriting an existing one).
fn create_target(
    dst: &str,
    format: Format,
    opts: &[TargetOption],
    size: u64,
    backing: Option<(&str, &str)>,
) -> Result<Target, CliError> {
    let driver = |m: String| {
        CliError::new(format!(
            "{dst}: error while converting {}: {m}",
            format.name()
        ))
    };
    match format {
        Format::Raw => {
            if let Some(o) = opts.iter().find(|o| o.name == "preallocation") {
                if o.text != "off" {
                    return Err(driver(format!(
                        "preallocation={} is not available for raw targets in this tool",
                        o.text
                    )));
                }
            }
            let f = image::create_file_detail(dst, image::FileRole::NewFile).map_err(driver)?;
            f.set_len(size)
                .map_err(|e| driver(format!("Could not resize file: {}", image::strerror(&e))))?;
            if size > 0 {
                // QEMU's file driver allocates the first block of a file it grows from
                // empty (`allocate_first_block`, for its alignment probing), so qemu-img's
                // raw targets always hold that block as data; the same here keeps the
                // target's allocation equal. Failures are ignored, as QEMU does.
                let first = if size < 4096 { 512 } else { 4096 };
                let _ = f.write_at(&[0u8; 4096][..first], 0);
            }
            Ok(Target::Raw(f))
        }
        Format::Qcow2 => {
            let mut c = qcow2_options(dst, opts, size)?;
            if let Some((name, fmt)) = backing {
                c.layout.backing_file = Some(name.to_string());
                c.layout.backing_format = Some(fmt.to_string());
            }
            let mut open = qcow2_image::OpenOptions {
                backing: qcow2_image::BackingPolicy::Ignore,
                ..qcow2_image::OpenOptions::default()
            };
            // An encrypted target (-o encrypt.format=luks,encrypt.key-secret=ID).
            let text = |n: &str| {
                opts.iter()
                    .rev()
                    .find(|o| o.name == n)
                    .map(|o| o.text.clone())
            };
            if let Some(e) = crate::encryption::from_options(&text).map_err(driver)? {
                c.luks_area = Some(e.area);
                open.key_secret = Some(e.secret);
            }
            let storage = image::create_file_detail(dst, image::FileRole::Qcow2).map_err(driver)?;
            if let Some(name) = &c.data_file {
                // Created by its name as given (relative to the working directory), as
                // qemu-img does.
                let data =
                    image::create_file_detail(name, image::FileRole::NewFile).map_err(driver)?;
                open.data_file = Some(qcow2_image::DataFileStorage(Arc::new(data)));
            }
            let img = Image::create_with(Arc::new(storage), &c, &open).map_err(|e| {
                // qemu-img validates the options before it creates the file.
                let _ = std::fs::remove_file(dst);
                driver(qcowdev::error_text(&e))
            })?;
            Ok(Target::Qcow2(Box::new(img)))
        }
    }
}

/// Runs `convert`.
pub fn run(req: ConvertRequest) -> Result<(), CliError> {
    let Some((dst, srcs)) = req.files.split_last() else {
        return Err(CliError::new("Must specify image file name"));
    };
    if srcs.is_empty() {
        return Err(CliError::new("Must specify image file name"));
    }
    let settings = req.extra.settings(req.compress, srcs.len())?;
    let target_format =
        Format::parse(req.target_format.as_deref().unwrap_or("raw")).map_err(CliError::new)?;
    if req.compress && target_format != Format::Qcow2 {
        return Err(CliError::new(
            "Compression not supported for this file format",
        ));
    }
    let opts = target_options(target_format, &req.options)?;
    let mut sources = Vec::new();
    let mut start = 0u64;
    for path in srcs {
        let mut s = Source::open(path, req.source_format, settings.snapshot.as_deref())?;
        s.start = start;
        start = start
            .checked_add(s.size)
            .ok_or_else(|| CliError::new("The sources are too large together"))?;
        sources.push(s);
    }
    if req.bitmaps {
        if sources.len() > 1 {
            return Err(CliError::new(
                "Copying bitmaps only possible with single source",
            ));
        }
        let src = match sources.first().map(|s| &s.reader) {
            Some(Reader::Qcow2(img)) => Some(&**img),
            _ => None,
        };
        crate::bitmap::check_source(src, req.skip_broken_bitmaps)?;
        if target_format != Format::Qcow2 {
            return Err(CliError::new(format!(
                "Format driver '{}' does not support bitmaps",
                target_format.name()
            )));
        }
    }
    let mut sources = Sources(sources);
    let total = sources.total();
    let backing = match settings.backing.as_deref() {
        None => None,
        Some(_) if target_format == Format::Raw => {
            return Err(CliError::new(
                "Backing file not supported for file format 'raw'",
            ))
        }
        Some(b) => match settings.backing_format.as_deref() {
            Some(f) => Some((b, f)),
            None => {
                return Err(CliError::new(
                    "Use of backing file requires explicit backing format",
                ))
            }
        },
    };
    let mut target = if settings.skip_create {
        let cache = settings.cache()?;
        Target::open_existing(dst, target_format, total, cache)?
    } else {
        let t = create_target(dst, target_format, &opts, total, backing)?;
        // qemu-img checks the target's cache mode after creating it.
        if let Err(e) = settings.cache() {
            let _ = t.finish();
            return Err(e);
        }
        t
    };
    // The alignment of zero detection (qemu-img's: the largest power of two within -S, at
    // least the target's cluster size).
    let sparse_align = if settings.min_sparse == 0 {
        512
    } else {
        1u64 << (63 - settings.min_sparse.leading_zeros())
    };
    let granule = match &target {
        Target::Raw(_) => sparse_align.max(512),
        Target::Qcow2(img) => img.cluster_size().max(sparse_align),
    };
    let mut data_total = 0u64;
    for s in &mut sources.0 {
        data_total += s.data_bytes().map_err(|e| read_error(s.start, &e))?;
    }
    let mut progress = Progress::new(req.progress && !req.quiet, 1.0);
    progress.set(0.0);
    let plan = CopyPlan {
        top_only: backing.is_some(),
        // A target on a backing file must get its zeros written (QEMU: no zero init).
        zero_init: settings.target_is_zero && backing.is_none(),
        min_sparse: settings.min_sparse,
        detect_zeroes: !settings.copy_offload,
        salvage: settings.salvage,
        rate: settings.rate,
        started: std::time::Instant::now(),
    };
    let copied = if req.compress {
        match &mut target {
            Target::Qcow2(img) => {
                copy_compressed(&mut sources, img, &plan, &mut progress, data_total)
            }
            Target::Raw(_) => Ok(()),
        }
    } else {
        copy_plain(
            &mut sources,
            &mut target,
            granule,
            &plan,
            &mut progress,
            data_total,
        )
    };
    let copied = copied.and_then(|()| match (&mut target, sources.0.first()) {
        (
            Target::Qcow2(dst),
            Some(Source {
                reader: Reader::Qcow2(src),
                ..
            }),
        ) if req.bitmaps => crate::bitmap::copy_bitmaps(src, dst, req.skip_broken_bitmaps),
        _ => Ok(()),
    });
    if let Err(e) = copied {
        progress.end();
        let _ = target.finish();
        return Err(e);
    }
    progress.set(100.0);
    progress.end();
    target.finish()
}

/// How the copy treats what it finds.
struct CopyPlan {
    /// `-B`: only what the source's own image holds is written.
    top_only: bool,
    /// The target reads as zeros already: zeros need not be written.
    zero_init: bool,
    /// `-S` (0: every byte is written as data).
    min_sparse: u64,
    /// Zeros inside data runs are detected (not with `-C`, which copies data as read).
    detect_zeroes: bool,
    /// `--salvage`.
    salvage: bool,
    /// `-r`: bytes per second.
    rate: Option<u64>,
    /// When the copy started (for the rate limit).
    started: std::time::Instant,
}

impl CopyPlan {
    /// Sleeps as long as needed for `written` bytes to stay within the rate limit.
    fn throttle(&self, written: u64) {
        let Some(rate) = self.rate.filter(|&r| r > 0) else {
            return;
        };
        let due = std::time::Duration::from_secs_f64(written as f64 / rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// The chunk at `off`: at most [`CHUNK`] bytes, ending on a granule boundary.
fn chunk_len(off: u64, total: u64, granule: u64) -> u64 {
    let chunk = CHUNK.max(granule);
    let end = (off - off % chunk + chunk).min(total);
    end - off
}

fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

/// QEMU's `is_allocated_sectors`: whether the first 512-byte sector of `buf` holds data,
/// and how many sectors share that answer, the end moved to an `alignment` (sectors)
/// boundary where qemu-img moves it (`sector` is the first sector's number).
fn allocated_sectors(buf: &[u8], sector: u64, alignment: u64) -> (bool, usize) {
    let n = buf.len().div_ceil(512);
    if n == 0 {
        return (false, 0);
    }
    let zero_at = |i: usize| is_zero(&buf[i * 512..((i + 1) * 512).min(buf.len())]);
    let mut zero = zero_at(0);
    let mut i = 1;
    while i < n && zero_at(i) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, i);
    }
    let alignment = alignment.max(1);
    let tail = ((sector + i as u64) % alignment) as usize;
    if tail != 0 {
        if zero && i <= tail {
            // The next sector is data and rewrites this tail anyway.
            zero = false;
        }
        if !zero {
            i = (i + alignment as usize - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!zero, i)
}

/// QEMU's `is_allocated_sectors_min`: as [`allocated_sectors`], but after data, zero runs
/// shorter than `min` sectors count as data (small holes do not split a write).
fn allocated_sectors_min(buf: &[u8], min: usize, sector: u64, alignment: u64) -> (bool, usize) {
    let n = buf.len().div_ceil(512);
    let min = min.min(n);
    let (data, first) = allocated_sectors(buf, sector, alignment);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    while checked < n {
        let (d, cnt) = allocated_sectors(&buf[checked * 512..], sector + checked as u64, alignment);
        checked += cnt;
        if d {
            used = checked;
        } else if cnt >= min {
            break;
        }
    }
    (true, used)
}

/// Copies without compression. Data runs are read and scanned per granule: non-zero
/// granules are written, zero ones are zero runs. Zero runs are skipped on a target that
/// reads as zeros and written as zeros otherwise; runs left to the target's backing file
/// are skipped. With `-S 0` everything but those is written as data.
fn copy_plain(
    sources: &mut Sources,
    target: &mut Target,
    granule: u64,
    plan: &CopyPlan,
    progress: &mut Progress,
    data_total: u64,
) -> Result<(), CliError> {
    let total = sources.total();
    // Page-aligned: the kernel copies from the page cache fastest into those.
    let mut buf = qcow2_io::IoBuf::default();
    let mut done = 0u64;
    let mut written = 0u64;
    let mut off = 0u64;
    while off < total {
        let len = chunk_len(off, total, granule);
        let runs = sources.runs(off, len, plan.top_only)?;
        let mut had_data = false;
        for (at, n, run) in runs {
            match run {
                Run::Backing => {}
                Run::Zero if plan.min_sparse > 0 => {
                    if !plan.zero_init {
                        target.write_zeroes(at, n)?;
                    }
                }
                Run::Zero | Run::Data => {
                    had_data = true;
                    buf.resize(n as usize);
                    sources.read_salvaging(at, &mut buf, plan.salvage)?;
                    if plan.min_sparse == 0 || !plan.detect_zeroes {
                        target.write(at, &buf)?;
                        written += n;
                        plan.throttle(written);
                        continue;
                    }
                    // QEMU's zero detection: runs of zero sectors of at least -S bytes
                    // (aligned as qemu-img aligns them) are zero runs, the rest is data.
                    let sectors = buf.len().div_ceil(512);
                    let first = at / 512;
                    let mut pos = 0usize;
                    while pos < sectors {
                        let (data, cnt) = allocated_sectors_min(
                            &buf[pos * 512..],
                            (plan.min_sparse / 512) as usize,
                            first + pos as u64,
                            granule / 512,
                        );
                        let (a, b) = (pos * 512, ((pos + cnt) * 512).min(buf.len()));
                        let o = at + a as u64;
                        if data {
                            target.write(o, &buf[a..b])?;
                            written += (b - a) as u64;
                            plan.throttle(written);
                        } else if !plan.zero_init {
                            target.write_zeroes(o, (b - a) as u64)?;
                        }
                        pos += cnt;
                    }
                }
            }
        }
        if had_data {
            done += len;
            progress.set_ratio(done.min(data_total), data_total);
        }
        off += len;
    }
    Ok(())
}
