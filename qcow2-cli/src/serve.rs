//! `qcow2 serve`: export an image over NBD with qemu-nbd's command line.
//!
//! The image (qcow2 through the shared engine, or raw) is served by the `qcow2-nbd` crate
//! on a Unix socket (`-k`) or TCP (`-b`/`-p`, default 0.0.0.0:10809). SIGTERM, SIGINT and
//! SIGHUP, and (without `--persistent`) the last client leaving, end the server: requests
//! in flight complete, then the image is flushed and closed (dirty bit cleared).
//!
//! As qemu-nbd: `--detect-zeroes` turns all-zero writes into zero writes, `-s` serves a
//! temporary qcow2 overlay (in `$TMPDIR` or `/var/tmp`) over the image, `-l` exports an
//! internal snapshot read-only, and `--fork` returns once the server listens.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use clap::Args;
use qcow2_image::SharedImage;
use qcow2_image::{CreateOptions, Image};
use qcow2_io::CacheMode;
use qcow2_io::FileStorage;
use qcow2_nbd::{
    DetectZeroes, Export, Listener, NbdExport, RawExport, Server, ServerConfig, ServerHandle,
};

use crate::image::Format;
use crate::CliError;

/// qemu-nbd's options.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Image format (qcow2 or raw; probed when absent).
    #[arg(short = 'f', long = "format", value_name = "FORMAT")]
    format: Option<String>,
    /// Listen on this Unix-domain socket instead of TCP.
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    socket: Option<String>,
    /// TCP port to listen on (default 10809).
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    port: Option<String>,
    /// Address to listen on (default 0.0.0.0).
    #[arg(short = 'b', long = "bind", value_name = "IFACE")]
    bind: Option<String>,
    /// Export name (default: the empty name).
    #[arg(short = 'x', long = "export-name", value_name = "NAME")]
    export_name: Option<String>,
    /// Export description.
    #[arg(short = 'D', long = "description", value_name = "TEXT")]
    description: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Offer the qemu:allocation-depth metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Offer persistent bitmap NAME as the qemu:dirty-bitmap:NAME metadata context.
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmap: Option<String>,
    /// Clients served at once (default 1; 0: no limit).
    #[arg(short = 'e', long = "shared", value_name = "NUM")]
    shared: Option<String>,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Cache mode: none, directsync (bypass the page cache), writeback, writethrough,
    /// unsafe.
    #[arg(long = "cache", value_name = "MODE")]
    cache: Option<String>,
    /// AIO mode (accepted for compatibility: worker threads do the I/O).
    #[arg(long = "aio", value_name = "MODE")]
    aio: Option<String>,
    /// Discard requests: ignore (default) or unmap.
    #[arg(long = "discard", value_name = "MODE")]
    discard: Option<String>,
    /// Writes of zeros: off (default), on (become zero writes), unmap (zero writes that
    /// deallocate; needs --discard=unmap).
    #[arg(long = "detect-zeroes", value_name = "MODE")]
    detect_zeroes: Option<String>,
    /// Serve a temporary overlay on FILE: writes go to it, FILE is not changed, and the
    /// overlay is deleted.
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Export an internal snapshot of FILE read-only: `ID_OR_NAME` or
    /// `snapshot.id=ID,snapshot.name=NAME`.
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT")]
    load_snapshot: Option<String>,
    /// Go on in the background once the server listens.
    #[arg(long = "fork")]
    fork: bool,
    /// Define an object: `tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=
    /// on|off]`, `authz-simple,id=ID,identity=DN` or `secret,id=ID,data=...`.
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Require TLS with the x509 credentials of this object.
    #[arg(long = "tls-creds", value_name = "ID")]
    tls_creds: Option<String>,
    /// Admit only TLS clients whose certificate subject this authz-simple object names.
    #[arg(long = "tls-authz", value_name = "ID")]
    tls_authz: Option<String>,
    /// Write the server's process ID to this file (removed at exit).
    #[arg(long = "pid-file", value_name = "PATH")]
    pid_file: Option<String>,
    /// Log connections and refused requests on stderr.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// The image file.
    files: Vec<String>,
}

/// Blocks the termination signals in this thread and the threads it starts later (so that
/// only [`watch_signals`] receives them).
fn block_signals() -> Result<libc::sigset_t, CliError> {
    #[allow(unsafe_code)]
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use; the pointers
    // passed are to that local set, alive for each call. Blocking signals changes only
    // this thread's mask (inherited by threads spawned afterwards).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(CliError::new("cannot block termination signals"));
        }
        set
    };
    Ok(set)
}

/// Starts a thread that waits for the blocked termination signals and stops the server.
fn watch_signals(set: libc::sigset_t, handle: ServerHandle) -> Result<(), CliError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            #[allow(unsafe_code)]
            // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer, both
            // alive for the call.
            let r = unsafe { libc::sigwait(&set, &mut sig) };
            if r == 0 {
                handle.stop();
                return;
            }
        })
        .map_err(|e| CliError::new(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

fn listener(a: &ServeArgs) -> Result<Listener, CliError> {
    if let Some(path) = &a.socket {
        if a.bind.is_some() || a.port.is_some() {
            return Err(CliError::new("-k cannot be used with -b or -p"));
        }
        // Like QEMU, a stale socket file is replaced.
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        return Listener::bind_unix(path).map_err(|e| {
            CliError::new(format!(
                "Failed to bind socket to {path}: {}",
                crate::image::strerror(&e)
            ))
        });
    }
    let port = match a.port.as_deref() {
        None => 10809,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| CliError::new(format!("Invalid port '{p}'")))?,
    };
    let host = a.bind.as_deref().unwrap_or("0.0.0.0");
    let ip: IpAddr = match host.parse() {
        Ok(ip) => ip,
        Err(_) if host == "localhost" => IpAddr::from([127, 0, 0, 1]),
        Err(_) => return Err(CliError::new(format!("Invalid bind address '{host}'"))),
    };
    Listener::bind_tcp(SocketAddr::new(ip, port)).map_err(|e| {
        CliError::new(format!(
            "Failed to bind socket to {host}:{port}: {}",
            crate::image::strerror(&e)
        ))
    })
}

/// qemu-nbd's `--detect-zeroes` (`unmap` only together with discards that unmap).
fn detect_zeroes(mode: Option<&str>, unmap: bool) -> Result<DetectZeroes, CliError> {
    match mode.unwrap_or("off") {
        "off" => Ok(DetectZeroes::Off),
        "on" => Ok(DetectZeroes::On),
        "unmap" if unmap => Ok(DetectZeroes::Unmap),
        "unmap" => Err(CliError::new(
            "setting detect-zeroes to unmap is not allowed without setting discard operation \
             to unmap",
        )),
        m => Err(CliError::new(format!(
            "Failed to parse detect_zeroes mode: invalid parameter value: {m}"
        ))),
    }
}

/// Creates a fresh file for the temporary overlay where QEMU puts its temporary files
/// (`$TMPDIR`, else `/var/tmp`), named as QEMU names them (`vl.XXXXXX`).
fn temp_overlay_file() -> Result<std::path::PathBuf, CliError> {
    let dir = std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| std::path::PathBuf::from("/var/tmp"), Into::into);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for i in 0..64u32 {
        let tag = (u64::from(std::process::id()) << 32
            | u64::from(seed ^ i.wrapping_mul(0x9e37_79b9)))
            % 36u64.pow(6);
        let name: String = (0..6)
            .scan(tag, |t, _| {
                let c = b"0123456789abcdefghijklmnopqrstuvwxyz"[(*t % 36) as usize];
                *t /= 36;
                Some(char::from(c))
            })
            .collect();
        let path = dir.join(format!("vl.{name}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                last = Some(e);
                break;
            }
        }
    }
    let e = last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into());
    Err(CliError::new(format!(
        "Could not get temporary filename: {}",
        crate::image::strerror(&e)
    )))
}

/// qemu-nbd's `-s`: a temporary qcow2 overlay whose backing file is `file` (opened
/// read-only through the overlay), so that writes never reach `file`. The overlay's
/// name is removed as soon as it is open: the open descriptor keeps it alive until the
/// server exits, and no crash can leave it behind.
fn open_overlay(
    file: &str,
    format: Format,
    read_only: bool,
    unmap: bool,
    cache: CacheMode,
) -> Result<Image, CliError> {
    let opened = crate::image::open(file, Some(format), false)?;
    let size = match &opened.qcow2 {
        Some(q) => q.first.header.size,
        None => opened.file_len,
    };
    drop(opened);
    let base = std::fs::canonicalize(file)
        .map_err(|e| crate::image::open_error(file, crate::image::strerror(&e)))?;
    let path = temp_overlay_file()?;
    let remove = |e: CliError| {
        let _ = std::fs::remove_file(&path);
        e
    };
    let mut opts = CreateOptions::new(size);
    opts.backing_file = Some(base.to_string_lossy().into_owned());
    opts.backing_format = Some(format.name().to_string());
    let overlay = path.to_string_lossy().into_owned();
    Image::create_path(&path, &opts)
        .and_then(Image::close)
        .map_err(|e| {
            CliError::new(format!(
                "Could not create temporary overlay '{overlay}': {}",
                crate::qcowdev::error_text(&e)
            ))
        })
        .map_err(remove)?;
    let img = crate::qcowdev::open_image_cached(&overlay, read_only, unmap, cache)
        .map_err(|e| CliError::new(format!("Failed to blk_new_open '{file}': {e}")))
        .map_err(remove)?;
    let _ = std::fs::remove_file(&path);
    Ok(img)
}

/// Opens the qcow2 image to serve, or one of its internal snapshots (`-l`, read-only).
fn open_qcow2(
    a: &ServeArgs,
    file: &str,
    read_only: bool,
    unmap: bool,
    cache: CacheMode,
) -> Result<Image, CliError> {
    let mut img = crate::qcowdev::open_image_cached(file, read_only, unmap, cache)
        .map_err(|e| CliError::new(format!("Failed to blk_new_open '{file}': {e}")))?;
    if let Some(spec) = &a.load_snapshot {
        let id = crate::source::snapshot_id(img.snapshots(), spec)?;
        img.snapshot_load_tmp(&id).map_err(|e| {
            CliError::new(format!(
                "Failed to load snapshot: {}",
                crate::qcowdev::error_text(&e)
            ))
        })?;
    }
    Ok(img)
}

/// Runs `qcow2 serve`.
pub fn run(a: ServeArgs) -> Result<(), CliError> {
    let file = crate::one_file("serve", &a.files)?;
    let cache_name = a.cache.as_deref().unwrap_or("writeback");
    let cache = qcow2_io::CacheMode::parse(cache_name)
        .ok_or_else(|| CliError::new(format!("Invalid cache mode '{cache_name}'")))?;
    match a.aio.as_deref() {
        None | Some("threads" | "native" | "io_uring") => {}
        Some(m) => return Err(CliError::new(format!("Invalid aio mode '{m}'"))),
    }
    let unmap = match a.discard.as_deref().unwrap_or("ignore") {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        m => return Err(CliError::new(format!("Invalid discard mode '{m}'"))),
    };
    let detect_zeroes = detect_zeroes(a.detect_zeroes.as_deref(), unmap)?;
    let tls = crate::tlsopts::define(&a.object)?
        .server_config(a.tls_creds.as_deref(), a.tls_authz.as_deref())?;
    // As qemu-nbd, a loaded internal snapshot is exported read-only.
    let read_only = a.read_only || a.load_snapshot.is_some();
    let shared = match a.shared.as_deref() {
        None => 1,
        Some(s) => match s.parse::<i64>() {
            Ok(0) => usize::MAX,
            Ok(n) if n > 0 => usize::try_from(n).unwrap_or(usize::MAX),
            _ => return Err(CliError::new(format!("Invalid shared device number '{s}'"))),
        },
    };
    let format = match crate::parse_format(a.format.as_deref())? {
        Some(f) => f,
        None => crate::image::probe(&file)?,
    };
    if a.snapshot && a.load_snapshot.is_some() {
        return Err(CliError::new(
            "-s and -l cannot be used together (the overlay has no internal snapshots)",
        ));
    }
    if a.load_snapshot.is_some() && format == Format::Raw {
        return Err(CliError::new(
            "Failed to load snapshot: Block format 'raw' used by device '' does not support \
             temporarily loading internal snapshots",
        ));
    }
    // Before any thread exists (see daemon::fork).
    let forked = if a.fork {
        Some(crate::daemon::fork()?)
    } else {
        None
    };
    let signals = block_signals()?;
    let (backend, image): (Arc<dyn NbdExport>, Option<Arc<SharedImage>>) = match format {
        Format::Qcow2 | Format::Raw if a.snapshot => {
            let img = open_overlay(&file, format, read_only, unmap, cache)?;
            let shared = Arc::new(SharedImage::new(img));
            (shared.clone(), Some(shared))
        }
        Format::Qcow2 => {
            let img = open_qcow2(&a, &file, read_only, unmap, cache)?;
            let shared = Arc::new(SharedImage::new(img));
            (shared.clone(), Some(shared))
        }
        Format::Raw => {
            let storage = FileStorage::open_cached(&file, !read_only, cache)
                .map_err(|e| crate::image::open_error(&file, crate::image::strerror(&e)))?;
            crate::image::lock(
                &storage,
                &file,
                crate::image::FileRole::Raw { resize: false },
                !read_only,
            )
            .map_err(|e| crate::image::open_error(&file, e))?;
            (Arc::new(RawExport::new(storage, read_only)), None)
        }
    };
    if let Some(name) = &a.bitmap {
        // qemu-nbd's checks: the bitmap exists and is consistent (raw files have none).
        let checked = match &image {
            Some(img) => img
                .exclusive(|i| i.bitmap(name).map(|_| ()))
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
            None => Err(format!("Dirty bitmap '{name}' not found")),
        };
        if let Err(e) = checked {
            let msg = match e.strip_prefix("Dirty bitmap ") {
                Some(rest) if rest.ends_with(" not found") => {
                    format!("Bitmap {}is not found", rest.trim_end_matches("not found"))
                }
                _ => e,
            };
            return Err(CliError::new(msg));
        }
    }
    let mut export = Export::new(a.export_name.clone().unwrap_or_default(), backend)
        .map_err(|e| CliError::new(format!("Failed to export '{file}': {e}")))?
        .with_read_only(read_only)
        .with_trim(unmap)
        .with_detect_zeroes(detect_zeroes)
        .with_allocation_depth(a.allocation_depth)
        .with_dirty_bitmap(a.bitmap.clone());
    if let Some(d) = &a.description {
        export = export.with_description(d.clone());
    }
    let config = ServerConfig {
        max_connections: shared,
        persistent: a.persistent,
        verbose: a.verbose,
        tls,
        ..ServerConfig::default()
    };
    let server = Server::new(vec![export], config);
    watch_signals(signals, server.handle())?;
    let listener = listener(&a)?;
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| CliError::new(format!("Failed to write pid file '{p}': {e}")))?;
    }
    if let Some(f) = forked {
        f.ready();
    }
    let served = server.serve(&listener);
    drop(listener);
    drop(server);
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    let closed = match image.map(Arc::try_unwrap) {
        None => Ok(()),
        Some(Ok(img)) => img.close(),
        // Unreachable (every connection has ended), but never leave data unflushed.
        Some(Err(img)) => img.flush(),
    };
    served.map_err(|e| CliError::new(e.to_string()))?;
    closed.map_err(|e| CliError::new(format!("Error while closing the image: {e}")))
}
