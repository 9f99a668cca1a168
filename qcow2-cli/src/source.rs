//! Opening an image read-only as a guest disk (qcow2 with its backing chain, or raw) for
//! the commands that read guest data: compare, measure, dd.

use qcow2_image::{BackingImage, Image, RawDisk};
use qcow2_io::FileStorage;

use crate::image::{self, Format, Opened};
use crate::qcowdev;
use crate::CliError;

/// An image opened for reading guest data.
pub struct Disk {
    /// What the format probe or header read found.
    pub opened: Opened,
    /// The guest disk.
    pub disk: Box<dyn BackingImage>,
}

/// Parses a `-f` value for `path`: an unknown name fails that image's open with QEMU's
/// "Unknown driver" message.
pub fn parse_format(path: &str, fmt: Option<&str>) -> Result<Option<Format>, CliError> {
    match fmt {
        None => Ok(None),
        Some(f) => Format::parse(f)
            .map(Some)
            .map_err(|_| image::open_error(path, format_args!("Unknown driver '{f}'"))),
    }
}

/// Opens `path` read-only with format `fmt` (probed when absent); errors are qemu-img's
/// "Could not open 'FILE': ..." lines.
pub fn open(path: &str, fmt: Option<&str>) -> Result<Disk, CliError> {
    let format = parse_format(path, fmt)?;
    let opened = image::open(path, format, false)?;
    let disk: Box<dyn BackingImage> = match opened.format {
        Format::Raw => {
            let storage = FileStorage::open(path, false)
                .map_err(|e| image::open_error(path, image::strerror(&e)))?;
            Box::new(RawDisk::new(storage).map_err(|e| image::open_error(path, e))?)
        }
        Format::Qcow2 => {
            let img: Image =
                qcowdev::open_image(path, true).map_err(|e| image::open_error(path, e))?;
            Box::new(img)
        }
    };
    Ok(Disk { opened, disk })
}
