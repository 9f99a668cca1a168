//! `qcow2 resize`: qemu-img resize's size arithmetic, checks and messages. Raw files are
//! resized here; qcow2 images grow and shrink through the image facade.

use qcow2_io::Storage;

use crate::image::{self, Format};
use crate::size::parse_size;
use crate::{out, CliError};

/// The requested size: absolute, or relative to the current size (`+N`, `-N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeRequest {
    /// `N`.
    Absolute(u64),
    /// `+N`.
    Grow(u64),
    /// `-N`.
    Shrink(u64),
}

/// Parses `[+-]SIZE` with qemu-img's message ("Parameter 'size' expects ...").
pub fn parse_request(arg: &str) -> Result<SizeRequest, CliError> {
    let bad = || {
        CliError::new(
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively.",
        )
    };
    let (ctor, rest): (fn(u64) -> SizeRequest, &str) = match arg.as_bytes().first() {
        Some(b'+') => (SizeRequest::Grow, &arg[1..]),
        Some(b'-') => (SizeRequest::Shrink, &arg[1..]),
        _ => (SizeRequest::Absolute, arg),
    };
    parse_size(rest).map(ctor).map_err(|_| bad())
}

/// The new size from the current one, or qemu-img's "New image size must be positive"
/// (sizes are signed 64-bit in QEMU: anything at or above 2^63 wraps negative).
pub fn new_size(current: u64, req: SizeRequest) -> Result<u64, CliError> {
    let positive = |v: i128| {
        if v > 0 && v <= i128::from(i64::MAX) {
            Ok(v as u64)
        } else {
            Err(CliError::new("New image size must be positive"))
        }
    };
    // QEMU computes in int64_t; a value above i64::MAX is already negative there.
    let as_i64 = |n: u64| i128::from(n as i64);
    match req {
        SizeRequest::Absolute(n) => positive(as_i64(n)),
        SizeRequest::Grow(n) => positive(i128::from(current) + as_i64(n)),
        SizeRequest::Shrink(n) => positive(i128::from(current) - as_i64(n)),
    }
}

/// Runs `resize` (raw files here, qcow2 images through the facade).
pub fn run(
    file: &str,
    format: Option<Format>,
    size_arg: &str,
    shrink: bool,
    quiet: bool,
) -> Result<(), CliError> {
    let req = parse_request(size_arg)?;
    let opened = image::open(file, format, true)?;
    if opened.format == Format::Qcow2 {
        return resize_qcow2(file, req, shrink, quiet);
    }
    let current = opened.file_len;
    let new = new_size(current, req)?;
    if new < current && !shrink {
        return Err(shrink_refusal());
    }
    let storage = qcow2_io::FileStorage::open(crate::image::file_name(file), true)
        .map_err(|e| image::open_error(file, image::strerror(&e)))?;
    image::lock(&storage, file, image::FileRole::Raw { resize: true }, true)
        .map_err(|e| image::open_error(file, e))?;
    storage
        .set_len(new)
        .and_then(|_| storage.flush())
        .map_err(|e| CliError::new(format!("Could not resize file: {}", image::strerror(&e))))?;
    if !quiet {
        out("Image resized.\n");
    }
    Ok(())
}

/// qemu-img's refusal of a shrink without `--shrink`: the error and its warning line.
fn shrink_refusal() -> CliError {
    CliError::new(format!(
        "Use the --shrink option to perform a shrink operation.\n\
         {}warning: Shrinking an image will delete all data beyond the shrunken image's \
         end. Before performing such an operation, make sure there is no important data there.",
        crate::prog::prefix()
    ))
}

/// Grows or shrinks a qcow2 image through the image facade (QEMU's `qcow2_co_truncate`:
/// sizes must be multiples of 512, v2 images with snapshots cannot be resized; both refusals
/// are the engine's, with QEMU's messages).
fn resize_qcow2(file: &str, req: SizeRequest, shrink: bool, quiet: bool) -> Result<(), CliError> {
    let mut img =
        crate::qcowdev::open_image(file, false).map_err(|e| image::open_error(file, e))?;
    let current = img.virtual_size();
    let new = new_size(current, req)?;
    if new < current && !shrink {
        return Err(shrink_refusal());
    }
    if let Err(e) = img.resize(new) {
        let _ = img.close();
        return Err(CliError::new(crate::qcowdev::error_text(&e)));
    }
    img.close().map_err(|e| {
        CliError::new(format!(
            "Error while closing the image: {}",
            crate::qcowdev::error_text(&e)
        ))
    })?;
    if !quiet {
        out("Image resized.\n");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic() {
        assert_eq!(parse_request("+1M").unwrap(), SizeRequest::Grow(1 << 20));
        assert_eq!(parse_request("-1M").unwrap(), SizeRequest::Shrink(1 << 20));
        assert_eq!(parse_request("2G").unwrap(), SizeRequest::Absolute(2 << 30));
        assert!(parse_request("1.5").is_err());
        assert_eq!(
            new_size(1 << 20, SizeRequest::Grow(1 << 20)).unwrap(),
            2 << 20
        );
        assert!(new_size(1 << 20, SizeRequest::Shrink(100 << 20)).is_err());
        assert!(new_size(0, SizeRequest::Absolute(9 << 60)).is_err());
        assert!(new_size(1, SizeRequest::Absolute(0)).is_err());
    }
}
