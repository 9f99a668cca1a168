//! `qcow2 amend`: changes options of an existing qcow2 image in place through the image
//! facade ([`qcow2_image::AmendOptions`]), with qemu-img amend's command-line order and
//! messages: the `-o` lists are joined and parsed the way QemuOpts parses them (names and
//! types first: "Invalid parameter 'x'", with the hint "This option is only supported for
//! image creation" when every name is at least a creation option; "Parameter 'x' expects
//! ..."), then the engine's parser and amend give the driver's refusals. Exit status 0 on
//! success, 1 on any error.

use qcow2_image::{AmendOptions, ImageError};

use crate::create::print_amend_help;
use crate::image::{self, Format};
use crate::opts::{parse_bool, parse_number, OptList};
use crate::progress::Progress;
use crate::qcowdev;
use crate::size::parse_size;
use crate::CliError;

/// The arguments of `amend`.
pub struct AmendRequest {
    /// The image file.
    pub file: String,
    /// `-f`.
    pub format: Option<Format>,
    /// The `-o` lists, in order.
    pub options: Vec<String>,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// `--force`: LUKS key-slot changes that may lose the key (erasing the last active
    /// slot, overwriting an active one).
    pub force: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    Size,
    Number,
    Bool,
    Str,
}

/// qcow2's amend options (QEMU's `qcow2_amend_opts` plus the LUKS ones it lists).
const AMEND_OPTS: &[(&str, Kind)] = &[
    ("size", Kind::Size),
    ("compat", Kind::Str),
    ("backing_file", Kind::Str),
    ("backing_fmt", Kind::Str),
    ("data_file", Kind::Str),
    ("data_file_raw", Kind::Bool),
    ("lazy_refcounts", Kind::Bool),
    ("refcount_bits", Kind::Number),
    ("encrypt.state", Kind::Str),
    ("encrypt.keyslot", Kind::Number),
    ("encrypt.old-secret", Kind::Str),
    ("encrypt.new-secret", Kind::Str),
    ("encrypt.iter-time", Kind::Number),
];

/// Names only `create` knows (qcow2's and the file protocol's create options).
const CREATE_ONLY: &[&str] = &[
    "encryption",
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "nocow",
    "extent_size_hint",
];

/// QEMU's messages for an option's value of the wrong type.
fn check_type(name: &str, kind: Kind, value: &str) -> Result<String, String> {
    match kind {
        Kind::Size => parse_size(value).map(|n| n.to_string()).map_err(|_| {
            format!(
                "Parameter '{name}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            )
        }),
        Kind::Number => parse_number(value)
            .map(|n| n.to_string())
            .ok_or_else(|| format!("Parameter '{name}' expects a number")),
        Kind::Bool => parse_bool(value)
            .map(|b| if b { "on" } else { "off" }.to_string())
            .ok_or_else(|| format!("Parameter '{name}' expects 'on' or 'off'")),
        Kind::Str => Ok(value.to_string()),
    }
}

/// Parses the joined `-o` lists as QemuOpts would against the amend options, and returns the
/// normalized `name=value` text for [`AmendOptions::parse`].
fn normalize(list: &OptList) -> Result<String, CliError> {
    let mut items = Vec::new();
    for (name, value) in &list.items {
        match AMEND_OPTS.iter().find(|(n, _)| n == name) {
            Some((_, kind)) => {
                let v = check_type(name, *kind, value).map_err(CliError::new)?;
                items.push(format!("{name}={v}"));
            }
            None => {
                let mut msg = format!("Invalid parameter '{name}'");
                let all_known = list.items.iter().all(|(n, _)| {
                    CREATE_ONLY.contains(&n.as_str()) || AMEND_OPTS.iter().any(|(a, _)| a == n)
                });
                if all_known {
                    msg.push_str("\nThis option is only supported for image creation");
                }
                return Err(CliError::new(msg));
            }
        }
    }
    Ok(items.join(","))
}

/// The text of an engine error with QEMU's hint line after it, if any.
fn amend_error_text(e: &ImageError) -> String {
    let mut msg = qcowdev::error_text(e);
    // `error_text` already ends a lock conflict with its hint line.
    if let Some(h) = e.hint().filter(|_| !e.is_locked()) {
        msg.push('\n');
        msg.push_str(h);
    }
    msg
}

/// Runs `amend`.
pub fn run(req: AmendRequest) -> Result<(), CliError> {
    let list = OptList::parse(&req.options)
        .map_err(|l| CliError::new(format!("Invalid option list: {l}")))?;
    if list.help {
        // qemu-img opens the image to learn its format before printing the list.
        let format = match req.format {
            Some(f) => f,
            None => image::open(&req.file, None, false)?.format,
        };
        if format == Format::Raw {
            return Err(CliError::new(
                "Format driver 'raw' does not support option amendment",
            ));
        }
        print_amend_help();
        return Ok(());
    }
    let opened = image::open(&req.file, req.format, true)?;
    if opened.format == Format::Raw {
        return Err(CliError::new(
            "Format driver 'raw' does not support option amendment",
        ));
    }
    let text = normalize(&list)?;
    let mut opts = AmendOptions::parse(&text).map_err(|e| CliError::new(amend_error_text(&e)))?;
    opts.force = req.force;
    opts.secrets = crate::secrets::all();
    let mut img =
        qcowdev::open_image(&req.file, false).map_err(|e| image::open_error(&req.file, e))?;
    let mut progress = Progress::new(req.progress && !req.quiet, 1.0);
    progress.set(0.0);
    let result = img.amend_with_progress(&opts, &mut |done, total| {
        progress.set_ratio(done, total);
    });
    progress.set(100.0);
    progress.end();
    match result {
        Ok(()) => img.close().map_err(|e| {
            CliError::new(format!(
                "Error while closing the image: {}",
                qcowdev::error_text(&e)
            ))
        }),
        Err(e) => {
            let _ = img.close();
            Err(CliError::new(amend_error_text(&e)))
        }
    }
}
