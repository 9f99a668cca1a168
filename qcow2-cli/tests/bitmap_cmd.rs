//! `qcow2 bitmap` against `qemu-img bitmap`: the same command line on copies of one image
//! leaves the two files byte for byte identical, with the same exit status and messages
//! (QEMU's node names `#blockNNN` normalised), for single and combined operations, on
//! images with and without bitmaps (QEMU-made ones with dirty bits), and for the errors.
//! Also `convert --bitmaps`, `measure` ("bitmaps size") and `check -r` (which stores the
//! bitmaps again, as QEMU's writable open and close do) against qemu-img.

mod common;

use common::{have_qemu, ok, qcow2, qemu_img, qemu_io, Run};
use std::path::Path;

/// The messages with the program prefix and QEMU's generated node names normalised.
fn text(r: &Run) -> String {
    let t = r.text().replace("qemu-img bitmap", "qcow2 bitmap");
    let mut out = String::new();
    let mut rest = t.as_str();
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i + 6]);
        rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// Base images: fresh (64 KiB clusters), one with 4 KiB clusters and a multi-cluster
/// bitmap table, and one with an enabled and a disabled QEMU bitmap both holding writes.
fn bases(d: &Path) -> Vec<&'static str> {
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "fresh.qcow2", "16M"],
    ));
    // 4 KiB clusters and a 512-byte granularity over 64 MiB: 16 KiB of bits, a table of
    // four entries, two of them with data (QEMU's writes) and two all-zero.
    let small = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "small.qcow2",
        "64M",
    ];
    ok(qemu_img(d, &small));
    ok(qemu_img(
        d,
        &["bitmap", "--add", "-g", "512", "small.qcow2", "enabled"],
    ));
    ok(qemu_io(
        d,
        &["-c", "write 100k 3k", "-c", "write 50M 1M", "small.qcow2"],
    ));
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "used.qcow2", "32M"],
    ));
    ok(qemu_img(d, &["bitmap", "--add", "used.qcow2", "enabled"]));
    ok(qemu_img(
        d,
        &["bitmap", "--add", "-g", "512", "used.qcow2", "fine"],
    ));
    ok(qemu_io(
        d,
        &["-c", "write 1M 64k", "-c", "write 20M 4k", "used.qcow2"],
    ));
    ok(qemu_img(d, &["bitmap", "--disable", "used.qcow2", "fine"]));
    ok(qemu_io(d, &["-c", "write 30M 512", "used.qcow2"]));
    vec!["fresh.qcow2", "small.qcow2", "used.qcow2"]
}

/// Runs `bitmap ARGS` (with `IMG` standing for the image) through both tools on copies of
/// `base`; asserts equal status, messages and bytes. Returns the status.
fn same(d: &Path, base: &str, args: &[&str]) -> i32 {
    let (q, o) = ("q.qcow2", "o.qcow2");
    std::fs::copy(d.join(base), d.join(q)).expect("copy");
    std::fs::copy(d.join(base), d.join(o)).expect("copy");
    fn with<'a>(args: &[&'a str], img: &'a str) -> Vec<&'a str> {
        let mut v = vec!["bitmap"];
        v.extend(args.iter().map(|a| if *a == "IMG" { img } else { *a }));
        v
    }
    let qr = qemu_img(d, &with(args, q));
    let or = qcow2(d, &with(args, o));
    let what = format!("{base}: bitmap {args:?}");
    assert_eq!(or.code, qr.code, "{what}: {or:?} / {qr:?}");
    assert_eq!(
        text(&or).replace(o, "IMG"),
        text(&qr).replace(q, "IMG"),
        "{what}"
    );
    let (qb, ob) = (
        std::fs::read(d.join(q)).expect("read"),
        std::fs::read(d.join(o)).expect("read"),
    );
    if qb != ob {
        let first = qb.iter().zip(&ob).position(|(a, b)| a != b);
        panic!(
            "{what}: files differ (lengths {} / {}, first difference at {first:?})",
            qb.len(),
            ob.len()
        );
    }
    if qr.code == 0 {
        let check = qemu_img(d, &["check", o]);
        assert_eq!(check.code, 0, "{what}: {check:?}");
    }
    qr.code
}

#[test]
fn operations_leave_images_byte_identical_to_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cases: &[&[&str]] = &[
        &["--add", "IMG", "new"],
        &["--add", "-g", "512", "--disable", "IMG", "new"],
        &["--add", "--granularity=1M", "IMG", "new"],
        &["-g", "4k", "IMG", "--add", "new"],
        &["--add", "--merge", "enabled", "IMG", "new"],
        &["--add", "--disable", "--enable", "--clear", "IMG", "new"],
        &["--add", "--remove", "IMG", "new"],
        &["--add", "--add", "IMG", "new"],
        &["--clear", "IMG", "enabled"],
        &["--disable", "IMG", "enabled"],
        &["--enable", "IMG", "fine"],
        &["--remove", "IMG", "enabled"],
        &["--remove", "IMG", "fine"],
        &["--remove", "--add", "IMG", "enabled"],
        &["--merge", "fine", "IMG", "enabled"],
        &["--merge", "enabled", "--disable", "IMG", "fine"],
        &["--clear", "--merge", "fine", "IMG", "enabled"],
        &["--remove", "IMG", "nope"],
        &["--clear", "IMG", "nope"],
        &["--merge", "nope", "IMG", "enabled"],
    ];
    let mut succeeded = 0;
    for base in bases(d) {
        for case in cases {
            if same(d, base, case) == 0 {
                succeeded += 1;
            }
        }
    }
    assert!(succeeded >= 25, "{succeeded} successful cases");
}

#[test]
fn merge_from_another_image() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    bases(d);
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "other.qcow2", "32M"],
    ));
    ok(qemu_img(
        d,
        &["bitmap", "--add", "-g", "1M", "other.qcow2", "src"],
    ));
    ok(qemu_io(
        d,
        &["-c", "write 7M 4k", "-c", "write 31M 1M", "other.qcow2"],
    ));
    for case in [
        &["--merge", "src", "-b", "other.qcow2", "IMG", "enabled"][..],
        &[
            "--merge",
            "src",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "IMG",
            "fine",
        ][..],
        &["--add", "--merge", "src", "-b", "other.qcow2", "IMG", "n"][..],
        &["--merge", "nope", "-b", "other.qcow2", "IMG", "enabled"][..],
    ] {
        same(d, "used.qcow2", case);
    }
    // Sizes differ: QEMU's "Bitmaps are of different sizes ...".
    assert_eq!(
        same(
            d,
            "fresh.qcow2",
            &["--add", "--merge", "src", "-b", "other.qcow2", "IMG", "n"]
        ),
        1
    );
}

#[test]
fn command_line_errors_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    bases(d);
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
            "1M",
        ],
    ));
    for case in [
        &["IMG", "x"][..],
        &["--add", "IMG"][..],
        &["--add", "IMG", "a", "b"][..],
        &["--remove", "-g", "64k", "IMG", "x"][..],
        &["-F", "qcow2", "--add", "IMG", "x"][..],
        &["-b", "used.qcow2", "--add", "IMG", "x"][..],
        &["--add", "-g", "1000", "IMG", "x"][..],
        &["--add", "-g", "256", "IMG", "x"][..],
        &["--add", "-g", "4G", "IMG", "x"][..],
        &["--add", "-g", "x", "IMG", "x"][..],
        &["--add", "-g", "-5", "IMG", "x"][..],
        &["--add", "IMG", ""][..],
        &["--add", "IMG", "enabled"][..],
        &["--bogus", "IMG", "x"][..],
        &["-z", "IMG", "x"][..],
        &["--add=1", "IMG", "x"][..],
        &["IMG", "x", "--merge"][..],
    ] {
        assert_eq!(same(d, "used.qcow2", case), 1, "{case:?}");
    }
    let long = "n".repeat(1024);
    assert_eq!(same(d, "used.qcow2", &["--add", "IMG", &long]), 1);
    assert_eq!(same(d, "v2.qcow2", &["--add", "IMG", "x"]), 1);
    // A bitmap a crashed writer left IN_USE: only --remove works on it.
    let mut bytes = std::fs::read(d.join("used.qcow2")).expect("read");
    let hl = u32::from_be_bytes(bytes[100..104].try_into().expect("4")) as usize;
    let mut off = hl;
    let dir_off = loop {
        let magic = u32::from_be_bytes(bytes[off..off + 4].try_into().expect("4"));
        let len = u32::from_be_bytes(bytes[off + 4..off + 8].try_into().expect("4")) as usize;
        if magic == 0x2385_2875 {
            break u64::from_be_bytes(bytes[off + 24..off + 32].try_into().expect("8")) as usize;
        }
        assert_ne!(magic, 0, "no bitmaps extension");
        off += 8 + len.div_ceil(8) * 8;
    };
    bytes[dir_off + 15] |= 1;
    std::fs::write(d.join("inuse.qcow2"), &bytes).expect("write");
    for case in [
        &["--clear", "IMG", "enabled"][..],
        &["--enable", "IMG", "enabled"][..],
        &["--merge", "enabled", "IMG", "fine"][..],
        &["--remove", "IMG", "enabled"][..],
        &["--remove", "--add", "IMG", "enabled"][..],
    ] {
        same(d, "inuse.qcow2", case);
    }
}

/// Runs `ARGS` (with `OUT` standing for the output file) through both tools; asserts equal
/// status, messages and output files.
fn same_convert(d: &Path, args: &[&str]) {
    let _ = std::fs::remove_file(d.join("cq.qcow2"));
    let _ = std::fs::remove_file(d.join("co.qcow2"));
    let with = |out: &'static str| -> Vec<&str> {
        args.iter()
            .map(|a| if *a == "OUT" { out } else { a })
            .collect()
    };
    let qr = qemu_img(d, &with("cq.qcow2"));
    let or = qcow2(d, &with("co.qcow2"));
    assert_eq!((or.code, text(&or)), (qr.code, text(&qr)), "{args:?}");
    if qr.code == 0 {
        let (q, o) = (
            std::fs::read(d.join("cq.qcow2")).expect("read"),
            std::fs::read(d.join("co.qcow2")).expect("read"),
        );
        assert!(q == o, "{args:?}: outputs differ");
    }
}

#[test]
fn convert_bitmaps_and_measure_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    bases(d);
    // A bitmap made by our engine and written to by it, beside QEMU's.
    ok(qcow2(
        d,
        &["bitmap", "--add", "-g", "128k", "used.qcow2", "ours"],
    ));
    ok(qcow2(d, &["io", "-c", "write 9M 300k", "used.qcow2"]));
    same_convert(
        d,
        &["convert", "--bitmaps", "-O", "qcow2", "used.qcow2", "OUT"],
    );
    same_convert(
        d,
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "used.qcow2",
            "OUT",
        ],
    );
    same_convert(
        d,
        &["convert", "--bitmaps", "-O", "raw", "used.qcow2", "OUT"],
    );
    same_convert(
        d,
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "fresh.qcow2",
            "used.qcow2",
            "OUT",
        ],
    );
    for args in [
        &["measure", "-O", "qcow2", "used.qcow2"][..],
        &["measure", "--output=json", "-O", "qcow2", "used.qcow2"][..],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "used.qcow2",
        ][..],
    ] {
        let (q, o) = (qemu_img(d, args), qcow2(d, args));
        assert_eq!((o.code, text(&o)), (q.code, text(&q)), "{args:?}");
        assert!(q.stdout.contains("bitmaps"), "{q:?}");
    }
    // Inconsistent source bitmaps: refused, or skipped with a warning.
    let mut bytes = std::fs::read(d.join("used.qcow2")).expect("read");
    let hl = u32::from_be_bytes(bytes[100..104].try_into().expect("4")) as usize;
    let mut off = hl;
    let dir_off = loop {
        let magic = u32::from_be_bytes(bytes[off..off + 4].try_into().expect("4"));
        let len = u32::from_be_bytes(bytes[off + 4..off + 8].try_into().expect("4")) as usize;
        if magic == 0x2385_2875 {
            break u64::from_be_bytes(bytes[off + 24..off + 32].try_into().expect("8")) as usize;
        }
        assert_ne!(magic, 0, "no bitmaps extension");
        off += 8 + len.div_ceil(8) * 8;
    };
    bytes[dir_off + 15] |= 1;
    std::fs::write(d.join("inuse.qcow2"), &bytes).expect("write");
    same_convert(
        d,
        &["convert", "--bitmaps", "-O", "qcow2", "inuse.qcow2", "OUT"],
    );
    same_convert(
        d,
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "inuse.qcow2",
            "OUT",
        ],
    );
}

#[test]
fn check_repair_leaves_bitmaps_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    bases(d);
    // A leaked cluster: one more cluster at the end of the file with refcount 1 (16-bit
    // refcounts, 64 KiB clusters: the first refcount block covers it).
    let mut bytes = std::fs::read(d.join("used.qcow2")).expect("read");
    let rt = u64::from_be_bytes(bytes[48..56].try_into().expect("8")) as usize;
    let rb = u64::from_be_bytes(bytes[rt..rt + 8].try_into().expect("8")) as usize;
    let leaked = bytes.len().div_ceil(65536);
    bytes.resize((leaked + 1) * 65536, 0);
    bytes[rb + 2 * leaked..rb + 2 * leaked + 2].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(d.join("leaky.qcow2"), &bytes).expect("write");
    for (base, mode) in [
        ("leaky.qcow2", "all"),
        ("leaky.qcow2", "leaks"),
        ("used.qcow2", "all"),
    ] {
        let (q, o) = ("q.qcow2", "o.qcow2");
        std::fs::copy(d.join(base), d.join(q)).expect("copy");
        std::fs::copy(d.join(base), d.join(o)).expect("copy");
        let qr = qemu_img(d, &["check", "-r", mode, q]);
        let or = qcow2(d, &["check", "-r", mode, o]);
        let what = format!("{base} -r {mode}");
        assert!(
            base != "leaky.qcow2" || qr.text().contains("leaked clusters"),
            "{what}: no leak to repair: {qr:?}"
        );
        assert_eq!(
            (or.code, text(&or).replace(o, "IMG")),
            (qr.code, text(&qr).replace(q, "IMG")),
            "{what}"
        );
        assert!(
            std::fs::read(d.join(q)).expect("q") == std::fs::read(d.join(o)).expect("o"),
            "{what}: files differ"
        );
    }
}

#[test]
fn object_and_image_opts_on_an_encrypted_image() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "luks.qcow2",
            "4M",
        ],
    ));
    let secret = "secret,id=s0,data=pw";
    // Without the key QEMU cannot open it; with --object and --image-opts both work alike.
    assert_eq!(same(d, "luks.qcow2", &["--add", "IMG", "b"]), 1);
    let (q, o) = ("q.qcow2", "o.qcow2");
    std::fs::copy(d.join("luks.qcow2"), d.join(q)).expect("copy");
    std::fs::copy(d.join("luks.qcow2"), d.join(o)).expect("copy");
    let args = |f: &str| {
        vec![
            "bitmap".to_string(),
            "--object".into(),
            secret.into(),
            "--add".into(),
            "-g".into(),
            "4k".into(),
            "--image-opts".into(),
            format!("driver=qcow2,file.filename={f},encrypt.key-secret=s0"),
            "b".into(),
        ]
    };
    let qa = args(q);
    let oa = args(o);
    let qr = qemu_img(d, &qa.iter().map(String::as_str).collect::<Vec<_>>());
    let or = qcow2(d, &oa.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!((or.code, text(&or)), (qr.code, text(&qr)));
    assert_eq!(qr.code, 0, "{qr:?}");
    assert!(
        std::fs::read(d.join(q)).expect("q") == std::fs::read(d.join(o)).expect("o"),
        "files differ"
    );
}
