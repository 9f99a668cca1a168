//! `qcow2 rebase` and `qcow2 commit` against `qemu-img rebase` / `qemu-img commit` on copies
//! of the same three-image chains (qcow2 and raw bases, compressed and zero clusters,
//! extended L2): what the commands print and exit with, and the images they leave (maps,
//! `qemu-img compare` of ours against QEMU's, `qemu-img check`, header and file bytes where
//! QEMU's result is deterministic).

mod common;

use common::{have_qemu, map_json as map, ok, qemu_img, qemu_io, same_output, Pair};
use std::path::Path;

/// The three chains the tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// base.qcow2 <- mid.qcow2 <- top.qcow2, 4 KiB clusters.
    Qcow2,
    /// base.raw <- mid.qcow2 <- top.qcow2.
    RawBase,
    /// As `Qcow2` with 64 KiB clusters and extended L2 entries (2 KiB subclusters).
    ExtendedL2,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Qcow2, Kind::RawBase, Kind::ExtendedL2];

    fn base(self) -> &'static str {
        match self {
            Kind::RawBase => "base.raw",
            _ => "base.qcow2",
        }
    }

    fn base_fmt(self) -> &'static str {
        match self {
            Kind::RawBase => "raw",
            _ => "qcow2",
        }
    }

    fn opts(self) -> &'static str {
        match self {
            Kind::ExtendedL2 => "cluster_size=64k,extended_l2=on",
            _ => "cluster_size=4k",
        }
    }
}

fn io(d: &Path, file: &str, cmds: &[&str]) {
    let mut a: Vec<&str> = Vec::new();
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(file);
    ok(qemu_io(d, &a));
}

/// Builds the chain of `kind` in `d` with QEMU, plus `other.qcow2` (a different base of
/// the same size) for rebasing onto.
fn chain(d: &Path, kind: Kind) {
    let o = kind.opts();
    match kind {
        Kind::RawBase => raw_base(d),
        _ => {
            ok(qemu_img(
                d,
                &["create", "-q", "-f", "qcow2", "-o", o, "base.qcow2", "16M"],
            ));
            io(
                d,
                "base.qcow2",
                &[
                    "write -P 1 0 1M",
                    "write -c -P 2 2M 64k",
                    "write -z 3M 64k",
                    "write -P 2 6M 3000",
                ],
            );
        }
    }
    let b = kind.base();
    let f = kind.base_fmt();
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            o,
            "-b",
            b,
            "-F",
            f,
            "mid.qcow2",
        ],
    ));
    io(
        d,
        "mid.qcow2",
        &[
            "write -P 3 512k 1M",
            "write -z 4M 64k",
            "write -c -P 6 5M 64k",
            "write -z 6M 4k",
        ],
    );
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            o,
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ));
    io(
        d,
        "top.qcow2",
        &[
            "write -P 4 8M 4k",
            "write -z 0 4k",
            "write -P 7 10M 2k",
            "write -c -P 8 12M 64k",
        ],
    );
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "-o", o, "other.qcow2", "16M"],
    ));
    io(d, "other.qcow2", &["write -P 1 0 768k", "write -P 9 7M 1M"]);
}

/// The raw base: data with holes around it.
fn raw_base(d: &Path) {
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "raw", "base.raw", "16M"],
    ));
    io(d, "base.raw", &["write -P 1 0 1M", "write -P 2 6M 3000"]);
}

/// A pair of directories holding the same chain: made by QEMU once and copied (QEMU places
/// the clusters of a multi-cluster compressed write in no fixed order), except a raw base,
/// made by QEMU in both (a copy would not keep its holes, which block status reports).
fn pair(kind: Kind) -> Pair {
    let p = Pair::new();
    chain(&p.qemu(), kind);
    for f in ["mid.qcow2", "top.qcow2", "other.qcow2"] {
        p.copy_to_ours(f);
    }
    match kind {
        Kind::RawBase => raw_base(&p.ours()),
        _ => p.copy_to_ours(kind.base()),
    }
    p
}

/// `qemu-img check` finds no corruption and no leak in `file`.
fn assert_check_clean(d: &Path, file: &str) {
    let r = qemu_img(d, &["check", file]);
    assert_eq!(r.code, 0, "{file}: {r:?}");
}

/// QEMU's `qemu-img compare` says ours and QEMU's `file` read the same.
fn assert_same_contents(p: &Pair, file: &str) {
    let a = p.ours().join(file);
    let b = p.qemu().join(file);
    let r = qemu_img(
        p.root.path(),
        &["compare", a.to_str().unwrap(), b.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{file}: {r:?}");
}

fn args(s: &str) -> Vec<&str> {
    s.split(' ').filter(|a| !a.is_empty()).collect()
}

#[test]
fn rebase_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    for kind in Kind::ALL {
        let f = kind.base_fmt();
        let b = kind.base();
        let cases: Vec<(String, bool)> = vec![
            // (arguments, QEMU's file bytes are deterministic)
            (format!("-b {b} -F {f}"), true),
            ("-b other.qcow2 -F qcow2".into(), true),
            ("-b mid.qcow2 -F qcow2".into(), true),
            (format!("-u -b {b} -F {f}"), true),
            ("-u -b renamed.qcow2 -F qcow2".into(), true),
            ("-c -b other.qcow2 -F qcow2".into(), false),
            (format!("-p -b {b} -F {f}"), true),
            // Copied first, then refused: the backing format is required.
            (format!("-b {b}"), true),
            ("-b nonexist.qcow2 -F qcow2".into(), true),
            ("-b other.qcow2 -F foo".into(), true),
            ("-b other.qcow2 -F qcow2 -t bogus".into(), true),
            ("-b other.qcow2 -F qcow2 -T bogus".into(), true),
            ("-F qcow2".into(), true),
        ];
        for (a, deterministic) in cases {
            let what = format!("{kind:?} rebase {a}");
            let p = pair(kind);
            let mut argv = vec!["rebase"];
            argv.extend(args(&a));
            argv.push("top.qcow2");
            let (ours, qemu) = p.both(&argv);
            if qemu.code < 0 {
                // qemu-img 10 aborts on an assertion when -c meets an overlay allocating
                // only some subclusters of a cluster; we copy such steps uncompressed.
                assert!(qemu.stderr.contains("Assertion"), "{what}: {qemu:?}");
                assert_eq!(ours.code, 0, "{what}: {ours:?}");
                let fresh = pair(kind);
                let a = p.ours().join("top.qcow2");
                let b = fresh.qemu().join("top.qcow2");
                let r = qemu_img(
                    p.root.path(),
                    &["compare", a.to_str().unwrap(), b.to_str().unwrap()],
                );
                assert_eq!(r.code, 0, "{what}: {r:?}");
                assert_check_clean(&p.ours(), "top.qcow2");
                continue;
            }
            same_output(&ours, &qemu, &what);
            let top_ours = std::fs::read(p.ours().join("top.qcow2")).unwrap();
            let top_qemu = std::fs::read(p.qemu().join("top.qcow2")).unwrap();
            if deterministic {
                assert!(top_ours == top_qemu, "{what}: top.qcow2 bytes differ");
            } else {
                // Compressed bytes come from another deflate implementation: same layout
                // and contents, not the same bytes.
                assert_eq!(top_ours[..4096], top_qemu[..4096], "{what}: header");
            }
            if !a.contains("renamed") {
                assert_eq!(
                    map(&p.ours(), "top.qcow2", deterministic),
                    map(&p.qemu(), "top.qcow2", deterministic),
                    "{what}"
                );
                assert_check_clean(&p.ours(), "top.qcow2");
                assert_same_contents(&p, "top.qcow2");
            }
        }
    }
}

#[test]
fn rebase_flatten_and_header_only_rename() {
    if !have_qemu() {
        return;
    }
    for kind in Kind::ALL {
        let p = pair(kind);
        // The guest view before, as a raw file, to compare with after the flatten.
        ok(qemu_img(
            &p.qemu(),
            &["convert", "-O", "raw", "top.qcow2", "before.raw"],
        ));
        let (ours, qemu) = p.both(&["rebase", "-p", "-b", "", "top.qcow2"]);
        same_output(&ours, &qemu, "flatten");
        let a = std::fs::read(p.ours().join("top.qcow2")).unwrap();
        let b = std::fs::read(p.qemu().join("top.qcow2")).unwrap();
        assert!(a == b, "{kind:?}: flattened top.qcow2 bytes differ");
        let info = qemu_img(&p.ours(), &["info", "top.qcow2"]);
        assert!(!info.stdout.contains("backing file"), "{}", info.stdout);
        let before = p.qemu().join("before.raw");
        let r = qemu_img(
            &p.ours(),
            &["compare", "top.qcow2", before.to_str().unwrap()],
        );
        assert_eq!(r.code, 0, "{r:?}");
        assert_check_clean(&p.ours(), "top.qcow2");

        // Header only: the file is renamed, then the name is fixed without opening it.
        let p = pair(kind);
        for d in [p.ours(), p.qemu()] {
            std::fs::rename(d.join("mid.qcow2"), d.join("moved.qcow2")).unwrap();
        }
        let (ours, qemu) = p.both(&["rebase", "top.qcow2", "-b", "moved.qcow2", "-F", "qcow2"]);
        same_output(&ours, &qemu, "safe rebase with a missing backing file");
        let (ours, qemu) = p.both(&[
            "rebase",
            "-u",
            "-b",
            "moved.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        same_output(&ours, &qemu, "rename");
        assert_eq!(
            std::fs::read(p.ours().join("top.qcow2")).unwrap(),
            std::fs::read(p.qemu().join("top.qcow2")).unwrap()
        );
        assert_same_contents(&p, "top.qcow2");
    }
}

#[test]
fn rebase_resolves_names_relative_to_the_overlay() {
    if !have_qemu() {
        return;
    }
    let p = pair(Kind::Qcow2);
    for d in [p.ours(), p.qemu()] {
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::rename(d.join("top.qcow2"), d.join("sub/top.qcow2")).unwrap();
        // top names mid.qcow2 next to itself: point it one level up first.
        ok(qemu_img(
            &d,
            &[
                "rebase",
                "-u",
                "-b",
                "../mid.qcow2",
                "-F",
                "qcow2",
                "sub/top.qcow2",
            ],
        ));
    }
    let (ours, qemu) = p.both(&[
        "rebase",
        "-b",
        "../other.qcow2",
        "-F",
        "qcow2",
        "sub/top.qcow2",
    ]);
    same_output(&ours, &qemu, "relative rebase");
    assert_eq!(
        std::fs::read(p.ours().join("sub/top.qcow2")).unwrap(),
        std::fs::read(p.qemu().join("sub/top.qcow2")).unwrap()
    );
    // A name that only exists relative to the current directory is not found.
    let (ours, qemu) = p.both(&[
        "rebase",
        "-b",
        "other.qcow2",
        "-F",
        "qcow2",
        "sub/top.qcow2",
    ]);
    same_output(&ours, &qemu, "name relative to the current directory");
    assert_eq!(ours.code, 1);
}

#[test]
fn commit_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    for kind in Kind::ALL {
        let b = kind.base();
        let cases = [
            "".to_string(),
            "-d".into(),
            "-q".into(),
            "-p".into(),
            format!("-b {b}"),
            "-b mid.qcow2".into(),
            "-b nothere".into(),
            "-r 1G".into(),
            "-r abc".into(),
            "-t bogus".into(),
        ];
        for a in cases {
            let what = format!("{kind:?} commit {a}");
            let p = pair(kind);
            let mut argv = vec!["commit"];
            argv.extend(args(&a));
            argv.push("top.qcow2");
            let (ours, qemu) = p.both(&argv);
            if a == "-p" {
                // qemu-img prints the job's progress as often as its event loop polls.
                assert_eq!(ours.code, qemu.code, "{what}");
                assert!(ours.stdout.contains("(100.00/100%)"), "{what}: {ours:?}");
                assert!(
                    ours.stdout.ends_with("Image committed.\n"),
                    "{what}: {ours:?}"
                );
            } else {
                same_output(&ours, &qemu, &what);
            }
            for f in [b, "mid.qcow2", "top.qcow2"] {
                assert_same_contents(&p, f);
                if f.ends_with(".qcow2") {
                    assert_check_clean(&p.ours(), f);
                    assert_eq!(
                        map(&p.ours(), f, false),
                        map(&p.qemu(), f, false),
                        "{what}: {f}"
                    );
                }
            }
            // The emptied overlay is QEMU's byte for byte.
            assert!(
                std::fs::read(p.ours().join("top.qcow2")).unwrap()
                    == std::fs::read(p.qemu().join("top.qcow2")).unwrap(),
                "{what}: top.qcow2 bytes differ"
            );
            // The base's header fields (sizes, tables) match QEMU's.
            if kind != Kind::RawBase {
                let info = |d: &Path| {
                    let r = qemu_img(d, &["info", "--output=json", b]);
                    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
                    (v["virtual-size"].clone(), v["format-specific"].clone())
                };
                assert_eq!(info(&p.ours()), info(&p.qemu()), "{what}");
            }
        }
    }
}

#[test]
fn commit_grows_a_smaller_base_and_refuses_images_without_backing() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    let q = p.qemu();
    ok(qemu_img(
        &q,
        &["create", "-q", "-f", "qcow2", "small.qcow2", "1M"],
    ));
    io(&q, "small.qcow2", &["write -P 1 0 64k"]);
    ok(qemu_img(
        &q,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "small.qcow2",
            "-F",
            "qcow2",
            "big.qcow2",
            "4M",
        ],
    ));
    io(&q, "big.qcow2", &["write -P 2 3M 64k"]);
    for f in ["small.qcow2", "big.qcow2"] {
        p.copy_to_ours(f);
    }
    let (ours, qemu) = p.both(&["commit", "big.qcow2"]);
    same_output(&ours, &qemu, "commit into a smaller base");
    assert_same_contents(&p, "small.qcow2");
    assert_check_clean(&p.ours(), "small.qcow2");
    let (ours, qemu) = p.both(&["commit", "small.qcow2"]);
    same_output(&ours, &qemu, "no backing file");
    assert_eq!(ours.code, 1);
    let (ours, qemu) = p.both(&["commit"]);
    assert_eq!((ours.code, qemu.code), (1, 1));
}

#[test]
fn raw_images_and_missing_backing_files_are_refused_as_qemu_img_refuses_them() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    for d in [p.ours(), p.qemu()] {
        ok(qemu_img(&d, &["create", "-q", "-f", "raw", "r.raw", "1M"]));
        ok(qemu_img(
            &d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "gone.qcow2",
                "-F",
                "qcow2",
                "o.qcow2",
                "1M",
            ],
        ));
    }
    for a in [
        "rebase -b x -F raw r.raw",
        "rebase -u -b x -F raw r.raw",
        "rebase -c -b x -F raw -f raw r.raw",
        "commit r.raw",
        "commit o.qcow2",
        "rebase -b '' o.qcow2",
    ] {
        let argv: Vec<&str> = a
            .split(' ')
            .map(|s| if s == "''" { "" } else { s })
            .collect();
        let (ours, qemu) = p.both(&argv);
        same_output(&ours, &qemu, a);
        assert_eq!(ours.code, 1, "{a}");
    }
    // Nothing was written.
    for f in ["r.raw", "o.qcow2"] {
        assert_eq!(
            std::fs::read(p.ours().join(f)).unwrap(),
            std::fs::read(p.qemu().join(f)).unwrap()
        );
    }
}
