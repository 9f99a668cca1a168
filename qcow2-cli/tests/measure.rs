//! `qcow2 measure` against `qemu-img measure` (human and JSON): `--size` and file sources
//! (qcow2 with partial allocation, compressed and zero clusters, a backing chain, extended
//! L2, preallocated and raw files) over cluster sizes 512..2M, refcount widths, extended L2,
//! compat, preallocation modes and `backing_file`, and the error messages.

mod common;

use common::{backing_chain_fixture, have_qemu, ok, qcow2, qemu_img, qemu_io};
use std::path::Path;

fn same(d: &Path, args: &[&str]) {
    let mut full = vec!["measure"];
    full.extend_from_slice(args);
    let ours = qcow2(d, &full);
    let qemu = qemu_img(d, &full);
    assert_eq!(ours.code, qemu.code, "{full:?}: {ours:?} vs {qemu:?}");
    assert_eq!(ours.stdout, qemu.stdout, "{full:?}");
    assert_eq!(
        ours.stderr,
        qemu.stderr.replace("qemu-img: ", "qcow2: "),
        "{full:?}"
    );
}

/// [`same`], and qemu-img succeeded (the case measured something).
fn same_ok(d: &Path, args: &[&str]) {
    let mut full = vec!["measure"];
    full.extend_from_slice(args);
    let qemu = qemu_img(d, &full);
    assert_eq!(qemu.code, 0, "{full:?}: {qemu:?}");
    same(d, args);
}

const OPTIONS: &[&str] = &[
    "",
    "cluster_size=512",
    "cluster_size=2M",
    "cluster_size=4k,refcount_bits=1",
    "refcount_bits=64",
    "refcount_bits=8,cluster_size=16k",
    "extended_l2=on",
    "extended_l2=on,cluster_size=2M",
    "preallocation=metadata",
    "preallocation=falloc",
    "preallocation=full",
    "compat=0.10",
    "compat=0.10,extended_l2=on",
    "backing_file=x",
    "cluster_size=8k,refcount_bits=4,preallocation=full",
    "lazy_refcounts=on,compression_type=zstd",
];

#[test]
fn measure_size_equals_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for size in ["0", "1", "1G", "100M", "3T", "12345678"] {
        for o in OPTIONS {
            let mut args = vec!["-O", "qcow2", "--size", size];
            if !o.is_empty() {
                args.extend(["-o", o]);
            }
            same(d, &args);
        }
        same(d, &["--size", size]);
        same(d, &["-O", "raw", "--size", size, "--output=json"]);
        same(d, &["-O", "qcow2", "--size", size, "--output=json"]);
    }
}

#[test]
fn measure_files_equals_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    backing_chain_fixture(d);
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "raw", "sparse.raw", "50M"],
    ));
    ok(qemu_io(
        d,
        &[
            "-f",
            "raw",
            "-c",
            "write -P 9 5M 12k",
            "-c",
            "write -P 9 30M 1",
            "sparse.raw",
        ],
    ));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "ext.qcow2",
            "32M",
        ],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 1 4k 4k",
            "-c",
            "write -P 2 1M 300k",
            "ext.qcow2",
        ],
    ));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full",
            "full.qcow2",
            "8M",
        ],
    ));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "8M",
        ],
    ));
    ok(qemu_io(d, &["-c", "write -P 1 1M 1M", "v2.qcow2"]));
    let img = |args: &str| ok(qemu_img(d, &args.split(' ').collect::<Vec<_>>()));
    img("create -q -f qcow2 -o preallocation=metadata meta.qcow2 16M");
    ok(qemu_io(d, &["-c", "write -P 1 1M 4k", "meta.qcow2"]));
    img("create -q -f qcow2 -b sparse.raw -F raw rawtop.qcow2 60M");
    ok(qemu_io(d, &["-c", "write -P 5 2M 64k", "rawtop.qcow2"]));
    for src in [
        &["base.qcow2"][..],
        &["top.qcow2"][..],
        &["sparse.raw"][..],
        &["ext.qcow2"][..],
        &["full.qcow2"][..],
        &["meta.qcow2"][..],
        &["rawtop.qcow2"][..],
        &["v2.qcow2"][..],
        &["-f", "raw", "base.qcow2"][..],
    ] {
        for o in OPTIONS {
            let mut args = vec!["-O", "qcow2"];
            if !o.is_empty() {
                args.extend(["-o", o]);
            }
            args.extend_from_slice(src);
            same_ok(d, &args);
        }
        let mut args = vec!["--output=json", "-O", "qcow2"];
        args.extend_from_slice(src);
        same_ok(d, &args);
        let mut args = vec!["-O", "raw"];
        args.extend_from_slice(src);
        same_ok(d, &args);
    }
}

#[test]
fn measure_errors_equal_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "a.qcow2", "2M"],
    ));
    ok(qemu_img(d, &["create", "-q", "-f", "raw", "a.raw", "2M"]));
    for args in [
        &["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"][..],
        &["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"][..],
        &[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1G",
        ][..],
        &["-O", "qcow2", "-o", "compat=0.9", "--size", "1G"][..],
        &["-O", "qcow2", "-o", "preallocation=foo", "--size", "1G"][..],
        &[
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k",
            "--size",
            "1G",
        ][..],
        &["-O", "qcow2", "-o", "cluster_size=512", "--size", "1P"][..],
        &["-O", "qcow2", "-o", "size=1P,cluster_size=512", "a.qcow2"][..],
        &["-O", "qcow2", "-o", "foo=bar", "--size", "1G"][..],
        &["-O", "qcow2", "-o", "help", "--size", "1G"][..],
        &["-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"][..],
        &[
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s",
            "--size",
            "1G",
        ][..],
        &[
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=aes,cluster_size=4k",
            "--size",
            "1G",
        ][..],
        &["-O", "qcow2", "-o", "encryption=on", "--size", "1G"][..],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-o",
            "refcount_bits=8",
            "--size",
            "1G",
        ][..],
        &["-O", "raw", "-o", "cluster_size=4k", "--size", "1G"][..],
        &["-O", "qcow2", "--size", "1G", "a.qcow2"][..],
        &["-O", "qcow2"][..],
        &["-O", "qcow2", "-f", "qcow2", "--size", "1G"][..],
        &["-O", "foo", "--size", "1G"][..],
        &["-O", "vmdk", "--size", "1G"][..],
        &["-O", "luks", "--size", "1G"][..],
        &["-O", "dmg", "--size", "1G"][..],
        &["-O", "parallels", "--size", "1G"][..],
        &["-O", "qcow2", "--size", "1x"][..],
        &["-O", "qcow2", "--size", "-5"][..],
        &["-O", "qcow2", "a.qcow2", "a.raw"][..],
        &["-O", "qcow2", "missing.qcow2"][..],
        &["-O", "qcow2", "-l", "foo", "a.qcow2"][..],
        &["-O", "qcow2", "-l", "foo", "a.raw"][..],
        &["--output=json", "-O", "qcow2", "-U", "a.qcow2"][..],
    ] {
        same(d, args);
    }
}

/// "bitmaps size" of qcow2 v3 sources with persistent bitmaps of several granularities.
#[test]
fn measure_bitmaps_equal_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "bm.qcow2", "1G"],
    ));
    ok(qemu_img(d, &["bitmap", "--add", "bm.qcow2", "b0"]));
    ok(qemu_img(
        d,
        &[
            "bitmap",
            "--add",
            "-g",
            "4k",
            "bm.qcow2",
            "a-longer-bitmap-name",
        ],
    ));
    ok(qemu_img(
        d,
        &["bitmap", "--add", "-g", "2M", "bm.qcow2", "x"],
    ));
    ok(qemu_io(d, &["-c", "write 0 1M", "bm.qcow2"]));
    for o in [
        "cluster_size=64k",
        "cluster_size=512",
        "cluster_size=2M",
        "compat=0.10",
    ] {
        same(d, &["-O", "qcow2", "-o", o, "bm.qcow2"]);
        same(d, &["--output=json", "-O", "qcow2", "-o", o, "bm.qcow2"]);
    }
    same(d, &["-O", "raw", "bm.qcow2"]);
}

/// `-l`: measuring an internal snapshot (by id, name or `snapshot.id=`/`snapshot.name=`)
/// of an image whose active state and size changed since.
#[test]
fn measure_snapshot_equals_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "sn.qcow2", "64M"],
    ));
    ok(qemu_io(d, &["-c", "write -P 1 0 5M", "sn.qcow2"]));
    ok(qemu_img(d, &["snapshot", "-c", "s1", "sn.qcow2"]));
    ok(qemu_io(
        d,
        &["-c", "write -P 2 10M 20M", "-c", "discard 0 2M", "sn.qcow2"],
    ));
    ok(qemu_img(d, &["snapshot", "-c", "s2", "sn.qcow2"]));
    ok(qemu_img(d, &["resize", "-q", "sn.qcow2", "100M"]));
    ok(qemu_io(d, &["-c", "write 80M 1M", "sn.qcow2"]));
    for l in [
        "s1",
        "1",
        "s2",
        "2",
        "snapshot.name=s1",
        "snapshot.id=2",
        "snapshot.id=1,snapshot.name=s2",
        "snapshot.id=1,snapshot.name=s1",
        "snapshot.foo=1",
        "s3",
    ] {
        same(d, &["-O", "qcow2", "-l", l, "sn.qcow2"]);
        same(
            d,
            &["-O", "qcow2", "-o", "cluster_size=4k", "-l", l, "sn.qcow2"],
        );
    }
}
