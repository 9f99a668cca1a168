//! Replays the fuzz findings kept under `tests/fuzz/<target>/` through the same code paths
//! as the cargo-fuzz targets of the same name (open/read/map/check on arbitrary bytes; repair
//! then check), so a regression fails `cargo test` without the fuzz toolchain.
//!
//! - `open_read_map_check/crash-06b8…`: table offsets near 2^64 panicked the checker's
//!   batched reader (fixed in qcow2-check before this crate existed).
//! - `repair_then_check/oom-be06…`: a refcount update far beyond any refcount table made the
//!   repair allocate without bound (fixed in qcow2-refcount, 69c3117).

use qcow2_check::{check, CheckOptions, RepairMode};
use qcow2_image::{Image, OpenOptions};
use qcow2_io::SparseStorage;
use std::path::PathBuf;
use std::sync::Arc;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz")
        .join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .expect("regression dir")
        .map(|e| {
            let p = e.expect("entry").path();
            (
                p.display().to_string(),
                std::fs::read(&p).expect("read input"),
            )
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no inputs in {}", dir.display());
    v
}

#[test]
fn open_read_map_check_inputs() {
    for (name, data) in inputs("open_read_map_check") {
        let storage = Arc::new(SparseStorage::from_bytes(&data));
        if let Ok(mut img) = Image::open(storage.clone(), &OpenOptions::read_only()) {
            let size = img.virtual_size();
            let cs = img.cluster_size();
            let mut buf = vec![0u8; cs.min(1 << 16) as usize];
            for i in 0..8u64 {
                let off = (size / 8).saturating_mul(i) & !(cs - 1);
                let _ = img.read(off, &mut buf);
            }
            let _ = img.map(0, size.min(64 << 20));
        }
        let _ = check(storage, &CheckOptions::default());
        println!("replayed {name}");
    }
}

#[test]
fn repair_then_check_inputs() {
    for (name, data) in inputs("repair_then_check") {
        let storage = Arc::new(SparseStorage::from_bytes(&data));
        let Ok(repaired) = check(
            storage.clone(),
            &CheckOptions {
                repair: Some(RepairMode::All),
            },
        ) else {
            continue;
        };
        if repaired.failure.is_some() {
            continue;
        }
        let again = check(storage, &CheckOptions::default()).expect("a repaired image opens");
        assert!(
            again.failure.is_none(),
            "{name}: check of the repaired image failed"
        );
        let (a, b) = (&repaired.result, &again.result);
        assert_eq!(
            (a.corruptions, a.leaks, a.check_errors),
            (b.corruptions, b.leaks, b.check_errors),
            "{name}: the repair's double check and a fresh check disagree"
        );
        println!("replayed {name}");
    }
}
