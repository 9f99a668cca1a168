//! Checker tests on in-memory images (no qemu needed): rebuild placement, rendering,
//! progress, I/O errors, and a property that arbitrary damage never panics.

use std::sync::Arc;

use qcow2_check::{check, check_with_progress, CheckOptions, Finding, RepairMode};
use qcow2_format::layout::{fresh_image, CreateOptions};
use qcow2_io::fault::{FaultStorage, IoKind, Rule};
use qcow2_io::{MemStorage, Storage, StorageExt};
use quickcheck::{QuickCheck, TestResult};

/// A fresh 64 MiB image (64 KiB clusters: reftable 0x10000, refblock 0x20000, L1 0x30000)
/// with guest cluster 0 mapped to host cluster 5 through an L2 table at cluster 4; the L2
/// table is refcounted, the data cluster only if `data_refcount`.
fn image_with_data(data_refcount: bool) -> Vec<u8> {
    let mut img = fresh_image(&CreateOptions::new(64 << 20))
        .unwrap()
        .to_bytes();
    img.resize(0x60000, 0);
    img[0x30000..0x30008].copy_from_slice(&0x8000_0000_0004_0000u64.to_be_bytes());
    img[0x40000..0x40008].copy_from_slice(&0x8000_0000_0005_0000u64.to_be_bytes());
    img[0x50000..0x60000].fill(0x5a);
    img[0x20000 + 8..0x20000 + 10].copy_from_slice(&1u16.to_be_bytes());
    if data_refcount {
        img[0x20000 + 10..0x20000 + 12].copy_from_slice(&1u16.to_be_bytes());
    }
    img
}

fn mem(bytes: Vec<u8>) -> Arc<MemStorage> {
    Arc::new(MemStorage::from_bytes(bytes))
}

#[test]
fn fresh_image_is_clean() {
    let s = mem(fresh_image(&CreateOptions::new(1 << 30))
        .unwrap()
        .to_bytes());
    let r = check(s, &CheckOptions::default()).unwrap();
    assert_eq!(r.exit_code(), 0);
    assert!(r.findings.is_empty());
    assert_eq!(
        r.render_human(),
        "No errors were found on the image.\nImage end offset: 262144\n"
    );
    assert_eq!(
        r.render_json("t.qcow2"),
        "{\n    \"image-end-offset\": 262144,\n    \"total-clusters\": 16384,\n    \"check-errors\": 0,\n    \"filename\": \"t.qcow2\",\n    \"format\": \"qcow2\"\n}\n"
    );
}

#[test]
fn mapped_cluster_counts_and_stats() {
    let r = check(mem(image_with_data(true)), &CheckOptions::default()).unwrap();
    assert_eq!(r.exit_code(), 0);
    assert_eq!(r.result.allocated_clusters, 1);
    assert_eq!(r.result.image_end_offset, 0x60000);
    assert!(r
        .render_human()
        .contains("1/1024 = 0.10% allocated, 0.00% fragmented, 0.00% compressed clusters"));
}

/// iotest 039's repair: the missing refcount forces a rebuild whose first-fit placement puts
/// the new refblock at cluster 6 and the new reftable at cluster 7.
#[test]
fn rebuild_places_structures_first_fit() {
    let s = mem(image_with_data(false));
    let r = check(s.clone(), &CheckOptions::default()).unwrap();
    assert_eq!(r.exit_code(), 2);
    let lines: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "ERROR cluster 5 refcount=0 reference=1",
            "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0",
        ]
    );

    let leaks = check(
        s.clone(),
        &CheckOptions {
            repair: Some(RepairMode::Leaks),
        },
    )
    .unwrap();
    assert_eq!(leaks.exit_code(), 1);
    assert!(leaks.findings.contains(&Finding::NeedRebuild));
    assert_eq!(
        leaks.render_stderr().lines().last(),
        Some("qemu-img: Check failed: Input/output error")
    );

    let all = check(
        s.clone(),
        &CheckOptions {
            repair: Some(RepairMode::All),
        },
    )
    .unwrap();
    assert_eq!(all.exit_code(), 0);
    assert!(all.double_checked);
    assert_eq!(all.result.corruptions_fixed, 1);
    assert_eq!(all.result.leaks_fixed, 0);
    assert_eq!(s.read_be64(48).unwrap(), 0x70000);
    assert_eq!(s.read_be32(56).unwrap(), 1);
    let lines: Vec<String> = all.findings.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "ERROR cluster 5 refcount=0 reference=1",
            "Rebuilding refcount structure",
            "Repairing cluster 1 refcount=1 reference=0",
            "Repairing cluster 2 refcount=1 reference=0",
        ]
    );
    assert!(all
        .render_human()
        .starts_with("The following inconsistencies were found and repaired:\n\n    0 leaked clusters\n    1 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.\n"));
    let again = check(s, &CheckOptions::default()).unwrap();
    assert_eq!(again.exit_code(), 0);
}

#[test]
fn leak_repair_and_dirty_bit() {
    let mut img = image_with_data(true);
    img[0x20000 + 10..0x20000 + 12].copy_from_slice(&3u16.to_be_bytes());
    img[79] |= 1; // dirty bit
    let s = mem(img);
    let r = check(s.clone(), &CheckOptions::default()).unwrap();
    // The COPIED flag disagrees with refcount 3 as well: a corruption, so exit 2.
    assert_eq!(r.exit_code(), 2);
    assert_eq!((r.result.leaks, r.result.corruptions), (1, 1));
    let r = check(
        s.clone(),
        &CheckOptions {
            repair: Some(RepairMode::Leaks),
        },
    )
    .unwrap();
    assert_eq!(r.exit_code(), 0, "{}", r.render_stderr());
    // With the leak repaired the refcount is 1 again, which is what COPIED says.
    assert_eq!((r.result.leaks_fixed, r.result.corruptions_fixed), (1, 0));
    assert_eq!(s.read_be64(72).unwrap() & 1, 0, "dirty bit cleared");
}

#[test]
fn progress_reaches_total() {
    let mut calls = Vec::new();
    let r = check_with_progress(
        mem(image_with_data(true)),
        &CheckOptions::default(),
        &mut |done, total| calls.push((done, total)),
    )
    .unwrap();
    assert_eq!(r.exit_code(), 0);
    let &(done, total) = calls.last().unwrap();
    assert!(total > 0 && done == total, "{calls:?}");
}

#[test]
fn l2_read_error_fails_the_check() {
    let fault = FaultStorage::new(MemStorage::from_bytes(image_with_data(true)));
    fault.add_rule(
        Rule::on_request(1, 5)
            .kinds(IoKind::Read)
            .at_offset(0x40000),
    );
    let r = check(Arc::new(fault), &CheckOptions::default()).unwrap();
    assert_eq!(r.exit_code(), 1);
    assert!(r.findings.contains(&Finding::L2ReadFailed));
    assert_eq!(
        r.render_stderr(),
        "ERROR: I/O error in check_refcounts_l2\nqemu-img: Check failed: Input/output error\n"
    );
    assert_eq!(r.render_json("x"), "");
}

#[test]
fn bad_header_is_an_open_error() {
    let mut img = image_with_data(true);
    img[0] = 0;
    assert!(check(mem(img), &CheckOptions::default()).is_err());
}

/// Arbitrary damage to any metadata word never panics, and every mode ends with a valid
/// exit code; a check after `-r all` never reports more corruptions than before.
#[test]
fn damage_never_panics() {
    fn prop(pokes: Vec<(u16, u64)>, mode: u8) -> TestResult {
        let mut img = image_with_data(true);
        for (at, v) in pokes.iter().take(6) {
            // Offsets within the metadata clusters 0..=4, 8-aligned.
            let off = (u64::from(*at) * 8) % 0x50000;
            // Keep offsets small so that no repair grows the image by gigabytes.
            let v = v & 0xc000_0000_00ff_ffff;
            let o = off as usize;
            img[o..o + 8].copy_from_slice(&v.to_be_bytes());
        }
        let s = mem(img);
        let repair = match mode % 3 {
            0 => None,
            1 => Some(RepairMode::Leaks),
            _ => Some(RepairMode::All),
        };
        match check(s.clone(), &CheckOptions { repair }) {
            Ok(r) => {
                let _ = (r.render_human(), r.render_json("f"), r.render_stderr());
                TestResult::from_bool((0..=3).contains(&r.exit_code()))
            }
            Err(_) => TestResult::passed(),
        }
    }
    QuickCheck::new()
        .tests(150)
        .quickcheck(prop as fn(Vec<(u16, u64)>, u8) -> TestResult);
}

#[test]
fn storage_is_untouched_without_repair() {
    let img = image_with_data(false);
    let s = mem(img.clone());
    let _ = check(s.clone(), &CheckOptions::default()).unwrap();
    assert_eq!(s.to_bytes(), img);
    let len = s.len().unwrap();
    assert_eq!(len, 0x60000);
}
