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

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use qcow2_image::{compress_cluster, CompressionType, Image, Preallocation};
use qcow2_io::{FileStorage, Storage};

use crate::create::{target_options, TargetOption};
use crate::image::{self, Format};
use crate::progress::Progress;
use crate::qcowdev;
use crate::CliError;

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
    fn open(path: &str, format: Option<Format>) -> Result<Self, CliError> {
        let opened = image::open(path, format, false)?;
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
                let img =
                    qcowdev::open_image(path, true).map_err(|e| image::open_error(path, e))?;
                let size = img.virtual_size();
                Ok(Source {
                    reader: Reader::Qcow2(Box::new(img)),
                    start: 0,
                    size,
                })
            }
        }
    }

    /// Whether local `[off, off + len)` is known to read as zeros without reading it.
    fn known_zero(&mut self, off: u64, len: u64) -> Result<bool, String> {
        match &mut self.reader {
            // QEMU's raw format asks the file system where the holes are.
            Reader::Raw(s) => Ok(raw_hole(s, off, len)),
            // The precise mapping: zero clusters, unallocated ranges, and data clusters
            // whose host range is a hole (preallocated metadata) are all skipped.
            Reader::Qcow2(img) => {
                let ext = img.map(off, len).map_err(|e| qcowdev::error_text(&e))?;
                Ok(ext.iter().all(|e| e.reads_as_zero()))
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

/// Whether `[off, off + len)` of a raw file is all holes (or beyond its end). A failed
/// query answers "no": the range is then read and scanned.
fn raw_hole(s: &FileStorage, off: u64, len: u64) -> bool {
    let mut pos = 0;
    while pos < len {
        match s.data_status(off + pos, len - pos) {
            Ok((false, n)) if n > 0 => pos += n,
            _ => return false,
        }
    }
    true
}

/// All sources, concatenated.
struct Sources(Vec<Source>);

impl Sources {
    fn total(&self) -> u64 {
        self.0.last().map(|s| s.start + s.size).unwrap_or(0)
    }

    /// Whether target `[off, off + len)` is known to be zero in every source it touches.
    fn known_zero(&mut self, off: u64, len: u64) -> Result<bool, CliError> {
        let end = off + len;
        for s in &mut self.0 {
            let (a, b) = (off.max(s.start), end.min(s.start + s.size));
            if a < b
                && !s
                    .known_zero(a - s.start, b - a)
                    .map_err(|e| read_error(a, &e))?
            {
                return Ok(false);
            }
        }
        Ok(true)
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
        let mut s = Source::open(path, req.source_format)?;
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
    let mut target = create_target(dst, target_format, &opts, total)?;
    let granule = match &target {
        Target::Raw(_) => 4096,
        Target::Qcow2(img) => img.cluster_size(),
    };
    let mut data_total = 0u64;
    for s in &mut sources.0 {
        data_total += s.data_bytes().map_err(|e| read_error(s.start, &e))?;
    }
    let mut progress = Progress::new(req.progress && !req.quiet, 1.0);
    progress.set(0.0);
    let copied = if req.compress {
        match &mut target {
            Target::Qcow2(img) => copy_compressed(&mut sources, img, &mut progress, data_total),
            Target::Raw(_) => Ok(()),
        }
    } else {
        copy_plain(
            &mut sources,
            &mut target,
            granule,
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

/// The chunk at `off`: at most [`CHUNK`] bytes, ending on a granule boundary.
fn chunk_len(off: u64, total: u64, granule: u64) -> u64 {
    let chunk = CHUNK.max(granule);
    let end = (off - off % chunk + chunk).min(total);
    end - off
}

fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

/// Copies without compression: runs of non-zero granules are written, zero ones skipped.
fn copy_plain(
    sources: &mut Sources,
    target: &mut Target,
    granule: u64,
    progress: &mut Progress,
    data_total: u64,
) -> Result<(), CliError> {
    let total = sources.total();
    let mut buf = Vec::new();
    let mut done = 0u64;
    let mut off = 0u64;
    while off < total {
        let len = chunk_len(off, total, granule);
        if !sources.known_zero(off, len)? {
            buf.resize(len as usize, 0);
            sources.read(off, &mut buf)?;
            let mut run: Option<usize> = None;
            let mut pos = 0usize;
            while pos < buf.len() {
                let g = (granule - (off + pos as u64) % granule) as usize;
                let end = (pos + g).min(buf.len());
                let zero = is_zero(&buf[pos..end]);
                match (zero, run) {
                    (false, None) => run = Some(pos),
                    (true, Some(r)) => {
                        target.write(off + r as u64, &buf[r..pos])?;
                        run = None;
                    }
                    _ => {}
                }
                pos = end;
            }
            if let Some(r) = run {
                target.write(off + r as u64, &buf[r..])?;
            }
            done += len;
            progress.set_ratio(done.min(data_total), data_total);
        }
        off += len;
    }
    Ok(())
}

/// A compressed cluster coming back from a worker: sequence number, guest offset, the
/// cluster's data and its compressed form (`None`: write it uncompressed).
type Compressed = (u64, u64, Vec<u8>, Option<Vec<u8>>);

/// Copies with compression on worker threads, writing in guest order.
fn copy_compressed(
    sources: &mut Sources,
    img: &mut Image,
    progress: &mut Progress,
    data_total: u64,
) -> Result<(), CliError> {
    let total = sources.total();
    let cs = img.cluster_size();
    let ctype = img.compression_type();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(1);
    let window = (4 * workers) as u64;
    std::thread::scope(|scope| {
        let (job_tx, job_rx) = mpsc::sync_channel::<(u64, u64, Vec<u8>)>(2 * workers);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (res_tx, res_rx) = mpsc::channel::<Compressed>();
        for _ in 0..workers {
            let rx = Arc::clone(&job_rx);
            let tx = res_tx.clone();
            scope.spawn(move || loop {
                let job = match rx.lock() {
                    Ok(guard) => guard.recv(),
                    Err(_) => return,
                };
                let Ok((seq, off, data)) = job else { return };
                let packed = compress_cluster(ctype, cs, &data);
                if tx.send((seq, off, data, packed)).is_err() {
                    return;
                }
            });
        }
        drop(res_tx);

        let mut pending: BTreeMap<u64, Compressed> = BTreeMap::new();
        let mut next_write = 0u64;
        let mut next_seq = 0u64;
        let mut done = 0u64;
        // Receives one result and writes every result that is next in order.
        let mut drain_one = |pending: &mut BTreeMap<u64, Compressed>,
                             next_write: &mut u64,
                             img: &mut Image|
         -> Result<(), CliError> {
            let r = res_rx
                .recv()
                .map_err(|_| CliError::new("compression worker failed"))?;
            pending.insert(r.0, r);
            while let Some((_, off, data, packed)) = pending.remove(next_write) {
                let res = match packed {
                    Some(c) => img.write_compressed_prepared(off, &c),
                    None => img.write(off, &data),
                };
                res.map_err(|e| write_error(off, &crate::io::strerror(e.errno())))?;
                *next_write += 1;
                done += data.len() as u64;
                progress.set_ratio(done.min(data_total), data_total);
            }
            Ok(())
        };

        let mut result = Ok(());
        let mut off = 0u64;
        let mut buf = Vec::new();
        'outer: while off < total {
            let len = chunk_len(off, total, cs);
            let known_zero = match sources.known_zero(off, len) {
                Ok(z) => z,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if !known_zero {
                buf.resize(len as usize, 0);
                if let Err(e) = sources.read(off, &mut buf) {
                    result = Err(e);
                    break;
                }
                for (i, cluster) in buf.chunks(cs as usize).enumerate() {
                    if is_zero(cluster) {
                        continue;
                    }
                    while next_seq - next_write >= window {
                        if let Err(e) = drain_one(&mut pending, &mut next_write, img) {
                            result = Err(e);
                            break 'outer;
                        }
                    }
                    let at = off + i as u64 * cs;
                    if job_tx.send((next_seq, at, cluster.to_vec())).is_err() {
                        result = Err(CliError::new("compression worker failed"));
                        break 'outer;
                    }
                    next_seq += 1;
                }
            }
            off += len;
        }
        drop(job_tx);
        while result.is_ok() && next_write < next_seq {
            result = drain_one(&mut pending, &mut next_write, img);
        }
        result
    })
}
