//! Opening an image read-only as a guest disk (qcow2 with its backing chain, or raw) for
//! the commands that read guest data: compare, measure, dd.

use qcow2_format::SnapshotEntry;
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
        Some(f) if QEMU_ONLY_FORMATS.contains(&f) => Err(image::open_error(
            path,
            format_args!("format '{f}' is not available in this tool"),
        )),
        Some(f) => Format::parse(f)
            .map(Some)
            .map_err(|_| image::open_error(path, format_args!("Unknown driver '{f}'"))),
    }
}

/// Image formats QEMU has and this tool does not (refused honestly rather than as unknown).
pub const QEMU_ONLY_FORMATS: [&str; 11] = [
    "vmdk",
    "vdi",
    "vhdx",
    "vpc",
    "qed",
    "luks",
    "parallels",
    "dmg",
    "bochs",
    "cloop",
    "qcow",
];

/// Opens `path` read-only with format `fmt` (probed when absent); errors are qemu-img's
/// "Could not open 'FILE': ..." lines.
pub fn open(path: &str, fmt: Option<&str>) -> Result<Disk, CliError> {
    open_at(path, fmt, None)
}

/// [`open`], showing the internal snapshot chosen by `snapshot` (qemu-img's `-l`: an id or
/// name, or `snapshot.id=ID,snapshot.name=NAME`) instead of the active state.
pub fn open_at(path: &str, fmt: Option<&str>, snapshot: Option<&str>) -> Result<Disk, CliError> {
    let format = parse_format(path, fmt)?;
    let opened = image::open(path, format, false)?;
    let disk: Box<dyn BackingImage> = match opened.format {
        Format::Raw => {
            let storage = FileStorage::open(crate::image::file_name(path), false)
                .map_err(|e| image::open_error(path, image::strerror(&e)))?;
            Box::new(RawDisk::new(storage).map_err(|e| image::open_error(path, e))?)
        }
        Format::Qcow2 => {
            missing_backing(path, &opened)?;
            let mut img: Image =
                qcowdev::open_image(path, true).map_err(|e| image::open_error(path, e))?;
            if let Some(sn) = snapshot {
                let id = snapshot_id(img.snapshots(), sn)?;
                img.snapshot_load_tmp(&id).map_err(|e| {
                    CliError::new(format!(
                        "Failed to load snapshot: {}",
                        qcowdev::error_text(&e)
                    ))
                })?;
            }
            Box::new(img)
        }
    };
    if snapshot.is_some() && opened.format == Format::Raw {
        return Err(CliError::new(
            "Failed to load snapshot: Block format 'raw' used by device '' does not support temporarily loading internal snapshots",
        ));
    }
    Ok(Disk { opened, disk })
}

/// The id of the snapshot `spec` selects, with QEMU's lookup: `snapshot.id=` and/or
/// `snapshot.name=` must all match; a plain string is an id, else a name. Shared by
/// `convert -l` and `serve -l`.
pub fn snapshot_id(list: &[SnapshotEntry], spec: &str) -> Result<String, CliError> {
    let not_found = || CliError::new("Failed to load snapshot: Can't find snapshot");
    let found = if spec.starts_with("snapshot.") {
        let (mut id, mut name) = (None, None);
        for item in spec.split(',') {
            match item.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v),
                Some(("snapshot.name", v)) => name = Some(v),
                other => {
                    let name = other.map_or(item, |(n, _)| n);
                    return Err(CliError::new(format!(
                        "Invalid parameter '{name}'\n{}Failed in parsing snapshot param '{spec}'",
                        crate::prog::prefix()
                    )));
                }
            }
        }
        list.iter().find(|s| {
            id.is_none_or(|i| s.id == i.as_bytes())
                && name.is_none_or(|n| s.name == n.as_bytes())
                && (id.is_some() || name.is_some())
        })
    } else {
        list.iter()
            .find(|s| s.id == spec.as_bytes())
            .or_else(|| list.iter().find(|s| s.name == spec.as_bytes()))
    };
    found
        .map(|s| String::from_utf8_lossy(&s.id).into_owned())
        .ok_or_else(not_found)
}

/// QEMU's message for a backing file that does not exist (names resolve relative to the
/// image's directory, as qemu-img resolves them).
fn missing_backing(path: &str, opened: &Opened) -> Result<(), CliError> {
    let Some(name) = opened
        .qcow2
        .as_ref()
        .and_then(|q| q.first.backing_file.as_ref())
    else {
        return Ok(());
    };
    let name = String::from_utf8_lossy(name);
    let full = image::path_combine(path, &name);
    match std::fs::metadata(&full) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(image::open_error(
            path,
            format_args!(
                "Could not open backing file: Could not open '{full}': {}",
                image::strerror(&e)
            ),
        )),
        _ => Ok(()),
    }
}
