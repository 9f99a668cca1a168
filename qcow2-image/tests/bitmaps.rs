//! Persistent bitmaps under our engine: the library API (add, remove, clear, enable,
//! disable, merge, dirty ranges) with QEMU's checks, tracking of guest changes on `Image`
//! and `SharedImage`, storing at close with exact refcounts, and interop with bitmaps QEMU
//! makes and maintains. Crash and fault tests are in `bitmap_crash.rs`.

mod common;

use common::assert_clean;
use qcow2_image::{BitmapAddOptions, CreateOptions, Image, OpenOptions, SharedImage};
use qcow2_io::MemStorage;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 4 MiB QEMU image (4 KiB clusters) with an enabled and a disabled bitmap.
fn qemu_image_with_bitmaps(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("b.qcow2");
    let ps = p.to_str().expect("utf-8 path");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        ps,
        "4M",
    ]);
    qemu_img(&["bitmap", "--add", ps, "enabled"]);
    qemu_img(&["bitmap", "--add", "--disable", ps, "disabled"]);
    p
}

fn open_mem(bytes: Vec<u8>, opts: &OpenOptions) -> (Arc<MemStorage>, Image) {
    let s = Arc::new(MemStorage::from_bytes(bytes));
    let img = Image::open(s.clone(), opts).expect("open");
    (s, img)
}

/// (name, in_use, auto) of every bitmap, through our own reader.
fn flags(image: &[u8]) -> Vec<(String, bool, bool)> {
    let (_, img) = open_mem(image.to_vec(), &OpenOptions::read_only());
    img.bitmaps()
        .expect("bitmaps")
        .into_iter()
        .map(|b| (b.name, b.in_use, b.auto))
        .collect()
}

/// The dirty ranges a bitmap of granularity `g` over `size` bytes must hold after the
/// changes `(offset, len)`: a simple model (set of granules), merged into runs.
fn model(changes: &[(u64, u64)], g: u64, size: u64) -> Vec<(u64, u64)> {
    let mut set = std::collections::BTreeSet::new();
    for &(o, l) in changes {
        if l > 0 {
            set.extend(o / g..=(o + l - 1) / g);
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for i in set {
        let (s, e) = (i * g, ((i + 1) * g).min(size));
        match out.last_mut() {
            Some((lo, ll)) if *lo + *ll == s => *ll = e - *lo,
            _ => out.push((s, e - s)),
        }
    }
    out
}

fn ranges(image: &[u8], name: &str) -> Vec<(u64, u64)> {
    let (_, img) = open_mem(image.to_vec(), &OpenOptions::read_only());
    img.dirty_ranges(name).expect("dirty ranges").collect()
}

/// `qemu-img info` bitmaps: (name, flags).
fn qemu_info_bitmaps(p: &Path) -> Vec<(String, Vec<String>)> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(p)
        .output()
        .expect("qemu-img info");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let f = b["flags"]
                        .as_array()
                        .map(|f| {
                            f.iter()
                                .filter_map(|x| x.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    (b["name"].as_str().unwrap_or("").to_string(), f)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn read_only_and_unchanged_writable_opens_leave_the_file_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(qemu_image_with_bitmaps(dir.path())).expect("read");
    let (storage, mut img) = open_mem(bytes.clone(), &OpenOptions::read_only());
    let mut buf = vec![0u8; 4096];
    img.read(0, &mut buf).expect("read");
    assert_eq!(img.bitmaps().expect("bitmaps").len(), 2);
    assert!(img
        .dirty_ranges("enabled")
        .expect("ranges")
        .next()
        .is_none());
    assert!(img.bitmap_add("x", &BitmapAddOptions::default()).is_err());
    img.close().expect("close");
    assert!(storage.to_bytes() == bytes);
    let mut img = Image::open(storage.clone(), &OpenOptions::default()).expect("open");
    img.read(0, &mut buf).expect("read");
    img.flush().expect("flush");
    img.close().expect("close");
    assert!(
        storage.to_bytes() == bytes,
        "a writable open without change wrote"
    );
}

/// The same guest changes through QEMU (qemu-io) and through us, on copies of one image:
/// both leave the bitmaps consistent with the same dirty ranges (read by our reader from
/// both files), and `qemu-img check`/`info` agree.
#[test]
fn guest_changes_are_tracked_as_qemu_tracks_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = qemu_image_with_bitmaps(dir.path());
    let q = dir.path().join("q.qcow2");
    let o = dir.path().join("o.qcow2");
    std::fs::copy(&base, &q).expect("copy");
    std::fs::copy(&base, &o).expect("copy");
    // (kind, offset, len); granularity is 4 KiB (QEMU's default: the cluster size, clamped
    // to 4 KiB ..= 64 KiB).
    let ops: &[(&str, u64, u64)] = &[
        ("write", 70_000, 5000),
        ("write", 3 << 20, 4096),
        ("zero", 1 << 20, 128 << 10),
        ("discard", 2 << 20, 64 << 10),
        ("write", (4 << 20) - 512, 512),
    ];
    let cmds: Vec<String> = ops
        .iter()
        .map(|(k, off, len)| match *k {
            "write" => format!("write -P 0x5a {off} {len}"),
            "zero" => format!("write -z {off} {len}"),
            _ => format!("discard {off} {len}"),
        })
        .collect();
    common::qemu_io(&q, &cmds);
    let mut img = Image::open_path(&o, &OpenOptions::default()).expect("open");
    for (k, off, len) in ops {
        match *k {
            "write" => img.write(*off, &vec![0x5a; *len as usize]),
            "zero" => img.write_zeroes(*off, *len, false),
            _ => img.discard(*off, *len),
        }
        .expect("guest change");
    }
    img.close().expect("close");
    assert_clean(&o, true, "ours after tracking");
    assert_eq!(qemu_info_bitmaps(&q), qemu_info_bitmaps(&o));
    let (qb, ob) = (std::fs::read(&q).expect("q"), std::fs::read(&o).expect("o"));
    let changes: Vec<(u64, u64)> = ops.iter().map(|&(_, o, l)| (o, l)).collect();
    let expected = model(&changes, 4096, 4 << 20);
    assert_eq!(ranges(&qb, "enabled"), expected, "QEMU's own bitmap");
    assert_eq!(ranges(&ob, "enabled"), expected, "our bitmap");
    assert!(ranges(&ob, "disabled").is_empty());
    assert_eq!(
        flags(&ob),
        [
            ("enabled".into(), false, true),
            ("disabled".into(), false, false)
        ]
    );
    // A second session keeps what the first stored and adds to it; QEMU reads the result.
    let mut img = Image::open_path(&o, &OpenOptions::default()).expect("open");
    img.write(8 << 10, &[1; 512]).expect("write");
    img.write((2 << 20) + (200 << 10), &[1; 512])
        .expect("write");
    img.close().expect("close");
    common::qemu_io(&q, &["write 8k 512".into(), "write 2248k 512".into()]);
    let (qb, ob) = (std::fs::read(&q).expect("q"), std::fs::read(&o).expect("o"));
    assert_eq!(ranges(&qb, "enabled"), ranges(&ob, "enabled"));
    assert_clean(&q, true, "QEMU after our session");
    assert_clean(&o, true, "ours after two sessions");
}

#[test]
fn library_api_with_qemus_checks_and_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("a.qcow2");
    let mut img = Image::create_path(&p, &CreateOptions::new(8 << 20)).expect("create");
    let add = |img: &mut Image, name: &str, g: Option<u64>, disabled: bool| {
        img.bitmap_add(
            name,
            &BitmapAddOptions {
                granularity: g,
                disabled,
            },
        )
    };
    add(&mut img, "a", None, false).expect("add a");
    add(&mut img, "b", Some(512), true).expect("add b");
    add(&mut img, "c", Some(1 << 20), false).expect("add c");
    let err = |r: qcow2_image::Result<()>| r.expect_err("refused").to_string();
    assert_eq!(
        err(add(&mut img, "a", None, false)),
        "Bitmap already exists: a"
    );
    assert_eq!(
        err(add(&mut img, "", None, false)),
        "Bitmap name cannot be empty"
    );
    assert_eq!(
        err(add(&mut img, "g", Some(1000), false)),
        "Granularity must be power of 2 and at least 512"
    );
    assert_eq!(
        err(add(&mut img, "g", Some(4 << 30), false)),
        "Granularity must be power of 2 and at least 512"
    );
    assert!(err(add(&mut img, &"n".repeat(1024), None, false))
        .ends_with("Name length exceeds maximum (1023 characters)"));
    assert_eq!(
        err(img.bitmap_clear("nope")),
        "Dirty bitmap 'nope' not found"
    );
    assert_eq!(
        err(img.bitmap_remove("nope")),
        "Dirty bitmap 'nope' not found"
    );
    assert_eq!(img.default_bitmap_granularity(), 65536);
    img.write(100 << 10, &[7; 4096]).expect("write");
    // b is disabled: nothing; a and c see the write.
    assert_eq!(
        img.dirty_ranges("a").expect("a").collect::<Vec<_>>(),
        [(64 << 10, 64 << 10)]
    );
    assert!(img.dirty_ranges("b").expect("b").next().is_none());
    img.bitmap_enable("b").expect("enable");
    img.bitmap_disable("a").expect("disable");
    img.write(5 << 20, &[7; 1024]).expect("write");
    assert_eq!(
        img.dirty_ranges("b").expect("b").collect::<Vec<_>>(),
        [(5 << 20, 1024)]
    );
    img.bitmap_merge_from("b", "a").expect("merge");
    assert_eq!(
        img.dirty_ranges("b").expect("b").collect::<Vec<_>>(),
        [(64 << 10, 64 << 10), (5 << 20, 1024)]
    );
    img.bitmap_clear("c").expect("clear");
    img.bitmap_remove("a").expect("remove");
    img.close().expect("close");
    assert_clean(&p, true, "after the API calls");
    // QEMU appends new bitmaps to the directory newest first (its in-memory list order).
    assert_eq!(
        qemu_info_bitmaps(&p),
        [
            ("c".to_string(), vec!["auto".to_string()]),
            ("b".to_string(), vec!["auto".to_string()])
        ]
    );
    let bytes = std::fs::read(&p).expect("read");
    assert_eq!(ranges(&bytes, "b"), [(64 << 10, 64 << 10), (5 << 20, 1024)]);
    assert!(ranges(&bytes, "c").is_empty());
    // Remove the stored ones: the extension and its autoclear bit go, nothing leaks.
    let mut img = Image::open_path(&p, &OpenOptions::default()).expect("open");
    img.bitmap_remove("b").expect("remove b");
    img.bitmap_remove("c").expect("remove c");
    img.close().expect("close");
    assert_clean(&p, true, "after removing every bitmap");
    assert!(qemu_info_bitmaps(&p).is_empty());
    let h = std::fs::read(&p).expect("read");
    assert_eq!(h[88..96], [0u8; 8], "autoclear bits");
}

#[test]
fn merge_from_another_image_and_v2_refusal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = qemu_image_with_bitmaps(dir.path());
    common::qemu_io(&src, &["write 1M 4k".into()]);
    let src_img = Image::open_path(&src, &OpenOptions::read_only()).expect("open src");
    let bits = src_img.bitmap("enabled").expect("bits");
    assert_eq!(bits.ranges().collect::<Vec<_>>(), [(1 << 20, 4096)]);
    let mut o = CreateOptions::new(4 << 20);
    o.cluster_size = 4096;
    let (storage, mut img) = {
        let s = Arc::new(MemStorage::new());
        let img = Image::create(s.clone(), &o).expect("create");
        (s, img)
    };
    img.bitmap_add(
        "t",
        &BitmapAddOptions {
            granularity: Some(65536),
            disabled: true,
        },
    )
    .expect("add");
    img.bitmap_merge("t", &bits).expect("merge");
    // Granularities differ: the coarser target gets the whole granule.
    assert_eq!(
        img.dirty_ranges("t").expect("t").collect::<Vec<_>>(),
        [(1 << 20, 64 << 10)]
    );
    img.resize(8 << 20).expect("resize");
    img.close().expect("close");
    let bytes = storage.to_bytes();
    assert_eq!(ranges(&bytes, "t"), [(1 << 20, 64 << 10)]);
    // A bitmap of another size does not merge.
    let (_, mut img) = open_mem(bytes, &OpenOptions::default());
    assert_eq!(
        img.bitmap_merge("t", &bits)
            .expect_err("sizes differ")
            .to_string(),
        "Bitmaps are of different sizes (destination size is 8388608, source size is 4194304) \
         and can't be merged"
    );
    // v2 images cannot store bitmaps.
    let mut o = CreateOptions::new(1 << 20);
    o.compat = qcow2_format::layout::Compat::V0_10;
    let mut img = Image::create(Arc::new(MemStorage::new()), &o).expect("create v2");
    let e = img
        .bitmap_add("x", &BitmapAddOptions::default())
        .expect_err("v2");
    assert!(
        e.to_string()
            .ends_with("Cannot store dirty bitmaps in qcow2 v2 files"),
        "{e}"
    );
}

#[test]
fn resize_follows_bitmaps_and_refuses_inconsistent_ones_as_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = qemu_image_with_bitmaps(dir.path());
    common::qemu_io(&p, &["write 3M 4k".into()]);
    let mut img = Image::open_path(&p, &OpenOptions::default()).expect("open");
    img.resize(2 << 20).expect("shrink");
    img.resize(6 << 20).expect("grow");
    img.write(5 << 20, &[1; 512]).expect("write");
    img.close().expect("close");
    assert_clean(&p, true, "after resizes");
    let b = std::fs::read(&p).expect("read");
    assert_eq!(ranges(&b, "enabled"), [(5 << 20, 4096)]);
    // QEMU reads the resized tables (its loader checks their size against the disk).
    assert_eq!(qemu_info_bitmaps(&p).len(), 2);
    common::qemu_io(&p, &["write 0 512".into()]);
    assert_eq!(
        ranges(&std::fs::read(&p).expect("read"), "enabled"),
        [(0, 4096), (5 << 20, 4096)]
    );
    // An IN_USE bitmap (a writer crashed) blocks a resize, as in QEMU.
    let mut img = Image::open_path(&p, &OpenOptions::default()).expect("open");
    img.write(0, &[1; 512]).expect("write");
    img.abandon();
    let mut img = Image::open_path(&p, &OpenOptions::default()).expect("open");
    let e = img.resize(8 << 20).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "Bitmap 'enabled' is inconsistent and cannot be used"
    );
    assert_eq!(
        e.hint(),
        Some("Try block-dirty-bitmap-remove to delete this bitmap from disk")
    );
    assert!(img.bitmap_clear("enabled").is_err());
    img.bitmap_remove("enabled")
        .expect("remove an inconsistent bitmap");
    // The session had marked every bitmap, the disabled one too (as QEMU's open does).
    assert_eq!(
        img.resize(8 << 20).expect_err("refused").to_string(),
        "Bitmap 'disabled' is inconsistent and cannot be used"
    );
    img.bitmap_remove("disabled").expect("remove");
    img.resize(8 << 20).expect("resize");
    img.close().expect("close");
    assert_clean(&p, true, "after removing the inconsistent bitmap");
}

#[test]
fn shared_image_tracks_concurrent_writes() {
    let mut o = CreateOptions::new(64 << 20);
    o.cluster_size = 65536;
    let storage = Arc::new(MemStorage::new());
    let mut img = Image::create(storage.clone(), &o).expect("create");
    img.bitmap_add(
        "t",
        &BitmapAddOptions {
            granularity: Some(65536),
            disabled: false,
        },
    )
    .expect("add");
    img.close().expect("close");
    let shared = Arc::new(SharedImage::new(
        Image::open(storage.clone(), &OpenOptions::default()).expect("open"),
    ));
    // Thread t writes 4 KiB twice (the second time in place) into every 5th granule of
    // its own 16 MiB quarter, and zeroes one granule more.
    let plan = |t: u64| -> (Vec<u64>, u64) {
        let base = t * (16 << 20);
        (
            (0..50).map(|i| base + i * 5 * 65536).collect(),
            base + (15 << 20),
        )
    };
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = shared.clone();
            let (mine, zero) = plan(t);
            std::thread::spawn(move || {
                for round in 0..2 {
                    for &off in &mine {
                        s.write(off + round * 4096, &[t as u8 + 1; 4096])
                            .expect("write");
                    }
                }
                s.write_zeroes(zero, 65536, false).expect("zero");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let shared = Arc::into_inner(shared).expect("last reference");
    shared.close().expect("close");
    let mut changes = Vec::new();
    for t in 0..4 {
        let (mine, zero) = plan(t);
        changes.extend(mine.iter().map(|&o| (o, 8192)));
        changes.push((zero, 65536));
    }
    let got = ranges(&storage.to_bytes(), "t");
    assert_eq!(got, model(&changes, 65536, 64 << 20));
}
