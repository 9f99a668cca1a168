//! Verdicts on an image: our checker, `qemu-img check`, and the guest data against a model.

use crate::workload::Model;
use qcow2_check::{check, CheckOptions, CheckReport, RepairMode};
use qcow2_image::{Image, ImageError, OpenOptions};
use qcow2_io::{MemStorage, Storage};
use std::process::Command;
use std::sync::Arc;

/// Runs our checker on a copy of `image` (never modifies `image`).
pub fn our_check(
    image: &[u8],
    repair: Option<RepairMode>,
) -> Result<(CheckReport, Vec<u8>), String> {
    let s = Arc::new(MemStorage::from_bytes(image.to_vec()));
    let report = check(s.clone(), &CheckOptions { repair }).map_err(|e| format!("check: {e}"))?;
    Ok((report, s.to_bytes()))
}

/// A one-line summary of a report's result counters and findings.
pub fn describe(report: &CheckReport) -> String {
    let r = &report.result;
    format!(
        "corruptions {} leaks {} check_errors {} fixed {}/{} failure {:?}\n{}",
        r.corruptions,
        r.leaks,
        r.check_errors,
        r.corruptions_fixed,
        r.leaks_fixed,
        report.failure.as_ref().map(|f| f.message()),
        report.render_stderr()
    )
}

/// Our checker's verdict: `Err` (with the findings) if the image has corruptions or check
/// errors, or if the check failed; with `strict`, leaks are errors too.
pub fn assert_our_check_clean(image: &[u8], strict: bool) -> Result<CheckReport, String> {
    let (report, _) = our_check(image, None)?;
    let r = &report.result;
    let bad = report.failure.is_some()
        || r.corruptions > 0
        || r.check_errors > 0
        || (strict && r.leaks > 0);
    if bad {
        Err(describe(&report))
    } else {
        Ok(report)
    }
}

/// Whether `qemu-img` can be run.
pub fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `qemu-img check --output=json` on a copy of `image`: `Err` with its human output if it
/// finds corruptions or check errors (or, with `strict`, leaks).
pub fn qemu_check(image: &[u8], strict: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let p = dir.path().join("img.qcow2");
    std::fs::write(&p, image).map_err(|e| e.to_string())?;
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(&p)
        .output()
        .map_err(|e| format!("run qemu-img: {e}"))?;
    let code = out.status.code().unwrap_or(-1);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let corruptions = v["corruptions"].as_u64().unwrap_or(0);
    let errors = v["check-errors"].as_u64().unwrap_or(0);
    let ok = if strict {
        code == 0
    } else {
        (code == 0 || code == 3) && corruptions == 0 && errors == 0
    };
    if ok && !v.is_null() {
        return Ok(());
    }
    let human = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&p)
        .output()
        .map_err(|e| format!("run qemu-img: {e}"))?;
    Err(format!(
        "qemu-img check exit {code}:\n{}{}",
        String::from_utf8_lossy(&human.stdout),
        String::from_utf8_lossy(&human.stderr)
    ))
}

/// Opens `image` read-only and compares the guest contents with `model` (see
/// [`Model::first_mismatch`]).
pub fn verify_data(image: &[u8], model: &Model, after_clean_close: bool) -> Result<(), String> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image.to_vec()));
    let mut img = Image::open(s, &OpenOptions::read_only()).map_err(|e| format!("open: {e}"))?;
    let n = img.virtual_size().min(model.current.len() as u64);
    let mut buf = vec![0u8; n as usize];
    img.read(0, &mut buf).map_err(|e| format!("read: {e}"))?;
    match model.first_mismatch(&buf, after_clean_close) {
        None => Ok(()),
        Some(i) => Err(format!(
            "guest byte {i:#x} reads {:#04x}, expected {:#04x} ({})",
            buf[i],
            if after_clean_close {
                model.current[i]
            } else {
                model.durable[i]
            },
            if after_clean_close {
                "acknowledged before a clean close"
            } else {
                "flushed before the crash or failure"
            }
        )),
    }
}

/// Opens `image` read-write (a copy), writes one sector, closes, and checks the result:
/// the image must be usable again.
pub fn reopen_and_write(image: &[u8]) -> Result<Vec<u8>, String> {
    let s = Arc::new(MemStorage::from_bytes(image.to_vec()));
    let mut img = Image::open(s.clone(), &OpenOptions::read_write())
        .map_err(|e| format!("read-write open: {e}"))?;
    let size = img.virtual_size();
    let off = (size / 2) & !511;
    img.write(off, &[0xa5; 512])
        .map_err(|e| format!("write after reopen: {e}"))?;
    img.close()
        .map_err(|e| format!("close after reopen: {e}"))?;
    let bytes = s.to_bytes();
    assert_our_check_clean(&bytes, false).map_err(|e| format!("after reopen+write: {e}"))?;
    Ok(bytes)
}

/// Whether the dirty bit (incompatible bit 0) is set in a v3 header.
pub fn is_dirty(image: &[u8]) -> bool {
    image.len() >= 80
        && u32::from_be_bytes([image[4], image[5], image[6], image[7]]) >= 3
        && image[79] & 1 != 0
}

/// Brings an image left by a crash or a failure into the state a read-write open by QEMU
/// would: a dirty image (lazy refcounts) is repaired — by the facade's read-write open when
/// it repairs dirty images, else by our checker's `-r all` — and must come out with no
/// corruption and the dirty bit clear. Returns the image and whether it was repaired.
pub fn settle(image: &[u8]) -> Result<(Vec<u8>, bool), String> {
    if !is_dirty(image) {
        return Ok((image.to_vec(), false));
    }
    let s = Arc::new(MemStorage::from_bytes(image.to_vec()));
    let out = match Image::open(s.clone(), &OpenOptions::read_write()) {
        Ok(img) => {
            img.close()
                .map_err(|e| format!("close after repairing open: {e}"))?;
            s.to_bytes()
        }
        Err(ImageError::DirtyImage { .. }) => {
            let (report, repaired) = our_check(image, Some(RepairMode::All))?;
            if report.result.corruptions > 0 || report.failure.is_some() {
                return Err(format!("repair of the dirty image: {}", describe(&report)));
            }
            repaired
        }
        Err(e) => return Err(format!("read-write open of the dirty image: {e}")),
    };
    if is_dirty(&out) {
        return Err("the dirty bit survived the repair".into());
    }
    Ok((out, true))
}
