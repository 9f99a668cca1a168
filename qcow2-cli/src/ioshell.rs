//! qemu-io's program around the command language of [`crate::io`]: the global options
//! (`-f -c -r -s -n -t -i -k -C -d -m -U -T --image-opts --object -h -V`), opening images
//! (formats, cache modes, snapshot overlays, copy-on-read, `--image-opts`/`-o` option
//! lists), the `open`/`close`/`reopen` commands, and the command loop: `-c` commands, or
//! else commands read from standard input line by line after a "PROG> " prompt (qemu-io
//! prints the prompt whether or not standard input is a terminal).
//!
//! Standard output is buffered the way C's stdio buffers it (line by line on a terminal,
//! in 4 KiB blocks otherwise, flushed at each prompt, at `sigraise` and at exit) while
//! standard error is written at once, so that a script merging both streams (`2>&1`, as
//! QEMU's iotests do) sees them in qemu-io's order. Exit status: 1 if the image given on
//! the command line cannot be opened (no command runs then) or if any command failed,
//! else 0.

use std::io::{BufRead, Write};

use crate::image::Format;
use crate::io::{self, BlockDev, Exit, Fail, Outcome, Parsed, Shell, Stream};
use crate::prog;
use crate::qcowdev::QcowDev;
use crate::rawdev::RawDev;
use crate::stdio::Stdout;

/// A host cache mode (`-t`, `--cache`, `reopen -c`), as QEMU's `bdrv_parse_cache_mode`
/// reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheMode {
    /// `cache.direct`: bypass the host page cache for aligned requests (`O_DIRECT`).
    pub direct: bool,
    /// Writethrough: every write is flushed before it completes (qemu-io's default).
    pub writethrough: bool,
    /// `cache.no-flush`: flushes are ignored (`unsafe`).
    pub no_flush: bool,
}

impl Default for CacheMode {
    /// qemu-io's default: writethrough through the host cache.
    fn default() -> Self {
        CacheMode {
            direct: false,
            writethrough: true,
            no_flush: false,
        }
    }
}

impl CacheMode {
    /// Parses `none|off|writeback|writethrough|directsync|unsafe`.
    pub fn parse(mode: &str) -> Option<Self> {
        let (direct, writethrough, no_flush) = match mode {
            "none" | "off" => (true, false, false),
            "directsync" => (true, true, false),
            "writeback" => (false, false, false),
            "unsafe" => (false, false, true),
            "writethrough" => (false, true, false),
            _ => return None,
        };
        Some(CacheMode {
            direct,
            writethrough,
            no_flush,
        })
    }

    /// `-n`: no host cache, writeback (`-t none`).
    pub fn nocache() -> Self {
        CacheMode {
            direct: true,
            writethrough: false,
            no_flush: false,
        }
    }
}

/// An AIO mode (`-i`, `--aio`; `-k` is `native`). The engine's I/O is synchronous; the
/// mode is checked as QEMU checks it and otherwise has no effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AioMode {
    /// `threads` (the default).
    #[default]
    Threads,
    /// `native` (Linux AIO; QEMU requires `cache.direct=on` with it).
    Native,
    /// `io_uring`.
    IoUring,
}

impl AioMode {
    /// Parses `threads|native|io_uring`.
    pub fn parse(mode: &str) -> Option<Self> {
        match mode {
            "threads" => Some(AioMode::Threads),
            "native" => Some(AioMode::Native),
            "io_uring" => Some(AioMode::IoUring),
            _ => None,
        }
    }
}

/// A `--object` definition. Only `secret` objects exist in this tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectDef {
    /// `qom-type`.
    pub qom_type: String,
    /// `id`.
    pub id: String,
    /// The other `key=value` properties.
    pub props: Vec<(String, String)>,
}

/// How to open an image: the global options, or an `open` command's.
#[derive(Debug, Clone, Default)]
pub struct OpenParams {
    /// `-r`.
    pub read_only: bool,
    /// `-s`: writes go to a temporary overlay that is thrown away.
    pub snapshot: bool,
    /// `-C`.
    pub copy_on_read: bool,
    /// `-t`/`-n`.
    pub cache: CacheMode,
    /// `-i`/`-k`.
    pub aio: AioMode,
    /// `-d`: pass guest discards down to the file (`unmap`, qemu-io's default) or not
    /// (`ignore`).
    pub discard_unmap: bool,
    /// `-U`: share the image with other writers. Parsed and kept here; locking is not
    /// this module's (the locking code reads this field).
    pub force_share: bool,
    /// `file.locking=on|off|auto` of an option list, as given (for the locking code;
    /// `None`: QEMU's default, `auto`).
    pub locking: Option<String>,
    /// `detect-zeroes=off|on|unmap`: writes of all-zero buffers become zero writes
    /// (`unmap`: allowed to deallocate, with `discard=unmap`).
    pub detect_zeroes: DetectZeroes,
    /// `driver=compress` above the format: every write goes down compressed, in whole
    /// clusters.
    pub compress: bool,
    /// `-f`, or `driver=` of an option list.
    pub format: Option<String>,
    /// Block driver options (`-o`, `--image-opts`), in order.
    pub options: Vec<(String, String)>,
}

/// The generic block option `detect-zeroes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes are written as given (the default).
    #[default]
    Off,
    /// All-zero writes are zero writes.
    On,
    /// All-zero writes are zero writes that may deallocate (with `discard=unmap`).
    Unmap,
}

/// qemu-io's command line.
#[derive(Debug, Clone, Default)]
pub struct IoOptions {
    /// `-c`, in order.
    pub commands: Vec<String>,
    /// How to open the image.
    pub open: OpenParams,
    /// `-m`: misalign buffers (accepted; no effect on this engine's buffers).
    pub misalign: bool,
    /// `--image-opts`: the file argument is an option list.
    pub image_opts: bool,
    /// `--object`s.
    pub objects: Vec<ObjectDef>,
    /// `-T`s (accepted; this engine has no trace events).
    pub trace: Vec<String>,
    /// `-U`/`--force-share` (also in [`OpenParams::force_share`]).
    pub force_share: bool,
    /// The image argument.
    pub file: Option<String>,
}

/// What the command line asks for besides running.
#[derive(Debug)]
enum Parse {
    /// Run with these options.
    Run(Box<IoOptions>),
    /// Exit now with this status (help, version, or an error already printed).
    Exit(u8),
}

const LONG_OPTS: &[(&str, bool, char)] = &[
    ("help", false, 'h'),
    ("version", false, 'V'),
    ("cmd", true, 'c'),
    ("format", true, 'f'),
    ("read-only", false, 'r'),
    ("snapshot", false, 's'),
    ("nocache", false, 'n'),
    ("copy-on-read", false, 'C'),
    ("misalign", false, 'm'),
    ("native-aio", false, 'k'),
    ("aio", true, 'i'),
    ("discard", true, 'd'),
    ("cache", true, 't'),
    ("trace", true, 'T'),
    ("object", true, 'O'),
    ("image-opts", false, 'I'),
    ("force-share", false, 'U'),
];

const SHORT_OPTS: &str = "hVc:d:f:rsnCmki:t:T:U";

fn usage_text() -> String {
    let p = match prog::personality() {
        prog::Personality::Qcow2 => "qcow2 io",
        other => other.name(),
    };
    format!(
        "Usage: {p} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{p} -c help' for information on available commands.
"
    )
}

/// Parses `discard` modes as QEMU's `bdrv_parse_discard_flags`: `Some(unmap)`.
fn parse_discard(mode: &str) -> Option<bool> {
    match mode {
        "off" | "ignore" => Some(false),
        "on" | "unmap" => Some(true),
        _ => None,
    }
}

/// Splits a QemuOpts list ("a=b,c=d", ",," escaping a comma). A bare word is `implied`'s
/// value when given (`--object secret,...`), else `word=on`.
pub(crate) fn split_opts(list: &str, implied: Option<&str>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, part) in crate::opts::split_items(list).into_iter().enumerate() {
        match part.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => match implied {
                Some(key) if i == 0 => out.push((key.to_string(), part)),
                _ => out.push((part, "on".to_string())),
            },
        }
    }
    out
}

/// Parses `--object TYPE,id=ID,...`.
pub(crate) fn parse_object(def: &str) -> Result<ObjectDef, String> {
    let mut qom_type = None;
    let mut id = None;
    let mut props = Vec::new();
    for (k, v) in split_opts(def, Some("qom-type")) {
        match k.as_str() {
            "qom-type" => qom_type = Some(v),
            "id" => id = Some(v),
            _ => props.push((k, v)),
        }
    }
    let Some(qom_type) = qom_type else {
        return Err("Parameter 'qom-type' is missing".into());
    };
    if qom_type != "secret" {
        return Err(format!(
            "Parameter 'qom-type' does not accept value '{qom_type}'"
        ));
    }
    let Some(id) = id else {
        return Err("Parameter 'id' is missing".into());
    };
    Ok(ObjectDef {
        qom_type,
        id,
        props,
    })
}

/// glibc `getopt_long` over qemu-io's options (permuting, long options by unique prefix).
fn parse_args(args: &[String]) -> Parse {
    let p = prog::name();
    let mut o = IoOptions {
        open: OpenParams {
            discard_unmap: true,
            ..OpenParams::default()
        },
        ..IoOptions::default()
    };
    let mut operands = Vec::new();
    let bad_usage = |msg: String| {
        eprintln!("{msg}");
        print!("{}", usage_text());
        Parse::Exit(1)
    };
    let fatal = |msg: String| {
        eprintln!("{p}: {msg}");
        Parse::Exit(1)
    };
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let mut found: Vec<(char, Option<String>)> = Vec::new();
        if a == "--" {
            operands.extend(args[i..].iter().cloned());
            break;
        } else if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let exact = LONG_OPTS.iter().find(|(n, _, _)| *n == name);
            let matches: Vec<_> = LONG_OPTS
                .iter()
                .filter(|(n, _, _)| n.starts_with(name))
                .collect();
            let opt = match (exact, matches.as_slice()) {
                (Some(e), _) => e,
                (None, [one]) => *one,
                (None, []) => return bad_usage(format!("{p}: unrecognized option '--{name}'")),
                (None, many) => {
                    let names: Vec<String> =
                        many.iter().map(|(n, _, _)| format!("'--{n}'")).collect();
                    return bad_usage(format!(
                        "{p}: option '--{name}' is ambiguous; possibilities: {}",
                        names.join(" ")
                    ));
                }
            };
            let (full, has_arg, c) = *opt;
            let value = match (has_arg, inline) {
                (false, Some(_)) => {
                    return bad_usage(format!("{p}: option '--{full}' doesn't allow an argument"))
                }
                (false, None) => None,
                (true, Some(v)) => Some(v),
                (true, None) => match args.get(i) {
                    Some(v) => {
                        i += 1;
                        Some(v.clone())
                    }
                    None => {
                        return bad_usage(format!("{p}: option '--{full}' requires an argument"))
                    }
                },
            };
            found.push((c, value));
        } else if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                let Some(pos) = SHORT_OPTS.find(c).filter(|_| c != ':') else {
                    return bad_usage(format!("{p}: invalid option -- '{c}'"));
                };
                if SHORT_OPTS[pos + c.len_utf8()..].starts_with(':') {
                    let rest: String = chars[j + 1..].iter().collect();
                    let value = if !rest.is_empty() {
                        rest
                    } else if let Some(v) = args.get(i) {
                        i += 1;
                        v.clone()
                    } else {
                        return bad_usage(format!("{p}: option requires an argument -- '{c}'"));
                    };
                    found.push((c, Some(value)));
                    break;
                }
                found.push((c, None));
                j += 1;
            }
        } else {
            operands.push(a.clone());
        }
        for (c, v) in found {
            let v = v.unwrap_or_default();
            match c {
                's' => o.open.snapshot = true,
                'n' => o.open.cache = CacheMode::nocache(),
                'C' => o.open.copy_on_read = true,
                'd' => match parse_discard(&v) {
                    Some(unmap) => o.open.discard_unmap = unmap,
                    None => return fatal(format!("Invalid discard option: {v}")),
                },
                'f' => o.open.format = Some(v),
                'c' => o.commands.push(v),
                'r' => o.open.read_only = true,
                'm' => o.misalign = true,
                'k' => o.open.aio = AioMode::Native,
                'i' => match AioMode::parse(&v) {
                    Some(m) => o.open.aio = m,
                    None => return fatal(format!("Invalid aio option: {v}")),
                },
                't' => match CacheMode::parse(&v) {
                    Some(m) => o.open.cache = m,
                    None => return fatal(format!("Invalid cache option: {v}")),
                },
                'T' => o.trace.push(v),
                'V' => {
                    println!("{p} version {} (qcow2 engine)", env!("CARGO_PKG_VERSION"));
                    return Parse::Exit(0);
                }
                'h' => {
                    print!("{}", usage_text());
                    return Parse::Exit(0);
                }
                'U' => {
                    o.force_share = true;
                    o.open.force_share = true;
                }
                'O' => match parse_object(&v) {
                    Ok(obj) => o.objects.push(obj),
                    Err(m) => return fatal(m),
                },
                'I' => o.image_opts = true,
                _ => {}
            }
        }
    }
    if operands.len() > 1 {
        print!("{}", usage_text());
        return Parse::Exit(1);
    }
    if o.image_opts && o.open.format.is_some() {
        return fatal("--image-opts and -f are mutually exclusive".into());
    }
    o.file = operands.into_iter().next();
    Parse::Run(Box::new(o))
}

/// An open device with the cache mode applied: writethrough flushes after every write,
/// `unsafe` ignores flushes, and a read-only reopen refuses writes.
struct Device {
    inner: Box<dyn BlockDev>,
    cache: CacheMode,
    read_only: bool,
    /// `discard=unmap`: without it the block layer drops guest discards (they succeed and
    /// change nothing), as QEMU's does without `BDRV_O_UNMAP`.
    discard_unmap: bool,
    /// Copy-on-read is on (then the device cannot become read-only).
    copy_on_read: bool,
    /// `detect-zeroes`.
    detect_zeroes: DetectZeroes,
    /// Writes go down compressed, cluster by cluster (QEMU's `compress` filter).
    compress: bool,
    /// A raw image whose format was probed: writes that would make its first sector look
    /// like another format are refused (EPERM), as QEMU's raw driver refuses them.
    probed_raw: bool,
    /// How it was opened (for `reopen`); `None` for a snapshot overlay, which cannot be
    /// opened again.
    params: Option<(String, OpenParams)>,
}

/// `EPERM`.
const EPERM: i32 = 1;
use crate::io::ENOMEDIUM;

impl Device {
    fn after_write(&mut self, r: Result<(), i32>) -> Result<(), i32> {
        r?;
        if self.cache.writethrough && !self.cache.no_flush {
            self.inner.flush()?;
        }
        Ok(())
    }
    fn writable(&self) -> Result<(), i32> {
        if self.read_only {
            Err(EPERM)
        } else {
            Ok(())
        }
    }

    /// QEMU's `compress` filter under the block layer: its request alignment is the
    /// cluster size, so a write is widened to whole clusters (the edges read first) and
    /// each cluster goes down as a compressed write (the image's last cluster may be
    /// partial).
    fn write_compressed_clusters(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        let cluster = self.inner.info().0;
        if cluster == 0 || buf.is_empty() {
            return self.inner.write_compressed(offset, buf);
        }
        let len = self.inner.length()?;
        let end = offset.checked_add(buf.len() as u64).ok_or(io::EIO)?;
        let mut pos = offset - offset % cluster;
        while pos < end {
            let this = cluster.min(len.saturating_sub(pos));
            if this == 0 {
                break;
            }
            let n = usize::try_from(this).map_err(|_| io::EIO)?;
            let mut data = vec![0u8; n];
            let lo = offset.max(pos);
            let hi = end.min(pos + this);
            if lo > pos || hi < pos + this {
                self.inner.read(pos, &mut data)?;
            }
            let from = usize::try_from(lo - offset).map_err(|_| io::EIO)?;
            let to = usize::try_from(hi - offset).map_err(|_| io::EIO)?;
            let at = usize::try_from(lo - pos).map_err(|_| io::EIO)?;
            data[at..at + (to - from)].copy_from_slice(&buf[from..to]);
            self.inner.write_compressed(pos, &data)?;
            pos += this;
        }
        Ok(())
    }

    /// Refuses a write of `buf` at `offset` that would turn the first sector of a probed
    /// raw image into another format's header.
    fn probe_guard(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        if !self.probed_raw || offset >= 512 || buf.is_empty() {
            return Ok(());
        }
        let mut sector = [0u8; 512];
        let have = self.inner.length()?.min(512) as usize;
        self.inner.read(0, &mut sector[..have])?;
        let n = buf.len().min(512 - offset as usize);
        sector[offset as usize..offset as usize + n].copy_from_slice(&buf[..n]);
        if probes_as_other_format(&sector) {
            return Err(EPERM);
        }
        Ok(())
    }
}

impl BlockDev for Device {
    fn format_name(&self) -> &'static str {
        self.inner.format_name()
    }
    fn protocol_name(&self) -> Option<&'static str> {
        self.inner.protocol_name()
    }
    fn has_info(&self) -> bool {
        self.inner.has_info()
    }
    fn backing_driver(&self) -> Option<String> {
        self.inner.backing_driver()
    }
    fn length(&mut self) -> Result<u64, i32> {
        self.inner.length()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.inner.read(offset, buf)
    }
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.writable()?;
        self.probe_guard(offset, buf)?;
        // As QEMU's block layer: with detect-zeroes, a buffer of zeros is written as a
        // zero write (unmapping only when both detect-zeroes=unmap and discard=unmap).
        if self.compress {
            let r = self.write_compressed_clusters(offset, buf);
            return self.after_write(r);
        }
        let r = if self.detect_zeroes != DetectZeroes::Off
            && !buf.is_empty()
            && buf.iter().all(|&b| b == 0)
        {
            let unmap = self.detect_zeroes == DetectZeroes::Unmap && self.discard_unmap;
            self.inner.write_zeroes(offset, buf.len() as u64, unmap)
        } else {
            self.inner.write(offset, buf)
        };
        self.after_write(r)
    }
    fn write_compressed(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.writable()?;
        let r = self.inner.write_compressed(offset, buf);
        self.after_write(r)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        self.writable()?;
        let r = self.inner.write_zeroes(offset, len, unmap);
        self.after_write(r)
    }
    fn write_zeroes_fast(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        self.writable()?;
        // With O_DIRECT a raw file is accessed in whole sectors: a partial one would need
        // a read-modify-write, which "no fallback" excludes.
        if self.cache.direct && self.inner.format_name() == "raw" && (offset | len) % 512 != 0 {
            return Err(io::ENOTSUP);
        }
        let r = self.inner.write_zeroes_fast(offset, len, unmap);
        self.after_write(r)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), i32> {
        self.writable()?;
        if !self.discard_unmap {
            return Ok(());
        }
        self.inner.discard(offset, len)
    }
    fn flush(&mut self) -> Result<(), i32> {
        if self.cache.no_flush {
            return Ok(());
        }
        self.inner.flush()
    }
    fn truncate(&mut self, len: u64) -> Result<(), i32> {
        self.writable()?;
        self.inner.truncate(len)
    }
    fn is_allocated(&mut self, offset: u64, len: u64) -> Result<(bool, u64), i32> {
        self.inner.is_allocated(offset, len)
    }
    fn info(&mut self) -> (u64, u64) {
        self.inner.info()
    }
    fn specific_info(&mut self) -> Vec<String> {
        self.inner.specific_info()
    }
    fn read_only(&self) -> bool {
        self.read_only || self.inner.read_only()
    }
    fn usable(&self) -> bool {
        self.inner.usable()
    }
    fn load_vmstate(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.inner.load_vmstate(offset, buf)
    }
    fn save_vmstate(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.writable()?;
        self.inner.save_vmstate(offset, buf)
    }
}

/// Whether a first sector would be probed as a format other than raw by QEMU's probes
/// (the formats whose header magic sits in the first sector).
fn probes_as_other_format(sector: &[u8; 512]) -> bool {
    let be32 = |at: usize| {
        u32::from_be_bytes([sector[at], sector[at + 1], sector[at + 2], sector[at + 3]])
    };
    let le32 = |at: usize| {
        u32::from_le_bytes([sector[at], sector[at + 1], sector[at + 2], sector[at + 3]])
    };
    let starts = |m: &[u8]| sector.starts_with(m);
    // qcow2 (version >= 2) and qcow (version 1) share the magic.
    (starts(b"QFI\xfb") && be32(4) >= 1)
        || starts(b"QED\0")
        || (starts(b"LUKS\xba\xbe") && sector[6..8] == [0, 1])
        || starts(b"KDMV")
        || starts(b"COWD")
        || starts(b"# Disk DescriptorFile")
        || starts(b"conectix")
        || starts(b"vhdxfile")
        || le32(64) == 0xbeda_107f
}

/// The generic block options of `-o`/`--image-opts` lists applied to `params`; returns the
/// file name and the driver's own options (qcow2's runtime options).
fn apply_options(path: Option<&str>, params: &mut OpenParams) -> Result<Applied, String> {
    let mut file = path.map(str::to_string);
    let mut driver_opts = Vec::new();
    let mut debug = DebugNode::None;
    let mut options = params.options.clone();
    let mut path = path;
    if let Some(json) = path.and_then(crate::jsonname::options) {
        // The options of a json: name come first; -o options given beside it follow.
        let mut all = json?;
        all.extend(options);
        options = all;
        file = None;
        path = None;
    }
    if options
        .iter()
        .any(|(k, v)| k == "driver" && v == "compress")
    {
        // QEMU's compress filter: its child (`file.*`) is the format below.
        let mut below = Vec::new();
        for (k, v) in options {
            if k == "driver" {
                continue;
            }
            match k.strip_prefix("file.") {
                Some(fk) => below.push((fk.to_string(), v)),
                None => {
                    return Err(format!(
                        "Block format 'compress' does not support the option '{k}'"
                    ))
                }
            }
        }
        if !below.iter().any(|(k, _)| k == "driver") {
            params.format = None;
        }
        params.compress = true;
        options = below;
    }
    if options
        .iter()
        .any(|(k, v)| k == "driver" && v == "blkdebug")
    {
        // blkdebug above the format driver: its own keys bare, the format's under
        // `image.`; a `blkdebug:` name belongs to this node.
        let mut node = match path {
            Some(p) => crate::blkdebug::Blkdebug::from_filename(p)?.unwrap_or_else(|| {
                crate::blkdebug::Blkdebug {
                    image: Some(p.to_string()),
                    ..Default::default()
                }
            }),
            None => crate::blkdebug::Blkdebug::default(),
        };
        let mut pending = Vec::new();
        let mut below = Vec::new();
        for (k, v) in options {
            if k == "driver" {
                continue;
            }
            if let Some(ik) = k.strip_prefix("image.") {
                match ik {
                    "driver" => below.push(("driver".to_string(), v)),
                    "file.filename" | "filename" => node.image = Some(v),
                    _ => below.push((ik.to_string(), v)),
                }
            } else if !node.apply_option(&k, &v, &mut pending)? {
                return Err(format!(
                    "Block format 'blkdebug' does not support the option '{k}'"
                ));
            }
        }
        node.finish_options(pending)?;
        file = node.image.clone();
        if !below.iter().any(|(k, _)| k == "driver") {
            params.format = None;
        }
        options = below;
        debug = DebugNode::Format(node);
    } else if let Some(p) = path {
        if let Some(node) = crate::blkdebug::Blkdebug::from_filename(p)? {
            debug = DebugNode::File(node);
        }
    }
    let mut pending = Vec::new();
    for (k, v) in options {
        if let DebugNode::File(node) = &mut debug {
            if let Some(fk) = k.strip_prefix("file.") {
                if node.apply_option(fk, &v, &mut pending)? {
                    continue;
                }
            }
        }
        match k.as_str() {
            "driver" => params.format = Some(v),
            "file" | "file.filename" | "filename" => file = Some(v),
            "file.driver" if v == "file" => {}
            "file.driver" if v == "blkdebug" => {
                if !matches!(debug, DebugNode::File(_)) {
                    debug = DebugNode::File(crate::blkdebug::Blkdebug {
                        image: file.clone(),
                        ..Default::default()
                    });
                }
            }
            "file.driver" => return Err(format!("Unknown protocol driver '{v}'")),
            "read-only" => params.read_only = matches!(v.as_str(), "on" | "true" | "yes"),
            "force-share" => params.force_share = matches!(v.as_str(), "on" | "true" | "yes"),
            "discard" => {
                params.discard_unmap =
                    parse_discard(&v).ok_or_else(|| format!("Invalid discard option: {v}"))?
            }
            "node-name" | "file.node-name" | "backing.node-name" => {
                // Node names only name; kept in the options for reopen's comparison.
                let ok = v.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
                    && v.len() < 32;
                if !ok {
                    return Err(format!("Invalid node-name: '{v}'"));
                }
            }
            "detect-zeroes" => {
                params.detect_zeroes = match v.as_str() {
                    "off" => DetectZeroes::Off,
                    "on" => DetectZeroes::On,
                    "unmap" => DetectZeroes::Unmap,
                    _ => return Err(format!("invalid parameter value: {v}")),
                }
            }
            "cache.direct" => params.cache.direct = matches!(v.as_str(), "on" | "true"),
            "cache.no-flush" => params.cache.no_flush = matches!(v.as_str(), "on" | "true"),
            "file.locking" | "locking" => match v.as_str() {
                "on" | "off" | "auto" => params.locking = Some(v),
                _ => return Err(format!("invalid parameter value: {v}")),
            },
            "file.aio" | "aio" => {
                params.aio =
                    AioMode::parse(&v).ok_or_else(|| format!("invalid parameter value: {v}"))?
            }
            "file.cache.direct" => params.cache.direct = matches!(v.as_str(), "on" | "true"),
            "file.cache.no-flush" => params.cache.no_flush = matches!(v.as_str(), "on" | "true"),
            _ => driver_opts.push((k, v)),
        }
    }
    if let DebugNode::File(node) = &mut debug {
        node.finish_options(pending)?;
        if node.image.is_none() {
            node.image = file.clone();
        }
        if file.is_none() {
            file = node.image.clone();
        }
    }
    let file = file.ok_or_else(|| "Must specify either driver or file".to_string())?;
    Ok((file, driver_opts, debug))
}

/// What [`apply_options`] gives: the file name, the format driver's own options, and where
/// a blkdebug node sits.
type Applied = (String, Vec<(String, String)>, DebugNode);

/// The checks of QEMU's `file`, `host_device` and `host_cdrom` protocol drivers, in their
/// order: the open (`O_RDWR` fails on a directory), then the file type (`file` wants a
/// regular file, the host drivers a character or block device).
fn check_protocol_file(driver: &str, path: &str, read_only: bool) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| format!("Could not open '{path}': {}", crate::image::strerror(&e)))?;
    let ft = f
        .metadata()
        .map_err(|e| format!("Could not open '{path}': {}", crate::image::strerror(&e)))?
        .file_type();
    if driver == "file" {
        if !ft.is_file() {
            return Err(format!(
                "'file' driver requires '{path}' to be a regular file"
            ));
        }
    } else if !ft.is_char_device() && !ft.is_block_device() {
        return Err(format!(
            "'{driver}' driver requires '{path}' to be either a character or block device"
        ));
    }
    Ok(())
}

/// Where a blkdebug node sits in an open.
#[derive(Debug)]
enum DebugNode {
    /// None.
    None,
    /// Between the format driver and its file (`blkdebug:CONFIG:FILE`, `file.driver=
    /// blkdebug`): its rules run on the engine's I/O, armed by the engine's events.
    File(crate::blkdebug::Blkdebug),
    /// Above the format driver (`driver=blkdebug,image.driver=...`): it sees guest
    /// requests only, and no engine reports events to it, so its rules are checked but
    /// never armed (as QEMU's, apart from the copy-on-read and write-request events QEMU's
    /// generic block layer reports there).
    Format(crate::blkdebug::Blkdebug),
}

impl DebugNode {
    /// The file the image's bytes are in, for opens that bypass the node.
    fn file_path(&self, name: &str) -> String {
        match self {
            DebugNode::File(n) | DebugNode::Format(n) => n
                .image
                .clone()
                .unwrap_or_else(|| crate::blkdebug::file_of(name).to_string()),
            DebugNode::None => name.to_string(),
        }
    }
}

/// Opens a device as qemu-io's `openfile` does; the error is the text after
/// "can't open device NAME: " ("can't open: " without a name).
fn open_device(name: Option<&str>, params: &OpenParams) -> Result<Device, String> {
    let mut params = params.clone();
    if let Some(dev) = open_null(name, &mut params)? {
        return Ok(dev);
    }
    let (name_path, driver_opts, debug) = apply_options(name, &mut params)?;
    // Messages name the device as given; the bytes are in the node's file.
    let path = debug.file_path(&name_path);
    if params.aio == AioMode::Native && !params.cache.direct {
        return Err(
            "aio=native was specified, but it requires cache.direct=on, which was not \
                    specified."
                .into(),
        );
    }
    let ro = params.read_only;
    // The locks every open below takes honour -U / force-share (refused for writers).
    crate::image::set_force_share(params.force_share);
    let locking = match params.locking.as_deref() {
        Some("on") => qcow2_image::Locking::On,
        Some("off") => qcow2_image::Locking::Off,
        _ => qcow2_image::Locking::Auto,
    };
    let mut probed_raw = false;
    if params.copy_on_read && ro {
        return Err("Can't use copy-on-read on read-only device".into());
    }
    let format = match params.format.as_deref() {
        Some(p @ ("file" | "host_device" | "host_cdrom")) => {
            // A protocol driver opened as the device: the bytes of the file, as raw.
            check_protocol_file(p, &path, ro)?;
            Format::Raw
        }
        Some(f) => Format::parse(f).map_err(|_| format!("Unknown driver '{f}'"))?,
        None => {
            // Probe only: the lock that matters (and its message) is the device's open.
            let probed = crate::image::probe_detail(&path)?;
            probed_raw = probed == Format::Raw;
            if probed == Format::Raw && !ro && !params.snapshot {
                eprintln!(
                    "WARNING: Image format was not specified for '{path}' and probing guessed \
                     raw.\n         Automatically detecting the format is dangerous for raw \
                     images, write operations on block 0 will be restricted.\n         Specify \
                     the 'raw' format explicitly to remove the restrictions."
                );
            }
            probed
        }
    };
    if params.compress && format == Format::Raw {
        return Err("Compression is not supported for underlying format: raw".into());
    }
    if format == Format::Raw {
        if let Some((k, _)) = driver_opts.first() {
            return Err(format!(
                "Block format 'raw' does not support the option '{k}'"
            ));
        }
    }
    if params.snapshot && format == Format::Qcow2 {
        // The runtime options tune the image below the overlay: check them all the same.
        let mut probe = qcow2_image::OpenOptions::default();
        for (k, v) in &driver_opts {
            if !crate::qcowdev::apply_runtime_option(&mut probe, k, v)? {
                return Err(format!(
                    "Block format 'qcow2' does not support the option '{k}'"
                ));
            }
        }
    }
    let inner: Box<dyn BlockDev> = if params.snapshot {
        let size = match format {
            Format::Raw => RawDev::open(&path, true)
                .map_err(|e| strip_device(&path, &e))?
                .length()
                .map_err(io::strerror)?,
            Format::Qcow2 => crate::qcowdev::open_image(&path, true)?.virtual_size(),
        };
        let mut dev =
            QcowDev::snapshot_overlay(&path, format.name(), size, ro, params.discard_unmap)?;
        dev.set_copy_on_read(params.copy_on_read);
        Box::new(dev)
    } else {
        match format {
            Format::Raw => Box::new(RawDev::open(&path, ro).map_err(|e| strip_device(&path, &e))?),
            Format::Qcow2 => {
                let cache = if params.cache.direct {
                    qcow2_io::CacheMode::None
                } else {
                    qcow2_io::CacheMode::Writeback
                };
                let node = match &debug {
                    DebugNode::File(n) => Some(n),
                    _ => None,
                };
                let extras = crate::qcowdev::OpenExtras {
                    blkdebug: node,
                    ..Default::default()
                };
                let image = crate::qcowdev::open_image_extras(
                    if node.is_some() { &name_path } else { &path },
                    ro,
                    params.discard_unmap,
                    cache,
                    locking,
                    &driver_opts,
                    extras,
                )?;
                let mut dev = QcowDev::from_image(image, ro);
                dev.set_copy_on_read(params.copy_on_read);
                Box::new(dev)
            }
        }
    };
    let reopen = (!params.snapshot).then(|| (path.clone(), params.clone()));
    Ok(Device {
        inner,
        cache: params.cache,
        read_only: ro,
        discard_unmap: params.discard_unmap,
        copy_on_read: params.copy_on_read,
        detect_zeroes: params.detect_zeroes,
        compress: params.compress,
        probed_raw: probed_raw && !params.snapshot,
        params: reopen,
    })
}

/// Opens a `null-co` device when the driver (`-f`, `driver=`, or a `json:` name's) is
/// `null-co`; `None` for every other driver. The device has no file.
fn open_null(name: Option<&str>, params: &mut OpenParams) -> Result<Option<Device>, String> {
    let mut options = match name.and_then(crate::jsonname::options) {
        Some(json) => json?,
        None => Vec::new(),
    };
    options.extend(params.options.iter().cloned());
    let driver = options
        .iter()
        .rev()
        .find(|(k, _)| k == "driver")
        .map(|(_, v)| v.as_str())
        .or(params.format.as_deref());
    if driver != Some("null-co") {
        return Ok(None);
    }
    let own: Vec<(String, String)> = options.into_iter().filter(|(k, _)| k != "driver").collect();
    let dev = crate::nulldev::NullDev::open(&own, params.read_only)?;
    Ok(Some(Device {
        inner: Box::new(dev),
        cache: params.cache,
        read_only: params.read_only,
        discard_unmap: params.discard_unmap,
        copy_on_read: params.copy_on_read,
        detect_zeroes: params.detect_zeroes,
        compress: false,
        probed_raw: false,
        params: None,
    }))
}

/// Drops the "can't open device PATH: " that [`RawDev::open`] puts in front.
fn strip_device(path: &str, e: &str) -> String {
    e.strip_prefix(&format!("can't open device {path}: "))
        .unwrap_or(e)
        .to_string()
}

/// The session: the open device and the standard output buffer.
struct Session {
    dev: Option<Device>,
    image_opts: bool,
}

impl Session {
    fn close_device(&mut self) -> Result<(), String> {
        match self.dev.take() {
            Some(mut d) => {
                let r = match d.inner.flush() {
                    // A device a corruption made unusable closes without a word, as QEMU's.
                    Err(ENOMEDIUM) => Ok(()),
                    r => r,
                };
                drop(d);
                r.map_err(io::strerror)
            }
            None => Ok(()),
        }
    }
}

impl Shell for Session {
    fn device(&mut self) -> Option<&mut dyn BlockDev> {
        self.dev.as_mut().map(|d| d as &mut dyn BlockDev)
    }

    fn open(&mut self, p: &Parsed, o: &mut Outcome) -> Result<(), Fail> {
        let mut params = OpenParams {
            discard_unmap: true,
            ..OpenParams::default()
        };
        for (c, v) in p.flags() {
            let v = v.clone().unwrap_or_default();
            match c {
                's' => params.snapshot = true,
                'n' => params.cache = CacheMode::nocache(),
                'C' => params.copy_on_read = true,
                'r' => params.read_only = true,
                'k' => params.aio = AioMode::Native,
                't' => match CacheMode::parse(&v) {
                    Some(m) => params.cache = m,
                    None => {
                        o.error_report(format!("Invalid cache option: {v}"));
                        return Err(Fail::Done);
                    }
                },
                'd' => match parse_discard(&v) {
                    Some(u) => params.discard_unmap = u,
                    None => {
                        o.error_report(format!("Invalid discard option: {v}"));
                        return Err(Fail::Done);
                    }
                },
                'i' => match AioMode::parse(&v) {
                    Some(m) => params.aio = m,
                    None => {
                        o.error_report(format!("Invalid aio option: {v}"));
                        return Err(Fail::Done);
                    }
                },
                'o' => {
                    if self.image_opts {
                        o.out("--image-opts and 'open -o' are mutually exclusive\n");
                        return Err(Fail::Done);
                    }
                    params.options.extend(split_opts(&v, None));
                }
                'U' => params.force_share = true,
                _ => {}
            }
        }
        let mut name = match p.operands() {
            [] => None,
            [one] => Some(one.clone()),
            _ => return Err(Fail::Usage),
        };
        if self.image_opts {
            if let Some(list) = name.take() {
                params.options.extend(split_opts(&list, None));
            }
        }
        if self.dev.is_some() {
            o.error_report("file open already, try 'help close'");
            return Err(Fail::Done);
        }
        match open_device(name.as_deref(), &params) {
            Ok(d) => {
                self.dev = Some(d);
                Ok(())
            }
            Err(e) => {
                o.error_report(open_failure(name.as_deref(), &e));
                Err(Fail::Done)
            }
        }
    }

    fn close(&mut self) {
        if let Err(e) = self.close_device() {
            eprintln!("{}Error while closing the image: {e}", prog::prefix());
        }
    }

    fn reopen(&mut self, p: &Parsed, o: &mut Outcome) -> Result<(), Fail> {
        let mut read_only: Option<bool> = None;
        let mut cache: Option<CacheMode> = None;
        let runtime: Vec<(String, String)>;
        let mut items: Vec<(String, String)> = Vec::new();
        for (c, v) in p.flags() {
            let v = v.clone().unwrap_or_default();
            match c {
                'c' => match CacheMode::parse(&v) {
                    Some(m) => cache = Some(m),
                    None => {
                        o.error_report(format!("Invalid cache option: {v}"));
                        return Err(Fail::Done);
                    }
                },
                'o' => items.extend(split_opts(&v, None)),
                'r' | 'w' => {
                    if read_only.is_some() {
                        o.error_report("Only one -r/-w option may be given");
                        return Err(Fail::Done);
                    }
                    read_only = Some(*c == 'r');
                }
                _ => {}
            }
        }
        if !p.operands().is_empty() {
            return Err(Fail::Usage);
        }
        let Some(dev) = self.dev.as_mut() else {
            return Err(Fail::Done);
        };
        match reopen_options(dev, &items, read_only.is_some(), cache.is_some()) {
            Ok(r) => {
                runtime = r.runtime;
                read_only = read_only.or(r.read_only);
                if let Some(d) = r.cache_direct {
                    let mut c = cache.unwrap_or(dev.cache);
                    c.direct = d;
                    cache = Some(c);
                }
                if let Some(n) = r.cache_no_flush {
                    let mut c = cache.unwrap_or(dev.cache);
                    c.no_flush = n;
                    cache = Some(c);
                }
            }
            Err(m) => {
                o.error_report(m);
                return Err(Fail::Done);
            }
        }
        if let Some(c) = cache {
            dev.cache = c;
        }
        let want_ro = read_only.unwrap_or(dev.read_only);
        if want_ro && dev.copy_on_read {
            // QEMU names the node ('#blockNNN'); this tool has no node names.
            o.error_report("Can't set node to r/o with copy-on-read enabled");
            return Err(Fail::Done);
        }
        let needs_open = !runtime.is_empty() || (!want_ro && dev.inner.read_only());
        if !needs_open {
            if want_ro && !dev.read_only {
                if let Err(e) = dev.inner.flush() {
                    o.error_report(format!("Could not reopen: {}", io::strerror(e)));
                    return Err(Fail::Done);
                }
            }
            dev.read_only = want_ro;
            return Ok(());
        }
        // Open the file again with the new settings.
        let Some((path, mut params)) = dev.params.clone() else {
            if runtime.is_empty() {
                o.error_report("Cannot make a read-only snapshot overlay writable");
                return Err(Fail::Done);
            }
            // The overlay is thrown away at exit: its tuning options change nothing that
            // can be observed.
            dev.read_only = want_ro;
            return Ok(());
        };
        params.read_only = want_ro;
        params.cache = dev.cache;
        params
            .options
            .retain(|(k, _)| !runtime.iter().any(|(r, _)| r == k));
        params.options.extend(runtime);
        if let Err(e) = self.close_device() {
            o.error_report(format!("Could not reopen: {e}"));
            return Err(Fail::Done);
        }
        match open_device(Some(&path), &params) {
            Ok(d) => {
                self.dev = Some(d);
                Ok(())
            }
            Err(e) => {
                o.error_report(e);
                Err(Fail::Done)
            }
        }
    }
}

/// What a `reopen -o` list asks for, once checked.
#[derive(Debug, Default)]
struct ReopenOptions {
    /// qcow2 runtime options to open again with.
    runtime: Vec<(String, String)>,
    /// `read-only=`.
    read_only: Option<bool>,
    /// `cache.direct=`.
    cache_direct: Option<bool>,
    /// `cache.no-flush=`.
    cache_no_flush: Option<bool>,
}

/// Checks a `reopen -o` list as QEMU's reopen does: `read-only` and the cache options
/// not beside `-r`/`-w` and `-c`, booleans as booleans, node names and drivers unchanged
/// (QEMU names the option without its child's prefix), and the rest qcow2 runtime options.
fn reopen_options(
    dev: &Device,
    items: &[(String, String)],
    has_rw: bool,
    has_cache: bool,
) -> Result<ReopenOptions, String> {
    let mut r = ReopenOptions::default();
    let has = |k: &str| items.iter().any(|(key, _)| key == k);
    if has("read-only") && has_rw {
        return Err("Cannot set both -r/-w and 'read-only'".into());
    }
    if (has("cache.direct") || has("cache.no-flush")) && has_cache {
        return Err("Cannot set both -c and the cache options".into());
    }
    let boolean = |k: &str, v: &str| match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
    };
    let opened = dev
        .params
        .as_ref()
        .map(|(_, p)| p.options.as_slice())
        .unwrap_or(&[]);
    for (k, v) in items {
        match k.as_str() {
            "read-only" => {
                let ro = boolean(k, v)?;
                // qemu-io's own user of the device keeps its write permission unless -r
                // asks to drop it: QEMU refuses the read-only node.
                if ro && !dev.read_only {
                    return Err("Read-only block node cannot support read-write users".into());
                }
                r.read_only = Some(ro);
            }
            "cache.direct" => r.cache_direct = Some(boolean(k, v)?),
            "cache.no-flush" => r.cache_no_flush = Some(boolean(k, v)?),
            "auto-read-only" => {
                boolean(k, v)?;
            }
            "node-name" | "file.node-name" | "backing.node-name" => {
                let current = opened.iter().rev().find(|(o, _)| o == k).map(|(_, v)| v);
                if current != Some(v) {
                    return Err("Cannot change the option 'node-name'".into());
                }
            }
            "driver" | "file.driver" | "backing.driver" => {
                let current = match k.as_str() {
                    "driver" => Some(dev.format_name().to_string()),
                    "file.driver" => Some("file".to_string()),
                    _ => dev.backing_driver(),
                };
                if current.as_deref() != Some(v.as_str()) {
                    return Err("Cannot change the option 'driver'".into());
                }
            }
            _ => {
                let mut probe = qcow2_image::OpenOptions::default();
                if !crate::qcowdev::apply_runtime_option(&mut probe, k, v)? {
                    return Err(format!("Cannot change the option '{k}'"));
                }
                r.runtime.push((k.clone(), v.clone()));
            }
        }
    }
    Ok(r)
}

/// qemu-io's "can't open device NAME: REASON" ("can't open: REASON" without a name).
fn open_failure(name: Option<&str>, reason: &str) -> String {
    match name {
        Some(n) => format!("can't open device {n}: {reason}"),
        None => format!("can't open: {reason}"),
    }
}

#[allow(unsafe_code)]
fn raise(sig: i32) {
    // SAFETY: raise(3) has no memory-safety preconditions; a signal number outside the
    // valid range makes it fail with EINVAL, which is ignored as qemu-io ignores it.
    unsafe {
        libc::raise(sig);
    }
}

/// Runs qemu-io with `args` (without the program name); returns the exit status.
pub fn main(args: &[String]) -> u8 {
    let opts = match parse_args(args) {
        Parse::Run(o) => o,
        Parse::Exit(code) => return code,
    };
    for obj in &opts.objects {
        if let Err(e) = crate::secrets::define(&obj.id, &obj.props) {
            eprintln!("{}{e}", prog::prefix());
            return 1;
        }
    }
    let mut session = Session {
        dev: None,
        image_opts: opts.image_opts,
    };
    if let Some(file) = &opts.file {
        let mut params = opts.open.clone();
        let name = if opts.image_opts {
            params.options = split_opts(file, None);
            None
        } else {
            Some(file.as_str())
        };
        match open_device(name, &params) {
            Ok(d) => session.dev = Some(d),
            Err(e) => {
                eprintln!("{}{}", prog::prefix(), open_failure(name, &e));
                return 1;
            }
        }
    }
    let mut lp = Loop {
        stdout: Stdout::new(),
        pending: Vec::new(),
        failed: false,
        interactive: opts.commands.is_empty(),
    };
    if !lp.interactive {
        for c in &opts.commands {
            if !lp.run(&mut session, c) {
                break;
            }
        }
    } else {
        let stdin = std::io::stdin();
        let mut input = stdin.lock();
        let prompt = format!("{}> ", prog::name());
        loop {
            lp.stdout.write(&prompt);
            lp.stdout.flush();
            // AIO completions print while qemu-io waits for the next line.
            lp.emit_pending();
            let Some(mut raw) = fgets(&mut input) else {
                break;
            };
            if raw.last() == Some(&b'\n') {
                raw.pop();
            }
            let line = String::from_utf8_lossy(&raw).into_owned();
            if !lp.run(&mut session, &line) {
                break;
            }
        }
    }
    lp.emit_pending();
    lp.stdout.flush();
    if let Err(e) = session.close_device() {
        eprintln!("{}Error while closing the image: {e}", prog::prefix());
        lp.failed = true;
    }
    u8::from(lp.failed)
}

/// qemu-io's line reading: C's `fgets` into a 1024-byte buffer, so that a longer line
/// is read as several commands. `None` at the end of input (or on a read error).
fn fgets(input: &mut impl BufRead) -> Option<Vec<u8>> {
    const MAXREADLINESZ: usize = 1024;
    let mut line = Vec::new();
    while line.len() < MAXREADLINESZ - 1 {
        let buf = input.fill_buf().ok()?;
        if buf.is_empty() {
            break;
        }
        let room = (MAXREADLINESZ - 1 - line.len()).min(buf.len());
        let take = buf[..room]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(room, |i| i + 1);
        line.extend_from_slice(&buf[..take]);
        input.consume(take);
        if line.last() == Some(&b'\n') {
            break;
        }
    }
    (!line.is_empty()).then_some(line)
}

/// The command loop's state.
struct Loop {
    stdout: Stdout,
    /// AIO completion output not printed yet.
    pending: Vec<(Stream, String)>,
    failed: bool,
    /// Commands come from standard input (no `-c`).
    interactive: bool,
}

impl Loop {
    fn write(&mut self, chunks: &[(Stream, String)]) {
        for (stream, text) in chunks {
            match stream {
                Stream::Out => self.stdout.write(text),
                Stream::Err => {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(text.as_bytes());
                }
            }
        }
    }

    fn emit_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.write(&pending);
    }

    /// Runs one command line; false when the program should stop reading commands.
    fn run(&mut self, session: &mut Session, line: &str) -> bool {
        let o = io::run_command(session, line);
        self.write(&o.chunks);
        if o.drains {
            // AIO completions of earlier commands print when they are drained.
            self.emit_pending();
        }
        self.pending.extend(o.deferred.iter().cloned());
        self.failed |= o.failed;
        match o.exit {
            None => true,
            Some(Exit::Quit) => false,
            Some(Exit::Raise(sig)) => {
                self.emit_pending();
                self.stdout.flush();
                raise(sig);
                true
            }
            Some(Exit::Abort) => std::process::abort(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_like_getopt_long() {
        let Parse::Run(o) = parse_args(&args(&[
            "-c",
            "read 0 1",
            "img",
            "--cache=none",
            "--aio",
            "io_uring",
            "-Ur",
            "--snap",
            "-d",
            "ignore",
            "--object",
            "secret,id=s0,data=x",
        ])) else {
            panic!("should parse");
        };
        assert_eq!(o.commands, ["read 0 1"]);
        assert_eq!(o.file.as_deref(), Some("img"));
        assert!(o.open.cache.direct && !o.open.cache.writethrough);
        assert_eq!(o.open.aio, AioMode::IoUring);
        assert!(o.force_share && o.open.force_share && o.open.read_only && o.open.snapshot);
        assert!(!o.open.discard_unmap);
        assert_eq!(o.objects[0].id, "s0");
    }

    #[test]
    fn lines_as_fgets_reads_them() {
        let long = format!("{}\nread 0 1", "x".repeat(1500));
        let mut input = std::io::Cursor::new(long.into_bytes());
        assert_eq!(fgets(&mut input).map(|l| l.len()), Some(1023));
        assert_eq!(fgets(&mut input).map(|l| l.len()), Some(478));
        assert_eq!(fgets(&mut input), Some(b"read 0 1".to_vec()));
        assert_eq!(fgets(&mut input), None);
    }

    #[test]
    fn option_lists() {
        assert_eq!(
            split_opts("driver=qcow2,file.filename=a,,b,x", None),
            [
                ("driver".to_string(), "qcow2".to_string()),
                ("file.filename".to_string(), "a,b".to_string()),
                ("x".to_string(), "on".to_string())
            ]
        );
        assert!(parse_object("foo,id=x").is_err());
        assert!(parse_object("secret").is_err());
        assert_eq!(CacheMode::parse("bogus"), None);
        assert!(CacheMode::parse("unsafe").is_some_and(|m| m.no_flush));
    }
}
