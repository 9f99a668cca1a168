//! `qcow2 info` and the snapshot list, in qemu-img's human and JSON forms.

use qcow2_format::features::{
    CompressionType, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
};
use qcow2_format::header::Header;
use qcow2_format::snapshot::{SnapshotEntry, ICOUNT_DISABLED};

use crate::image::{self, Encryption, Format, Opened};
use crate::json::Json;
use crate::size::size_to_str;
use crate::{out, CliError, OutputFormat};
use qcow2_format::bitmap::BitmapDirEntry;

/// Civil date from days since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `%Y-%m-%d %H:%M:%S` of a UNIX time, in UTC (qemu-img uses the local time zone; the two
/// agree on machines set to UTC, and the tests pin `TZ=UTC` for qemu-img).
pub fn format_date(secs: u32) -> String {
    let secs = i64::from(secs);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        t / 3600,
        (t / 60) % 60,
        t % 60
    )
}

/// The snapshot-list header line (QEMU's `bdrv_snapshot_dump(NULL)`).
pub fn snapshot_header() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// Pads bytes on the right to `width` (C's `%-Ns` counts bytes).
fn pad_right(s: &[u8], width: usize) -> String {
    let text = String::from_utf8_lossy(s).into_owned();
    let pad = width.saturating_sub(s.len());
    format!("{text}{}", " ".repeat(pad))
}

/// One snapshot-list row (QEMU's `bdrv_snapshot_dump(sn)`).
pub fn snapshot_row(sn: &SnapshotEntry) -> String {
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (sn.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = if sn.icount == ICOUNT_DISABLED {
        "--".to_string()
    } else {
        sn.icount.to_string()
    };
    format!(
        "{} {} {:>8} {:>19} {:>15} {:>10}",
        pad_right(c_str(&sn.id), 7),
        pad_right(c_str(&sn.name), 16),
        size_to_str(sn.vm_state_size),
        format_date(sn.date_sec),
        clock,
        icount
    )
}

/// The bytes before the first NUL, as C's `%s` prints them.
fn c_str(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

/// "Snapshot list:", the header and one row per snapshot (nothing without snapshots).
pub fn snapshot_list_text(snapshots: &[SnapshotEntry]) -> String {
    if snapshots.is_empty() {
        return String::new();
    }
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&snapshot_header());
    s.push('\n');
    for sn in snapshots {
        s.push_str(&snapshot_row(sn));
        s.push('\n');
    }
    s
}

fn snapshot_json(sn: &SnapshotEntry) -> Json {
    let mut j = Json::object()
        .with("id", Json::str(c_str(&sn.id)))
        .with("name", Json::str(c_str(&sn.name)))
        .with("vm-state-size", Json::UInt(sn.vm_state_size))
        .with("date-sec", Json::UInt(u64::from(sn.date_sec)))
        .with("date-nsec", Json::UInt(u64::from(sn.date_nsec)))
        .with("vm-clock-sec", Json::UInt(sn.vm_clock_nsec / 1_000_000_000))
        .with(
            "vm-clock-nsec",
            Json::UInt(sn.vm_clock_nsec % 1_000_000_000),
        );
    if sn.icount != ICOUNT_DISABLED {
        j.push("icount", Json::UInt(sn.icount));
    }
    j
}

/// The qcow2 "format-specific" data (QEMU's `ImageInfoSpecificQCow2`).
fn qcow2_specific(o: &Opened) -> Option<Json> {
    let q = o.qcow2.as_ref()?;
    let data_file = q
        .first
        .extensions
        .data_file
        .as_ref()
        .filter(|_| q.first.header.incompatible_features & INCOMPAT_DATA_FILE != 0)
        .map(|n| String::from_utf8_lossy(n).into_owned());
    let spec = qcow2_specific_for(&q.first.header, data_file.as_deref());
    let spec = with_data_member(spec, "encrypt", q.encryption.as_ref().map(encrypt_json));
    Some(with_bitmaps(spec, &q.bitmaps))
}

/// QEMU's `ImageInfoSpecificQCow2Encryption`: the format, and for LUKS the header's
/// description (`QCryptoBlockInfoLUKS`).
fn encrypt_json(e: &Encryption) -> Json {
    let info = match e {
        Encryption::Aes => return Json::object().with("format", Json::str("aes")),
        Encryption::Luks(info) => info,
    };
    let mut j = Json::object()
        .with("format", Json::str("luks"))
        .with("cipher-alg", Json::str(&info.cipher_alg))
        .with("cipher-mode", Json::str(&info.cipher_mode))
        .with("ivgen-alg", Json::str(&info.ivgen_alg));
    if let Some(h) = &info.ivgen_hash_alg {
        j.push("ivgen-hash-alg", Json::str(h));
    }
    let slots = info
        .slots
        .iter()
        .map(|s| {
            let mut o = Json::object().with("active", Json::Bool(s.active));
            if let Some(i) = s.iters {
                o.push("iters", Json::UInt(i));
            }
            if let Some(st) = s.stripes {
                o.push("stripes", Json::UInt(st));
            }
            o.with("key-offset", Json::UInt(s.key_offset))
        })
        .collect();
    j.with("hash-alg", Json::str(&info.hash_alg))
        .with("detached-header", Json::Bool(false))
        .with("payload-offset", Json::UInt(info.payload_offset))
        .with("master-key-iters", Json::UInt(info.master_key_iters))
        .with("uuid", Json::str(&info.uuid))
        .with("slots", Json::List(slots))
}

/// Adds `key: value` to the `data` member of a format-specific object.
fn with_data_member(spec: Json, key: &str, value: Option<Json>) -> Json {
    let (Json::Object(mut members), Some(value)) = (spec.clone(), value) else {
        return spec;
    };
    for (k, v) in members.iter_mut() {
        if k == "data" {
            if let Json::Object(data) = v {
                data.push((key.to_string(), value));
                break;
            }
        }
    }
    Json::Object(members)
}

/// Adds QEMU's `bitmaps` list (`Qcow2BitmapInfo`: flags, name, granularity) to the
/// format-specific data of a v3 image; QEMU lists it whenever the extension is valid.
fn with_bitmaps(spec: Json, bitmaps: &[BitmapDirEntry]) -> Json {
    if bitmaps.is_empty() {
        return spec;
    }
    let list = bitmaps
        .iter()
        .map(|b| {
            let mut flags = Vec::new();
            if b.in_use() {
                flags.push(Json::str("in-use"));
            }
            if b.auto() {
                flags.push(Json::str("auto"));
            }
            Json::object()
                .with("flags", Json::List(flags))
                .with("name", Json::str(b.name_lossy()))
                .with("granularity", Json::UInt(b.granularity()))
        })
        .collect();
    with_data_member(spec, "bitmaps", Some(Json::List(list)))
}

/// The "Format specific information" lines of a qcow2 header, as qemu-io's `info` prints
/// them (without indentation).
pub fn format_specific_lines(h: &Header, data_file: Option<&str>) -> Vec<String> {
    let mut s = String::new();
    if let Json::Object(spec) = qcow2_specific_for(h, data_file) {
        if let Some((_, data)) = spec.iter().find(|(k, _)| k == "data") {
            dump_flat(data, 0, &mut s);
        }
    }
    s.lines().map(str::to_string).collect()
}

/// `data_file`: the external data file name of an image that uses one.
fn qcow2_specific_for(h: &Header, data_file: Option<&str>) -> Json {
    let compression = match h.compression() {
        Some(CompressionType::Zstd) => "zstd",
        _ => "zlib",
    };
    let data = if h.version == 2 {
        Json::object()
            .with("compat", Json::str("0.10"))
            .with("refcount-bits", Json::UInt(1 << h.refcount_order))
            .with("compression-type", Json::str(compression))
    } else {
        Json::object()
            .with("compat", Json::str("1.1"))
            .with(
                "lazy-refcounts",
                Json::Bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0),
            )
            .with(
                "corrupt",
                Json::Bool(h.incompatible_features & INCOMPAT_CORRUPT != 0),
            )
            .with("extended-l2", Json::Bool(h.extended_l2()))
            .with("refcount-bits", Json::UInt(1 << h.refcount_order))
            .with("compression-type", Json::str(compression))
    };
    let data = match data_file {
        Some(name) => data.with("data-file", Json::str(name)).with(
            "data-file-raw",
            Json::Bool(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0),
        ),
        None => data,
    };
    Json::object()
        .with("type", Json::str("qcow2"))
        .with("data", data)
}

/// The protocol ("file") node under the image.
fn file_child(o: &Opened) -> Json {
    Json::object()
        .with("filename", Json::str(&o.path))
        .with("format", Json::str("file"))
        .with("dirty-flag", Json::Bool(false))
        .with("actual-size", Json::UInt(o.allocated))
        .with("virtual-size", Json::UInt(o.file_len.next_multiple_of(512)))
        .with(
            "format-specific",
            Json::object()
                .with("type", Json::str("file"))
                .with("data", Json::object()),
        )
        .with("children", Json::List(vec![]))
}

/// Virtual size: the header's for qcow2, the file length rounded to sectors for raw.
fn virtual_size(o: &Opened) -> u64 {
    match &o.qcow2 {
        Some(q) => q.first.header.size,
        None => o.file_len.next_multiple_of(512),
    }
}

fn dirty(o: &Opened) -> bool {
    o.qcow2.as_ref().is_some_and(|q| {
        q.first.header.version >= 3 && q.first.header.incompatible_features & INCOMPAT_DIRTY != 0
    })
}

/// The whole `ImageInfo` object in QAPI field order.
pub fn info_json(o: &Opened) -> Json {
    let mut j = Json::object()
        .with("filename", Json::str(&o.path))
        .with("format", Json::str(o.format.name()))
        .with("dirty-flag", Json::Bool(dirty(o)))
        .with("actual-size", Json::UInt(o.allocated))
        .with("virtual-size", Json::UInt(virtual_size(o)));
    if let Some(q) = &o.qcow2 {
        j.push("cluster-size", Json::UInt(q.first.header.cluster_size()));
        if q.encryption.is_some() {
            j.push("encrypted", Json::Bool(true));
        }
        if let Some(b) = &q.first.backing_file {
            j.push("backing-filename", Json::str(b));
            let name = String::from_utf8_lossy(b);
            j.push(
                "full-backing-filename",
                Json::str(image::path_combine(&o.path, &name)),
            );
            if let Some(f) = &q.first.extensions.backing_format {
                j.push("backing-filename-format", Json::str(f));
            }
        }
        if !q.snapshots.is_empty() {
            j.push(
                "snapshots",
                Json::List(q.snapshots.iter().map(snapshot_json).collect()),
            );
        }
    }
    if let Some(spec) = qcow2_specific(o) {
        j.push("format-specific", spec);
    }
    j.push(
        "children",
        Json::List(vec![Json::object()
            .with("name", Json::str("file"))
            .with("info", file_child(o))]),
    );
    j
}

/// Prints an object's members as QEMU's `dump_qdict` does: "lazy refcounts: false" for
/// scalars (dashes in keys become spaces), "key:" and the members or items one level deeper
/// for objects and lists ("[0]: in-use"). `indent` is in spaces.
fn dump_flat(obj: &Json, indent: usize, out: &mut String) {
    if let Json::Object(members) = obj {
        for (k, v) in crate::json::qdict_order(members) {
            let key = k.replace('-', " ");
            dump_member(&format!("{}{key}:", " ".repeat(indent)), v, indent, out);
        }
    }
}

/// One member or list item: `label` then the scalar on the same line, or the composite's
/// contents below it (QEMU's `dump_qobject`).
fn dump_member(label: &str, v: &Json, indent: usize, out: &mut String) {
    let scalar = match v {
        Json::Bool(b) => Some(b.to_string()),
        Json::UInt(u) => Some(u.to_string()),
        Json::Str(s) => Some(String::from_utf8_lossy(s).into_owned()),
        _ => None,
    };
    if let Some(text) = scalar {
        out.push_str(&format!("{label} {text}\n"));
        return;
    }
    out.push_str(&format!("{label}\n"));
    match v {
        Json::Object(_) => dump_flat(v, indent + 4, out),
        Json::List(items) => {
            for (i, item) in items.iter().enumerate() {
                let label = format!("{}[{i}]:", " ".repeat(indent + 4));
                dump_member(&label, item, indent + 4, out);
            }
        }
        _ => {}
    }
}

/// The human text (QEMU's `bdrv_image_info_dump` plus the file child).
pub fn info_human(o: &Opened) -> String {
    let mut s = String::new();
    s.push_str(&format!("image: {}\n", o.path));
    s.push_str(&format!("file format: {}\n", o.format.name()));
    let vs = virtual_size(o);
    s.push_str(&format!("virtual size: {} ({vs} bytes)\n", size_to_str(vs)));
    s.push_str(&format!("disk size: {}\n", size_to_str(o.allocated)));
    if let Some(q) = &o.qcow2 {
        if q.encryption.is_some() {
            s.push_str("encrypted: yes\n");
        }
        s.push_str(&format!(
            "cluster_size: {}\n",
            q.first.header.cluster_size()
        ));
        if dirty(o) {
            s.push_str("cleanly shut down: no\n");
        }
        if let Some(b) = &q.first.backing_file {
            let name = String::from_utf8_lossy(b).into_owned();
            let full = image::path_combine(&o.path, &name);
            if full == name {
                s.push_str(&format!("backing file: {name}\n"));
            } else {
                s.push_str(&format!("backing file: {name} (actual path: {full})\n"));
            }
            if let Some(f) = &q.first.extensions.backing_format {
                s.push_str(&format!(
                    "backing file format: {}\n",
                    String::from_utf8_lossy(f)
                ));
            }
        }
        s.push_str(&snapshot_list_text(&q.snapshots));
    }
    if let Some(Json::Object(spec)) = qcow2_specific(o) {
        s.push_str("Format specific information:\n");
        if let Some((_, data)) = spec.iter().find(|(k, _)| k == "data") {
            dump_flat(data, 4, &mut s);
        }
    }
    s.push_str("Child node '/file':\n");
    s.push_str(&format!("    filename: {}\n", o.path));
    s.push_str("    protocol type: file\n");
    let fl = o.file_len.next_multiple_of(512);
    s.push_str(&format!(
        "    file length: {} ({fl} bytes)\n",
        size_to_str(fl)
    ));
    s.push_str(&format!("    disk size: {}\n", size_to_str(o.allocated)));
    s
}

/// Runs `info`.
pub fn run(file: &str, format: Option<Format>, output: OutputFormat) -> Result<(), CliError> {
    let o = image::open(file, format, false)?;
    match output {
        OutputFormat::Human => out(&info_human(&o)),
        OutputFormat::Json => out(&format!("{}\n", info_json(&o).to_qemu_string())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_date(0), "1970-01-01 00:00:00");
        assert_eq!(format_date(1_795_659_205), "2026-11-26 02:13:25");
        assert_eq!(format_date(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn header_line() {
        assert_eq!(
            snapshot_header(),
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
    }
}
