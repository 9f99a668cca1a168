//! `qcow2 map`: qemu-img map's extents (through the qcow2-image facade, following qcow2
//! and raw backing files; raw images from the file system's holes) in its human and JSON
//! forms.

use qcow2_image::{ExtentKind, Image};
use qcow2_io::{FileStorage, Storage};

use crate::image::{self, Format};
use crate::qcowdev::{error_text, open_image};
use crate::size::{parse_size, SizeError};
use crate::{out, CliError, OutputFormat};

/// One entry of qemu-img map (QAPI `MapEntry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Backing-chain depth the answer comes from.
    pub depth: u64,
    /// Whether some layer holds the range.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed.
    pub compressed: bool,
    /// Host offset in `filename`.
    pub offset: Option<u64>,
    /// The file the offset refers to.
    pub filename: String,
}

impl MapEntry {
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }

    /// The JSON object qemu-img prints for the entry.
    pub fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

/// C's `%#-16x` (zero prints as "0").
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// Appends `e`, merging it into the previous entry when qemu-img would.
fn push(entries: &mut Vec<MapEntry>, e: MapEntry) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = entries.last_mut() {
        if last.mergeable(&e) {
            last.length += e.length;
            return;
        }
    }
    entries.push(e);
}

/// Maps `[start, start + len)` of `img` (called `name`) at `depth`, descending into the
/// backing file for ranges this layer does not hold.
fn map_layer(
    img: &mut Image,
    name: &str,
    depth: u64,
    start: u64,
    len: u64,
    entries: &mut Vec<MapEntry>,
) -> Result<(), CliError> {
    let extents = img
        .map(start, len)
        .map_err(|e| CliError::new(error_text(&e)))?;
    let mut backing: Option<(Layer, String, u64)> = None;
    // A range with a host offset names the file the offset is in: the external data file
    // (by its name as stored) or the image itself, as QEMU's block status names its file.
    let data_name = img.data_file().unwrap_or_else(|| name.to_string());
    for x in extents {
        let base = MapEntry {
            start: x.offset,
            length: x.length,
            depth,
            present: true,
            zero: false,
            data: false,
            compressed: false,
            offset: x.host_offset,
            filename: if x.host_offset.is_some() {
                data_name.clone()
            } else {
                name.to_string()
            },
        };
        match x.kind {
            ExtentKind::Data => push(entries, MapEntry { data: true, ..base }),
            ExtentKind::DataHole => push(
                entries,
                MapEntry {
                    data: true,
                    zero: true,
                    ..base
                },
            ),
            ExtentKind::Zero => push(entries, MapEntry { zero: true, ..base }),
            ExtentKind::Compressed => push(
                entries,
                MapEntry {
                    data: true,
                    compressed: true,
                    ..base
                },
            ),
            ExtentKind::Unallocated => push(
                entries,
                MapEntry {
                    present: false,
                    zero: true,
                    ..base
                },
            ),
            ExtentKind::Backing => {
                if backing.is_none() {
                    backing = Some(open_backing(img, name)?);
                }
                let Some((layer, bname, bsize)) = backing.as_mut() else {
                    continue;
                };
                // Beyond the backing file's end the range reads as zeros.
                let inside = bsize.saturating_sub(x.offset).min(x.length);
                if inside > 0 {
                    match layer {
                        Layer::Qcow2(b) => {
                            map_layer(b, bname, depth + 1, x.offset, inside, entries)?
                        }
                        Layer::Raw(f) => map_raw(f, bname, depth + 1, x.offset, inside, entries),
                    }
                }
                if inside < x.length {
                    push(
                        entries,
                        MapEntry {
                            start: x.offset + inside,
                            length: x.length - inside,
                            depth: depth + 1,
                            present: false,
                            zero: true,
                            ..base
                        },
                    );
                }
            }
        }
    }
    Ok(())
}

/// Maps `[start, start + len)` of the raw file `name` at `depth`: QEMU's raw format passes
/// block status to the file, which answers from the file system's holes (`SEEK_DATA` /
/// `SEEK_HOLE`): data where the file has data, zero (still present, at the same offset)
/// in holes and beyond the end of the file.
fn map_raw(
    file: &FileStorage,
    name: &str,
    depth: u64,
    start: u64,
    len: u64,
    entries: &mut Vec<MapEntry>,
) {
    let mut pos = 0;
    while pos < len {
        let at = start + pos;
        // QEMU pretends there are no holes when the file system cannot tell.
        let (data, n) = match file.data_status(at, len - pos) {
            Ok((data, n)) if n > 0 => (data, n.min(len - pos)),
            _ => (true, len - pos),
        };
        push(
            entries,
            MapEntry {
                start: at,
                length: n,
                depth,
                present: true,
                zero: !data,
                data,
                compressed: false,
                offset: Some(at),
                filename: name.to_string(),
            },
        );
        pos += n;
    }
}

/// A backing file, opened for mapping.
enum Layer {
    Qcow2(Box<Image>),
    Raw(FileStorage),
}

fn open_raw(path: &str) -> Result<FileStorage, CliError> {
    FileStorage::open(image::file_name(path), false)
        .map_err(|e| image::open_error(path, image::strerror(&e)))
}

/// Opens the backing file of `img` (a qcow2 image or a raw file), with its name and size.
fn open_backing(img: &Image, name: &str) -> Result<(Layer, String, u64), CliError> {
    let Some(b) = img.backing_file() else {
        return Err(CliError::new("backing file missing"));
    };
    let path = image::path_combine(name, &b);
    let opened = image::open(&path, None, false)?;
    match opened.format {
        Format::Raw => {
            let f = open_raw(&path)?;
            Ok((Layer::Raw(f), path, opened.file_len.next_multiple_of(512)))
        }
        Format::Qcow2 => {
            let bimg = open_image(&path, true).map_err(|e| image::open_error(&path, e))?;
            let size = bimg.virtual_size();
            Ok((Layer::Qcow2(Box::new(bimg)), path, size))
        }
    }
}

fn parse_offset(what: &str, v: &str) -> Result<u64, CliError> {
    match parse_size(v) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Ok(_) | Err(SizeError::Overflow) => Err(CliError::new(format!(
            "Invalid {what} specified. Must be between 0 and 9223372036854775807."
        ))),
        Err(SizeError::Invalid) => Err(CliError::new(format!("Invalid {what} specified: '{v}'."))),
    }
}

/// Runs `map`.
pub fn run(
    file: &str,
    format: Option<Format>,
    output: OutputFormat,
    start_offset: Option<&str>,
    max_length: Option<&str>,
) -> Result<(), CliError> {
    let start = start_offset
        .map(|v| parse_offset("start offset", v))
        .transpose()?
        .unwrap_or(0);
    let max_len = max_length
        .map(|v| parse_offset("max length", v))
        .transpose()?;
    let opened = image::open(file, format, false)?;
    // QEMU names ranges by the image's filename (a `file:` prefix stripped).
    let file = opened.path.as_str();
    let mut entries = Vec::new();
    if opened.format == Format::Raw {
        // The block layer counts whole sectors.
        let size = opened.file_len.next_multiple_of(512);
        let end = match max_len {
            Some(l) => start.saturating_add(l).min(size),
            None => size,
        };
        if start < end {
            map_raw(&open_raw(file)?, file, 0, start, end - start, &mut entries);
        }
    } else {
        let mut img = open_image(file, true).map_err(|e| image::open_error(file, e))?;
        let size = img.virtual_size();
        let end = match max_len {
            Some(l) => start.saturating_add(l).min(size),
            None => size,
        };
        if start < end {
            map_layer(&mut img, file, 0, start, end - start, &mut entries)?;
        }
    }
    if entries.is_empty() {
        // qemu-img always prints its last entry, which is still the empty one it started
        // with when the range is empty (a start offset at or beyond the end).
        entries.push(MapEntry {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            filename: file.to_string(),
        });
    }
    match output {
        OutputFormat::Json => {
            let body: Vec<String> = entries.iter().map(MapEntry::json).collect();
            out(&format!("[{}]\n", body.join(",\n")));
            Ok(())
        }
        OutputFormat::Human => {
            let mut text = format!(
                "{:<16}{:<16}{:<16}{}\n",
                "Offset", "Length", "Mapped to", "File"
            );
            for e in &entries {
                if e.data && e.offset.is_none() {
                    out(&text);
                    return Err(CliError::new(
                        "File contains external, encrypted or compressed clusters.",
                    ));
                }
                if e.data && !e.zero {
                    text.push_str(&format!(
                        "{}{}{}{}\n",
                        hex16(e.start),
                        hex16(e.length),
                        hex16(e.offset.unwrap_or(0)),
                        e.filename
                    ));
                }
            }
            out(&text);
            Ok(())
        }
    }
}
