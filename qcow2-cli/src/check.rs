//! `qcow2 check`: the qcow2-check crate with qemu-img check's command line, output, exit
//! codes (0 clean, 1 not completed, 2 corruptions, 3 leaks only, 63 format without checks)
//! and diagnostics on stderr.

use std::sync::Arc;

use qcow2_check::{check_with_progress, CheckOptions, RepairMode};
use qcow2_io::{FileStorage, Storage};

use crate::image::{self, Format};
use crate::{out, CliError, OutputFormat};

/// The arguments of `check`, checked.
pub struct CheckRequest {
    /// The image file.
    pub file: String,
    /// `-f`.
    pub format: Option<Format>,
    /// `-r`.
    pub repair: Option<RepairMode>,
    /// `--output`.
    pub output: OutputFormat,
    /// `-q`.
    pub quiet: bool,
    /// `-p`.
    pub progress: bool,
}

/// Parses `-r`, with qemu-img's message.
pub fn parse_repair(v: Option<&str>) -> Result<Option<RepairMode>, CliError> {
    match v {
        None => Ok(None),
        Some("leaks") => Ok(Some(RepairMode::Leaks)),
        Some("all") => Ok(Some(RepairMode::All)),
        Some(other) => Err(CliError::new(format!(
            "--repair (-r) expects 'leaks' or 'all' not '{other}'"
        ))),
    }
}

/// Runs `check`; the exit status is the report's.
pub fn run(req: CheckRequest) -> Result<(), CliError> {
    let file = &req.file;
    let format = match req.format {
        Some(f) => f,
        None => image::probe(file)?,
    };
    if format == Format::Raw {
        return Err(CliError {
            msg: "This image format does not support checks".into(),
            code: 63,
        });
    }
    let storage =
        FileStorage::open(crate::image::file_name(file), req.repair.is_some()).map_err(|e| {
            image::open_error(
                file,
                format_args!("Could not open '{file}': {}", image::strerror(&e)),
            )
        })?;
    image::lock(&storage, file, image::FileRole::Qcow2, req.repair.is_some())
        .map_err(|e| image::open_error(file, e))?;
    // QEMU's open prints its warnings before the check runs.
    image::warn_on_open(&storage);
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let bar = req.progress.then(|| {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template("    ({percent:>3}/100%) {wide_bar}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut progress = |done: u64, total: u64| {
        if let Some(b) = &bar {
            b.set_length(total.max(1));
            b.set_position(done.min(total));
        }
    };
    let opts = CheckOptions { repair: req.repair };
    let report = check_with_progress(storage, &opts, &mut progress)
        .map_err(|e| image::open_error(file, e))?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let diagnostics = report.render_stderr();
    if !diagnostics.is_empty() {
        eprint!(
            "{}",
            diagnostics.replace("qemu-img: ", &crate::prog::prefix())
        );
    }
    if !req.quiet {
        match req.output {
            OutputFormat::Human => out(&report.render_human()),
            OutputFormat::Json => out(&report.render_json(file)),
        }
    }
    if req.repair.is_some() && matches!(report.exit_code(), 0 | 3) {
        // QEMU's check -r runs on a writable open, which loads the persistent bitmaps
        // (marking them in use) and stores them again at close.
        restore_bitmaps(file)?;
    }
    match report.exit_code() {
        0 => Ok(()),
        code => Err(CliError {
            msg: String::new(),
            code: u8::try_from(code).unwrap_or(1),
        }),
    }
}

/// The bitmap part of QEMU's writable open and close around a repair: consistent bitmaps
/// are loaded, marked in use and stored again (a no-op without bitmaps).
fn restore_bitmaps(file: &str) -> Result<(), CliError> {
    let has_bitmaps = image::open(file, Some(Format::Qcow2), false)
        .ok()
        .and_then(|o| o.qcow2)
        .is_some_and(|q| q.bitmaps.iter().any(|b| !b.in_use()));
    if !has_bitmaps {
        return Ok(());
    }
    let mut img =
        crate::qcowdev::open_image(file, false).map_err(|e| image::open_error(file, e))?;
    let stored = img.begin_bitmap_session().and_then(|()| img.close());
    stored.map_err(|e| CliError::new(crate::qcowdev::error_text(&e)))
}
