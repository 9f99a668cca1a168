//! Concurrent readers and writers on an overlay whose backing file and compressed clusters
//! QEMU wrote: the backing reads, the copy-on-write of backing data into fresh clusters and
//! the compressed-cluster reads all move their bytes without the metadata lock now, so
//! this checks them against a model of the disk while threads race on neighbouring
//! clusters, then `qemu-img check` and `qemu-img compare` with a raw copy of the model.

mod common;

use common::{assert_clean, assert_compare, qemu_create, qemu_io, Rng};
use qcow2_image::{BackingPolicy, Image, OpenOptions, SharedImage};
use std::path::Path;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const THREADS: u64 = 4;
/// Each thread writes into its own 2 MiB; everything else is only read.
const REGION: u64 = 2 * MIB;
/// The overlay's compressed clusters (QEMU-written), read by every thread.
const COMPRESSED: u64 = 12 * MIB;

fn open(p: &Path) -> Image {
    let dir = p.parent().unwrap().to_path_buf();
    let opts = OpenOptions {
        backing: BackingPolicy::Open {
            base_dir: dir.clone(),
            max_depth: 2,
            allowed_dirs: vec![dir],
        },
        ..OpenOptions::default()
    };
    Image::open_path(p, &opts).unwrap()
}

/// The base: every MiB a different byte, a hole (reads zero) in MiB 3; the overlay: a
/// QEMU-written cluster in each region and 1 MiB of compressed clusters.
fn fixture(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_create(&base, "cluster_size=65536", SIZE, None);
    let mut cmds = Vec::new();
    let mut model = vec![0u8; SIZE as usize];
    for m in 0..SIZE / MIB {
        if m == 3 {
            continue;
        }
        let byte = 0x20 + m as u8;
        cmds.push(format!("write -P {byte} {} 1M", m * MIB));
        model[(m * MIB) as usize..((m + 1) * MIB) as usize].fill(byte);
    }
    qemu_io(&base, &cmds);
    qemu_create(&top, "cluster_size=65536", SIZE, Some((&base, "qcow2")));
    let mut cmds = vec![format!("write -c -P 0xc5 {COMPRESSED} 1M")];
    model[COMPRESSED as usize..(COMPRESSED + MIB) as usize].fill(0xc5);
    for t in 0..THREADS {
        let at = t * REGION + 5 * 65536;
        cmds.push(format!("write -P 0x99 {at} 64k"));
        model[at as usize..(at + 65536) as usize].fill(0x99);
    }
    qemu_io(&top, &cmds);
    (top, model)
}

/// One thread: partial writes into its region (most into clusters still unallocated in
/// the overlay: copy-on-write from the backing file, some crossing into the neighbour
/// cluster), reads of its region against its model, and reads of the compressed area.
fn drive(shared: &SharedImage, tid: u64, model: &mut [u8], compressed: &[u8]) {
    let base = tid * REGION;
    let mut rng = Rng(tid * 7919 + 3);
    for _ in 0..150 {
        let off = base + rng.below(REGION - 70_000);
        let max = if rng.chance(50) { 4096 } else { 70_000 };
        let len = 1 + rng.below(max);
        let range = off as usize..(off + len) as usize;
        if rng.chance(60) {
            let data = rng.data(len as usize);
            shared.write(off, &data).unwrap();
            model[range].copy_from_slice(&data);
        } else {
            let mut b = vec![0u8; len as usize];
            shared.read(off, &mut b).unwrap();
            assert!(b[..] == model[range], "thread {tid}: read at {off} differs");
        }
        let c = rng.below(MIB - 9000);
        let mut b = vec![0u8; 1 + rng.below(9000) as usize];
        shared.read(COMPRESSED + c, &mut b).unwrap();
        assert!(b[..] == compressed[c as usize..c as usize + b.len()]);
    }
}

#[test]
fn overlay_with_backing_and_compressed_clusters_under_concurrent_io() {
    let dir = tempfile::tempdir().unwrap();
    let (top, mut model) = fixture(dir.path());
    let compressed = model[COMPRESSED as usize..(COMPRESSED + MIB) as usize].to_vec();
    let shared = Arc::new(SharedImage::new(open(&top)));
    let mut regions: Vec<Vec<u8>> = (0..THREADS)
        .map(|t| model[(t * REGION) as usize..((t + 1) * REGION) as usize].to_vec())
        .collect();
    std::thread::scope(|s| {
        for (t, region) in regions.iter_mut().enumerate() {
            let shared = &shared;
            let compressed = &compressed;
            s.spawn(move || {
                // The model is indexed from 0 for the thread's region.
                let mut full = vec![0u8; (THREADS * REGION) as usize];
                let at = t as u64 * REGION;
                full[at as usize..(at + REGION) as usize].copy_from_slice(region);
                drive(shared, t as u64, &mut full, compressed);
                region.copy_from_slice(&full[at as usize..(at + REGION) as usize]);
            });
        }
    });
    for (t, region) in regions.iter().enumerate() {
        let at = t * REGION as usize;
        model[at..at + REGION as usize].copy_from_slice(region);
    }
    let mut back = vec![0u8; SIZE as usize];
    shared.read(0, &mut back).unwrap();
    assert!(back == model, "the disk differs from the model");
    Arc::try_unwrap(shared).unwrap().close().unwrap();
    assert_clean(&top, true, "overlay after concurrent I/O");
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_compare(&top, &raw, "QEMU reads the model");
}
