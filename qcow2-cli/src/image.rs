//! Opening image files for the commands that only need the format crate: format probing,
//! header validation with QEMU's messages, the snapshot table, file sizes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use qcow2_format::bitmap::{load_bitmaps, BitmapDirEntry};
use qcow2_format::extensions::FirstCluster;
use qcow2_format::features::AUTOCLEAR_BITMAPS;
use qcow2_format::header::{open_first_cluster, OpenOptions, CRYPT_AES, CRYPT_LUKS, QCOW_MAGIC};
use qcow2_format::limits::MAX_CLUSTER_BITS;
use qcow2_format::snapshot::SnapshotEntry;
use qcow2_io::{FileStorage, Storage};

use crate::CliError;

pub use qcow2_image::locking::FileRole;

/// `-U/--force-share` of the running command. qemu-img passes its `force_share` to every
/// open a command makes (the image, its backing files, convert's sources); one command
/// runs per process here, so it is set once before the command opens anything.
static FORCE_SHARE: AtomicBool = AtomicBool::new(false);

/// Sets `-U/--force-share` for every open the command makes from now on.
pub fn set_force_share(on: bool) {
    FORCE_SHARE.store(on, Ordering::Relaxed);
}

/// Whether the command runs with `-U/--force-share`.
pub fn force_share() -> bool {
    FORCE_SHARE.load(Ordering::Relaxed)
}

/// The text of an image-library error as qemu-img prints it after its prefix: the
/// message, and for a lock conflict the hint line ("Is another process using the image
/// [PATH]?").
pub fn image_error_text(e: &qcow2_image::ImageError) -> String {
    let msg = match e {
        qcow2_image::ImageError::Header(h) => h.to_string(),
        other => other.to_string(),
    };
    match (e.is_locked(), e.hint()) {
        (true, Some(hint)) => format!("{msg}\n{hint}"),
        _ => msg,
    }
}

/// Takes QEMU's image locks on `storage` (the file `path`, in `role`, writable or not)
/// with the command's force-share; the error is qemu-img's text after "Could not open
/// 'FILE': " (the lock message and its hint line, or the force-share refusal).
pub fn lock(
    storage: &FileStorage,
    path: &str,
    role: FileRole,
    writable: bool,
) -> Result<(), String> {
    qcow2_image::locking::lock_file(
        storage,
        Path::new(path),
        role,
        writable,
        qcow2_image::Locking::Auto,
        force_share(),
    )
    .map_err(|e| image_error_text(&e))
}

/// The image formats the tool knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2 (versions 2 and 3).
    Qcow2,
    /// A raw image: the file's bytes are the disk.
    Raw,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// Parses a `-f`/`-F`/`-O` value; unknown names give qemu-img's message.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(format!("Unknown file format '{other}'")),
        }
    }
}

/// An opened image file with what `info` and `snapshot -l` need.
pub struct Opened {
    /// The path as given.
    pub path: String,
    /// The detected or requested format.
    pub format: Format,
    /// Length of the file in bytes.
    pub file_len: u64,
    /// Bytes the file occupies on disk (`st_blocks * 512`).
    pub allocated: u64,
    /// For qcow2: the parsed first cluster.
    pub qcow2: Option<Qcow2Meta>,
}

/// The qcow2 metadata read at open.
pub struct Qcow2Meta {
    /// Header, extensions and backing file name.
    pub first: FirstCluster,
    /// The snapshot table.
    pub snapshots: Vec<SnapshotEntry>,
    /// The persistent bitmaps (empty unless the bitmaps extension is valid).
    pub bitmaps: Vec<BitmapDirEntry>,
    /// The encryption method, if the image is encrypted.
    pub encryption: Option<Encryption>,
}

/// How an image's guest data is encrypted (what `qemu-img info` shows without a secret).
pub enum Encryption {
    /// Legacy AES-CBC (`crypt_method` 1).
    Aes,
    /// LUKS1 inside the image (`crypt_method` 2), described from its header.
    Luks(qcow2_crypto::LuksInfo),
}

/// QEMU's "Could not open 'FILE': ..." error.
pub fn open_error(path: &str, detail: impl std::fmt::Display) -> CliError {
    CliError::new(format!("Could not open '{path}': {detail}"))
}

/// The text of an I/O error as QEMU prints it (`strerror`, without Rust's "(os error N)").
pub fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Whether the first bytes look like qcow2 (QEMU's probe: magic and version >= 2).
fn probe_qcow2(buf: &[u8]) -> bool {
    if buf.len() < 8 {
        return false;
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let version = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    magic == QCOW_MAGIC && version >= 2
}

/// QEMU's warning when a writable open probed a raw image (printed without the program
/// prefix, as QEMU prints it).
pub fn warn_probed_raw(path: &str) {
    eprintln!(
        "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on \
         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the \
         restrictions."
    );
}

/// QEMU's format probe alone: reads the first 8 bytes of `path` (qcow2 if they hold the
/// magic and a version >= 2, raw otherwise). Commands that reopen the image through their
/// own engine use this instead of [`open`], which also reads the first cluster (up to
/// 2 MiB) and the snapshot table.
pub fn probe(path: &str) -> Result<Format, CliError> {
    probe_detail(path).map_err(|e| open_error(path, e))
}

/// [`probe`] with the bare reason for a failure ("Could not open 'FILE': strerror"). The
/// probe takes no lock (QEMU probes before its permissions are applied): commands that
/// open the image afterwards report the lock conflict of *that* open, as qemu-img does.
pub fn probe_detail(path: &str) -> Result<Format, String> {
    let fail = |e: std::io::Error| format!("Could not open '{path}': {}", strerror(&e));
    let storage = FileStorage::open(file_name(path), false).map_err(fail)?;
    let mut head = [0u8; 8];
    storage.read_at(&mut head, 0).map_err(fail)?;
    Ok(if probe_qcow2(&head) {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Opens `path` read-only (or read-write), probing the format unless `format` is given,
/// and validates a qcow2 header the way QEMU's open does.
pub fn open(path: &str, format: Option<Format>, writable: bool) -> Result<Opened, CliError> {
    open_detail(path, format, writable).map_err(|e| open_error(path, e))
}

/// [`open`] with the bare reason for a failure: "Could not open 'FILE': strerror" for I/O
/// errors, the driver's message ("Image is not in qcow2 format") otherwise.
pub fn open_detail(path: &str, format: Option<Format>, writable: bool) -> Result<Opened, String> {
    let io_err = |e: std::io::Error| format!("Could not open '{path}': {}", strerror(&e));
    // A blkdebug node's header reads go to its file: no rule is armed before the engine
    // reports an event.
    let storage = FileStorage::open(file_name(path), writable).map_err(io_err)?;
    let meta = storage.file().metadata().map_err(io_err)?;
    let file_len = storage.len().map_err(io_err)?;
    let allocated = meta.blocks() * 512;
    let mut head = vec![0u8; 8];
    storage.read_at(&mut head, 0).map_err(io_err)?;
    let format = match format {
        Some(f) => f,
        None if probe_qcow2(&head) => Format::Qcow2,
        None => Format::Raw,
    };
    // QEMU's open takes its locks before the format driver reads its metadata.
    let role = match format {
        Format::Qcow2 => FileRole::Qcow2,
        Format::Raw => FileRole::Raw { resize: false },
    };
    lock(&storage, path, role, writable)?;
    let qcow2 = match format {
        Format::Raw => None,
        Format::Qcow2 => Some(read_qcow2(&storage, writable)?),
    };
    Ok(Opened {
        // QEMU names the image by its file node's filename: a `file:` prefix is gone.
        path: display_name(path),
        format,
        file_len,
        allocated,
        qcow2,
    })
}

fn read_qcow2(storage: &FileStorage, writable: bool) -> Result<Qcow2Meta, String> {
    // The largest cluster is 2 MiB; read that much (zeros past the end of the file).
    let mut first = vec![0u8; 1 << MAX_CLUSTER_BITS];
    storage.read_at(&mut first, 0).map_err(|e| strerror(&e))?;
    let opts = OpenOptions {
        read_write: writable,
        check_mode: false,
    };
    let first = open_first_cluster(&first, &opts).map_err(|e| e.to_string())?;
    if first.extensions.stale_bitmaps {
        stale_bitmaps_warning(first.header.version);
    }
    let snapshots = read_snapshots(storage, &first)?;
    let bitmaps = read_bitmaps(storage, &first)?;
    let encryption = read_encryption(storage, &first)?;
    Ok(Qcow2Meta {
        first,
        snapshots,
        bitmaps,
        encryption,
    })
}

/// QEMU's warning at every open of an image whose bitmaps extension lost its autoclear
/// bit; its second line has no newline, as QEMU's `error_printf`.
fn stale_bitmaps_warning(version: u32) {
    print_warning(&qcow2_image::stale_extension_warning(version));
}

/// Prints an open-time warning of QEMU's ("warning: ...", with the program prefix) once
/// per process: QEMU opens the image once per command, where a command of ours may probe
/// the header before the engine opens it.
pub fn print_warning(text: &str) {
    static PRINTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let Ok(mut printed) = PRINTED.lock() else {
        return;
    };
    if !printed.iter().any(|p| p == text) {
        printed.push(text.to_string());
        eprint!("qcow2: {text}");
    }
}

/// Prints QEMU's open-time warnings for the qcow2 header in `storage` (used where the
/// checker, not the engine, opens the image); unreadable headers are left to the caller.
pub fn warn_on_open(storage: &FileStorage) {
    let mut first = vec![0u8; 1 << MAX_CLUSTER_BITS];
    if storage.read_at(&mut first, 0).is_err() {
        return;
    }
    let opts = OpenOptions {
        read_write: false,
        check_mode: true,
    };
    if let Ok(fc) = open_first_cluster(&first, &opts) {
        if fc.extensions.stale_bitmaps {
            stale_bitmaps_warning(fc.header.version);
        }
    }
}

/// The encryption method; for LUKS the header named by the full-disk-encryption header
/// extension (QEMU's open validated the extension already), parsed as QEMU's LUKS driver
/// does, with its messages on failure.
fn read_encryption(
    storage: &FileStorage,
    first: &FirstCluster,
) -> Result<Option<Encryption>, String> {
    match first.header.crypt_method {
        CRYPT_AES => Ok(Some(Encryption::Aes)),
        CRYPT_LUKS => {
            let Some(ext) = first.extensions.crypto_header else {
                return Err("Missing disk encryption header extension".into());
            };
            let mut buf = vec![0u8; qcow2_crypto::luks::LUKS_HEADER_SIZE];
            if ext.length < buf.len() as u64 {
                return Err(qcow2_crypto::LuksError::Truncated.to_string());
            }
            storage
                .read_at(&mut buf, ext.offset)
                .map_err(|e| strerror(&e))?;
            // QEMU's open checks the header even when it opens without the secret.
            let info = qcow2_crypto::LuksHeader::parse(&buf)
                .and_then(|h| h.check().and_then(|()| h.info()))
                .map_err(|e| e.to_string())?;
            Ok(Some(Encryption::Luks(info)))
        }
        _ => Ok(None),
    }
}

/// Loads the bitmaps of a valid bitmaps extension as QEMU's open does (directory and the
/// tables of consistent bitmaps): bitmaps QEMU refuses make the open fail with its message.
fn read_bitmaps(
    storage: &FileStorage,
    first: &FirstCluster,
) -> Result<Vec<BitmapDirEntry>, String> {
    let h = &first.header;
    let Some(ext) = first.extensions.bitmaps else {
        return Ok(Vec::new());
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    let mut read = |offset: u64, buf: &mut [u8]| storage.read_at(buf, offset);
    load_bitmaps(
        ext.nb_bitmaps,
        ext.directory_offset,
        ext.directory_size,
        h.cluster_size(),
        h.size & !511,
        &mut read,
    )
    .map_err(|e| e.to_string())
}

/// Reads and parses the snapshot table with QEMU's limits (through the snapshot crate,
/// which reads only as much as the entries need).
fn read_snapshots(
    storage: &FileStorage,
    first: &FirstCluster,
) -> Result<Vec<SnapshotEntry>, String> {
    let h = &first.header;
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let geometry = h.geometry().map_err(|e| e.to_string())?;
    qcow2_snapshot::Snapshots::load(
        storage,
        &geometry,
        h.nb_snapshots,
        h.snapshots_offset,
        h.size,
    )
    .map(|t| t.entries().to_vec())
    .map_err(|e| {
        // The engine's open words these failures as QEMU's, with QEMU's hint line.
        let e = qcow2_image::snapshot_open_error(e);
        match e.hint() {
            Some(h) => format!("{e}\n{h}"),
            None => e.to_string(),
        }
    })
}

/// The file a filename opens, as QEMU's protocol parsing finds it: the FILE of a
/// `blkdebug:CONFIG:FILE` name, and a `file:` prefix stripped (QEMU's
/// `bdrv_parse_filename_strip_prefix`: a rest whose first colon comes before any slash
/// would look like another protocol prefix, so it gets `./` in front).
pub fn file_name(name: &str) -> String {
    let name = crate::blkdebug::file_of(name);
    match name.strip_prefix("file:") {
        Some(rest) if has_protocol(rest) => format!("./{rest}"),
        Some(rest) => rest.to_string(),
        None => name.to_string(),
    }
}

/// The name QEMU gives an image opened by `name` (its file node's filename): a `file:`
/// prefix stripped as [`file_name`] strips it; other names as given.
pub fn display_name(name: &str) -> String {
    if name.starts_with("file:") {
        file_name(name)
    } else {
        name.to_string()
    }
}

/// QEMU's `path_has_protocol`: a colon before the first slash.
fn has_protocol(path: &str) -> bool {
    path.find([':', '/'])
        .is_some_and(|i| path.as_bytes()[i] == b':')
}

/// QEMU's `path_combine`: `name` relative to the directory of `base`.
pub fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_string(),
    }
}

/// Opens a backing file to learn its virtual size and format; errors are the bare reason.
pub fn backing_size(path: &str, fmt: Option<Format>) -> Result<(u64, Format), String> {
    let o = open_detail(path, fmt, false)?;
    let size = match &o.qcow2 {
        Some(q) => q.first.header.size,
        None => o.file_len.next_multiple_of(512),
    };
    Ok((size, o.format))
}

/// Opens a file for writing from scratch, as qemu-img create does: created if missing,
/// QEMU's image locks taken in `role` (`FileRole::NewFile` for a raw file, `Qcow2` for a
/// file formatted as qcow2 right away), and only then truncated, so that an image another
/// process holds is refused ("FILE: Failed to get \"write\" lock" and the hint line)
/// and left as it was.
pub fn create_file(path: &str, role: FileRole) -> Result<FileStorage, CliError> {
    create_file_for(path, role, path)
}

/// [`create_file`] of a file that belongs to the image `image` (its data file): errors
/// start with the image's name, as qemu-img prints them.
pub fn create_file_for(path: &str, role: FileRole, image: &str) -> Result<FileStorage, CliError> {
    create_file_detail(path, role).map_err(|e| CliError::new(format!("{image}: {e}")))
}

/// [`create_file`] with the bare reason for a failure ("Could not create 'FILE':
/// strerror", or the lock conflict and its hint line).
pub fn create_file_detail(path: &str, role: FileRole) -> Result<FileStorage, String> {
    let io_err = |e: std::io::Error| format!("Could not create '{path}': {}", strerror(&e));
    let storage = FileStorage::open_for_create(file_name(path)).map_err(io_err)?;
    // Creating never force-shares (qemu-img create has no -U).
    qcow2_image::locking::lock_file(
        &storage,
        Path::new(path),
        role,
        true,
        qcow2_image::Locking::Auto,
        false,
    )
    .map_err(|e| image_error_text(&e))?;
    storage.set_len(0).map_err(io_err)?;
    Ok(storage)
}
