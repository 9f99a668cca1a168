//! `qcow2 create` against `qemu-img create`: the same command line in two directories must
//! print the same text, exit the same way and (on success) write byte-identical files that
//! `qemu-img check` finds clean.

mod common;

use common::{have_qemu, qemu_img, Pair};

/// Command lines that succeed; each creates `t.img` (plus what the setup made).
const GOOD: &[&[&str]] = &[
    &["create", "-f", "qcow2", "t.img", "1G"],
    &["create", "-f", "qcow2", "t.img", "512M"],
    &["create", "-f", "qcow2", "t.img", "1073741824"],
    &["create", "-f", "qcow2", "t.img", "1.5M"],
    &["create", "-f", "qcow2", "t.img", "0x100000"],
    &["create", "-f", "qcow2", "t.img", "100"],
    &["create", "-f", "qcow2", "t.img", "0"],
    &["create", "-f", "qcow2", "t.img", "1P"],
    &["create", "-f", "qcow2", "-o", "compat=0.10", "t.img", "1G"],
    &["create", "-f", "qcow2", "-o", "compat=v2", "t.img", "1G"],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=1.1,lazy_refcounts=on",
        "t.img",
        "128M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,refcount_bits=1",
        "t.img",
        "64M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "t.img",
        "16M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M,refcount_bits=64",
        "t.img",
        "10T",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k,extended_l2=on,compression_type=zstd,lazy_refcounts=yes",
        "t.img",
        "512M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-o",
        "refcount_bits=8",
        "t.img",
        "1M",
    ],
    &["create", "-f", "qcow2", "-o", "size=5G", "t.img"],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=off",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts",
        "t.img",
        "1M",
    ],
    &["create", "-q", "-f", "qcow2", "t.img", "1M"],
    &[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "t.img",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "t.img",
        "2G",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        "t.img",
        "1M",
    ],
    &[
        "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "t.img",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "t.img",
    ],
    &["create", "-f", "raw", "t.img", "1M"],
    &["create", "t.img", "1M"],
    &[
        "create",
        "-f",
        "raw",
        "-o",
        "preallocation=full",
        "t.img",
        "64k",
    ],
];

fn setup(p: &Pair) {
    for dir in [p.ours(), p.qemu()] {
        let r = qemu_img(&dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "300M"]);
        assert_eq!(r.code, 0, "{r:?}");
        std::fs::write(dir.join("base.raw"), vec![7u8; 3000]).expect("write");
    }
}

#[test]
fn successful_creates_match_qemu_img_byte_for_byte() {
    if !have_qemu() {
        return;
    }
    for args in GOOD {
        let p = Pair::new();
        setup(&p);
        let (ours, qemu) = p.both(args);
        assert_eq!(ours, qemu, "output of {args:?}");
        assert_eq!(ours.code, 0, "{args:?}");
        let a = std::fs::read(p.ours().join("t.img")).expect("ours");
        let b = std::fs::read(p.qemu().join("t.img")).expect("qemu's");
        assert!(
            a == b,
            "{args:?}: files differ ({} vs {} bytes)",
            a.len(),
            b.len()
        );
        // Raw files have nothing to check; a missing backing file cannot be opened.
        if !args.contains(&"raw")
            && !args.contains(&"missing.qcow2")
            && *args != ["create", "t.img", "1M"]
        {
            let c = qemu_img(&p.ours(), &["check", "t.img"]);
            assert_eq!(c.code, 0, "{args:?}: qemu-img check: {c:?}");
        }
    }
}

/// Failing command lines: same first error line, same exit status. qemu-img sometimes adds
/// a hint line ("Could not open backing image.", "Detected format of qcow2.", the size
/// suffix explanation); we print one line, so only the first error line is compared.
const BAD: &[&[&str]] = &[
    &["create", "-f", "qcow2", "t.img"],
    &["create", "-f", "qcow2", "t.img", "1X"],
    &["create", "-f", "qcow2", "t.img", "1.5"],
    &["create", "-f", "qcow2", "t.img", "1kB"],
    &["create", "-f", "qcow2", "t.img", "9E"],
    &["create", "-f", "qcow2", "t.img", "100000000000000000000"],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=1000",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4M",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=abc",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=3",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=128",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=16k",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,refcount_bits=64",
        "t.img",
        "1M",
    ],
    &["create", "-f", "qcow2", "-o", "compat=0.42", "t.img", "1M"],
    &["create", "-f", "qcow2", "-o", "foo=bar", "t.img", "1M"],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=maybe",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compression_type=lz4",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=bogus",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,lazy_refcounts=on",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,compression_type=zstd",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,extended_l2=on",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=8k,extended_l2=on",
        "t.img",
        "1M",
    ],
    &["create", "-f", "qcow2", "-o", "size=1M", "t.img", "2M"],
    &["create", "-f", "qcow2", "-o", "", "t.img", "1M"],
    &["create", "-f", "qcow2", "-F", "qcow2", "t.img", "1M"],
    &["create", "-f", "qcow2", "-b", "base.qcow2", "t.img"],
    &[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "base.qcow2",
        "t.img",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "t.img",
    ],
    &[
        "create", "-f", "qcow2", "-b", "t.img", "-F", "qcow2", "t.img", "1M",
    ],
    &[
        "create", "-f", "qcow2", "-b", "", "-F", "qcow2", "t.img", "1M",
    ],
    &[
        "create", "-f", "qcow2", "-b", "base.raw", "-F", "qcow2", "t.img",
    ],
    &[
        "create", "-f", "qcow2", "-b", "missing", "-F", "raw", "t.img",
    ],
    &["create", "-f", "qcow2", "t.img", "4P"],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "t.img",
        "1T",
    ],
    &["create", "-f", "foo", "t.img", "1M"],
    &[
        "create",
        "-f",
        "raw",
        "-o",
        "cluster_size=4k",
        "t.img",
        "1M",
    ],
    &["create", "-f", "qcow2", "/nonexistent/dir/t.img", "1M"],
];

#[test]
fn failing_creates_give_qemu_img_first_error_line() {
    if !have_qemu() {
        return;
    }
    for args in BAD {
        let p = Pair::new();
        setup(&p);
        let (ours, qemu) = p.both(args);
        assert_eq!(
            ours.code, qemu.code,
            "exit status of {args:?}: {ours:?} {qemu:?}"
        );
        assert_eq!(ours.stdout, qemu.stdout, "stdout of {args:?}");
        // Our message is qemu-img's first line, or all of its lines (the size message has
        // two continuation lines; qemu-img's other second lines are hints we do not print).
        let qemu_text = qemu.stderr.replace("qemu-img: ", "qcow2: ");
        let first = qemu_text.lines().next().unwrap_or("");
        assert!(
            ours.stderr.starts_with(&format!("{first}\n")) && qemu_text.starts_with(&ours.stderr),
            "stderr of {args:?}: {ours:?} {qemu:?}"
        );
    }
}

#[test]
fn option_help_lists_what_we_accept() {
    let p = Pair::new();
    let r = common::qcow2(&p.ours(), &["create", "-f", "qcow2", "-o", "help"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("Supported qcow2 options:\n"));
    for name in [
        "cluster_size=<size>",
        "refcount_bits=<num>",
        "compat=<str>",
        "lazy_refcounts=<bool (on/off)>",
    ] {
        assert!(r.stdout.contains(name), "{name} missing: {}", r.stdout);
    }
    if have_qemu() {
        // Every line we print is one of qemu-img's (we omit the encrypt.* options).
        let q = qemu_img(&p.qemu(), &["create", "-f", "qcow2", "-o", "help"]);
        for line in r.stdout.lines() {
            assert!(
                q.stdout.lines().any(|l| l == line),
                "not in qemu-img's help: {line}"
            );
        }
    }
}

/// `create -o preallocation=metadata|falloc|full` against qemu-img: the same "Formatting"
/// line, clean checks, identical guest data (qemu-img compare), and for metadata with 64 KiB
/// clusters a byte-identical file; falloc and full reserve the data clusters' blocks (the
/// file is not sparse, and `map` says "zero": false as qemu-img's). Documented difference:
/// falloc/full keep the refcount table at cluster 1 where qemu-img moves it to cluster 4;
/// the file lengths are equal.
#[test]
fn preallocation_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    for mode in ["metadata", "falloc", "full"] {
        let opt = format!("preallocation={mode}");
        let args = ["create", "-f", "qcow2", "-o", &opt, "t.qcow2", "3M"];
        let (ours, qemu) = p.both(&args);
        assert_eq!(ours.code, 0, "{mode}: {ours:?}");
        assert_eq!(ours.text(), qemu.text(), "{mode}");
        let d = p.ours();
        let c = qemu_img(&d, &["check", "t.qcow2"]);
        assert_eq!(c.code, 0, "{mode}: {c:?}");
        assert!(
            c.stdout.contains("48/48 = 100.00% allocated"),
            "{mode}: {c:?}"
        );
        let root = p.root.path();
        let cmp = qemu_img(root, &["compare", "ours/t.qcow2", "qemu/t.qcow2"]);
        assert_eq!(cmp.code, 0, "{mode}: {cmp:?}");
        let a = std::fs::read(p.ours().join("t.qcow2")).expect("read");
        let b = std::fs::read(p.qemu().join("t.qcow2")).expect("read");
        assert_eq!(a.len(), b.len(), "{mode}");
        if mode == "metadata" {
            assert!(a == b, "metadata: files differ");
        }
        let map =
            |dir: &std::path::Path| qemu_img(dir, &["map", "--output=json", "t.qcow2"]).stdout;
        assert_eq!(map(&p.ours()), map(&p.qemu()), "{mode}");
        if mode != "metadata" {
            use std::os::unix::fs::MetadataExt;
            let blocks = |dir: std::path::PathBuf| {
                std::fs::metadata(dir.join("t.qcow2"))
                    .expect("stat")
                    .blocks()
                    * 512
            };
            // Every data cluster has blocks (allow the filesystem's rounding).
            assert!(
                blocks(p.ours()) >= 3 << 20,
                "{mode}: {} bytes allocated",
                blocks(p.ours())
            );
            assert!(blocks(p.ours()) + (64 << 10) >= blocks(p.qemu()), "{mode}");
        }
    }
    // Preallocation with a backing file needs extended L2 entries.
    let args = [
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=full",
        "-b",
        "t.qcow2",
        "-F",
        "qcow2",
        "u.qcow2",
        "1M",
    ];
    let (ours, qemu) = p.both(&args);
    assert_eq!((ours.code, ours.text()), (qemu.code, qemu.text()));
}
