//! Shrinking (`qemu-img resize --shrink`, iotests 250/292 style): our shrink matches
//! qemu-img's on the same image (`qemu-img compare`, file size), `qemu-img check` is clean,
//! snapshots keep their data (v3) and apply restores the old size, v2 with snapshots and
//! sizes that are not multiples of 512 are refused with QEMU's messages.

mod common;

use common::{assert_clean, qemu_create, qemu_io};
use qcow2_image::{Image, OpenOptions};
use qcow2_io::FileStorage;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn open_rw(p: &Path) -> Image {
    Image::open(
        Arc::new(FileStorage::open(p, true).unwrap()),
        &OpenOptions::default(),
    )
    .unwrap()
}

fn qemu_img(args: &[&str], p: &Path) {
    let out = Command::new("qemu-img").args(args).arg(p).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compare(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn shrink_like_qemu_img() {
    for (opts, new_size) in [
        ("cluster_size=65536", (1u64 << 20) + 1536),
        ("cluster_size=4096", 300 * 1024),
        (
            "cluster_size=4096,extended_l2=off,preallocation=metadata",
            2 << 20,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        qemu_create(&ours, opts, 8 << 20, None);
        qemu_io(
            &ours,
            &[
                "write -P 1 0 1200k".into(),
                "write -P 2 3M 2M".into(),
                if opts.contains("prealloc") {
                    "write -P 3 7M 64k".into()
                } else {
                    "write -c -P 3 7M 64k".into()
                },
                "write -z 6M 64k".into(),
            ],
        );
        std::fs::copy(&ours, &theirs).unwrap();
        let mut img = open_rw(&ours);
        img.resize(new_size).unwrap();
        assert_eq!(img.virtual_size(), new_size);
        img.close().unwrap();
        let st = Command::new("qemu-img")
            .args(["resize", "-q", "--shrink", "-f", "qcow2"])
            .arg(&theirs)
            .arg(new_size.to_string())
            .status()
            .unwrap();
        assert!(st.success());
        assert_clean(&ours, true, opts);
        compare(&ours, &theirs);
        let (a, b) = (
            std::fs::metadata(&ours).unwrap().len(),
            std::fs::metadata(&theirs).unwrap().len(),
        );
        assert!(a <= b, "{opts}: our file {a} bytes, qemu-img's {b}");
        // Growing again reads zeros beyond the old end (iotest 292).
        let mut img = open_rw(&ours);
        img.resize(8 << 20).unwrap();
        let mut buf = vec![9u8; 65536];
        img.read(3 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0), "{opts}");
        img.close().unwrap();
        assert_clean(&ours, true, &format!("{opts}, regrown"));
    }
}

#[test]
fn shrink_with_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    qemu_create(&p, "cluster_size=4096", 4 << 20, None);
    qemu_io(&p, &["write -P 7 0 4M".into()]);
    let mut img = open_rw(&p);
    img.snapshot_create("full").unwrap();
    img.resize(1 << 20).unwrap();
    img.close().unwrap();
    assert_clean(&p, true, "shrunk with a snapshot");
    // The snapshot still has its data; apply restores its size.
    let mut img = open_rw(&p);
    img.snapshot_apply("full").unwrap();
    assert_eq!(img.virtual_size(), 4 << 20);
    let mut buf = vec![0u8; 4096];
    img.read((4 << 20) - 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 7));
    // Apply to a smaller snapshot shrinks.
    img.resize(2 << 20).unwrap();
    img.snapshot_create("small").unwrap();
    img.resize(3 << 20).unwrap();
    img.snapshot_apply("small").unwrap();
    assert_eq!(img.virtual_size(), 2 << 20);
    img.close().unwrap();
    assert_clean(&p, true, "after applies");
    qemu_io(&p, &["read -P 7 0 2M".into()]);

    // v2 with snapshots: refused, nothing changed.
    let v2 = dir.path().join("v2.qcow2");
    qemu_create(&v2, "compat=0.10", 1 << 20, None);
    qemu_img(&["snapshot", "-c", "s"], &v2);
    let mut img = open_rw(&v2);
    let e = img.resize(512 << 10).unwrap_err();
    assert_eq!(e.to_string(), "Can't resize a v2 image which has snapshots");
    let e = img.snapshot_apply("nope").unwrap_err();
    assert_eq!(e.errno(), 2);
    img.close().unwrap();
    let mut img = open_rw(&p);
    let e = img.resize(1000).unwrap_err();
    assert_eq!(e.to_string(), "The new size must be a multiple of 512");
    img.close().unwrap();
}
