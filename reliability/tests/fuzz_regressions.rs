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

/// The body of the `open_read_map_check` fuzz target: never a panic or a hang.
fn open_read_map_check(data: &[u8]) {
    let storage = Arc::new(SparseStorage::from_bytes(data));
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
}

/// The body of the `repair_then_check` fuzz target: a completed `-r all` repair agrees
/// with a fresh check of the repaired image.
fn repair_then_check(name: &str, data: &[u8]) {
    let storage = Arc::new(SparseStorage::from_bytes(data));
    let Ok(repaired) = check(
        storage.clone(),
        &CheckOptions {
            repair: Some(RepairMode::All),
        },
    ) else {
        return;
    };
    if repaired.failure.is_some() {
        return;
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
}

#[test]
fn open_read_map_check_inputs() {
    for (name, data) in inputs("open_read_map_check") {
        open_read_map_check(&data);
        println!("replayed {name}");
    }
}

#[test]
fn repair_then_check_inputs() {
    for (name, data) in inputs("repair_then_check") {
        repair_then_check(&name, &data);
        println!("replayed {name}");
    }
}

/// The CI-sized fuzz run: the seed corpus of the cargo-fuzz targets (qemu-img images, some
/// damaged), each mutated deterministically (byte flips, 64-bit pokes of boundary values,
/// truncations) and run through both target bodies. The long runs use cargo-fuzz.
#[test]
fn seed_corpus_mutations() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/images");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz seed corpus")
        .map(|e| e.expect("entry").path())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "seed corpus too small");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let boundary = [
        0u64,
        1,
        0x200,
        0x1_0000,
        0x8000_0000_0000_0000,
        u64::MAX,
        0x00ff_ffff_ffff_fe00,
    ];
    let mut cases = 0;
    for path in &seeds {
        let seed = std::fs::read(path).expect("seed");
        for round in 0..250 {
            let mut data = seed.clone();
            // Mostly the first 4 KiB (header, extensions, first tables), sometimes anywhere.
            for _ in 0..1 + round % 4 {
                let r = next();
                let span = if r % 3 == 0 {
                    data.len()
                } else {
                    data.len().min(4096)
                };
                let at = (next() as usize) % span.max(1);
                if r % 2 == 0 {
                    if let Some(b) = data.get_mut(at) {
                        *b ^= 1 << (r % 8);
                    }
                } else {
                    let v = boundary[(r as usize / 2) % boundary.len()].to_be_bytes();
                    let at = at & !7;
                    if at + 8 <= data.len() {
                        data[at..at + 8].copy_from_slice(&v);
                    }
                }
            }
            if round % 10 == 9 {
                data.truncate((next() as usize) % data.len().max(1));
            }
            let name = format!("{} mutation {round}", path.display());
            open_read_map_check(&data);
            repair_then_check(&name, &data);
            cases += 1;
        }
    }
    println!("fuzz seed-corpus mutations: {cases} inputs through both targets");
}
