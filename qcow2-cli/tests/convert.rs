//! `qcow2 convert` against `qemu-img convert`: raw and qcow2 sources (with a backing chain
//! named relative to the source's directory, and several sources concatenated), raw and
//! qcow2 targets, `-c` (zlib and zstd), `-o` create options. Every output must compare equal
//! to the source and to qemu-img's output (qemu-img compare), qcow2 outputs must check clean,
//! and ours must not occupy more clusters than qemu-img's (image end offsets compared; ours
//! is at most equal: both skip zero and unallocated clusters, and compressed clusters are
//! packed in guest order; exception: with 4 KiB clusters the output ends up to two clusters
//! later than qemu-img's, from the engine's metadata placement; raw outputs are compared by
//! their hole maps). Messages and exit statuses match qemu-img's.

mod common;

use common::{have_qemu, qemu_img, qemu_io, Pair};

/// Deterministic incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn setup(p: &Pair) {
    for dir in [p.ours(), p.qemu()] {
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        let ok = |r: common::Run| assert_eq!(r.code, 0, "{r:?}");
        ok(qemu_img(
            &dir,
            &["create", "-q", "-f", "qcow2", "sub/base.qcow2", "16M"],
        ));
        ok(qemu_io(
            &dir,
            &[
                "-c",
                "write -P 5 0 4M",
                "-c",
                "write -P 8 12M 64k",
                "sub/base.qcow2",
            ],
        ));
        // The backing name is relative to sub/, not to the working directory.
        ok(qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "sub/top.qcow2",
            ],
        ));
        ok(qemu_io(
            &dir,
            &[
                "-c",
                "write -P 6 1M 1M",
                "-c",
                "write -z 3M 64k",
                "-c",
                "write -c -P 7 5M 128k",
                "-c",
                "write -P 0 6M 256k",
                "-c",
                "write -P 9 16760832 4096",
                "sub/top.qcow2",
            ],
        ));
        let mut raw = noise(3 << 20, 42);
        raw.extend(vec![0u8; 2 << 20]);
        raw.extend(std::iter::repeat_n(b"compressible text ".as_slice(), 100_000).flatten());
        raw.extend(noise(1000, 7));
        std::fs::write(dir.join("s.raw"), raw).expect("write");
    }
}

#[test]
fn convert_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    setup(&p);
    let cases: &[(&[&str], &str)] = &[
        (&["-O", "qcow2", "sub/top.qcow2"], "qcow2"),
        (&["-c", "-O", "qcow2", "sub/top.qcow2"], "qcow2"),
        (&["-O", "raw", "sub/top.qcow2"], "raw"),
        (&["sub/top.qcow2"], "raw"),
        (
            &["-c", "-O", "qcow2", "-o", "compression_type=zstd", "s.raw"],
            "qcow2",
        ),
        (
            &["-c", "-O", "qcow2", "-o", "cluster_size=4k", "s.raw"],
            "qcow2",
        ),
        (&["-f", "raw", "-O", "qcow2", "s.raw"], "qcow2"),
        (
            &[
                "-O",
                "qcow2",
                "-o",
                "cluster_size=16k,refcount_bits=64,lazy_refcounts=on",
                "sub/top.qcow2",
            ],
            "qcow2",
        ),
        (
            &["-O", "qcow2", "-o", "compat=0.10", "sub/top.qcow2"],
            "qcow2",
        ),
        (&["-q", "-O", "qcow2", "sub/top.qcow2", "s.raw"], "qcow2"),
    ];
    let root = p.root.path();
    for (args, fmt) in cases {
        let mut a = vec!["convert"];
        a.extend_from_slice(args);
        a.push("out.img");
        let (ours, qemu) = p.both(&a);
        assert_eq!(ours.code, 0, "{args:?}: {ours:?}");
        assert_eq!(qemu.code, 0, "{args:?}: {qemu:?}");
        assert_eq!(ours.text(), qemu.text(), "{args:?}");
        let cmp = qemu_img(
            root,
            &[
                "compare",
                "-f",
                fmt,
                "-F",
                fmt,
                "ours/out.img",
                "qemu/out.img",
            ],
        );
        assert_eq!(cmp.code, 0, "{args:?}: {cmp:?}");
        // Against the source itself when there is one source.
        if !(args.contains(&"s.raw") && args.contains(&"sub/top.qcow2")) {
            let src = format!("ours/{}", args.last().expect("source"));
            let cmp = qemu_img(root, &["compare", "-F", fmt, &src, "ours/out.img"]);
            assert_eq!(cmp.code, 0, "{args:?}: {cmp:?}");
        }
        if *fmt == "qcow2" {
            let c = qemu_img(&p.ours(), &["check", "out.img"]);
            assert_eq!(c.code, 0, "{args:?}: {c:?}");
            // No backing file in the output: the chain is flattened.
            let info = qemu_img(&p.ours(), &["info", "out.img"]);
            assert!(!info.stdout.contains("backing file"), "{args:?}");
        }
        if *fmt == "raw" {
            // Raw files: the same holes (st_blocks also counts the file system's extent
            // blocks, which depend on the write order).
            let map = |dir: &std::path::Path| {
                qemu_img(dir, &["map", "--output=json", "-f", "raw", "out.img"]).stdout
            };
            assert_eq!(map(&p.ours()), map(&p.qemu()), "{args:?}");
        } else {
            // "Image end offset" (from the refcounts, deterministic; st_blocks also counts
            // file-system allocation noise).
            let end = |dir: &std::path::Path| {
                let c = qemu_img(dir, &["check", "out.img"]).stdout;
                c.lines()
                    .find_map(|l| l.strip_prefix("Image end offset: "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let (a, b) = (end(&p.ours()), end(&p.qemu()));
            // With 4 KiB clusters the engine places refcount blocks and compressed bytes
            // slightly differently from QEMU: up to two clusters more (documented).
            let slack = if args.contains(&"cluster_size=4k") {
                8192
            } else {
                0
            };
            assert!(
                a <= b + slack,
                "{args:?}: our image ends at {a}, qemu-img's at {b}"
            );
        }
    }
}

/// Zero and unallocated source ranges allocate nothing in the output: the same clusters are
/// mapped as data as in qemu-img's output.
#[test]
fn convert_skips_zero_clusters_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    setup(&p);
    for extra in [&[][..], &["-c"][..]] {
        let mut a = vec!["convert", "-O", "qcow2"];
        a.extend_from_slice(extra);
        a.extend(["sub/top.qcow2", "out.qcow2"]);
        let (ours, qemu) = p.both(&a);
        assert_eq!((ours.code, qemu.code), (0, 0));
        let data = |dir: &std::path::Path| {
            let m = qemu_img(dir, &["map", "--output=json", "out.qcow2"]).stdout;
            m.lines()
                .filter(|l| l.contains("\"data\": true"))
                .map(|l| l.split(", \"offset\"").next().unwrap_or(l).to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(data(&p.ours()), data(&p.qemu()), "{extra:?}");
    }
}

#[test]
fn convert_messages_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    setup(&p);
    let cases: &[&[&str]] = &[
        &["-c", "-O", "raw", "s.raw", "x"],
        &["-O", "foo", "s.raw", "x"],
        &["-O", "qcow2", "-o", "foo=bar", "s.raw", "x"],
        &["-O", "qcow2", "-o", "cluster_size=3k", "s.raw", "x"],
        &["-O", "qcow2", "-o", "cluster_size=1x", "s.raw", "x"],
        &["-O", "qcow2", "-o", "compression_type=lz4", "s.raw", "x"],
        &[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=64",
            "s.raw",
            "x",
        ],
        &["-O", "raw", "-o", "cluster_size=4k", "s.raw", "x"],
        &["-O", "qcow2", "missing", "x"],
        &["-O", "qcow2", "s.raw"],
        &["-O", "qcow2", "s.raw", "nodir/x"],
    ];
    for case in cases {
        let mut a = vec!["convert"];
        a.extend_from_slice(case);
        let (ours, qemu) = p.both(&a);
        assert_eq!(ours.code, qemu.code, "{case:?}: {ours:?} {qemu:?}");
        assert_eq!(ours.text(), qemu.text(), "{case:?}");
        assert_eq!(
            p.ours().join("x").exists(),
            p.qemu().join("x").exists(),
            "{case:?}"
        );
    }
    // -p: QEMU's progress lines from 0.00 to 100.00, then a newline.
    let r = common::qcow2(&p.ours(), &["convert", "-p", "-O", "qcow2", "s.raw", "y"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("    (0.00/100%)\r"), "{r:?}");
    assert!(r.stdout.ends_with("    (100.00/100%)\r\n"), "{r:?}");
}

/// A `preallocation=metadata` source: every cluster is allocated, but the unwritten ones
/// are holes in the image file, which QEMU's block status reports as zero. The outputs
/// stay sparse: the same data clusters (qcow2) and the same holes (raw) as qemu-img's.
#[test]
fn convert_of_metadata_preallocated_image_is_sparse_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    let ok = |r: common::Run| assert_eq!(r.code, 0, "{r:?}");
    ok(qemu_img(
        &p.qemu(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "pm.qcow2",
            "8M",
        ],
    ));
    ok(qemu_io(
        &p.qemu(),
        &[
            "-c",
            "write -P 1 64k 64k",
            "-c",
            "write -P 2 1M 4k",
            "-c",
            "write -z 2M 64k",
            "-c",
            "write -P 3 5M 128k",
            "pm.qcow2",
        ],
    ));
    p.copy_to_ours("pm.qcow2");
    for (fmt, out) in [("qcow2", "out.qcow2"), ("raw", "out.raw")] {
        let (ours, qemu) = p.both(&["convert", "-O", fmt, "pm.qcow2", out]);
        assert_eq!((ours.code, qemu.code), (0, 0), "{ours:?} {qemu:?}");
        let map = |dir: &std::path::Path| {
            let m = qemu_img(dir, &["map", "--output=json", "-f", fmt, out]).stdout;
            // Host offsets of a qcow2 output depend on each engine's layout.
            m.lines()
                .map(|l| l.split(", \"offset\"").next().unwrap_or(l).to_string())
                .collect::<Vec<_>>()
        };
        let ours_map = map(&p.ours());
        assert_eq!(ours_map, map(&p.qemu()), "{fmt}");
        // Sparse: 196 KiB of data (plus the first block of a raw file) out of 8 MiB.
        let blocks = |dir: &std::path::Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.join(out)).expect("stat").blocks() * 512
        };
        assert!(blocks(&p.ours()) < 1 << 20, "{fmt}: {}", blocks(&p.ours()));
        let data = ours_map
            .iter()
            .filter(|l| l.contains("\"data\": true"))
            .count();
        assert!(data >= 3, "{ours_map:?}");
        let cmp = qemu_img(
            p.root.path(),
            &[
                "compare",
                "-f",
                fmt,
                "-F",
                fmt,
                &format!("ours/{out}"),
                &format!("qemu/{out}"),
            ],
        );
        assert_eq!(cmp.code, 0, "{cmp:?}");
    }
}
