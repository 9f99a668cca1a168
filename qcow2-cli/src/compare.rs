//! `qcow2 compare`: qemu-img compare's command line, messages and exit codes (0 identical,
//! 1 different, 2 open errors, 3 block-status errors, 4 read errors) over
//! [`qcow2_image::compare`].

use qcow2_image::{compare, CompareError, CompareOptions, CompareOutcome, Side};

use crate::progress::Progress;
use crate::{out, source, CliError};

/// The arguments of `compare`.
pub struct CompareRequest {
    /// `-f`: format of the first image.
    pub format_a: Option<String>,
    /// `-F`: format of the second image.
    pub format_b: Option<String>,
    /// `-T`: source cache mode (validated, then irrelevant to this engine).
    pub cache: Option<String>,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// `-s`.
    pub strict: bool,
    /// The image files.
    pub files: Vec<String>,
}

/// The cache modes QEMU's `bdrv_parse_cache_mode` accepts.
const CACHE_MODES: [&str; 6] = [
    "none",
    "off",
    "writeback",
    "writethrough",
    "directsync",
    "unsafe",
];

/// Runs `compare`.
pub fn run(req: CompareRequest) -> Result<(), CliError> {
    let [file_a, file_b] = req.files.as_slice() else {
        return Err(CliError::usage("compare", "Expecting two image file names"));
    };
    let with_code = |code: u8| {
        move |mut e: CliError| {
            e.code = code;
            e
        }
    };
    if let Some(c) = req.cache.as_deref() {
        if !CACHE_MODES.contains(&c) {
            return Err(CliError {
                msg: format!("Invalid source cache option: {c}"),
                code: 2,
            });
        }
    }
    let quiet = req.quiet;
    let mut a = source::open(file_a, req.format_a.as_deref()).map_err(with_code(2))?;
    let mut b = source::open(file_b, req.format_b.as_deref()).map_err(with_code(2))?;
    let mut progress = Progress::new(req.progress && !quiet, 2.0);
    // QEMU's accumulating qemu_progress_print(chunk / size * 100, 100), in f32 as in C.
    let (mut acc, mut prev) = (0f32, 0u64);
    let report = compare(
        a.disk.as_mut(),
        b.disk.as_mut(),
        CompareOptions { strict: req.strict },
        &mut |done, total| {
            let delta = (done.saturating_sub(prev) as f32 / total as f32) * 100.0;
            prev = done;
            acc += delta / 100.0 * 100.0;
            progress.set(acc);
        },
    );
    let say = |s: &str| {
        if !quiet {
            out(s);
        }
    };
    if report.size_mismatch_warning {
        say("Warning: Image size mismatch!\n");
    }
    let r = finish(file_a, file_b, report.result, &say);
    // qemu-img ends the progress line after the verdict.
    progress.end();
    r
}

fn finish(
    file_a: &str,
    file_b: &str,
    result: Result<CompareOutcome, CompareError>,
    say: &dyn Fn(&str),
) -> Result<(), CliError> {
    match result {
        Ok(CompareOutcome::Identical) => {
            say("Images are identical.\n");
            Ok(())
        }
        Ok(CompareOutcome::ContentMismatch { offset }) => {
            say(&format!("Content mismatch at offset {offset}!\n"));
            Err(CliError {
                msg: String::new(),
                code: 1,
            })
        }
        Ok(CompareOutcome::StrictSizeMismatch) => {
            say("Strict mode: Image size mismatch!\n");
            Err(CliError {
                msg: String::new(),
                code: 1,
            })
        }
        Ok(CompareOutcome::StrictStatusMismatch { offset }) => {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!\n"
            ));
            Err(CliError {
                msg: String::new(),
                code: 1,
            })
        }
        Err(e) => {
            let name = |s: Side| match s {
                Side::A => file_a,
                Side::B => file_b,
            };
            let msg = match &e {
                CompareError::Status { side, .. } => {
                    format!("Sector allocation test failed for {}", name(*side))
                }
                CompareError::Read {
                    side,
                    offset,
                    source,
                } => format!(
                    "Error while reading offset {offset} of {}: {}",
                    name(*side),
                    crate::io::strerror(source.errno())
                ),
            };
            Err(CliError {
                msg,
                code: e.exit_code(),
            })
        }
    }
}
