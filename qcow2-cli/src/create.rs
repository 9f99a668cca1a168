//! `qcow2 create`: qemu-img create's options, checks, messages and output.
//!
//! The order of events follows `img_create` / `bdrv_img_create`: the size argument, the
//! format, the `-o` list (name and type errors), the size-once rule, the backing file
//! (opened unless `-u`, giving the size when none was given), then the "Formatting" line,
//! then the driver's checks (compat, preallocation, compression type and the layout rules)
//! and the write. The qcow2 bytes come from `qcow2_format::layout`, which reproduces
//! `qemu-img create` (preallocation=off) byte for byte.

use std::io::Write;

use qcow2_format::features::CompressionType;
use qcow2_format::layout::{fresh_image, Compat, CreateOptions, LayoutError};
use qcow2_image::{Image, Preallocation};

use crate::image::{self, Format};
use crate::opts::{parse_bool, parse_number, OptList};
use crate::size::parse_size;
use crate::{out, CliError};

/// The arguments of `create`, already split by the argument parser.
pub struct CreateRequest {
    /// `-f`.
    pub format: Option<String>,
    /// `-o` lists.
    pub options: Vec<String>,
    /// `-b`.
    pub backing: Option<String>,
    /// `-F`.
    pub backing_format: Option<String>,
    /// `-u`.
    pub backing_unsafe: bool,
    /// `-q`.
    pub quiet: bool,
    /// FILENAME.
    pub filename: Option<String>,
    /// SIZE.
    pub size: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Size,
    Number,
    Bool,
    Str,
}

/// qcow2's create options in the order qemu-img prints them, with their types and defaults.
const QCOW2_OPTS: &[(&str, Kind, Option<&str>, &str)] = &[
    (
        "encryption",
        Kind::Bool,
        None,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    (
        "encrypt.format",
        Kind::Str,
        None,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    (
        "encrypt.key-secret",
        Kind::Str,
        None,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    (
        "encrypt.cipher-alg",
        Kind::Str,
        None,
        "Name of encryption cipher algorithm",
    ),
    (
        "encrypt.cipher-mode",
        Kind::Str,
        None,
        "Name of encryption cipher mode",
    ),
    (
        "encrypt.ivgen-alg",
        Kind::Str,
        None,
        "Name of IV generator algorithm",
    ),
    (
        "encrypt.ivgen-hash-alg",
        Kind::Str,
        None,
        "Name of IV generator hash algorithm",
    ),
    (
        "encrypt.hash-alg",
        Kind::Str,
        None,
        "Name of encryption hash algorithm",
    ),
    (
        "encrypt.iter-time",
        Kind::Number,
        None,
        "Time to spend in PBKDF in milliseconds",
    ),
    (
        "cluster_size",
        Kind::Size,
        Some("65536"),
        "qcow2 cluster size",
    ),
    ("extended_l2", Kind::Bool, Some("off"), "Extended L2 tables"),
    (
        "preallocation",
        Kind::Str,
        None,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    (
        "compression_type",
        Kind::Str,
        Some("zlib"),
        "Compression method used for image cluster compression",
    ),
    ("size", Kind::Size, None, "Virtual disk size"),
    (
        "compat",
        Kind::Str,
        None,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    ("backing_file", Kind::Str, None, "File name of a base image"),
    (
        "backing_fmt",
        Kind::Str,
        None,
        "Image format of the base image",
    ),
    (
        "data_file",
        Kind::Str,
        None,
        "File name of an external data file",
    ),
    (
        "data_file_raw",
        Kind::Bool,
        None,
        "The external data file must stay valid as a raw image",
    ),
    (
        "lazy_refcounts",
        Kind::Bool,
        Some("off"),
        "Postpone refcount updates",
    ),
    (
        "refcount_bits",
        Kind::Number,
        Some("16"),
        "Width of a reference count entry in bits",
    ),
];

/// raw's create options (the raw driver's and the file protocol's).
const RAW_OPTS: &[(&str, Kind, Option<&str>, &str)] = &[
    ("size", Kind::Size, None, "Virtual disk size"),
    (
        "preallocation",
        Kind::Str,
        None,
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
];

fn option_table(
    fmt: Format,
) -> &'static [(&'static str, Kind, Option<&'static str>, &'static str)] {
    match fmt {
        Format::Qcow2 => QCOW2_OPTS,
        Format::Raw => RAW_OPTS,
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Size => "<size>",
        Kind::Number => "<num>",
        Kind::Bool => "<bool (on/off)>",
        Kind::Str => "<str>",
    }
}

/// Prints `-o help` for a format, as qemu-img does (sorted by name).
pub fn print_option_help(fmt: Format, create: bool) {
    let mut rows: Vec<_> = option_table(fmt)
        .iter()
        .filter(|(n, ..)| {
            create
                || !matches!(
                    *n,
                    "cluster_size"
                        | "preallocation"
                        | "encryption"
                        | "extended_l2"
                        | "compression_type"
                )
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    let mut text = format!("Supported {} options:\n", fmt.name());
    for (name, kind, _, help) in rows {
        let left = format!("{name}={}", kind_name(*kind));
        text.push_str(&format!("  {left:<22} - {help}\n"));
    }
    text.push_str("\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n");
    out(&text);
}

/// A parsed option value: the text qemu-img prints and the typed value.
#[derive(Clone)]
struct Value {
    text: String,
    num: u64,
    flag: bool,
}

/// Checks one `-o` item's name and type (QEMU's `qemu_opt_set` errors).
fn typed(fmt: Format, name: &str, raw: &str) -> Result<(Kind, Value), String> {
    let Some((_, kind, ..)) = option_table(fmt).iter().find(|(n, ..)| *n == name) else {
        return Err(format!("Invalid parameter '{name}'"));
    };
    let mut v = Value {
        text: raw.to_string(),
        num: 0,
        flag: false,
    };
    match kind {
        Kind::Size => {
            v.num = parse_size(raw).map_err(|_| {
                format!(
                    "Parameter '{name}' expects a non-negative number below 2^64\n\
                     Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                     and exabytes, respectively."
                )
            })?;
            v.text = v.num.to_string();
        }
        Kind::Number => {
            v.num =
                parse_number(raw).ok_or_else(|| format!("Parameter '{name}' expects a number"))?;
            v.text = v.num.to_string();
        }
        Kind::Bool => {
            v.flag = parse_bool(raw)
                .ok_or_else(|| format!("Parameter '{name}' expects 'on' or 'off'"))?;
        }
        Kind::Str => {}
    }
    Ok((*kind, v))
}

/// Parses the positional size as qemu-img does (`cvtnum`), with its messages.
pub fn parse_image_size(s: &str) -> Result<u64, CliError> {
    match parse_size(s) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) | Err(crate::size::SizeError::Overflow) => Err(CliError::new(
            "Invalid image size specified. Must be between 0 and 9223372036854775807.",
        )),
        Err(crate::size::SizeError::Invalid) => Err(CliError::new(format!(
            "Invalid image size specified: '{s}'."
        ))),
    }
}

/// Runs `create`.
pub fn run(req: CreateRequest) -> Result<(), CliError> {
    let fmt_name = req.format.clone().unwrap_or_else(|| "raw".to_string());
    // -o help works without a file name.
    if let Ok(list) = OptList::parse(&req.options) {
        if list.help {
            let fmt = Format::parse(&fmt_name).map_err(CliError::new)?;
            print_option_help(fmt, true);
            return Ok(());
        }
    }
    let Some(filename) = req.filename.clone() else {
        return Err(CliError::usage("create", "Expecting image file name"));
    };
    let img_size = req.size.as_deref().map(parse_image_size).transpose()?;
    let in_file = |m: String| CliError::new(format!("{filename}: {m}"));

    let fmt = Format::parse(&fmt_name).map_err(in_file)?;
    let list = OptList::parse(&req.options)
        .map_err(|l| CliError::new(format!("Invalid option list: {l}")))?;
    let mut values: Vec<(String, Kind, Value)> = Vec::new();
    for (name, raw) in &list.items {
        let (kind, v) = typed(fmt, name, raw).map_err(in_file)?;
        values.push((name.clone(), kind, v));
    }
    let get = |values: &[(String, Kind, Value)], n: &str| {
        values
            .iter()
            .find(|(k, ..)| k == n)
            .map(|(_, _, v)| v.clone())
    };
    let set = |values: &mut Vec<(String, Kind, Value)>, n: &str, kind: Kind, v: Value| {
        if let Some(slot) = values.iter_mut().find(|(k, ..)| k == n) {
            slot.2 = v;
        } else {
            values.push((n.to_string(), kind, v));
        }
    };
    let sized = |n: u64| Value {
        text: n.to_string(),
        num: n,
        flag: false,
    };
    let texted = |t: &str| Value {
        text: t.to_string(),
        num: 0,
        flag: false,
    };
    match (get(&values, "size"), img_size) {
        (None, Some(s)) => set(&mut values, "size", Kind::Size, sized(s)),
        (Some(_), Some(_)) => {
            return Err(in_file("The image size must be specified only once".into()))
        }
        _ => {}
    }
    if let Some(b) = &req.backing {
        if fmt != Format::Qcow2 {
            return Err(in_file(format!(
                "Backing file not supported for file format '{}'",
                fmt.name()
            )));
        }
        set(&mut values, "backing_file", Kind::Str, texted(b));
    }
    if let Some(f) = &req.backing_format {
        if fmt != Format::Qcow2 {
            return Err(in_file(format!(
                "Backing file format not supported for file format '{}'",
                fmt.name()
            )));
        }
        set(&mut values, "backing_fmt", Kind::Str, texted(f));
    }
    let backing_file = get(&values, "backing_file").map(|v| v.text);
    let backing_fmt = get(&values, "backing_fmt").map(|v| v.text);
    if let Some(b) = &backing_file {
        if *b == filename {
            return Err(in_file(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            ));
        }
        if b.is_empty() {
            return Err(in_file(
                "Expected backing file name, got empty string".into(),
            ));
        }
        if !req.backing_unsafe {
            let full = image::path_combine(&filename, b);
            let want = backing_fmt
                .as_deref()
                .map(Format::parse)
                .transpose()
                .map_err(in_file)?;
            // QEMU appends a hint line (no program prefix) to any failure to open the
            // backing file.
            let (bsize, _) = image::backing_size(&full, want)
                .map_err(|e| in_file(format!("{e}\nCould not open backing image.")))?;
            if backing_fmt.is_none() {
                return Err(in_file(
                    "Backing file specified without backing format".into(),
                ));
            }
            if get(&values, "size").is_none() {
                set(&mut values, "size", Kind::Size, sized(bsize));
            }
        } else if backing_fmt.is_none() {
            return Err(in_file(
                "Backing file specified without backing format".into(),
            ));
        }
    }
    let Some(size) = get(&values, "size").map(|v| v.num) else {
        return Err(in_file("Image creation needs a size parameter".into()));
    };

    if !req.quiet {
        let mut line = format!("Formatting '{filename}', fmt={}", fmt.name());
        for (name, _, default, _) in option_table(fmt) {
            let text = match get(&values, name) {
                Some(v) => v.text,
                None => match default {
                    Some(d) => (*d).to_string(),
                    None => continue,
                },
            };
            line.push_str(&format!(" {name}={text}"));
        }
        line.push('\n');
        out(&line);
        // QEMU flushes the line before creating: its errors come after it.
        crate::stdio::flush();
    }

    match fmt {
        Format::Raw => create_raw(
            &filename,
            size,
            get(&values, "preallocation").map(|v| v.text),
        ),
        Format::Qcow2 => {
            let flag = |n: &str| get(&values, n).map(|v| v.flag);
            let text = |n: &str| get(&values, n).map(|v| v.text);
            let compat = match text("compat").as_deref() {
                None | Some("1.1") | Some("v3") => Compat::V1_1,
                Some("0.10") | Some("v2") => Compat::V0_10,
                Some(other) => {
                    return Err(in_file(format!(
                        "Parameter 'version' does not accept value '{other}'"
                    )))
                }
            };
            let prealloc = text("preallocation");
            match prealloc.as_deref() {
                None | Some("off") | Some("metadata") | Some("falloc") | Some("full") => {}
                Some(other) => {
                    return Err(in_file(format!(
                        "Parameter 'preallocation' does not accept value '{other}'"
                    )))
                }
            }
            let compression_type = match text("compression_type").as_deref() {
                None | Some("zlib") => CompressionType::Deflate,
                Some("zstd") => CompressionType::Zstd,
                Some(other) => {
                    return Err(in_file(format!(
                        "Parameter 'compression-type' does not accept value '{other}'"
                    )))
                }
            };
            let mut opts = CreateOptions::new(size);
            opts.data_file = text("data_file");
            opts.data_file_raw = flag("data_file_raw").unwrap_or(false);
            if let Some(cs) = get(&values, "cluster_size") {
                opts.cluster_size = cs.num;
            }
            if let Some(rb) = get(&values, "refcount_bits") {
                // Anything above u32 is not a valid width either; 3 keeps the check's message.
                opts.refcount_bits = u32::try_from(rb.num).unwrap_or(3);
            }
            opts.compat = compat;
            opts.lazy_refcounts = flag("lazy_refcounts").unwrap_or(false);
            opts.extended_l2 = flag("extended_l2").unwrap_or(false);
            opts.compression_type = compression_type;
            opts.backing_file = backing_file;
            opts.backing_format = backing_fmt;
            let prealloc = match prealloc.as_deref() {
                Some("metadata") => Preallocation::Metadata,
                Some("falloc") => Preallocation::Falloc,
                Some("full") => Preallocation::Full,
                _ => Preallocation::Off,
            };
            let layout_error = |e: LayoutError| {
                match e {
                LayoutError::ImageTooBig { .. } => in_file(
                    "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                        .into(),
                ),
                other => in_file(other.to_string()),
            }
            };
            // QEMU checks the layout options before it sets up encryption (which takes the
            // PBKDF2 benchmark's seconds).
            let mut fresh = fresh_image(&opts).map_err(layout_error)?;
            let text_of = |n: &str| text(n);
            let mut secret = None;
            if let Some(enc) = crate::encryption::from_options(&text_of).map_err(in_file)? {
                opts.luks_area = Some(enc.area);
                secret = Some(enc.secret);
                fresh = fresh_image(&opts).map_err(layout_error)?;
            }
            if prealloc != Preallocation::Off || opts.data_file.is_some() {
                return create_preallocated(&filename, &opts, prealloc, secret);
            }
            let storage = image::create_file(&filename, image::FileRole::Qcow2)?;
            let file = storage.file();
            // Each structure on its own, as QEMU writes them: what lies between (the rest
            // of the L1 table's cluster before a LUKS area) stays a hole, so the disk
            // usage `info` reports is QEMU's too.
            use std::os::unix::fs::FileExt;
            fresh
                .writes
                .iter()
                .try_for_each(|(off, bytes)| file.write_all_at(bytes, *off))
                .and_then(|_| file.set_len(fresh.file_length))
                .and_then(|_| file.sync_all())
                .map_err(|e| in_file(format!("Could not write image: {}", image::strerror(&e))))?;
            Ok(())
        }
    }
}

/// Creation through the image facade: `preallocation=metadata|falloc|full` (the same layout
/// as `preallocation=off`, then every L2 table and data cluster allocated, the file
/// extended over them, fallocated or zero-written, as qemu-img does) and external data
/// files (created, like qemu-img, at the name as given, i.e. relative to the working
/// directory, and sized to the disk).
fn create_preallocated(
    filename: &str,
    layout: &CreateOptions,
    preallocation: Preallocation,
    key_secret: Option<qcow2_image::Secret>,
) -> Result<(), CliError> {
    let in_file = |m: String| CliError::new(format!("{filename}: {m}"));
    let opts = qcow2_image::CreateOptions {
        layout: layout.clone(),
        preallocation,
    };
    // qemu-img refuses this before it touches the file.
    if opts.backing_file.is_some() && !opts.extended_l2 {
        return Err(in_file(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
                .into(),
        ));
    }
    let create_error = |e: qcow2_image::ImageError| {
        if e.is_locked() {
            // qemu-img: "FILE: Failed to get \"write\" lock" and the hint line.
            return in_file(crate::qcowdev::error_text(&e));
        }
        in_file(format!(
            "Could not create image: {}",
            crate::qcowdev::error_text(&e)
        ))
    };
    let mut open = qcow2_image::OpenOptions {
        backing: qcow2_image::BackingPolicy::Ignore,
        key_secret,
        ..qcow2_image::OpenOptions::default()
    };
    let img = match &opts.data_file {
        None if open.key_secret.is_none() => {
            Image::create_path(filename, &opts).map_err(create_error)?
        }
        None => {
            let meta = image::create_file(filename, image::FileRole::Qcow2)?;
            Image::create_with(std::sync::Arc::new(meta), &opts, &open).map_err(create_error)?
        }
        Some(name) => {
            // qemu-img names the image in front of the data file's errors.
            let data = image::create_file_for(name, image::FileRole::NewFile, filename)?;
            let meta = image::create_file(filename, image::FileRole::Qcow2)?;
            open.data_file = Some(qcow2_image::DataFileStorage(std::sync::Arc::new(data)));
            Image::create_with(std::sync::Arc::new(meta), &opts, &open).map_err(create_error)?
        }
    };
    img.close().map_err(|e| {
        in_file(format!(
            "Could not create image: {}",
            crate::qcowdev::error_text(&e)
        ))
    })
}

fn create_raw(filename: &str, size: u64, prealloc: Option<String>) -> Result<(), CliError> {
    let in_file = |m: String| CliError::new(format!("{filename}: {m}"));
    match prealloc.as_deref() {
        None | Some("off") | Some("full") => {}
        Some("falloc") => {
            return Err(in_file(
                "preallocation=falloc is not available for raw images in this tool".into(),
            ))
        }
        Some(other) => {
            return Err(in_file(format!(
                "Parameter 'preallocation' does not accept value '{other}'"
            )))
        }
    }
    let storage = image::create_file(filename, image::FileRole::NewFile)?;
    let mut file = storage.file();
    let res = if prealloc.as_deref() == Some("full") {
        let chunk = vec![0u8; 1 << 20];
        let mut left = size;
        let mut r = Ok(());
        while left > 0 && r.is_ok() {
            let n = left.min(chunk.len() as u64) as usize;
            r = file.write_all(&chunk[..n]);
            left -= n as u64;
        }
        r
    } else {
        file.set_len(size)
    };
    res.and_then(|_| file.sync_all())
        .map_err(|e| in_file(format!("Could not resize file: {}", image::strerror(&e))))
}

/// Prints `amend -o help` for qcow2, as qemu-img 10.0.2 does (the amend options only).
pub fn print_amend_help() {
    let rows: [(&str, &str); 13] = [
        ("backing_file=<str>", "File name of a base image"),
        ("backing_fmt=<str>", "Image format of the base image"),
        (
            "compat=<str>",
            "Compatibility level (v2 [0.10] or v3 [1.1])",
        ),
        ("data_file=<str>", "File name of an external data file"),
        (
            "data_file_raw=<bool (on/off)>",
            "The external data file must stay valid as a raw image",
        ),
        (
            "encrypt.iter-time=<num>",
            "Time to spend in PBKDF in milliseconds",
        ),
        (
            "encrypt.keyslot=<num>",
            "Select a single keyslot to modify explicitly",
        ),
        (
            "encrypt.new-secret=<str>",
            "New secret to set in the matching keyslots. Empty string to erase",
        ),
        (
            "encrypt.old-secret=<str>",
            "Select all keyslots that match this password",
        ),
        (
            "encrypt.state=<str>",
            "Select new state of affected keyslots (active/inactive)",
        ),
        (
            "lazy_refcounts=<bool (on/off)>",
            "Postpone refcount updates",
        ),
        (
            "refcount_bits=<num>",
            "Width of a reference count entry in bits",
        ),
        ("size=<size>", "Virtual disk size"),
    ];
    let mut text = String::from("Amend options for 'qcow2':\n");
    for (left, help) in rows {
        text.push_str(&format!("  {left:<22} - {help}\n"));
    }
    out(&text);
}

/// One checked `-o` option of a conversion target: the name, the value as qemu-img prints
/// it, and the parsed number (sizes and numbers) or flag (booleans).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetOption {
    /// Option name.
    pub name: String,
    /// Value text (sizes and numbers in decimal bytes).
    pub text: String,
    /// Parsed size or number (0 otherwise).
    pub num: u64,
    /// Parsed boolean (false otherwise).
    pub flag: bool,
}

/// Parses the `-o` lists of `convert` against `fmt`'s create options, with qemu-img's
/// messages ("Invalid option list: ", "Invalid parameter 'x'", "Parameter 'x' expects
/// ..."). A later value of the same name replaces an earlier one.
pub fn target_options(fmt: Format, lists: &[String]) -> Result<Vec<TargetOption>, CliError> {
    let list =
        OptList::parse(lists).map_err(|l| CliError::new(format!("Invalid option list: {l}")))?;
    let mut out = Vec::new();
    for (name, raw) in &list.items {
        let (_, v) = typed(fmt, name, raw).map_err(CliError::new)?;
        out.push(TargetOption {
            name: name.clone(),
            text: v.text,
            num: v.num,
            flag: v.flag,
        });
    }
    Ok(out)
}
