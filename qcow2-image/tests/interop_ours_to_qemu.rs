//! (1) Images we write, checked by QEMU: a seeded random workload over a matrix of create
//! options, mirrored into a raw file; `qemu-img check` must be clean (no error, no leak) and
//! `qemu-img compare` must find the image equal to the mirror.

mod common;

use common::{assert_clean, assert_compare, Rng, Workload};
use qcow2_image::{
    BackingPolicy, Compat, CompressionType, CreateOptions, Image, OpenOptions, Preallocation,
};
use qcow2_io::FileStorage;
use std::path::Path;
use std::sync::Arc;

struct Case {
    name: &'static str,
    opts: CreateOptions,
    backing: bool,
    ops: u32,
}

fn case(name: &'static str, size: u64, f: impl FnOnce(&mut CreateOptions)) -> Case {
    let mut opts = CreateOptions::new(size);
    f(&mut opts);
    Case {
        name,
        opts,
        backing: false,
        ops: 120,
    }
}

fn open_opts(dir: &Path) -> OpenOptions {
    OpenOptions {
        backing: BackingPolicy::Open {
            base_dir: dir.to_path_buf(),
            max_depth: 4,
            allowed_dirs: vec![dir.to_path_buf()],
        },
        ..OpenOptions::default()
    }
}

fn open(path: &Path, dir: &Path) -> Image {
    let s = FileStorage::open(path, true).unwrap();
    Image::open(Arc::new(s), &open_opts(dir)).unwrap()
}

fn run(c: Case, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img_path = d.join("img.qcow2");
    let size = c.opts.size;
    let cs = c.opts.cluster_size;
    let mut rng = Rng(seed);
    let mut mirror = vec![0u8; size as usize];
    let mut opts = c.opts.clone();
    if c.backing {
        // A raw backing file, shorter than the image, with random content.
        let blen = size * 3 / 4;
        let bdata = rng.data(blen as usize);
        std::fs::write(d.join("base.raw"), &bdata).unwrap();
        mirror[..blen as usize].copy_from_slice(&bdata);
        opts.backing_file = Some("base.raw".into());
        opts.backing_format = Some("raw".into());
    }
    let v2 = opts.compat == Compat::V0_10;
    let storage = Arc::new(FileStorage::create(&img_path).unwrap());
    let mut img = Image::create_with(storage, &opts, &open_opts(d)).unwrap();
    let wl = Workload {
        name: c.name,
        size,
        cs,
        discard_ignored: v2 && c.backing,
    };
    img = wl.run(img, &mut mirror, &mut rng, c.ops, &|| open(&img_path, d));
    // Everything reads back through our reader too.
    let mut all = vec![0u8; size as usize];
    img.read(0, &mut all).unwrap();
    assert!(
        all == mirror,
        "{}: final read differs from the mirror",
        c.name
    );
    img.close().unwrap();
    let raw = d.join("mirror.raw");
    std::fs::write(&raw, &mirror).unwrap();
    assert_clean(&img_path, true, c.name);
    assert_compare(&img_path, &raw, c.name);
}

fn matrix() -> Vec<Case> {
    let mut v = vec![
        case("default-64k", 4 << 20, |_| {}),
        case("cluster512-refcount1", 1 << 20, |o| {
            o.cluster_size = 512;
            o.refcount_bits = 1;
        }),
        case("cluster2M-refcount64", 12 << 20, |o| {
            o.cluster_size = 2 << 20;
            o.refcount_bits = 64;
        }),
        case("compat0.10", 4 << 20, |o| o.compat = Compat::V0_10),
        case("lazy-4k", 2 << 20, |o| {
            o.cluster_size = 4096;
            o.lazy_refcounts = true;
        }),
        case("zstd", 4 << 20, |o| {
            o.compression_type = CompressionType::Zstd
        }),
        case("extended-l2", 4 << 20, |o| o.extended_l2 = true),
        case("extended-l2-16k-refcount2", 2 << 20, |o| {
            o.extended_l2 = true;
            o.cluster_size = 16384;
            o.refcount_bits = 2;
        }),
        case("prealloc-metadata", 2 << 20, |o| {
            o.preallocation = Preallocation::Metadata
        }),
    ];
    let mut b = case("backing-raw", 4 << 20, |_| {});
    b.backing = true;
    v.push(b);
    let mut b = case("backing-raw-v2", 2 << 20, |o| o.compat = Compat::V0_10);
    b.backing = true;
    v.push(b);
    let mut b = case("backing-extended-l2", 2 << 20, |o| o.extended_l2 = true);
    b.backing = true;
    v.push(b);
    v
}

#[test]
fn ours_to_qemu_matrix() {
    for (i, c) in matrix().into_iter().enumerate() {
        run(c, 0x5eed_0000 + i as u64);
    }
}

#[test]
fn sanity_layout_matches_qemu_expectations() {
    // A fresh 64 KiB image: first L2 at 0x40000, first data at 0x50000 (the iotests' layout).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let mut img = Image::create_path(&p, &CreateOptions::new(64 << 20)).unwrap();
    img.write(0, &[0x11; 512]).unwrap();
    let m = img.map(0, 65536).unwrap();
    assert_eq!(m[0].host_offset, Some(0x50000));
    img.write_compressed(65536, &[0x22; 65536]).unwrap();
    let m = img.map(65536, 65536).unwrap();
    assert_eq!(m[0].kind, qcow2_image::ExtentKind::Compressed);
    img.close().unwrap();
    assert_clean(&p, true, "sanity");
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "read -P 0x22 64k 64k",
            "-c",
            "read -P 0x11 0 512",
            "-c",
            "read -P 0 512 63k",
        ])
        .arg(&p)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        !s.contains("Pattern verification failed") && s.matches("read ").count() == 3,
        "{s}"
    );
}
