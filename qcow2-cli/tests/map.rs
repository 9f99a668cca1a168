//! `qcow2 map` against `qemu-img map` (human and JSON) on qcow2 images with data, zero,
//! compressed and unallocated clusters and a qcow2 backing file.
//!
//! Difference by definition (not exercised here): qemu-img asks the file system for holes
//! (SEEK_HOLE) and reports the part of a data cluster that is a hole in the image file as
//! "zero": true; this tool only knows the end of the file, so a hole inside the file is
//! reported as plain data. The images below write whole clusters, so there are none.

mod common;

use common::{have_qemu, qcow2, qemu_img, qemu_io};

#[test]
fn map_equals_qemu_img_map() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ok = |r: common::Run| assert_eq!(r.code, 0, "{r:?}");
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 1 0 128k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write 3M 64k",
            "base.qcow2",
        ],
    ));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ));
    ok(qemu_io(d, &["-c", "write -P 2 64k 64k", "top.qcow2"]));
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "comp.qcow2", "16M"],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 1 64k 64k",
            "-c",
            "write -c 1M 128k",
            "-c",
            "write -z 2M 1M",
            "-c",
            "write -P 3 0 64k",
            "comp.qcow2",
        ],
    ));
    let top = d.join("top.qcow2");
    let top = top.to_str().expect("utf-8");
    for args in [
        &["map", "base.qcow2"][..],
        &["map", "--output=json", "base.qcow2"][..],
        &["map", "top.qcow2"][..],
        &["map", "--output=json", "top.qcow2"][..],
        &[
            "map",
            "--output=json",
            "--start-offset",
            "64k",
            "--max-length",
            "100k",
            "top.qcow2",
        ][..],
        &["map", top][..],
        &["map", "--output", "json", "comp.qcow2"][..],
        &["map", "comp.qcow2"][..],
        &["map", "missing.qcow2"][..],
    ] {
        let ours = qcow2(d, args);
        let qemu = qemu_img(d, args);
        assert_eq!(ours.code, qemu.code, "{args:?}: {ours:?}");
        assert_eq!(ours.stdout, qemu.stdout, "{args:?}");
        assert_eq!(
            ours.stderr,
            qemu.stderr.replace("qemu-img: ", "qcow2: "),
            "{args:?}"
        );
    }
}
