//! `qcow2 compare` against `qemu-img compare` on the same images: stdout, stderr and exit
//! codes for identical and different contents, different sizes, strict mode, raw and qcow2
//! (backing chains, compressed, zero and extended-L2 clusters), and the error paths.

mod common;

use common::{backing_chain_fixture, have_qemu, ok, qcow2, qemu_img, qemu_io};
use std::path::Path;

/// More images: a raw backing file, a missing backing file, backing files shorter and
/// longer than their overlays, extended L2 clusters allocated for one subcluster.
fn chain_fixtures(d: &Path) {
    let img = |args: &str| ok(qemu_img(d, &args.split(' ').collect::<Vec<_>>()));
    let io = |file: &str, cmds: &[&str]| {
        let mut a: Vec<&str> = Vec::new();
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(file);
        ok(qemu_io(d, &a));
    };
    img("create -q -f qcow2 -b sparse.raw -F raw rawtop.qcow2 80M");
    io("rawtop.qcow2", &["write -P 5 2M 64k"]);
    img("create -q -f qcow2 -u -b gone.qcow2 -F qcow2 orphan.qcow2 1M");
    img("create -q -f qcow2 sb.qcow2 1M");
    img("create -q -f qcow2 -b sb.qcow2 -F qcow2 st.qcow2 4M");
    img("create -q -f qcow2 -b sb.qcow2 -F qcow2 st2.qcow2 4M");
    io("st2.qcow2", &["write -P 1 2M 64k"]);
    img("create -q -f qcow2 sf.qcow2 4M");
    io("sf.qcow2", &["write -P 1 2M 64k"]);
    img("create -q -f qcow2 b4.qcow2 4M");
    img("create -q -f qcow2 -b b4.qcow2 -F qcow2 mid2.qcow2 2M");
    img("create -q -f qcow2 -b mid2.qcow2 -F qcow2 top3.qcow2 3M");
    img("create -q -f qcow2 m2.qcow2 2M");
    img("create -q -f qcow2 -b m2.qcow2 -F qcow2 m3.qcow2 3M");
    img("create -q -f qcow2 -o cluster_size=1M,extended_l2=on xa.qcow2 8M");
    img("create -q -f qcow2 -o cluster_size=1M,extended_l2=on xb.qcow2 8M");
    io("xa.qcow2", &["write -P 2 6M 1M", "write -z 6M 64k"]);
    io(
        "xb.qcow2",
        &[
            "write -P 2 6M 1M",
            "write -z 6M 64k",
            "write -P 1 4718592 4096",
        ],
    );
}

/// The images both tools compare.
fn fixtures(d: &Path) {
    backing_chain_fixture(d);
    ok(qemu_img(
        d,
        &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"],
    ));
    ok(qemu_img(
        d,
        &["convert", "-O", "raw", "top.qcow2", "flat.raw"],
    ));
    ok(qemu_img(
        d,
        &["convert", "-O", "qcow2", "top.qcow2", "changed.qcow2"],
    ));
    ok(qemu_io(d, &["-c", "write -P 4 60M 1", "changed.qcow2"]));
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "big.qcow2", "100M"],
    ));
    ok(qemu_io(d, &["-c", "write -P 3 70M 10", "big.qcow2"]));
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "empty.qcow2", "100M"],
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
            "64M",
        ],
    ));
    ok(qemu_io(d, &["-c", "write -P 1 4k 4k", "ext.qcow2"]));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "meta.qcow2",
            "16M",
        ],
    ));
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "raw", "sparse.raw", "64M"],
    ));
    ok(qemu_io(
        d,
        &["-f", "raw", "-c", "write -P 9 5M 12k", "sparse.raw"],
    ));
    chain_fixtures(d);
}

#[test]
fn compare_equals_qemu_img_compare() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    fixtures(d);
    let cases: &[&[&str]] = &[
        &["top.qcow2", "flat.qcow2"],
        &["top.qcow2", "flat.raw"],
        &["flat.raw", "changed.qcow2"],
        &["changed.qcow2", "top.qcow2"],
        &["-s", "top.qcow2", "flat.qcow2"],
        &["-s", "flat.qcow2", "flat.qcow2"],
        &["-s", "flat.qcow2", "flat.raw"],
        &["-s", "base.qcow2", "big.qcow2"],
        &["base.qcow2", "big.qcow2"],
        &["big.qcow2", "base.qcow2"],
        &["base.qcow2", "empty.qcow2"],
        &["empty.qcow2", "ext.qcow2"],
        &["ext.qcow2", "ext.qcow2"],
        &["-s", "ext.qcow2", "ext.qcow2"],
        &["-s", "meta.qcow2", "meta.qcow2"],
        &["meta.qcow2", "empty.qcow2"],
        &["sparse.raw", "base.qcow2"],
        &["rawtop.qcow2", "sparse.raw"],
        &["sparse.raw", "rawtop.qcow2"],
        &["-s", "rawtop.qcow2", "rawtop.qcow2"],
        &["-s", "st.qcow2", "sf.qcow2"],
        &["-s", "st.qcow2", "st.qcow2"],
        &["-s", "st2.qcow2", "sf.qcow2"],
        &["st2.qcow2", "sf.qcow2"],
        &["-s", "st.qcow2", "st2.qcow2"],
        &["-s", "top3.qcow2", "m3.qcow2"],
        &["-s", "m3.qcow2", "top3.qcow2"],
        &["top3.qcow2", "sf.qcow2"],
        &["-s", "xa.qcow2", "xb.qcow2"],
        &["-s", "xb.qcow2", "xa.qcow2"],
        &["xa.qcow2", "xb.qcow2"],
        &["-s", "sparse.raw", "sparse.raw"],
        &["-q", "base.qcow2", "big.qcow2"],
        &["-p", "base.qcow2", "empty.qcow2"],
        &["-p", "top.qcow2", "flat.qcow2"],
        &["-p", "top.qcow2", "flat.raw"],
        &["-p", "-s", "base.qcow2", "big.qcow2"],
        &["-p", "base.qcow2", "big.qcow2"],
        &["-p", "-q", "top.qcow2", "flat.qcow2"],
        &["-U", "-T", "none", "top.qcow2", "flat.qcow2"],
        &["-f", "raw", "-F", "raw", "base.qcow2", "base.qcow2"],
        &["-f", "raw", "base.qcow2", "base.qcow2"],
        &["-f", "qcow2", "-F", "raw", "flat.qcow2", "flat.raw"],
        // Errors: exit 2 for opens and the cache mode.
        &["top.qcow2", "missing.qcow2"],
        &["orphan.qcow2", "top.qcow2"],
        &["-T", "bogus", "top.qcow2", "top.qcow2"],
        &["-f", "bogus", "top.qcow2", "top.qcow2"],
        &["-F", "qcow2", "top.qcow2", "flat.raw"],
    ];
    for args in cases {
        let mut full = vec!["compare"];
        full.extend_from_slice(args);
        let ours = qcow2(d, &full);
        let qemu = qemu_img(d, &full);
        let error_case = args
            .iter()
            .any(|a| ["missing.qcow2", "orphan.qcow2", "bogus"].contains(a))
            || args.starts_with(&["-F", "qcow2"]);
        // Every other case opens real images and gets a verdict (0 or 1).
        assert!(error_case || qemu.code <= 1, "{full:?}: {qemu:?}");
        assert_eq!(ours.code, qemu.code, "{full:?}: {ours:?} vs {qemu:?}");
        assert_eq!(ours.stdout, qemu.stdout, "{full:?}");
        assert_eq!(
            ours.stderr,
            qemu.stderr.replace("qemu-img: ", "qcow2: "),
            "{full:?}"
        );
    }
    // Usage errors: same exit status (qemu-img's help hint differs in wording).
    for args in [&["compare", "top.qcow2"][..], &["compare"][..]] {
        assert_eq!(qcow2(d, args).code, qemu_img(d, args).code, "{args:?}");
    }
}

/// Images we write compare equal to what they were made from, by both tools.
#[test]
fn our_images_compare_with_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    fixtures(d);
    ok(qcow2(
        d,
        &["convert", "-O", "qcow2", "top.qcow2", "ours.qcow2"],
    ));
    ok(qemu_img(d, &["check", "ours.qcow2"]));
    for tool in [qcow2, qemu_img] {
        let r = tool(d, &["compare", "ours.qcow2", "flat.raw"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.stdout, "Images are identical.\n");
    }
}
